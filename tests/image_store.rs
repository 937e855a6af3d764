//! The image store with real clients: podman builds images from a
//! busybox-static root filesystem (no network), saves them as
//! docker-archive and oci-archive, and `unionfs image load` must give the
//! same diff_ids, IDs and, mounted with unionfs, the same tree as podman's
//! own mount of the image. Hostile archives made here with the tar crate
//! must be refused without changing the store or writing outside it.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::podman::{Podman, install_busybox};
use common::store::ImageStore as Store;
use common::*;
use sha2::{Digest as _, Sha256};

const BASE_FILES: &[(&str, &[u8])] = &[
    ("data/a", b"base\n"),
    ("data/sub/b", b"base2\n"),
    ("data/gone", b"gone\n"),
    ("data/keep/k", b"keep\n"),
    ("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n"),
];

/// Deletes files, replaces a directory, makes hard links, symlinks, a
/// fifo, setuid and owned files, and one step that makes no layer.
const CONTAINERFILE: &str = "FROM base
RUN echo changed >> /data/a && chmod 600 /data/a && chown 12:34 /data/a
RUN rm /data/gone && mkdir -p /data/new && echo n > /data/new/f
ENV FOO=bar
RUN ln /data/sub/b /data/hard && rm -rf /data/sub && mkdir /data/sub && echo fresh > /data/sub/c
RUN mv /data/new /data/moved && touch /data/moved/g && chmod 4755 /data/moved/g && mkfifo /data/fifo
RUN mv /data/keep /data/kept && ln -s kept /data/link && ln -s /etc/passwd /data/abs
";

const OTHER_CONTAINERFILE: &str = "FROM base
RUN echo other > /other
";

/// What the podman side produced, built once per test process.
struct Fixture {
    result_docker: PathBuf,
    result_oci: PathBuf,
    other_docker: PathBuf,
    /// podman's view: ID and diff_ids of each image.
    result_id: String,
    result_layers: Vec<String>,
    other_id: String,
    other_layers: Vec<String>,
    /// The tree of `podman image mount result`.
    result_tree: BTreeMap<String, String>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture)
}

fn build_fixture() -> Fixture {
    // Kept for the whole test process: every test reads these archives.
    let dir = Scratch::new().dir.keep();
    let rootfs = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "data/sub"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    install_busybox(
        &rootfs,
        &[
            "sh", "ls", "cat", "echo", "mkdir", "rm", "chmod", "chown", "ln", "mv", "touch",
            "mkfifo",
        ],
    );
    for (path, content) in BASE_FILES {
        write(rootfs.join(path), content);
    }
    sh(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(dir.join("rootfs.tar"))
        .arg("."));
    fs::write(dir.join("Containerfile"), CONTAINERFILE).unwrap();
    fs::write(dir.join("Containerfile.other"), OTHER_CONTAINERFILE).unwrap();

    let podman = Podman::new(dir.join("podman"));
    let limits = ["--network", "none", "--ulimit", "nofile=1024:1024"];
    podman.ok(&["import", "rootfs.tar", "base"], &dir);
    for (tag, file) in [
        ("result", "Containerfile"),
        ("other", "Containerfile.other"),
    ] {
        let mut build = vec!["build"];
        build.extend(limits);
        build.extend(["-t", tag, "-f", file, "."]);
        podman.ok(&build, &dir);
    }
    let result_docker = dir.join("result-docker.tar");
    let result_oci = dir.join("result-oci.tar");
    let other_docker = dir.join("other-docker.tar");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    podman.ok(
        &["save", "-o", &s(&result_docker), "localhost/result:latest"],
        &dir,
    );
    podman.ok(
        &[
            "save",
            "--format",
            "oci-archive",
            "-o",
            &s(&result_oci),
            "localhost/result:latest",
        ],
        &dir,
    );
    podman.ok(
        &["save", "-o", &s(&other_docker), "localhost/other:latest"],
        &dir,
    );
    let (result_id, result_layers) = podman.inspect("localhost/result:latest", &dir);
    let (other_id, other_layers) = podman.inspect("localhost/other:latest", &dir);
    let mounted = podman.ok(&["image", "mount", "localhost/result:latest"], &dir);
    let result_tree = tree(Path::new(&mounted));
    podman.ok(&["image", "unmount", "localhost/result:latest"], &dir);
    drop(podman);
    Fixture {
        result_docker,
        result_oci,
        other_docker,
        result_id,
        result_layers,
        other_id,
        other_layers,
        result_tree,
    }
}

/// path -> type, mode, owner, size, content checksum, symlink target.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for rel in walk(root) {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        let detail = if ft.is_file() {
            format!(
                "file size={} sha256={}",
                meta.size(),
                sha256_hex(&fs::read(&path).unwrap())
            )
        } else if ft.is_symlink() {
            format!("symlink -> {}", fs::read_link(&path).unwrap().display())
        } else if ft.is_dir() {
            "dir".to_string()
        } else if ft.is_fifo() {
            "fifo".to_string()
        } else {
            format!("special rdev={}", meta.rdev())
        };
        out.insert(
            rel.display().to_string(),
            format!(
                "{detail} mode={:o} owner={}:{}",
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid()
            ),
        );
    }
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Store {
    fn load(&self, archive: &Path) -> String {
        self.ok(&["image", "load", "-i", archive.to_str().unwrap()])
    }

    /// Every path, type, mode, size and content under the store, except
    /// the lock file (which exists from the first command on).
    fn digest(&self) -> String {
        let mut listing: Vec<String> = walk(&self.root())
            .into_iter()
            .filter(|p| p != Path::new("lock"))
            .map(|rel| {
                let path = self.root().join(&rel);
                let meta = fs::symlink_metadata(&path).unwrap();
                let content = if meta.is_file() {
                    sha256_hex(&fs::read(&path).unwrap())
                } else {
                    String::new()
                };
                format!(
                    "{} {:o} {} {content}",
                    rel.display(),
                    meta.mode(),
                    meta.size() * u64::from(!meta.is_dir())
                )
            })
            .collect();
        listing.sort();
        sha256_hex(listing.join("\n").as_bytes())
    }

    fn layer_dirs(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.root().join("layers"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn tmp_entries(&self) -> usize {
        fs::read_dir(self.root().join("tmp")).unwrap().count()
    }
}

fn inspect(store: &Store, image: &str) -> serde_json::Value {
    store.json(&["image", "inspect", image])[0].clone()
}

/// Mounts the image's layers with unionfs and compares the tree with podman's.
fn assert_mounts_like_podman(store: &Store, image: &str, expected: &BTreeMap<String, String>) {
    let info = inspect(store, image);
    let lowers: Vec<PathBuf> = info["LayerDirs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap()))
        .collect();
    let lower_refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    let mountpoint = store.scratch.mkdir("merged");
    let mount = UnionMount::mount(&lower_refs, None, &mountpoint, &[]);
    let ours = tree(&mount.mountpoint);
    drop(mount);
    let only_ours: Vec<_> = ours
        .iter()
        .filter(|(k, v)| expected.get(*k) != Some(*v))
        .collect();
    let only_podman: Vec<_> = expected
        .iter()
        .filter(|(k, v)| ours.get(*k) != Some(*v))
        .collect();
    assert!(
        only_ours.is_empty() && only_podman.is_empty(),
        "trees differ:\nunionfs: {only_ours:#?}\npodman: {only_podman:#?}"
    );
    assert!(
        ours.contains_key("data/fifo") && ours.contains_key("data/hard"),
        "{ours:#?}"
    );
}

/// The layer directories a store holding both podman-built images has:
/// each diff_id's hex once, the shared base included, sorted.
fn layer_dirs_of_both_images(fx: &Fixture) -> Vec<String> {
    let mut all: Vec<String> = fx
        .result_layers
        .iter()
        .chain(&fx.other_layers)
        .map(|d| d[7..].to_string())
        .collect();
    all.sort();
    all.dedup();
    all
}

fn diff_ids(info: &serde_json::Value) -> Vec<String> {
    info["RootFS"]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn docker_archive_loads_like_podman_has_it() {
    let fx = fixture();
    let store = Store::new();
    let out = store.load(&fx.result_docker);
    assert!(
        out.contains("Loaded image: localhost/result:latest"),
        "{out}"
    );
    let info = inspect(&store, "result");
    assert_eq!(info["Id"], fx.result_id.as_str());
    assert_eq!(diff_ids(&info), fx.result_layers);
    assert!(info["Config"]["Env"].to_string().contains("FOO=bar"));
    assert_mounts_like_podman(&store, "localhost/result:latest", &fx.result_tree);

    // ls: one row, the right ID, json too.
    let ls = store.ok(&["image", "ls"]);
    assert!(ls.contains("localhost/result:latest"), "{ls}");
    assert!(ls.contains(&fx.result_id[7..19]), "{ls}");
    let ls_json = store.json(&["image", "ls", "--format", "json"]);
    assert_eq!(ls_json[0]["Id"], fx.result_id.as_str());
    assert!(ls_json[0]["Size"].as_u64().unwrap() > 100_000);

    // history: newest first, the RUN steps, the ENV step as an empty layer.
    let history = store.json(&["image", "history", "localhost/result", "--format", "json"]);
    let rows = history.as_array().unwrap();
    let with_layer: Vec<_> = rows
        .iter()
        .filter(|r| !r["EmptyLayer"].as_bool().unwrap())
        .collect();
    assert_eq!(with_layer.len(), fx.result_layers.len(), "{history:#}");
    assert_eq!(
        with_layer.last().unwrap()["DiffId"],
        fx.result_layers[0].as_str(),
        "the oldest layer is the base"
    );
    assert_eq!(
        with_layer[0]["DiffId"],
        fx.result_layers.last().unwrap().as_str()
    );
    assert!(
        rows[0]["CreatedBy"]
            .as_str()
            .unwrap()
            .contains("ln -s kept"),
        "{history:#}"
    );
    assert!(
        rows.iter().any(
            |r| r["EmptyLayer"] == true && r["CreatedBy"].as_str().unwrap().contains("FOO=bar")
        ),
        "{history:#}"
    );
    let table = store.ok(&["image", "history", &fx.result_id[7..13]]);
    assert!(
        table.contains("CREATED BY") && table.contains("<missing>"),
        "{table}"
    );
    assert!(!table.contains('\x1b'), "ANSI on a pipe: {table}");
}

#[test]
fn oci_archive_loads_like_podman_has_it() {
    let fx = fixture();
    let store = Store::new();
    store.load(&fx.result_oci);
    let listed = store.json(&["image", "ls", "--format", "json"]);
    let id = listed[0]["Id"].as_str().unwrap().to_string();
    let info = inspect(&store, &id[7..20]);
    assert_eq!(diff_ids(&info), fx.result_layers);
    assert_mounts_like_podman(&store, &id, &fx.result_tree);
}

#[test]
fn shared_layers_are_stored_once_and_outlive_one_image() {
    let fx = fixture();
    let store = Store::new();
    let first = store.load(&fx.result_docker);
    assert!(!first.contains("Already exists"), "{first}");
    let second = store.load(&fx.other_docker);
    let base = &fx.other_layers[0];
    assert_eq!(base, &fx.result_layers[0], "both images are built on base");
    assert!(
        second.contains(&format!("{}: Already exists", &base[7..19])),
        "{second}"
    );
    assert_eq!(second.matches("Already exists").count(), 1, "{second}");
    let all = layer_dirs_of_both_images(fx);
    assert_eq!(store.layer_dirs(), all);

    // Loading the same archive again stores nothing new.
    let before = store.digest();
    let again = store.load(&fx.result_docker);
    assert_eq!(
        again.matches("Already exists").count(),
        fx.result_layers.len(),
        "{again}"
    );
    assert_eq!(store.digest(), before);

    // df: the base layer counted once, shared by both images.
    let df = store.ok(&["system", "df", "-v"]);
    assert!(df.contains("Images") && df.contains("SHARED SIZE"), "{df}");
    let images_line = df.lines().find(|l| l.starts_with("Images")).unwrap();
    assert!(images_line.split_whitespace().nth(1) == Some("2"), "{df}");
    let layers_line = df.lines().find(|l| l.starts_with("Layers")).unwrap();
    assert_eq!(
        layers_line.split_whitespace().nth(1),
        Some(all.len().to_string().as_str()),
        "{df}"
    );

    let rm = store.ok(&["image", "rm", "localhost/result:latest"]);
    assert!(rm.contains(&format!("Deleted: {}", fx.result_id)), "{rm}");
    let mut left: Vec<String> = fx.other_layers.iter().map(|d| d[7..].to_string()).collect();
    left.sort();
    assert_eq!(
        store.layer_dirs(),
        left,
        "the shared base stays, result's own layers go"
    );
    let ls = store.json(&["image", "ls", "--format", "json"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["Id"], fx.other_id.as_str());
    let missing = store.run(&["image", "inspect", "result"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such image"));
}

/// The bytes of a docker-archive with one image whose one layer is `layer`
/// (a tar) and whose config names `diff_id` (the right one unless given).
fn docker_archive(layer: &[u8], diff_id: Option<String>) -> Vec<u8> {
    let diff_id = diff_id.unwrap_or_else(|| format!("sha256:{}", sha256_hex(layer)));
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}},"history":[{{"created_by":"hostile"}}]}}"#
    );
    let config_hex = sha256_hex(config.as_bytes());
    let manifest = format!(
        r#"[{{"Config":"{config_hex}.json","RepoTags":["localhost/hostile:latest"],"Layers":["{}/layer.tar"]}}]"#,
        sha256_hex(layer)
    );
    let mut out = tar::Builder::new(Vec::new());
    append_file(&mut out, &format!("{}/layer.tar", sha256_hex(layer)), layer);
    append_file(&mut out, &format!("{config_hex}.json"), config.as_bytes());
    append_file(&mut out, "manifest.json", manifest.as_bytes());
    out.into_inner().unwrap()
}

fn append_file(builder: &mut tar::Builder<Vec<u8>>, name: &str, content: &[u8]) {
    let mut header = tar::Header::new_ustar();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, name, content).unwrap();
}

/// A tar entry whose name (and link target) are written raw, so that the
/// tar crate's own checks against `..` and absolute names do not stop us.
fn raw_entry(
    kind: tar::EntryType,
    name: &str,
    link: &str,
    content: &[u8],
) -> (tar::Header, Vec<u8>) {
    let mut header = tar::Header::new_ustar();
    {
        let bytes = header.as_old_mut();
        bytes.name[..name.len()].copy_from_slice(name.as_bytes());
        bytes.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    header.set_entry_type(kind);
    header.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    header.set_size(content.len() as u64);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_000_000_000);
    header.set_cksum();
    (header, content.to_vec())
}

fn layer_of(entries: &[(tar::Header, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (header, content) in entries {
        builder.append(header, &content[..]).unwrap();
    }
    builder.into_inner().unwrap()
}

fn expect_refused(store: &Store, archive: &[u8], what: &str, expected_msg: &str) {
    let before = store.digest();
    let path = store.scratch.path(&format!("{what}.tar"));
    fs::write(&path, archive).unwrap();
    let out = store.run(&["image", "load", "-i", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: accepted");
    assert!(stderr.contains(expected_msg), "{what}: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "{what}: one line: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert_eq!(store.digest(), before, "{what}: the store changed");
    assert_eq!(store.tmp_entries(), 0, "{what}: leftovers in tmp");
}

#[test]
fn hostile_archives_are_refused_and_change_nothing() {
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    let store = Store::new();
    // A good image first, so that "unchanged" covers a populated store.
    let good = layer_of(&[
        raw_entry(Directory, "ok/", "", b""),
        raw_entry(Regular, "ok/f", "", b"fine"),
    ]);
    let good_archive = docker_archive(&good, None);
    let path = store.scratch.path("good.tar");
    fs::write(&path, &good_archive).unwrap();
    store.load(&path);

    // Outside the store: what an escape would write.
    let outside = store.scratch.mkdir("outside");
    let outside_link = outside.display().to_string();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "slip",
            docker_archive(&layer_of(&[raw_entry(Regular, "../x", "", b"evil")]), None),
            "'..'",
        ),
        (
            "deep-slip",
            docker_archive(
                &layer_of(&[raw_entry(Regular, "a/../../../x", "", b"evil")]),
                None,
            ),
            "'..'",
        ),
        (
            "absolute",
            docker_archive(
                &layer_of(&[raw_entry(
                    Regular,
                    &format!("{outside_link}/x"),
                    "",
                    b"evil",
                )]),
                None,
            ),
            "absolute",
        ),
        (
            "through-symlink",
            docker_archive(
                &layer_of(&[
                    raw_entry(Symlink, "l", &outside_link, b""),
                    raw_entry(Regular, "l/x", "", b"evil"),
                ]),
                None,
            ),
            "symlink",
        ),
        (
            "hardlink-passwd",
            docker_archive(&layer_of(&[raw_entry(Link, "p", "/etc/passwd", b"")]), None),
            "absolute",
        ),
        (
            "hardlink-up",
            docker_archive(
                &layer_of(&[raw_entry(Link, "p", "../../../../../../etc/passwd", b"")]),
                None,
            ),
            "'..'",
        ),
        (
            "hardlink-through-symlink",
            docker_archive(
                &layer_of(&[
                    raw_entry(Symlink, "e", "/etc", b""),
                    raw_entry(Link, "p", "e/passwd", b""),
                ]),
                None,
            ),
            "symlink",
        ),
        (
            "wrong-diff-id",
            docker_archive(&good, Some(format!("sha256:{}", "0".repeat(64)))),
            "verification",
        ),
        (
            "truncated",
            good_archive[..good_archive.len() / 2].to_vec(),
            "truncated",
        ),
        ("not-a-tar", b"hello".repeat(300), "archive"),
    ];
    for (what, archive, msg) in cases {
        expect_refused(&store, &archive, what, msg);
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "something was written outside"
    );
    assert!(!fs::read_to_string("/etc/passwd").unwrap().contains("evil"));

    // A name over 255 bytes, through a GNU long name entry.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(0o644);
    header.set_entry_type(Regular);
    builder
        .append_data(&mut header, "n".repeat(300), &b""[..])
        .unwrap();
    expect_refused(
        &store,
        &docker_archive(&builder.into_inner().unwrap(), None),
        "long-name",
        "255",
    );

    // The config's digest must be the ID the manifest names.
    let mut tampered = tar::Builder::new(Vec::new());
    let config = r#"{"rootfs":{"type":"layers","diff_ids":[]}}"#;
    append_file(
        &mut tampered,
        &format!("{}.json", "1".repeat(64)),
        config.as_bytes(),
    );
    append_file(
        &mut tampered,
        "manifest.json",
        format!(
            r#"[{{"Config":"{}.json","RepoTags":null,"Layers":[]}}]"#,
            "1".repeat(64)
        )
        .as_bytes(),
    );
    expect_refused(
        &store,
        &tampered.into_inner().unwrap(),
        "config-digest",
        "mismatch",
    );

    // An OCI archive whose layer has an unknown media type.
    expect_refused(
        &store,
        &oci_archive(&good, "application/x-unknown"),
        "media-type",
        "unknown layer media type",
    );
    // (A layer the store does not have yet: known layers are not read again.)
    let plain = layer_of(&[raw_entry(Regular, "plain", "", b"not gzip")]);
    expect_refused(
        &store,
        &oci_archive(&plain, "application/vnd.oci.image.layer.v1.tar+gzip"),
        "not-gzip",
        "corrupt",
    );

    // The store still works and holds the good image only.
    let ls = store.json(&["image", "ls", "--format", "json"]);
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls:#}");
}

/// An oci-archive with one image of one layer, declared with `media_type`.
fn oci_archive(layer: &[u8], media_type: &str) -> Vec<u8> {
    oci_archive_with_blob(layer, layer, media_type)
}

/// An oci-archive with one image whose one layer, `layer`, is stored as
/// `blob` (the layer itself, or compressed) and declared with `media_type`.
fn oci_archive_with_blob(layer: &[u8], blob: &[u8], media_type: &str) -> Vec<u8> {
    let diff_id = format!("sha256:{}", sha256_hex(layer));
    let config =
        format!(r#"{{"os":"linux","rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[{{"mediaType":"{media_type}","digest":"sha256:{}","size":{}}}]}}"#,
        sha256_hex(config.as_bytes()),
        config.len(),
        sha256_hex(blob),
        blob.len()
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"localhost/oci:latest"}}}}]}}"#,
        sha256_hex(manifest.as_bytes()),
        manifest.len()
    );
    let mut out = tar::Builder::new(Vec::new());
    append_file(&mut out, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    append_file(&mut out, "index.json", index.as_bytes());
    for b in [config.as_bytes(), manifest.as_bytes(), blob] {
        append_file(&mut out, &format!("blobs/sha256/{}", sha256_hex(b)), b);
    }
    out.into_inner().unwrap()
}

/// Recompresses a layer with gzip and with zstd inside an OCI archive: the
/// compressed digest is checked and the diff_id still matches.
#[test]
fn compressed_oci_layers_load() {
    let store = Store::new();
    let layer = layer_of(&[raw_entry(tar::EntryType::Regular, "f", "", b"compressed")]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&layer[..], 3).unwrap();
    for (blob, media_type) in [
        (gz, "application/vnd.oci.image.layer.v1.tar+gzip"),
        (zst, "application/vnd.oci.image.layer.v1.tar+zstd"),
    ] {
        let archive = oci_archive_with_blob(&layer, &blob, media_type);
        let path = store.scratch.path("compressed.tar");
        fs::write(&path, &archive).unwrap();
        let out = store.ok(&["image", "load", "-i", path.to_str().unwrap()]);
        assert!(out.contains("Loaded image: localhost/oci:latest"), "{out}");
    }
    let dir = store.root().join("layers").join(sha256_hex(&layer));
    assert_eq!(fs::read(dir.join("f")).unwrap(), b"compressed");
}

/// Index and layers agree: every listed layer is there, nothing else is.
fn assert_consistent(store: &Store) {
    let index: serde_json::Value = match fs::read(store.root().join("index.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
        Err(_) => serde_json::json!({"images": {}, "layers": {}}),
    };
    let mut listed: Vec<String> = index["layers"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k[7..].to_string())
        .collect();
    listed.sort();
    assert_eq!(store.layer_dirs(), listed, "layers on disk vs the index");
    for image in index["images"].as_object().unwrap().values() {
        for layer in image["layers"].as_array().unwrap() {
            assert!(listed.contains(&layer.as_str().unwrap()[7..].to_string()));
        }
    }
}

#[test]
fn sigkill_during_load_leaves_a_consistent_store() {
    let fx = fixture();
    let store = Store::new();
    store.load(&fx.other_docker);
    let archive = fs::read(&fx.result_docker).unwrap();
    // Killed while reading the archive (half of it written to its stdin),
    // then at growing delays, which land in unpacking and commit.
    let mut delays = vec![None];
    delays.extend((0..6).map(|i| Some(Duration::from_millis(20 * i))));
    for delay in delays {
        let mut child = store
            .cmd(&["image", "load", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take();
        let pipe = stdin.as_mut().unwrap();
        match delay {
            None => {
                // The rest never comes: the load is stuck reading.
                pipe.write_all(&archive[..archive.len() / 2]).unwrap();
                let deadline = Instant::now() + Duration::from_secs(30);
                while store.tmp_entries() == 0 {
                    assert!(Instant::now() < deadline, "load never started");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Some(delay) => {
                let _ = pipe.write_all(&archive);
                drop(stdin.take());
                std::thread::sleep(delay);
            }
        }
        // Our own child, by its PID.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        drop(stdin);
        // The next command removes the leftovers and finds the store whole.
        store.ok(&["image", "ls"]);
        assert_eq!(
            store.tmp_entries(),
            0,
            "leftovers stay after delay {delay:?}"
        );
        assert_consistent(&store);
    }
    let out = store.load(&fx.result_docker);
    assert!(
        out.contains("Loaded image: localhost/result:latest"),
        "{out}"
    );
    assert_consistent(&store);
    assert_eq!(diff_ids(&inspect(&store, "result")), fx.result_layers);
}

#[test]
fn concurrent_loads_store_a_shared_layer_once() {
    let fx = fixture();
    let store = Store::new();
    let children: Vec<_> = [&fx.result_docker, &fx.other_docker, &fx.result_oci]
        .into_iter()
        .map(|archive| {
            store
                .cmd(&["image", "load", "-i", archive.to_str().unwrap()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = wait_output(child, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(store.layer_dirs(), layer_dirs_of_both_images(fx));
    assert_consistent(&store);
    assert_eq!(store.tmp_entries(), 0);
}

fn wait_output(mut child: std::process::Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("load did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn errors_are_one_line() {
    let store = Store::new();
    let out = store.run(&["image", "rm", "nothing"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim(), "unionfs: no such image: nothing");
    let out = store.run(&["image", "load", "-i", "/nonexistent/archive.tar"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open"));
    let df = store.ok(&["system", "df"]);
    assert!(df.contains("Images") && df.contains("0B"), "{df}");
}

#[test]
fn piped_and_quiet_loads_show_no_progress() {
    let store = Store::new();
    let layer = layer_of(&[raw_entry(tar::EntryType::Regular, "f", "", b"x")]);
    let path = store.scratch.path("one.tar");
    fs::write(&path, docker_archive(&layer, None)).unwrap();
    let piped = store.run(&["image", "load", "-i", path.to_str().unwrap()]);
    assert!(piped.status.success());
    assert!(piped.stderr.is_empty(), "progress on a pipe: {piped:?}");
    let stdout = String::from_utf8_lossy(&piped.stdout);
    assert!(
        stdout.contains(": Loaded") && !stdout.contains('\x1b'),
        "{stdout}"
    );
    // From stdin, quiet: only the result line.
    let quiet = run_with_stdin(
        &mut store.cmd(&["image", "load", "--quiet"]),
        Stdio::from(fs::File::open(&path).unwrap()),
        Duration::from_secs(60),
    );
    assert!(
        quiet.status.success() && quiet.stderr.is_empty(),
        "{quiet:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&quiet.stdout),
        "Loaded image: localhost/hostile:latest\n"
    );
}

/// One PAX record: "<len> <key>=<value>\n", the length counting itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body_len = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body_len + 1;
    while len != body_len + len.to_string().len() {
        len = body_len + len.to_string().len();
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

#[test]
fn metadata_survives_unpacking() {
    use tar::EntryType::{Block, Char, Directory, Fifo, Link, Regular, Symlink, XHeader};
    let store = Store::new();
    // security.capability v2: cap_net_bind_service (bit 10) permitted+effective.
    let mut cap = vec![0u8; 20];
    cap[0..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
    let mut pax = pax_record("SCHILY.xattr.user.note", b"kept");
    pax.extend(pax_record("SCHILY.xattr.security.capability", &cap));
    let owned = |mut e: (tar::Header, Vec<u8>), mode: u32, uid: u64| {
        e.0.set_mode(mode);
        e.0.set_uid(uid);
        e.0.set_gid(uid + 1);
        e.0.set_mtime(1_234_567_890);
        e.0.set_cksum();
        e
    };
    let mut dev = raw_entry(Char, "dev/null", "", b"");
    dev.0.set_device_major(1).unwrap();
    dev.0.set_device_minor(3).unwrap();
    let mut blk = raw_entry(Block, "dev/blk", "", b"");
    blk.0.set_device_major(7).unwrap();
    blk.0.set_device_minor(0).unwrap();
    blk.0.set_cksum();
    let layer = layer_of(&[
        owned(raw_entry(Directory, "d/", "", b""), 0o750, 7),
        raw_entry(XHeader, "pax", "", &pax),
        owned(raw_entry(Regular, "d/suid", "", b"binary"), 0o4755, 12),
        raw_entry(Link, "d/hard", "d/suid", b""),
        raw_entry(Symlink, "d/link", "../nowhere", b""),
        raw_entry(Fifo, "d/fifo", "", b""),
        owned(raw_entry(Regular, "d/.wh.gone", "", b""), 0o600, 0),
        owned(raw_entry(Directory, "dev/", "", b""), 0o755, 0),
        owned(dev, 0o666, 0),
        blk,
    ]);
    let path = store.scratch.path("meta.tar");
    fs::write(&path, docker_archive(&layer, None)).unwrap();
    let out = store.run(&["image", "load", "-i", path.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let root = store.root().join("layers").join(sha256_hex(&layer));
    let meta = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
    assert_eq!(meta("d").mode() & 0o7777, 0o750);
    assert_eq!((meta("d").uid(), meta("d").gid()), (7, 8));
    assert_eq!(
        meta("d/suid").mode() & 0o7777,
        0o4755,
        "setuid kept after chown"
    );
    assert_eq!((meta("d/suid").uid(), meta("d/suid").gid()), (12, 13));
    assert_eq!(meta("d/suid").mtime(), 1_234_567_890);
    assert_eq!(
        meta("d").mtime(),
        1_234_567_890,
        "directory mtime set after its children"
    );
    assert_eq!(meta("d/hard").ino(), meta("d/suid").ino());
    assert_eq!(
        fs::read_link(root.join("d/link")).unwrap(),
        Path::new("../nowhere")
    );
    assert!(meta("d/fifo").file_type().is_fifo());
    assert!(
        meta("d/.wh.gone").is_file(),
        "OCI whiteouts stay plain files"
    );
    assert!(meta("dev/null").file_type().is_char_device());
    assert_eq!(meta("dev/null").rdev(), nix::sys::stat::makedev(1, 3));
    assert!(meta("dev/blk").file_type().is_block_device());
    let xattrs = xattrs_with_prefix(&root.join("d/suid"), "");
    assert_eq!(
        xattrs.get("user.note").map(Vec::as_slice),
        Some(&b"kept"[..])
    );
    assert_eq!(xattrs.get("security.capability"), Some(&cap), "{xattrs:?}");
}
