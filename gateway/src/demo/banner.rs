//! What `flashgate demo` prints: where things are, then for each
//! capability one command that shows it and what to look for in its
//! output. [`capabilities`] is the one list: a new capability is one entry
//! there, and the demo test (tests/tests/cli.rs) runs every entry's
//! command and checks its output contains the entry's `expect`.

use std::net::SocketAddr;

use super::{checkout, wasm};

/// Where the demo's parts listen, and the tokens it hands out.
pub struct Addrs {
    pub public: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub origin: SocketAddr,
    pub core: SocketAddr,
    /// The gateway's admin token.
    pub admin_token: String,
    /// Whether the Wasm filter is on the path.
    pub wasm: bool,
}

/// One capability: what it is, a shell command that shows it, and a
/// string its output contains. `command` is `None` when the capability is
/// off in this build; `expect` then says why and how to turn it on.
pub struct Capability {
    pub what: &'static str,
    pub command: Option<String>,
    pub expect: String,
}

fn cap(what: &'static str, command: String, expect: impl Into<String>) -> Capability {
    Capability {
        what,
        command: Some(command),
        expect: expect.into(),
    }
}

/// Every capability the demo shows, in the order the banner prints them
/// (and the test runs them: later entries may rely on earlier ones).
pub fn capabilities(a: &Addrs) -> Vec<Capability> {
    let (p, adm, tok) = (a.public, a.admin, &a.admin_token);
    let auth = format!("-H 'authorization: Bearer {tok}'");
    let mut caps = vec![
        cap(
            "reverse proxy with a native filter (security headers)",
            format!("curl -si http://{p}/products/1"),
            "x-frame-options: DENY",
        ),
        if a.wasm {
            cap(
                "Wasm filter on the catalog (wasm-plugins/add-headers, embedded)",
                format!("curl -si http://{p}/products/2"),
                format!("{}: {}", wasm::HEADER, wasm::HEADER_VALUE),
            )
        } else {
            Capability {
                what: "Wasm filter on the catalog (wasm-plugins/add-headers)",
                command: None,
                expect: wasm::missing_note(),
            }
        },
        cap(
            "cache: the second request is a hit",
            format!("curl -so /dev/null http://{p}/products/3; curl -si http://{p}/products/3"),
            "x-cache: HIT",
        ),
        cap(
            // Keys are `host/path?query`, the host without its port.
            "cache purge (admin token)",
            format!(
                "curl -s -X POST {auth} -d '{{\"key\": \"{}/products/3\"}}' http://{adm}/admin/cache/purge",
                p.ip()
            ),
            "\"l1\":1",
        ),
    ];
    if let Some(tls) = a.tls {
        caps.push(cap(
            "TLS with a self-signed certificate (h2 over ALPN)",
            format!(
                "curl -sk -o /dev/null -w '%{{scheme}} %{{http_code}}\\n' https://localhost:{}/products/1",
                tls.port()
            ),
            "HTTPS 200",
        ));
    }
    caps.extend([
        cap(
            "HTTP/2 cleartext (prior knowledge)",
            format!(
                "curl -s --http2-prior-knowledge -o /dev/null -w 'HTTP/%{{http_version}} %{{http_code}}\\n' http://{p}/products/1"
            ),
            "HTTP/2 200",
        ),
        cap(
            "the shop's drop page: its Buy button posts to the gateway's checkout (open it in a browser)",
            format!("curl -s http://{p}/drop/demo-sneaker"),
            "id=\"buy\"",
        ),
        cap(
            "waiting room on the drop: 5 visitors/s, 5 in at once for 20 s; cookie-less requests are new visitors, so the 7th waits (JSON here; a browser opened now gets the page and walks in by itself)",
            format!(
                "for i in $(seq 1 6); do curl -s -o /dev/null http://{p}/drop/demo-sneaker; done; \
                 curl -s -H 'accept: application/json' http://{p}/drop/demo-sneaker"
            ),
            "\"in_queue\":true",
        ),
        cap(
            "checkout through the gateway (JWT checked at the edge; in-process order core, NOT durable)",
            checkout::buy_command(p),
            "201 Created",
        ),
        cap(
            "the stock after it (order core admin)",
            checkout::stock_command(a.core),
            "\"stock\":99",
        ),
        cap(
            "one sneaker per buyer: a second order is refused",
            checkout::buy_again_command(p),
            "over_limit",
        ),
        cap(
            "rate limit on checkout: 20 at once per client IP, then 1/s (429, retry-after, RateLimit fields)",
            format!(
                "for i in $(seq 1 25); do curl -s -o /dev/null -w '%{{http_code}} ' -X POST http://{p}/checkout; done; echo; \
                 curl -si -X POST http://{p}/checkout | grep -i '^ratelimit'"
            ),
            "ratelimit-policy: \"per_ip\"",
        ),
        cap(
            "bot rule: a scripted user agent gets the proof-of-work challenge (JSON for API clients, a page for browsers)",
            format!(
                "curl -s -A 'python-requests/2.32' -H 'accept: application/json' http://{p}/products/1"
            ),
            "challenge_required",
        ),
        if a.wasm {
            cap(
                "overload drill: force load level 2; the Wasm filter degrade-recommendations answers /recommendations at the edge with a placeholder",
                format!(
                    "curl -s -X POST {auth} -d '{{\"level\": 2, \"for\": \"60s\"}}' http://{adm}/admin/load-level; \
                     curl -si 'http://{p}/recommendations?product=1'"
                ),
                format!("{}: 1", wasm::DEGRADED_HEADER),
            )
        } else {
            cap(
                "overload drill: force load level 2, recommendations degrade to the route's native fallback (with the wasm32-wasip1 target the Wasm filter degrade-recommendations does it)",
                format!(
                    "curl -s -X POST {auth} -d '{{\"level\": 2, \"for\": \"60s\"}}' http://{adm}/admin/load-level; \
                     curl -si 'http://{p}/recommendations?product=1'"
                ),
                "x-flashgate-degraded: fallback",
            )
        },
        cap(
            "end the drill",
            format!("curl -s -X POST {auth} -d '{{\"level\": null}}' http://{adm}/admin/load-level"),
            "\"forced\":null",
        ),
        cap(
            "status: load level, routes, upstream health, traffic",
            format!("curl -s http://{adm}/admin/status"),
            "\"load_level\"",
        ),
        cap(
            "Prometheus metrics",
            format!("curl -s http://{adm}/metrics | grep '^flashgate_requests_total'"),
            "flashgate_requests_total{route=\"catalog\"",
        ),
    ]);
    caps
}

/// The banner.
pub fn render(a: &Addrs) -> String {
    let (p, adm) = (a.public, a.admin);
    let mut out = format!(
        "flashgate demo is running (not durable: everything lives in this process)\n\
         \n  shop (open in a browser)  http://{p}/\n  \
         the drop page             http://{p}/drop/demo-sneaker\n  \
         live dashboard            http://{adm}/admin/ui\n  \
         a product (JSON)          http://{p}/products/1\n  \
         a product page (HTML)     http://{p}/shop/1\n  \
         slow recommendations      http://{p}/recommendations?product=1\n  \
         demo origin (direct)      http://{origin}/\n  \
         admin status              http://{adm}/admin/status\n  \
         metrics                   http://{adm}/metrics\n",
        origin = a.origin,
    );
    if let Some(tls) = a.tls {
        out.push_str(&format!(
            "  over TLS (self-signed)    https://localhost:{}/products/1  (curl -k)\n",
            tls.port()
        ));
    }
    out.push_str("\nWhat it does, one command each (`->`: what to look for in the answer):\n");
    for c in capabilities(a) {
        out.push_str(&format!("\n{}\n", c.what));
        match &c.command {
            Some(cmd) => out.push_str(&format!("  $ {cmd}\n  -> {}\n", c.expect)),
            None => out.push_str(&format!("  {}\n", c.expect)),
        }
    }
    out.push_str(&format!(
        "\nLoad it, then watch the dashboard (the load level rises and the recommendations degrade):\n  \
         wrk -t2 -c64 -d10s http://{p}/products/1\n  \
         wrk -t2 -c128 -d30s 'http://{p}/recommendations?product=1'\n\
         \nCtrl-C stops it."
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(wasm: bool) -> Addrs {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Addrs {
            public: a,
            tls: Some(a),
            admin: a,
            origin: a,
            core: a,
            admin_token: "t".into(),
            wasm,
        }
    }

    #[test]
    fn every_capability_has_a_command_or_says_how_to_get_it() {
        for wasm in [true, false] {
            for c in capabilities(&addrs(wasm)) {
                assert!(!c.expect.is_empty(), "{}", c.what);
                if c.command.is_none() {
                    assert!(c.expect.contains("rustup target add"), "{}", c.expect);
                }
            }
        }
        let banner = render(&addrs(false));
        assert!(
            banner.contains("rustup target add wasm32-wasip1"),
            "{banner}"
        );
    }
}
