//! unionfs: a FUSE overlay filesystem with kernel overlayfs semantics.
//!
//! * [`overlay`]: the layer/overlay core (resolution, whiteouts, the inode
//!   table, caches). Knows nothing of FUSE.
//! * [`fuse`]: the thin adapter from fuser requests to the core.
//! * [`cli`], [`config`], [`daemon`], [`readahead`]: the command line, mount
//!   validation, the daemon's life cycle and its mount's readahead.
//! * [`mountinfo`]: the parser of /proc/self/mountinfo (tests use it too).
//! * [`image`]: the image store, containers, `podman diff`-style changes
//!   and OCI layer tars of an upper, and the `unionfs image|container|system`
//!   commands; above the core, which does not depend on it.
//! * [`sys`]: the raw syscalls; the only module with `unsafe`.

pub mod cli;
pub mod config;
pub mod daemon;
pub(crate) mod fuse;
pub mod image;
pub mod mountinfo;
pub(crate) mod overlay;
pub(crate) mod readahead;
pub mod sys;
