//! Layers made to break the daemon: directories whose `redirect_dir` xattr is
//! malformed or points out of the layer. Kernel overlayfs (redirect_dir=on,
//! which follows redirects as unionfs always does) is the reference: a bad
//! redirect fails the lookup of that one directory, its siblings list, and
//! nothing outside the layers is ever looked at.

mod common;

use std::ffi::CString;
use std::fs;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;

use common::*;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use unionfs::sys::{XattrTarget, set_xattr};

/// The redirects kernel overlayfs refuses or cannot follow, with a name for
/// messages.
fn bad_redirects() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("absolute-dotdot", b"/../x".to_vec()),
        ("empty-component", b"//etc".to_vec()),
        ("dotdot", b"..".to_vec()),
        ("dot", b".".to_vec()),
        ("relative-path", b"../x".to_vec()),
        ("long", vec![b'a'; 3000]),
    ]
}

fn set_raw_xattr(path: &Path, name: &str, value: &[u8]) {
    let fd = open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let name = CString::new(name).unwrap();
    set_xattr(XattrTarget::Fd(fd.as_fd()), &name, value, 0)
        .unwrap_or_else(|e| panic!("set {name:?} on {path:?}: {e}"));
}

/// Two lower layers in `<root>/layers`: `l1/bad` carries the redirect, its
/// siblings `a`, `b`, `c` are plain, and `l2` below has a `bad` of its own and
/// an `x` the relative redirects could be mistaken for.
fn build_layers(
    root: &Path,
    xattr: &str,
    value: &[u8],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (l1, l2) = (root.join("layers/l1"), root.join("layers/l2"));
    for dir in ["upper", "work"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    for name in ["a", "b", "c", "bad"] {
        write(l1.join(name).join("f"), name.as_bytes());
    }
    write(l1.join("sub/deep/f"), b"deep");
    write(l2.join("bad/lower-file"), b"below");
    write(l2.join("x/in-x"), b"x");
    write(l2.join("etc/in-etc"), b"etc");
    set_raw_xattr(&l1.join("bad"), xattr, value);
    (l1, l2)
}

/// What a mount shows of the hostile tree.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// `ls -1a` of the root (readdirplus through the kernel), and whether it
    /// succeeded.
    ls: (Vec<String>, bool),
    /// `bad`: its entries, or the errno of stat.
    bad: Result<Vec<String>, i32>,
    /// `find .` from the root: every path it printed, and whether it
    /// succeeded.
    find: (Vec<String>, bool),
}

fn look(mnt: &Path) -> Seen {
    let ls_out = run(Command::new("ls").arg("-1a").arg(mnt));
    let mut ls: Vec<String> = String::from_utf8_lossy(&ls_out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    ls.sort();
    let bad = match fs::symlink_metadata(mnt.join("bad")) {
        Err(e) => Err(e.raw_os_error().unwrap()),
        Ok(_) => {
            let mut names: Vec<String> = fs::read_dir(mnt.join("bad"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            Ok(names)
        }
    };
    let find = run(Command::new("find").arg(".").current_dir(mnt));
    let mut paths: Vec<String> = String::from_utf8_lossy(&find.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    paths.sort();
    Seen {
        ls: (ls, ls_out.status.success()),
        bad,
        find: (paths, find.status.success()),
    }
}

/// What kernel overlayfs shows with the trusted redirect, beside what
/// unionfs shows with `xattr`, each over its own copy of the layers.
fn kernel_and_unionfs(s: &Scratch, case: &str, xattr: &str, value: &[u8]) -> (Seen, Seen) {
    let kroot = s.mkdir(&format!("{case}/kernel"));
    let (kl1, kl2) = build_layers(&kroot, "trusted.overlay.redirect", value);
    let kernel = KernelMount::mount(
        &[&kl1, &kl2],
        Some((&kroot.join("upper"), &kroot.join("work"))),
        &s.mkdir(&format!("{case}/kernel-mnt")),
        "redirect_dir=on",
    );
    let expected = look(&kernel.mountpoint);
    drop(kernel);

    let uroot = s.mkdir(&format!("{case}/unionfs"));
    let (ul1, ul2) = build_layers(&uroot, xattr, value);
    let mnt = s.mkdir(&format!("{case}/unionfs-mnt"));
    let m = UnionMount::mount(&[&ul1, &ul2], Some(&uroot.join("upper")), &mnt, &[]);
    let got = look(&m.mountpoint);
    drop(m);

    // Whatever sits beside the layers must make no difference.
    let beside = uroot.join("layers/x");
    write(beside.join("outside"), b"outside the layers");
    let m = UnionMount::mount(&[&ul1, &ul2], Some(&uroot.join("upper")), &mnt, &[]);
    let with_beside = look(&m.mountpoint);
    drop(m);
    fs::remove_dir_all(&beside).unwrap();
    assert_eq!(
        got, with_beside,
        "{case}: a directory beside the layers changed the mount"
    );
    (expected, got)
}

fn check_all(xattr: &str) {
    let s = Scratch::new();
    let mut failures = Vec::new();
    for (case, value) in bad_redirects() {
        let (expected, got) = kernel_and_unionfs(&s, case, xattr, &value);
        // The siblings list whatever happens to `bad`.
        for sibling in ["./a", "./a/f", "./b/f", "./c/f", "./sub/deep/f"] {
            if !got.find.0.iter().any(|p| p == sibling) {
                failures.push(format!("{case}: find did not reach {sibling}"));
            }
        }
        if expected != got {
            failures.push(format!(
                "{case}:\n  kernel  {expected:?}\n  unionfs {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn bad_trusted_redirects_fail_their_directory_alone_as_on_kernel_overlayfs() {
    check_all("trusted.overlay.redirect");
}

/// The kernel follows `user.overlay.redirect` only with `userxattr`, where
/// it follows no redirect at all; unionfs reads both names and must treat a
/// bad user redirect exactly as the kernel treats a bad trusted one.
#[test]
fn bad_user_redirects_fail_their_directory_alone_like_trusted_ones() {
    check_all("user.overlay.redirect");
}

/// The errno kernel overlayfs gives each bad redirect, written down so that
/// a change on either side shows.
#[test]
fn bad_redirects_answer_the_kernels_errno() {
    let s = Scratch::new();
    let expected = [
        ("absolute-dotdot", Err(libc::EACCES)),
        ("empty-component", Err(libc::EINVAL)),
        ("dotdot", Err(libc::EACCES)),
        ("dot", Err(libc::EACCES)),
        ("relative-path", Err(libc::EINVAL)),
        // A name longer than the layer's filesystem allows finds nothing
        // below: the directory shows its own layer only.
        ("long", Ok(vec!["f".to_string()])),
    ];
    let mut failures = Vec::new();
    for ((case, value), (name, errno)) in bad_redirects().into_iter().zip(expected) {
        assert_eq!(case, name);
        let root = s.mkdir(case);
        let (l1, l2) = build_layers(&root, "trusted.overlay.redirect", &value);
        let m = UnionMount::mount(
            &[&l1, &l2],
            Some(&root.join("upper")),
            &s.mkdir(&format!("{case}-mnt")),
            &[],
        );
        let bad = look(&m.mountpoint).bad;
        if bad != errno {
            failures.push(format!("{case}: {bad:?}, kernel overlayfs: {errno:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
