//! The raw system calls that nix does not wrap safely. This is the only module
//! with `unsafe`; everything else goes through the safe functions here or nix.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;

pub mod fuse_ring;

/// Names an object for the xattr calls, which have no `*at` form that takes an
/// `O_PATH` descriptor: either the object an fd refers to, or the entry `name`
/// inside the directory fd (never following a symlink at `name`).
#[derive(Clone, Copy)]
pub enum XattrTarget<'a> {
    Fd(BorrowedFd<'a>),
    Entry(BorrowedFd<'a>, &'a OsStr),
}

impl XattrTarget<'_> {
    /// Paths through /proc/self/fd reach the object without walking any path
    /// inside the layer: the directory is pinned by its descriptor and `name`
    /// is a single component that the `l*` calls do not follow.
    fn proc_path(&self) -> io::Result<(CString, bool)> {
        let mut path = format!("/proc/self/fd/{}", self.fd().as_raw_fd()).into_bytes();
        let follow = match self {
            XattrTarget::Fd(_) => true,
            XattrTarget::Entry(_, name) => {
                path.push(b'/');
                path.extend_from_slice(name.as_bytes());
                false
            }
        };
        let path = CString::new(path).map_err(|_| io::Error::from(Errno::EINVAL))?;
        Ok((path, follow))
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            XattrTarget::Fd(fd) | XattrTarget::Entry(fd, _) => *fd,
        }
    }
}

fn retry_on_erange(mut call: impl FnMut(&mut [u8]) -> isize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    loop {
        let probe = call(&mut []);
        if probe < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.resize(probe as usize, 0);
        if buf.is_empty() {
            return Ok(buf);
        }
        let got = call(&mut buf);
        if got >= 0 {
            buf.truncate(got as usize);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
    }
}

/// Reads one extended attribute; `Ok(None)` when the object does not have it.
pub fn get_xattr(target: XattrTarget<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let (path, follow) = target.proc_path()?;
    let result = retry_on_erange(|buf| {
        // SAFETY: `path` and `name` are valid NUL-terminated strings and `buf`
        // is a valid writable region of `buf.len()` bytes (a null pointer with
        // length 0 asks only for the size).
        unsafe {
            let ptr = if buf.is_empty() {
                std::ptr::null_mut()
            } else {
                buf.as_mut_ptr().cast()
            };
            if follow {
                libc::getxattr(path.as_ptr(), name.as_ptr(), ptr, buf.len())
            } else {
                libc::lgetxattr(path.as_ptr(), name.as_ptr(), ptr, buf.len())
            }
        }
    });
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Lists extended attribute names as the kernel returns them (NUL separated).
pub fn list_xattr(target: XattrTarget<'_>) -> io::Result<Vec<u8>> {
    let (path, follow) = target.proc_path()?;
    retry_on_erange(|buf| {
        // SAFETY: as in `get_xattr`: valid C string and a buffer of the given length.
        unsafe {
            let ptr = if buf.is_empty() {
                std::ptr::null_mut()
            } else {
                buf.as_mut_ptr().cast()
            };
            if follow {
                libc::listxattr(path.as_ptr(), ptr, buf.len())
            } else {
                libc::llistxattr(path.as_ptr(), ptr, buf.len())
            }
        }
    })
}

/// Sets one extended attribute (flags: 0, `XATTR_CREATE` or `XATTR_REPLACE`).
pub fn set_xattr(target: XattrTarget<'_>, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let (path, follow) = target.proc_path()?;
    // SAFETY: valid C strings; `value` is a readable region of `value.len()` bytes.
    let rc = unsafe {
        if follow {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        } else {
            libc::lsetxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes one extended attribute.
pub fn remove_xattr(target: XattrTarget<'_>, name: &CStr) -> io::Result<()> {
    let (path, follow) = target.proc_path()?;
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        if follow {
            libc::removexattr(path.as_ptr(), name.as_ptr())
        } else {
            libc::lremovexattr(path.as_ptr(), name.as_ptr())
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The two sides of `fork`.
pub enum Forked {
    Parent(nix::unistd::Pid),
    Child,
}

/// Forks the process. Call it only while the process has one thread (before
/// the FUSE session or any worker starts), so the child inherits no lock held
/// by a thread that does not exist in it.
pub fn fork_single_threaded() -> io::Result<Forked> {
    // SAFETY: callers fork before any other thread is started (see above), so
    // the child may run arbitrary code, not just async-signal-safe functions.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// Has the program `cmd` runs inherit descriptor `fd`, which is
/// close-on-exec like every descriptor this process opens. The caller
/// keeps `fd` open until `cmd` is spawned.
pub fn inherit_fd(cmd: &mut std::process::Command, fd: BorrowedFd<'_>) {
    use std::os::unix::process::CommandExt;
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed: it makes one fcntl call on
    // a descriptor the child inherited, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Receives a descriptor that the other end of the stream socket `socket`
/// sends with SCM_RIGHTS (as fusermount3 sends the /dev/fuse descriptor
/// of the mount it made); None when it closed the socket without one.
pub fn receive_fd(socket: BorrowedFd<'_>) -> io::Result<Option<std::os::fd::OwnedFd>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = loop {
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut received = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            received.extend(fds.into_iter().map(|fd| {
                // SAFETY: the kernel has just installed `fd` in this
                // process's table for this message: nothing else owns it.
                unsafe { OwnedFd::from_raw_fd(fd) }
            }));
        }
    }
    // Any extra descriptor closes here.
    Ok(received.into_iter().next())
}

/// Starts writeback of a range of a file's dirty pages and returns without
/// waiting for it (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): no promise of
/// durability, only the disk put to work while the caller goes on.
pub fn start_writeback(file: impl AsFd, offset: i64, len: i64) -> io::Result<()> {
    // SAFETY: sync_file_range takes a descriptor and integers and reads no
    // memory from us.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_fd().as_raw_fd(),
            offset,
            len,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Clones a file's extents into another (reflink) where the filesystem can.
pub fn ficlone(dest: impl AsFd, src: impl AsFd) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument and
    // reads no memory from us.
    let rc = unsafe {
        libc::ioctl(
            dest.as_fd().as_raw_fd(),
            libc::FICLONE as _,
            src.as_fd().as_raw_fd(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Fixes glibc's mmap and trim thresholds for the daemon's life. Left
/// dynamic, freeing one large block (a FUSE request buffer of 16 MiB, a
/// 1 MiB read buffer) raises the mmap threshold to its size and the trim
/// threshold to twice that: from then on such blocks come from the heap,
/// and up to 32 MiB of freed heap is never handed back. One arena for all
/// threads: a FUSE thread's arena otherwise holds its own free memory that
/// no other thread reuses.
pub fn tune_allocator() {
    const THRESHOLD: libc::c_int = 128 * 1024;
    // SAFETY: mallopt only sets the allocator's parameters; it is called
    // before the daemon starts its threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Hands freed heap pages back to the kernel. glibc keeps them otherwise,
/// and the daemon's RSS would stay at its peak after the kernel forgets a
/// large walk.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only inspects and shrinks the allocator's own
    // free lists; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The allocator's heap: bytes in use, and bytes free but kept.
pub fn heap_usage() -> (usize, usize) {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks, info.fordblks)
}

/// A read-only shared mapping of a whole file. The daemon maps nothing; the
/// tests use it to check what a mapping made through the mount sees (that
/// it follows a copy-up, that reads through it are right).
pub struct ReadMapping {
    addr: std::ptr::NonNull<std::ffi::c_void>,
    len: usize,
}

impl ReadMapping {
    pub fn new(file: &std::fs::File) -> io::Result<ReadMapping> {
        let len = usize::try_from(file.metadata()?.len()).map_err(|_| Errno::EFBIG)?;
        let nonzero = std::num::NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        // SAFETY: a fresh read-only shared mapping chosen by the kernel
        // aliases no Rust object; it lives until Drop unmaps it.
        let addr = unsafe {
            nix::sys::mman::mmap(
                None,
                nonzero,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                file,
                0,
            )
        }?;
        Ok(ReadMapping { addr, len })
    }

    /// Copies `range` out of the mapping, as it is at this moment.
    pub fn read(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "out of the mapping"
        );
        let base = self.addr.as_ptr().cast::<u8>();
        range
            .map(|i| {
                // SAFETY: i < len, inside the mapping, which is readable and
                // stays mapped while self lives; volatile because the file
                // may change underneath between two reads.
                unsafe { std::ptr::read_volatile(base.add(i)) }
            })
            .collect()
    }
}

impl Drop for ReadMapping {
    fn drop(&mut self) {
        // SAFETY: addr/len are exactly what mmap returned, unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.addr, self.len) };
    }
}
