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

use std::ffi::{CStr, OsStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use nix::fcntl::AtFlags;
use nix::sys::stat::fstatat;

use super::attr::{Attr, FileKind};
use nix::errno::Errno;

use super::error::{Error, Result, SysContext};
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

/// Refuses `name` for a new entry of the merged view: every layer reads
/// `.wh.` names as OCI markers (an upper too: see `DirLayer::oci_hides`), so
/// an object made under one would vanish, and hide another.
pub fn refuse_oci_marker(name: &OsStr) -> Result<()> {
    if oci_name(name) == OciName::Plain {
        Ok(())
    } else {
        Err(Error::new(
            Errno::EINVAL,
            "create (names starting with .wh. are OCI whiteouts)",
        ))
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
    /// Where the layers below keep this directory (`redirect_dir`).
    pub redirect: Option<Redirect>,
}

/// A directory's `redirect_dir` xattr, checked as kernel overlayfs checks
/// one when it reads it. Its names are checked only when a lookup uses them
/// (see `resolve::redirect_name`), again as the kernel does: a redirect that
/// is never followed never fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// The layers below keep the directory under this name, in their copies
    /// of its parent.
    Name(OsString),
    /// They keep it at this path from their roots: its components, in order.
    Path(Vec<OsString>),
    /// Not a redirect kernel overlayfs accepts (an empty value, a relative
    /// one with a `/`, an absolute one with an empty component): following
    /// it fails the lookup with EINVAL.
    Malformed(OsString),
}

impl Redirect {
    pub fn parse(value: &[u8]) -> Redirect {
        if value.is_empty() {
            return Redirect::Malformed(OsString::new());
        }
        // The kernel reads the value as a C string: it ends at a NUL.
        let text = value.split(|b| *b == 0).next().unwrap_or_default();
        let malformed = || Redirect::Malformed(OsStr::from_bytes(value).to_os_string());
        match text.strip_prefix(b"/") {
            Some(path) => {
                let parts: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
                if parts.iter().any(|p| p.is_empty()) {
                    return malformed();
                }
                Redirect::Path(
                    parts
                        .into_iter()
                        .map(|p| OsStr::from_bytes(p).to_os_string())
                        .collect(),
                )
            }
            None if text.contains(&b'/') => malformed(),
            None => Redirect::Name(OsStr::from_bytes(text).to_os_string()),
        }
    }

    /// The xattr value of a well-formed redirect, as a new one built from it
    /// is written.
    pub fn value(&self) -> Option<OsString> {
        match self {
            Redirect::Name(name) => Some(name.clone()),
            Redirect::Path(parts) => {
                let mut path = OsString::new();
                for part in parts {
                    path.push("/");
                    path.push(part);
                }
                Some(path)
            }
            Redirect::Malformed(_) => None,
        }
    }
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
            marks.redirect = value.map(|v| Redirect::parse(&v));
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

    fn name(s: &str) -> Redirect {
        Redirect::Name(s.into())
    }

    fn path(parts: &[&str]) -> Redirect {
        Redirect::Path(parts.iter().map(|p| p.into()).collect())
    }

    #[test]
    fn redirects_are_parsed_as_kernel_overlayfs_reads_them() {
        assert_eq!(Redirect::parse(b"moved"), name("moved"));
        assert_eq!(Redirect::parse(b"/src/tree"), path(&["src", "tree"]));
        // `.` and `..` are well formed here; a lookup refuses them.
        assert_eq!(Redirect::parse(b".."), name(".."));
        assert_eq!(Redirect::parse(b"/../x"), path(&["..", "x"]));
        let long = "a".repeat(3000);
        assert_eq!(Redirect::parse(long.as_bytes()), name(&long));
        // What ends at a NUL for the kernel ends there here.
        assert_eq!(Redirect::parse(b"moved\0/junk"), name("moved"));
        assert_eq!(Redirect::parse(b"\0"), name(""));
        for bad in [
            &b""[..],
            b"/",
            b"//etc",
            b"/etc/",
            b"/etc//passwd",
            b"../x",
            b"a/b",
            b"x/",
        ] {
            assert_eq!(
                Redirect::parse(bad),
                Redirect::Malformed(OsStr::from_bytes(bad).to_os_string()),
                "{:?}",
                OsStr::from_bytes(bad)
            );
        }
    }

    #[test]
    fn redirect_values_round_trip() {
        for value in [&b"moved"[..], b"/src/tree", b"/a"] {
            assert_eq!(
                Redirect::parse(value).value().unwrap(),
                OsStr::from_bytes(value)
            );
        }
        assert_eq!(Redirect::parse(b"//etc").value(), None);
    }

    #[test]
    fn private_xattrs_are_recognised() {
        assert!(is_private_xattr(b"trusted.overlay.opaque"));
        assert!(is_private_xattr(b"user.overlay.whiteout"));
        assert!(!is_private_xattr(b"user.overlayish"));
        assert!(!is_private_xattr(b"security.capability"));
    }
}
