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
//! The same scan reads the `Content-Length` value: hyper answers a length
//! above its largest body (2^64 - 3) with `431 Request Header Fields Too
//! Large`, which names the wrong problem. [`HeadScan::feed`] points at the
//! digit that takes the value past that bound, and `HeadWatch` turns it
//! into a non-digit before hyper reads it: hyper then refuses the length
//! as invalid, `400` with the connection closed, as it does any other
//! malformed `Content-Length` (a value with more digits than a `u64` holds
//! already got that `400`).
//!
//! Only heads that arrive while no request is in flight are scanned (the
//! connection clock's notion of a head starting). A head pipelined behind
//! a request still in flight is not; hyper's rules (chunked, then close;
//! `431` for a length past 2^64 - 3) still apply to it.

/// The field name, lowercase, with its colon: hyper refuses whitespace
/// before the colon, so a field line that counts starts with exactly this.
const NAME: &[u8] = b"content-length:";

/// hyper's largest body length (`DecodedLength::MAX_LEN`); it answers a
/// larger `Content-Length` with 431.
const MAX_LEN: u64 = u64::MAX - 2;

/// Where the scan is in the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// At the start of a line.
    LineStart,
    /// After a `\r` at the start of a line: a `\n` ends the head.
    Cr,
    /// `n` bytes of the line match [`NAME`] so far.
    Name(usize),
    /// In a `Content-Length` value: its number so far, `None` before its
    /// first digit.
    Value(Option<u64>),
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
    absurd: bool,
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
            absurd: false,
        }
    }

    /// Feeds the next bytes of the head; bytes after its end are ignored.
    /// Cheap on ordinary heads: the bytes of a line past its first few are
    /// skipped with `memchr`.
    ///
    /// Returns where in `bytes` a `Content-Length` value passed hyper's
    /// largest length (its digit that did), if it did in these bytes.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut absurd = None;
        let mut i = 0;
        while i < bytes.len() {
            if self.at == At::Skip {
                match memchr::memchr(b'\n', &bytes[i..]) {
                    Some(j) => {
                        i += j + 1;
                        self.at = At::LineStart;
                        continue;
                    }
                    None => break,
                }
            }
            let b = bytes[i];
            self.at = match self.at {
                At::Done => break,
                At::LineStart | At::Cr if b == b'\n' => At::Done,
                At::LineStart if b == b'\r' => At::Cr,
                At::LineStart => Self::name(0, b),
                At::Name(n) => Self::name(n, b),
                At::Value(v) => match Self::value(v, b) {
                    Some(at) => at,
                    None => {
                        self.absurd = true;
                        absurd = absurd.or(Some(i));
                        At::Skip
                    }
                },
                // A bare `\r` in a head: hyper refuses it; nothing to note.
                At::Cr | At::Skip => At::Skip,
            };
            if self.at == At::Name(NAME.len()) {
                self.found = true;
                self.at = At::Value(None);
            }
            i += 1;
        }
        absurd
    }

    /// The next state in a `Content-Length` value; `None` when `b` is the
    /// digit that takes it past [`MAX_LEN`] (or past a `u64`).
    fn value(v: Option<u64>, b: u8) -> Option<At> {
        Some(match (v, b) {
            (None, b' ' | b'\t') => At::Value(None),
            (_, b'0'..=b'9') => {
                let n = v
                    .unwrap_or(0)
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(b - b'0')))
                    .filter(|&n| n <= MAX_LEN)?;
                At::Value(Some(n))
            }
            (_, b'\n') => At::LineStart,
            _ => At::Skip,
        })
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

    /// A `Content-Length` value of the head passed hyper's largest length.
    pub fn absurd_length(&self) -> bool {
        self.absurd
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

    #[test]
    fn points_at_the_digit_that_makes_a_length_absurd() {
        // 2^64 - 3 is hyper's largest length; 2^64 - 2 is past it.
        let fine = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551613\r\n\r\n";
        let s = scan(&[fine]);
        assert!(s.found_length() && !s.absurd_length() && s.done());
        for value in [
            "18446744073709551614",
            "18446744073709551615",
            "99999999999999999999999",
        ] {
            let head = format!("POST / HTTP/1.1\r\nHost: x\r\ncontent-length:\t {value}\r\n\r\n");
            let head = head.as_bytes();
            let digit = head.iter().position(|&b| b == b'\t').unwrap() + 2 + 19;
            for split in 0..head.len() {
                let mut s = HeadScan::new();
                let first = s.feed(&head[..split]);
                let second = s.feed(&head[split..]);
                let at = first.or(second.map(|i| i + split));
                assert_eq!(at, Some(digit), "{value} split at {split}");
                assert!(s.absurd_length() && s.done(), "{value} split at {split}");
            }
        }
        // Not a length hyper reads as a number at all: left to hyper's 400.
        let s = scan(&[b"POST / HTTP/1.1\r\nContent-Length: 1x99999999999999999999\r\n\r\n"]);
        assert!(s.found_length() && !s.absurd_length());
    }
}
