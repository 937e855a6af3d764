//! The work directory: where objects are built before they are renamed into
//! the upper, so that nobody ever sees a half-made file. It lives on the
//! upper's filesystem (rename must not cross filesystems), in `<work>/work`
//! as kernel overlayfs lays it out, and whatever a crash left there is
//! removed at mount time.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::error::{Error, Result, SysContext};
use super::layer::{list_dir, open_beneath};

const TEMP_DIR: &str = "work";

#[derive(Debug)]
pub struct WorkDir {
    dir: OwnedFd,
    counter: AtomicU64,
    /// An exclusive flock on the work root, held for the life of the mount:
    /// a second mount of the same work dir would take the first one's
    /// objects in flight for crash leftovers and delete them.
    _lock: Flock<OwnedFd>,
}

/// `Error::op` of a refusal because another mount holds the work dir.
pub const IN_USE: &str = "work dir in use by another mount";

impl WorkDir {
    /// Locks `root`, opens (creating if needed) `<root>/work` and empties
    /// it. EBUSY while another `WorkDir` holds `root`.
    pub fn prepare(root: &Path) -> Result<WorkDir> {
        // Not O_PATH: flock needs a descriptor opened for reading.
        let root_fd = nix::fcntl::open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::new(e, "open work dir").with_path(root))?;
        let lock = match Flock::lock(root_fd, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(Error::new(Errno::EBUSY, IN_USE).with_path(root));
            }
            Err((_, e)) => return Err(Error::new(e, "lock work dir").with_path(root)),
        };
        match mkdirat(&*lock, TEMP_DIR, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(Error::new(e, "mkdir work dir").with_path(root)),
        }
        let dir = open_beneath(
            lock.as_fd(),
            OsStr::new(TEMP_DIR),
            OFlag::O_PATH | OFlag::O_DIRECTORY,
        )
        .map_err(|e| Error::new(e, "open work dir").with_path(root))?;
        let work = WorkDir {
            dir,
            counter: AtomicU64::new(0),
            _lock: lock,
        };
        let leftovers = list_names(work.fd()).map_err(|e| e.with_path(root))?;
        if !leftovers.is_empty() {
            tracing::info!(
                count = leftovers.len(),
                "removing leftovers of an interrupted copy-up"
            );
        }
        for name in leftovers {
            remove_tree(work.fd(), &name).map_err(|e| e.with_path(root))?;
        }
        Ok(work)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// A name no other object in the work dir has.
    pub fn temp_name(&self) -> OsString {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        OsString::from(format!("#{:x}.{n:x}", std::process::id()))
    }

    /// Removes a work dir entry and everything under it.
    pub fn remove(&self, name: &OsStr) -> Result<()> {
        remove_tree(self.fd(), name)
    }
}

fn list_names(dir: BorrowedFd<'_>) -> Result<Vec<OsString>> {
    Ok(list_dir(dir)?
        .into_iter()
        .map(|(name, _, _)| name)
        .collect())
}

/// Removes `name` below `dir` and everything under it, without ever
/// following a symlink. Depth-first with an explicit stack of open
/// directories rather than recursion: a leftover tree can be arbitrarily deep.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    if unlink_entry(dir, name)? {
        return Ok(());
    }
    // Each level: the directory, and its children still to remove.
    let top = open_beneath(dir, name, OFlag::O_PATH | OFlag::O_DIRECTORY).sys("openat2(dir)")?;
    let children = list_names(top.as_fd())?;
    let mut stack: Vec<(OwnedFd, Vec<OsString>)> = vec![(top, children)];
    while let Some((current, pending)) = stack.last_mut() {
        let Some(child) = pending.pop() else {
            stack.pop();
            continue;
        };
        if unlink_entry(current.as_fd(), &child)? {
            continue;
        }
        let sub = open_beneath(current.as_fd(), &child, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .sys("openat2(dir)")?;
        let grandchildren = list_names(sub.as_fd())?;
        // Removed once its children are: pushed back first, popped last.
        pending.push(child);
        stack.push((sub, grandchildren));
    }
    match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e).sys("rmdir"),
    }
}

/// Removes a non-directory, or an empty directory. Returns false for a
/// directory that still has entries.
fn unlink_entry(dir: BorrowedFd<'_>, name: &OsStr) -> Result<bool> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(true),
        Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
        Err(e) => return Err(e).sys("unlinkat"),
    }
    match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(true),
        Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => Ok(false),
        Err(e) => Err(e).sys("rmdir"),
    }
}
