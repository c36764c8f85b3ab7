//! The syntax of a request's authority (`Host`, an absolute-form target's
//! or HTTP/2's `:authority`). A leaf with no gateway imports: the fuzz
//! targets (fuzz/) build it as it is.

/// `host[:port]` as RFC 3986 allows it in `Host`, without userinfo: a
/// registered name (letters, digits, `-._~`), an IPv4 address or a
/// bracketed IPv6 address, and an optional decimal port. Stricter than
/// the RFC (no percent-encoding or sub-delims in names), as nginx is:
/// nothing a real host name needs is refused, and nothing that could be
/// read two ways by an origin or a cache gets through.
pub fn valid_authority(raw: &[u8]) -> bool {
    let (host, port) = if raw.first() == Some(&b'[') {
        let Some(end) = raw.iter().position(|&b| b == b']') else {
            return false;
        };
        // An IPv6 address, as `Ipv6Addr` reads it (no zone, no IPvFuture):
        // `[:::A::]` has only the right characters.
        let literal = std::str::from_utf8(&raw[1..end]).ok();
        if literal
            .and_then(|l| l.parse::<std::net::Ipv6Addr>().ok())
            .is_none()
        {
            return false;
        }
        (&raw[..=end], &raw[end + 1..])
    } else {
        let colon = raw.iter().position(|&b| b == b':').unwrap_or(raw.len());
        let host = &raw[..colon];
        if host.is_empty()
            || !host
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        {
            return false;
        }
        (host, &raw[colon..])
    };
    debug_assert!(!host.is_empty());
    match port.split_first() {
        None => true,
        Some((b':', digits)) => {
            !digits.is_empty() && digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit)
        }
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        for ok in [
            "shop.example",
            "Shop.Example:8443",
            "127.0.0.1",
            "[::1]:80",
            "[2001:db8::192.0.2.1]",
            "a_b-c~d.",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "a b",
            "evil.example/x?@probe",
            "user@shop.example",
            "shop.example:",
            "shop.example:8o",
            "shop.example:123456",
            "[::1",
            "[]",
            "[::1]x",
            "a%2eb",
            "a,b",
            // Found by fuzzing (fuzz/fuzz_targets/authority.rs): the
            // right characters, not an address.
            "[:::::::::::::A:A:A::]",
            "[1::2::3]",
            "[fe80::1%25eth0]",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad:?}");
        }
    }
}
