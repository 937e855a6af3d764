//! How whiteouts and opaque directories are stored on disk, in every format
//! unionfs reads:
//!
//! * kernel overlayfs: a whiteout is a character device 0/0; a directory is
//!   opaque when `trusted.overlay.opaque` (or `user.overlay.opaque` for
//!   `userxattr` mounts) is `y`. A directory whose opaque xattr is `x` holds
//!   "xattr whiteouts": zero-size regular files carrying
//!   `trusted.overlay.whiteout` / `user.overlay.whiteout` (Linux 6.7+).
//! * OCI / AUFS layers (lower layers only): `.wh.NAME` hides NAME in the
//!   layers below, `.wh..wh..opq` makes its directory opaque, and every other
//!   `.wh..wh.*` entry is AUFS metadata that never shows.

use std::ffi::{CStr, OsStr};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use nix::fcntl::AtFlags;
use nix::sys::stat::fstatat;

use super::attr::{Attr, FileKind};
use super::error::{Result, SysContext};
use crate::sys::{self, XattrTarget};

pub const OCI_WHITEOUT_PREFIX: &[u8] = b".wh.";
pub const OCI_OPAQUE: &[u8] = b".wh..wh..opq";
const OCI_META_PREFIX: &[u8] = b".wh..wh.";

pub const TRUSTED_OPAQUE: &CStr = c"trusted.overlay.opaque";
pub const USER_OPAQUE: &CStr = c"user.overlay.opaque";
pub const TRUSTED_WHITEOUT: &CStr = c"trusted.overlay.whiteout";
pub const TRUSTED_REDIRECT: &CStr = c"trusted.overlay.redirect";
pub const USER_REDIRECT: &CStr = c"user.overlay.redirect";
pub const USER_WHITEOUT: &CStr = c"user.overlay.whiteout";

/// What an entry name means in an OCI layer.
#[derive(Debug, PartialEq, Eq)]
pub enum OciName<'a> {
    Plain,
    /// `.wh.NAME`: NAME is deleted in the layers below.
    Whiteout(&'a OsStr),
    /// `.wh..wh..opq`: the directory holding it is opaque.
    Opaque,
    /// Other `.wh..wh.*` AUFS bookkeeping.
    Meta,
}

pub fn oci_name(name: &OsStr) -> OciName<'_> {
    let bytes = name.as_bytes();
    if bytes == OCI_OPAQUE {
        OciName::Opaque
    } else if bytes.starts_with(OCI_META_PREFIX) {
        OciName::Meta
    } else if let Some(target) = bytes.strip_prefix(OCI_WHITEOUT_PREFIX) {
        if target.is_empty() {
            OciName::Meta
        } else {
            OciName::Whiteout(OsStr::from_bytes(target))
        }
    } else {
        OciName::Plain
    }
}

/// Overlay-private xattrs never show through the merged view.
pub fn is_private_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

pub fn is_chardev_whiteout(attr: &Attr) -> bool {
    attr.kind() == FileKind::CharDevice && attr.rdev == 0
}

/// The markers a directory of one layer carries.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DirMarks {
    /// Lower layers' contents of this directory are hidden.
    pub opaque: bool,
    /// Zero-size files with a whiteout xattr are whiteouts here.
    pub xwhiteouts: bool,
    /// Where the layers below keep this directory (`redirect_dir`): a name
    /// in the same parent, or a path from the root when it starts with `/`.
    pub redirect: Option<std::ffi::OsString>,
}

/// Reads the markers of the directory `dir`; `oci` also honours `.wh..wh..opq`.
pub fn read_dir_marks(dir: BorrowedFd<'_>, oci: bool) -> Result<DirMarks> {
    let mut marks = DirMarks::default();
    let names = match sys::list_xattr(XattrTarget::Fd(dir)) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
        Err(e) => return Err(e).sys("listxattr"),
    };
    for name in names.split(|b| *b == 0) {
        let xattr = if name == TRUSTED_OPAQUE.to_bytes() {
            TRUSTED_OPAQUE
        } else if name == USER_OPAQUE.to_bytes() {
            USER_OPAQUE
        } else if name == TRUSTED_REDIRECT.to_bytes() || name == USER_REDIRECT.to_bytes() {
            let which = if name == TRUSTED_REDIRECT.to_bytes() {
                TRUSTED_REDIRECT
            } else {
                USER_REDIRECT
            };
            let value = sys::get_xattr(XattrTarget::Fd(dir), which).sys("getxattr(redirect)")?;
            marks.redirect = value
                .filter(|v| !v.is_empty())
                .map(|v| OsStr::from_bytes(&v).to_os_string());
            continue;
        } else {
            continue;
        };
        match sys::get_xattr(XattrTarget::Fd(dir), xattr)
            .sys("getxattr")?
            .as_deref()
        {
            Some(b"y") => marks.opaque = true,
            Some(b"x") => marks.xwhiteouts = true,
            _ => {}
        }
    }
    if oci && !marks.opaque {
        match fstatat(
            dir,
            OsStr::from_bytes(OCI_OPAQUE),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(_) => marks.opaque = true,
            Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(e).sys("fstatat(.wh..wh..opq)"),
        }
    }
    Ok(marks)
}

/// Whether the zero-size regular file `name` in `dir` is an xattr whiteout.
pub fn is_xattr_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> Result<bool> {
    for xattr in [TRUSTED_WHITEOUT, USER_WHITEOUT] {
        match sys::get_xattr(XattrTarget::Entry(dir, name), xattr) {
            Ok(Some(_)) => return Ok(true),
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
            Err(e) => return Err(e).sys("getxattr(overlay.whiteout)"),
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_names_are_classified() {
        assert_eq!(oci_name(OsStr::new("file")), OciName::Plain);
        assert_eq!(
            oci_name(OsStr::new(".wh.file")),
            OciName::Whiteout(OsStr::new("file"))
        );
        assert_eq!(oci_name(OsStr::new(".wh..wh..opq")), OciName::Opaque);
        assert_eq!(oci_name(OsStr::new(".wh..wh.plnk")), OciName::Meta);
        assert_eq!(oci_name(OsStr::new(".wh.")), OciName::Meta);
        assert_eq!(oci_name(OsStr::new(".whfile")), OciName::Plain);
    }

    #[test]
    fn private_xattrs_are_recognised() {
        assert!(is_private_xattr(b"trusted.overlay.opaque"));
        assert!(is_private_xattr(b"user.overlay.whiteout"));
        assert!(!is_private_xattr(b"user.overlayish"));
        assert!(!is_private_xattr(b"security.capability"));
    }
}
