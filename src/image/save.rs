//! `unionfs image save`: an image as a docker-archive or oci-archive that
//! `podman load` and `docker load` take.
//!
//! The layers are the tars `image load` kept in `blobs/sha256/` (byte for
//! byte what was loaded, so their sha256 is still the config's diff_id,
//! which is checked again while they are read), gzip-compressed here.
//! The unpacked layer directories are not used: a tar written from them
//! would not reproduce the diff_ids (entry order, header format, user
//! names, which name of a hard link holds the data and the padding are
//! not in the tree), and the image config, whose sha256 is the image ID,
//! names those diff_ids.
//!
//! The output is deterministic: the same image saved twice gives the
//! same bytes (fixed entry order, zero times and owners in the archive's
//! own headers, gzip without a name or time, JSON with sorted keys).
//! Each layer is compressed to a temp file in the store's `tmp/` (a tar
//! header needs the size first, the manifest the digest), appended, and
//! removed; a `-o FILE` is written beside FILE (`.FILE.unionfs-save-PID`)
//! and renamed over it when whole, so a failed save leaves no half
//! archive. A save killed meanwhile leaves its temp; the next save to
//! the same FILE removes the temps whose process is gone.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use super::digest::{Digest, HashingReader, HashingWriter};
use super::output::stderr_is_terminal;
use super::query::{resolve, with_default_tag};
use super::store::Store;
use super::{Context, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveFormat {
    DockerArchive,
    OciArchive,
}

pub struct SaveOptions {
    pub image: String,
    /// The archive's path; stdout when `None`.
    pub output: Option<PathBuf>,
    pub format: SaveFormat,
    pub quiet: bool,
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A layer tar opened under the store lock (an `image rm` meanwhile
/// cannot take it away) and its diff_id.
struct LayerTar {
    diff_id: Digest,
    file: File,
    size: u64,
}

/// A compressed layer as it goes into the archive.
struct Blob {
    digest: Digest,
    size: u64,
}

pub fn save(store: &Store, options: &SaveOptions) -> Result<()> {
    if options.output.is_none() && io::stdout().is_terminal() {
        return Err(
            "refusing to write an image archive to a terminal: give -o FILE or redirect stdout"
                .into(),
        );
    }
    let (id, tags, config, diff_ids, layers) = {
        let lock = store.lock_shared()?;
        let index = store.read_index(&lock)?;
        let id = resolve(&index, &options.image)?;
        let image = &index.images[&id];
        // Saved by a tag: that tag, as `docker save NAME:TAG` does; by ID: all of them.
        let tags: Vec<String> = [
            with_default_tag(&options.image),
            format!("localhost/{}", with_default_tag(&options.image)),
        ]
        .into_iter()
        .find(|t| image.repo_tags.contains(t))
        .map_or_else(|| image.repo_tags.clone(), |t| vec![t]);
        let mut layers: Vec<LayerTar> = Vec::new();
        for diff_id in &image.layers {
            if layers.iter().any(|l| &l.diff_id == diff_id) {
                continue;
            }
            let size = index
                .layers
                .get(diff_id)
                .and_then(|l| l.tar_size)
                .ok_or_else(|| {
                    format!(
                        "layer {diff_id} was stored before unionfs kept layer tars: load the image again to save it"
                    )
                })?;
            let path = store.layer_tar(diff_id);
            let file = File::open(&path).ctx(|| format!("cannot open {}", path.display()))?;
            layers.push(LayerTar {
                diff_id: diff_id.clone(),
                file,
                size,
            });
        }
        let config = store.read_config(&id)?;
        (id, tags, config, image.layers.clone(), layers)
    };
    if Digest::of(&config) != id {
        return Err(format!(
            "the stored config of image {id} does not match its ID (the store is damaged)"
        ));
    }
    let work = store.work_dir("save")?;
    let progress = progress_bar(options.quiet, &layers);
    let out = Output::open(options.output.as_deref())?;
    let mut archive = tar::Builder::new(BufWriter::with_capacity(256 * 1024, out));
    let mut blobs: Vec<(Digest, Blob)> = Vec::new();
    if options.format == SaveFormat::OciArchive {
        append(
            &mut archive,
            "oci-layout",
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
    }
    for (n, layer) in layers.into_iter().enumerate() {
        progress.set_message(format!("layer {} {}", n + 1, layer.diff_id.short()));
        let diff_id = layer.diff_id.clone();
        let temp = work.path().join(format!("layer-{n}.gz"));
        let blob = compress_verified(layer, &temp, &progress)?;
        let name = format!("blobs/sha256/{}", blob.digest.hex());
        let file = File::open(&temp).ctx(|| format!("open {}", temp.display()))?;
        append_reader(&mut archive, &name, blob.size, BufReader::new(file))?;
        let _ = fs::remove_file(&temp);
        blobs.push((diff_id, blob));
    }
    progress.finish_and_clear();
    // The manifest lists every layer in order, a repeated one each time.
    let layer_blobs: Vec<&Blob> = diff_ids
        .iter()
        .filter_map(|d| blobs.iter().find(|(id, _)| id == d).map(|(_, b)| b))
        .collect();
    match options.format {
        SaveFormat::DockerArchive => {
            let config_name = format!("{}.json", id.hex());
            append(&mut archive, &config_name, &config)?;
            let manifest = json!([{
                "Config": config_name,
                "RepoTags": tags,
                "Layers": layer_blobs
                    .iter()
                    .map(|b| format!("blobs/sha256/{}", b.digest.hex()))
                    .collect::<Vec<_>>(),
            }]);
            append(&mut archive, "manifest.json", &to_bytes(&manifest)?)?;
        }
        SaveFormat::OciArchive => {
            append(&mut archive, &format!("blobs/sha256/{}", id.hex()), &config)?;
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": id.to_string(),
                    "size": config.len(),
                },
                "layers": layer_blobs
                    .iter()
                    .map(|b| json!({
                        "mediaType": OCI_LAYER_GZIP,
                        "digest": b.digest.to_string(),
                        "size": b.size,
                    }))
                    .collect::<Vec<_>>(),
            });
            let manifest = to_bytes(&manifest)?;
            let manifest_digest = Digest::of(&manifest);
            append(
                &mut archive,
                &format!("blobs/sha256/{}", manifest_digest.hex()),
                &manifest,
            )?;
            let descriptor = |tag: Option<&String>| {
                let mut d = json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": manifest_digest.to_string(),
                    "size": manifest.len(),
                });
                if let Some(tag) = tag {
                    d["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
                }
                d
            };
            let manifests: Vec<Value> = if tags.is_empty() {
                vec![descriptor(None)]
            } else {
                tags.iter().map(|t| descriptor(Some(t))).collect()
            };
            let index = json!({ "schemaVersion": 2, "manifests": manifests });
            append(&mut archive, "index.json", &to_bytes(&index)?)?;
        }
    }
    let writer = archive.into_inner().map_err(write_error)?;
    let out = writer
        .into_inner()
        .map_err(|e| write_error(e.into_error()))?;
    out.finish()
}

fn to_bytes(value: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec(value).ctx(|| "serialize the manifest".into())
}

fn write_error(e: io::Error) -> String {
    format!("cannot write the image archive: {e}")
}

/// Gzips a layer tar into `temp`, checking on the way that it still is
/// the diff_id's tar.
fn compress_verified(layer: LayerTar, temp: &Path, progress: &ProgressBar) -> Result<Blob> {
    let bar = progress.clone();
    let (mut reader, tally) = HashingReader::new(
        BufReader::with_capacity(256 * 1024, layer.file),
        Box::new(move |n| bar.inc(n)),
    );
    let file = File::create(temp).ctx(|| format!("create {}", temp.display()))?;
    let hashing = HashingWriter::new(BufWriter::with_capacity(256 * 1024, file));
    // No name and time 0 in the gzip header: the same tar, the same blob.
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(hashing, flate2::Compression::default());
    let what = || format!("compress layer {}", layer.diff_id);
    io::copy(&mut reader, &mut gz).ctx(what)?;
    let (writer, digest, size) = gz.finish().ctx(what)?.finish();
    writer
        .into_inner()
        .map_err(|e| e.into_error())
        .ctx(|| format!("write {}", temp.display()))?;
    if tally.digest() != layer.diff_id || tally.bytes() != layer.size {
        return Err(format!(
            "the stored tar of layer {} no longer matches its diff_id (the store is damaged; load the image again)",
            layer.diff_id
        ));
    }
    Ok(Blob { digest, size })
}

/// An archive member with fixed metadata, so that the archive depends on
/// its content only.
fn append_reader<W: Write>(
    archive: &mut tar::Builder<W>,
    name: &str,
    size: u64,
    reader: impl Read,
) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    archive
        .append_data(&mut header, name, reader)
        .map_err(write_error)
}

fn append<W: Write>(archive: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> Result<()> {
    append_reader(archive, name, bytes.len() as u64, bytes)
}

fn progress_bar(quiet: bool, layers: &[LayerTar]) -> ProgressBar {
    if quiet || !stderr_is_terminal() {
        return ProgressBar::hidden();
    }
    let total: u64 = layers.iter().map(|l| l.size).sum();
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Where the archive goes: stdout, a temp file renamed over FILE when
/// whole (removed if the save fails), or straight into FILE when it is
/// not a regular file (a fifo, /dev/null).
struct Output {
    sink: Sink,
    /// (temp, target) while the archive is written beside its target.
    rename: Option<(PathBuf, PathBuf)>,
}

enum Sink {
    Stdout(io::Stdout),
    File(File),
}

impl Output {
    fn open(path: Option<&Path>) -> Result<Output> {
        let Some(path) = path else {
            return Ok(Output {
                sink: Sink::Stdout(io::stdout()),
                rename: None,
            });
        };
        let cannot = |e: io::Error| format!("cannot write {}: {e}", path.display());
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                return Err(format!(
                    "cannot write {}: it is a directory",
                    path.display()
                ));
            }
            Ok(meta) if !meta.is_file() => {
                let file = File::options().write(true).open(path).map_err(cannot)?;
                return Ok(Output {
                    sink: Sink::File(file),
                    rename: None,
                });
            }
            _ => {}
        }
        let name = path
            .file_name()
            .ok_or_else(|| format!("cannot write {}: not a file name", path.display()))?;
        let prefix = format!(".{}.unionfs-save-", name.to_string_lossy());
        remove_stale_temps(path, &prefix);
        let temp = path.with_file_name(format!("{prefix}{}", std::process::id()));
        let file = File::create(&temp).map_err(cannot)?;
        Ok(Output {
            sink: Sink::File(file),
            rename: Some((temp, path.to_path_buf())),
        })
    }

    fn finish(mut self) -> Result<()> {
        self.flush().map_err(write_error)?;
        let Some((temp, target)) = self.rename.take() else {
            return Ok(());
        };
        let result = match &self.sink {
            Sink::File(file) => file.sync_all(),
            Sink::Stdout(_) => Ok(()),
        }
        .and_then(|()| fs::rename(&temp, &target));
        if let Err(e) = result {
            let _ = fs::remove_file(&temp);
            return Err(format!("cannot write {}: {e}", target.display()));
        }
        Ok(())
    }
}

/// Removes the temps that saves to the same FILE left beside it when
/// killed: `PREFIX<pid>` whose process is gone (a live one is still
/// writing; a reused PID only delays the removal to a later save).
fn remove_stale_temps(path: &Path, prefix: &str) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            == Err(nix::errno::Errno::ESRCH);
        if pid > 0 && gone && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        // Still set only when the save failed before `finish`.
        if let Some((temp, _)) = &self.rename {
            let _ = fs::remove_file(temp);
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.sink {
            Sink::Stdout(out) => out.write(buf),
            Sink::File(file) => file.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            Sink::Stdout(out) => out.flush(),
            Sink::File(file) => file.flush(),
        }
    }
}
