//! Copy-up of a file the kernel reads through its lower copy.
//!
//! Lower files pass through to the kernel (FUSE passthrough), so every
//! mount of a layer shares one page cache. The kernel binds one backing
//! file to an inode for as long as any passthrough open of it lives, so a
//! copy-up cannot move the readers of that inode to the upper copy. Such a
//! copy-up therefore gives the upper copy a node of its own, with a new
//! number: the old node keeps only the descriptors opened before, which
//! go on reading the lower file (kernel overlayfs before 4.19 behaved so),
//! and every name now leads to the new node. The adapter then answers the
//! writer's open with ESTALE; the VFS retries it with LOOKUP_REVAL and
//! reaches the new node.

use std::os::fd::AsFd;
use std::sync::Arc;

use nix::fcntl::AtFlags;
use nix::sys::stat::fstatat;

use super::copyup::CopyData;
use super::error::{Result, SysContext};
use super::node::Node;
use super::{Backing, FileKind, Overlay};

impl Overlay {
    /// Copies node `id` up into a new node and leaves the old one to the
    /// descriptors that hold it (see the module doc).
    pub fn detach(&self, id: u64, data: CopyData) -> Result<()> {
        let node = self.node(id)?;
        if node.kind != FileKind::Regular {
            return self.copy_up(&node, data);
        }
        let before = node.state();
        let lower = if self.is_upper(before.layer) {
            None
        } else {
            Some(self.backing_identity(&node)?)
        };
        self.copy_up(&node, data)?;
        let (dev, ino) = self.backing_identity(&node)?;
        // The upper copy takes its own number from now on.
        self.nodes.forget_copy_up(dev, ino);
        if let Some((dev, ino)) = lower {
            // Other names of the lower file (hard links not copied up) must
            // not reach the old node either: the kernel would take the same
            // number with a new generation for a stale inode.
            self.nodes.record_copy_up(dev, ino, self.nodes.unique_ino());
        }
        // The old node stands for what its descriptors read.
        node.set_state(before);
        self.reopen_handles(&node)?;
        if let Some(location) = node.names().into_iter().next() {
            self.detached.insert(id, location);
        }
        self.unlink_all_names(&node);
        tracing::debug!(id, "copied up into a new node: readers keep the lower file");
        Ok(())
    }

    /// Whether node `id` was left to older descriptors by `detach`: a new
    /// open of it must look its name up again (the kernel may still hold
    /// an entry for it until the invalidation lands).
    pub fn is_detached(&self, id: u64) -> bool {
        !self.detached.is_empty() && self.detached.contains_key(&id)
    }

    /// Runs a change of metadata asked of a detached node (fchmod, fsetxattr
    /// through a descriptor opened before) on the file its name leads to
    /// now, as kernel overlayfs applies it to the copied-up file; None for
    /// any other node. Its handles hold the lower file, never changed.
    pub(crate) fn on_current_file<T>(
        &self,
        id: u64,
        change: impl FnOnce(u64) -> Result<T>,
    ) -> Option<Result<T>> {
        if !self.is_detached(id) {
            return None;
        }
        let (parent, name) = self.detached.get(&id)?.clone();
        Some(
            self.lookup_stored(parent.id, &name)
                .and_then(|(current, _)| {
                    let result = change(current.id);
                    self.forget(current.id, 1);
                    result
                }),
        )
    }

    /// The backing object's (st_dev, st_ino).
    fn backing_identity(&self, node: &Node) -> Result<(u64, u64)> {
        let st = match self.backing(node)? {
            Backing::Dir(stack) => nix::sys::stat::fstat(stack.top().fd()?.as_fd()),
            Backing::Entry { dir, name } => fstatat(
                dir.fd()?.as_fd(),
                name.as_os_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ),
        }
        .sys("fstatat")
        .map_err(|e| e.with_path(node.path()))?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Takes every name from `node`, in the core's lookup cache and the
    /// kernel's too.
    fn unlink_all_names(&self, node: &Arc<Node>) {
        // The lower file's, for a getattr none of its descriptors answers.
        let last = self.node_attr(node).ok();
        for (parent, name) in node.names() {
            node.remove_name(parent.id, &name);
            self.forget_dentry(parent.id, &name);
            self.invalidate_entry(parent.id, &name);
        }
        node.mark_unlinked(last);
    }
}
