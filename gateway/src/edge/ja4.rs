//! JA4 TLS client fingerprints (FoxIO's JA4, the BSD-3 licensed part):
//! what a client's ClientHello says about the TLS library behind it,
//! whatever user agent it claims.
//!
//! rustls does not expose the raw ClientHello (rustls#2498), so the TLS
//! listener reads the first handshake message itself ([`read_hello`])
//! before it hands the connection to rustls, and puts the bytes back in
//! front of the stream. The parser is bounded (at most [`MAX_HELLO`]
//! bytes, four records) and never panics: anything it cannot read gives
//! no fingerprint, and rustls judges the bytes as it always did.
//!
//! `JA4 = a_b_c`:
//! - `a`: `t`, the TLS version (highest `supported_versions` entry, else
//!   the hello's version: `13`, `12`, ...), `d` with SNI / `i` without,
//!   the number of cipher suites and of extensions (2 digits, at most 99),
//!   and the first and last characters of the first ALPN value (`00`
//!   without one);
//! - `b`: the first 12 hex digits of SHA-256 of the cipher suites, as
//!   4-digit hex, sorted, comma-separated;
//! - `c`: the same of the extensions (sorted, without SNI and ALPN), then
//!   `_` and the signature algorithms in their order.
//!
//! GREASE values (RFC 8701) are left out everywhere.

use bytes::{Bytes, BytesMut};
use ring::digest;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most bytes read ahead for a ClientHello (a post-quantum key share
/// makes one about 1.8 KiB; 16 KiB is a whole record).
pub const MAX_HELLO: usize = 16 * 1024 + 4 * 5;

/// What the first bytes of a connection hold so far.
enum Hello {
    /// The whole ClientHello message body (after its 4-byte header).
    Complete(Vec<u8>),
    NeedMore,
    /// Not a TLS handshake (or past the bounds): no fingerprint.
    Invalid,
}

/// Reads from `stream` until `buf` holds the whole first handshake
/// message (or it is clearly not one, or the client stops sending).
/// Returns every byte read, to go back in front of the stream, and the
/// fingerprint when the message was a ClientHello that parsed.
pub async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: BytesMut,
) -> std::io::Result<(Bytes, Option<String>)> {
    loop {
        match hello(&buf) {
            Hello::Complete(body) => {
                let fp = fingerprint(&body);
                return Ok((buf.freeze(), fp));
            }
            Hello::Invalid => return Ok((buf.freeze(), None)),
            Hello::NeedMore => {}
        }
        if buf.len() >= MAX_HELLO {
            return Ok((buf.freeze(), None));
        }
        buf.reserve(MAX_HELLO - buf.len());
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok((buf.freeze(), None));
        }
    }
}

/// Joins the handshake records at the front of `data` until the first
/// handshake message is whole.
fn hello(data: &[u8]) -> Hello {
    let mut message = Vec::new();
    let mut at = 0;
    for _ in 0..4 {
        let Some(header) = data.get(at..at + 5) else {
            return Hello::NeedMore;
        };
        // A handshake record (22), TLS 1.x record versions.
        if header[0] != 22 || header[1] != 3 {
            return Hello::Invalid;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16 * 1024 {
            return Hello::Invalid;
        }
        let Some(payload) = data.get(at + 5..at + 5 + len) else {
            return Hello::NeedMore;
        };
        message.extend_from_slice(payload);
        at += 5 + len;
        if message.len() >= 4 {
            // ClientHello (1), with a 3-byte length.
            if message[0] != 1 {
                return Hello::Invalid;
            }
            let need = 4
                + (usize::from(message[1]) << 16
                    | usize::from(message[2]) << 8
                    | usize::from(message[3]));
            if need > MAX_HELLO {
                return Hello::Invalid;
            }
            if message.len() >= need {
                message.truncate(need);
                message.drain(..4);
                return Hello::Complete(message);
            }
        }
    }
    Hello::Invalid
}

/// A cursor over a message that answers `None` past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A vector with a `len_bytes`-byte length in front.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

fn u16s(b: &[u8]) -> impl Iterator<Item = u16> + '_ {
    b.chunks_exact(2).map(|p| u16::from_be_bytes([p[0], p[1]]))
}

/// GREASE (RFC 8701): 0x0a0a, 0x1a1a, ... 0xfafa.
fn is_grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && v >> 8 == v & 0xff
}

/// The JA4 of a ClientHello message body; `None` when it does not parse.
pub fn fingerprint(body: &[u8]) -> Option<String> {
    let mut r = Reader(body);
    let legacy_version = r.u16()?;
    r.take(32)?;
    r.vec8()?;
    let ciphers: Vec<u16> = u16s(r.vec16()?).filter(|c| !is_grease(*c)).collect();
    r.vec8()?;
    let mut extensions = Vec::new();
    let (mut sni, mut alpn, mut sigalgs, mut versions) = (false, None, Vec::new(), Vec::new());
    if !r.0.is_empty() {
        let mut ext = Reader(r.vec16()?);
        while !ext.0.is_empty() {
            let kind = ext.u16()?;
            let data = ext.vec16()?;
            if is_grease(kind) {
                continue;
            }
            extensions.push(kind);
            let mut d = Reader(data);
            match kind {
                0x0000 => sni = true,
                0x0010 => {
                    let mut list = Reader(d.vec16()?);
                    alpn = list.vec8().map(<[u8]>::to_vec);
                }
                0x000d => sigalgs = u16s(d.vec16()?).collect(),
                0x002b => versions = u16s(d.vec8()?).filter(|v| !is_grease(*v)).collect(),
                _ => {}
            }
        }
    }
    let version = versions.iter().copied().max().unwrap_or(legacy_version);
    let version = match version {
        0x0304 => "13",
        0x0303 => "12",
        0x0302 => "11",
        0x0301 => "10",
        0x0300 => "s3",
        0x0200 => "s2",
        0x0100 => "s1",
        _ => "00",
    };
    let a = format!(
        "t{version}{}{:02}{:02}{}",
        if sni { 'd' } else { 'i' },
        ciphers.len().min(99),
        extensions.len().min(99),
        alpn_chars(alpn.as_deref()),
    );
    let mut sorted = ciphers;
    sorted.sort_unstable();
    let b = hash12(&hex_list(&sorted));
    let mut exts: Vec<u16> = extensions
        .into_iter()
        .filter(|e| *e != 0x0000 && *e != 0x0010)
        .collect();
    exts.sort_unstable();
    let c = if exts.is_empty() && sigalgs.is_empty() {
        "000000000000".to_string()
    } else if sigalgs.is_empty() {
        hash12(&hex_list(&exts))
    } else {
        hash12(&format!("{}_{}", hex_list(&exts), hex_list(&sigalgs)))
    };
    Some(format!("{a}_{b}_{c}"))
}

/// The first and last characters of the first ALPN value; of its hex
/// form when either is not alphanumeric; `00` without one.
fn alpn_chars(alpn: Option<&[u8]>) -> String {
    let Some(v) = alpn.filter(|v| !v.is_empty()) else {
        return "00".into();
    };
    let (first, last) = (v[0], v[v.len() - 1]);
    if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() {
        return format!("{}{}", first as char, last as char);
    }
    let hex = hex(v);
    let h = hex.as_bytes();
    format!("{}{}", h[0] as char, h[h.len() - 1] as char)
}

fn hex_list(v: &[u16]) -> String {
    v.iter()
        .map(|x| format!("{x:04x}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The first 12 hex digits of SHA-256; `000000000000` for an empty list.
fn hash12(s: &str) -> String {
    if s.is_empty() {
        return "000000000000".into();
    }
    hex(&digest::digest(&digest::SHA256, s.as_bytes()).as_ref()[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FoxIO's worked example (JA4.md): the sorted lists and their hashes.
    #[test]
    fn the_specs_vectors() {
        let ciphers = [
            0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013, 0xc014,
            0x009c, 0x009d, 0x002f, 0x0035,
        ];
        let mut sorted = ciphers.to_vec();
        sorted.sort_unstable();
        assert_eq!(hash12(&hex_list(&sorted)), "8daaf6152771");
        let exts = "0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01";
        let sigs = "0403,0804,0401,0503,0805,0501,0806,0601";
        assert_eq!(hash12(&format!("{exts}_{sigs}")), "e5627efa2ab1");
        assert_eq!(hash12(exts), "6d807ffa2a79");
    }

    /// Builds a ClientHello record from its parts.
    fn hello_record(ciphers: &[u16], extensions: &[(u16, Vec<u8>)], legacy: u16) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&legacy.to_be_bytes());
        body.extend_from_slice(&[7; 32]);
        body.push(32);
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&((ciphers.len() * 2) as u16).to_be_bytes());
        for c in ciphers {
            body.extend_from_slice(&c.to_be_bytes());
        }
        body.extend_from_slice(&[1, 0]);
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut msg = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
        msg.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1, (msg.len() >> 8) as u8, msg.len() as u8];
        rec.extend_from_slice(&msg);
        rec
    }

    fn list16(v: &[u16]) -> Vec<u8> {
        let mut out = ((v.len() * 2) as u16).to_be_bytes().to_vec();
        for x in v {
            out.extend_from_slice(&x.to_be_bytes());
        }
        out
    }

    /// The spec's example hello (with GREASE added, which must not count).
    fn example() -> Vec<u8> {
        let ciphers = [
            0x0a0a, 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013,
            0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
        ];
        let alpn = {
            let mut l = vec![2, b'h', b'2', 8];
            l.extend_from_slice(b"http/1.1");
            let mut v = (l.len() as u16).to_be_bytes().to_vec();
            v.extend_from_slice(&l);
            v
        };
        let sni = {
            let name = b"shop.test";
            let mut v = ((name.len() + 3) as u16).to_be_bytes().to_vec();
            v.push(0);
            v.extend_from_slice(&(name.len() as u16).to_be_bytes());
            v.extend_from_slice(name);
            v
        };
        let versions = vec![6, 0x3a, 0x3a, 0x03, 0x04, 0x03, 0x03];
        let sigs = list16(&[
            0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
        ]);
        let exts: Vec<(u16, Vec<u8>)> = vec![
            (0x2a2a, vec![]),
            (0x001b, vec![0]),
            (0x0000, sni),
            (0x0033, vec![0, 0]),
            (0x0010, alpn),
            (0x4469, vec![]),
            (0x0017, vec![]),
            (0x002d, vec![1, 1]),
            (0x000d, sigs),
            (0x0005, vec![1, 0, 0, 0, 0]),
            (0x0023, vec![]),
            (0x0012, vec![]),
            (0x002b, versions),
            (0xff01, vec![0]),
            (0x000b, vec![1, 0]),
            (0x000a, list16(&[0x001d])),
            (0x0015, vec![0; 4]),
        ];
        hello_record(&ciphers, &exts, 0x0303)
    }

    #[test]
    fn the_specs_example_hello() {
        let rec = example();
        let Hello::Complete(body) = hello(&rec) else {
            panic!("whole")
        };
        assert_eq!(
            fingerprint(&body).as_deref(),
            Some("t13d1516h2_8daaf6152771_e5627efa2ab1")
        );
    }

    #[test]
    fn no_sni_no_alpn_tls12_and_odd_alpn() {
        let rec = hello_record(&[0xc02f], &[(0x000d, list16(&[0x0401]))], 0x0303);
        let Hello::Complete(body) = hello(&rec) else {
            panic!()
        };
        let fp = fingerprint(&body).unwrap();
        assert!(fp.starts_with("t12i010100_"), "{fp}");
        assert_eq!(alpn_chars(Some(&[0xab, b'x', 0x01])), "a1");
        assert_eq!(alpn_chars(Some(b"http/1.1")), "h1");
        assert_eq!(alpn_chars(Some(b"")), "00");
        let rec = hello_record(&[], &[], 0x0301);
        let Hello::Complete(body) = hello(&rec) else {
            panic!()
        };
        assert_eq!(
            fingerprint(&body).as_deref(),
            Some("t10i000000_000000000000_000000000000")
        );
    }

    #[test]
    fn split_records_and_short_reads() {
        let rec = example();
        // The same message in two records.
        let msg = &rec[5..];
        let (x, y) = msg.split_at(100);
        let mut two = vec![22, 3, 1, 0, x.len() as u8];
        two.extend_from_slice(x);
        two.extend_from_slice(&[22, 3, 1, (y.len() >> 8) as u8, y.len() as u8]);
        two.extend_from_slice(y);
        let Hello::Complete(body) = hello(&two) else {
            panic!()
        };
        assert_eq!(
            fingerprint(&body).as_deref(),
            Some("t13d1516h2_8daaf6152771_e5627efa2ab1")
        );
        for cut in [0, 3, 5, 50, rec.len() - 1] {
            assert!(matches!(hello(&rec[..cut]), Hello::NeedMore), "{cut}");
        }
    }

    #[test]
    fn malformed_input_gives_no_fingerprint_and_no_panic() {
        assert!(matches!(hello(b"GET / HTTP/1.1\r\n\r\n"), Hello::Invalid));
        assert!(matches!(hello(&[22, 3, 1, 0, 0]), Hello::Invalid));
        assert!(matches!(
            hello(&[22, 3, 1, 0, 4, 2, 0, 0, 0]),
            Hello::Invalid
        ));
        let rec = example();
        let body = rec[9..].to_vec();
        // Every truncation and every single-byte corruption of the body.
        for cut in 0..body.len() {
            let _ = fingerprint(&body[..cut]);
        }
        for i in 0..body.len() {
            for v in [0x00, 0xff, 0x80] {
                let mut b = body.clone();
                b[i] = v;
                let _ = fingerprint(&b);
            }
        }
        // Pseudo-random bytes, as a cheap fuzz.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let n = (x % 300) as usize;
            let mut b = Vec::with_capacity(n);
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                b.push(x as u8);
            }
            let _ = fingerprint(&b);
            let mut rec = vec![22, 3, 1, (n >> 8) as u8, n as u8];
            rec.extend_from_slice(&b);
            let _ = hello(&rec);
        }
    }

    #[tokio::test]
    async fn read_hello_puts_every_byte_back() {
        let rec = example();
        let mut stream = &rec[..];
        let (bytes, fp) = read_hello(&mut stream, BytesMut::new()).await.unwrap();
        assert_eq!(&bytes[..], &rec[..]);
        assert_eq!(fp.as_deref(), Some("t13d1516h2_8daaf6152771_e5627efa2ab1"));
        let mut plain = &b"GET / HTTP/1.1\r\n"[..];
        let (bytes, fp) = read_hello(&mut plain, BytesMut::new()).await.unwrap();
        assert_eq!(&bytes[..], b"GET / HTTP/1.1\r\n");
        assert_eq!(fp, None);
        let mut short = &rec[..20];
        let (bytes, fp) = read_hello(&mut short, BytesMut::new()).await.unwrap();
        assert_eq!(bytes.len(), 20);
        assert_eq!(fp, None);
    }
}
