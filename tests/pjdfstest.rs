//! The POSIX filesystem test suite (pjdfstest) on unionfs and, in the same
//! run, on kernel overlayfs over the same kind of layers: every test that
//! passes on kernel overlayfs must pass on unionfs.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn pjdfstest_binary() -> PathBuf {
    let candidates = [
        std::env::var_os("PJDFSTEST").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/pjdfstest")),
        Some(PathBuf::from("/usr/local/bin/pjdfstest")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .expect("pjdfstest is not installed: cargo install --locked pjdfstest (.ci/run does)")
}

/// Runs the suite in `dir` (only the tests named in `only`, if any);
/// returns (passed, failed, skipped) test names and the summary line.
fn run_suite(
    config: &Path,
    dir: &Path,
    only: &[&String],
) -> (BTreeSet<String>, BTreeSet<String>, usize, String) {
    let mut cmd = Command::new(pjdfstest_binary());
    cmd.arg("-c").arg(config).arg("-p").arg(dir);
    if !only.is_empty() {
        // Exact names are the full paths of the cases in pjdfstest's crate.
        cmd.arg("--exact")
            .args(only.iter().map(|t| format!("pjdfstest::tests::{t}")));
    }
    let out = run_with_timeout(&mut cmd, Duration::from_secs(600));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let (mut passed, mut failed, mut skipped) = (BTreeSet::new(), BTreeSet::new(), 0);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(verdict), None) = (words.next(), words.next(), words.next()) else {
            continue;
        };
        match verdict {
            "ok" => drop(passed.insert(name.to_string())),
            "FAILED" => drop(failed.insert(name.to_string())),
            "skipped" => skipped += 1,
            _ => {}
        }
    }
    let summary = text
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or("no summary")
        .to_string();
    (passed, failed, skipped, summary)
}

#[test]
fn pjdfstest_passes_wherever_kernel_overlayfs_does() {
    let s = Scratch::new();
    let nobody_group =
        String::from_utf8(sh(Command::new("id").args(["-gn", "nobody"])).stdout).unwrap();
    assert!(
        run(Command::new("id").arg("tests")).status.success(),
        "pjdfstest needs a user and group named 'tests' (.ci/run creates them)"
    );
    let config = s.path("pjdfstest.toml");
    fs::write(
        &config,
        format!(
            "[features]\nposix_fallocate = {{}}\n[settings]\nnaptime = 0.001\nallow_remount = false\n\
             [dummy_auth]\nentries = [[\"nobody\", \"{}\"], [\"tests\", \"tests\"]]\n",
            nobody_group.trim()
        ),
    )
    .unwrap();
    let lower = s.mkdir("lower");
    write(lower.join("lower-file"), b"from the lower layer");

    let kernel = KernelMount::mount(
        &[&lower],
        Some((&s.mkdir("kupper"), &s.mkdir("kwork"))),
        &s.mkdir("kmnt"),
        "",
    );
    let (k_pass, k_fail, k_skip, k_summary) = run_suite(&config, &kernel.mountpoint, &[]);
    drop(kernel);

    let ours = UnionMount::mount(&[&lower], Some(&s.mkdir("upper")), &s.mkdir("mnt"), &[]);
    let (u_pass, u_fail, u_skip, u_summary) = run_suite(&config, &ours.mountpoint, &[]);
    // A few cases race the machine (open::etxtbsy spawns a program and
    // opens it for writing at once; it missed once in about a dozen CI
    // runs on unionfs, cause not found yet). A case that passes on kernel
    // overlayfs and failed here runs once more; each retry is reported.
    let first_misses: Vec<&String> = k_pass.iter().filter(|t| !u_pass.contains(*t)).collect();
    let retried = if first_misses.is_empty() {
        BTreeSet::new()
    } else {
        eprintln!("pjdfstest: retrying on unionfs once: {first_misses:?}");
        run_suite(&config, &ours.mountpoint, &first_misses).0
    };
    drop(ours);

    eprintln!("kernel overlayfs: {k_summary}");
    eprintln!("unionfs:          {u_summary}");
    assert!(
        k_pass.len() > 250,
        "the suite did not run on kernel overlayfs: {k_summary}"
    );
    let regressions: Vec<&String> = k_pass
        .iter()
        .filter(|t| !u_pass.contains(*t) && !retried.contains(*t))
        .collect();
    assert!(
        regressions.is_empty(),
        "pass on kernel overlayfs, not on unionfs: {regressions:?}\n(unionfs failed: {u_fail:?})"
    );
    eprintln!(
        "pjdfstest: unionfs {} passed, {} failed, {} skipped; kernel overlayfs {} passed, {} failed, {} skipped",
        u_pass.len(),
        u_fail.len(),
        u_skip,
        k_pass.len(),
        k_fail.len(),
        k_skip
    );
}
