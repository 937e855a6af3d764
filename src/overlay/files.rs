//! Open files, and listings of directories, on the merged tree.

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, fchmod, fstat};
use nix::unistd::{Whence, fdatasync, fsync, lseek};

use super::Overlay;
use super::copyup::CopyData;
use super::error::{Error, Result, SysContext};
use super::handles::OpenFile;
use super::idmap::IdShift;
use super::layer::open_beneath;
use super::listing::Listing;
use super::write::Caller;

impl Overlay {
    /// Opens a file; opening a lower file for writing copies it up first
    /// (only its metadata when O_TRUNC is about to drop the data).
    /// `drop_setid`: an opener who may not keep set-id bits over a truncation.
    pub fn open(
        &self,
        id: u64,
        flags: i32,
        drop_setid: Option<Caller>,
    ) -> Result<(u64, Arc<OpenFile>)> {
        let node = self.node(id)?;
        if wants_write(flags) {
            let data = if flags & libc::O_TRUNC != 0 {
                CopyData::MetadataOnly
            } else {
                CopyData::All
            };
            self.copy_up(&node, data)?;
        }
        let file = self.open_backing(&node, flags)?;
        if let Some(caller) = drop_setid.filter(|_| flags & libc::O_TRUNC != 0) {
            clear_setid_bits(&file, caller, self.ids()).map_err(|e| e.with_path(node.path()))?;
        }
        Ok(self.handles.add_file(node, flags, file))
    }

    /// `drop_setid`: a writer who may not keep the file's set-id bits (the
    /// kernel leaves that to us, as it does not ask before every write).
    pub fn write(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
        drop_setid: Option<Caller>,
    ) -> Result<usize> {
        let open = self.open_file(fh)?;
        let file = open.file();
        if let Some(caller) = drop_setid {
            clear_setid_bits(&file, caller, self.ids())
                .map_err(|e| e.with_path(open.node.path()))?;
        }
        let result = if open.flags & libc::O_APPEND != 0 {
            // pwrite ignores the offset on O_APPEND files; the kernel already
            // chose it, so write at the end either way.
            (&*file).write(data)
        } else {
            file.write_at(data, offset)
        };
        result
            .sys("pwrite")
            .map_err(|e| e.with_path(open.node.path()))
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let open = self.open_file(fh)?;
        let file = open.file();
        if datasync {
            fdatasync(&*file)
        } else {
            fsync(&*file)
        }
        .sys("fsync")
    }

    /// fsync of a directory: its upper copy, if it has one.
    pub fn fsyncdir(&self, id: u64) -> Result<()> {
        let node = self.node(id)?;
        let stack = node.dir_stack()?;
        if !self.is_upper(stack.top().layer) {
            return Ok(());
        }
        let dir = open_beneath(
            stack.top().fd()?.as_fd(),
            OsStr::new("."),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        )
        .sys("open directory")?;
        fsync(&dir).sys("fsync(dir)")
    }

    pub fn fallocate(&self, fh: u64, offset: i64, len: i64, mode: i32) -> Result<()> {
        let open = self.open_file(fh)?;
        nix::fcntl::fallocate(
            &*open.file(),
            FallocateFlags::from_bits_truncate(mode),
            offset,
            len,
        )
        .sys("fallocate")
    }

    /// Copies between two open files in the kernel, without the data
    /// passing through the daemon.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: i64,
        fh_out: u64,
        off_out: i64,
        len: usize,
    ) -> Result<usize> {
        let (src, dst) = (self.open_file(fh_in)?, self.open_file(fh_out)?);
        let (mut off_in, mut off_out) = (off_in, off_out);
        nix::fcntl::copy_file_range(
            &*src.file(),
            Some(&mut off_in),
            &*dst.file(),
            Some(&mut off_out),
            len,
        )
        .sys("copy_file_range")
    }

    /// Attributes through an open handle: right even after the name is gone.
    pub fn getattr_open(&self, fh: u64) -> Result<super::attr::Attr> {
        let open = self.open_file(fh)?;
        let st = nix::sys::stat::fstat(&*open.file()).sys("fstat")?;
        let mut attr = super::attr::Attr::from_stat(&st);
        attr.ino = self.ino(&open.node);
        Ok(self.shown(attr))
    }

    /// Reads into `buf` (resized to what was read), so that a caller can
    /// keep one buffer: a fresh megabyte per request costs more in page
    /// faults and zeroing than the copy itself.
    pub fn read_into(&self, fh: u64, offset: u64, size: u32, buf: &mut Vec<u8>) -> Result<()> {
        let open = self.open_file(fh)?;
        let file = open.file();
        buf.resize(size as usize, 0);
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e)
                        .sys("pread")
                        .map_err(|e| e.with_path(open.node.path()));
                }
            }
        }
        buf.truncate(done);
        Ok(())
    }

    /// SEEK_DATA / SEEK_HOLE answered by the backing file, so holes show.
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let open = self.open_file(fh)?;
        let whence = match whence {
            libc::SEEK_SET => Whence::SeekSet,
            libc::SEEK_CUR => Whence::SeekCur,
            libc::SEEK_END => Whence::SeekEnd,
            libc::SEEK_DATA => Whence::SeekData,
            libc::SEEK_HOLE => Whence::SeekHole,
            _ => return Err(Error::new(Errno::EINVAL, "lseek")),
        };
        lseek(&*open.file(), offset, whence).sys("lseek")
    }

    pub fn release(&self, fh: u64) {
        self.handles.remove_file(fh);
    }

    pub fn has_open_files(&self) -> bool {
        self.handles.has_files()
    }

    pub fn open_file(&self, fh: u64) -> Result<Arc<OpenFile>> {
        self.handles
            .file(fh)
            .ok_or_else(|| Error::new(Errno::EBADF, "find file handle"))
    }

    /// The listing to serve directory `id` from `offset` on (its entries
    /// are `after(offset)`). Offset 0 (a new reader, or rewinddir) takes a
    /// fresh listing, so a program sees the changes it made; a reader
    /// further on continues in the listing readers are in, or a fresh one
    /// if none is held, as offsets mean the same in both.
    pub fn listing(&self, id: u64, offset: u64) -> Result<Arc<Listing>> {
        let node = self.node(id)?;
        if offset != 0
            && let Some(listing) = self.listings.get(id, u64::from(node.generation))
        {
            if listing.after(offset).is_empty() {
                self.listings.finished(id, &listing);
            }
            return Ok(listing);
        }
        let listing = self
            .listings
            .listing(self.merged_entries(&node)?, u64::from(node.generation));
        if !listing.after(offset).is_empty() {
            self.listings.put(id, listing.clone());
        }
        Ok(listing)
    }
}

/// The mode without the set-id bits the kernel drops when `caller`, lacking
/// CAP_FSETID, writes or truncates: set-user-ID always, set-group-ID when
/// group execution makes it one or the caller is not in the file's group
/// (the group as the merged view shows it: `caller` is the kernel's).
/// None when nothing changes.
pub(crate) fn setid_cleared(stat: &FileStat, caller: Caller, ids: &IdShift) -> Option<Mode> {
    let mode = stat.st_mode;
    if mode & (libc::S_ISUID | libc::S_ISGID) == 0 {
        return None;
    }
    let mut cleared = mode & !libc::S_ISUID;
    if mode & libc::S_ISGID != 0
        && (mode & libc::S_IXGRP != 0 || !caller.in_group(ids.shown_gid(stat.st_gid)))
    {
        cleared &= !libc::S_ISGID;
    }
    (cleared != mode).then(|| Mode::from_bits_truncate(cleared & 0o7777))
}

/// Applies `setid_cleared` to an open file. The daemon has CAP_FSETID, so
/// its own writes would keep the bits.
pub(crate) fn clear_setid_bits(file: &std::fs::File, caller: Caller, ids: &IdShift) -> Result<()> {
    if let Some(mode) = setid_cleared(&fstat(file).sys("fstat")?, caller, ids) {
        fchmod(file, mode).sys("fchmod")?;
    }
    Ok(())
}

pub fn wants_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}
