//! Hands memory back to the system after the kernel forgets nodes: from a
//! thread of its own, once forgets have stopped for a moment. A wave of
//! forgets (the kernel dropping its caches) then ends in one trim that
//! leaves no freed memory behind, and no request waits for it. Trimming
//! during the wave instead would leave the pages that the last few live
//! nodes, scattered over the heap, still hold.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, Thread};
use std::time::Duration;

use crate::overlay::Overlay;

/// How long forgets must have stopped before the trim.
const QUIET: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Forgotten {
    /// Nodes forgotten since the thread last looked.
    pending: AtomicBool,
    /// Nodes forgotten ever: unchanged over QUIET means the wave is over.
    count: AtomicU64,
}

pub(crate) struct MemoryReleaser {
    forgotten: Arc<Forgotten>,
    thread: Thread,
}

impl MemoryReleaser {
    pub(crate) fn start(core: Arc<Overlay>) -> io::Result<MemoryReleaser> {
        let forgotten = Arc::new(Forgotten::default());
        let seen = forgotten.clone();
        let handle = thread::Builder::new()
            .name("release-memory".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                loop {
                    while !seen.pending.swap(false, Ordering::AcqRel) {
                        thread::park();
                    }
                    loop {
                        let before = seen.count.load(Ordering::Relaxed);
                        thread::sleep(QUIET);
                        if seen.count.load(Ordering::Relaxed) == before {
                            break;
                        }
                    }
                    core.release_memory();
                }
            })?;
        Ok(MemoryReleaser {
            forgotten,
            thread: handle.thread().clone(),
        })
    }

    /// The kernel forgot a node and the core dropped it.
    pub(crate) fn node_dropped(&self) {
        self.forgotten.count.fetch_add(1, Ordering::Relaxed);
        if !self.forgotten.pending.swap(true, Ordering::AcqRel) {
            self.thread.unpark();
        }
    }
}
