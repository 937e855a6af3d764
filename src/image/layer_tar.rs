//! The OCI layer tar of an upper directory.
