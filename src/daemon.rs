//! The daemon's life: detach like mount(8) (return once the mount answers),
//! serve, unmount cleanly on SIGTERM/SIGINT, and `unionfs umount`.

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};
use nix::errno::Errno;
use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::WaitStatus;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::cli::UmountArgs;
use crate::config::{ValidMount, mounted_by_unionfs};
use crate::fuse::{AdapterOptions, AsyncNotifier, UnionFs};
use crate::overlay::idmap::{self, IdShift};
use crate::overlay::{Overlay, OverlayConfig};
use crate::sys::{self, Forked};

const PID_DIR: &str = "/run/unionfs";

/// Opened before forking: an unusable path is reported to the caller at
/// once, and the detached daemon gets a file it knows it can write.
fn open_log_file(path: Option<&Path>) -> Result<Option<File>, String> {
    path.map(|path| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                format!(
                    "cannot open log file '{}': {e} (pass a writable --log-file)",
                    path.display()
                )
            })
    })
    .transpose()
}

fn init_logging(debug: bool, log_file: Option<File>) -> Result<(), String> {
    let default = if debug {
        "unionfs=debug,fuser=info"
    } else {
        "unionfs=warn,fuser=error"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match log_file {
        Some(file) => builder
            .with_ansi(false)
            .with_writer(Arc::new(file))
            .try_init(),
        // Colour codes only for a person at a terminal: in a pipe or a
        // redirected file they are noise for whoever reads it.
        None => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init(),
    }
    .map_err(|e| format!("cannot start logging: {e}"))
}

/// What a detached daemon sends its waiting caller once the mount answers;
/// anything else it sends is the reason it failed.
const READY: &str = "ok";

/// A detached daemon's line to the `unionfs mount` process waiting for it.
struct ReadyPipe(Option<File>);

impl ReadyPipe {
    /// Tells the caller the mount is ready and lets go of its terminal.
    fn ready(&mut self) {
        if let Some(mut pipe) = self.0.take() {
            detach_stdio();
            let _ = pipe.write_all(READY.as_bytes());
        }
    }

    /// Hands the caller the reason; false once it is no longer waiting.
    fn fail(&mut self, msg: &str) -> bool {
        match self.0.take() {
            Some(mut pipe) => pipe.write_all(msg.as_bytes()).is_ok(),
            None => false,
        }
    }
}

/// Mounts and serves. In the background mode the parent process returns
/// (exit 0) only once the child has mounted and the kernel has completed the
/// FUSE handshake, or prints the child's error and fails.
pub fn mount(mount: ValidMount) -> Result<(), String> {
    let log_file = open_log_file(mount.log_file.as_deref())?;
    // Left by a daemon that was killed; it would name the wrong process
    // if this mount fails before writing its own.
    remove_stale_pid_file(&mount.mountpoint);
    if mount.foreground {
        init_logging(mount.debug, log_file)?;
        log_warnings(&mount);
        return serve(&mount, &mut ReadyPipe(None));
    }
    let (ready_read, ready_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("pipe: {}", e.desc()))?;
    match sys::fork_single_threaded().map_err(|e| format!("fork: {e}"))? {
        Forked::Parent(child) => {
            drop(ready_write);
            drop(log_file);
            let mut message = String::new();
            let _ = File::from(ready_read).read_to_string(&mut message);
            if message == READY {
                return Ok(());
            }
            let status = nix::sys::wait::waitpid(child, None);
            if message.is_empty() {
                message = format!(
                    "the daemon exited before the mount was ready ({}); \
                     run the same mount with --foreground --debug to see why",
                    describe_exit(status)
                );
            }
            Err(message)
        }
        Forked::Child => {
            drop(ready_read);
            let _ = nix::unistd::setsid();
            let mut ready = ReadyPipe(Some(File::from(ready_write)));
            let logs_to_file = log_file.is_some();
            let result = init_logging(mount.debug, log_file).and_then(|()| {
                log_warnings(&mount);
                serve(&mount, &mut ready)
            });
            match result {
                Ok(()) => std::process::exit(0),
                Err(msg) => {
                    // Logged to the caller's stderr as well, it would
                    // print twice there.
                    if !ready.fail(&msg) || logs_to_file {
                        warn!("{msg}");
                    }
                    std::process::exit(1)
                }
            }
        }
    }
}

/// The caller saw the option warnings on its stderr already; a log file
/// keeps them with the rest of the mount's story.
fn log_warnings(mount: &ValidMount) {
    if mount.log_file.is_some() {
        for warning in &mount.warnings {
            warn!("{warning}");
        }
    }
}

fn describe_exit(status: nix::Result<WaitStatus>) -> String {
    match status {
        Ok(WaitStatus::Exited(_, code)) => format!("exit status {code}"),
        Ok(WaitStatus::Signaled(_, signal, _)) => format!("killed by {signal}"),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("wait: {}", e.desc()),
    }
}

fn session_config(mount: &ValidMount) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(mount.fsname.clone()),
        MountOption::Subtype("unionfs".into()),
        MountOption::DefaultPermissions,
        if mount.read_only() {
            MountOption::RO
        } else {
            MountOption::RW
        },
        if mount.options.nodev {
            MountOption::NoDev
        } else {
            MountOption::Dev
        },
        if mount.options.nosuid {
            MountOption::NoSuid
        } else {
            MountOption::Suid
        },
        if mount.options.noexec {
            MountOption::NoExec
        } else {
            MountOption::Exec
        },
    ];
    // Containers run as many users; the kernel checks permissions
    // (default_permissions), so everyone may be let in.
    config.acl = SessionACL::All;
    config.n_threads = Some(mount.threads.max(1));
    config.clone_fd = true;
    config
}

/// Mounts with type `fuse.unionfs` (fuser's own mount says plain `fuse`,
/// which hides what the mount is from mount(8), podman and `unionfs umount`).
/// Unprivileged callers fall back to fuser's fusermount3 path.
fn start_session(fs: UnionFs, mount: &ValidMount) -> Result<Session<UnionFs>, String> {
    let config = session_config(mount);
    let target = mount.mountpoint.display();
    match mount_fuse(mount)? {
        Some(fd) => Session::from_fd(fs, fd, SessionACL::All, config)
            .map_err(|e| format!("cannot start the FUSE session on '{target}': {e}")),
        None => Session::new(fs, &mount.mountpoint, &config).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound => {
                    " (mount as root, or install fusermount3 from the fuse3 package)"
                }
                _ => " (mount as root, or set user_allow_other in /etc/fuse.conf)",
            };
            // fusermount3 prints a line per option it drops before the
            // one that says why it failed.
            let text = e.to_string();
            let reason = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
            format!(
                "cannot mount on '{target}' without root, through fusermount3: {}{hint}",
                reason.trim()
            )
        }),
    }
}

/// The mounted FUSE device, or None when mount(2) is not allowed to this
/// process (then fusermount3 may do it).
fn mount_fuse(mount: &ValidMount) -> Result<Option<OwnedFd>, String> {
    use nix::mount::MsFlags;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    let dev = crate::config::open_fuse_device()?;
    let root_mode = fs::metadata(&mount.mountpoint)
        .map_err(|e| format!("mountpoint '{}': {e}", mount.mountpoint.display()))?
        .mode();
    let data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions,allow_other",
        dev.as_raw_fd(),
        root_mode & libc::S_IFMT,
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    let o = &mount.options;
    let mut flags = MsFlags::empty();
    flags.set(MsFlags::MS_RDONLY, mount.read_only());
    flags.set(MsFlags::MS_NODEV, o.nodev);
    flags.set(MsFlags::MS_NOSUID, o.nosuid);
    flags.set(MsFlags::MS_NOEXEC, o.noexec);
    match nix::mount::mount(
        Some(mount.fsname.as_str()),
        &mount.mountpoint,
        Some("fuse.unionfs"),
        flags,
        Some(data.as_str()),
    ) {
        Ok(()) => Ok(Some(dev)),
        Err(Errno::EPERM) => Ok(None),
        Err(e) => Err(format!(
            "cannot mount on '{}': {}",
            mount.mountpoint.display(),
            e.desc()
        )),
    }
}

/// Large trees keep one descriptor per live directory and layer (in the
/// daemon, and in the commands that walk a container's upper by descriptors).
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let ceiling = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_err() {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn serve(mount: &ValidMount, ready: &mut ReadyPipe) -> Result<(), String> {
    raise_fd_limit();
    // The caller's umask is applied per request (or not, under a default
    // ACL: overlay::acl); the daemon's own must not take more bits away.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    // Block the termination signals before any thread starts, so that only
    // the signal thread below receives them.
    let signals = termination_signals();
    signals
        .thread_block()
        .map_err(|e| format!("block signals: {}", e.desc()))?;

    let core = Overlay::new(&OverlayConfig {
        lowers: mount.lowers.clone(),
        upper: mount.upper.clone(),
        work: mount.work.clone(),
        volatile: mount.options.volatile,
        userxattr: mount.options.userxattr,
        ids: IdShift::new(
            mount.options.uid_map.clone(),
            mount.options.gid_map.clone(),
            mount.options.squash(),
            idmap::system_overflow_ids(),
        ),
        static_nlink: mount.options.static_nlink,
        no_acl: mount.options.noacl,
    })
    .map_err(|e| {
        if e.op() == crate::overlay::workdir::IN_USE {
            let work = mount.work.as_deref().unwrap_or(Path::new("?"));
            format!(
                "work directory '{}' is in use by another mount; an upper and work \
                 directory serve one mount at a time (unmount the other one first)",
                work.display()
            )
        } else {
            format!("cannot open layers: {e}")
        }
    })?;
    let core = Arc::new(core);
    let fs = UnionFs::new(
        core.clone(),
        AdapterOptions {
            passthrough: mount.options.passthrough,
            lower_passthrough: mount.options.lower_passthrough,
            posix_acl: !mount.options.noacl,
        },
    );
    let session = start_session(fs, mount)?;
    info!(mountpoint = %mount.mountpoint.display(), layers = core.layers().len(), "mounted");
    let layer_dirs: Vec<PathBuf> = mount.upper.iter().chain(&mount.lowers).cloned().collect();
    crate::readahead::match_layers(
        &mount.mountpoint,
        &layer_dirs,
        u64::from(crate::fuse::MAX_READAHEAD / 1024),
    );
    let notifier = AsyncNotifier::start(session.notifier())
        .map_err(|e| format!("spawn invalidation thread: {e}"))?;
    core.set_kernel_cache(Box::new(notifier));

    let pid_file = write_pid_file(&mount.mountpoint);
    let mountpoint = mount.mountpoint.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                info!(?signal, "unmounting on signal");
                unmount(&mountpoint, false).ok();
            }
        })
        .map_err(|e| format!("spawn signal thread: {e}"))?;

    ready.ready();
    let result = session.run();
    // A new mount on the same mountpoint may already have written its own
    // pid there: remove the file only while it is still ours.
    if let Some(path) = pid_file
        && PidRecord::read(&path).is_some_and(|r| r.pid == PidRecord::own().pid)
    {
        let _ = fs::remove_file(path);
    }
    result.map_err(|e| format!("FUSE session ended with an error: {e}"))
}

fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// A detached daemon must not hold its caller's pipes open (podman and
/// other callers wait for EOF on them).
fn detach_stdio() {
    if let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

/// Where the daemon serving `mountpoint` (canonical) records its pid.
pub fn pid_file_for(mountpoint: &Path) -> PathBuf {
    // FNV-1a of the canonical path: stable, short, and free of slashes.
    let mut hash: u64 = 0xcbf29ce484222325;
    for b in mountpoint.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    Path::new(PID_DIR).join(format!("{hash:016x}.pid"))
}

/// A pid file's content: the daemon's pid and its start time (clock ticks
/// after boot, /proc/PID/stat field 22). A daemon that was killed leaves
/// its file behind, and its pid may go to another process; the start time
/// tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PidRecord {
    pid: i32,
    /// None in files of earlier versions, which wrote the pid alone.
    start: Option<u64>,
}

/// A process as /proc/PID/stat shows it.
struct ProcStat {
    zombie: bool,
    start: u64,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the
    // fields after its closing parenthesis start at field 3.
    let after_name: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(ProcStat {
        zombie: after_name.first()? == &"Z",
        start: after_name.get(22 - 3)?.parse().ok()?,
    })
}

impl PidRecord {
    fn own() -> PidRecord {
        let pid = std::process::id() as i32;
        PidRecord {
            pid,
            start: proc_stat(pid).map(|s| s.start),
        }
    }

    fn read(path: &Path) -> Option<PidRecord> {
        let text = fs::read_to_string(path).ok()?;
        let mut fields = text.split_whitespace();
        let pid = fields.next()?.parse().ok().filter(|pid| *pid > 0)?;
        let start = fields.next().and_then(|s| s.parse().ok());
        Some(PidRecord { pid, start })
    }

    fn line(&self) -> String {
        match self.start {
            Some(start) => format!("{} {start}\n", self.pid),
            None => format!("{}\n", self.pid),
        }
    }

    /// Whether the daemon that wrote this is still running.
    fn is_live(&self) -> bool {
        let Some(stat) = proc_stat(self.pid) else {
            return false;
        };
        if stat.zombie {
            return false;
        }
        match self.start {
            Some(start) => stat.start == start,
            // No start time: the best left is whether it runs unionfs.
            None => fs::read_link(format!("/proc/{}/exe", self.pid)).is_ok_and(|exe| {
                exe.file_name().is_some_and(|name| {
                    // " (deleted)": the binary was replaced by an upgrade.
                    matches!(name.as_encoded_bytes(), b"unionfs" | b"unionfs (deleted)")
                })
            }),
        }
    }
}

/// The pid of the live daemon serving `mountpoint` (canonical), if its pid
/// file names one.
pub fn daemon_pid(mountpoint: &Path) -> Option<i32> {
    PidRecord::read(&pid_file_for(mountpoint))
        .filter(PidRecord::is_live)
        .map(|r| r.pid)
}

/// Removes the pid file of `mountpoint` if the daemon it names is gone.
fn remove_stale_pid_file(mountpoint: &Path) {
    let path = pid_file_for(mountpoint);
    if let Some(record) = PidRecord::read(&path)
        && !record.is_live()
        // Not if a new daemon has written its own meanwhile.
        && PidRecord::read(&path) == Some(record)
    {
        info!(pid = record.pid, path = %path.display(), "removing a stale pid file");
        let _ = fs::remove_file(&path);
    }
}

fn write_pid_file(mountpoint: &Path) -> Option<PathBuf> {
    let path = pid_file_for(mountpoint);
    fs::create_dir_all(PID_DIR).ok()?;
    fs::write(&path, PidRecord::own().line()).ok()?;
    Some(path)
}

fn unmount(mountpoint: &Path, lazy: bool) -> Result<(), Errno> {
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    match umount2(mountpoint, flags) {
        Err(Errno::EBUSY) if !lazy => {
            warn!(mountpoint = %mountpoint.display(), "mount busy; detaching lazily");
            umount2(mountpoint, MntFlags::MNT_DETACH)
        }
        other => other,
    }
}

/// `unionfs umount`: unmount, then wait for the daemon to finish and exit
/// (`--lazy`: detach and return).
pub fn umount(args: &UmountArgs) -> Result<(), String> {
    let mountpoint = canonical_mountpoint(&args.mountpoint)?;
    if !mounted_by_unionfs(&mountpoint) {
        remove_stale_pid_file(&mountpoint);
        return Err(format!("'{}' is not a unionfs mount", mountpoint.display()));
    }
    // Only a live daemon is waited for: a killed one's pid may belong to
    // another process by now.
    let daemon = PidRecord::read(&pid_file_for(&mountpoint)).filter(PidRecord::is_live);
    let flags = if args.lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    umount2(&mountpoint, flags).map_err(|e| {
        format!(
            "cannot unmount '{}': {}{}",
            mountpoint.display(),
            e.desc(),
            if e == Errno::EBUSY {
                " (in use; --lazy detaches it anyway)"
            } else {
                ""
            }
        )
    })?;
    let Some(daemon) = daemon else {
        remove_stale_pid_file(&mountpoint);
        return Ok(());
    };
    // A lazily detached mount stays alive while it is in use, and so does
    // its daemon: waiting for it could take forever.
    if args.lazy {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while daemon.is_live() {
        if Instant::now() >= deadline {
            return Err(format!(
                "unmounted, but the daemon (pid {}) has not exited after {}s",
                daemon.pid, args.timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The daemon removes its own file, unless it was killed on the way.
    remove_stale_pid_file(&mountpoint);
    Ok(())
}

/// The canonical path of a mountpoint. A FUSE mount whose daemon is gone
/// fails every lookup; its parent's canonical path and its name still say
/// where it is.
fn canonical_mountpoint(path: &Path) -> Result<PathBuf, String> {
    let error = match path.canonicalize() {
        Ok(path) => return Ok(path),
        Err(e) => e,
    };
    if is_dead_fuse_mount(&error)
        && let Some(name) = path.file_name()
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Ok(parent) = parent.canonicalize() {
            return Ok(parent.join(name));
        }
    }
    Err(format!("'{}': {error}", path.display()))
}

/// Whether an error is what a FUSE mount answers once its daemon is gone
/// (ECONNABORTED after the kernel aborted the connection, ENOTCONN).
pub fn is_dead_fuse_mount(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOTCONN | libc::ECONNABORTED)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_records_tell_the_writer_from_a_reused_pid() {
        let own = PidRecord::own();
        assert!(own.start.is_some());
        assert!(own.is_live());
        let reused = PidRecord {
            start: own.start.map(|s| s + 1),
            ..own
        };
        assert!(!reused.is_live(), "same pid, other start time");
        // Without a start time (earlier versions), the executable decides:
        // this test binary is not unionfs.
        assert!(!PidRecord { start: None, ..own }.is_live());
    }

    #[test]
    fn pid_files_parse_in_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pid");
        for (text, expected) in [
            ("123 456\n", Some((123, Some(456)))),
            ("123\n", Some((123, None))),
            ("0\n", None),
            ("junk\n", None),
            ("", None),
        ] {
            fs::write(&path, text).unwrap();
            let got = PidRecord::read(&path).map(|r| (r.pid, r.start));
            assert_eq!(got, expected, "{text:?}");
        }
        let record = PidRecord {
            pid: 7,
            start: Some(9),
        };
        fs::write(&path, record.line()).unwrap();
        assert_eq!(PidRecord::read(&path), Some(record));
    }
}
