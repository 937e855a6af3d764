//! FUSE over io_uring (src/fuse/ring.rs): where the kernel offers it, a
//! default mount serves its requests over per-CPU rings; with `noio_uring`,
//! or with the kernel's `fuse.enable_uring` off, it keeps to /dev/fuse.
//! Results are compared with kernel overlayfs.
//!
//! `fuse.enable_uring` is the machine's: see `UringParam`.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

/// The daemon's threads serving rings, with the context switches each has
/// made (one per request it slept for, at least).
type RingThreads = Vec<(String, u64)>;

fn ring_threads(pid: i32) -> RingThreads {
    let mut threads = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("fuse-ring-") {
            continue;
        }
        let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.ends_with("ctxt_switches"))
            .map(|(_, v)| v.trim().parse::<u64>().unwrap())
            .sum();
        threads.push((comm.trim().to_string(), switches));
    }
    threads.sort();
    threads
}

fn lower_tree(s: &Scratch) -> std::path::PathBuf {
    let lower = s.mkdir("lower");
    fs::create_dir_all(lower.join("dir/sub")).unwrap();
    write(lower.join("dir/sub/kept"), b"kept");
    write(lower.join("dir/gone"), b"gone");
    write(lower.join("appended"), b"lower data\n");
    write(lower.join("big"), &vec![7u8; 3 << 20]);
    symlink("dir/sub/kept", lower.join("link"));
    lower
}

/// A bit of everything: creates, large and small writes, copy-ups, a
/// whiteout, renames, xattrs, modes, a listing of a hundred entries.
fn exercise(mnt: &Path) {
    let many = mnt.join("many");
    fs::create_dir(&many).unwrap();
    for i in 0..100 {
        write(many.join(format!("f{i}")), format!("file {i}").as_bytes());
    }
    assert_eq!(fs::read_dir(&many).unwrap().count(), 100);
    fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("appended"))
        .unwrap()
        .write_all(b"upper data\n")
        .unwrap();
    // Larger than a ring entry's payload would be if it were sized wrong.
    write(mnt.join("written"), &vec![3u8; 5 << 20]);
    fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("big"))
        .unwrap()
        .write_all(b"head")
        .unwrap();
    fs::remove_file(mnt.join("dir/gone")).unwrap();
    fs::rename(mnt.join("dir/sub/kept"), mnt.join("moved")).unwrap();
    fs::rename(many.join("f1"), many.join("renamed")).unwrap();
    set_xattr(mnt.join("moved"), "user.note", "over the ring");
    fs::set_permissions(mnt.join("written"), fs::Permissions::from_mode(0o640)).unwrap();
    symlink("moved", mnt.join("new-link"));
    sh(Command::new("rm").arg("-rf").arg(many.join("f2")));
}

/// Runs `exercise` on kernel overlayfs and on unionfs (mounted with
/// `options`) over the same lower, compares the merged trees and the
/// uppers, and returns the daemon's ring threads before and after.
fn compare_with_kernel(options: &[&str]) -> (RingThreads, RingThreads) {
    let s = Scratch::new();
    let lower = lower_tree(&s);
    let kernel_upper = s.mkdir("kernel-upper");
    let kernel = KernelMount::mount(
        &[&lower],
        Some((&kernel_upper, &s.mkdir("kernel-work"))),
        &s.mkdir("kernel-mnt"),
        "",
    );
    exercise(&kernel.mountpoint);
    let expected = snapshot(&kernel.mountpoint);
    drop(kernel);

    let upper = s.mkdir("upper");
    let mut m = UnionMount::mount(&[&lower], Some(&upper), &s.mkdir("mnt"), options);
    let pid = m.daemon_pid().expect("daemon pid");
    let before = ring_threads(pid);
    exercise(&m.mountpoint);
    let after = ring_threads(pid);
    let got = snapshot(&m.mountpoint);
    let diffs = diff_trees("kernel overlayfs", &expected, "unionfs", &got);
    assert!(
        diffs.is_empty(),
        "merged trees differ:\n{}",
        diffs.join("\n")
    );
    m.unmount();
    // The ring threads end with the connection, and the daemon with them.
    wait_until(|| process_gone(pid));
    // Kernel overlayfs links its whiteouts to one shared whiteout in the
    // work directory; the link count is all that differs.
    let upper_tree = |root: &Path| {
        let mut tree = snapshot(root);
        for entry in tree.values_mut().filter(|e| e.kind == "chardev") {
            entry.nlink = 1;
        }
        tree
    };
    let diffs = diff_trees(
        "kernel upper",
        &upper_tree(&kernel_upper),
        "unionfs upper",
        &upper_tree(&upper),
    );
    assert!(diffs.is_empty(), "uppers differ:\n{}", diffs.join("\n"));
    (before, after)
}

#[test]
fn a_default_mount_serves_over_io_uring_where_the_kernel_offers_it() {
    let _param = UringParam::set(true);
    let (before, after) = compare_with_kernel(&[]);
    assert!(
        before.len() >= unionfs::sys::fuse_ring::queue_count().unwrap(),
        "a ring thread per CPU at least: {before:?}"
    );
    let woken = |threads: &RingThreads| threads.iter().map(|t| t.1).sum::<u64>();
    // Requests over /dev/fuse never wake a ring thread.
    assert!(
        woken(&after) - woken(&before) >= 200,
        "100 creates and a listing of them woke the ring threads {} times: {before:?} -> {after:?}",
        woken(&after) - woken(&before)
    );
}

/// Without passthrough, file data goes through the daemon: WRITE requests
/// and READ replies of up to max_write fill the ring entries' payloads.
#[test]
fn data_through_the_daemon_fits_the_ring_entries() {
    let _param = UringParam::set(true);
    let (before, after) = compare_with_kernel(&["-o", "nopassthrough"]);
    assert!(!before.is_empty(), "served over io_uring");
    assert!(
        after.iter().map(|t| t.1).sum::<u64>() > before.iter().map(|t| t.1).sum::<u64>() + 100,
        "{before:?} -> {after:?}"
    );
}

#[test]
fn noio_uring_keeps_to_dev_fuse() {
    let _param = UringParam::set(true);
    let (before, after) = compare_with_kernel(&["-o", "noio_uring"]);
    assert!(
        before.is_empty() && after.is_empty(),
        "{before:?} {after:?}"
    );
}

#[test]
fn with_the_kernel_side_off_a_mount_uses_dev_fuse() {
    let _param = UringParam::set(false);
    let (before, after) = compare_with_kernel(&[]);
    assert!(
        before.is_empty() && after.is_empty(),
        "{before:?} {after:?}"
    );
}

#[test]
fn where_io_uring_is_not_allowed_a_mount_uses_dev_fuse() {
    let _param = UringParam::set(true);
    // 2: io_uring_setup fails for every process; the kernel's FUSE still
    // offers the transport at INIT.
    let _disabled = KernelParam::set("/proc/sys/kernel/io_uring_disabled", "2");
    let (before, after) = compare_with_kernel(&[]);
    assert!(
        before.is_empty() && after.is_empty(),
        "{before:?} {after:?}"
    );
}

#[test]
fn a_killed_daemon_leaves_no_hanging_requests() {
    let _param = UringParam::set(true);
    let s = Scratch::new();
    let lower = lower_tree(&s);
    let mut m = UnionMount::mount(&[&lower], Some(&s.mkdir("upper")), &s.mkdir("mnt"), &[]);
    let pid = m.daemon_pid().expect("daemon pid");
    assert!(!ring_threads(pid).is_empty(), "served over io_uring");
    assert_eq!(fs::read(m.path("appended")).unwrap(), b"lower data\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(|| process_gone(pid));
    // Requests after the daemon died fail at once instead of
    // waiting for rings nobody serves; the stat runs in a child so that a
    // hang fails the test instead of blocking it.
    let out = run_with_timeout(
        Command::new("stat").arg(m.path("dir")),
        std::time::Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        // ENOTCONN or ECONNABORTED, as over /dev/fuse, or ECANCELED from
        // the rings the kernel tore down.
        ["not connected", "connection abort", "canceled"]
            .iter()
            .any(|e| stderr.contains(e)),
        "{stderr}"
    );
    m.unmount();
    assert!(!is_mounted(&m.mountpoint));
}
