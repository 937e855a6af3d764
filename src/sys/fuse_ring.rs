//! One ring of FUSE over io_uring: an io_uring whose entries the kernel
//! fills with FUSE requests (`FUSE_IO_URING_CMD_REGISTER`, then one
//! `COMMIT_AND_FETCH` per request, which hands back the reply and asks for
//! the next request). The buffers of an entry belong to the kernel from the
//! command that hands them over until its completion; this type keeps
//! track of that, and only gives out views of an entry that is ours.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// `struct fuse_uring_req_header`: `in_out` (the `fuse_in_header` of a
/// request, the `fuse_out_header` of its reply), `op_in` (the request's
/// per-opcode argument), then `fuse_uring_ent_in_out`.
const IN_OUT_SIZE: usize = 128;
const OP_IN_SIZE: usize = 128;
const ENT_IN_OUT: usize = IN_OUT_SIZE + OP_IN_SIZE;
pub const HEADER_SIZE: usize = ENT_IN_OUT + 32;
/// In `fuse_uring_ent_in_out`: the commit id and the payload's length.
const COMMIT_ID_AT: usize = ENT_IN_OUT + 8;
const PAYLOAD_SIZE_AT: usize = ENT_IN_OUT + 16;

const FUSE_IN_HEADER_SIZE: usize = 40;
const FUSE_OUT_HEADER_SIZE: usize = 16;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// The registered /dev/fuse descriptor's index in the ring's file table.
const DEV: types::Fixed = types::Fixed(0);

/// The buffers of one ring entry, and the iovecs REGISTER points at.
struct EntryBuffers {
    header: *mut u8,
    payload: *mut u8,
    payload_len: usize,
    iov: *mut [libc::iovec; 2],
    /// Handed to the kernel and not completed yet.
    with_kernel: bool,
}

impl EntryBuffers {
    fn new(payload_len: usize) -> EntryBuffers {
        // Zeroed allocations of this size come from mmap: pages the kernel
        // never writes stay unbacked.
        let header = Box::into_raw(vec![0u8; HEADER_SIZE].into_boxed_slice()).cast::<u8>();
        let payload = Box::into_raw(vec![0u8; payload_len].into_boxed_slice()).cast::<u8>();
        let iov = Box::into_raw(Box::new([
            libc::iovec {
                iov_base: header.cast(),
                iov_len: HEADER_SIZE,
            },
            libc::iovec {
                iov_base: payload.cast(),
                iov_len: payload_len,
            },
        ]));
        EntryBuffers {
            header,
            payload,
            payload_len,
            iov,
            with_kernel: false,
        }
    }
}

impl Drop for EntryBuffers {
    fn drop(&mut self) {
        if self.with_kernel {
            // The kernel may still write into them: keep them for good.
            return;
        }
        // SAFETY: the three pointers come from Box::into_raw in `new` with
        // these lengths, are freed only here, and no command of the kernel
        // holds them (with_kernel is false).
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.header,
                HEADER_SIZE,
            )));
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.payload,
                self.payload_len,
            )));
            drop(Box::from_raw(self.iov));
        }
    }
}

// SAFETY: the buffers are owned by this value alone; the raw pointers only
// stand for that ownership (the kernel's share is tracked by with_kernel).
unsafe impl Send for EntryBuffers {}

/// A request the kernel put into an entry.
pub struct RingRequest {
    pub entry: usize,
    pub commit_id: u64,
}

/// What a completion said.
pub enum Completion {
    /// The entry holds a request.
    Request(RingRequest),
    /// The kernel gave the entry back with an error: -ENOTCONN or
    /// -ECANCELED when the connection ends, anything else refused.
    Failed { entry: usize, errno: i32 },
}

pub struct FuseRing {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    entries: Vec<EntryBuffers>,
    qid: u16,
}

impl FuseRing {
    /// A ring of `depth` entries for queue `qid` (a CPU), each able to take
    /// a request or reply of `payload_len` bytes beyond the headers.
    pub fn new(qid: u16, depth: usize, payload_len: usize) -> io::Result<FuseRing> {
        let mut builder = IoUring::<squeue::Entry128, cqueue::Entry>::builder();
        builder.setup_cqsize(2 * depth as u32);
        let ring = builder.build(depth as u32)?;
        let entries = (0..depth).map(|_| EntryBuffers::new(payload_len)).collect();
        Ok(FuseRing { ring, entries, qid })
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    pub fn entries(&self) -> usize {
        self.entries.len()
    }

    /// Hands every entry to the connection of `dev` (after its INIT reply;
    /// the kernel refuses REGISTER before). Refusals come as completions.
    pub fn register(&mut self, dev: BorrowedFd<'_>) -> io::Result<()> {
        self.ring.submitter().register_files(&[dev.as_raw_fd()])?;
        for i in 0..self.entries.len() {
            let sqe = opcode::UringCmd80::new(DEV, CMD_REGISTER)
                .cmd(cmd_req(0, self.qid))
                .addr(Some(self.entries[i].iov as u64))
                .build()
                .user_data(i as u64);
            self.push(i, with_len(sqe, 2))?;
        }
        self.ring.submit()?;
        Ok(())
    }

    /// Submits what is queued and waits for at least one completion.
    pub fn wait(&mut self, done: &mut Vec<Completion>) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        done.clear();
        for cqe in self.ring.completion() {
            let entry = cqe.user_data() as usize;
            let Some(buffers) = self.entries.get_mut(entry) else {
                continue;
            };
            buffers.with_kernel = false;
            done.push(if cqe.result() < 0 {
                Completion::Failed {
                    entry,
                    errno: -cqe.result(),
                }
            } else {
                // SAFETY: the completion gave the entry back; the header
                // is HEADER_SIZE bytes (see EntryBuffers::new).
                let header = unsafe { std::slice::from_raw_parts(buffers.header, HEADER_SIZE) };
                Completion::Request(RingRequest {
                    entry,
                    commit_id: u64_at(header, COMMIT_ID_AT),
                })
            });
        }
        Ok(())
    }

    /// Appends the request in `entry` to `out` as read(2) from /dev/fuse
    /// would return it: `fuse_in_header`, the per-opcode argument, the
    /// rest. None if the lengths the kernel wrote do not fit together;
    /// `out` then holds the header alone, for the error reply's `unique`.
    pub fn request_bytes(&self, entry: usize, out: &mut Vec<u8>) -> Option<()> {
        let buffers = &self.entries[entry];
        if buffers.with_kernel {
            return None;
        }
        // SAFETY: the entry is ours until `commit` (with_kernel is false);
        // the header holds HEADER_SIZE bytes.
        let header = unsafe { std::slice::from_raw_parts(buffers.header, HEADER_SIZE) };
        out.extend_from_slice(&header[..FUSE_IN_HEADER_SIZE]);
        let total = u32_at(header, 0) as usize;
        let payload_len = u32_at(header, PAYLOAD_SIZE_AT) as usize;
        // The kernel fills in the header's length as for /dev/fuse, so what
        // is neither header nor payload is the per-opcode argument.
        let arg_len = total.checked_sub(FUSE_IN_HEADER_SIZE + payload_len)?;
        if arg_len > OP_IN_SIZE || payload_len > buffers.payload_len {
            return None;
        }
        // SAFETY: as above; payload_len is within the payload buffer.
        let payload = unsafe { std::slice::from_raw_parts(buffers.payload, payload_len) };
        out.extend_from_slice(&header[IN_OUT_SIZE..IN_OUT_SIZE + arg_len]);
        out.extend_from_slice(payload);
        Some(())
    }

    /// Writes `reply` (`fuse_out_header` and payload) into `entry` and
    /// queues the COMMIT_AND_FETCH that hands it to the kernel with the
    /// entry, for the next request. Fails if the reply does not fit.
    pub fn commit(&mut self, request: &RingRequest, reply: &[u8]) -> io::Result<()> {
        let buffers = &self.entries[request.entry];
        if buffers.with_kernel || reply.len() < FUSE_OUT_HEADER_SIZE {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let (out_header, payload) = reply.split_at(FUSE_OUT_HEADER_SIZE);
        if payload.len() > buffers.payload_len {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: the entry is ours (with_kernel is false) and nothing else
        // refers to its buffers; both copies stay within their lengths.
        unsafe {
            let header = std::slice::from_raw_parts_mut(buffers.header, HEADER_SIZE);
            header[..FUSE_OUT_HEADER_SIZE].copy_from_slice(out_header);
            header[PAYLOAD_SIZE_AT..PAYLOAD_SIZE_AT + 4]
                .copy_from_slice(&(payload.len() as u32).to_le_bytes());
            std::ptr::copy_nonoverlapping(payload.as_ptr(), buffers.payload, payload.len());
        }
        let sqe = opcode::UringCmd80::new(DEV, CMD_COMMIT_AND_FETCH)
            .cmd(cmd_req(request.commit_id, self.qid))
            .build()
            .user_data(request.entry as u64);
        self.push(request.entry, sqe)
    }

    fn push(&mut self, entry: usize, sqe: squeue::Entry128) -> io::Result<()> {
        if self.ring.submission().is_full() {
            self.ring.submit()?;
        }
        // SAFETY: the command points at the entry's iovecs (REGISTER) or at
        // nothing (COMMIT_AND_FETCH); the buffers live until this value is
        // dropped, and are kept for good then if the kernel still has them.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        self.entries[entry].with_kernel = true;
        Ok(())
    }
}

/// The number of queues the kernel makes for a connection: one per CPU it
/// may ever run a caller on (num_possible_cpus()).
pub fn queue_count() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot read CPU list '{}'", text.trim()),
        )
    })
}

/// The number of CPUs in a list like "0-3,8".
fn parse_cpu_list(text: &str) -> Option<usize> {
    let mut count = 0;
    for part in text.trim().split(',') {
        count += match part.split_once('-') {
            Some((first, last)) => {
                let (first, last) = (first.parse::<usize>().ok()?, last.parse::<usize>().ok()?);
                last.checked_sub(first)? + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    Some(count)
}

/// `struct fuse_uring_cmd_req`, in the command area of a 128-byte SQE.
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_le_bytes());
    cmd[16..18].copy_from_slice(&qid.to_le_bytes());
    cmd
}

/// Sets the SQE's `len`, which REGISTER reads as the number of iovecs at
/// `addr` and io-uring's UringCmd80 builder leaves at 0.
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: Entry128 is repr(C), the kernel's 64-byte io_uring_sqe then
    // 64 command bytes, with no padding and every byte initialized; `len`
    // is the u32 at offset 24 of io_uring_sqe, and any bytes make a valid
    // Entry128.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&len.to_le_bytes());
    // SAFETY: as above, back to the same type.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_count_every_cpu() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn the_sqe_length_lands_where_the_kernel_reads_it() {
        let sqe = opcode::UringCmd80::new(DEV, CMD_REGISTER)
            .cmd(cmd_req(7, 3))
            .addr(Some(0x1000))
            .build();
        // SAFETY: as in with_len.
        let raw: [u8; 128] = unsafe { std::mem::transmute(with_len(sqe, 2)) };
        assert_eq!(u32_at(&raw, 24), 2);
        assert_eq!(u64_at(&raw, 16), 0x1000, "addr is at offset 16");
        assert_eq!(u64_at(&raw, 48 + 8), 7, "commit id in the command area");
        assert_eq!(raw[48 + 16], 3, "qid in the command area");
    }
}
