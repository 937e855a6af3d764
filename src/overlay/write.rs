//! The mutating operations on the merged tree. Every change lands in the
//! upper in kernel overlayfs format: deletions of lower names leave
//! whiteouts, directories that replace lower ones are opaque, and objects
//! that replace a whiteout are built in the work dir and swapped in.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags, renameat2};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, fchmodat, mkdirat, mknodat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, symlinkat, unlinkat};

use super::Overlay;
use super::acl;
use super::attr::Attr;
use super::copyup::{CopyData, TempEntry, upper_whiteout_at};
use super::error::{Error, Result, SysContext};
use super::format::WhiteoutForm;
use super::handles::OpenFile;
use super::layer::open_beneath;
use super::marker;
use super::node::{DirLayer, DirStack, Node};
use super::resolve::{self, Probe};
use crate::sys::{self, XattrTarget};

/// Who asks: new objects belong to them. The ids are the kernel's, as the
/// merged view shows owners; `Overlay::stored_caller` gives the ids to store.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// Its umask, for what it creates: the kernel leaves it to us
    /// (FUSE_DONT_MASK) because a default ACL overrides it.
    pub umask: u32,
}

impl Caller {
    /// Whether the caller is in group `gid`, supplementary groups included
    /// (read from /proc only when the primary group does not match).
    pub fn in_group(&self, gid: u32) -> bool {
        if self.gid == gid {
            return true;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return false;
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .is_some_and(|groups| groups.split_whitespace().any(|g| g.parse() == Ok(gid)))
    }
}

/// The kinds of object `mknod` and friends create.
#[derive(Debug, Clone)]
pub enum NewObject<'a> {
    File { mode: u32, flags: i32 },
    Dir { mode: u32 },
    Special { mode: u32, rdev: u64 },
    Symlink { target: &'a OsStr },
    Link { node: Arc<Node> },
}

/// A new object: its node (with one kernel reference), attributes, and for
/// a file the open handle.
pub struct Created {
    pub node: Arc<Node>,
    pub attr: Attr,
    pub handle: Option<(u64, Arc<OpenFile>)>,
}

pub use super::rename::RenameMode;
pub use super::setattr::{SetAttr, SetTime};

impl Overlay {
    /// Creates a new object `name` in `parent` and returns its node (with one
    /// kernel reference) and, for files, the open handle.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        object: NewObject<'_>,
        caller: Caller,
    ) -> Result<Created> {
        // Refused before anything changes: an owner the mapping cannot store,
        // a name every layer reads as an OCI marker.
        let stored_caller = self.stored_caller(caller)?;
        marker::refuse_oci_marker(name)?;
        let parent_node = self.node(parent)?;
        let stack = self.upper_dir(&parent_node)?;
        let upper = stack.top();
        let (object, default_acl) = acl::prepare(object, caller.umask, upper, self.acls())?;
        if let NewObject::Special { mode, rdev: 0 } = object
            && mode & libc::S_IFMT == libc::S_IFCHR
        {
            // A 0/0 character device is a whiteout; kernel overlayfs refuses too.
            return Err(Error::new(Errno::EPERM, "mknod(whiteout)"));
        }
        if let NewObject::Link { node } = &object {
            self.copy_up(node, CopyData::All)?;
        }
        let work = self.work()?;
        let parent_attr = self.node_attr(&parent_node)?;
        let owner = owner_for(stored_caller, &parent_attr);

        // Made in place, unless a whiteout holds the name: that fails with
        // EEXIST, and only then is the name looked at.
        let file = match self.make_object(upper.fd()?.as_fd(), name, &object, owner, &parent_attr) {
            Ok(file) => {
                let dir = matches!(object, NewObject::Dir { .. });
                // An OCI `.wh.NAME` in the upper hides NAME below, as a
                // whiteout does.
                if dir && upper.oci_hides(name)? {
                    self.mark_opaque(XattrTarget::Entry(upper.fd()?.as_fd(), name))?;
                } else if dir && self.format.moves_merged_dirs() && self.is_merged_stack(&stack) {
                    // As kernel overlayfs with redirect_dir: a directory made
                    // in a merged one is opaque, so wherever it moves later it
                    // never merges with a lower directory of the same name.
                    // Only that: the kernel goes on where the mark fails, and
                    // so do we. Without redirects (userxattr) the kernel
                    // leaves it unmarked.
                    if let Err(e) = self.mark_opaque(XattrTarget::Entry(upper.fd()?.as_fd(), name))
                    {
                        tracing::debug!("new directory left without an opaque mark: {e}");
                    }
                }
                file
            }
            Err(e) if e.errno() == Errno::EEXIST && upper_whiteout_at(upper, name)? => {
                // Build it in the work dir, then swap it with the whiteout;
                // the temp name then holds the old whiteout, removed on drop.
                let tmp = TempEntry::new(work);
                let file = self.make_object(tmp.fd(), &tmp.name, &object, owner, &parent_attr)?;
                if let Some(default_acl) = &default_acl {
                    acl::inherit(default_acl, tmp.fd(), &tmp.name)?;
                }
                if matches!(object, NewObject::Dir { .. }) {
                    self.mark_opaque(XattrTarget::Entry(tmp.fd(), &tmp.name))?;
                }
                tmp.swap_with(upper, name)?;
                file
            }
            Err(e) => return Err(e),
        };

        if let NewObject::Link { node: linked } = &object {
            // The new name is the same inode: the kernel must see the same
            // node, or two inodes would cache one file.
            let node = self.add_name(linked, &parent_node, name)?;
            let attr = self.getattr(node.id)?;
            return Ok(Created {
                node,
                attr,
                handle: None,
            });
        }
        self.forget_dentry(parent, name);
        let (node, attr) = self.lookup(parent, name)?;
        // The kernel asks for it before the first write: it has none.
        node.no_capability.set();
        let handle = match (file, &object) {
            (Some(file), NewObject::File { flags, .. }) => {
                Some(self.handles.add_file(node.clone(), *flags, file))
            }
            _ => None,
        };
        Ok(Created { node, attr, handle })
    }

    /// Makes the object itself at `dir/name`, owned by `owner`.
    fn make_object(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        object: &NewObject<'_>,
        owner: (u32, u32),
        parent_attr: &Attr,
    ) -> Result<Option<File>> {
        let mode_of = |m: u32| Mode::from_bits_truncate(m & 0o7777);
        let mut file = None;
        let mut mode = None;
        match object {
            NewObject::File { mode: m, flags } => {
                let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK;
                let flags =
                    OFlag::from_bits_truncate(flags & keep) | OFlag::O_CREAT | OFlag::O_EXCL;
                let how = nix::fcntl::OpenHow::new()
                    .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
                    .mode(mode_of(*m))
                    .resolve(
                        nix::fcntl::ResolveFlag::RESOLVE_BENEATH
                            | nix::fcntl::ResolveFlag::RESOLVE_NO_SYMLINKS,
                    );
                file = Some(File::from(
                    nix::fcntl::openat2(dir, name, how).sys("openat2(create)")?,
                ));
                mode = Some(*m);
            }
            NewObject::Dir { mode: m } => {
                let mut m = *m;
                if parent_attr.mode & libc::S_ISGID != 0 {
                    m |= libc::S_ISGID;
                }
                mkdirat(dir, name, mode_of(m)).sys("mkdirat")?;
                mode = Some(m);
            }
            NewObject::Special { mode: m, rdev } => {
                let kind = SFlag::from_bits_truncate(m & libc::S_IFMT);
                mknodat(dir, name, kind, mode_of(*m), *rdev).sys("mknodat")?;
                mode = Some(*m);
            }
            NewObject::Symlink { target } => {
                symlinkat(*target, dir, name).sys("symlinkat")?;
            }
            NewObject::Link { node } => {
                let (from_dir, from_name) = self.upper_location(node)?;
                linkat(
                    from_dir.top().fd()?.as_fd(),
                    from_name.as_os_str(),
                    dir,
                    name,
                    AtFlags::empty(),
                )
                .sys("linkat")?;
                return Ok(None);
            }
        }
        if owner != owner_as_created(parent_attr) {
            let chowned = fchownat(
                dir,
                name,
                Some(Uid::from_raw(owner.0)),
                Some(Gid::from_raw(owner.1)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            );
            if let Err(e) = chowned
                && !self.chown_error_ignored(e)
            {
                return Err(e).sys("fchownat");
            }
            // chown clears set-id bits; put the requested mode back.
            if let Some(m) = mode
                && m & (libc::S_ISUID | libc::S_ISGID) != 0
            {
                fchmodat(dir, name, mode_of(m), FchmodatFlags::FollowSymlink).sys("fchmodat")?;
            }
        }
        Ok(file)
    }

    /// Removes `name` from `parent` (unlink, or rmdir when `dir`).
    pub fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> Result<()> {
        let parent_node = self.node(parent)?;
        let child = self.peek(parent, name)?;
        let attr = child.attr;
        match (dir, attr.is_dir()) {
            (true, false) => return Err(Error::new(Errno::ENOTDIR, "rmdir")),
            (false, true) => return Err(Error::new(Errno::EISDIR, "unlink")),
            _ => {}
        }
        if dir && !self.is_empty_dir(&child)? {
            return Err(Error::new(Errno::ENOTEMPTY, "rmdir"));
        }
        let stack = self.upper_dir(&parent_node)?;
        let upper = stack.top();
        let child_in_upper = self.is_upper(child.state().layer);
        // A child found in a lower layer is the lower entry that needs
        // hiding; only an upper child may or may not shadow one.
        let needs_whiteout = !child_in_upper || self.lower_entry(&stack, name)?.is_some();
        let work = self.work()?;
        let ctx = |e: Error| e.with_path(child.path());

        if child_in_upper && dir {
            // Move the directory (and the whiteouts it may hold) out of the
            // way in one step, then clear it in the work dir.
            let tmp = TempEntry::new(work);
            if needs_whiteout {
                self.make_whiteout(tmp.fd(), &tmp.name, upper)?;
                tmp.swap_with(upper, name).map_err(ctx)?;
            } else if !remove_empty_dir(upper, name).map_err(ctx)? {
                // It holds whiteouts. (An empty one is removed in place: a
                // rename into the work dir costs the kernel a walk up the
                // whole tree, as its rename lock checks ancestry.)
                renameat2(
                    upper.fd()?.as_fd(),
                    name,
                    tmp.fd(),
                    tmp.name.as_os_str(),
                    RenameFlags::empty(),
                )
                .sys("renameat2(rmdir)")
                .map_err(ctx)?;
            }
        } else if child_in_upper {
            if needs_whiteout {
                let mut tmp = TempEntry::new(work);
                self.make_whiteout(tmp.fd(), &tmp.name, upper)?;
                renameat2(
                    tmp.fd(),
                    tmp.name.as_os_str(),
                    upper.fd()?.as_fd(),
                    name,
                    RenameFlags::empty(),
                )
                .sys("renameat2(whiteout)")
                .map_err(ctx)?;
                tmp.keep = true;
            } else {
                unlinkat(upper.fd()?.as_fd(), name, UnlinkatFlags::NoRemoveDir)
                    .sys("unlinkat")
                    .map_err(ctx)?;
            }
        } else {
            self.make_whiteout(upper.fd()?.as_fd(), name, upper)
                .map_err(ctx)?;
        }
        if child.remove_name(parent, name) {
            // Other names of the file see its link count drop.
            self.invalidate_attr(child.id);
        } else {
            child.mark_unlinked(Some(attr));
        }
        self.dentries.insert_negative(parent, name);
        Ok(())
    }

    /// The upper directory stack holding the node and its name there. The
    /// root is reached as "." of the upper root.
    pub fn upper_location(&self, node: &Arc<Node>) -> Result<(Arc<DirStack>, std::ffi::OsString)> {
        match node.parent() {
            Some(parent) => {
                let stack = parent.dir_stack()?;
                if !self.is_upper(stack.top().layer) {
                    return Err(Error::new(Errno::ESTALE, "upper location").with_path(node.path()));
                }
                Ok((stack, node.name()))
            }
            None => Ok((node.dir_stack()?, ".".into())),
        }
    }

    /// The first entry for `name` in the layers of `stack` below its upper.
    pub(super) fn lower_entry(&self, stack: &DirStack, name: &OsStr) -> Result<Option<Attr>> {
        for dl in stack.layers.iter().filter(|l| !self.is_upper(l.layer)) {
            match resolve::probe(dl, name)? {
                Probe::Missing => continue,
                Probe::Whiteout => return Ok(None),
                Probe::Entry(attr) => return Ok(Some(attr)),
            }
        }
        Ok(None)
    }

    pub(super) fn is_merged_stack(&self, stack: &DirStack) -> bool {
        stack.layers.iter().any(|l| !self.is_upper(l.layer))
    }

    /// Empty in the merged view (whiteouts in the upper do not count).
    pub(super) fn is_empty_dir(&self, node: &Node) -> Result<bool> {
        Ok(self.merged_entries(node)?.len() <= 2)
    }

    pub(super) fn chardev_whiteouts(&self) -> bool {
        self.format.whiteouts == WhiteoutForm::CharDevice
    }

    /// Writes a whiteout at `dir/name` in the upper's format, for the upper
    /// directory `lands_in` (`dir` itself, or the work dir it is built in):
    /// a 0/0 character device, or where the daemon may not mknod one, the
    /// xattr form kernel overlayfs reads since 6.7, which only counts in a
    /// directory marked as holding such whiteouts.
    pub fn make_whiteout(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        lands_in: &DirLayer,
    ) -> Result<()> {
        if self.chardev_whiteouts() {
            return mknodat(dir, name, SFlag::S_IFCHR, Mode::empty(), 0).sys("mknodat(whiteout)");
        }
        if !lands_in.holds_xwhiteouts() {
            // Marked first: an unmarked directory would show the whiteout
            // as an empty file.
            sys::set_xattr(
                XattrTarget::Fd(lands_in.fd()?.as_fd()),
                self.format.opaque_xattr(),
                b"x",
                0,
            )
            .sys("setxattr(xwhiteouts)")?;
            lands_in.note_xwhiteouts();
        }
        let fd = open_beneath(dir, name, OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY)
            .sys("create(whiteout)")?;
        drop(fd);
        sys::set_xattr(
            XattrTarget::Entry(dir, name),
            self.format.whiteout_xattr(),
            b"y",
            0,
        )
        .sys("setxattr(whiteout)")
    }

    pub(super) fn mark_opaque(&self, target: XattrTarget<'_>) -> Result<()> {
        sys::set_xattr(target, self.format.opaque_xattr(), b"y", 0).sys("setxattr(opaque)")
    }

    /// With squashing, every object shows the squash owner whatever is
    /// stored, so a chown the daemon may not do (an unprivileged mount, an
    /// id outside its namespace) is left out, as fuse-overlayfs does.
    pub(super) fn chown_error_ignored(&self, e: Errno) -> bool {
        self.ids().squashes() && matches!(e, Errno::EPERM | Errno::EINVAL)
    }

    pub(super) fn forget_dentry(&self, parent: u64, name: &OsStr) {
        self.dentries.remove(parent, name);
    }
}

/// New objects belong to the caller; in a set-group-ID directory they take
/// the directory's group, as the kernel does.
/// The owner the daemon's own credentials give a new object in a directory
/// with `parent`'s attributes: when it is the caller's, chown is skipped.
fn owner_as_created(parent: &Attr) -> (u32, u32) {
    static DAEMON: std::sync::OnceLock<Caller> = std::sync::OnceLock::new();
    let daemon = DAEMON.get_or_init(|| Caller {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        pid: std::process::id(),
        umask: 0,
    });
    owner_for(*daemon, parent)
}

fn owner_for(caller: Caller, parent: &Attr) -> (u32, u32) {
    let gid = if parent.mode & libc::S_ISGID != 0 {
        parent.gid
    } else {
        caller.gid
    };
    (caller.uid, gid)
}

/// rmdir of `dir/name` if it has no entries on disk; false if it still
/// holds some (whiteouts).
fn remove_empty_dir(dir: &DirLayer, name: &OsStr) -> Result<bool> {
    match unlinkat(dir.fd()?.as_fd(), name, UnlinkatFlags::RemoveDir) {
        Ok(()) => Ok(true),
        Err(Errno::ENOTEMPTY | Errno::EEXIST) => Ok(false),
        Err(e) => Err(e).sys("rmdir"),
    }
}
