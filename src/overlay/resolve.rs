//! Name resolution across layers: which layer a name comes from, and which
//! layers make up a merged directory. Pure policy over the layer descriptors;
//! no caching here.

use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::fstatat;

use super::attr::{Attr, FileKind};
use super::error::{Error, Result, SysContext};
use super::layer::{Layer, open_beneath};
use super::marker::{self, OciName};
use super::node::{DirLayer, DirStack};

/// What one layer's directory says about a name.
#[derive(Debug)]
pub enum Probe {
    Missing,
    /// A whiteout: the name does not exist here or in any layer below.
    Whiteout,
    Entry(Attr),
}

pub fn probe(dl: &DirLayer, name: &OsStr) -> Result<Probe> {
    if dl.oci && marker::oci_name(name) != OciName::Plain {
        // OCI markers are instructions, never entries of the merged view.
        return Ok(Probe::Missing);
    }
    match fstatat(dl.fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => {
            let attr = Attr::from_stat(&st);
            if is_whiteout(dl, name, &attr)? {
                Ok(Probe::Whiteout)
            } else {
                Ok(Probe::Entry(attr))
            }
        }
        Err(Errno::ENOENT) => {
            if dl.oci_hides(name)? {
                Ok(Probe::Whiteout)
            } else {
                Ok(Probe::Missing)
            }
        }
        Err(e) => Err(e).sys("fstatat"),
    }
    .map_err(|e| e.with_layer(dl.layer))
}

/// Whether an existing entry of `dl` is a kernel-format whiteout.
pub fn is_whiteout(dl: &DirLayer, name: &OsStr, attr: &Attr) -> Result<bool> {
    if marker::is_chardev_whiteout(attr) {
        return Ok(true);
    }
    if dl.marks.xwhiteouts && attr.kind() == FileKind::Regular && attr.size == 0 {
        return marker::is_xattr_whiteout(dl.fd(), name);
    }
    Ok(false)
}

/// A name resolved in a merged directory.
#[derive(Debug)]
pub struct Resolved {
    /// The topmost layer holding the name.
    pub layer: usize,
    /// The backing object's own attributes, from that layer.
    pub attr: Attr,
    /// The object whose inode number the merged object takes: the object
    /// itself, or for a merged directory its topmost lower-layer directory
    /// (as kernel overlayfs reports it).
    pub origin: (u64, u64),
    pub dir: Option<DirStack>,
}

/// Opens one layer's copy of a directory and reads its markers.
pub fn open_dir_layer(layers: &[Layer], parent: &DirLayer, name: &OsStr) -> Result<DirLayer> {
    let fd = open_beneath(parent.fd(), name, OFlag::O_PATH | OFlag::O_DIRECTORY)
        .sys("openat2(dir)")
        .map_err(|e| e.with_layer(parent.layer))?;
    let oci = !layers[parent.layer].upper;
    let marks = marker::read_dir_marks(std::os::fd::AsFd::as_fd(&fd), oci)
        .map_err(|e| e.with_layer(parent.layer))?;
    Ok(DirLayer::new(parent.layer, fd, marks, oci))
}

/// Where the remaining layers keep the directory being resolved: under its
/// name (or a relative redirect) in the parent's copies, or, after an
/// absolute redirect, at a path from each layer's root.
enum Target {
    Name(OsString),
    FromRoot(PathBuf),
}

/// The next place to look: a directory of one layer and the name in it.
fn next_place(
    layers: &[Layer],
    parent: &DirStack,
    target: &Target,
    from_layer: usize,
) -> Result<Option<(Arc<DirLayer>, OsString)>> {
    match target {
        Target::Name(name) => Ok(parent
            .layers
            .iter()
            .find(|d| d.layer >= from_layer)
            .map(|d| (d.clone(), name.clone()))),
        Target::FromRoot(path) => {
            let Some(file_name) = path.file_name() else {
                return Ok(None);
            };
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            for layer in layers.iter().skip(from_layer) {
                match open_beneath(
                    layer.root(),
                    dir.as_os_str(),
                    OFlag::O_PATH | OFlag::O_DIRECTORY,
                ) {
                    Ok(fd) => {
                        let marks = marker::read_dir_marks(fd.as_fd(), !layer.upper)
                            .map_err(|e| e.with_layer(layer.index))?;
                        let dl = DirLayer::new(layer.index, fd, marks, !layer.upper);
                        return Ok(Some((Arc::new(dl), file_name.to_os_string())));
                    }
                    Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => continue,
                    Err(e) => {
                        return Err(Error::new(e, "openat2(redirect)")
                            .with_layer(layer.index)
                            .with_path(path));
                    }
                }
            }
            Ok(None)
        }
    }
}

pub fn resolve_child(
    layers: &[Layer],
    parent: &DirStack,
    name: &OsStr,
) -> Result<Option<Resolved>> {
    let mut found: Option<Resolved> = None;
    let mut target = Target::Name(name.to_os_string());
    let mut from_layer = 0;
    while let Some((dl, lookup)) = next_place(layers, parent, &target, from_layer)? {
        from_layer = dl.layer + 1;
        let attr = match probe(&dl, &lookup)? {
            Probe::Missing => continue,
            Probe::Whiteout => break,
            Probe::Entry(attr) => attr,
        };
        let is_dir = attr.is_dir();
        let resolved = match &mut found {
            None => found.insert(Resolved {
                layer: dl.layer,
                attr,
                origin: (attr.dev, attr.ino),
                dir: is_dir.then(|| DirStack { layers: Vec::new() }),
            }),
            Some(resolved) => {
                if !is_dir {
                    // A non-directory below a directory is hidden, and so
                    // is everything under it.
                    break;
                }
                resolved
            }
        };
        let Some(stack) = resolved.dir.as_mut() else {
            break;
        };
        let child = open_dir_layer(layers, &dl, &lookup)?;
        let opaque = child.marks.opaque;
        if let Some(redirect) = &child.marks.redirect {
            // redirect_dir: the layers below keep this directory elsewhere.
            target = match redirect.as_bytes().strip_prefix(b"/") {
                Some(path) => Target::FromRoot(PathBuf::from(OsStr::from_bytes(path))),
                None => Target::Name(redirect.clone()),
            };
        }
        if !layers[dl.layer].upper && stack.layers.iter().all(|l| layers[l.layer].upper) {
            resolved.origin = (attr.dev, attr.ino);
        }
        stack.layers.push(Arc::new(child));
        if opaque {
            break;
        }
    }
    Ok(found)
}

/// The stack of the merged root: every layer's root down to the first opaque one.
pub fn root_stack(layers: &[Layer]) -> Result<DirStack> {
    let mut stack = DirStack { layers: Vec::new() };
    for layer in layers {
        let fd = open_beneath(
            layer.root(),
            OsStr::new("."),
            OFlag::O_PATH | OFlag::O_DIRECTORY,
        )
        .sys("open layer root")
        .map_err(|e| e.with_layer(layer.index).with_path(&layer.path))?;
        let marks = marker::read_dir_marks(std::os::fd::AsFd::as_fd(&fd), !layer.upper)
            .map_err(|e| e.with_layer(layer.index).with_path(&layer.path))?;
        let opaque = marks.opaque;
        stack.layers.push(Arc::new(DirLayer::new(
            layer.index,
            fd,
            marks,
            !layer.upper,
        )));
        if opaque {
            break;
        }
    }
    Ok(stack)
}
