//! Copy-up: giving a lower object a copy in the upper before it is changed.
//! Parents first; each object is built in the work dir and renamed into
//! place, so a crash never leaves a partial object visible. Owner, xattrs,
//! mode (last, after chown cleared set-id bits) and times are kept; sparse
//! files stay sparse.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags, readlinkat, renameat2};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmodat, fstatat, mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, Whence, fchownat, fsync, ftruncate, linkat, lseek, symlinkat};

use super::attr::{Attr, FileKind};
use super::error::{Error, Result, SysContext};
use super::layer::open_beneath;
use super::marker;
use super::node::{DirStack, Node, NodeState};
use super::{Overlay, resolve};
use crate::sys::{self, XattrTarget};

/// How much of a regular file a copy-up takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyData {
    All,
    /// The caller is about to truncate it to zero (O_TRUNC, truncate(0)).
    MetadataOnly,
}

impl Overlay {
    /// Makes sure the directory node has a copy in the upper and returns its
    /// (new) stack, whose top is the upper.
    pub fn upper_dir(&self, node: &Arc<Node>) -> Result<Arc<DirStack>> {
        let stack = node.dir_stack()?;
        if self.is_upper(stack.top().layer) {
            return Ok(stack);
        }
        self.copy_up(node, CopyData::All)?;
        node.dir_stack()
    }

    /// Gives `node` a copy in the upper (no-op if it has one), copying up
    /// the ancestors that lack one first. The ancestors are collected by a
    /// loop, never by recursion: any user can make a tree deep enough to
    /// overflow a FUSE thread's stack.
    pub fn copy_up(&self, node: &Arc<Node>, data: CopyData) -> Result<()> {
        if self.node_in_upper(node) {
            return Ok(());
        }
        let mut missing = Vec::new();
        let mut next = node.parent();
        while let Some(dir) = next {
            if self.node_in_upper(&dir) {
                break;
            }
            next = dir.parent();
            missing.push(dir);
        }
        for dir in missing.iter().rev() {
            self.copy_up_one(dir, CopyData::All)?;
        }
        self.copy_up_one(node, data)
    }

    /// Copies up one node whose parent has its upper copy already.
    fn copy_up_one(&self, node: &Arc<Node>, data: CopyData) -> Result<()> {
        if self.node_in_upper(node) {
            return Ok(());
        }
        let work = self.work()?;
        let _guard = node.copy_up_lock.lock();
        if self.node_in_upper(node) {
            return Ok(());
        }
        let names = node.names();
        let Some((parent, name)) = names.first().cloned() else {
            return Err(Error::new(Errno::ENOENT, "copy up").with_path(node.path()));
        };
        // Normally copied up by the caller; a rename racing it may have
        // moved the node under a parent that has no upper copy yet.
        let parent_stack = self.upper_dir(&parent)?;
        let upper = parent_stack.top();
        let state = node.state();
        let lower = parent_stack
            .layer(state.layer)
            .ok_or_else(|| Error::new(Errno::ESTALE, "copy up").with_path(node.path()))?;
        let tmp = work.temp_name();
        let ctx = |e: Error| e.with_layer(state.layer).with_path(node.path());
        let attr = self.node_attr(node).map_err(ctx)?;

        // Kernel overlayfs keeps the parent's times across a copy-up: the
        // directory did not change in the merged view.
        let parent_times = DirTimes::of(upper).map_err(ctx)?;
        let built = self
            .build_copy(lower.fd()?.as_fd(), &name, work.fd(), &tmp, &attr, data)
            .and_then(|()| {
                renameat2(
                    work.fd(),
                    tmp.as_os_str(),
                    upper.fd()?.as_fd(),
                    name.as_os_str(),
                    RenameFlags::RENAME_NOREPLACE,
                )
                .sys("renameat2(copy-up)")
            });
        if let Err(e) = built {
            let _ = work.remove(&tmp);
            return Err(ctx(e));
        }
        parent_times.restore(upper).map_err(ctx)?;

        if node.kind != FileKind::Directory {
            // Lookups that find the upper copy must land on this node.
            let st = fstatat(
                upper.fd()?.as_fd(),
                name.as_os_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .sys("fstatat(copy-up)")
            .map_err(ctx)?;
            self.nodes.record_copy_up(st.st_dev, st.st_ino, node.id);
        }
        let new_state = if node.kind == FileKind::Directory {
            let child = resolve::open_dir_layer(&self.layers, &parent_stack.layers[0], &name)
                .map_err(ctx)?;
            let old = state.dir.clone().expect("directory node has a stack");
            let mut layers = vec![Arc::new(child)];
            layers.extend(old.layers.iter().cloned());
            NodeState {
                layer: upper.layer,
                dir: Some(Arc::new(DirStack { layers })),
            }
        } else {
            NodeState {
                layer: upper.layer,
                dir: None,
            }
        };
        node.set_state(new_state);
        tracing::debug!(path = ?node.path(), "copied up");

        // Other names of a hard-linked file keep sharing it in the upper.
        for (alias_parent, alias_name) in names.iter().skip(1) {
            let alias_stack = self.upper_dir(alias_parent)?;
            let alias_dir = alias_stack.top();
            let alias_times = DirTimes::of(alias_dir).map_err(ctx)?;
            if let Err(e) = linkat(
                upper.fd()?.as_fd(),
                name.as_os_str(),
                alias_dir.fd()?.as_fd(),
                alias_name.as_os_str(),
                AtFlags::empty(),
            ) {
                tracing::warn!(path = ?alias_name, error = %e, "could not keep hard link at copy-up");
            }
            alias_times.restore(alias_dir).map_err(ctx)?;
        }
        if node.kind == FileKind::Regular {
            self.reopen_handles(node)?;
        }
        // The kernel cached the lower object's attributes for a long time.
        self.invalidate_attr(node.id);
        Ok(())
    }

    fn node_in_upper(&self, node: &Node) -> bool {
        self.is_upper(node.state().layer)
    }

    /// Builds the copy of `src_dir/name` as `work/tmp`.
    fn build_copy(
        &self,
        src_dir: BorrowedFd<'_>,
        name: &OsStr,
        work: BorrowedFd<'_>,
        tmp: &OsStr,
        attr: &Attr,
        data: CopyData,
    ) -> Result<()> {
        let private = Mode::from_bits_truncate(0o700);
        match attr.kind() {
            FileKind::Directory => mkdirat(work, tmp, private).sys("mkdirat")?,
            FileKind::Regular => {
                let src = open_beneath(src_dir, name, OFlag::O_RDONLY).sys("open lower file")?;
                let dst = open_beneath(work, tmp, OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR)
                    .sys("create copy")?;
                let (src, dst) = (File::from(src), File::from(dst));
                if data == CopyData::All {
                    copy_data(&src, &dst, attr.size, !self.volatile)?;
                }
                if !self.volatile {
                    fsync(&dst).sys("fsync(copy-up)")?;
                }
            }
            FileKind::Symlink => {
                let target = readlinkat(src_dir, name).sys("readlinkat")?;
                symlinkat(target.as_os_str(), work, tmp).sys("symlinkat")?;
            }
            kind => {
                let sflag = match kind {
                    FileKind::Fifo => SFlag::S_IFIFO,
                    FileKind::Socket => SFlag::S_IFSOCK,
                    FileKind::CharDevice => SFlag::S_IFCHR,
                    _ => SFlag::S_IFBLK,
                };
                mknodat(work, tmp, sflag, private, attr.rdev).sys("mknodat")?;
            }
        }
        // chown drops file capabilities, so the owner goes first, then the
        // xattrs, and the mode (with its set-id bits) last.
        set_owner(work, tmp, attr)?;
        copy_xattrs(
            XattrTarget::Entry(src_dir, name),
            XattrTarget::Entry(work, tmp),
        )?;
        set_mode_and_times(work, tmp, attr)
    }

    /// Points every open handle of a copied-up file at the upper copy, so
    /// descriptors opened before the copy-up see what is written after it.
    pub(super) fn reopen_handles(&self, node: &Arc<Node>) -> Result<()> {
        for open in self.handles.files_of(node.id) {
            let flags = open.flags & (libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK);
            let file = self.open_backing(node, flags)?;
            open.replace_file(file);
        }
        Ok(())
    }
}

/// Data copied between two starts of writeback.
const WRITEBACK_CHUNK: i64 = 8 << 20;

/// Copies a file's data keeping its holes: FICLONE where the filesystem can
/// share extents, else copy_file_range over each data segment. With
/// `durable` (an fsync follows), writeback of each chunk starts as soon as
/// it is copied, so that the disk writes while the rest is copied instead
/// of after: the fsync then waits for the last chunks only.
fn copy_data(src: &File, dst: &File, size: u64, durable: bool) -> Result<()> {
    if size == 0 || sys::ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let mut pos: i64 = 0;
    let end = size as i64;
    while pos < end {
        let data = match lseek(src, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(Errno::ENXIO) => break,
            // No hole support: treat the rest as data.
            Err(Errno::EINVAL) => pos,
            Err(e) => return Err(e).sys("lseek(SEEK_DATA)"),
        };
        let hole = match lseek(src, data, Whence::SeekHole) {
            Ok(h) => h.min(end),
            Err(_) => end,
        };
        copy_range(src, dst, data, hole - data, durable)?;
        pos = hole;
    }
    ftruncate(dst, end).sys("ftruncate(copy-up)")
}

fn copy_range(src: &File, dst: &File, offset: i64, len: i64, durable: bool) -> Result<()> {
    let (mut off_in, mut off_out) = (offset, offset);
    let stop = offset + len;
    let mut unflushed = offset;
    while off_in < stop {
        let want = (stop - off_in).min(WRITEBACK_CHUNK) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                if durable && off_out - unflushed >= WRITEBACK_CHUNK {
                    // Only a head start for the fsync that follows, which
                    // reports any write error: one here changes nothing.
                    let _ = sys::start_writeback(dst, unflushed, off_out - unflushed);
                    unflushed = off_out;
                }
            }
            Err(Errno::EXDEV | Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                return copy_by_reading(src, dst, off_in, stop - off_in);
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e).sys("copy_file_range"),
        }
    }
    Ok(())
}

fn copy_by_reading(src: &File, dst: &File, offset: i64, len: i64) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done: i64 = 0;
    while done < len {
        let want = buf.len().min((len - done) as usize);
        let n = src
            .read_at(&mut buf[..want], (offset + done) as u64)
            .sys("pread(copy-up)")?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], (offset + done) as u64)
            .sys("pwrite(copy-up)")?;
        done += n as i64;
    }
    Ok(())
}

/// Copies every xattr except overlay-private ones. As kernel overlayfs
/// (`ovl_copy_xattr`), only an xattr the upper's filesystem does not support
/// at all is skipped, and never an ACL or a `security.` one: any other
/// refusal (ENOSPC, E2BIG, ...) fails the copy-up, which leaves the object
/// as it was rather than silently losing its xattrs.
pub fn copy_xattrs(src: XattrTarget<'_>, dst: XattrTarget<'_>) -> Result<()> {
    let names = match sys::list_xattr(src) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(e) => return Err(e).sys("listxattr(copy-up)"),
    };
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if marker::is_private_xattr(name) {
            continue;
        }
        let Ok(cname) = std::ffi::CString::new(name) else {
            continue;
        };
        let Some(value) = sys::get_xattr(src, &cname).sys("getxattr(copy-up)")? else {
            continue;
        };
        if let Err(e) = sys::set_xattr(dst, &cname, &value, 0) {
            if e.raw_os_error() == Some(libc::ENOTSUP) && !must_copy_xattr(name) {
                tracing::warn!(xattr = %String::from_utf8_lossy(name), "upper does not support this xattr; not copied up");
                continue;
            }
            return Err(e).sys("setxattr(copy-up)");
        }
    }
    Ok(())
}

/// The xattrs whose loss would change access rights: kernel overlayfs
/// fails a copy-up rather than drop them (`ovl_must_copy_xattr`).
fn must_copy_xattr(name: &[u8]) -> bool {
    name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
        || name.starts_with(b"security.")
}

fn set_owner(dir: BorrowedFd<'_>, name: &OsStr, attr: &Attr) -> Result<()> {
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(attr.uid)),
        Some(Gid::from_raw(attr.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .sys("fchownat")
}

/// Owner, then mode and times, of `attr` on `dir/name` (no xattrs).
pub(crate) fn set_owner_mode_times(dir: BorrowedFd<'_>, name: &OsStr, attr: &Attr) -> Result<()> {
    set_owner(dir, name, attr)?;
    set_mode_and_times(dir, name, attr)
}

/// The mode after chown (which clears set-id bits), then the times.
fn set_mode_and_times(dir: BorrowedFd<'_>, name: &OsStr, attr: &Attr) -> Result<()> {
    if attr.kind() != FileKind::Symlink {
        fchmodat(
            dir,
            name,
            Mode::from_bits_truncate(attr.mode & 0o7777),
            FchmodatFlags::FollowSymlink,
        )
        .sys("fchmodat")?;
    }
    let ts = |t: super::attr::Timespec| TimeSpec::new(t.sec, t.nsec);
    utimensat(
        dir,
        name,
        &ts(attr.atime),
        &ts(attr.mtime),
        UtimensatFlags::NoFollowSymlink,
    )
    .sys("utimensat")
}

/// A directory's atime and mtime, to put back after an entry was added to
/// it on the merged tree's behalf.
pub(crate) struct DirTimes {
    atime: TimeSpec,
    mtime: TimeSpec,
}

impl DirTimes {
    pub(crate) fn of(dir: &super::node::DirLayer) -> Result<DirTimes> {
        let st = nix::sys::stat::fstat(dir.fd()?.as_fd()).sys("fstat(parent times)")?;
        Ok(DirTimes {
            atime: TimeSpec::new(st.st_atime, st.st_atime_nsec),
            mtime: TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
        })
    }

    /// `dir` is an O_PATH descriptor, which futimens refuses; "." relative
    /// to it names the directory itself.
    pub(crate) fn restore(&self, dir: &super::node::DirLayer) -> Result<()> {
        utimensat(
            dir.fd()?.as_fd(),
            ".",
            &self.atime,
            &self.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .sys("utimensat(parent times)")
    }
}

/// Whether `name` is a whiteout in the upper directory `dir`.
pub fn upper_whiteout_at(dir: &super::node::DirLayer, name: &OsStr) -> Result<bool> {
    match fstatat(dir.fd()?.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => resolve::is_whiteout(dir, name, &Attr::from_stat(&st)),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e).sys("fstatat"),
    }
}

/// A temp name in the work dir that is removed on drop unless kept.
pub struct TempEntry<'a> {
    pub work: &'a super::workdir::WorkDir,
    pub name: OsString,
    pub keep: bool,
}

impl Drop for TempEntry<'_> {
    fn drop(&mut self) {
        if !self.keep {
            let _ = self.work.remove(&self.name);
        }
    }
}

impl<'a> TempEntry<'a> {
    pub fn new(work: &'a super::workdir::WorkDir) -> TempEntry<'a> {
        TempEntry {
            work,
            name: work.temp_name(),
            keep: false,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.work.fd()
    }

    /// Atomically swaps the temp entry with `dir/name`: the built object
    /// takes the name, and the temp name holds what was there (removed when
    /// this is dropped).
    pub fn swap_with(&self, dir: &super::node::DirLayer, name: &OsStr) -> Result<()> {
        renameat2(
            self.fd(),
            self.name.as_os_str(),
            dir.fd()?.as_fd(),
            name,
            RenameFlags::RENAME_EXCHANGE,
        )
        .sys("renameat2(exchange)")
    }
}

impl AsFd for TempEntry<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.work.fd()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// Data across several writeback chunks, holes before, between and
    /// after: the copy has the same bytes and the same holes.
    #[test]
    fn data_copied_in_writeback_chunks_keeps_bytes_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = File::create_new(dir.path().join("src")).unwrap();
        let pattern: Vec<u8> = (0..(9 << 20) + 5).map(|i: u32| (i % 251) as u8).collect();
        src.write_all_at(&pattern[..100 << 10], 4096).unwrap();
        src.write_all_at(&pattern, 12 << 20).unwrap();
        src.set_len(32 << 20).unwrap();
        let src = File::open(dir.path().join("src")).unwrap();
        let dst = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("dst"))
            .unwrap();

        copy_data(&src, &dst, 32 << 20, true).unwrap();

        // Read anew: copy_data moves the source's offset (SEEK_DATA).
        let read = |name: &str| {
            let mut bytes = Vec::new();
            let mut file = File::open(dir.path().join(name)).unwrap();
            file.read_to_end(&mut bytes).unwrap();
            bytes
        };
        let (a, b) = (read("src"), read("dst"));
        assert_eq!(a.len(), 32 << 20);
        assert!(a == b, "the copy differs");
        let (src_blocks, dst_blocks) = (
            src.metadata().unwrap().blocks(),
            dst.metadata().unwrap().blocks(),
        );
        assert!(
            dst_blocks <= src_blocks + 64,
            "holes kept: {dst_blocks} blocks against {src_blocks}"
        );
        assert!(dst_blocks * 512 < 16 << 20, "{dst_blocks} blocks");
    }
}
