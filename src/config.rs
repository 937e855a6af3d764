//! Mount options and their validation: everything that can be refused with a
//! clear message before anything is mounted.

use std::fmt;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;

use crate::overlay::idmap::{IdMap, Squash, parse_squash_id};

/// A mount as asked for on the command line, paths as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountRequest {
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub source: Option<String>,
    pub options: MountOptions,
    pub foreground: bool,
    pub threads: Option<usize>,
    pub debug: bool,
    pub log_file: Option<PathBuf>,
    /// Options taken but ignored, one message each, for the caller's stderr.
    pub warnings: Vec<String>,
}

/// The `-o` options that mean something to unionfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub read_only: bool,
    /// Skip fsync during copy-up (podman's `volatile`).
    pub volatile: bool,
    pub passthrough: bool,
    /// Passthrough for lower files of writable mounts too (the default;
    /// `passthrough=upper` turns it off).
    pub lower_passthrough: bool,
    pub nodev: bool,
    pub nosuid: bool,
    pub noexec: bool,
    pub fsname: Option<String>,
    /// The upper in kernel overlayfs' `userxattr` format (`user.overlay.*`),
    /// also where `trusted.*` xattrs could be set.
    pub userxattr: bool,
    /// fuse-overlayfs' `uidmapping=`/`gidmapping=`: stored ids to shown ids.
    pub uid_map: IdMap,
    pub gid_map: IdMap,
    /// `squash_to_root`, `squash_to_uid=`, `squash_to_gid=`: the owner every
    /// object shows (resolved with `squash()`).
    pub squash_to_root: bool,
    pub squash_to_uid: Option<u32>,
    pub squash_to_gid: Option<u32>,
    /// Directories report one link (`static_nlink`).
    pub static_nlink: bool,
    /// No POSIX ACLs in the mount (`noacl`).
    pub noacl: bool,
    /// Directory listings stay out of the kernel's page cache
    /// (`nocache_readdir`): every listing is asked of the daemon, and a
    /// mount keeps no page per directory it listed.
    pub nocache_readdir: bool,
    /// Serve requests over io_uring where the kernel offers it (the
    /// default; `noio_uring` keeps to /dev/fuse).
    pub io_uring: bool,
    /// Who besides the mounting user may use the mount.
    pub access: Access,
}

impl MountOptions {
    pub fn squash(&self) -> Squash {
        Squash::new(self.squash_to_root, self.squash_to_uid, self.squash_to_gid)
    }
}

/// Who may use a mount besides the user who mounted it. The kernel lets
/// only that user in unless the mount has `allow_other`; fusermount3 gives
/// a plain user `allow_other` only when /etc/fuse.conf has
/// `user_allow_other`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Access {
    /// Everyone where the mount may say so without asking: root's mounts
    /// and mounts inside a user namespace, and a plain user's when
    /// /etc/fuse.conf has `user_allow_other`; the owner alone otherwise.
    #[default]
    Default,
    /// `allow_other`: everyone (permissions checked by the kernel).
    AllowOther,
    /// `allow_root`: the owner and root.
    AllowRoot,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            volatile: false,
            passthrough: true,
            lower_passthrough: true,
            nodev: false,
            nosuid: false,
            noexec: false,
            fsname: None,
            userxattr: false,
            uid_map: IdMap::default(),
            gid_map: IdMap::default(),
            squash_to_root: false,
            squash_to_uid: None,
            squash_to_gid: None,
            static_nlink: false,
            noacl: false,
            nocache_readdir: false,
            io_uring: true,
            access: Access::Default,
        }
    }
}

/// Options accepted for compatibility (mount(8), fstab, fuse-overlayfs,
/// kernel overlayfs, containers/storage) that change nothing here, or
/// describe what unionfs does anyway.
const ACCEPTED_NOOPS: &[&str] = &[
    "rw",
    "dev",
    "suid",
    "exec",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "lazytime",
    "async",
    "sync",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "defaults",
    "default_permissions",
    "nofail",
    "_netdev",
    "fast_ino",
    "plugins",
    "fsync",
    "xattr_permissions",
    "timeout",
    "threaded",
    "redirect_dir",
    "index",
    "metacopy",
    "xino",
    "nfs_export",
    "uuid",
    "verity",
    "context",
    "fscontext",
    "defcontext",
    "rootcontext",
    "max_idle_threads",
];

/// Options that take a value.
const VALUED: &[&str] = &[
    "lowerdir",
    "upperdir",
    "workdir",
    "fsname",
    "threads",
    "uidmapping",
    "gidmapping",
    "squash_to_uid",
    "squash_to_gid",
];

/// Options that are flags.
const FLAGS: &[&str] = &[
    "ro",
    "rw",
    "volatile",
    "userxattr",
    "nopassthrough",
    "nodev",
    "nosuid",
    "noexec",
    "debug",
    "squash_to_root",
    "static_nlink",
    "noacl",
    "nocache_readdir",
    "io_uring",
    "noio_uring",
    "allow_other",
    "allow_root",
];

/// A worker thread count, from `--threads` or `-o threads=`.
pub fn parse_threads(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("the thread count must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{value}' is not a thread count")),
    }
}

/// Parses one `-o` argument into the request. Empty options and options
/// with no meaning here are accepted; unknown ones are accepted with a
/// warning in `req.warnings` (podman and fstab pass options
/// meant for other filesystems); a malformed value of an option unionfs
/// uses is refused.
pub fn apply_options(req: &mut MountRequest, arg: &str) -> Result<(), ConfigError> {
    for opt in split_options(arg) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt.as_str(), None),
        };
        match (key, value) {
            ("", None) => {}
            ("lowerdir", Some(v)) => {
                req.lowers = split_unescaped(v, ':')
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            }
            ("upperdir", Some(v)) if !v.is_empty() => req.upper = Some(PathBuf::from(v)),
            ("workdir", Some(v)) if !v.is_empty() => req.work = Some(PathBuf::from(v)),
            ("fsname", Some(v)) if !v.is_empty() => req.options.fsname = Some(v.to_string()),
            ("threads", Some(v)) => {
                req.threads = Some(
                    parse_threads(v)
                        .or_else(|e| refuse(format!("bad mount option '{opt}': {e}")))?,
                )
            }
            ("ro", None) => req.options.read_only = true,
            ("rw", None) => req.options.read_only = false,
            ("volatile", None) => req.options.volatile = true,
            ("userxattr", None) => req.options.userxattr = true,
            ("passthrough", None | Some("all")) => {
                req.options.passthrough = true;
                req.options.lower_passthrough = true;
            }
            ("passthrough", Some("upper")) => {
                req.options.passthrough = true;
                req.options.lower_passthrough = false;
            }
            ("passthrough", Some(_)) => {
                return refuse(format!(
                    "bad mount option '{opt}': passthrough takes no value, 'all' or 'upper'"
                ));
            }
            ("nopassthrough", None) => {
                req.options.passthrough = false;
                req.options.lower_passthrough = false;
            }
            ("uidmapping", Some(v)) => req.options.uid_map = id_mapping(&opt, v)?,
            ("gidmapping", Some(v)) => req.options.gid_map = id_mapping(&opt, v)?,
            ("squash_to_root", None) => req.options.squash_to_root = true,
            ("squash_to_uid", Some(v)) => req.options.squash_to_uid = Some(squash_id(&opt, v)?),
            ("squash_to_gid", Some(v)) => req.options.squash_to_gid = Some(squash_id(&opt, v)?),
            ("static_nlink", None) => req.options.static_nlink = true,
            ("noacl", None) => req.options.noacl = true,
            ("nocache_readdir", None) => req.options.nocache_readdir = true,
            ("io_uring", None) => req.options.io_uring = true,
            ("noio_uring", None) => req.options.io_uring = false,
            ("nodev", None) => req.options.nodev = true,
            ("nosuid", None) => req.options.nosuid = true,
            ("noexec", None) => req.options.noexec = true,
            ("debug", None) => req.debug = true,
            ("allow_other" | "allow_root", None) => {
                let access = if key == "allow_other" {
                    Access::AllowOther
                } else {
                    Access::AllowRoot
                };
                if req.options.access != Access::Default && req.options.access != access {
                    return refuse(
                        "allow_other and allow_root cannot be used together \
                         (allow_other lets root in too)"
                            .into(),
                    );
                }
                req.options.access = access;
            }
            (k, _) if VALUED.contains(&k) => {
                return refuse(format!("bad mount option '{opt}': {k} needs a value"));
            }
            (k, Some(_)) if FLAGS.contains(&k) => {
                return refuse(format!("bad mount option '{opt}': {k} takes no value"));
            }
            (k, _) if ACCEPTED_NOOPS.contains(&k) || k.starts_with("x-") => {}
            _ => req
                .warnings
                .push(format!("ignoring unknown mount option '{opt}'")),
        }
    }
    Ok(())
}

fn id_mapping(opt: &str, value: &str) -> Result<IdMap, ConfigError> {
    IdMap::parse(value).or_else(|e| {
        refuse(format!(
            "bad mount option '{opt}': {e} (expected STORED:SHOWN:LENGTH[:STORED:SHOWN:LENGTH...])"
        ))
    })
}

fn squash_id(opt: &str, value: &str) -> Result<u32, ConfigError> {
    parse_squash_id(value).or_else(|e| refuse(format!("bad mount option '{opt}': {e}")))
}

/// Splits a comma-separated option list. A comma inside double quotes
/// belongs to the value, as the kernel reads it: SELinux labels carry
/// commas (`context="system_u:object_r:container_file_t:s0:c1,c2"`, as
/// podman passes it).
fn split_options(arg: &str) -> Vec<String> {
    let mut protected = String::with_capacity(arg.len());
    let mut quoted = false;
    let mut chars = arg.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                protected.push(c);
                if let Some(next) = chars.next() {
                    protected.push(next);
                }
            }
            '"' => {
                quoted = !quoted;
                protected.push(c);
            }
            ',' if quoted => protected.push_str("\\,"),
            c => protected.push(c),
        }
    }
    split_unescaped(&protected, ',')
}

/// Splits on `sep` except where it is escaped with a backslash.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                if next != sep && next != '\\' {
                    parts.last_mut().unwrap().push('\\');
                }
                parts.last_mut().unwrap().push(next);
            }
        } else if c == sep {
            parts.push(String::new());
        } else {
            parts.last_mut().unwrap().push(c);
        }
    }
    parts
}

/// A refused mount, with the message the user sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn refuse<T>(msg: String) -> Result<T, ConfigError> {
    Err(ConfigError(msg))
}

/// A mount that passed every check, all paths canonical.
#[derive(Debug, Clone)]
pub struct ValidMount {
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub fsname: String,
    pub options: MountOptions,
    pub foreground: bool,
    pub threads: usize,
    pub debug: bool,
    pub log_file: Option<PathBuf>,
    pub warnings: Vec<String>,
}

impl ValidMount {
    /// Without an upper there is nowhere to write.
    pub fn read_only(&self) -> bool {
        self.options.read_only || self.upper.is_none()
    }
}

fn existing_dir(role: &str, path: &Path) -> Result<PathBuf, ConfigError> {
    let canonical = match path.canonicalize() {
        Ok(p) => p,
        Err(e) => return refuse(format!("{role} '{}': {e}", path.display())),
    };
    match fs::metadata(&canonical) {
        Ok(meta) if meta.is_dir() => Ok(canonical),
        Ok(_) => refuse(format!("{role} '{}' is not a directory", path.display())),
        Err(e) if crate::daemon::is_dead_fuse_mount(&e) => {
            let how = if mounted_by_unionfs(&canonical) {
                "unionfs umount"
            } else {
                "umount"
            };
            refuse(format!(
                "{role} '{}' is a FUSE mount whose daemon is gone; unmount it first: {how} '{}'",
                path.display(),
                canonical.display()
            ))
        }
        Err(e) => refuse(format!("{role} '{}': {e}", path.display())),
    }
}

/// Whether `inner` is `outer` or lies below it.
fn within(inner: &Path, outer: &Path) -> bool {
    inner.starts_with(outer)
}

/// The default work directory: beside the upper, on its filesystem, and
/// outside both the upper and the merged view.
pub fn default_work_dir(upper: &Path) -> PathBuf {
    let name = upper
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_else(|| b"root".to_vec());
    let mut work_name = b".".to_vec();
    work_name.extend_from_slice(&name);
    work_name.extend_from_slice(b".unionfs-work");
    let parent = upper.parent().unwrap_or(Path::new("/"));
    parent.join(std::ffi::OsStr::from_bytes(&work_name))
}

pub fn validate(req: &MountRequest) -> Result<ValidMount, ConfigError> {
    if req.lowers.is_empty() {
        return refuse("no lower layer given (use --lower A:B:C or -o lowerdir=A:B:C)".into());
    }
    let mut lowers = Vec::new();
    for lower in &req.lowers {
        lowers.push(existing_dir("lower layer", lower)?);
    }
    let mountpoint = existing_dir("mountpoint", &req.mountpoint)?;

    let upper = match &req.upper {
        Some(u) => {
            let upper = existing_dir("upper layer", u)?;
            if !req.options.read_only
                && let Err(e) = nix::unistd::access(&upper, nix::unistd::AccessFlags::W_OK)
            {
                return refuse(format!(
                    "upper layer '{}' is not writable: {}",
                    u.display(),
                    e.desc()
                ));
            }
            Some(upper)
        }
        None => None,
    };
    if req.work.is_some() && upper.is_none() {
        return refuse("a work directory needs an upper layer (--upper)".into());
    }

    for lower in &lowers {
        if within(lower, &mountpoint) {
            return refuse(format!(
                "lower layer '{}' is inside the mountpoint '{}'",
                lower.display(),
                mountpoint.display()
            ));
        }
        if within(&mountpoint, lower) {
            return refuse(format!(
                "the mountpoint '{}' is inside lower layer '{}'",
                mountpoint.display(),
                lower.display()
            ));
        }
    }
    check_fuse_device()?;
    if mounted_by_unionfs(&mountpoint) {
        return refuse(format!(
            "'{}' is already a unionfs mount",
            mountpoint.display()
        ));
    }
    let work = match &upper {
        Some(upper) => {
            check_upper_placement(upper, &lowers, &mountpoint)?;
            Some(prepare_work_dir(
                req.work.as_deref(),
                upper,
                &lowers,
                &mountpoint,
            )?)
        }
        None => None,
    };

    let threads = req.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let fsname = req
        .options
        .fsname
        .clone()
        .or_else(|| req.source.clone())
        .unwrap_or_else(|| "unionfs".to_string());
    Ok(ValidMount {
        lowers,
        upper,
        work,
        mountpoint,
        fsname,
        options: req.options.clone(),
        foreground: req.foreground,
        threads,
        debug: req.debug,
        log_file: req.log_file.clone(),
        warnings: req.warnings.clone(),
    })
}

fn check_upper_placement(
    upper: &Path,
    lowers: &[PathBuf],
    mountpoint: &Path,
) -> Result<(), ConfigError> {
    if within(upper, mountpoint) {
        return refuse(format!(
            "upper layer '{}' is inside the mountpoint '{}'",
            upper.display(),
            mountpoint.display()
        ));
    }
    if within(mountpoint, upper) {
        return refuse(format!(
            "the mountpoint '{}' is inside upper layer '{}'",
            mountpoint.display(),
            upper.display()
        ));
    }
    for lower in lowers {
        if within(upper, lower) {
            return refuse(format!(
                "upper layer '{}' is inside lower layer '{}'",
                upper.display(),
                lower.display()
            ));
        }
        if within(lower, upper) {
            return refuse(format!(
                "lower layer '{}' is inside upper layer '{}'",
                lower.display(),
                upper.display()
            ));
        }
    }
    Ok(())
}

fn prepare_work_dir(
    work: Option<&Path>,
    upper: &Path,
    lowers: &[PathBuf],
    mountpoint: &Path,
) -> Result<PathBuf, ConfigError> {
    let explicit = work.is_some();
    let work = work
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_work_dir(upper));
    // Resolve where it would be before creating anything: a work dir that
    // overlaps a layer must be refused without touching the layer.
    let work = match (work.canonicalize(), work.parent(), work.file_name()) {
        (Ok(existing), _, _) => existing,
        (Err(_), Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(parent) => parent.join(name),
            Err(e) => return refuse(format!("work directory '{}': {e}", work.display())),
        },
        (Err(e), _, _) => return refuse(format!("work directory '{}': {e}", work.display())),
    };
    let clash = |what: &str, other: &Path| {
        refuse(format!(
            "work directory '{}' and {what} '{}' overlap",
            work.display(),
            other.display()
        ))
    };
    if within(&work, upper) || within(upper, &work) {
        return clash("upper layer", upper);
    }
    if within(&work, mountpoint) || within(mountpoint, &work) {
        return clash("mountpoint", mountpoint);
    }
    for lower in lowers {
        if within(&work, lower) || within(lower, &work) {
            return clash("lower layer", lower);
        }
    }
    if !work.exists()
        && let Err(e) = fs::create_dir(&work)
    {
        return refuse(format!("work directory '{}': {e}", work.display()));
    }
    if !work.is_dir() {
        return refuse(format!(
            "work directory '{}' is not a directory",
            work.display()
        ));
    }
    let dev = |p: &Path| fs::metadata(p).map(|m| m.dev()).ok();
    if dev(&work) != dev(upper) {
        let how = if explicit {
            ""
        } else {
            " (pass --work on the upper's filesystem)"
        };
        return refuse(format!(
            "work directory '{}' is not on the same filesystem as upper layer '{}'{how}",
            work.display(),
            upper.display()
        ));
    }
    Ok(work)
}

fn check_fuse_device() -> Result<(), ConfigError> {
    match fs::metadata("/dev/fuse") {
        Ok(m) if m.file_type().is_char_device() => {}
        Ok(_) => return refuse("/dev/fuse is not a character device".into()),
        Err(e) => {
            return refuse(format!(
                "/dev/fuse: {e} (load the fuse module or pass --device /dev/fuse to the container)"
            ));
        }
    }
    // The daemon opens it after detaching; found out here, the caller hears
    // why instead of only that the daemon died.
    open_fuse_device().map(drop).map_err(ConfigError)
}

/// Opens the FUSE device, or says why not and what to do about it.
pub fn open_fuse_device() -> Result<OwnedFd, String> {
    nix::fcntl::open(
        "/dev/fuse",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| {
        let hint = match e {
            Errno::EACCES | Errno::EPERM => {
                " (this user may not read and write it: mount as root, or give users \
                 read and write access to /dev/fuse, mode 0666 as distributions ship it)"
            }
            Errno::ENOENT | Errno::ENODEV | Errno::ENXIO => {
                " (load the fuse module or pass --device /dev/fuse to the container)"
            }
            _ => "",
        };
        format!("cannot open /dev/fuse: {}{hint}", e.desc())
    })
}

/// Where fusermount3 reads whether plain users may ask for `allow_other`.
pub const FUSE_CONF: &str = "/etc/fuse.conf";

/// Whether /etc/fuse.conf lets plain users mount with `allow_other` (a
/// line `user_allow_other`), read as fusermount3 reads it. A missing or
/// unreadable file counts as no.
pub fn user_allow_other() -> bool {
    fs::read(FUSE_CONF).is_ok_and(|text| fuse_conf_allows_other(&text))
}

/// fusermount3's reading of fuse.conf (`read_conf`): anything from `#` on
/// is a comment, white space around a line is dropped, and what is left
/// must be `user_allow_other` exactly. Like fusermount3, a line counts only
/// when it ends in a newline and fits its 256-byte buffer.
pub fn fuse_conf_allows_other(text: &[u8]) -> bool {
    // C's isspace(), which has \v where Rust's is_ascii_whitespace has not.
    let space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r');
    text.split_inclusive(|b| *b == b'\n')
        .filter(|line| line.ends_with(b"\n") && line.len() < 256 && !line.contains(&0))
        .any(|line| {
            let line = line.split(|b| *b == b'#').next().unwrap_or_default();
            let start = line.iter().position(|b| !space(b)).unwrap_or(line.len());
            let end = line
                .iter()
                .rposition(|b| !space(b))
                .map_or(start, |i| i + 1);
            &line[start..end] == b"user_allow_other"
        })
}

/// Whether `mountpoint` (canonical) carries a unionfs mount now.
pub fn mounted_by_unionfs(mountpoint: &Path) -> bool {
    crate::mountinfo::read().is_ok_and(|mounts| {
        mounts
            .iter()
            .any(|m| m.mount_point == mountpoint && m.fs_type == "fuse.unionfs")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_style_options_parse() {
        let mut req = MountRequest::default();
        apply_options(
            &mut req,
            "lowerdir=/l/a:/l/b,upperdir=/u,workdir=/w,,volatile,context=\"system_u:object_r:container_file_t:s0:c1,c2\",bogus=1",
        )
        .unwrap();
        assert_eq!(
            req.lowers,
            vec![PathBuf::from("/l/a"), PathBuf::from("/l/b")]
        );
        assert_eq!(req.upper, Some(PathBuf::from("/u")));
        assert_eq!(req.work, Some(PathBuf::from("/w")));
        assert!(req.options.volatile);
        assert!(!req.options.read_only);
        // The comma inside the quoted SELinux label is not a separator.
        assert_eq!(req.warnings, ["ignoring unknown mount option 'bogus=1'"]);
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "threads=0",
            "threads=x",
            "threads=",
            "threads",
            "lowerdir",
            "upperdir=",
            "workdir",
            "passthrough=most",
            "volatile=1",
            "ro=yes",
            "uidmapping",
            "uidmapping=",
            "uidmapping=0:100000",
            "uidmapping=0:100000:0",
            "gidmapping=0:x:10",
            "gidmapping=0:100:10:5:200:10",
            "uidmapping=0:100:10:50:105:10",
            "uidmapping=1:0:4294967295",
            "squash_to_uid",
            "squash_to_uid=-1",
            "squash_to_gid=root",
            "squash_to_root=1",
            "static_nlink=yes",
            "noacl=0",
            "nocache_readdir=1",
            "noio_uring=yes",
        ] {
            let mut req = MountRequest::default();
            let err = apply_options(&mut req, bad).expect_err(bad);
            assert!(err.0.contains(bad), "{bad}: {err}");
        }
        let mut req = MountRequest::default();
        apply_options(
            &mut req,
            "threads=3,passthrough=all,ro,,x-systemd.automount,nocache_readdir",
        )
        .unwrap();
        assert_eq!(req.threads, Some(3));
        assert!(req.options.lower_passthrough && req.options.read_only);
        assert!(req.options.nocache_readdir);
        assert!(req.options.io_uring, "io_uring is the default");
        assert!(req.warnings.is_empty(), "{:?}", req.warnings);
        apply_options(&mut req, "noio_uring").unwrap();
        assert!(!req.options.io_uring);
        apply_options(&mut req, "io_uring").unwrap();
        assert!(req.options.io_uring);
    }

    #[test]
    fn unknown_options_warn() {
        let mut req = MountRequest::default();
        apply_options(&mut req, "squash_to_root,noatime,uidmapping=0:1:1,frob").unwrap();
        assert_eq!(req.warnings, ["ignoring unknown mount option 'frob'"]);
    }

    #[test]
    fn fuse_overlayfs_id_options_parse() {
        let mut req = MountRequest::default();
        apply_options(
            &mut req,
            "uidmapping=0:100000:65536,gidmapping=0:200000:1:1:300000:10,static_nlink,noacl",
        )
        .unwrap();
        let o = &req.options;
        assert_eq!(o.uid_map.to_shown(1), Some(100001));
        assert_eq!(o.gid_map.to_shown(0), Some(200000));
        assert_eq!(o.gid_map.to_shown(5), Some(300004));
        assert!(o.static_nlink && o.noacl);
        assert!(o.squash().is_none());
        assert!(req.warnings.is_empty(), "{:?}", req.warnings);

        // squash_to_uid/gid win over squash_to_root, in any order.
        let mut req = MountRequest::default();
        apply_options(&mut req, "squash_to_gid=5,squash_to_root").unwrap();
        assert_eq!(
            req.options.squash(),
            Squash {
                uid: Some(0),
                gid: Some(5)
            }
        );
        let mut req = MountRequest::default();
        apply_options(&mut req, "squash_to_uid=1000").unwrap();
        assert_eq!(
            req.options.squash(),
            Squash {
                uid: Some(1000),
                gid: None
            }
        );
    }

    #[test]
    fn bad_mappings_say_what_is_wrong() {
        for (bad, says) in [
            ("uidmapping=0:100000", "triples"),
            ("uidmapping=0:100000:0", "empty"),
            ("gidmapping=0:100:10:5:200:10", "overlap"),
            ("uidmapping=a:1:1", "'a' is not an id"),
        ] {
            let mut req = MountRequest::default();
            let err = apply_options(&mut req, bad).expect_err(bad);
            assert!(err.0.contains(says), "{bad}: {err}");
            assert!(err.0.contains("STORED:SHOWN:LENGTH"), "{bad}: {err}");
        }
    }

    #[test]
    fn escaped_separators_stay_in_paths() {
        let mut req = MountRequest::default();
        apply_options(&mut req, r"lowerdir=/a\:b:/c\,d,ro").unwrap();
        assert_eq!(
            req.lowers,
            vec![PathBuf::from("/a:b"), PathBuf::from("/c,d")]
        );
        assert!(req.options.read_only);
    }

    #[test]
    fn allow_other_and_allow_root_are_options() {
        let mut req = MountRequest::default();
        assert_eq!(req.options.access, Access::Default);
        apply_options(&mut req, "allow_other,allow_other").unwrap();
        assert_eq!(req.options.access, Access::AllowOther);
        let mut req = MountRequest::default();
        apply_options(&mut req, "allow_root").unwrap();
        assert_eq!(req.options.access, Access::AllowRoot);
        let err = apply_options(&mut req, "allow_other").unwrap_err();
        assert!(err.0.contains("cannot be used together"), "{err}");
        assert!(apply_options(&mut MountRequest::default(), "allow_other=1").is_err());
        assert!(req.warnings.is_empty(), "{:?}", req.warnings);
    }

    #[test]
    fn fuse_conf_is_read_as_fusermount3_reads_it() {
        for (text, expected) in [
            ("user_allow_other\n", true),
            (
                "# comment\n  user_allow_other \t# why\nmount_max = 1000\n",
                true,
            ),
            ("\x0buser_allow_other\r\n", true),
            ("#user_allow_other\n", false),
            ("# user_allow_other - lets users ...\n", false),
            ("user_allow_other=1\n", false),
            ("user_allow_others\n", false),
            ("allow user_allow_other\n", false),
            // fusermount3 only reads lines that end in a newline...
            ("user_allow_other", false),
            ("mount_max = 10\nuser_allow_other", false),
            // ...and fit in its buffer.
            (&format!("{}user_allow_other\n", " ".repeat(238)), true),
            (&format!("{}user_allow_other\n", " ".repeat(239)), false),
            ("", false),
        ] {
            assert_eq!(
                fuse_conf_allows_other(text.as_bytes()),
                expected,
                "{text:?}"
            );
        }
    }

    #[test]
    fn default_work_dir_sits_beside_the_upper() {
        assert_eq!(
            default_work_dir(Path::new("/var/c1/upper")),
            PathBuf::from("/var/c1/.upper.unionfs-work")
        );
    }
}
