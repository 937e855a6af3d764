//! One layer directory: its root descriptor, and the only way unionfs opens
//! anything inside a layer (relative to a descriptor, never across a symlink).

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
use nix::sys::stat::{Mode, fstat};

use super::attr::FileKind;
use super::error::{Error, Result, SysContext};

#[derive(Debug)]
pub struct Layer {
    /// Position in the stack: 0 is the topmost (the upper when there is one).
    pub index: usize,
    pub path: PathBuf,
    /// Shared with the lower directories that may reopen from it.
    pub root: Arc<OwnedFd>,
    pub dev: u64,
    /// The upper layer: written in kernel overlayfs format only, and OCI
    /// `.wh.` names in it are ordinary files.
    pub upper: bool,
}

impl Layer {
    pub fn open(index: usize, path: &Path, upper: bool) -> Result<Layer> {
        let root = open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            Error::new(e, "open layer root")
                .with_layer(index)
                .with_path(path)
        })?;
        let st = fstat(&root)
            .sys("fstat layer root")
            .map_err(|e| e.with_layer(index))?;
        Ok(Layer {
            index,
            path: path.to_path_buf(),
            root: Arc::new(root),
            dev: st.st_dev,
            upper,
        })
    }

    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }
}

/// Opens `name` (one component, or a relative path) below `dir`. The kernel
/// refuses to cross any symlink or to leave `dir` (RESOLVE_BENEATH), so a
/// symlink inside a layer can never lead the daemon elsewhere.
pub fn open_beneath(dir: BorrowedFd<'_>, name: &OsStr, flags: OFlag) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    loop {
        match openat2(dir, name, how) {
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// The entries of the directory `dir` (without `.` and `..`): name, inode
/// number, and type when the filesystem reports it.
pub fn list_dir(dir: BorrowedFd<'_>) -> Result<Vec<(OsString, u64, Option<FileKind>)>> {
    let fd = open_beneath(dir, OsStr::new("."), OFlag::O_RDONLY | OFlag::O_DIRECTORY)
        .sys("open directory")?;
    let mut d = nix::dir::Dir::from_fd(fd).sys("fdopendir")?;
    let mut entries = Vec::new();
    for entry in d.iter() {
        let entry = entry.sys("getdents")?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        entries.push((
            OsStr::from_bytes(name).to_os_string(),
            entry.ino(),
            entry.file_type().map(FileKind::from_dir_type),
        ));
    }
    Ok(entries)
}
