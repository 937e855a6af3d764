//! `unionfs::image::layer_tar`: every conversion from the upper's kernel
//! format to OCI read back with the tar crate, and determinism.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use common::podman::{
    LISTING, Podman, RUN_LIMITS, install_busybox, tar_rootfs, tar_xattrs, without_container_files,
};
use common::*;
use unionfs::image::changes::Layers;
use unionfs::image::layer_tar::write_layer_tar;

/// A v2 file capability: cap_net_bind_service effective and permitted.
const CAPABILITY: &str = "0sAQAAAgAEAAAAAAAAAAAAAAAAAAA=";

#[derive(Debug, Clone, PartialEq, Eq)]
struct Read_ {
    kind: char,
    mode: u32,
    uid: u64,
    size: u64,
    link: Option<String>,
    xattrs: BTreeMap<String, Vec<u8>>,
    data: Vec<u8>,
}

fn read_tar(bytes: &[u8]) -> Vec<(String, Read_)> {
    let mut archive = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let xattrs = tar_xattrs(&mut entry);
        let h = entry.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Regular => 'f',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            tar::EntryType::Fifo => 'p',
            tar::EntryType::Char => 'c',
            _ => '?',
        };
        let link = entry
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.push((
            path,
            Read_ {
                kind,
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                size: h.size().unwrap(),
                link,
                xattrs,
                data,
            },
        ));
    }
    out
}

fn tar_of(upper: &Path, lowers: &[&Path]) -> (Vec<u8>, unionfs::image::layer_tar::LayerTar) {
    let layers = Layers::open(upper, lowers).unwrap();
    let mut bytes = Vec::new();
    let info = write_layer_tar(&layers, &mut bytes).unwrap();
    (bytes, info)
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = run_with_stdin(
        &mut Command::new("sha256sum"),
        {
            let p = Scratch::new();
            let f = p.path("t");
            fs::write(&f, bytes).unwrap();
            std::process::Stdio::from(fs::File::open(&f).unwrap())
        },
        std::time::Duration::from_secs(30),
    );
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// A lower with a little of everything, changed through a unionfs mount.
fn changed_upper(s: &Scratch) -> (std::path::PathBuf, std::path::PathBuf) {
    let lower = s.mkdir("lower");
    write(lower.join("data/a"), b"a");
    write(lower.join("data/gone"), b"g");
    write(lower.join("data/rep/old"), b"o");
    write(lower.join("data/mv/in/f"), b"m");
    write(lower.join("data/mv/g"), b"g");
    write(lower.join("data/mv/drop"), b"d");
    write(lower.join("keep"), b"k");
    let upper = s.mkdir("upper");
    let m = UnionMount::mount(&[&lower], Some(&upper), &s.mkdir("mnt"), &[]);
    let p = |rel: &str| m.path(rel);
    fs::remove_file(p("data/gone")).unwrap();
    fs::remove_dir_all(p("data/rep")).unwrap();
    fs::create_dir(p("data/rep")).unwrap();
    write(p("data/rep/new"), b"n");
    fs::rename(p("data/mv"), p("data/moved")).unwrap();
    fs::remove_file(p("data/moved/drop")).unwrap();
    write(p("data/moved/in/added"), b"added");
    write(p("data/new"), b"new");
    fs::hard_link(p("data/new"), p("data/new-link")).unwrap();
    fs::hard_link(p("data/a"), p("data/a-link")).unwrap();
    write(p("suid"), b"#!/bin/sh\n");
    chmod(p("suid"), 0o4755);
    write(p("cap"), b"cap");
    sh(Command::new("setfattr")
        .args(["-n", "security.capability", "-v", CAPABILITY])
        .arg(p("cap")));
    set_xattr(p("data/a"), "user.note", "hello");
    symlink("data/a", p("sym"));
    nix::unistd::mkfifo(&p("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    nix::sys::stat::mknod(
        &p("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    drop(m);
    (lower, upper)
}

#[test]
fn every_conversion_reads_back() {
    let s = Scratch::new();
    let (lower, upper) = changed_upper(&s);
    // The upper is in kernel format: a redirect, an opaque directory.
    assert!(
        xattrs_with_prefix(&upper.join("data/moved"), "trusted.overlay.")
            .contains_key("trusted.overlay.redirect")
    );
    // An xattr whiteout too, written by hand as kernel overlayfs reads it.
    let xdir = upper.join("xw");
    fs::create_dir(&xdir).unwrap();
    write(lower.join("xw/hidden"), b"h");
    set_xattr(&xdir, "trusted.overlay.opaque", "x");
    write(xdir.join("hidden"), b"");
    set_xattr(xdir.join("hidden"), "trusted.overlay.whiteout", "");

    let (bytes, info) = tar_of(&upper, &[&lower]);
    assert_eq!(info.size, bytes.len() as u64);
    assert_eq!(info.diff_id(), format!("sha256:{}", sha256_hex(&bytes)));
    let entries = read_tar(&bytes);
    let names: Vec<&str> = entries.iter().map(|(p, _)| p.as_str()).collect();
    let get = |name: &str| {
        entries
            .iter()
            .find(|(p, _)| p == name)
            .unwrap_or_else(|| panic!("{name} not in {names:?}"))
            .1
            .clone()
    };
    // Whiteouts: char device and xattr forms.
    assert_eq!(get("data/.wh.gone").kind, 'f');
    assert_eq!(get("data/.wh.gone").size, 0);
    assert_eq!(get("xw/.wh.hidden").kind, 'f');
    assert!(!names.contains(&"xw/hidden"), "{names:?}");
    // Opaque directory.
    assert_eq!(get("data/rep").kind, 'd');
    assert_eq!(get("data/rep/.wh..wh..opq").kind, 'f');
    assert_eq!(get("data/rep/new").data, b"n");
    // The redirected directory, whole, opaque, and its old place whited out.
    assert_eq!(get("data/.wh.mv").kind, 'f');
    assert_eq!(get("data/moved/.wh..wh..opq").kind, 'f');
    assert_eq!(get("data/moved/g").data, b"g");
    assert_eq!(get("data/moved/in/f").data, b"m");
    assert_eq!(get("data/moved/in/added").data, b"added");
    assert!(!names.contains(&"data/moved/drop"), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("data/moved/.wh.drop")));
    // Hard links: the first path is the file, the next a link to it.
    assert_eq!(get("data/new").data, b"new");
    assert_eq!(get("data/new-link").kind, 'h');
    assert_eq!(get("data/new-link").link.as_deref(), Some("data/new"));
    assert_eq!(get("data/a").kind, 'f');
    assert_eq!(get("data/a-link").kind, 'h');
    // xattrs and capabilities, never overlay-private ones.
    assert_eq!(get("data/a").xattrs.get("user.note").unwrap(), b"hello");
    assert!(get("cap").xattrs.contains_key("security.capability"));
    for (path, e) in &entries {
        assert!(
            !e.xattrs.keys().any(|k| k.contains(".overlay.")),
            "{path}: {:?}",
            e.xattrs
        );
    }
    // Modes, links, special files.
    assert_eq!(get("suid").mode, 0o4755);
    assert_eq!(get("sym").kind, 'l');
    assert_eq!(get("sym").link.as_deref(), Some("data/a"));
    assert_eq!(get("fifo").kind, 'p');
    assert_eq!(get("fifo").mode, 0o640);
    assert_eq!(get("null").kind, 'c');
    assert_eq!(get("data/a").uid, 0);
    // Parents before children, names sorted within a directory.
    let data: Vec<&str> = names
        .iter()
        .filter(|n| n.starts_with("data/") && n.matches('/').count() == 1)
        .copied()
        .collect();
    let mut sorted = data.clone();
    sorted.sort();
    assert_eq!(data, sorted);
}

#[test]
fn the_same_upper_gives_the_same_bytes() {
    let s = Scratch::new();
    let (lower, upper) = changed_upper(&s);
    let (first, info1) = tar_of(&upper, &[&lower]);
    // Reading every file changes atimes (strictatime where the mount has
    // relatime: set them by hand).
    for path in walk(&upper) {
        let path = upper.join(path);
        if path.is_file() && !path.is_symlink() {
            sh(Command::new("touch")
                .arg("-a")
                .arg("-d")
                .arg("2001-01-01")
                .arg(&path));
        }
    }
    let (second, info2) = tar_of(&upper, &[&lower]);
    assert_eq!(info1, info2);
    assert!(first == second);
}

fn rootfs_tar(dir: &Path) {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "etc", "data/sub", "data/mv/in", "data/rep/old"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    install_busybox(&rootfs, &["sh"]);
    for (file, content) in [
        ("data/a", "a"),
        ("data/gone", "g"),
        ("data/sub/b", "b"),
        ("data/mv/in/f", "m"),
        ("data/mv/g", "m2"),
        ("data/mv/drop", "d"),
        ("data/rep/o", "r"),
        ("data/rep/old/f", "r2"),
    ] {
        write(rootfs.join(file), content.as_bytes());
    }
    tar_rootfs(&rootfs, &dir.join("rootfs.tar"));
}

/// Changes through a unionfs mount: a redirect, an opaque replacement,
/// whiteouts, hard links, set-id bits, symlinks, a fifo.
const CHANGES: &str = "cd /data && echo x >> a && busybox chmod 4755 a && busybox rm gone \
    && busybox mv mv moved && busybox rm moved/drop && echo n > moved/in/new \
    && busybox rm -r rep && busybox mkdir rep && echo fresh > rep/o \
    && busybox ln a a2 && busybox ln -s moved/g link && busybox mkfifo fifo \
    && busybox mkdir -p new/deep && echo d > new/deep/f && busybox chown 7:8 new/deep/f";

#[test]
fn podman_loads_the_layer_and_sees_the_mounts_tree() {
    let s = Scratch::new();
    let dir = s.dir.path().to_path_buf();
    rootfs_tar(&dir);
    let podman = Podman::new(s.mkdir("storage"));
    podman.ok_raw(&["import", "rootfs.tar", "base"], &dir);
    let lower = std::path::PathBuf::from(
        podman
            .ok(
                &[
                    "image",
                    "inspect",
                    "--format",
                    "{{.GraphDriver.Data.UpperDir}}",
                    "base",
                ],
                &dir,
            )
            .trim(),
    );
    let upper = s.mkdir("upper");
    let mnt = s.mkdir("mnt");
    let m = UnionMount::mount(&[&lower], Some(&upper), &mnt, &[]);
    sh(Command::new("chroot")
        .arg(&m.mountpoint)
        .args(["/bin/sh", "-c", CHANGES]));
    let expected = sh(Command::new("chroot")
        .arg(&m.mountpoint)
        .args(["/bin/sh", "-c", LISTING]));
    drop(m);
    assert!(
        xattrs_with_prefix(&upper.join("data/moved"), "trusted.overlay.")
            .contains_key("trusted.overlay.redirect"),
        "the move made no redirect"
    );
    assert!(
        xattrs_with_prefix(&upper.join("data/rep"), "trusted.overlay.")
            .contains_key("trusted.overlay.opaque"),
        "the replaced directory is not opaque"
    );

    // The image, saved, with the layer appended.
    podman.ok_raw(
        &[
            "save",
            "--format",
            "docker-archive",
            "-o",
            "saved.tar",
            "base",
        ],
        &dir,
    );
    let archive = s.mkdir("archive");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&archive)
        .arg("-xf")
        .arg(dir.join("saved.tar")));
    let layers = Layers::open(&upper, &[&lower]).unwrap();
    let mut layer = fs::File::create(archive.join("new-layer.tar")).unwrap();
    let info = write_layer_tar(&layers, &mut layer).unwrap();
    drop(layer);
    let hex = info.diff_id()["sha256:".len()..].to_string();
    fs::rename(
        archive.join("new-layer.tar"),
        archive.join(format!("{hex}.tar")),
    )
    .unwrap();
    let manifest_path = archive.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    let config_name = manifest[0]["Config"].as_str().unwrap().to_string();
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs::read(archive.join(&config_name)).unwrap()).unwrap();
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .unwrap()
        .push(info.diff_id().into());
    config["history"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"created_by": "unionfs layer_tar"}));
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_hex = sha256_hex(&config_bytes);
    fs::remove_file(archive.join(&config_name)).unwrap();
    fs::write(archive.join(format!("{config_hex}.json")), &config_bytes).unwrap();
    manifest[0]["Config"] = format!("{config_hex}.json").into();
    manifest[0]["RepoTags"] = serde_json::json!(["localhost/with-layer:latest"]);
    manifest[0]["Layers"]
        .as_array_mut()
        .unwrap()
        .push(format!("{hex}.tar").into());
    fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let _ = fs::remove_file(archive.join("repositories"));
    sh(Command::new("tar")
        .arg("-C")
        .arg(&archive)
        .arg("-cf")
        .arg(dir.join("loaded.tar"))
        .arg("."));
    podman.ok_raw(&["load", "-i", "loaded.tar"], &dir);
    let mut run = vec!["run", "--rm"];
    run.extend(RUN_LIMITS);
    run.extend(["with-layer", "/bin/sh", "-c", LISTING]);
    let got = podman.ok_raw(&run, &dir);
    let expected = without_container_files(&String::from_utf8_lossy(&expected.stdout));
    let got = without_container_files(&got);
    assert!(
        expected
            .iter()
            .any(|l| l.starts_with("/data/moved/in/new ")),
        "{expected:#?}"
    );
    assert!(
        !expected.iter().any(|l| l.starts_with("/data/mv")),
        "{expected:#?}"
    );
    assert_eq!(got, expected);
}
