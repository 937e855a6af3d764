//! The on-disk format of the upper, decided once when the mount starts and
//! fixed for its life, as kernel overlayfs decides it: which xattr namespace
//! carries the overlay markers (`trusted.overlay.*`, or `user.overlay.*` as
//! with `-o userxattr`), and whether whiteouts are 0/0 character devices or
//! the xattr form.
//!
//! An unprivileged daemon (in a user namespace, or a plain user) may mknod
//! whiteouts (Linux 5.8+) but not set `trusted.*` xattrs: guessing the
//! namespace from mknod alone wrote `trusted.overlay.opaque` there and failed
//! with EPERM. So each is probed for itself, in the work dir.

use std::ffi::{CStr, OsStr};
use std::fmt;

use nix::errno::Errno;
use nix::sys::stat::{Mode, SFlag, mkdirat, mknodat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::error::{Result, SysContext};
use super::marker;
use super::workdir::WorkDir;
use crate::sys::{self, XattrTarget};

/// Where the overlay's own xattrs live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrNamespace {
    /// `trusted.overlay.*`: kernel overlayfs' default; needs CAP_SYS_ADMIN
    /// in the initial user namespace.
    Trusted,
    /// `user.overlay.*`: kernel overlayfs with `-o userxattr`.
    User,
}

/// How a whiteout is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhiteoutForm {
    /// A 0/0 character device.
    CharDevice,
    /// A zero-size file with the whiteout xattr, in a directory whose opaque
    /// xattr is `x` (kernel 6.7+), where mknod of whiteouts is refused.
    Xattr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpperFormat {
    pub xattrs: XattrNamespace,
    pub whiteouts: WhiteoutForm,
}

impl UpperFormat {
    /// Kernel overlayfs' default format.
    pub const TRUSTED: UpperFormat = UpperFormat {
        xattrs: XattrNamespace::Trusted,
        whiteouts: WhiteoutForm::CharDevice,
    };

    /// Probes what the daemon may write in the work dir: `user.overlay.*`
    /// when `userxattr` is asked for or `trusted.*` xattrs are refused, and
    /// xattr whiteouts when mknod of a whiteout is.
    pub fn probe(work: &WorkDir, userxattr: bool) -> Result<UpperFormat> {
        let xattrs = if userxattr || !can_set_trusted_xattrs(work)? {
            XattrNamespace::User
        } else {
            XattrNamespace::Trusted
        };
        let whiteouts = if can_mknod_whiteouts(work)? {
            WhiteoutForm::CharDevice
        } else {
            WhiteoutForm::Xattr
        };
        Ok(UpperFormat { xattrs, whiteouts })
    }

    pub fn opaque_xattr(&self) -> &'static CStr {
        match self.xattrs {
            XattrNamespace::Trusted => marker::TRUSTED_OPAQUE,
            XattrNamespace::User => marker::USER_OPAQUE,
        }
    }

    pub fn redirect_xattr(&self) -> &'static CStr {
        match self.xattrs {
            XattrNamespace::Trusted => marker::TRUSTED_REDIRECT,
            XattrNamespace::User => marker::USER_REDIRECT,
        }
    }

    pub fn whiteout_xattr(&self) -> &'static CStr {
        match self.xattrs {
            XattrNamespace::Trusted => marker::TRUSTED_WHITEOUT,
            XattrNamespace::User => marker::USER_WHITEOUT,
        }
    }

    /// Whether a directory that lower layers contribute to may move (with a
    /// redirect). Kernel overlayfs never follows redirects in `userxattr`
    /// mode (it forces `redirect_dir=nofollow`), so an upper written with
    /// them would read differently there: such renames answer EXDEV, and
    /// `mv` copies instead.
    pub fn moves_merged_dirs(&self) -> bool {
        self.xattrs == XattrNamespace::Trusted
    }
}

impl fmt::Display for UpperFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let xattrs = match self.xattrs {
            XattrNamespace::Trusted => "trusted.overlay.* xattrs",
            XattrNamespace::User => "user.overlay.* xattrs (userxattr)",
        };
        let whiteouts = match self.whiteouts {
            WhiteoutForm::CharDevice => "character device whiteouts",
            WhiteoutForm::Xattr => "xattr whiteouts",
        };
        write!(f, "{xattrs}, {whiteouts}")
    }
}

/// Sets a trusted xattr on a scratch directory in the work dir, as kernel
/// overlayfs probes its upper.
fn can_set_trusted_xattrs(work: &WorkDir) -> Result<bool> {
    let name = work.temp_name();
    mkdirat(work.fd(), name.as_os_str(), Mode::from_bits_truncate(0o700)).sys("mkdirat(probe)")?;
    let set = sys::set_xattr(
        XattrTarget::Entry(work.fd(), &name),
        marker::TRUSTED_OPAQUE,
        b"0",
        0,
    );
    let removed = unlinkat(work.fd(), name.as_os_str(), UnlinkatFlags::RemoveDir);
    let can = match set {
        Ok(()) => true,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EPERM | libc::EACCES | libc::EOPNOTSUPP)
            ) =>
        {
            false
        }
        Err(e) => return Err(e).sys("setxattr(trusted probe)"),
    };
    removed.sys("rmdir(probe)")?;
    Ok(can)
}

/// Makes a whiteout device in the work dir.
fn can_mknod_whiteouts(work: &WorkDir) -> Result<bool> {
    let name = work.temp_name();
    match mknodat(
        work.fd(),
        name.as_os_str(),
        SFlag::S_IFCHR,
        Mode::empty(),
        0,
    ) {
        Ok(()) => {
            unlinkat(work.fd(), OsStr::new(&name), UnlinkatFlags::NoRemoveDir)
                .sys("unlink(probe)")?;
            Ok(true)
        }
        Err(Errno::EPERM) => Ok(false),
        Err(e) => Err(e).sys("mknodat(whiteout probe)"),
    }
}
