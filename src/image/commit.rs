//! `unionfs container diff` and `unionfs container commit`.
//!
//! * diff: [`changes`] of the container's upper over its image's layers,
//!   as `podman diff` prints them (or its `--format json` grouping).
//! * commit: the upper's OCI layer tar ([`layer_tar`]) is written into a
//!   work dir in `tmp/`, then unpacked and verified against its own
//!   sha256 by the same code `image load` uses ([`load::unpack_verified`]),
//!   and recorded with a new config by the same step ([`load::commit`]):
//!   under the exclusive lock, `layers/<diff_id>/` and
//!   `blobs/sha256/<diff_id>` are renamed into place, the config written
//!   (temp, fsync, rename) and then the index. A diff_id the store has
//!   already is not stored again. Killed at any point, the store keeps at
//!   worst an unlocked `tmp/` entry or an unreferenced layer or config,
//!   which the next command removes.
//!
//! A mounted container can be committed. unionfs mounts have no writeback
//! cache, so every `write(2)` that returned before the commit started is
//! in the upper already; `syncfs` on the mountpoint first pushes what is
//! only in the kernel's page cache (pages dirtied through a shared
//! `mmap`) to the daemon, which writes them to the upper before syncfs
//! returns. What is written *while* the commit runs may or may not be in
//! the layer (a file that shrinks meanwhile fails the commit): the layer
//! is not an atomic snapshot; stop writers for one.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use indicatif::ProgressBar;
use serde_json::{Value, json};

use super::archive::{Compression, LayerSource};
use super::changes::{self, DiffReport, Layers};
use super::container::{get, mounted_at, upper_dir, validate_name};
use super::digest::Digest;
use super::layer_tar::write_layer_tar;
use super::load::{self, NewImage, ReadyLayer};
use super::output::{print_json, rfc3339};
use super::query::with_default_tag;
use super::store::{ContainerRecord, Store, now_secs};
use super::{Context, Result};

/// What `history` says made a committed layer.
pub const CREATED_BY: &str = "unionfs container commit";

fn record(store: &Store, name: &str) -> Result<ContainerRecord> {
    validate_name(name)?;
    let lock = store.lock_shared()?;
    Ok(get(&store.read_index(&lock)?, name)?.clone())
}

/// The container's upper and its lowers, topmost first.
fn open_layers(store: &Store, name: &str, record: &ContainerRecord) -> Result<Layers> {
    let lowers: Vec<_> = record
        .layers
        .iter()
        .rev()
        .map(|d| store.layer_dir(d))
        .collect();
    let lower_refs: Vec<&Path> = lowers.iter().map(|p| p.as_path()).collect();
    Layers::open(&upper_dir(store, name), &lower_refs).map_err(|e| format!("container {name}: {e}"))
}

/// `container diff NAME [--format json]`.
pub fn diff(store: &Store, name: &str, json: bool) -> Result<()> {
    let record = record(store, name)?;
    let layers = open_layers(store, name, &record)?;
    let list = changes::changes(&layers).map_err(|e| format!("container {name}: {e}"))?;
    let list = changes::without_container_init_paths(list);
    if json {
        let report = serde_json::to_value(DiffReport::new(&list)).ctx(|| "diff".into())?;
        print_json(&report);
    } else {
        let mut out = io::stdout().lock();
        for change in &list {
            writeln!(out, "{change}").ctx(|| "write the diff".into())?;
        }
    }
    Ok(())
}

pub struct CommitOptions<'a> {
    pub name: &'a str,
    pub reference: &'a str,
    pub message: Option<&'a str>,
    pub author: Option<&'a str>,
    pub quiet: bool,
}

/// `IMAGE[:TAG]` as recorded: `NAME:latest` when no tag is given. Names
/// follow docker's grammar loosely: lowercase path components, an
/// optional registry host, a tag of `[A-Za-z0-9_.-]`, no digest.
pub fn parse_reference(reference: &str) -> Result<String> {
    let tagged = with_default_tag(reference);
    let bad = || format!("invalid image name '{reference}': use name[:tag], lowercase");
    if reference.contains('@') {
        return Err(format!(
            "invalid image name '{reference}': a commit is tagged, not named by digest"
        ));
    }
    let (repo, tag) = tagged.rsplit_once(':').ok_or_else(bad)?;
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && !tag.starts_with(['.', '-']);
    let mut parts: Vec<&str> = repo.split('/').collect();
    // A first component with '.', ':' or "localhost" is a registry host.
    if parts.len() > 1
        && (parts[0].contains(['.', ':']) || parts[0] == "localhost")
        && parts[0]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'-'))
    {
        parts.remove(0);
    }
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
            && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
            && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
    };
    if !tag_ok || parts.is_empty() || !parts.iter().all(|c| component_ok(c)) || tagged.len() > 255 {
        return Err(bad());
    }
    if repo.len() == 64 && repo.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "invalid image name '{reference}': 64 hex digits name an image ID"
        ));
    }
    Ok(tagged)
}

/// The parent's config with the new layer: its diff_id appended to
/// `rootfs.diff_ids`, a history entry for it, `created` and `author`.
pub fn child_config(
    parent: &[u8],
    parent_layers: usize,
    diff_id: &Digest,
    created: &str,
    message: Option<&str>,
    author: Option<&str>,
) -> Result<Vec<u8>> {
    let mut config: Value =
        serde_json::from_slice(parent).ctx(|| "the image's config is not JSON".into())?;
    let Some(object) = config.as_object_mut() else {
        return Err("the image's config is not a JSON object".into());
    };
    let mut diff_ids = object
        .get("rootfs")
        .and_then(|r| r["diff_ids"].as_array())
        .cloned()
        .unwrap_or_default();
    diff_ids.push(json!(diff_id.to_string()));
    object.insert(
        "rootfs".into(),
        json!({"type": "layers", "diff_ids": diff_ids}),
    );
    let mut history = object
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // History pairs each non-empty entry with the next layer: account for
    // parent layers the parent's history leaves out, so the new entry
    // pairs with the new layer.
    let with_layer = history
        .iter()
        .filter(|h| !h["empty_layer"].as_bool().unwrap_or(false))
        .count();
    for _ in with_layer..parent_layers {
        history.push(json!({}));
    }
    let mut entry = json!({"created": created, "created_by": CREATED_BY});
    if let Some(message) = message {
        entry["comment"] = json!(message);
    }
    if let Some(author) = author {
        entry["author"] = json!(author);
    }
    history.push(entry);
    object.insert("history".into(), Value::Array(history));
    object.insert("created".into(), json!(created));
    match author {
        Some(author) => object.insert("author".into(), json!(author)),
        None => object.remove("author"),
    };
    serde_json::to_vec(&config).ctx(|| "serialize the config".into())
}

/// Counts what passes through, for the progress bar.
struct Counting<W> {
    inner: W,
    bar: ProgressBar,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `container commit NAME IMAGE[:TAG] [-m MESSAGE] [--author A] [--quiet]`.
pub fn commit(store: &Store, options: &CommitOptions) -> Result<()> {
    let name = options.name;
    let tag = parse_reference(options.reference)?;
    let record = record(store, name)?;
    let parent = store.read_config(&record.image)?;
    if let Some(mountpoint) = mounted_at(&record) {
        // See the module's comment: what was written reaches the upper.
        let dir = File::open(mountpoint).ctx(|| format!("cannot open {}", mountpoint.display()))?;
        nix::unistd::syncfs(&dir).ctx(|| format!("syncfs {}", mountpoint.display()))?;
    }
    let work = store.work_dir("commit")?;
    let layers = open_layers(store, name, &record)?;
    let bar = load::byte_progress_bar(options.quiet, 0);
    bar.set_message("writing layer");
    let tar_path = work.path().join("layer.tar");
    let file = File::create(&tar_path).ctx(|| format!("create {}", tar_path.display()))?;
    let mut out = BufWriter::with_capacity(
        256 * 1024,
        Counting {
            inner: file,
            bar: bar.clone(),
        },
    );
    let written = write_layer_tar(&layers, &mut out)
        .map_err(|e| format!("cannot archive container {name}: {e}"))?;
    out.flush()
        .ctx(|| format!("write {}", tar_path.display()))?;
    drop(out);
    drop(layers);
    let diff_id = Digest::parse(&written.diff_id())?;

    let known = {
        let lock = store.lock_shared()?;
        store
            .read_index(&lock)?
            .layers
            .get(&diff_id)
            .is_some_and(|l| l.tar_size.is_some())
    };
    let mut ready = Vec::new();
    if known {
        bar.suspend(|| {
            if !options.quiet {
                eprintln!("{}: Already exists", diff_id.short());
            }
        });
    } else {
        bar.set_position(0);
        bar.set_length(written.size);
        bar.set_message(format!("storing layer {}", diff_id.short()));
        let source = LayerSource {
            blob: tar_path.clone(),
            blob_size: written.size,
            compressed_digest: None,
            compression: Compression::None,
            diff_id: diff_id.clone(),
        };
        let dir = work.path().join("layer");
        let tar = work.path().join("tar");
        let (size, tar_size) = load::unpack_verified(&source, &dir, &tar, &bar)?;
        ready.push(ReadyLayer {
            diff_id: diff_id.clone(),
            dir,
            size,
            tar,
            tar_size,
        });
    }
    bar.finish_and_clear();
    let _ = fs::remove_file(&tar_path);

    let config = child_config(
        &parent,
        record.layers.len(),
        &diff_id,
        &rfc3339(now_secs()),
        options.message,
        options.author,
    )?;
    let id = Digest::of(&config);
    let mut image_layers = record.layers.clone();
    image_layers.push(diff_id);
    // The layer reaches the disk before the index names it.
    if let Ok(dir) = File::open(work.path()) {
        nix::unistd::syncfs(&dir).ctx(|| "syncfs the store".into())?;
    }
    load::commit(
        store,
        &[NewImage {
            id: &id,
            config: &config,
            repo_tags: std::slice::from_ref(&tag),
            layers: image_layers,
        }],
        ready,
    )?;
    println!("{id}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        for (given, recorded) in [
            ("app", "app:latest"),
            ("app:v1", "app:v1"),
            ("localhost/app", "localhost/app:latest"),
            ("reg.io:5000/a/b_c:1.0-x", "reg.io:5000/a/b_c:1.0-x"),
        ] {
            assert_eq!(parse_reference(given).unwrap(), recorded);
        }
        for bad in [
            "",
            "App",
            "app:",
            "app:-x",
            "a b",
            "app@sha256:00",
            "/app",
            "app/",
            "-app",
            &"a".repeat(64),
        ] {
            assert!(parse_reference(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn child_config_appends_the_layer_and_its_history() {
        let parent = br#"{"architecture":"amd64","author":"old","config":{"Cmd":["sh"]},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa"]},
            "history":[{"created_by":"x","empty_layer":true}]}"#;
        let diff_id = Digest::of(b"layer");
        let bytes = child_config(
            parent,
            1,
            &diff_id,
            "2024-01-02T03:04:05Z",
            Some("msg"),
            None,
        )
        .unwrap();
        let config: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"],
            json!(["sha256:aa", diff_id.to_string()])
        );
        let history = config["history"].as_array().unwrap();
        assert_eq!(history.len(), 3, "{history:?}");
        assert_eq!(history[1], json!({}));
        assert_eq!(history[2]["comment"], "msg");
        assert_eq!(history[2]["created_by"], CREATED_BY);
        assert_eq!(config["created"], "2024-01-02T03:04:05Z");
        assert!(config.get("author").is_none());
        assert_eq!(config["config"]["Cmd"], json!(["sh"]));
    }
}
