//! Requests served, by opcode: one relaxed atomic add per request, so they
//! can stay on. Logged at debug level at unmount and on SIGUSR1, to see
//! which round trips a workload costs (`RUST_LOG=unionfs::fuse::stats=debug`
//! shows them and nothing else).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! opcodes {
    ($($op:ident => $name:literal),* $(,)?) => {
        /// The requests the adapter answers (fuser answers the rest ENOSYS).
        /// BATCH_FORGET counts as one FORGET per node: fuser splits it.
        #[derive(Debug, Clone, Copy)]
        pub enum Op {
            $($op),*
        }

        const NAMES: &[&str] = &[$($name),*];
    };
}

opcodes! {
    Lookup => "LOOKUP",
    Forget => "FORGET",
    Getattr => "GETATTR",
    Setattr => "SETATTR",
    Readlink => "READLINK",
    Symlink => "SYMLINK",
    Mknod => "MKNOD",
    Mkdir => "MKDIR",
    Unlink => "UNLINK",
    Rmdir => "RMDIR",
    Rename => "RENAME",
    Link => "LINK",
    Open => "OPEN",
    Read => "READ",
    Write => "WRITE",
    Statfs => "STATFS",
    Release => "RELEASE",
    Fsync => "FSYNC",
    Setxattr => "SETXATTR",
    Getxattr => "GETXATTR",
    GetxattrCapability => "GETXATTR(security.capability)",
    GetxattrAcl => "GETXATTR(system.posix_acl_*)",
    Listxattr => "LISTXATTR",
    Removexattr => "REMOVEXATTR",
    Flush => "FLUSH",
    Opendir => "OPENDIR",
    Readdir => "READDIR",
    Releasedir => "RELEASEDIR",
    Fsyncdir => "FSYNCDIR",
    Access => "ACCESS",
    Create => "CREATE",
    Fallocate => "FALLOCATE",
    Readdirplus => "READDIRPLUS",
    Lseek => "LSEEK",
    CopyFileRange => "COPY_FILE_RANGE",
}

impl Op {
    /// GETXATTR, told apart by the names the kernel asks for on its own: the
    /// file capability (before writes, at chown) and the ACLs (permission
    /// checks).
    pub fn getxattr(name: &[u8]) -> Op {
        match name {
            b"security.capability" => Op::GetxattrCapability,
            b"system.posix_acl_access" | b"system.posix_acl_default" => Op::GetxattrAcl,
            _ => Op::Getxattr,
        }
    }
}

#[derive(Debug)]
pub struct RequestCounts {
    counts: [AtomicU64; NAMES.len()],
}

impl Default for RequestCounts {
    fn default() -> RequestCounts {
        RequestCounts {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl RequestCounts {
    #[inline]
    pub fn count(&self, op: Op) {
        self.counts[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `OPCODE=n` for every opcode seen so far, and the total.
    pub fn summary(&self) -> String {
        let mut total = 0;
        let mut out = String::new();
        for (name, count) in NAMES.iter().zip(&self.counts) {
            let n = count.load(Ordering::Relaxed);
            if n > 0 {
                total += n;
                out.push_str(&format!("{name}={n} "));
            }
        }
        out.push_str(&format!("total={total}"));
        out
    }

    pub fn log(&self, when: &str) {
        tracing::debug!(requests = %self.summary(), "{when}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_what_was_counted() {
        let counts = RequestCounts::default();
        assert_eq!(counts.summary(), "total=0");
        counts.count(Op::Lookup);
        counts.count(Op::Lookup);
        counts.count(Op::CopyFileRange);
        assert_eq!(counts.summary(), "LOOKUP=2 COPY_FILE_RANGE=1 total=3");
    }

    #[test]
    fn getxattr_is_told_apart_by_name() {
        let counts = RequestCounts::default();
        for name in [
            &b"security.capability"[..],
            b"system.posix_acl_access",
            b"system.posix_acl_default",
            b"user.x",
        ] {
            counts.count(Op::getxattr(name));
        }
        assert_eq!(
            counts.summary(),
            "GETXATTR=1 GETXATTR(security.capability)=1 GETXATTR(system.posix_acl_*)=2 total=4"
        );
    }
}
