//! `unionfs container diff` and `container commit`, round trip with podman:
//! a podman-built image is loaded, a container of it changed through its
//! mount, its diff compared with `podman diff` of the same changes, and the
//! committed image saved, loaded by podman and run there.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use common::podman::{
    CONTAINER_INIT, LISTING, Podman, RUN_LIMITS, install_busybox, tar_rootfs,
    without_container_files,
};
use common::store::ImageStore as Store;
use common::*;

/// Four layers: a base with a setuid file, hard links, a setcap'd file
/// (`security.capability`) and `user.*` xattrs; one deleting a file and
/// replacing a directory (opaque); one adding a hard link and a setuid
/// file; one renaming a directory.
const CONTAINERFILE: &str = "FROM base
RUN rm /data/gone && rm -rf /data/dir && mkdir /data/dir && echo new > /data/dir/n && echo b > /data/b
RUN ln /data/b /data/b2 && echo s > /data/suid2 && chmod 4755 /data/suid2
RUN mv /dirA /dirB
";

/// The `security.capability` and `user.*` xattrs of every path under
/// `root` (symlinks not followed), by path relative to `root`.
fn kept_xattrs(root: &Path) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, BTreeMap<String, Vec<u8>>>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let mut found = xattrs_with_prefix(&path, "user.");
            found.extend(xattrs_with_prefix(&path, "security.capability"));
            if !found.is_empty() {
                let rel = path.strip_prefix(root).unwrap();
                out.insert(rel.to_string_lossy().into_owned(), found);
            }
            if fs::symlink_metadata(&path).unwrap().is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    for top in ["data", "dirB", "bin", "etc"] {
        walk(root, &root.join(top), &mut out);
    }
    out
}

/// The changes made in the container: a new file, a lower file modified
/// and one deleted, a lower dir deleted, one replaced, one renamed (a
/// redirect in unionfs), a hard link, a chmod.
const SCRIPT: &str = "cd /data && echo new > new && echo x >> a && rm c && rm -r tree \
    && rm -r rep && mkdir rep && echo fresh > rep/o && mv mv moved && ln a alink \
    && chmod 700 keep/k";

const APPLETS: &[&str] = &["sh", "rm", "mkdir", "echo", "ln", "mv", "chmod", "cat"];

fn fixture() -> &'static PathBuf {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let dir = Scratch::new().dir.keep();
        let rootfs = dir.join("rootfs");
        install_busybox(&rootfs, APPLETS);
        for (path, content) in [
            ("data/a", &b"a\n"[..]),
            ("data/b", b"b0\n"),
            ("data/c", b"c\n"),
            ("data/gone", b"gone\n"),
            ("data/dir/x", b"x\n"),
            ("data/dir/sub/y", b"y\n"),
            ("data/tree/x/y/f", b"t\n"),
            ("data/tree/t", b"t2\n"),
            ("data/rep/old/f", b"r\n"),
            ("data/rep/o", b"r2\n"),
            ("data/mv/in/f", b"m\n"),
            ("data/mv/g", b"m2\n"),
            ("data/keep/k", b"k\n"),
            ("data/h1", b"h\n"),
            ("data/suid", b"s\n"),
            ("data/cap", b"cap\n"),
            ("data/ux", b"ux\n"),
            ("dirA/g", b"g\n"),
            ("dirA/sub/f", b"f\n"),
            ("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n"),
        ] {
            write(rootfs.join(path), content);
        }
        fs::hard_link(rootfs.join("data/h1"), rootfs.join("data/h2")).unwrap();
        fs::set_permissions(rootfs.join("data/suid"), fs::Permissions::from_mode(0o4755)).unwrap();
        sh(Command::new("setcap")
            .arg("cap_net_raw+ep")
            .arg(rootfs.join("data/cap")));
        set_xattr(rootfs.join("data/ux"), "user.test", "ux-value");
        // podman import keeps the xattrs the tar carries.
        tar_rootfs(&rootfs, &dir.join("rootfs.tar"));
        fs::write(dir.join("Containerfile"), CONTAINERFILE).unwrap();
        let podman = Podman::new(dir.join("podman"));
        podman.import_and_build(&dir, "app");
        // podman diff reports a directory at its own place only when its
        // mtime differs from the lower one's to the second (else later, as
        // a parent): changes made in the second of the build would give
        // either order depending on timing. Every change comes after this.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let archive = dir.join("app.tar");
        podman.ok(
            &[
                "save",
                "-o",
                archive.to_str().unwrap(),
                "localhost/app:latest",
            ],
            &dir,
        );
        archive
    })
}

/// A store with the fixture image loaded.
fn loaded_store() -> Store {
    Store::with_loaded(fixture())
}

impl Store {
    fn layers(&self, image: &str) -> Vec<String> {
        self.json(&["image", "inspect", image])[0]["RootFS"]["Layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect()
    }

    fn count(&self, dir: &str) -> usize {
        fs::read_dir(self.root().join(dir)).unwrap().count()
    }
}

fn podman_run(podman: &Podman, dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["run"];
    all.extend(RUN_LIMITS);
    all.extend_from_slice(args);
    podman.ok(&all, dir)
}

#[test]
fn diff_matches_podman_and_the_commit_runs_in_podman() {
    let s = Scratch::new();
    let dir = s.dir.path().to_path_buf();
    let podman = Podman::new(s.mkdir("podman"));
    podman.ok(&["load", "-q", "-i", fixture().to_str().unwrap()], &dir);
    podman_run(
        &podman,
        &dir,
        &[
            "--name",
            "pc",
            "localhost/app:latest",
            "/bin/sh",
            "-c",
            SCRIPT,
        ],
    );
    let expected = podman.ok(&["diff", "pc"], &dir);
    let expected_json: serde_json::Value =
        serde_json::from_str(&podman.ok(&["diff", "--format", "json", "pc"], &dir)).unwrap();
    podman.ok(&["rm", "pc"], &dir);
    assert!(expected.contains("D /data/c"), "{expected}");

    let store = loaded_store();
    assert_eq!(store.layers("app").len(), 4);
    store.ok(&["container", "create", "--name", "c1", "app"]);
    let mnt = s.mkdir("mnt");
    let mut m = store.mount("c1", &mnt);
    sh(Command::new("chroot").arg(&m.mountpoint).args([
        "/bin/sh",
        "-c",
        &format!("{CONTAINER_INIT} && {SCRIPT}"),
    ]));
    let upper = store.root().join("containers/c1/upper");
    assert!(
        xattrs_with_prefix(&upper.join("data/moved"), "trusted.overlay.")
            .contains_key("trusted.overlay.redirect"),
        "the rename made no redirect"
    );
    assert!(
        xattrs_with_prefix(&upper.join("data/rep"), "trusted.overlay.")
            .contains_key("trusted.overlay.opaque"),
        "the replaced directory is not opaque"
    );

    // diff, mounted: the same lines as podman's, in its order.
    assert_eq!(
        store.ok(&["container", "diff", "c1"]).trim(),
        expected.trim()
    );
    assert_eq!(
        store.json(&["container", "diff", "c1", "--format", "json"]),
        expected_json
    );

    // commit, mounted.
    let id = store
        .ok(&[
            "container",
            "commit",
            "c1",
            "committed:v1",
            "-m",
            "the changes",
            "--author",
            "tester",
        ])
        .trim()
        .to_string();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{id}");
    let layers = store.layers("committed:v1");
    assert_eq!(layers.len(), 5);
    assert_eq!(layers[..4], store.layers("app")[..]);
    let inspect = store.json(&["image", "inspect", "committed:v1"]);
    assert_eq!(inspect[0]["Id"], id.as_str());
    assert_eq!(inspect[0]["Author"], "tester");
    let history = store.json(&["image", "history", "committed:v1", "--format", "json"]);
    let history_text = history.to_string();
    assert!(history_text.contains("the changes"), "{history_text}");
    assert!(
        history_text.contains("unionfs container commit"),
        "{history_text}"
    );
    let table = store.ok(&["image", "history", "committed:v1"]);
    assert!(table.contains("the changes"), "{table}");

    let listing = sh(Command::new("chroot")
        .arg(&m.mountpoint)
        .args(["/bin/sh", "-c", LISTING]));
    let expected_tree = without_container_files(&String::from_utf8_lossy(&listing.stdout));
    let expected_xattrs = kept_xattrs(&m.mountpoint);
    let cap = &expected_xattrs["data/cap"]["security.capability"];
    assert!(!cap.is_empty(), "{expected_xattrs:?}");
    assert_eq!(expected_xattrs["data/ux"]["user.test"], b"ux-value");
    // The diff still answers once unmounted.
    store.ok(&["container", "umount", "c1"]);
    m.unmount();
    assert!(!is_mounted(&mnt));
    assert_eq!(
        store.ok(&["container", "diff", "c1"]).trim(),
        expected.trim()
    );

    // save -> podman load -> podman run: the same tree as the mount.
    let saved = dir.join("committed.tar");
    store.ok(&[
        "image",
        "save",
        "-q",
        "committed:v1",
        "-o",
        saved.to_str().unwrap(),
    ]);
    podman.ok(&["load", "-q", "-i", saved.to_str().unwrap()], &dir);
    let hex = &id["sha256:".len()..];
    let got = podman_run(&podman, &dir, &["--rm", hex, "/bin/sh", "-c", LISTING]);
    let got = without_container_files(&got);
    for sign in [
        "/data/moved/in/f ",
        "/data/alink ",
        "/data/new ",
        "/data/suid ",
        "/data/b2 ",
        "/dirB/sub/f ",
        "/data/cap ",
    ] {
        assert!(
            expected_tree.iter().any(|l| l.starts_with(sign)),
            "{sign}: {expected_tree:#?}"
        );
    }
    assert!(
        !expected_tree.iter().any(|l| l.starts_with("/dirA")),
        "{expected_tree:#?}"
    );
    assert!(
        expected_tree
            .iter()
            .any(|l| l.starts_with("/data/suid regular file 4755 ")),
        "{expected_tree:#?}"
    );
    assert_eq!(got, expected_tree);
    // The xattrs, as podman stores the loaded image.
    let podman_mount = PathBuf::from(podman.ok(&["image", "mount", hex], &dir));
    let got_xattrs = kept_xattrs(&podman_mount);
    podman.ok(&["image", "umount", hex], &dir);
    assert_eq!(got_xattrs, expected_xattrs);
    let podman_history = podman.ok(&["image", "history", "--format", "{{.Comment}}", hex], &dir);
    assert!(podman_history.contains("the changes"), "{podman_history}");
    let podman_layers = podman.ok(
        &[
            "image",
            "inspect",
            "--format",
            "{{json .RootFS.Layers}}",
            hex,
        ],
        &dir,
    );
    let podman_layers: Vec<String> = serde_json::from_str(&podman_layers).unwrap();
    assert_eq!(podman_layers, layers);

    store.ok(&["container", "rm", "c1"]);
    assert_eq!(store.count("tmp"), 0);
}

#[test]
fn commits_are_deterministic_and_share_the_parents_layers() {
    let store = loaded_store();
    let parent = store.layers("app");
    let layer_count = store.count("layers");
    let blob_count = store.count("blobs/sha256");
    assert_eq!(layer_count, parent.len());
    store.ok(&["container", "create", "--name", "c2", "app"]);
    let mnt = store.scratch.mkdir("mnt");
    let mut m = store.mount("c2", &mnt);
    write(m.path("data/new"), b"new\n");
    fs::remove_file(m.path("data/a")).unwrap();
    fs::create_dir(m.path("data/newdir")).unwrap();
    store.ok(&["container", "umount", "c2"]);
    m.unmount();
    assert!(!is_mounted(&mnt));

    let one = store.ok(&["container", "commit", "-q", "c2", "one"]);
    // Another message: another config, hence another image.
    let two = store.ok(&["container", "commit", "--quiet", "-m", "2", "c2", "two:2"]);
    assert_ne!(one, two);
    assert!(one.starts_with("sha256:") && two.starts_with("sha256:"));
    let (one, two) = (store.layers("one:latest"), store.layers("two:2"));
    assert_eq!(one.last(), two.last(), "two commits, two diff_ids");
    assert_eq!(one[..parent.len()], parent[..]);
    assert_eq!(two[..parent.len()], parent[..]);
    // One new layer, its tar once; the parents' not copied.
    assert_eq!(store.count("layers"), layer_count + 1);
    assert_eq!(store.count("blobs/sha256"), blob_count + 1);
    let df = store.ok(&["system", "df", "-v"]);
    let layers_part = df.split("Layers space usage").nth(1).unwrap();
    let layers_part = layers_part.split("Containers space usage").next().unwrap();
    for diff_id in &one {
        let short = &diff_id["sha256:".len().."sha256:".len() + 12];
        let rows: Vec<&str> = layers_part
            .lines()
            .filter(|l| l.starts_with(short))
            .collect();
        assert_eq!(rows.len(), 1, "{short}: {df}");
        let users = if parent.contains(diff_id) { "3" } else { "2" };
        assert!(rows[0].trim_end().ends_with(users), "{df}");
    }
    // The same numbers as JSON, in bytes.
    let summary = store.json(&["system", "df", "--format", "json"]);
    let types: Vec<&str> = summary
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["Type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Images", "Layers", "Layer tars", "Containers"]);
    assert_eq!(summary[0]["TotalCount"], 3);
    assert_eq!(summary[1]["TotalCount"], layer_count + 1);
    assert_eq!(summary[3]["TotalCount"], 1);
    assert_eq!(summary[3]["Active"], 0);
    assert!(summary[1]["Size"].as_u64().unwrap() > 0, "{summary}");
    let verbose = store.json(&["system", "df", "-v", "--format", "json"]);
    assert_eq!(verbose["Summary"], summary);
    assert_eq!(verbose["Images"].as_array().unwrap().len(), 3);
    for diff_id in &one {
        let layer = verbose["Layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["Id"] == diff_id.as_str())
            .unwrap_or_else(|| panic!("{diff_id}: {verbose}"));
        let users = if parent.contains(diff_id) { 3 } else { 2 };
        assert_eq!(layer["Images"], users, "{verbose}");
        assert!(layer["TarSize"].as_u64().unwrap() > 0, "{verbose}");
    }
    assert_eq!(verbose["Containers"][0]["Name"], "c2");
    assert_eq!(verbose["Containers"][0]["Mounted"], false);

    // Errors: one line, exit 1.
    store.refused(&["container", "commit", "nosuch", "x"]);
    store.refused(&["container", "commit", "c2", "Bad:Name"]);
    store.refused(&["container", "commit", "c2", "x@sha256:00"]);
    store.refused(&["container", "diff", "nosuch"]);
    store.refused(&["container", "diff", "../c2"]);
    assert_eq!(store.count("tmp"), 0);
    store.ok(&["container", "rm", "c2"]);
}

/// Every layer and image the index lists has its files; after a
/// command's cleanup, no layer is on disk that the index does not list.
fn assert_store_consistent(store: &Store) {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(store.root().join("index.json")).unwrap()).unwrap();
    let layers = index["layers"].as_object().unwrap();
    let mut listed: Vec<String> = layers.keys().map(|k| k[7..].to_string()).collect();
    listed.sort();
    let mut on_disk: Vec<String> = fs::read_dir(store.root().join("layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    assert_eq!(on_disk, listed, "layers on disk vs the index");
    for (diff_id, layer) in layers {
        if layer["tar_size"].is_u64() {
            let tar = store.root().join("blobs/sha256").join(&diff_id[7..]);
            assert!(tar.is_file(), "{} is missing", tar.display());
        }
    }
    for (id, image) in index["images"].as_object().unwrap() {
        let config = store
            .root()
            .join("images")
            .join(format!("{}.json", &id[7..]));
        assert!(config.is_file(), "{} is missing", config.display());
        for layer in image["layers"].as_array().unwrap() {
            assert!(listed.contains(&layer.as_str().unwrap()[7..].to_string()));
        }
    }
}

#[test]
fn sigkill_during_commit_leaves_a_consistent_store() {
    let store = loaded_store();
    store.ok(&["container", "create", "--name", "k", "app"]);
    let mnt = store.scratch.mkdir("mnt");
    let mut m = store.mount("k", &mnt);
    // Enough to commit that the kills land in writing, unpacking and
    // verifying, and storing the layer.
    let big: Vec<u8> = (0..48u32 << 20).map(|i| (i * 7 + i / 4093) as u8).collect();
    write(m.path("data/big"), &big);
    fs::create_dir(m.path("data/many")).unwrap();
    for i in 0..1500 {
        write(
            m.path(&format!("data/many/f{i}")),
            format!("{i}\n").as_bytes(),
        );
    }
    fs::remove_file(m.path("data/a")).unwrap();
    store.ok(&["container", "umount", "k"]);
    m.unmount();
    assert!(!is_mounted(&mnt));

    let layers_before = store.count("layers");
    let images_before = store.count("images");
    let started = Instant::now();
    store.ok(&["container", "commit", "-q", "k", "reference"]);
    let took = started.elapsed();
    let diff_id = store.layers("reference").pop().unwrap();
    // Forgotten again: the crashed commits below must store the layer anew.
    store.ok(&["image", "rm", "reference"]);
    assert_eq!(store.count("layers"), layers_before);
    assert_eq!(store.count("images"), images_before);

    // Very early (0), then spread over an uncrashed commit's time.
    for percent in [0u32, 3, 10, 25, 40, 55, 70, 85, 95] {
        let delay = took * percent / 100;
        store.kill_after(&["container", "commit", "-q", "k", "crashed"], delay);
        // The next command cleans up and finds the store whole.
        let listed = store.ok(&["image", "ls"]);
        assert_eq!(store.count("tmp"), 0, "leftovers after {delay:?}");
        assert_store_consistent(&store);
        assert!(listed.contains("app"), "{listed}");
        // A commit that got to its index write is whole; drop it again.
        if store.run(&["image", "inspect", "crashed"]).status.success() {
            assert_eq!(store.layers("crashed").pop().unwrap(), diff_id);
            store.ok(&["image", "rm", "crashed"]);
        }
    }
    store.ok(&["container", "commit", "-q", "k", "after"]);
    assert_eq!(store.layers("after").pop().unwrap(), diff_id);
    assert_eq!(store.count("layers"), layers_before + 1);
    assert_store_consistent(&store);
    assert_eq!(store.count("tmp"), 0);
    store.ok(&["container", "rm", "k"]);
}
