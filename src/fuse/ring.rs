//! FUSE over io_uring: the kernel queues each request on the ring of the
//! CPU its caller runs on, where a thread pinned to that CPU serves it.
//! The caller sleeps and that thread runs on the same CPU; the classic
//! transport wakes a reader wherever the scheduler puts it, and on this
//! kind of VM a wake-up across CPUs costs tens of microseconds
//! (docs/performance.md, "FUSE over io_uring").
//!
//! The rings are made before the mount, so that a kernel or a sandbox
//! without io_uring leaves the classic transport; the kernel is offered
//! the transport only then (`UnionFs::init`). Once it takes it, every
//! request but FORGET and INTERRUPT waits until each queue has an entry,
//! so the rings are registered right after the INIT reply. FORGET,
//! INTERRUPT and anything before the rings are up still come over
//! /dev/fuse to fuser's own threads.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuser::{Dispatcher, Filesystem, ReplySink, Session};
use parking_lot::Mutex;
use tracing::{debug, error, warn};

use crate::sys::fuse_ring::{Completion, FuseRing, RingRequest, queue_count};

/// Threads per queue. With one, a slow request (an fsync, a large
/// copy-up) would hold every other request of callers on that CPU.
const THREADS_PER_QUEUE: usize = 2;
/// Entries per thread. The kernel puts a request into any free entry of
/// its queue: a second entry of a thread busy with a slow request would
/// make the request wait for it, while another thread sits idle.
const ENTRIES_PER_THREAD: usize = 1;

/// The rings of every queue, ready to be registered.
pub struct Rings {
    rings: Vec<FuseRing>,
}

impl Rings {
    /// One ring per thread, `THREADS_PER_QUEUE` per possible CPU (the
    /// kernel makes a queue for each), whose entries take requests and
    /// replies of `payload_len` bytes (at least the mount's max_write and
    /// readahead).
    pub fn prepare(payload_len: usize) -> io::Result<Rings> {
        let queues = queue_count()?;
        let mut rings = Vec::with_capacity(queues * THREADS_PER_QUEUE);
        for qid in 0..queues {
            let qid = u16::try_from(qid).map_err(|_| io::Error::other("too many CPUs"))?;
            for _ in 0..THREADS_PER_QUEUE {
                rings.push(FuseRing::new(qid, ENTRIES_PER_THREAD, payload_len)?);
            }
        }
        Ok(Rings { rings })
    }

    /// Registers the rings with the session's connection (whose INIT reply
    /// took FUSE over io_uring) and serves them, a thread each. The
    /// threads end when the connection does.
    pub fn start<FS: Filesystem>(self, session: &Session<FS>) -> io::Result<Vec<JoinHandle<()>>> {
        let mut threads = Vec::with_capacity(self.rings.len());
        for ring in self.rings {
            let dev = session.as_fd().try_clone_to_owned()?;
            let dispatcher = session.dispatcher();
            let name = format!("fuse-ring-{}", ring.qid());
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || serve(ring, dev, dispatcher))?,
            );
        }
        debug!(threads = threads.len(), "serving FUSE over io_uring");
        Ok(threads)
    }
}

/// The reply to the request being served, caught from fuser.
#[derive(Debug, Default)]
struct CaughtReply {
    reply: Mutex<Option<Vec<u8>>>,
}

impl ReplySink for CaughtReply {
    fn send(&self, parts: &[io::IoSlice<'_>]) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        for part in parts {
            bytes.extend_from_slice(part);
        }
        let mut reply = self.reply.lock();
        if reply.is_some() {
            // A reply after the request was answered (never sent by this
            // adapter, which replies before returning).
            return Err(io::Error::other("reply sent after the request ended"));
        }
        *reply = Some(bytes);
        Ok(())
    }
}

/// A `fuse_out_header` alone: the error reply to request `unique`.
fn error_reply(unique: u64, errno: i32) -> Vec<u8> {
    let mut reply = Vec::with_capacity(16);
    reply.extend_from_slice(&16u32.to_le_bytes());
    reply.extend_from_slice(&(-errno).to_le_bytes());
    reply.extend_from_slice(&unique.to_le_bytes());
    reply
}

fn serve<FS: Filesystem>(mut ring: FuseRing, dev: OwnedFd, dispatcher: Dispatcher<FS>) {
    let qid = ring.qid();
    let mut cpus = nix::sched::CpuSet::new();
    // Best effort: a cpuset without this CPU runs no caller there either.
    if cpus.set(usize::from(qid)).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus);
    }
    if let Err(e) = ring.register(dev.as_fd()) {
        refused(qid, &e.to_string());
    }
    drop(dev);
    let caught = Arc::new(CaughtReply::default());
    let sink: Arc<dyn ReplySink> = caught.clone();
    let mut live = ring.entries();
    let mut served = false;
    let mut done = Vec::new();
    let mut request = Vec::new();
    while live > 0 {
        if let Err(e) = ring.wait(&mut done) {
            // Nothing more can be served on this ring; the connection
            // cannot go on without it.
            refused(qid, &format!("io_uring_enter: {e}"));
        }
        for completion in done.drain(..) {
            match completion {
                Completion::Failed { errno, .. }
                    if errno == libc::ENOTCONN || errno == libc::ECANCELED =>
                {
                    live -= 1;
                }
                Completion::Failed { errno, .. } if !served => {
                    refused(qid, &io::Error::from_raw_os_error(errno).to_string());
                }
                Completion::Failed { entry, errno } => {
                    warn!(qid, entry, errno, "ring entry failed");
                    live -= 1;
                }
                Completion::Request(req) => {
                    served = true;
                    let reply = serve_one(&ring, &req, &dispatcher, &sink, &caught, &mut request);
                    if let Err(e) = ring.commit(&req, &reply) {
                        warn!(qid, error = %e, "reply does not fit the ring entry");
                        let unique = unique_of(&request);
                        if let Err(e) = ring.commit(&req, &error_reply(unique, libc::EIO)) {
                            error!(qid, error = %e, "cannot hand a ring entry back");
                            live -= 1;
                        }
                    }
                }
            }
        }
    }
    debug!(qid, "ring done: the connection ended");
}

/// Dispatches the request in `req`'s entry and returns its reply.
fn serve_one<FS: Filesystem>(
    ring: &FuseRing,
    req: &RingRequest,
    dispatcher: &Dispatcher<FS>,
    sink: &Arc<dyn ReplySink>,
    caught: &CaughtReply,
    request: &mut Vec<u8>,
) -> Vec<u8> {
    request.clear();
    if ring.request_bytes(req.entry, request).is_none() {
        warn!(qid = ring.qid(), "malformed request in a ring entry");
        return error_reply(unique_of(request), libc::EIO);
    }
    if let Err(e) = dispatcher.dispatch(request, sink.clone()) {
        warn!(qid = ring.qid(), error = %e, "cannot decode a request from the ring");
    }
    caught
        .reply
        .lock()
        .take()
        .unwrap_or_else(|| error_reply(unique_of(request), libc::EIO))
}

/// The `unique` of a request (in its `fuse_in_header`), 0 if cut short.
fn unique_of(request: &[u8]) -> u64 {
    request
        .get(8..16)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
}

/// The kernel refused the ring: it waits for every queue before it sends a
/// request, so the mount would hang. End the daemon; the mount then
/// answers ENOTCONN, as after any crash, and says why in the log.
fn refused(qid: u16, why: &str) -> ! {
    error!(
        qid,
        why, "FUSE over io_uring failed; mount with -o noio_uring to use /dev/fuse alone"
    );
    eprintln!(
        "unionfs: FUSE over io_uring failed on queue {qid}: {why}; \
         mount with -o noio_uring to use /dev/fuse alone"
    );
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_reply_is_taken_once() {
        let caught = CaughtReply::default();
        caught
            .send(&[io::IoSlice::new(b"head"), io::IoSlice::new(b"tail")])
            .unwrap();
        assert!(caught.send(&[io::IoSlice::new(b"again")]).is_err());
        assert_eq!(
            caught.reply.lock().take().as_deref(),
            Some(&b"headtail"[..])
        );
    }

    #[test]
    fn error_replies_carry_the_negated_errno() {
        let reply = error_reply(0x1234, libc::EIO);
        assert_eq!(reply.len(), 16);
        assert_eq!(
            i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            -libc::EIO
        );
        assert_eq!(
            unique_of(&[&[0u8; 8][..], &0x1234u64.to_le_bytes()].concat()),
            0x1234
        );
    }
}
