//! The OCI layer tar of an upper directory, written in one pass with its
//! sha256 (the layer's `diff_id`) computed as it is written.
//!
//! * Whiteouts (char device 0/0, xattr whiteouts) become `.wh.NAME`; an
//!   opaque directory is followed by its `.wh..wh..opq`.
//! * A directory moved with a redirect (OCI has none) is written whole: its
//!   merged contents, as the mount shows them (the upper merged with the
//!   lower copies the redirect names, whiteouts and opaque markers applied),
//!   behind a `.wh..wh..opq` so that nothing at its new place below shows
//!   through; and `.wh.OLDNAME` at its old place when nothing in the upper
//!   hides the lower copy there already.
//! * Hard links stay links: the first path written is the file, the others
//!   link entries to it.
//! * xattrs (file capabilities included) go into PAX `SCHILY.xattr.NAME`
//!   records, overlay-private ones (`trusted.overlay.*`, `user.overlay.*`)
//!   never. Owners, modes (set-id bits included), mtimes (seconds), symlink
//!   targets, fifos and devices are kept; sockets are left out.
//!
//! Determinism: entries come in walk order (names sorted as bytes within
//! each directory, a directory before its contents, its `.wh..wh..opq`
//! right after it), headers are POSIX ustar with PAX extended headers, and
//! no field depends on anything but the upper and lowers' contents: no
//! atime or ctime, empty user and group names, zero fields where a type has
//! none, PAX headers with fixed names and zero times. The same upper gives
//! the same bytes, hence the same diff_id.
//!
//! The tar crate builds the ustar headers (every field is set here, and
//! `Builder::append` writes a header and its data as given); PAX records are
//! written here, as its Builder has no PAX writer.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, SFlag};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use super::changes::{Error, Item, Layers, Result, Walker};
use crate::overlay::layer::open_beneath;
use crate::overlay::marker::{self, Redirect};
use crate::sys::{self, XattrTarget};

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerTar {
    /// sha256 of the tar: the layer's diff_id.
    pub sha256: [u8; 32],
    /// Bytes written.
    pub size: u64,
}

impl LayerTar {
    /// `sha256:<hex>`, as manifests and image configs spell it.
    pub fn diff_id(&self) -> String {
        let mut s = String::from("sha256:");
        for b in self.sha256 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A file's data, exactly as long as its header says: a file that shrinks
/// while it is read fails the tar instead of corrupting it.
struct Exact<R> {
    inner: io::Take<R>,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = self.inner.limit();
        let n = self.inner.read(buf)?;
        if n == 0 && want > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while it was archived",
            ));
        }
        Ok(n)
    }
}

const OPAQUE_NAME: &str = ".wh..wh..opq";

/// Writes the OCI layer tar of `layers`' upper to `out`.
pub fn write_layer_tar<W: Write>(layers: &Layers, out: W) -> Result<LayerTar> {
    let sink = Hashing {
        inner: out,
        hasher: Sha256::new(),
        size: 0,
    };
    let mut tar = TarOut {
        builder: tar::Builder::new(sink),
        links: HashMap::new(),
        pending: BTreeMap::new(),
    };
    let mut walker = Walker::new(layers, false)?;
    while let Some(item) = walker.next_item()? {
        let components = components(&item.path);
        tar.flush_pending(Some(&components))?;
        tar.item(&mut walker, &item)?;
        if item.merged_root
            && let Some(old) = old_place(&item)
            && visible_in_upper(layers, &old)?
        {
            tar.whiteout_at(old, &item.stat, &components)?;
        }
    }
    tar.flush_pending(None)?;
    tar.builder
        .finish()
        .map_err(|e| io_error(e, "write", "(end of archive)"))?;
    let sink = tar
        .builder
        .into_inner()
        .map_err(|e| io_error(e, "write", "(end of archive)"))?;
    Ok(LayerTar {
        sha256: sink.hasher.finalize().into(),
        size: sink.size,
    })
}

fn io_error(e: io::Error, op: &'static str, path: impl Into<PathBuf>) -> Error {
    let errno = e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO);
    Error::new(errno, op, 0, path)
}

fn components(path: &Path) -> Vec<OsString> {
    path.iter().map(|c| c.to_os_string()).collect()
}

/// Where the lower copy of a redirected directory was, as components.
fn old_place(item: &Item) -> Option<Vec<OsString>> {
    match item.marks.redirect.as_ref()? {
        Redirect::Name(name) => {
            let mut parts = components(item.path.parent().unwrap_or(Path::new("")));
            parts.push(name.clone());
            Some(parts)
        }
        Redirect::Path(parts) => Some(parts.clone()),
        Redirect::Malformed(_) => None,
    }
}

/// Whether the upper leaves `path` to the lower layers: no component is in
/// the upper as a whiteout, a non-directory or an opaque directory, and
/// the name itself is not in the upper at all.
fn visible_in_upper(layers: &Layers, path: &[OsString]) -> Result<bool> {
    let rel: PathBuf = path.iter().collect();
    let mut dir = layers
        .root(0)
        .try_clone_to_owned()
        .map_err(|e| io_error(e, "dup", &rel))?;
    for (i, part) in path.iter().enumerate() {
        let st = match nix::sys::stat::fstatat(
            dir.as_fd(),
            part.as_os_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(true),
            Err(e) => return Err(Error::new(e, "fstatat", 0, &rel)),
        };
        if i + 1 == path.len() || st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFDIR.bits() {
            return Ok(false);
        }
        dir = open_beneath(dir.as_fd(), part, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .map_err(|e| Error::new(e, "openat2", 0, &rel))?;
        let marks = marker::read_dir_marks(dir.as_fd(), false)
            .map_err(|e| Error::new(e.errno(), e.op(), 0, &rel))?;
        if marks.opaque || marks.redirect.is_some() {
            return Ok(false);
        }
    }
    Ok(false)
}

struct TarOut<W: Write> {
    builder: tar::Builder<Hashing<W>>,
    /// First path written of each hard-linked file.
    links: HashMap<(u64, u64), PathBuf>,
    /// Whiteouts at the old places of redirected directories still ahead
    /// in the walk, by components (walk order).
    pending: BTreeMap<Vec<OsString>, FileStat>,
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // "LEN KEY=VALUE\n", LEN counting itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> TarOut<W> {
    fn flush_pending(&mut self, upto: Option<&[OsString]>) -> Result<()> {
        while let Some((first, _)) = self.pending.first_key_value() {
            if upto.is_some_and(|u| first.as_slice() >= u) {
                break;
            }
            let (parts, stat) = self.pending.pop_first().expect("an entry");
            self.marker(&parts.iter().collect::<PathBuf>(), &stat)?;
        }
        Ok(())
    }

    fn whiteout_at(&mut self, old: Vec<OsString>, stat: &FileStat, now: &[OsString]) -> Result<()> {
        // Ordered by the name it is written under.
        let mut key = old;
        if let Some(last) = key.last_mut() {
            let mut name = OsString::from(".wh.");
            name.push(&*last);
            *last = name;
        }
        if key.as_slice() > now {
            self.pending.insert(key, *stat);
            Ok(())
        } else {
            self.marker(&key.iter().collect::<PathBuf>(), stat)
        }
    }

    /// A `.wh.` or `.wh..wh..opq` entry: an empty regular file with the
    /// owner and mtime of what it stands for.
    fn marker(&mut self, path: &Path, stat: &FileStat) -> Result<()> {
        let mut h = base_header(EntryType::Regular, stat);
        h.set_mode(0o600);
        h.set_size(0);
        self.append(h, path, None, Vec::new(), io::empty())
    }

    fn item(&mut self, walker: &mut Walker<'_>, item: &Item) -> Result<()> {
        let st = &item.stat;
        if item.whiteout {
            let mut name = OsString::from(".wh.");
            name.push(&item.name);
            return self.marker(&item.path.with_file_name(name), st);
        }
        let fmt = st.st_mode & SFlag::S_IFMT.bits();
        let entry_type = match SFlag::from_bits_truncate(fmt) {
            SFlag::S_IFDIR => EntryType::Directory,
            SFlag::S_IFREG => EntryType::Regular,
            SFlag::S_IFLNK => EntryType::Symlink,
            SFlag::S_IFIFO => EntryType::Fifo,
            SFlag::S_IFCHR => EntryType::Char,
            SFlag::S_IFBLK => EntryType::Block,
            _ => return Ok(()), // sockets have no tar form
        };
        let dir = walker.item_dir()?;
        let xattrs = xattrs(dir, &item.name).map_err(|e| io_error(e, "listxattr", &item.path))?;
        let mut h = base_header(entry_type, st);
        let mut link = None;
        match entry_type {
            EntryType::Symlink => {
                let target = nix::fcntl::readlinkat(dir, item.name.as_os_str())
                    .map_err(|e| Error::new(e, "readlinkat", item.layer, &item.path))?;
                link = Some(PathBuf::from(target));
            }
            EntryType::Char | EntryType::Block => {
                h.set_device_major(nix::sys::stat::major(st.st_rdev) as u32)
                    .map_err(|e| io_error(e, "tar header", &item.path))?;
                h.set_device_minor(nix::sys::stat::minor(st.st_rdev) as u32)
                    .map_err(|e| io_error(e, "tar header", &item.path))?;
            }
            EntryType::Regular if st.st_nlink > 1 => {
                let key = (st.st_dev, st.st_ino);
                if let Some(first) = self.links.get(&key) {
                    h.set_entry_type(EntryType::Link);
                    h.set_size(0);
                    let first = first.clone();
                    return self.append(h, &item.path, Some(&first), xattrs, io::empty());
                }
                self.links.insert(key, item.path.clone());
            }
            _ => {}
        }
        if entry_type == EntryType::Regular {
            let file = open_beneath(dir, &item.name, OFlag::O_RDONLY | OFlag::O_NOCTTY)
                .map_err(|e| Error::new(e, "openat2", item.layer, &item.path))?;
            h.set_size(st.st_size as u64);
            let data = Exact {
                inner: std::fs::File::from(file).take(st.st_size as u64),
            };
            return self.append(h, &item.path, None, xattrs, data);
        }
        self.append(h, &item.path, link.as_deref(), xattrs, io::empty())?;
        let opaque = (item.marks.opaque && !item.in_merged) || item.merged_root;
        if entry_type == EntryType::Directory && opaque {
            self.marker(&item.path.join(OPAQUE_NAME), st)?;
        }
        Ok(())
    }

    /// One entry, behind a PAX header when it has xattrs or a name or link
    /// target too long for ustar.
    fn append(
        &mut self,
        mut h: Header,
        path: &Path,
        link: Option<&Path>,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
        data: impl Read,
    ) -> Result<()> {
        let mut records = Vec::new();
        if let Some(link) = link
            && h.set_link_name(link).is_err()
        {
            pax_record(&mut records, b"linkpath", link.as_os_str().as_bytes());
            h.as_old_mut().linkname = [0; 100];
        }
        if h.set_path(path).is_err() {
            pax_record(&mut records, b"path", path.as_os_str().as_bytes());
            let bytes = path.as_os_str().as_bytes();
            let name = &mut h.as_old_mut().name;
            let n = bytes.len().min(name.len());
            *name = [0; 100];
            name[..n].copy_from_slice(&bytes[..n]);
        }
        for (key, value) in &xattrs {
            let mut k = b"SCHILY.xattr.".to_vec();
            k.extend_from_slice(key);
            pax_record(&mut records, &k, value);
        }
        if !records.is_empty() {
            let mut ph = Header::new_ustar();
            ph.set_entry_type(EntryType::XHeader);
            ph.set_path("PaxHeader")
                .map_err(|e| io_error(e, "tar header", path))?;
            ph.set_mode(0o644);
            ph.set_uid(0);
            ph.set_gid(0);
            ph.set_mtime(0);
            ph.set_size(records.len() as u64);
            ph.set_cksum();
            self.builder
                .append(&ph, records.as_slice())
                .map_err(|e| io_error(e, "write", path))?;
        }
        h.set_cksum();
        self.builder
            .append(&h, data)
            .map_err(|e| io_error(e, "write", path))
    }
}

/// A ustar header with the fields every entry of `stat` has.
fn base_header(entry_type: EntryType, st: &FileStat) -> Header {
    let mut h = Header::new_ustar();
    h.set_entry_type(entry_type);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(st.st_uid.into());
    h.set_gid(st.st_gid.into());
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_size(0);
    if !matches!(entry_type, EntryType::Char | EntryType::Block) {
        // ustar wants them as numbers (zero) rather than empty.
        let _ = h.set_device_major(0);
        let _ = h.set_device_minor(0);
    }
    h
}

/// The xattrs of `name` in `dir` that belong in a layer, sorted by name.
fn xattrs(dir: std::os::fd::BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let target = XattrTarget::Entry(dir, name);
    let names = match sys::list_xattr(target) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for key in names.split(|b| *b == 0).filter(|k| !k.is_empty()) {
        if marker::is_private_xattr(key) {
            continue;
        }
        let ckey = CString::new(key).map_err(|_| io::Error::from(Errno::EINVAL))?;
        if let Some(value) = sys::get_xattr(target, &ckey)? {
            out.push((key.to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}
