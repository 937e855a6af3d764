//! Unit tests of the core on real layer directories, without FUSE.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;

use super::ino::ROOT_ID;
use super::test_layers::{lookup_path, overlay, write};
use super::*;

fn whiteout(path: &Path) {
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
}

fn names(ov: &Overlay, dir: u64) -> Vec<String> {
    let node = ov.node(dir).unwrap();
    let mut names: Vec<String> = ov
        .merged_entries(&node)
        .unwrap()
        .into_iter()
        .map(|e| e.name.into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn topmost_layer_wins_and_whiteouts_hide() {
    let t = tempfile::tempdir().unwrap();
    let (up, l1, l2) = (t.path().join("u"), t.path().join("l1"), t.path().join("l2"));
    write(&l2.join("a"), b"l2");
    write(&l1.join("a"), b"l1");
    write(&l2.join("b"), b"l2");
    fs::create_dir_all(&up).unwrap();
    whiteout(&up.join("b"));
    write(&l2.join(".wh.x"), b"");
    let ov = overlay(Some(&up), &[&l1, &l2]);

    let (node, attr) = lookup_path(&ov, "a").unwrap();
    assert_eq!(
        node.state().layer,
        1,
        "a comes from l1 (layer index 1 below the upper)"
    );
    assert_eq!(attr.size, 2);
    assert_eq!(lookup_path(&ov, "b").unwrap_err().errno(), Errno::ENOENT);
    assert_eq!(names(&ov, ROOT_ID), [".", "..", "a"]);
    // The negative answer is cached: a second lookup does not hit the layers.
    fs::remove_file(up.join("b")).unwrap();
    assert_eq!(lookup_path(&ov, "b").unwrap_err().errno(), Errno::ENOENT);
    // OCI markers are never names of the merged view.
    assert_eq!(
        lookup_path(&ov, ".wh.x").unwrap_err().errno(),
        Errno::ENOENT
    );
}

#[test]
fn merged_dirs_take_the_topmost_lower_inode_and_nlink_one() {
    let t = tempfile::tempdir().unwrap();
    let (up, l1, l2) = (t.path().join("u"), t.path().join("l1"), t.path().join("l2"));
    write(&up.join("d/u"), b"");
    write(&l1.join("d/one"), b"");
    write(&l2.join("d/two"), b"");
    let ov = overlay(Some(&up), &[&l1, &l2]);
    let (node, attr) = lookup_path(&ov, "d").unwrap();
    assert_eq!(attr.ino, fs::metadata(l1.join("d")).unwrap().ino());
    assert_eq!(attr.nlink, 1);
    assert_eq!(node.dir_stack().unwrap().layers.len(), 3);
    assert_eq!(names(&ov, node.id), [".", "..", "one", "two", "u"]);
    // readdir's d_ino is what lookup reports.
    let root = ov.node(ROOT_ID).unwrap();
    let listed = ov.merged_entries(&root).unwrap();
    let d = listed.iter().find(|e| e.name == "d").unwrap();
    assert_eq!(d.ino, attr.ino);
}

#[test]
fn opaque_and_non_directories_cut_the_stack() {
    let t = tempfile::tempdir().unwrap();
    let (up, l1, l2) = (t.path().join("u"), t.path().join("l1"), t.path().join("l2"));
    write(&up.join("o/x"), b"");
    write(&l1.join("o/y"), b"");
    crate::sys::set_xattr(
        crate::sys::XattrTarget::Fd(std::os::fd::AsFd::as_fd(
            &fs::File::open(up.join("o")).unwrap(),
        )),
        c"trusted.overlay.opaque",
        b"y",
        0,
    )
    .unwrap();
    write(&up.join("c/x"), b"");
    write(&l1.join("c"), b"a file");
    write(&l2.join("c/z"), b"");
    let ov = overlay(Some(&up), &[&l1, &l2]);
    let (o, _) = lookup_path(&ov, "o").unwrap();
    assert_eq!(names(&ov, o.id), [".", "..", "x"]);
    let (c, attr) = lookup_path(&ov, "c").unwrap();
    assert_eq!(names(&ov, c.id), [".", "..", "x"]);
    assert_ne!(attr.nlink, 1, "not merged: the upper's own link count");
    assert_eq!(lookup_path(&ov, "c/z").unwrap_err().errno(), Errno::ENOENT);
}

#[test]
fn hard_links_share_a_node_and_forget_frees_it() {
    let t = tempfile::tempdir().unwrap();
    let l1 = t.path().join("l1");
    write(&l1.join("a"), b"x");
    fs::hard_link(l1.join("a"), l1.join("b")).unwrap();
    let ov = overlay(None, &[&l1]);
    let (a, _) = lookup_path(&ov, "a").unwrap();
    let (b, attr) = lookup_path(&ov, "b").unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(attr.nlink, 2);
    assert_eq!(ov.nodes.len(), 2, "root and the shared node");
    ov.forget(a.id, 1);
    assert_eq!(ov.nodes.len(), 2, "one reference left");
    ov.forget(a.id, 1);
    assert_eq!(ov.nodes.len(), 1, "only the root");
    ov.forget(ROOT_ID, 100);
    assert_eq!(ov.nodes.len(), 1, "the root is never forgotten");
}

#[test]
fn one_directory_seen_at_two_paths_never_aliases() {
    // Overlapping lowers: l/sub is both "/sub" (from l) and "/" (from l/sub),
    // so l/sub/d shows up at "/sub/d" and "/d".
    let t = tempfile::tempdir().unwrap();
    let l = t.path().join("l");
    write(&l.join("sub/d/f"), b"");
    let ov = overlay(None, &[&l, &l.join("sub")]);
    let (first, _) = lookup_path(&ov, "sub/d").unwrap();
    let (second, _) = lookup_path(&ov, "d").unwrap();
    assert_ne!(first.id, second.id);
}

#[test]
fn private_xattrs_are_hidden() {
    let t = tempfile::tempdir().unwrap();
    let (up, l1) = (t.path().join("u"), t.path().join("l1"));
    write(&up.join("d/f"), b"");
    write(&l1.join("d/g"), b"");
    let dir = fs::File::open(up.join("d")).unwrap();
    let fd = std::os::fd::AsFd::as_fd(&dir);
    crate::sys::set_xattr(
        crate::sys::XattrTarget::Fd(fd),
        c"trusted.overlay.origin",
        b"x",
        0,
    )
    .unwrap();
    crate::sys::set_xattr(crate::sys::XattrTarget::Fd(fd), c"user.visible", b"v", 0).unwrap();
    let ov = overlay(Some(&up), &[&l1]);
    let (d, _) = lookup_path(&ov, "d").unwrap();
    let list = ov.listxattr(d.id).unwrap();
    assert!(list.windows(12).any(|w| w == b"user.visible"));
    assert!(!list.windows(8).any(|w| w == b"overlay."));
    assert_eq!(
        ov.getxattr(d.id, OsStr::new("trusted.overlay.origin"))
            .unwrap_err()
            .errno(),
        Errno::ENODATA
    );
    assert_eq!(ov.getxattr(d.id, OsStr::new("user.visible")).unwrap(), b"v");
}

#[test]
fn names_are_checked() {
    let t = tempfile::tempdir().unwrap();
    let l1 = t.path().join("l1");
    fs::create_dir_all(&l1).unwrap();
    let ov = overlay(None, &[&l1]);
    assert_eq!(
        ov.lookup(ROOT_ID, OsStr::new("a/b")).unwrap_err().errno(),
        Errno::EINVAL
    );
    let long = "x".repeat(256);
    assert_eq!(
        ov.lookup(ROOT_ID, OsStr::new(&long)).unwrap_err().errno(),
        Errno::ENAMETOOLONG
    );
}

#[test]
fn work_dir_serves_one_mount_at_a_time() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("work");
    fs::create_dir(&root).unwrap();
    let first = workdir::WorkDir::prepare(&root).unwrap();
    // Something the first owner is building.
    let building = root.join("work").join(first.temp_name());
    fs::write(&building, b"copy-up in flight").unwrap();

    let second = workdir::WorkDir::prepare(&root).expect_err("a second owner was let in");
    assert_eq!(second.errno(), Errno::EBUSY);
    assert!(
        second.to_string().contains(root.to_str().unwrap()),
        "{second}"
    );
    assert!(building.exists(), "the refused owner removed a live object");

    drop(first);
    let _again = workdir::WorkDir::prepare(&root).expect("the work dir is free again");
    assert!(!building.exists(), "leftovers go once the owner is gone");
}
