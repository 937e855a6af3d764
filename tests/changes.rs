//! `unionfs::image::changes` against `podman diff`: the same scripted
//! changes made in a podman container (native overlay driver) and through a
//! unionfs mount over the same image's layer directories must be reported
//! identically, order included.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::podman::{CONTAINER_INIT, Podman, RUN_LIMITS, install_busybox, tar_rootfs};
use common::*;
use unionfs::image::changes::{self, ChangeKind, Layers};

/// Each scenario: a name and a busybox sh script, run in a fresh container.
const SCENARIOS: &[(&str, &str)] = &[
    ("new-file", "echo n > /data/new"),
    ("new-deep", "echo n > /data/sub/deep/new"),
    ("modify", "echo x >> /data/a"),
    ("delete", "rm /data/a"),
    ("delete-tree", "rm -r /data/tree"),
    (
        "replace-dir",
        "rm -r /data/rep && mkdir /data/rep && echo n > /data/rep/new && echo o > /data/rep/o",
    ),
    ("rename-dir", "mv /data/mv /data/mv2"),
    (
        "move-dir",
        "mv /data/mv /data/sub/mvd && touch /data/sub/mvd/in/f",
    ),
    ("chmod", "chmod 600 /data/a"),
    ("hard-link", "ln /data/a /data/alink"),
    ("hard-link-new", "echo z > /data/z && ln /data/z /data/z2"),
    ("empty-dir", "mkdir /data/empty && mkdir -p /data/n1/n2/n3"),
    (
        "created-then-deleted",
        "echo n > /data/tmpf && rm /data/tmpf && echo n > /data/sub/deep/t && rm /data/sub/deep/t",
    ),
    ("dir-mtime", "touch /data/touchdir"),
    ("file-mtime", "touch /data/b"),
    (
        "mixed",
        "echo 1 > /top && rm /data/b && ln -s a /data/c2 && rm /data/c && echo c > /data/c && mkdir /etc/new.d && echo e > /etc/new.d/e",
    ),
];

fn build_rootfs(dir: &Path) {
    let rootfs = dir.join("rootfs");
    for d in [
        "bin",
        "etc",
        "tmp",
        "data/sub/deep",
        "data/tree/x/y",
        "data/mv/in",
        "data/rep/old",
        "data/touchdir",
    ] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    install_busybox(
        &rootfs,
        &[
            "sh", "ls", "cat", "echo", "mkdir", "rm", "chmod", "ln", "mv", "touch", "cp",
        ],
    );
    for (file, content) in [
        ("data/a", "a"),
        ("data/b", "b"),
        ("data/c", "c"),
        ("data/sub/deep/f", "d"),
        ("data/tree/x/y/f", "t"),
        ("data/tree/t", "t2"),
        ("data/mv/in/f", "m"),
        ("data/mv/g", "m2"),
        ("data/rep/old/f", "r"),
        ("data/rep/o", "r2"),
        ("data/touchdir/q", "q"),
        ("etc/passwd", "root:x:0:0:root:/:/bin/sh\n"),
    ] {
        write(rootfs.join(file), content.as_bytes());
    }
    tar_rootfs(&rootfs, &dir.join("rootfs.tar"));
}

fn lines(changes: &[changes::Change]) -> Vec<String> {
    changes.iter().map(|c| c.to_string()).collect()
}

#[test]
fn changes_match_podman_diff() {
    let s = Scratch::new();
    let dir = s.dir.path().to_path_buf();
    build_rootfs(&dir);
    // A directory is reported at its own place only when its mtime differs
    // from the lower one's to the second: no change may fall in the second
    // the rootfs was made, or the order would depend on timing.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let podman = Podman::new(s.mkdir("storage"));
    podman.ok_raw(&["import", "rootfs.tar", "base"], &dir);
    let inspect = |field: &str| {
        podman
            .ok(
                &[
                    "image",
                    "inspect",
                    "--format",
                    &format!("{{{{.GraphDriver.Data.{field}}}}}"),
                    "base",
                ],
                &dir,
            )
            .trim()
            .to_string()
    };
    let mut lowers = vec![PathBuf::from(inspect("UpperDir"))];
    let lower_dir = inspect("LowerDir");
    lowers.extend(
        lower_dir
            .split(':')
            .filter(|p| !p.is_empty() && *p != "<no value>")
            .map(PathBuf::from),
    );
    let lower_refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();

    let mut failures = Vec::new();
    for (name, script) in SCENARIOS {
        let container = format!("chg-{name}");
        let mut run = vec!["run", "--name", &container];
        run.extend(RUN_LIMITS);
        run.extend(["base", "/bin/sh", "-c", script]);
        podman.ok_raw(&run, &dir);
        let expected: Vec<String> = podman
            .ok(&["diff", &container], &dir)
            .lines()
            .map(str::to_string)
            .collect();
        podman.ok_raw(&["rm", &container], &dir);

        let upper = s.mkdir(&format!("{name}/upper"));
        let mnt = s.mkdir(&format!("{name}/mnt"));
        let m = UnionMount::mount(&lower_refs, Some(&upper), &mnt, &[]);
        sh(Command::new("chroot").arg(&m.mountpoint).args([
            "/bin/sh",
            "-c",
            &format!("{CONTAINER_INIT} && {script}"),
        ]));
        drop(m);
        let layers = Layers::open(&upper, &lower_refs).unwrap();
        let got = lines(&changes::without_container_init_paths(
            changes::changes(&layers).unwrap(),
        ));
        if *name == "rename-dir" {
            // unionfs moved it with a redirect; podman copied it.
            let redirect = xattrs_with_prefix(&upper.join("data/mv2"), "trusted.overlay.");
            assert!(
                redirect.contains_key("trusted.overlay.redirect"),
                "{redirect:?}"
            );
            assert!(
                expected.contains(&"A /data/mv2/in/f".to_string()),
                "{expected:?}"
            );
        }
        if *name == "new-deep" {
            assert_eq!(
                expected,
                [
                    "C /data/sub/deep",
                    "C /data",
                    "C /data/sub",
                    "A /data/sub/deep/new",
                    "C /etc"
                ]
            );
        }
        if got != expected {
            failures.push(format!(
                "{name} ({script}):\n podman: {expected:?}\n unionfs: {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The serializable form: `podman diff --format json`'s grouping.
#[test]
fn diff_report_groups_by_kind() {
    let changes = vec![
        changes::Change {
            kind: ChangeKind::Modified,
            path: "/etc".into(),
        },
        changes::Change {
            kind: ChangeKind::Added,
            path: "/etc/new".into(),
        },
        changes::Change {
            kind: ChangeKind::Deleted,
            path: "/etc/old".into(),
        },
    ];
    let json = serde_json::to_string(&changes::DiffReport::new(&changes)).unwrap();
    assert_eq!(
        json,
        r#"{"changed":["/etc"],"added":["/etc/new"],"deleted":["/etc/old"]}"#
    );
    let json = serde_json::to_string(&changes[0]).unwrap();
    assert_eq!(json, r#"{"kind":"C","path":"/etc"}"#);
}

/// A 10,000-level tree added in the upper: every level reported, without
/// recursion and within the descriptor budget.
#[test]
fn deep_trees_are_walked_iteratively() {
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    let upper = s.mkdir("upper");
    write(lower.join("keep"), b"k");
    let mut dir = std::fs::File::open(&upper).unwrap();
    for _ in 0..10_000 {
        nix::sys::stat::mkdirat(&dir, "d", nix::sys::stat::Mode::from_bits_truncate(0o755))
            .unwrap();
        let next = nix::fcntl::openat(
            &dir,
            "d",
            nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        dir = std::fs::File::from(next);
    }
    let layers = Layers::open(&upper, &[&lower]).unwrap();
    let result = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || changes::changes(&layers).map(|c| c.len()))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(result.unwrap(), 10_000);
    // rm(1), not the scratch directory's recursive cleanup.
    sh(Command::new("rm").arg("-rf").arg(&upper));
}
