//! Differential testing against kernel overlayfs: the same random operation
//! sequences run on a unionfs mount and on a kernel overlay mount of the same
//! layers; every result (errno), the merged trees and the upper directories
//! must agree, and kernel overlayfs must read the upper unionfs wrote.
//!
//! Timestamps too: every lower object has one old mtime and a future atime
//! (`common::set_fixed_times`; relatime leaves such an atime alone on
//! reads), and utimensat operations set fixed values. In the merged views
//! and in the uppers, which objects keep those times, and the exact values
//! set, must match; times set to "now" only match as "now". ctime is not
//! compared.
//!
//! `UNIONFS_DIFF_SEQUENCES` and `UNIONFS_DIFF_SEED` override the defaults.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The upper format a run compares, with what each side is mounted with.
struct Format {
    /// Options of the kernel overlay mounts.
    kernel_options: &'static str,
    /// unionfs' extra arguments.
    unionfs_args: &'static [&'static str],
    /// The namespace of the overlay's own xattrs, in lowers and upper.
    overlay_xattrs: &'static str,
}

const TRUSTED: Format = Format {
    kernel_options: "redirect_dir=on",
    unionfs_args: &[],
    overlay_xattrs: "trusted.overlay.",
};

/// Kernel overlayfs with `userxattr` in a user namespace; unionfs there
/// without options: it must find on its own that `trusted.*` is refused.
const USERXATTR: Format = Format {
    kernel_options: "userxattr",
    unionfs_args: &[],
    overlay_xattrs: "user.overlay.",
};

/// xorshift64*: enough randomness, and reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        path: PathBuf,
        offset: u64,
        len: usize,
        byte: u8,
        create: bool,
    },
    Append {
        path: PathBuf,
        len: usize,
    },
    Truncate {
        path: PathBuf,
        size: u64,
    },
    Chmod {
        path: PathBuf,
        mode: u32,
    },
    Utimens {
        path: PathBuf,
        secs: i64,
    },
    Mkdir {
        path: PathBuf,
    },
    Rmdir {
        path: PathBuf,
    },
    Unlink {
        path: PathBuf,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
    Link {
        from: PathBuf,
        to: PathBuf,
    },
    Symlink {
        target: String,
        path: PathBuf,
    },
    SetXattr {
        path: PathBuf,
        value: String,
    },
    RmRf {
        path: PathBuf,
    },
    Read {
        path: PathBuf,
    },
    Rename2 {
        from: PathBuf,
        to: PathBuf,
        exchange: bool,
    },
    Mkfifo {
        path: PathBuf,
    },
    Chown {
        path: PathBuf,
        uid: u32,
    },
    TruncWrite {
        path: PathBuf,
        len: usize,
    },
}

const NEW_NAMES: &[&str] = &["n1", "n2", "f1", "sub", "x", "h", "k", "j"];
/// Relative, without "..": a link can never lead an operation out of the
/// mount (links pointing outside are the read-path tests' business).
const SYMLINK_TARGETS: &[&str] = &["f1", "sub", "nowhere", "a/f1"];

fn build_lowers(root: &Path, format: &Format) -> Vec<PathBuf> {
    let (l1, l2) = (root.join("l1"), root.join("l2"));
    for (p, data) in [
        ("a/f1", &b"bottom f1"[..]),
        ("a/f2", b"bottom f2"),
        ("a/sub/g", b"deep"),
        ("b/h", b"to be whited out"),
        ("top1", b"top1"),
        ("d/k", b"hidden by opaque"),
        ("m/deep/file", b"merged deep"),
    ] {
        write(l2.join(p), data);
    }
    fs::create_dir_all(l2.join("e")).unwrap();
    symlink("a/f1", l2.join("ln"));
    let sparse = fs::File::create(l2.join("sparse")).unwrap();
    sparse.write_at(b"tail", 1 << 20).unwrap();
    chmod(l2.join("a/f2"), 0o640);
    set_xattr(l2.join("a/f1"), "user.origin", "l2");
    for (p, data) in [
        ("a/f1", &b"top f1"[..]),
        ("c/i", b"c"),
        ("d/j", b"opaque child"),
        ("m/other", b"merged other"),
    ] {
        write(l1.join(p), data);
    }
    fs::create_dir_all(l1.join("b")).unwrap();
    chardev_whiteout(l1.join("b/h"));
    set_xattr(
        l1.join("d"),
        &format!("{}opaque", format.overlay_xattrs),
        "y",
    );
    set_fixed_times(&l1);
    set_fixed_times(&l2);
    vec![l1, l2]
}

/// Every path of the merged tree (relative), for picking operands.
fn existing_paths(root: &Path) -> Vec<PathBuf> {
    let mut paths = walk(root);
    paths.sort();
    paths
}

fn gen_op(rng: &mut Rng, paths: &[PathBuf]) -> Op {
    let existing = |rng: &mut Rng| -> PathBuf {
        if paths.is_empty() {
            PathBuf::from("a")
        } else {
            rng.pick(paths).clone()
        }
    };
    let fresh = |rng: &mut Rng| -> PathBuf {
        let mut base = if rng.below(3) == 0 || paths.is_empty() {
            PathBuf::new()
        } else {
            rng.pick(paths).clone()
        };
        if rng.below(4) == 0 {
            base = base.parent().map(Path::to_path_buf).unwrap_or_default();
        }
        base.join(rng.pick(NEW_NAMES))
    };
    let any = |rng: &mut Rng| {
        if rng.below(3) == 0 {
            fresh(rng)
        } else {
            existing(rng)
        }
    };
    match rng.below(18) {
        14 => Op::Rename2 {
            from: existing(rng),
            to: any(rng),
            exchange: rng.below(2) == 0,
        },
        15 => Op::Mkfifo { path: fresh(rng) },
        16 => Op::Chown {
            path: existing(rng),
            uid: 1000 + rng.below(3) as u32,
        },
        17 => Op::TruncWrite {
            path: existing(rng),
            len: rng.below(3000),
        },
        0 => Op::Write {
            path: any(rng),
            offset: rng.below(3) as u64 * 4096 + rng.below(100) as u64,
            len: 1 + rng.below(5000),
            byte: b'a' + rng.below(26) as u8,
            create: rng.below(2) == 0,
        },
        1 => Op::Append {
            path: existing(rng),
            len: 1 + rng.below(300),
        },
        2 => Op::Truncate {
            path: existing(rng),
            size: *rng.pick(&[0u64, 3, 5000, 1 << 21]),
        },
        3 => Op::Chmod {
            path: existing(rng),
            mode: *rng.pick(&[0o600u32, 0o755, 0o4711, 0o640]),
        },
        4 => Op::Utimens {
            path: existing(rng),
            secs: 1_000_000_000 + rng.below(1000) as i64,
        },
        5 => Op::Mkdir { path: any(rng) },
        6 => Op::Rmdir {
            path: existing(rng),
        },
        7 => Op::Unlink {
            path: existing(rng),
        },
        8 => Op::Rename {
            from: existing(rng),
            to: any(rng),
        },
        9 => Op::Link {
            from: existing(rng),
            to: fresh(rng),
        },
        10 => Op::Symlink {
            target: rng.pick(SYMLINK_TARGETS).to_string(),
            path: fresh(rng),
        },
        11 => Op::SetXattr {
            path: existing(rng),
            value: format!("v{}", rng.below(100)),
        },
        12 => Op::RmRf {
            path: existing(rng),
        },
        _ => Op::Read {
            path: existing(rng),
        },
    }
}

fn errno_of(e: std::io::Error) -> String {
    format!("errno {}", e.raw_os_error().unwrap_or(-1))
}

/// Applies one operation under `root`; the answer is what is compared.
fn apply(root: &Path, op: &Op) -> String {
    let p = |rel: &Path| root.join(rel);
    // Non-blocking, so an operation on a FIFO answers instead of waiting for
    // a partner that never comes.
    let open = || {
        let mut o = fs::OpenOptions::new();
        o.custom_flags(libc::O_NONBLOCK);
        o
    };
    let res: std::io::Result<String> = (|| match op {
        Op::Write {
            path,
            offset,
            len,
            byte,
            create,
        } => {
            let f = open()
                .write(true)
                .create(*create)
                .mode(0o644)
                .open(p(path))?;
            f.write_all_at(&vec![*byte; *len], *offset)?;
            Ok("ok".into())
        }
        Op::Append { path, len } => {
            let mut f = open().append(true).open(p(path))?;
            f.write_all(&vec![b'+'; *len])?;
            Ok("ok".into())
        }
        Op::Truncate { path, size } => {
            let f = open().write(true).open(p(path))?;
            f.set_len(*size)?;
            Ok("ok".into())
        }
        Op::Chmod { path, mode } => {
            fs::set_permissions(p(path), fs::Permissions::from_mode(*mode))?;
            Ok(format!("mode {:o}", fs::metadata(p(path))?.mode()))
        }
        Op::Utimens { path, secs } => {
            // The atime in the future, past relatime's reach (see
            // set_fixed_times), so later reads leave it exact.
            let atime = FUTURE_ATIME.0 + (*secs - 1_000_000_000);
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &p(path),
                &nix::sys::time::TimeSpec::new(atime, 987_654_321),
                &nix::sys::time::TimeSpec::new(*secs, 123_456_789),
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .map_err(std::io::Error::from)?;
            let m = fs::symlink_metadata(p(path))?;
            Ok(format!(
                "mtime {}.{} atime {}.{}",
                m.mtime(),
                m.mtime_nsec(),
                m.atime(),
                m.atime_nsec()
            ))
        }
        Op::Mkdir { path } => fs::create_dir(p(path)).map(|_| "ok".into()),
        Op::Rmdir { path } => fs::remove_dir(p(path)).map(|_| "ok".into()),
        Op::Unlink { path } => fs::remove_file(p(path)).map(|_| "ok".into()),
        Op::Rename { from, to } => fs::rename(p(from), p(to)).map(|_| "ok".into()),
        Op::Link { from, to } => {
            fs::hard_link(p(from), p(to))?;
            Ok(format!("nlink {}", fs::symlink_metadata(p(to))?.nlink()))
        }
        Op::Symlink { target, path } => {
            std::os::unix::fs::symlink(target, p(path)).map(|_| "ok".into())
        }
        Op::SetXattr { path, value } => {
            let out = run(Command::new("setfattr")
                .args(["-h", "-n", "user.diff", "-v", value])
                .arg(p(path)));
            Ok(format!(
                "setfattr {} {}",
                out.status.success(),
                String::from_utf8_lossy(&out.stderr)
                    .split(':')
                    .next_back()
                    .unwrap_or("")
                    .trim()
            ))
        }
        Op::RmRf { path } => {
            let out = run(Command::new("rm").arg("-rf").arg(p(path)));
            Ok(format!("rm {}", out.status.success()))
        }
        Op::Read { path } => {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut open().read(true).open(p(path))?, &mut data)?;
            Ok(format!("{} bytes", data.len()))
        }
        Op::Rename2 { from, to, exchange } => {
            let flags = if *exchange {
                nix::fcntl::RenameFlags::RENAME_EXCHANGE
            } else {
                nix::fcntl::RenameFlags::RENAME_NOREPLACE
            };
            nix::fcntl::renameat2(
                nix::fcntl::AT_FDCWD,
                &p(from),
                nix::fcntl::AT_FDCWD,
                &p(to),
                flags,
            )
            .map_err(std::io::Error::from)?;
            Ok("ok".into())
        }
        Op::Mkfifo { path } => {
            nix::unistd::mkfifo(&p(path), nix::sys::stat::Mode::from_bits_truncate(0o640))
                .map_err(std::io::Error::from)?;
            Ok("ok".into())
        }
        Op::Chown { path, uid } => {
            std::os::unix::fs::lchown(p(path), Some(*uid), Some(*uid + 1))?;
            let m = fs::symlink_metadata(p(path))?;
            Ok(format!("owner {}:{} mode {:o}", m.uid(), m.gid(), m.mode()))
        }
        Op::TruncWrite { path, len } => {
            let mut f = open().write(true).truncate(true).open(p(path))?;
            f.write_all(&vec![b'T'; *len])?;
            Ok("ok".into())
        }
    })();
    res.unwrap_or_else(errno_of)
}

/// The upper layer as kernel overlayfs tools see it: entries, types
/// (whiteouts included), modes, sizes, contents, link targets, user xattrs
/// and the opaque marker. Kernel bookkeeping xattrs (origin, impure, ...)
/// are not part of the format unionfs has to reproduce.
fn upper_snapshot(root: &Path, format: &Format) -> BTreeMap<PathBuf, String> {
    let prefix = format.overlay_xattrs;
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let m = fs::symlink_metadata(&path).unwrap();
        let ft = m.file_type();
        let mut opaque = xattrs_with_prefix(&path, &format!("{prefix}opaque"));
        let redirect = xattrs_with_prefix(&path, &format!("{prefix}redirect"));
        // The kernel may leave a redirect to the directory's own name (set
        // before a rename that then failed): it changes nothing.
        let own_name = rel.file_name().map(|n| n.as_encoded_bytes().to_vec());
        opaque.extend(
            redirect
                .into_iter()
                .filter(|(_, v)| Some(v) != own_name.as_ref()),
        );
        let desc = if ft.is_dir() {
            for e in fs::read_dir(&path).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
            format!("dir {:o} opaque={opaque:?}", m.mode())
        } else if ft.is_symlink() {
            format!("symlink -> {:?}", fs::read_link(&path).unwrap())
        } else if ft.is_file() {
            let data = fs::read(&path).unwrap();
            format!(
                "file {:o} size={} sum={:x}",
                m.mode(),
                m.size(),
                data.iter()
                    .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(*b as u64))
            )
        } else {
            format!("special {:o} rdev={}", m.mode(), m.rdev())
        };
        let mut xattrs = user_xattrs(&path);
        xattrs.retain(|name, _| !name.starts_with(prefix));
        out.insert(rel, format!("{desc} xattrs={xattrs:?}"));
    }
    out
}

fn diff_maps(a: &BTreeMap<PathBuf, String>, b: &BTreeMap<PathBuf, String>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("{k:?}: only in unionfs upper: {v}")),
            Some(w) if w != v => d.push(format!("{k:?}: unionfs {v} != kernel {w}")),
            _ => {}
        }
    }
    for (k, w) in b {
        if !a.contains_key(k) {
            d.push(format!("{k:?}: only in kernel upper: {w}"));
        }
    }
    d
}

struct Outcome {
    ops: usize,
    /// Operations kernel overlayfs answered with EXDEV (directories it may
    /// not move without redirects), so a run shows it covered them.
    exdev: usize,
    divergences: Vec<String>,
}

fn run_sequence(
    s: &Scratch,
    lowers: &[PathBuf],
    format: &Format,
    seed: u64,
    len: usize,
) -> Outcome {
    let dir = s.mkdir(&format!("seq{seed}"));
    let [ours_u, kern_u, kern_w, ours_m, kern_m] = ["u", "ku", "kw", "m", "km"].map(|n| {
        let p = dir.join(n);
        fs::create_dir_all(&p).unwrap();
        p
    });
    let lower_refs: Vec<&Path> = lowers.iter().map(|p| p.as_path()).collect();
    let ours = UnionMount::mount(&lower_refs, Some(&ours_u), &ours_m, format.unionfs_args);
    let kernel = KernelMount::mount(
        &lower_refs,
        Some((&kern_u, &kern_w)),
        &kern_m,
        format.kernel_options,
    );
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut divergences = Vec::new();
    let mut log = Vec::new();
    let mut exdev = 0;
    for i in 0..len {
        let paths = existing_paths(&ours.mountpoint);
        let op = gen_op(&mut rng, &paths);
        let a = apply(&ours.mountpoint, &op);
        let b = apply(&kernel.mountpoint, &op);
        log.push(format!("  #{i} {op:?} -> {a}"));
        exdev += usize::from(b == format!("errno {}", libc::EXDEV));
        if a != b {
            divergences.push(format!(
                "seed {seed} op #{i} {op:?}: unionfs {a} != kernel {b}"
            ));
            break;
        }
    }
    if divergences.is_empty() {
        let t = diff_trees(
            "unionfs",
            &snapshot(&ours.mountpoint),
            "kernel",
            &snapshot(&kernel.mountpoint),
        );
        divergences.extend(
            t.into_iter()
                .map(|d| format!("seed {seed} merged tree: {d}")),
        );
    }
    let our_times = time_marks(&ours.mountpoint);
    if divergences.is_empty() {
        let t = diff_time_marks(
            "unionfs",
            &our_times,
            "kernel",
            &time_marks(&kernel.mountpoint),
        );
        divergences.extend(
            t.into_iter()
                .map(|d| format!("seed {seed} merged times: {d}")),
        );
    }
    let our_tree = snapshot(&ours.mountpoint);
    drop(ours);
    drop(kernel);
    if divergences.is_empty() {
        let u = diff_maps(
            &upper_snapshot(&ours_u, format),
            &upper_snapshot(&kern_u, format),
        );
        divergences.extend(u.into_iter().map(|d| format!("seed {seed} upper: {d}")));
    }
    if divergences.is_empty() {
        let u = diff_time_marks(
            "unionfs",
            &time_marks(&ours_u),
            "kernel",
            &time_marks(&kern_u),
        );
        divergences.extend(
            u.into_iter()
                .map(|d| format!("seed {seed} upper times: {d}")),
        );
    }
    if divergences.is_empty() {
        // Kernel overlayfs must read the upper unionfs wrote the same way.
        let w = dir.join("rw");
        fs::create_dir_all(&w).unwrap();
        let again = KernelMount::mount(
            &lower_refs,
            Some((&ours_u, &w)),
            &kern_m,
            format.kernel_options,
        );
        let t = diff_trees(
            "unionfs",
            &our_tree,
            "kernel-over-unionfs-upper",
            &snapshot(&again.mountpoint),
        );
        divergences.extend(t.into_iter().map(|d| format!("seed {seed} remount: {d}")));
        let t = diff_time_marks(
            "unionfs",
            &our_times,
            "kernel-over-unionfs-upper",
            &time_marks(&again.mountpoint),
        );
        divergences.extend(
            t.into_iter()
                .map(|d| format!("seed {seed} remount times: {d}")),
        );
    }
    if !divergences.is_empty() {
        divergences.push(format!("operations of seed {seed}:\n{}", log.join("\n")));
    }
    let _ = fs::remove_dir_all(&dir);
    Outcome {
        ops: len,
        exdev,
        divergences,
    }
}

/// `UNIONFS_DIFF_SEQUENCES` (or `default`) sequences from seed
/// `UNIONFS_DIFF_SEED` (or 1); panics at the first divergence.
fn run_sequences(s: &Scratch, format: &Format, default: u64) -> String {
    let sequences: u64 = std::env::var("UNIONFS_DIFF_SEQUENCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let first: u64 = std::env::var("UNIONFS_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let lowers = build_lowers(s.dir.path(), format);
    let digests: Vec<String> = lowers.iter().map(|l| layer_digest(l)).collect();
    let (mut ops, mut exdev) = (0, 0);
    for seed in first..first + sequences {
        let outcome = run_sequence(s, &lowers, format, seed, 25);
        ops += outcome.ops;
        exdev += outcome.exdev;
        assert!(
            outcome.divergences.is_empty(),
            "divergence:\n{}",
            outcome.divergences.join("\n")
        );
    }
    for (layer, digest) in lowers.iter().zip(digests) {
        assert_eq!(layer_digest(layer), digest, "lower {layer:?} changed");
    }
    format!("{sequences} sequences, {ops} operations ({exdev} answered EXDEV), no divergence")
}

#[test]
fn random_sequences_match_kernel_overlayfs() {
    let s = Scratch::new();
    eprintln!("differential: {}", run_sequences(&s, &TRUSTED, 300));
}

/// Where the user-namespace child finds its scratch directory.
const USERNS_ENV: &str = "UNIONFS_DIFF_USERNS_SCRATCH";

/// Rootless, as podman runs a mount program: uid 1001 ('tests') in a user
/// namespace mapping it to root and its subordinate ids to 1..65535, with
/// a private 0666 /dev/fuse. Kernel overlayfs there can only use
/// `userxattr`; unionfs must write the same upper.
#[test]
fn random_sequences_match_kernel_overlayfs_with_userxattr_in_a_user_namespace() {
    let s = Scratch::new();
    let uid = rootless_user();
    std::os::unix::fs::chown(s.dir.path(), Some(uid), Some(uid)).unwrap();
    let fuse = s.path("fuse");
    let script = format!(
        "mknod {fuse} c 10 229 && chmod 666 {fuse} && mount --bind {fuse} /dev/fuse && \
         exec setpriv --reuid={uid} --regid={uid} --clear-groups \
         unshare --map-auto --map-root-user --mount --propagation private -- \"$@\"",
        fuse = fuse.display(),
    );
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ])
    .arg(std::env::current_exe().unwrap())
    .args(["--ignored", "--exact", "userns_child", "--nocapture"])
    .env(USERNS_ENV, s.dir.path());
    let out = run_with_timeout(&mut cmd, std::time::Duration::from_secs(1800));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the user-namespace run failed:\n{stdout}\n{stderr}"
    );
    eprintln!(
        "{}",
        stderr
            .lines()
            .filter(|l| l.starts_with("differential"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The child side of the user-namespace test; does nothing unless asked.
#[test]
#[ignore = "run by the userxattr differential test inside a user namespace"]
fn userns_child() {
    let Ok(dir) = std::env::var(USERNS_ENV) else {
        return;
    };
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "not root in the namespace"
    );
    let s = Scratch::inside(Path::new(&dir));
    eprintln!(
        "differential (userxattr, user namespace): {}",
        run_sequences(&s, &USERXATTR, 150)
    );
}
