//! Raw TCP clients for what real HTTP clients refuse to send: PROXY
//! protocol headers, malformed and ambiguous requests, slow clients.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `bytes` and reads until the server closes (or 30 s pass).
/// Returns what came back, lossily as text.
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    read_to_close(&mut s, Duration::from_secs(30)).await
}

/// Reads until EOF, a reset, or `within` passes.
pub async fn read_to_close(s: &mut TcpStream, within: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server closed `s` within `within` (EOF or reset), reading
/// and discarding anything it sent first.
pub async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The status code of the first response in `text`, if any.
pub fn status(text: &str) -> Option<u16> {
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// The JSON body of the first response in `text` (after the blank line).
pub fn json_body(text: &str) -> serde_json::Value {
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A PROXY protocol v2 header (PROXY command, TCP over IPv4) from `src`
/// to `dst`, with `tlvs` appended to the address block.
pub fn proxy_v2_ipv4(src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("IPv4 addresses expected");
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21);
    h.push(0x11);
    h.extend_from_slice(&((12 + tlvs.len()) as u16).to_be_bytes());
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h.extend_from_slice(tlvs);
    h
}

/// Reads one HTTP/1.1 response with a `content-length` body from a
/// keep-alive connection (plain or TLS), head byte by byte so that
/// nothing after it is consumed, leaving the connection open. `None` when
/// the server closed first or nothing complete came within `within`.
pub async fn read_response<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> Option<String> {
    tokio::time::timeout(within, async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.ok()?);
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let len = text
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.ok()?;
        Some(text + &String::from_utf8_lossy(&body))
    })
    .await
    .ok()?
}
