//! fuse-overlayfs' id options on a real mount: `uidmapping=`/`gidmapping=`
//! seen from the host and from inside a user namespace whose map matches
//! (as podman runs a container over a mount_program), ids inside ACLs and
//! file capabilities, `squash_to_*`, `static_nlink` and `noacl`.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

const MAPPING: &str = "uidmapping=0:100000:65536,gidmapping=0:100000:65536";

/// A user namespace whose root is host uid/gid 100000, for 65536 ids (the
/// map `0 100000 65536` a rootless container with that mapping has). Its
/// holder process ends when the guard is dropped.
struct UserNs {
    holder: Child,
}

impl UserNs {
    fn new() -> UserNs {
        // `unshare --map-users` goes through newuidmap, which wants
        // /etc/subuid entries for root; as root the maps can be written
        // directly. The holder lives until its standard input closes.
        let holder = Command::new("unshare")
            .args(["--user", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn unshare");
        let ns = UserNs { holder };
        let pid = ns.holder.id();
        let own = fs::read_link("/proc/self/ns/user").unwrap();
        wait_until(|| fs::read_link(format!("/proc/{pid}/ns/user")).is_ok_and(|n| n != own));
        for map in ["uid_map", "gid_map"] {
            fs::write(format!("/proc/{pid}/{map}"), "0 100000 65536\n")
                .unwrap_or_else(|e| panic!("write {map}: {e}"));
        }
        ns
    }

    /// Runs `script` with sh as the namespace's root, in directory `dir`.
    fn run(&self, dir: &Path, script: &str) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.args(["--user", "--target", &self.holder.id().to_string(), "--"]);
        run_in(dir, cmd, script)
    }

    /// `run`, which must succeed; its standard output.
    fn sh(&self, dir: &Path, script: &str) -> String {
        succeeded(self.run(dir, script), script)
    }
}

impl Drop for UserNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Runs `sh -c script` under `prefix` (nsenter, setpriv) in `dir`: the
/// directory is its standard input and it changes into it, so that it need
/// not be able to reach `dir` by path (scratch directories are private to
/// the host's root).
fn run_in(dir: &Path, mut prefix: Command, script: &str) -> Output {
    let dir_fd = fs::File::open(dir).unwrap_or_else(|e| panic!("open {dir:?}: {e}"));
    prefix
        .args(["sh", "-c"])
        .arg(format!("cd /proc/self/fd/0 && {script}"));
    run_with_stdin(&mut prefix, Stdio::from(dir_fd), Duration::from_secs(60))
}

fn succeeded(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `sh -c script` as host user `uid` (group `uid`, no others) in `dir`.
fn as_user(dir: &Path, uid: u32, script: &str) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups");
    run_in(dir, cmd, script)
}

fn owner(path: impl AsRef<Path>) -> (u32, u32) {
    let m = fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid())
}

fn chown(path: impl AsRef<Path>, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

/// `getfacl -n` entries with ids, e.g. "user:7:r--".
fn named_acl_entries(path: &Path) -> Vec<String> {
    let out = sh(Command::new("getfacl").args(["-c", "-n", "-p"]).arg(path));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("user:") || l.starts_with("group:"))
        .filter(|l| l.split(':').nth(1).is_some_and(|id| !id.is_empty()))
        .map(str::to_owned)
        .collect()
}

/// The security.capability xattr in hex, as stored or shown at `path`.
fn capability_hex(path: &Path) -> String {
    let out = sh(Command::new("getfattr")
        .args(["--absolute-names", "-n", "security.capability", "-e", "hex"])
        .arg(path));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("security.capability="))
        .unwrap_or_else(|| panic!("no capability on {path:?}: {text}"))
        .to_owned()
}

/// CAP_NET_RAW permitted and effective: revision 2 (no root id), and
/// revision 3 with a root id (little-endian hex).
const CAP_V2: &str = "0x0100000200200000000000000000000000000000";
fn cap_v3(rootid: u32) -> String {
    let root: String = rootid
        .to_le_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("0x0100000300200000000000000000000000000000{root}")
}

struct Layers {
    s: Scratch,
    lower: PathBuf,
    upper: PathBuf,
    mnt: PathBuf,
}

fn layers() -> Layers {
    let s = Scratch::new();
    let (lower, upper, mnt) = (s.mkdir("lower"), s.mkdir("upper"), s.mkdir("mnt"));
    Layers {
        s,
        lower,
        upper,
        mnt,
    }
}

#[test]
fn layer_ids_show_mapped_and_new_files_land_with_the_stored_ids() {
    let l = layers();
    write(l.lower.join("d/root-file"), b"root");
    write(l.lower.join("d/one-file"), b"one");
    write(l.lower.join("d/one-data"), b"one");
    write(l.lower.join("d/outside"), b"");
    chown(l.lower.join("d/one-file"), 1, 1);
    chown(l.lower.join("d/one-data"), 1, 1);
    chown(l.lower.join("d/outside"), 70000, 70000);
    let digest = layer_digest(&l.lower);
    let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &["-o", MAPPING]);

    // From the host: shifted up, unmapped ids as the overflow id.
    assert_eq!(owner(m.path("d/root-file")), (100000, 100000));
    assert_eq!(owner(m.path("d/one-file")), (100001, 100001));
    assert_eq!(owner(m.path("d/outside")), (65534, 65534));
    assert_eq!(owner(&m.mountpoint), (100000, 100000));

    // Inside a namespace with the same map: the ids of the layers.
    let ns = UserNs::new();
    assert_eq!(
        ns.sh(
            &m.mountpoint,
            "stat -c %u:%g d/root-file d/one-file d/outside"
        ),
        "0:0\n1:1\n65534:65534\n"
    );

    // New objects of the namespace's root land as 0 in the upper.
    ns.sh(
        &m.mountpoint,
        "touch d/new && mkdir d/newdir && mkfifo d/fifo && ln -s new d/link && echo more >> d/one-data",
    );
    for name in ["new", "newdir", "fifo", "link"] {
        assert_eq!(owner(l.upper.join("d").join(name)), (0, 0), "{name}");
        assert_eq!(owner(m.path("d").join(name)), (100000, 100000), "{name}");
    }
    // Copy-up keeps the stored owner.
    assert_eq!(owner(l.upper.join("d/one-data")), (1, 1));
    assert_eq!(fs::read(l.upper.join("d/one-data")).unwrap(), b"onemore\n");

    // chown inside the namespace stores the namespace's ids.
    ns.sh(&m.mountpoint, "chown 5:6 d/one-file");
    assert_eq!(owner(l.upper.join("d/one-file")), (5, 6));
    assert_eq!(owner(m.path("d/one-file")), (100005, 100006));
    assert_eq!(ns.sh(&m.mountpoint, "stat -c %u:%g d/one-file"), "5:6\n");

    // Ids the mapping cannot store are refused, not written: the host's
    // root creating or giving a file to host uid 5.
    let err = fs::write(m.path("d/by-host-root"), b"").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW), "{err}");
    assert!(!l.upper.join("d/by-host-root").exists());
    let err = std::os::unix::fs::chown(m.path("d/new"), Some(5), None).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW), "{err}");
    assert_eq!(owner(l.upper.join("d/new")), (0, 0));
    // What the host shows can be given back.
    std::os::unix::fs::chown(m.path("d/new"), Some(100002), Some(100003)).unwrap();
    assert_eq!(owner(l.upper.join("d/new")), (2, 3));

    drop(ns);
    drop(m);
    assert_eq!(layer_digest(&l.lower), digest, "a lower layer changed");
}

#[test]
fn acl_and_capability_ids_round_trip_shifted() {
    let l = layers();
    write(l.lower.join("acl-file"), b"");
    sh(Command::new("setfacl")
        .args(["-m", "u:7:r,g:8:r"])
        .arg(l.lower.join("acl-file")));
    write(l.lower.join("cap-v2"), b"");
    set_xattr(l.lower.join("cap-v2"), "security.capability", CAP_V2);
    write(l.lower.join("cap-v3"), b"");
    set_xattr(l.lower.join("cap-v3"), "security.capability", &cap_v3(1000));
    write(l.lower.join("new"), b"");
    let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &["-o", MAPPING]);
    let ns = UserNs::new();

    // Lower ACLs show shifted from the host and as stored in the namespace.
    assert_eq!(
        named_acl_entries(&m.path("acl-file")),
        ["user:100007:r--", "group:100008:r--"]
    );
    assert_eq!(
        ns.sh(
            &m.mountpoint,
            "getfacl -c -n acl-file | grep -E '^(user|group):[0-9]'"
        ),
        "user:7:r--\ngroup:8:r--\n"
    );

    // An ACL set inside the namespace is stored with its ids.
    ns.sh(&m.mountpoint, "setfacl -m u:9:rw,g:10:r new");
    assert_eq!(
        named_acl_entries(&l.upper.join("new")),
        ["user:9:rw-", "group:10:r--"]
    );
    assert_eq!(
        named_acl_entries(&m.path("new")),
        ["user:100009:rw-", "group:100010:r--"]
    );
    // An id outside the mapping is refused (from the host, where it can be named).
    let out = run(Command::new("setfacl")
        .args(["-m", "u:5:r"])
        .arg(m.path("new")));
    assert!(
        !out.status.success(),
        "setfacl of an unmapped uid was taken"
    );
    assert_eq!(
        named_acl_entries(&l.upper.join("new")),
        ["user:9:rw-", "group:10:r--"]
    );

    // A layer's v2 capability belongs to the layers' root: the namespace's
    // root; v3 root ids are shifted.
    assert_eq!(
        ns.sh(&m.mountpoint, "getcap cap-v2"),
        "cap-v2 cap_net_raw=ep\n"
    );
    assert_eq!(capability_hex(&m.path("cap-v2")), cap_v3(100000));
    assert_eq!(capability_hex(&m.path("cap-v3")), cap_v3(101000));

    // setcap inside the namespace (the kernel sends v3 with host root id
    // 100000) is stored as the layers' root's v2, and reads back.
    ns.sh(&m.mountpoint, "setcap cap_net_raw+ep new");
    assert_eq!(capability_hex(&l.upper.join("new")), CAP_V2);
    assert_eq!(ns.sh(&m.mountpoint, "getcap new"), "new cap_net_raw=ep\n");
    assert_eq!(capability_hex(&m.path("new")), cap_v3(100000));
    // The host's root cannot give its own (v2) capabilities: host uid 0
    // has no stored id.
    let out = run(Command::new("setfattr")
        .args(["-n", "security.capability", "-v", CAP_V2])
        .arg(m.path("cap-v3")));
    assert!(
        !out.status.success(),
        "a v2 capability of host root was taken"
    );
    assert_eq!(capability_hex(&l.lower.join("cap-v3")), cap_v3(1000));
    assert!(!l.upper.join("cap-v3").exists(), "refused before copy-up");
}

#[test]
fn squash_options_show_one_owner_and_keep_the_callers_on_disk() {
    let l = layers();
    write(l.lower.join("one"), b"");
    chown(l.lower.join("one"), 1, 2);
    fs::create_dir(l.lower.join("pub")).unwrap();
    chmod(l.lower.join("pub"), 0o777);
    let m = UnionMount::mount(
        &[&l.lower],
        Some(&l.upper),
        &l.mnt,
        &["-o", "squash_to_root"],
    );
    assert_eq!(owner(m.path("one")), (0, 0));
    assert_eq!(owner(m.path("pub")), (0, 0));
    // (Not touch: its utimes of a file it does not own, as shown, fails.)
    succeeded(as_user(&m.mountpoint, 1000, ": > pub/made"), "create");
    assert_eq!(owner(m.path("pub/made")), (0, 0));
    assert_eq!(owner(l.upper.join("pub/made")), (1000, 1000));
    drop(m);

    let upper = l.s.mkdir("upper2");
    let m = UnionMount::mount(
        &[&l.lower],
        Some(&upper),
        &l.mnt,
        &["-o", "squash_to_uid=1234,squash_to_gid=4321"],
    );
    assert_eq!(owner(m.path("one")), (1234, 4321));
    fs::write(m.path("pub/by-root"), b"").unwrap();
    assert_eq!(owner(m.path("pub/by-root")), (1234, 4321));
    assert_eq!(owner(upper.join("pub/by-root")), (0, 0));
    drop(m);

    // Squashing wins over a mapping for what is shown; the mapping still
    // decides what is stored.
    let upper = l.s.mkdir("upper3");
    let m = UnionMount::mount(
        &[&l.lower],
        Some(&upper),
        &l.mnt,
        &["-o", &format!("{MAPPING},squash_to_gid=5")],
    );
    assert_eq!(owner(m.path("one")), (100001, 5));
    std::os::unix::fs::chown(m.path("one"), Some(100003), Some(100004)).unwrap();
    assert_eq!(owner(upper.join("one")), (3, 4));
    assert_eq!(owner(m.path("one")), (100003, 5));
}

#[test]
fn static_nlink_reports_one_link_for_directories() {
    let l = layers();
    fs::create_dir_all(l.lower.join("d/sub1")).unwrap();
    fs::create_dir_all(l.lower.join("d/sub2")).unwrap();
    write(l.lower.join("d/file"), b"");
    fs::hard_link(l.lower.join("d/file"), l.lower.join("d/link")).unwrap();

    let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &[]);
    assert_eq!(fs::metadata(m.path("d")).unwrap().nlink(), 4);
    drop(m);

    let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &["-o", "static_nlink"]);
    for dir in ["", "d", "d/sub1"] {
        assert_eq!(fs::metadata(m.path(dir)).unwrap().nlink(), 1, "{dir:?}");
    }
    fs::create_dir(m.path("d/new")).unwrap();
    assert_eq!(fs::metadata(m.path("d/new")).unwrap().nlink(), 1);
    // Files keep their link counts.
    assert_eq!(fs::metadata(m.path("d/file")).unwrap().nlink(), 2);
}

#[test]
fn noacl_has_no_acls_and_applies_the_umask() {
    let l = layers();
    write(l.lower.join("private"), b"secret");
    chmod(l.lower.join("private"), 0o600);
    sh(Command::new("setfacl")
        .args(["-m", "u:1000:r"])
        .arg(l.lower.join("private")));
    fs::create_dir(l.lower.join("inherit")).unwrap();
    chmod(l.lower.join("inherit"), 0o777);
    sh(Command::new("setfacl")
        .args(["-d", "-m", "u:12345:rwx"])
        .arg(l.lower.join("inherit")));
    let create_with_umask = |mnt: &Path| {
        sh(Command::new("sh")
            .arg("-c")
            .arg("umask 022 && touch inherit/new")
            .current_dir(mnt));
        fs::metadata(mnt.join("inherit/new")).unwrap().mode() & 0o777
    };

    // With ACLs: the kernel grants what the ACL says; the default ACL
    // overrides the umask.
    let m = UnionMount::mount(&[&l.lower], Some(&l.upper), &l.mnt, &[]);
    succeeded(as_user(&m.mountpoint, 1000, "cat private"), "read by ACL");
    assert_eq!(create_with_umask(&m.mountpoint), 0o666);
    drop(m);

    let upper = l.s.mkdir("upper2");
    let m = UnionMount::mount(&[&l.lower], Some(&upper), &l.mnt, &["-o", "noacl"]);
    let out = as_user(&m.mountpoint, 1000, "cat private");
    assert!(!out.status.success(), "the ACL still granted access");
    for (path, name) in [
        ("private", "system.posix_acl_access"),
        ("inherit", "system.posix_acl_default"),
    ] {
        let out = run(Command::new("getfattr")
            .args(["--absolute-names", "-n", name])
            .arg(m.path(path)));
        assert!(!out.status.success(), "{path}: {name} was shown");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Operation not supported"), "{stderr}");
    }
    let out = run(Command::new("setfacl")
        .args(["-m", "u:5:r"])
        .arg(m.path("private")));
    assert!(!out.status.success(), "setfacl was taken");
    assert!(!upper.join("private").exists(), "refused before copy-up");
    let listed = sh(Command::new("getfattr")
        .args(["--absolute-names", "-d", "-m", "-"])
        .arg(m.path("private")));
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("posix_acl"),
        "listed: {listed:?}"
    );
    assert_eq!(create_with_umask(&m.mountpoint), 0o644);
}

#[test]
fn bad_id_option_values_are_refused_before_mounting() {
    let l = layers();
    for (opts, expected) in [
        ("uidmapping=0:100000", "triples"),
        ("uidmapping=0:100000:0", "empty"),
        ("gidmapping=0:1:10:5:100:10", "overlap"),
        ("uidmapping=0:x:1", "'x' is not an id"),
        ("uidmapping=-1:0:1", "'-1' is not an id"),
        ("uidmapping=1:0:4294967295", "past the largest id"),
        ("squash_to_uid=root", "'root' is not an id"),
        ("squash_to_gid", "needs a value"),
        ("noacl=1", "takes no value"),
    ] {
        let (out, mount) = try_mount(&[&l.lower], Some(&l.upper), &l.mnt, &["-o", opts]);
        drop(mount);
        assert!(!out.status.success(), "{opts} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(opts) && stderr.contains(expected),
            "{opts}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!is_mounted(&l.mnt));
    }
}
