//! Timestamps after copy-up, against kernel overlayfs: a copy-up keeps the
//! object's times, and its parent's too. Kernel overlayfs restores a
//! parent's atime and mtime after linking a copied-up child into it, so
//! `echo x > m/etc/app/main.conf` (a lower file) changes main.conf's mtime
//! and nothing else's, in the merged view and in the upper alike.
//!
//! Every lower object has an old mtime and a future atime (see
//! `common::set_fixed_times`); the merged views and the uppers must agree
//! on which objects keep them, and on exact values set by utimensat.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

fn build_lower(s: &Scratch) -> std::path::PathBuf {
    let lower = s.mkdir("lower");
    for (p, data) in [
        ("etc/app/main.conf", &b"setting = 1\n"[..]),
        ("etc/app/other.conf", b"other\n"),
        ("etc/hosts", b"127.0.0.1 localhost\n"),
        ("usr/share/doc/pkg/README", b"readme\n"),
        ("usr/bin/tool", b"#!/bin/sh\n"),
    ] {
        write(lower.join(p), data);
    }
    chmod(lower.join("usr/bin/tool"), 0o755);
    symlink("../bin/tool", lower.join("usr/share/tool-link"));
    set_fixed_times(&lower);
    lower
}

/// Runs `op` on kernel overlayfs and on unionfs over the same lower; the
/// merged views' and the uppers' time marks must be the same.
fn same_times_as_kernel(op: fn(&Path) -> std::io::Result<()>) {
    let s = Scratch::new();
    let lower = build_lower(&s);
    let (kernel, ours) = on_kernel_then_unionfs(&s, &lower, "redirect_dir=on", |m| {
        op(m).unwrap_or_else(|e| panic!("operation failed on {m:?}: {e}"));
        time_marks(m)
    });
    let mut diffs: Vec<String> = diff_time_marks("kernel", &kernel, "unionfs", &ours)
        .into_iter()
        .map(|d| format!("merged {d}"))
        .collect();
    let (ku, uu) = (
        time_marks(&s.path("kernel-upper")),
        time_marks(&s.path("unionfs-upper")),
    );
    diffs.extend(
        diff_time_marks("kernel", &ku, "unionfs", &uu)
            .into_iter()
            .map(|d| format!("upper {d}")),
    );
    assert!(
        diffs.is_empty(),
        "times differ from kernel overlayfs':\n{}",
        diffs.join("\n")
    );
}

/// `echo x > m/etc/app/main.conf`: issue #9's case.
#[test]
fn overwriting_a_nested_lower_file_keeps_its_parents_times() {
    same_times_as_kernel(|m| fs::File::create(m.join("etc/app/main.conf"))?.write_all(b"x\n"));
}

#[test]
fn appending_to_a_nested_lower_file_keeps_its_parents_times() {
    same_times_as_kernel(|m| {
        fs::OpenOptions::new()
            .append(true)
            .open(m.join("usr/share/doc/pkg/README"))?
            .write_all(b"more\n")
    });
}

#[test]
fn chmod_of_a_nested_lower_file_keeps_every_time() {
    same_times_as_kernel(|m| {
        fs::set_permissions(m.join("usr/bin/tool"), fs::Permissions::from_mode(0o700))
    });
}

#[test]
fn chmod_of_a_nested_lower_dir_keeps_every_time() {
    same_times_as_kernel(|m| {
        fs::set_permissions(m.join("usr/share/doc"), fs::Permissions::from_mode(0o700))
    });
}

#[test]
fn setxattr_on_a_nested_lower_symlink_keeps_every_time() {
    same_times_as_kernel(|m| {
        // A trusted xattr: symlinks take no user ones.
        let path = std::ffi::CString::new(
            m.join("usr/share/tool-link")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: valid C strings and a value of the given length.
        let rc = unsafe {
            libc::lsetxattr(
                path.as_ptr(),
                c"trusted.note".as_ptr(),
                b"n".as_ptr().cast(),
                1,
                0,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    });
}

#[test]
fn utimensat_on_a_nested_lower_file_sets_exact_times_and_keeps_its_parents() {
    same_times_as_kernel(|m| {
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &m.join("etc/app/other.conf"),
            &nix::sys::time::TimeSpec::new(FUTURE_ATIME.0 + 7, 987_654_321),
            &nix::sys::time::TimeSpec::new(1_000_000_007, 123_456_789),
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(std::io::Error::from)
    });
}
