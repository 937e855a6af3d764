//! The FUSE adapter: maps fuser requests onto the overlay core and the core's
//! errors onto errno replies. No filesystem logic lives here.

mod convert;
mod passthrough;

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tracing::{debug, warn};

use crate::overlay::{Error, Overlay};
pub use convert::file_attr;
use passthrough::Backings;

/// Lower layers are immutable while mounted: the kernel may cache them as
/// long as it likes.
const LOWER_TTL: Duration = Duration::from_secs(24 * 3600);
/// Upper objects change only through this mount, but other mounts of the
/// same upper (a later remount) must not see stale attributes for long.
const UPPER_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AdapterOptions {
    /// Try FUSE passthrough for regular files (needs CAP_SYS_ADMIN).
    pub passthrough: bool,
}

pub struct UnionFs {
    core: Arc<Overlay>,
    options: AdapterOptions,
    passthrough: AtomicBool,
    backings: Backings,
}

impl UnionFs {
    pub fn new(core: Arc<Overlay>, options: AdapterOptions) -> UnionFs {
        UnionFs {
            core,
            options,
            passthrough: AtomicBool::new(false),
            backings: Backings::default(),
        }
    }

    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    fn ttl(&self, layer: usize) -> Duration {
        if self.core.is_upper(layer) {
            UPPER_TTL
        } else {
            LOWER_TTL
        }
    }
}

/// Logs a failed request with the core's context and returns its errno.
fn errno(op: &str, e: Error) -> Errno {
    if e.is_expected() {
        debug!(op, error = %e, "request failed");
    } else {
        warn!(op, error = %e, "request failed");
    }
    Errno::from_i32(e.raw_errno())
}

fn xattr_reply(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for UnionFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let wanted = [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_POSIX_ACL,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_ASYNC_DIO,
        ];
        for flag in wanted {
            if config.add_capabilities(flag).is_err() {
                debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        if self.options.passthrough && nix::unistd::geteuid().is_root() {
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
            {
                self.passthrough.store(true, Ordering::Relaxed);
            } else {
                debug!("kernel offers no FUSE passthrough; serving reads through the daemon");
            }
        }
        let _ = config.set_max_write(1 << 20);
        if let Err(max) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.core.lookup(parent.0, name) {
            Ok((node, attr)) => {
                let ttl = self.ttl(node.state().layer);
                reply.entry(&ttl, &file_attr(&attr), Generation(0));
            }
            Err(e) if e.errno() == nix::errno::Errno::ENOENT => {
                // A negative entry the kernel may cache: names appear only
                // through this mount, which then replaces the entry.
                let attr = convert::placeholder_attr(0, crate::overlay::FileKind::Regular);
                reply.entry(&LOWER_TTL, &attr, Generation(0));
            }
            Err(e) => reply.error(errno("lookup", e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.node(ino.0).and_then(|node| {
            let attr = self.core.getattr(ino.0)?;
            Ok((node.state().layer, attr))
        }) {
            Ok((layer, attr)) => reply.attr(&self.ttl(layer), &file_attr(&attr)),
            Err(e) => reply.error(errno("getattr", e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.core.readlink(ino.0) {
            Ok(target) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str())),
            Err(e) => reply.error(errno("readlink", e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fh, open) = match self.core.open(ino.0, flags.0) {
            Ok(opened) => opened,
            Err(e) => return reply.error(errno("open", e)),
        };
        let lower = !self.core.is_upper(open.node.state().layer);
        if self.passthrough_enabled() {
            let file = open.file();
            match self
                .backings
                .get_or_open(ino.0, fh, || reply.open_backing(file.as_fd()))
            {
                Ok(backing) => {
                    return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing);
                }
                Err(e) => {
                    debug!(ino = ino.0, error = %e, "passthrough refused; serving through the daemon")
                }
            }
        }
        let flags = if lower {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(fh), flags);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.core.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno("read", e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.backings.release(ino.0, fh.0);
        self.core.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.core.dir_entries(fh.0, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno("readdir", e)),
        };
        for (i, entry) in entries.iter().enumerate().skip(offset as usize) {
            let next = i as u64 + 1;
            if reply.add(
                INodeNo(entry.ino),
                next,
                convert::file_type(entry.kind),
                &entry.name,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.core.dir_entries(fh.0, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno("readdirplus", e)),
        };
        for (i, entry) in entries.iter().enumerate().skip(offset as usize) {
            let next = i as u64 + 1;
            if entry.name == "." || entry.name == ".." {
                // The kernel ignores the attributes of these; no lookup count.
                let attr = convert::placeholder_attr(entry.ino, entry.kind);
                if reply.add(
                    INodeNo(entry.ino),
                    next,
                    &entry.name,
                    &Duration::ZERO,
                    &attr,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            let (node, attr) = match self.core.lookup(ino.0, &entry.name) {
                Ok(found) => found,
                // Gone since the snapshot: skip it rather than fail the batch.
                Err(e) if e.errno() == nix::errno::Errno::ENOENT => continue,
                Err(e) => return reply.error(errno("readdirplus", e)),
            };
            let ttl = self.ttl(node.state().layer);
            if reply.add(
                INodeNo(attr.ino),
                next,
                &entry.name,
                &ttl,
                &file_attr(&attr),
                Generation(0),
            ) {
                // Did not fit: the kernel never saw it, so it holds no reference.
                self.core.forget(node.id, 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.core.statfs() {
            Ok(st) => reply.statfs(
                st.blocks(),
                st.blocks_free(),
                st.blocks_available(),
                st.files(),
                st.files_free(),
                st.block_size() as u32,
                st.name_max() as u32,
                st.fragment_size() as u32,
            ),
            Err(e) => reply.error(errno("statfs", e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.core.getxattr(ino.0, name) {
            Ok(value) => xattr_reply(reply, size, &value),
            Err(e) => reply.error(errno("getxattr", e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.core.listxattr(ino.0) {
            Ok(names) => xattr_reply(reply, size, &names),
            Err(e) => reply.error(errno("listxattr", e)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.core.access(ino.0, req.uid(), req.gid(), mask.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("access", e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.core.lseek(fh.0, offset, whence) {
            Ok(pos) => reply.offset(pos),
            Err(e) => reply.error(errno("lseek", e)),
        }
    }
}
