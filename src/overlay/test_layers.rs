//! Layer directories and core instances for the core's unit tests.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use super::attr::Attr;
use super::error::Result;
use super::ino::ROOT_ID;
use super::node::Node;
use super::{Overlay, OverlayConfig};

/// Writes a file, making its parent directories.
pub(crate) fn write(path: &Path, data: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, data).unwrap();
}

/// The core over `lowers` (top first) and `upper`, whose work dir is
/// `<upper>.work`. The work dir is locked while the core lives: drop it
/// before making another on the same upper.
pub(crate) fn overlay(upper: Option<&Path>, lowers: &[&Path]) -> Overlay {
    if let Some(upper) = upper {
        fs::create_dir_all(upper).unwrap();
        fs::create_dir_all(upper.with_extension("work")).unwrap();
    }
    Overlay::new(&OverlayConfig {
        lowers: lowers.iter().map(|p| p.to_path_buf()).collect(),
        upper: upper.map(Path::to_path_buf),
        work: upper.map(|u| u.with_extension("work")),
        volatile: false,
        ..Default::default()
    })
    .unwrap()
}

/// Looks `path` up from the root, one component at a time, each taking a
/// kernel reference as FUSE lookups do.
pub(crate) fn lookup_path(ov: &Overlay, path: &str) -> Result<(Arc<Node>, Attr)> {
    let mut cur = ROOT_ID;
    let mut found = None;
    for part in path.split('/') {
        let (node, attr) = ov.lookup(cur, OsStr::new(part))?;
        cur = node.id;
        found = Some((node, attr));
    }
    Ok(found.unwrap())
}
