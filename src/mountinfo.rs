//! `/proc/self/mountinfo`, the one place that knows its format (proc(5)):
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2)(3)   (4)   (5)         (6)       (7)      (8) (9)   (10)      (11)
//! ```
//!
//! Field 7 is zero or more optional fields, ended by the lone `-` (8). The
//! kernel writes space, tab, newline and backslash in paths as octal escapes
//! (`\040`), so a line splits on single spaces and paths are decoded after.
//! It is read rather than stat'ed because a stat of a mountpoint whose FUSE
//! daemon is gone or not serving yet fails or hangs.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// The device number of the mounted filesystem (`st_dev`), for FUSE the
    /// connection's bdi under /sys/class/bdi.
    pub major: u32,
    pub minor: u32,
    /// The directory of the filesystem that is mounted (bind mounts).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub mount_options: String,
    pub optional_fields: Vec<String>,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
}

impl MountEntry {
    /// Parses one line; `None` for a line that is not in the format.
    pub fn parse(line: &str) -> Option<MountEntry> {
        let mut fields = line.split(' ');
        let mount_id = fields.next()?.parse().ok()?;
        let parent_id = fields.next()?.parse().ok()?;
        let (major, minor) = fields.next()?.split_once(':')?;
        let (major, minor) = (major.parse().ok()?, minor.parse().ok()?);
        let root = unescape_path(fields.next()?);
        let mount_point = unescape_path(fields.next()?);
        let mount_options = fields.next()?.to_string();
        let mut optional_fields = Vec::new();
        loop {
            match fields.next()? {
                "-" => break,
                field => optional_fields.push(field.to_string()),
            }
        }
        let fs_type = unescape_str(fields.next()?);
        let source = unescape_str(fields.next().unwrap_or(""));
        let super_options = fields.next().unwrap_or("").to_string();
        Some(MountEntry {
            mount_id,
            parent_id,
            major,
            minor,
            root,
            mount_point,
            mount_options,
            optional_fields,
            fs_type,
            source,
            super_options,
        })
    }
}

/// Every well-formed line of a mountinfo text, in its order (a mount listed
/// after another at the same place is on top of it).
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(MountEntry::parse).collect()
}

/// The mounts this process sees now.
pub fn read() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount at `path` (compared as given: pass a canonical path).
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    read()
        .ok()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

/// Decodes the `\ooo` escapes; anything else, a lone or malformed escape
/// included, stays as it is.
pub fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn unescape_path(field: &str) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

fn unescape_str(field: &str) -> String {
    String::from_utf8_lossy(&unescape(field)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_line() {
        let m = MountEntry::parse(
            "24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=123k,mode=755",
        )
        .unwrap();
        assert_eq!((m.mount_id, m.parent_id), (24, 27));
        assert_eq!((m.major, m.minor), (0, 6));
        assert_eq!(m.root, Path::new("/"));
        assert_eq!(m.mount_point, Path::new("/dev"));
        assert_eq!(m.mount_options, "rw,relatime");
        assert!(m.optional_fields.is_empty());
        assert_eq!(m.fs_type, "devtmpfs");
        assert_eq!(m.source, "devtmpfs");
        assert_eq!(m.super_options, "rw,size=123k,mode=755");
    }

    #[test]
    fn optional_fields_before_the_separator() {
        let m = MountEntry::parse(
            "36 35 98:0 /mnt1 /mnt/parent rw,noatime shared:1 master:2 propagate_from:3 - ext3 /dev/root rw,errors=continue",
        )
        .unwrap();
        assert_eq!(
            m.optional_fields,
            ["shared:1", "master:2", "propagate_from:3"]
        );
        assert_eq!(m.root, Path::new("/mnt1"));
        assert_eq!(m.mount_point, Path::new("/mnt/parent"));
        assert_eq!(m.fs_type, "ext3");
        assert_eq!(m.source, "/dev/root");
    }

    #[test]
    fn escaped_paths_decode() {
        let m = MountEntry::parse(
            r"300 29 0:77 /a\134b /mnt/with\040space\011tab\012nl rw - fuse.unionfs my\040src rw,user_id=0",
        )
        .unwrap();
        assert_eq!(m.root, Path::new(r"/a\b"));
        assert_eq!(m.mount_point, Path::new("/mnt/with space\ttab\nnl"));
        assert_eq!(m.fs_type, "fuse.unionfs");
        assert_eq!(m.source, "my src");
    }

    #[test]
    fn dashes_that_are_not_the_separator() {
        // A mountpoint "/-" and a source "-" are ordinary fields.
        let m = MountEntry::parse("40 1 0:50 / /- rw shared:7 - tmpfs - rw").unwrap();
        assert_eq!(m.mount_point, Path::new("/-"));
        assert_eq!(m.optional_fields, ["shared:7"]);
        assert_eq!(m.fs_type, "tmpfs");
        assert_eq!(m.source, "-");
    }

    #[test]
    fn non_utf8_paths_stay_exact() {
        let m = MountEntry::parse("41 1 0:51 / /mnt/\u{e9} rw - tmpfs none rw").unwrap();
        assert_eq!(m.mount_point, Path::new("/mnt/\u{e9}"));
        let raw = unescape(r"/x\377");
        assert_eq!(raw, b"/x\xff");
    }

    #[test]
    fn malformed_escapes_and_lines() {
        assert_eq!(unescape(r"/a\04"), br"/a\04");
        assert_eq!(unescape(r"/a\08x"), br"/a\08x");
        assert_eq!(unescape(r"/a\400"), br"/a\400");
        assert_eq!(unescape("/a\\"), b"/a\\");
        assert!(MountEntry::parse("").is_none());
        assert!(MountEntry::parse("1 2 0:3 / /x rw no separator here").is_none());
        assert!(MountEntry::parse("x 2 0:3 / /x rw - tmpfs none rw").is_none());
        // Unparsable lines are skipped, the rest kept in order.
        let all =
            parse("garbage\n1 0 0:1 / / rw - ext4 /dev/vda rw\n2 1 0:2 / / rw - tmpfs t rw\n");
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].fs_type, "tmpfs");
    }

    #[test]
    fn this_process_sees_its_root() {
        let mounts = read().unwrap();
        assert!(mounts.iter().any(|m| m.mount_point == Path::new("/")));
        assert!(mount_at(Path::new("/")).is_some());
        assert!(mount_at(Path::new("/no/such/mount")).is_none());
    }
}
