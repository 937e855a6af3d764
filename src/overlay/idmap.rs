//! fuse-overlayfs' id shifting: `uidmapping=`, `gidmapping=` and the
//! `squash_to_*` options.
//!
//! A mapping triple `DISK:SHOWN:LEN` (fuse-overlayfs' `host:to:len`, which
//! containers/storage passes as ContainerID:HostID:Size) says that the ids
//! `DISK..DISK+LEN` stored in the layers appear as `SHOWN..SHOWN+LEN` in the
//! merged view. The layers stay in one id namespace: nothing on disk is ever
//! rewritten, copy-up keeps the stored ids; only what crosses the mount
//! boundary is translated. Attributes going out are shifted up (a stored id
//! no range covers shows as the kernel's overflow id); ids coming in (the
//! owner of a new object, chown, ids inside ACL and capability xattrs) are
//! shifted down, and one no range covers is refused rather than stored.
//!
//! Squashing only changes what is shown: every object shows the squash
//! owner, whatever is stored, and a mapping still decides what is stored.

use nix::errno::Errno;

use super::acl;

/// One `DISK:SHOWN:LEN` triple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub disk: u32,
    pub shown: u32,
    pub len: u32,
}

impl IdRange {
    fn disk_end(&self) -> u64 {
        u64::from(self.disk) + u64::from(self.len)
    }

    fn shown_end(&self) -> u64 {
        u64::from(self.shown) + u64::from(self.len)
    }
}

/// The ranges of one kind of id (uids or gids). Empty: ids pass unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    ranges: Vec<IdRange>,
}

/// u32::MAX is no id: chown(2) takes it for "leave unchanged", and the
/// kernel refuses a user namespace range that reaches it.
const NO_ID: u64 = u32::MAX as u64;

impl IdMap {
    /// Parses `A:B:N[:A2:B2:N2...]` as fuse-overlayfs does, but strictly:
    /// decimal numbers only, whole triples, no empty range, no range past
    /// the largest id, and no two ranges sharing a disk or a shown id (the
    /// mapping must go both ways).
    pub fn parse(spec: &str) -> Result<IdMap, String> {
        let numbers = spec
            .split(':')
            .map(|part| {
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("'{part}' is not an id or a length"));
                }
                part.parse::<u32>()
                    .map_err(|_| format!("'{part}' is too large for an id or a length"))
            })
            .collect::<Result<Vec<u32>, String>>()?;
        if !numbers.len().is_multiple_of(3) {
            return Err("a mapping is triples DISK:SHOWN:LENGTH".into());
        }
        let mut ranges: Vec<IdRange> = Vec::new();
        for triple in numbers.chunks_exact(3) {
            let range = IdRange {
                disk: triple[0],
                shown: triple[1],
                len: triple[2],
            };
            let text = format!("{}:{}:{}", range.disk, range.shown, range.len);
            if range.len == 0 {
                return Err(format!("the range {text} is empty"));
            }
            if range.disk_end() > NO_ID || range.shown_end() > NO_ID {
                return Err(format!("the range {text} goes past the largest id"));
            }
            let overlaps = |a: u32, a_end: u64, b: u32, b_end: u64| {
                u64::from(a) < b_end && u64::from(b) < a_end
            };
            if let Some(other) = ranges.iter().find(|o| {
                overlaps(range.disk, range.disk_end(), o.disk, o.disk_end())
                    || overlaps(range.shown, range.shown_end(), o.shown, o.shown_end())
            }) {
                return Err(format!(
                    "the ranges {}:{}:{} and {text} overlap",
                    other.disk, other.shown, other.len
                ));
            }
            ranges.push(range);
        }
        Ok(IdMap { ranges })
    }

    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The id `disk` shows as, if a range covers it.
    pub fn to_shown(&self, disk: u32) -> Option<u32> {
        if self.is_identity() {
            return Some(disk);
        }
        self.ranges
            .iter()
            .find(|r| disk >= r.disk && u64::from(disk) < r.disk_end())
            .map(|r| r.shown + (disk - r.disk))
    }

    /// The id to store for `shown`, if a range covers it.
    pub fn to_disk(&self, shown: u32) -> Option<u32> {
        if self.is_identity() {
            return Some(shown);
        }
        self.ranges
            .iter()
            .find(|r| shown >= r.shown && u64::from(shown) < r.shown_end())
            .map(|r| r.disk + (shown - r.shown))
    }
}

/// Parses a `squash_to_uid=` or `squash_to_gid=` value.
pub fn parse_squash_id(value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(id) if u64::from(id) < NO_ID && value.bytes().all(|b| b.is_ascii_digit()) => Ok(id),
        _ => Err(format!("'{value}' is not an id")),
    }
}

/// The owner every object shows (`squash_to_root`, `squash_to_uid=`,
/// `squash_to_gid=`); None keeps the mapped owner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Squash {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Squash {
    /// fuse-overlayfs: `squash_to_uid`/`squash_to_gid` win over
    /// `squash_to_root`, whatever their order.
    pub fn new(to_root: bool, uid: Option<u32>, gid: Option<u32>) -> Squash {
        let root = to_root.then_some(0);
        Squash {
            uid: uid.or(root),
            gid: gid.or(root),
        }
    }

    pub fn is_none(&self) -> bool {
        self.uid.is_none() && self.gid.is_none()
    }
}

/// The overflow ids the kernel shows for ids a namespace cannot name.
pub fn system_overflow_ids() -> (u32, u32) {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(65534)
    };
    (
        read("/proc/sys/kernel/overflowuid"),
        read("/proc/sys/kernel/overflowgid"),
    )
}

/// How a mount translates owners between the layers and the merged view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdShift {
    uids: IdMap,
    gids: IdMap,
    squash: Squash,
    overflow_uid: u32,
    overflow_gid: u32,
}

impl Default for IdShift {
    fn default() -> Self {
        IdShift::new(
            IdMap::default(),
            IdMap::default(),
            Squash::default(),
            (65534, 65534),
        )
    }
}

impl IdShift {
    pub fn new(uids: IdMap, gids: IdMap, squash: Squash, overflow: (u32, u32)) -> IdShift {
        IdShift {
            uids,
            gids,
            squash,
            overflow_uid: overflow.0,
            overflow_gid: overflow.1,
        }
    }

    /// Neither mapping nor squashing: attributes and ids pass unchanged.
    pub fn is_identity(&self) -> bool {
        self.maps_nothing() && self.squash.is_none()
    }

    /// No id mapping (squashing may still change what is shown).
    pub fn maps_nothing(&self) -> bool {
        self.uids.is_identity() && self.gids.is_identity()
    }

    /// Whether a failed chown may be ignored: with squashing, the owner
    /// shown does not depend on it (fuse-overlayfs ignores chown errors
    /// then, which lets a mount with a single id create files as others).
    pub fn squashes(&self) -> bool {
        !self.squash.is_none()
    }

    pub fn shown_uid(&self, disk: u32) -> u32 {
        self.squash
            .uid
            .or_else(|| self.uids.to_shown(disk))
            .unwrap_or(self.overflow_uid)
    }

    pub fn shown_gid(&self, disk: u32) -> u32 {
        self.squash
            .gid
            .or_else(|| self.gids.to_shown(disk))
            .unwrap_or(self.overflow_gid)
    }

    /// The uid to store for one the caller gave; None if no range covers it.
    pub fn disk_uid(&self, shown: u32) -> Option<u32> {
        self.uids.to_disk(shown)
    }

    pub fn disk_gid(&self, shown: u32) -> Option<u32> {
        self.gids.to_disk(shown)
    }

    /// An xattr value as the merged view shows it: the ids inside POSIX
    /// ACLs and in file capabilities shifted up (squashing leaves xattrs
    /// alone, as in fuse-overlayfs). Values of other names, and malformed
    /// ones, are shown as stored.
    pub fn xattr_to_shown(&self, name: &[u8], value: Vec<u8>) -> Vec<u8> {
        if self.maps_nothing() {
            return value;
        }
        let shifted = if acl::is_acl_xattr(name) {
            acl::map_ids(
                &value,
                |uid| Some(self.uids.to_shown(uid).unwrap_or(self.overflow_uid)),
                |gid| Some(self.gids.to_shown(gid).unwrap_or(self.overflow_gid)),
            )
        } else if name == CAPABILITY_XATTR {
            capability_rootid(&value, |root| {
                Some(self.uids.to_shown(root).unwrap_or(self.overflow_uid))
            })
        } else {
            None
        };
        shifted.unwrap_or(value)
    }

    /// An xattr value the caller gives, as it is to be stored: ids inside
    /// ACLs and capabilities shifted down. EINVAL for an id no range covers
    /// or a malformed value (as the kernel answers on an idmapped mount).
    pub fn xattr_to_disk(&self, name: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, Errno> {
        if self.maps_nothing() {
            return Ok(None);
        }
        let shifted = if acl::is_acl_xattr(name) {
            acl::map_ids(value, |u| self.uids.to_disk(u), |g| self.gids.to_disk(g))
        } else if name == CAPABILITY_XATTR {
            capability_rootid(value, |root| self.uids.to_disk(root))
        } else {
            return Ok(None);
        };
        shifted.map(Some).ok_or(Errno::EINVAL)
    }
}

pub(crate) const CAPABILITY_XATTR: &[u8] = b"security.capability";

/// `struct vfs_ns_cap_data` (linux/capability.h): a magic word with the
/// revision in its top byte, permitted/inheritable pairs, and from revision
/// 3 on the uid that is root for these capabilities.
const CAP_REVISION_MASK: u32 = 0xFF00_0000;
const CAP_REVISION_2: u32 = 0x0200_0000;
const CAP_REVISION_3: u32 = 0x0300_0000;
const CAP_V2_LEN: usize = 20;
const CAP_V3_LEN: usize = 24;

/// A capability xattr with its root uid moved by `map` (None: no such id).
/// A revision 2 value belongs to root (uid 0) of the layers' namespace: it
/// becomes revision 3 where that root maps elsewhere, and a revision 3 one
/// whose root maps to 0 becomes revision 2, as the kernel writes for a
/// privileged caller. Revision 1 carries no root and is left alone.
fn capability_rootid(value: &[u8], map: impl Fn(u32) -> Option<u32>) -> Option<Vec<u8>> {
    let magic = u32::from_le_bytes(value.get(..4)?.try_into().ok()?);
    let root = match (magic & CAP_REVISION_MASK, value.len()) {
        (CAP_REVISION_2, CAP_V2_LEN) => 0,
        (CAP_REVISION_3, CAP_V3_LEN) => u32::from_le_bytes(value[CAP_V2_LEN..].try_into().ok()?),
        _ => return Some(value.to_vec()),
    };
    let mapped = map(root)?;
    let flags = magic & !CAP_REVISION_MASK;
    let mut out = value[..CAP_V2_LEN].to_vec();
    if mapped == 0 {
        out[..4].copy_from_slice(&(CAP_REVISION_2 | flags).to_le_bytes());
    } else {
        out[..4].copy_from_slice(&(CAP_REVISION_3 | flags).to_le_bytes());
        out.extend_from_slice(&mapped.to_le_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(spec: &str) -> IdMap {
        IdMap::parse(spec).unwrap()
    }

    /// "" for no mapping.
    fn shift(uids: &str, gids: &str) -> IdShift {
        let map_or_none = |spec: &str| match spec {
            "" => IdMap::default(),
            spec => map(spec),
        };
        IdShift::new(
            map_or_none(uids),
            map_or_none(gids),
            Squash::default(),
            (65534, 65533),
        )
    }

    #[test]
    fn triples_parse_disk_first() {
        let m = map("0:100000:65536:65536:300000:10");
        assert_eq!(m.to_shown(0), Some(100000));
        assert_eq!(m.to_shown(1), Some(100001));
        assert_eq!(m.to_shown(65535), Some(165535));
        assert_eq!(m.to_shown(65536), Some(300000));
        assert_eq!(m.to_shown(65545), Some(300009));
        assert_eq!(m.to_shown(65546), None);
        assert_eq!(m.to_disk(100000), Some(0));
        assert_eq!(m.to_disk(300009), Some(65545));
        assert_eq!(m.to_disk(99999), None);
        assert_eq!(m.to_disk(0), None);
        let top = map("4294967294:0:1");
        assert_eq!(top.to_shown(4294967294), Some(0));
        assert_eq!(top.to_disk(0), Some(4294967294));
    }

    #[test]
    fn no_mapping_passes_ids_unchanged() {
        let m = IdMap::default();
        assert!(m.is_identity());
        assert_eq!(m.to_shown(7), Some(7));
        assert_eq!(m.to_disk(u32::MAX - 1), Some(u32::MAX - 1));
        assert!(IdShift::default().is_identity());
    }

    #[test]
    fn bad_mappings_are_refused() {
        for (bad, says) in [
            ("", "is not an id"),
            ("0:1", "triples"),
            ("0:1:2:3", "triples"),
            ("0:1:0", "empty"),
            ("a:1:2", "'a' is not"),
            ("-1:1:2", "'-1' is not"),
            ("+1:1:2", "'+1' is not"),
            ("0::1", "'' is not"),
            ("0:1:2:", "'' is not"),
            ("0 :1:2", "'0 ' is not"),
            ("0,1,2", "'0,1,2' is not"),
            ("0:1:4294967296", "too large"),
            ("1:0:4294967295", "past the largest id"),
            ("0:4294967295:1", "past the largest id"),
            ("0:100:10:5:200:10", "overlap"),
            ("0:100:10:50:105:10", "overlap"),
        ] {
            let err = IdMap::parse(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
        // Adjacent ranges are fine.
        let m = map("0:100:10:10:110:10");
        assert_eq!(m.to_disk(115), Some(15));
    }

    #[test]
    fn unmapped_ids_show_as_the_overflow_id_and_are_never_stored() {
        let s = shift("0:100000:65536", "0:200000:10");
        assert_eq!(s.shown_uid(1), 100001);
        assert_eq!(s.shown_uid(70000), 65534);
        assert_eq!(s.shown_gid(3), 200003);
        assert_eq!(s.shown_gid(10), 65533);
        assert_eq!(s.disk_uid(100005), Some(5));
        assert_eq!(s.disk_uid(0), None);
        assert_eq!(s.disk_gid(200010), None);
        // Only uids are mapped: gids pass.
        let s = shift("0:100000:65536", "");
        assert_eq!(s.shown_gid(70000), 70000);
        assert_eq!(s.disk_gid(3), Some(3));
    }

    #[test]
    fn squashing_changes_only_what_is_shown() {
        let squash = Squash::new(true, None, Some(5));
        assert_eq!(
            squash,
            Squash {
                uid: Some(0),
                gid: Some(5)
            }
        );
        assert_eq!(
            Squash::new(false, Some(7), None),
            Squash {
                uid: Some(7),
                gid: None
            }
        );
        let s = IdShift::new(
            map("0:100000:65536"),
            IdMap::default(),
            squash,
            (65534, 65534),
        );
        assert!(!s.is_identity() && s.squashes());
        assert_eq!(s.shown_uid(1), 0);
        assert_eq!(s.shown_uid(99), 0);
        assert_eq!(s.shown_gid(1), 5);
        assert_eq!(s.disk_uid(100001), Some(1));
        assert_eq!(s.disk_uid(1), None);
        let only_squash = IdShift::new(
            IdMap::default(),
            IdMap::default(),
            Squash::new(false, Some(1000), None),
            (65534, 65534),
        );
        assert!(only_squash.maps_nothing() && !only_squash.is_identity());
        assert_eq!(only_squash.shown_uid(0), 1000);
        assert_eq!(only_squash.shown_gid(4), 4);
        assert_eq!(only_squash.disk_uid(4), Some(4));
    }

    #[test]
    fn squash_ids_parse() {
        assert_eq!(parse_squash_id("0"), Ok(0));
        assert_eq!(parse_squash_id("1000"), Ok(1000));
        for bad in ["", "x", "-1", "+3", "4294967295", "4294967296"] {
            assert!(parse_squash_id(bad).is_err(), "{bad}");
        }
    }

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut out = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    #[test]
    fn acl_entries_are_shifted_both_ways() {
        let s = shift("0:100000:65536", "0:200000:65536");
        let undefined = u32::MAX;
        let stored = acl(&[
            (0x01, 7, undefined),
            (0x02, 6, 5),
            (0x04, 5, undefined),
            (0x08, 4, 7),
            (0x10, 7, undefined),
            (0x20, 0, undefined),
        ]);
        let shown = acl(&[
            (0x01, 7, undefined),
            (0x02, 6, 100005),
            (0x04, 5, undefined),
            (0x08, 4, 200007),
            (0x10, 7, undefined),
            (0x20, 0, undefined),
        ]);
        for name in [&b"system.posix_acl_access"[..], b"system.posix_acl_default"] {
            assert_eq!(s.xattr_to_shown(name, stored.clone()), shown);
            assert_eq!(s.xattr_to_disk(name, &shown), Ok(Some(stored.clone())));
        }
        // A user entry the mapping cannot store is refused.
        let outside = acl(&[(0x01, 7, undefined), (0x02, 6, 5)]);
        assert_eq!(
            s.xattr_to_disk(b"system.posix_acl_access", &outside),
            Err(Errno::EINVAL)
        );
        // Stored ids no range covers show as the overflow ids.
        let unmapped = acl(&[(0x02, 6, 70000), (0x08, 6, 70000)]);
        assert_eq!(
            s.xattr_to_shown(b"system.posix_acl_access", unmapped),
            acl(&[(0x02, 6, 65534), (0x08, 6, 65533)])
        );
        // Malformed values are refused on the way in, shown as stored.
        let torn = [stored.clone(), vec![1]].concat();
        assert_eq!(
            s.xattr_to_disk(b"system.posix_acl_access", &torn),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            s.xattr_to_shown(b"system.posix_acl_access", torn.clone()),
            torn
        );
        // Other names, and any value without a mapping, pass.
        assert_eq!(s.xattr_to_disk(b"user.x", &outside), Ok(None));
        assert_eq!(
            IdShift::default().xattr_to_disk(b"system.posix_acl_access", &outside),
            Ok(None)
        );
    }

    fn cap(revision: u32, root: Option<u32>) -> Vec<u8> {
        // cap_net_raw=ep: effective flag, permitted bit 13.
        let mut out = (revision | 1).to_le_bytes().to_vec();
        for word in [1u32 << 13, 0, 0, 0] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        if let Some(root) = root {
            out.extend_from_slice(&root.to_le_bytes());
        }
        out
    }

    #[test]
    fn capability_root_ids_are_shifted_both_ways() {
        let s = shift("0:100000:65536", "0:100000:65536");
        let name = b"security.capability";
        // A layer's v2 capability belongs to the layers' root: it shows as
        // v3 for the mapped root, and comes back as v2.
        let v2 = cap(CAP_REVISION_2, None);
        let shown_root = cap(CAP_REVISION_3, Some(100000));
        assert_eq!(s.xattr_to_shown(name, v2.clone()), shown_root);
        assert_eq!(s.xattr_to_disk(name, &shown_root), Ok(Some(v2.clone())));
        // v3 with another root keeps its revision.
        let stored = cap(CAP_REVISION_3, Some(1000));
        let shown = cap(CAP_REVISION_3, Some(101000));
        assert_eq!(s.xattr_to_shown(name, stored.clone()), shown);
        assert_eq!(s.xattr_to_disk(name, &shown), Ok(Some(stored)));
        // A v2 the host's root writes names host uid 0, which no range covers.
        assert_eq!(s.xattr_to_disk(name, &v2), Err(Errno::EINVAL));
        assert_eq!(
            s.xattr_to_disk(name, &cap(CAP_REVISION_3, Some(7))),
            Err(Errno::EINVAL)
        );
        // A root outside the mapping shows as the overflow uid.
        assert_eq!(
            s.xattr_to_shown(name, cap(CAP_REVISION_3, Some(70000))),
            cap(CAP_REVISION_3, Some(65534))
        );
        // Where the layers' root stays root, v2 stays v2.
        let same_root = shift("0:0:1000", "");
        assert_eq!(same_root.xattr_to_shown(name, v2.clone()), v2);
        assert_eq!(same_root.xattr_to_disk(name, &v2), Ok(Some(v2.clone())));
        // Revision 1 and malformed values are left as they are.
        let v1 = (0x0100_0000u32 | 1)
            .to_le_bytes()
            .iter()
            .chain(&[0u8; 8])
            .copied()
            .collect::<Vec<u8>>();
        assert_eq!(s.xattr_to_shown(name, v1.clone()), v1);
        assert_eq!(s.xattr_to_shown(name, vec![3]), vec![3]);
    }
}
