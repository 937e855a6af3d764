//! Crash injection: every multi-step change unionfs makes to the upper must
//! leave, wherever the daemon dies, an upper that reads as the state before
//! the operation or the state after it, on kernel overlayfs and on a fresh
//! unionfs mount alike.
//!
//! For each operation: the layers are prepared (a lower with files, dirs,
//! xattrs, owners; an upper made by earlier steps through a unionfs mount,
//! kept as a template), the operation is run once under strace to learn
//! which mutating syscalls the daemon makes, then, for each such syscall S
//! and N = 1, 2, ..., a fresh copy of the template upper is mounted, strace
//! kills the daemon as it enters its N-th call of S
//! (`-e inject=S:signal=KILL:when=N`; the call itself never runs), and the
//! upper left behind is read. N stops growing once the operation completes
//! without being killed. Syscalls the daemon does not make in the traced
//! run are not iterated (N = 1 would complete).
//!
//! The old and new states are read by kernel overlayfs (redirect_dir=on, a
//! fresh work dir) and by a fresh unionfs mount: types, contents, modes,
//! owners, xattrs, symlink targets, link counts, and mtimes of
//! non-directories; times set to "now" by the operation (seen to differ
//! between two uncrashed runs) match anything. An upper left by a crash
//! that is identical to the old or the new upper (every xattr, overlay
//! markers included) reads as that state without mounting; any other must
//! read as the same one of the two states on both readers.
//!
//! strace counts calls per syscall and per thread, so the daemon runs one
//! FUSE thread (`--threads 1`): every request of the operation is served by
//! the same thread in the same order in every run. strace 6.1 injects only
//! into syscalls it traces (`-e trace=none` silently injects nothing), so
//! the traced set is S, plus writev (the FUSE replies), by which a probe
//! lookup shows that the attach is complete before the operation starts.
//!
//! Directory times are not compared: a parent's mtime may change between
//! the rename of a copied-up child into it and its restoring, and kernel
//! overlayfs has the same window.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// The syscalls that change a layer (x86_64 names; the daemon reaches most
/// through nix and glibc, which call `renameat` for a flagless renameat2).
/// Calls of them that change nothing (read-only opens, other ioctls) are
/// crash points too: harmless, and cheaper than telling them apart.
/// fchmodat2 is missing: strace 6.1 does not know it, and glibc calls it
/// only for AT_SYMLINK_NOFOLLOW, which unionfs does not use with chmod.
const MUTATING: &[&str] = &[
    "renameat2",
    "renameat",
    "rename",
    "mknodat",
    "mknod",
    "mkdirat",
    "mkdir",
    "unlinkat",
    "unlink",
    "rmdir",
    "openat",
    "openat2",
    "open",
    "creat",
    "setxattr",
    "fsetxattr",
    "lsetxattr",
    "removexattr",
    "fremovexattr",
    "lremovexattr",
    "fchownat",
    "fchown",
    "lchown",
    "chown",
    "fchmodat",
    "fchmod",
    "chmod",
    "utimensat",
    "utimes",
    "futimesat",
    "linkat",
    "link",
    "symlinkat",
    "symlink",
    "copy_file_range",
    "ioctl",
    "write",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "fsync",
    "fdatasync",
    "ftruncate",
    "truncate",
    "fallocate",
];

const OP_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Layers

/// The one fixed time every lower object carries.
const LOWER_TIME: i64 = 978_307_200; // 2001-01-01T00:00:00Z

fn lsetxattr(path: &Path, name: &str, value: &[u8]) {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of the given length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "lsetxattr {path:?} {name}: {}",
        io::Error::last_os_error()
    );
}

/// Every xattr of `path` itself, in every namespace.
fn all_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: the buffer is as long as we say.
    let len = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let mut out = BTreeMap::new();
    if len < 0 {
        return out;
    }
    for name in names[..len as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 64 << 10];
        // SAFETY: as above.
        let n = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if n >= 0 {
            value.truncate(n as usize);
            out.insert(String::from_utf8_lossy(name).into_owned(), value);
        }
    }
    out
}

fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &nix::sys::time::TimeSpec::new(atime.0, atime.1),
        &nix::sys::time::TimeSpec::new(mtime.0, mtime.1),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap_or_else(|e| panic!("utimensat {path:?}: {e}"));
}

fn owner(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

/// One lower for every case: each case works on its own names in it.
fn build_lower(lower: &Path) {
    for (p, data) in [
        ("plain", &b"plain data\n"[..]),
        ("xf", b"file with xattrs\n"),
        ("a/b/c/nested", b"nested\n"),
        ("a/b/sibling", b"sibling\n"),
        ("ldir/f1", b"ldir f1\n"),
        ("ldir/sub/f2", b"ldir f2\n"),
        ("victim", b"to be unlinked\n"),
        ("shadow", b"shadowed lower\n"),
        ("urmd/x", b"x\n"),
        ("wdir/w1", b"w1\n"),
        ("wdir/sub/w2", b"w2\n"),
        ("rsrc", b"rename source\n"),
        ("rdst", b"rename target\n"),
        ("mvsrc/m1", b"m1\n"),
        ("mvsrc/deep/m2", b"m2\n"),
        ("mvparent/p1", b"p1\n"),
        ("gone/g1", b"g1\n"),
        ("gone/sub/g2", b"g2\n"),
        ("empty/e1", b"e1\n"),
        ("empty/e2", b"e2\n"),
        ("p1/x1/one", b"one\n"),
        ("p2/x2/two", b"two\n"),
        ("cw", b"create over whiteout\n"),
        ("hl", b"hard link me\n"),
    ] {
        write(lower.join(p), data);
    }
    fs::create_dir(lower.join("rmd")).unwrap();
    symlink("plain", lower.join("link"));
    symlink("../plain", lower.join("ldir/uplink"));

    let x = lower.join("xf");
    owner(&x, 1234, 5678);
    chmod(&x, 0o640);
    lsetxattr(&x, "user.one", b"1");
    lsetxattr(&x, "user.two", b"second value");
    lsetxattr(&x, "trusted.lowertest", b"t");
    owner(&lower.join("a"), 11, 12);
    chmod(lower.join("a"), 0o750);
    lsetxattr(&lower.join("a"), "user.dir", b"a");
    chmod(lower.join("a/b"), 0o705);
    lsetxattr(&lower.join("a/b/c"), "trusted.dirtest", b"c");
    owner(&lower.join("a/b/c/nested"), 21, 22);
    chmod(lower.join("a/b/c/nested"), 0o600);
    lsetxattr(&lower.join("ldir"), "user.d", b"1");
    owner(&lower.join("ldir"), 31, 32);
    lsetxattr(&lower.join("mvsrc"), "user.mv", b"m");
    chmod(lower.join("mvsrc/deep"), 0o711);
    owner(&lower.join("p1/x1"), 41, 42);
    lsetxattr(&lower.join("p2/x2"), "user.x2", b"2");
    owner(&lower.join("hl"), 51, 52);
    owner(&lower.join("link"), 61, 62);

    // Every lower object gets one old time, so a kept time is told apart
    // from a new one.
    for rel in walk(lower) {
        let t = (LOWER_TIME, 0);
        set_times(&lower.join(rel), t, t);
    }
    set_times(lower, (LOWER_TIME, 0), (LOWER_TIME, 0));
}

/// Copies an upper exactly: entries, whiteouts, hard links, owners, modes,
/// every xattr (overlay markers included), times.
fn copy_tree(src: &Path, dst: &Path) {
    fn entry(src: &Path, dst: &Path, links: &mut HashMap<(u64, u64), PathBuf>) {
        let m = fs::symlink_metadata(src).unwrap();
        let ft = m.file_type();
        if ft.is_dir() {
            if !dst.exists() {
                fs::create_dir(dst).unwrap();
            }
            for e in fs::read_dir(src).unwrap() {
                let name = e.unwrap().file_name();
                entry(&src.join(&name), &dst.join(&name), links);
            }
        } else if let Some(first) = links.get(&(m.dev(), m.ino())) {
            fs::hard_link(first, dst).unwrap();
            return;
        } else {
            if ft.is_file() {
                fs::copy(src, dst).unwrap();
            } else if ft.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(src).unwrap(), dst).unwrap();
            } else {
                nix::sys::stat::mknod(
                    dst,
                    nix::sys::stat::SFlag::from_bits_truncate(m.mode() & libc::S_IFMT),
                    nix::sys::stat::Mode::from_bits_truncate(m.mode() & 0o7777),
                    m.rdev(),
                )
                .unwrap();
            }
            if m.nlink() > 1 {
                links.insert((m.dev(), m.ino()), dst.to_path_buf());
            }
        }
        owner(dst, m.uid(), m.gid());
        for (name, value) in all_xattrs(src) {
            lsetxattr(dst, &name, &value);
        }
        if !ft.is_symlink() {
            chmod(dst, m.mode() & 0o7777);
        }
        set_times(
            dst,
            (m.atime(), m.atime_nsec()),
            (m.mtime(), m.mtime_nsec()),
        );
    }
    fs::create_dir_all(dst).unwrap();
    entry(src, dst, &mut HashMap::new());
}

// ---------------------------------------------------------------------------
// Snapshots

/// One object as a reader sees it. Directory times and nlinks are left out
/// (see the module comment; a directory's subdirectories are in the tree).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Obj {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    rdev: u64,
    content: Option<Vec<u8>>,
    target: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// None in a reference: the operation sets it to "now".
    mtime: Option<(i64, i64)>,
}

type Snap = BTreeMap<PathBuf, Obj>;

fn snap(root: &Path) -> Snap {
    let mut out = Snap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let m = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {path:?}: {e}"));
        let ft = m.file_type();
        let dir = ft.is_dir();
        if dir {
            for e in fs::read_dir(&path).unwrap_or_else(|e| panic!("readdir {path:?}: {e}")) {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
        let content = ft.is_file().then(|| {
            let mut buf = Vec::new();
            fs::File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .unwrap_or_else(|e| panic!("read {path:?}: {e}"));
            buf
        });
        out.insert(
            rel,
            Obj {
                kind: kind_name(ft),
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                nlink: if dir { 0 } else { m.nlink() },
                rdev: m.rdev(),
                content,
                target: ft.is_symlink().then(|| fs::read_link(&path).unwrap()),
                xattrs: all_xattrs(&path),
                mtime: (!dir).then(|| (m.mtime(), m.mtime_nsec())),
            },
        );
    }
    out
}

/// Two references of the same state: equal, but for the mtimes the
/// operation set to "now", which become wildcards.
fn unify(a: Snap, b: &Snap, what: &str) -> Snap {
    let keys: Vec<_> = a.keys().collect();
    assert_eq!(keys, b.keys().collect::<Vec<_>>(), "{what}: runs differ");
    a.into_iter()
        .map(|(path, mut obj)| {
            let other = &b[&path];
            if obj.mtime != other.mtime {
                obj.mtime = None;
            }
            assert_eq!(
                &obj,
                &Obj {
                    mtime: obj.mtime,
                    ..other.clone()
                },
                "{what}: {path:?} differs between runs"
            );
            (path, obj)
        })
        .collect()
}

fn show(content: &Option<Vec<u8>>) -> String {
    match content {
        None => "-".into(),
        Some(c) => format!("{:?}", String::from_utf8_lossy(c)),
    }
}

/// The fields in which `a` differs from `e`, "field a (expected e)".
fn changed_fields(a: &Obj, e: &Obj) -> Vec<String> {
    let mut d = Vec::new();
    let mut field = |name: &str, a: String, e: String| {
        if a != e {
            d.push(format!("{name} {a} (expected {e})"));
        }
    };
    field("kind", a.kind.into(), e.kind.into());
    field("mode", format!("{:o}", a.mode), format!("{:o}", e.mode));
    field(
        "owner",
        format!("{}:{}", a.uid, a.gid),
        format!("{}:{}", e.uid, e.gid),
    );
    field("nlink", a.nlink.to_string(), e.nlink.to_string());
    field("rdev", a.rdev.to_string(), e.rdev.to_string());
    field("content", show(&a.content), show(&e.content));
    field(
        "target",
        format!("{:?}", a.target),
        format!("{:?}", e.target),
    );
    let xattrs = |o: &Obj| {
        o.xattrs
            .iter()
            .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
            .collect::<Vec<_>>()
            .join(",")
    };
    field("xattrs", xattrs(a), xattrs(e));
    if e.mtime.is_some() {
        field("mtime", format!("{:?}", a.mtime), format!("{:?}", e.mtime));
    }
    d
}

/// How `actual` differs from `expected` (whose None mtimes match anything).
fn differences(actual: &Snap, expected: &Snap) -> Vec<String> {
    let mut d = Vec::new();
    for (path, e) in expected {
        match actual.get(path) {
            None => d.push(format!("{} ({}) missing", path.display(), e.kind)),
            Some(a) => {
                let fields = changed_fields(a, e);
                if !fields.is_empty() {
                    d.push(format!("{}: {}", path.display(), fields.join(", ")));
                }
            }
        }
    }
    for (path, a) in actual {
        if !expected.contains_key(path) {
            d.push(format!("{} ({}) appears", path.display(), a.kind));
        }
    }
    d
}

// ---------------------------------------------------------------------------
// Processes

/// The daemon, held by a pidfd: no pid reuse, and its exit can be awaited
/// although it is not our child.
struct Daemon {
    fd: OwnedFd,
}

impl Daemon {
    fn new(pid: i32) -> Daemon {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(fd >= 0, "pidfd_open({pid}): {}", io::Error::last_os_error());
        // SAFETY: a new descriptor that nothing else owns.
        Daemon {
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        }
    }

    fn exited_within(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
            if n > 0 {
                return true;
            }
            if n == 0 || Instant::now() >= deadline {
                return false;
            }
        }
    }

    fn kill(&self) {
        // SAFETY: a pidfd we own; no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}

/// strace, detached (SIGINT) or killed on drop.
struct Strace {
    child: Child,
}

impl Strace {
    /// Waits for strace to exit by itself (it does once every tracee is
    /// gone); kills it after `timeout`. True if it exited in time.
    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    /// Detaches strace from a live daemon. Only while no tracee is exiting:
    /// strace 6.1 told to detach while the threads of a killed process are
    /// still reporting their exit waits for the zombie leader forever.
    fn detach(&mut self) -> bool {
        if self.child.try_wait().ok().flatten().is_some() {
            return true;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        self.wait_exit(Duration::from_secs(10))
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Waits until strace is the tracer of every thread of the daemon.
fn wait_attached(pid: i32, strace: &mut Strace, err: &Path) {
    let want = strace.child.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = strace.child.try_wait() {
            panic!(
                "strace exited ({status}) before attaching: {}",
                fs::read_to_string(err).unwrap_or_default()
            );
        }
        let all = fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .all(|t| {
                fs::read_to_string(t.path().join("status"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.strip_prefix("TracerPid:").map(str::trim) == Some(&want))
            });
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "strace did not attach within 20s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

type Op = fn(&Path) -> io::Result<()>;

/// Runs the operation in a thread; a hang kills the daemon, which fails the
/// request, and then the test.
fn run_op(mnt: &Path, op: Op, daemon: &Daemon) -> String {
    let (tx, rx) = mpsc::channel();
    let mnt = mnt.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(op(&mnt));
    });
    match rx.recv_timeout(OP_TIMEOUT) {
        Ok(Ok(())) => "ok".into(),
        Ok(Err(e)) => format!("{e}"),
        Err(_) => {
            daemon.kill();
            let _ = rx.recv_timeout(Duration::from_secs(10));
            panic!("operation hung for {OP_TIMEOUT:?}");
        }
    }
}

struct Run {
    killed: bool,
    result: String,
    trace: String,
}

/// Mounts `dir/upper` over `lower`, traces the daemon (injecting a SIGKILL
/// at the `n`-th call of a syscall if asked), runs `op`, and leaves nothing
/// mounted or running.
fn traced_run(lower: &Path, dir: &Path, trace: &str, inject: Option<(&str, usize)>, op: Op) -> Run {
    let (upper, mnt) = (dir.join("upper"), dir.join("mnt"));
    fs::create_dir_all(&mnt).unwrap();
    let out = dir.join("strace.out");
    let err = dir.join("strace.err");
    // One thread reading /dev/fuse and writev(2) for every reply: the probes
    // below rely on both, and the changes to the upper are the same over
    // any transport.
    let mut mount = UnionMount::mount(
        &[lower],
        Some(&upper),
        &mnt,
        &["--threads", "1", "-o", "noio_uring"],
    );
    let pid = mount.daemon_pid().expect("daemon pid");
    let daemon = Daemon::new(pid);
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-p", &pid.to_string()])
        .args(["-e", &format!("trace={trace},writev")])
        .arg("-o")
        .arg(&out);
    if let Some((syscall, n)) = inject {
        cmd.args(["-e", &format!("inject={syscall}:signal=KILL:when={n}")]);
    }
    let mut strace = Strace {
        child: cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .expect("spawn strace"),
    };
    wait_attached(pid, &mut strace, &err);
    // A lookup the daemon answers while strace logs it: the attach is
    // complete, syscall stops included.
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0.. {
        let _ = fs::symlink_metadata(mnt.join(format!(".crash-probe-{i}")));
        if fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("writev(")
        {
            break;
        }
        assert!(Instant::now() < deadline, "strace never saw the probe");
        std::thread::sleep(Duration::from_millis(1));
    }

    let result = run_op(&mnt, op, &daemon);
    // One more request: the single FUSE thread serves it after whatever the
    // operation queued in the background (RELEASE), so those run traced too.
    // If the daemon answers it, it is alive and idle: strace may detach.
    let answered = !matches!(
        fs::symlink_metadata(mnt.join(".crash-probe-end")).map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOTCONN | libc::ECONNABORTED))
    );
    if answered && !daemon.exited_within(Duration::ZERO) {
        assert!(strace.detach(), "strace did not detach");
    } else {
        assert!(
            strace.wait_exit(EXIT_TIMEOUT),
            "strace did not exit with its tracee"
        );
    }
    let trace = fs::read_to_string(&out).unwrap_or_default();
    let killed = daemon.exited_within(Duration::ZERO);
    if killed {
        let _ = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
    } else {
        mount.unmount();
        if !daemon.exited_within(EXIT_TIMEOUT) {
            daemon.kill();
            panic!("daemon did not exit after umount");
        }
    }
    assert!(!is_mounted(&mnt), "{mnt:?} still mounted");
    drop(mount);
    Run {
        killed,
        result,
        trace,
    }
}

/// A trace line as (thread id, syscall name, the call).
fn parse_line(line: &str) -> Option<(&str, &str, &str)> {
    let (tid, rest) = line.split_once(' ')?;
    let call = rest.trim_start();
    let (name, _) = call.split_once('(')?;
    Some((tid, name, call))
}

/// Counts, per syscall, the calls of the busiest thread in a trace.
fn syscall_counts(trace: &str) -> BTreeMap<String, usize> {
    let mut per_thread: HashMap<(&str, &str), usize> = HashMap::new();
    for (tid, name, _) in trace.lines().filter_map(parse_line) {
        if MUTATING.contains(&name) {
            *per_thread.entry((name, tid)).or_default() += 1;
        }
    }
    let mut out = BTreeMap::new();
    for ((name, _), n) in per_thread {
        let e = out.entry(name.to_string()).or_insert(0);
        *e = (*e).max(n);
    }
    out
}

/// The call strace killed the daemon in, for the report.
fn killed_call(trace: &str, syscall: &str) -> String {
    trace
        .lines()
        .filter_map(parse_line)
        .rfind(|(_, name, _)| *name == syscall)
        .map(|(_, _, call)| call.chars().take(160).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Reading an upper

/// The merged tree as kernel overlayfs and as a fresh unionfs mount show
/// `upper` over `lower`. Kernel overlayfs reads a copy: it writes its own
/// bookkeeping into an upper it mounts (trusted.overlay.uuid on the root,
/// origin and impure on merged directories it looks up).
fn views(lower: &Path, upper: &Path, dir: &Path) -> (Snap, Snap) {
    let kmnt = dir.join("kmnt");
    let kwork = dir.join("kwork");
    let kupper = dir.join("kupper");
    fs::create_dir_all(&kmnt).unwrap();
    for d in [&kwork, &kupper] {
        let _ = fs::remove_dir_all(d);
    }
    fs::create_dir_all(&kwork).unwrap();
    copy_tree(upper, &kupper);
    let kernel = KernelMount::mount(&[lower], Some((&kupper, &kwork)), &kmnt, "redirect_dir=on");
    let k = snap(&kmnt);
    drop(kernel);
    let umnt = dir.join("umnt");
    fs::create_dir_all(&umnt).unwrap();
    let m = UnionMount::mount(&[lower], Some(upper), &umnt, &[]);
    let u = snap(&umnt);
    drop(m);
    (k, u)
}

/// A state of the layers: the upper itself, and the two readers' views.
struct State {
    raw: Snap,
    kernel: Snap,
    unionfs: Snap,
}

fn state_of(lower: &Path, dir: &Path) -> State {
    let upper = dir.join("upper");
    let raw = snap(&upper);
    let (kernel, unionfs) = views(lower, &upper, dir);
    State {
        raw,
        kernel,
        unionfs,
    }
}

// ---------------------------------------------------------------------------
// The driver

struct Case {
    name: &'static str,
    /// Earlier steps, through a unionfs mount: the upper they leave is the
    /// old state.
    prepare: Op,
    op: Op,
}

fn no_prepare(_: &Path) -> io::Result<()> {
    Ok(())
}

#[derive(Default)]
struct Tally {
    points: BTreeMap<String, usize>,
    unchanged: usize,
    as_new: usize,
    mounted: usize,
    failures: Vec<String>,
}

fn remove_iteration(dir: &Path) {
    for sub in ["mnt", "kmnt", "umnt"] {
        assert!(!is_mounted(&dir.join(sub)), "{dir:?}/{sub} still mounted");
    }
    let _ = fs::remove_dir_all(dir);
}

fn crash_case(case: &Case) {
    let started = Instant::now();
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    build_lower(&lower);
    let digest = layer_digest(&lower);

    // The old state: the template upper.
    let template = s.mkdir("template");
    fs::create_dir_all(template.join("upper")).unwrap();
    {
        let mnt = s.mkdir("template/mnt");
        let _m = UnionMount::mount(&[&lower], Some(&template.join("upper")), &mnt, &[]);
        (case.prepare)(&mnt).unwrap_or_else(|e| panic!("{}: prepare: {e}", case.name));
    }
    let old = state_of(&lower, &template);

    // The new state, twice (times set to "now" become wildcards); the first
    // run also counts the daemon's mutating syscalls.
    let mut refs = Vec::new();
    let mut counts = BTreeMap::new();
    for i in 0..2 {
        let dir = s.path(&format!("ref{i}"));
        copy_tree(&template.join("upper"), &dir.join("upper"));
        let run = traced_run(&lower, &dir, &MUTATING.join(","), None, case.op);
        assert!(!run.killed);
        assert_eq!(run.result, "ok", "{}: the operation fails", case.name);
        if i == 0 {
            counts = syscall_counts(&run.trace);
        }
        refs.push(state_of(&lower, &dir));
        remove_iteration(&dir);
    }
    assert!(
        !counts.is_empty(),
        "{}: no mutating syscall traced",
        case.name
    );
    let second = refs.pop().unwrap();
    let first = refs.pop().unwrap();
    let new = State {
        raw: unify(first.raw, &second.raw, "new upper"),
        kernel: unify(first.kernel, &second.kernel, "new kernel view"),
        unionfs: unify(first.unionfs, &second.unionfs, "new unionfs view"),
    };
    assert!(
        !differences(&new.raw, &old.raw).is_empty(),
        "{}: the operation changes nothing in the upper",
        case.name
    );
    // The readers should agree on both states (the differential test's
    // business; reported here, as a disagreement makes results hard to read).
    for (what, k, u) in [
        ("old", &old.kernel, &old.unionfs),
        ("new", &new.kernel, &new.unionfs),
    ] {
        let d = differences(u, k);
        if !d.is_empty() {
            eprintln!(
                "{}: kernel and unionfs read the {what} state differently: {d:#?}",
                case.name
            );
        }
    }

    let mut tally = Tally::default();
    for (syscall, count) in &counts {
        for n in 1.. {
            assert!(
                n <= count + 2,
                "{}: {syscall} still killed at call {n} of {count}",
                case.name
            );
            let dir = s.path(&format!("it-{syscall}-{n}"));
            copy_tree(&template.join("upper"), &dir.join("upper"));
            let run = traced_run(&lower, &dir, syscall, Some((syscall, n)), case.op);
            if !run.killed {
                assert_eq!(run.result, "ok", "{}: {syscall}#{n}", case.name);
                let d = differences(&snap(&dir.join("upper")), &new.raw);
                if !d.is_empty() {
                    tally.failures.push(format!(
                        "{}: not killed at {syscall}#{n}, yet the upper is not the new one: {}",
                        case.name,
                        d.join("; ")
                    ));
                }
                remove_iteration(&dir);
                break;
            }
            *tally.points.entry(syscall.clone()).or_default() += 1;
            let at = format!(
                "{} killed at {syscall}#{n} [{}] (operation: {})",
                case.name,
                killed_call(&run.trace, syscall),
                run.result
            );
            let raw = snap(&dir.join("upper"));
            if differences(&raw, &old.raw).is_empty() {
                tally.unchanged += 1;
            } else if differences(&raw, &new.raw).is_empty() {
                tally.as_new += 1;
            } else {
                tally.mounted += 1;
                let (k, u) = views(&lower, &dir.join("upper"), &dir);
                let read = |view: &Snap, o: &Snap, n: &Snap| -> Result<&'static str, String> {
                    let to_old = differences(view, o);
                    if to_old.is_empty() {
                        return Ok("old");
                    }
                    let to_new = differences(view, n);
                    if to_new.is_empty() {
                        return Ok("new");
                    }
                    Err(format!(
                        "neither state; as the old but: {}; as the new but: {}",
                        to_old.join("; "),
                        to_new.join("; ")
                    ))
                };
                match (
                    read(&k, &old.kernel, &new.kernel),
                    read(&u, &old.unionfs, &new.unionfs),
                ) {
                    (Ok(a), Ok(b)) if a == b => {}
                    (k, u) => {
                        let say = |r: Result<&str, String>| {
                            r.map(|s| format!("reads as the {s} state"))
                                .unwrap_or_else(|e| e)
                        };
                        tally.failures.push(format!(
                            "{at}:\n    kernel overlayfs: {}\n    unionfs remount: {}",
                            say(k),
                            say(u)
                        ));
                    }
                }
                let work = dir.join(".upper.unionfs-work/work");
                if fs::read_dir(&work).map(|d| d.count()).unwrap_or(0) != 0 {
                    tally
                        .failures
                        .push(format!("{at}: work dir leftovers not removed at mount"));
                }
            }
            remove_iteration(&dir);
        }
    }
    assert_eq!(layer_digest(&lower), digest, "lower changed");
    let total: usize = tally.points.values().sum();
    eprintln!(
        "{}: {total} crash points {:?}; upper unchanged {}, upper as after {}, read through mounts {}; {} failures; {:.1}s",
        case.name,
        tally.points,
        tally.unchanged,
        tally.as_new,
        tally.mounted,
        tally.failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        tally.failures.is_empty(),
        "{}: {} of {total} crash points leave an upper that reads as neither the old nor the new state:\n{}",
        case.name,
        tally.failures.len(),
        tally.failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// The operations

fn open_append(p: &Path) -> io::Result<()> {
    fs::OpenOptions::new().append(true).open(p).map(drop)
}

fn rename2(from: &Path, to: &Path, flags: nix::fcntl::RenameFlags) -> io::Result<()> {
    nix::fcntl::renameat2(nix::fcntl::AT_FDCWD, from, nix::fcntl::AT_FDCWD, to, flags)
        .map_err(io::Error::from)
}

macro_rules! crash_test {
    ($name:ident, $prepare:expr, $op:expr) => {
        #[test]
        fn $name() {
            crash_case(&Case {
                name: stringify!($name),
                prepare: $prepare,
                op: $op,
            });
        }
    };
}

crash_test!(copy_up_of_a_file, no_prepare, |m| open_append(
    &m.join("plain")
));

crash_test!(copy_up_of_a_file_with_xattrs, no_prepare, |m| open_append(
    &m.join("xf")
));

crash_test!(copy_up_of_a_nested_file, no_prepare, |m| open_append(
    &m.join("a/b/c/nested")
));

crash_test!(chmod_of_a_lower_dir, no_prepare, |m| {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(m.join("ldir"), fs::Permissions::from_mode(0o700))
});

crash_test!(unlink_of_a_lower_file, no_prepare, |m| fs::remove_file(
    m.join("victim")
));

crash_test!(
    unlink_of_an_upper_file_shadowing_a_lower_one,
    |m| {
        let mut f = fs::OpenOptions::new().append(true).open(m.join("shadow"))?;
        io::Write::write_all(&mut f, b"changed in the upper\n")
    },
    |m| fs::remove_file(m.join("shadow"))
);

crash_test!(rmdir_of_a_lower_dir, no_prepare, |m| fs::remove_dir(
    m.join("rmd")
));

crash_test!(
    rmdir_of_an_upper_dir_shadowing_a_lower_one,
    |m| fs::remove_file(m.join("urmd/x")),
    |m| fs::remove_dir(m.join("urmd"))
);

crash_test!(
    mkdir_over_a_whiteout,
    |m| fs::remove_dir_all(m.join("wdir")),
    |m| fs::create_dir(m.join("wdir"))
);

crash_test!(rename_of_a_file_onto_a_lower_file, no_prepare, |m| {
    fs::rename(m.join("rsrc"), m.join("rdst"))
});

crash_test!(rename_of_a_lower_dir_into_another_dir, no_prepare, |m| {
    fs::rename(m.join("mvsrc"), m.join("mvparent/moved"))
});

crash_test!(
    rename_of_a_dir_onto_a_whiteout,
    |m| {
        fs::remove_dir_all(m.join("gone"))?;
        fs::create_dir(m.join("newdir"))?;
        fs::write(m.join("newdir/n"), b"new\n")
    },
    |m| fs::rename(m.join("newdir"), m.join("gone"))
);

crash_test!(
    rename_of_a_dir_onto_an_empty_merged_dir,
    |m| {
        fs::remove_file(m.join("empty/e1"))?;
        fs::remove_file(m.join("empty/e2"))?;
        fs::create_dir(m.join("newdir2"))?;
        fs::write(m.join("newdir2/n"), b"new\n")
    },
    |m| fs::rename(m.join("newdir2"), m.join("empty"))
);

crash_test!(exchange_of_two_lower_dirs, no_prepare, |m| rename2(
    &m.join("p1/x1"),
    &m.join("p2/x2"),
    nix::fcntl::RenameFlags::RENAME_EXCHANGE
));

crash_test!(
    create_of_a_file_over_a_whiteout,
    |m| fs::remove_file(m.join("cw")),
    |m| fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(m.join("cw"))
        .map(drop)
);

crash_test!(hard_link_of_a_lower_file, no_prepare, |m| fs::hard_link(
    m.join("hl"),
    m.join("hl2")
));
