//! setattr on the merged tree: copy-up (data only when the size is kept),
//! then chown, truncate, set-id clearing, chmod and utimens on the upper
//! copy; a file whose last name is gone is changed through an open handle.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FchmodatFlags, Mode, UtimensatFlags, fchmodat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat, ftruncate};

use super::Overlay;
use super::attr::Attr;
use super::copyup::CopyData;
use super::error::{Error, Result, SysContext};
use super::files::{clear_setid_bits, setid_cleared};
use super::layer::open_beneath;
use super::node::Node;
use super::write::Caller;

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

impl Overlay {
    /// setattr: copy-up, then chown, truncate, chmod, utimens on the upper.
    /// The owner is given as the merged view shows it.
    pub fn setattr(&self, id: u64, set: SetAttr, fh: Option<u64>) -> Result<Attr> {
        if let Some(result) = self.on_current_file(id, |current| self.setattr(current, set, None)) {
            return result;
        }
        let set = self.stored_owner(set)?;
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
            let chowned = fchownat(
                dirfd,
                name.as_os_str(),
                set.uid.map(Uid::from_raw),
                set.gid.map(Gid::from_raw),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            );
            if let Err(e) = chowned
                && !self.chown_error_ignored(e)
            {
                return Err(e).sys("fchownat").map_err(ctx);
            }
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
            if let Some(mode) = setid_cleared(&stat, caller, self.ids()) {
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

    /// `set` with the owner shifted down to the stored ids; EOVERFLOW for
    /// one no range covers, as the kernel answers on an idmapped mount.
    fn stored_owner(&self, mut set: SetAttr) -> Result<SetAttr> {
        if self.ids().maps_nothing() {
            return Ok(set);
        }
        let unmapped = || Error::new(Errno::EOVERFLOW, "setattr: map owner to a stored one");
        if let Some(uid) = set.uid {
            set.uid = Some(self.ids().disk_uid(uid).ok_or_else(unmapped)?);
        }
        if let Some(gid) = set.gid {
            set.gid = Some(self.ids().disk_gid(gid).ok_or_else(unmapped)?);
        }
        Ok(set)
    }

    /// setattr of a file whose last name is gone: through an open handle.
    fn setattr_unlinked(&self, node: &Arc<Node>, set: SetAttr, fh: Option<u64>) -> Result<Attr> {
        let open = fh
            .and_then(|fh| self.handles.file(fh))
            .or_else(|| self.handles.files_of(node.id).into_iter().next())
            .ok_or_else(|| Error::new(Errno::ENOENT, "setattr(unlinked)"))?;
        let file = open.file();
        if set.uid.is_some() || set.gid.is_some() {
            let chowned = nix::unistd::fchown(
                &*file,
                set.uid.map(Uid::from_raw),
                set.gid.map(Gid::from_raw),
            );
            if let Err(e) = chowned
                && !self.chown_error_ignored(e)
            {
                return Err(e).sys("fchown");
            }
        }
        if let Some(size) = set.size {
            ftruncate(&*file, size as i64).sys("ftruncate")?;
        }
        if let Some(caller) = set.drop_setid {
            clear_setid_bits(&file, caller, self.ids())?;
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
}
