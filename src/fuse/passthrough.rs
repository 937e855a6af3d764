//! FUSE passthrough bookkeeping. The kernel allows one backing file per
//! inode, and refuses to mix passthrough opens with cached opens of the same
//! inode, so the choice is made per node: passthrough while no cached open
//! is live, cached while no passthrough open is live. One backing id per
//! node is shared by its passthrough opens and closed with the last of them.

use std::sync::{Arc, Weak};

use dashmap::DashMap;
use fuser::BackingId;

#[derive(Debug, Default)]
struct NodeIo {
    backing: Weak<BackingId>,
    /// The live backing file is a lower layer's (`passthrough=all`).
    backing_is_lower: bool,
    cached_opens: usize,
}

/// How an open wants to do I/O.
#[derive(Debug, Clone, Copy)]
pub struct OpenIo {
    pub passthrough_wanted: bool,
    /// The handle's file is a lower layer's.
    pub from_lower: bool,
    pub writes: bool,
}

/// The kernel holds a lower file as this inode's backing file: no write may
/// go through it (it would reach the lower layer), and the kernel refuses a
/// second backing file for the inode while it is held.
#[derive(Debug)]
pub struct LowerPinned;

#[derive(Debug)]
enum HandleIo {
    Passthrough(#[allow(dead_code)] Arc<BackingId>),
    Cached,
}

#[derive(Debug, Default)]
pub struct Backings {
    by_node: DashMap<u64, NodeIo>,
    by_handle: DashMap<u64, HandleIo>,
}

impl Backings {
    /// Decides how handle `fh` of `node` does I/O. Returns the backing id to
    /// open it with in passthrough mode, or None for cached I/O through the
    /// daemon. `register` makes a backing id when the node has none.
    pub fn open(
        &self,
        node: u64,
        fh: u64,
        io: OpenIo,
        register: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> Result<Option<Arc<BackingId>>, LowerPinned> {
        let mut state = self.by_node.entry(node).or_default();
        let live = state.backing.upgrade();
        let backing = match live {
            Some(_) if io.writes && state.backing_is_lower => return Err(LowerPinned),
            // A cached open now would be refused while passthrough ones live.
            Some(backing) => Some(backing),
            None if io.passthrough_wanted && state.cached_opens == 0 => match register() {
                Ok(fresh) => {
                    let fresh = Arc::new(fresh);
                    state.backing = Arc::downgrade(&fresh);
                    state.backing_is_lower = io.from_lower;
                    Some(fresh)
                }
                Err(e) => {
                    tracing::debug!(node, error = %e, "no passthrough for this file");
                    None
                }
            },
            None => None,
        };
        match &backing {
            Some(b) => self.by_handle.insert(fh, HandleIo::Passthrough(b.clone())),
            None => {
                state.cached_opens += 1;
                self.by_handle.insert(fh, HandleIo::Cached)
            }
        };
        Ok(backing)
    }

    /// Whether the kernel may hold a lower file as `node`'s backing file now.
    pub fn pinned_by_lower(&self, node: u64) -> bool {
        self.by_node
            .get(&node)
            .is_some_and(|io| io.backing_is_lower && io.backing.strong_count() > 0)
    }

    pub fn release(&self, node: u64, fh: u64) {
        let Some((_, handle)) = self.by_handle.remove(&fh) else {
            return;
        };
        if let Some(mut io) = self.by_node.get_mut(&node)
            && matches!(handle, HandleIo::Cached)
        {
            io.cached_opens = io.cached_opens.saturating_sub(1);
        }
        drop(handle);
        self.by_node.remove_if(&node, |_, io| {
            io.cached_opens == 0 && io.backing.strong_count() == 0
        });
    }
}
