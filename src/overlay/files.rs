//! Open files and directory readers on the merged tree.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

use super::error::{Error, Result, SysContext};
use super::handles::OpenFile;
use super::readdir::DirEntry;
use super::{FileKind, Overlay};

impl Overlay {
    pub fn open(&self, id: u64, flags: i32) -> Result<(u64, Arc<OpenFile>)> {
        let node = self.node(id)?;
        let file = self.open_backing(&node, flags)?;
        Ok(self.handles.add_file(node, flags, file))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let open = self.open_file(fh)?;
        let file = open.file();
        let mut buf = vec![0u8; size as usize];
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
        Ok(buf)
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

    pub fn open_file(&self, fh: u64) -> Result<Arc<OpenFile>> {
        self.handles
            .file(fh)
            .ok_or_else(|| Error::new(Errno::EBADF, "find file handle"))
    }

    pub fn opendir(&self, id: u64) -> Result<u64> {
        let node = self.node(id)?;
        if node.kind != FileKind::Directory {
            return Err(Error::new(Errno::ENOTDIR, "opendir"));
        }
        Ok(self.handles.add_dir(node))
    }

    /// The listing behind a directory handle. Reading from offset 0 takes a
    /// fresh snapshot (opendir, rewinddir); later offsets index into it.
    pub fn dir_entries(&self, fh: u64, offset: u64) -> Result<Arc<Vec<DirEntry>>> {
        let handle = self
            .handles
            .dir(fh)
            .ok_or_else(|| Error::new(Errno::EBADF, "find directory handle"))?;
        let mut entries = handle.entries.lock();
        match &*entries {
            Some(listing) if offset != 0 => Ok(listing.clone()),
            _ => {
                let listing = Arc::new(self.merged_entries(&handle.node)?);
                *entries = Some(listing.clone());
                Ok(listing)
            }
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.remove_dir(fh);
    }
}
