//! Rootless podman and buildah with unionfs as the overlay driver's mount
//! program, against the same user's podman and buildah on the native
//! overlay driver (kernel overlayfs mounted in the user namespace, which
//! writes `user.overlay.*` xattrs and answers EXDEV for renaming a lower
//! directory). The user `tests` runs them with subordinate ids in a
//! private namespace (see common::rootless).
//!
//! Each side imports the same busybox root filesystem and builds on it
//! (podman build, or buildah from/run/commit) with steps that delete and
//! recreate a lower directory, rename lower directories, write, chmod,
//! chown, hard-link and delete; then the images are compared: history,
//! what each layer does (its tar applied over the layers below: with a
//! mount program containers/storage writes layers as naive diffs, so the
//! same deletion is individual whiteouts there and an opaque directory on
//! the native driver, and the tars differ while their effect must not),
//! the tree a container sees, `podman diff` of a container that changes
//! it, `podman export` of that container, and `podman diff` of the image.
//!
//! `fuse_overlayfs_compared` (ignored; run it with `--ignored`) runs the
//! same with fuse-overlayfs as the mount program and prints how it and
//! unionfs compare with the native driver.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::podman::{
    LISTING, RUN_LIMITS, install_busybox, tar_rootfs, tar_xattrs, without_container_files,
};
use common::rootless::{Session, Store};
use common::*;

/// The build steps, one layer each: a lower directory deleted and
/// recreated (opaque), lower directories renamed (EXDEV on the kernel in
/// userxattr mode: mv copies), writes, chmod, chown, hard links to lower
/// files, deletes, a fifo and a symlink.
const STEPS: [&str; 4] = [
    "rm -rf /usr/sbin && mkdir /usr/sbin && echo new > /usr/sbin/tool && chmod 750 /usr/sbin/tool",
    "mv /data/sub /data/sub_renamed && echo more >> /data/sub_renamed/deep/c && mv /usr/lib /usr/lib2",
    "echo changed >> /data/a && chmod 600 /data/a && ln /data/a /data/hard && ln /data/keep/k /data/k_link \
     && rm /data/gone && chown 1000:1000 /data/keep/k && chmod 4755 /data/keep/k2",
    "rm -rf /data/keep && mkdir /data/keep && ln -s ../a /data/keep/link && mkfifo /data/fifo \
     && mkdir -p /data/new/dir && echo n > /data/new/dir/f && mv /data/new /data/moved",
];

/// What a container does to the built image before `podman diff` and
/// `podman export`.
const CHANGES: &str = "echo x > /data/y && rm /data/a && rm -r /data/moved \
    && mv /data/sub_renamed /data/again && rm -rf /usr/sbin && mkdir /usr/sbin && touch /usr/sbin/z \
    && chmod 700 /data/keep && chown 7:8 /data/hard";

/// Writes `rootfs.tar` (owners other than root, fixed times) and the
/// Containerfile into the session's work directory.
fn prepare_context(session: &Session) {
    let work = session.path("work");
    let rootfs = session.path("rootfs");
    install_busybox(
        &rootfs,
        &[
            "sh", "ls", "cat", "echo", "mkdir", "rm", "chmod", "chown", "ln", "mv", "touch", "cp",
            "mkfifo",
        ],
    );
    for (file, content) in [
        ("etc/passwd", "root:x:0:0:root:/:/bin/sh\n"),
        ("usr/sbin/tool", "old tool\n"),
        ("usr/sbin/other", "other\n"),
        ("usr/sbin/nested/x", "x\n"),
        ("usr/lib/libx.so", "lib\n"),
        ("data/a", "base\n"),
        ("data/gone", "gone\n"),
        ("data/sub/b", "b\n"),
        ("data/sub/deep/c", "c\n"),
        ("data/keep/k", "k\n"),
        ("data/keep/k2", "k2\n"),
    ] {
        write(rootfs.join(file), content.as_bytes());
    }
    fs::create_dir_all(rootfs.join("tmp")).unwrap();
    chmod(rootfs.join("tmp"), 0o1777);
    chmod(rootfs.join("usr/sbin/tool"), 0o755);
    for (path, owner) in [("data/sub/deep", 1234), ("data/sub/deep/c", 1234)] {
        let id = Some(nix::unistd::Uid::from_raw(owner));
        nix::unistd::chown(
            &rootfs.join(path),
            id,
            Some(nix::unistd::Gid::from_raw(5678)),
        )
        .unwrap();
    }
    set_fixed_times(&rootfs);
    tar_rootfs(&rootfs, &work.join("rootfs.tar"));
    session.give(&work.join("rootfs.tar"));
    let containerfile: String = std::iter::once("FROM base\n".to_string())
        .chain(STEPS.iter().map(|s| format!("RUN {s}\n")))
        .collect();
    write(work.join("Containerfile"), containerfile.as_bytes());
    session.give(&work.join("Containerfile"));
}

/// One tar entry: its path (no `./`, no trailing `/`), a description of
/// everything compared (a time as `time_class` sees it, directories
/// without one: their mtimes follow what was done inside them, which a
/// naive diff and an upper directory record differently), and the target
/// of a hard link.
struct Entry {
    path: String,
    desc: String,
    hard_link: Option<String>,
}

fn tar_entries(tar: &Path) -> Vec<Entry> {
    let file = fs::File::open(tar).unwrap_or_else(|e| panic!("open {tar:?}: {e}"));
    let mut archive = tar::Archive::new(file);
    let clean = |p: &str| p.trim_start_matches("./").trim_end_matches('/').to_string();
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut xattrs = tar_xattrs(&mut entry);
        // The native driver of podman 4.3 (containers/storage 1.44) copies
        // the kernel's private xattrs of a rootless upper
        // (user.overlay.origin, .impure) into its layer tars; they mean
        // nothing in a layer.
        xattrs.retain(|name, _| !name.starts_with("user.overlay."));
        let h = entry.header().clone();
        let path = clean(&entry.path().unwrap().to_string_lossy());
        let link = entry
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let kind = h.entry_type();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        let what = match kind {
            tar::EntryType::Regular => {
                format!(
                    "file {} {}",
                    data.len(),
                    unionfs::image::digest::Digest::of(&data)
                )
            }
            tar::EntryType::Directory => "dir".into(),
            tar::EntryType::Symlink => format!("symlink -> {}", link.clone().unwrap_or_default()),
            other => format!("{other:?}"),
        };
        let time = if kind.is_dir() {
            String::new()
        } else {
            format!(" mtime {}", time_class(h.mtime().unwrap() as i64, 0))
        };
        out.push(Entry {
            path,
            desc: format!(
                "{what} {:o} {}:{}{time} xattrs {xattrs:?}",
                h.mode().unwrap() & 0o7777,
                h.uid().unwrap(),
                h.gid().unwrap()
            ),
            hard_link: (kind == tar::EntryType::Link).then(|| clean(&link.unwrap_or_default())),
        });
    }
    out
}

/// A tree built from layer tars: path -> description, and hard-link pairs.
#[derive(Default, Clone)]
struct Tree {
    entries: BTreeMap<String, String>,
    links: BTreeSet<(String, String)>,
}

impl Tree {
    /// Removes what is inside `path` ("" is the root), and `path` itself
    /// when `itself`.
    fn remove(&mut self, path: &str, itself: bool) {
        let prefix = format!("{path}/");
        let gone = |p: &str| {
            (itself && p == path) || (!p.is_empty() && (path.is_empty() || p.starts_with(&prefix)))
        };
        self.entries.retain(|p, _| !gone(p));
        self.links.retain(|(a, b)| !gone(a) && !gone(b));
    }

    /// Applies a layer tar as the OCI spec says (whiteouts hide what the
    /// layers below have; the layer's own entries are added) and returns
    /// what it changed: `+path desc`, `-path`, `link a b`.
    fn apply(&mut self, entries: &[Entry]) -> Vec<String> {
        let before = self.clone();
        for e in entries {
            let (parent, name) = e.path.rsplit_once('/').unwrap_or(("", &e.path));
            if name == ".wh..wh..opq" {
                self.remove(parent, false);
            } else if let Some(hidden) = name.strip_prefix(".wh.") {
                let hidden = if parent.is_empty() {
                    hidden.to_string()
                } else {
                    format!("{parent}/{hidden}")
                };
                self.remove(&hidden, true);
            }
        }
        for e in entries
            .iter()
            .filter(|e| !e.path.rsplit('/').next().unwrap().starts_with(".wh."))
        {
            if e.path.is_empty() {
                continue;
            }
            let desc = match &e.hard_link {
                Some(target) => {
                    let pair = if *target < e.path {
                        (target.clone(), e.path.clone())
                    } else {
                        (e.path.clone(), target.clone())
                    };
                    self.links.insert(pair);
                    self.entries
                        .get(target)
                        .cloned()
                        .unwrap_or_else(|| format!("hard link to missing {target}"))
                }
                None => e.desc.clone(),
            };
            if !desc.starts_with("dir") {
                self.remove(&e.path, false);
            }
            self.entries.insert(e.path.clone(), desc);
        }
        let mut changes = Vec::new();
        for (path, desc) in &self.entries {
            if before.entries.get(path) != Some(desc) {
                changes.push(format!("+{path} {desc}"));
            }
        }
        for path in before
            .entries
            .keys()
            .filter(|p| !self.entries.contains_key(*p))
        {
            changes.push(format!("-{path}"));
        }
        for (a, b) in self.links.difference(&before.links) {
            changes.push(format!("link {a} {b}"));
        }
        changes
    }

    /// `/path desc` lines, and `link /a /b`, as `without_container_files`
    /// filters them.
    fn listing(&self) -> Vec<String> {
        let lines = self
            .entries
            .iter()
            .map(|(p, d)| format!("/{p} {d}"))
            .chain(self.links.iter().map(|(a, b)| format!("link /{a} /{b}")))
            .collect::<Vec<_>>()
            .join("\n");
        without_container_files(&lines)
    }
}

/// Everything compared of one image on one store.
#[derive(Default)]
struct Observed {
    /// `podman image history` (created-by and created, fixed by
    /// `--timestamp 0`).
    history: Vec<String>,
    /// What each layer does, bottom first.
    layers: Vec<Vec<String>>,
    /// LISTING inside a container of the image.
    run_listing: Vec<String>,
    /// `podman diff` of the image (against its parent layer), as a naive
    /// diff words it.
    image_diff: Vec<String>,
    /// `podman diff` of a container that made CHANGES, as a naive diff
    /// words it.
    container_diff: Vec<String>,
    /// `podman export` of that container.
    export: Vec<String>,
    /// Not compared (naive diffs and native ones are different tars), shown.
    diff_ids: Vec<String>,
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_string).collect()
}

/// `podman diff` lines (`before` and `after` the change) as a naive diff
/// words them. The native driver reads a directory made opaque in an
/// upper as `D dir` (its new contents as added), a naive diff (what
/// containers/storage does with a mount program), comparing the two
/// trees, as `C dir` and `D` of each name of the old tree that is gone.
fn as_naive_diff(diff: &[String], before: &Tree, after: &Tree) -> Vec<String> {
    let mut out = BTreeSet::new();
    for line in diff {
        match line.strip_prefix("D /") {
            Some(dir) if after.entries.contains_key(dir) => {
                out.insert(format!("C /{dir}"));
                let inside = format!("{dir}/");
                for gone in before
                    .entries
                    .keys()
                    .filter(|p| p.starts_with(&inside) && !after.entries.contains_key(*p))
                {
                    // Only the topmost name of what went.
                    let (gone_parent, _) = gone.rsplit_once('/').unwrap();
                    if after.entries.contains_key(gone_parent) {
                        out.insert(format!("D /{gone}"));
                    }
                }
            }
            _ => {
                out.insert(line.clone());
            }
        }
    }
    out.into_iter().collect()
}

/// Observes `image` of `store`: its layers (saved uncompressed by
/// podman), a container's view of it, its diff, and a container that
/// changed it, diffed and exported. `tag` names the files written.
fn observe(store: &Store, image: &str, tag: &str) -> Observed {
    let work = store.session.path("work");
    let history = store.podman(&[
        "image",
        "history",
        "--format",
        "{{.CreatedBy}} {{.CreatedAt}}",
        image,
    ]);
    let diff_ids = store.podman(&[
        "image",
        "inspect",
        "--format",
        "{{json .RootFS.Layers}}",
        image,
    ]);
    let diff_ids: Vec<String> = serde_json::from_str(diff_ids.trim()).unwrap();

    let saved = work.join(format!("{tag}-saved"));
    store.podman(&[
        "save",
        "--format",
        "docker-dir",
        "--uncompressed",
        "-o",
        saved.to_str().unwrap(),
        image,
    ]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(saved.join("manifest.json")).unwrap()).unwrap();
    let mut tree = Tree::default();
    let mut parent = Tree::default();
    let layers = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().unwrap().trim_start_matches("sha256:");
            parent = tree.clone();
            tree.apply(&tar_entries(&saved.join(digest)))
        })
        .collect();

    let mut run = vec!["run", "--rm"];
    run.extend(RUN_LIMITS);
    run.extend([image, "sh", "-c", LISTING]);
    let run_listing = without_container_files(&store.podman(&run));

    let image_diff = as_naive_diff(&lines(&store.podman(&["diff", image])), &parent, &tree);
    let mut changed = vec!["run", "--name", "changed"];
    changed.extend(RUN_LIMITS);
    changed.extend([image, "sh", "-c", CHANGES]);
    store.podman(&changed);
    let container_diff = lines(&store.podman(&["diff", "changed"]));
    let export = work.join(format!("{tag}-export.tar"));
    store.podman(&["export", "-o", export.to_str().unwrap(), "changed"]);
    let mut exported = Tree::default();
    exported.apply(&tar_entries(&export));
    let container_diff = as_naive_diff(&container_diff, &tree, &exported);
    store.podman(&["rm", "changed"]);
    Observed {
        history: lines(&history),
        layers,
        run_listing,
        image_diff,
        container_diff,
        export: exported.listing(),
        diff_ids,
    }
}

/// Lines of `a` not in `b` and of `b` not in `a`.
fn line_diff(a_name: &str, a: &[String], b_name: &str, b: &[String]) -> Option<String> {
    let (sa, sb): (BTreeSet<_>, BTreeSet<_>) = (a.iter().collect(), b.iter().collect());
    if sa == sb && a.len() == b.len() {
        return None;
    }
    let only = |x: &BTreeSet<&String>, y: &BTreeSet<&String>| {
        x.difference(y)
            .map(|s| format!("    {s}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    Some(format!(
        "  only {a_name}:\n{}\n  only {b_name}:\n{}",
        only(&sa, &sb),
        only(&sb, &sa)
    ))
}

/// Which observations `compare` looks at.
#[derive(Clone, Copy, PartialEq)]
enum ImageDiff {
    /// All but `podman diff` of the image (see
    /// `rootless_podman_diff_of_an_image_matches_the_native_driver`).
    Without,
    With,
}

/// How `b` differs from `a`, one paragraph per observation; empty when
/// they agree.
fn compare(
    a_name: &str,
    a: &Observed,
    b_name: &str,
    b: &Observed,
    image_diff: ImageDiff,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |what: &str, x: &[String], y: &[String]| {
        if let Some(d) = line_diff(a_name, x, b_name, y) {
            out.push(format!("{what}:\n{d}"));
        }
    };
    check("image history", &a.history, &b.history);
    check(
        "layer count",
        &[a.layers.len().to_string()],
        &[b.layers.len().to_string()],
    );
    for (i, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        check(&format!("layer {i} (applied)"), x, y);
    }
    check(
        "container listing of the image",
        &a.run_listing,
        &b.run_listing,
    );
    if image_diff == ImageDiff::With {
        check("podman diff of the image", &a.image_diff, &b.image_diff);
    }
    check(
        "podman diff of a container",
        &a.container_diff,
        &b.container_diff,
    );
    check("podman export of that container", &a.export, &b.export);
    out
}

/// Checks that the observation saw what the steps did, so that two
/// equally broken sides cannot agree.
fn assert_plausible(o: &Observed, built_layers: usize) {
    assert_eq!(o.layers.len(), 1 + built_layers, "layers: {:?}", o.diff_ids);
    let all: Vec<&String> = o.layers[1..].iter().flatten().collect();
    let mut expected = vec![
        ("+usr/sbin/tool file 4 ", " 750 0:0 "),
        ("-usr/sbin/other", ""),
        ("-usr/sbin/nested/x", ""),
        ("-data/sub/deep/c", ""),
        ("+data/sub_renamed/deep/c file 7 ", " 644 1234:5678 "),
        ("+usr/lib2/libx.so file 4 ", ""),
        ("-usr/lib/libx.so", ""),
        ("-data/gone", ""),
        ("+data/a file 13 ", " 600 0:0 "),
        ("link data/a data/hard", ""),
        ("-data/keep/k2", ""),
        ("+data/keep/link symlink -> ../a ", ""),
        ("+data/fifo Fifo ", ""),
        ("+data/moved/dir/f file 2 ", ""),
    ];
    if built_layers > 1 {
        // Step 3's own changes, which step 4 undoes in a single layer.
        expected.extend([
            ("+data/keep/k file 2 ", " 1000:1000 "),
            ("+data/keep/k2 file 3 ", " 4755 0:0 "),
            ("link data/k_link data/keep/k", ""),
        ]);
    }
    for (start, has) in expected {
        assert!(
            all.iter().any(|l| l.starts_with(start) && l.contains(has)),
            "no layer change {start:?} with {has:?} in {all:#?}"
        );
    }
    for expected in [
        "A /data/y",
        "D /data/a",
        "D /data/moved",
        "A /data/again",
        "A /usr/sbin/z",
    ] {
        assert!(
            o.container_diff.iter().any(|l| l == expected),
            "podman diff lacks {expected}: {:?}",
            o.container_diff
        );
    }
    assert!(
        o.export
            .iter()
            .any(|l| l.starts_with("/data/again/deep/c file 7 ")),
        "{:#?}",
        o.export
    );
}

/// The mount program as the user runs it (a copy the user can reach).
fn mount_program(session: &Session, which: &str) -> Option<PathBuf> {
    match which {
        "native" => None,
        "unionfs" => Some(session.unionfs()),
        other => Some(PathBuf::from(other)),
    }
}

fn podman_build(session: &Session, which: &str, tag: &str) -> Observed {
    let store = session.store(tag, mount_program(session, which));
    store.podman(&["import", "rootfs.tar", "base"]);
    let mut build = vec!["build", "--timestamp", "0"];
    build.extend(RUN_LIMITS);
    build.extend(["-t", "result", "-f", "Containerfile", "."]);
    store.podman(&build);
    observe(&store, "result", tag)
}

fn buildah_commit(session: &Session, which: &str, tag: &str) -> Observed {
    let store = session.store(tag, mount_program(session, which));
    store.podman(&["import", "rootfs.tar", "base"]);
    store.buildah(&["from", "--name", "work", "localhost/base"]);
    for step in STEPS {
        store.buildah(&[
            "run",
            "--runtime",
            "runc",
            "--network",
            "none",
            "work",
            "--",
            "sh",
            "-c",
            step,
        ]);
    }
    store.buildah(&["commit", "--timestamp", "0", "work", "built"]);
    store.buildah(&["rm", "work"]);
    observe(&store, "built", tag)
}

fn assert_same(a_name: &str, a: &Observed, b_name: &str, b: &Observed, image_diff: ImageDiff) {
    let diffs = compare(a_name, a, b_name, b, image_diff);
    assert!(
        diffs.is_empty(),
        "{b_name} differs from {a_name} (diff_ids {:?} vs {:?}):\n{}",
        a.diff_ids,
        b.diff_ids,
        diffs.join("\n")
    );
}

type Scenario = fn(&Session, &str, &str) -> Observed;

/// Runs `scenario` on the native driver, then with unionfs, in one
/// session, and asserts they agree.
fn native_then_unionfs(scenario: Scenario, built_layers: usize, image_diff: ImageDiff) {
    let start = Instant::now();
    let session = Session::new();
    prepare_context(&session);
    let native = scenario(&session, "native", "native");
    assert_plausible(&native, built_layers);
    let ours = scenario(&session, "unionfs", "unionfs");
    assert_plausible(&ours, built_layers);
    assert_same("native", &native, "unionfs", &ours, image_diff);
    session.close();
    eprintln!("native, then unionfs: {:?}", start.elapsed());
}

/// `podman diff` of the image too: it mounts the image's top layer as
/// the upper, and with a mount program containers/storage stores layers
/// with OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`), which must count there.
#[test]
fn rootless_podman_build_on_unionfs_matches_the_native_driver() {
    native_then_unionfs(podman_build, STEPS.len(), ImageDiff::With);
}

#[test]
fn rootless_buildah_commit_on_unionfs_matches_the_native_driver() {
    native_then_unionfs(buildah_commit, 1, ImageDiff::With);
}

/// The same scenarios with fuse-overlayfs (1.10 on Debian 12) as the mount
/// program, for comparison: prints how each mount program's results
/// differ from the native driver's (`podman diff` of the image included);
/// fails only where the other tests would fail for unionfs.
#[test]
#[ignore = "a comparison report with /usr/bin/fuse-overlayfs; run with --ignored"]
fn fuse_overlayfs_compared() {
    let fuse_overlayfs = "/usr/bin/fuse-overlayfs";
    assert!(
        Path::new(fuse_overlayfs).exists(),
        "{fuse_overlayfs} is not installed"
    );
    let session = Session::new();
    prepare_context(&session);
    let mut failures = Vec::new();
    for (scenario, run) in [
        (
            "podman build",
            podman_build as fn(&Session, &str, &str) -> Observed,
        ),
        ("buildah from/run/commit", buildah_commit),
    ] {
        let key = scenario.split(' ').next().unwrap();
        let native = run(&session, "native", &format!("{key}-native"));
        let mut results = Vec::new();
        for which in ["unionfs", fuse_overlayfs] {
            let name = Path::new(which)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let tag = format!("{key}-{name}");
            let started = Instant::now();
            let observed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&session, which, &tag)
            }));
            let report = match &observed {
                Ok(o) => {
                    let d = compare("native", &native, &name, o, ImageDiff::With);
                    if d.is_empty() {
                        format!("same as native (diff_ids {:?})", o.diff_ids)
                    } else {
                        format!("differs from native:\n{}", d.join("\n"))
                    }
                }
                Err(e) => format!(
                    "failed: {}",
                    e.downcast_ref::<String>().cloned().unwrap_or_default()
                ),
            };
            // unionfs fails here only where the other tests fail.
            if let Ok(o) = &observed
                && name == "unionfs"
            {
                let d = compare("native", &native, &name, o, ImageDiff::Without);
                if !d.is_empty() {
                    failures.push(format!("{scenario}: {}", d.join("\n")));
                }
            } else if name == "unionfs" {
                failures.push(format!("{scenario}: {report}"));
            }
            results.push(format!(
                "== {scenario} with {name} ({:?}): {report}",
                started.elapsed()
            ));
        }
        eprintln!(
            "== {scenario} native: diff_ids {:?}\n{}",
            native.diff_ids,
            results.join("\n")
        );
    }
    session.close();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
