//! Name resolution across layers: which layer a name comes from, and which
//! layers make up a merged directory. Pure policy over the layer descriptors;
//! no caching here.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::fstatat;

use super::attr::{Attr, FileKind};
use super::dirfd::Origin;
use super::error::{Error, Result, SysContext};
use super::layer::{Layer, open_beneath};
use super::marker::{self, OciName, Redirect};
use super::node::{DirLayer, DirStack};

/// What one layer's directory says about a name.
#[derive(Debug)]
pub enum Probe {
    Missing,
    /// A whiteout: the name does not exist here or in any layer below.
    Whiteout,
    Entry(Attr),
}

/// The longest name a layer's filesystem can hold.
const NAME_MAX: usize = 255;

/// Whether `name`, which may come from a redirect, can be looked up in a
/// directory of a layer: `Ok(false)` when it is too long for any entry to
/// have it. Kernel overlayfs looks redirect names up with lookup_one(),
/// which refuses the empty name, `.` and `..` (EACCES), and takes a name the
/// layer's filesystem finds too long as missing there. Checked before every
/// probe, so no name ever leads outside the directory it is looked up in.
pub fn lookup_name(name: &OsStr) -> Result<bool> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(Error::new(Errno::EACCES, "lookup(redirect name)"));
    }
    Ok(bytes.len() <= NAME_MAX)
}

pub fn probe(dl: &DirLayer, name: &OsStr) -> Result<Probe> {
    if !lookup_name(name).map_err(|e| e.with_layer(dl.layer))? {
        return Ok(Probe::Missing);
    }
    if marker::oci_name(name) != OciName::Plain {
        // OCI markers are instructions, never entries of the merged view.
        return Ok(Probe::Missing);
    }
    match fstatat(dl.fd()?.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
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
    if dl.holds_xwhiteouts() && attr.kind() == FileKind::Regular && attr.size == 0 {
        return marker::is_xattr_whiteout(dl.fd()?.as_fd(), name);
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
/// Its descriptor may be closed, and found again from its parent.
pub fn open_dir_layer(layers: &[Layer], parent: &Arc<DirLayer>, name: &OsStr) -> Result<DirLayer> {
    let fd = open_beneath(
        parent.fd()?.as_fd(),
        name,
        OFlag::O_PATH | OFlag::O_DIRECTORY,
    )
    .sys("openat2(dir)")
    .map_err(|e| e.with_layer(parent.layer))?;
    let upper = layers[parent.layer].upper;
    let marks = marker::read_dir_marks(std::os::fd::AsFd::as_fd(&fd), true)
        .map_err(|e| e.with_layer(parent.layer))?;
    let origin = Origin::Child {
        parent: parent.clone(),
        name: name.to_os_string(),
    };
    Ok(DirLayer::with_origin(
        parent.layer,
        fd,
        marks,
        upper,
        origin,
    ))
}

/// Where the remaining layers keep the directory being resolved: under its
/// name (or a relative redirect) in the parent's copies, or, after an
/// absolute redirect, at a path (its components) from each layer's root.
enum Target {
    Name(OsString),
    FromRoot(Vec<OsString>),
}

/// The directory `parts` leads to from `root`, one checked component at a
/// time, never across a symlink; None when the layer has no such directory.
fn walk_beneath(root: BorrowedFd<'_>, parts: &[OsString]) -> Result<Option<OwnedFd>> {
    let mut dir = open_beneath(root, OsStr::new("."), OFlag::O_PATH | OFlag::O_DIRECTORY)
        .sys("openat2(redirect)")?;
    for part in parts {
        if !lookup_name(part)? {
            return Ok(None);
        }
        dir = match open_beneath(dir.as_fd(), part, OFlag::O_PATH | OFlag::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::ENAMETOOLONG) => {
                return Ok(None);
            }
            Err(e) => return Err(e).sys("openat2(redirect)"),
        };
    }
    Ok(Some(dir))
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
        Target::FromRoot(parts) => {
            let Some((file_name, dirs)) = parts.split_last() else {
                return Ok(None);
            };
            for layer in layers.iter().skip(from_layer) {
                let ctx = |e: Error| e.with_layer(layer.index);
                let Some(fd) = walk_beneath(layer.root(), dirs).map_err(ctx)? else {
                    continue;
                };
                let marks = marker::read_dir_marks(fd.as_fd(), true).map_err(ctx)?;
                let dl = if layer.upper {
                    DirLayer::new(layer.index, fd, marks, true)
                } else {
                    let origin = Origin::FromRoot {
                        root: layer.root.clone(),
                        parts: dirs.to_vec(),
                    };
                    DirLayer::with_origin(layer.index, fd, marks, false, origin)
                };
                return Ok(Some((Arc::new(dl), file_name.clone())));
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
        // redirect_dir: the layers below keep this directory elsewhere. As
        // on kernel overlayfs, a redirect nothing would follow (on an opaque
        // directory, or in the bottom layer) is not even read.
        let followed = !opaque && dl.layer + 1 < layers.len();
        if let (true, Some(redirect)) = (followed, &child.marks.redirect) {
            target = match redirect {
                Redirect::Name(name) => Target::Name(name.clone()),
                Redirect::Path(parts) => Target::FromRoot(parts.clone()),
                Redirect::Malformed(value) => {
                    tracing::debug!(?value, layer = dl.layer, "malformed redirect");
                    return Err(Error::new(Errno::EINVAL, "read redirect").with_layer(dl.layer));
                }
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
        let marks = marker::read_dir_marks(std::os::fd::AsFd::as_fd(&fd), true)
            .map_err(|e| e.with_layer(layer.index).with_path(&layer.path))?;
        let opaque = marks.opaque;
        stack
            .layers
            .push(Arc::new(DirLayer::new(layer.index, fd, marks, layer.upper)));
        if opaque {
            break;
        }
    }
    Ok(stack)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;
    use crate::overlay::ino::ROOT_ID;
    use crate::overlay::{Overlay, OverlayConfig};
    use crate::sys::{XattrTarget, set_xattr};

    #[test]
    fn redirect_names_are_single_components_inside_the_directory() {
        for refused in ["", ".", "..", "a/b", "/"] {
            assert_eq!(
                lookup_name(OsStr::new(refused)).unwrap_err().errno(),
                Errno::EACCES,
                "{refused:?}"
            );
        }
        assert!(lookup_name(OsStr::new("x")).unwrap());
        assert!(lookup_name(OsStr::new("...")).unwrap());
        assert!(lookup_name(OsStr::new(&"a".repeat(255))).unwrap());
        assert!(!lookup_name(OsStr::new(&"a".repeat(256))).unwrap());
    }

    fn write(path: &Path, data: &[u8]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, data).unwrap();
    }

    fn set(path: &Path, name: &std::ffi::CStr, value: &[u8]) {
        let dir = fs::File::open(path).unwrap();
        set_xattr(XattrTarget::Fd(dir.as_fd()), name, value, 0).unwrap();
    }

    /// `<t>/layers/{u,l1,l2}`: root entries `a`, `bad` (with `redirect` in
    /// l1) over `bad` in l2, and `x` and `etc` in l2.
    fn build(t: &Path, redirect: &[u8]) -> std::path::PathBuf {
        let layers = t.join("layers");
        let (l1, l2) = (layers.join("l1"), layers.join("l2"));
        fs::create_dir_all(layers.join("u")).unwrap();
        fs::create_dir_all(layers.join("work")).unwrap();
        write(&l1.join("a/f"), b"");
        write(&l1.join("bad/top"), b"");
        write(&l2.join("bad/below"), b"");
        write(&l2.join("x/in-x"), b"");
        write(&l2.join("etc/in-etc"), b"");
        set(&l1.join("bad"), c"trusted.overlay.redirect", redirect);
        layers
    }

    fn mount(layers: &Path) -> Overlay {
        Overlay::new(&OverlayConfig {
            lowers: vec![layers.join("l1"), layers.join("l2")],
            upper: Some(layers.join("u")),
            work: Some(layers.join("work")),
            volatile: false,
            ..Default::default()
        })
        .unwrap()
    }

    /// A directory's entries, or the errno of its lookup.
    type Shown = std::result::Result<Vec<String>, Errno>;

    fn lookup(ov: &Overlay, path: &str) -> Shown {
        let mut id = ROOT_ID;
        for part in path.split('/') {
            id = ov.lookup(id, OsStr::new(part)).map_err(|e| e.errno())?.0.id;
        }
        let node = ov.node(id).unwrap();
        let mut names: Vec<String> = ov
            .merged_entries(&node)
            .unwrap()
            .into_iter()
            .map(|e| e.name.into_string().unwrap())
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        Ok(names)
    }

    #[test]
    fn a_bad_redirect_fails_its_directory_alone_with_the_kernels_errno() {
        let names = |names: &[&str]| Ok(names.iter().map(|n| n.to_string()).collect());
        let cases: [(&[u8], Shown); 11] = [
            (b"/../x", Err(Errno::EACCES)),
            (b"//etc", Err(Errno::EINVAL)),
            (b"/etc/", Err(Errno::EINVAL)),
            (b"", Err(Errno::EINVAL)),
            (b"..", Err(Errno::EACCES)),
            (b".", Err(Errno::EACCES)),
            (b"../x", Err(Errno::EINVAL)),
            // The kernel walks an absolute redirect component by component:
            // a `..` after a missing component is never reached.
            (b"/missing/../x", names(&["top"])),
            (b"/x/../x", Err(Errno::EACCES)),
            // Too long for any entry: nothing below, the directory's own
            // layer only.
            (&[b'a'; 3000], names(&["top"])),
            (b"x", names(&["in-x", "top"])),
        ];
        for (redirect, expected) in cases {
            let t = tempfile::tempdir().unwrap();
            let ov = mount(&build(t.path(), redirect));
            let shown = String::from_utf8_lossy(redirect);
            assert_eq!(lookup(&ov, "bad"), expected, "{shown}");
            // The listing and the siblings never suffer.
            assert_eq!(lookup(&ov, "a"), Ok(vec!["f".to_string()]), "{shown}");
            let root = ov.node(ROOT_ID).unwrap();
            let listed: Vec<_> = ov.merged_entries(&root).unwrap();
            assert!(listed.iter().any(|e| e.name == "bad"), "{shown}");
        }
    }

    #[test]
    fn redirects_nothing_follows_are_not_read() {
        let t = tempfile::tempdir().unwrap();
        let layers = build(t.path(), b"x");
        // In the bottom layer, or on an opaque directory, a redirect leads
        // nowhere: kernel overlayfs does not read it, and neither may a bad
        // one fail the lookup.
        fs::create_dir_all(layers.join("l2/bottom")).unwrap();
        set(
            &layers.join("l2/bottom"),
            c"trusted.overlay.redirect",
            b"//etc",
        );
        write(&layers.join("l1/opaque/f"), b"");
        set(
            &layers.join("l1/opaque"),
            c"trusted.overlay.redirect",
            b"//etc",
        );
        set(&layers.join("l1/opaque"), c"trusted.overlay.opaque", b"y");
        // `..` names nothing while no layer below has the parent.
        write(&layers.join("l1/p/q/f"), b"");
        set(&layers.join("l1/p/q"), c"trusted.overlay.redirect", b"..");
        let ov = mount(&layers);
        assert_eq!(lookup(&ov, "bottom"), Ok(vec![]));
        assert_eq!(lookup(&ov, "opaque"), Ok(vec!["f".to_string()]));
        assert_eq!(lookup(&ov, "p/q"), Ok(vec!["f".to_string()]));
    }

    #[test]
    fn an_upper_directory_with_a_bad_redirect_still_lists() {
        let t = tempfile::tempdir().unwrap();
        let layers = build(t.path(), b"x");
        fs::create_dir_all(layers.join("u/moved")).unwrap();
        set(
            &layers.join("u/moved"),
            c"trusted.overlay.redirect",
            b"/../etc",
        );
        let ov = mount(&layers);
        // The listing resolves upper directories for their inode numbers.
        assert_eq!(lookup(&ov, "moved"), Err(Errno::EACCES));
        let root = ov.node(ROOT_ID).unwrap();
        let listed = ov.merged_entries(&root).unwrap();
        assert!(listed.iter().any(|e| e.name == "moved"));
    }
}
