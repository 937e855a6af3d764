//! podman as a real client of unionfs (containers/storage's
//! overlay.mount_program): import a busybox root filesystem, build an image
//! whose steps create, modify, chmod, hard-link, delete, replace and move
//! files and directories of the base layer, then run it, diff a container,
//! and compare everything with the same build on podman's native overlay.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use common::podman::{Podman, install_busybox};
use common::*;

const CONTAINERFILE: &str = "FROM base
RUN echo changed >> /data/a && chmod 600 /data/a
RUN rm /data/gone && mkdir -p /data/new && echo n > /data/new/f
RUN ln /data/sub/b /data/hard && rm -rf /data/sub && mkdir /data/sub && echo fresh > /data/sub/c
RUN mv /data/new /data/moved && touch /data/moved/g && chmod 4755 /data/moved/g
RUN mv /data/keep /data/kept && ln -s kept /data/link
";

/// Everything the scenario observes of one storage driver.
fn scenario(podman: &Podman, dir: &Path, export_to: &Path) -> (String, String, BTreeSet<String>) {
    let limits = common::podman::RUN_LIMITS;
    podman.ok_raw(&["import", "rootfs.tar", "base"], dir);
    let mut build = vec!["build"];
    build.extend(limits);
    build.extend(["-t", "result", "-f", "Containerfile", "."]);
    podman.ok_raw(&build, dir);
    let history = podman.ok_raw(
        &["image", "history", "--format", "{{.CreatedBy}}", "result"],
        dir,
    );

    let mut run = vec!["run", "--rm"];
    run.extend(limits);
    run.extend(["result", "/bin/sh", "-c", "cat /data/a /data/hard /data/sub/c /data/link; busybox stat -c '%n %A %s %u' /data/* /data/sub/*"]);
    let output = podman.ok_raw(&run, dir);

    let mut changed = vec!["run", "--name", "changed"];
    changed.extend(limits);
    changed.extend([
        "result",
        "/bin/sh",
        "-c",
        "echo x > /data/y && rm /data/a && rm -r /data/moved",
    ]);
    podman.ok_raw(&changed, dir);
    let diff: BTreeSet<String> = podman
        .ok_raw(&["diff", "changed"], dir)
        .lines()
        .map(str::to_string)
        .collect();

    podman.ok_raw(&["create", "--name", "exported", "result", "/bin/sh"], dir);
    let tar = dir.join(format!(
        "{}.tar",
        export_to.file_name().unwrap().to_string_lossy()
    ));
    podman.ok_raw(&["export", "-o", tar.to_str().unwrap(), "exported"], dir);
    fs::create_dir_all(export_to).unwrap();
    sh(Command::new("tar")
        .arg("-C")
        .arg(export_to)
        .arg("-xf")
        .arg(&tar));
    (history, output, diff)
}

fn build_rootfs(dir: &Path) {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "etc", "tmp", "data/sub"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    install_busybox(
        &rootfs,
        &[
            "sh", "ls", "cat", "echo", "mkdir", "rm", "chmod", "ln", "mv", "touch", "cp",
        ],
    );
    write(rootfs.join("data/a"), b"base\n");
    write(rootfs.join("data/sub/b"), b"base2\n");
    write(rootfs.join("data/gone"), b"gone\n");
    write(rootfs.join("data/keep/k"), b"keep\n");
    write(rootfs.join("etc/passwd"), b"root:x:0:0:root:/:/bin/sh\n");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-cf"])
        .arg(dir.join("rootfs.tar"))
        .arg("."));
    fs::write(dir.join("Containerfile"), CONTAINERFILE).unwrap();
}

/// name -> (type, mode, size, nlink, link target, content) of a tree.
fn tree(root: &Path) -> BTreeSet<String> {
    let out = sh(Command::new("find")
        .arg(".")
        .args(["-printf", "%p %y %m %s %n %l\\n"])
        .current_dir(root));
    let mut set: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    for path in walk(root)
        .into_iter()
        .filter(|p| root.join(p).is_file() && !root.join(p).is_symlink())
    {
        set.insert(format!(
            "{} content {:?}",
            path.display(),
            fs::read(root.join(&path)).unwrap()
        ));
    }
    set
}

#[test]
fn podman_builds_the_same_image_on_unionfs_as_on_native_overlay() {
    let s = Scratch::new();
    let dir = s.dir.path().to_path_buf();
    build_rootfs(&dir);
    let ours = Podman::with_mount_program(s.mkdir("storage-unionfs"), BIN);
    let native = Podman::new(s.mkdir("storage-native"));
    let (our_history, our_output, our_diff) = scenario(&ours, &dir, &dir.join("export-unionfs"));
    let (native_history, native_output, native_diff) =
        scenario(&native, &dir, &dir.join("export-native"));

    assert_eq!(our_history, native_history, "podman image history");
    // (A directory's link count may differ: with a mount program podman
    // stores layers as naive diffs, which merge where native layers are
    // opaque. Its contents do not.)
    assert_eq!(our_output, native_output, "podman run output");
    assert!(
        our_output.contains("changed") && our_output.contains("fresh"),
        "{our_output}"
    );
    assert_eq!(our_diff, native_diff, "podman diff");
    for expected in ["A /data/y", "D /data/a", "D /data/moved"] {
        assert!(
            our_diff.contains(expected),
            "podman diff lacks {expected}: {our_diff:?}"
        );
    }
    let (ours_tree, native_tree) = (
        tree(&dir.join("export-unionfs")),
        tree(&dir.join("export-native")),
    );
    let only_ours: Vec<_> = ours_tree.difference(&native_tree).collect();
    let only_native: Vec<_> = native_tree.difference(&ours_tree).collect();
    assert!(
        only_ours.is_empty() && only_native.is_empty(),
        "exported images differ:\nonly unionfs: {only_ours:#?}\nonly native: {only_native:#?}"
    );
}
