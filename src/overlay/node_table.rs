//! The node table: what the kernel holds by node id, how many references it
//! holds to each, and the merged inode numbers (mapped from the backing
//! objects, kept by copied-up files for the life of the mount).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::ino::InoMapper;
use super::node::Node;

/// What to do with the node already holding the number a name maps to.
pub(crate) enum Existing {
    /// It is the same object (a hard link, or the same name): share it.
    Share,
    /// Its object is gone and the number was reused: a new node takes the
    /// number, with the next generation.
    Replace,
    /// Another object that happens to share the number: take a fresh one.
    Skip,
}

#[derive(Debug)]
pub(crate) struct NodeTable {
    nodes: DashMap<u64, Arc<Node>>,
    inos: InoMapper,
    /// Upper copies of lower files (dev, ino) -> the merged number the file
    /// had before its copy-up.
    copied_up: DashMap<(u64, u64), u64>,
    /// Nodes in the table (DashMap's len() would lock every shard).
    live: AtomicUsize,
}

impl NodeTable {
    /// A table holding the root, with the kernel's one reference to it.
    pub(crate) fn new(inos: InoMapper, root: Node) -> NodeTable {
        root.add_lookups(1);
        let nodes = DashMap::new();
        nodes.insert(root.id, Arc::new(root));
        NodeTable {
            nodes,
            inos,
            copied_up: DashMap::new(),
            live: AtomicUsize::new(1),
        }
    }

    pub(crate) fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.nodes.get(&id).map(|n| n.clone())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Takes one kernel reference to `id`, if it is in the table. Under the
    /// table's shard lock, so a concurrent forget cannot drop the node
    /// between the find and the increment.
    pub(crate) fn take_ref(&self, id: u64) -> Option<Arc<Node>> {
        self.nodes.get(&id).map(|node| {
            node.add_lookups(1);
            node.clone()
        })
    }

    /// The merged number of a backing object.
    pub(crate) fn ino_of(&self, dev: u64, ino: u64) -> u64 {
        match self.copied_up.get(&(dev, ino)) {
            Some(id) => *id,
            None => self.inos.map(dev, ino),
        }
    }

    /// Lookups that find the upper copy (dev, ino) land on node `id`.
    pub(crate) fn record_copy_up(&self, dev: u64, ino: u64, id: u64) {
        self.copied_up.insert((dev, ino), id);
    }

    /// Lookups that find the upper copy (dev, ino) take its own number.
    pub(crate) fn forget_copy_up(&self, dev: u64, ino: u64) {
        self.copied_up.remove(&(dev, ino));
    }

    /// A number no node has, nor will have.
    pub(crate) fn unique_ino(&self) -> u64 {
        self.inos.unique()
    }

    /// Finds or makes the node numbered `id`, with one more reference.
    /// `judge` decides about a node already there (under its shard lock);
    /// `make(id, generation)` builds a new one. Returns the node and whether
    /// it was made now.
    pub(crate) fn intern(
        &self,
        mut id: u64,
        judge: impl Fn(&Arc<Node>) -> Existing,
        make: impl Fn(u64, u32) -> Node,
    ) -> (Arc<Node>, bool) {
        loop {
            match self.nodes.entry(id) {
                Entry::Occupied(mut existing) => match judge(existing.get()) {
                    Existing::Share => {
                        let node = existing.get();
                        node.add_lookups(1);
                        return (node.clone(), false);
                    }
                    Existing::Replace => {
                        // References the kernel still holds on the old
                        // inode carry over, so its eventual FORGET balances.
                        let old = existing.get();
                        let fresh = Arc::new(make(id, old.generation.wrapping_add(1)));
                        fresh.add_lookups(old.lookups() + 1);
                        existing.insert(fresh.clone());
                        return (fresh, true);
                    }
                    Existing::Skip => {
                        drop(existing);
                        id = self.inos.unique();
                    }
                },
                Entry::Vacant(slot) => {
                    let node = Arc::new(make(id, 0));
                    node.add_lookups(1);
                    slot.insert(node.clone());
                    self.live.fetch_add(1, Ordering::Relaxed);
                    return (node, true);
                }
            }
        }
    }

    /// Drops `n` references to `id`; returns the node if that was its last
    /// and it left the table.
    pub(crate) fn forget(&self, id: u64, n: u64) -> Option<Arc<Node>> {
        let remaining = self.nodes.get(&id)?.sub_lookups(n);
        if remaining > 0 {
            return None;
        }
        let (_, node) = self.nodes.remove_if(&id, |_, node| node.lookups() == 0)?;
        self.live.fetch_sub(1, Ordering::Relaxed);
        Some(node)
    }

    /// Gives back the table's room for nodes the kernel forgot, once most
    /// of it is empty.
    pub(crate) fn shrink(&self) {
        if self.live.load(Ordering::Relaxed) * 4 < self.nodes.capacity() {
            self.nodes.shrink_to_fit();
        }
    }
}
