//! The merged view on a real mount, compared with kernel overlayfs where the
//! kernel understands the layers.

mod common;

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use common::*;
use nix::fcntl::{FcntlArg, fcntl};
use nix::unistd::{Whence, lseek};

/// Layers exercising every kernel-format rule: shadowing, merging, whiteouts,
/// opaque dirs, type changes between layers, links, xattrs, special files.
fn build_kernel_format_layers(s: &Scratch) {
    let (l1, l2, l3, up) = (
        s.mkdir("l1"),
        s.mkdir("l2"),
        s.mkdir("l3"),
        s.mkdir("upper"),
    );
    s.mkdir("work");
    // Shadowing: the topmost layer wins.
    write(l3.join("shadowed"), b"bottom");
    write(l2.join("shadowed"), b"middle");
    write(l1.join("shadowed"), b"top");
    // Merged directories across all layers.
    write(l3.join("etc/base.conf"), b"base");
    write(l2.join("etc/mid.conf"), b"mid");
    write(l1.join("etc/top.conf"), b"top");
    write(up.join("etc/upper.conf"), b"upper");
    write(l3.join("etc/sub/deep"), b"deep");
    write(l1.join("etc/sub/deeper"), b"deeper");
    // Char-device whiteouts, in the upper and in a lower.
    write(l3.join("gone-file"), b"x");
    chardev_whiteout(up.join("gone-file"));
    write(l3.join("etc/gone.conf"), b"x");
    chardev_whiteout(l2.join("etc/gone.conf"));
    write(l3.join("gone-dir/inner"), b"x");
    chardev_whiteout(l1.join("gone-dir"));
    // A whiteout with nothing below it is simply hidden.
    chardev_whiteout(l1.join("lonely-whiteout"));
    // Opaque directories: trusted xattr, in the upper and in a lower.
    write(l3.join("opaque-up/hidden"), b"x");
    write(up.join("opaque-up/visible"), b"v");
    set_xattr(up.join("opaque-up"), "trusted.overlay.opaque", "y");
    write(l3.join("opaque-low/hidden"), b"x");
    write(l2.join("opaque-low/visible"), b"v");
    set_xattr(l2.join("opaque-low"), "trusted.overlay.opaque", "y");
    write(l1.join("opaque-low/top"), b"t");
    // Type changes: a file hides a directory and the other way round.
    write(l3.join("was-dir/child"), b"x");
    write(l2.join("was-dir"), b"now a file");
    write(l3.join("was-file"), b"x");
    write(l2.join("was-file/child"), b"now a dir");
    // A directory in the upper over a file in a lower cuts the merge.
    write(l2.join("cut/below"), b"x");
    write(l1.join("cut"), b"file in between");
    write(up.join("cut/above"), b"a");
    // Symlinks, including ones pointing out of the layer.
    symlink("/etc/passwd", l1.join("abs-link"));
    symlink("../../../../../../..", l1.join("dotdot-link"));
    symlink("etc/base.conf", l2.join("rel-link"));
    // Hard links inside one layer.
    write(l3.join("hard-a"), b"linked");
    fs::hard_link(l3.join("hard-a"), l3.join("hard-b")).unwrap();
    // Modes, user xattrs, special files, empty and sparse files.
    write(l2.join("secret"), b"s");
    chmod(l2.join("secret"), 0o600);
    write(l2.join("script"), b"#!/bin/sh\n");
    chmod(l2.join("script"), 0o4755);
    set_xattr(l2.join("script"), "user.origin", "layer2");
    set_xattr(l2.join("etc"), "user.dir", "mid");
    nix::unistd::mkfifo(
        &l3.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    write(l3.join("empty"), b"");
    let sparse = fs::File::create(l3.join("sparse")).unwrap();
    sparse.write_at(b"end", 10 << 20).unwrap();
}

#[test]
fn merged_view_matches_kernel_overlayfs() {
    let s = Scratch::new();
    build_kernel_format_layers(&s);
    let lowers = [s.path("l1"), s.path("l2"), s.path("l3")];
    let lower_refs: Vec<&Path> = lowers.iter().map(|p| p.as_path()).collect();
    let digests: Vec<String> = lowers.iter().map(|l| layer_digest(l)).collect();
    let upper_digest = layer_digest(&s.path("upper"));

    let ours = UnionMount::mount(&lower_refs, Some(&s.path("upper")), &s.mkdir("mnt"), &[]);
    let our_tree = snapshot(&ours.mountpoint);
    let our_inos = inode_numbers(&ours.mountpoint);
    let our_root_ino = fs::metadata(&ours.mountpoint).unwrap().ino();

    // Spot checks of the rules themselves (so the test does not merely
    // agree with whatever the kernel does).
    let m = &ours.mountpoint;
    assert_eq!(fs::read(m.join("shadowed")).unwrap(), b"top");
    assert!(!m.join("gone-file").exists());
    assert!(!m.join("gone-dir").exists());
    assert!(!m.join("etc/gone.conf").exists());
    assert!(!m.join("lonely-whiteout").exists());
    assert!(!m.join("opaque-up/hidden").exists());
    assert!(!m.join("opaque-low/hidden").exists());
    assert!(m.join("opaque-low/top").exists());
    assert!(m.join("was-dir").is_file());
    assert!(m.join("was-file/child").exists());
    assert!(!m.join("cut/below").exists());
    assert_eq!(
        fs::read_link(m.join("abs-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::metadata(m.join("hard-a")).unwrap().ino(),
        fs::metadata(m.join("hard-b")).unwrap().ino()
    );
    assert_eq!(fs::metadata(m.join("hard-a")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(m.join("etc")).unwrap().nlink(),
        1,
        "merged dirs report nlink 1"
    );
    let dev = fs::metadata(m).unwrap().dev();
    for entry in ["etc", "etc/sub/deep", "fifo", "hard-a", "abs-link"] {
        assert_eq!(fs::symlink_metadata(m.join(entry)).unwrap().dev(), dev);
    }
    for (path, (st_ino, d_ino)) in &our_inos {
        assert_eq!(st_ino, d_ino, "{path:?}: d_ino differs from st_ino");
    }
    drop(ours);
    for (layer, digest) in lowers.iter().zip(digests) {
        assert_eq!(layer_digest(layer), digest, "{layer:?} changed");
    }
    assert_eq!(
        layer_digest(&s.path("upper")),
        upper_digest,
        "upper changed"
    );

    // The kernel writes its own bookkeeping xattrs into the upper, so it
    // mounts only after unionfs is done with it.
    let kernel = KernelMount::mount(
        &lower_refs,
        Some((&s.path("upper"), &s.path("work"))),
        &s.mkdir("kmnt"),
        "",
    );
    let diffs = diff_trees(
        "unionfs",
        &our_tree,
        "kernel",
        &snapshot(&kernel.mountpoint),
    );
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
    // With every layer on one filesystem, inode numbers equal the kernel's.
    let kernel_inos = inode_numbers(&kernel.mountpoint);
    for (path, (st_ino, _)) in &our_inos {
        assert_eq!(
            Some(st_ino),
            kernel_inos.get(path).map(|k| &k.0),
            "{path:?}: st_ino differs from kernel overlayfs"
        );
    }
    assert_eq!(
        our_root_ino,
        fs::metadata(&kernel.mountpoint).unwrap().ino(),
        "root inode"
    );
}

#[test]
fn xattr_whiteouts_and_user_namespace_markers_match_kernel_userxattr() {
    let s = Scratch::new();
    let (l1, l2, up) = (s.mkdir("l1"), s.mkdir("l2"), s.mkdir("upper"));
    s.mkdir("work");
    write(l2.join("d/hidden-by-xattr"), b"x");
    write(l2.join("d/kept"), b"k");
    write(l1.join("d/hidden-by-xattr"), b"");
    set_xattr(l1.join("d/hidden-by-xattr"), "user.overlay.whiteout", "");
    set_xattr(l1.join("d"), "user.overlay.opaque", "x");
    write(l2.join("o/hidden"), b"x");
    write(l1.join("o/shown"), b"s");
    set_xattr(l1.join("o"), "user.overlay.opaque", "y");
    write(up.join("plain"), b"p");
    let lowers = [l1.as_path(), l2.as_path()];

    let ours = UnionMount::mount(&lowers, Some(&up), &s.mkdir("mnt"), &[]);
    let kernel = KernelMount::mount(
        &lowers,
        Some((&up, &s.path("work"))),
        &s.mkdir("kmnt"),
        "userxattr",
    );
    assert_same_tree("unionfs", &ours.mountpoint, "kernel", &kernel.mountpoint);
    assert!(!ours.path("d/hidden-by-xattr").exists());
    assert!(ours.path("d/kept").exists());
    assert!(!ours.path("o/hidden").exists());
    // Overlay-private xattrs never show.
    let listed = user_xattrs(&ours.path("o"));
    assert!(listed.is_empty(), "private xattrs leaked: {listed:?}");
}

#[test]
fn trusted_xattr_whiteouts_match_kernel() {
    let s = Scratch::new();
    let (l1, l2, up) = (s.mkdir("l1"), s.mkdir("l2"), s.mkdir("upper"));
    s.mkdir("work");
    write(l2.join("d/victim"), b"x");
    write(l2.join("d/survivor"), b"s");
    write(l1.join("d/victim"), b"");
    set_xattr(l1.join("d/victim"), "trusted.overlay.whiteout", "");
    set_xattr(l1.join("d"), "trusted.overlay.opaque", "x");
    let lowers = [l1.as_path(), l2.as_path()];
    let ours = UnionMount::mount(&lowers, Some(&up), &s.mkdir("mnt"), &[]);
    let kernel = KernelMount::mount(&lowers, Some((&up, &s.path("work"))), &s.mkdir("kmnt"), "");
    assert_same_tree("unionfs", &ours.mountpoint, "kernel", &kernel.mountpoint);
    assert!(!ours.path("d/victim").exists());
    let out = run(Command::new("getfattr")
        .args(["-n", "trusted.overlay.opaque"])
        .arg(ours.path("d")));
    assert!(
        !out.status.success(),
        "trusted.overlay.opaque must not be readable through the mount"
    );
}

#[test]
fn oci_whiteouts_in_lower_layers() {
    let s = Scratch::new();
    let (l1, l2, l3) = (s.mkdir("l1"), s.mkdir("l2"), s.mkdir("l3"));
    write(l3.join("usr/bin/tool"), b"tool");
    write(l3.join("usr/bin/removed"), b"x");
    write(l3.join("var/cache/a"), b"a");
    write(l3.join("var/cache/b"), b"b");
    write(l3.join("opt/old"), b"x");
    write(l2.join("usr/bin/.wh.removed"), b"");
    write(l2.join("var/cache/.wh..wh..opq"), b"");
    write(l2.join("var/cache/fresh"), b"f");
    write(l2.join(".wh.opt"), b"");
    // OCI: a whiteout hides only lower layers, not its own layer's entry.
    write(l2.join("same-layer"), b"kept");
    write(l2.join(".wh.same-layer"), b"");
    write(l3.join("same-layer"), b"lower");
    write(l2.join(".wh..wh.plnk/123"), b"aufs metadata");
    // A name whited out in l2 may come back in l1.
    write(l1.join("opt/new"), b"n");
    let m = UnionMount::mount(&[&l1, &l2, &l3], None, &s.mkdir("mnt"), &[]);

    let names = |rel: &str| -> HashSet<String> {
        fs::read_dir(m.path(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    assert_eq!(names("usr/bin"), HashSet::from(["tool".to_string()]));
    assert_eq!(names("var/cache"), HashSet::from(["fresh".to_string()]));
    assert_eq!(names("opt"), HashSet::from(["new".to_string()]));
    assert_eq!(
        names(""),
        ["usr", "var", "opt", "same-layer"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    assert_eq!(fs::read(m.path("same-layer")).unwrap(), b"kept");
    assert!(!m.path("usr/bin/removed").exists());
    assert!(!m.path("usr/bin/.wh.removed").exists());
    assert!(!m.path("var/cache/a").exists());
    assert!(!m.path(".wh..wh.plnk").exists());
    assert!(!m.path("opt/old").exists());
}

#[test]
fn symlinks_are_data_never_walked_by_the_daemon() {
    let s = Scratch::new();
    let (l1, l2, up) = (s.mkdir("l1"), s.mkdir("l2"), s.mkdir("upper"));
    s.mkdir("work");
    symlink("/etc", l1.join("etc"));
    write(l2.join("etc/passwd"), b"layer passwd");
    symlink("../../../../../../../..", l1.join("up"));
    symlink("/", l1.join("root"));
    // A directory above a symlink: the symlink cuts the merge, so nothing
    // below it is reached through it.
    fs::create_dir(up.join("cfg")).unwrap();
    symlink("/etc", l1.join("cfg"));
    write(l2.join("cfg/shadowed"), b"x");
    let lowers = [l1.as_path(), l2.as_path()];
    let m = UnionMount::mount(&lowers, Some(&up), &s.mkdir("mnt"), &[]);
    let kernel = KernelMount::mount(&lowers, Some((&up, &s.path("work"))), &s.mkdir("kmnt"), "");

    assert!(
        fs::symlink_metadata(m.path("etc"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        fs::read_link(m.path("up")).unwrap(),
        Path::new("../../../../../../../..")
    );
    assert_eq!(fs::read_link(m.path("root")).unwrap(), Path::new("/"));
    assert!(!m.path("cfg/shadowed").exists());
    assert_eq!(fs::read_dir(m.path("cfg")).unwrap().count(), 0);
    assert_same_tree("unionfs", &m.mountpoint, "kernel", &kernel.mountpoint);
}

#[test]
fn huge_directory_lists_every_name_once() {
    const N: usize = 100_000;
    let s = Scratch::new();
    let (l1, l2, up) = (s.mkdir("l1"), s.mkdir("l2"), s.mkdir("upper"));
    let big_low = l2.join("big");
    fs::create_dir(&big_low).unwrap();
    for i in 0..N {
        fs::File::create(big_low.join(format!("f{i:06}"))).unwrap();
    }
    // Overlap with the upper and a whiteout, so the listing really merges.
    let big_up = up.join("big");
    fs::create_dir(&big_up).unwrap();
    for i in (0..N).step_by(1000) {
        fs::File::create(big_up.join(format!("f{i:06}"))).unwrap();
        fs::File::create(big_up.join(format!("u{i:06}"))).unwrap();
    }
    chardev_whiteout(big_up.join("f000001"));
    let m = UnionMount::mount(&[&l1, &l2], Some(&up), &s.mkdir("mnt"), &[]);

    let mut seen = HashSet::new();
    for entry in fs::read_dir(m.path("big")).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(seen.insert(name.clone()), "{name:?} listed twice");
    }
    let expected = N - 1 + N / 1000;
    assert_eq!(seen.len(), expected);
    assert!(!seen.contains(std::ffi::OsStr::new("f000001")));
    // `ls -f` reads with many getdents calls of its own size: same answer.
    let out = sh(Command::new("ls").arg("-f").arg(m.path("big")));
    let listed = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(listed, expected + 2, "ls -f (with . and ..)");
}

#[test]
fn reads_seeks_holes_mmap_and_locks() {
    let s = Scratch::new();
    let l1 = s.mkdir("l1");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    write(l1.join("big"), &data);
    let sparse = fs::File::create(l1.join("sparse")).unwrap();
    sparse.write_at(b"data", 8 << 20).unwrap();
    let m = UnionMount::mount(&[&l1], None, &s.mkdir("mnt"), &[]);

    let mut f = fs::File::open(m.path("big")).unwrap();
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    assert!(all == data, "sequential read");
    let mut buf = [0u8; 4096];
    f.seek(SeekFrom::Start(1_234_567)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf[..], &data[1_234_567..1_234_567 + 4096]);

    // SEEK_DATA / SEEK_HOLE see the lower file's hole.
    let sparse = fs::File::open(m.path("sparse")).unwrap();
    let nums =
        [Whence::SeekData, Whence::SeekHole].map(|whence| lseek(&sparse, 0, whence).unwrap());
    assert_eq!(nums[0], 8 << 20, "SEEK_DATA skips the hole");
    assert_eq!(nums[1], 0, "SEEK_HOLE finds the hole at 0");
    drop(sparse);

    // mmap of a lower file.
    let mapping = unionfs::sys::ReadMapping::new(&fs::File::open(m.path("big")).unwrap()).unwrap();
    assert_eq!(
        mapping.read(2_999_990..3_000_000),
        data[2_999_990..],
        "reading through a mapping"
    );
    drop(mapping);

    // flock and fcntl locks are enforced between processes: with a shared
    // flock held here, another process's exclusive one would block; with
    // a shared fcntl lock held here, another process gets one too.
    let f = fs::File::open(m.path("big")).unwrap();
    f.lock_shared().unwrap();
    let g = fs::File::open(m.path("big")).unwrap();
    sh(&mut helper(
        HelperOp::FlockExclusiveNonblocking,
        m.path("big"),
    ));
    drop((f, g));
    let f = fs::File::open(m.path("big")).unwrap();
    fcntl(&f, FcntlArg::F_SETLKW(&read_lock_whole_file())).unwrap();
    sh(&mut helper(HelperOp::LockfSharedNonblocking, m.path("big")));
    drop(f);

    // statfs answers, and a read-only mount refuses writes.
    sh(Command::new("df").arg(&m.mountpoint));
    let err = fs::File::create(m.path("new")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let err = fs::OpenOptions::new()
        .write(true)
        .open(m.path("big"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

#[test]
fn layers_on_different_filesystems_get_distinct_inode_numbers() {
    let s = Scratch::new();
    let (l1, l2) = (s.mkdir("l1"), s.mkdir("tmpfs"));
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&l2));
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _tmpfs = Unmount(&l2);
    for i in 0..50 {
        write(l1.join(format!("d{i}/f")), b"ext4");
        write(l2.join(format!("e{i}/g")), b"tmpfs");
    }
    write(l1.join("shared/a"), b"a");
    write(l2.join("shared/b"), b"b");
    let m = UnionMount::mount(&[&l1, &l2], None, &s.mkdir("mnt"), &[]);
    let inos = inode_numbers(&m.mountpoint);
    let mut seen = HashSet::new();
    for (path, (st_ino, d_ino)) in &inos {
        assert_eq!(st_ino, d_ino, "{path:?}");
        assert!(seen.insert(*st_ino), "{path:?} reuses inode {st_ino}");
    }
    assert_eq!(fs::read(m.path("shared/b")).unwrap(), b"b");
    drop(m);
}

#[test]
fn forget_releases_nodes_after_a_walk() {
    let s = Scratch::new();
    let l1 = s.mkdir("l1");
    for d in 0..200 {
        for f in 0..20 {
            write(l1.join(format!("d{d:03}/f{f:02}")), b"");
        }
    }
    let m = UnionMount::mount(&[&l1], None, &s.mkdir("mnt"), &[]);
    let pid = m.daemon_pid().expect("daemon pid file");
    let fds = || fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let before = fds();
    sh(Command::new("find").arg(&m.mountpoint).args(["-type", "f"]));
    let walked = fds();
    assert!(
        walked >= before + 200,
        "each live directory holds a descriptor ({before} -> {walked})"
    );
    // Dropping the kernel's caches makes it FORGET the nodes.
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
    wait_until(|| fds() <= before + 5);
}

#[test]
fn sigterm_unmounts_cleanly() {
    let s = Scratch::new();
    let l1 = s.mkdir("l1");
    write(l1.join("f"), b"x");
    let m = UnionMount::mount(&[&l1], None, &s.mkdir("mnt"), &[]);
    let pid = m.daemon_pid().expect("daemon pid file");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until(|| !is_mounted(&m.mountpoint));
    wait_until(|| {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|st| st.rsplit(')').next().unwrap().trim_start().starts_with('Z'))
            .unwrap_or(true)
    });
}

/// The helper processes the tests above start (see `common::helper`).
#[test]
fn child_helper() {
    helper_main();
}
