//! Nodes of the merged tree: what the kernel knows by a node id. A directory
//! node holds a descriptor for each layer that contributes to it; any other
//! node is found again through its parent and name, so walking a huge tree
//! does not pin one descriptor per file.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};

use super::attr::{Attr, FileKind};
use super::dirfd::{self, DirFd, LazyDirFd, Origin};
use super::error::{Error, Result};
use super::layer::list_dir;
use super::marker::{self, DirMarks, OciName};

/// One layer's directory inside a merged directory.
#[derive(Debug)]
pub struct DirLayer {
    pub layer: usize,
    fd: LazyDirFd,
    pub marks: DirMarks,
    /// Whether OCI `.wh.` names count here (lower layers only).
    pub oci: bool,
    /// The names this directory whites out with OCI `.wh.NAME` entries, read
    /// once, by a listing or on the first lookup that misses here (lower
    /// layers never change).
    oci_whiteouts: OnceLock<HashSet<OsString>>,
    /// This mount wrote an xattr whiteout here (after `marks` were read).
    xwhiteouts_written: AtomicBool,
}

impl DirLayer {
    /// A directory whose descriptor stays open for its life.
    pub fn new(layer: usize, fd: OwnedFd, marks: DirMarks, oci: bool) -> DirLayer {
        DirLayer::with_origin(layer, fd, marks, oci, Origin::Held)
    }

    /// A lower directory whose descriptor may be closed and reopened from
    /// `origin`.
    pub fn with_origin(
        layer: usize,
        fd: OwnedFd,
        marks: DirMarks,
        oci: bool,
        origin: Origin,
    ) -> DirLayer {
        DirLayer {
            layer,
            fd: LazyDirFd::new(fd, origin),
            marks,
            oci,
            oci_whiteouts: OnceLock::new(),
            xwhiteouts_written: AtomicBool::new(false),
        }
    }

    #[cfg(test)]
    pub(crate) fn from_lazy(layer: usize, fd: LazyDirFd, marks: DirMarks, oci: bool) -> DirLayer {
        DirLayer {
            layer,
            fd,
            marks,
            oci,
            oci_whiteouts: OnceLock::new(),
            xwhiteouts_written: AtomicBool::new(false),
        }
    }

    /// Zero-size files with a whiteout xattr are whiteouts here.
    pub fn holds_xwhiteouts(&self) -> bool {
        self.marks.xwhiteouts || self.xwhiteouts_written.load(Ordering::Relaxed)
    }

    pub(crate) fn note_xwhiteouts(&self) {
        self.xwhiteouts_written.store(true, Ordering::Relaxed);
    }

    pub fn fd(&self) -> Result<DirFd> {
        dirfd::dir_fd(self)
    }

    pub(crate) fn lazy_fd(&self) -> &LazyDirFd {
        &self.fd
    }

    /// Records the names this directory whites out, found by a reader of
    /// all its entries (the merged listing), so that a lookup missing here
    /// need not read them again.
    pub fn know_oci_whiteouts(&self, names: HashSet<OsString>) {
        if self.oci {
            let _ = self.oci_whiteouts.set(names);
        }
    }

    /// Whether an OCI whiteout here hides `name` from the layers below.
    pub fn oci_hides(&self, name: &OsStr) -> Result<bool> {
        if !self.oci {
            return Ok(false);
        }
        if let Some(set) = self.oci_whiteouts.get() {
            return Ok(set.contains(name));
        }
        let mut set = HashSet::new();
        for entry in self.read_entries()? {
            if let OciName::Whiteout(target) = marker::oci_name(&entry.0) {
                set.insert(target.to_os_string());
            }
        }
        let set = self.oci_whiteouts.get_or_init(|| set);
        Ok(set.contains(name))
    }

    /// The raw entries of this layer's directory: (name, inode, type if known).
    pub fn read_entries(&self) -> Result<Vec<(OsString, u64, Option<FileKind>)>> {
        list_dir(self.fd()?.as_fd())
    }
}

impl Drop for DirLayer {
    /// Reopenable directories hold their parents: release a deep chain in a
    /// loop, as `Node` does, not by one recursive drop per level.
    fn drop(&mut self) {
        let mut orphans: Vec<Arc<DirLayer>> = self.fd.take_parent().into_iter().collect();
        while let Some(parent) = orphans.pop() {
            if let Ok(mut parent) = Arc::try_unwrap(parent) {
                orphans.extend(parent.fd.take_parent());
            }
        }
    }
}

/// The layers of a merged directory, topmost first. Layers below an opaque
/// directory, a whiteout or a non-directory are not in it.
#[derive(Debug, Clone)]
pub struct DirStack {
    pub layers: Vec<Arc<DirLayer>>,
}

impl DirStack {
    pub fn top(&self) -> &DirLayer {
        &self.layers[0]
    }

    pub fn layer(&self, layer: usize) -> Option<&DirLayer> {
        self.layers.iter().find(|l| l.layer == layer).map(|l| &**l)
    }

    /// A directory is "merged" when more than one layer contributes to it.
    pub fn is_merged(&self) -> bool {
        self.layers.len() > 1
    }
}

#[derive(Debug)]
pub struct Location {
    pub parent: Option<Arc<Node>>,
    pub name: OsString,
    /// Other names of a hard-linked file that this mount has seen.
    pub aliases: Vec<(Arc<Node>, OsString)>,
}

impl Location {
    pub fn new(parent: Option<Arc<Node>>, name: OsString) -> Location {
        Location {
            parent,
            name,
            aliases: Vec::new(),
        }
    }
}

/// Where a node's data lives now.
#[derive(Debug, Clone)]
pub struct NodeState {
    /// Index of the topmost layer holding the object.
    pub layer: usize,
    /// Attributes as of the last stat (merged ino and nlink already applied).
    pub attr: Attr,
    pub dir: Option<Arc<DirStack>>,
}

#[derive(Debug)]
pub struct Node {
    pub id: u64,
    /// Bumped when the id is reused for a new object (the backing inode
    /// number came back after an unlink); the kernel then retires the old
    /// inode instead of confusing the two.
    pub generation: u64,
    pub kind: FileKind,
    lookups: AtomicU64,
    loc: RwLock<Location>,
    state: RwLock<NodeState>,
    /// Held while the node is copied up, so racing writers copy up once.
    pub copy_up_lock: Mutex<()>,
    /// Its last name is gone; it lives on through open handles only.
    unlinked: std::sync::atomic::AtomicBool,
}

impl Drop for Node {
    /// A node holds its parent: dropping the last node of a deep chain would
    /// drop every ancestor recursively, one stack frame per level, and any
    /// user can make a tree deep enough to overflow a thread's stack. The
    /// ancestors whose last holder is this chain are released by a loop.
    fn drop(&mut self) {
        fn take_parents(loc: &mut Location, orphans: &mut Vec<Arc<Node>>) {
            orphans.extend(loc.parent.take());
            orphans.extend(loc.aliases.drain(..).map(|(p, _)| p));
        }
        let mut orphans = Vec::new();
        take_parents(self.loc.get_mut(), &mut orphans);
        while let Some(parent) = orphans.pop() {
            if let Ok(mut parent) = Arc::try_unwrap(parent) {
                take_parents(parent.loc.get_mut(), &mut orphans);
            }
        }
    }
}

impl Node {
    pub fn new(id: u64, loc: Location, state: NodeState) -> Node {
        Node::with_generation(id, 0, loc, state)
    }

    pub fn with_generation(id: u64, generation: u64, loc: Location, state: NodeState) -> Node {
        Node {
            id,
            generation,
            kind: state.attr.kind(),
            lookups: AtomicU64::new(0),
            loc: RwLock::new(loc),
            state: RwLock::new(state),
            copy_up_lock: Mutex::new(()),
            unlinked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn mark_unlinked(&self) {
        self.unlinked.store(true, Ordering::Release);
    }

    pub fn is_unlinked(&self) -> bool {
        self.unlinked.load(Ordering::Acquire)
    }

    pub fn set_state(&self, state: NodeState) {
        *self.state.write() = state;
    }

    /// All names of the node: its primary location first, then aliases.
    pub fn names(&self) -> Vec<(Arc<Node>, OsString)> {
        let loc = self.loc.read();
        let mut names = Vec::with_capacity(1 + loc.aliases.len());
        if let Some(parent) = &loc.parent {
            names.push((parent.clone(), loc.name.clone()));
        }
        names.extend(loc.aliases.iter().cloned());
        names
    }

    /// Records another name of a hard-linked node.
    pub fn add_alias(&self, parent: &Arc<Node>, name: &OsStr) {
        let mut loc = self.loc.write();
        let is_known = |p: &Arc<Node>, n: &OsStr| p.id == parent.id && n == name;
        let primary = loc.parent.as_ref().is_some_and(|p| is_known(p, &loc.name));
        if !primary && !loc.aliases.iter().any(|(p, n)| is_known(p, n)) {
            loc.aliases.push((parent.clone(), name.to_os_string()));
        }
    }

    /// Forgets the name (parent, name); an alias takes the primary place.
    /// Returns whether the node still has a name.
    pub fn remove_name(&self, parent: u64, name: &OsStr) -> bool {
        let mut loc = self.loc.write();
        loc.aliases.retain(|(p, n)| !(p.id == parent && n == name));
        let primary = loc.parent.as_ref().map(|p| p.id) == Some(parent) && loc.name == name;
        if primary {
            if let Some((p, n)) = loc.aliases.pop() {
                loc.parent = Some(p);
                loc.name = n;
            } else {
                // Unlinked but maybe still open: keep the last location for
                // messages; the node is reached through its handles only.
                return false;
            }
        }
        loc.parent.is_some()
    }

    /// Moves the name (old parent, old name) to (new parent, new name).
    pub fn rename(
        &self,
        old_parent: u64,
        old_name: &OsStr,
        new_parent: &Arc<Node>,
        new_name: &OsStr,
    ) {
        let mut loc = self.loc.write();
        if loc.parent.as_ref().map(|p| p.id) == Some(old_parent) && loc.name == old_name {
            loc.parent = Some(new_parent.clone());
            loc.name = new_name.to_os_string();
        } else if let Some(alias) = loc
            .aliases
            .iter_mut()
            .find(|(p, n)| p.id == old_parent && n == old_name)
        {
            *alias = (new_parent.clone(), new_name.to_os_string());
        }
    }

    pub fn state(&self) -> NodeState {
        self.state.read().clone()
    }

    pub fn set_attr(&self, attr: Attr) {
        self.state.write().attr = attr;
    }

    pub fn dir_stack(&self) -> Result<Arc<DirStack>> {
        self.state
            .read()
            .dir
            .clone()
            .ok_or_else(|| Error::new(nix::errno::Errno::ENOTDIR, "lookup").with_path(self.path()))
    }

    pub fn parent(&self) -> Option<Arc<Node>> {
        self.loc.read().parent.clone()
    }

    pub fn name(&self) -> OsString {
        self.loc.read().name.clone()
    }

    pub fn is_at(&self, parent: u64, name: &OsStr) -> bool {
        let loc = self.loc.read();
        loc.parent.as_ref().map(|p| p.id) == Some(parent) && loc.name == name
    }

    /// The path inside the merged tree, for messages.
    pub fn path(&self) -> OsString {
        let mut parts = Vec::new();
        let mut next = Some((self.parent(), self.name()));
        while let Some((parent, name)) = next {
            if parent.is_none() {
                break;
            }
            parts.push(name);
            next = parent.map(|p| (p.parent(), p.name()));
        }
        let mut path = OsString::from("/");
        for (i, part) in parts.iter().rev().enumerate() {
            if i > 0 {
                path.push("/");
            }
            path.push(part);
        }
        path
    }

    pub fn add_lookups(&self, n: u64) {
        self.lookups.fetch_add(n, Ordering::Relaxed);
    }

    /// Drops `n` kernel references; returns the count left.
    pub fn sub_lookups(&self, n: u64) -> u64 {
        let prev = self
            .lookups
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            })
            .unwrap_or(0);
        prev.saturating_sub(n)
    }

    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Acquire)
    }
}
