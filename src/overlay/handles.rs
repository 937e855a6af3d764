//! Open files, by handle number. Directories have none: they are listed
//! by node and offset (`listing`).

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::RwLock;

use super::node::Node;

#[derive(Debug)]
pub struct OpenFile {
    pub node: Arc<Node>,
    pub flags: i32,
    /// Behind a lock so the write path can swap in the copied-up file.
    file: RwLock<Arc<File>>,
}

impl OpenFile {
    pub fn file(&self) -> Arc<File> {
        self.file.read().clone()
    }

    pub fn replace_file(&self, file: File) {
        *self.file.write() = Arc::new(file);
    }
}

#[derive(Debug, Default)]
pub struct Handles {
    next: AtomicU64,
    files: DashMap<u64, Arc<OpenFile>>,
}

impl Handles {
    fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn add_file(&self, node: Arc<Node>, flags: i32, file: File) -> (u64, Arc<OpenFile>) {
        let fh = self.next_id();
        let open = Arc::new(OpenFile {
            node,
            flags,
            file: RwLock::new(Arc::new(file)),
        });
        self.files.insert(fh, open.clone());
        (fh, open)
    }

    pub fn file(&self, fh: u64) -> Option<Arc<OpenFile>> {
        self.files.get(&fh).map(|f| f.clone())
    }

    /// The open handles of one node (a scan: only copy-up needs it).
    pub fn files_of(&self, node: u64) -> Vec<Arc<OpenFile>> {
        self.files
            .iter()
            .filter(|f| f.node.id == node)
            .map(|f| f.clone())
            .collect()
    }

    pub fn has_files(&self) -> bool {
        !self.files.is_empty()
    }

    pub fn remove_file(&self, fh: u64) -> Option<Arc<OpenFile>> {
        self.files.remove(&fh).map(|(_, f)| f)
    }
}
