//! Unit tests of the core's write path on real layer directories, without
//! FUSE: copy-up, and what it must leave as it was.

use std::ffi::OsStr;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, UtimensatFlags, mkdirat, utimensat};
use nix::sys::time::TimeSpec;

use super::test_layers::{lookup_path, write};
use super::write::SetAttr;
use super::*;

/// 2001-09-09: older than anything a test run makes.
const OLD: i64 = 1_000_000_000;

fn set_old_times(path: &Path) {
    let t = TimeSpec::new(OLD, 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

fn work_entries(upper: &Path) -> usize {
    fs::read_dir(upper.with_extension("work").join("work"))
        .unwrap()
        .count()
}

#[test]
fn copy_up_keeps_the_times_of_the_parents() {
    let t = tempfile::tempdir().unwrap();
    let (upper, lower) = (t.path().join("u"), t.path().join("l"));
    write(&lower.join("etc/app/main.conf"), b"old");
    write(&lower.join("etc/app/other"), b"other");
    for p in ["etc/app/main.conf", "etc/app", "etc", ""] {
        set_old_times(&lower.join(p));
    }
    let ov = test_layers::overlay(Some(&upper), &[&lower]);

    let (node, _) = lookup_path(&ov, "etc/app/main.conf").unwrap();
    let (fh, _) = ov.open(node.id, libc::O_WRONLY, None).unwrap();
    ov.write(fh, 0, b"new", None).unwrap();
    ov.release(fh);

    for dir in ["etc", "etc/app"] {
        let st = fs::symlink_metadata(upper.join(dir)).unwrap();
        assert_eq!((st.mtime(), st.atime()), (OLD, OLD), "upper {dir}");
        let (_, attr) = lookup_path(&ov, dir).unwrap();
        assert_eq!(attr.mtime.sec, OLD, "merged {dir}");
    }
    let root = fs::symlink_metadata(&upper).unwrap();
    assert_ne!(root.mtime(), OLD, "the upper root was never a lower copy");
}

/// Makes `dir/d/d/.../d` (`depth` levels) through descriptors, holding one
/// directory open at a time; returns the deepest directory's path relative
/// to `dir`.
fn deep_tree(dir: &Path, depth: usize) -> String {
    let mut fd: OwnedFd = nix::fcntl::open(dir, OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    for _ in 0..depth {
        mkdirat(fd.as_fd(), "d", Mode::from_bits_truncate(0o755)).unwrap();
        fd = nix::fcntl::openat(fd.as_fd(), "d", OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    }
    let fd = nix::fcntl::openat(
        fd.as_fd(),
        "f",
        OFlag::O_CREAT | OFlag::O_WRONLY,
        Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    nix::unistd::write(&fd, b"deep").unwrap();
    vec!["d"; depth].join("/")
}

/// Copy-up of a file 10,000 directories down, and dropping the node table
/// afterwards, on a thread with a stack far smaller than FUSE's: neither may
/// recurse once per level. The tree needs more lower directory descriptors
/// than the budget allows (a quarter of the fd limit), so some are closed
/// and reopened on the way.
#[test]
fn copy_up_and_release_of_a_deep_tree_use_bounded_stack() {
    const DEPTH: usize = 10_000;
    let t = tempfile::tempdir().unwrap();
    let (upper, lower) = (t.path().join("u"), t.path().join("l"));
    fs::create_dir_all(&lower).unwrap();
    let dir = deep_tree(&lower, DEPTH);
    let upper_thread = upper.clone();
    let file = format!("{dir}/f");
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let ov = test_layers::overlay(Some(&upper_thread), &[&lower]);
            let (node, _) = lookup_path(&ov, &file).unwrap();
            let (fh, _) = ov
                .open(node.id, libc::O_WRONLY | libc::O_APPEND, None)
                .unwrap();
            ov.write(fh, 0, b"+", None).unwrap();
            ov.release(fh);
            assert!(
                dirfd::held_count() <= dirfd::budget(),
                "{} lower directory descriptors held, budget {}",
                dirfd::held_count(),
                dirfd::budget()
            );
            drop(node);
            drop(ov);
        })
        .unwrap()
        .join()
        .expect("copy-up thread overflowed or failed");
    // Too long a path for one call: walk down by descriptors.
    let mut fd: OwnedFd = nix::fcntl::open(&upper, OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    for _ in 0..DEPTH {
        fd = nix::fcntl::openat(fd.as_fd(), "d", OFlag::O_DIRECTORY, Mode::empty()).unwrap();
    }
    let copied = nix::fcntl::openat(fd.as_fd(), "f", OFlag::O_RDONLY, Mode::empty()).unwrap();
    let mut buf = [0u8; 16];
    let n = nix::unistd::read(&copied, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"deep+");
}

/// A tmpfs mounted for one test: it holds xattr values ext4 cannot.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path) -> Tmpfs {
        fs::create_dir_all(path).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=16m"),
        )
        .unwrap();
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if nix::mount::umount(&self.0).is_err() {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// An xattr the upper refuses (ENOSPC: an 8 KiB value on ext4 without
/// ea_inode) fails the copy-up, as in kernel overlayfs, and the file stays
/// the lower one with all its xattrs; nothing is left in the work dir.
#[test]
fn an_xattr_the_upper_refuses_fails_the_copy_up() {
    let t = tempfile::tempdir().unwrap();
    let lower = t.path().join("l");
    let _tmpfs = Tmpfs::mount(&lower);
    let upper = t.path().join("u");
    write(&lower.join("dir/bigx"), b"data");
    let big = vec![b'x'; 8000];
    for (path, name) in [("dir/bigx", "user.big"), ("dir", "user.big")] {
        xattr_set(&lower.join(path), name, &big);
        xattr_set(&lower.join(path), "user.small", b"kept");
    }
    let ov = test_layers::overlay(Some(&upper), &[&lower]);

    // The file's own copy-up: chmod 600.
    let (file, _) = lookup_path(&ov, "dir/bigx").unwrap();
    let set = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    // Its parent carries a value the upper refuses as well: the parent's
    // copy-up fails first.
    let err = ov.setattr(file.id, set, None).unwrap_err();
    assert!(
        matches!(err.errno(), Errno::ENOSPC | Errno::E2BIG),
        "got {err}"
    );
    assert!(
        !upper.join("dir").exists(),
        "no partial parent in the upper"
    );
    assert_eq!(work_entries(&upper), 0);

    // Without the parent's big value, the file's own copy-up fails alike.
    nix_remove_xattr(&lower.join("dir"), "user.big");
    drop(file);
    drop(ov);
    let ov = test_layers::overlay(Some(&upper), &[&lower]);
    let (file, _) = lookup_path(&ov, "dir/bigx").unwrap();
    let err = ov.setattr(file.id, set, None).unwrap_err();
    assert!(
        matches!(err.errno(), Errno::ENOSPC | Errno::E2BIG),
        "got {err}"
    );
    assert!(
        !upper.join("dir/bigx").exists(),
        "no copy without its xattrs"
    );
    assert_eq!(work_entries(&upper), 0);
    let (_, attr) = lookup_path(&ov, "dir/bigx").unwrap();
    assert_eq!(attr.mode & 0o777, 0o644, "the mode did not change");
    assert_eq!(
        ov.getxattr(file.id, OsStr::new("user.big")).unwrap().len(),
        8000
    );
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) {
    let dir = nix::fcntl::open(
        path.parent().unwrap(),
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
    .unwrap();
    let cname = std::ffi::CString::new(name).unwrap();
    crate::sys::set_xattr(
        crate::sys::XattrTarget::Entry(dir.as_fd(), path.file_name().unwrap()),
        &cname,
        value,
        0,
    )
    .unwrap();
}

fn nix_remove_xattr(path: &Path, name: &str) {
    let dir = nix::fcntl::open(
        path.parent().unwrap(),
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
    .unwrap();
    let cname = std::ffi::CString::new(name).unwrap();
    crate::sys::remove_xattr(
        crate::sys::XattrTarget::Entry(dir.as_fd(), path.file_name().unwrap()),
        &cname,
    )
    .unwrap();
}
