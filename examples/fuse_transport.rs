//! A minimal FUSE server that speaks /dev/fuse itself, to measure what the
//! transport costs: the classic read(2)/write(2) loop on /dev/fuse against
//! FUSE over io_uring (`FUSE_IO_URING_CMD_REGISTER`, then one
//! `COMMIT_AND_FETCH` per request). Not part of unionfs: it serves a
//! trivial in-memory tree (no file data is kept: writes grow the size,
//! reads return zeros), enough for creating files, untar and `rm -rf`.
//! Results and how to rerun them: docs/performance.md, "FUSE over io_uring:
//! measured"; the driver is scripts/transport_bench.py.
//!
//! ```text
//! fuse_transport MOUNTPOINT [--transport classic|uring] [--threads N]
//!                [--depth D] [--no-pin] [--ring-flags none|coop|defer]
//!                [--getxattr-enosys]
//! ```
//!
//! Runs in the foreground until the mount is unmounted, then prints the
//! number of requests it served per opcode on stderr. Needs root (mount(2))
//! and, for `--transport uring`, /sys/module/fuse/parameters/enable_uring=Y.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use nix::errno::Errno;

/// The FUSE kernel ABI (include/uapi/linux/fuse.h), the parts used here.
mod abi {
    pub const KERNEL_MAJOR: u32 = 7;
    /// The newest minor version whose structures this file knows.
    pub const KERNEL_MINOR: u32 = 45;

    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const RENAME2: u32 = 45;

    pub const NAMES: &[(u32, &str)] = &[
        (LOOKUP, "LOOKUP"),
        (FORGET, "FORGET"),
        (GETATTR, "GETATTR"),
        (SETATTR, "SETATTR"),
        (MKDIR, "MKDIR"),
        (UNLINK, "UNLINK"),
        (RMDIR, "RMDIR"),
        (OPEN, "OPEN"),
        (READ, "READ"),
        (WRITE, "WRITE"),
        (STATFS, "STATFS"),
        (RELEASE, "RELEASE"),
        (GETXATTR, "GETXATTR"),
        (FLUSH, "FLUSH"),
        (INIT, "INIT"),
        (OPENDIR, "OPENDIR"),
        (READDIR, "READDIR"),
        (RELEASEDIR, "RELEASEDIR"),
        (ACCESS, "ACCESS"),
        (CREATE, "CREATE"),
        (INTERRUPT, "INTERRUPT"),
        (BATCH_FORGET, "BATCH_FORGET"),
    ];

    // fuse_init_in.flags / flags2 (as one u64) and fuse_init_out.
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u64 = 1 << 3;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const DONT_MASK: u64 = 1 << 6;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const POSIX_ACL: u64 = 1 << 20;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const HANDLE_KILLPRIV_V2: u64 = 1 << 28;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const OVER_IO_URING: u64 = 1 << 41;

    // fuse_setattr_in.valid
    pub const FATTR_MODE: u32 = 1 << 0;
    pub const FATTR_UID: u32 = 1 << 1;
    pub const FATTR_GID: u32 = 1 << 2;
    pub const FATTR_SIZE: u32 = 1 << 3;
    pub const FATTR_ATIME: u32 = 1 << 4;
    pub const FATTR_MTIME: u32 = 1 << 5;
    pub const FATTR_ATIME_NOW: u32 = 1 << 7;
    pub const FATTR_MTIME_NOW: u32 = 1 << 8;

    pub const RENAME_NOREPLACE: u32 = 1 << 0;

    pub const IN_HEADER_SIZE: usize = 40;
    pub const OUT_HEADER_SIZE: usize = 16;

    /// The size of a request's first argument, its fixed per-opcode struct
    /// (`in_args[0]`), which FUSE over io_uring hands over in the header's
    /// `op_in` and the classic transport right after `fuse_in_header`.
    pub fn fixed_size(opcode: u32) -> usize {
        match opcode {
            FORGET | MKDIR | RENAME | LINK | OPEN | SETXATTR | GETXATTR | LISTXATTR | OPENDIR
            | ACCESS | INTERRUPT | BATCH_FORGET => 8,
            GETATTR | MKNOD | FSYNC | FSYNCDIR | CREATE | RENAME2 => 16,
            RELEASE | FLUSH | RELEASEDIR => 24,
            READ | WRITE | READDIR => 40,
            INIT => 64,
            SETATTR => 88,
            _ => 0,
        }
    }

    // FUSE over io_uring: fuse_uring_req_header and fuse_uring_cmd_req.
    pub const URING_IN_OUT_HEADER_SZ: usize = 128;
    pub const URING_OP_IN_OUT_SZ: usize = 128;
    /// `in_out`, `op_in`, then `fuse_uring_ent_in_out` (flags, commit_id,
    /// payload_sz, padding, reserved).
    pub const URING_REQ_HEADER_SZ: usize = URING_IN_OUT_HEADER_SZ + URING_OP_IN_OUT_SZ + 32;
    pub const URING_ENT_IN_OUT: usize = URING_IN_OUT_HEADER_SZ + URING_OP_IN_OUT_SZ;
    pub const IO_URING_CMD_REGISTER: u32 = 1;
    pub const IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
}

const MAX_WRITE: usize = 1 << 20;
/// A classic read buffer: the largest request (a WRITE of max_write) and
/// its headers.
const READ_BUF: usize = MAX_WRITE + 4096;

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
/// The NUL-terminated name at the start of `b`, and what follows it.
fn name_at(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(end) => (&b[..end], &b[end + 1..]),
        None => (b, &[]),
    }
}

struct InHeader {
    opcode: u32,
    unique: u64,
    nodeid: u64,
    uid: u32,
    gid: u32,
}

impl InHeader {
    fn parse(b: &[u8]) -> InHeader {
        InHeader {
            opcode: u32_at(b, 4),
            unique: u64_at(b, 8),
            nodeid: u64_at(b, 16),
            uid: u32_at(b, 24),
            gid: u32_at(b, 28),
        }
    }
}

/// What a request gets back: a reply whose payload is `out[16..]`, an
/// error, or nothing (FORGET, BATCH_FORGET, INTERRUPT).
enum Outcome {
    Reply,
    Error(Errno),
    NoReply,
}

/// Fills in the `fuse_out_header` at the start of `out`.
fn set_out_header(out: &mut [u8], unique: u64, error: i32) {
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4..8].copy_from_slice(&error.to_le_bytes());
    out[8..16].copy_from_slice(&unique.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

#[derive(Clone, Copy)]
struct Time {
    sec: u64,
    nsec: u32,
}

impl Time {
    fn now() -> Time {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            sec: d.as_secs(),
            nsec: d.subsec_nanos(),
        }
    }
}

struct Node {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u32,
    atime: Time,
    mtime: Time,
    ctime: Time,
    lookups: u64,
    children: Option<HashMap<Vec<u8>, u64>>,
    target: Vec<u8>,
}

impl Node {
    fn new(mode: u32, uid: u32, gid: u32) -> Node {
        let now = Time::now();
        let dir = mode & libc::S_IFMT == libc::S_IFDIR;
        Node {
            mode,
            uid,
            gid,
            size: 0,
            nlink: if dir { 2 } else { 1 },
            atime: now,
            mtime: now,
            ctime: now,
            lookups: 0,
            children: dir.then(HashMap::new),
            target: Vec::new(),
        }
    }
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    dirs: HashMap<u64, Vec<(u64, u32, Vec<u8>)>>,
    next_fh: u64,
}

impl State {
    fn forget(&mut self, ino: u64, n: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
            if node.lookups == 0 && node.nlink == 0 {
                self.nodes.remove(&ino);
            }
        }
    }

    fn child(&self, parent: u64, name: &[u8]) -> Result<u64, Errno> {
        let dir = self.nodes.get(&parent).ok_or(Errno::ENOENT)?;
        let children = dir.children.as_ref().ok_or(Errno::ENOTDIR)?;
        children.get(name).copied().ok_or(Errno::ENOENT)
    }

    /// Unlinks `name` from `parent`; directories only when empty.
    fn remove(&mut self, parent: u64, name: &[u8], want_dir: bool) -> Result<(), Errno> {
        let ino = self.child(parent, name)?;
        let node = &self.nodes[&ino];
        let is_dir = node.children.is_some();
        if want_dir && !is_dir {
            return Err(Errno::ENOTDIR);
        }
        if !want_dir && is_dir {
            return Err(Errno::EISDIR);
        }
        if node.children.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(Errno::ENOTEMPTY);
        }
        let now = Time::now();
        let dir = self.nodes.get_mut(&parent).unwrap();
        dir.children.as_mut().unwrap().remove(name);
        dir.mtime = now;
        dir.ctime = now;
        if is_dir {
            dir.nlink -= 1;
        }
        let node = self.nodes.get_mut(&ino).unwrap();
        node.nlink = if is_dir { 0 } else { node.nlink - 1 };
        node.ctime = now;
        if node.nlink == 0 && node.lookups == 0 {
            self.nodes.remove(&ino);
        }
        Ok(())
    }
}

/// The trivial filesystem, shared by both transports.
struct Fs {
    state: Mutex<State>,
    counts: Vec<AtomicU64>,
    /// Requests that came over a ring rather than read(2).
    ring_requests: AtomicU64,
    getxattr_enosys: bool,
    /// Seconds the kernel may cache entries and attributes.
    ttl: u64,
}

fn put_attr(out: &mut Vec<u8>, ino: u64, n: &Node) {
    put64(out, ino);
    put64(out, n.size);
    put64(out, n.size.div_ceil(512));
    put64(out, n.atime.sec);
    put64(out, n.mtime.sec);
    put64(out, n.ctime.sec);
    put32(out, n.atime.nsec);
    put32(out, n.mtime.nsec);
    put32(out, n.ctime.nsec);
    put32(out, n.mode);
    put32(out, n.nlink);
    put32(out, n.uid);
    put32(out, n.gid);
    put32(out, 0); // rdev
    put32(out, 4096); // blksize
    put32(out, 0); // flags
}

/// fuse_entry_out
fn put_entry(out: &mut Vec<u8>, ttl: u64, ino: u64, n: &Node) {
    put64(out, ino);
    put64(out, 0); // generation
    put64(out, ttl);
    put64(out, ttl);
    put32(out, 0);
    put32(out, 0);
    put_attr(out, ino, n);
}

/// fuse_attr_out
fn put_attr_out(out: &mut Vec<u8>, ttl: u64, ino: u64, n: &Node) {
    put64(out, ttl);
    put32(out, 0);
    put32(out, 0);
    put_attr(out, ino, n);
}

impl Fs {
    fn new(getxattr_enosys: bool, ttl: u64) -> Fs {
        let mut root = Node::new(libc::S_IFDIR | 0o755, 0, 0);
        root.lookups = 1;
        Fs {
            state: Mutex::new(State {
                nodes: HashMap::from([(1, root)]),
                next_ino: 2,
                dirs: HashMap::new(),
                next_fh: 1,
            }),
            counts: (0..64).map(|_| AtomicU64::new(0)).collect(),
            ring_requests: AtomicU64::new(0),
            getxattr_enosys,
            ttl,
        }
    }

    fn count(&self, opcode: u32) {
        let slot = (opcode as usize).min(self.counts.len() - 1);
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// The INIT reply (`fuse_init_out`) for the kernel's `fuse_init_in`.
    fn init(&self, arg: &[u8], uring: bool, out: &mut Vec<u8>) -> Result<(), String> {
        let (major, minor) = (u32_at(arg, 0), u32_at(arg, 4));
        let readahead = u32_at(arg, 8);
        let mut offered = u64::from(u32_at(arg, 12));
        if offered & abi::INIT_EXT != 0 {
            offered |= u64::from(u32_at(arg, 16)) << 32;
        }
        if major != abi::KERNEL_MAJOR {
            return Err(format!("kernel FUSE ABI {major}.{minor}"));
        }
        let mut wanted = abi::ASYNC_READ
            | abi::ATOMIC_O_TRUNC
            | abi::BIG_WRITES
            | abi::DONT_MASK
            | abi::PARALLEL_DIROPS
            | abi::POSIX_ACL
            | abi::MAX_PAGES
            | abi::HANDLE_KILLPRIV_V2
            | abi::INIT_EXT;
        if uring {
            if offered & abi::OVER_IO_URING == 0 {
                return Err("the kernel offers no FUSE_OVER_IO_URING (enable_uring=N?)".into());
            }
            wanted |= abi::OVER_IO_URING;
        }
        let flags = offered & wanted;
        put32(out, abi::KERNEL_MAJOR);
        put32(out, minor.min(abi::KERNEL_MINOR));
        put32(out, readahead);
        put32(out, flags as u32);
        out.extend_from_slice(&64u16.to_le_bytes()); // max_background
        out.extend_from_slice(&48u16.to_le_bytes()); // congestion_threshold
        put32(out, MAX_WRITE as u32);
        put32(out, 1); // time_gran
        out.extend_from_slice(&((MAX_WRITE / 4096) as u16).to_le_bytes()); // max_pages
        out.extend_from_slice(&0u16.to_le_bytes()); // map_alignment
        put32(out, (flags >> 32) as u32);
        put32(out, 0); // max_stack_depth
        out.extend_from_slice(&[0u8; 24]); // request_timeout, unused
        Ok(())
    }

    /// Serves one request: `arg` is its fixed struct, `rest` what follows
    /// (names, data). A reply's payload is appended to `out`, which holds
    /// room for the out header.
    fn handle(&self, h: &InHeader, arg: &[u8], rest: &[u8], out: &mut Vec<u8>) -> Outcome {
        self.count(h.opcode);
        match self.dispatch(h, arg, rest, out) {
            Ok(Some(())) => Outcome::Reply,
            Ok(None) => Outcome::NoReply,
            Err(e) => Outcome::Error(e),
        }
    }

    fn new_node<'s>(
        &self,
        s: &'s mut State,
        h: &InHeader,
        name: &[u8],
        mode: u32,
    ) -> Result<(u64, &'s Node), Errno> {
        let parent = s.nodes.get(&h.nodeid).ok_or(Errno::ENOENT)?;
        let children = parent.children.as_ref().ok_or(Errno::ENOTDIR)?;
        if children.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = s.next_ino;
        s.next_ino += 1;
        let mut node = Node::new(mode, h.uid, h.gid);
        node.lookups = 1;
        let now = node.ctime;
        let is_dir = node.children.is_some();
        s.nodes.insert(ino, node);
        let parent = s.nodes.get_mut(&h.nodeid).unwrap();
        parent.children.as_mut().unwrap().insert(name.to_vec(), ino);
        parent.mtime = now;
        parent.ctime = now;
        if is_dir {
            parent.nlink += 1;
        }
        Ok((ino, &s.nodes[&ino]))
    }

    fn dispatch(
        &self,
        h: &InHeader,
        arg: &[u8],
        rest: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<()>, Errno> {
        let mut guard = self.state.lock().unwrap();
        let s = &mut *guard;
        match h.opcode {
            abi::LOOKUP => {
                let (name, _) = name_at(rest);
                let ino = s.child(h.nodeid, name)?;
                let node = s.nodes.get_mut(&ino).unwrap();
                node.lookups += 1;
                put_entry(out, self.ttl, ino, node);
            }
            abi::FORGET => {
                s.forget(h.nodeid, u64_at(arg, 0));
                return Ok(None);
            }
            abi::BATCH_FORGET => {
                let count = u32_at(arg, 0) as usize;
                for one in rest.chunks_exact(16).take(count) {
                    s.forget(u64_at(one, 0), u64_at(one, 8));
                }
                return Ok(None);
            }
            abi::INTERRUPT => return Ok(None),
            abi::GETATTR => {
                let node = s.nodes.get(&h.nodeid).ok_or(Errno::ENOENT)?;
                put_attr_out(out, self.ttl, h.nodeid, node);
            }
            abi::SETATTR => {
                let node = s.nodes.get_mut(&h.nodeid).ok_or(Errno::ENOENT)?;
                let valid = u32_at(arg, 0);
                let now = Time::now();
                if valid & abi::FATTR_MODE != 0 {
                    node.mode = node.mode & libc::S_IFMT | u32_at(arg, 68) & 0o7777;
                }
                if valid & abi::FATTR_UID != 0 {
                    node.uid = u32_at(arg, 76);
                }
                if valid & abi::FATTR_GID != 0 {
                    node.gid = u32_at(arg, 80);
                }
                if valid & abi::FATTR_SIZE != 0 {
                    node.size = u64_at(arg, 16);
                    node.mtime = now;
                }
                // A time to set: now, or the one at these offsets of
                // fuse_setattr_in.
                let time = |given: u32, to_now: u32, sec: usize, nsec: usize| {
                    if valid & to_now != 0 {
                        Some(now)
                    } else {
                        (valid & given != 0).then(|| Time {
                            sec: u64_at(arg, sec),
                            nsec: u32_at(arg, nsec),
                        })
                    }
                };
                if let Some(t) = time(abi::FATTR_ATIME, abi::FATTR_ATIME_NOW, 32, 56) {
                    node.atime = t;
                }
                if let Some(t) = time(abi::FATTR_MTIME, abi::FATTR_MTIME_NOW, 40, 60) {
                    node.mtime = t;
                }
                node.ctime = now;
                put_attr_out(out, self.ttl, h.nodeid, node);
            }
            abi::READLINK => {
                let node = s.nodes.get(&h.nodeid).ok_or(Errno::ENOENT)?;
                out.extend_from_slice(&node.target);
            }
            abi::SYMLINK => {
                let (name, rest) = name_at(rest);
                let (target, _) = name_at(rest);
                let (ino, _) = self.new_node(s, h, name, libc::S_IFLNK | 0o777)?;
                let node = s.nodes.get_mut(&ino).unwrap();
                node.target = target.to_vec();
                node.size = target.len() as u64;
                put_entry(out, self.ttl, ino, node);
            }
            abi::MKNOD | abi::MKDIR | abi::CREATE => {
                let (mode, umask) = match h.opcode {
                    abi::MKNOD => (u32_at(arg, 0), u32_at(arg, 8)),
                    abi::MKDIR => (u32_at(arg, 0) | libc::S_IFDIR, u32_at(arg, 4)),
                    _ => (u32_at(arg, 4), u32_at(arg, 8)),
                };
                let (name, _) = name_at(rest);
                let (ino, node) = self.new_node(s, h, name, mode & !(umask & 0o777))?;
                put_entry(out, self.ttl, ino, node);
                if h.opcode == abi::CREATE {
                    put64(out, 0); // fh
                    put32(out, 0); // open_flags
                    put32(out, 0); // backing_id
                }
            }
            abi::UNLINK | abi::RMDIR => {
                let (name, _) = name_at(rest);
                s.remove(h.nodeid, name, h.opcode == abi::RMDIR)?;
            }
            abi::RENAME | abi::RENAME2 => {
                let newdir = u64_at(arg, 0);
                let flags = if h.opcode == abi::RENAME2 {
                    u32_at(arg, 8)
                } else {
                    0
                };
                if flags & !abi::RENAME_NOREPLACE != 0 {
                    return Err(Errno::EINVAL);
                }
                let (old, rest) = name_at(rest);
                let (new, _) = name_at(rest);
                let ino = s.child(h.nodeid, old)?;
                match s.child(newdir, new) {
                    Ok(target) if target == ino => return Ok(Some(())),
                    Ok(_) if flags & abi::RENAME_NOREPLACE != 0 => return Err(Errno::EEXIST),
                    Ok(target) => {
                        let want_dir = s.nodes[&target].children.is_some();
                        s.remove(newdir, new, want_dir)?;
                    }
                    Err(Errno::ENOENT) => {}
                    Err(e) => return Err(e),
                }
                let is_dir = s.nodes[&ino].children.is_some();
                let from = s.nodes.get_mut(&h.nodeid).unwrap();
                from.children.as_mut().unwrap().remove(old);
                if is_dir {
                    from.nlink -= 1;
                }
                let to = s.nodes.get_mut(&newdir).ok_or(Errno::ENOENT)?;
                to.children
                    .as_mut()
                    .ok_or(Errno::ENOTDIR)?
                    .insert(new.to_vec(), ino);
                if is_dir {
                    to.nlink += 1;
                }
            }
            abi::LINK => {
                let old = u64_at(arg, 0);
                let (name, _) = name_at(rest);
                if s.nodes.get(&old).ok_or(Errno::ENOENT)?.children.is_some() {
                    return Err(Errno::EPERM);
                }
                let dir = s.nodes.get_mut(&h.nodeid).ok_or(Errno::ENOENT)?;
                let children = dir.children.as_mut().ok_or(Errno::ENOTDIR)?;
                if children.contains_key(name) {
                    return Err(Errno::EEXIST);
                }
                children.insert(name.to_vec(), old);
                let node = s.nodes.get_mut(&old).unwrap();
                node.nlink += 1;
                node.lookups += 1;
                node.ctime = Time::now();
                put_entry(out, self.ttl, old, node);
            }
            abi::OPEN => {
                put64(out, 0);
                put32(out, 0);
                put32(out, 0);
            }
            abi::READ => {
                let node = s.nodes.get(&h.nodeid).ok_or(Errno::ENOENT)?;
                let (offset, size) = (u64_at(arg, 8), u64::from(u32_at(arg, 16)));
                let n = node.size.saturating_sub(offset).min(size) as usize;
                out.resize(out.len() + n, 0);
            }
            abi::WRITE => {
                let node = s.nodes.get_mut(&h.nodeid).ok_or(Errno::ENOENT)?;
                let (offset, size) = (u64_at(arg, 8), u32_at(arg, 16));
                node.size = node.size.max(offset + u64::from(size));
                node.mtime = Time::now();
                node.ctime = node.mtime;
                put32(out, size);
                put32(out, 0);
            }
            abi::STATFS => {
                for v in [1u64 << 24, 1 << 24, 1 << 24, 1 << 24, 1 << 24] {
                    put64(out, v);
                }
                for v in [4096u32, 255, 4096, 0, 0, 0, 0, 0, 0, 0] {
                    put32(out, v);
                }
            }
            abi::RELEASE | abi::FSYNC | abi::FSYNCDIR => {}
            abi::GETXATTR if self.getxattr_enosys => return Err(Errno::ENOSYS),
            abi::GETXATTR => return Err(Errno::ENODATA),
            abi::LISTXATTR => {
                if u32_at(arg, 0) == 0 {
                    put32(out, 0);
                    put32(out, 0);
                }
            }
            abi::SETXATTR | abi::REMOVEXATTR => return Err(Errno::EOPNOTSUPP),
            abi::OPENDIR => {
                let dir = s.nodes.get(&h.nodeid).ok_or(Errno::ENOENT)?;
                let children = dir.children.as_ref().ok_or(Errno::ENOTDIR)?;
                let mut list = vec![
                    (h.nodeid, libc::DT_DIR as u32, b".".to_vec()),
                    (h.nodeid, libc::DT_DIR as u32, b"..".to_vec()),
                ];
                for (name, ino) in children {
                    let kind = (s.nodes[ino].mode & libc::S_IFMT) >> 12;
                    list.push((*ino, kind, name.clone()));
                }
                let fh = s.next_fh;
                s.next_fh += 1;
                s.dirs.insert(fh, list);
                put64(out, fh);
                put32(out, 0);
                put32(out, 0);
            }
            abi::READDIR => {
                let (fh, offset, size) = (u64_at(arg, 0), u64_at(arg, 8), u32_at(arg, 16));
                let list = s.dirs.get(&fh).ok_or(Errno::EBADF)?;
                let limit = out.len() + size as usize;
                for (i, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
                    let entry = (24 + name.len()).next_multiple_of(8);
                    if out.len() + entry > limit {
                        break;
                    }
                    put64(out, *ino);
                    put64(out, i as u64 + 1);
                    put32(out, name.len() as u32);
                    put32(out, *kind);
                    out.extend_from_slice(name);
                    out.resize(out.len() + entry - 24 - name.len(), 0);
                }
            }
            abi::RELEASEDIR => {
                s.dirs.remove(&u64_at(arg, 0));
            }
            abi::DESTROY => {}
            // FLUSH, ACCESS and the rest: the kernel stops asking.
            _ => return Err(Errno::ENOSYS),
        }
        Ok(Some(()))
    }
}

/// Opens the ring threads' way once the INIT reply is in (before it the
/// kernel refuses REGISTER), or tells them the mount failed.
struct Gate {
    open: Mutex<Option<bool>>,
    cond: Condvar,
}

impl Gate {
    fn set(&self, go: bool) {
        *self.open.lock().unwrap() = Some(go);
        self.cond.notify_all();
    }
    fn wait(&self) -> bool {
        let mut open = self.open.lock().unwrap();
        loop {
            if let Some(go) = *open {
                return go;
            }
            open = self.cond.wait(open).unwrap();
        }
    }
}

nix::ioctl_read!(fuse_dev_ioc_clone, 229, 0, u32);

/// A second /dev/fuse descriptor on the same connection (as fuser's
/// `clone_fd`, which unionfs uses): the kernel answers replies on the
/// descriptor that read the request.
fn clone_dev(dev: &OwnedFd) -> OwnedFd {
    let new = open_dev();
    let mut source = dev.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the source descriptor) from
    // the pointer, which points at a live local.
    unsafe { fuse_dev_ioc_clone(new.as_raw_fd(), &mut source) }.expect("FUSE_DEV_IOC_CLONE");
    new
}

fn open_dev() -> OwnedFd {
    use nix::fcntl::{OFlag, open};
    open(
        "/dev/fuse",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .expect("open /dev/fuse")
}

/// The classic transport: read(2) a request from /dev/fuse, write(2) its
/// reply. Serves INIT too (in both modes), then opens the gate.
fn classic_loop(fs: &Fs, dev: &OwnedFd, uring: bool, gate: &Gate) {
    let mut buf = vec![0u8; READ_BUF];
    let mut out = Vec::with_capacity(READ_BUF);
    loop {
        let n = match nix::unistd::read(dev, &mut buf) {
            Ok(n) => n,
            Err(Errno::ENOENT | Errno::EINTR | Errno::EAGAIN) => continue,
            Err(Errno::ENODEV) => return,
            Err(e) => panic!("read /dev/fuse: {e}"),
        };
        let h = InHeader::parse(&buf[..n]);
        let body = &buf[abi::IN_HEADER_SIZE..n];
        out.clear();
        out.resize(abi::OUT_HEADER_SIZE, 0);
        if h.opcode == abi::INIT {
            fs.count(h.opcode);
            match fs.init(body, uring, &mut out) {
                Ok(()) => {
                    set_out_header(&mut out, h.unique, 0);
                    nix::unistd::write(dev, &out).expect("INIT reply");
                    gate.set(true);
                }
                Err(msg) => {
                    eprintln!("fuse_transport: {msg}");
                    out.truncate(abi::OUT_HEADER_SIZE);
                    set_out_header(&mut out, h.unique, -libc::EPROTO);
                    let _ = nix::unistd::write(dev, &out);
                    gate.set(false);
                }
            }
            continue;
        }
        let split = abi::fixed_size(h.opcode).min(body.len());
        let error = match fs.handle(&h, &body[..split], &body[split..], &mut out) {
            Outcome::NoReply => continue,
            Outcome::Reply => 0,
            Outcome::Error(e) => {
                out.truncate(abi::OUT_HEADER_SIZE);
                -(e as i32)
            }
        };
        set_out_header(&mut out, h.unique, error);
        match nix::unistd::write(dev, &out) {
            // ENOENT: the request was interrupted and is gone.
            Ok(_) | Err(Errno::ENOENT) => {}
            Err(Errno::ENODEV) => return,
            Err(e) => panic!("write /dev/fuse: {e}"),
        }
    }
}

/// FUSE over io_uring: one queue per possible CPU (the kernel puts a
/// request on the queue of the CPU its caller runs on), each served by a
/// thread with its own ring.
mod uring {
    use super::*;
    use io_uring::{IoUring, cqueue, opcode, squeue, types};

    #[derive(Clone, Copy, Debug, ValueEnum)]
    pub enum RingFlags {
        /// No setup flags.
        None,
        /// IORING_SETUP_COOP_TASKRUN | TASKRUN_FLAG.
        Coop,
        /// IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN: completions run only
        /// when the thread waits for them.
        Defer,
    }

    /// One ring entry: the header and payload buffers the kernel copies a
    /// request into and its reply out of. They are handed to the kernel at
    /// REGISTER and never freed (the process exits after the unmount), so
    /// no completion can ever find them gone.
    struct Entry {
        header: *mut u8,
        payload: *mut u8,
        iov: *mut [libc::iovec; 2],
    }

    fn leak(len: usize) -> *mut u8 {
        Box::into_raw(vec![0u8; len].into_boxed_slice()).cast::<u8>()
    }

    impl Entry {
        fn new(payload_len: usize) -> Entry {
            let header = leak(abi::URING_REQ_HEADER_SZ);
            let payload = leak(payload_len);
            let iov = Box::into_raw(Box::new([
                libc::iovec {
                    iov_base: header.cast(),
                    iov_len: abi::URING_REQ_HEADER_SZ,
                },
                libc::iovec {
                    iov_base: payload.cast(),
                    iov_len: payload_len,
                },
            ]));
            Entry {
                header,
                payload,
                iov,
            }
        }
    }

    /// The 80-byte command area: `fuse_uring_cmd_req`.
    fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_le_bytes());
        cmd[16..18].copy_from_slice(&qid.to_le_bytes());
        cmd
    }

    /// io-uring's UringCmd80 sets `addr` but not `len`, which REGISTER
    /// needs (the number of iovecs, 2).
    fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
        // SAFETY: Entry128 is repr(C): the kernel's 64-byte io_uring_sqe
        // followed by 64 command bytes, no padding, every byte initialized
        // (built from a zeroed sqe). `len` is the u32 at offset 24 of
        // io_uring_sqe; any bit pattern is a valid Entry128.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
        raw[24..28].copy_from_slice(&len.to_le_bytes());
        // SAFETY: as above, back to the same type.
        unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
    }

    pub struct Options {
        pub depth: usize,
        pub pin: bool,
        pub flags: RingFlags,
    }

    pub fn queue_loop(fs: &Fs, dev: &OwnedFd, qid: usize, opts: &Options, gate: &Gate) {
        if opts.pin {
            let mut set = nix::sched::CpuSet::new();
            set.set(qid).expect("cpu set");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .expect("sched_setaffinity");
        }
        let depth = opts.depth;
        let mut builder = IoUring::<squeue::Entry128, cqueue::Entry>::builder();
        builder.setup_cqsize(2 * depth as u32);
        match opts.flags {
            RingFlags::None => {}
            RingFlags::Coop => {
                builder.setup_coop_taskrun().setup_taskrun_flag();
            }
            RingFlags::Defer => {
                builder.setup_single_issuer().setup_defer_taskrun();
            }
        }
        let mut ring = builder.build(depth as u32).expect("io_uring_setup");
        ring.submitter()
            .register_files(&[dev.as_raw_fd()])
            .expect("register /dev/fuse with the ring");
        let fd = types::Fixed(0);
        let entries: Vec<Entry> = (0..depth).map(|_| Entry::new(MAX_WRITE)).collect();
        if !gate.wait() {
            return;
        }
        for (i, e) in entries.iter().enumerate() {
            let sqe = opcode::UringCmd80::new(fd, abi::IO_URING_CMD_REGISTER)
                .cmd(cmd_req(0, qid as u16))
                .addr(Some(e.iov as u64))
                .build()
                .user_data(i as u64);
            let sqe = with_len(sqe, 2);
            // SAFETY: the iovecs and the buffers they point at are leaked
            // (see Entry) and so outlive the command.
            unsafe { ring.submission().push(&sqe) }.expect("submission queue full");
        }
        let mut live = depth;
        let mut out = Vec::with_capacity(MAX_WRITE + abi::OUT_HEADER_SIZE);
        let mut done = Vec::with_capacity(depth);
        while live > 0 {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => panic!("io_uring_enter: {e}"),
            }
            done.clear();
            done.extend(
                ring.completion()
                    .map(|c| (c.user_data() as usize, c.result())),
            );
            for &(i, res) in &done {
                if res < 0 {
                    // ENOTCONN/ECANCELED: the connection is gone (unmount).
                    if res != -libc::ENOTCONN && res != -libc::ECANCELED {
                        eprintln!("fuse_transport: queue {qid}: ring entry {i}: error {res}");
                    }
                    live -= 1;
                    continue;
                }
                let e = &entries[i];
                out.clear();
                out.resize(abi::OUT_HEADER_SIZE, 0);
                let (h, commit_id, outcome) = {
                    // SAFETY: the kernel hands the entry's buffers to us
                    // with its completion and takes them back only with the
                    // COMMIT_AND_FETCH submitted below; meanwhile only this
                    // thread touches them.
                    let header =
                        unsafe { std::slice::from_raw_parts(e.header, abi::URING_REQ_HEADER_SZ) };
                    let h = InHeader::parse(header);
                    let commit_id = u64_at(header, abi::URING_ENT_IN_OUT + 8);
                    let payload_len =
                        (u32_at(header, abi::URING_ENT_IN_OUT + 16) as usize).min(MAX_WRITE);
                    let arg_len = abi::fixed_size(h.opcode).min(abi::URING_OP_IN_OUT_SZ);
                    let arg = &header[abi::URING_IN_OUT_HEADER_SZ..][..arg_len];
                    // SAFETY: as above; the buffer holds MAX_WRITE bytes.
                    let rest = unsafe { std::slice::from_raw_parts(e.payload, payload_len) };
                    let outcome = fs.handle(&h, arg, rest, &mut out);
                    fs.ring_requests.fetch_add(1, Ordering::Relaxed);
                    (h, commit_id, outcome)
                };
                let error = match outcome {
                    Outcome::Reply | Outcome::NoReply => 0,
                    Outcome::Error(e) => {
                        out.truncate(abi::OUT_HEADER_SIZE);
                        -(e as i32)
                    }
                };
                set_out_header(&mut out, h.unique, error);
                let reply = &out[abi::OUT_HEADER_SIZE..];
                {
                    // SAFETY: as above, the entry is still ours.
                    let header = unsafe {
                        std::slice::from_raw_parts_mut(e.header, abi::URING_REQ_HEADER_SZ)
                    };
                    header[..abi::OUT_HEADER_SIZE].copy_from_slice(&out[..abi::OUT_HEADER_SIZE]);
                    header[abi::URING_ENT_IN_OUT + 16..][..4]
                        .copy_from_slice(&(reply.len() as u32).to_le_bytes());
                    // SAFETY: as above; the payload buffer holds MAX_WRITE
                    // bytes, no reply here is longer.
                    let payload = unsafe { std::slice::from_raw_parts_mut(e.payload, MAX_WRITE) };
                    payload[..reply.len()].copy_from_slice(reply);
                }
                let sqe = opcode::UringCmd80::new(fd, abi::IO_URING_CMD_COMMIT_AND_FETCH)
                    .cmd(cmd_req(commit_id, qid as u16))
                    .build()
                    .user_data(i as u64);
                // SAFETY: the command carries no pointer; the entry's
                // buffers were registered and are leaked.
                unsafe { ring.submission().push(&sqe) }.expect("submission queue full");
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Transport {
    Classic,
    Uring,
}

#[derive(Parser)]
#[command(about = "A trivial FUSE server over the classic or the io_uring transport")]
struct Args {
    mountpoint: PathBuf,
    #[arg(long, value_enum, default_value = "classic")]
    transport: Transport,
    /// Classic: reader threads (each with a cloned /dev/fuse descriptor).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// io_uring: ring entries per queue.
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// io_uring: do not pin each queue's thread to its CPU.
    #[arg(long)]
    no_pin: bool,
    #[arg(long, value_enum, default_value = "none")]
    ring_flags: uring::RingFlags,
    /// Answer GETXATTR with ENOSYS (the kernel then stops asking) instead of
    /// ENODATA (as unionfs, whose request mix this otherwise follows).
    #[arg(long)]
    getxattr_enosys: bool,
    /// Seconds the kernel may cache entries and attributes (0: every
    /// stat is a GETATTR, to time single round trips).
    #[arg(long, default_value_t = 1)]
    ttl: u64,
}

fn mount(dev: &OwnedFd, mountpoint: &std::path::Path) -> Result<(), String> {
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other",
        dev.as_raw_fd()
    );
    nix::mount::mount(
        Some("fuse_transport"),
        mountpoint,
        Some("fuse.fuse_transport"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| format!("mount {}: {e}", mountpoint.display()))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let uring = args.transport == Transport::Uring;
    if uring
        && std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
            .is_ok_and(|v| v.trim() != "Y")
    {
        eprintln!("fuse_transport: /sys/module/fuse/parameters/enable_uring is not Y");
        return std::process::ExitCode::FAILURE;
    }
    let fs = Arc::new(Fs::new(args.getxattr_enosys, args.ttl));
    let gate = Arc::new(Gate {
        open: Mutex::new(None),
        cond: Condvar::new(),
    });
    let dev = Arc::new(open_dev());
    if let Err(msg) = mount(&dev, &args.mountpoint) {
        eprintln!("fuse_transport: {msg}");
        return std::process::ExitCode::FAILURE;
    }
    let mut threads = Vec::new();
    // In io_uring mode one classic thread still serves INIT, FORGET and
    // INTERRUPT, which the kernel never puts on a ring.
    let readers = if uring { 1 } else { args.threads.max(1) };
    for i in 0..readers {
        let (fs, gate) = (fs.clone(), gate.clone());
        let dev = if i == 0 {
            dev.clone()
        } else {
            Arc::new(clone_dev(&dev))
        };
        threads.push(std::thread::spawn(move || {
            classic_loop(&fs, &dev, uring, &gate)
        }));
    }
    if uring {
        let opts = Arc::new(uring::Options {
            depth: args.depth.max(1),
            pin: !args.no_pin,
            flags: args.ring_flags,
        });
        for qid in 0..unionfs::sys::fuse_ring::queue_count().expect("count the CPUs") {
            let (fs, gate, dev, opts) = (fs.clone(), gate.clone(), dev.clone(), opts.clone());
            threads.push(std::thread::spawn(move || {
                uring::queue_loop(&fs, &dev, qid, &opts, &gate)
            }));
        }
    }
    for t in threads {
        let _ = t.join();
    }
    let mut total = 0;
    let mut line = String::new();
    for (op, count) in fs.counts.iter().enumerate() {
        let count = count.load(Ordering::Relaxed);
        if count == 0 {
            continue;
        }
        total += count;
        let name = abi::NAMES
            .iter()
            .find(|(o, _)| *o as usize == op)
            .map_or_else(|| format!("op{op}"), |(_, n)| n.to_string());
        line.push_str(&format!(" {name}={count}"));
    }
    let ring = fs.ring_requests.load(Ordering::Relaxed);
    eprintln!("requests total={total} ring={ring}{line}");
    std::process::ExitCode::SUCCESS
}
