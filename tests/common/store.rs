//! A unionfs image store in a scratch directory, driven through the CLI
//! (`unionfs ... --root DIR`), for the image and container tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::{BIN, Scratch, UnionMount, run_with_timeout};

pub struct ImageStore {
    pub scratch: Scratch,
}

impl ImageStore {
    /// An empty store (made by the first command).
    pub fn new() -> ImageStore {
        ImageStore {
            scratch: Scratch::new(),
        }
    }

    /// A new store with the images of `archive` loaded.
    pub fn with_loaded(archive: &Path) -> ImageStore {
        let store = ImageStore::new();
        store.ok(&["image", "load", "-q", "-i", archive.to_str().unwrap()]);
        store
    }

    pub fn root(&self) -> PathBuf {
        self.scratch.path("store")
    }

    /// `unionfs ARGS --root STORE`, not yet run: for the tests that pipe
    /// into it, wait on it themselves or kill it.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args).arg("--root").arg(self.root());
        cmd
    }

    /// Starts `unionfs ARGS --root STORE` and SIGKILLs it (our own child,
    /// by its PID) after `delay`: a crash at that point of its work.
    pub fn kill_after(&self, args: &[&str], delay: Duration) {
        let mut child = self
            .cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn run(&self, args: &[&str]) -> Output {
        run_with_timeout(&mut self.cmd(args), Duration::from_secs(120))
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        String::from_utf8(self.ok_bytes(args)).unwrap()
    }

    /// `ok` for a command whose stdout is binary (an archive).
    pub fn ok_bytes(&self, args: &[&str]) -> Vec<u8> {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "unionfs {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Runs a command that must fail with one line on stderr; returns it.
    pub fn refused(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "unionfs {args:?} succeeded");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// `container mount`, held by a guard that unmounts on drop.
    pub fn mount(&self, name: &str, mountpoint: &Path) -> UnionMount {
        self.ok(&["container", "mount", name, mountpoint.to_str().unwrap()]);
        UnionMount::adopt(mountpoint)
    }
}
