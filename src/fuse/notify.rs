//! Tells the kernel to drop what it caches about nodes the core changed
//! behind its back. Notifications go out from their own thread: sent from a
//! request handler they could wait on locks the kernel holds for that very
//! request (an entry's invalidation takes its directory's lock). The handler
//! still waits, for a bounded time, until an inode's attributes are
//! dropped: the kernel must not serve the old ones (a copied-up directory's
//! link count, cached for long while it was a lower one) once the request
//! that changed them is answered.

use std::ffi::{OsStr, OsString};
use std::sync::mpsc::{Sender, SyncSender, channel, sync_channel};
use std::time::Duration;

use fuser::{INodeNo, Notifier};
use parking_lot::Mutex;

use crate::overlay::KernelCache;

/// How long a handler waits for an attribute invalidation to be sent.
const ATTR_WAIT: Duration = Duration::from_millis(200);

enum Invalidation {
    Attr(u64, SyncSender<()>),
    Entry(u64, OsString),
}

pub struct AsyncNotifier {
    queue: Mutex<Sender<Invalidation>>,
}

impl AsyncNotifier {
    pub fn start(notifier: Notifier) -> std::io::Result<AsyncNotifier> {
        let (tx, rx) = channel::<Invalidation>();
        std::thread::Builder::new()
            .name("invalidate".into())
            .spawn(move || {
                for item in rx {
                    // ENOENT: the kernel does not hold that node or name.
                    match item {
                        Invalidation::Attr(id, done) => {
                            let _ = notifier.inval_inode(INodeNo(id), -1, 0);
                            let _ = done.send(());
                        }
                        Invalidation::Entry(parent, name) => {
                            let _ = notifier.inval_entry(INodeNo(parent), &name);
                        }
                    }
                }
            })?;
        Ok(AsyncNotifier {
            queue: Mutex::new(tx),
        })
    }
}

impl KernelCache for AsyncNotifier {
    fn invalidate_attr(&self, id: u64) {
        let (done, sent) = sync_channel(1);
        if self.queue.lock().send(Invalidation::Attr(id, done)).is_ok() {
            let _ = sent.recv_timeout(ATTR_WAIT);
        }
    }

    fn invalidate_entry(&self, parent: u64, name: &OsStr) {
        let _ = self
            .queue
            .lock()
            .send(Invalidation::Entry(parent, name.to_os_string()));
    }
}
