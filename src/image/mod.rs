//! Images built from unionfs uppers: what a container changed
//! ([`changes`], `podman diff`) and the OCI layer tar of an upper
//! ([`layer_tar`]). The filesystem core never depends on this module.

pub mod changes;
pub mod layer_tar;
