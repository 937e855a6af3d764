//! Rootless podman and buildah: the unprivileged user `tests` (with
//! subordinate uid and gid ranges) runs them in a private mount and pid
//! namespace, where a 0666 FUSE device node of our own is bind-mounted
//! over /dev/fuse (the real one is never touched), each store with its own
//! root, runroot, runtime dir and HOME in a scratch directory.
//!
//! Every process a session starts lives in its pid namespace, so closing
//! the session (after `system reset` of each store) ends them all: the
//! rootless pause process, conmon, and the mount program daemons with
//! the mounts only their namespaces could see.

use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::{run, run_with_timeout, sh};

/// The user CI creates (scripts/test.sh) and its subordinate ranges.
pub const USER: &str = "tests";
const SUBID_RANGE: &str = "100000-165535";
/// One podman or buildah command: builds run several containers.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

const PROGRAMS: [&str; 9] = [
    "podman",
    "buildah",
    "runc",
    "newuidmap",
    "newgidmap",
    "catatonit",
    "nsenter",
    "setpriv",
    "usermod",
];

fn installed(program: &str) -> bool {
    run(Command::new("sh").args(["-c", &format!("command -v {program}")]))
        .status
        .success()
}

/// The user's uid and gid, after making sure of its subordinate ranges
/// (`usermod --add-subuids/--add-subgids` when missing: a machine set up
/// by hand may lack them) and of the programs rootless podman needs.
/// Panics with what is missing.
fn prepare_user() -> (u32, u32) {
    let missing: Vec<_> = PROGRAMS.into_iter().filter(|p| !installed(p)).collect();
    assert!(
        missing.is_empty(),
        "rootless podman tests need {missing:?} (scripts/test.sh installs podman, buildah, \
         uidmap, catatonit, runc, util-linux, passwd)"
    );
    // Two tests may get here at once: one usermod at a time.
    static USERMOD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = USERMOD.lock().unwrap_or_else(|e| e.into_inner());
    for (file, flag) in [
        ("/etc/subuid", "--add-subuids"),
        ("/etc/subgid", "--add-subgids"),
    ] {
        let ranges = std::fs::read_to_string(file).unwrap_or_default();
        if !ranges.lines().any(|l| l.starts_with(&format!("{USER}:"))) {
            sh(Command::new("usermod").args([flag, SUBID_RANGE, USER]));
        }
    }
    let uid = super::rootless_user();
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .expect("getpwuid")
        .expect("user tests");
    (uid, user.gid.as_raw())
}

/// A private mount and pid namespace with a usable /dev/fuse, and a
/// scratch directory for the user's stores.
pub struct Session {
    pub dir: tempfile::TempDir,
    pub uid: u32,
    pub gid: u32,
    /// `unshare ... catatonit -- sh`: pid 1 of the namespace is catatonit
    /// (it reaps what podman orphans); the shell under it waits for its
    /// standard input to close.
    holder: Option<Child>,
    holder_stdin: Option<ChildStdin>,
    /// `pid:[N]`, to tell when no process is left in the namespace.
    pid_ns: String,
    /// Each store's directory and mount program, for the reset.
    stores: RefCell<Vec<(PathBuf, Option<PathBuf>)>>,
}

impl Session {
    pub fn new() -> Session {
        let (uid, gid) = prepare_user();
        // Not under the build tree: the user must reach it, and podman
        // wants the runroot path short.
        let dir = tempfile::Builder::new()
            .prefix("ufs-rl-")
            .tempdir_in("/var/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut s = Session {
            dir,
            uid,
            gid,
            holder: None,
            holder_stdin: None,
            pid_ns: String::new(),
            stores: RefCell::new(Vec::new()),
        };
        for d in ["home", "xdg", "work"] {
            s.user_dir(d);
        }
        std::fs::set_permissions(s.path("xdg"), std::fs::Permissions::from_mode(0o700)).unwrap();
        // The user must be able to run the mount program, wherever the
        // build tree is.
        let bin = s.path("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::copy(super::BIN, bin.join("unionfs")).unwrap();

        let fuse = s.path("fuse");
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--pid", "--fork"])
            .args([
                "--kill-child",
                "--mount-proc",
                "catatonit",
                "--",
                "sh",
                "-c",
            ])
            .arg(
                "mknod \"$1\" c 10 229 && chmod 666 \"$1\" && mount --bind \"$1\" /dev/fuse \
                 && echo ready && read _",
            )
            .arg("sh")
            .arg(&fuse)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn unshare");
        s.holder_stdin = holder.stdin.take();
        let stdout = holder.stdout.take().unwrap();
        let pid = holder.id();
        s.holder = Some(holder);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let ready = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        if ready.trim() != "ready" {
            let mut holder = s.holder.take().unwrap();
            let _ = holder.kill();
            let out = holder.wait_with_output().unwrap();
            panic!(
                "the private namespace with a 0666 /dev/fuse could not be set up: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        s.pid_ns = std::fs::read_link(format!("/proc/{pid}/ns/pid_for_children"))
            .unwrap()
            .to_string_lossy()
            .into_owned();
        s
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Creates `rel` owned by the user.
    pub fn user_dir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).unwrap();
        nix::unistd::chown(
            &p,
            Some(nix::unistd::Uid::from_raw(self.uid)),
            Some(nix::unistd::Gid::from_raw(self.gid)),
        )
        .unwrap();
        p
    }

    /// Gives a file the test wrote to the user.
    pub fn give(&self, path: &Path) {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(self.uid)),
            Some(nix::unistd::Gid::from_raw(self.gid)),
        )
        .unwrap();
    }

    /// The copy of the unionfs binary the user can run.
    pub fn unionfs(&self) -> PathBuf {
        self.path("bin/unionfs")
    }

    /// `program` as the user, inside the namespace, in `work/`, with a
    /// clean environment.
    pub fn cmd(&self, program: &str) -> Command {
        let pid = self.holder.as_ref().expect("session closed").id();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{pid}/ns/mnt"))
            .arg(format!("--pid=/proc/{pid}/ns/pid_for_children"))
            .args(["--", "setpriv"])
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .args(["--init-groups", "env", "-i", "-C"])
            .arg(self.path("work"))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin")
            .arg(format!("HOME={}", self.path("home").display()))
            .arg(format!("XDG_RUNTIME_DIR={}", self.path("xdg").display()))
            .arg(format!("USER={USER}"))
            .arg(format!("LOGNAME={USER}"))
            .arg(program);
        cmd
    }

    /// A store `name` of this session, with `mount_program` for the
    /// overlay driver (None: the kernel's overlayfs in the user namespace).
    pub fn store(&self, name: &str, mount_program: Option<PathBuf>) -> Store<'_> {
        self.user_dir(name);
        self.stores
            .borrow_mut()
            .push((self.path(name), mount_program.clone()));
        Store {
            session: self,
            root: self.user_dir(&format!("{name}/root")),
            runroot: self.user_dir(&format!("{name}/run")),
            mount_program,
        }
    }

    /// Resets every store, ends every process of the namespace and checks
    /// that nothing is left mounted or running; the scratch directory goes
    /// when the session is dropped. Returns what went wrong.
    fn shut_down(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.holder.is_none() {
            return problems;
        }
        for (store, mount_program) in self.stores.take() {
            let store = Store {
                session: self,
                root: store.join("root"),
                runroot: store.join("run"),
                mount_program,
            };
            let mut reset = store.command("podman", &["system", "reset", "-f"]);
            let out = run_with_timeout(&mut reset, COMMAND_TIMEOUT);
            if !out.status.success() {
                problems.push(format!(
                    "podman system reset of {:?}: {}",
                    store.root,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        // The shell waiting on its stdin exits, then catatonit, and the
        // kernel kills whatever is left in the pid namespace.
        drop(self.holder_stdin.take());
        let mut holder = self.holder.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while holder.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                problems.push("the namespace holder did not exit; killed".into());
                let _ = holder.kill();
                let _ = holder.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = processes_in(&self.pid_ns);
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                problems.push(format!("processes left in the namespace: {left:?}"));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let dir = self.dir.path();
        let mounts: Vec<_> = unionfs::mountinfo::read()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| {
                m.mount_point.starts_with(dir)
                    || m.super_options.contains(&*dir.to_string_lossy())
                    || m.source.contains(&*dir.to_string_lossy())
            })
            .map(|m| format!("{} {} {}", m.fs_type, m.source, m.mount_point.display()))
            .collect();
        if !mounts.is_empty() {
            problems.push(format!("mounts left: {mounts:?}"));
        }
        problems
    }

    /// Ends the session, asserting that nothing was left behind.
    pub fn close(mut self) {
        let problems = self.shut_down();
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for p in self.shut_down() {
            eprintln!("rootless session teardown: {p}");
        }
    }
}

/// Host pids of the processes in pid namespace `ns` (`pid:[N]`).
fn processes_in(ns: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read_link(e.path().join("ns/pid"))
                .map(|l| l.to_string_lossy() == ns)
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// One private containers/storage store of a session, used by the user's
/// podman and buildah alike.
pub struct Store<'a> {
    pub session: &'a Session,
    pub root: PathBuf,
    pub runroot: PathBuf,
    pub mount_program: Option<PathBuf>,
}

impl Store<'_> {
    /// `program` (podman or buildah) on this store, with `args`.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = self.session.cmd(program);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "overlay"]);
        if let Some(mount_program) = &self.mount_program {
            cmd.arg("--storage-opt").arg(format!(
                "overlay.mount_program={}",
                mount_program.to_string_lossy()
            ));
        }
        if program == "podman" {
            cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
                .args(["--events-backend", "file"]);
        }
        cmd.args(args);
        cmd
    }

    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = run_with_timeout(&mut self.command(program, args), COMMAND_TIMEOUT);
        assert!(
            out.status.success(),
            "{program} {args:?} ({}) failed: {}{}",
            self.mount_program
                .as_ref()
                .map_or("native overlay".into(), |p| p.display().to_string()),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the user's podman on this store; panics with its output on
    /// failure, returns its stdout.
    pub fn podman(&self, args: &[&str]) -> String {
        self.ok("podman", args)
    }

    /// Runs the user's buildah on this store.
    pub fn buildah(&self, args: &[&str]) -> String {
        self.ok("buildah", args)
    }
}
