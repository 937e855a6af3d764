//! The mutating operations on the merged tree. Every change lands in the
//! upper in kernel overlayfs format: deletions of lower names leave
//! whiteouts, directories that replace lower ones are opaque, and objects
//! that replace a whiteout are built in the work dir and swapped in.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags, renameat2};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmodat, mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, ftruncate, linkat, symlinkat, unlinkat};

use super::acl;
use super::attr::Attr;
use super::copyup::{CopyData, TempEntry, copy_xattrs, set_owner_mode_times, upper_whiteout_at};
use super::error::{Error, Result, SysContext};
use super::files::{clear_setid_bits, setid_cleared};
use super::handles::OpenFile;
use super::layer::{list_dir, open_beneath};
use super::marker;
use super::node::{DirLayer, DirStack, Node};
use super::resolve::{self, Probe};
use super::workdir::WorkDir;
use super::{Dentry, Overlay};
use crate::sys::{self, XattrTarget};

/// Who asks: new objects belong to them.
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

/// A time to set, as setattr gives it.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    Now,
    At(i64, i64),
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// Someone who may not keep the file's set-id bits writes or truncates
    /// it: drop them (before `mode`, which wins).
    pub drop_setid: Option<Caller>,
}

/// What rename should do (renameat2 flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
    Exchange,
}

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
        let parent_node = self.node(parent)?;
        let stack = self.upper_dir(&parent_node)?;
        let upper = stack.top();
        let (object, default_acl) = acl::prepare(object, caller.umask, upper.fd()?.as_fd())?;
        if let NewObject::Special { mode, rdev: 0 } = object
            && mode & libc::S_IFMT == libc::S_IFCHR
        {
            // A 0/0 character device is a whiteout; kernel overlayfs refuses too.
            return Err(Error::new(Errno::EPERM, "mknod(whiteout)"));
        }
        if let NewObject::Link { node } = &object {
            self.copy_up(node, CopyData::All)?;
        }
        let over_whiteout = upper_whiteout_at(upper, name)?;
        let work = self.work()?;
        let parent_attr = self.getattr(parent)?;
        let owner = owner_for(caller, &parent_attr);

        let file = if over_whiteout {
            // Build it in the work dir, then swap it with the whiteout; the
            // temp name then holds the old whiteout, removed on drop.
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
        } else {
            let file = self.make_object(upper.fd()?.as_fd(), name, &object, owner, &parent_attr)?;
            if matches!(object, NewObject::Dir { .. }) && self.is_merged_stack(&stack) {
                // As kernel overlayfs with redirect_dir: a directory made in a
                // merged one is opaque, so wherever it moves later it never
                // merges with a lower directory of the same name.
                self.mark_opaque(XattrTarget::Entry(upper.fd()?.as_fd(), name))?;
            }
            file
        };

        if let NewObject::Link { node: linked } = &object {
            // The new name is the same inode: the kernel must see the same
            // node, or two inodes would cache one file.
            linked.add_alias(&parent_node, name);
            linked.add_lookups(1);
            self.dentries
                .insert((parent, name.to_os_string()), Dentry::Positive(linked.id));
            let attr = self.getattr(linked.id)?;
            return Ok(Created {
                node: linked.clone(),
                attr,
                handle: None,
            });
        }
        self.forget_dentry(parent, name);
        let (node, attr) = self.lookup(parent, name)?;
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
            fchownat(
                dir,
                name,
                Some(Uid::from_raw(owner.0)),
                Some(Gid::from_raw(owner.1)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .sys("fchownat")?;
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
        let (child, attr) = self.lookup(parent, name)?;
        // The lookup above took a reference only to inspect the child.
        self.forget(child.id, 1);
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
                self.make_whiteout(tmp.fd(), &tmp.name)?;
                tmp.swap_with(upper, name).map_err(ctx)?;
            } else {
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
                self.make_whiteout(tmp.fd(), &tmp.name)?;
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
            self.make_whiteout(upper.fd()?.as_fd(), name).map_err(ctx)?;
        }
        if child.remove_name(parent, name) {
            // Other names of the file see its link count drop.
            self.invalidate_attr(child.id);
        } else {
            child.mark_unlinked();
        }
        self.dentries
            .insert((parent, name.to_os_string()), Dentry::Negative);
        Ok(())
    }

    /// Renames (or exchanges) `parent/name` and `new_parent/new_name`.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        mode: RenameMode,
    ) -> Result<()> {
        let (src, src_attr) = self.lookup(parent, name)?;
        self.forget(src.id, 1);
        let dst = match self.lookup(new_parent, new_name) {
            Ok((node, attr)) => {
                self.forget(node.id, 1);
                Some((node, attr))
            }
            Err(e) if e.errno() == Errno::ENOENT => None,
            Err(e) => return Err(e),
        };
        if src.id == dst.as_ref().map_or(0, |d| d.0.id) && mode != RenameMode::Exchange {
            // Two names of one file: rename(2) does nothing.
            return Ok(());
        }
        match (&dst, mode) {
            (Some(_), RenameMode::NoReplace) => return Err(Error::new(Errno::EEXIST, "rename")),
            (None, RenameMode::Exchange) => return Err(Error::new(Errno::ENOENT, "rename")),
            _ => {}
        }
        // Directories that lower layers contribute to move with a redirect
        // to where the lower layers keep them (kernel overlayfs'
        // redirect_dir=on format), so mv never needs to copy a tree.
        let src_redirect = if src_attr.is_dir() && self.dir_has_lower(&src)? {
            Some(self.redirect_for(&src, parent, new_parent, name)?)
        } else {
            None
        };
        let dst_redirect = match (&dst, mode) {
            (Some((dnode, dattr)), RenameMode::Exchange)
                if dattr.is_dir() && self.dir_has_lower(dnode)? =>
            {
                Some(self.redirect_for(dnode, new_parent, parent, new_name)?)
            }
            _ => None,
        };
        if let Some((dnode, dattr)) = &dst
            && mode != RenameMode::Exchange
        {
            match (src_attr.is_dir(), dattr.is_dir()) {
                (true, false) => return Err(Error::new(Errno::ENOTDIR, "rename")),
                (false, true) => return Err(Error::new(Errno::EISDIR, "rename")),
                (true, true) if !self.is_empty_dir(dnode)? => {
                    return Err(Error::new(Errno::ENOTEMPTY, "rename"));
                }
                _ => {}
            }
        }

        self.copy_up(&src, CopyData::All)?;
        if let Some((dnode, _)) = &dst
            && mode == RenameMode::Exchange
        {
            self.copy_up(dnode, CopyData::All)?;
        }
        if let Some(redirect) = &src_redirect {
            self.set_redirect(&src, redirect)?;
        }
        if let (Some(redirect), Some((dnode, _))) = (&dst_redirect, &dst) {
            self.set_redirect(dnode, redirect)?;
        }
        let src_stack = self.upper_dir(&self.node(parent)?)?;
        let dst_parent = self.node(new_parent)?;
        let dst_stack = self.upper_dir(&dst_parent)?;
        let (src_dir, dst_dir) = (src_stack.top(), dst_stack.top());
        let work = self.work()?;

        if mode == RenameMode::Exchange {
            // Each directory lands in the other's parent; like a move, it is
            // made opaque there if that parent is merged.
            if src_attr.is_dir() && src_redirect.is_none() && self.is_merged_stack(&dst_stack) {
                let (dir, n) = self.upper_location(&src)?;
                self.mark_opaque(XattrTarget::Entry(dir.top().fd()?.as_fd(), &n))?;
            }
            if let Some((dnode, dattr)) = &dst
                && dattr.is_dir()
                && dst_redirect.is_none()
                && self.is_merged_stack(&src_stack)
            {
                let (dir, n) = self.upper_location(dnode)?;
                self.mark_opaque(XattrTarget::Entry(dir.top().fd()?.as_fd(), &n))?;
            }
            renameat2(
                src_dir.fd()?.as_fd(),
                name,
                dst_dir.fd()?.as_fd(),
                new_name,
                RenameFlags::RENAME_EXCHANGE,
            )
            .sys("renameat2(exchange)")?;
        } else {
            let src_needs_whiteout = self.lower_entry(&src_stack, name)?.is_some();
            if src_attr.is_dir() && src_redirect.is_none() && self.is_merged_stack(&dst_stack) {
                // A directory moved into a merged directory must never merge
                // with a lower one of its new name: kernel overlayfs marks it
                // opaque, and so does unionfs.
                let (dir, n) = self.upper_location(&src)?;
                self.mark_opaque(XattrTarget::Entry(dir.top().fd()?.as_fd(), &n))?;
            }
            // Every step below leaves an upper that reads as before or after
            // the rename, as kernel overlayfs' own sequence does: a target
            // that a directory cannot simply replace is turned into one it
            // can in a single atomic step, never moved away first (a crash
            // in between would bring the deleted lower entries back).
            let dst_upper = match nix::sys::stat::fstatat(
                dst_dir.fd()?.as_fd(),
                new_name,
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(st) => Some(Attr::from_stat(&st)),
                Err(Errno::ENOENT) => None,
                Err(e) => return Err(e).sys("fstatat"),
            };
            let ctx = |e: Error| e.with_path(src.path());
            match dst_upper {
                Some(existing) if src_attr.is_dir() && !existing.is_dir() => {
                    // A whiteout: the directory and the whiteout trade places,
                    // and the whiteout goes unless the old name needs one.
                    renameat2(
                        src_dir.fd()?.as_fd(),
                        name,
                        dst_dir.fd()?.as_fd(),
                        new_name,
                        RenameFlags::RENAME_EXCHANGE,
                    )
                    .sys("renameat2(exchange with whiteout)")
                    .map_err(ctx)?;
                    if !src_needs_whiteout {
                        unlinkat(src_dir.fd()?.as_fd(), name, UnlinkatFlags::NoRemoveDir)
                            .sys("unlinkat(whiteout)")
                            .map_err(ctx)?;
                    }
                }
                Some(existing) if existing.is_dir() => {
                    // Empty in the merged view, but it may hold whiteouts,
                    // which rename(2) would refuse to replace.
                    self.clear_empty_dir(work, dst_dir, new_name, &existing)
                        .map_err(ctx)?;
                    self.move_entry(src_dir, name, dst_dir, new_name, src_needs_whiteout)
                        .map_err(ctx)?;
                }
                _ => self
                    .move_entry(src_dir, name, dst_dir, new_name, src_needs_whiteout)
                    .map_err(ctx)?,
            }
        }

        // Bring the node table, the directories' ways back to their
        // descriptors and the lookup cache up to date.
        src.rename(parent, name, &dst_parent, new_name);
        relocate_upper_dir(&src, &dst_stack, new_name);
        if let Some((dnode, _)) = &dst {
            if mode == RenameMode::Exchange {
                dnode.rename(new_parent, new_name, &self.node(parent)?, name);
                relocate_upper_dir(dnode, &src_stack, name);
            } else if dnode.remove_name(new_parent, new_name) {
                self.invalidate_attr(dnode.id);
            } else {
                dnode.mark_unlinked();
            }
        }
        self.forget_dentry(parent, name);
        self.forget_dentry(new_parent, new_name);
        Ok(())
    }

    /// Renames `src_dir/name` to `dst_dir/new_name`, replacing what is there,
    /// and leaves a whiteout at the old name when `whiteout`: in one step
    /// with RENAME_WHITEOUT where the upper's filesystem can.
    fn move_entry(
        &self,
        src_dir: &DirLayer,
        name: &OsStr,
        dst_dir: &DirLayer,
        new_name: &OsStr,
        whiteout: bool,
    ) -> Result<()> {
        if whiteout && self.chardev_whiteouts() {
            match renameat2(
                src_dir.fd()?.as_fd(),
                name,
                dst_dir.fd()?.as_fd(),
                new_name,
                RenameFlags::RENAME_WHITEOUT,
            ) {
                Ok(()) => return Ok(()),
                Err(Errno::EINVAL | Errno::EPERM) => {}
                Err(e) => return Err(e).sys("renameat2(whiteout)"),
            }
        }
        renameat2(
            src_dir.fd()?.as_fd(),
            name,
            dst_dir.fd()?.as_fd(),
            new_name,
            RenameFlags::empty(),
        )
        .sys("renameat2")?;
        if whiteout {
            self.make_whiteout(src_dir.fd()?.as_fd(), name)?;
        }
        Ok(())
    }

    /// Makes the upper directory `dir/name`, empty in the merged view, empty
    /// on disk too: an empty opaque directory with its attributes takes its
    /// place in one exchange (kernel overlayfs' `ovl_clear_empty`), and the
    /// old one, with the whiteouts it held, goes from the work dir.
    fn clear_empty_dir(
        &self,
        work: &WorkDir,
        dir: &DirLayer,
        name: &OsStr,
        existing: &Attr,
    ) -> Result<()> {
        let on_disk = open_beneath(dir.fd()?.as_fd(), name, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .sys("openat2(target dir)")?;
        if list_dir(on_disk.as_fd())?.is_empty() {
            return Ok(());
        }
        let tmp = TempEntry::new(work);
        mkdirat(
            tmp.fd(),
            tmp.name.as_os_str(),
            Mode::from_bits_truncate(0o700),
        )
        .sys("mkdirat(clear empty)")?;
        copy_xattrs(
            XattrTarget::Entry(dir.fd()?.as_fd(), name),
            XattrTarget::Entry(tmp.fd(), &tmp.name),
        )?;
        self.mark_opaque(XattrTarget::Entry(tmp.fd(), &tmp.name))?;
        set_owner_mode_times(tmp.fd(), &tmp.name, existing)?;
        tmp.swap_with(dir, name)
    }

    /// setattr: copy-up, then chown, truncate, chmod, utimens on the upper.
    pub fn setattr(&self, id: u64, set: SetAttr, fh: Option<u64>) -> Result<Attr> {
        let node = self.node(id)?;
        if node.is_unlinked() {
            return self.setattr_unlinked(&node, set, fh);
        }
        let data = if set.size == Some(0) {
            CopyData::MetadataOnly
        } else {
            CopyData::All
        };
        self.copy_up(&node, data)?;
        let (dir, name) = self.upper_location(&node)?;
        let dirfd = dir.top().fd()?;
        let dirfd = dirfd.as_fd();
        let ctx = |e: Error| e.with_path(node.path());
        if set.uid.is_some() || set.gid.is_some() {
            fchownat(
                dirfd,
                name.as_os_str(),
                set.uid.map(Uid::from_raw),
                set.gid.map(Gid::from_raw),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .sys("fchownat")
            .map_err(ctx)?;
        }
        if let Some(size) = set.size {
            let file = match fh.and_then(|fh| self.handles.file(fh)) {
                Some(open) if open.flags & libc::O_ACCMODE != libc::O_RDONLY => open.file(),
                _ => Arc::new(File::from(
                    open_beneath(dirfd, &name, OFlag::O_WRONLY)
                        .sys("open(truncate)")
                        .map_err(ctx)?,
                )),
            };
            ftruncate(&*file, size as i64)
                .sys("ftruncate")
                .map_err(ctx)?;
        }
        if let Some(caller) = set.drop_setid {
            let stat =
                nix::sys::stat::fstatat(dirfd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                    .sys("fstatat")
                    .map_err(ctx)?;
            if let Some(mode) = setid_cleared(&stat, caller) {
                fchmodat(dirfd, name.as_os_str(), mode, FchmodatFlags::FollowSymlink)
                    .sys("fchmodat")
                    .map_err(ctx)?;
            }
        }
        if let Some(mode) = set.mode {
            fchmodat(
                dirfd,
                name.as_os_str(),
                Mode::from_bits_truncate(mode & 0o7777),
                FchmodatFlags::FollowSymlink,
            )
            .sys("fchmodat")
            .map_err(ctx)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let ts = |t: Option<SetTime>| match t {
                None => TimeSpec::UTIME_OMIT,
                Some(SetTime::Now) => TimeSpec::UTIME_NOW,
                Some(SetTime::At(s, ns)) => TimeSpec::new(s, ns),
            };
            utimensat(
                dirfd,
                name.as_os_str(),
                &ts(set.atime),
                &ts(set.mtime),
                UtimensatFlags::NoFollowSymlink,
            )
            .sys("utimensat")
            .map_err(ctx)?;
        }
        self.getattr(id)
    }

    /// setattr of a file whose last name is gone: through an open handle.
    fn setattr_unlinked(&self, node: &Arc<Node>, set: SetAttr, fh: Option<u64>) -> Result<Attr> {
        let open = fh
            .and_then(|fh| self.handles.file(fh))
            .or_else(|| self.handles.files_of(node.id).into_iter().next())
            .ok_or_else(|| Error::new(Errno::ENOENT, "setattr(unlinked)"))?;
        let file = open.file();
        if set.uid.is_some() || set.gid.is_some() {
            nix::unistd::fchown(
                &*file,
                set.uid.map(Uid::from_raw),
                set.gid.map(Gid::from_raw),
            )
            .sys("fchown")?;
        }
        if let Some(size) = set.size {
            ftruncate(&*file, size as i64).sys("ftruncate")?;
        }
        if let Some(caller) = set.drop_setid {
            clear_setid_bits(&file, caller)?;
        }
        if let Some(mode) = set.mode {
            nix::sys::stat::fchmod(&*file, Mode::from_bits_truncate(mode & 0o7777))
                .sys("fchmod")?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let ts = |t: Option<SetTime>| match t {
                None => TimeSpec::UTIME_OMIT,
                Some(SetTime::Now) => TimeSpec::UTIME_NOW,
                Some(SetTime::At(s, ns)) => TimeSpec::new(s, ns),
            };
            nix::sys::stat::futimens(&*file, &ts(set.atime), &ts(set.mtime)).sys("futimens")?;
        }
        self.getattr(node.id)
    }

    pub fn setxattr(&self, id: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        let cname = private_checked(name, "setxattr")?;
        let node = self.node(id)?;
        self.copy_up(&node, CopyData::All)?;
        self.with_xattr_target(
            &node,
            |t| sys::set_xattr(t, &cname, value, flags),
            "setxattr",
        )
    }

    pub fn removexattr(&self, id: u64, name: &OsStr) -> Result<()> {
        let cname = private_checked(name, "removexattr")?;
        let node = self.node(id)?;
        // Nothing to copy up for an xattr the object does not have.
        self.getxattr(id, name)?;
        self.copy_up(&node, CopyData::All)?;
        self.with_xattr_target(&node, |t| sys::remove_xattr(t, &cname), "removexattr")
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
    fn lower_entry(&self, stack: &DirStack, name: &OsStr) -> Result<Option<Attr>> {
        for dl in stack.layers.iter().filter(|l| !self.is_upper(l.layer)) {
            match resolve::probe(dl, name)? {
                Probe::Missing => continue,
                Probe::Whiteout => return Ok(None),
                Probe::Entry(attr) => return Ok(Some(attr)),
            }
        }
        Ok(None)
    }

    /// Whether lower layers contribute to the directory node (or hold its
    /// name, which a move would have to keep hidden).
    fn dir_has_lower(&self, node: &Arc<Node>) -> Result<bool> {
        Ok(self.is_merged_stack(&*node.dir_stack()?))
    }

    /// The redirect a directory needs when it moves from `old_parent/old_name`
    /// to `new_parent`: the name or path where the lower layers keep it.
    fn redirect_for(
        &self,
        node: &Arc<Node>,
        old_parent: u64,
        new_parent: u64,
        old_name: &OsStr,
    ) -> Result<std::ffi::OsString> {
        let own = self
            .current_redirect(node)?
            .unwrap_or_else(|| old_name.to_os_string());
        if old_parent == new_parent || own.as_bytes().starts_with(b"/") {
            return Ok(own);
        }
        // An absolute path: each ancestor by its redirect or its name, up to
        // the root or an ancestor that has an absolute redirect itself.
        let mut parts = vec![own];
        let mut dir = self.node(old_parent)?;
        while let Some(up) = dir.parent() {
            let part = self.current_redirect(&dir)?.unwrap_or_else(|| dir.name());
            let absolute = part.as_bytes().starts_with(b"/");
            parts.push(part);
            if absolute {
                break;
            }
            dir = up;
        }
        let mut path = Vec::new();
        for part in parts.iter().rev() {
            if !part.as_bytes().starts_with(b"/") {
                path.push(b'/');
            }
            path.extend_from_slice(part.as_bytes());
        }
        Ok(OsStr::from_bytes(&path).to_os_string())
    }

    /// The redirect a directory node carries now, if any.
    fn current_redirect(&self, node: &Arc<Node>) -> Result<Option<std::ffi::OsString>> {
        let stack = node.dir_stack()?;
        if !self.is_upper(stack.top().layer) {
            return Ok(stack.top().marks.redirect.as_ref().and_then(|r| r.value()));
        }
        for name in [marker::TRUSTED_REDIRECT, marker::USER_REDIRECT] {
            let value = sys::get_xattr(XattrTarget::Fd(stack.top().fd()?.as_fd()), name)
                .sys("getxattr(redirect)")?;
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                return Ok(Some(OsStr::from_bytes(&v).to_os_string()));
            }
        }
        Ok(None)
    }

    fn set_redirect(&self, node: &Arc<Node>, redirect: &OsStr) -> Result<()> {
        let stack = node.dir_stack()?;
        let name = if self.chardev_whiteouts() {
            marker::TRUSTED_REDIRECT
        } else {
            marker::USER_REDIRECT
        };
        sys::set_xattr(
            XattrTarget::Fd(stack.top().fd()?.as_fd()),
            name,
            redirect.as_bytes(),
            0,
        )
        .sys("setxattr(redirect)")
        .map_err(|e| e.with_path(node.path()))
    }

    fn is_merged_stack(&self, stack: &DirStack) -> bool {
        stack.layers.iter().any(|l| !self.is_upper(l.layer))
    }

    /// Empty in the merged view (whiteouts in the upper do not count).
    fn is_empty_dir(&self, node: &Node) -> Result<bool> {
        Ok(self.merged_entries(node)?.len() <= 2)
    }

    fn chardev_whiteouts(&self) -> bool {
        !self
            .xattr_whiteouts
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes a whiteout at `dir/name`: a 0/0 character device, or where
    /// the daemon may not mknod (no CAP_MKNOD), the xattr form that kernel
    /// overlayfs reads with `userxattr`.
    pub fn make_whiteout(&self, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
        if self.chardev_whiteouts() {
            match mknodat(dir, name, SFlag::S_IFCHR, Mode::empty(), 0) {
                Ok(()) => return Ok(()),
                Err(Errno::EPERM) => {
                    tracing::warn!(
                        "cannot mknod whiteouts here; writing xattr whiteouts (userxattr format)"
                    );
                    self.xattr_whiteouts
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => return Err(e).sys("mknodat(whiteout)"),
            }
        }
        let fd = open_beneath(dir, name, OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY)
            .sys("create(whiteout)")?;
        drop(fd);
        sys::set_xattr(
            XattrTarget::Entry(dir, name),
            marker::USER_WHITEOUT,
            b"y",
            0,
        )
        .sys("setxattr(whiteout)")?;
        sys::set_xattr(XattrTarget::Fd(dir), marker::USER_OPAQUE, b"x", 0)
            .sys("setxattr(xwhiteouts)")
    }

    fn mark_opaque(&self, target: XattrTarget<'_>) -> Result<()> {
        let name = if self.chardev_whiteouts() {
            marker::TRUSTED_OPAQUE
        } else {
            marker::USER_OPAQUE
        };
        sys::set_xattr(target, name, b"y", 0).sys("setxattr(opaque)")
    }

    fn forget_dentry(&self, parent: u64, name: &OsStr) {
        self.dentries.remove(&(parent, name.to_os_string()));
    }
}

/// A directory's upper copy moved to `name` in the directory `parent`.
fn relocate_upper_dir(node: &Node, parent: &DirStack, name: &OsStr) {
    if let Ok(stack) = node.dir_stack() {
        stack.layers[0]
            .lazy_fd()
            .relocate(parent.layers[0].clone(), name);
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

fn private_checked(name: &OsStr, op: &'static str) -> Result<CString> {
    if marker::is_private_xattr(name.as_bytes()) {
        return Err(Error::new(Errno::EPERM, op));
    }
    CString::new(name.as_bytes()).map_err(|_| Error::new(Errno::EINVAL, op))
}
