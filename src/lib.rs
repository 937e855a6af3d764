//! unionfs: a FUSE overlay filesystem with kernel overlayfs semantics.
//!
//! * [`overlay`]: the layer/overlay core (resolution, whiteouts, the inode
//!   table, caches). Knows nothing of FUSE.
//! * [`fuse`]: the thin adapter from fuser requests to the core.
//! * [`cli`], [`config`], [`daemon`]: the command line, mount validation and
//!   the daemon's life cycle.
//! * [`sys`]: the raw syscalls; the only module with `unsafe`.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod fuse;
pub mod overlay;
pub mod sys;
