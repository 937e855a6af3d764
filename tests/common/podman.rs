//! podman with a private store (`--root`, `--runroot`), no network: builds
//! test images from a busybox-static root filesystem. Dropping it removes
//! its images and storage and detaches anything it left mounted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{run, run_with_timeout};

pub struct Podman {
    pub root: PathBuf,
    /// Under /run: podman wants its runroot path short (under 50
    /// characters).
    pub runroot: tempfile::TempDir,
    /// The overlay driver's `mount_program`; none for native overlay.
    pub mount_program: Option<String>,
}

impl Podman {
    /// A podman whose storage is `root`, on native overlay.
    pub fn new(root: PathBuf) -> Podman {
        Podman {
            root,
            runroot: tempfile::Builder::new()
                .prefix("ufs-img")
                .tempdir_in("/run")
                .unwrap(),
            mount_program: None,
        }
    }

    /// A podman whose overlay driver mounts its layers with `program`.
    pub fn with_mount_program(root: PathBuf, program: &str) -> Podman {
        let mut podman = Podman::new(root);
        podman.mount_program = Some(program.to_string());
        podman
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(self.runroot.path())
            .args(["--storage-driver", "overlay", "--runtime", "runc"])
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
        if let Some(program) = &self.mount_program {
            cmd.args(["--storage-opt", &format!("overlay.mount_program={program}")]);
        }
        cmd
    }

    /// Runs podman in `dir`; panics with its output on failure. Returns
    /// stdout trimmed.
    pub fn ok(&self, args: &[&str], dir: &Path) -> String {
        self.ok_raw(args, dir).trim().to_string()
    }

    /// `ok`, with stdout exactly as podman printed it.
    pub fn ok_raw(&self, args: &[&str], dir: &Path) -> String {
        let out = run_with_timeout(
            self.cmd().args(args).current_dir(dir),
            Duration::from_secs(300),
        );
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Imports `dir/rootfs.tar` as `base` and builds `dir/Containerfile`
    /// on it as `tag`, offline.
    pub fn import_and_build(&self, dir: &Path, tag: &str) {
        self.ok(&["import", "rootfs.tar", "base"], dir);
        self.ok(
            &[
                "build",
                "--network",
                "none",
                "--ulimit",
                "nofile=1024:1024",
                "-t",
                tag,
                "-f",
                "Containerfile",
                ".",
            ],
            dir,
        );
    }

    /// The image's ID (`sha256:...`) and diff_ids.
    pub fn inspect(&self, image: &str, dir: &Path) -> (String, Vec<String>) {
        let id = self.ok(&["image", "inspect", "--format", "{{.Id}}", image], dir);
        let layers = self.ok(
            &[
                "image",
                "inspect",
                "--format",
                "{{json .RootFS.Layers}}",
                image,
            ],
            dir,
        );
        (
            format!("sha256:{}", id.trim_start_matches("sha256:")),
            serde_json::from_str(&layers).unwrap(),
        )
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = run(self.cmd().args(["rm", "-af"]));
        let _ = run(self.cmd().args(["rmi", "-af"]));
        let _ = run(self.cmd().args(["system", "reset", "-f"]));
        for root in [self.root.clone(), self.runroot.path().to_path_buf()] {
            let mounts = unionfs::mountinfo::read().unwrap_or_default();
            for m in mounts.iter().filter(|m| m.mount_point.starts_with(&root)) {
                let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// Copies busybox (static) into `rootfs/bin` with the given applets as
/// symlinks to it.
pub fn install_busybox(rootfs: &Path, applets: &[&str]) {
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is not installed (scripts/test.sh installs it)");
    std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    for applet in applets {
        super::symlink("busybox", rootfs.join("bin").join(applet));
    }
}

/// What every `podman run` and `build` of the tests passes: no network,
/// and limits runc can set whatever the caller's are.
pub const RUN_LIMITS: [&str; 6] = [
    "--network",
    "none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// What libpod makes in each container before the command runs: done
/// first in a unionfs mount, it makes the same changes `podman diff` sees.
pub const CONTAINER_INIT: &str = "mkdir -p /dev /proc /sys /run && echo h > /etc/hosts && echo h > /etc/hostname && echo > /run/.containerenv && ln -s /proc/mounts /etc/mtab";

/// Every path of the root filesystem with its type, mode, owner; file
/// sizes, link counts, mtimes and md5sums; symlink targets. Needs a
/// busybox with find, sort, stat, readlink and md5sum.
pub const LISTING: &str = r#"busybox find / -xdev | busybox sort | while read f; do
  extra=
  if [ -L "$f" ]; then extra=$(busybox readlink "$f");
  elif [ -f "$f" ]; then extra="$(busybox stat -c '%s %h %Y' "$f") $(busybox md5sum < "$f")"; fi
  echo "$(busybox stat -c '%n %F %a %u %g' "$f") $extra"
done"#;

/// A [`LISTING`] without what podman puts in every container, nor the
/// root and /etc (podman makes the root 555 and adds files to /etc).
pub fn without_container_files(listing: &str) -> Vec<String> {
    let skip = [
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/etc/hosts",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/etc/mtab",
        "/etc ",
        "/ ",
    ];
    listing
        .lines()
        .filter(|l| !skip.iter().any(|s| l.starts_with(s) || *l == s.trim_end()))
        .map(str::to_string)
        .collect()
}

/// The xattrs a tar entry carries (PAX `SCHILY.xattr.*` records).
pub fn tar_xattrs<R: std::io::Read>(
    entry: &mut tar::Entry<R>,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut xattrs = std::collections::BTreeMap::new();
    if let Some(pax) = entry.pax_extensions().unwrap() {
        for ext in pax {
            let ext = ext.unwrap();
            if let Some(name) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                xattrs.insert(name.to_string(), ext.value_bytes().to_vec());
            }
        }
    }
    xattrs
}

/// `tar` of the root filesystem `rootfs` into `tar`, xattrs (file
/// capabilities) included, as `podman import` takes it.
pub fn tar_rootfs(rootfs: &Path, tar: &Path) {
    super::sh(
        Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*"])
            .arg("-C")
            .arg(rootfs)
            .arg("-cf")
            .arg(tar)
            .arg("."),
    );
}
