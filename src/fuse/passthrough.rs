//! FUSE passthrough: one kernel backing file per node, shared by all its
//! open handles (the kernel refuses two different backing files for one
//! inode), and closed when the last handle goes.

use std::sync::{Arc, Weak};

use dashmap::DashMap;
use fuser::BackingId;

#[derive(Debug, Default)]
pub struct Backings {
    by_node: DashMap<u64, Weak<BackingId>>,
    by_handle: DashMap<u64, Arc<BackingId>>,
}

impl Backings {
    /// The node's backing id, registering one with `open` if it has none.
    pub fn get_or_open(
        &self,
        node: u64,
        fh: u64,
        open: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> std::io::Result<Arc<BackingId>> {
        let backing = {
            let mut slot = self.by_node.entry(node).or_default();
            match slot.upgrade() {
                Some(existing) => existing,
                None => {
                    let fresh = Arc::new(open()?);
                    *slot = Arc::downgrade(&fresh);
                    fresh
                }
            }
        };
        self.by_handle.insert(fh, backing.clone());
        Ok(backing)
    }

    pub fn release(&self, node: u64, fh: u64) {
        if self.by_handle.remove(&fh).is_some() {
            self.by_node
                .remove_if(&node, |_, weak| weak.strong_count() == 0);
        }
    }
}
