//! Any user can make a tree as deep as they like through the mount or in a
//! layer: nothing the daemon does may recurse once per level (its FUSE
//! threads have small stacks, and one overflow kills every user's mount).

mod common;

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{Mode, mkdirat};

use common::*;

const DEPTH: usize = 10_000;

/// `dir/d/d/.../d/f` with `depth` levels, made through descriptors (a path
/// that long cannot be named in one call), directories open to everyone.
fn deep_lower_tree(dir: &Path, depth: usize) {
    let mut fd: OwnedFd = open(dir, OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    for _ in 0..depth {
        mkdirat(fd.as_fd(), "d", Mode::from_bits_truncate(0o777)).unwrap();
        nix::sys::stat::fchmodat(
            fd.as_fd(),
            "d",
            Mode::from_bits_truncate(0o777),
            nix::sys::stat::FchmodatFlags::NoFollowSymlink,
        )
        .unwrap();
        fd = openat(fd.as_fd(), "d", OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    }
    let file = openat(
        fd.as_fd(),
        "f",
        OFlag::O_CREAT | OFlag::O_WRONLY,
        Mode::from_bits_truncate(0o666),
    )
    .unwrap();
    nix::unistd::write(&file, b"bottom\n").unwrap();
    nix::sys::stat::fchmod(&file, Mode::from_bits_truncate(0o666)).unwrap();
}

/// What the unprivileged child does at the bottom of the tree.
const WALK_ENV: &str = "UNIONFS_DEEP_WALK";

/// Runs this test binary's `deep_walk_child` as uid/gid 65534: a path
/// 10,000 levels deep cannot be named, and shells' `cd` breaks down long
/// before that, so the child walks down by descriptors.
fn as_nobody_at_bottom(top: &Path, step: &str) -> std::process::Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--ignored",
        "--exact",
        "deep_walk_child",
        "--nocapture",
        "--quiet",
    ])
    .env(WALK_ENV, format!("{step}:{}", top.display()))
    .uid(65534)
    .gid(65534);
    run_with_timeout(&mut cmd, Duration::from_secs(300))
}

/// What the child read, out of the test harness' own output.
fn read_back(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("<<").map_or(0, |i| i + 2);
    let end = text.rfind(">>").unwrap_or(text.len());
    text.get(start..end).unwrap_or_default().to_string()
}

/// The child side of `as_nobody_at_bottom`; does nothing unless asked.
#[test]
#[ignore = "run by the deep-tree test as another user"]
fn deep_walk_child() {
    let Ok(request) = std::env::var(WALK_ENV) else {
        return;
    };
    let (step, top) = request.split_once(':').unwrap();
    let mut fd: OwnedFd = open(top, OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    for level in 0..DEPTH {
        fd = openat(fd.as_fd(), "d", OFlag::O_DIRECTORY, Mode::empty())
            .unwrap_or_else(|e| panic!("descend at level {level}: {e}"));
    }
    let read = |name: &str| {
        let f = openat(fd.as_fd(), name, OFlag::O_RDONLY, Mode::empty()).unwrap();
        let mut buf = vec![0u8; 64];
        let n = nix::unistd::read(&f, &mut buf).unwrap();
        print!("<<{}>>", String::from_utf8_lossy(&buf[..n]));
    };
    match step {
        "create" => {
            let mode = Mode::from_bits_truncate(0o644);
            openat(fd.as_fd(), "new", OFlag::O_CREAT | OFlag::O_EXCL, mode).unwrap();
            let f = openat(fd.as_fd(), "f", OFlag::O_WRONLY | OFlag::O_APPEND, mode).unwrap();
            nix::unistd::write(&f, b"more\n").unwrap();
            read("f");
        }
        "read" => read("f"),
        "check" => {
            nix::sys::stat::fstatat(fd.as_fd(), "new", nix::fcntl::AtFlags::empty()).unwrap();
            read("f");
        }
        "mkdirs" => {
            for level in 0..DEPTH {
                mkdirat(fd.as_fd(), "e", Mode::from_bits_truncate(0o755))
                    .unwrap_or_else(|e| panic!("mkdir at level {level}: {e}"));
                fd = openat(fd.as_fd(), "e", OFlag::O_DIRECTORY, Mode::empty()).unwrap();
            }
            let mode = Mode::from_bits_truncate(0o644);
            openat(fd.as_fd(), "g", OFlag::O_CREAT | OFlag::O_EXCL, mode).unwrap();
        }
        other => panic!("unknown step {other}"),
    }
}

/// Removes a deep tree with rm(1) before the scratch directory's own
/// cleanup, whose recursive walk would overflow the test thread's stack.
struct RemoveDeepTree(std::path::PathBuf);

impl Drop for RemoveDeepTree {
    fn drop(&mut self) {
        let _ = run_with_timeout(
            Command::new("rm").arg("-rf").arg(&self.0),
            Duration::from_secs(300),
        );
    }
}

fn assert_mount_alive(m: &UnionMount) {
    assert!(
        fs::metadata(&m.mountpoint).is_ok() && fs::read_dir(&m.mountpoint).is_ok(),
        "the mount stopped answering (daemon died?)"
    );
}

#[test]
fn an_unprivileged_user_cannot_kill_the_mount_with_a_deep_tree() {
    let s = Scratch::new();
    let (lower, upper) = (s.mkdir("lower"), s.mkdir("upper"));
    for dir in [&lower, &upper] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
    }
    let _cleanup = (RemoveDeepTree(lower.clone()), RemoveDeepTree(upper.clone()));
    deep_lower_tree(&lower, DEPTH);
    let m = UnionMount::mount(&[&lower], Some(&upper), &s.mkdir("mnt"), &[]);

    // Create at the bottom: copies up 10,000 parents.
    let out = as_nobody_at_bottom(&m.mountpoint, "create");
    assert!(
        out.status.success(),
        "touch/append at the bottom failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read_back(&out), "bottom\nmore\n");
    assert_mount_alive(&m);

    // The upper holds the new file and the copied-up one at full depth.
    let out = as_nobody_at_bottom(&upper, "check");
    assert!(out.status.success(), "upper lacks the deep files");
    assert_eq!(read_back(&out), "bottom\nmore\n");
    let out = as_nobody_at_bottom(&lower, "read");
    assert_eq!(read_back(&out), "bottom\n", "lower changed");

    // A deep directory the user makes through the mount, then removes.
    let out = as_nobody_at_bottom(&m.mountpoint, "mkdirs");
    assert!(
        out.status.success(),
        "mkdir chain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_mount_alive(&m);

    // rm -rf of the whole tree, lower and upper parts.
    let out = run_with_timeout(
        Command::new("rm")
            .arg("-rf")
            .arg(m.path("d"))
            .uid(65534)
            .gid(65534),
        Duration::from_secs(600),
    );
    assert!(
        out.status.success(),
        "rm -rf failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_mount_alive(&m);
    assert!(!m.path("d").exists());
    let whiteout = fs::symlink_metadata(upper.join("d")).unwrap();
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
}
