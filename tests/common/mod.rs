//! Test harness: builds layer trees in a temporary directory, mounts unionfs
//! (and kernel overlayfs for comparison) for real, and always unmounts in
//! Drop. Every wait has a deadline so a broken mount fails a test instead of
//! hanging CI.
#![allow(dead_code)]

pub mod podman;
pub mod rootless;
pub mod store;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_unionfs");
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a command with a deadline; kills it if it does not finish. Output
/// is drained by threads so a chatty command cannot block on a full pipe.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    run_with_stdin(cmd, Stdio::null(), timeout)
}

/// `run_with_timeout` with `stdin` as the command's standard input.
pub fn run_with_stdin(cmd: &mut Command, stdin: Stdio, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

pub fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

/// Runs a command that must succeed.
pub fn sh(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn fs_type_at(path: &Path) -> Option<String> {
    unionfs::mountinfo::mount_at(path).map(|m| m.fs_type)
}

pub fn is_mounted(path: &Path) -> bool {
    fs_type_at(path).is_some()
}

/// A scratch directory holding layers and mountpoints.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        // Under the build tree, not /tmp: layers must sit on the same
        // filesystem as the upper for kernel comparisons, and /tmp may be tmpfs.
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(base).unwrap();
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("unionfs-test-")
                .tempdir_in(base)
                .unwrap(),
        }
    }

    /// A scratch directory inside `parent` (a process that cannot write
    /// the build tree's tmp dir gets one from its caller).
    pub fn inside(parent: &Path) -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("unionfs-test-")
                .tempdir_in(parent)
                .unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Creates (if needed) and returns a directory.
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

/// Helpers for writing layer contents.
pub fn write(path: impl AsRef<Path>, content: &[u8]) {
    let path = path.as_ref();
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, content).unwrap();
}

pub fn symlink(target: &str, link: impl AsRef<Path>) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

pub fn chardev_whiteout(path: impl AsRef<Path>) {
    nix::sys::stat::mknod(
        path.as_ref(),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
}

pub fn set_xattr(path: impl AsRef<Path>, name: &str, value: &str) {
    sh(Command::new("setfattr")
        .args(["-h", "-n", name, "-v", value])
        .arg(path.as_ref()));
}

pub fn chmod(path: impl AsRef<Path>, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A unionfs mount, unmounted on drop.
pub struct UnionMount {
    pub mountpoint: PathBuf,
}

impl UnionMount {
    /// `unionfs mount --lower .. [--upper ..] MP [extra...]`; panics on failure.
    pub fn mount(
        lowers: &[&Path],
        upper: Option<&Path>,
        mountpoint: &Path,
        extra: &[&str],
    ) -> UnionMount {
        let (out, mount) = try_mount(lowers, upper, mountpoint, extra);
        mount.unwrap_or_else(|| {
            panic!(
                "unionfs mount failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Takes charge of a mount started some other way.
    pub fn adopt(mountpoint: &Path) -> UnionMount {
        let mountpoint = mountpoint.canonicalize().unwrap();
        // The guard exists before the wait, so a mount that never shows up
        // as expected is still unmounted when the wait panics.
        let guard = UnionMount { mountpoint };
        wait_until(|| fs_type_at(&guard.mountpoint).as_deref() == Some("fuse.unionfs"));
        guard
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// The live daemon serving this mount (from its pid file).
    pub fn daemon_pid(&self) -> Option<i32> {
        unionfs::daemon::daemon_pid(&self.mountpoint)
    }

    pub fn unmount(&mut self) {
        if !is_mounted(&self.mountpoint) {
            return;
        }
        let out = run_with_timeout(
            Command::new(BIN)
                .arg("umount")
                .arg(&self.mountpoint)
                .args(["--timeout", "20"]),
            Duration::from_secs(30),
        );
        if !out.status.success() || is_mounted(&self.mountpoint) {
            eprintln!(
                "unionfs umount failed ({}); detaching lazily",
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for UnionMount {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Runs `unionfs mount`; a mount it made is returned so that it is released.
pub fn try_mount(
    lowers: &[&Path],
    upper: Option<&Path>,
    mountpoint: &Path,
    extra: &[&str],
) -> (Output, Option<UnionMount>) {
    let lower_arg: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let mut cmd = Command::new(BIN);
    cmd.arg("mount").arg("--lower").arg(lower_arg.join(":"));
    if let Some(upper) = upper {
        cmd.arg("--upper").arg(upper);
    }
    cmd.arg(mountpoint).args(extra);
    let out = run(&mut cmd);
    let mount = out.status.success().then(|| UnionMount::adopt(mountpoint));
    (out, mount)
}

/// A kernel overlayfs mount of the same layers, unmounted on drop.
pub struct KernelMount {
    pub mountpoint: PathBuf,
}

impl KernelMount {
    pub fn mount(
        lowers: &[&Path],
        upper: Option<(&Path, &Path)>,
        mountpoint: &Path,
        extra: &str,
    ) -> KernelMount {
        let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let mut opts = format!("lowerdir={}", lower.join(":"));
        if let Some((upper, work)) = upper {
            opts.push_str(&format!(
                ",upperdir={},workdir={}",
                upper.display(),
                work.display()
            ));
        }
        if !extra.is_empty() {
            opts.push(',');
            opts.push_str(extra);
        }
        sh(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(mountpoint));
        KernelMount {
            mountpoint: mountpoint.to_path_buf(),
        }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        if nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()).is_err() {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Runs `ops` on kernel overlayfs (with `kernel_options`), then on unionfs,
/// each over `lower` with a fresh upper; returns (kernel's, unionfs').
pub fn on_kernel_then_unionfs<T>(
    s: &Scratch,
    lower: &Path,
    kernel_options: &str,
    ops: impl Fn(&Path) -> T,
) -> (T, T) {
    let kernel = KernelMount::mount(
        &[lower],
        Some((&s.mkdir("kernel-upper"), &s.mkdir("kernel-work"))),
        &s.mkdir("kernel-mnt"),
        kernel_options,
    );
    let expected = ops(&kernel.mountpoint);
    drop(kernel);
    let m = UnionMount::mount(
        &[lower],
        Some(&s.mkdir("unionfs-upper")),
        &s.mkdir("unionfs-mnt"),
        &[],
    );
    let got = ops(&m.mountpoint);
    drop(m);
    (expected, got)
}

/// Whether process `pid` has exited (a zombie has; its parent just has not
/// reaped it).
pub fn process_gone(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| st.rsplit(')').next().unwrap().trim_start().starts_with('Z'))
        .unwrap_or(true)
}

pub fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met within 20s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the comparison looks at for each object of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    pub kind: &'static str,
    pub mode: u32,
    pub size: u64,
    pub nlink: u64,
    pub content: Option<Vec<u8>>,
    pub link_target: Option<OsString>,
    pub user_xattrs: BTreeMap<String, Vec<u8>>,
}

pub fn kind_name(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "chardev"
    } else {
        "blockdev"
    }
}

pub fn user_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    xattrs_with_prefix(path, "user.")
}

/// The xattrs of `path` itself (never following a symlink) whose names
/// start with `prefix`.
pub fn xattrs_with_prefix(path: &Path, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    use nix::fcntl::{OFlag, open};
    use unionfs::sys::{XattrTarget, get_xattr, list_xattr};
    let fd = open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let target = XattrTarget::Fd(std::os::fd::AsFd::as_fd(&fd));
    let mut map = BTreeMap::new();
    let names = list_xattr(target).unwrap_or_default();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        let cname = std::ffi::CString::new(name.clone()).unwrap();
        if let Ok(Some(value)) = get_xattr(target, &cname) {
            map.insert(name, value);
        }
    }
    map
}

/// Every path below `root` (relative, without following symlinks).
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        if let Ok(entries) = fs::read_dir(root.join(&rel)) {
            for e in entries.flatten() {
                let child = rel.join(e.file_name());
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(child.clone());
                }
                out.push(child);
            }
        }
    }
    out
}

/// Walks a tree (without following symlinks) and records every object.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, EntryInfo> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("stat {path:?}: {e}"));
        let kind = kind_name(meta.file_type());
        let content = if meta.is_file() {
            let mut buf = Vec::new();
            fs::File::open(&path)
                .unwrap()
                .read_to_end(&mut buf)
                .unwrap();
            Some(buf)
        } else {
            None
        };
        let link_target = meta
            .file_type()
            .is_symlink()
            .then(|| fs::read_link(&path).unwrap().into_os_string());
        out.insert(
            rel.clone(),
            EntryInfo {
                kind,
                mode: meta.mode(),
                size: if meta.is_dir() { 0 } else { meta.size() },
                nlink: meta.nlink(),
                content,
                link_target,
                user_xattrs: user_xattrs(&path),
            },
        );
        if meta.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                stack.push(rel.join(entry.unwrap().file_name()));
            }
        }
    }
    out
}

/// Inode numbers of every object, and the d_ino readdir gave for it.
pub fn inode_numbers(root: &Path) -> BTreeMap<PathBuf, (u64, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                let entry = entry.unwrap();
                let child = rel.join(entry.file_name());
                let st_ino = fs::symlink_metadata(root.join(&child)).unwrap().ino();
                out.insert(
                    child.clone(),
                    (st_ino, std::os::unix::fs::DirEntryExt::ino(&entry)),
                );
                stack.push(child);
            }
        }
    }
    out
}

/// Differences between two snapshots, one line each.
pub fn diff_trees(
    left_name: &str,
    left: &BTreeMap<PathBuf, EntryInfo>,
    right_name: &str,
    right: &BTreeMap<PathBuf, EntryInfo>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    for (path, l) in left {
        match right.get(path) {
            None => diffs.push(format!("{path:?}: only in {left_name}")),
            Some(r) if r != l => diffs.push(format!(
                "{path:?}: {left_name} {:?} != {right_name} {:?}",
                summarize(l),
                summarize(r)
            )),
            _ => {}
        }
    }
    for path in right.keys() {
        if !left.contains_key(path) {
            diffs.push(format!("{path:?}: only in {right_name}"));
        }
    }
    diffs
}

fn summarize(e: &EntryInfo) -> String {
    format!(
        "{} mode={:o} size={} nlink={} link={:?} xattrs={:?} content_len={:?}",
        e.kind,
        e.mode,
        e.size,
        e.nlink,
        e.link_target,
        e.user_xattrs,
        e.content.as_ref().map(|c| c.len())
    )
}

pub fn assert_same_tree(a_name: &str, a: &Path, b_name: &str, b: &Path) {
    let diffs = diff_trees(a_name, &snapshot(a), b_name, &snapshot(b));
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
}

/// A checksum of every byte and attribute under a layer, to prove a layer
/// was left untouched.
pub fn layer_digest(root: &Path) -> String {
    let out = sh(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . -printf '%p %y %m %s %n %U %G %T@ %l\\n' | LC_ALL=C sort | md5sum && \
         find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r md5sum | md5sum && \
         getfattr -R -h -d -m - -e hex . 2>/dev/null | md5sum",
        root.display()
    )));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The times every lower object gets in timestamp comparisons: an old
/// mtime, and an atime in the future, which relatime never updates on a
/// read (it does when atime <= mtime or ctime, or when atime is a day old),
/// so that reads through either filesystem leave it alone and only a
/// copy-up that fails to keep it, or an explicit change, shows.
pub const OLD_MTIME: (i64, i64) = (978_307_200, 0); // 2001-01-01
pub const FUTURE_ATIME: (i64, i64) = (4_102_444_800, 0); // 2100-01-01

/// Gives every object under `root`, `root` included, OLD_MTIME and
/// FUTURE_ATIME (symlinks themselves, not their targets).
pub fn set_fixed_times(root: &Path) {
    let mut paths = walk(root);
    paths.push(PathBuf::new());
    for rel in paths {
        let path = root.join(rel);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &path,
            &nix::sys::time::TimeSpec::new(FUTURE_ATIME.0, FUTURE_ATIME.1),
            &nix::sys::time::TimeSpec::new(OLD_MTIME.0, OLD_MTIME.1),
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap_or_else(|e| panic!("utimensat {path:?}: {e}"));
    }
}

/// A time as a comparison sees it: fixed values (before 2010, or in the
/// far future: the layers' own and those set by utime calls) exactly,
/// anything else as "now", which differs from run to run.
pub fn time_class(sec: i64, nsec: i64) -> String {
    if !(1_262_304_000..4_000_000_000).contains(&sec) {
        format!("{sec}.{nsec:09}")
    } else {
        "now".into()
    }
}

/// The mtime and atime class of every object under `root` (itself
/// included, as ""), without following symlinks.
pub fn time_marks(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut paths = walk(root);
    paths.push(PathBuf::new());
    paths
        .into_iter()
        .map(|rel| {
            let m = fs::symlink_metadata(root.join(&rel))
                .unwrap_or_else(|e| panic!("stat {:?}: {e}", root.join(&rel)));
            let marks = format!(
                "mtime {} atime {}",
                time_class(m.mtime(), m.mtime_nsec()),
                time_class(m.atime(), m.atime_nsec())
            );
            (rel, marks)
        })
        .collect()
}

/// Differences between two time-mark maps, one line each.
pub fn diff_time_marks(
    left_name: &str,
    left: &BTreeMap<PathBuf, String>,
    right_name: &str,
    right: &BTreeMap<PathBuf, String>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (path, l) in left {
        match right.get(path) {
            Some(r) if r != l => d.push(format!("{path:?}: {left_name} {l}, {right_name} {r}")),
            None => d.push(format!("{path:?}: only in {left_name}")),
            _ => {}
        }
    }
    for path in right.keys().filter(|p| !left.contains_key(*p)) {
        d.push(format!("{path:?}: only in {right_name}"));
    }
    d
}

/// A helper process: this test binary run again to do one operation and
/// exit, for what a test needs done by a process of its own (a lock owner
/// other than the test, another user, a caller that may be cut off). Each
/// test binary that uses it has a test named `child_helper` calling
/// `helper_main`, which does nothing in an ordinary run.
const HELPER_OP: &str = "UNIONFS_TEST_HELPER_OP";
const HELPER_PATH: &str = "UNIONFS_TEST_HELPER_PATH";
/// Set when the helper's standard input is the directory to work in.
const HELPER_CWD_IS_STDIN: &str = "UNIONFS_TEST_HELPER_CWD_IS_STDIN";

/// The helper's operations; each opens as Python's `open`/`os.open` does
/// (O_CLOEXEC, mode 0666 when creating). The exit status is 0 when the
/// operation had the expected outcome.
#[derive(Debug, Clone, Copy)]
pub enum HelperOp {
    /// open(O_RDONLY), flock(LOCK_EX | LOCK_NB): expected to fail with
    /// EWOULDBLOCK.
    FlockExclusiveNonblocking,
    /// open(O_RDONLY), fcntl(F_SETLK, F_RDLCK over the whole file), as
    /// Python's `lockf(LOCK_SH | LOCK_NB)`: expected to succeed.
    LockfSharedNonblocking,
    /// open(O_WRONLY).
    OpenWrite,
    /// open(O_WRONLY | O_CREAT | O_APPEND), write("x").
    AppendX,
    /// truncate(path, 2).
    Truncate2,
    /// open(O_WRONLY | O_CREAT | O_TRUNC), write("x").
    TruncateAndWriteX,
}

impl HelperOp {
    const ALL: [HelperOp; 6] = [
        HelperOp::FlockExclusiveNonblocking,
        HelperOp::LockfSharedNonblocking,
        HelperOp::OpenWrite,
        HelperOp::AppendX,
        HelperOp::Truncate2,
        HelperOp::TruncateAndWriteX,
    ];

    fn name(self) -> String {
        format!("{self:?}")
    }

    /// Does the operation; Ok when it had the expected outcome.
    fn perform(self, path: &Path) -> Result<(), String> {
        use std::io::Write;
        let open =
            |opts: &mut fs::OpenOptions| opts.open(path).map_err(|e| format!("open {path:?}: {e}"));
        match self {
            HelperOp::FlockExclusiveNonblocking => {
                let f = open(fs::OpenOptions::new().read(true))?;
                match f.try_lock() {
                    Err(fs::TryLockError::WouldBlock) => Ok(()),
                    Ok(()) => Err("flock(LOCK_EX | LOCK_NB) was granted".into()),
                    Err(e) => Err(format!("flock: {e}")),
                }
            }
            HelperOp::LockfSharedNonblocking => {
                let f = open(fs::OpenOptions::new().read(true))?;
                nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETLK(&read_lock_whole_file()))
                    .map(drop)
                    .map_err(|e| format!("fcntl(F_SETLK, F_RDLCK): {e}"))
            }
            HelperOp::OpenWrite => open(fs::OpenOptions::new().write(true)).map(drop),
            HelperOp::AppendX => open(fs::OpenOptions::new().append(true).create(true))?
                .write_all(b"x")
                .map_err(|e| format!("write: {e}")),
            HelperOp::Truncate2 => {
                nix::unistd::truncate(path, 2).map_err(|e| format!("truncate: {e}"))
            }
            HelperOp::TruncateAndWriteX => open(
                fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true),
            )?
            .write_all(b"x")
            .map_err(|e| format!("write: {e}")),
        }
    }
}

/// The lock Python's `fcntl.lockf(f, LOCK_SH, 0, 0)` asks for: a read lock
/// from offset 0 to the end of the file, whatever its size.
pub fn read_lock_whole_file() -> libc::flock {
    libc::flock {
        l_type: libc::F_RDLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// A command running `op` on `path` in a helper process. /proc/self/exe,
/// not this binary's path, so that a helper switched to another user
/// reaches it whatever the permissions of the directories above it.
pub fn helper(op: HelperOp, path: impl AsRef<Path>) -> Command {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(["--exact", "child_helper", "--nocapture", "--test-threads=1"])
        .env(HELPER_OP, op.name())
        .env(HELPER_PATH, path.as_ref());
    cmd
}

/// Runs `op` on `name` in a helper process as user `uid` and group `gid`
/// without supplementary groups (as `setpriv --reuid --regid
/// --clear-groups`), working in `dir`: the directory, opened here, is its
/// standard input and it changes into it, so that it need not be able to
/// reach `dir` by path (scratch directories are private to root).
pub fn helper_as_user_in(dir: &Path, uid: u32, gid: u32, op: HelperOp, name: &str) -> Output {
    use std::os::unix::process::CommandExt;
    let dir_fd = fs::File::open(dir).unwrap_or_else(|e| panic!("open {dir:?}: {e}"));
    let mut cmd = helper(op, name);
    cmd.uid(uid).gid(gid).env(HELPER_CWD_IS_STDIN, "1");
    run_with_stdin(&mut cmd, Stdio::from(dir_fd), COMMAND_TIMEOUT)
}

/// The helper's side, called from each test binary's `child_helper` test:
/// in a helper process it does the operation and exits with its outcome;
/// anywhere else it returns at once.
pub fn helper_main() {
    let Some(op) = std::env::var_os(HELPER_OP) else {
        return;
    };
    let op = HelperOp::ALL
        .into_iter()
        .find(|o| std::ffi::OsStr::new(&o.name()) == op)
        .unwrap_or_else(|| panic!("unknown helper operation {op:?}"));
    let path = PathBuf::from(std::env::var_os(HELPER_PATH).expect("helper path"));
    if std::env::var_os(HELPER_CWD_IS_STDIN).is_some() {
        nix::unistd::fchdir(std::io::stdin()).expect("fchdir to the helper's standard input");
    }
    let code = match op.perform(&path) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("helper {op:?} {path:?}: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// The uid (and gid) of user `tests`, which rootless tests run as, with
/// the subordinate id ranges rootless podman and `unshare --map-auto` use
/// (scripts/test.sh creates the user and the ranges).
pub fn rootless_user() -> u32 {
    let id = run(Command::new("id").args(["-u", "tests"]));
    assert!(
        id.status.success(),
        "user 'tests' is missing (scripts/test.sh creates it)"
    );
    for file in ["/etc/subuid", "/etc/subgid"] {
        let ranges = fs::read_to_string(file).unwrap_or_default();
        assert!(
            ranges.lines().any(|l| l.starts_with("tests:")),
            "{file} gives user 'tests' no range (scripts/test.sh adds one)"
        );
    }
    String::from_utf8_lossy(&id.stdout).trim().parse().unwrap()
}

pub const URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

static PARAM_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A machine-wide kernel parameter (/sys/module, /proc/sys) set for one
/// test, and put back on drop.
pub struct KernelParam {
    path: &'static str,
    before: String,
}

impl KernelParam {
    pub fn set(path: &'static str, value: &str) -> KernelParam {
        let before = fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        fs::write(path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
        KernelParam {
            path,
            before: before.trim().to_string(),
        }
    }
}

impl Drop for KernelParam {
    fn drop(&mut self) {
        let _ = fs::write(self.path, &self.before);
    }
}

/// `fuse.enable_uring` (the machine's) set for one test, and put back on
/// drop. The tests that set it, or other parameters beside it, hold one
/// lock while they do, and cargo runs test binaries one at a time, so no
/// other mount of the tests sees it change under it. Declared before the
/// lock, the parameter is put back before the lock is released.
pub struct UringParam {
    _param: KernelParam,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl UringParam {
    pub fn set(on: bool) -> UringParam {
        let lock = PARAM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        UringParam {
            _param: KernelParam::set(URING_PARAM, if on { "Y" } else { "N" }),
            _lock: lock,
        }
    }
}
