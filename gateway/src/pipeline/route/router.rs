//! Route matching: host (exact, `*.suffix`, or any) plus path prefix.
//!
//! The longest matching path prefix wins; among routes with the same prefix
//! the most specific host wins (exact, then the longest wildcard suffix, then
//! any host). Prefixes match whole path segments: `/products` matches
//! `/products` and `/products/42` but not `/productsale`, so a new route can
//! never capture another's traffic by accident. Routes are sorted once when
//! config loads, so a lookup is a scan that stops at the first match.

/// How a route matches the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`: matches `a.example.com`,
    /// `a.b.example.com`, not `example.com`.
    Suffix(String),
}

impl HostMatch {
    pub fn parse(pattern: Option<&str>) -> HostMatch {
        match pattern {
            None => HostMatch::Any,
            Some(p) => match p.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
                None => HostMatch::Exact(p.to_ascii_lowercase()),
            },
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }

    /// Higher is more specific.
    fn specificity(&self) -> usize {
        match self {
            HostMatch::Any => 0,
            HostMatch::Suffix(s) => 1 + s.len(),
            HostMatch::Exact(_) => usize::MAX,
        }
    }
}

/// A routing table over values of type `T` (the gateway stores route indices).
#[derive(Debug, Clone)]
pub struct Router<T> {
    entries: Vec<(HostMatch, String, T)>,
}

impl<T> Router<T> {
    pub fn new(routes: impl IntoIterator<Item = (HostMatch, String, T)>) -> Self {
        let mut entries: Vec<_> = routes.into_iter().collect();
        entries.sort_by(|a, b| {
            b.1.len()
                .cmp(&a.1.len())
                .then(b.0.specificity().cmp(&a.0.specificity()))
        });
        Router { entries }
    }

    /// `host` without port; `path` without query.
    pub fn find(&self, host: &str, path: &str) -> Option<&T> {
        self.entries
            .iter()
            .find(|(h, prefix, _)| prefix_matches(prefix, path) && h.matches(host))
            .map(|(_, _, t)| t)
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (path.len() == prefix.len()
            || prefix.ends_with('/')
            || path.as_bytes()[prefix.len()] == b'/')
}

/// Resolves `.` and `..` segments (RFC 3986 section 5.2.4) so that routing
/// and the upstream see the same path: `/static/../admin` must not match the
/// `/static` route and then reach the upstream as a path the upstream
/// resolves to `/admin`. `None` means the path is refused (400): it climbs
/// above the root, or hides a dot segment behind percent-encoding, which an
/// upstream might decode after we routed.
pub fn normalize_path(path: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !path.starts_with('/') {
        // `*` (OPTIONS *): nothing to resolve.
        return Some(std::borrow::Cow::Borrowed(path));
    }
    let mut needs_work = false;
    for seg in path.split('/') {
        let lower = seg.to_ascii_lowercase();
        if lower.contains("%2e") && lower.replace("%2e", ".").chars().all(|c| c == '.') {
            return None;
        }
        if seg == "." || seg == ".." {
            needs_work = true;
        }
    }
    if !needs_work {
        return Some(std::borrow::Cow::Borrowed(path));
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop()?;
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    Some(std::borrow::Cow::Owned(format!("/{}", out.join("/"))))
}

/// The request's host without port, from the URI (HTTP/2, absolute-form) or
/// the `Host` header.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a http::HeaderMap) -> &'a str {
    let raw = uri
        .host()
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    strip_port(raw)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: keep the brackets, drop the port.
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router<&'static str> {
        Router::new([
            (HostMatch::Any, "/".to_string(), "default"),
            (HostMatch::Any, "/products".to_string(), "products"),
            (HostMatch::Any, "/products/special/".to_string(), "special"),
            (
                HostMatch::Exact("shop.example.com".into()),
                "/products".to_string(),
                "shop-products",
            ),
            (
                HostMatch::parse(Some("*.example.com")),
                "/products".to_string(),
                "wild-products",
            ),
            (
                HostMatch::parse(Some("*.eu.example.com")),
                "/products".to_string(),
                "eu-products",
            ),
            (
                HostMatch::Exact("api.example.com".into()),
                "/v1".to_string(),
                "api",
            ),
        ])
    }

    #[test]
    fn longest_prefix_wins() {
        let r = router();
        assert_eq!(r.find("x.org", "/"), Some(&"default"));
        assert_eq!(r.find("x.org", "/products"), Some(&"products"));
        assert_eq!(r.find("x.org", "/products/1"), Some(&"products"));
        assert_eq!(r.find("x.org", "/products/special/1"), Some(&"special"));
        assert_eq!(r.find("x.org", "/products/special"), Some(&"products"));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let r = router();
        assert_eq!(r.find("x.org", "/productsale"), Some(&"default"));
        assert_eq!(r.find("api.example.com", "/v10"), Some(&"default"));
        assert_eq!(r.find("api.example.com", "/v1/x"), Some(&"api"));
    }

    #[test]
    fn host_specificity_breaks_ties() {
        let r = router();
        assert_eq!(
            r.find("shop.example.com", "/products/1"),
            Some(&"shop-products")
        );
        assert_eq!(
            r.find("SHOP.Example.com", "/products/1"),
            Some(&"shop-products")
        );
        assert_eq!(r.find("m.example.com", "/products"), Some(&"wild-products"));
        assert_eq!(
            r.find("de.eu.example.com", "/products"),
            Some(&"eu-products")
        );
        // The bare domain is not matched by its wildcard.
        assert_eq!(r.find("example.com", "/products"), Some(&"products"));
    }

    #[test]
    fn no_match() {
        let r: Router<u8> = Router::new([(HostMatch::Exact("a.com".into()), "/x".to_string(), 1)]);
        assert_eq!(r.find("b.com", "/x"), None);
        assert_eq!(r.find("a.com", "/y"), None);
    }

    #[test]
    fn dot_segments() {
        let n = |p| normalize_path(p).map(|c| c.into_owned());
        assert_eq!(n("/a/b"), Some("/a/b".into()));
        assert_eq!(n("/static/../admin"), Some("/admin".into()));
        assert_eq!(n("/a/./b/."), Some("/a/b/".into()));
        assert_eq!(n("/a/b/.."), Some("/a/".into()));
        assert_eq!(n("/a/.hidden/..x"), Some("/a/.hidden/..x".into()));
        assert_eq!(n("/.."), None);
        assert_eq!(n("/a/../../b"), None);
        assert_eq!(n("/a/%2e%2e/b"), None);
        assert_eq!(n("/a/.%2E/b"), None);
        assert_eq!(n("/a/%2e"), None);
        assert_eq!(n("/a/%2ex"), Some("/a/%2ex".into()));
        assert_eq!(n("*"), Some("*".into()));
    }

    #[test]
    fn host_extraction() {
        let req = http::Request::builder()
            .uri("/p")
            .header("host", "Shop.com:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(req.uri(), req.headers()), "Shop.com");
        let req = http::Request::builder()
            .uri("http://h2.example:443/p")
            .body(())
            .unwrap();
        assert_eq!(request_host(req.uri(), req.headers()), "h2.example");
        let req = http::Request::builder()
            .uri("/p")
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        assert_eq!(request_host(req.uri(), req.headers()), "[::1]");
    }
}
