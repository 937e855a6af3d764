//! Descriptors of layer directories. A directory node keeps one per layer,
//! and the kernel keeps every ancestor of a live node alive: a tree 10,000
//! levels deep would pin 20,000 descriptors with two layers, past many
//! hosts' limits. So they are held only within a budget: past it the oldest
//! are closed, and reopened from their parent (or their layer's root) when
//! next needed. Lower directories never move; an upper one that moves by
//! rename is told its new parent and name (`relocate`).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use parking_lot::Mutex;

use super::error::{Error, Result, SysContext};
use super::layer::open_beneath;
use super::node::DirLayer;

/// A directory descriptor in use; the directory's slot may be closed
/// meanwhile, this one stays open until dropped.
#[derive(Debug, Clone)]
pub struct DirFd(Arc<OwnedFd>);

impl AsFd for DirFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Where a closed lower directory is found again.
#[derive(Debug)]
pub enum Origin {
    /// Never closed.
    Held,
    /// `name` in the parent directory (of the same layer).
    Child {
        parent: Arc<DirLayer>,
        name: OsString,
    },
    /// The path `parts` from the layer's root (an absolute redirect).
    FromRoot {
        root: Arc<OwnedFd>,
        parts: Vec<OsString>,
    },
}

type SlotCell = Mutex<Option<Arc<OwnedFd>>>;
type Slot = Arc<SlotCell>;

/// One directory's descriptor and how to get it back.
#[derive(Debug)]
pub struct LazyDirFd {
    slot: Slot,
    budget: &'static Budget,
    origin: Mutex<Origin>,
    /// Counted in the budget (it can be closed); fixed at creation, as the
    /// origin is taken apart when a chain of directories is dropped.
    budgeted: bool,
}

impl LazyDirFd {
    pub fn new(fd: OwnedFd, origin: Origin) -> LazyDirFd {
        LazyDirFd::with_budget(&BUDGET, fd, origin)
    }

    pub(crate) fn with_budget(budget: &'static Budget, fd: OwnedFd, origin: Origin) -> LazyDirFd {
        let fd = Arc::new(fd);
        let slot = Arc::new(Mutex::new(Some(fd)));
        let budgeted = !matches!(origin, Origin::Held);
        if budgeted {
            budget.register(&slot);
        }
        LazyDirFd {
            slot,
            budget,
            origin: Mutex::new(origin),
            budgeted,
        }
    }

    /// The descriptor if it is open now.
    pub fn current(&self) -> Option<DirFd> {
        self.slot.lock().clone().map(DirFd)
    }

    /// The parent whose descriptor reopens this one, if any.
    pub fn parent(&self) -> Option<Arc<DirLayer>> {
        match &*self.origin.lock() {
            Origin::Child { parent, .. } => Some(parent.clone()),
            _ => None,
        }
    }

    /// The directory was renamed to `name` in `parent`.
    pub fn relocate(&self, parent: Arc<DirLayer>, name: &std::ffi::OsStr) {
        let mut origin = self.origin.lock();
        if let Origin::Child { .. } = &*origin {
            *origin = Origin::Child {
                parent,
                name: name.to_os_string(),
            };
        }
    }

    /// Reopens the directory, given its parent's descriptor for a `Child`.
    pub fn reopen(&self, parent: Option<&DirFd>) -> Result<DirFd> {
        let origin = self.origin.lock();
        let fd = match (&*origin, parent) {
            (Origin::Child { name, .. }, Some(parent)) => {
                open_beneath(parent.as_fd(), name, OFlag::O_PATH | OFlag::O_DIRECTORY)
                    .sys("openat2(reopen dir)")?
            }
            (Origin::FromRoot { root, parts }, _) => walk(root.as_fd(), parts)?,
            _ => return Err(Error::new(Errno::ESTALE, "reopen dir")),
        };
        drop(origin);
        let fd = Arc::new(fd);
        let mut slot = self.slot.lock();
        if let Some(raced) = &*slot {
            // Another thread reopened it first: keep one.
            return Ok(DirFd(raced.clone()));
        }
        *slot = Some(fd.clone());
        drop(slot);
        self.budget.register(&self.slot);
        Ok(DirFd(fd))
    }

    /// Detaches the parent, so that a chain of directories is released by
    /// the caller's loop instead of by recursive drops.
    pub fn take_parent(&mut self) -> Option<Arc<DirLayer>> {
        let origin = self.origin.get_mut();
        match std::mem::replace(origin, Origin::Held) {
            Origin::Child { parent, .. } => Some(parent),
            other => {
                *origin = other;
                None
            }
        }
    }
}

impl Drop for LazyDirFd {
    fn drop(&mut self) {
        if self.budgeted && self.slot.lock().take().is_some() {
            self.budget.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn walk(root: BorrowedFd<'_>, parts: &[OsString]) -> Result<OwnedFd> {
    let mut dir = open_beneath(root, ".".as_ref(), OFlag::O_PATH | OFlag::O_DIRECTORY)
        .sys("openat2(reopen root)")?;
    for part in parts {
        dir = open_beneath(dir.as_fd(), part, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .sys("openat2(reopen dir)")?;
    }
    Ok(dir)
}

/// How many directory descriptors stay open, process-wide.
#[derive(Debug)]
pub(crate) struct Budget {
    held: AtomicUsize,
    /// Open slots, oldest first (some may be closed or gone by now).
    queue: Mutex<VecDeque<Weak<SlotCell>>>,
    limit: OnceLock<usize>,
}

static BUDGET: Budget = Budget {
    held: AtomicUsize::new(0),
    queue: Mutex::new(VecDeque::new()),
    limit: OnceLock::new(),
};

impl Budget {
    #[cfg(test)]
    pub(crate) fn with_limit(limit: usize) -> &'static Budget {
        let budget = Box::leak(Box::new(Budget {
            held: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
            limit: OnceLock::new(),
        }));
        let _ = budget.limit.set(limit);
        budget
    }

    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Half the descriptor limit as it is when the first directory opens
    /// (the daemon raises it first): open files need the rest.
    fn limit(&self) -> usize {
        *self.limit.get_or_init(|| {
            let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024);
            usize::try_from(soft / 2).unwrap_or(usize::MAX).max(64)
        })
    }

    fn register(&self, slot: &Slot) {
        let limit = self.limit();
        let held = self.held.fetch_add(1, Ordering::Relaxed) + 1;
        let mut queue = self.queue.lock();
        queue.push_back(Arc::downgrade(slot));
        if held > limit {
            self.evict(&mut queue, held - limit);
        }
        // A weak entry keeps its slot's memory: entries of closed and dropped
        // slots go once they are half the queue, not only past the limit
        // (the daemon's is about half a million).
        if queue.len() > 2 * held + 64 {
            Budget::keep_open(&mut queue);
        }
    }

    fn keep_open(queue: &mut VecDeque<Weak<SlotCell>>) {
        queue.retain(|w| w.upgrade().is_some_and(|slot| slot.lock().is_some()));
    }

    /// Drops the entries of closed and dropped slots, and the room they
    /// took: after the kernel forgot many directories.
    fn prune(&self) {
        let mut queue = self.queue.lock();
        Budget::keep_open(&mut queue);
        queue.shrink_to_fit();
    }

    /// Closes `excess` of the oldest open slots.
    fn evict(&self, queue: &mut VecDeque<Weak<SlotCell>>, mut excess: usize) {
        while excess > 0 {
            let Some(oldest) = queue.pop_front() else {
                return;
            };
            if let Some(slot) = oldest.upgrade()
                && slot.lock().take().is_some()
            {
                self.held.fetch_sub(1, Ordering::Relaxed);
                excess -= 1;
            }
        }
    }
}

/// The descriptor of `dir`, reopening it and any closed ancestors it is
/// reached through: up to the nearest open one in a loop, then down again.
pub fn dir_fd(dir: &DirLayer) -> Result<DirFd> {
    if let Some(fd) = dir.lazy_fd().current() {
        return Ok(fd);
    }
    let mut closed: Vec<Arc<DirLayer>> = Vec::new();
    let mut open = None;
    let mut cursor = dir.lazy_fd().parent();
    while let Some(ancestor) = cursor {
        if let Some(fd) = ancestor.lazy_fd().current() {
            open = Some(fd);
            break;
        }
        cursor = ancestor.lazy_fd().parent();
        closed.push(ancestor);
    }
    for ancestor in closed.iter().rev() {
        open = Some(ancestor.lazy_fd().reopen(open.as_ref())?);
    }
    dir.lazy_fd().reopen(open.as_ref())
}

/// Gives back what directories dropped since the last time leave behind.
pub(crate) fn release_memory() {
    BUDGET.prune();
}

#[cfg(test)]
pub(crate) fn held_count() -> usize {
    BUDGET.held()
}

#[cfg(test)]
pub(crate) fn budget() -> usize {
    BUDGET.limit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::marker::DirMarks;
    use std::os::fd::AsRawFd;

    /// A chain `root/d/d/...` of `depth` reopenable directories.
    fn chain(budget: &'static Budget, root: &std::path::Path, depth: usize) -> Vec<Arc<DirLayer>> {
        let open = |fd: BorrowedFd<'_>| {
            open_beneath(fd, "d".as_ref(), OFlag::O_PATH | OFlag::O_DIRECTORY).unwrap()
        };
        let top = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        let mut dirs = vec![Arc::new(DirLayer::new(1, top, DirMarks::default(), false))];
        for _ in 0..depth {
            let parent = dirs.last().unwrap().clone();
            let fd = open(parent.fd().unwrap().as_fd());
            let lazy = LazyDirFd::with_budget(
                budget,
                fd,
                Origin::Child {
                    parent,
                    name: "d".into(),
                },
            );
            dirs.push(Arc::new(DirLayer::from_lazy(
                1,
                lazy,
                DirMarks::default(),
                false,
            )));
        }
        dirs
    }

    fn inode_of(dir: &DirLayer) -> u64 {
        nix::sys::stat::fstat(dir.fd().unwrap().as_fd())
            .unwrap()
            .st_ino
    }

    #[test]
    fn past_the_budget_the_oldest_close_and_reopen_to_the_same_directory() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join(["d"; 40].join("/"))).unwrap();
        let budget = Budget::with_limit(8);
        let dirs = chain(budget, t.path(), 40);
        assert_eq!(budget.held(), 8, "only the budget stays open");
        assert!(dirs[1].lazy_fd().current().is_none(), "the oldest closed");
        assert!(dirs[40].lazy_fd().current().is_some(), "the newest open");

        // Reopening the deepest closed one walks down from the nearest open
        // ancestor and reaches the very directory it had.
        let expected: Vec<u64> = (1..=40)
            .map(|i| std::fs::metadata(t.path().join(["d"; 40][..i].join("/"))).unwrap())
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .collect();
        assert_eq!(inode_of(&dirs[1]), expected[0]);
        assert_eq!(inode_of(&dirs[20]), expected[19]);
        assert_eq!(budget.held(), 8);
        let fd = dirs[20].fd().unwrap();
        assert!(fd.as_fd().as_raw_fd() >= 0);
    }

    #[test]
    fn dropping_a_chain_gives_back_every_descriptor_it_held() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join(["d"; 30].join("/"))).unwrap();
        let budget = Budget::with_limit(1000);
        let dirs = chain(budget, t.path(), 30);
        assert_eq!(budget.held(), 30);
        drop(dirs);
        assert_eq!(budget.held(), 0, "a dropped chain still counts as held");
        budget.prune();
        assert!(budget.queue.lock().is_empty(), "dropped slots stay queued");
    }

    #[test]
    fn the_queue_follows_the_open_slots_not_the_limit() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("d")).unwrap();
        let budget = Budget::with_limit(100_000);
        for _ in 0..1000 {
            drop(chain(budget, t.path(), 1));
        }
        assert!(
            budget.queue.lock().len() <= 2 * 64 + 2,
            "dropped slots pile up"
        );
    }
}
