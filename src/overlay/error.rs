//! Errors of the overlay core: an errno plus where it happened (the syscall,
//! the layer, the path inside the merged tree). The FUSE adapter turns them
//! into errno replies; the context goes to the log.

use std::ffi::OsString;
use std::fmt;
use std::io;

use nix::errno::Errno;

#[derive(Debug, Clone)]
pub struct Error {
    errno: Errno,
    op: &'static str,
    layer: Option<usize>,
    path: Option<OsString>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error the overlay itself decides on (ENOENT for a whiteout, ...).
    pub fn new(errno: Errno, op: &'static str) -> Self {
        Error {
            errno,
            op,
            layer: None,
            path: None,
        }
    }

    pub fn with_layer(mut self, layer: usize) -> Self {
        self.layer = Some(layer);
        self
    }

    pub fn with_path(mut self, path: impl Into<OsString>) -> Self {
        self.path = Some(path.into());
        self
    }

    pub fn errno(&self) -> Errno {
        self.errno
    }

    /// What failed: the syscall, or the overlay's own reason.
    pub fn op(&self) -> &'static str {
        self.op
    }

    pub fn raw_errno(&self) -> i32 {
        self.errno as i32
    }

    /// Errors that are ordinary answers (a name that does not exist, an xattr
    /// that is not set) rather than something worth a warning.
    pub fn is_expected(&self) -> bool {
        matches!(
            self.errno,
            Errno::ENOENT
                | Errno::ENODATA
                | Errno::ENOTEMPTY
                | Errno::EEXIST
                | Errno::ERANGE
                | Errno::ENXIO
                | Errno::ENAMETOOLONG
                | Errno::ENOTDIR
                | Errno::EISDIR
                | Errno::ENOSPC
                | Errno::EDQUOT
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.op)?;
        if let Some(layer) = self.layer {
            write!(f, " in layer {layer}")?;
        }
        if let Some(path) = &self.path {
            write!(f, " at {:?}", path)?;
        }
        write!(f, ": {}", self.errno.desc())
    }
}

impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::from_raw_os_error(e.raw_errno())
    }
}

/// Attaches the syscall name to a failed nix or std call.
pub trait SysContext<T> {
    fn sys(self, op: &'static str) -> Result<T>;
}

impl<T> SysContext<T> for nix::Result<T> {
    fn sys(self, op: &'static str) -> Result<T> {
        self.map_err(|errno| Error::new(errno, op))
    }
}

impl<T> SysContext<T> for io::Result<T> {
    fn sys(self, op: &'static str) -> Result<T> {
        self.map_err(|e| {
            let errno = e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO);
            Error::new(errno, op)
        })
    }
}
