//! unionfs mounted and unmounted by a user other than root: a plain user
//! through fusermount3 (with and without `user_allow_other` in
//! /etc/fuse.conf), and the root of a user namespace with mount(2).
//!
//! Each test runs on a thread of its own in a mount namespace of its own
//! (`in_private_namespace`), where /dev/fuse is a node every user may open
//! and /etc/fuse.conf a scratch file, both bound over the real ones, which
//! stay as they are (the setuid fusermount3 run there reads the scratch
//! file). /tmp and /run/user there are fresh tmpfs (the build tree, should
//! it be under /tmp, bound back in), so the per-user pid directories the
//! daemons make go with the namespace. Every mount has a guard that
//! unmounts it in Drop (lazily as a last resort) and stops its daemon, and
//! each test checks that its daemons are gone, so that the namespace and
//! its mounts end with the test.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{BIN, Scratch, process_gone, run_with_timeout, wait_until};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use unionfs::mountinfo::MountEntry;

const TIMEOUT: Duration = Duration::from_secs(60);

const NO_USER_ALLOW_OTHER: &str = "# user_allow_other - lets users ask for allow_other\n\
                                   #user_allow_other\n\
                                   mount_max = 1000\n";
const USER_ALLOW_OTHER: &str = "# comment\n  user_allow_other  # as a line of its own\n";

/// The user the tests mount as: `tests`, which scripts/test.sh creates.
#[derive(Clone, Copy)]
struct User {
    uid: u32,
    gid: u32,
}

fn test_user() -> User {
    let user = nix::unistd::User::from_name("tests")
        .expect("read the user database")
        .expect("user 'tests' (scripts/test.sh creates it)");
    User {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }
}

/// Runs `test` on a thread in a new mount namespace (see the top of the
/// file); its panic is this test's.
fn in_private_namespace(fuse_conf: &str, test: impl FnOnce() + Send + 'static) {
    let fuse_conf = fuse_conf.to_string();
    let thread = std::thread::spawn(move || {
        enter_private_namespace(&fuse_conf);
        test();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

fn enter_private_namespace(fuse_conf: &str) {
    // A thread may unshare its mount namespace (with its fs_struct); the
    // processes it starts get the same one.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make / private");
    // The build tree may be under /tmp (a clone there): it stays in sight,
    // bound back from the /tmp the tmpfs covers.
    let old_tmp = nix::fcntl::open(
        "/tmp",
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .expect("open /tmp");
    mount(
        Some("tmpfs"),
        "/tmp",
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=1777"),
    )
    .expect("tmpfs on /tmp");
    for kept in build_tree_under_tmp() {
        let inside = kept.strip_prefix("/tmp").unwrap();
        fs::create_dir_all(&kept).unwrap();
        let old = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&old_tmp)
        ))
        .join(inside);
        bind(&old, &kept);
    }
    drop(old_tmp);
    // Nor a login's runtime directory, should this machine have one.
    if Path::new("/run/user").is_dir() {
        mount(
            Some("tmpfs"),
            "/run/user",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        )
        .expect("tmpfs on /run/user");
    }
    let dev_fuse = Path::new("/tmp/.test-dev-fuse");
    nix::sys::stat::mknod(
        dev_fuse,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        nix::sys::stat::makedev(10, 229),
    )
    .expect("mknod /dev/fuse");
    fs::set_permissions(dev_fuse, fs::Permissions::from_mode(0o666)).unwrap();
    bind(dev_fuse, Path::new("/dev/fuse"));
    let conf = Path::new("/tmp/.test-fuse.conf");
    fs::write(conf, fuse_conf).unwrap();
    fs::set_permissions(conf, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(
        Path::new("/etc/fuse.conf").exists(),
        "/etc/fuse.conf is missing (the fuse3 package installs it)"
    );
    bind(conf, Path::new("/etc/fuse.conf"));
}

/// The top directories under /tmp holding the binary and the scratch
/// directories, if they are there.
fn build_tree_under_tmp() -> Vec<PathBuf> {
    let mut kept: Vec<PathBuf> = [BIN, env!("CARGO_TARGET_TMPDIR")]
        .iter()
        .filter_map(|path| {
            let first = Path::new(path)
                .strip_prefix("/tmp")
                .ok()?
                .components()
                .next()?;
            Some(Path::new("/tmp").join(first))
        })
        .collect();
    kept.dedup();
    kept
}

fn bind(source: &Path, target: &Path) {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("bind {source:?} over {target:?}: {e}"));
}

/// The topmost mount at `path` in this thread's namespace.
fn mount_here(path: &Path) -> Option<MountEntry> {
    mount_in("/proc/thread-self/mountinfo", path)
}

/// The topmost mount at `path` that process `pid` sees.
fn mount_seen_by(pid: i32, path: &Path) -> Option<MountEntry> {
    mount_in(&format!("/proc/{pid}/mountinfo"), path)
}

fn mount_in(mountinfo: &str, path: &Path) -> Option<MountEntry> {
    let text = fs::read_to_string(mountinfo).ok()?;
    unionfs::mountinfo::parse(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

/// Layers in a scratch directory everyone may enter; the upper and the
/// mountpoint, and the directory holding them, belong to `user`.
struct Layout {
    _s: Scratch,
    lower: PathBuf,
    upper: PathBuf,
    mnt: PathBuf,
    /// A directory of `user`'s, for its runtime directory and logs.
    home: PathBuf,
}

fn layout(user: User) -> Layout {
    let s = Scratch::new();
    fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let lower = s.mkdir("lower");
    common::write(lower.join("file"), b"lower data");
    let home = s.mkdir("user/home");
    let upper = s.mkdir("user/upper");
    let mnt = s.mkdir("user/mnt");
    for dir in [&s.path("user"), &home, &upper, &mnt] {
        std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid)).unwrap();
    }
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    Layout {
        lower: lower.canonicalize().unwrap(),
        upper: upper.canonicalize().unwrap(),
        mnt: mnt.canonicalize().unwrap(),
        home: home.canonicalize().unwrap(),
        _s: s,
    }
}

/// A command run as `user` (real and effective ids, its groups), without
/// root's runtime directory.
fn as_user(user: User, program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--init-groups")
        .arg("--")
        .arg(program)
        .env_remove("XDG_RUNTIME_DIR");
    cmd
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn succeeds(cmd: &mut Command) -> Output {
    let out = run_with_timeout(cmd, TIMEOUT);
    assert!(out.status.success(), "{cmd:?}: {}", output_text(&out));
    out
}

/// The pid the pid file in `dir` names for the daemon serving `mnt`.
fn pid_in(dir: &Path, mnt: &Path) -> Option<i32> {
    let text = fs::read_to_string(dir.join(unionfs::daemon::pid_file_name(mnt))).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// The per-user pid directory a daemon of `user` without a runtime
/// directory uses.
fn fallback_pid_dir(user: User) -> PathBuf {
    PathBuf::from(format!("/tmp/unionfs-{}", user.uid))
}

/// Stops a daemon this test started: SIGTERM, SIGKILL after 10 s.
fn stop_daemon(pid: i32) {
    if process_gone(pid) {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    for _ in 0..1000 {
        if process_gone(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// A mount `user` made through fusermount3 in this thread's namespace.
/// Drop unmounts it: `unionfs umount` as the user, then `fusermount3 -u -z`
/// as the user, then a lazy umount2 as root; and stops the daemon.
struct UserMount {
    user: User,
    mountpoint: PathBuf,
    daemon: Option<i32>,
}

impl UserMount {
    /// `unionfs mount` as `user`, with `XDG_RUNTIME_DIR` set to `runtime`
    /// if given; the daemon's pid from its pid file in `pid_dir`.
    fn mount(
        user: User,
        l: &Layout,
        runtime: Option<&Path>,
        pid_dir: &Path,
        extra: &[&str],
    ) -> UserMount {
        let mut cmd = mount_command(user, l, runtime, extra);
        let out = run_with_timeout(&mut cmd, TIMEOUT);
        // The guard exists before anything else is checked.
        let guard = UserMount {
            user,
            mountpoint: l.mnt.clone(),
            daemon: pid_in(pid_dir, &l.mnt),
        };
        assert!(out.status.success(), "mount failed: {}", output_text(&out));
        assert!(guard.daemon.is_some(), "no pid file in {pid_dir:?}");
        wait_until(|| mount_here(&guard.mountpoint).is_some_and(|m| m.fs_type == "fuse.unionfs"));
        guard
    }

    fn entry(&self) -> MountEntry {
        mount_here(&self.mountpoint).expect("mounted")
    }

    fn mounted(&self) -> bool {
        mount_here(&self.mountpoint).is_some()
    }
}

fn mount_command(user: User, l: &Layout, runtime: Option<&Path>, extra: &[&str]) -> Command {
    let mut cmd = as_user(user, BIN);
    cmd.arg("mount")
        .arg("--lower")
        .arg(&l.lower)
        .arg("--upper")
        .arg(&l.upper)
        .arg(&l.mnt)
        .args(extra);
    if let Some(runtime) = runtime {
        cmd.env("XDG_RUNTIME_DIR", runtime);
    }
    cmd
}

/// `unionfs mount` as `user`, for a test that expects it to fail; should
/// it mount after all, the guard returned takes it down.
fn mount_expecting_failure(user: User, l: &Layout, extra: &[&str]) -> (Output, UserMount) {
    let mut cmd = mount_command(user, l, None, extra);
    let out = run_with_timeout(&mut cmd, TIMEOUT);
    let guard = UserMount {
        user,
        mountpoint: l.mnt.clone(),
        daemon: pid_in(&fallback_pid_dir(user), &l.mnt),
    };
    (out, guard)
}

impl Drop for UserMount {
    fn drop(&mut self) {
        if self.mounted() {
            let out = run_with_timeout(
                as_user(self.user, BIN)
                    .arg("umount")
                    .args(["--timeout", "10"])
                    .arg(&self.mountpoint),
                TIMEOUT,
            );
            if !out.status.success() {
                eprintln!("unionfs umount failed: {}", output_text(&out));
            }
        }
        if self.mounted() {
            let _ = run_with_timeout(
                as_user(self.user, "fusermount3")
                    .args(["-u", "-z", "--"])
                    .arg(&self.mountpoint),
                TIMEOUT,
            );
        }
        if self.mounted() {
            let _ = umount2(&self.mountpoint, MntFlags::MNT_DETACH);
        }
        if let Some(pid) = self.daemon {
            stop_daemon(pid);
        }
    }
}

/// Drops `m`, and checks that nothing is left of its mount and daemon
/// after what its guard did.
fn drop_and_assert_cleaned_up(m: UserMount) {
    let (mnt, daemon) = (m.mountpoint.clone(), m.daemon);
    drop(m);
    assert!(mount_here(&mnt).is_none(), "{mnt:?} is still mounted");
    if let Some(pid) = daemon {
        wait_until(|| process_gone(pid));
    }
}

fn super_options(entry: &MountEntry) -> Vec<&str> {
    entry.super_options.split(',').collect()
}

#[test]
fn plain_user_mounts_for_itself_without_user_allow_other() {
    let user = test_user();
    let l = layout(user);
    in_private_namespace(NO_USER_ALLOW_OTHER, move || {
        let pid_dir = fallback_pid_dir(user);
        let m = UserMount::mount(user, &l, None, &pid_dir, &[]);
        let entry = m.entry();
        assert_eq!(entry.fs_type, "fuse.unionfs");
        let options = super_options(&entry);
        assert!(
            options.contains(&format!("user_id={}", user.uid).as_str()),
            "{options:?}"
        );
        assert!(!options.contains(&"allow_other"), "{options:?}");
        assert!(entry.mount_options.contains("nosuid"), "{entry:?}");

        // The owner reads and writes through it...
        let out = succeeds(as_user(user, "cat").arg(m.mountpoint.join("file")));
        assert_eq!(out.stdout, b"lower data");
        succeeds(as_user(user, "sh").arg("-c").arg(format!(
            "echo new > '{}'",
            m.mountpoint.join("new").display()
        )));
        let new = fs::metadata(l.upper.join("new")).unwrap();
        assert_eq!((new.uid(), new.gid()), (user.uid, user.gid));
        // ...and nobody else gets in, root included: no allow_other.
        let err = fs::metadata(m.mountpoint.join("file")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");

        // The pid file is in the user's own directory.
        let dir = fs::symlink_metadata(&pid_dir).unwrap();
        assert_eq!((dir.uid(), dir.mode() & 0o7777), (user.uid, 0o700));
        let daemon = m.daemon.unwrap();
        assert!(!process_gone(daemon));

        // `unionfs umount` as the user unmounts (through fusermount3) and
        // waits for the daemon.
        umount_as_user(m, None, &pid_dir);
    });
}

/// `unionfs umount` of `m` as its user (with `runtime` as its
/// XDG_RUNTIME_DIR): unmounted, the daemon gone before it returned, its pid
/// file in `pid_dir` removed, nothing left.
fn umount_as_user(m: UserMount, runtime: Option<&Path>, pid_dir: &Path) {
    let daemon = m.daemon.expect("a daemon");
    let mut cmd = as_user(m.user, BIN);
    if let Some(runtime) = runtime {
        cmd.env("XDG_RUNTIME_DIR", runtime);
    }
    succeeds(cmd.arg("umount").arg(&m.mountpoint));
    assert!(!m.mounted());
    assert!(
        process_gone(daemon),
        "umount returned before the daemon exited"
    );
    assert!(pid_in(pid_dir, &m.mountpoint).is_none(), "pid file left");
    drop_and_assert_cleaned_up(m);
}

#[test]
fn plain_user_gets_allow_other_with_user_allow_other() {
    let user = test_user();
    let l = layout(user);
    in_private_namespace(USER_ALLOW_OTHER, move || {
        // A runtime directory, as a login session has: the pid file goes there.
        let runtime = l.home.join("run");
        fs::create_dir(&runtime).unwrap();
        std::os::unix::fs::chown(&runtime, Some(user.uid), Some(user.gid)).unwrap();
        let pid_dir = runtime.join("unionfs");
        let m = UserMount::mount(user, &l, Some(&runtime), &pid_dir, &[]);
        let entry = m.entry();
        assert_eq!(entry.fs_type, "fuse.unionfs");
        assert!(super_options(&entry).contains(&"allow_other"), "{entry:?}");
        // Another user (root here) gets in.
        assert_eq!(fs::read(m.mountpoint.join("file")).unwrap(), b"lower data");

        // `unionfs umount` finds the pid file there and waits for the daemon.
        umount_as_user(m, Some(&runtime), &pid_dir);
    });
}

#[test]
fn allow_other_without_user_allow_other_says_what_is_missing() {
    let user = test_user();
    let l = layout(user);
    in_private_namespace(NO_USER_ALLOW_OTHER, move || {
        for option in ["allow_other", "allow_root"] {
            let (out, _guard) = mount_expecting_failure(user, &l, &["-o", option]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{option}: mounted: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "one message: {stderr:?}");
            assert!(
                stderr.contains("user_allow_other") && stderr.contains("/etc/fuse.conf"),
                "{option}: says what is missing: {stderr:?}"
            );
            assert!(mount_here(&l.mnt).is_none());
            assert!(pid_in(&fallback_pid_dir(user), &l.mnt).is_none());
        }
    });
}

#[test]
fn sigterm_unmounts_a_fusermount3_mount() {
    let user = test_user();
    let l = layout(user);
    in_private_namespace(NO_USER_ALLOW_OTHER, move || {
        let log = l.home.join("log");
        let log_arg = log.display().to_string();
        let m = UserMount::mount(
            user,
            &l,
            None,
            &fallback_pid_dir(user),
            &["--debug", "--log-file", &log_arg],
        );
        let daemon = m.daemon.unwrap();
        kill(Pid::from_raw(daemon), Signal::SIGTERM).unwrap();
        wait_until(|| process_gone(daemon));
        assert!(!m.mounted(), "the daemon exited and left its mount");
        let log_text = fs::read_to_string(&log).unwrap();
        assert!(log_text.contains("unmounting on signal"), "{log_text}");
        assert!(
            !log_text.contains("WARN") && !log_text.contains("ERROR"),
            "{log_text}"
        );
        // One unmount, through fusermount3: nothing after it.
        assert!(!log_text.contains("Unmounting"), "{log_text}");
        drop_and_assert_cleaned_up(m);
    });
}

#[test]
fn only_the_owner_unmounts_a_plain_users_mount() {
    let user = test_user();
    let l = layout(user);
    in_private_namespace(NO_USER_ALLOW_OTHER, move || {
        let m = UserMount::mount(user, &l, None, &fallback_pid_dir(user), &[]);
        let nobody = User {
            uid: 65534,
            gid: 65534,
        };
        let out = run_with_timeout(
            as_user(nobody, BIN).arg("umount").arg(&m.mountpoint),
            TIMEOUT,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("uid {} mounted it", user.uid)),
            "says whose it is: {stderr:?}"
        );
        assert!(m.mounted());

        // The owner may, `--lazy` too (fusermount3 -u -z): it detaches the
        // mount and returns, and the daemon exits on its own.
        succeeds(
            as_user(user, BIN)
                .args(["umount", "--lazy"])
                .arg(&m.mountpoint),
        );
        assert!(!m.mounted());
        let daemon = m.daemon.unwrap();
        wait_until(|| process_gone(daemon));
        drop_and_assert_cleaned_up(m);
    });
}

#[test]
fn missing_fusermount3_is_named() {
    let user = test_user();
    let l = layout(user);
    in_private_namespace(NO_USER_ALLOW_OTHER, move || {
        // Every place unionfs and the user's PATH would find it.
        for dir in ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
            for name in ["fusermount3", "fusermount"] {
                let path = Path::new(dir).join(name);
                if path.exists() {
                    bind(Path::new("/dev/null"), &path);
                }
            }
        }
        let (out, _guard) = mount_expecting_failure(user, &l, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mounted: {stderr}");
        assert!(
            stderr.contains("fusermount3") && stderr.contains("fuse3 package"),
            "says what is missing: {stderr:?}"
        );
        assert!(mount_here(&l.mnt).is_none());
    });
}

/// A mount made inside a user namespace, by its daemon `pid`. Drop
/// detaches it from root's side of that namespace (nsenter), and stops
/// the daemon; the namespace ends with it.
struct NamespaceMount {
    daemon: i32,
    mountpoint: PathBuf,
}

impl NamespaceMount {
    /// A command run as the namespace's root, in its mount namespace.
    fn inside(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.daemon.to_string(), "-U", "-m", "--", program])
            .env_remove("XDG_RUNTIME_DIR");
        cmd
    }

    fn mounted(&self) -> bool {
        mount_seen_by(self.daemon, &self.mountpoint).is_some()
    }
}

impl Drop for NamespaceMount {
    fn drop(&mut self) {
        if !process_gone(self.daemon) && self.mounted() {
            let _ = run_with_timeout(
                Command::new("nsenter")
                    .args(["-t", &self.daemon.to_string(), "-m", "--", "umount", "-l"])
                    .arg(&self.mountpoint),
                TIMEOUT,
            );
        }
        stop_daemon(self.daemon);
    }
}

#[test]
fn user_namespace_root_mounts_and_unmounts() {
    let user = test_user();
    let l = layout(user);
    in_private_namespace(NO_USER_ALLOW_OTHER, move || {
        // As `podman unshare` runs it: root of a user namespace that owns a
        // new mount namespace, where mount(2) of FUSE is allowed.
        let mut cmd = as_user(user, "unshare");
        cmd.args(["-Urm", "--", BIN, "mount", "--lower"])
            .arg(&l.lower)
            .arg("--upper")
            .arg(&l.upper)
            .arg(&l.mnt);
        let out = run_with_timeout(&mut cmd, TIMEOUT);
        // Its root is the user outside: the per-user directory is the
        // user's own.
        let pid_dir = fallback_pid_dir(user);
        let daemon = pid_in(&pid_dir, &l.mnt);
        assert!(out.status.success(), "mount failed: {}", output_text(&out));
        let m = NamespaceMount {
            daemon: daemon.expect("pid file"),
            mountpoint: l.mnt.clone(),
        };
        wait_until(|| {
            mount_seen_by(m.daemon, &m.mountpoint).is_some_and(|e| e.fs_type == "fuse.unionfs")
        });
        let entry = mount_seen_by(m.daemon, &m.mountpoint).unwrap();
        // The kernel lets only the namespace's processes in.
        assert!(super_options(&entry).contains(&"allow_other"), "{entry:?}");
        assert!(mount_here(&l.mnt).is_none(), "seen outside the namespace");
        assert_eq!(
            fs::symlink_metadata(&pid_dir).unwrap().uid(),
            user.uid,
            "pid directory"
        );

        let out = succeeds(m.inside("cat").arg(l.mnt.join("file")));
        assert_eq!(out.stdout, b"lower data");
        succeeds(
            m.inside("sh")
                .arg("-c")
                .arg(format!("echo new > '{}'", l.mnt.join("new").display())),
        );
        // Written by the namespace's root: the user outside.
        assert_eq!(fs::metadata(l.upper.join("new")).unwrap().uid(), user.uid);

        succeeds(m.inside(BIN).arg("umount").arg(&l.mnt));
        assert!(
            process_gone(m.daemon),
            "umount returned before the daemon exited"
        );
        assert!(pid_in(&pid_dir, &l.mnt).is_none(), "pid file left");
        drop(m);
        assert!(mount_here(&l.mnt).is_none());
    });
}
