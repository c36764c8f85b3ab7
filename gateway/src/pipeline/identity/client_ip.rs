//! Client identity: which IP address a request is from, for rate limits,
//! logs and filters.
//!
//! The connection's address is the TCP peer, or the address in its PROXY
//! protocol header. When that address is one of the listener's
//! `trusted_proxies` (the ALB, a CDN), `x-forwarded-for` is read from the
//! right: every entry that is itself a trusted proxy is skipped and the
//! first untrusted one is the client. Entries further left were written by
//! the client or by hops we do not trust, so they cannot change the answer:
//! a spoofed `x-forwarded-for` from an untrusted peer is ignored entirely.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

use crate::headers::X_FORWARDED_FOR;

/// Whether `ip` is inside any of `trusted`. IPv4-mapped IPv6 addresses
/// (`::ffff:10.0.0.1`, what a dual-stack socket reports) count as IPv4.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|net| net.contains(&ip))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Resolves the client address of a request that arrived from `conn_ip`
/// (peer or PROXY address) with `headers`.
pub fn resolve(conn_ip: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let conn_ip = canonical(conn_ip);
    if trusted.is_empty() || !is_trusted(conn_ip, trusted) {
        return conn_ip;
    }
    // Several x-forwarded-for fields are one list, in order (RFC 9110
    // section 5.3); walk it from the right.
    let mut client = conn_ip;
    for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for entry in text.rsplit(',') {
            let Some(ip) = parse_entry(entry) else {
                // Garbage written by a hop we trusted the right of: stop at
                // the last address we could vouch for.
                return client;
            };
            client = canonical(ip);
            if !is_trusted(client, trusted) {
                return client;
            }
        }
    }
    client
}

/// One `x-forwarded-for` entry: an IP, optionally with a port
/// (`1.2.3.4:5678`, `[2001:db8::1]:443`), as some proxies write it.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    if let Ok(ip) = e.parse() {
        return Some(ip);
    }
    if let Some(rest) = e.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, _port) = e.rsplit_once(':')?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xffs: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xffs {
            h.append(&X_FORWARDED_FOR, v.parse().unwrap());
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn untrusted_peer_ignores_xff() {
        let t = nets(&["10.0.0.0/8"]);
        let ip = resolve("198.51.100.1".parse().unwrap(), &headers(&["1.1.1.1"]), &t);
        assert_eq!(ip, "198.51.100.1".parse::<IpAddr>().unwrap());
        // No trusted proxies at all: the peer, whatever the header says.
        let ip = resolve("10.1.1.1".parse().unwrap(), &headers(&["1.1.1.1"]), &[]);
        assert_eq!(ip, "10.1.1.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rightmost_untrusted_wins() {
        let t = nets(&["10.0.0.0/8", "192.168.0.0/16"]);
        let peer = "10.0.0.5".parse().unwrap();
        // The client spoofed 6.6.6.6; the ALB appended the real 203.0.113.9.
        let h = headers(&["6.6.6.6, 203.0.113.9, 192.168.1.1"]);
        assert_eq!(
            resolve(peer, &h, &t),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // The same list split over two fields.
        let h = headers(&["6.6.6.6", "203.0.113.9:5555, 192.168.1.1"]);
        assert_eq!(
            resolve(peer, &h, &t),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // Every hop trusted: the left-most one.
        let h = headers(&["10.9.9.9, 10.1.1.1"]);
        assert_eq!(resolve(peer, &h, &t), "10.9.9.9".parse::<IpAddr>().unwrap());
        // No header: the peer.
        assert_eq!(resolve(peer, &HeaderMap::new(), &t), peer);
        // Garbage stops the walk at the last trusted hop.
        let h = headers(&["1.2.3.4, bogus, 10.2.2.2"]);
        assert_eq!(resolve(peer, &h, &t), "10.2.2.2".parse::<IpAddr>().unwrap());
        // IPv6, bracketed with a port, and an IPv4-mapped peer.
        let h = headers(&["[2001:db8::7]:443"]);
        assert_eq!(
            resolve("::ffff:10.0.0.5".parse().unwrap(), &h, &t),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
    }
}
