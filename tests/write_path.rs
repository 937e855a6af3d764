//! Copy-up and the write path on a real mount: metadata and holes survive,
//! open descriptors follow the copy-up, racing writers copy up once, a crash
//! mid-copy-up leaves no partial file, and lower layers never change.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirEntryExt, FileExt, MetadataExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn layers(s: &Scratch) -> (std::path::PathBuf, std::path::PathBuf) {
    (s.mkdir("lower"), s.mkdir("upper"))
}

#[test]
fn copy_up_keeps_owner_mode_times_xattrs_acls_caps_and_holes() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    let f = lower.join("tool");
    let sparse = fs::File::create(&f).unwrap();
    sparse.write_at(b"head", 0).unwrap();
    sparse.write_at(b"tail", 32 << 20).unwrap();
    drop(sparse);
    std::os::unix::fs::chown(&f, Some(1234), Some(5678)).unwrap();
    set_xattr(&f, "user.note", "kept");
    // CAP_NET_RAW, permitted, effective (a VFS_CAP_REVISION_2 blob).
    sh(Command::new("setfattr")
        .args([
            "-n",
            "security.capability",
            "-v",
            "0x0100000200200000000000000000000000000000",
        ])
        .arg(&f));
    sh(Command::new("setfacl").args(["-m", "u:4321:rx"]).arg(&f));
    chmod(&f, 0o4750);
    sh(Command::new("touch")
        .args(["-m", "-d", "2001-02-03 04:05:06.789"])
        .arg(&f));
    fs::create_dir(lower.join("dir")).unwrap();
    std::os::unix::fs::chown(lower.join("dir"), Some(42), Some(43)).unwrap();
    chmod(lower.join("dir"), 0o2711);
    write(lower.join("dir/inner"), b"x");
    let before = fs::metadata(&f).unwrap();
    let digest = layer_digest(&lower);

    let m = UnionMount::mount(&[&lower], Some(&upper), &s.mkdir("mnt"), &[]);
    // Open for writing without writing: a pure copy-up.
    drop(
        fs::OpenOptions::new()
            .append(true)
            .open(m.path("tool"))
            .unwrap(),
    );
    // Copy-up of the parent directory comes with a child's.
    fs::OpenOptions::new()
        .append(true)
        .open(m.path("dir/inner"))
        .unwrap()
        .write_all(b"y")
        .unwrap();

    let up = upper.join("tool");
    let after = fs::metadata(&up).unwrap();
    assert_eq!((after.uid(), after.gid()), (1234, 5678));
    assert_eq!(after.mode(), before.mode(), "mode incl. setuid");
    assert_eq!(
        (after.mtime(), after.mtime_nsec()),
        (before.mtime(), before.mtime_nsec())
    );
    assert_eq!(after.size(), before.size());
    assert!(
        after.blocks() * 512 < 1 << 20,
        "holes kept: {} blocks",
        after.blocks()
    );
    assert_eq!(
        user_xattrs(&up).get("user.note").map(|v| v.as_slice()),
        Some(&b"kept"[..])
    );
    let caps = xattrs_with_prefix(&up, "security.capability");
    assert_eq!(caps.len(), 1, "file capability copied");
    let acl = sh(Command::new("getfacl").arg("-c").arg(&up));
    assert!(String::from_utf8_lossy(&acl.stdout).contains("user:4321:r-x"));
    let d = fs::metadata(upper.join("dir")).unwrap();
    assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (42, 43, 0o2711));
    assert_eq!(fs::read(upper.join("dir/inner")).unwrap(), b"xy");
    let mut data = vec![0u8; 4];
    fs::File::open(m.path("tool"))
        .unwrap()
        .read_exact_at(&mut data, 32 << 20)
        .unwrap();
    assert_eq!(&data, b"tail");
    drop(m);
    assert_eq!(layer_digest(&lower), digest, "lower changed");
}

/// `-o passthrough=upper`: lower files are read through the daemon, and
/// descriptors opened before a copy-up follow it (as on kernel overlayfs
/// since 4.19).
#[test]
fn open_descriptors_and_mappings_follow_the_copy_up() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    write(lower.join("f"), &vec![b'L'; 8192]);
    write(lower.join("mapped"), &vec![b'M'; 8192]);
    let digest = layer_digest(&lower);
    let m = UnionMount::mount(
        &[&lower],
        Some(&upper),
        &s.mkdir("mnt"),
        &["-o", "passthrough=upper"],
    );

    let reader = fs::File::open(m.path("f")).unwrap();
    let mut buf = [0u8; 4];
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"LLLL");
    let writer = fs::OpenOptions::new()
        .write(true)
        .open(m.path("f"))
        .unwrap();
    writer.write_all_at(b"NEW!", 0).unwrap();
    drop(writer);
    reader.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(
        &buf, b"NEW!",
        "a descriptor opened before the copy-up sees new data"
    );

    // A shared mapping made before the copy-up sees writes made after it.
    let mapped = fs::File::open(m.path("mapped")).unwrap();
    let mapping = unionfs::sys::ReadMapping::new(&mapped).unwrap();
    assert_eq!(mapping.read(0..4), b"MMMM");
    fs::OpenOptions::new()
        .write(true)
        .open(m.path("mapped"))
        .unwrap()
        .write_all_at(b"abcd", 0)
        .unwrap();
    assert_eq!(
        mapping.read(0..4),
        b"abcd",
        "the mapping follows the copy-up"
    );
    drop((mapping, mapped));
    drop(m);
    assert_eq!(fs::read(upper.join("f")).unwrap()[..4], *b"NEW!");
    assert_eq!(layer_digest(&lower), digest, "lower changed");
}

#[test]
fn racing_writers_copy_up_once() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    write(lower.join("shared"), &vec![b'.'; 1 << 20]);
    let digest = layer_digest(&lower);
    let m = UnionMount::mount(&[&lower], Some(&upper), &s.mkdir("mnt"), &[]);
    let path = m.path("shared");
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
                f.write_all_at(&[b'0' + i; 16], i as u64 * 4096).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let data = fs::read(&path).unwrap();
    assert_eq!(data.len(), 1 << 20);
    for i in 0..8u8 {
        let at = i as usize * 4096;
        assert_eq!(&data[at..at + 16], &[b'0' + i; 16], "writer {i} lost");
    }
    assert_eq!(fs::read(upper.join("shared")).unwrap(), data);
    let work = s.path(".upper.unionfs-work/work");
    assert_eq!(
        fs::read_dir(&work).unwrap().count(),
        0,
        "work dir left with temp files"
    );
    drop(m);
    assert_eq!(layer_digest(&lower), digest, "lower changed");
}

#[test]
fn o_trunc_copies_metadata_only() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    let big = fs::File::create(lower.join("big")).unwrap();
    big.write_all_at(&vec![7u8; 1 << 20], 0).unwrap();
    big.set_len(256 << 20).unwrap();
    big.write_all_at(&vec![7u8; 1 << 20], 200 << 20).unwrap();
    drop(big);
    chmod(lower.join("big"), 0o600);
    let m = UnionMount::mount(&[&lower], Some(&upper), &s.mkdir("mnt"), &[]);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("big"))
        .unwrap();
    let up = fs::metadata(upper.join("big")).unwrap();
    assert_eq!(up.size(), 0);
    assert_eq!(up.mode() & 0o777, 0o600);
    f.write_all(b"fresh").unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("big")).unwrap(), b"fresh");
    assert_eq!(fs::metadata(lower.join("big")).unwrap().size(), 256 << 20);
}

#[test]
fn hard_links_to_lower_files_survive_a_remount() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    write(lower.join("orig"), b"data");
    let mnt = s.mkdir("mnt");
    let m = UnionMount::mount(&[&lower], Some(&upper), &mnt, &[]);
    fs::hard_link(m.path("orig"), m.path("link")).unwrap();
    let (a, b) = (
        fs::metadata(m.path("orig")).unwrap(),
        fs::metadata(m.path("link")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!((a.nlink(), b.nlink()), (2, 2));
    drop(m);
    let m = UnionMount::mount(&[&lower], Some(&upper), &mnt, &[]);
    let (a, b) = (
        fs::metadata(m.path("orig")).unwrap(),
        fs::metadata(m.path("link")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "after remount");
    assert_eq!((a.nlink(), b.nlink()), (2, 2), "after remount");
    fs::OpenOptions::new()
        .append(true)
        .open(m.path("link"))
        .unwrap()
        .write_all(b"+")
        .unwrap();
    assert_eq!(fs::read(m.path("orig")).unwrap(), b"data+");
}

#[test]
fn special_files_sync_and_fallocate() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    write(lower.join("f"), b"lower");
    let m = UnionMount::mount(&[&lower], Some(&upper), &s.mkdir("mnt"), &[]);
    nix::unistd::mkfifo(
        &m.path("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &m.path("sock"),
        nix::sys::stat::SFlag::S_IFSOCK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        0,
    )
    .unwrap();
    nix::sys::stat::mknod(
        &m.path("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        libc::makedev(1, 3),
    )
    .unwrap();
    let err = nix::sys::stat::mknod(
        &m.path("wh"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap_err();
    assert_eq!(err, nix::errno::Errno::EPERM, "a 0/0 device is a whiteout");
    assert_eq!(
        fs::metadata(upper.join("null")).unwrap().rdev(),
        libc::makedev(1, 3)
    );
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("f"))
        .unwrap();
    nix::fcntl::posix_fallocate(&f, 0, 1 << 20).unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    nix::unistd::sync();
    let d = fs::File::open(&m.mountpoint).unwrap();
    d.sync_all().unwrap();
    assert_eq!(nix::sys::stat::fstat(&f).unwrap().st_size, 1 << 20);
    drop((f, d));
    // Private xattrs cannot be set through the mount.
    let out = run(Command::new("setfattr")
        .args(["-n", "trusted.overlay.opaque", "-v", "y"])
        .arg(m.path("f")));
    assert!(!out.status.success());
}

#[test]
fn sigkill_during_copy_up_leaves_old_or_new_never_partial() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    let size: usize = 768 << 20;
    {
        let mut f = fs::File::create(lower.join("huge")).unwrap();
        let chunk = vec![0xabu8; 8 << 20];
        for _ in 0..size / chunk.len() {
            f.write_all(&chunk).unwrap();
        }
    }
    let mnt = s.mkdir("mnt");
    let m = UnionMount::mount(&[&lower], Some(&upper), &mnt, &[]);
    let pid = m.daemon_pid().expect("daemon pid");
    // The writer runs in a child process: its open is cut off when the
    // daemon dies, and must not take the test down with it.
    let mut writer = helper(HelperOp::OpenWrite, m.path("huge"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let work = s.path(".upper.unionfs-work/work");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::read_dir(&work).map(|d| d.count()).unwrap_or(0) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = writer.wait();
    drop(m);
    wait_until(|| !is_mounted(&mnt));

    let m = UnionMount::mount(&[&lower], Some(&upper), &mnt, &[]);
    assert_eq!(
        fs::read_dir(&work).unwrap().count(),
        0,
        "leftovers removed at mount"
    );
    match fs::metadata(upper.join("huge")) {
        Ok(meta) => assert_eq!(
            meta.len() as usize,
            size,
            "a copy-up in the upper is complete"
        ),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
    }
    let merged = fs::metadata(m.path("huge")).unwrap();
    assert_eq!(merged.len() as usize, size);
    assert_eq!(
        fs::metadata(lower.join("huge")).unwrap().len() as usize,
        size
    );
}

#[test]
fn whiteouts_and_opaque_dirs_in_the_upper_are_kernel_format() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    write(lower.join("file"), b"x");
    write(lower.join("dir/a"), b"a");
    write(lower.join("dir/b"), b"b");
    let m = UnionMount::mount(&[&lower], Some(&upper), &s.mkdir("mnt"), &[]);
    fs::remove_file(m.path("file")).unwrap();
    fs::remove_dir_all(m.path("dir")).unwrap();
    fs::create_dir(m.path("dir")).unwrap();
    write(m.path("dir/new"), b"n");
    // An upper-only file needs no whiteout.
    write(m.path("tmp"), b"t");
    fs::remove_file(m.path("tmp")).unwrap();
    drop(m);
    let wh = fs::symlink_metadata(upper.join("file")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&wh.file_type()) && wh.rdev() == 0);
    assert_eq!(
        xattrs_with_prefix(&upper.join("dir"), "trusted.overlay.opaque")
            .get("trusted.overlay.opaque")
            .map(|v| v.as_slice()),
        Some(&b"y"[..])
    );
    assert!(!upper.join("tmp").exists());
    assert_eq!(fs::read_dir(upper.join("dir")).unwrap().count(), 1);
}

#[test]
fn moving_lower_directories_uses_kernel_redirects() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    write(lower.join("src/tree/deep/file"), b"deep");
    write(lower.join("src/tree/top"), b"top");
    write(lower.join("other/x"), b"x");
    let digest = layer_digest(&lower);
    let mnt = s.mkdir("mnt");
    let m = UnionMount::mount(&[&lower], Some(&upper), &mnt, &[]);
    // Same directory, then across directories, then a child of a moved one.
    fs::rename(m.path("src/tree"), m.path("src/renamed")).unwrap();
    fs::rename(m.path("src/renamed"), m.path("other/moved")).unwrap();
    fs::rename(m.path("other/moved/deep"), m.path("deep-at-root")).unwrap();
    write(m.path("other/moved/added"), b"new");
    assert!(!m.path("src/tree").exists());
    assert_eq!(fs::read(m.path("other/moved/top")).unwrap(), b"top");
    assert_eq!(fs::read(m.path("deep-at-root/file")).unwrap(), b"deep");
    let tree = snapshot(&m.mountpoint);
    drop(m);
    let redirect = |p: &str| {
        xattrs_with_prefix(&upper.join(p), "trusted.overlay.redirect")
            .remove("trusted.overlay.redirect")
            .map(|v| String::from_utf8(v).unwrap())
    };
    assert_eq!(redirect("other/moved").as_deref(), Some("/src/tree"));
    assert_eq!(redirect("deep-at-root").as_deref(), Some("/src/tree/deep"));

    // unionfs again, and kernel overlayfs with redirect_dir=on, read the same tree.
    let m = UnionMount::mount(&[&lower], Some(&upper), &mnt, &[]);
    let diffs = diff_trees("before", &tree, "remounted", &snapshot(&m.mountpoint));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    drop(m);
    let kernel = KernelMount::mount(
        &[&lower],
        Some((&upper, &s.mkdir("kwork"))),
        &s.mkdir("kmnt"),
        "redirect_dir=on",
    );
    let diffs = diff_trees("unionfs", &tree, "kernel", &snapshot(&kernel.mountpoint));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    drop(kernel);
    assert_eq!(layer_digest(&lower), digest, "lower changed");
}

/// `-o userxattr` as root: the upper in the user namespace only, lower
/// directories answer EXDEV (so `mv` copies), and kernel overlayfs with
/// `userxattr` reads the result as unionfs showed it.
#[test]
fn userxattr_writes_user_namespace_markers_and_refuses_to_move_lower_dirs() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    write(lower.join("usr/sbin/tool"), b"t");
    write(lower.join("data/sub/f"), b"f");
    let digest = layer_digest(&lower);
    let mnt = s.mkdir("mnt");
    let m = UnionMount::mount(&[&lower], Some(&upper), &mnt, &["-o", "userxattr"]);
    fs::remove_dir_all(m.path("usr/sbin")).unwrap();
    fs::create_dir(m.path("usr/sbin")).unwrap();
    let err = fs::rename(m.path("data/sub"), m.path("data/moved")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
    sh(Command::new("mv")
        .arg(m.path("data/sub"))
        .arg(m.path("data/moved")));
    fs::create_dir(m.path("data/mine")).unwrap();
    fs::rename(m.path("data/mine"), m.path("data/mine2")).unwrap();
    let tree = snapshot(&m.mountpoint);
    drop(m);

    let sbin = upper.join("usr/sbin");
    assert_eq!(
        xattrs_with_prefix(&sbin, "user.overlay.opaque")
            .get("user.overlay.opaque")
            .map(|v| v.as_slice()),
        Some(&b"y"[..])
    );
    for dir in ["usr/sbin", "data/moved", "data/mine2"] {
        let trusted = xattrs_with_prefix(&upper.join(dir), "trusted.");
        assert!(trusted.is_empty(), "{dir}: {trusted:?}");
    }
    let kernel = KernelMount::mount(
        &[&lower],
        Some((&upper, &s.mkdir("kwork"))),
        &s.mkdir("kmnt"),
        "userxattr",
    );
    let diffs = diff_trees("unionfs", &tree, "kernel", &snapshot(&kernel.mountpoint));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    drop(kernel);
    assert_eq!(layer_digest(&lower), digest, "lower changed");
}

#[test]
fn a_listing_stays_sane_while_the_directory_changes() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    for i in 0..2000 {
        write(lower.join(format!("d/l{i:04}")), b"");
    }
    let m = UnionMount::mount(&[&lower], Some(&upper), &s.mkdir("mnt"), &[]);
    let mut names = std::collections::HashSet::new();
    let mut dir = fs::read_dir(m.path("d")).unwrap();
    for _ in 0..500 {
        names.insert(dir.next().unwrap().unwrap().file_name());
    }
    for i in 0..300 {
        write(m.path(&format!("d/new{i}")), b"");
        fs::remove_file(m.path(&format!("d/l{:04}", 1999 - i))).unwrap();
    }
    for entry in dir {
        let name = entry.unwrap().file_name();
        assert!(names.insert(name.clone()), "{name:?} listed twice");
    }
    // POSIX leaves it open whether names added or removed meanwhile show;
    // every name that stayed must, once.
    for i in 0..1700 {
        let name = std::ffi::OsString::from(format!("l{i:04}"));
        assert!(names.contains(&name), "{name:?} skipped");
    }
    assert!(names.len() <= 2300);
    assert_eq!(
        fs::read_dir(m.path("d")).unwrap().count(),
        2000,
        "a new listing sees the changes"
    );
}

#[test]
fn a_long_copy_up_does_not_block_other_files() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    {
        let mut f = fs::File::create(lower.join("huge")).unwrap();
        let chunk = vec![0x5au8; 8 << 20];
        for _ in 0..96 {
            f.write_all(&chunk).unwrap();
        }
    }
    for i in 0..50 {
        write(lower.join(format!("small/{i}")), b"s");
    }
    let m = UnionMount::mount(
        &[&lower],
        Some(&upper),
        &s.mkdir("mnt"),
        &["--threads", "2"],
    );
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let huge = m.path("huge");
    let copier = std::thread::spawn(move || {
        let started = Instant::now();
        drop(fs::OpenOptions::new().write(true).open(&huge).unwrap());
        started.elapsed()
    });
    std::thread::sleep(Duration::from_millis(20));
    let mut slowest = Duration::ZERO;
    let mut done = 0;
    while !copier.is_finished() && done < 50 {
        let t = Instant::now();
        let data = fs::read(m.path(&format!("small/{done}"))).unwrap();
        assert_eq!(data, b"s");
        slowest = slowest.max(t.elapsed());
        done += 1;
    }
    let copy_time = copier.join().unwrap();
    eprintln!("copy-up took {copy_time:?}; {done} reads meanwhile, slowest {slowest:?}");
    if done > 0 && copy_time > Duration::from_millis(200) {
        assert!(
            slowest < copy_time / 2,
            "reads waited for the copy-up: slowest {slowest:?}, copy-up {copy_time:?}"
        );
    }
}

/// The kernel leaves dropping set-id bits to unionfs (FUSE_HANDLE_KILLPRIV_V2,
/// so that it need not ask for security.capability before every write):
/// writes, truncations and O_TRUNC opens by an unprivileged caller, through
/// the daemon or passthrough, on lower and upper files, must end as they do
/// on kernel overlayfs; root keeps the bits; file capabilities go on write.
#[test]
fn set_id_bits_and_capabilities_drop_as_on_kernel_overlayfs() {
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    for case in ["write", "truncate", "otrunc", "rootwrite", "caps"] {
        for mode in ["4777", "2777", "6777", "2767"] {
            write(lower.join(format!("lower-{case}-{mode}")), b"lower data\n");
        }
    }
    let digest = layer_digest(&lower);
    let (expected, got) = on_kernel_then_unionfs(&s, &lower, "", set_id_cases);
    assert_eq!(got.lines().count(), 40, "{got}");
    assert!(expected.contains("new-write-4777 0o777 "), "{expected}");
    assert_eq!(
        got, expected,
        "unionfs (left) and kernel overlayfs (right) differ"
    );
    assert_eq!(layer_digest(&lower), digest, "lower changed");
}

/// Each case of `set_id_bits_and_capabilities_drop_as_on_kernel_overlayfs`
/// on the filesystem mounted at `root`, one line per file: its name, mode
/// (set-id bits and permissions, as Python's `oct`), size, and whether it
/// still has file capabilities. The unprivileged operations run in a helper
/// process as nobody (uid and gid 65534, no supplementary groups).
fn set_id_cases(root: &std::path::Path) -> String {
    use std::os::fd::AsFd;
    use unionfs::sys::{XattrTarget, list_xattr, set_xattr};
    // CAP_NET_RAW, permitted, effective (a VFS_CAP_REVISION_2 blob).
    let caps: Vec<u8> = [0x0200_0001u32, 1 << 13, 0, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let dir = nix::fcntl::open(
        root,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let as_nobody = |op: HelperOp, name: &str| {
        let out = helper_as_user_in(root, 65534, 65534, op, name);
        assert!(
            out.status.success(),
            "{op:?} {name} as nobody: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let append_x = |path: &std::path::Path| {
        fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap()
            .write_all(b"x")
            .unwrap();
    };
    let mut lines = String::new();
    for place in ["lower", "new"] {
        for case in ["write", "truncate", "otrunc", "rootwrite", "caps"] {
            for mode in [0o4777, 0o2777, 0o6777, 0o2767] {
                let name = format!("{place}-{case}-{mode:o}");
                let path = root.join(&name);
                if place == "new" {
                    fs::File::create(&path)
                        .unwrap()
                        .write_all(b"data\n")
                        .unwrap();
                }
                chmod(&path, mode);
                match case {
                    "caps" => {
                        set_xattr(
                            XattrTarget::Entry(dir.as_fd(), name.as_ref()),
                            c"security.capability",
                            &caps,
                            0,
                        )
                        .unwrap();
                        append_x(&path);
                    }
                    "write" => as_nobody(HelperOp::AppendX, &name),
                    "truncate" => as_nobody(HelperOp::Truncate2, &name),
                    "otrunc" => as_nobody(HelperOp::TruncateAndWriteX, &name),
                    _ => append_x(&path),
                }
                let names = list_xattr(XattrTarget::Entry(dir.as_fd(), name.as_ref())).unwrap();
                let has_caps = names
                    .split(|b| *b == 0)
                    .any(|n| n == b"security.capability");
                let meta = fs::metadata(&path).unwrap();
                lines.push_str(&format!(
                    "{name} {:#o} {} {}\n",
                    meta.mode() & 0o7777,
                    meta.size(),
                    if has_caps { "True" } else { "False" }
                ));
            }
        }
    }
    lines
}

/// By default lower files are read through the kernel's backing file (one
/// page cache for every mount of a layer). A writer while a reader holds
/// one gets the upper copy as a new node, through the VFS' retry of its
/// open after ESTALE: the writer and later readers see the new data, the
/// reader opened before keeps reading the lower file (kernel overlayfs
/// before 4.19 behaved so), and the lower layer is never written.
#[test]
fn a_writer_beside_a_passthrough_reader_gets_the_copy_up_and_the_reader_keeps_its_data() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    write(lower.join("dir/f"), b"original lower content\n");
    write(lower.join("dir/g"), b"to be truncated\n");
    write(lower.join("dir/h"), b"meta\n");
    let digest = layer_digest(&lower);
    let m = UnionMount::mount(&[&lower], Some(&upper), &s.mkdir("mnt"), &[]);
    let reader = fs::File::open(m.path("dir/f")).unwrap();
    let mut head = [0u8; 8];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head, b"original");
    let mapping = unionfs::sys::ReadMapping::new(&reader).unwrap();

    let writer = fs::OpenOptions::new()
        .write(true)
        .open(m.path("dir/f"))
        .unwrap();
    writer.write_all_at(b"CHANGED!", 0).unwrap();
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(
        &head, b"original",
        "the reader opened before keeps its data"
    );
    assert_eq!(mapping.read(0..8), b"original");
    assert_eq!(
        fs::read(m.path("dir/f")).unwrap(),
        b"CHANGED! lower content\n",
        "a reader opened after sees the change"
    );
    // Metadata changed through the old descriptor lands on the file.
    reader
        .set_permissions(fs::Permissions::from_mode(0o640))
        .unwrap();
    assert_eq!(fs::metadata(m.path("dir/f")).unwrap().mode() & 0o777, 0o640);
    drop((mapping, reader, writer));

    // Truncate by path and O_TRUNC beside a reader.
    let reader = fs::File::open(m.path("dir/g")).unwrap();
    reader.read_exact_at(&mut head, 0).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(m.path("dir/g"))
        .unwrap()
        .set_len(2)
        .unwrap();
    assert_eq!(fs::read(m.path("dir/g")).unwrap(), b"to");
    let reader_h = fs::File::open(m.path("dir/h")).unwrap();
    reader_h.read_exact_at(&mut head[..4], 0).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("dir/h"))
        .unwrap()
        .write_all(b"new")
        .unwrap();
    assert_eq!(fs::read(m.path("dir/h")).unwrap(), b"new");
    reader_h.read_exact_at(&mut head[..4], 0).unwrap();
    assert_eq!(&head[..4], b"meta");
    drop((reader, reader_h));
    drop(m);
    assert_eq!(
        fs::read(upper.join("dir/f")).unwrap(),
        b"CHANGED! lower content\n"
    );
    assert_eq!(
        fs::metadata(upper.join("dir/f")).unwrap().mode() & 0o777,
        0o640
    );
    assert_eq!(fs::read(upper.join("dir/g")).unwrap(), b"to");
    assert_eq!(fs::read(upper.join("dir/h")).unwrap(), b"new");
    assert_eq!(layer_digest(&lower), digest, "lower changed");
}

/// The kernel caches listings (FOPEN_CACHE_DIR): every change through the
/// mount must show in the next listing of each directory it touches, as on
/// kernel overlayfs.
#[test]
fn cached_listings_follow_every_change() {
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    for name in ["a/x", "a/y", "a/sub/z", "b/w", "c/v"] {
        write(lower.join(name), name.as_bytes());
    }
    type Step = fn(&std::path::Path);
    let steps: Vec<(&str, Step)> = vec![
        ("create", |m| write(m.join("a/new"), b"n")),
        ("unlink lower", |m| fs::remove_file(m.join("a/x")).unwrap()),
        ("recreate over whiteout", |m| write(m.join("a/x"), b"again")),
        ("rename within", |m| {
            fs::rename(m.join("a/y"), m.join("a/y2")).unwrap()
        }),
        ("rename across", |m| {
            fs::rename(m.join("a/y2"), m.join("b/y3")).unwrap()
        }),
        ("move dir", |m| {
            fs::rename(m.join("a/sub"), m.join("b/sub")).unwrap()
        }),
        ("rmdir lower", |m| fs::remove_dir_all(m.join("c")).unwrap()),
        ("mkdir over whiteout", |m| {
            fs::create_dir(m.join("c")).unwrap()
        }),
        ("symlink", |m| {
            std::os::unix::fs::symlink("x", m.join("a/link")).unwrap()
        }),
        ("hard link", |m| {
            fs::hard_link(m.join("b/w"), m.join("a/w-link")).unwrap()
        }),
        ("copy-up by chmod", |m| chmod(m.join("b/w"), 0o600)),
    ];
    let run = |root: &std::path::Path| {
        let list = |root: &std::path::Path| {
            ["", "a", "b", "b/sub", "c"]
                .iter()
                .map(|d| {
                    let mut names: Vec<String> = fs::read_dir(root.join(d))
                        .map(|it| {
                            it.map(|e| {
                                // A cached entry must still carry the
                                // object's inode number.
                                let e = e.unwrap();
                                let ino = fs::symlink_metadata(e.path()).unwrap().ino();
                                let mark = if e.ino() == ino { "" } else { "(stale d_ino)" };
                                format!("{}{mark}", e.file_name().to_string_lossy())
                            })
                            .collect()
                        })
                        .unwrap_or_default();
                    names.sort();
                    format!("{d}=[{}]", names.join(" "))
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut seen = vec![list(root)];
        for (name, step) in &steps {
            step(root);
            seen.push(format!("after {name}: {}", list(root)));
        }
        seen
    };
    let (expected, got) = on_kernel_then_unionfs(&s, &lower, "redirect_dir=on", run);
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e, "unionfs (left), kernel overlayfs (right)");
    }
}

/// The race: a reader opens a lower file while a writer's open is copying
/// it up. The reader may pin the lower file in the kernel; the writer must
/// then get the upper copy as a new node, never the lower file, and the
/// reader reads one of the two contents whole.
#[test]
fn a_writer_racing_a_passthrough_reader_never_gets_the_lower_file() {
    let s = Scratch::new();
    let (lower, upper) = layers(&s);
    let big = vec![b'l'; 256 << 20];
    write(lower.join("big"), &big);
    let digest = layer_digest(&lower);
    let m = UnionMount::mount(&[&lower], Some(&upper), &s.mkdir("mnt"), &[]);
    let path = m.path("big");
    let writer = {
        let path = path.clone();
        std::thread::spawn(move || {
            let file = fs::OpenOptions::new().write(true).open(&path)?;
            file.write_all_at(b"CHANGED", 0)?;
            Ok::<(), std::io::Error>(())
        })
    };
    // Open while the 256 MiB copy-up (and its fsync) is under way.
    std::thread::sleep(Duration::from_millis(30));
    let reader = fs::File::open(&path).unwrap();
    writer.join().unwrap().unwrap();
    let mut head = [0u8; 7];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert!(&head == b"CHANGED" || &head == b"lllllll", "{head:?}");
    let mut again = [0u8; 7];
    fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut again, 0)
        .unwrap();
    assert_eq!(&again, b"CHANGED", "a reader opened after the write");
    drop(reader);
    drop(m);
    assert_eq!(fs::read(upper.join("big")).unwrap()[..7], *b"CHANGED");
    assert_eq!(
        layer_digest(&lower),
        digest,
        "the writer reached the lower layer"
    );
}

/// The helper processes the tests above start (see `common::helper`).
#[test]
fn child_helper() {
    helper_main();
}
