//! The daemon's life: detach like mount(8) (return once the mount answers),
//! serve, unmount cleanly on SIGTERM/SIGINT, and `unionfs umount`.

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, Session, SessionACL};
use nix::errno::Errno;
use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::{geteuid, getuid};
use tracing::{debug, info, warn};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::UmountArgs;
use crate::config::{Access, ValidMount, mounted_by_unionfs};
use crate::fuse::{AdapterOptions, AsyncNotifier, Rings, UnionFs};
use crate::overlay::idmap::{self, IdShift};
use crate::overlay::{Overlay, OverlayConfig};
use crate::sys::{self, Forked};

/// Where root's daemons record their pids (see `pid_dirs` for the others).
const ROOT_PID_DIR: &str = "/run/unionfs";

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
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref(), default);
    let format = tracing_subscriber::fmt::layer().with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    match log_file {
        Some(file) => registry
            .with(format.with_ansi(false).with_writer(Arc::new(file)))
            .try_init(),
        // Colour codes only for a person at a terminal: in a pipe or a
        // redirected file they are noise for whoever reads it.
        None => registry
            .with(
                format
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    }
    .map_err(|e| format!("cannot start logging: {e}"))
}

/// The log levels: RUST_LOG's `target=level,...` list if set and valid,
/// else the default. Targets, not EnvFilter: EnvFilter's span and field
/// filters bring the regex engines into the binary, and their code pages
/// into every daemon's resident memory. A variable set for some other
/// program must not stop a mount: an unreadable one is reported and left.
fn log_filter(rust_log: Option<&str>, default: &str) -> Targets {
    let fallback = || default.parse().expect("the default log filter parses");
    match rust_log.filter(|v| !v.trim().is_empty()) {
        Some(value) => value.parse().unwrap_or_else(|e| {
            eprintln!(
                "unionfs: warning: ignoring RUST_LOG='{value}': {e} \
                 (expected LEVEL or TARGET=LEVEL, comma-separated)"
            );
            fallback()
        }),
        None => fallback(),
    }
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

/// The glibc tunable of the per-thread cache of freed blocks.
const MALLOC_THREAD_CACHE: &str = "glibc.malloc.tcache_count";
/// Set in the environment of the program run again, so that it is run
/// again once only: glibc 2.36 rewrites GLIBC_TUNABLES as it reads it, and
/// may show less than it was given.
pub const RESTARTED_FOR_MALLOC: &str = "UNIONFS_RESTARTED_FOR_MALLOC";

/// Runs this program again with glibc's per-thread cache of freed blocks
/// turned off, unless GLIBC_TUNABLES already sets it (then, or if the exec
/// fails, it returns and the mount goes on as it is). That cache keeps up to
/// seven freed blocks of each small size per thread, scattered over the
/// heap where malloc_trim cannot hand their pages back: after the kernel
/// forgot a 20k-file walk's nodes they kept an idle daemon at 4.7 MiB RSS
/// instead of 3.4 (walk time unchanged). The cache can only be turned off
/// before a process starts, by the tunable. The pid stays the same.
pub fn restart_without_malloc_thread_cache() {
    let tunables = std::env::var_os("GLIBC_TUNABLES").unwrap_or_default();
    if std::env::var_os(RESTARTED_FOR_MALLOC).is_some()
        || tunables.to_string_lossy().contains(MALLOC_THREAD_CACHE)
    {
        return;
    }
    let mut with_cache_off = tunables;
    if !with_cache_off.is_empty() {
        with_cache_off.push(":");
    }
    with_cache_off.push(format!("{MALLOC_THREAD_CACHE}=0"));
    let mut args = std::env::args_os();
    let Some(program) = args.next() else {
        return;
    };
    // Only returns on failure; /proc may be missing in odd sandboxes.
    let _ = Command::new("/proc/self/exe")
        .arg0(program)
        .args(args)
        .env("GLIBC_TUNABLES", with_cache_off)
        .env(RESTARTED_FOR_MALLOC, "1")
        .exec();
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

fn session_config(mount: &ValidMount, acl: SessionACL) -> Config {
    let mut config = Config::default();
    config.acl = acl;
    config.n_threads = Some(mount.threads.max(1));
    config.clone_fd = true;
    config
}

/// Who a mount made with mount(2) serves: everyone (`allow_other`, which
/// `mount_fuse` always sets). Containers run as many users, and the kernel
/// checks their permissions (default_permissions). That is root, or the
/// root of a user namespace, where the kernel lets only processes of that
/// namespace use an allow_other mount.
fn kernel_mount_acl(access: Access) -> SessionACL {
    match access {
        Access::AllowRoot => SessionACL::RootAndOwner,
        Access::Default | Access::AllowOther => SessionACL::All,
    }
}

/// Who a mount made through fusermount3 serves. fusermount3 is asked for
/// `allow_other` for anything but `Owner`, and grants it to a plain user
/// only when /etc/fuse.conf has `user_allow_other`: so by default it is
/// asked for only where it is granted. Without it the kernel sends the
/// requests of the mounting user alone, and `Owner` has the session check
/// the same.
fn fusermount_acl(access: Access, user_allow_other: impl FnOnce() -> bool) -> SessionACL {
    match access {
        Access::AllowOther => SessionACL::All,
        Access::AllowRoot => SessionACL::RootAndOwner,
        Access::Default if getuid().is_root() || user_allow_other() => SessionACL::All,
        Access::Default => SessionACL::Owner,
    }
}

/// Mounts with type `fuse.unionfs` (fuser's own mount says plain `fuse`,
/// which hides what the mount is from mount(8), podman and `unionfs umount`).
/// Callers who may not mount(2), plain users outside a user namespace, go
/// through fusermount3.
fn start_session(fs: UnionFs, mount: &ValidMount) -> Result<Session<UnionFs>, String> {
    let (fd, acl) = match mount_fuse(mount)? {
        Some(fd) => (fd, kernel_mount_acl(mount.options.access)),
        None => {
            let acl = fusermount_acl(mount.options.access, crate::config::user_allow_other);
            (mount_with_fusermount(mount, acl)?, acl)
        }
    };
    Session::from_fd(fs, fd, acl, session_config(mount, acl)).map_err(|e| {
        format!(
            "cannot start the FUSE session on '{}': {e}",
            mount.mountpoint.display()
        )
    })
}

/// The options fusermount3 mounts with. It mounts `nodev,nosuid` for a
/// plain user whatever is asked, and warns about each `dev` or `suid`.
fn fusermount_options(mount: &ValidMount, acl: SessionACL) -> String {
    let root = getuid().is_root();
    let o = &mount.options;
    // fusermount3 reads `\` as an escape, as libfuse writes `,` and `\`.
    let fsname = mount.fsname.replace('\\', "\\\\").replace(',', "\\,");
    let mut options = vec![
        format!("fsname={fsname}"),
        "subtype=unionfs".to_string(),
        "default_permissions".to_string(),
    ];
    let flags = [
        (mount.read_only(), "ro", Some("rw")),
        (o.noexec, "noexec", Some("exec")),
        (o.nodev, "nodev", root.then_some("dev")),
        (o.nosuid, "nosuid", root.then_some("suid")),
        (acl != SessionACL::Owner, "allow_other", None),
    ];
    for (set, yes, no) in flags {
        options.extend(if set { Some(yes) } else { no }.map(str::to_string));
    }
    options.join(",")
}

/// Has fusermount3 (setuid root) mount for this user, as libfuse does: it
/// opens /dev/fuse, mounts, and sends the descriptor back over a socket.
/// No fuser `Mount` exists for it, so the session never unmounts on its
/// own when it ends: fuser 0.18 would run `fusermount3 -u -z` on the
/// mountpoint then even after an unmount, and detach whatever was
/// mounted there since.
fn mount_with_fusermount(mount: &ValidMount, acl: SessionACL) -> Result<OwnedFd, String> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::os::fd::{AsFd, AsRawFd};

    let target = mount.mountpoint.display();
    let Some(fusermount) = fusermount() else {
        return Err(format!(
            "cannot mount on '{target}' without root: a plain user mounts FUSE through \
             fusermount3, which was not found (install it, from the fuse3 package, or mount as root)"
        ));
    };
    let options = fusermount_options(mount, acl);
    info!(
        fusermount = %fusermount.display(),
        %options,
        "mount(2) is not permitted here; mounting through fusermount3"
    );
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("socketpair: {}", e.desc()))?;
    let mut cmd = Command::new(&fusermount);
    cmd.arg("-o")
        .arg(&options)
        .arg("--")
        .arg(&mount.mountpoint)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    sys::inherit_fd(&mut cmd, theirs.as_fd());
    let child = cmd.spawn().map_err(|e| {
        format!(
            "cannot mount on '{target}' without root: cannot run {}: {e} \
             (install fusermount3, from the fuse3 package, or mount as root)",
            fusermount.display()
        )
    })?;
    drop(theirs);
    // Returns at the descriptor, or at end of stream when fusermount3 exits
    // without one.
    let received = sys::receive_fd(ours.as_fd());
    drop(ours);
    let output = child
        .wait_with_output()
        .map_err(|e| format!("wait for {}: {e}", fusermount.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        debug!("fusermount3: {line}");
    }
    match received {
        Ok(Some(fd)) => return Ok(fd),
        Ok(None) => {}
        Err(e) => debug!("no descriptor from fusermount3: {e}"),
    }
    // It prints a line per option it drops before the one that says why
    // it failed.
    let reason = stderr
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| format!("{} failed ({})", fusermount.display(), output.status));
    let hint = if reason.contains("user_allow_other") {
        "a plain user gets allow_other only with a line user_allow_other in /etc/fuse.conf: \
         add it there, or mount without -o allow_other or allow_root"
    } else if getuid().is_root() {
        "root without CAP_SYS_ADMIN may not mount, through fusermount3 either"
    } else {
        "fusermount3 mounts for a plain user on a directory that user may write to, and \
         must be installed setuid root; or mount as root"
    };
    Err(format!(
        "cannot mount on '{target}' without root, through fusermount3: {reason} ({hint})"
    ))
}

/// The setuid helper that mounts and unmounts FUSE for plain users, looked
/// for as fuser looks for it: `$FUSERMOUNT_PATH`, else fusermount3 (or
/// fusermount) on PATH or in /sbin, /bin, /usr/bin.
fn fusermount() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FUSERMOUNT_PATH") {
        return Some(PathBuf::from(path));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    dirs.extend(["/sbin", "/bin", "/usr/bin"].map(PathBuf::from));
    ["fusermount3", "fusermount"].iter().find_map(|name| {
        dirs.iter().map(|dir| dir.join(name)).find(|candidate| {
            fs::metadata(candidate).is_ok_and(|m| m.is_file())
                && nix::unistd::access(candidate, nix::unistd::AccessFlags::X_OK).is_ok()
        })
    })
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
    sys::tune_allocator();
    raise_fd_limit();
    // The caller's umask is applied per request (or not, under a default
    // ACL: overlay::acl); the daemon's own must not take more bits away.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    // Block the signals handled here before any thread starts, so that only
    // the signal thread below receives them.
    let signals = handled_signals();
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
    let rings = mount.options.io_uring.then(prepare_rings).flatten();
    let fs = UnionFs::new(
        core.clone(),
        AdapterOptions {
            passthrough: mount.options.passthrough,
            lower_passthrough: mount.options.lower_passthrough,
            posix_acl: !mount.options.noacl,
            answer_opendir: mount.options.access == Access::AllowRoot,
            cache_listings: !mount.options.nocache_readdir,
            offer_io_uring: rings.is_some(),
        },
    )
    .map_err(|e| format!("spawn memory thread: {e}"))?;
    let request_counts = fs.request_counts();
    let io_uring_taken = fs.io_uring_taken();
    let session = start_session(fs, mount)?;
    // Before anything else touches the mount: the kernel holds every
    // request until each queue has a ring entry.
    let ring_threads = match rings {
        Some(rings) if io_uring_taken.load(std::sync::atomic::Ordering::Relaxed) => {
            rings.start(&session).map_err(|e| {
                format!(
                    "cannot serve FUSE over io_uring: {e} (mount with -o noio_uring to use \
                     /dev/fuse alone)"
                )
            })?
        }
        _ => Vec::new(),
    };
    info!(io_uring = !ring_threads.is_empty(), "transport");
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
            while let Ok(signal) = signals.wait() {
                if signal == Signal::SIGUSR1 {
                    request_counts.log("requests so far");
                    continue;
                }
                info!(?signal, "unmounting on signal");
                unmount_on_signal(&mountpoint);
                break;
            }
        })
        .map_err(|e| format!("spawn signal thread: {e}"))?;

    ready.ready();
    // What parsing, mounting and the caller's half of the fork left free.
    sys::release_free_memory();
    let result = session.run_with_workers(ring_threads);
    // A new mount on the same mountpoint may already have written its own
    // pid there: remove the file only while it is still ours.
    if let Some(path) = pid_file
        && PidRecord::read(&path).is_some_and(|r| r.pid == PidRecord::own().pid)
    {
        let _ = fs::remove_file(path);
    }
    result.map_err(|e| format!("FUSE session ended with an error: {e}"))
}

/// Rings for FUSE over io_uring, unless the kernel has it switched off or
/// io_uring is not allowed here (then /dev/fuse alone serves).
fn prepare_rings() -> Option<Rings> {
    let enabled = fs::read_to_string("/sys/module/fuse/parameters/enable_uring");
    if enabled.is_ok_and(|v| v.trim() == "N") {
        return None;
    }
    let payload = crate::fuse::MAX_WRITE.max(crate::fuse::MAX_READAHEAD) as usize;
    match Rings::prepare(payload) {
        Ok(rings) => Some(rings),
        Err(e) => {
            debug!(error = %e, "no FUSE over io_uring: cannot make the rings");
            None
        }
    }
}

/// The termination signals, and SIGUSR1, which logs the request counts.
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.add(Signal::SIGUSR1);
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

/// The name of the pid file of the daemon serving `mountpoint` (canonical),
/// in whichever of `pid_dirs` it is.
pub fn pid_file_name(mountpoint: &Path) -> String {
    // FNV-1a of the canonical path: stable, short, and free of slashes.
    let mut hash: u64 = 0xcbf29ce484222325;
    for b in mountpoint.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x100000001b3);
    }
    format!("{hash:016x}.pid")
}

/// The directories this user's daemons record their pids in, the first
/// one that works taken: /run/unionfs for root; `$XDG_RUNTIME_DIR/unionfs`
/// (a plain user's own, where podman keeps its runtime files), and
/// `/run/user/UID/unionfs` where that is the runtime directory; then
/// `/tmp/unionfs-UID`. A daemon and the `unionfs umount` for it may not
/// see the same environment, so umount looks in all of them. UID is the
/// user's id outside its user namespace: roots of different users'
/// namespaces do not share a directory.
fn pid_dirs() -> Vec<PathBuf> {
    let euid = geteuid();
    let uid = outer_uid(euid.as_raw());
    let mut dirs = Vec::new();
    if euid.is_root() {
        dirs.push(PathBuf::from(ROOT_PID_DIR));
    }
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && runtime.is_absolute()
    {
        dirs.push(runtime.join("unionfs"));
    }
    let login_runtime = PathBuf::from(format!("/run/user/{uid}/unionfs"));
    if !dirs.contains(&login_runtime) {
        dirs.push(login_runtime);
    }
    dirs.push(PathBuf::from(format!("/tmp/unionfs-{uid}")));
    dirs
}

/// `uid` as the parent user namespace knows it (/proc/self/uid_map maps
/// ids here to ids there); itself outside any user namespace.
fn outer_uid(uid: u32) -> u32 {
    map_id(
        &fs::read_to_string("/proc/self/uid_map").unwrap_or_default(),
        uid,
    )
}

/// `id` through an id map (lines `inside outside count`); itself where the
/// map does not cover it.
fn map_id(map: &str, id: u32) -> u32 {
    map.lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace().map(|f| f.parse::<u64>().ok());
            let (inside, outside, count) = (fields.next()??, fields.next()??, fields.next()??);
            let offset = u64::from(id).checked_sub(inside).filter(|o| *o < count)?;
            u32::try_from(outside + offset).ok()
        })
        .unwrap_or(id)
}

/// The pid files a daemon serving `mountpoint` may have written, most
/// preferred first.
fn pid_files(mountpoint: &Path) -> Vec<PathBuf> {
    let name = pid_file_name(mountpoint);
    pid_dirs().into_iter().map(|dir| dir.join(&name)).collect()
}

/// The pid file of the daemon serving `mountpoint` (canonical): the first
/// of this user's pid directories that has one, else where a daemon of
/// this user would write it first.
pub fn pid_file_for(mountpoint: &Path) -> PathBuf {
    let files = pid_files(mountpoint);
    files
        .iter()
        .find(|f| f.exists())
        .unwrap_or(&files[0])
        .clone()
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

/// The live daemon serving `mountpoint` (canonical), if a pid file names one.
fn live_daemon(mountpoint: &Path) -> Option<PidRecord> {
    pid_files(mountpoint)
        .iter()
        .filter_map(|path| PidRecord::read(path))
        .find(PidRecord::is_live)
}

/// The pid of the live daemon serving `mountpoint` (canonical), if its pid
/// file names one.
pub fn daemon_pid(mountpoint: &Path) -> Option<i32> {
    live_daemon(mountpoint).map(|r| r.pid)
}

/// Removes the pid files of `mountpoint` whose daemon is gone.
fn remove_stale_pid_file(mountpoint: &Path) {
    for path in pid_files(mountpoint) {
        if let Some(record) = PidRecord::read(&path)
            && !record.is_live()
            // Not if a new daemon has written its own meanwhile.
            && PidRecord::read(&path) == Some(record)
        {
            info!(pid = record.pid, path = %path.display(), "removing a stale pid file");
            let _ = fs::remove_file(&path);
        }
    }
}

/// Makes `dir` (mode `mode`) if it is not there, and says whether this
/// user may keep pid files in it: a directory it owns, which no one else
/// may write to (one that others may write to is made private first).
fn usable_pid_dir(dir: &Path, mode: u32) -> bool {
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            debug!(dir = %dir.display(), "no pid directory here: {e}");
            return false;
        }
    }
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return false;
    };
    if !meta.is_dir() || meta.uid() != geteuid().as_raw() {
        debug!(dir = %dir.display(), "no pid directory here: not a directory of this user");
        return false;
    }
    // Earlier versions made /run/unionfs under the daemon's umask 0.
    meta.mode() & 0o022 == 0
        || fs::set_permissions(dir, fs::Permissions::from_mode(meta.mode() & 0o7755)).is_ok()
}

/// Records this daemon's pid for `unionfs umount`, in the first of
/// `pid_dirs` that takes it.
fn write_pid_file(mountpoint: &Path) -> Option<PathBuf> {
    let name = pid_file_name(mountpoint);
    for dir in pid_dirs() {
        let mode = if dir == Path::new(ROOT_PID_DIR) {
            0o755
        } else {
            0o700
        };
        if !usable_pid_dir(&dir, mode) {
            continue;
        }
        let path = dir.join(&name);
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&path)
            .and_then(|mut file| file.write_all(PidRecord::own().line().as_bytes()));
        match written {
            Ok(()) => return Some(path),
            Err(e) => debug!(path = %path.display(), "cannot write the pid file: {e}"),
        }
    }
    warn!("no directory takes the pid file; `unionfs umount` will not wait for this daemon");
    None
}

/// Why an unmount failed.
struct UnmountError {
    message: String,
    busy: bool,
}

impl UnmountError {
    fn from_errno(e: Errno) -> UnmountError {
        UnmountError {
            message: e.desc().to_string(),
            busy: e == Errno::EBUSY,
        }
    }
}

/// Unmounts `mountpoint` (canonical) with umount2(2); where that is not
/// permitted (a plain user's mount, made by fusermount3), through
/// `fusermount3 -u` (`-z` when lazy), which unmounts a FUSE mount for the
/// user who mounted it.
fn unmount(mountpoint: &Path, lazy: bool) -> Result<(), UnmountError> {
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    match umount2(mountpoint, flags) {
        Ok(()) => Ok(()),
        Err(Errno::EPERM) => unmount_with_fusermount(mountpoint, lazy),
        Err(e) => Err(UnmountError::from_errno(e)),
    }
}

fn unmount_with_fusermount(mountpoint: &Path, lazy: bool) -> Result<(), UnmountError> {
    let denied = |why: String| UnmountError {
        message: format!("{} ({why})", Errno::EPERM.desc()),
        busy: false,
    };
    let uid = getuid().as_raw();
    match crate::mountinfo::mount_at(mountpoint).and_then(|m| fuse_owner(&m.super_options)) {
        Some(owner) if owner == uid => {}
        Some(owner) => {
            return Err(denied(format!(
                "uid {owner} mounted it: only that user or root may unmount it"
            )));
        }
        None => return Err(denied("only root may unmount it".into())),
    }
    let Some(fusermount) = fusermount() else {
        return Err(denied(
            "a plain user unmounts through fusermount3, which was not found: \
             install it, from the fuse3 package"
                .into(),
        ));
    };
    let mut cmd = Command::new(&fusermount);
    cmd.arg("-u");
    if lazy {
        cmd.arg("-z");
    }
    let output = cmd
        .arg("--")
        .arg(mountpoint)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| UnmountError {
            message: format!("cannot run {}: {e}", fusermount.display()),
            busy: false,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = stderr
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    Err(UnmountError {
        message: if reason.is_empty() {
            format!("{} failed ({})", fusermount.display(), output.status)
        } else {
            reason.to_string()
        },
        busy: reason.ends_with(Errno::EBUSY.desc()),
    })
}

/// The user a FUSE mount belongs to, from its super options (`user_id=`).
fn fuse_owner(super_options: &str) -> Option<u32> {
    super_options
        .split(',')
        .find_map(|o| o.strip_prefix("user_id="))
        .and_then(|uid| uid.parse().ok())
}

/// What the daemon does on SIGTERM, SIGINT or SIGHUP: unmount, lazily if
/// the mount is busy; the session then ends.
fn unmount_on_signal(mountpoint: &Path) {
    let result = match unmount(mountpoint, false) {
        Err(e) if e.busy => {
            warn!(mountpoint = %mountpoint.display(), "mount busy; detaching lazily");
            unmount(mountpoint, true)
        }
        other => other,
    };
    if let Err(e) = result {
        warn!(mountpoint = %mountpoint.display(), "cannot unmount: {}", e.message);
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
    let daemon = live_daemon(&mountpoint);
    unmount(&mountpoint, args.lazy).map_err(|e| {
        format!(
            "cannot unmount '{}': {}{}",
            mountpoint.display(),
            e.message,
            if e.busy && !args.lazy {
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
/// fails every lookup, and one without allow_other every lookup by other
/// users; its parent's canonical path and its name still say where it is.
fn canonical_mountpoint(path: &Path) -> Result<PathBuf, String> {
    let error = match path.canonicalize() {
        Ok(path) => return Ok(path),
        Err(e) => e,
    };
    // EACCES: another user's FUSE mount, without allow_other.
    if (is_dead_fuse_mount(&error) || error.kind() == std::io::ErrorKind::PermissionDenied)
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
    fn rust_log_sets_levels_by_target_and_a_bad_one_leaves_the_default() {
        use tracing::Level;
        let default = "unionfs=warn,fuser=error";
        let stats = log_filter(Some("unionfs=warn,unionfs::fuse::stats=debug"), default);
        assert!(stats.would_enable("unionfs::fuse::stats", &Level::DEBUG));
        assert!(!stats.would_enable("unionfs::overlay", &Level::INFO));
        let plain = log_filter(Some("debug"), default);
        assert!(plain.would_enable("fuser::session", &Level::DEBUG));
        for unset in [None, Some(""), Some("unionfs=loud")] {
            let filter = log_filter(unset, default);
            assert!(
                filter.would_enable("unionfs::daemon", &Level::WARN),
                "{unset:?}"
            );
            assert!(
                !filter.would_enable("unionfs::daemon", &Level::INFO),
                "{unset:?}"
            );
        }
    }

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

    fn valid_mount(fsname: &str, options: crate::config::MountOptions) -> ValidMount {
        ValidMount {
            lowers: vec![PathBuf::from("/l")],
            upper: Some(PathBuf::from("/u")),
            work: Some(PathBuf::from("/w")),
            mountpoint: PathBuf::from("/m"),
            fsname: fsname.into(),
            options,
            foreground: false,
            threads: 1,
            debug: false,
            log_file: None,
            warnings: Vec::new(),
        }
    }

    #[test]
    fn fusermount3_gets_the_mount_options() {
        use crate::config::MountOptions;
        // These tests run as root: fusermount3 would take dev and suid.
        assert!(getuid().is_root());
        let mount = valid_mount("unionfs-container:a,b\\c", MountOptions::default());
        assert_eq!(
            fusermount_options(&mount, SessionACL::Owner),
            "fsname=unionfs-container:a\\,b\\\\c,subtype=unionfs,default_permissions,rw,exec,dev,suid"
        );
        let options = MountOptions {
            read_only: true,
            nodev: true,
            nosuid: true,
            noexec: true,
            ..MountOptions::default()
        };
        assert_eq!(
            fusermount_options(&valid_mount("x", options), SessionACL::All),
            "fsname=x,subtype=unionfs,default_permissions,ro,noexec,nodev,nosuid,allow_other"
        );
    }

    #[test]
    fn allow_other_is_asked_for_where_it_is_granted() {
        // Root: fusermount3 grants it whatever fuse.conf says.
        assert_eq!(fusermount_acl(Access::Default, || false), SessionACL::All);
        assert_eq!(
            fusermount_acl(Access::AllowOther, || false),
            SessionACL::All
        );
        assert_eq!(
            fusermount_acl(Access::AllowRoot, || true),
            SessionACL::RootAndOwner
        );
        assert_eq!(kernel_mount_acl(Access::Default), SessionACL::All);
        assert_eq!(
            kernel_mount_acl(Access::AllowRoot),
            SessionACL::RootAndOwner
        );
    }

    #[test]
    fn fuse_mounts_name_their_owner() {
        assert_eq!(
            fuse_owner("rw,user_id=1001,group_id=1001,default_permissions"),
            Some(1001)
        );
        assert_eq!(fuse_owner("rw,size=10k"), None);
        assert_eq!(fuse_owner("rw,user_id=x"), None);
    }

    #[test]
    fn ids_map_to_the_parent_namespace() {
        assert_eq!(map_id("         0          0 4294967295\n", 1001), 1001);
        // unshare -Ur as uid 1001; a subuid range.
        assert_eq!(map_id("0 1001 1\n", 0), 1001);
        assert_eq!(map_id("0 1001 1\n1 100000 65536\n", 1000), 100999);
        assert_eq!(map_id("0 1001 1\n", 5), 5);
        assert_eq!(map_id("", 7), 7);
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
