//! The daemon's life: detach like mount(8) (return once the mount answers),
//! serve, unmount cleanly on SIGTERM/SIGINT, and `unionfs umount`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{Config, MountOption, Session, SessionACL};
use nix::errno::Errno;
use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::cli::UmountArgs;
use crate::config::{ValidMount, mounted_by_unionfs};
use crate::fuse::{AdapterOptions, AsyncNotifier, UnionFs};
use crate::overlay::{Overlay, OverlayConfig};
use crate::sys::{self, Forked};

const PID_DIR: &str = "/run/unionfs";

fn init_logging(debug: bool, log_file: Option<&Path>) -> Result<(), String> {
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
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("log file '{}': {e}", path.display()))?;
            builder.with_ansi(false).with_writer(Arc::new(file)).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

/// Mounts and serves. In the background mode the parent process returns
/// (exit 0) only once the child has mounted and the kernel has completed the
/// FUSE handshake, or prints the child's error and fails.
pub fn mount(mount: ValidMount) -> Result<(), String> {
    if mount.foreground {
        init_logging(mount.debug, mount.log_file.as_deref())?;
        return serve(&mount, None);
    }
    let (ready_read, ready_write) =
        nix::unistd::pipe().map_err(|e| format!("pipe: {}", e.desc()))?;
    match sys::fork_single_threaded().map_err(|e| format!("fork: {e}"))? {
        Forked::Parent(child) => {
            drop(ready_write);
            let mut message = String::new();
            let _ = File::from(ready_read).read_to_string(&mut message);
            if message == "ok" {
                return Ok(());
            }
            let _ = nix::sys::wait::waitpid(child, None);
            if message.is_empty() {
                message = "the daemon exited before the mount was ready".into();
            }
            Err(message)
        }
        Forked::Child => {
            drop(ready_read);
            let _ = nix::unistd::setsid();
            let logged = init_logging(mount.debug, mount.log_file.as_deref());
            let result = logged.and_then(|()| serve(&mount, Some(ready_write)));
            match result {
                Ok(()) => std::process::exit(0),
                Err(msg) => {
                    warn!("{msg}");
                    std::process::exit(1)
                }
            }
        }
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
fn start_session(fs: UnionFs, mount: &ValidMount) -> std::io::Result<Session<UnionFs>> {
    let config = session_config(mount);
    match mount_fuse(mount) {
        Ok(fd) => Session::from_fd(fs, fd, SessionACL::All, config),
        Err(Errno::EPERM) => Session::new(fs, &mount.mountpoint, &config),
        Err(e) => Err(e.into()),
    }
}

fn mount_fuse(mount: &ValidMount) -> Result<OwnedFd, Errno> {
    use nix::fcntl::{OFlag, open};
    use nix::mount::MsFlags;
    use nix::sys::stat::Mode;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    let dev = open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())?;
    let root_mode = fs::metadata(&mount.mountpoint)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?
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
    nix::mount::mount(
        Some(mount.fsname.as_str()),
        &mount.mountpoint,
        Some("fuse.unionfs"),
        flags,
        Some(data.as_str()),
    )?;
    Ok(dev)
}

/// Large trees keep one descriptor per live directory and layer.
fn raise_fd_limit() {
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

fn serve(mount: &ValidMount, ready: Option<OwnedFd>) -> Result<(), String> {
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
    })
    .map_err(|e| format!("cannot open layers: {e}"))?;
    let core = Arc::new(core);
    let fs = UnionFs::new(
        core.clone(),
        AdapterOptions {
            passthrough: mount.options.passthrough,
            lower_passthrough: mount.options.lower_passthrough,
        },
    );
    let session = start_session(fs, mount)
        .map_err(|e| format!("cannot mount on '{}': {e}", mount.mountpoint.display()))?;
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

    if let Some(ready) = ready {
        detach_stdio();
        let _ = File::from(ready).write_all(b"ok");
    }
    let result = session.run();
    // A new mount on the same mountpoint may already have written its own
    // pid there: remove the file only while it is still ours.
    if let Some(path) = pid_file
        && fs::read_to_string(&path).is_ok_and(|s| s.trim() == std::process::id().to_string())
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

fn write_pid_file(mountpoint: &Path) -> Option<PathBuf> {
    let path = pid_file_for(mountpoint);
    fs::create_dir_all(PID_DIR).ok()?;
    fs::write(&path, format!("{}\n", std::process::id())).ok()?;
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

/// `unionfs umount`: unmount, then wait for the daemon to finish and exit.
pub fn umount(args: &UmountArgs) -> Result<(), String> {
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .map_err(|e| format!("'{}': {e}", args.mountpoint.display()))?;
    if !mounted_by_unionfs(&mountpoint) {
        return Err(format!("'{}' is not a unionfs mount", mountpoint.display()));
    }
    let pid = fs::read_to_string(pid_file_for(&mountpoint))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .map(Pid::from_raw);
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
    let Some(pid) = pid else {
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while kill(pid, None).is_ok() && still_running(pid) {
        if Instant::now() >= deadline {
            return Err(format!(
                "unmounted, but the daemon (pid {pid}) has not exited after {}s",
                args.timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn still_running(pid: Pid) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has exited; its parent just has not reaped it yet.
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}
