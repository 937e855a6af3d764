//! Modes and ACLs of new objects: the caller's umask applies unless the
//! directory has a default ACL, whose mask rules then apply instead (POSIX
//! ACLs). Compared with kernel overlayfs over the same lower layer.

mod common;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use common::*;
use nix::sys::stat::{Mode, SFlag, mknod, umask};

/// The umask is the whole process's: tests that set it run one at a time,
/// and nothing else in this binary creates files meanwhile.
static UMASK: Mutex<()> = Mutex::new(());

/// Sets the umask, and puts the old one back when dropped.
struct UmaskGuard(Mode);

impl UmaskGuard {
    fn set(mask: u32) -> UmaskGuard {
        UmaskGuard(umask(Mode::from_bits_truncate(mask)))
    }
}

impl Drop for UmaskGuard {
    fn drop(&mut self) {
        umask(self.0);
    }
}

/// A default ACL granting a user who owns nothing here.
fn set_default_acl(dir: &Path) {
    sh(Command::new("setfacl")
        .args(["-d", "-m", "u:12345:rwx"])
        .arg(dir));
}

/// `getfacl` of one object, entry by entry.
fn acl_entries(path: &Path) -> Vec<String> {
    let out = sh(Command::new("getfacl").args(["-c", "-n", "-p"]).arg(path));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The lower: a directory with a default ACL and one without, each holding
/// a file, a directory and a fifo to delete and make again (over a
/// whiteout).
fn build_lower(s: &Scratch) -> std::path::PathBuf {
    let _umask = UmaskGuard::set(0o022);
    let lower = s.mkdir("lower");
    // A default ACL takes its group and other entries from the mode of the
    // directory it is set on: with 0755 they take permissions away.
    for (dir, mode, acl) in [
        ("acl", 0o777, true),
        ("acl-755", 0o755, true),
        ("plain", 0o777, false),
    ] {
        let dir = lower.join(dir);
        fs::create_dir_all(&dir).unwrap();
        chmod(&dir, mode);
        if acl {
            set_default_acl(&dir);
        }
        write(dir.join("old-file"), b"old");
        fs::create_dir_all(dir.join("old-dir")).unwrap();
        nix::unistd::mkfifo(&dir.join("old-fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    }
    lower
}

/// What the comparison looks at for each new object.
type Made = Vec<(String, u32, Vec<String>)>;

/// Makes a file (open O_CREAT), a directory and a fifo in each directory
/// under `mask`: in lower directories with and without a default ACL, in
/// upper directories made through the mount with and without one, and over
/// whiteouts of lower objects.
fn make_objects(mnt: &Path, mask: u32) -> Made {
    let _umask = UmaskGuard::set(mask);
    for dir in ["upper-acl", "upper-plain"] {
        fs::DirBuilder::new()
            .mode(0o777)
            .create(mnt.join(dir))
            .unwrap();
        chmod(mnt.join(dir), 0o777);
    }
    set_default_acl(&mnt.join("upper-acl"));
    for dir in ["acl", "acl-755", "plain"] {
        let dir = mnt.join(dir);
        fs::remove_file(dir.join("old-file")).unwrap();
        fs::remove_dir(dir.join("old-dir")).unwrap();
        fs::remove_file(dir.join("old-fifo")).unwrap();
    }
    let mut made = Vec::new();
    for dir in ["acl", "acl-755", "plain", "upper-acl", "upper-plain"] {
        let over_whiteouts = !dir.starts_with("upper");
        let dir = mnt.join(dir);
        let mut names = vec![("file", "dir", "fifo")];
        if over_whiteouts {
            names.push(("old-file", "old-dir", "old-fifo"));
        }
        for (file, sub, fifo) in names {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o666)
                .open(dir.join(file))
                .unwrap();
            fs::DirBuilder::new()
                .mode(0o777)
                .create(dir.join(sub))
                .unwrap();
            mknod(
                &dir.join(fifo),
                SFlag::S_IFIFO,
                Mode::from_bits_truncate(0o666),
                0,
            )
            .unwrap();
            for name in [file, sub, fifo] {
                let path = dir.join(name);
                let mode = fs::symlink_metadata(&path).unwrap().mode();
                let rel = path.strip_prefix(mnt).unwrap().display().to_string();
                made.push((rel, mode, acl_entries(&path)));
            }
        }
    }
    made
}

fn compare(mask: u32) {
    let _serial = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new();
    let lower = build_lower(&s);
    let (kernel, ours) = on_kernel_then_unionfs(&s, &lower, "", |mnt| make_objects(mnt, mask));
    let mut diffs = Vec::new();
    for ((path, kmode, kacl), (_, umode, uacl)) in kernel.iter().zip(&ours) {
        if kmode != umode || kacl != uacl {
            diffs.push(format!(
                "{path}: kernel {kmode:o} {kacl:?}\n    unionfs {umode:o} {uacl:?}"
            ));
        }
    }
    assert_eq!(kernel.len(), ours.len());
    assert!(diffs.is_empty(), "umask {mask:03o}:\n{}", diffs.join("\n"));
}

#[test]
fn new_objects_take_umask_or_default_acl_as_on_kernel_overlayfs_umask_022() {
    compare(0o022);
}

#[test]
fn new_objects_take_umask_or_default_acl_as_on_kernel_overlayfs_umask_077() {
    compare(0o077);
}
