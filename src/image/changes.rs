//! What a container changed, as `podman diff` reports it: a list of
//! (A|C|D, path) computed from the upper directory, with the lower layers
//! consulted only to tell an addition from a change.
//!
//! The rules are those of containers/storage's overlay driver with native
//! diff (`archive.OverlayChanges`), found by running the same changes under
//! podman (see `tests/changes.rs`):
//!
//! * The upper is walked in lexical order (names compared as bytes, each
//!   directory before its contents).
//! * A whiteout is `D path`. A directory marked opaque (`y`) is `D path`
//!   when a lower layer has something there (not a whiteout, and no
//!   whiteout above it in that layer); its contents follow as additions or
//!   changes.
//! * Anything else is `C` when the topmost lower layer that has the path (or
//!   a whiteout on it or one of its parents) has it, `A` otherwise; a
//!   directory whose size, mode and mtime equal the lower one's (mtimes
//!   compared to the second when either has no nanoseconds) is not
//!   reported: copy-up alone changes nothing.
//! * Before an `A` or a `D`, each parent directory not yet reported is
//!   reported as `C`, outermost first (so a changed directory found later in
//!   the walk can come out of order: `C /a/b`, `C /a`, ... as podman prints
//!   it).
//!
//! What podman cannot show, because its kernel overlay mounts have no
//! `redirect_dir`: a directory moved with a redirect is reported as podman
//! reports the copy that `mv` makes there, `D old` (its whiteout) and the
//! whole merged directory added (or changed, name by name) at its new place.
//! xattr whiteouts count as whiteouts. Lower layers are never followed
//! through a symlink (podman's `os.Stat` follows them on the host), and a
//! lower path under a non-directory counts as absent (podman fails there
//! with ENOTDIR). libpod leaves the files it creates itself in every
//! container out of `podman diff`: [`without_container_init_paths`].

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
use serde::{Serialize, Serializer};

use crate::overlay::layer::open_beneath;
use crate::overlay::marker::{self, DirMarks, OciName, Redirect};

/// A failed system call, with the path (relative to its layer) it was made on.
#[derive(Debug)]
pub struct Error {
    op: &'static str,
    layer: usize,
    path: PathBuf,
    errno: Errno,
}

impl Error {
    pub(crate) fn new(
        errno: Errno,
        op: &'static str,
        layer: usize,
        path: impl Into<PathBuf>,
    ) -> Error {
        Error {
            op,
            layer,
            path: path.into(),
            errno,
        }
    }

    pub fn errno(&self) -> Errno {
        self.errno
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layer = match self.layer {
            0 => "upper".to_string(),
            n => format!("lower {n}"),
        };
        write!(
            f,
            "{} on {:?} in the {layer}: {}",
            self.op,
            self.path,
            self.errno.desc()
        )
    }
}

impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(io::Error::from_raw_os_error(e.errno as i32).kind(), e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

fn errno_of(e: &io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
}

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// `C`
    Modified,
    /// `A`
    Added,
    /// `D`
    Deleted,
}

impl ChangeKind {
    pub fn letter(self) -> char {
        match self {
            ChangeKind::Modified => 'C',
            ChangeKind::Added => 'A',
            ChangeKind::Deleted => 'D',
        }
    }
}

impl Serialize for ChangeKind {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_char(self.letter())
    }
}

/// One line of `podman diff`: `C /etc`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Change {
    pub kind: ChangeKind,
    /// Absolute in the container (`/etc/passwd`).
    #[serde(serialize_with = "lossy_path")]
    pub path: PathBuf,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.letter(), self.path.display())
    }
}

fn lossy_path<S: Serializer>(path: &Path, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

fn lossy_paths<S: Serializer>(paths: &[PathBuf], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(paths.iter().map(|p| p.to_string_lossy()))
}

/// `podman diff --format json`: the paths grouped by kind, each group in
/// the order of the list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiffReport {
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "lossy_paths")]
    pub changed: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "lossy_paths")]
    pub added: Vec<PathBuf>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "lossy_paths")]
    pub deleted: Vec<PathBuf>,
}

impl DiffReport {
    pub fn new(changes: &[Change]) -> DiffReport {
        let mut report = DiffReport::default();
        for c in changes {
            let list = match c.kind {
                ChangeKind::Modified => &mut report.changed,
                ChangeKind::Added => &mut report.added,
                ChangeKind::Deleted => &mut report.deleted,
            };
            list.push(c.path.clone());
        }
        report
    }
}

/// The objects libpod makes in every container and leaves out of
/// `podman diff` (libpod's `initInodes`).
pub const CONTAINER_INIT_PATHS: &[&str] = &[
    "/dev",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/proc",
    "/run",
    "/run/notify",
    "/run/.containerenv",
    "/run/secrets",
    "/sys",
    "/etc/mtab",
];

/// `changes` as `podman diff` shows them for a container.
pub fn without_container_init_paths(changes: Vec<Change>) -> Vec<Change> {
    changes
        .into_iter()
        .filter(|c| !CONTAINER_INIT_PATHS.iter().any(|p| c.path == Path::new(p)))
        .collect()
}

/// The upper directory and the lower layers (topmost first) of a container.
pub struct Layers {
    /// Index 0 is the upper.
    roots: Vec<OwnedFd>,
}

impl Layers {
    pub fn open(upper: &Path, lowers: &[&Path]) -> Result<Layers> {
        let mut roots = Vec::new();
        for (i, path) in std::iter::once(upper)
            .chain(lowers.iter().copied())
            .enumerate()
        {
            let fd = nix::fcntl::open(
                path,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::new(e, "open layer", i, path))?;
            roots.push(fd);
        }
        Ok(Layers { roots })
    }

    /// From descriptors of the layers' root directories.
    pub fn from_fds(upper: OwnedFd, lowers: Vec<OwnedFd>) -> Layers {
        let mut roots = vec![upper];
        roots.extend(lowers);
        Layers { roots }
    }

    pub(crate) fn root(&self, layer: usize) -> BorrowedFd<'_> {
        self.roots[layer].as_fd()
    }

    pub(crate) fn lower_count(&self) -> usize {
        self.roots.len() - 1
    }
}

/// What the changes of `layers`' upper are, in podman's order.
pub fn changes(layers: &Layers) -> Result<Vec<Change>> {
    let mut walker = Walker::new(layers, true)?;
    let mut out = Vec::new();
    // The directories above the current item, and which of them are not
    // reported yet (podman's `changedDirs`, kept per level so that a deep
    // tree costs no walk up per item).
    let mut ancestors: Vec<PathBuf> = Vec::new();
    let mut unreported: Vec<usize> = Vec::new();
    while let Some(item) = walker.next_item()? {
        ancestors.truncate(item.depth - 1);
        while unreported.last().is_some_and(|&i| i >= ancestors.len()) {
            unreported.pop();
        }
        let path = Path::new("/").join(&item.path);
        let is_dir = item.is_dir();
        let replaces = !item.in_merged && (item.marks.opaque || item.marks.redirect.is_some());
        let kind = if item.whiteout || (is_dir && replaces && deleted_below(&item.shadow)) {
            Some(ChangeKind::Deleted)
        } else {
            match first_lower(&item.shadow) {
                None => Some(ChangeKind::Added),
                Some(lower) if is_dir && is_dir_stat(lower) && same_dir(&item.stat, lower) => None,
                Some(_) => Some(ChangeKind::Modified),
            }
        };
        if is_dir {
            if kind.is_none() {
                unreported.push(ancestors.len());
            }
            ancestors.push(path.clone());
        }
        let Some(kind) = kind else { continue };
        if kind != ChangeKind::Modified {
            for i in unreported.drain(..) {
                out.push(Change {
                    kind: ChangeKind::Modified,
                    path: ancestors[i].clone(),
                });
            }
        }
        out.push(Change { kind, path });
    }
    Ok(out)
}

/// `overlayDeletedFile` for an opaque directory: the topmost lower layer
/// that knows the path has an object there (not a whiteout of it or of a
/// parent).
fn deleted_below(shadow: &[Shadowed]) -> bool {
    for s in shadow {
        match s {
            Shadowed::Whiteout => return false,
            Shadowed::Object(_) => return true,
            Shadowed::Absent => {}
        }
    }
    false
}

/// The layer scan of `changes`: the topmost lower object at the path,
/// unless a whiteout (of it or a parent) comes first.
fn first_lower(shadow: &[Shadowed]) -> Option<&FileStat> {
    for s in shadow {
        match s {
            Shadowed::Whiteout => return None,
            Shadowed::Object(st) => return Some(st),
            Shadowed::Absent => {}
        }
    }
    None
}

fn is_dir_stat(st: &FileStat) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits()
}

/// Go's `sameFsTime` on the mtimes, and equal size and mode.
fn same_dir(a: &FileStat, b: &FileStat) -> bool {
    let same_time = a.st_mtime == b.st_mtime
        && (a.st_mtime_nsec == b.st_mtime_nsec || a.st_mtime_nsec == 0 || b.st_mtime_nsec == 0);
    a.st_size == b.st_size && a.st_mode == b.st_mode && same_time
}

// ---------------------------------------------------------------------------
// The walk, shared with `layer_tar`.

/// What a lower layer holds at an item's path.
#[derive(Debug, Clone)]
pub(crate) enum Shadowed {
    /// A whiteout of the path or of one of its parents.
    Whiteout,
    Object(FileStat),
    Absent,
}

/// One object of the walk.
pub(crate) struct Item {
    /// Relative to the root (no leading `/`).
    pub path: PathBuf,
    /// Number of components of `path`.
    pub depth: usize,
    pub name: OsString,
    /// The layer holding it (0: the upper).
    pub layer: usize,
    pub stat: FileStat,
    /// A whiteout of the upper (char device 0/0 or xattr whiteout); only
    /// outside merged regions.
    pub whiteout: bool,
    /// Its markers, for a directory (of its topmost copy).
    pub marks: DirMarks,
    /// Inside a directory shown whole (below a redirected directory).
    pub in_merged: bool,
    /// A directory shown whole from here on: its merged contents follow.
    pub merged_root: bool,
    /// Per lower layer (topmost first), what it has at the same path; empty
    /// unless the walker was asked for them.
    pub shadow: Vec<Shadowed>,
}

impl Item {
    pub fn is_dir(&self) -> bool {
        is_dir_stat(&self.stat) && !self.whiteout
    }
}

/// How a directory of a layer is reopened when its descriptor was closed.
enum Origin {
    /// From the layer's root, along these names.
    Root(Vec<OsString>),
    /// `name` in source `parent` of the frame below.
    Child { parent: usize, name: OsString },
}

struct Src {
    layer: usize,
    fd: Option<OwnedFd>,
    origin: Origin,
}

#[derive(Clone, Copy)]
enum ShadowDir {
    Dir(usize),
    Whiteout,
    Absent,
}

struct Frame {
    path: PathBuf,
    srcs: Vec<Src>,
    /// Source index of the upper copy.
    upper: Option<usize>,
    /// Source indexes of the lower copies merged in (merged regions only).
    merged: Vec<usize>,
    /// Shown whole: lower copies merged, whiteouts applied.
    merged_mode: bool,
    shadow: Vec<ShadowDir>,
    entries: std::vec::IntoIter<Listed>,
}

struct Listed {
    name: OsString,
    layer: usize,
    /// Index of the source in its frame.
    src: usize,
    stat: FileStat,
    whiteout: bool,
}

/// Open directory descriptors kept at most; past it the shallowest frames'
/// are closed and reopened from the layer root or a parent when needed, so
/// a 10,000-level tree needs no more.
const FD_BUDGET: usize = 128;

/// An iterative walk of the upper, names in byte order (whiteouts as
/// `.wh.NAME` when no shadows are asked for: the layer tar's order),
/// directories before their contents; below a redirected directory the merged view (upper and
/// the lower copies the redirect names, whiteouts and opaque markers
/// applied).
pub(crate) struct Walker<'a> {
    layers: &'a Layers,
    frames: Vec<Frame>,
    open_fds: usize,
    with_shadow: bool,
    /// Frame and source of the directory holding the last item.
    last: Option<(usize, usize)>,
    /// Frames below this one hold no descriptor.
    evicted_below: usize,
}

fn stat_at(fd: BorrowedFd<'_>, name: &OsStr) -> nix::Result<Option<FileStat>> {
    match fstatat(fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_chardev_whiteout(st: &FileStat) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFCHR.bits() && st.st_rdev == 0
}

fn oci_whiteout_name(name: &OsStr) -> OsString {
    let mut wh = OsString::from(".wh.");
    wh.push(name);
    wh
}

impl<'a> Walker<'a> {
    pub fn new(layers: &'a Layers, with_shadow: bool) -> Result<Walker<'a>> {
        let lowers = layers.lower_count();
        let mut srcs = vec![Src {
            layer: 0,
            fd: None,
            origin: Origin::Root(Vec::new()),
        }];
        let mut shadow = Vec::new();
        if with_shadow {
            for l in 1..=lowers {
                srcs.push(Src {
                    layer: l,
                    fd: None,
                    origin: Origin::Root(Vec::new()),
                });
                shadow.push(ShadowDir::Dir(srcs.len() - 1));
            }
        }
        let mut w = Walker {
            layers,
            frames: Vec::new(),
            open_fds: 0,
            with_shadow,
            last: None,
            evicted_below: 0,
        };
        w.frames.push(Frame {
            path: PathBuf::new(),
            srcs,
            upper: Some(0),
            merged: Vec::new(),
            merged_mode: false,
            shadow,
            entries: Vec::new().into_iter(),
        });
        let entries = w.list(0)?;
        w.frames[0].entries = entries.into_iter();
        Ok(w)
    }

    fn err(
        &self,
        e: Errno,
        op: &'static str,
        frame: usize,
        src: usize,
        name: Option<&OsStr>,
    ) -> Error {
        let f = &self.frames[frame];
        let mut path = f.path.clone();
        if let Some(name) = name {
            path.push(name);
        }
        Error::new(e, op, f.srcs[src].layer, path)
    }

    /// The descriptor of source `s` of frame `f`, reopened if it was closed.
    pub fn fd(&mut self, f: usize, s: usize) -> Result<BorrowedFd<'_>> {
        if self.frames[f].srcs[s].fd.is_none() {
            let layer = self.frames[f].srcs[s].layer;
            let mut names: Vec<OsString> = Vec::new();
            let (mut cf, mut cs) = (f, s);
            let base = loop {
                let src = &self.frames[cf].srcs[cs];
                if let Some(fd) = &src.fd {
                    break fd.try_clone();
                }
                match &src.origin {
                    Origin::Root(parts) => {
                        names.extend(parts.iter().rev().cloned());
                        break self.layers.root(layer).try_clone_to_owned();
                    }
                    Origin::Child { parent, name } => {
                        names.push(name.clone());
                        cs = *parent;
                        cf -= 1;
                    }
                }
            };
            let mut fd = base.map_err(|e| self.err(errno_of(&e), "dup", f, s, None))?;
            for name in names.iter().rev() {
                fd = open_beneath(fd.as_fd(), name, OFlag::O_PATH | OFlag::O_DIRECTORY)
                    .map_err(|e| self.err(e, "openat2(reopen)", f, s, None))?;
            }
            self.frames[f].srcs[s].fd = Some(fd);
            self.open_fds += 1;
            self.evicted_below = self.evicted_below.min(f);
        }
        Ok(self.frames[f].srcs[s]
            .fd
            .as_ref()
            .expect("just opened")
            .as_fd())
    }

    /// The directory holding the last item returned, in the item's layer.
    pub fn item_dir(&mut self) -> Result<BorrowedFd<'_>> {
        let (f, s) = self.last.expect("an item was returned");
        self.fd(f, s)
    }

    /// Closes the shallowest frames' descriptors past the budget.
    fn evict(&mut self) {
        if self.open_fds <= FD_BUDGET {
            return;
        }
        let keep_from = self.frames.len().saturating_sub(2);
        let start = self.evicted_below.min(keep_from);
        for (i, frame) in self.frames[start..keep_from].iter_mut().enumerate() {
            for src in &mut frame.srcs {
                if src.fd.take().is_some() {
                    self.open_fds -= 1;
                }
            }
            self.evicted_below = start + i + 1;
            if self.open_fds <= FD_BUDGET / 2 {
                return;
            }
        }
    }

    /// Lists frame `f`: every name once, in byte order, topmost layer first.
    fn list(&mut self, f: usize) -> Result<Vec<Listed>> {
        let mut map: BTreeMap<OsString, Listed> = BTreeMap::new();
        let mut hidden: HashSet<OsString> = HashSet::new();
        let merged_mode = self.frames[f].merged_mode;
        let order: Vec<usize> = self.frames[f]
            .upper
            .into_iter()
            .chain(self.frames[f].merged.iter().copied())
            .collect();
        for s in order {
            let layer = self.frames[f].srcs[s].layer;
            let is_upper = layer == 0;
            let dir = self.fd(f, s)?.try_clone_to_owned();
            let dir = dir.map_err(|e| self.err(errno_of(&e), "dup", f, s, None))?;
            let marks = marker::read_dir_marks(dir.as_fd(), !is_upper)
                .map_err(|e| self.err(e.errno(), e.op(), f, s, None))?;
            let names = crate::overlay::layer::list_dir(dir.as_fd())
                .map_err(|e| self.err(e.errno(), e.op(), f, s, None))?;
            let mut oci_whiteouts = Vec::new();
            for (name, _, _) in names {
                if !is_upper {
                    match marker::oci_name(&name) {
                        OciName::Plain => {}
                        OciName::Whiteout(target) => {
                            oci_whiteouts.push(target.to_os_string());
                            continue;
                        }
                        OciName::Opaque | OciName::Meta => continue,
                    }
                }
                if map.contains_key(&name) || hidden.contains(&name) {
                    continue;
                }
                let Some(stat) = stat_at(dir.as_fd(), &name)
                    .map_err(|e| self.err(e, "fstatat", f, s, Some(&name)))?
                else {
                    continue;
                };
                let whiteout = is_chardev_whiteout(&stat)
                    || (marks.xwhiteouts
                        && stat.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits()
                        && stat.st_size == 0
                        && marker::is_xattr_whiteout(dir.as_fd(), &name)
                            .map_err(|e| self.err(e.errno(), e.op(), f, s, Some(&name)))?);
                if whiteout && merged_mode {
                    hidden.insert(name);
                    continue;
                }
                map.insert(
                    name.clone(),
                    Listed {
                        name,
                        layer,
                        src: s,
                        stat,
                        whiteout,
                    },
                );
            }
            for target in oci_whiteouts {
                if !map.contains_key(&target) {
                    hidden.insert(target);
                }
            }
            if !is_upper && marks.opaque {
                break;
            }
        }
        let mut listed: Vec<Listed> = map.into_values().collect();
        if !self.with_shadow {
            // The layer tar names whiteouts `.wh.NAME`: sorted as such.
            listed.sort_by_cached_key(|l| {
                if l.whiteout {
                    oci_whiteout_name(&l.name)
                } else {
                    l.name.clone()
                }
            });
        }
        Ok(listed)
    }

    /// The lower copies of a directory, found as kernel overlayfs looks
    /// them up: by `target` in `via` (the parent's lower copies) or from
    /// the layers' roots, stopping at a whiteout, a non-directory or an
    /// opaque copy, following redirects of lower copies.
    fn lower_copies(
        &mut self,
        f: usize,
        via: &[usize],
        mut target: Redirect,
        below: usize,
    ) -> Result<Vec<Src>> {
        let mut out = Vec::new();
        for layer in below + 1..=self.layers.lower_count() {
            let (base, origin_parent, parts): (OwnedFd, Option<usize>, Vec<OsString>) =
                match &target {
                    Redirect::Name(name) => {
                        let Some(&s) = via.iter().find(|&&s| self.frames[f].srcs[s].layer == layer)
                        else {
                            continue;
                        };
                        let fd = self.fd(f, s)?.try_clone_to_owned();
                        let fd = fd.map_err(|e| self.err(errno_of(&e), "dup", f, s, None))?;
                        (fd, Some(s), vec![name.clone()])
                    }
                    Redirect::Path(parts) => {
                        let fd = self.layers.root(layer).try_clone_to_owned();
                        let fd = fd.map_err(|e| Error::new(errno_of(&e), "dup", layer, "."))?;
                        (fd, None, parts.clone())
                    }
                    Redirect::Malformed(_) => return Ok(out),
                };
            let mut dir = base;
            let mut found = true;
            for part in &parts {
                let rel: PathBuf = parts.iter().collect();
                match stat_at(dir.as_fd(), part)
                    .map_err(|e| Error::new(e, "fstatat", layer, &rel))?
                {
                    None => {
                        if stat_at(dir.as_fd(), &oci_whiteout_name(part))
                            .map_err(|e| Error::new(e, "fstatat(.wh.)", layer, &rel))?
                            .is_some()
                        {
                            return Ok(out);
                        }
                        found = false;
                        break;
                    }
                    Some(st) if is_dir_stat(&st) => {
                        dir = open_beneath(dir.as_fd(), part, OFlag::O_PATH | OFlag::O_DIRECTORY)
                            .map_err(|e| Error::new(e, "openat2", layer, &rel))?;
                    }
                    Some(_) => return Ok(out),
                }
            }
            if !found {
                continue;
            }
            let marks = marker::read_dir_marks(dir.as_fd(), true).map_err(|e| {
                Error::new(e.errno(), e.op(), layer, parts.iter().collect::<PathBuf>())
            })?;
            let origin = match origin_parent {
                Some(parent) => Origin::Child {
                    parent,
                    name: parts[0].clone(),
                },
                None => Origin::Root(parts),
            };
            out.push(Src {
                layer,
                fd: Some(dir),
                origin,
            });
            self.open_fds += 1;
            if marks.opaque {
                break;
            }
            if let Some(r) = marks.redirect {
                target = match (r, &target) {
                    // A relative redirect of a copy found from the roots
                    // names a sibling at the same path.
                    (Redirect::Name(n), Redirect::Path(p)) => {
                        let mut p = p.clone();
                        p.pop();
                        p.push(n);
                        Redirect::Path(p)
                    }
                    (r, _) => r,
                };
            }
        }
        Ok(out)
    }

    /// The next object of the walk.
    pub fn next_item(&mut self) -> Result<Option<Item>> {
        loop {
            let Some(f) = self.frames.len().checked_sub(1) else {
                return Ok(None);
            };
            let Some(entry) = self.frames[f].entries.next() else {
                let frame = self.frames.pop().expect("a frame");
                self.open_fds -= frame.srcs.iter().filter(|s| s.fd.is_some()).count();
                self.evicted_below = self.evicted_below.min(self.frames.len());
                self.last = None;
                continue;
            };
            return self.visit(f, entry).map(Some);
        }
    }

    fn visit(&mut self, f: usize, entry: Listed) -> Result<Item> {
        let path = self.frames[f].path.join(&entry.name);
        let in_merged = self.frames[f].merged_mode;
        // What each lower layer has at this path.
        let mut shadow = Vec::new();
        let mut child_shadow: Vec<(ShadowDir, Option<usize>)> = Vec::new();
        if self.with_shadow {
            for i in 0..self.frames[f].shadow.len() {
                let (here, dir_src) = match self.frames[f].shadow[i] {
                    ShadowDir::Whiteout => (Shadowed::Whiteout, None),
                    ShadowDir::Absent => (Shadowed::Absent, None),
                    ShadowDir::Dir(s) => {
                        let dir = self.fd(f, s)?.try_clone_to_owned();
                        let dir = dir.map_err(|e| self.err(errno_of(&e), "dup", f, s, None))?;
                        match stat_at(dir.as_fd(), &entry.name)
                            .map_err(|e| self.err(e, "fstatat", f, s, Some(&entry.name)))?
                        {
                            Some(st) if is_chardev_whiteout(&st) => (Shadowed::Whiteout, None),
                            Some(st) => {
                                let dir_src = is_dir_stat(&st).then_some(s);
                                (Shadowed::Object(st), dir_src)
                            }
                            None => {
                                let oci = stat_at(dir.as_fd(), &oci_whiteout_name(&entry.name))
                                    .map_err(|e| {
                                        self.err(e, "fstatat(.wh.)", f, s, Some(&entry.name))
                                    })?;
                                if oci.is_some() {
                                    (Shadowed::Whiteout, None)
                                } else {
                                    (Shadowed::Absent, None)
                                }
                            }
                        }
                    }
                };
                let next = match (&here, dir_src) {
                    (Shadowed::Whiteout, _) => ShadowDir::Whiteout,
                    (_, Some(_)) => ShadowDir::Dir(usize::MAX),
                    _ => ShadowDir::Absent,
                };
                child_shadow.push((next, dir_src));
                shadow.push(here);
            }
        }
        let mut item = Item {
            path: path.clone(),
            depth: f + 1,
            name: entry.name.clone(),
            layer: entry.layer,
            stat: entry.stat,
            whiteout: entry.whiteout,
            marks: DirMarks::default(),
            in_merged,
            merged_root: false,
            shadow,
        };
        self.last = Some((f, entry.src));
        if !item.is_dir() {
            return Ok(item);
        }

        // A directory: its frame goes on the stack.
        let mut srcs = Vec::new();
        let mut upper = None;
        let dir = self.fd(f, entry.src)?.try_clone_to_owned();
        let dir = dir.map_err(|e| self.err(errno_of(&e), "dup", f, entry.src, None))?;
        let own = open_beneath(dir.as_fd(), &entry.name, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .map_err(|e| self.err(e, "openat2", f, entry.src, Some(&entry.name)))?;
        let marks = marker::read_dir_marks(own.as_fd(), entry.layer != 0)
            .map_err(|e| self.err(e.errno(), e.op(), f, entry.src, Some(&entry.name)))?;
        let own_src = Src {
            layer: entry.layer,
            fd: Some(own),
            origin: Origin::Child {
                parent: entry.src,
                name: entry.name.clone(),
            },
        };
        self.open_fds += 1;
        let mut merged = Vec::new();
        let mut merged_mode = in_merged;
        if entry.layer == 0 {
            srcs.push(own_src);
            upper = Some(0);
            let redirect = marks.redirect.clone();
            let target = match (&redirect, in_merged) {
                (Some(r), _) => {
                    merged_mode = true;
                    item.merged_root = !in_merged;
                    Some(match r {
                        // In the upper's own tree (no redirect above) the
                        // parent's lower copies sit at the parent's path.
                        Redirect::Name(n) if !in_merged => {
                            let mut parts: Vec<OsString> = self.frames[f]
                                .path
                                .iter()
                                .map(|c| c.to_os_string())
                                .collect();
                            parts.push(n.clone());
                            Redirect::Path(parts)
                        }
                        other => other.clone(),
                    })
                }
                (None, true) => Some(Redirect::Name(entry.name.clone())),
                (None, false) => None,
            };
            if let Some(target) = target
                && !marks.opaque
            {
                let via = self.frames[f].merged.clone();
                merged = self.lower_copies(f, &via, target, 0)?;
            }
        } else {
            // A lower directory inside a merged region: its copies below,
            // itself first.
            let via = self.frames[f].merged.clone();
            merged =
                self.lower_copies(f, &via, Redirect::Name(entry.name.clone()), entry.layer - 1)?;
            self.open_fds -= 1;
            drop(own_src);
        }
        let first_merged = srcs.len();
        srcs.extend(merged);
        let merged_idx: Vec<usize> = (first_merged..srcs.len()).collect();
        // The same path in each lower layer, for `changes`.
        let mut shadow_dirs = Vec::new();
        for (next, dir_src) in child_shadow {
            shadow_dirs.push(match (next, dir_src) {
                (ShadowDir::Dir(_), Some(parent)) => {
                    let layer = self.frames[f].srcs[parent].layer;
                    srcs.push(Src {
                        layer,
                        fd: None,
                        origin: Origin::Child {
                            parent,
                            name: entry.name.clone(),
                        },
                    });
                    ShadowDir::Dir(srcs.len() - 1)
                }
                (ShadowDir::Whiteout, _) => ShadowDir::Whiteout,
                _ => ShadowDir::Absent,
            });
        }
        item.marks = marks;
        self.frames.push(Frame {
            path,
            srcs,
            upper,
            merged: merged_idx,
            merged_mode,
            shadow: shadow_dirs,
            entries: Vec::new().into_iter(),
        });
        let top = self.frames.len() - 1;
        let entries = self.list(top)?;
        self.frames[top].entries = entries.into_iter();
        self.evict();
        Ok(item)
    }
}
