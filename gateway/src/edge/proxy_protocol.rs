//! The PROXY protocol (HAProxy's, v1 text and v2 binary), which a Network
//! Load Balancer puts in front of every connection to tell us the client's
//! address.
//!
//! Our own parser rather than a crate: it is small, works on a byte slice
//! with no allocation and no panics on any input (every length is checked
//! before it is used, see the fuzz-style test below), and reports
//! "incomplete" separately from "invalid" so the reader knows whether to
//! wait for more bytes. v2 TLVs are skipped as a block, never interpreted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the spec's limit).
const V1_MAX: usize = 107;

/// Why a connection's PROXY header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("invalid PROXY protocol v1 header: {0}")]
    V1(&'static str),
    #[error("invalid PROXY protocol v2 header: {0}")]
    V2(&'static str),
    #[error("the connection closed before its PROXY protocol header was complete")]
    Closed,
    #[error("reading the PROXY protocol header failed: {0}")]
    Io(String),
}

/// The result of parsing the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid prefix: more bytes are needed.
    Incomplete,
    /// A whole header of `len` bytes. `source` is the client's address, or
    /// `None` for `LOCAL` / `UNKNOWN` (health checks from the balancer
    /// itself), where the connection's own peer address stands.
    Done {
        len: usize,
        source: Option<SocketAddr>,
    },
}

/// Parses a PROXY header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(Parsed::Incomplete)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return if n < 6 {
            Ok(Parsed::Incomplete)
        } else {
            parse_v1(buf)
        };
    }
    Err(ProxyHeaderError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::V1("no CRLF within 107 bytes"))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| ProxyHeaderError::V1("not ASCII"))?;
    let len = end + 2;
    let mut parts = line.split(' ');
    let proto = parts.next().unwrap_or("");
    if proto == "UNKNOWN" {
        // The rest of the line is to be ignored (spec 2.1).
        return Ok(Parsed::Done { len, source: None });
    }
    let (src, dst, sport, dport) = match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some(a), Some(b), Some(c), Some(d), None) => (a, b, c, d),
        _ => return Err(ProxyHeaderError::V1("expected 5 fields after PROXY")),
    };
    // Both addresses must be of the announced family, both ports valid:
    // a header that is wrong anywhere is not trusted anywhere.
    let addr = |a: &str| -> Result<IpAddr, ProxyHeaderError> {
        match proto {
            "TCP4" => a
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| ProxyHeaderError::V1("bad IPv4 address")),
            "TCP6" => a
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| ProxyHeaderError::V1("bad IPv6 address")),
            _ => Err(ProxyHeaderError::V1(
                "protocol must be TCP4, TCP6 or UNKNOWN",
            )),
        }
    };
    // Ports are decimal without leading zeros or signs.
    let parse_port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|_| !p.starts_with(['0', '+']) || p == "0")
            .ok_or(ProxyHeaderError::V1("bad port"))
    };
    let ip = addr(src)?;
    addr(dst)?;
    let port = parse_port(sport)?;
    parse_port(dport)?;
    Ok(Parsed::Done {
        len,
        source: Some(SocketAddr::new(ip, port)),
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let Some(head) = buf.get(..16) else {
        return Ok(Parsed::Incomplete);
    };
    let version = head[12] >> 4;
    let command = head[12] & 0x0f;
    if version != 2 {
        return Err(ProxyHeaderError::V2("version must be 2"));
    }
    let family = head[13];
    let body_len = u16::from_be_bytes([head[14], head[15]]) as usize;
    let len = 16 + body_len;
    let Some(body) = buf.get(16..len) else {
        return Ok(Parsed::Incomplete);
    };
    match command {
        // LOCAL: the balancer's own connection (health check). Address
        // block and TLVs are skipped.
        0 => return Ok(Parsed::Done { len, source: None }),
        1 => {}
        _ => return Err(ProxyHeaderError::V2("command must be LOCAL or PROXY")),
    }
    // The address block comes first; anything after it is TLVs, which we
    // skip whole: `len` already covers them.
    let source = match family {
        // TCP or UDP over IPv4: src(4) dst(4) sport(2) dport(2)
        0x11 | 0x12 => {
            let a = body
                .get(..12)
                .ok_or(ProxyHeaderError::V2("IPv4 address block too short"))?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
        }
        // TCP or UDP over IPv6: src(16) dst(16) sport(2) dport(2)
        0x21 | 0x22 => {
            let a = body
                .get(..36)
                .ok_or(ProxyHeaderError::V2("IPv6 address block too short"))?;
            let mut src = [0u8; 16];
            src.copy_from_slice(&a[..16]);
            Some(SocketAddr::new(
                Ipv6Addr::from(src).into(),
                u16::from_be_bytes([a[32], a[33]]),
            ))
        }
        // AF_UNSPEC and unix sockets carry no IP address: keep the peer.
        0x00 | 0x31 | 0x32 => None,
        _ => return Err(ProxyHeaderError::V2("unknown address family")),
    };
    Ok(Parsed::Done { len, source })
}

/// Reads a PROXY header from the start of `io`. Returns the client address
/// it names (`None`: keep the peer address) and the bytes read past the
/// header, which belong to the next protocol (TLS or HTTP). The caller
/// bounds the time this may take.
pub async fn read_header<S: AsyncRead + Unpin>(
    io: &mut S,
) -> Result<(Option<SocketAddr>, Bytes), ProxyHeaderError> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        let n = io
            .read_buf(&mut buf)
            .await
            .map_err(|e| ProxyHeaderError::Io(e.to_string()))?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        if let Parsed::Done { len, source } = parse(&buf)? {
            let rest = buf.split_off(len);
            return Ok((source, rest.freeze()));
        }
        // A v2 header announces its length; make room for it at once.
        if buf.len() >= 16 && buf[..12] == V2_SIGNATURE[..] {
            let want = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
            buf.reserve(want.saturating_sub(buf.len()));
        } else {
            buf.reserve(256);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Done {
                len: 43,
                source: Some("203.0.113.7:51234".parse().unwrap())
            })
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Done {
                len: h.len(),
                source: Some("[2001:db8::1]:1".parse().unwrap())
            })
        );
        let h = b"PROXY UNKNOWN whatever\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Done {
                len: h.len(),
                source: None
            })
        );
    }

    #[test]
    fn v1_refusals() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 nope 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 x\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(parse(&long).is_err());
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PROXY TCP4 1.2"), Ok(Parsed::Incomplete));
    }

    #[test]
    fn v2_proxy_local_and_tlvs() {
        let mut body = vec![192, 0, 2, 9, 10, 0, 0, 1];
        body.extend_from_slice(&4000u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        // A TLV (type 0xEA: AWS VPC endpoint id) that must be skipped.
        body.extend_from_slice(&[0xEA, 0, 3, b'v', b'p', b'c']);
        let h = v2(1, 0x11, &body);
        assert_eq!(
            parse(&h),
            Ok(Parsed::Done {
                len: h.len(),
                source: Some("192.0.2.9:4000".parse().unwrap())
            })
        );
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(Parsed::Incomplete), "cut {cut}");
        }
        let local = v2(0, 0x00, &[]);
        assert_eq!(
            parse(&local),
            Ok(Parsed::Done {
                len: 16,
                source: None
            })
        );
        let mut six = vec![0u8; 36];
        six[15] = 1;
        six[32..34].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &six)),
            Ok(Parsed::Done {
                len: 52,
                source: Some("[::1]:7".parse().unwrap())
            })
        );
        assert!(parse(&v2(1, 0x11, &[1, 2, 3])).is_err());
        assert!(parse(&v2(1, 0x44, &[0; 12])).is_err());
        assert!(parse(&v2(2, 0x11, &[0; 12])).is_err());
        let mut v3 = v2(1, 0x11, &[0; 12]);
        v3[12] = 0x31;
        assert!(parse(&v3).is_err());
    }

    /// Arbitrary bytes never panic, and a `Done` length is within the input.
    #[test]
    fn random_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let seeds: [&[u8]; 3] = [V2_SIGNATURE, b"PROXY TCP4 ", b"PROXY "];
        for i in 0..50_000 {
            let mut buf = seeds[i % 3].to_vec();
            let extra = rng.gen_range(0..140);
            buf.extend((0..extra).map(|_| rng.gen::<u8>()));
            if let Ok(Parsed::Done { len, .. }) = parse(&buf) {
                assert!(len <= buf.len());
            }
        }
    }
}
