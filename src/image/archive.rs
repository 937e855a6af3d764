//! Reads an image archive (`docker save`/`podman save` docker-archive, or
//! oci-archive) into a [`LoadPlan`] per image: the config bytes, verified
//! against the ID the manifest names, and where each layer's blob is.
//!
//! The archive is first copied entry by entry into the load's work dir:
//! it may come from a pipe, and its manifest may come after the blobs it
//! names (podman writes `manifest.json` last). The copy is also what makes
//! a truncated archive fail before anything is unpacked.
//!
//! Manifests are parsed with serde into the few fields used here rather
//! than with the oci-spec crate: oci-spec's types cover only OCI (not the
//! docker-archive `manifest.json`), reject documents we can still load
//! (e.g. missing optional fields some tools omit) with errors that are
//! hard to make one clear line of, and bring a builder/derive stack this
//! small reader does not need.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::Deserialize;

use super::digest::Digest;
use super::{Context, Result};

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    /// docker-archive gives no media type: look at the magic bytes.
    Sniff,
}

#[derive(Debug)]
pub struct LayerSource {
    pub blob: PathBuf,
    pub blob_size: u64,
    /// The blob's digest when the archive states one (OCI descriptors,
    /// `blobs/sha256/<hex>` names).
    pub compressed_digest: Option<Digest>,
    pub compression: Compression,
    pub diff_id: Digest,
}

#[derive(Debug)]
pub struct LoadPlan {
    pub id: Digest,
    pub config: Vec<u8>,
    pub repo_tags: Vec<String>,
    pub layers: Vec<LayerSource>,
}

/// Copies the archive's regular files into `dir`, returning archive path ->
/// copy. Symlinks between entries (old docker archives deduplicate layers
/// so) resolve to their target's copy.
pub fn spool(reader: impl Read, dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    let mut links = Vec::new();
    let consumed = Rc::new(Cell::new(0u64));
    let mut archive = tar::Archive::new(CountingReader {
        inner: reader,
        count: consumed.clone(),
    });
    // Where the end-of-archive marker must start: after the last entry's
    // data, padded to the 512-byte block.
    let mut end_of_entries = 0u64;
    let bad =
        |e: io::Error| format!("cannot read the image archive (truncated or not a tar?): {e}");
    for (n, entry) in archive.entries().map_err(bad)?.enumerate() {
        let mut entry = entry.map_err(bad)?;
        end_of_entries = (entry.raw_file_position() + entry.size()).div_ceil(512) * 512;
        let name = clean_name(&String::from_utf8_lossy(&entry.path_bytes()));
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let copy = dir.join(format!("entry-{n}"));
                let mut out = File::create(&copy).ctx(|| format!("create {}", copy.display()))?;
                let expected = entry.size();
                let got = io::copy(&mut entry, &mut out).map_err(bad)?;
                if got != expected {
                    return Err(format!("the image archive is truncated at '{name}'"));
                }
                files.insert(name, copy);
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                links.push((name, target, entry.header().entry_type()));
            }
            _ => {}
        }
    }
    // The tar crate takes the end of the stream at an entry boundary for
    // the end of the archive; a cut there must not pass for a whole archive.
    if consumed.get() < end_of_entries + 512 {
        return Err(
            "the image archive is truncated (it ends without an end-of-archive marker)".into(),
        );
    }
    for (name, target, kind) in links {
        let resolved = if kind == tar::EntryType::Symlink {
            let base = Path::new(&name).parent().unwrap_or(Path::new(""));
            clean_name(&base.join(&target).to_string_lossy())
        } else {
            clean_name(&target)
        };
        if let Some(copy) = files.get(&resolved).cloned() {
            files.insert(name, copy);
        }
    }
    Ok(files)
}

/// Counts the bytes the tar parser reads.
struct CountingReader<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// `./a/../b` -> `b`: archive names as manifests write them.
fn clean_name(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// Plans from a spooled archive: docker-archive if it has `manifest.json`
/// (docker 25+ writes both formats; the docker one has the tags), else OCI.
pub fn plans(files: &BTreeMap<String, PathBuf>) -> Result<Vec<LoadPlan>> {
    if files.contains_key("manifest.json") {
        docker_plans(files)
    } else if files.contains_key("index.json") {
        oci_plans(files)
    } else {
        Err("not an image archive: it has neither manifest.json (docker-archive) nor index.json (oci-archive)".into())
    }
}

fn read_member(files: &BTreeMap<String, PathBuf>, name: &str) -> Result<Vec<u8>> {
    let path = files
        .get(&clean_name(name))
        .ok_or_else(|| format!("the archive lacks '{name}' that its manifest names"))?;
    fs::read(path).ctx(|| format!("read {name}"))
}

fn member_size(files: &BTreeMap<String, PathBuf>, name: &str) -> Result<(PathBuf, u64)> {
    let path = files
        .get(&clean_name(name))
        .ok_or_else(|| format!("the archive lacks '{name}' that its manifest names"))?;
    let size = fs::metadata(path).ctx(|| format!("stat {name}"))?.len();
    Ok((path.clone(), size))
}

/// The part of an image config the loader checks.
#[derive(Deserialize)]
struct ConfigRootfs {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<Digest>,
}

fn parse_diff_ids(config: &[u8]) -> Result<Vec<Digest>> {
    let parsed: ConfigRootfs =
        serde_json::from_slice(config).ctx(|| "the image config is not valid".into())?;
    if parsed.rootfs.kind != "layers" {
        return Err(format!(
            "the image config has rootfs type '{}', not 'layers'",
            parsed.rootfs.kind
        ));
    }
    Ok(parsed.rootfs.diff_ids)
}

/// The digest a `<hex>.json`, `<hex>.tar`, `<hex>/layer.tar` or
/// `blobs/sha256/<hex>` name carries, if any.
fn digest_in_name(name: &str) -> Option<Digest> {
    let name = clean_name(name);
    if let Some(hex) = name.strip_prefix("blobs/sha256/") {
        return Digest::from_hex(hex);
    }
    let last = name.rsplit('/').next()?;
    Digest::from_hex(last.strip_suffix(".json").unwrap_or(last))
}

fn check_layer_count(layers: usize, diff_ids: usize) -> Result<()> {
    if layers != diff_ids {
        return Err(format!(
            "the manifest names {layers} layers but the config's rootfs has {diff_ids} diff_ids"
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn docker_plans(files: &BTreeMap<String, PathBuf>) -> Result<Vec<LoadPlan>> {
    let manifest: Vec<DockerManifestEntry> =
        serde_json::from_slice(&read_member(files, "manifest.json")?)
            .ctx(|| "manifest.json is not a docker-archive manifest".into())?;
    if manifest.is_empty() {
        return Err("manifest.json lists no image".into());
    }
    let mut out = Vec::new();
    for entry in manifest {
        let config = read_member(files, &entry.config)?;
        let id = Digest::of(&config);
        let named = digest_in_name(&entry.config).ok_or_else(|| {
            format!(
                "the manifest names config '{}', which carries no image ID",
                entry.config
            )
        })?;
        if named != id {
            return Err(format!(
                "image config digest mismatch: the manifest names {named}, the config is {id}"
            ));
        }
        let diff_ids = parse_diff_ids(&config)?;
        check_layer_count(entry.layers.len(), diff_ids.len())?;
        let mut layers = Vec::new();
        for (name, diff_id) in entry.layers.iter().zip(diff_ids) {
            let (blob, blob_size) = member_size(files, name)?;
            // `blobs/sha256/<hex>` is the blob's own digest (docker 25+);
            // podman's `<hex>.tar` is the diff_id, checked when unpacking.
            let compressed_digest = clean_name(name)
                .starts_with("blobs/sha256/")
                .then(|| digest_in_name(name))
                .flatten();
            layers.push(LayerSource {
                blob,
                blob_size,
                compressed_digest,
                compression: Compression::Sniff,
                diff_id,
            });
        }
        out.push(LoadPlan {
            id,
            config,
            repo_tags: entry.repo_tags.unwrap_or_default(),
            layers,
        });
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciManifest {
    #[serde(default)]
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Reads a blob named by a descriptor, checking its size and digest.
fn read_blob(files: &BTreeMap<String, PathBuf>, desc: &Descriptor) -> Result<Vec<u8>> {
    let bytes = read_member(files, &format!("blobs/sha256/{}", desc.digest.hex()))?;
    if bytes.len() as u64 != desc.size || Digest::of(&bytes) != desc.digest {
        return Err(format!(
            "blob {} does not match its descriptor (digest or size differs)",
            desc.digest
        ));
    }
    Ok(bytes)
}

fn layer_compression(media_type: &str) -> Result<Compression> {
    Ok(match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Compression::None,
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd" => Compression::Zstd,
        "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
        other => return Err(format!("unknown layer media type '{other}'")),
    })
}

/// The name an OCI index entry gives its image: containerd's full name, or
/// `org.opencontainers.image.ref.name` when that is a full reference
/// (podman writes `localhost/name:tag` there; a bare tag names nothing).
fn oci_ref_name(desc: &Descriptor) -> Option<String> {
    if let Some(name) = desc.annotations.get("io.containerd.image.name") {
        return Some(name.clone());
    }
    let name = desc.annotations.get("org.opencontainers.image.ref.name")?;
    let last = name.rsplit('/').next().unwrap_or(name);
    (name.contains('/') || last.contains(':')).then(|| name.clone())
}

fn oci_plans(files: &BTreeMap<String, PathBuf>) -> Result<Vec<LoadPlan>> {
    let index: OciIndex = serde_json::from_slice(&read_member(files, "index.json")?)
        .ctx(|| "index.json is not an OCI image index".into())?;
    // Several index entries may name the same manifest under different tags.
    let mut by_manifest: BTreeMap<Digest, (Vec<String>, &Descriptor)> = BTreeMap::new();
    for desc in &index.manifests {
        if desc.media_type != OCI_MANIFEST && desc.media_type != DOCKER_MANIFEST {
            return Err(format!(
                "unsupported manifest media type '{}' in index.json (multi-platform indexes are not loaded)",
                desc.media_type
            ));
        }
        let slot = by_manifest
            .entry(desc.digest.clone())
            .or_insert((Vec::new(), desc));
        slot.0.extend(oci_ref_name(desc));
    }
    if by_manifest.is_empty() {
        return Err("index.json lists no image".into());
    }
    let mut out = Vec::new();
    for (tags, desc) in by_manifest.into_values() {
        let manifest: OciManifest = serde_json::from_slice(&read_blob(files, desc)?)
            .ctx(|| format!("manifest {} is not valid", desc.digest))?;
        if !manifest.media_type.is_empty()
            && manifest.media_type != OCI_MANIFEST
            && manifest.media_type != DOCKER_MANIFEST
        {
            return Err(format!(
                "unknown manifest media type '{}'",
                manifest.media_type
            ));
        }
        let config = read_blob(files, &manifest.config)?;
        let id = Digest::of(&config);
        let diff_ids = parse_diff_ids(&config)?;
        check_layer_count(manifest.layers.len(), diff_ids.len())?;
        let mut layers = Vec::new();
        for (layer, diff_id) in manifest.layers.iter().zip(diff_ids) {
            let compression = layer_compression(&layer.media_type)?;
            let (blob, blob_size) =
                member_size(files, &format!("blobs/sha256/{}", layer.digest.hex()))?;
            if blob_size != layer.size {
                return Err(format!(
                    "layer blob {} is {blob_size} bytes, its descriptor says {}",
                    layer.digest, layer.size
                ));
            }
            layers.push(LayerSource {
                blob,
                blob_size,
                compressed_digest: Some(layer.digest.clone()),
                compression,
                diff_id,
            });
        }
        out.push(LoadPlan {
            id,
            config,
            repo_tags: tags,
            layers,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_digests() {
        let hex = "a".repeat(64);
        for name in [
            format!("{hex}.json"),
            format!("./{hex}/layer.tar").replace("/layer.tar", ""),
            format!("blobs/sha256/{hex}"),
        ] {
            assert_eq!(digest_in_name(&name).unwrap().hex(), hex, "{name}");
        }
        assert!(digest_in_name("config.json").is_none());
    }

    #[test]
    fn unknown_media_type_is_refused() {
        assert!(layer_compression("application/x-foo").is_err());
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Compression::Zstd
        );
    }
}
