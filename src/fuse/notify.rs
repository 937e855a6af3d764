//! Tells the kernel to drop what it caches about nodes the core changed
//! behind its back. Notifications go out from their own thread: sent from a
//! request handler they could wait on locks the kernel holds for that very
//! request.

use std::sync::mpsc::{Sender, channel};

use fuser::{INodeNo, Notifier};
use parking_lot::Mutex;

use crate::overlay::KernelCache;

enum Invalidation {
    Attr(u64),
    Entry(u64, std::ffi::OsString),
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
                    let _ = match item {
                        Invalidation::Attr(id) => notifier.inval_inode(INodeNo(id), -1, 0),
                        Invalidation::Entry(parent, name) => {
                            notifier.inval_entry(INodeNo(parent), &name)
                        }
                    };
                }
            })?;
        Ok(AsyncNotifier {
            queue: Mutex::new(tx),
        })
    }
}

impl KernelCache for AsyncNotifier {
    fn invalidate_attr(&self, id: u64) {
        let _ = self.queue.lock().send(Invalidation::Attr(id));
    }

    fn invalidate_entry(&self, parent: u64, name: &std::ffi::OsStr) {
        let _ = self
            .queue
            .lock()
            .send(Invalidation::Entry(parent, name.to_os_string()));
    }
}
