//! sha256 digests as OCI writes them (`sha256:<64 hex>`), and a reader that
//! hashes what passes through it, so a layer is verified in the same pass
//! that unpacks it.

use std::cell::RefCell;
use std::fmt;
use std::io::{self, Read};
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A `sha256:<hex>` digest. Only sha256 is accepted: it is what image IDs
/// and diff_ids are, and an unknown algorithm could not be verified.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(text: &str) -> Result<Digest, String> {
        let hex = text
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("unsupported digest '{text}' (only sha256 is)"))?;
        Digest::from_hex(hex).ok_or_else(|| format!("malformed digest '{text}'"))
    }

    /// From 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Option<Digest> {
        (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then(
            || Digest {
                hex: hex.to_string(),
            },
        )
    }

    pub fn of(bytes: &[u8]) -> Digest {
        finish(Sha256::digest(bytes).as_slice())
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The 12-digit form listings show.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

fn finish(bytes: &[u8]) -> Digest {
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Digest { hex }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl TryFrom<String> for Digest {
    type Error = String;
    fn try_from(text: String) -> Result<Digest, String> {
        Digest::parse(&text)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

/// The running hash and byte count of a [`HashingReader`], readable after
/// the reader itself has been handed to a decompressor or a tar parser.
#[derive(Clone, Default)]
pub struct Tally(Rc<RefCell<(Sha256, u64)>>);

impl Tally {
    pub fn bytes(&self) -> u64 {
        self.0.borrow().1
    }

    pub fn digest(&self) -> Digest {
        finish(self.0.borrow().0.clone().finalize().as_slice())
    }
}

/// Hashes every byte read through it; `on_read` sees each chunk's length
/// (the progress bar).
pub struct HashingReader<R> {
    inner: R,
    tally: Tally,
    on_read: Box<dyn FnMut(u64)>,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R, on_read: Box<dyn FnMut(u64)>) -> (HashingReader<R>, Tally) {
        let tally = Tally::default();
        let reader = HashingReader {
            inner,
            tally: tally.clone(),
            on_read,
        };
        (reader, tally)
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut state = self.tally.0.borrow_mut();
        state.0.update(&buf[..n]);
        state.1 += n as u64;
        drop(state);
        (self.on_read)(n as u64);
        Ok(n)
    }
}

/// Hashes and counts every byte written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: io::Write> HashingWriter<W> {
    pub fn new(inner: W) -> HashingWriter<W> {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The writer, the digest and the count of what was written.
    pub fn finish(self) -> (W, Digest, u64) {
        let digest = finish(self.hasher.finalize().as_slice());
        (self.inner, digest, self.bytes)
    }
}

impl<W: io::Write> io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_what_passes() {
        let (mut r, tally) = HashingReader::new(&b"abc"[..], Box::new(|_| {}));
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert_eq!(
            tally.digest().to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(tally.bytes(), 3);
        assert_eq!(Digest::of(b"abc"), tally.digest());
    }

    #[test]
    fn parses_only_sha256() {
        assert!(Digest::parse("sha512:00").is_err());
        assert!(Digest::parse("sha256:ABC").is_err());
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
    }
}
