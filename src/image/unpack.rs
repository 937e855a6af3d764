//! Extracts one layer tar into a directory, treating every entry as hostile.
//!
//! Everything happens over directory descriptors: a parent is opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the layer's root,
//! and the entry is made in it by its last component only (`mkdirat`,
//! `openat(O_CREAT|O_EXCL|O_NOFOLLOW)`, `symlinkat`, `linkat`, `mknodat`),
//! so no symlink the layer contains, and no `..` or absolute name, can make
//! a write land outside the root. Such entries refuse the whole layer:
//! a registry never produces them, so they only come from an attack or a
//! broken tool, and a layer silently missing files would be worse.
//!
//! OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) are ordinary files here and
//! are written as such: unionfs reads them natively in lower layers.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};

use crate::overlay::layer::open_beneath;
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmodat, fstatat, mkdirat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, symlinkat, unlinkat};
use tar::EntryType;

use crate::sys::{XattrTarget, set_xattr};

/// What unpacking a layer produced, beyond the tree.
#[derive(Debug, Default)]
pub struct Unpacked {
    /// Bytes of regular file content (hard links not counted again).
    pub content_size: u64,
    /// Things skipped because this process may not make them (devices and
    /// privileged xattrs without root), one line each, for the user.
    pub warnings: Vec<String>,
}

/// One entry's metadata, applied after its object exists.
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// A directory whose mode and times are set once everything inside it is
/// written (creating children would change its mtime, and a read-only mode
/// would stop an unprivileged unpacker from filling it).
struct DeferredDir {
    components: Vec<Vec<u8>>,
    mode: u32,
    mtime: TimeSpec,
}

/// Unpacks the tar read from `reader` into the empty directory `root`.
/// Returns the reader positioned after the archive's end-of-archive marker.
pub fn unpack_layer<R: Read>(reader: R, root: &File) -> io::Result<(Unpacked, R)> {
    let privileged = nix::unistd::geteuid().is_root();
    let mut unpacked = Unpacked::default();
    let mut deferred: Vec<DeferredDir> = Vec::new();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            continue;
        }
        let raw_path = entry.path_bytes().into_owned();
        let components = normalize(&raw_path)?;
        let meta = read_meta(&mut entry)?;
        if components.is_empty() {
            // "./": the layer root itself.
            if !kind.is_dir() {
                return Err(hostile(&raw_path, "the layer root must be a directory"));
            }
            apply_owner_and_xattrs(root.as_fd(), None, &meta, privileged, &mut unpacked)?;
            deferred.push(DeferredDir {
                components,
                mode: meta.mode,
                mtime: meta.mtime,
            });
            continue;
        }
        let (name, parents) = components.split_last().expect("not empty");
        let parent = open_parent(root.as_fd(), parents, &raw_path)?;
        let name = OsStr::from_bytes(name);
        let existing = fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).ok();
        let existing_is_dir = existing.is_some_and(|st| is_dir(st.st_mode));
        if existing.is_some() && !(kind.is_dir() && existing_is_dir) {
            // A later entry replaces an earlier one, as when tar extracts.
            let flag = if existing_is_dir {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            unlinkat(&parent, name, flag).map_err(|e| {
                io_err(
                    e,
                    &raw_path,
                    "cannot replace the earlier entry of this name",
                )
            })?;
        }
        match kind {
            EntryType::Directory => {
                if !existing_is_dir {
                    mkdirat(&parent, name, Mode::from_bits_truncate(0o700))
                        .map_err(|e| io_err(e, &raw_path, "mkdirat"))?;
                }
                let dir = open_beneath(parent.as_fd(), name, OFlag::O_DIRECTORY | OFlag::O_RDONLY)
                    .map_err(|e| io_err(e, &raw_path, "open the new directory"))?;
                apply_owner_and_xattrs(dir.as_fd(), None, &meta, privileged, &mut unpacked)?;
                deferred.push(DeferredDir {
                    components: components.clone(),
                    mode: meta.mode,
                    mtime: meta.mtime,
                });
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let fd = openat(
                    &parent,
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| io_err(e, &raw_path, "create"))?;
                let mut file = File::from(fd);
                unpacked.content_size += io::copy(&mut entry, &mut file)?;
                apply_owner_and_xattrs(file.as_fd(), None, &meta, privileged, &mut unpacked)?;
                // After chown, which clears setuid/setgid.
                nix::sys::stat::fchmod(&file, mode_bits(meta.mode))
                    .map_err(|e| io_err(e, &raw_path, "fchmod"))?;
                nix::sys::stat::futimens(&file, &meta.mtime, &meta.mtime)
                    .map_err(|e| io_err(e, &raw_path, "futimens"))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile(&raw_path, "symlink without a target"))?
                    .into_owned();
                // The target is data: stored as given, never followed here.
                symlinkat(OsStr::from_bytes(&target), &parent, name)
                    .map_err(|e| io_err(e, &raw_path, "symlinkat"))?;
                apply_owner_and_xattrs(
                    parent.as_fd(),
                    Some(name),
                    &meta,
                    privileged,
                    &mut unpacked,
                )?;
                set_times_at(parent.as_fd(), name, meta.mtime, &raw_path)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile(&raw_path, "hard link without a target"))?
                    .into_owned();
                let target_components = normalize(&target)?;
                let (target_name, target_parents) = target_components
                    .split_last()
                    .ok_or_else(|| hostile(&raw_path, "hard link to the layer root"))?;
                let target_parent = open_existing_dir(root.as_fd(), target_parents)
                    .map_err(|e| io_err(e, &target, "hard link target's directory"))?;
                // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                linkat(
                    &target_parent,
                    OsStr::from_bytes(target_name),
                    &parent,
                    name,
                    AtFlags::empty(),
                )
                .map_err(|e| {
                    io_err(
                        e,
                        &raw_path,
                        "hard link (its target must be earlier in the layer)",
                    )
                })?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let sflag = match kind {
                    EntryType::Char => SFlag::S_IFCHR,
                    EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                // A fifo has no device number; tools leave the fields blank.
                let dev = if sflag == SFlag::S_IFIFO {
                    0
                } else {
                    nix::sys::stat::makedev(
                        u64::from(entry.header().device_major()?.unwrap_or(0)),
                        u64::from(entry.header().device_minor()?.unwrap_or(0)),
                    )
                };
                match nix::sys::stat::mknodat(
                    &parent,
                    name,
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    dev,
                ) {
                    Ok(()) => {}
                    Err(Errno::EPERM) if sflag != SFlag::S_IFIFO => {
                        // Without CAP_MKNOD (rootless, user namespaces) a
                        // device cannot exist here; the rest of the layer can.
                        unpacked.warnings.push(format!(
                            "skipped device node {} (no permission to create devices)",
                            String::from_utf8_lossy(&raw_path)
                        ));
                        continue;
                    }
                    Err(e) => return Err(io_err(e, &raw_path, "mknodat")),
                }
                apply_owner_and_xattrs(
                    parent.as_fd(),
                    Some(name),
                    &meta,
                    privileged,
                    &mut unpacked,
                )?;
                fchmodat(
                    &parent,
                    name,
                    mode_bits(meta.mode),
                    FchmodatFlags::NoFollowSymlink,
                )
                .map_err(|e| io_err(e, &raw_path, "fchmodat"))?;
                set_times_at(parent.as_fd(), name, meta.mtime, &raw_path)?;
            }
            other => {
                return Err(hostile(
                    &raw_path,
                    &format!("unsupported tar entry type {other:?}"),
                ));
            }
        }
    }
    // Deepest first, so setting a directory's times comes after its children.
    deferred.sort_by_key(|d| std::cmp::Reverse(d.components.len()));
    for dir in &deferred {
        // A directory listed twice is set twice, its last entry winning (the
        // sort is stable); one replaced by a later non-directory is gone.
        let fd = match open_beneath(
            root.as_fd(),
            OsStr::from_bytes(&join(&dir.components)),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => continue,
            Err(e) => return Err(io_err(e, &join(&dir.components), "reopen directory")),
        };
        nix::sys::stat::fchmod(&fd, mode_bits(dir.mode))?;
        nix::sys::stat::futimens(&fd, &dir.mtime, &dir.mtime)?;
    }
    Ok((unpacked, archive.into_inner()))
}

fn mode_bits(mode: u32) -> Mode {
    Mode::from_bits_truncate(mode & 0o7777)
}

fn is_dir(st_mode: u32) -> bool {
    st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Splits a tar path into components, refusing anything that could leave
/// the root: absolute paths, `..`, names the kernel would refuse.
pub fn normalize(path: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    if path.first() == Some(&b'/') {
        return Err(hostile(path, "absolute path"));
    }
    if path.contains(&0) {
        return Err(hostile(path, "NUL byte in the name"));
    }
    let mut components = Vec::new();
    for part in path.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(hostile(path, "'..' in the path")),
            name if name.len() > 255 => {
                return Err(hostile(path, "a name longer than 255 bytes"));
            }
            name => components.push(name.to_vec()),
        }
    }
    Ok(components)
}

fn hostile(path: &[u8], why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "refused tar entry '{}': {why}",
            String::from_utf8_lossy(path)
        ),
    )
}

fn io_err(e: Errno, path: &[u8], what: &str) -> io::Error {
    let why = match e {
        Errno::ELOOP | Errno::EXDEV => "it goes through a symlink or out of the layer".to_string(),
        // O_NOFOLLOW|O_DIRECTORY on a symlink in the path ends here too.
        Errno::ENOTDIR => {
            format!("{what}: a component of its path is a symlink or not a directory")
        }
        other => format!("{what}: {}", other.desc()),
    };
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("tar entry '{}': {why}", String::from_utf8_lossy(path)),
    )
}

fn join(components: &[Vec<u8>]) -> Vec<u8> {
    if components.is_empty() {
        return b".".to_vec();
    }
    components.join(&b'/')
}

fn open_existing_dir(root: BorrowedFd<'_>, components: &[Vec<u8>]) -> nix::Result<OwnedFd> {
    open_beneath(
        root,
        OsStr::from_bytes(&join(components)),
        OFlag::O_PATH | OFlag::O_DIRECTORY,
    )
}

/// Opens the entry's parent directory beneath the root, creating missing
/// ones (tars may omit parent entries) one component at a time.
fn open_parent(root: BorrowedFd<'_>, parents: &[Vec<u8>], raw_path: &[u8]) -> io::Result<OwnedFd> {
    match open_existing_dir(root, parents) {
        Ok(fd) => return Ok(fd),
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(io_err(e, raw_path, "open parent directory")),
    }
    let mut dir = open_existing_dir(root, &[]).map_err(|e| io_err(e, raw_path, "open root"))?;
    for part in parents {
        let name = OsStr::from_bytes(part);
        match mkdirat(&dir, name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(io_err(e, raw_path, "mkdirat (implicit parent)")),
        }
        dir = open_beneath(dir.as_fd(), name, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .map_err(|e| io_err(e, raw_path, "open parent directory"))?;
    }
    Ok(dir)
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Meta> {
    let header = entry.header();
    let mut meta = Meta {
        mode: header.mode()?,
        uid: header.uid()?,
        gid: header.gid()?,
        mtime: TimeSpec::new(header.mtime()? as i64, 0),
        xattrs: Vec::new(),
    };
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                let name = CString::new(name)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "NUL in xattr name"))?;
                meta.xattrs.push((name, value.to_vec()));
            } else if key == b"uid" {
                meta.uid = parse_pax_number(value)?;
            } else if key == b"gid" {
                meta.gid = parse_pax_number(value)?;
            } else if key == b"mtime" {
                meta.mtime = parse_pax_time(value)?;
            }
        }
    }
    Ok(meta)
}

fn parse_pax_number(value: &[u8]) -> io::Result<u64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad number in a PAX record"))
}

/// PAX times are decimal seconds with an optional fraction.
fn parse_pax_time(value: &[u8]) -> io::Result<TimeSpec> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad time in a PAX record");
    let text = std::str::from_utf8(value).map_err(|_| bad())?.trim();
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().map_err(|_| bad())?;
    let digits: String = frac.chars().take(9).collect();
    let nanos: i64 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().map_err(|_| bad())?
    };
    let nanos = if secs < 0 && nanos > 0 { -nanos } else { nanos };
    Ok(TimeSpec::new(secs, nanos))
}

/// Owner first, then xattrs: chown drops `security.capability`, so the
/// capability must be written after it.
fn apply_owner_and_xattrs(
    fd: BorrowedFd<'_>,
    name: Option<&OsStr>,
    meta: &Meta,
    privileged: bool,
    unpacked: &mut Unpacked,
) -> io::Result<()> {
    let uid = u32::try_from(meta.uid).map_err(|_| io::Error::from(Errno::EOVERFLOW))?;
    let gid = u32::try_from(meta.gid).map_err(|_| io::Error::from(Errno::EOVERFLOW))?;
    let owner = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    let chowned = match name {
        Some(name) => fchownat(fd, name, owner.0, owner.1, AtFlags::AT_SYMLINK_NOFOLLOW),
        None => fchownat(fd, "", owner.0, owner.1, AtFlags::AT_EMPTY_PATH),
    };
    match chowned {
        Ok(()) => {}
        // Unprivileged, files belong to the one who loads them: what
        // rootless podman does outside its user namespace.
        Err(Errno::EPERM | Errno::EINVAL) if !privileged => {}
        Err(e) => return Err(io::Error::other(format!("fchownat: {}", e.desc()))),
    }
    for (xattr, value) in &meta.xattrs {
        let target = match name {
            Some(name) => XattrTarget::Entry(fd, name),
            None => XattrTarget::Fd(fd),
        };
        if let Err(e) = set_xattr(target, xattr, value, 0) {
            unpacked.warnings.push(format!(
                "could not keep xattr {}: {e}",
                xattr.to_string_lossy()
            ));
        }
    }
    Ok(())
}

fn set_times_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    mtime: TimeSpec,
    raw_path: &[u8],
) -> io::Result<()> {
    nix::sys::stat::utimensat(dir, name, &mtime, &mtime, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| io_err(e, raw_path, "utimensat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_refuses_escapes() {
        assert!(normalize(b"/etc/passwd").is_err());
        assert!(normalize(b"a/../../x").is_err());
        assert!(normalize(&[b'a'; 256]).is_err());
        assert_eq!(
            normalize(b"./a//b/").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
        assert!(normalize(b"./").unwrap().is_empty());
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"12.5").unwrap(),
            TimeSpec::new(12, 500_000_000)
        );
        assert_eq!(parse_pax_time(b"7").unwrap(), TimeSpec::new(7, 0));
    }
}
