//! Unit tests of the core's namespace and attribute operations, without
//! FUSE: each runs one operation of the write path through `Overlay` on
//! temporary layers and checks both what it left in the upper, in kernel
//! overlayfs' format (0/0 character device whiteouts,
//! `trusted.overlay.opaque` = "y", `trusted.overlay.redirect`), and the
//! merged view the core then gives. Lower layers must never change, and the
//! work dir must be empty once an operation is over.
//!
//! They need root (trusted.* xattrs, mknod of whiteouts, chown), as the
//! other unit tests of the core do.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::attr::Attr;
use super::error::Result;
use super::idmap::{IdMap, IdShift, Squash};
use super::ino::ROOT_ID;
use super::test_layers::write;
use super::write::{Caller, NewObject, RenameMode, SetAttr, SetTime};
use super::{Overlay, OverlayConfig};
use crate::sys::{self, XattrTarget};

/// Who creates objects in these tests: not the daemon's own user, so that
/// ownership shows whether it was applied.
const CALLER: Caller = Caller {
    uid: 1234,
    gid: 5678,
    pid: 0,
    umask: 0o022,
};

/// A lower layer and an empty upper (with its work dir) in a temporary
/// directory. Lay the lower (and, where a test needs it, the upper) out
/// before `overlay`.
struct Layers {
    _tmp: tempfile::TempDir,
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
}

impl Layers {
    fn new() -> Layers {
        let tmp = tempfile::tempdir().unwrap();
        let (lower, upper, work) = (
            tmp.path().join("lower"),
            tmp.path().join("upper"),
            tmp.path().join("work"),
        );
        for dir in [&lower, &upper, &work] {
            fs::create_dir(dir).unwrap();
        }
        Layers {
            _tmp: tmp,
            lower,
            upper,
            work,
        }
    }

    /// The core on these layers. The work dir is locked while it lives:
    /// drop it before making another.
    fn overlay(&self) -> Overlay {
        self.overlay_with(OverlayConfig::default())
    }

    /// The core writing the upper in the `userxattr` format, or not.
    fn userxattr_overlay(&self, userxattr: bool) -> Overlay {
        self.overlay_with(OverlayConfig {
            userxattr,
            ..Default::default()
        })
    }

    /// The core on these layers with `options` (its layers are replaced).
    fn overlay_with(&self, options: OverlayConfig) -> Overlay {
        Overlay::new(&OverlayConfig {
            lowers: vec![self.lower.clone()],
            upper: Some(self.upper.clone()),
            work: Some(self.work.clone()),
            ..options
        })
        .unwrap()
    }

    fn lower(&self, rel: &str) -> PathBuf {
        self.lower.join(rel)
    }

    fn upper(&self, rel: &str) -> PathBuf {
        self.upper.join(rel)
    }

    /// What is left in `<work>/work`.
    fn work_entries(&self) -> Vec<OsString> {
        fs::read_dir(self.work.join("work"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    }
}

fn mkdir(path: &Path) {
    fs::create_dir_all(path).unwrap();
}

/// A kernel overlayfs whiteout: a character device 0/0.
fn make_whiteout(path: &Path) {
    nix::sys::stat::mknod(path, nix::sys::stat::SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
}

fn is_whiteout(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn is_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// The xattr `name` of `path` itself (never following a symlink).
fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let dir = nix::fcntl::open(
        path.parent().unwrap(),
        OFlag::O_PATH | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
    .unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    sys::get_xattr(
        XattrTarget::Entry(dir.as_fd(), path.file_name().unwrap()),
        &name,
    )
    .unwrap()
}

fn opaque(path: &Path) -> Option<Vec<u8>> {
    xattr(path, "trusted.overlay.opaque")
}

fn redirect(path: &Path) -> Option<Vec<u8>> {
    xattr(path, "trusted.overlay.redirect")
}

/// Names in a directory of a layer, sorted.
fn on_disk(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Every object under a layer with its type, mode, owner, size, times and
/// content: equal before and after an operation when the layer was left
/// alone.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let m = fs::symlink_metadata(&path).unwrap();
        let content = if m.is_file() {
            format!("{:?}", fs::read(&path).unwrap())
        } else {
            String::new()
        };
        out.insert(
            rel.clone(),
            format!(
                "{:o} {}:{} {} m{}.{} c{}.{} {content}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec()
            ),
        );
        if m.is_dir() {
            for e in fs::read_dir(&path).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    out
}

/// Looks `path` up from the root, one component at a time ("" is the root).
fn lookup(ov: &Overlay, path: &str) -> Result<(u64, Attr)> {
    let mut found = (ROOT_ID, ov.getattr(ROOT_ID)?);
    for part in path.split('/').filter(|p| !p.is_empty()) {
        let (node, attr) = ov.lookup(found.0, OsStr::new(part))?;
        found = (node.id, attr);
    }
    Ok(found)
}

fn id(ov: &Overlay, path: &str) -> u64 {
    lookup(ov, path)
        .unwrap_or_else(|e| panic!("lookup {path:?}: {e}"))
        .0
}

fn lookup_errno(ov: &Overlay, path: &str) -> Errno {
    match lookup(ov, path) {
        Ok(_) => panic!("{path:?} is still in the merged view"),
        Err(e) => e.errno(),
    }
}

/// The merged listing of a directory, without "." and "..", sorted.
fn listing(ov: &Overlay, path: &str) -> Vec<String> {
    let mut names: Vec<String> = ov
        .listing(id(ov, path), 0)
        .unwrap()
        .after(0)
        .iter()
        .map(|l| l.entry.name.clone().into_string().unwrap())
        .filter(|n| n != "." && n != "..")
        .collect();
    names.sort();
    names
}

/// A file's content in the merged view.
fn read(ov: &Overlay, path: &str) -> Vec<u8> {
    let (fh, _) = ov.open(id(ov, path), libc::O_RDONLY, None).unwrap();
    let mut buf = Vec::new();
    ov.read_into(fh, 0, 1 << 16, &mut buf).unwrap();
    ov.release(fh);
    buf
}

fn new_file() -> NewObject<'static> {
    NewObject::File {
        mode: libc::S_IFREG | 0o666,
        flags: libc::O_WRONLY | libc::O_CREAT,
    }
}

fn new_dir() -> NewObject<'static> {
    NewObject::Dir { mode: 0o777 }
}

/// Creates `name` in `parent` and drops the open handle a file comes with.
fn create(ov: &Overlay, parent: &str, name: &str, object: NewObject<'_>) -> Attr {
    let created = ov
        .create(id(ov, parent), OsStr::new(name), object, CALLER)
        .unwrap_or_else(|e| panic!("create {parent}/{name}: {e}"));
    if let Some((fh, _)) = created.handle {
        ov.release(fh);
    }
    created.attr
}

fn remove(ov: &Overlay, parent: &str, name: &str, dir: bool) -> Result<()> {
    ov.remove(id(ov, parent), OsStr::new(name), dir)
}

fn rename(
    ov: &Overlay,
    (parent, name): (&str, &str),
    (new_parent, new_name): (&str, &str),
    mode: RenameMode,
) -> Result<()> {
    ov.rename(
        id(ov, parent),
        OsStr::new(name),
        id(ov, new_parent),
        OsStr::new(new_name),
        mode,
    )
}

/// A reader resumes by offset alone, in whatever listing is current: every
/// name that stayed is listed once across changes, and offset 0 (a new
/// reader, rewinddir) sees them.
#[test]
fn a_listing_read_in_parts_across_changes_lists_each_name_that_stayed_once() {
    let l = Layers::new();
    for i in 0..200 {
        write(&l.lower(&format!("d/l{i:03}")), b"");
    }
    let ov = l.overlay();
    let d = id(&ov, "d");
    let names = |listed: &[super::listing::Listed]| -> Vec<String> {
        listed
            .iter()
            .map(|l| l.entry.name.clone().into_string().unwrap())
            .collect()
    };
    let first = ov.listing(d, 0).unwrap();
    let part = &first.after(0)[..80];
    let resume = part.last().unwrap().offset;
    let mut seen = names(part);
    // Names already listed and names not yet listed go; new ones come.
    let gone: Vec<String> = (0..200)
        .map(|i| format!("l{i:03}"))
        .filter(|n| seen.contains(n))
        .step_by(4)
        .chain(
            (0..200)
                .map(|i| format!("l{i:03}"))
                .filter(|n| !seen.contains(n))
                .step_by(6),
        )
        .collect();
    for name in &gone {
        remove(&ov, "d", name, false).unwrap();
    }
    for i in 0..50 {
        create(&ov, "d", &format!("n{i}"), new_file());
    }
    // Another reader starts: the first goes on in the listing it took.
    let second = ov.listing(d, 0).unwrap();
    let continued = ov.listing(d, resume).unwrap();
    assert!(Arc::ptr_eq(&second, &continued));
    seen.extend(names(continued.after(resume)));
    let unique: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a name listed twice");
    let stayed: Vec<String> = (0..200)
        .map(|i| format!("l{i:03}"))
        .filter(|n| !gone.contains(n))
        .collect();
    for name in &stayed {
        assert!(unique.contains(name), "{name} skipped");
    }
    let mut fresh = listing(&ov, "d");
    let mut expected: Vec<String> = stayed
        .into_iter()
        .chain((0..50).map(|i| format!("n{i}")))
        .collect();
    fresh.sort();
    expected.sort();
    assert_eq!(fresh, expected, "offset 0 lists the directory as it is now");
}

#[test]
fn create_in_a_lower_dir_copies_the_parent_up_and_belongs_to_the_caller() {
    let l = Layers::new();
    write(&l.lower("d/old"), b"old");
    fs::set_permissions(l.lower("d"), fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::lchown(l.lower("d"), Some(42), Some(43)).unwrap();
    let lower = tree(&l.lower);
    let ov = l.overlay();

    let attr = create(&ov, "d", "new", new_file());

    // The parent is copied up as it was: owner and mode of the lower copy,
    // and still merged with it (not opaque).
    let d = fs::symlink_metadata(l.upper("d")).unwrap();
    assert!(d.is_dir());
    assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (42, 43, 0o750));
    assert_eq!(opaque(&l.upper("d")), None);
    // The new file is the caller's, with the umask applied.
    let f = fs::symlink_metadata(l.upper("d/new")).unwrap();
    assert!(f.is_file());
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (1234, 5678, 0o644));
    assert_eq!(on_disk(&l.upper("d")), ["new"]);
    assert_eq!(
        (attr.uid, attr.gid, attr.mode & 0o7777),
        (1234, 5678, 0o644)
    );

    assert_eq!(listing(&ov, "d"), ["new", "old"]);
    assert_eq!(lookup(&ov, "d/new").unwrap().1.uid, 1234);
    assert_eq!(read(&ov, "d/old"), b"old");
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

#[test]
fn create_over_a_whiteout_replaces_it_and_a_directory_is_opaque() {
    let l = Layers::new();
    write(&l.lower("f"), b"lower file");
    write(&l.lower("d/secret"), b"deleted lower content");
    make_whiteout(&l.upper("f"));
    make_whiteout(&l.upper("d"));
    let lower = tree(&l.lower);
    let ov = l.overlay();
    assert_eq!(lookup_errno(&ov, "f"), Errno::ENOENT);

    create(&ov, "", "f", new_file());
    create(&ov, "", "d", new_dir());

    let f = fs::symlink_metadata(l.upper("f")).unwrap();
    assert!(f.is_file(), "the whiteout is gone");
    assert_eq!((f.size(), f.uid(), f.gid()), (0, 1234, 5678));
    assert_eq!(opaque(&l.upper("f")), None);
    let d = fs::symlink_metadata(l.upper("d")).unwrap();
    assert!(d.is_dir());
    assert_eq!((d.uid(), d.mode() & 0o7777), (1234, 0o755));
    assert_eq!(opaque(&l.upper("d")).as_deref(), Some(&b"y"[..]));
    assert!(on_disk(&l.upper("d")).is_empty());

    assert_eq!(read(&ov, "f"), b"", "the new file, not the lower one");
    assert!(listing(&ov, "d").is_empty(), "lower d/secret shows");
    assert_eq!(lookup_errno(&ov, "d/secret"), Errno::ENOENT);
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

#[test]
fn mkdir_in_a_merged_dir_is_opaque_and_in_an_upper_only_dir_is_not() {
    let l = Layers::new();
    write(&l.lower("d/x"), b"");
    let lower = tree(&l.lower);
    let ov = l.overlay();

    create(&ov, "d", "sub", new_dir());
    create(&ov, "d/sub", "inner", new_dir());

    assert!(is_dir(&l.upper("d/sub")));
    assert_eq!(opaque(&l.upper("d/sub")).as_deref(), Some(&b"y"[..]));
    assert_eq!(
        opaque(&l.upper("d")),
        None,
        "the copied-up parent stays merged"
    );
    assert!(is_dir(&l.upper("d/sub/inner")));
    assert_eq!(
        opaque(&l.upper("d/sub/inner")),
        None,
        "nothing below to hide"
    );
    assert_eq!(listing(&ov, "d"), ["sub", "x"]);
    assert_eq!(listing(&ov, "d/sub"), ["inner"]);
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

#[test]
fn unlink_of_a_lower_file_leaves_a_whiteout() {
    let l = Layers::new();
    write(&l.lower("d/f"), b"lower");
    write(&l.lower("d/g"), b"kept");
    let lower = tree(&l.lower);
    let ov = l.overlay();

    remove(&ov, "d", "f", false).unwrap();

    assert!(is_whiteout(&l.upper("d/f")));
    assert_eq!(on_disk(&l.upper("d")), ["f"]);
    assert_eq!(lookup_errno(&ov, "d/f"), Errno::ENOENT);
    assert_eq!(listing(&ov, "d"), ["g"]);
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

#[test]
fn unlink_of_an_upper_only_file_leaves_no_whiteout() {
    let l = Layers::new();
    write(&l.lower("d/g"), b"lower");
    write(&l.upper("only"), b"upper");
    let ov = l.overlay();
    create(&ov, "d", "made", new_file());
    assert!(exists(&l.upper("d/made")));

    remove(&ov, "", "only", false).unwrap();
    remove(&ov, "d", "made", false).unwrap();

    assert!(!exists(&l.upper("only")));
    assert!(!exists(&l.upper("d/made")));
    assert!(on_disk(&l.upper("d")).is_empty());
    assert_eq!(lookup_errno(&ov, "only"), Errno::ENOENT);
    assert_eq!(lookup_errno(&ov, "d/made"), Errno::ENOENT);
    assert_eq!(listing(&ov, "d"), ["g"]);
    assert!(l.work_entries().is_empty());
}

#[test]
fn rmdir_of_a_lower_dir_leaves_a_whiteout() {
    let l = Layers::new();
    mkdir(&l.lower("empty"));
    write(&l.lower("other"), b"");
    let lower = tree(&l.lower);
    let ov = l.overlay();

    remove(&ov, "", "empty", true).unwrap();

    assert!(is_whiteout(&l.upper("empty")));
    assert_eq!(lookup_errno(&ov, "empty"), Errno::ENOENT);
    assert_eq!(listing(&ov, ""), ["other"]);
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

#[test]
fn rmdir_of_an_upper_dir_shadowing_a_lower_one_leaves_a_whiteout() {
    let l = Layers::new();
    write(&l.lower("d/x"), b"");
    let lower = tree(&l.lower);
    let ov = l.overlay();
    // Empty in the merged view; on disk, an upper d holding a whiteout.
    remove(&ov, "d", "x", false).unwrap();
    assert!(is_whiteout(&l.upper("d/x")));
    assert_eq!(
        remove(&ov, "", "d", false).unwrap_err().errno(),
        Errno::EISDIR
    );

    remove(&ov, "", "d", true).unwrap();

    assert!(
        is_whiteout(&l.upper("d")),
        "the upper dir became a whiteout"
    );
    assert_eq!(lookup_errno(&ov, "d"), Errno::ENOENT);
    assert!(listing(&ov, "").is_empty());
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(
        l.work_entries().is_empty(),
        "the old dir and its whiteout were cleared"
    );
}

#[test]
fn rename_of_a_file_onto_a_lower_file_leaves_a_whiteout_at_the_old_name() {
    let l = Layers::new();
    write(&l.lower("a"), b"A");
    write(&l.lower("b"), b"B");
    let lower = tree(&l.lower);
    let ov = l.overlay();

    rename(&ov, ("", "a"), ("", "b"), RenameMode::Replace).unwrap();

    assert!(is_whiteout(&l.upper("a")));
    assert_eq!(fs::read(l.upper("b")).unwrap(), b"A");
    assert_eq!(lookup_errno(&ov, "a"), Errno::ENOENT);
    assert_eq!(read(&ov, "b"), b"A");
    assert_eq!(listing(&ov, ""), ["b"]);
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

#[test]
fn rename_of_a_lower_dir_to_another_parent_sets_an_absolute_redirect() {
    let l = Layers::new();
    write(&l.lower("src/dir/f"), b"F");
    mkdir(&l.lower("dst"));
    let lower = tree(&l.lower);
    let ov = l.overlay();

    rename(&ov, ("src", "dir"), ("dst", "moved"), RenameMode::Replace).unwrap();

    assert!(is_dir(&l.upper("dst/moved")));
    assert_eq!(
        redirect(&l.upper("dst/moved")).as_deref(),
        Some(&b"/src/dir"[..])
    );
    assert_eq!(opaque(&l.upper("dst/moved")), None, "merged, not opaque");
    assert!(is_whiteout(&l.upper("src/dir")));
    assert_eq!(lookup_errno(&ov, "src/dir"), Errno::ENOENT);
    assert_eq!(listing(&ov, "dst/moved"), ["f"]);
    assert_eq!(read(&ov, "dst/moved/f"), b"F");
    assert!(l.work_entries().is_empty());

    // A new mount finds the lower contents through the redirect.
    drop(ov);
    let ov = l.overlay();
    assert_eq!(listing(&ov, "dst/moved"), ["f"]);
    assert_eq!(read(&ov, "dst/moved/f"), b"F");
    assert!(listing(&ov, "src").is_empty());
    assert_eq!(tree(&l.lower), lower, "lower changed");
}

#[test]
fn rename_of_a_lower_dir_within_its_parent_sets_a_relative_redirect() {
    let l = Layers::new();
    write(&l.lower("p/old/f"), b"F");
    let lower = tree(&l.lower);
    let ov = l.overlay();

    rename(&ov, ("p", "old"), ("p", "new"), RenameMode::Replace).unwrap();

    assert!(is_dir(&l.upper("p/new")));
    assert_eq!(redirect(&l.upper("p/new")).as_deref(), Some(&b"old"[..]));
    assert_eq!(opaque(&l.upper("p/new")), None);
    assert!(is_whiteout(&l.upper("p/old")));
    assert_eq!(listing(&ov, "p"), ["new"]);
    assert_eq!(read(&ov, "p/new/f"), b"F");
    assert!(l.work_entries().is_empty());

    drop(ov);
    let ov = l.overlay();
    assert_eq!(listing(&ov, "p"), ["new"]);
    assert_eq!(read(&ov, "p/new/f"), b"F");
    assert_eq!(tree(&l.lower), lower, "lower changed");
}

#[test]
fn rename_of_a_dir_onto_a_whiteout_hides_the_deleted_lower_dir() {
    let l = Layers::new();
    write(&l.lower("target/secret"), b"deleted lower content");
    make_whiteout(&l.upper("target"));
    write(&l.upper("mine/m"), b"mine");
    let lower = tree(&l.lower);
    let ov = l.overlay();

    rename(&ov, ("", "mine"), ("", "target"), RenameMode::Replace).unwrap();

    assert!(is_dir(&l.upper("target")), "the directory is in place");
    assert_eq!(opaque(&l.upper("target")).as_deref(), Some(&b"y"[..]));
    assert_eq!(on_disk(&l.upper("target")), ["m"]);
    assert!(
        !exists(&l.upper("mine")),
        "nothing below has the old name: no whiteout"
    );
    assert_eq!(listing(&ov, ""), ["target"]);
    assert_eq!(listing(&ov, "target"), ["m"]);
    assert_eq!(lookup_errno(&ov, "target/secret"), Errno::ENOENT);
    assert!(l.work_entries().is_empty());

    drop(ov);
    let ov = l.overlay();
    assert_eq!(listing(&ov, "target"), ["m"]);
    assert_eq!(tree(&l.lower), lower, "lower changed");
}

#[test]
fn rename_of_a_dir_onto_an_empty_merged_dir_hides_the_deleted_lower_entries() {
    let l = Layers::new();
    write(&l.lower("target/old"), b"deleted lower content");
    write(&l.upper("mine/m"), b"mine");
    let lower = tree(&l.lower);
    let ov = l.overlay();
    // Empty in the merged view, but the upper copy holds a whiteout.
    remove(&ov, "target", "old", false).unwrap();
    assert!(is_whiteout(&l.upper("target/old")));
    assert!(listing(&ov, "target").is_empty());

    rename(&ov, ("", "mine"), ("", "target"), RenameMode::Replace).unwrap();

    assert!(is_dir(&l.upper("target")), "the directory is in place");
    assert_eq!(opaque(&l.upper("target")).as_deref(), Some(&b"y"[..]));
    assert_eq!(on_disk(&l.upper("target")), ["m"]);
    assert!(!exists(&l.upper("mine")));
    assert_eq!(listing(&ov, ""), ["target"]);
    assert_eq!(listing(&ov, "target"), ["m"]);
    assert_eq!(lookup_errno(&ov, "target/old"), Errno::ENOENT);
    assert!(
        l.work_entries().is_empty(),
        "the replaced dir and its whiteout were cleared"
    );

    drop(ov);
    let ov = l.overlay();
    assert_eq!(listing(&ov, "target"), ["m"]);
    assert_eq!(tree(&l.lower), lower, "lower changed");
}

#[test]
fn rename_noreplace_onto_an_existing_name_fails_with_eexist_and_copies_nothing() {
    let l = Layers::new();
    write(&l.lower("a"), b"A");
    write(&l.lower("b"), b"B");
    let ov = l.overlay();

    let err = rename(&ov, ("", "a"), ("", "b"), RenameMode::NoReplace).unwrap_err();

    assert_eq!(err.errno(), Errno::EEXIST);
    assert!(on_disk(&l.upper).is_empty(), "something was copied up");
    assert_eq!(read(&ov, "a"), b"A");
    assert_eq!(read(&ov, "b"), b"B");
    assert!(l.work_entries().is_empty());
}

#[test]
fn rename_exchange_of_a_lower_and_an_upper_file_swaps_them_in_the_upper() {
    let l = Layers::new();
    write(&l.lower("low"), b"L");
    write(&l.upper("up"), b"U");
    let lower = tree(&l.lower);
    let ov = l.overlay();

    rename(&ov, ("", "low"), ("", "up"), RenameMode::Exchange).unwrap();

    assert_eq!(fs::read(l.upper("low")).unwrap(), b"U");
    assert_eq!(fs::read(l.upper("up")).unwrap(), b"L");
    assert_eq!(on_disk(&l.upper), ["low", "up"], "no whiteouts");
    assert_eq!(read(&ov, "low"), b"U");
    assert_eq!(read(&ov, "up"), b"L");
    assert_eq!(listing(&ov, ""), ["low", "up"]);
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

#[test]
fn setattr_on_lower_files_copies_up_and_applies_the_values() {
    let l = Layers::new();
    for name in ["chmod", "chown", "truncate", "truncate0", "utimes"] {
        write(&l.lower(name), b"hello world");
        fs::set_permissions(l.lower(name), fs::Permissions::from_mode(0o644)).unwrap();
    }
    let lower = tree(&l.lower);
    let ov = l.overlay();
    let set = |name: &str, set: SetAttr| {
        ov.setattr(id(&ov, name), set, None)
            .unwrap_or_else(|e| panic!("setattr {name}: {e}"))
    };

    let attr = set(
        "chmod",
        SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        },
    );
    assert_eq!(attr.mode & 0o7777, 0o600);
    let m = fs::symlink_metadata(l.upper("chmod")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600);
    assert_eq!(fs::read(l.upper("chmod")).unwrap(), b"hello world");

    let attr = set(
        "chown",
        SetAttr {
            uid: Some(1234),
            gid: Some(5678),
            ..SetAttr::default()
        },
    );
    assert_eq!((attr.uid, attr.gid), (1234, 5678));
    let m = fs::symlink_metadata(l.upper("chown")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert_eq!(fs::read(l.upper("chown")).unwrap(), b"hello world");

    let attr = set(
        "truncate",
        SetAttr {
            size: Some(5),
            ..SetAttr::default()
        },
    );
    assert_eq!(attr.size, 5);
    assert_eq!(fs::read(l.upper("truncate")).unwrap(), b"hello");
    assert_eq!(read(&ov, "truncate"), b"hello");

    // Truncation to zero copies the metadata only.
    let attr = set(
        "truncate0",
        SetAttr {
            size: Some(0),
            ..SetAttr::default()
        },
    );
    assert_eq!(attr.size, 0);
    let m = fs::symlink_metadata(l.upper("truncate0")).unwrap();
    assert_eq!((m.size(), m.mode() & 0o7777), (0, 0o644));

    let attr = set(
        "utimes",
        SetAttr {
            atime: Some(SetTime::At(1_000_000_000, 123)),
            mtime: Some(SetTime::At(1_100_000_000, 456)),
            ..SetAttr::default()
        },
    );
    assert_eq!((attr.atime.sec, attr.atime.nsec), (1_000_000_000, 123));
    assert_eq!((attr.mtime.sec, attr.mtime.nsec), (1_100_000_000, 456));
    let m = fs::symlink_metadata(l.upper("utimes")).unwrap();
    assert_eq!((m.atime(), m.atime_nsec()), (1_000_000_000, 123));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_100_000_000, 456));
    assert_eq!(fs::read(l.upper("utimes")).unwrap(), b"hello world");

    assert_eq!(
        on_disk(&l.upper),
        ["chmod", "chown", "truncate", "truncate0", "utimes"]
    );
    for name in ["chmod", "chown", "truncate", "truncate0", "utimes"] {
        let (_, merged) = lookup(&ov, name).unwrap();
        let upper = fs::symlink_metadata(l.upper(name)).unwrap();
        assert_eq!(
            (merged.mode, merged.uid, merged.size, merged.mtime.sec),
            (upper.mode(), upper.uid(), upper.size(), upper.mtime()),
            "merged {name} is the upper copy"
        );
    }
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

#[test]
fn setxattr_on_a_lower_dir_copies_it_up() {
    let l = Layers::new();
    write(&l.lower("d/x"), b"");
    let lower = tree(&l.lower);
    let ov = l.overlay();
    let d = id(&ov, "d");

    ov.setxattr(d, OsStr::new("user.note"), b"value", 0)
        .unwrap();

    assert!(is_dir(&l.upper("d")));
    assert_eq!(
        xattr(&l.upper("d"), "user.note").as_deref(),
        Some(&b"value"[..])
    );
    assert_eq!(opaque(&l.upper("d")), None, "still merged");
    assert!(on_disk(&l.upper("d")).is_empty());
    assert_eq!(xattr(&l.lower("d"), "user.note"), None);
    assert_eq!(ov.getxattr(d, OsStr::new("user.note")).unwrap(), b"value");
    assert_eq!(listing(&ov, "d"), ["x"]);
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

#[test]
fn removexattr_of_a_missing_xattr_fails_with_enodata_and_copies_nothing() {
    let l = Layers::new();
    write(&l.lower("d/f"), b"");
    let ov = l.overlay();

    for path in ["d/f", "d"] {
        let err = ov
            .removexattr(id(&ov, path), OsStr::new("user.absent"))
            .unwrap_err();
        assert_eq!(err.errno(), Errno::ENODATA, "{path}");
    }

    assert!(on_disk(&l.upper).is_empty(), "something was copied up");
    assert!(l.work_entries().is_empty());
}

/// `uidmapping=0:100000:65536,gidmapping=0:200000:65536`.
fn shifted() -> OverlayConfig {
    OverlayConfig {
        ids: IdShift::new(
            IdMap::parse("0:100000:65536").unwrap(),
            IdMap::parse("0:200000:65536").unwrap(),
            Squash::default(),
            (65534, 65533),
        ),
        ..OverlayConfig::default()
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

#[test]
fn mapped_ids_are_shown_and_caller_ids_are_stored_shifted_down() {
    let l = Layers::new();
    write(&l.lower("d/f"), b"data");
    chown(&l.lower("d"), 1, 2);
    chown(&l.lower("d/f"), 1000, 70000);
    let lower = tree(&l.lower);
    let ov = l.overlay_with(shifted());

    let (_, d) = lookup(&ov, "d").unwrap();
    assert_eq!((d.uid, d.gid), (100001, 200002));
    let (f, attr) = lookup(&ov, "d/f").unwrap();
    assert_eq!((attr.uid, attr.gid), (101000, 65533), "unmapped gid");
    assert_eq!(
        ov.getattr(f).map(|a| (a.uid, a.gid)).unwrap(),
        (101000, 65533)
    );

    // The kernel's caller ids are the shown ones.
    let caller = Caller {
        uid: 100005,
        gid: 200006,
        ..CALLER
    };
    let created = ov
        .create(id(&ov, "d"), OsStr::new("new"), new_dir(), caller)
        .unwrap();
    assert_eq!((created.attr.uid, created.attr.gid), (100005, 200006));
    let m = fs::symlink_metadata(l.upper("d/new")).unwrap();
    assert_eq!((m.uid(), m.gid()), (5, 6));
    // Copy-up kept the stored owner of the parent.
    let m = fs::symlink_metadata(l.upper("d")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1, 2));

    let attr = ov
        .setattr(
            f,
            SetAttr {
                uid: Some(100007),
                gid: Some(200008),
                ..SetAttr::default()
            },
            None,
        )
        .unwrap();
    assert_eq!((attr.uid, attr.gid), (100007, 200008));
    let m = fs::symlink_metadata(l.upper("d/f")).unwrap();
    assert_eq!((m.uid(), m.gid()), (7, 8));

    // Ids no range covers are never stored.
    let outsider = Caller { uid: 5, ..caller };
    let err = ov
        .create(id(&ov, "d"), OsStr::new("no"), new_file(), outsider)
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.errno(), Errno::EOVERFLOW);
    assert!(!exists(&l.upper("d/no")));
    let err = ov
        .setattr(
            f,
            SetAttr {
                gid: Some(0),
                ..SetAttr::default()
            },
            None,
        )
        .unwrap_err();
    assert_eq!(err.errno(), Errno::EOVERFLOW);
    assert_eq!(fs::symlink_metadata(l.upper("d/f")).unwrap().gid(), 8);

    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

#[test]
fn acl_ids_are_stored_shifted_down_and_shown_shifted_up() {
    let l = Layers::new();
    write(&l.lower("f"), b"");
    let ov = l.overlay_with(shifted());
    let f = id(&ov, "f");
    // user::rw- user:100005:r-- group::r-- mask::r-- other::---
    let entry = |tag: u16, perm: u16, id: u32| {
        [
            &tag.to_le_bytes()[..],
            &perm.to_le_bytes(),
            &id.to_le_bytes(),
        ]
        .concat()
    };
    let acl = |user: u32| {
        [
            2u32.to_le_bytes().to_vec(),
            entry(0x01, 6, u32::MAX),
            entry(0x02, 4, user),
            entry(0x04, 4, u32::MAX),
            entry(0x10, 4, u32::MAX),
            entry(0x20, 0, u32::MAX),
        ]
        .concat()
    };
    let name = OsStr::new("system.posix_acl_access");
    ov.setxattr(f, name, &acl(100005), 0).unwrap();
    assert_eq!(
        xattr(&l.upper("f"), "system.posix_acl_access"),
        Some(acl(5))
    );
    assert_eq!(ov.getxattr(f, name).unwrap(), acl(100005));
    let err = ov.setxattr(f, name, &acl(5), 0).unwrap_err();
    assert_eq!(err.errno(), Errno::EINVAL);
    assert_eq!(
        xattr(&l.upper("f"), "system.posix_acl_access"),
        Some(acl(5))
    );
}

#[test]
fn squashing_shows_one_owner_and_stores_the_callers() {
    let l = Layers::new();
    write(&l.lower("f"), b"");
    chown(&l.lower("f"), 1, 2);
    let ov = l.overlay_with(OverlayConfig {
        ids: IdShift::new(
            IdMap::default(),
            IdMap::default(),
            Squash::new(true, None, Some(50)),
            (65534, 65534),
        ),
        ..OverlayConfig::default()
    });
    let (_, attr) = lookup(&ov, "f").unwrap();
    assert_eq!((attr.uid, attr.gid), (0, 50));
    let attr = create(&ov, "", "new", new_file());
    assert_eq!((attr.uid, attr.gid), (0, 50));
    let m = fs::symlink_metadata(l.upper("new")).unwrap();
    assert_eq!((m.uid(), m.gid()), (CALLER.uid, CALLER.gid));
}

#[test]
fn static_nlink_gives_every_directory_one_link() {
    let l = Layers::new();
    mkdir(&l.lower("d/sub1"));
    mkdir(&l.lower("d/sub2"));
    write(&l.lower("f"), b"");
    let plain = l.overlay();
    assert_eq!(lookup(&plain, "d").unwrap().1.nlink, 4);
    drop(plain);
    let ov = l.overlay_with(OverlayConfig {
        static_nlink: true,
        ..OverlayConfig::default()
    });
    assert_eq!(lookup(&ov, "d").unwrap().1.nlink, 1);
    assert_eq!(lookup(&ov, "d/sub1").unwrap().1.nlink, 1);
    assert_eq!(ov.getattr(ROOT_ID).unwrap().nlink, 1);
    assert_eq!(lookup(&ov, "f").unwrap().1.nlink, 1);
    assert_eq!(create(&ov, "d", "new", new_dir()).nlink, 1);
}

/// `setfacl -d -m u::rwx,g::rwx,o::rwx` as its xattr value: a default ACL
/// that overrides the umask.
fn default_acl_rwx() -> Vec<u8> {
    let entry = |tag: u16, perm: u16| {
        [
            &tag.to_le_bytes()[..],
            &perm.to_le_bytes(),
            &u32::MAX.to_le_bytes(),
        ]
        .concat()
    };
    [
        2u32.to_le_bytes().to_vec(),
        entry(0x01, 7),
        entry(0x04, 7),
        entry(0x20, 7),
    ]
    .concat()
}

#[test]
fn noacl_hides_acls_and_applies_the_umask() {
    let l = Layers::new();
    write(&l.lower("f"), b"");
    mkdir(&l.lower("d"));
    // setfacl -d -m u::rwx,g::rwx,o::rwx d: without noacl it overrides the umask.
    let default_acl = default_acl_rwx();
    sys::set_xattr(
        XattrTarget::Fd(fs::File::open(l.lower("d")).unwrap().as_fd()),
        c"system.posix_acl_default",
        &default_acl,
        0,
    )
    .unwrap();
    let ov = l.overlay_with(OverlayConfig {
        no_acl: true,
        ..OverlayConfig::default()
    });
    let (f, d) = (id(&ov, "f"), id(&ov, "d"));
    for name in ["system.posix_acl_access", "system.posix_acl_default"] {
        let name = OsStr::new(name);
        assert_eq!(ov.getxattr(d, name).unwrap_err().errno(), Errno::EOPNOTSUPP);
        assert_eq!(
            ov.setxattr(f, name, &default_acl, 0).unwrap_err().errno(),
            Errno::EOPNOTSUPP
        );
        assert_eq!(
            ov.removexattr(d, name).unwrap_err().errno(),
            Errno::EOPNOTSUPP
        );
    }
    assert!(
        !ov.listxattr(d)
            .unwrap()
            .split(|b| *b == 0)
            .any(|n| n.starts_with(b"system.posix_acl"))
    );
    // d is copied up by the create; the umask applies, not the default ACL.
    let attr = create(&ov, "d", "new", new_file());
    assert_eq!(attr.mode & 0o777, 0o644);
    assert!(
        on_disk(&l.upper).iter().all(|n| n == "d"),
        "nothing else copied up"
    );
}

#[test]
fn the_userxattr_format_marks_with_user_xattrs_and_keeps_merged_dirs_in_place() {
    let l = Layers::new();
    write(&l.lower("d/x"), b"");
    write(&l.lower("m/y"), b"");
    let lower = tree(&l.lower);
    let ov = l.userxattr_overlay(true);

    // Deleted and made again: opaque, in the user namespace only.
    remove(&ov, "d", "x", false).unwrap();
    remove(&ov, "", "d", true).unwrap();
    create(&ov, "", "d", new_dir());
    assert_eq!(
        xattr(&l.upper("d"), "user.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(opaque(&l.upper("d")), None);
    assert!(listing(&ov, "d").is_empty());
    // Made in a merged directory: no mark, as the kernel without redirects.
    create(&ov, "m", "new", new_dir());
    assert_eq!(xattr(&l.upper("m/new"), "user.overlay.opaque"), None);

    // A directory lower layers contribute to does not move; one only in
    // the upper does, and a file does.
    let err = rename(&ov, ("", "m"), ("", "m2"), RenameMode::Replace).unwrap_err();
    assert_eq!(err.errno(), Errno::EXDEV);
    rename(&ov, ("", "d"), ("", "d2"), RenameMode::Replace).unwrap();
    rename(&ov, ("m", "y"), ("", "y2"), RenameMode::Replace).unwrap();
    assert_eq!(listing(&ov, "m"), ["new"]);
    assert!(is_dir(&l.upper("d2")));
    assert_eq!(redirect(&l.upper("d2")), None);
    assert_eq!(xattr(&l.upper("d2"), "user.overlay.redirect"), None);
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

#[test]
fn xattr_whiteouts_where_whiteout_devices_are_refused() {
    let l = Layers::new();
    write(&l.lower("d/gone"), b"");
    write(&l.lower("d/kept"), b"");
    write(&l.lower("e/x"), b"");
    for userxattr in [false, true] {
        let _ = fs::remove_dir_all(&l.upper);
        mkdir(&l.upper);
        let mut ov = l.userxattr_overlay(userxattr);
        // As where mknod of a whiteout fails (the probe found it so).
        ov.format.whiteouts = super::format::WhiteoutForm::Xattr;
        let ns = if userxattr { "user" } else { "trusted" };

        remove(&ov, "d", "gone", false).unwrap();

        let whiteout = l.upper("d/gone");
        assert!(fs::symlink_metadata(&whiteout).unwrap().is_file());
        assert_eq!(fs::metadata(&whiteout).unwrap().len(), 0);
        assert!(xattr(&whiteout, &format!("{ns}.overlay.whiteout")).is_some());
        assert_eq!(
            xattr(&l.upper("d"), &format!("{ns}.overlay.opaque")).as_deref(),
            Some(&b"x"[..]),
            "its directory holds xattr whiteouts"
        );
        assert_eq!(lookup_errno(&ov, "d/gone"), Errno::ENOENT);
        assert_eq!(listing(&ov, "d"), ["kept"]);
        // Built in the work dir and swapped in: a whiteout for an upper
        // directory that held one itself.
        remove(&ov, "e", "x", false).unwrap();
        remove(&ov, "", "e", true).unwrap();
        assert_eq!(lookup_errno(&ov, "e"), Errno::ENOENT);
        assert_eq!(listing(&ov, ""), ["d"]);
        drop(ov);
        // A fresh mount reads them too, and the directory still merges.
        let ov = l.userxattr_overlay(userxattr);
        assert_eq!(lookup_errno(&ov, "d/gone"), Errno::ENOENT);
        assert_eq!(listing(&ov, "d"), ["kept"]);
        assert_eq!(listing(&ov, ""), ["d"]);
        assert!(l.work_entries().is_empty());
    }
}

#[test]
fn oci_whiteouts_in_the_upper_hide_names_below_and_are_never_made() {
    let l = Layers::new();
    write(&l.lower("d/gone"), b"");
    write(&l.lower("d/kept"), b"");
    write(&l.lower("d/sub/inner"), b"");
    write(&l.lower("opq/hidden"), b"");
    // As containers/storage stores a layer it mounts as the upper.
    write(&l.upper("d/.wh.gone"), b"");
    write(&l.upper("d/.wh.sub"), b"");
    write(&l.upper("opq/.wh..wh..opq"), b"");
    write(&l.upper("opq/mine"), b"");
    let lower = tree(&l.lower);
    let ov = l.overlay();

    assert_eq!(lookup_errno(&ov, "d/gone"), Errno::ENOENT);
    assert_eq!(lookup_errno(&ov, "d/.wh.gone"), Errno::ENOENT);
    assert_eq!(listing(&ov, "d"), ["kept"]);
    assert_eq!(listing(&ov, "opq"), ["mine"]);

    // A directory made where a lower one is whited out starts empty.
    create(&ov, "d", "sub", new_dir());
    assert!(listing(&ov, "d/sub").is_empty());
    assert_eq!(opaque(&l.upper("d/sub")).as_deref(), Some(&b"y"[..]));
    assert_eq!(listing(&ov, "d"), ["kept", "sub"]);

    // Names every layer reads as markers cannot be made.
    let err = ov
        .create(id(&ov, "d"), OsStr::new(".wh.kept"), new_file(), CALLER)
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.errno(), Errno::EINVAL);
    let err = rename(
        &ov,
        ("d", "kept"),
        ("d", ".wh..wh..opq"),
        RenameMode::Replace,
    )
    .unwrap_err();
    assert_eq!(err.errno(), Errno::EINVAL);
    assert_eq!(listing(&ov, "d"), ["kept", "sub"]);
    assert_eq!(tree(&l.lower), lower, "lower changed");
    assert!(l.work_entries().is_empty());
}

/// `security.capability` revision 2 with CAP_NET_BIND_SERVICE effective.
fn capability() -> Vec<u8> {
    [0x0200_0001u32, 1 << 10, 0, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

#[test]
fn a_file_capability_read_as_absent_is_seen_once_set_through_the_mount() {
    let l = Layers::new();
    write(&l.lower("low"), b"");
    sys::set_xattr(
        XattrTarget::Fd(fs::File::open(l.lower("low")).unwrap().as_fd()),
        c"security.capability",
        &capability(),
        0,
    )
    .unwrap();
    write(&l.lower("plain"), b"");
    let ov = l.overlay();
    let name = OsStr::new("security.capability");
    let absent = |path: &str| ov.getxattr(id(&ov, path), name).unwrap_err().errno();
    assert_eq!(ov.getxattr(id(&ov, "low"), name).unwrap(), capability());
    // Asked twice (the second answer is the remembered one), then set.
    create(&ov, "", "new", new_file());
    for path in ["new", "plain"] {
        assert_eq!(absent(path), Errno::ENODATA);
        assert_eq!(absent(path), Errno::ENODATA);
        ov.setxattr(id(&ov, path), name, &capability(), 0).unwrap();
        assert_eq!(ov.getxattr(id(&ov, path), name).unwrap(), capability());
        assert_eq!(
            xattr(&l.upper(path), "security.capability"),
            Some(capability())
        );
        ov.removexattr(id(&ov, path), name).unwrap();
        assert_eq!(absent(path), Errno::ENODATA);
    }
}

#[test]
fn a_default_acl_set_through_the_mount_applies_to_the_next_create() {
    let l = Layers::new();
    let ov = l.overlay();
    create(&ov, "", "d", new_dir());
    // Before: no default ACL, the umask applies (and that is remembered).
    assert_eq!(create(&ov, "d", "before", new_file()).mode & 0o777, 0o644);
    let default_acl = default_acl_rwx();
    let name = OsStr::new("system.posix_acl_default");
    ov.setxattr(id(&ov, "d"), name, &default_acl, 0).unwrap();
    assert_eq!(create(&ov, "d", "with", new_file()).mode & 0o777, 0o666);
    ov.removexattr(id(&ov, "d"), name).unwrap();
    assert_eq!(create(&ov, "d", "after", new_file()).mode & 0o777, 0o644);
}
