//! The command line: both calling conventions, and every refused input
//! (a clear message, a non-zero exit, nothing mounted, layers untouched).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

struct Layout {
    s: Scratch,
    lower: PathBuf,
    upper: PathBuf,
    mnt: PathBuf,
}

fn layout() -> Layout {
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    write(lower.join("file"), b"lower data");
    let upper = s.mkdir("upper");
    let mnt = s.mkdir("mnt");
    Layout {
        s,
        lower,
        upper,
        mnt,
    }
}

/// Runs `unionfs ARGS`, expects failure naming `expected`, and checks that
/// nothing got mounted. Returns the message.
fn refused(args: &[&str], mountpoint: &Path, expected: &str) -> String {
    let out = run(Command::new(BIN).args(args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let _cleanup = UnionMount::adopt(mountpoint);
        panic!("{args:?} was accepted");
    }
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear message: {stderr:?}");
    assert!(!is_mounted(mountpoint), "{args:?} left a mount behind");
    stderr.into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `unionfs mount` of `l`'s lower and upper with `work` as the work dir.
fn mount_args_with_work<'a>(l: &'a Layout, work: &'a Path) -> [&'a str; 8] {
    [
        "mount",
        "--lower",
        p(&l.lower),
        "--upper",
        p(&l.upper),
        "--work",
        p(work),
        p(&l.mnt),
    ]
}

#[test]
fn version_and_help() {
    let out = sh(Command::new(BIN).arg("--version"));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("unionfs "));
    let out = sh(Command::new(BIN).arg("--help"));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("mount") && help.contains("umount") && help.contains("lowerdir"));
    let out = sh(Command::new(BIN).args(["mount", "--help"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--upper"));
}

#[test]
fn bad_layers_are_refused() {
    let l = layout();
    let mnt = p(&l.mnt);
    let missing = l.s.path("missing");
    refused(
        &["mount", "--lower", p(&missing), mnt],
        &l.mnt,
        "No such file or directory",
    );
    let file = l.lower.join("file");
    refused(
        &["mount", "--lower", p(&file), mnt],
        &l.mnt,
        "is not a directory",
    );
    refused(&["mount", "--lower", "", mnt], &l.mnt, "no lower layer");
    refused(&["-o", "upperdir=/tmp", mnt], &l.mnt, "no lower layer");
    refused(
        &["mount", "--lower", p(&l.lower), "--upper", p(&file), mnt],
        &l.mnt,
        "is not a directory",
    );
    refused(
        &["mount", "--lower", p(&l.lower), "--upper", p(&missing), mnt],
        &l.mnt,
        "upper layer",
    );
    refused(
        &["mount", "--lower", p(&l.lower), "--work", p(&l.upper), mnt],
        &l.mnt,
        "needs an upper layer",
    );
    refused(
        &["mount", "--lower", p(&l.lower), p(&missing)],
        &missing,
        "mountpoint",
    );
}

#[test]
fn overlapping_paths_are_refused() {
    let l = layout();
    let mnt = p(&l.mnt);
    let inside_mnt = l.mnt.join("x");
    fs::create_dir(&inside_mnt).unwrap();
    refused(
        &[
            "mount",
            "--lower",
            p(&l.lower),
            "--upper",
            p(&inside_mnt),
            mnt,
        ],
        &l.mnt,
        "inside the mountpoint",
    );
    refused(
        &["mount", "--lower", p(&inside_mnt), mnt],
        &l.mnt,
        "inside the mountpoint",
    );
    refused(&mount_args_with_work(&l, &inside_mnt), &l.mnt, "overlap");
    let mnt_in_lower = l.lower.join("mnt");
    fs::create_dir(&mnt_in_lower).unwrap();
    refused(
        &["mount", "--lower", p(&l.lower), p(&mnt_in_lower)],
        &mnt_in_lower,
        "inside lower layer",
    );
    let upper_in_lower = l.lower.join("upper");
    fs::create_dir(&upper_in_lower).unwrap();
    refused(
        &[
            "mount",
            "--lower",
            p(&l.lower),
            "--upper",
            p(&upper_in_lower),
            mnt,
        ],
        &l.mnt,
        "inside lower layer",
    );
    refused(
        &mount_args_with_work(&l, &l.upper.join("w")),
        &l.mnt,
        "overlap",
    );
    refused(
        &mount_args_with_work(&l, &l.lower.join("w")),
        &l.mnt,
        "overlap",
    );
    assert!(
        !l.lower.join("w").exists(),
        "a refused work dir was created in a lower"
    );
}

#[test]
fn unwritable_upper_and_foreign_work_dir_are_refused() {
    let l = layout();
    let mnt = p(&l.mnt);
    let ro = l.s.mkdir("ro-upper");
    let _ro_guard = read_only_bind(&l.upper, &ro);
    refused(
        &["mount", "--lower", p(&l.lower), "--upper", p(&ro), mnt],
        &l.mnt,
        "not writable",
    );

    let tmpfs = l.s.mkdir("tmpfs-work");
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&tmpfs));
    let _tmpfs_guard = Unmounter(tmpfs.clone());
    refused(
        &mount_args_with_work(&l, &tmpfs),
        &l.mnt,
        "not on the same filesystem",
    );
}

/// Binds `source` at `target` read-only, where even root may not write,
/// until the guard drops.
fn read_only_bind(source: &Path, target: &Path) -> Unmounter {
    sh(Command::new("mount").arg("--bind").arg(source).arg(target));
    let guard = Unmounter(target.to_path_buf());
    sh(Command::new("mount")
        .args(["-o", "remount,bind,ro"])
        .arg(target));
    guard
}

struct Unmounter(PathBuf);
impl Drop for Unmounter {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn missing_dev_fuse_is_refused() {
    let l = layout();
    // A private mount namespace with an empty /dev.
    let script = format!(
        "mount --make-rprivate / && mount -t tmpfs tmpfs /dev && exec {BIN} mount --lower {} {}",
        p(&l.lower),
        p(&l.mnt)
    );
    let out = run(Command::new("unshare").args(["-m", "sh", "-c", &script]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/dev/fuse"), "{stderr}");
    assert!(!is_mounted(&l.mnt));
}

#[test]
fn second_mount_on_the_same_mountpoint_is_refused() {
    let l = layout();
    let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &[]);
    let out = run(Command::new(BIN).args(["mount", "--lower", p(&l.lower), p(&l.mnt)]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already a unionfs mount"));
    assert_eq!(
        fs::read(m.path("file")).unwrap(),
        b"lower data",
        "first mount still serves"
    );
}

#[test]
fn default_work_dir_is_beside_the_upper() {
    let l = layout();
    let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &[]);
    assert!(l.s.path(".upper.unionfs-work").is_dir());
    assert!(!m.path(".upper.unionfs-work").exists());
}

/// A variable of the daemon's environment as /proc shows it.
fn daemon_env(m: &UnionMount, name: &str) -> Option<String> {
    let environ = fs::read(format!("/proc/{}/environ", m.daemon_pid().unwrap())).unwrap();
    let prefix = format!("{name}=");
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(prefix.as_bytes()))
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

/// `mount` runs itself again, once, with glibc's per-thread malloc cache
/// off (its freed blocks pin heap pages malloc_trim cannot return), and
/// leaves a cache size the caller chose alone. (glibc 2.36 shows only the
/// first of several tunables in /proc/PID/environ, so only a lone one is
/// compared.)
#[test]
fn the_daemon_runs_with_the_malloc_thread_cache_off() {
    let l = layout();
    for (given, restarted, shown) in [
        (None, true, Some("glibc.malloc.tcache_count=0")),
        (Some("glibc.malloc.mmap_threshold=200000"), true, None),
        (
            Some("glibc.malloc.tcache_count=3"),
            false,
            Some("glibc.malloc.tcache_count=3"),
        ),
    ] {
        let mut mount = Command::new(BIN);
        mount.args([
            "mount",
            "--lower",
            p(&l.lower),
            "--upper",
            p(&l.upper),
            p(&l.mnt),
        ]);
        match given {
            Some(value) => mount.env("GLIBC_TUNABLES", value),
            None => mount.env_remove("GLIBC_TUNABLES"),
        };
        assert!(sh(&mut mount).status.success());
        let m = UnionMount::adopt(&l.mnt);
        assert_eq!(fs::read(m.path("file")).unwrap(), b"lower data");
        let marker = daemon_env(&m, unionfs::daemon::RESTARTED_FOR_MALLOC);
        assert_eq!(marker.is_some(), restarted, "{given:?}");
        if let Some(shown) = shown {
            assert_eq!(daemon_env(&m, "GLIBC_TUNABLES").as_deref(), Some(shown));
        }
    }
}

#[test]
fn fuse_overlayfs_calling_convention() {
    let l = layout();
    let work = l.s.mkdir("work");
    // As podman's overlay.mount_program calls it, empty option included.
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},,volatile,context=\"system_u:object_r:container_file_t:s0\",frobnicate",
        p(&l.lower),
        p(&l.upper),
        p(&work)
    );
    let out = sh(Command::new(BIN).args(["-o", &opts, p(&l.mnt)]));
    assert!(out.status.success());
    let m = UnionMount::adopt(&l.mnt);
    assert_eq!(fs::read(m.path("file")).unwrap(), b"lower data");
    drop(m);

    // As mount.fuse calls it: SOURCE MOUNTPOINT -o OPTS.
    let opts = format!("rw,dev,suid,lowerdir={}", p(&l.lower));
    sh(Command::new(BIN).args(["mysource", p(&l.mnt), "-o", &opts]));
    let m = UnionMount::adopt(&l.mnt);
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|line| line.starts_with("mysource ") && line.contains(" fuse.unionfs "))
    );
    drop(m);
}

#[test]
fn mount_t_fuse_unionfs_and_umount() {
    let l = layout();
    // mount(8) runs helpers with a fixed PATH; make sure this build is on it.
    let installed = Path::new("/usr/local/bin/unionfs");
    let _link = if installed.exists() {
        None
    } else {
        std::os::unix::fs::symlink(BIN, installed).unwrap();
        Some(RemoveOnDrop(installed.to_path_buf()))
    };
    sh(Command::new("mount")
        .args(["-t", "fuse.unionfs", "unionfs"])
        .arg(&l.mnt)
        .args(["-o", &format!("lowerdir={}", p(&l.lower))]));
    let mut m = UnionMount::adopt(&l.mnt);
    assert_eq!(fs::read(m.path("file")).unwrap(), b"lower data");
    m.unmount();
    assert!(!is_mounted(&l.mnt));
    let out = run(Command::new(BIN).arg("umount").arg(&l.mnt));
    assert!(
        !out.status.success(),
        "umount of a plain directory must fail"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a unionfs mount"));
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn mountpoint_with_escaped_characters() {
    // mountinfo writes these as octal escapes; every reader must decode them
    // (mount refusal, umount, readahead, the test harness itself).
    let l = layout();
    let mnt = l.s.mkdir("mnt with space\\and\ttab");
    let mut m = UnionMount::mount(&[&l.lower], Some(&l.upper), &mnt, &[]);
    assert_eq!(fs::read(m.path("file")).unwrap(), b"lower data");
    let again = run(Command::new(BIN).args(["mount", "--lower", p(&l.lower), p(&mnt)]));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already a unionfs mount"));
    m.unmount();
    assert!(!is_mounted(&mnt));
}

#[test]
fn second_mount_of_the_same_upper_and_work_dir_is_refused() {
    let l = layout();
    let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &[]);
    let work = l.s.path(".upper.unionfs-work").canonicalize().unwrap();
    // What a copy-up in flight in the first daemon looks like.
    let in_flight = work.join("work").join("#1.0");
    fs::write(&in_flight, b"half copied").unwrap();

    let mnt2 = l.s.mkdir("mnt2");
    let out = run(Command::new(BIN).args([
        "mount",
        "--lower",
        p(&l.lower),
        "--upper",
        p(&l.upper),
        p(&mnt2),
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let _second = UnionMount::adopt(&mnt2);
        panic!("a second mount of the same upper and work dir was accepted");
    }
    assert!(
        stderr.contains(p(&work)) && stderr.contains("in use"),
        "the message names the work dir: {stderr:?}"
    );
    assert_eq!(stderr.lines().count(), 1, "one clear message: {stderr:?}");
    assert!(!is_mounted(&mnt2));
    assert!(in_flight.exists(), "the refused mount cleaned the work dir");

    // The first mount still reads and writes (copy-up goes through the work dir).
    assert_eq!(fs::read(m.path("file")).unwrap(), b"lower data");
    fs::write(m.path("file"), b"changed").unwrap();
    assert_eq!(fs::read(l.upper.join("file")).unwrap(), b"changed");

    // Once the first daemon is gone, the work dir is free again.
    drop(m);
    let m2 = UnionMount::mount(&[&l.lower], Some(&l.upper), &mnt2, &[]);
    assert_eq!(fs::read(m2.path("file")).unwrap(), b"changed");
    assert!(
        !in_flight.exists(),
        "leftovers are removed at the next mount"
    );
}

#[test]
fn detached_mount_reports_an_unwritable_log_file() {
    let l = layout();
    let ro = l.s.mkdir("ro-logs");
    let _ro_guard = read_only_bind(&ro, &ro);
    let log = ro.join("unionfs.log");
    let stderr = refused(
        &[
            "mount",
            "--lower",
            p(&l.lower),
            "--log-file",
            p(&log),
            p(&l.mnt),
        ],
        &l.mnt,
        "Read-only file system",
    );
    assert!(stderr.contains(p(&log)), "names the log file: {stderr:?}");
}

/// Layers and a mountpoint that user nobody may use, in a scratch
/// directory others may enter.
fn nobody_layout() -> (Layout, PathBuf, PathBuf) {
    let l = layout();
    let nobody_dir = l.s.mkdir("nobody");
    let upper = l.s.mkdir("nobody/upper");
    let mnt = l.s.mkdir("nobody/mnt");
    chmod(l.s.dir.path(), 0o755);
    for dir in [&nobody_dir, &upper, &mnt] {
        std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
    }
    (l, upper, mnt)
}

/// Runs `unionfs mount` as nobody in a private mount namespace whose /dev
/// holds only a /dev/fuse of mode `fuse_mode` and /dev/null: the real
/// /dev/fuse is left as it is, whatever its mode on this machine.
fn mount_as_nobody(fuse_mode: &str, lower: &Path, upper: &Path, mnt: &Path) -> String {
    let script = format!(
        "mount --make-rprivate / && mount -t tmpfs tmpfs /dev && \
         mknod -m {fuse_mode} /dev/fuse c 10 229 && mknod -m 666 /dev/null c 1 3 && \
         exec setpriv --reuid=65534 --regid=65534 --clear-groups {BIN} mount --lower {} --upper {} {}",
        p(lower),
        p(upper),
        p(mnt)
    );
    let out = run(Command::new("unshare").args(["-m", "sh", "-c", &script]));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "nobody could mount: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear message: {stderr:?}");
    assert!(!stderr.contains("exited before"), "{stderr:?}");
    assert!(!is_mounted(mnt));
    stderr
}

#[test]
fn detached_mount_reports_an_inaccessible_dev_fuse() {
    let (l, upper, mnt) = nobody_layout();
    let stderr = mount_as_nobody("600", &l.lower, &upper, &mnt);
    assert!(
        stderr.contains("/dev/fuse") && stderr.contains("Permission denied"),
        "the real reason: {stderr:?}"
    );
    assert!(stderr.contains("mount as root"), "what to do: {stderr:?}");
}

#[test]
fn invalid_option_values_are_refused() {
    let l = layout();
    let mnt = p(&l.mnt);
    let lower = p(&l.lower);
    for (opts, expected) in [
        ("threads=0", "threads=0"),
        ("threads=-2", "threads=-2"),
        ("threads=many", "threads=many"),
        ("threads", "needs a value"),
        ("passthrough=some", "passthrough=some"),
        ("ro=yes", "takes no value"),
        ("upperdir=", "needs a value"),
        ("uidmapping=0:1000", "triples"),
        ("gidmapping=0:1000:0", "empty"),
        ("uidmapping=0:100:10:5:200:10", "overlap"),
        ("squash_to_uid=x", "squash_to_uid=x"),
        ("static_nlink=1", "takes no value"),
    ] {
        refused(
            &["mount", "--lower", lower, mnt, "-o", opts],
            &l.mnt,
            expected,
        );
        // The mount-helper form (fstab, podman) goes through the same checks.
        let helper = format!("lowerdir={lower},{opts}");
        refused(&["-o", &helper, mnt], &l.mnt, expected);
    }
    for threads in ["0", "x"] {
        let out =
            run(Command::new(BIN).args(["mount", "--lower", lower, "--threads", threads, mnt]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            let _cleanup = UnionMount::adopt(&l.mnt);
            panic!("--threads {threads} was accepted");
        }
        assert!(stderr.contains("--threads"), "{stderr}");
        assert!(!is_mounted(&l.mnt));
    }
}

#[test]
fn ignored_options_are_warned_about_on_stderr() {
    let l = layout();
    let out = sh(Command::new(BIN).args([
        "mount",
        "--lower",
        p(&l.lower),
        p(&l.mnt),
        "-o",
        "frobnicate,uidmapping=0:1000:1,noatime",
    ]));
    let m = UnionMount::adopt(&l.mnt);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("frobnicate"), "{stderr:?}");
    assert!(
        !stderr.contains("noatime") && !stderr.contains("uidmapping"),
        "noatime and uidmapping need no warning: {stderr:?}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    drop(m);

    // What podman's overlay.mount_program passes is taken without a word.
    let work = l.s.mkdir("work");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},,volatile,context=\"system_u:object_r:container_file_t:s0:c1,c2\",nodev,fsync=0",
        p(&l.lower),
        p(&l.upper),
        p(&work)
    );
    let out = sh(Command::new(BIN).args(["-o", &opts, p(&l.mnt)]));
    let m = UnionMount::adopt(&l.mnt);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert_eq!(fs::read(m.path("file")).unwrap(), b"lower data");
}

/// A process the test started, killed by its PID when the test ends however
/// it ends; then waits for a daemon to follow, and kills it (by PID) if it
/// does not, so no daemon outlives the test.
struct Busy {
    child: std::process::Child,
    daemon: i32,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !process_gone(self.daemon) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !process_gone(self.daemon) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.daemon),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[test]
fn lazy_umount_of_a_busy_mount_returns_at_once() {
    let l = layout();
    let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &[]);
    let daemon = m.daemon_pid().expect("daemon pid");
    let busy = Busy {
        child: Command::new("sleep")
            .arg("60")
            .current_dir(&m.mountpoint)
            .spawn()
            .unwrap(),
        daemon,
    };

    let started = Instant::now();
    let out = run(Command::new(BIN).args(["umount", "--lazy", "--timeout", "5", p(&l.mnt)]));
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "umount --lazy failed after {took:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(2), "umount --lazy took {took:?}");
    assert!(!is_mounted(&l.mnt));
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(p(&l.mnt)), "still in /proc/mounts");

    // The daemon serves the detached tree while it is in use, and exits
    // once its last user goes.
    assert!(!process_gone(daemon), "the daemon left a busy mount");
    drop(busy);
    assert!(process_gone(daemon), "the daemon outlived its last user");
    drop(m);
}

/// A process the test started (a foreground daemon, a sleeper): killed by
/// its PID if the test ends before it exits.
struct Started(std::process::Child);

impl Drop for Started {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn logs_carry_no_colour_codes_in_files_or_pipes() {
    let l = layout();
    let busy_work = |m: &UnionMount| {
        fs::write(m.path("file"), b"copied up").unwrap();
        fs::write(m.path("new"), b"new").unwrap();
        fs::remove_file(m.path("file")).unwrap();
        assert!(fs::read(m.path("missing")).is_err());
        assert_eq!(fs::read_dir(&m.mountpoint).unwrap().count(), 1);
    };
    let assert_debug_log_without_colour = |logged: &[u8]| {
        assert!(
            logged.len() > 100,
            "a debug log: {}",
            String::from_utf8_lossy(logged)
        );
        let escapes = logged.iter().filter(|b| **b == 0x1b).count();
        assert_eq!(escapes, 0, "{}", String::from_utf8_lossy(logged));
    };

    let log = l.s.path("unionfs.log");
    let m = UnionMount::mount(
        &[&l.lower],
        Some(&l.upper),
        &l.mnt,
        &["--debug", "--log-file", p(&log)],
    );
    busy_work(&m);
    drop(m);
    assert_debug_log_without_colour(&fs::read(&log).unwrap());

    // A foreground daemon logging into a pipe.
    let upper = l.s.mkdir("upper-2");
    let mut daemon = Started(
        Command::new(BIN)
            .args(["mount", "--foreground", "--debug", "--lower", p(&l.lower)])
            .args(["--upper", p(&upper), p(&l.mnt)])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut pipe = daemon.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut pipe, &mut out);
        out
    });
    let m = UnionMount::adopt(&l.mnt);
    busy_work(&m);
    drop(m);
    wait_until(|| daemon.0.try_wait().unwrap().is_some());
    assert_debug_log_without_colour(&reader.join().unwrap());
}

fn sigkill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(|| process_gone(pid));
}

#[test]
fn umount_and_mount_after_the_daemon_was_killed() {
    let l = layout();
    let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &[]);
    let pid_file = unionfs::daemon::pid_file_for(&m.mountpoint);
    sigkill(m.daemon_pid().expect("daemon pid"));
    assert!(pid_file.exists());
    let dead = fs::metadata(&m.mountpoint).expect_err("a mount without its daemon");
    assert!(unionfs::daemon::is_dead_fuse_mount(&dead), "{dead}");

    // A new mount there says what is wrong and what to do.
    let stderr = refused(
        &["mount", "--lower", p(&l.lower), p(&l.mnt)],
        &l.s.path("never-mounted"),
        "unionfs umount",
    );
    assert!(stderr.contains(p(&m.mountpoint)), "{stderr}");

    let out = run(Command::new(BIN).args(["umount", "--timeout", "5", p(&l.mnt)]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&l.mnt));
    assert!(!pid_file.exists(), "the dead daemon's pid file is left");

    let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &[]);
    assert_eq!(fs::read(m.path("file")).unwrap(), b"lower data");
}

#[test]
fn umount_ignores_a_pid_file_naming_another_process() {
    let l = layout();
    // A process that may get a dead daemon's pid.
    let other = Started(Command::new("sleep").arg("60").spawn().unwrap());
    let other_pid = other.0.id() as i32;
    // Pid files as this and as earlier versions write them.
    for record in [format!("{other_pid} 1\n"), format!("{other_pid}\n")] {
        let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &[]);
        let pid_file = unionfs::daemon::pid_file_for(&m.mountpoint);
        sigkill(m.daemon_pid().expect("daemon pid"));
        fs::write(&pid_file, &record).unwrap();
        assert!(m.daemon_pid().is_none(), "{record:?} names no daemon");

        let started = Instant::now();
        let out = run(Command::new(BIN).args(["umount", "--timeout", "5", p(&l.mnt)]));
        let took = started.elapsed();
        assert!(
            out.status.success(),
            "{record:?}: after {took:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(took < Duration::from_secs(2), "{record:?}: waited {took:?}");
        assert!(!is_mounted(&l.mnt));
        assert!(!pid_file.exists(), "{record:?}: the stale pid file is left");
        assert!(!process_gone(other_pid), "the other process was touched");
    }
}
