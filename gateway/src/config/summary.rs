//! The one line `flashgate check` prints for a valid file: what it sets
//! up, so an operator sees at a glance that the file means what they think
//! (the listeners and their addresses, the routes, the filters, and how
//! many of the rest: rate-limited routes and which limits, bot rules and
//! their actions).

use super::Config;

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl Config {
    /// `2 listeners (public 0.0.0.0:8080, public-tls 0.0.0.0:8443 TLS);
    /// 5 routes (...); 2 filters (...); 3 upstreams with 6 endpoints, ...`
    pub fn summary(&self) -> String {
        let listeners: Vec<String> = self
            .listeners
            .iter()
            .map(|l| {
                let tls = if l.tls.is_some() { " TLS" } else { "" };
                format!("{} {}{tls}", l.name, l.listen)
            })
            .collect();
        let routes: Vec<String> = self.routes.iter().map(|r| r.display_name()).collect();
        let filters: Vec<String> = self
            .filters
            .iter()
            .map(|f| match (&f.native, &f.wasm) {
                (Some(kind), _) => format!("{} native {kind}", f.name),
                (None, Some(_)) => format!("{} wasm", f.name),
                (None, None) => f.name.clone(),
            })
            .collect();
        let endpoints: usize = self.upstreams.iter().map(|u| u.endpoints.len()).sum();
        let count =
            |pred: fn(&super::RouteConfig) -> bool| self.routes.iter().filter(|r| pred(r)).count();
        let mut rest = vec![format!(
            "{} with {}",
            plural(self.upstreams.len(), "upstream", "upstreams"),
            plural(endpoints, "endpoint", "endpoints")
        )];
        rest.push(plural(
            count(|r| r.cache.is_some()),
            "cached route",
            "cached routes",
        ));
        rest.push(plural(
            count(|r| r.checkout.is_some()),
            "checkout route",
            "checkout routes",
        ));
        rest.push(plural(
            count(|r| r.websocket),
            "WebSocket route",
            "WebSocket routes",
        ));
        let limited: Vec<String> = self
            .routes
            .iter()
            .filter_map(|r| Some((r.display_name(), r.rate_limit.as_ref()?)))
            .map(|(name, l)| {
                let kinds: Vec<&str> = [
                    ("per_ip", l.per_ip.is_some()),
                    ("per_user", l.per_user.is_some()),
                    ("per_header", l.per_header.is_some()),
                    ("hot", l.hot.is_some()),
                    ("route", l.route.is_some()),
                ]
                .into_iter()
                .filter_map(|(k, on)| on.then_some(k))
                .collect();
                let fleet = if l.scope == super::Scope::Fleet {
                    " fleet"
                } else {
                    ""
                };
                format!("{name} {}{fleet}", kinds.join("+"))
            })
            .collect();
        rest.push(if limited.is_empty() {
            "no rate limits".into()
        } else {
            format!(
                "{} ({})",
                plural(limited.len(), "rate-limited route", "rate-limited routes"),
                limited.join(", ")
            )
        });
        if !self.bot_rules.is_empty() {
            let rules: Vec<String> = self
                .bot_rules
                .iter()
                .map(|b| format!("{} {}", b.name, b.action.as_str()))
                .collect();
            rest.push(format!(
                "{} ({})",
                plural(self.bot_rules.len(), "bot rule", "bot rules"),
                rules.join(", ")
            ));
        }
        rest.push(match &self.redis {
            Some(r) if !r.cluster.is_empty() => {
                format!("Redis Cluster L2 ({} seeds)", r.cluster.len())
            }
            Some(_) => "Redis L2".into(),
            None => "no Redis L2".into(),
        });
        if let Some(j) = &self.jwt {
            rest.push(format!("JWT {}", j.algorithm));
        }
        if !self.waiting_rooms.is_empty() {
            let names: Vec<&str> = self.waiting_rooms.iter().map(|w| w.name.as_str()).collect();
            rest.push(format!(
                "{} ({})",
                plural(self.waiting_rooms.len(), "waiting room", "waiting rooms"),
                names.join(", ")
            ));
        }
        rest.push(if self.overload.enabled {
            "overload protection on".into()
        } else {
            "overload protection off".into()
        });
        if self.tracing.is_some() {
            rest.push("OTLP tracing".into());
        }
        rest.push(format!("admin {}", self.admin.listen));
        format!(
            "{} ({}); {} ({}); {} ({}); {}",
            plural(self.listeners.len(), "listener", "listeners"),
            listeners.join(", "),
            plural(self.routes.len(), "route", "routes"),
            routes.join(", "),
            plural(self.filters.len(), "filter", "filters"),
            filters.join(", "),
            rest.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_demo_config_in_one_line() {
        let c = crate::config::Config::parse(include_str!("../../../config/demo.toml")).unwrap();
        let s = c.summary();
        assert!(!s.contains('\n'), "{s}");
        assert!(s.starts_with("1 listener (public 127.0.0.1:8080); 6 routes (recommendations, catalog, product-pages, storefront, drop, checkout); 1 filter (security-headers native headers); 2 upstreams with 2 endpoints"), "{s}");
        for part in [
            "2 cached routes",
            "1 checkout route",
            "1 rate-limited route (checkout per_ip)",
            "1 bot rule (scrapers challenge)",
            "no Redis L2",
            "JWT HS256",
            "overload protection on",
            "admin 127.0.0.1:9901",
        ] {
            assert!(s.contains(part), "{part} in {s}");
        }
    }
}
