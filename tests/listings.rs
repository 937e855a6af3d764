//! Directory listings on a real mount, where the kernel opens directories
//! without asking the daemon (OPENDIR answered ENOSYS) and caches listings:
//! rewinddir shows every change made through the mount, a reader in the
//! middle of a listing stays sane while the directory changes and another
//! reader lists it, seekdir returns to a telldir position, and directories
//! cost no OPENDIR/RELEASEDIR round trips (except with allow_root or
//! nocache_readdir).

mod common;

use std::collections::{BTreeSet, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;

/// A libc directory stream (opendir(3)): telldir, seekdir and rewinddir
/// work on it as programs use them.
struct DirStream {
    dir: *mut libc::DIR,
    path: PathBuf,
}

impl DirStream {
    fn open(path: &Path) -> DirStream {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        let dir = unsafe { libc::opendir(c.as_ptr()) };
        assert!(
            !dir.is_null(),
            "opendir {path:?}: {}",
            std::io::Error::last_os_error()
        );
        DirStream {
            dir,
            path: path.to_path_buf(),
        }
    }

    /// The next entry other than "." and "..", with its d_ino.
    fn next(&mut self) -> Option<(OsString, u64)> {
        loop {
            // SAFETY: errno is this thread's; readdir reports errors only
            // through it, so it is cleared first.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: `self.dir` is an open stream until Drop.
            let entry = unsafe { libc::readdir64(self.dir) };
            if entry.is_null() {
                let err = std::io::Error::last_os_error();
                assert_eq!(
                    err.raw_os_error(),
                    Some(0),
                    "readdir {:?}: {err}",
                    self.path
                );
                return None;
            }
            // SAFETY: a non-null entry is valid until the next readdir on
            // this stream; d_name is NUL-terminated. Both are copied out.
            let (name, ino) = unsafe {
                let name = std::ffi::CStr::from_ptr((*entry).d_name.as_ptr());
                (OsString::from_vec(name.to_bytes().to_vec()), (*entry).d_ino)
            };
            if name != "." && name != ".." {
                return Some((name, ino));
            }
        }
    }

    fn take(&mut self, n: usize) -> Vec<OsString> {
        (0..n).map(|_| self.next().expect("entry").0).collect()
    }

    fn rest(&mut self) -> Vec<OsString> {
        std::iter::from_fn(|| self.next().map(|(name, _)| name)).collect()
    }

    fn tell(&self) -> libc::c_long {
        // SAFETY: `self.dir` is an open stream until Drop.
        unsafe { libc::telldir(self.dir) }
    }

    fn seek(&mut self, position: libc::c_long) {
        // SAFETY: `self.dir` is an open stream; `position` came from telldir.
        unsafe { libc::seekdir(self.dir, position) }
    }

    fn rewind(&mut self) {
        // SAFETY: `self.dir` is an open stream until Drop.
        unsafe { libc::rewinddir(self.dir) }
    }
}

impl Drop for DirStream {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed once here.
        unsafe { libc::closedir(self.dir) };
    }
}

fn names(list: &[&str]) -> BTreeSet<OsString> {
    list.iter().map(OsString::from).collect()
}

fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<OsString> {
    range
        .map(|i| OsString::from(format!("{prefix}{i:04}")))
        .collect()
}

/// A mount whose directory `d` holds the lower files l0000, l0001, ...
fn mount_numbered(s: &Scratch, count: usize) -> UnionMount {
    let lower = s.mkdir("lower");
    for name in numbered("l", 0..count) {
        write(lower.join("d").join(name), b"");
    }
    UnionMount::mount(&[&lower], Some(&s.mkdir("upper")), &s.mkdir("mnt"), &[])
}

/// Changes `d` under a reader: removes every fifth name it has listed and
/// every tenth it has not, and adds `added` new ones (n0000, ...). Returns
/// the names removed.
fn churn(d: &Path, listed: &[OsString], unlisted: &[OsString], added: usize) -> Vec<OsString> {
    let mut removed: Vec<OsString> = listed.iter().step_by(5).cloned().collect();
    removed.extend(unlisted.iter().step_by(10).cloned());
    for name in &removed {
        fs::remove_file(d.join(name)).unwrap();
    }
    for name in numbered("n", 0..added) {
        write(d.join(name), b"");
    }
    removed
}

/// Asserts `seen` holds no name twice and every name of `stayed`.
fn assert_sane(seen: &[OsString], stayed: &[OsString]) {
    let unique: HashSet<&OsString> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a name listed twice");
    for name in stayed {
        assert!(unique.contains(name), "{name:?} stayed and was skipped");
    }
}

#[test]
fn rewinddir_shows_each_change_made_through_the_mount() {
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    for name in ["d/keep", "d/gone", "d/out", "d/up", "d/sub/inner", "e/in"] {
        write(lower.join(name), name.as_bytes());
    }
    fs::create_dir(lower.join("d/empty")).unwrap();
    let m = UnionMount::mount(&[&lower], Some(&s.mkdir("upper")), &s.mkdir("mnt"), &[]);
    let d = m.path("d");
    let mut expected = names(&["keep", "gone", "out", "up", "sub", "empty"]);
    type Step = fn(&Path, &mut BTreeSet<OsString>);
    let steps: Vec<(&str, Step)> = vec![
        ("initial", |_, _| {}),
        ("create", |m, e| {
            write(m.join("d/new"), b"n");
            e.insert("new".into());
        }),
        ("unlink a lower file", |m, e| {
            fs::remove_file(m.join("d/gone")).unwrap();
            e.remove(OsStr::new("gone"));
        }),
        ("rename in", |m, e| {
            fs::rename(m.join("e/in"), m.join("d/in")).unwrap();
            e.insert("in".into());
        }),
        ("rename out", |m, e| {
            fs::rename(m.join("d/out"), m.join("e/out")).unwrap();
            e.remove(OsStr::new("out"));
        }),
        ("rename a lower directory within", |m, e| {
            fs::rename(m.join("d/sub"), m.join("d/sub2")).unwrap();
            e.remove(OsStr::new("sub"));
            e.insert("sub2".into());
        }),
        ("rmdir a lower directory", |m, e| {
            fs::remove_dir(m.join("d/empty")).unwrap();
            e.remove(OsStr::new("empty"));
        }),
        ("mkdir over its whiteout", |m, e| {
            fs::create_dir(m.join("d/empty")).unwrap();
            e.insert("empty".into());
        }),
        ("copy-up", |m, _| chmod(m.join("d/up"), 0o600)),
        ("hard link", |m, e| {
            fs::hard_link(m.join("d/up"), m.join("d/up-link")).unwrap();
            e.insert("up-link".into());
        }),
        ("symlink", |m, e| {
            symlink("keep", m.join("d/link"));
            e.insert("link".into());
        }),
    ];
    // One stream for all steps, as a program that changes a directory and
    // rewinds to list it again.
    let mut dir = DirStream::open(&d);
    for (step, change) in steps {
        change(&m.mountpoint, &mut expected);
        dir.rewind();
        let mut listed = BTreeSet::new();
        while let Some((name, ino)) = dir.next() {
            let stat_ino = fs::symlink_metadata(d.join(&name)).unwrap().ino();
            assert_eq!(ino, stat_ino, "after {step}: d_ino of {name:?}");
            assert!(listed.insert(name), "after {step}: listed twice");
        }
        assert_eq!(listed, expected, "after {step}");
        let fresh: BTreeSet<OsString> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(fresh, expected, "after {step}: a new reader");
    }
}

/// Two readers of one directory share its listing in the daemon: one
/// starting afresh after changes must not upset one in the middle.
#[test]
fn a_reader_in_the_middle_stays_sane_while_the_directory_changes_and_another_lists_it() {
    let s = Scratch::new();
    let m = mount_numbered(&s, 2000);
    let d = m.path("d");
    let mut middle = DirStream::open(&d);
    let mut seen = middle.take(500);
    // Names it has listed and names it has not go; new ones come.
    let unseen: Vec<OsString> = numbered("l", 0..2000)
        .into_iter()
        .filter(|n| !seen.contains(n))
        .collect();
    let removed = churn(&d, &seen, &unseen, 300);
    let stayed: Vec<OsString> = numbered("l", 0..2000)
        .into_iter()
        .filter(|n| !removed.contains(n))
        .collect();
    // A new reader sees every change, and lists while the first is halfway.
    let mut other = DirStream::open(&d);
    let mut listed_anew = other.take(1000);
    seen.extend(middle.take(700));
    listed_anew.extend(other.rest());
    let now: BTreeSet<OsString> = stayed
        .iter()
        .cloned()
        .chain(numbered("n", 0..300))
        .collect();
    assert_eq!(listed_anew.len(), now.len(), "the new reader");
    assert_eq!(listed_anew.into_iter().collect::<BTreeSet<_>>(), now);
    // More names come, and the second reader rewinds, while the first goes on.
    for name in numbered("n", 300..400) {
        write(d.join(name), b"");
    }
    other.rewind();
    assert_eq!(other.rest().len(), now.len() + 100);
    seen.extend(middle.rest());
    assert_sane(&seen, &stayed);
    assert!(seen.len() <= 2400, "{} names listed", seen.len());
}

#[test]
fn seekdir_returns_to_a_telldir_position() {
    let s = Scratch::new();
    let m = mount_numbered(&s, 400);
    let d = m.path("d");
    let mut dir = DirStream::open(&d);
    let head = dir.take(150);
    let position = dir.tell();
    let tail = dir.rest();
    assert_eq!(head.len() + tail.len(), 400);
    dir.seek(position);
    assert_eq!(dir.rest(), tail, "seekdir in the same stream");
    let mut other = DirStream::open(&d);
    other.seek(position);
    assert_eq!(other.rest(), tail, "seekdir in another stream");
    // Across changes made since the stream was opened, before the position
    // and after it: the names after it that stayed all follow it, and none
    // from before it.
    let removed = churn(&d, &head, &tail, 50);
    dir.seek(position);
    let after = dir.rest();
    let stayed: Vec<OsString> = tail
        .iter()
        .filter(|n| !removed.contains(n))
        .cloned()
        .collect();
    assert_sane(&after, &stayed);
    for name in &after {
        assert!(!head.contains(name), "{name:?} came before the position");
    }
    dir.rewind();
    assert_eq!(dir.rest().len(), 400 - removed.len() + 50);
}

/// Mounts with `--debug --log-file` and `extra`, lists 20 directories
/// twice, and returns the request counts the daemon logs on SIGUSR1.
fn requests_for_listing(extra: &[&str]) -> String {
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    for i in 0..20 {
        write(lower.join(format!("d{i}/f")), b"");
    }
    let log = s.path("log");
    let log_arg = log.display().to_string();
    let mut args = vec!["--debug", "--log-file", &log_arg];
    args.extend_from_slice(extra);
    let m = UnionMount::mount(&[&lower], Some(&s.mkdir("upper")), &s.mkdir("mnt"), &args);
    for _ in 0..2 {
        for i in 0..20 {
            assert_eq!(fs::read_dir(m.path(&format!("d{i}"))).unwrap().count(), 1);
        }
    }
    let daemon = m.daemon_pid().expect("daemon pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    let mut line = String::new();
    wait_until(|| {
        let text = fs::read_to_string(&log).unwrap_or_default();
        match text.lines().find(|l| l.contains("requests so far")) {
            Some(found) => {
                line = found.to_string();
                true
            }
            None => false,
        }
    });
    line
}

fn count(line: &str, opcode: &str) -> u64 {
    let key = format!(" {opcode}=");
    line.find(&key).map_or(0, |at| {
        line[at + key.len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    })
}

#[test]
fn directories_are_opened_without_a_round_trip() {
    let line = requests_for_listing(&[]);
    assert!(count(&line, "OPENDIR") <= 1, "{line}");
    assert_eq!(count(&line, "RELEASEDIR"), 0, "{line}");
    assert!(
        count(&line, "READDIRPLUS") + count(&line, "READDIR") >= 20,
        "{line}"
    );
}

/// With allow_root, fuser refuses other users' requests: OPENDIR stays, so
/// a listing the kernel caches is still refused to them.
#[test]
fn allow_root_mounts_still_answer_opendir() {
    let line = requests_for_listing(&["-o", "allow_root"]);
    assert!(count(&line, "OPENDIR") >= 40, "{line}");
    // RELEASEDIR comes after close() returns: the last may not be in yet.
    assert!(count(&line, "RELEASEDIR") >= 30, "{line}");
}

/// With `nocache_readdir` every listing is asked of the daemon: the kernel
/// keeps no listing page, and each of the 40 listings costs an OPENDIR and
/// two READDIRs (the entries, then the end).
#[test]
fn nocache_readdir_mounts_ask_the_daemon_for_every_listing() {
    let line = requests_for_listing(&["-o", "nocache_readdir"]);
    assert!(count(&line, "OPENDIR") >= 40, "{line}");
    assert!(
        count(&line, "READDIRPLUS") + count(&line, "READDIR") >= 80,
        "{line}"
    );
}
