//! Extended attributes set or removed through the merged tree: the object
//! is copied up first; overlay-private names are never reachable; ids in
//! ACLs and capabilities are stored as the id mapping says.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;

use super::Overlay;
use super::copyup::CopyData;
use super::error::{Error, Result};
use super::marker;
use super::node::Node;
use super::{acl, idmap};
use crate::sys;

impl Overlay {
    /// Sets an xattr given as the merged view shows it: ids in ACLs and
    /// capabilities are shifted down to the stored ones first.
    pub fn setxattr(&self, id: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if let Some(result) =
            self.on_current_file(id, |current| self.setxattr(current, name, value, flags))
        {
            return result;
        }
        let cname = private_checked(name, "setxattr")?;
        self.check_acl_support(name, "setxattr")?;
        let stored = self
            .ids()
            .xattr_to_disk(name.as_bytes(), value)
            .map_err(|e| Error::new(e, "setxattr: map ids to stored ones"))?;
        let value = stored.as_deref().unwrap_or(value);
        let node = self.node(id)?;
        self.copy_up(&node, CopyData::All)?;
        let result = self.with_xattr_target(
            &node,
            |t| sys::set_xattr(t, &cname, value, flags),
            "setxattr",
        );
        self.xattr_changed(&node, name);
        result
    }

    pub fn removexattr(&self, id: u64, name: &OsStr) -> Result<()> {
        let cname = private_checked(name, "removexattr")?;
        self.check_acl_support(name, "removexattr")?;
        if let Some(result) = self.on_current_file(id, |current| self.removexattr(current, name)) {
            return result;
        }
        let node = self.node(id)?;
        // Nothing to copy up for an xattr the object does not have.
        self.getxattr(id, name)?;
        self.copy_up(&node, CopyData::All)?;
        let result = self.with_xattr_target(&node, |t| sys::remove_xattr(t, &cname), "removexattr");
        self.xattr_changed(&node, name);
        result
    }

    /// Forgets what is known to be absent after `name` was set or removed on
    /// `node`. After the change, so that no read that saw the object
    /// before it can still record an absence.
    fn xattr_changed(&self, node: &Node, name: &OsStr) {
        let name = name.as_bytes();
        if name == idmap::CAPABILITY_XATTR {
            node.no_capability.changed();
        } else if name == acl::DEFAULT.to_bytes()
            && let Ok(stack) = node.dir_stack()
        {
            stack.top().no_default_acl.changed();
        }
    }
}

fn private_checked(name: &OsStr, op: &'static str) -> Result<CString> {
    if marker::is_private_xattr(name.as_bytes()) {
        return Err(Error::new(Errno::EPERM, op));
    }
    CString::new(name.as_bytes()).map_err(|_| Error::new(Errno::EINVAL, op))
}
