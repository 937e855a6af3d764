//! podman as a real client of unionfs (containers/storage's
//! overlay.mount_program): import a busybox root filesystem, build an image
//! whose steps create, modify, chmod, hard-link, delete, replace and move
//! files and directories of the base layer, then run it, diff a container,
//! and compare everything with the same build on podman's native overlay.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::podman::install_busybox;
use common::*;

const CONTAINERFILE: &str = "FROM base
RUN echo changed >> /data/a && chmod 600 /data/a
RUN rm /data/gone && mkdir -p /data/new && echo n > /data/new/f
RUN ln /data/sub/b /data/hard && rm -rf /data/sub && mkdir /data/sub && echo fresh > /data/sub/c
RUN mv /data/new /data/moved && touch /data/moved/g && chmod 4755 /data/moved/g
RUN mv /data/keep /data/kept && ln -s kept /data/link
";

struct Podman {
    root: PathBuf,
    /// podman wants its runroot path short (under 50 characters).
    runroot: tempfile::TempDir,
    mount_program: Option<&'static str>,
}

impl Podman {
    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(self.root.join("root"))
            .arg("--runroot")
            .arg(self.runroot.path())
            .args([
                "--storage-driver",
                "overlay",
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
            ])
            .args(["--events-backend", "file"]);
        if let Some(program) = self.mount_program {
            cmd.args(["--storage-opt", &format!("overlay.mount_program={program}")]);
        }
        cmd
    }

    fn ok(&self, args: &[&str], dir: &Path) -> String {
        let out = run_with_timeout(
            self.cmd().args(args).current_dir(dir),
            Duration::from_secs(300),
        );
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Everything the scenario observes of one storage driver.
    fn scenario(&self, dir: &Path, export_to: &Path) -> (String, String, BTreeSet<String>) {
        let limits = common::podman::RUN_LIMITS;
        self.ok(&["import", "rootfs.tar", "base"], dir);
        let mut build = vec!["build"];
        build.extend(limits);
        build.extend(["-t", "result", "-f", "Containerfile", "."]);
        self.ok(&build, dir);
        let history = self.ok(
            &["image", "history", "--format", "{{.CreatedBy}}", "result"],
            dir,
        );

        let mut run = vec!["run", "--rm"];
        run.extend(limits);
        run.extend(["result", "/bin/sh", "-c", "cat /data/a /data/hard /data/sub/c /data/link; busybox stat -c '%n %A %s %u' /data/* /data/sub/*"]);
        let output = self.ok(&run, dir);

        let mut changed = vec!["run", "--name", "changed"];
        changed.extend(limits);
        changed.extend([
            "result",
            "/bin/sh",
            "-c",
            "echo x > /data/y && rm /data/a && rm -r /data/moved",
        ]);
        self.ok(&changed, dir);
        let diff: BTreeSet<String> = self
            .ok(&["diff", "changed"], dir)
            .lines()
            .map(str::to_string)
            .collect();

        self.ok(&["create", "--name", "exported", "result", "/bin/sh"], dir);
        let tar = dir.join(format!(
            "{}.tar",
            export_to.file_name().unwrap().to_string_lossy()
        ));
        self.ok(&["export", "-o", tar.to_str().unwrap(), "exported"], dir);
        fs::create_dir_all(export_to).unwrap();
        sh(Command::new("tar")
            .arg("-C")
            .arg(export_to)
            .arg("-xf")
            .arg(&tar));
        (history, output, diff)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = run(self.cmd().args(["rm", "-af"]));
        let _ = run(self.cmd().args(["system", "reset", "-f"]));
        // Whatever podman left mounted under its root goes too.
        for root in [self.root.clone(), self.runroot.path().to_path_buf()] {
            let mounts = unionfs::mountinfo::read().unwrap_or_default();
            for m in mounts.iter().filter(|m| m.mount_point.starts_with(&root)) {
                let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

fn short_runroot() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ufs-pod")
        .tempdir_in("/run")
        .unwrap()
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
    let ours = Podman {
        root: s.mkdir("storage-unionfs"),
        runroot: short_runroot(),
        mount_program: Some(BIN),
    };
    let native = Podman {
        root: s.mkdir("storage-native"),
        runroot: short_runroot(),
        mount_program: None,
    };
    let (our_history, our_output, our_diff) = ours.scenario(&dir, &dir.join("export-unionfs"));
    let (native_history, native_output, native_diff) =
        native.scenario(&dir, &dir.join("export-native"));

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
