//! Nodes of the merged tree: what the kernel knows by a node id. A directory
//! node holds a descriptor for each layer that contributes to it; any other
//! node is found again through its parent and name, so walking a huge tree
//! does not pin one descriptor per file.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::fstatat;
use parking_lot::{Mutex, RwLock};

use super::attr::{Attr, FileKind};
use super::dirfd::{self, DirFd, LazyDirFd, Origin};
use super::error::{Error, Result, SysContext};
use super::layer::list_dir;
use super::marker::{self, DirMarks, OciName};

/// Whether an object is known to lack an xattr that only a setxattr
/// through this mount can add: then the layers need not be asked. An
/// absence read from the layers is remembered only if no change (`changed`)
/// came in while it was read: the low bit says absent, the others count
/// changes (one byte, to fit in a node's padding: a read would have to
/// overlap 128 changes for the count to come round to the same value).
#[derive(Debug, Default)]
pub struct KnownAbsent(AtomicU8);

const ABSENT: u8 = 1;

impl KnownAbsent {
    /// The object is new: it has no such xattr.
    pub fn set(&self) {
        self.0.fetch_or(ABSENT, Ordering::AcqRel);
    }

    /// After a setxattr or removexattr of it: ask the layers next time.
    pub fn changed(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some((v & !ABSENT).wrapping_add(2))
            });
    }

    /// `read()`'s value, or None without calling it when the xattr is known
    /// to be absent; an absence it reads is remembered.
    pub fn read_with<T, E>(
        &self,
        read: impl FnOnce() -> std::result::Result<Option<T>, E>,
    ) -> std::result::Result<Option<T>, E> {
        let seen = self.0.load(Ordering::Acquire);
        if seen & ABSENT != 0 {
            return Ok(None);
        }
        let value = read()?;
        if value.is_none() {
            let _ =
                self.0
                    .compare_exchange(seen, seen | ABSENT, Ordering::AcqRel, Ordering::Acquire);
        }
        Ok(value)
    }
}

/// One layer's directory inside a merged directory.
#[derive(Debug)]
pub struct DirLayer {
    pub layer: usize,
    fd: LazyDirFd,
    pub marks: DirMarks,
    /// This directory is the upper layer's: its OCI `.wh.` names may change
    /// through the mount, so they are looked up each time, never cached.
    pub upper: bool,
    /// The names this directory whites out with OCI `.wh.NAME` entries, read
    /// once, by a listing or on the first lookup that misses here (lower
    /// layers never change).
    oci_whiteouts: OnceLock<HashSet<OsString>>,
    /// This mount wrote an xattr whiteout here (after `marks` were read).
    xwhiteouts_written: AtomicBool,
    /// Known to have no default ACL (an upper directory that new objects
    /// are made in).
    pub no_default_acl: KnownAbsent,
}

impl DirLayer {
    /// A directory whose descriptor stays open for its life.
    pub fn new(layer: usize, fd: OwnedFd, marks: DirMarks, upper: bool) -> DirLayer {
        DirLayer::with_origin(layer, fd, marks, upper, Origin::Held)
    }

    /// A lower directory whose descriptor may be closed and reopened from
    /// `origin`.
    pub fn with_origin(
        layer: usize,
        fd: OwnedFd,
        marks: DirMarks,
        upper: bool,
        origin: Origin,
    ) -> DirLayer {
        DirLayer {
            layer,
            fd: LazyDirFd::new(fd, origin),
            marks,
            upper,
            oci_whiteouts: OnceLock::new(),
            xwhiteouts_written: AtomicBool::new(false),
            no_default_acl: KnownAbsent::default(),
        }
    }

    #[cfg(test)]
    pub(crate) fn from_lazy(layer: usize, fd: LazyDirFd, marks: DirMarks, upper: bool) -> DirLayer {
        DirLayer {
            layer,
            fd,
            marks,
            upper,
            oci_whiteouts: OnceLock::new(),
            xwhiteouts_written: AtomicBool::new(false),
            no_default_acl: KnownAbsent::default(),
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
        // An upper directory's change through the mount: there they are
        // looked up each time.
        if !self.upper {
            let _ = self.oci_whiteouts.set(names);
        }
    }

    /// Whether an OCI whiteout here hides `name` from the layers below.
    /// Lower layers have them from images; an upper has them where
    /// containers/storage mounts a layer it stored that way as the upper
    /// (`podman diff IMAGE`), as fuse-overlayfs reads them there too.
    pub fn oci_hides(&self, name: &OsStr) -> Result<bool> {
        if self.upper {
            let mut marker = OsString::from(OsStr::from_bytes(marker::OCI_WHITEOUT_PREFIX));
            marker.push(name);
            if marker.len() > 255 {
                return Ok(false);
            }
            return match fstatat(
                self.fd()?.as_fd(),
                marker.as_os_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(_) => Ok(true),
                Err(Errno::ENOENT) => Ok(false),
                Err(e) => Err(e).sys("fstatat(.wh.)"),
            };
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

/// Another name of a hard-linked file: its parent and the name there.
type Alias = (Arc<Node>, Box<OsStr>);

/// What few nodes have, out of line so that the others pay 8 bytes for it.
#[derive(Debug, Default)]
struct Rare {
    /// Other names of a hard-linked file that this mount has seen.
    aliases: Vec<Alias>,
    /// Its attributes when its last name went (see `Node::mark_unlinked`).
    unlinked: Option<Attr>,
}

#[derive(Debug)]
pub struct Location {
    pub parent: Option<Arc<Node>>,
    name: Box<OsStr>,
    rare: Option<Box<Rare>>,
}

impl Location {
    pub fn new(parent: Option<Arc<Node>>, name: &OsStr) -> Location {
        Location {
            parent,
            name: name.into(),
            rare: None,
        }
    }

    fn aliases(&self) -> &[Alias] {
        self.rare.as_deref().map_or(&[], |r| r.aliases.as_slice())
    }

    fn aliases_mut(&mut self) -> &mut Vec<Alias> {
        &mut self.rare.get_or_insert_default().aliases
    }

    fn is(&self, parent: u64, name: &OsStr) -> bool {
        self.parent.as_ref().map(|p| p.id) == Some(parent) && *self.name == *name
    }
}

/// Where a node's data lives now.
#[derive(Debug, Clone)]
pub struct NodeState {
    /// Index of the topmost layer holding the object.
    pub layer: usize,
    pub dir: Option<Arc<DirStack>>,
}

/// What the kernel knows by a node id. Kept small: the kernel may hold one
/// per file of a tree. Attributes are not kept; they are read from the
/// backing object when asked for.
#[derive(Debug)]
pub struct Node {
    pub id: u64,
    /// Bumped when the id is reused for a new object (the backing inode
    /// number came back after an unlink); the kernel then retires the old
    /// inode instead of confusing the two.
    pub generation: u32,
    pub kind: FileKind,
    lookups: AtomicU64,
    loc: RwLock<Location>,
    state: RwLock<NodeState>,
    /// Held while the node is copied up, so racing writers copy up once.
    pub copy_up_lock: Mutex<()>,
    /// Its last name is gone; it lives on through open handles only.
    unlinked: AtomicBool,
    /// Known to carry no `security.capability`: made by this mount, or read
    /// without one since. Only a setxattr through this mount adds one
    /// (lower layers never change, copy-up copies what was read, writes and
    /// chown only ever remove one).
    pub no_capability: KnownAbsent,
}

impl Drop for Node {
    /// A node holds its parent: dropping the last node of a deep chain would
    /// drop every ancestor recursively, one stack frame per level, and any
    /// user can make a tree deep enough to overflow a thread's stack. The
    /// ancestors whose last holder is this chain are released by a loop.
    fn drop(&mut self) {
        fn take_parents(loc: &mut Location, orphans: &mut Vec<Arc<Node>>) {
            orphans.extend(loc.parent.take());
            if let Some(rare) = loc.rare.take() {
                orphans.extend(rare.aliases.into_iter().map(|(p, _)| p));
            }
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
    pub fn new(id: u64, generation: u32, kind: FileKind, loc: Location, state: NodeState) -> Node {
        Node {
            id,
            generation,
            kind,
            lookups: AtomicU64::new(0),
            loc: RwLock::new(loc),
            state: RwLock::new(state),
            copy_up_lock: Mutex::new(()),
            unlinked: AtomicBool::new(false),
            no_capability: KnownAbsent::default(),
        }
    }

    /// Its last name is gone; `last` is what it was as it went, for a
    /// getattr no open handle can answer.
    pub fn mark_unlinked(&self, last: Option<Attr>) {
        if last.is_some() {
            self.loc.write().rare.get_or_insert_default().unlinked = last;
        }
        self.unlinked.store(true, Ordering::Release);
    }

    pub fn is_unlinked(&self) -> bool {
        self.unlinked.load(Ordering::Acquire)
    }

    /// The attributes it had when its last name went, if it has.
    pub fn unlinked_attr(&self) -> Option<Attr> {
        if !self.is_unlinked() {
            return None;
        }
        self.loc.read().rare.as_ref().and_then(|r| r.unlinked)
    }

    pub fn set_state(&self, state: NodeState) {
        *self.state.write() = state;
    }

    /// All names of the node: its primary location first, then aliases.
    pub fn names(&self) -> Vec<(Arc<Node>, OsString)> {
        let loc = self.loc.read();
        let mut names = Vec::with_capacity(1 + loc.aliases().len());
        if let Some(parent) = &loc.parent {
            names.push((parent.clone(), loc.name.to_os_string()));
        }
        names.extend(
            loc.aliases()
                .iter()
                .map(|(p, n)| (p.clone(), n.to_os_string())),
        );
        names
    }

    /// Whether (parent, name) is one of its names now.
    pub fn has_name(&self, parent: u64, name: &OsStr) -> bool {
        let loc = self.loc.read();
        loc.is(parent, name)
            || loc
                .aliases()
                .iter()
                .any(|(p, n)| p.id == parent && **n == *name)
    }

    /// Records another name of a hard-linked node.
    pub fn add_alias(&self, parent: &Arc<Node>, name: &OsStr) {
        let mut loc = self.loc.write();
        let known = loc.is(parent.id, name)
            || loc
                .aliases()
                .iter()
                .any(|(p, n)| p.id == parent.id && **n == *name);
        if !known {
            loc.aliases_mut().push((parent.clone(), name.into()));
        }
    }

    /// Forgets the name (parent, name); an alias takes the primary place.
    /// Returns whether the node still has a name.
    pub fn remove_name(&self, parent: u64, name: &OsStr) -> bool {
        let mut loc = self.loc.write();
        if let Some(rare) = &mut loc.rare {
            rare.aliases
                .retain(|(p, n)| !(p.id == parent && **n == *name));
        }
        if loc.is(parent, name) {
            if let Some((p, n)) = loc.rare.as_mut().and_then(|r| r.aliases.pop()) {
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
        if loc.is(old_parent, old_name) {
            loc.parent = Some(new_parent.clone());
            loc.name = new_name.into();
        } else if let Some(alias) = loc
            .rare
            .iter_mut()
            .flat_map(|r| r.aliases.iter_mut())
            .find(|(p, n)| p.id == old_parent && **n == *old_name)
        {
            *alias = (new_parent.clone(), new_name.into());
        }
    }

    pub fn state(&self) -> NodeState {
        self.state.read().clone()
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
        self.loc.read().name.to_os_string()
    }

    pub fn is_at(&self, parent: u64, name: &OsStr) -> bool {
        self.loc.read().is(parent, name)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel may hold a node per file of a tree: with its Arc counts
    /// a node takes one 112-byte block of glibc's heap, and no more.
    #[test]
    fn a_node_fits_a_112_byte_block() {
        assert!(std::mem::size_of::<Node>() + 2 * std::mem::size_of::<usize>() <= 104);
    }

    fn read(known: &KnownAbsent, value: Option<u8>) -> (Option<u8>, bool) {
        let mut asked = false;
        let got = known
            .read_with(|| {
                asked = true;
                Ok::<_, ()>(value)
            })
            .unwrap();
        (got, asked)
    }

    #[test]
    fn an_absence_is_remembered_until_a_change() {
        let known = KnownAbsent::default();
        assert_eq!(read(&known, Some(1)), (Some(1), true));
        assert_eq!(read(&known, None), (None, true));
        assert_eq!(read(&known, Some(1)), (None, false));
        known.changed();
        assert_eq!(read(&known, Some(2)), (Some(2), true));
        known.set();
        assert_eq!(read(&known, Some(2)), (None, false));
    }

    #[test]
    fn an_absence_read_across_a_change_is_not_remembered() {
        let known = KnownAbsent::default();
        let got = known.read_with(|| {
            // The change lands after the layers were read.
            known.changed();
            Ok::<Option<u8>, ()>(None)
        });
        assert_eq!(got, Ok(None));
        assert_eq!(read(&known, Some(3)), (Some(3), true));
    }
}
