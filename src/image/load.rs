//! `unionfs image load`: verify an archive's images and add them to the store.
//!
//! 1. Copy the archive into a work dir in the store's `tmp/` and plan each
//!    image ([`archive`]); configs are checked against their IDs there.
//! 2. Layers the index already has are not unpacked again ("Already exists").
//! 3. Every other layer is unpacked into the work dir in one pass that
//!    hashes both the compressed stream (against the manifest's digest,
//!    where it gives one) and the decompressed one (against the diff_id),
//!    and keeps that decompressed tar byte for byte (`image save` writes
//!    it back: the unpacked tree alone cannot reproduce the diff_id).
//! 4. Under the exclusive lock: the verified layers and their tars are
//!    renamed into `layers/` and `blobs/sha256/`, the configs written, the
//!    index replaced. Any failure before
//!    this leaves the store as it was; the work dir goes with the process.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::archive::{self, Compression, LayerSource};
use super::digest::{Digest, HashingReader, Tally};
use super::output::stderr_is_terminal;
use super::store::{ImageRecord, LayerRecord, Store, now_secs};
use super::unpack::unpack_layer;
use super::{Context, Result};

pub struct LoadOptions {
    /// The archive; stdin when `None`.
    pub input: Option<PathBuf>,
    pub quiet: bool,
}

/// A layer unpacked and verified in the work dir, waiting to be committed.
pub(crate) struct ReadyLayer {
    pub diff_id: Digest,
    pub dir: PathBuf,
    pub size: u64,
    /// The uncompressed tar, verified against the diff_id.
    pub tar: PathBuf,
    pub tar_size: u64,
}

/// An image to record: its config (whose sha256 is `id`), tags and
/// diff_ids, bottom layer first.
pub(crate) struct NewImage<'a> {
    pub id: &'a Digest,
    pub config: &'a [u8],
    pub repo_tags: &'a [String],
    pub layers: Vec<Digest>,
}

pub fn load(store: &Store, options: &LoadOptions) -> Result<()> {
    let work = store.work_dir("load")?;
    let spool_dir = work.path().join("archive");
    fs::create_dir(&spool_dir).ctx(|| format!("create {}", spool_dir.display()))?;
    let files = match &options.input {
        Some(path) => {
            let file = File::open(path).ctx(|| format!("cannot open {}", path.display()))?;
            archive::spool(BufReader::new(file), &spool_dir)?
        }
        None => archive::spool(io::stdin().lock(), &spool_dir)?,
    };
    let plans = archive::plans(&files)?;

    // A layer stored before unionfs kept layer tars is unpacked again, for its tar.
    let known: std::collections::BTreeMap<Digest, _> = {
        let lock = store.lock_shared()?;
        store.read_index(&lock)?.layers
    }
    .into_iter()
    .filter(|(_, l)| l.tar_size.is_some())
    .collect();
    let mut to_unpack: Vec<&LayerSource> = Vec::new();
    for plan in &plans {
        for layer in &plan.layers {
            let queued = to_unpack.iter().any(|l| l.diff_id == layer.diff_id);
            if !known.contains_key(&layer.diff_id) && !queued {
                to_unpack.push(layer);
            }
        }
    }
    let progress = progress_bar(options.quiet, &to_unpack);
    let say = |line: String| {
        if !options.quiet {
            progress.suspend(|| println!("{line}"));
        }
    };

    let mut ready: Vec<ReadyLayer> = Vec::new();
    for plan in &plans {
        for layer in &plan.layers {
            if known.contains_key(&layer.diff_id) {
                say(format!("{}: Already exists", layer.diff_id.short()));
                continue;
            }
            if ready.iter().any(|r| r.diff_id == layer.diff_id) {
                continue;
            }
            let dir = work.path().join(format!("layer-{}", layer.diff_id.hex()));
            progress.set_message(format!(
                "layer {}/{} {}",
                ready.len() + 1,
                to_unpack.len(),
                layer.diff_id.short()
            ));
            let tar = work.path().join(format!("tar-{}", layer.diff_id.hex()));
            let (size, tar_size) = unpack_verified(layer, &dir, &tar, &progress)?;
            say(format!("{}: Loaded", layer.diff_id.short()));
            ready.push(ReadyLayer {
                diff_id: layer.diff_id.clone(),
                dir,
                size,
                tar,
                tar_size,
            });
        }
    }
    progress.finish_and_clear();
    // Layers reach the disk before the index names them.
    if let Ok(dir) = File::open(work.path()) {
        let _ = nix::unistd::syncfs(&dir);
    }
    let images: Vec<NewImage> = plans
        .iter()
        .map(|plan| NewImage {
            id: &plan.id,
            config: &plan.config,
            repo_tags: &plan.repo_tags,
            layers: plan.layers.iter().map(|l| l.diff_id.clone()).collect(),
        })
        .collect();
    commit(store, &images, ready)?;
    for plan in &plans {
        if plan.repo_tags.is_empty() {
            println!("Loaded image ID: {}", plan.id);
        }
        for tag in &plan.repo_tags {
            println!("Loaded image: {tag}");
        }
    }
    Ok(())
}

fn progress_bar(quiet: bool, layers: &[&LayerSource]) -> ProgressBar {
    byte_progress_bar(quiet, layers.iter().map(|l| l.blob_size).sum())
}

/// A bar of `total` bytes on a terminal's stderr; hidden when `quiet` or
/// when stderr is not a terminal.
pub(crate) fn byte_progress_bar(quiet: bool, total: u64) -> ProgressBar {
    if quiet || !stderr_is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// The decompressor over a blob, keeping the blob reader so that bytes
/// after the compressed stream are hashed too.
enum Decompressor<R: BufRead> {
    Plain(R),
    Gzip(flate2::bufread::MultiGzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
}

impl<R: BufRead> Decompressor<R> {
    fn new(mut source: R, compression: Compression) -> io::Result<Decompressor<R>> {
        let compression = match compression {
            Compression::Sniff => {
                let head = source.fill_buf()?;
                if head.starts_with(&[0x1f, 0x8b]) {
                    Compression::Gzip
                } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                    Compression::Zstd
                } else {
                    Compression::None
                }
            }
            known => known,
        };
        Ok(match compression {
            Compression::Gzip => Decompressor::Gzip(flate2::bufread::MultiGzDecoder::new(source)),
            Compression::Zstd => {
                Decompressor::Zstd(zstd::stream::read::Decoder::with_buffer(source)?)
            }
            _ => Decompressor::Plain(source),
        })
    }

    fn into_source(self) -> R {
        match self {
            Decompressor::Plain(r) => r,
            Decompressor::Gzip(d) => d.into_inner(),
            Decompressor::Zstd(d) => d.finish(),
        }
    }
}

impl<R: BufRead> Read for Decompressor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decompressor::Plain(r) => r.read(buf),
            Decompressor::Gzip(d) => d.read(buf),
            Decompressor::Zstd(d) => d.read(buf),
        }
    }
}

/// Copies what is read through it to a file: the layer's uncompressed tar.
struct TeeReader<R> {
    inner: R,
    copy: BufWriter<File>,
}

impl<R: Read> Read for TeeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Unpacks one layer into `dir` and keeps its uncompressed tar in `tar`,
/// verifying both digests in the same pass. Returns the layer's content
/// size and the tar's size.
pub(crate) fn unpack_verified(
    layer: &LayerSource,
    dir: &Path,
    tar: &Path,
    progress: &ProgressBar,
) -> Result<(u64, u64)> {
    let what = || format!("layer {}", layer.diff_id);
    fs::DirBuilder::new()
        .mode(0o755)
        .create(dir)
        .ctx(|| format!("create {}", dir.display()))?;
    let root = File::open(dir).ctx(|| format!("open {}", dir.display()))?;
    let blob = File::open(&layer.blob).ctx(what)?;
    let bar = progress.clone();
    let (compressed, compressed_tally) = HashingReader::new(blob, Box::new(move |n| bar.inc(n)));
    let source = BufReader::with_capacity(256 * 1024, compressed);
    let decompressor = Decompressor::new(source, layer.compression).ctx(what)?;
    let copy = File::create(tar).ctx(|| format!("create {}", tar.display()))?;
    let tee = TeeReader {
        inner: decompressor,
        copy: BufWriter::with_capacity(256 * 1024, copy),
    };
    let (tar_stream, tar_tally) = HashingReader::new(tee, Box::new(|_| {}));
    let (unpacked, rest) = unpack_layer(tar_stream, &root)
        .map_err(|e| format!("layer {} is corrupt or refused: {e}", layer.diff_id))?;
    // The diff_id covers the whole tar, padding after the end marker included.
    let mut rest = rest;
    io::copy(&mut rest, &mut io::sink())
        .map_err(|e| format!("layer {} is corrupt: {e}", layer.diff_id))?;
    let tee = rest.into_inner();
    tee.copy
        .into_inner()
        .map_err(|e| e.into_error())
        .ctx(|| format!("write {}", tar.display()))?;
    io::copy(&mut tee.inner.into_source(), &mut io::sink()).ctx(what)?;
    check(
        &tar_tally,
        &layer.diff_id,
        "diff_id (uncompressed content)",
        layer,
    )?;
    if let Some(expected) = &layer.compressed_digest {
        check(&compressed_tally, expected, "blob digest", layer)?;
    }
    for warning in &unpacked.warnings {
        progress.suspend(|| {
            eprintln!(
                "unionfs: warning: layer {}: {warning}",
                layer.diff_id.short()
            )
        });
    }
    Ok((unpacked.content_size, tar_tally.bytes()))
}

fn check(tally: &Tally, expected: &Digest, what: &str, layer: &LayerSource) -> Result<()> {
    let got = tally.digest();
    if &got != expected {
        return Err(format!(
            "layer {} failed verification: its {what} is {got}, the image says {expected}",
            layer.diff_id
        ));
    }
    Ok(())
}

/// Moves verified layers into place and records the images, all under one
/// holding of the exclusive lock.
pub(crate) fn commit(store: &Store, plans: &[NewImage], ready: Vec<ReadyLayer>) -> Result<()> {
    let lock = store.lock_exclusive()?;
    // A command killed since this one started may have left strays.
    store.collect_garbage(&lock)?;
    let mut index = store.read_index(&lock)?;
    for plan in plans {
        let available =
            |d: &Digest| index.layers.contains_key(d) || ready.iter().any(|r| &r.diff_id == d);
        if let Some(missing) = plan.layers.iter().find(|l| !available(l)) {
            // Only possible if `image rm` removed it while this load ran.
            return Err(format!(
                "layer {missing} was removed from the store meanwhile; try again"
            ));
        }
    }
    for layer in ready {
        let tar_target = store.layer_tar(&layer.diff_id);
        match index.layers.get_mut(&layer.diff_id) {
            // Another load stored it meanwhile: one copy is enough.
            Some(record) if record.tar_size.is_some() => continue,
            // Stored before tars were kept: the tree stays, the tar joins it.
            Some(record) => {
                fs::rename(&layer.tar, &tar_target)
                    .ctx(|| format!("move layer tar into {}", tar_target.display()))?;
                record.tar_size = Some(layer.tar_size);
                continue;
            }
            None => {}
        }
        let target = store.layer_dir(&layer.diff_id);
        fs::rename(&layer.dir, &target).ctx(|| format!("move layer into {}", target.display()))?;
        fs::rename(&layer.tar, &tar_target)
            .ctx(|| format!("move layer tar into {}", tar_target.display()))?;
        index.layers.insert(
            layer.diff_id,
            LayerRecord {
                size: layer.size,
                tar_size: Some(layer.tar_size),
            },
        );
    }
    for plan in plans {
        store.write_config(plan.id, plan.config)?;
        for record in index.images.values_mut() {
            // A tag names one image: the one loaded last, as in docker.
            record.repo_tags.retain(|t| !plan.repo_tags.contains(t));
        }
        let record = index.images.entry(plan.id.clone()).or_insert(ImageRecord {
            repo_tags: Vec::new(),
            layers: plan.layers.clone(),
            loaded: now_secs(),
        });
        for tag in plan.repo_tags {
            if !record.repo_tags.contains(tag) {
                record.repo_tags.push(tag.clone());
            }
        }
    }
    store.write_index(&lock, &index)
}
