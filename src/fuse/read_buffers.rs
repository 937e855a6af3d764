//! Buffers for the reads the daemon serves (files not passed through). A
//! read borrows one and gives it back after its reply, so a file read in
//! large requests reuses a few; they are freed when the last open file
//! closes, so one large read does not pin a buffer of its size per thread
//! for the life of the mount.

use parking_lot::Mutex;

#[derive(Default)]
pub(crate) struct ReadBuffers {
    spare: Mutex<Vec<Vec<u8>>>,
}

impl ReadBuffers {
    /// Runs `f` with a buffer of its own, kept for the next read only while
    /// `files_open` (checked after `f`, which may have replied to the
    /// kernel's last read before the file's release).
    pub(crate) fn lend<R>(
        &self,
        f: impl FnOnce(&mut Vec<u8>) -> R,
        files_open: impl FnOnce() -> bool,
    ) -> R {
        let mut buf = self.spare.lock().pop().unwrap_or_default();
        let result = f(&mut buf);
        let mut spare = self.spare.lock();
        if files_open() {
            spare.push(buf);
        }
        result
    }

    /// Frees the buffers unless `files_open`: called after a release, and
    /// checked under the lock a read returns its buffer under, so the two
    /// never both keep one.
    pub(crate) fn free_unless(&self, files_open: impl FnOnce() -> bool) {
        let mut spare = self.spare.lock();
        if !files_open() {
            *spare = Vec::new();
        }
    }

    #[cfg(test)]
    fn spare(&self) -> usize {
        self.spare.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_while_files_are_open_then_freed() {
        let buffers = ReadBuffers::default();
        let first = buffers.lend(
            |buf| {
                buf.resize(1 << 20, 1);
                buf.as_ptr()
            },
            || true,
        );
        let again = buffers.lend(
            |buf| {
                assert_eq!(buf.len(), 1 << 20, "the spare buffer is lent again");
                assert_eq!(buffers.spare(), 0, "a lent buffer is not lent twice");
                buf.as_ptr()
            },
            || true,
        );
        assert_eq!(first, again);
        buffers.free_unless(|| true);
        assert_eq!(buffers.spare(), 1);
        buffers.free_unless(|| false);
        assert_eq!(buffers.spare(), 0);
    }

    #[test]
    fn a_read_that_ends_after_the_last_release_keeps_nothing() {
        let buffers = ReadBuffers::default();
        buffers.lend(|buf| buf.resize(4096, 0), || false);
        assert_eq!(buffers.spare(), 0);
    }
}
