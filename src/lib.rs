//! unionfs: a FUSE overlay filesystem with kernel overlayfs semantics.
//!
//! * [`overlay`]: the layer/overlay core (resolution, whiteouts, the inode
//!   table, caches). Knows nothing of FUSE.
//! * [`fuse`]: the thin adapter from fuser requests to the core.
//! * [`cli`], [`config`], [`daemon`], [`readahead`]: the command line, mount
//!   validation, the daemon's life cycle and its mount's readahead.
//! * [`image`]: what a container changed (`podman diff`) and OCI layer tars
//!   of an upper; the core never depends on it.
//! * [`mountinfo`]: the parser of /proc/self/mountinfo (tests use it too).
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
