//! Merged inode numbers. They double as FUSE node ids, so they must be unique
//! among live objects and stable for the life of the mount.
//!
//! When every layer sits on one filesystem the backing inode numbers are
//! already unique and are used as they are, as kernel overlayfs does. Across
//! filesystems the filesystem's index goes into the high bits (like
//! overlayfs' xino). Numbers that do not fit, and the few that would collide
//! with FUSE's root id, come from a reserved range and are remembered.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::Mutex;

pub const ROOT_ID: u64 = 1;
const XINO_SHIFT: u32 = 48;
const RESERVED_BASE: u64 = 1 << 63;

#[derive(Debug)]
pub struct InoMapper {
    same_fs: bool,
    devices: Mutex<Vec<u64>>,
    reserved: DashMap<(u64, u64), u64>,
    next_reserved: AtomicU64,
}

impl InoMapper {
    pub fn new(layer_devices: &[u64]) -> InoMapper {
        let mut devices: Vec<u64> = Vec::new();
        for dev in layer_devices {
            if !devices.contains(dev) {
                devices.push(*dev);
            }
        }
        InoMapper {
            same_fs: devices.len() <= 1,
            devices: Mutex::new(devices),
            reserved: DashMap::new(),
            next_reserved: AtomicU64::new(RESERVED_BASE),
        }
    }

    #[cfg(test)]
    pub fn same_fs(&self) -> bool {
        self.same_fs
    }

    /// The merged number of the backing object (dev, ino).
    pub fn map(&self, dev: u64, ino: u64) -> u64 {
        let mapped = if self.same_fs {
            Some(ino)
        } else {
            self.fs_index(dev)
                .filter(|_| ino < (1 << XINO_SHIFT))
                .map(|idx| ((idx + 1) << XINO_SHIFT) | ino)
        };
        match mapped {
            Some(n) if n > ROOT_ID && n < RESERVED_BASE => n,
            _ => self.reserved_for(dev, ino),
        }
    }

    /// A fresh number no backing object maps to, for objects that must not
    /// share a number with another (two distinct directories).
    pub fn unique(&self) -> u64 {
        self.next_reserved.fetch_add(1, Ordering::Relaxed)
    }

    fn fs_index(&self, dev: u64) -> Option<u64> {
        let mut devices = self.devices.lock();
        if let Some(i) = devices.iter().position(|d| *d == dev) {
            return Some(i as u64);
        }
        if devices.len() >= (1 << (63 - XINO_SHIFT)) - 1 {
            return None;
        }
        devices.push(dev);
        Some(devices.len() as u64 - 1)
    }

    fn reserved_for(&self, dev: u64, ino: u64) -> u64 {
        *self
            .reserved
            .entry((dev, ino))
            .or_insert_with(|| self.unique())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_fs_keeps_real_numbers() {
        let m = InoMapper::new(&[7, 7, 7]);
        assert!(m.same_fs());
        assert_eq!(m.map(7, 1234), 1234);
    }

    #[test]
    fn root_id_is_never_handed_out() {
        let m = InoMapper::new(&[7]);
        let n = m.map(7, ROOT_ID);
        assert_ne!(n, ROOT_ID);
        assert_eq!(m.map(7, ROOT_ID), n, "stable");
    }

    #[test]
    fn different_filesystems_do_not_collide() {
        let m = InoMapper::new(&[7, 9]);
        assert!(!m.same_fs());
        let a = m.map(7, 100);
        let b = m.map(9, 100);
        assert_ne!(a, b);
        assert_eq!(m.map(7, 100), a);
        let huge = m.map(9, 1 << 50);
        assert!(huge >= RESERVED_BASE);
        assert_eq!(m.map(9, 1 << 50), huge);
        assert_ne!(m.unique(), m.unique());
    }
}
