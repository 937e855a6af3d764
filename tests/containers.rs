//! Containers over the image store, for real: podman builds an image from
//! busybox-static (no network), `unionfs image load` stores it, and
//! `unionfs container create|mount|umount|ls|rm` run against it. Every
//! mount is held by a guard that unmounts it on drop, failed test or not.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{Mode, mkdirat};

use common::podman::{Podman, install_busybox, tar_rootfs};
use common::store::ImageStore as Store;
use common::*;

/// A base layer and one on top that deletes a file and replaces a directory.
const CONTAINERFILE: &str = "FROM base
RUN rm /data/gone && rm -rf /data/dir && mkdir /data/dir && echo new > /data/dir/n && echo b > /data/b
";

struct Fixture {
    archive: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // Kept for the whole test process: every test loads the archive.
        let dir = Scratch::new().dir.keep();
        let rootfs = dir.join("rootfs");
        install_busybox(&rootfs, &["sh", "rm", "mkdir", "echo"]);
        for (path, content) in [
            ("data/a", &b"a\n"[..]),
            ("data/gone", b"gone\n"),
            ("data/dir/x", b"x\n"),
            ("data/dir/sub/y", b"y\n"),
            ("data/keep/k", b"k\n"),
            ("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n"),
        ] {
            write(rootfs.join(path), content);
        }
        tar_rootfs(&rootfs, &dir.join("rootfs.tar"));
        fs::write(dir.join("Containerfile"), CONTAINERFILE).unwrap();
        let podman = Podman::new(dir.join("podman"));
        podman.import_and_build(&dir, "app");
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
        drop(podman);
        Fixture { archive }
    })
}

/// A store with the fixture image loaded.
fn loaded_store() -> Store {
    Store::with_loaded(&fixture().archive)
}

impl Store {
    fn layer_dirs(&self) -> Vec<PathBuf> {
        self.json(&["image", "inspect", "app"])[0]["LayerDirs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| PathBuf::from(d.as_str().unwrap()))
            .collect()
    }

    fn upper(&self, name: &str) -> PathBuf {
        self.root().join("containers").join(name).join("upper")
    }

    fn index_containers(&self) -> BTreeSet<String> {
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(self.root().join("index.json")).unwrap()).unwrap();
        index["containers"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn container_dirs(&self) -> BTreeSet<String> {
        fs::read_dir(self.root().join("containers"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Every container the index lists has its directories; after one more
    /// command (which collects leftovers), no directory is unlisted and
    /// `tmp/` is empty.
    fn assert_consistent(&self) {
        for name in self.index_containers() {
            let dir = self.root().join("containers").join(&name);
            assert!(
                dir.join("upper").is_dir() && dir.join("work").is_dir(),
                "{name} listed without its dirs"
            );
        }
        self.ok(&["container", "ls"]);
        assert_eq!(self.index_containers(), self.container_dirs());
        assert_eq!(fs::read_dir(self.root().join("tmp")).unwrap().count(), 0);
    }
}

#[test]
fn two_containers_of_one_image() {
    let store = loaded_store();
    assert_eq!(
        store.ok(&["container", "create", "--name", "c1", "app"]),
        "c1\n"
    );
    store.ok(&[
        "container",
        "create",
        "--name",
        "c2",
        "localhost/app:latest",
    ]);
    let lowers = store.layer_dirs();
    let lower_refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    let direct = UnionMount::mount(&lower_refs, None, &store.scratch.mkdir("direct"), &[]);
    let m1 = store.mount("c1", &store.scratch.mkdir("m1"));
    let mut m2 = store.mount("c2", &store.scratch.mkdir("m2"));
    assert_eq!(
        unionfs::mountinfo::mount_at(&m1.mountpoint).unwrap().source,
        "unionfs-container:c1"
    );
    assert_same_tree("image", &direct.mountpoint, "c1", &m1.mountpoint);
    assert_same_tree("image", &direct.mountpoint, "c2", &m2.mountpoint);
    assert!(!m1.path("data/gone").exists() && m1.path("data/dir/n").exists());
    assert!(!m1.path("data/dir/x").exists());

    // A second mount of a mounted container is refused.
    let again = store.scratch.mkdir("again");
    let msg = store.refused(&["container", "mount", "c1", again.to_str().unwrap()]);
    assert!(msg.contains("mounted already"), "{msg}");

    // Changes in c1: a new file, a lower file deleted, a directory replaced.
    write(m1.path("data/new"), b"hello\n");
    fs::remove_file(m1.path("data/a")).unwrap();
    fs::remove_dir_all(m1.path("data/keep")).unwrap();
    fs::create_dir(m1.path("data/keep")).unwrap();
    write(m1.path("data/keep/fresh"), b"fresh\n");
    assert_eq!(fs::read(m1.path("data/new")).unwrap(), b"hello\n");
    assert!(!m1.path("data/a").exists());
    assert!(!m1.path("data/keep/k").exists() && m1.path("data/keep/fresh").exists());
    // Only there.
    assert_same_tree("image", &direct.mountpoint, "c2", &m2.mountpoint);
    // In c1's upper, in kernel overlayfs format.
    let upper = store.upper("c1");
    assert_eq!(fs::read(upper.join("data/new")).unwrap(), b"hello\n");
    let wh = fs::symlink_metadata(upper.join("data/a")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0, "{wh:?}");
    assert_eq!(
        xattrs_with_prefix(&upper.join("data/keep"), "trusted.overlay.opaque")
            .get("trusted.overlay.opaque")
            .map(Vec::as_slice),
        Some(&b"y"[..])
    );
    assert!(fs::read_dir(store.upper("c2")).unwrap().next().is_none());
    drop(direct);

    // ls: both, one mounted.
    store.ok(&["container", "umount", "c2"]);
    assert!(!is_mounted(&m2.mountpoint));
    m2.unmount();
    let ls = store.ok(&["container", "ls"]);
    let lines: Vec<&str> = ls.lines().collect();
    assert_eq!(lines.len(), 3, "{ls}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("MOUNTED AT"),
        "{ls}"
    );
    let mp1 = m1.mountpoint.to_str().unwrap();
    assert!(
        lines[1].starts_with("c1 ") && lines[1].contains(mp1),
        "{ls}"
    );
    assert!(lines[1].contains("localhost/app:latest"), "{ls}");
    assert!(
        lines[2].starts_with("c2 ") && !lines[2].contains("m2"),
        "{ls}"
    );
    let json = store.json(&["container", "ls", "--format", "json"]);
    let list = json.as_array().unwrap();
    assert_eq!(list.len(), 2, "{json:#}");
    assert_eq!(list[0]["Name"], "c1");
    assert_eq!(list[0]["MountedAt"], mp1);
    assert_eq!(list[0]["Image"], "localhost/app:latest");
    // "hello\n" and "fresh\n": whiteouts and directories hold no bytes.
    assert_eq!(list[0]["Size"], 12);
    assert_eq!(list[1]["Name"], "c2");
    assert!(list[1]["MountedAt"].is_null());
    assert_eq!(list[1]["Size"], 0);
    assert!(list[1]["Created"].as_str().unwrap().ends_with('Z'));

    // The image and its layers stay while containers use them.
    let msg = store.refused(&["image", "rm", "app"]);
    assert!(
        msg.contains("in use") && msg.contains("c1") && msg.contains("c2"),
        "{msg}"
    );
    assert_eq!(
        store.json(&["image", "ls", "--format", "json"])[0]["RepoTags"][0],
        "localhost/app:latest"
    );
    let df = store.ok(&["system", "df", "-v"]);
    assert!(
        df.contains("Containers") && df.contains("c1") && df.contains("c2"),
        "{df}"
    );
    let images_row = df.lines().find(|l| l.starts_with("Images")).unwrap();
    assert!(images_row.contains("0B (0%)"), "nothing reclaimable: {df}");

    // rm: refused while mounted, fine after umount.
    let msg = store.refused(&["container", "rm", "c1"]);
    assert!(
        msg.contains("mounted at") && msg.contains("container umount c1"),
        "{msg}"
    );
    assert!(store.upper("c1").join("data/new").exists());
    store.ok(&["container", "umount", "c1"]);
    assert!(!is_mounted(&m1.mountpoint));
    let msg = store.refused(&["container", "umount", "c1"]);
    assert!(msg.contains("not mounted"), "{msg}");
    assert_eq!(store.ok(&["container", "rm", "c1"]), "c1\n");
    store.ok(&["container", "rm", "c2"]);
    assert_eq!(store.ok(&["container", "ls"]).lines().count(), 1);
    store.assert_consistent();
    assert!(store.container_dirs().is_empty());

    // Nothing holds the image now.
    store.ok(&["image", "rm", "app"]);
    assert!(
        fs::read_dir(store.root().join("layers"))
            .unwrap()
            .next()
            .is_none()
    );
}

/// `dir/d/d/.../d/f`, `depth` levels, made through descriptors.
fn deep_tree(dir: &Path, depth: usize) {
    // Close-on-exec: a daemon another test starts meanwhile must not
    // inherit a descriptor into this mount (its umount would be EBUSY).
    let flags = OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut fd: OwnedFd = open(dir, flags, Mode::empty()).unwrap();
    for _ in 0..depth {
        mkdirat(fd.as_fd(), "d", Mode::from_bits_truncate(0o755)).unwrap();
        fd = openat(fd.as_fd(), "d", flags, Mode::empty()).unwrap();
    }
    let file = openat(
        fd.as_fd(),
        "f",
        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    nix::unistd::write(&file, b"bottom\n").unwrap();
}

#[test]
fn a_container_with_a_very_deep_upper_is_removed() {
    let store = loaded_store();
    store.ok(&["container", "create", "--name", "deep", "app"]);
    let mut mount = store.mount("deep", &store.scratch.mkdir("m"));
    deep_tree(&mount.path("data"), 10_000);
    // A whiteout and an opaque directory in the upper too.
    fs::remove_file(mount.path("data/a")).unwrap();
    fs::remove_dir_all(mount.path("data/keep")).unwrap();
    fs::create_dir(mount.path("data/keep")).unwrap();
    let json = store.json(&["container", "ls", "--format", "json"]);
    assert_eq!(json[0]["Size"], 7, "{json:#}");
    store.ok(&["container", "umount", "deep"]);
    mount.unmount();
    assert_eq!(store.ok(&["container", "rm", "deep"]), "deep\n");
    assert!(!store.root().join("containers/deep").exists());
    store.assert_consistent();
}

#[test]
fn bad_names_and_unknown_containers_are_refused() {
    let store = loaded_store();
    for bad in ["", "-x", ".x", "a/b", "..", "a b", "x\u{e9}", "a:b"] {
        let msg = store.refused(&["container", "create", &format!("--name={bad}"), "app"]);
        assert!(msg.contains("invalid container name"), "{bad:?}: {msg}");
    }
    let msg = store.refused(&["container", "create", "--name", "c", "nosuch"]);
    assert!(msg.contains("no such image"), "{msg}");
    store.ok(&["container", "create", "--name", "c", "app"]);
    let msg = store.refused(&["container", "create", "--name", "c", "app"]);
    assert!(msg.contains("exists already"), "{msg}");
    for args in [
        &["container", "rm", "nosuch"][..],
        &["container", "umount", "nosuch"],
        &["container", "mount", "nosuch", "/tmp"],
    ] {
        let msg = store.refused(args);
        assert!(msg.contains("no such container: nosuch"), "{msg}");
    }
    let mp = store.scratch.mkdir("m");
    let msg = store.refused(&[
        "container",
        "mount",
        "c",
        mp.to_str().unwrap(),
        "-o",
        "upperdir=/tmp",
    ]);
    assert!(msg.contains("container's own"), "{msg}");
    let msg = store.refused(&["container", "mount", "c", "/no/such/dir"]);
    assert!(msg.contains("mountpoint"), "{msg}");
    assert!(!is_mounted(&mp));
    assert!(store.json(&["container", "ls", "--format", "json"])[0]["MountedAt"].is_null());
    store.ok(&["container", "rm", "c"]);
    store.assert_consistent();
}

#[test]
fn sigkill_during_create_or_rm_leaves_a_consistent_store() {
    let store = loaded_store();
    // What a create killed before its index write leaves: a directory
    // nobody lists. The next command removes it.
    fs::create_dir_all(store.root().join("containers/ghost/upper/a/b")).unwrap();
    fs::create_dir_all(store.root().join("containers/ghost/work")).unwrap();
    store.assert_consistent();
    assert!(!store.root().join("containers/ghost").exists());

    for round in 0..12u64 {
        let name = format!("k{round}");
        let delay = Duration::from_micros(round * 1500);
        store.kill_after(&["container", "create", "--name", &name, "app"], delay);
        store.assert_consistent();
        if !store.index_containers().contains(&name) {
            continue;
        }
        // Something in the upper to remove.
        let upper = store.upper(&name);
        for i in 0..200 {
            write(upper.join(format!("d{}/f{i}", i % 10)), b"x");
        }
        store.kill_after(&["container", "rm", &name], delay);
        store.assert_consistent();
    }
    for name in store.index_containers() {
        store.ok(&["container", "rm", &name]);
    }
    store.assert_consistent();
    assert!(store.container_dirs().is_empty());
}
