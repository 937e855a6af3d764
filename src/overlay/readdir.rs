//! The merged listing of a directory: the union of its layers, topmost first,
//! each name once, whiteouts and opaque directories honoured. Offsets into it,
//! and which listings are kept for readers, are `listing`'s.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;

use nix::fcntl::AtFlags;
use nix::sys::stat::fstatat;

use super::attr::{Attr, FileKind};
use super::error::{Result, SysContext};
use super::marker::{self, OciName};
use super::node::{DirLayer, Node};
use super::{Dentry, Overlay, resolve};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: OsString,
    /// Equal to the st_ino that a lookup of the name reports.
    pub ino: u64,
    pub kind: FileKind,
}

/// What the layers seen so far say about one name.
enum Seen {
    Hidden,
    Visible,
}

struct Pending {
    name: OsString,
    kind: FileKind,
    top_layer: usize,
    top_ino: u64,
}

impl Overlay {
    pub fn merged_entries(&self, node: &Node) -> Result<Vec<DirEntry>> {
        let stack = node.dir_stack()?;
        // A directory with one layer has nothing to merge: no name can be
        // seen twice, so no map of names is needed.
        let mut seen: Option<HashMap<OsString, Seen>> = (stack.layers.len() > 1).then(HashMap::new);
        let mut pending: Vec<Pending> = Vec::new();
        for dl in &stack.layers {
            self.merge_layer(dl, seen.as_mut(), &mut pending)
                .map_err(|e| e.with_layer(dl.layer).with_path(node.path()))?;
        }

        let parent_id = node.parent().map(|p| p.id).unwrap_or(node.id);
        let mut out = Vec::with_capacity(pending.len() + 2);
        out.push(DirEntry {
            name: OsString::from("."),
            ino: self.ino(node),
            kind: FileKind::Directory,
        });
        out.push(DirEntry {
            name: OsString::from(".."),
            ino: self
                .nodes
                .get(parent_id)
                .map(|p| self.ino(&p))
                .unwrap_or(parent_id),
            kind: FileKind::Directory,
        });
        for p in pending {
            let kind = p.kind;
            let (ino, name) = self.entry_ino(node.id, &stack, p);
            out.push(DirEntry { name, ino, kind });
        }
        Ok(out)
    }

    /// Adds `dl`'s entries that no layer above showed or hid. `seen` is
    /// None for a directory of one layer.
    fn merge_layer(
        &self,
        dl: &DirLayer,
        mut seen: Option<&mut HashMap<OsString, Seen>>,
        pending: &mut Vec<Pending>,
    ) -> Result<()> {
        let mut oci_whiteouts = HashSet::new();
        for (name, ino, kind) in dl.read_entries()? {
            match marker::oci_name(&name) {
                OciName::Plain => {}
                OciName::Whiteout(target) => {
                    oci_whiteouts.insert(target.to_os_string());
                    continue;
                }
                OciName::Opaque | OciName::Meta => continue,
            }
            let (kind, whiteout) = classify(dl, &name, kind)?;
            let visible = match seen.as_deref_mut() {
                None => (!whiteout).then_some(name),
                Some(seen) if seen.contains_key(&name) => None,
                Some(seen) if whiteout => {
                    seen.insert(name, Seen::Hidden);
                    None
                }
                Some(seen) => {
                    seen.insert(name.clone(), Seen::Visible);
                    Some(name)
                }
            };
            if let Some(name) = visible {
                pending.push(Pending {
                    name,
                    kind,
                    top_layer: dl.layer,
                    top_ino: ino,
                });
            }
        }
        // An OCI whiteout hides its name in the layers below only; a name the
        // same layer holds stays visible.
        if let Some(seen) = seen {
            for target in &oci_whiteouts {
                seen.entry(target.clone()).or_insert(Seen::Hidden);
            }
        }
        dl.know_oci_whiteouts(oci_whiteouts);
        Ok(())
    }

    /// The inode number a lookup of the entry would report, found without a
    /// full lookup where possible: a live node's id, else the mapped backing
    /// number. A directory whose top copy is in the upper may take a lower
    /// copy's number (merged, or moved with a redirect): it is resolved as a
    /// lookup would.
    /// Takes the entry and gives its name back.
    fn entry_ino(&self, dir_id: u64, stack: &super::node::DirStack, p: Pending) -> (u64, OsString) {
        let name = p.name;
        if let Some(Dentry::Positive(id)) = self.dentries.get(dir_id, &name)
            && self
                .nodes
                .get(id)
                .is_some_and(|node| node.has_name(dir_id, &name))
        {
            return (id, name);
        }
        let own = self.nodes.ino_of(self.layers[p.top_layer].dev, p.top_ino);
        if p.kind == FileKind::Directory && self.layers[p.top_layer].upper {
            match resolve::resolve_child(&self.layers, stack, &name) {
                Ok(Some(resolved)) => {
                    return (
                        self.nodes.ino_of(resolved.origin.0, resolved.origin.1),
                        name,
                    );
                }
                Ok(None) => {}
                // A directory a lookup fails on (a bad redirect) still lists,
                // as on kernel overlayfs; only a lookup of it fails.
                Err(e) => tracing::debug!(error = %e, ?name, "listing with its own inode number"),
            }
        }
        (own, name)
    }
}

/// The entry's type, and whether it is a kernel-format whiteout.
fn classify(dl: &DirLayer, name: &OsStr, kind: Option<FileKind>) -> Result<(FileKind, bool)> {
    let needs_stat = match kind {
        None | Some(FileKind::CharDevice) => true,
        Some(FileKind::Regular) => dl.holds_xwhiteouts(),
        Some(_) => false,
    };
    if !needs_stat {
        return Ok((kind.unwrap_or(FileKind::Regular), false));
    }
    let st = fstatat(dl.fd()?.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).sys("fstatat")?;
    let attr = Attr::from_stat(&st);
    Ok((attr.kind(), resolve::is_whiteout(dl, name, &attr)?))
}
