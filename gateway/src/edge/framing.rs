//! The one request-smuggling shape hyper accepts and then hides:
//! `Content-Length` and `Transfer-Encoding` in one HTTP/1.1 head.
//!
//! hyper follows RFC 9112 section 6.3: chunked wins, the `Content-Length`
//! is dropped before the request reaches us, and the connection is closed
//! after the answer. The gateway re-frames every request it forwards, so
//! nothing could be smuggled past it; but a front proxy that framed the
//! same bytes by their `Content-Length` disagrees with us about where the
//! request ends, and Envoy and nginx refuse such a request with 400. To do
//! the same, [`HeadScan`] reads the head's bytes as they arrive (in
//! [`HeadWatch`](crate::edge::conn_clock::HeadWatch)) and notes a `Content-Length`
//! field line; the pipeline refuses a request that has one *and* still
//! carries `Transfer-Encoding` ([`ProxyError::AmbiguousLength`](crate::error::ProxyError)).
//!
//! Only heads that arrive while no request is in flight are scanned (the
//! connection clock's notion of a head starting). A head pipelined behind
//! a request still in flight is not; hyper's rule (chunked, then close)
//! still applies to it.

/// The field name, lowercase, with its colon: hyper refuses whitespace
/// before the colon, so a field line that counts starts with exactly this.
const NAME: &[u8] = b"content-length:";

/// Where the scan is in the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// At the start of a line.
    LineStart,
    /// After a `\r` at the start of a line: a `\n` ends the head.
    Cr,
    /// `n` bytes of the line match [`NAME`] so far.
    Name(usize),
    /// In a line that cannot be a `Content-Length` field line.
    Skip,
    /// Past the head's empty line.
    Done,
}

/// Scans one request head, fed in the pieces it is read in. The request
/// line is scanned like a field line; it never matches.
#[derive(Debug)]
pub struct HeadScan {
    at: At,
    found: bool,
}

impl Default for HeadScan {
    fn default() -> Self {
        HeadScan::new()
    }
}

impl HeadScan {
    pub fn new() -> HeadScan {
        HeadScan {
            at: At::LineStart,
            found: false,
        }
    }

    /// Feeds the next bytes of the head; bytes after its end are ignored.
    /// Cheap on ordinary heads: the bytes of a line past its first few are
    /// skipped with `memchr`.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.at == At::Skip {
                match memchr::memchr(b'\n', bytes) {
                    Some(i) => {
                        bytes = &bytes[i + 1..];
                        self.at = At::LineStart;
                        continue;
                    }
                    None => return,
                }
            }
            let b = bytes[0];
            bytes = &bytes[1..];
            self.at = match self.at {
                At::Done => return,
                At::LineStart | At::Cr if b == b'\n' => At::Done,
                At::LineStart if b == b'\r' => At::Cr,
                At::LineStart => Self::name(0, b),
                At::Name(n) => Self::name(n, b),
                // A bare `\r` in a head: hyper refuses it; nothing to note.
                At::Cr | At::Skip => At::Skip,
            };
            if self.at == At::Name(NAME.len()) {
                self.found = true;
                self.at = At::Skip;
            }
        }
    }

    fn name(matched: usize, b: u8) -> At {
        if b.to_ascii_lowercase() == NAME[matched] {
            At::Name(matched + 1)
        } else if b == b'\n' {
            At::LineStart
        } else {
            At::Skip
        }
    }

    /// The head had a `Content-Length` field line (so far).
    pub fn found_length(&self) -> bool {
        self.found
    }

    /// The head's empty line has been seen.
    pub fn done(&self) -> bool {
        self.at == At::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(pieces: &[&[u8]]) -> HeadScan {
        let mut s = HeadScan::new();
        for p in pieces {
            s.feed(p);
        }
        s
    }

    #[test]
    fn finds_content_length_in_any_case_and_any_split() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nCoNtEnT-LeNgTh: 4\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n";
        for split in 0..head.len() {
            let s = scan(&[&head[..split], &head[split..]]);
            assert!(s.found_length(), "split at {split}");
            assert!(s.done(), "split at {split}");
        }
        // One byte at a time.
        let mut s = HeadScan::new();
        for b in head.iter() {
            s.feed(std::slice::from_ref(b));
        }
        assert!(s.found_length() && s.done());
        // Bare LF line ends, as hyper accepts them.
        assert!(scan(&[b"POST / HTTP/1.1\nContent-Length: 3\n\n"]).found_length());
    }

    #[test]
    fn ignores_lookalikes_and_the_body() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: x\r\nX-Content-Length: 4\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Lengthy: 4\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: content-length: 4\r\n\r\n",
            b"GET /content-length: HTTP/1.1\r\nHost: x\r\n\r\n",
            // After the empty line it is body.
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nContent-Length: 4\r\n",
        ] {
            let s = scan(&[head]);
            assert!(!s.found_length(), "{:?}", String::from_utf8_lossy(head));
            assert!(s.done());
        }
        let s = scan(&[b"GET / HTTP/1.1\r\nHost: x\r\n"]);
        assert!(!s.done(), "no empty line yet");
    }
}
