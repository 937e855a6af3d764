//! `unionfs image save` with a real client: podman builds an image from a
//! busybox-static root filesystem (no network) with several layers,
//! deletions, hard links and a setuid file; it is saved by podman, loaded
//! into unionfs, saved by unionfs as docker-archive and oci-archive, and
//! each archive, loaded into an emptied podman, must give the same image
//! ID and diff_ids and, run with runc, the same tree.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use sha2::{Digest, Sha256};

use common::podman::{Podman, RUN_LIMITS, install_busybox, tar_rootfs};
use common::store::ImageStore as Store;
use common::*;

const CONTAINERFILE: &str = "FROM base
RUN echo changed >> /data/a && chmod 600 /data/a && chown 12:34 /data/a
RUN rm /data/gone && ln /data/sub/b /data/hard && mkdir /data/new && echo n > /data/new/f
RUN rm -rf /data/sub && mkdir /data/sub && echo fresh > /data/sub/c && touch /data/s && chmod 4755 /data/s
RUN ln /data/s /data/s2 && ln -s /data/hard /data/link
";

/// Lists the image's tree from inside a container: path, type, mode,
/// owner, size, and the content of every regular file.
/// (/etc/hostname and /etc/hosts are podman's, per container.)
const LIST: &str = "find /data /bin /etc/passwd | sort | xargs stat -c '%n %F %a %u:%g %s %h' && \
    find /data /etc/passwd -type f | sort | xargs sha256sum";

const IMAGE: &str = "localhost/saved:latest";

/// The image's tree as `podman run` shows it.
fn listing(podman: &Podman, image: &str, dir: &Path) -> String {
    let mut run = vec!["run", "--rm"];
    run.extend(RUN_LIMITS);
    run.extend([image, "sh", "-c", LIST]);
    podman.ok(&run, dir)
}

struct Fixture {
    dir: PathBuf,
    /// `podman save` of the image (docker-archive).
    original: PathBuf,
    id: String,
    diff_ids: Vec<String>,
    listing: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture)
}

fn build_fixture() -> Fixture {
    let dir = Scratch::new().dir.keep();
    let rootfs = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "data/sub"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    install_busybox(
        &rootfs,
        &[
            "sh",
            "cat",
            "echo",
            "mkdir",
            "rm",
            "chmod",
            "chown",
            "ln",
            "touch",
            "find",
            "sort",
            "xargs",
            "stat",
            "sha256sum",
        ],
    );
    for (path, content) in [
        ("data/a", &b"base\n"[..]),
        ("data/sub/b", b"base2\n"),
        ("data/gone", b"gone\n"),
        ("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n"),
    ] {
        write(rootfs.join(path), content);
    }
    tar_rootfs(&rootfs, &dir.join("rootfs.tar"));
    fs::write(dir.join("Containerfile"), CONTAINERFILE).unwrap();
    let podman = Podman::new(dir.join("podman"));
    podman.import_and_build(&dir, IMAGE);
    let original = dir.join("original.tar");
    podman.ok(&["save", "-o", original.to_str().unwrap(), IMAGE], &dir);
    let (id, diff_ids) = podman.inspect(IMAGE, &dir);
    assert!(diff_ids.len() >= 5, "{diff_ids:?}");
    let listing = listing(&podman, IMAGE, &dir);
    assert!(
        listing.contains("/data/s regular") && listing.contains(" 4755 "),
        "{listing}"
    );
    // A static is never dropped: podman's state goes now.
    drop(podman);
    Fixture {
        dir,
        original,
        id,
        diff_ids,
        listing,
    }
}

impl Store {
    /// A store with the podman-built image loaded.
    fn loaded() -> Store {
        let store = Store::new();
        store.ok(&["image", "load", "-i", fixture().original.to_str().unwrap()]);
        store
    }

    fn save(&self, format: &str, name: &str) -> PathBuf {
        let path = self.scratch.path(name);
        self.ok(&[
            "image",
            "save",
            "saved",
            "--format",
            format,
            "-o",
            path.to_str().unwrap(),
        ]);
        path
    }
}

#[test]
fn saved_archives_load_and_run_in_podman_like_the_original() {
    let fx = fixture();
    let store = Store::loaded();
    let scratch = Scratch::new();
    let podman = Podman::new(scratch.dir.path().join("podman"));
    for format in ["docker-archive", "oci-archive"] {
        let archive = store.save(format, &format!("{format}.tar"));
        // A podman without the original: every layer comes from the archive.
        podman.ok(&["rmi", "-af"], &fx.dir);
        let loaded = podman.ok(&["load", "-i", archive.to_str().unwrap()], &fx.dir);
        assert!(loaded.contains(IMAGE), "{format}: {loaded}");
        let (id, diff_ids) = podman.inspect(IMAGE, &fx.dir);
        assert_eq!(id, fx.id, "{format}: image ID");
        assert_eq!(diff_ids, fx.diff_ids, "{format}: diff_ids");
        assert_eq!(
            listing(&podman, IMAGE, &fx.dir),
            fx.listing,
            "{format}: the tree in a container"
        );
    }
}

#[test]
fn saving_is_deterministic_and_stdout_matches_the_file() {
    let store = Store::loaded();
    for format in ["docker-archive", "oci-archive"] {
        let first = fs::read(store.save(format, "one.tar")).unwrap();
        let second = fs::read(store.save(format, "two.tar")).unwrap();
        assert!(first == second, "{format}: two saves differ");
        let piped = store.ok_bytes(&["image", "save", "localhost/saved", "--format", format]);
        assert!(piped == first, "{format}: stdout differs from -o");
    }
}

#[test]
fn saved_archives_load_back_into_unionfs_and_rm_removes_the_layer_tars() {
    let fx = fixture();
    let store = Store::loaded();
    let tars = store.root().join("blobs/sha256");
    assert_eq!(fs::read_dir(&tars).unwrap().count(), fx.diff_ids.len());
    for format in ["docker-archive", "oci-archive"] {
        let archive = store.save(format, &format!("{format}.tar"));
        let other = Store::new();
        let out = other.ok(&["image", "load", "-i", archive.to_str().unwrap()]);
        assert!(out.contains(IMAGE));
        let info = other.json(&["image", "inspect", "saved"]);
        assert_eq!(info[0]["Id"], fx.id.as_str());
        let layers: Vec<String> =
            serde_json::from_value(info[0]["RootFS"]["Layers"].clone()).unwrap();
        assert_eq!(layers, fx.diff_ids, "{format}");
    }
    let df = store.ok(&["system", "df"]);
    assert!(df.contains("Layer tars"), "{df}");
    store.ok(&["image", "rm", "saved"]);
    assert_eq!(fs::read_dir(&tars).unwrap().count(), 0);
    assert_eq!(
        fs::read_dir(store.root().join("layers")).unwrap().count(),
        0
    );
}

#[test]
fn save_errors_are_one_line() {
    let store = Store::loaded();
    let target = store.scratch.path("x.tar");
    let out = store.run(&["image", "save", "nothing", "-o", target.to_str().unwrap()]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "unionfs: no such image: nothing"
    );
    assert!(!target.exists());
    let out = store.run(&["image", "save", "saved", "-o", "/nonexistent/dir/x.tar"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("unionfs: cannot write /nonexistent/dir/x.tar")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    // A damaged layer tar is caught by its diff_id, and no archive is left.
    let tars = store.root().join("blobs/sha256");
    for entry in fs::read_dir(&tars).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 1;
        fs::write(&path, bytes).unwrap();
    }
    let out = store.run(&["image", "save", "saved", "-o", target.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no longer matches its diff_id"), "{stderr}");
    assert!(!target.exists());
    let leftovers: Vec<_> = fs::read_dir(store.scratch.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("unionfs-save"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Paths, types, modes, sizes and contents of everything under `dir`.
fn tree_digest(dir: &Path) -> String {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let content = if meta.is_file() {
                Sha256::digest(fs::read(&path).unwrap())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            } else if meta.file_type().is_symlink() {
                fs::read_link(&path).unwrap().display().to_string()
            } else {
                String::new()
            };
            out.push(format!("{rel} {:o} {} {content}", meta.mode(), meta.len()));
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut lines = Vec::new();
    walk(dir, dir, &mut lines);
    lines.join("\n")
}

#[test]
fn sigkill_during_save_leaves_no_partial_archive() {
    let store = Store::loaded();
    let out_dir = store.scratch.mkdir("out");
    let reference_path = store.save("docker-archive", "reference.tar");
    let reference = fs::read(&reference_path).unwrap();
    let store_before = tree_digest(&store.root());
    let started = Instant::now();
    store.save("docker-archive", "timed.tar");
    let took = started.elapsed();
    for percent in [0u32, 5, 15, 30, 50, 70, 90, 98] {
        let target = out_dir.join(format!("killed-{percent}.tar"));
        let save = [
            "image",
            "save",
            "-q",
            "saved",
            "-o",
            target.to_str().unwrap(),
        ];
        store.kill_after(&save, took * percent / 100);
        if target.exists() {
            assert!(
                fs::read(&target).unwrap() == reference,
                "{percent}%: a partial archive"
            );
        }
        // The next save to the same file removes the killed one's temp.
        store.ok(&save);
        assert!(
            fs::read(&target).unwrap() == reference,
            "{percent}%: the save after the kill differs"
        );
        let names: Vec<String> = fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with('.')),
            "{percent}%: temps left: {names:?}"
        );
        assert_eq!(
            tree_digest(&store.root()),
            store_before,
            "{percent}%: the store changed"
        );
    }
}
