//! The overlay core: layers, the node table, the merged lookup cache, and the
//! operations on the merged tree. It knows nothing of FUSE; the adapter in
//! `crate::fuse` maps requests onto it.

pub mod acl;
pub mod attr;
pub mod copyup;
mod dentry;
mod detach;
pub mod dirfd;
pub mod error;
mod files;
mod format;
pub mod handles;
pub mod idmap;
pub mod ino;
pub mod layer;
pub mod listing;
pub mod marker;
pub mod node;
mod node_table;
pub mod readdir;
mod rename;
pub mod resolve;
mod setattr;
#[cfg(test)]
mod test_layers;
#[cfg(test)]
mod tests;
pub mod workdir;
pub mod write;
#[cfg(test)]
mod write_ops_tests;
#[cfg(test)]
mod write_tests;
mod xattr;

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use dashmap::DashMap;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, readlinkat};
use nix::sys::stat::{fstat, fstatat};
use nix::sys::statvfs::{Statvfs, fstatvfs};

use crate::sys::{self, XattrTarget};
use attr::Attr;
pub use attr::FileKind;
use dentry::{Dentry, DentryCache};
use error::SysContext;
pub use error::{Error, Result};
pub use files::wants_write;
use format::UpperFormat;
pub use handles::{Handles, OpenFile};
use idmap::IdShift;
use ino::{InoMapper, ROOT_ID};
use layer::{Layer, open_beneath};
use listing::ListingCache;
use node::{DirLayer, DirStack, Location, Node, NodeState};
use node_table::{Existing, NodeTable};
use workdir::WorkDir;

/// The layers to stack. `lowers[0]` is the topmost lower.
#[derive(Debug, Clone, Default)]
pub struct OverlayConfig {
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    /// The work directory (on the upper's filesystem); needed with an upper.
    pub work: Option<PathBuf>,
    /// Skip fsync during copy-up (podman's `volatile`).
    pub volatile: bool,
    /// Write the upper in kernel overlayfs' `userxattr` format even where
    /// `trusted.*` xattrs could be set.
    pub userxattr: bool,
    /// How owners stored in the layers are shown (`uidmapping=`, ...).
    pub ids: IdShift,
    /// Every directory reports one link (fuse-overlayfs' `static_nlink`).
    pub static_nlink: bool,
    /// No POSIX ACLs in the merged view (`noacl`).
    pub no_acl: bool,
}

/// The kernel's caches, as far as the core needs to correct them: changes
/// the kernel did not ask for itself (a copy-up turning a long-cached lower
/// object into an upper one, the link count other names of a file see).
pub trait KernelCache: Send + Sync {
    fn invalidate_attr(&self, id: u64);
    /// The kernel's entry `name` in directory `parent`: the next lookup of
    /// it asks the core again.
    fn invalidate_entry(&self, parent: u64, name: &OsStr);
}

/// What a node's name leads to, next to an object found elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backs {
    /// The same inode: a hard link.
    Same,
    /// Nothing: the node's file is gone and its number was reused.
    Gone,
    /// Another file: the two share a number without being one object.
    Other,
}

/// Where a node's backing object is: a directory (by its own descriptor) or
/// an entry `name` in one layer's copy of its parent directory.
enum Backing {
    Dir(Arc<DirStack>),
    Entry { dir: Arc<DirLayer>, name: OsString },
}

pub struct Overlay {
    layers: Vec<Layer>,
    nodes: NodeTable,
    dentries: DentryCache,
    /// Listings readers are in the middle of, by directory.
    listings: ListingCache,
    /// The root's st_ino (its node id is FUSE's fixed root id).
    root_ino: u64,
    pub handles: Handles,
    work: Option<WorkDir>,
    volatile: bool,
    kernel_cache: std::sync::OnceLock<Box<dyn KernelCache>>,
    /// How markers are written into the upper (probed at mount).
    format: UpperFormat,
    /// Nodes left to the descriptors opened before their file was copied
    /// up into a new node (`detach`), until the kernel forgets them, with
    /// the name their file had then.
    detached: DashMap<u64, (Arc<Node>, OsString)>,
    /// Owners as stored and as shown. The core works with stored ids
    /// throughout; `shown` translates attributes as they leave it.
    ids: IdShift,
    static_nlink: bool,
    no_acl: bool,
    /// Attributes leave the core as they are (no id shift, no static_nlink):
    /// the common case costs one test.
    attrs_as_stored: bool,
}

impl Overlay {
    pub fn new(config: &OverlayConfig) -> Result<Overlay> {
        if config.lowers.is_empty() {
            return Err(Error::new(Errno::EINVAL, "no lower layer"));
        }
        let mut layers = Vec::new();
        if let Some(upper) = &config.upper {
            layers.push(Layer::open(0, upper, true)?);
        }
        for lower in &config.lowers {
            layers.push(Layer::open(layers.len(), lower, false)?);
        }
        let work = match (&config.upper, &config.work) {
            (Some(_), Some(work)) => Some(WorkDir::prepare(work)?),
            (Some(_), None) => {
                return Err(Error::new(Errno::EINVAL, "an upper layer needs a work dir"));
            }
            (None, _) => None,
        };
        let format = match &work {
            Some(work) => {
                let format = UpperFormat::probe(work, config.userxattr)?;
                tracing::info!("upper format: {format}");
                format
            }
            None => UpperFormat::TRUSTED,
        };
        let devices: Vec<u64> = layers.iter().map(|l| l.dev).collect();
        let inos = InoMapper::new(&devices);

        let stack = resolve::root_stack(&layers)?;
        let top = stack.top();
        let raw = Attr::from_stat(&fstat(top.fd()?).sys("fstat root")?);
        let root_ino = inos.map(raw.dev, raw.ino);
        let root = Node::new(
            ROOT_ID,
            0,
            raw.kind(),
            Location::new(None, OsStr::new("")),
            NodeState {
                layer: top.layer,
                dir: Some(Arc::new(stack)),
            },
        );
        Ok(Overlay {
            layers,
            nodes: NodeTable::new(inos, root),
            dentries: DentryCache::default(),
            listings: ListingCache::default(),
            root_ino,
            handles: Handles::default(),
            work,
            volatile: config.volatile,
            format,
            detached: DashMap::new(),
            kernel_cache: std::sync::OnceLock::new(),
            attrs_as_stored: config.ids.is_identity() && !config.static_nlink,
            ids: config.ids.clone(),
            static_nlink: config.static_nlink,
            no_acl: config.no_acl,
        })
    }

    /// The work dir; writes need one (no upper means a read-only mount).
    fn work(&self) -> Result<&WorkDir> {
        self.work
            .as_ref()
            .ok_or_else(|| Error::new(Errno::EROFS, "write"))
    }

    /// Connects the core to the kernel's caches (once the session exists).
    pub fn set_kernel_cache(&self, cache: Box<dyn KernelCache>) {
        let _ = self.kernel_cache.set(cache);
    }

    fn invalidate_attr(&self, id: u64) {
        if let Some(cache) = self.kernel_cache.get() {
            cache.invalidate_attr(id);
        }
    }

    fn invalidate_entry(&self, parent: u64, name: &OsStr) {
        if let Some(cache) = self.kernel_cache.get() {
            cache.invalidate_entry(parent, name);
        }
    }

    pub fn has_upper(&self) -> bool {
        self.work.is_some()
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn is_upper(&self, layer: usize) -> bool {
        self.layers[layer].upper
    }

    /// A number no node has, nor will have.
    pub fn fresh_id(&self) -> u64 {
        self.nodes.unique_ino()
    }

    pub fn node(&self, id: u64) -> Result<Arc<Node>> {
        self.nodes
            .get(id)
            .ok_or_else(|| Error::new(Errno::ESTALE, "find node"))
    }

    /// Resolves `name` in directory `parent` and takes one kernel reference
    /// on the result, whose attributes are as the merged view shows them.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<(Arc<Node>, Attr)> {
        let (node, attr) = self.lookup_stored(parent, name)?;
        Ok((node, self.shown(attr)))
    }

    /// `lookup` with the attributes as stored in the layers (the core's own
    /// view: copy-up and new objects work with the stored owners). The
    /// merged lookup cache answers repeated lookups without touching the
    /// layers.
    fn lookup_stored(&self, parent: u64, name: &OsStr) -> Result<(Arc<Node>, Attr)> {
        check_name(name)?;
        match self.dentries.get(parent, name) {
            Some(Dentry::Negative) => return Err(Error::new(Errno::ENOENT, "lookup")),
            Some(Dentry::Positive(id)) => {
                if let Some(node) = self.nodes.take_ref(id) {
                    if node.has_name(parent, name) {
                        let attr = self.node_attr(&node)?;
                        return Ok((node, attr));
                    }
                    // Another name with the same hash: give the reference
                    // back and resolve.
                    self.forget(id, 1);
                }
            }
            None => {}
        }
        let parent_node = self.node(parent)?;
        let stack = parent_node.dir_stack()?;
        let resolved = resolve::resolve_child(&self.layers, &stack, name)
            .map_err(|e| e.with_path(join(&parent_node.path(), name)))?;
        let Some(resolved) = resolved else {
            self.dentries.insert_negative(parent, name);
            return Err(Error::new(Errno::ENOENT, "lookup"));
        };
        let merged = resolved.dir.as_ref().is_some_and(|d| d.is_merged());
        let resolved_attr = resolved.attr;
        let (node, fresh) = self.intern(&parent_node, name, resolved);
        self.dentries.insert_positive(parent, name, node.id);
        // A node made just now is what the resolution stat'ed; an existing
        // one may have been copied up since.
        let attr = if fresh {
            merged_attr(resolved_attr, node.id, merged)
        } else {
            self.node_attr(&node)?
        };
        Ok((node, attr))
    }

    /// Finds or creates the node for a resolved name, with one reference.
    /// Returns the node and whether it was made from `resolved` just now
    /// (its attributes are then fresh; an existing node's may predate a copy-up).
    fn intern(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        resolved: resolve::Resolved,
    ) -> (Arc<Node>, bool) {
        let kind = resolved.attr.kind();
        let id = self.nodes.ino_of(resolved.origin.0, resolved.origin.1);
        let judge = |node: &Arc<Node>| {
            // The number may have been reused: the file the node stood for
            // is gone (or going, as an unlink in another directory races
            // this lookup).
            let hard_link = kind != FileKind::Directory && node.kind == kind;
            let elsewhere = hard_link && !node.is_at(parent.id, name);
            let primary = if elsewhere {
                self.primary_name_backs(node, &resolved.attr)
            } else {
                Backs::Same
            };
            if node.is_unlinked() || primary == Backs::Gone {
                return Existing::Replace;
            }
            // Hard links share a node; two different directories, or
            // objects of different types, never may.
            let same_object = node.kind == kind
                && (kind != FileKind::Directory || node.is_at(parent.id, name))
                && primary == Backs::Same;
            if same_object {
                Existing::Share
            } else {
                Existing::Skip
            }
        };
        let make = |id, generation| self.new_node(id, generation, parent, name, &resolved);
        let (node, fresh) = self.nodes.intern(id, judge, make);
        if !fresh && kind != FileKind::Directory && !node.is_at(parent.id, name) {
            node.add_alias(parent, name);
        }
        (node, fresh)
    }

    /// Resolves `name` in `parent` for the core's own use (remove, rename):
    /// the node keeps one reference while the operation runs, given back
    /// when the guard is dropped.
    pub(crate) fn peek(&self, parent: u64, name: &OsStr) -> Result<Peeked<'_>> {
        let (node, attr) = self.lookup_stored(parent, name)?;
        Ok(Peeked {
            overlay: self,
            node,
            attr,
        })
    }

    /// Records `parent/name` as one more name of `node` (a new hard link),
    /// with one kernel reference for the new name.
    fn add_name(&self, node: &Arc<Node>, parent: &Arc<Node>, name: &OsStr) -> Result<Arc<Node>> {
        let node = self
            .nodes
            .take_ref(node.id)
            .ok_or_else(|| Error::new(Errno::ESTALE, "link").with_path(node.path()))?;
        node.add_alias(parent, name);
        self.dentries.insert_positive(parent.id, name, node.id);
        Ok(node)
    }

    /// What the node's primary name leads to now, compared with the backing
    /// object `attr` describes.
    fn primary_name_backs(&self, node: &Node, attr: &Attr) -> Backs {
        let Ok(Backing::Entry { dir, name }) = self.backing(node) else {
            return Backs::Gone;
        };
        let Ok(dirfd) = dir.fd() else {
            // Unknown (out of descriptors): never take it for gone, which
            // would retire a live node.
            return Backs::Other;
        };
        match fstatat(dirfd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_dev == attr.dev && st.st_ino == attr.backing_ino => Backs::Same,
            Ok(_) => Backs::Other,
            Err(_) => Backs::Gone,
        }
    }

    fn new_node(
        &self,
        id: u64,
        generation: u32,
        parent: &Arc<Node>,
        name: &OsStr,
        resolved: &resolve::Resolved,
    ) -> Node {
        Node::new(
            id,
            generation,
            resolved.attr.kind(),
            Location::new(Some(parent.clone()), name),
            NodeState {
                layer: resolved.layer,
                dir: resolved.dir.clone().map(Arc::new),
            },
        )
    }

    /// Drops `n` kernel references to `id`; the node goes when none are
    /// left. Returns whether it went.
    pub fn forget(&self, id: u64, n: u64) -> bool {
        if id == ROOT_ID {
            return false;
        }
        let Some(node) = self.nodes.forget(id, n) else {
            return false;
        };
        self.detached.remove(&id);
        if let Some(parent) = node.parent() {
            self.dentries
                .remove_if_points_to(parent.id, &node.name(), id);
        }
        if node.kind == FileKind::Directory {
            self.listings.forget(id);
        }
        true
    }

    /// Hands the memory of forgotten nodes back to the system: the tables'
    /// room, and the allocator's free pages, which glibc keeps otherwise.
    /// Worth it after the kernel forgot many nodes, not after each.
    pub fn release_memory(&self) {
        self.nodes.shrink();
        self.dentries.shrink();
        dirfd::release_memory();
        sys::release_free_memory();
        let (in_use, free) = sys::heap_usage();
        tracing::debug!(in_use, free, "memory handed back");
    }

    /// The attributes the merged view shows.
    pub fn getattr(&self, id: u64) -> Result<Attr> {
        let node = self.node(id)?;
        Ok(self.shown(self.node_attr(&node)?))
    }

    /// Attributes as they leave the core: owners shifted or squashed, and
    /// with `static_nlink` one link for every directory.
    #[inline]
    pub(crate) fn shown(&self, mut attr: Attr) -> Attr {
        if self.attrs_as_stored {
            return attr;
        }
        attr.uid = self.ids.shown_uid(attr.uid);
        attr.gid = self.ids.shown_gid(attr.gid);
        if self.static_nlink && attr.is_dir() {
            attr.nlink = 1;
        }
        attr
    }

    /// The owner, as stored, of what `caller` creates: their ids shifted
    /// down. EOVERFLOW when no range covers one, as the kernel answers on an
    /// idmapped mount for a caller it cannot store.
    pub(crate) fn stored_caller(&self, caller: write::Caller) -> Result<write::Caller> {
        if self.ids.maps_nothing() {
            return Ok(caller);
        }
        match (self.ids.disk_uid(caller.uid), self.ids.disk_gid(caller.gid)) {
            (Some(uid), Some(gid)) => Ok(write::Caller { uid, gid, ..caller }),
            _ => Err(Error::new(Errno::EOVERFLOW, "map caller to a stored owner")),
        }
    }

    /// The mapping of owners, for the write paths.
    pub(crate) fn ids(&self) -> &IdShift {
        &self.ids
    }

    /// Whether the mount has POSIX ACLs (not `noacl`).
    pub(crate) fn acls(&self) -> bool {
        !self.no_acl
    }

    /// The attributes of the node's backing object as it is now (stored
    /// owners). Not kept in the node: the kernel caches them, and asks
    /// again only when its cache expires or drops them.
    pub(crate) fn node_attr(&self, node: &Node) -> Result<Attr> {
        let state = node.state();
        if node.is_unlinked() {
            // Its old name may hold another file by now: ask an open handle.
            let mut attr = match self.handles.files_of(node.id).first() {
                Some(open) => Attr::from_stat(&fstat(&*open.file()).sys("fstat")?),
                None => node
                    .unlinked_attr()
                    .ok_or_else(|| Error::new(Errno::ESTALE, "getattr").with_path(node.path()))?,
            };
            attr.ino = node.id;
            attr.nlink = 0;
            return Ok(attr);
        }
        let raw = match self.backing(node)? {
            Backing::Dir(stack) => fstat(stack.top().fd()?.as_fd()).sys("fstat"),
            Backing::Entry { dir, name } => fstatat(
                dir.fd()?.as_fd(),
                name.as_os_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .sys("fstatat"),
        }
        .map_err(|e| e.with_layer(state.layer).with_path(node.path()))?;
        let merged = state.dir.as_ref().is_some_and(|d| d.is_merged());
        Ok(merged_attr(Attr::from_stat(&raw), self.ino(node), merged))
    }

    /// The inode number the merged view shows for the node: its id, but
    /// for the root the number its own backing object maps to.
    pub(crate) fn ino(&self, node: &Node) -> u64 {
        if node.id == ROOT_ID {
            self.root_ino
        } else {
            node.id
        }
    }

    fn backing(&self, node: &Node) -> Result<Backing> {
        let state = node.state();
        if let Some(dir) = state.dir {
            return Ok(Backing::Dir(dir));
        }
        let parent = node.parent().ok_or_else(|| stale(node))?;
        let dir = parent
            .dir_stack()?
            .layers
            .iter()
            .find(|l| l.layer == state.layer)
            .cloned()
            .ok_or_else(|| stale(node))?;
        Ok(Backing::Entry {
            dir,
            name: node.name(),
        })
    }

    /// Runs `f` with the xattr target naming the node's backing object.
    pub(crate) fn with_xattr_target<T>(
        &self,
        node: &Node,
        f: impl FnOnce(XattrTarget<'_>) -> std::io::Result<T>,
        op: &'static str,
    ) -> Result<T> {
        let layer = node.state().layer;
        if node.is_unlinked() {
            // Only open handles reach a file whose last name is gone.
            let open = self.handles.files_of(node.id).into_iter().next();
            let open = open.ok_or_else(|| Error::new(Errno::ENOENT, op).with_path(node.path()))?;
            let file = open.file();
            return f(XattrTarget::Fd(file.as_fd())).sys(op);
        }
        let result = match self.backing(node)? {
            Backing::Dir(stack) => f(XattrTarget::Fd(stack.top().fd()?.as_fd())),
            Backing::Entry { dir, name } => f(XattrTarget::Entry(dir.fd()?.as_fd(), &name)),
        };
        result
            .sys(op)
            .map_err(|e| e.with_layer(layer).with_path(node.path()))
    }

    pub fn readlink(&self, id: u64) -> Result<OsString> {
        let node = self.node(id)?;
        if node.kind != FileKind::Symlink {
            return Err(Error::new(Errno::EINVAL, "readlink"));
        }
        match self.backing(&node)? {
            Backing::Entry { dir, name } => readlinkat(dir.fd()?.as_fd(), name.as_os_str())
                .sys("readlinkat")
                .map_err(|e| e.with_layer(dir.layer).with_path(node.path())),
            Backing::Dir(_) => Err(Error::new(Errno::EINVAL, "readlink")),
        }
    }

    /// Opens the backing file of a non-directory node.
    pub fn open_backing(&self, node: &Node, flags: i32) -> Result<File> {
        if node.kind == FileKind::Directory {
            return Err(Error::new(Errno::EISDIR, "open"));
        }
        let layer = node.state().layer;
        if files::wants_write(flags) && !self.layers[layer].upper {
            // A lower layer is never opened for writing: copy-up comes first.
            return Err(Error::new(Errno::EROFS, "open lower for writing").with_path(node.path()));
        }
        let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK | libc::O_TRUNC;
        let oflags = OFlag::from_bits_truncate(flags & keep) | OFlag::O_NOCTTY;
        match self.backing(node)? {
            Backing::Entry { dir, name } => open_beneath(dir.fd()?.as_fd(), &name, oflags)
                .map(File::from)
                .sys("openat2")
                .map_err(|e| e.with_layer(layer).with_path(node.path())),
            Backing::Dir(_) => Err(Error::new(Errno::EISDIR, "open")),
        }
    }

    /// An xattr as the merged view shows it (ids in ACLs and capabilities
    /// shifted up).
    pub fn getxattr(&self, id: u64, name: &OsStr) -> Result<Vec<u8>> {
        if marker::is_private_xattr(name.as_bytes()) {
            return Err(Error::new(Errno::ENODATA, "getxattr"));
        }
        self.check_acl_support(name, "getxattr")?;
        let cname =
            CString::new(name.as_bytes()).map_err(|_| Error::new(Errno::EINVAL, "getxattr"))?;
        let node = self.node(id)?;
        // The kernel asks for the file capability before the first write to
        // every inode and at every chown; what is known to be absent is
        // answered without a syscall.
        let read = || self.with_xattr_target(&node, |t| sys::get_xattr(t, &cname), "getxattr");
        let value = if name.as_bytes() == idmap::CAPABILITY_XATTR {
            node.no_capability.read_with(read)?
        } else {
            read()?
        };
        let value = value.ok_or_else(|| Error::new(Errno::ENODATA, "getxattr"))?;
        Ok(self.ids.xattr_to_shown(name.as_bytes(), value))
    }

    /// With `noacl` the ACL xattrs do not exist for the merged view, as on
    /// a filesystem mounted without ACL support.
    pub(crate) fn check_acl_support(&self, name: &OsStr, op: &'static str) -> Result<()> {
        if self.no_acl && acl::is_acl_xattr(name.as_bytes()) {
            return Err(Error::new(Errno::EOPNOTSUPP, op));
        }
        Ok(())
    }

    /// The NUL-separated xattr names, overlay-private ones (and with
    /// `noacl` the ACLs) left out.
    pub fn listxattr(&self, id: u64) -> Result<Vec<u8>> {
        let node = self.node(id)?;
        let raw = self.with_xattr_target(&node, sys::list_xattr, "listxattr")?;
        let mut out = Vec::with_capacity(raw.len());
        for name in raw.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            let hidden_acl = self.no_acl && acl::is_acl_xattr(name);
            if !marker::is_private_xattr(name) && !hidden_acl {
                out.extend_from_slice(name);
                out.push(0);
            }
        }
        Ok(out)
    }

    /// Space figures come from the upper (where writes go), else the top lower.
    pub fn statfs(&self) -> Result<Statvfs> {
        fstatvfs(self.layers[0].root.as_fd())
            .sys("fstatvfs")
            .map_err(|e| e.with_layer(0))
    }
}

/// A node resolved by `Overlay::peek`, holding one reference until dropped.
pub(crate) struct Peeked<'a> {
    overlay: &'a Overlay,
    pub node: Arc<Node>,
    pub attr: Attr,
}

impl std::ops::Deref for Peeked<'_> {
    type Target = Arc<Node>;
    fn deref(&self) -> &Arc<Node> {
        &self.node
    }
}

impl Drop for Peeked<'_> {
    fn drop(&mut self) {
        self.overlay.forget(self.node.id, 1);
    }
}

/// Applies the merged view's rules to a backing object's attributes.
fn merged_attr(mut attr: Attr, ino: u64, merged_dir: bool) -> Attr {
    attr.ino = ino;
    if merged_dir {
        // As kernel overlayfs: a merged directory's link count is unknown.
        attr.nlink = 1;
    }
    attr
}

fn check_name(name: &OsStr) -> Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.contains(&b'/') || bytes == b"." || bytes == b".." {
        return Err(Error::new(Errno::EINVAL, "lookup"));
    }
    if bytes.len() > 255 {
        return Err(Error::new(Errno::ENAMETOOLONG, "lookup"));
    }
    Ok(())
}

fn stale(node: &Node) -> Error {
    Error::new(Errno::ESTALE, "locate backing object").with_path(node.path())
}

fn join(dir: &OsStr, name: &OsStr) -> OsString {
    let mut path = dir.to_os_string();
    if !dir.as_bytes().ends_with(b"/") {
        path.push("/");
    }
    path.push(name);
    path
}

impl Overlay {
    /// access(2) against the merged attributes (the kernel normally checks
    /// permissions itself with default_permissions; this serves callers that
    /// still ask).
    pub fn access(&self, id: u64, uid: u32, gid: u32, mask: i32) -> Result<()> {
        let attr = self.getattr(id)?;
        if mask == libc::F_OK {
            return Ok(());
        }
        let mode = attr.mode;
        let allowed = if uid == 0 {
            // Root may read and write anything; execute needs some x bit.
            let any_x = mode & 0o111 != 0 || attr.is_dir();
            libc::R_OK | libc::W_OK | if any_x { libc::X_OK } else { 0 }
        } else {
            let bits = if attr.uid == uid {
                mode >> 6
            } else if attr.gid == gid {
                mode >> 3
            } else {
                mode
            };
            (bits & 0o7) as i32
        };
        if mask & !allowed != 0 {
            return Err(Error::new(Errno::EACCES, "access"));
        }
        Ok(())
    }
}
