//! Containers: a thin writable layer over an image's layers, and the
//! `unionfs container create|mount|umount|ls|rm` commands.
//!
//! ```text
//! <root>/containers/<name>/upper/   the container's upper (kernel overlayfs format)
//! <root>/containers/<name>/work/    its work dir (flock'ed by the daemon serving it)
//! ```
//!
//! The index (`containers` in index.json) records each container's image,
//! its layers and creation time, and where `container mount` last mounted
//! it. A mount is an ordinary unionfs mount ([`crate::daemon::mount`]) of
//! the image's layer directories under that upper and work dir, so a
//! container is mounted while a daemon holds its work dir's flock.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag, fstatat};
use serde_json::{Value, json};

use super::output::{human_size, print_json, print_table, rfc3339};
use super::query::resolve;
use super::store::{ContainerRecord, Index, Store, now_secs};
use super::{Context, Result};
use crate::cli::UmountArgs;
use crate::config::{self, MountRequest};
use crate::overlay::attr::FileKind;
use crate::overlay::layer::{list_dir, open_beneath};

const MAX_NAME: usize = 128;

/// Container names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, as docker takes them.
pub fn validate_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        return Err(format!(
            "invalid container name '{name}': use letters, digits, '_', '.' and '-', \
             starting with a letter or digit"
        ));
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "invalid container name '{name}': longer than {MAX_NAME} characters"
        ));
    }
    Ok(())
}

pub(crate) fn upper_dir(store: &Store, name: &str) -> PathBuf {
    store.container_dir(name).join("upper")
}

fn work_dir(store: &Store, name: &str) -> PathBuf {
    store.container_dir(name).join("work")
}

/// Takes the flock a daemon holds on the work dir while it serves the
/// container. `Ok(None)`: a daemon holds it (or the dir is gone).
fn lock_work_dir(store: &Store, name: &str) -> Result<Option<Flock<File>>> {
    let path = work_dir(store, name);
    let dir = match File::open(&path) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
    };
    match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// Whether a daemon serves this container now (holds its work dir).
pub(crate) fn work_dir_busy(store: &Store, name: &str) -> bool {
    work_dir(store, name).exists() && matches!(lock_work_dir(store, name), Ok(None))
}

/// Where the container is mounted: its recorded mountpoint, if a unionfs
/// mount is there now.
pub(crate) fn mounted_at(record: &ContainerRecord) -> Option<&Path> {
    record
        .mountpoint
        .as_deref()
        .filter(|mp| config::mounted_by_unionfs(mp))
}

pub(crate) fn get<'a>(index: &'a Index, name: &str) -> Result<&'a ContainerRecord> {
    index
        .containers
        .get(name)
        .ok_or_else(|| format!("no such container: {name}"))
}

/// Removes a tree of any depth without following symlinks (the upper may
/// hold whiteout devices, opaque directories and trees deeper than a path
/// can name): the core's iterative remove, one descriptor per level.
pub(crate) fn remove_deep(path: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(format!("cannot remove {}", path.display()));
    };
    crate::daemon::raise_fd_limit();
    let parent = match nix::fcntl::open(
        parent,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(format!("cannot open {}: {}", parent.display(), e.desc())),
    };
    crate::overlay::workdir::remove_tree(parent.as_fd(), name)
        .map_err(|e| format!("cannot remove {}: {e}", path.display()))
}

/// Bytes of file content in a tree (hard links once), walked by
/// descriptors so that any depth works; entries that vanish meanwhile (a
/// mounted container changes) are skipped.
fn tree_size(path: &Path) -> u64 {
    crate::daemon::raise_fd_limit();
    let Ok(root) = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return 0;
    };
    let mut seen: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut total = 0;
    let names = |fd: &OwnedFd| -> Vec<(OsString, Option<FileKind>)> {
        list_dir(fd.as_fd())
            .map(|entries| entries.into_iter().map(|(n, _, k)| (n, k)).collect())
            .unwrap_or_default()
    };
    let first = names(&root);
    let mut stack = vec![(root, first)];
    while let Some((dir, pending)) = stack.last_mut() {
        let Some((name, kind)) = pending.pop() else {
            stack.pop();
            continue;
        };
        let stat = |dir: &OwnedFd, name: &OsStr| -> Option<FileStat> {
            fstatat(dir.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).ok()
        };
        let is_dir = match kind {
            Some(kind) => kind == FileKind::Directory,
            None => stat(dir, &name).is_some_and(|st| {
                SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR
            }),
        };
        if is_dir {
            if let Ok(sub) = open_beneath(dir.as_fd(), &name, OFlag::O_PATH | OFlag::O_DIRECTORY) {
                let children = names(&sub);
                stack.push((sub, children));
            }
            continue;
        }
        if let Some(st) = stat(dir, &name)
            && SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
            && (st.st_nlink <= 1 || seen.insert((st.st_dev, st.st_ino)))
        {
            total += st.st_size as u64;
        }
    }
    total
}

/// `container create --name NAME IMAGE`.
pub fn create(store: &Store, name: &str, reference: &str) -> Result<()> {
    validate_name(name)?;
    let lock = store.lock_exclusive()?;
    let mut index = store.read_index(&lock)?;
    if index.containers.contains_key(name) {
        return Err(format!("a container named '{name}' exists already"));
    }
    let id = resolve(&index, reference)?;
    let layers = index.images[&id].layers.clone();
    let dir = store.container_dir(name);
    let made = (|| {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .ctx(|| format!("cannot create {}", dir.display()))?;
        let upper = dir.join("upper");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&upper)
            .ctx(|| format!("cannot create {}", upper.display()))?;
        // The merged root takes the upper root's owner and mode: give it
        // the image's (as containers/storage does), not this process's.
        if let Some(top) = layers.last() {
            let root = fs::symlink_metadata(store.layer_dir(top))
                .ctx(|| format!("cannot stat layer {top}"))?;
            std::os::unix::fs::lchown(&upper, Some(root.uid()), Some(root.gid()))
                .or_else(|e| {
                    // Without root only one's own files can be given away.
                    if e.raw_os_error() == Some(libc::EPERM) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .ctx(|| format!("cannot chown {}", upper.display()))?;
            fs::set_permissions(
                &upper,
                std::os::unix::fs::PermissionsExt::from_mode(root.mode() & 0o7777),
            )
            .ctx(|| format!("cannot chmod {}", upper.display()))?;
        }
        let work = dir.join("work");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&work)
            .ctx(|| format!("cannot create {}", work.display()))?;
        // On disk before the index names the container.
        for synced in [&dir, &store.containers_dir()] {
            File::open(synced)
                .and_then(|d| d.sync_all())
                .ctx(|| format!("cannot sync {}", synced.display()))?;
        }
        index.containers.insert(
            name.to_string(),
            ContainerRecord {
                image: id.clone(),
                layers,
                created: now_secs(),
                mountpoint: None,
            },
        );
        store.write_index(&lock, &index)
    })();
    if let Err(e) = made {
        let _ = remove_deep(&dir);
        return Err(e);
    }
    println!("{name}");
    Ok(())
}

/// `container mount NAME MOUNTPOINT [-o OPT]`: `unionfs mount` of the
/// image's layers (top first) under the container's upper and work dir.
pub fn mount(store: &Store, name: &str, mountpoint: &Path, options: &[String]) -> Result<()> {
    validate_name(name)?;
    let record = {
        let lock = store.lock_shared()?;
        get(&store.read_index(&lock)?, name)?.clone()
    };
    if let Some(at) = mounted_at(&record) {
        return Err(format!(
            "container {name} is mounted already, at {}",
            at.display()
        ));
    }
    if work_dir_busy(store, name) {
        return Err(format!(
            "container {name} is in use by a unionfs daemon (a lazily unmounted mount \
             still busy?); wait for it to exit"
        ));
    }
    let mut req = MountRequest::default();
    for opts in options {
        config::apply_options(&mut req, opts).map_err(|e| e.0)?;
    }
    if !req.lowers.is_empty() || req.upper.is_some() || req.work.is_some() {
        return Err(
            "lowerdir=, upperdir= and workdir= are the container's own: not options of \
             container mount"
                .into(),
        );
    }
    req.lowers = record
        .layers
        .iter()
        .rev()
        .map(|d| store.layer_dir(d))
        .collect();
    req.upper = Some(upper_dir(store, name));
    req.work = Some(work_dir(store, name));
    req.mountpoint = mountpoint.to_path_buf();
    req.source = Some(format!("unionfs-container:{name}"));
    for warning in &req.warnings {
        eprintln!("unionfs: warning: {warning}");
    }
    let valid = config::validate(&req).map_err(|e| e.to_string())?;
    let target = valid.mountpoint.clone();
    // Recorded before the mount, so that no crash can leave the container
    // mounted where its record does not say; `mounted_at` checks the record
    // against mountinfo anyway.
    set_mountpoint(store, name, Some(&target))?;
    let mounted = crate::daemon::mount(valid);
    if mounted.is_err() {
        let _ = set_mountpoint(store, name, None);
    }
    mounted
}

fn set_mountpoint(store: &Store, name: &str, mountpoint: Option<&Path>) -> Result<()> {
    let lock = store.lock_exclusive()?;
    let mut index = store.read_index(&lock)?;
    let Some(record) = index.containers.get_mut(name) else {
        return Err(format!("no such container: {name}"));
    };
    if record.mountpoint.as_deref() == mountpoint {
        return Ok(());
    }
    record.mountpoint = mountpoint.map(Path::to_path_buf);
    store.write_index(&lock, &index)
}

/// `container umount NAME`: `unionfs umount` of where it is mounted.
pub fn umount(store: &Store, name: &str, lazy: bool, timeout: u64) -> Result<()> {
    validate_name(name)?;
    let record = {
        let lock = store.lock_shared()?;
        get(&store.read_index(&lock)?, name)?.clone()
    };
    let Some(mountpoint) = mounted_at(&record) else {
        return Err(format!("container {name} is not mounted"));
    };
    crate::daemon::umount(&UmountArgs {
        mountpoint: mountpoint.to_path_buf(),
        lazy,
        timeout,
    })?;
    set_mountpoint(store, name, None)
}

/// `container ls [--format json]`.
pub fn ls(store: &Store, json: bool) -> Result<()> {
    let index = {
        let lock = store.lock_shared()?;
        store.read_index(&lock)?
    };
    let rows: Vec<(&String, String, &ContainerRecord, Option<&Path>, u64)> = index
        .containers
        .iter()
        .map(|(name, record)| {
            (
                name,
                image_name(&index, record),
                record,
                mounted_at(record),
                tree_size(&upper_dir(store, name)),
            )
        })
        .collect();
    if json {
        let list: Vec<Value> = rows
            .iter()
            .map(|(name, image, record, at, size)| {
                json!({
                    "Name": name,
                    "Image": image,
                    "ImageId": record.image.to_string(),
                    "Created": rfc3339(record.created),
                    "MountedAt": at.map(|p| p.display().to_string()),
                    "Size": size,
                    "UpperDir": upper_dir(store, name).display().to_string(),
                })
            })
            .collect();
        print_json(&Value::Array(list));
        return Ok(());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(name, image, record, at, size)| {
            vec![
                name.to_string(),
                image.clone(),
                rfc3339(record.created)
                    .replace('T', " ")
                    .replace('Z', " UTC"),
                at.map(|p| p.display().to_string()).unwrap_or_default(),
                human_size(*size),
            ]
        })
        .collect();
    print_table(&["NAME", "IMAGE", "CREATED", "MOUNTED AT", "SIZE"], &table);
    Ok(())
}

/// The image as `ls` names it: its first tag, or its short ID.
pub(crate) fn image_name(index: &Index, record: &ContainerRecord) -> String {
    index
        .images
        .get(&record.image)
        .and_then(|i| i.repo_tags.first().cloned())
        .unwrap_or_else(|| record.image.short().to_string())
}

/// Bytes in each container's upper, for `system df`.
pub(crate) fn upper_sizes(store: &Store, index: &Index) -> Vec<(String, u64)> {
    index
        .containers
        .keys()
        .map(|name| (name.clone(), tree_size(&upper_dir(store, name))))
        .collect()
}

/// Whether the container is mounted, for `system df`.
pub(crate) fn is_mounted(record: &ContainerRecord) -> bool {
    mounted_at(record).is_some()
}

/// `container rm NAME`: refused while mounted; the index first, then the
/// directories (moved into a locked `tmp/` entry and removed there).
pub fn rm(store: &Store, name: &str) -> Result<()> {
    validate_name(name)?;
    // Before the store lock: making it takes the lock too.
    let trash = store.work_dir("container-rm")?;
    let lock = store.lock_exclusive()?;
    let mut index = store.read_index(&lock)?;
    let record = get(&index, name)?;
    if let Some(at) = mounted_at(record) {
        return Err(format!(
            "container {name} is mounted at {}: unmount it first (unionfs container umount {name})",
            at.display()
        ));
    }
    // Held until the directories are gone: a mount starting now fails on it.
    let Some(_work) = lock_work_dir(store, name)? else {
        return Err(format!(
            "container {name} is in use by a unionfs daemon (a lazily unmounted mount \
             still busy?); try again once it has exited"
        ));
    };
    index.containers.remove(name);
    store.write_index(&lock, &index)?;
    let dir = store.container_dir(name);
    let doomed = trash.path().join("container");
    // If this fails, the directory stays where it is, unlisted, and the
    // next command removes it; the container is gone either way.
    let target = match fs::rename(&dir, &doomed) {
        Ok(()) => doomed,
        Err(_) => dir,
    };
    drop(lock);
    remove_deep(&target)?;
    println!("{name}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "web-1", "A.b_c", "0", "x".repeat(128).as_str()] {
            validate_name(good).unwrap();
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "a/b",
            "..",
            "a b",
            "é",
            "a\n",
            "x".repeat(129).as_str(),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tree_size_counts_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"12345").unwrap();
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        fs::write(dir.path().join("d/c"), b"123").unwrap();
        std::os::unix::fs::symlink("a", dir.path().join("l")).unwrap();
        assert_eq!(tree_size(dir.path()), 8);
    }
}
