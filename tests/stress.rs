//! stress-ng's filesystem stressors inside a mount: no errors or
//! verification failures, no hang, the daemon alive with bounded memory
//! afterwards, the lower layer unchanged.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::*;

const STRESSORS: &[&str] = &[
    "dir",
    "rename",
    "link",
    "symlink",
    "filename",
    "dentry",
    "hdd",
    "chmod",
    "xattr",
    "fallocate",
    "lockf",
    "mmap",
    "readahead",
    "seek",
    "sync-file",
];

#[test]
fn stress_ng_filesystem_stressors() {
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    for i in 0..100 {
        write(lower.join(format!("base/{i}")), b"lower data");
    }
    let digest = layer_digest(&lower);
    let m = UnionMount::mount(&[&lower], Some(&s.mkdir("upper")), &s.mkdir("mnt"), &[]);
    let pid = m.daemon_pid().expect("daemon pid");

    let mut cmd = Command::new("stress-ng");
    cmd.current_dir(&m.mountpoint)
        .arg("--temp-path")
        .arg(&m.mountpoint);
    for stressor in STRESSORS {
        cmd.args([format!("--{stressor}"), "2".into()]);
    }
    for sized in [
        "hdd-bytes",
        "fallocate-bytes",
        "mmap-bytes",
        "readahead-bytes",
        "seek-size",
        "sync-file-bytes",
    ] {
        cmd.args([format!("--{sized}"), "16M".into()]);
    }
    cmd.args(["--timeout", "8s", "--verify", "--metrics-brief"]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(180));
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{report}");
    assert!(out.status.success(), "stress-ng failed");
    assert!(
        report.contains("successful run completed"),
        "stress-ng did not complete"
    );
    assert!(!report.contains("fail:"), "stressor failures reported");

    // The daemon is alive, answering, and its memory stayed bounded.
    assert!(fs::read_dir(&m.mountpoint).is_ok());
    assert_eq!(fs::read(m.path("base/7")).unwrap(), b"lower data");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    eprintln!("daemon RSS after stress: {rss_kib} KiB");
    assert!(rss_kib < 256 * 1024, "daemon RSS {rss_kib} KiB");
    drop(m);
    assert_eq!(layer_digest(&lower), digest, "lower changed");
}
