//! The permissions of new objects: the caller's umask, or the parent
//! directory's default POSIX ACL. With FUSE_DONT_MASK the kernel leaves
//! both to the daemon, as POSIX wants them: in a directory with a default
//! ACL the umask does not apply, the ACL does (its mask takes the group
//! bits of the requested mode).
//!
//! The upper filesystem applies a default ACL itself to whatever the daemon
//! (umask 0) makes in that directory with the full mode. An object built in
//! the work dir and swapped in over a whiteout is made where there is no
//! default ACL, so it gets the parent's here, as kernel overlayfs gives it.

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{FchmodatFlags, Mode, fchmodat, fstatat};

use super::error::{Error, Result, SysContext};
use super::node::DirLayer;
use super::write::NewObject;
use crate::sys::{self, XattrTarget};

const ACCESS: &CStr = c"system.posix_acl_access";
pub(crate) const DEFAULT: &CStr = c"system.posix_acl_default";

/// The xattr form of an ACL (linux/posix_acl_xattr.h): a version, then
/// (tag, perm, id) entries, little-endian.
const XATTR_VERSION: u32 = 2;
const HEADER_LEN: usize = 4;
const ENTRY_LEN: usize = 8;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// Whether `name` is one of the POSIX ACL xattrs.
pub fn is_acl_xattr(name: &[u8]) -> bool {
    name == ACCESS.to_bytes() || name == DEFAULT.to_bytes()
}

/// The ACL xattr `value` with the ids of its named-user entries moved by
/// `user` and of its named-group entries by `group` (the owner, mask and
/// other entries carry none). None for a malformed value or an id the
/// functions have no answer for.
pub fn map_ids(
    value: &[u8],
    user: impl Fn(u32) -> Option<u32>,
    group: impl Fn(u32) -> Option<u32>,
) -> Option<Vec<u8>> {
    let version = u32::from_le_bytes(value.get(..HEADER_LEN)?.try_into().ok()?);
    let body = &value[HEADER_LEN..];
    if version != XATTR_VERSION || !body.len().is_multiple_of(ENTRY_LEN) {
        return None;
    }
    let mut out = value.to_vec();
    for (i, entry) in body.chunks_exact(ENTRY_LEN).enumerate() {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let id = u32::from_le_bytes(entry[4..8].try_into().ok()?);
        let mapped = match tag {
            USER => user(id)?,
            GROUP => group(id)?,
            _ => continue,
        };
        let id_at = HEADER_LEN + i * ENTRY_LEN + 4;
        out[id_at..id_at + 4].copy_from_slice(&mapped.to_le_bytes());
    }
    Some(out)
}

/// The default ACL of directory `dir` (its xattr value), if it has one. A
/// filesystem without ACLs has none.
pub fn default_acl(dir: BorrowedFd<'_>) -> Result<Option<Vec<u8>>> {
    match sys::get_xattr(XattrTarget::Fd(dir), DEFAULT) {
        Ok(value) => Ok(value.filter(|v| !v.is_empty())),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(e).sys("getxattr(default acl)"),
    }
}

/// The mode to make an object with: the requested one less the umask,
/// unless the directory has a default ACL.
pub fn creation_mode(mode: u32, umask: u32, default_acl: bool) -> u32 {
    if default_acl {
        mode
    } else {
        mode & !(umask & 0o777)
    }
}

/// `object` as it is to be made in the upper directory `dir`, and that
/// directory's default ACL when it has one and the object takes a mode.
/// Without ACL support in the mount (`noacl`) the umask applies plainly.
pub fn prepare<'a>(
    object: NewObject<'a>,
    umask: u32,
    dir: &DirLayer,
    acls: bool,
) -> Result<(NewObject<'a>, Option<Vec<u8>>)> {
    let takes_mode = matches!(
        object,
        NewObject::File { .. } | NewObject::Dir { .. } | NewObject::Special { .. }
    );
    if !takes_mode {
        return Ok((object, None));
    }
    // Read once per directory: only a setxattr or removexattr through this
    // mount gives it one (`Overlay::xattr_changed`).
    let acl = if acls {
        dir.no_default_acl
            .read_with(|| default_acl(dir.fd()?.as_fd()))?
    } else {
        None
    };
    let mask = |mode: u32| creation_mode(mode, umask, acl.is_some());
    let object = match object {
        NewObject::File { mode, flags } => NewObject::File {
            mode: mask(mode),
            flags,
        },
        NewObject::Dir { mode } => NewObject::Dir { mode: mask(mode) },
        NewObject::Special { mode, rdev } => NewObject::Special {
            mode: mask(mode),
            rdev,
        },
        other => other,
    };
    Ok((object, acl))
}

/// Gives `dir/name`, made with its full mode where no default ACL applied,
/// what the default ACL `default` of the directory it goes to gives a new
/// object: its mode masked by the ACL, an access ACL unless the mode says
/// it all, and for a directory the default ACL itself.
pub fn inherit(default: &[u8], dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).sys("fstatat")?;
    let kind = st.st_mode & libc::S_IFMT;
    if kind == libc::S_IFLNK {
        return Ok(());
    }
    let (access, mode) = create_masq(default, st.st_mode)?;
    if mode != st.st_mode {
        fchmodat(
            dir,
            name,
            Mode::from_bits_truncate(mode & 0o7777),
            FchmodatFlags::FollowSymlink,
        )
        .sys("fchmodat(acl)")?;
    }
    let target = XattrTarget::Entry(dir, name);
    if let Some(access) = access {
        sys::set_xattr(target, ACCESS, &access, 0).sys("setxattr(access acl)")?;
    }
    if kind == libc::S_IFDIR {
        sys::set_xattr(target, DEFAULT, default, 0).sys("setxattr(default acl)")?;
    }
    Ok(())
}

/// What POSIX gives an object made with `mode` in a directory whose default
/// ACL is `default`: the access ACL (None when the mode alone says the same)
/// and the mode. Each class keeps only the permissions both the ACL and the
/// mode grant; the group class is the mask entry when there is one.
fn create_masq(default: &[u8], mode: u32) -> Result<(Option<Vec<u8>>, u32)> {
    let invalid = || Error::new(Errno::EIO, "parse default acl");
    let body = default.get(HEADER_LEN..).ok_or_else(invalid)?;
    if u32::from_le_bytes(default[..HEADER_LEN].try_into().unwrap()) != XATTR_VERSION
        || body.len() % ENTRY_LEN != 0
    {
        return Err(invalid());
    }
    let mut acl = default.to_vec();
    let mut mode = mode;
    let (mut group_obj, mut mask, mut extended) = (None, None, false);
    for (i, entry) in body.chunks_exact(ENTRY_LEN).enumerate() {
        let perm_at = HEADER_LEN + i * ENTRY_LEN + 2;
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let perm = u32::from(u16::from_le_bytes([entry[2], entry[3]]));
        let kept = match tag {
            USER_OBJ => {
                let kept = perm & (mode >> 6) & 0o7;
                mode = (mode & !0o700) | (kept << 6);
                kept
            }
            OTHER => {
                let kept = perm & mode & 0o7;
                mode = (mode & !0o007) | kept;
                kept
            }
            GROUP_OBJ => {
                group_obj = Some(perm_at);
                continue;
            }
            MASK => {
                mask = Some(perm_at);
                extended = true;
                continue;
            }
            USER | GROUP => {
                extended = true;
                continue;
            }
            _ => return Err(invalid()),
        };
        acl[perm_at..perm_at + 2].copy_from_slice(&(kept as u16).to_le_bytes());
    }
    let group_at = mask.or(group_obj).ok_or_else(invalid)?;
    let perm = u32::from(u16::from_le_bytes([acl[group_at], acl[group_at + 1]]));
    let kept = perm & (mode >> 3) & 0o7;
    mode = (mode & !0o070) | (kept << 3);
    acl[group_at..group_at + 2].copy_from_slice(&(kept as u16).to_le_bytes());
    Ok((extended.then_some(acl), mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut out = XATTR_VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    const NO_ID: u32 = u32::MAX;

    #[test]
    fn the_umask_applies_only_without_a_default_acl() {
        assert_eq!(creation_mode(0o666, 0o022, false), 0o644);
        assert_eq!(creation_mode(0o777, 0o077, false), 0o700);
        assert_eq!(creation_mode(0o2777, 0o022, false), 0o2755);
        assert_eq!(creation_mode(0o666, 0o022, true), 0o666);
        assert_eq!(creation_mode(0o777, 0o077, true), 0o777);
    }

    #[test]
    fn a_default_acl_with_a_named_user_gives_an_access_acl() {
        // setfacl -d -m u:12345:rwx on a 0755 directory.
        let default = acl(&[
            (USER_OBJ, 7, NO_ID),
            (USER, 7, 12345),
            (GROUP_OBJ, 5, NO_ID),
            (MASK, 7, NO_ID),
            (OTHER, 5, NO_ID),
        ]);
        let (access, mode) = create_masq(&default, libc::S_IFREG | 0o666).unwrap();
        assert_eq!(mode, libc::S_IFREG | 0o664);
        // The mask takes the group bits of the mode; the rest stay.
        let expected = acl(&[
            (USER_OBJ, 6, NO_ID),
            (USER, 7, 12345),
            (GROUP_OBJ, 5, NO_ID),
            (MASK, 6, NO_ID),
            (OTHER, 4, NO_ID),
        ]);
        assert_eq!(access, Some(expected));
        let (_, mode) = create_masq(&default, libc::S_IFDIR | libc::S_ISGID | 0o777).unwrap();
        assert_eq!(mode, libc::S_IFDIR | libc::S_ISGID | 0o775);
    }

    #[test]
    fn a_default_acl_of_the_three_classes_only_masks_the_mode() {
        let default = acl(&[
            (USER_OBJ, 7, NO_ID),
            (GROUP_OBJ, 0, NO_ID),
            (OTHER, 0, NO_ID),
        ]);
        let (access, mode) = create_masq(&default, libc::S_IFIFO | 0o666).unwrap();
        assert_eq!(mode, libc::S_IFIFO | 0o600);
        assert_eq!(access, None);
    }

    #[test]
    fn malformed_acls_are_refused() {
        for bad in [
            vec![],
            vec![1, 0, 0, 0],
            acl(&[(USER_OBJ, 7, NO_ID)]),
            acl(&[(0x40, 7, NO_ID), (GROUP_OBJ, 7, NO_ID)]),
            [acl(&[(GROUP_OBJ, 7, NO_ID)]), vec![0]].concat(),
        ] {
            assert_eq!(create_masq(&bad, 0o644).unwrap_err().errno(), Errno::EIO);
        }
    }
}
