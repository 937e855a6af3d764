//! The FUSE adapter: maps fuser requests onto the overlay core and the core's
//! errors onto errno replies. No filesystem logic lives here.

mod convert;
mod notify;
mod passthrough;
mod read_buffers;
mod release;
mod ring;
mod stats;

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, warn};

use crate::overlay::copyup::CopyData;
use crate::overlay::listing::Listed;
use crate::overlay::write::{Caller, Created, NewObject, RenameMode, SetAttr, SetTime};
use crate::overlay::{Error, OpenFile, Overlay};
pub use convert::file_attr;
pub use notify::AsyncNotifier;
use passthrough::{Backings, LowerPinned, OpenIo};
use read_buffers::ReadBuffers;
use release::MemoryReleaser;
pub use ring::Rings;
use stats::Op;
pub use stats::RequestCounts;

/// The largest read the kernel sends in one request (fuser sizes max_pages
/// from it), in bytes.
pub const MAX_READAHEAD: u32 = 1 << 20;
/// The largest WRITE the kernel sends (max_write), in bytes; with
/// MAX_READAHEAD it sizes the ring entries' payload buffers.
pub const MAX_WRITE: u32 = 1 << 20;

/// Lower layers are immutable while mounted: the kernel may cache them as
/// long as it likes.
const LOWER_TTL: Duration = Duration::from_secs(24 * 3600);
/// Upper objects change only through this mount, but other mounts of the
/// same upper (a later remount) must not see stale attributes for long.
const UPPER_TTL: Duration = Duration::from_secs(1);

enum IoMode {
    Passthrough(Arc<BackingId>),
    Cached(FopenFlags),
}

#[derive(Debug, Clone)]
pub struct AdapterOptions {
    /// Try FUSE passthrough for regular files (needs CAP_SYS_ADMIN).
    pub passthrough: bool,
    /// Lower files of writable mounts too (the default): reads at the speed
    /// of the lower filesystem, one page cache shared with everything else
    /// that reads the layer. The kernel then holds the lower file for as
    /// long as it is open, so a copy-up while it is open goes to a new node
    /// (`Overlay::detach`); off (`passthrough=upper`), lower files are read
    /// through the daemon and descriptors follow a copy-up.
    pub lower_passthrough: bool,
    /// Ask the kernel for POSIX ACL handling (not with `noacl`).
    pub posix_acl: bool,
    /// Answer OPENDIR rather than let the kernel open directories on its
    /// own: with `allow_root`, fuser refuses other users' requests, and a
    /// listing of a directory the kernel already caches would otherwise
    /// send none it could refuse.
    pub answer_opendir: bool,
    /// Let the kernel keep directory listings in its page cache (the
    /// default): a warm walk then reaches the daemon once per directory,
    /// for the attributes the first listing marked stale, and never after.
    /// The price is a page per listed directory per mount; off
    /// (`nocache_readdir`), OPENDIR, READDIR and RELEASEDIR go to the daemon
    /// at every listing.
    pub cache_listings: bool,
    /// Offer the kernel FUSE over io_uring (the daemon has its rings).
    pub offer_io_uring: bool,
}

pub struct UnionFs {
    core: Arc<Overlay>,
    options: AdapterOptions,
    passthrough: AtomicBool,
    /// OPENDIR is answered ENOSYS (decided at init).
    no_opendir: bool,
    backings: Backings,
    read_buffers: ReadBuffers,
    releaser: MemoryReleaser,
    counts: Arc<RequestCounts>,
    /// The kernel took FUSE over io_uring (decided at init).
    io_uring: Arc<AtomicBool>,
}

impl UnionFs {
    /// Starts the thread that hands memory back after forgets.
    pub fn new(core: Arc<Overlay>, options: AdapterOptions) -> io::Result<UnionFs> {
        Ok(UnionFs {
            releaser: MemoryReleaser::start(core.clone())?,
            core,
            options,
            passthrough: AtomicBool::new(false),
            no_opendir: false,
            backings: Backings::default(),
            read_buffers: ReadBuffers::default(),
            counts: Arc::default(),
            io_uring: Arc::default(),
        })
    }

    /// Set once the kernel's INIT took FUSE over io_uring: the rings must
    /// then be registered before any other request is answered.
    pub fn io_uring_taken(&self) -> Arc<AtomicBool> {
        self.io_uring.clone()
    }

    /// The request counters, for the daemon to log on SIGUSR1.
    pub fn request_counts(&self) -> Arc<RequestCounts> {
        self.counts.clone()
    }

    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Passthrough for upper files (and, on read-only mounts, lower ones:
    /// nothing can copy them up), cached I/O through the daemon otherwise.
    /// Lower files of writable mounts are passed through only when asked
    /// (`lower_passthrough`): a later copy-up could not move a kernel-held
    /// backing file to the upper.
    fn io_mode(
        &self,
        open: &OpenFile,
        fh: u64,
        register: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> io::Result<BackingId>,
    ) -> Result<IoMode, LowerPinned> {
        let in_upper = self.core.is_upper(open.node.state().layer);
        let io = OpenIo {
            passthrough_wanted: self.passthrough_enabled()
                && (in_upper || !self.core.has_upper() || self.options.lower_passthrough),
            from_lower: !in_upper,
            writes: crate::overlay::wants_write(open.flags),
        };
        // The kernel opens its own backing file for each open, with that
        // open's flags; the registered descriptor only names the inode, so
        // one backing id serves readers and writers alike.
        let backing = self
            .backings
            .open(open.node.id, fh, io, || register(open.file().as_fd()))?;
        Ok(match backing {
            Some(backing) => IoMode::Passthrough(backing),
            None if in_upper => IoMode::Cached(FopenFlags::empty()),
            None => IoMode::Cached(FopenFlags::FOPEN_KEEP_CACHE),
        })
    }

    fn entry_reply(&self, reply: ReplyEntry, result: crate::overlay::Result<Created>, op: &str) {
        match result {
            Ok(Created { node, attr, .. }) => reply.entry(
                &self.ttl(node.state().layer),
                &file_attr(&attr),
                Generation(node.generation.into()),
            ),
            Err(e) => reply.error(errno(op, e)),
        }
    }

    /// A file the kernel reads through a lower file as its backing file
    /// (`lower_passthrough`): the kernel would refuse the upper copy as a
    /// second backing file, and the readers would not see the change.
    fn lower_file_pinned(&self, id: u64) -> bool {
        self.options.lower_passthrough && self.backings.pinned_by_lower(id)
    }

    /// Copies a pinned file up into a new node and tells the caller to look
    /// its name up again: ESTALE makes the VFS retry an open, truncate or
    /// chmod with LOOKUP_REVAL, which reaches the new node. Descriptors
    /// opened before keep reading the lower file.
    fn detach_pinned(&self, id: u64, data: CopyData) -> Errno {
        match self.core.detach(id, data) {
            Ok(()) => Errno::ESTALE,
            Err(e) => errno("copy up (detach)", e),
        }
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

fn reply_empty(reply: ReplyEmpty, op: &str, result: crate::overlay::Result<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(op, e)),
    }
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
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_ASYNC_DIO,
            // The kernel otherwise asks GETXATTR(security.capability) before
            // every write; with this it asks once per inode and leaves
            // dropping set-id bits to us (see `setid_dropped_for`).
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            // The kernel would apply the caller's umask even in a directory
            // with a default ACL, which POSIX says overrides it; the umask
            // comes with the request instead and `create` decides.
            InitFlags::FUSE_DONT_MASK,
        ];
        // With `noacl` the kernel neither enforces nor caches ACLs, and the
        // core answers EOPNOTSUPP for them.
        let acl = self.options.posix_acl.then_some(InitFlags::FUSE_POSIX_ACL);
        for flag in wanted.into_iter().chain(acl) {
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
        // Without the kernel's word that it opens directories on its own
        // after ENOSYS, ENOSYS would fail every opendir(3). Directories the
        // kernel opens on its own always keep their listings, so a mount
        // that must not keep them answers OPENDIR.
        self.no_opendir = self.options.cache_listings
            && !self.options.answer_opendir
            && config
                .capabilities()
                .contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        if self.options.offer_io_uring {
            if config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok()
            {
                self.io_uring.store(true, Ordering::Relaxed);
            } else {
                debug!("kernel offers no FUSE over io_uring (fuse.enable_uring=N)");
            }
        }
        let _ = config.set_max_write(MAX_WRITE);
        if let Err(max) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.counts.count(Op::Lookup);
        match self.core.lookup(parent.0, name) {
            Ok((node, attr)) => {
                let ttl = self.ttl(node.state().layer);
                reply.entry(&ttl, &file_attr(&attr), Generation(node.generation.into()));
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

    fn destroy(&mut self) {
        self.counts.log("requests served");
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.counts.count(Op::Forget);
        if self.core.forget(ino.0, nlookup) {
            self.releaser.node_dropped();
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.counts.count(Op::Getattr);
        match self.core.node(ino.0).and_then(|node| {
            let attr = match fh {
                Some(fh) => self.core.getattr_open(fh.0)?,
                None => self.core.getattr(ino.0)?,
            };
            Ok((node.state().layer, attr))
        }) {
            Ok((layer, attr)) => reply.attr(&self.ttl(layer), &file_attr(&attr)),
            Err(e) => reply.error(errno("getattr", e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.counts.count(Op::Readlink);
        match self.core.readlink(ino.0) {
            Ok(target) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str())),
            Err(e) => reply.error(errno("readlink", e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.counts.count(Op::Open);
        let copy_data = if flags.0 & libc::O_TRUNC != 0 {
            CopyData::MetadataOnly
        } else {
            CopyData::All
        };
        if self.core.is_detached(ino.0) {
            return reply.error(Errno::ESTALE);
        }
        if crate::overlay::wants_write(flags.0) && self.lower_file_pinned(ino.0) {
            return reply.error(self.detach_pinned(ino.0, copy_data));
        }
        let (fh, open) = match self.core.open(ino.0, flags.0, setid_dropped_for(req)) {
            Ok(opened) => opened,
            Err(e) => return reply.error(errno("open", e)),
        };
        let mode = self.io_mode(&open, fh, |f| reply.open_backing(f));
        match mode {
            // A reader pinned the lower file while this open copied it up.
            Err(LowerPinned) => {
                self.core.release(fh);
                reply.error(self.detach_pinned(ino.0, copy_data))
            }
            Ok(IoMode::Passthrough(backing)) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing)
            }
            Ok(IoMode::Cached(flags)) => reply.opened(FileHandle(fh), flags),
        }
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
        self.counts.count(Op::Read);
        self.read_buffers.lend(
            |buf| match self.core.read_into(fh.0, offset, size, buf) {
                Ok(()) => reply.data(buf),
                Err(e) => reply.error(errno("read", e)),
            },
            || self.core.has_open_files(),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.counts.count(Op::Flush);
        // Nothing to do at close: no writeback cache, locks are the
        // kernel's. ENOSYS tells the kernel to stop sending FLUSH at all,
        // one round trip less on every close.
        reply.error(Errno::ENOSYS);
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
        self.counts.count(Op::Release);
        self.backings.release(ino.0, fh.0);
        self.core.release(fh.0);
        self.read_buffers.free_unless(|| self.core.has_open_files());
        reply.ok();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.counts.count(Op::Opendir);
        if self.no_opendir {
            // The kernel then opens directories without asking (no OPENDIR
            // and RELEASEDIR round trips), with no handle, and keeps their
            // listings as answered below.
            return reply.error(Errno::ENOSYS);
        }
        // Listings are served by node and offset; no handle is needed. The
        // kernel may keep them in its page cache: lower layers never change,
        // and the upper only through this mount, where the kernel bumps the
        // directory's version at every change it makes, which drops them
        // at the next read from the start.
        let keep = if self.options.cache_listings {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(0), keep)
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.counts.count(Op::Readdir);
        let listing = match self.core.listing(ino.0, offset) {
            Ok(listing) => listing,
            Err(e) => return reply.error(errno("readdir", e)),
        };
        for Listed { entry, offset } in listing.after(offset) {
            if reply.add(
                INodeNo(entry.ino),
                *offset,
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
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.counts.count(Op::Readdirplus);
        let listing = match self.core.listing(ino.0, offset) {
            Ok(listing) => listing,
            Err(e) => return reply.error(errno("readdirplus", e)),
        };
        for listed in listing.after(offset) {
            let (entry, next) = (&listed.entry, listed.offset);
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
                // Gone since the listing was taken: skip it rather than fail
                // the batch.
                Err(e) if e.errno() == nix::errno::Errno::ENOENT => continue,
                Err(e) => {
                    // A name whose lookup fails (a directory with a bad
                    // redirect) is listed, as kernel overlayfs lists it,
                    // and only its lookup fails. Node id 0 would say "no
                    // attributes" but fuser also sends it as d_ino, which
                    // readdir(3) skips. Instead the attributes are ones the
                    // kernel refuses (a size past i64::MAX): it emits the
                    // entry, makes no inode, and sends FORGET for the
                    // number, which no node has or will have.
                    errno("readdirplus", e);
                    let id = self.core.fresh_id();
                    let mut attr = convert::placeholder_attr(id, entry.kind);
                    attr.size = u64::MAX;
                    if reply.add(
                        INodeNo(id),
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
            };
            let ttl = self.ttl(node.state().layer);
            if reply.add(
                INodeNo(attr.ino),
                next,
                &entry.name,
                &ttl,
                &file_attr(&attr),
                Generation(node.generation.into()),
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
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.counts.count(Op::Releasedir);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.counts.count(Op::Statfs);
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
        self.counts.count(Op::getxattr(name.as_encoded_bytes()));
        match self.core.getxattr(ino.0, name) {
            Ok(value) => xattr_reply(reply, size, &value),
            Err(e) => reply.error(errno("getxattr", e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.counts.count(Op::Listxattr);
        match self.core.listxattr(ino.0) {
            Ok(names) => xattr_reply(reply, size, &names),
            Err(e) => reply.error(errno("listxattr", e)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.counts.count(Op::Access);
        reply_empty(
            reply,
            "access",
            self.core.access(ino.0, req.uid(), req.gid(), mask.bits()),
        );
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
        self.counts.count(Op::Lseek);
        match self.core.lseek(fh.0, offset, whence) {
            Ok(pos) => reply.offset(pos),
            Err(e) => reply.error(errno("lseek", e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.counts.count(Op::Setattr);
        let time = |t: Option<TimeOrNow>| {
            t.map(|t| match t {
                TimeOrNow::Now => SetTime::Now,
                TimeOrNow::SpecificTime(t) => {
                    let (sec, nsec) = convert::split_time(t);
                    SetTime::At(sec, nsec)
                }
            })
        };
        // A detached node's setattr goes to its current file (in the core).
        if size.is_some() && !self.core.is_detached(ino.0) && self.lower_file_pinned(ino.0) {
            let data = if size == Some(0) {
                CopyData::MetadataOnly
            } else {
                CopyData::All
            };
            return reply.error(self.detach_pinned(ino.0, data));
        }
        let nothing_to_set = [mode, uid, gid].iter().all(Option::is_none)
            && size.is_none()
            && atime.is_none()
            && mtime.is_none();
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: time(atime),
            mtime: time(mtime),
            // An empty setattr is what the kernel sends, once
            // FUSE_HANDLE_KILLPRIV_V2 is on, for a passthrough write that
            // must drop privileges: set-id bits (ours to drop) or file
            // capabilities (the backing filesystem drops those as it writes).
            drop_setid: (nothing_to_set || size.is_some())
                .then(|| setid_dropped_for(req))
                .flatten(),
        };
        match self.core.setattr(ino.0, set, fh.map(|f| f.0)) {
            Ok(attr) => reply.attr(&UPPER_TTL, &file_attr(&attr)),
            Err(e) => reply.error(errno("setattr", e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.counts.count(Op::Mknod);
        let object = NewObject::Special {
            mode,
            rdev: convert::decode_dev(rdev),
        };
        let result = self
            .core
            .create(parent.0, name, object, creator(req, umask));
        self.entry_reply(reply, result, "mknod");
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.counts.count(Op::Mkdir);
        let object = NewObject::Dir { mode };
        let result = self
            .core
            .create(parent.0, name, object, creator(req, umask));
        self.entry_reply(reply, result, "mkdir");
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        self.counts.count(Op::Symlink);
        let object = NewObject::Symlink {
            target: target.as_os_str(),
        };
        let result = self.core.create(parent.0, link_name, object, caller(req));
        self.entry_reply(reply, result, "symlink");
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.counts.count(Op::Link);
        let result = self.core.node(ino.0).and_then(|node| {
            self.core
                .create(newparent.0, newname, NewObject::Link { node }, caller(req))
        });
        self.entry_reply(reply, result, "link");
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.counts.count(Op::Unlink);
        reply_empty(reply, "unlink", self.core.remove(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.counts.count(Op::Rmdir);
        reply_empty(reply, "rmdir", self.core.remove(parent.0, name, true));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.counts.count(Op::Rename);
        let mode = if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        } else if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else {
            RenameMode::Replace
        };
        reply_empty(
            reply,
            "rename",
            self.core.rename(parent.0, name, newparent.0, newname, mode),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.counts.count(Op::Create);
        let object = NewObject::File { mode, flags };
        let created = self
            .core
            .create(parent.0, name, object, creator(req, umask));
        let (node, attr, handle) = match created {
            Ok(Created {
                node,
                attr,
                handle: Some(handle),
            }) => (node, attr, handle),
            Ok(_) => return reply.error(Errno::EIO),
            Err(e) => return reply.error(errno("create", e)),
        };
        let (fh, open) = handle;
        let ttl = self.ttl(node.state().layer);
        match self.io_mode(&open, fh, |f| reply.open_backing(f)) {
            // A new file has no lower copy to pin.
            Err(LowerPinned) => {
                self.core.release(fh);
                reply.error(Errno::EIO)
            }
            Ok(IoMode::Passthrough(backing)) => reply.created_passthrough(
                &ttl,
                &file_attr(&attr),
                Generation(node.generation.into()),
                FileHandle(fh),
                FopenFlags::empty(),
                &backing,
            ),
            Ok(IoMode::Cached(flags)) => reply.created(
                &ttl,
                &file_attr(&attr),
                Generation(node.generation.into()),
                FileHandle(fh),
                flags,
            ),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.counts.count(Op::Write);
        let drop_setid = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| caller(req));
        match self.core.write(fh.0, offset, data, drop_setid) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno("write", e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.counts.count(Op::Fsync);
        reply_empty(reply, "fsync", self.core.fsync(fh.0, datasync));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.counts.count(Op::Fsyncdir);
        reply_empty(reply, "fsyncdir", self.core.fsyncdir(ino.0));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.counts.count(Op::Fallocate);
        match self
            .core
            .fallocate(fh.0, offset as i64, length as i64, mode)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fallocate", e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.counts.count(Op::CopyFileRange);
        let len = len.min(u32::MAX as u64) as usize;
        match self
            .core
            .copy_file_range(fh_in.0, offset_in as i64, fh_out.0, offset_out as i64, len)
        {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno("copy_file_range", e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.counts.count(Op::Setxattr);
        reply_empty(
            reply,
            "setxattr",
            self.core.setxattr(ino.0, name, value, flags),
        );
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.counts.count(Op::Removexattr);
        reply_empty(reply, "removexattr", self.core.removexattr(ino.0, name));
    }
}

/// The caller, when a truncation by it must drop set-id bits. The kernel
/// says so (FATTR_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID) when the caller lacks
/// CAP_FSETID, but fuser does not pass those flags on; a caller other than
/// root is taken to lack it. Writes carry their own flag.
fn setid_dropped_for(req: &Request) -> Option<Caller> {
    (req.uid() != 0).then(|| caller(req))
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
        umask: 0,
    }
}

/// The caller of a request that creates an object with a mode.
fn creator(req: &Request, umask: u32) -> Caller {
    Caller {
        umask,
        ..caller(req)
    }
}
