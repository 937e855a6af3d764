//! The store on disk, its lock and its index.
//!
//! ```text
//! <root>/lock                  flock: shared to read the index, exclusive to change it
//! <root>/index.json            images (tags, diff_ids) and layers (sizes)
//! <root>/images/<id hex>.json  each image's config, byte for byte (its sha256 is the ID)
//! <root>/layers/<diff_id hex>/ each layer unpacked, read as a unionfs lower
//! <root>/blobs/sha256/<diff_id hex>  each layer's original uncompressed tar, byte for byte
//!                              (its sha256 is the diff_id), for `image save`
//! <root>/tmp/<name>/           work in progress, flock'ed by its owner
//! <root>/containers/<name>/    a container's upper/ and work/ (index: image, created)
//! ```
//!
//! Invariant, outside the lock: a layer directory exists iff the index
//! lists it, and every layer an image lists exists. Everything that changes
//! the store builds its objects in `tmp/` and, under the exclusive lock,
//! renames them into place and writes the index (temp file, fsync, rename).
//! A process killed at any point leaves at worst an unlocked `tmp/` entry
//! or an unreferenced layer, which the next command removes ([`Store::collect_garbage`]).
//!
//! Containers keep the same invariant: a container is created by making
//! its directory and then writing the index, and removed by writing the
//! index and then removing its directory, both under the exclusive lock;
//! a container directory the index does not list is a crash's leftover.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::{Context, Result};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Index {
    pub images: BTreeMap<Digest, ImageRecord>,
    pub layers: BTreeMap<Digest, LayerRecord>,
    /// Containers by name (absent in indexes written before containers).
    #[serde(default)]
    pub containers: BTreeMap<String, ContainerRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// The image it was created from; `image rm` refuses it while the
    /// container exists.
    pub image: Digest,
    /// The image's diff_ids at creation, bottom layer first: its lowers.
    pub layers: Vec<Digest>,
    /// When it was created (seconds since the epoch).
    pub created: u64,
    /// Where `container mount` last mounted it; whether it is still
    /// mounted there is what /proc/self/mountinfo says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `NAME:TAG` references; a tag names one image, the last one loaded.
    pub repo_tags: Vec<String>,
    /// diff_ids, bottom layer first (the config's `rootfs.diff_ids`).
    pub layers: Vec<Digest>,
    /// When it was loaded (seconds since the epoch).
    pub loaded: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Bytes of file content in the layer (hard links counted once), as
    /// docker reports a layer's size.
    pub size: u64,
    /// Bytes of the layer's original tar kept in `blobs/sha256/`; `None`
    /// for a layer loaded before unionfs kept the tars (it cannot be
    /// saved until an image with it is loaded again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar_size: Option<u64>,
}

impl Index {
    /// The images containers were created from, with the containers' names.
    pub fn images_in_use(&self) -> BTreeMap<&Digest, Vec<&str>> {
        let mut users: BTreeMap<&Digest, Vec<&str>> = BTreeMap::new();
        for (name, container) in &self.containers {
            users.entry(&container.image).or_default().push(name);
        }
        users
    }

    /// Layers some image uses.
    pub fn referenced_layers(&self) -> BTreeSet<Digest> {
        self.images
            .values()
            .flat_map(|i| i.layers.iter().cloned())
            .collect()
    }

    /// Bytes of the kept layer tars.
    pub fn tar_bytes(&self) -> u64 {
        self.layers.values().filter_map(|l| l.tar_size).sum()
    }

    pub fn image_size(&self, image: &ImageRecord) -> u64 {
        let unique: BTreeSet<&Digest> = image.layers.iter().collect();
        unique
            .into_iter()
            .map(|d| self.layers.get(d).map_or(0, |l| l.size))
            .sum()
    }
}

pub struct Store {
    root: PathBuf,
    lock_file: File,
}

/// Held while the index is read (shared) or changed (exclusive).
pub struct StoreLock {
    _lock: Flock<File>,
}

/// A directory under `tmp/` that this process works in; flock'ed for its
/// life so that no other command takes it for a crash's leftovers, and
/// removed on drop.
pub struct WorkDir {
    path: PathBuf,
    _lock: Option<Flock<File>>,
}

impl WorkDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = remove_tree(&self.path);
    }
}

/// The default store: `/var/lib/unionfs` for root, else
/// `$XDG_DATA_HOME/unionfs` or `~/.local/share/unionfs`.
pub fn default_root() -> Result<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/unionfs"));
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(data).join("unionfs"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or("neither XDG_DATA_HOME nor HOME is set: give the store with --root")?;
    Ok(PathBuf::from(home).join(".local/share/unionfs"))
}

impl Store {
    /// Opens (creating if needed) the store at `root`, and removes what
    /// crashed commands left behind.
    pub fn open(root: &Path) -> Result<Store> {
        let mut builder = fs::DirBuilder::new();
        // Layers hold setuid files and device nodes: only the owner may
        // walk the store (docker's /var/lib/docker is 0710 for the same reason).
        builder.recursive(true).mode(0o700);
        for dir in [
            "",
            "images",
            "layers",
            "blobs",
            "blobs/sha256",
            "tmp",
            "containers",
        ] {
            builder
                .create(root.join(dir))
                .ctx(|| format!("cannot create the store at {}", root.display()))?;
        }
        let lock_file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join("lock"))
            .ctx(|| format!("cannot open {}", root.join("lock").display()))?;
        let store = Store {
            root: root.to_path_buf(),
            lock_file,
        };
        let lock = store.lock_exclusive()?;
        store.collect_garbage(&lock)?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, arg: FlockArg) -> Result<StoreLock> {
        let file = self.lock_file.try_clone().ctx(|| "dup store lock".into())?;
        let lock = Flock::lock(file, arg)
            .map_err(|(_, e)| format!("cannot lock the store {}: {e}", self.root.display()))?;
        Ok(StoreLock { _lock: lock })
    }

    pub fn lock_shared(&self) -> Result<StoreLock> {
        self.lock(FlockArg::LockShared)
    }

    pub fn lock_exclusive(&self) -> Result<StoreLock> {
        self.lock(FlockArg::LockExclusive)
    }

    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(diff_id.hex())
    }

    pub fn containers_dir(&self) -> PathBuf {
        self.root.join("containers")
    }

    pub fn container_dir(&self, name: &str) -> PathBuf {
        self.containers_dir().join(name)
    }

    /// The layer's original uncompressed tar (content-addressed: its
    /// sha256 is the diff_id).
    pub fn layer_tar(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(diff_id.hex())
    }

    pub fn config_path(&self, id: &Digest) -> PathBuf {
        self.root.join("images").join(format!("{}.json", id.hex()))
    }

    pub fn read_index(&self, _lock: &StoreLock) -> Result<Index> {
        let path = self.root.join("index.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .ctx(|| format!("the store index {} is corrupt", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Replaces the index atomically (needs the exclusive lock).
    pub fn write_index(&self, _lock: &StoreLock, index: &Index) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(index).ctx(|| "serialize the index".into())?;
        write_atomically(&self.root.join("index.json"), &bytes)
    }

    /// Writes an image's config (under the exclusive lock, before the
    /// index names the image).
    pub fn write_config(&self, id: &Digest, config: &[u8]) -> Result<()> {
        write_atomically(&self.config_path(id), config)
    }

    pub fn read_config(&self, id: &Digest) -> Result<Vec<u8>> {
        let path = self.config_path(id);
        fs::read(&path).ctx(|| format!("cannot read image config {}", path.display()))
    }

    /// A fresh work directory in `tmp/`, flock'ed before the store lock is
    /// released so that garbage collection never mistakes it for a leftover.
    pub fn work_dir(&self, purpose: &str) -> Result<WorkDir> {
        let _guard = self.lock_exclusive()?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = self
            .root
            .join("tmp")
            .join(format!("{purpose}-{}-{nanos}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .ctx(|| format!("cannot create {}", path.display()))?;
        let dir = File::open(&path).ctx(|| format!("open {}", path.display()))?;
        let lock = Flock::lock(dir, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| format!("cannot lock {}: {e}", path.display()))?;
        Ok(WorkDir {
            path,
            _lock: Some(lock),
        })
    }

    /// Removes crash leftovers: unlocked `tmp/` entries, layer directories,
    /// layer tars and configs the index does not list. Needs the exclusive lock (a
    /// load renames layers in and writes the index under one holding of it).
    pub fn collect_garbage(&self, lock: &StoreLock) -> Result<()> {
        for entry in read_dir_names(&self.root.join("tmp"))? {
            let path = self.root.join("tmp").join(&entry);
            let Ok(dir) = File::open(&path) else {
                let _ = fs::remove_file(&path);
                continue;
            };
            // A live command holds its work dir's lock; a dead one's is free.
            if let Ok(held) = Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
                remove_tree(&path).ctx(|| format!("cannot remove leftover {}", path.display()))?;
                drop(held);
            }
        }
        let index = self.read_index(lock)?;
        for name in read_dir_names(&self.root.join("layers"))? {
            let listed = Digest::from_hex(&name).is_some_and(|d| index.layers.contains_key(&d));
            if !listed {
                let path = self.root.join("layers").join(&name);
                remove_tree(&path).ctx(|| format!("cannot remove stray {}", path.display()))?;
            }
        }
        for name in read_dir_names(&self.root.join("blobs/sha256"))? {
            let listed = Digest::from_hex(&name)
                .and_then(|d| index.layers.get(&d))
                .is_some_and(|l| l.tar_size.is_some());
            if !listed {
                let _ = fs::remove_file(self.root.join("blobs/sha256").join(&name));
            }
        }
        for name in read_dir_names(&self.root.join("images"))? {
            let listed = name
                .strip_suffix(".json")
                .and_then(Digest::from_hex)
                .is_some_and(|d| index.images.contains_key(&d));
            if !listed {
                let _ = fs::remove_file(self.root.join("images").join(&name));
            }
        }
        for name in read_dir_names(&self.containers_dir())? {
            if index.containers.contains_key(&name) {
                continue;
            }
            // A create or rm that was killed. Never one a daemon serves:
            // it holds the work dir's flock.
            if super::container::work_dir_busy(self, &name) {
                continue;
            }
            let path = self.container_dir(&name);
            super::container::remove_deep(&path)
                .map_err(|e| format!("cannot remove leftover {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>> {
    let entries = fs::read_dir(dir).ctx(|| format!("cannot list {}", dir.display()))?;
    Ok(entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

/// Writes `bytes` to a temp file beside `path`, fsyncs it, renames it over
/// `path` and fsyncs the directory: readers see the old or the new file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.ctx(|| format!("cannot write {}", path.display()))
}

/// Removes a tree without following symlinks. Directories are made
/// writable first, because an unpacked layer may hold read-only ones
/// that an unprivileged owner could not empty otherwise.
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            make_dirs_writable(path);
            match fs::remove_dir_all(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        }
    }
}

fn make_dirs_writable(path: &Path) {
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&dir) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(&dir) {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
