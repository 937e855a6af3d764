//! The transport prototype of docs/performance.md ("FUSE over io_uring:
//! measured"), examples/fuse_transport.rs, serves a small tree on a real
//! mount over both transports, so the measurement can be rerun.

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The example as `cargo test` builds it, beside this test's binary.
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples/fuse_transport");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test` for all targets, or `cargo build --example fuse_transport`",
        path.display()
    );
    path
}

/// The server and its mount; unmounted and reaped even when a test fails.
struct Server {
    child: Child,
    mnt: PathBuf,
}

impl Server {
    fn start(mnt: &Path, transport: &str) -> Server {
        let child = Command::new(example())
            .arg(mnt)
            .args(["--transport", transport])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let server = Server {
            child,
            mnt: mnt.to_path_buf(),
        };
        wait_until(|| fs_type_at(mnt).as_deref() == Some("fuse.fuse_transport"));
        server
    }

    /// Unmounts and returns the server's report of the requests it served.
    fn stop(mut self) -> String {
        sh(Command::new("umount").arg(&self.mnt));
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "server still running after umount"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut report = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut report)
            .unwrap();
        assert!(status.success(), "server failed: {report}");
        report
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = run(Command::new("umount").arg("-l").arg(&self.mnt));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the benchmark does, in small: create, list, rename, untar, rm -rf.
fn exercise(mnt: &Path, scratch: &Scratch) {
    let dir = mnt.join("created");
    fs::create_dir(&dir).unwrap();
    for i in 0..100 {
        fs::write(dir.join(format!("c{i}")), [b'x'; 100]).unwrap();
    }
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 100);
    assert_eq!(fs::metadata(dir.join("c7")).unwrap().len(), 100);
    fs::rename(dir.join("c7"), dir.join("renamed")).unwrap();
    assert!(!dir.join("c7").exists());

    let src = scratch.mkdir("src/tree/sub");
    write(src.join("f"), b"content");
    let tarball = scratch.path("tree.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(scratch.path("src"))
        .arg("-cf")
        .arg(&tarball)
        .arg("tree"));
    sh(Command::new("tar")
        .arg("-C")
        .arg(mnt)
        .arg("-xf")
        .arg(&tarball));
    assert_eq!(fs::metadata(mnt.join("tree/sub/f")).unwrap().len(), 7);

    sh(Command::new("rm")
        .arg("-rf")
        .arg(&dir)
        .arg(mnt.join("tree")));
    assert_eq!(fs::read_dir(mnt).unwrap().count(), 0);
}

/// The number after `key=` in the server's report (0 when absent).
fn count(report: &str, key: &str) -> u64 {
    report
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map_or(0, |n| n.parse().unwrap())
}

#[test]
fn classic_transport_serves_a_tree() {
    let scratch = Scratch::new();
    let mnt = scratch.mkdir("mnt");
    let server = Server::start(&mnt, "classic");
    exercise(&mnt, &scratch);
    let report = server.stop();
    assert!(count(&report, "CREATE") >= 100, "{report}");
    assert_eq!(count(&report, "ring"), 0, "{report}");
}

#[test]
fn uring_transport_serves_a_tree() {
    let _param = UringParam::set(true);
    let scratch = Scratch::new();
    let mnt = scratch.mkdir("mnt");
    let server = Server::start(&mnt, "uring");
    exercise(&mnt, &scratch);
    let report = server.stop();
    // Everything but INIT, FORGET and INTERRUPT, which the kernel keeps
    // on /dev/fuse, comes over the rings.
    let over_dev_fuse = ["INIT", "FORGET", "BATCH_FORGET", "INTERRUPT"]
        .iter()
        .map(|op| count(&report, op))
        .sum::<u64>();
    assert!(count(&report, "CREATE") >= 100, "{report}");
    assert_eq!(
        count(&report, "total") - count(&report, "ring"),
        over_dev_fuse,
        "{report}"
    );
}
