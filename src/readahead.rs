//! The mount's readahead window. The kernel gives every FUSE mount 128 KiB,
//! whatever the disks under the layers use (8 MiB for this machine's virtio
//! disk), so cold sequential reads served by the daemon ran at about half
//! the speed of a kernel overlay on the same disk. The daemon gives its
//! mount the largest window among its layers' devices, and at least one
//! maximal FUSE read.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::debug;

/// Sets the readahead of the FUSE mount at `mountpoint` from `layers`'
/// devices, never below `floor_kb`. Best effort: logged, never fatal.
pub fn match_layers(mountpoint: &Path, layers: &[PathBuf], floor_kb: u64) {
    let Some(fuse_dev) = mount_device(mountpoint) else {
        debug!(mountpoint = %mountpoint.display(), "mount not found in mountinfo");
        return;
    };
    let wanted = layers
        .iter()
        .filter_map(|layer| fs::metadata(layer).ok())
        .filter_map(|meta| device_readahead_kb(meta.dev()))
        .fold(floor_kb, u64::max);
    let knob = format!("/sys/class/bdi/{}:{}/read_ahead_kb", fuse_dev.0, fuse_dev.1);
    match fs::write(&knob, format!("{wanted}\n")) {
        Ok(()) => debug!(knob, wanted, "readahead set"),
        Err(e) => debug!(knob, error = %e, "cannot set readahead"),
    }
}

/// The newest mount at `mountpoint`, as (major, minor), from mountinfo,
/// which does not go through the mount itself (the daemon may not be
/// serving yet).
fn mount_device(mountpoint: &Path) -> Option<(u32, u32)> {
    crate::mountinfo::mount_at(mountpoint).map(|m| (m.major, m.minor))
}

/// The readahead of the device behind `dev`: its own bdi, or for a
/// partition its disk's queue. None for devices without one (tmpfs).
fn device_readahead_kb(dev: u64) -> Option<u64> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    [
        format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"),
        format!("/sys/dev/block/{major}:{minor}/queue/read_ahead_kb"),
        format!("/sys/dev/block/{major}:{minor}/../queue/read_ahead_kb"),
    ]
    .iter()
    .find_map(|path| fs::read_to_string(path).ok()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_root_mount() {
        assert!(mount_device(Path::new("/")).is_some());
        assert!(mount_device(Path::new("/no/such/mount")).is_none());
    }
}
