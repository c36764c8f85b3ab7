//! Rate limits end to end: the gateway on loopback, real HTTP, a real
//! redis-server and a real Redis Cluster for fleet limits. Every limit
//! here is "burst N, 1 per minute": exactly N pass, whatever the machine's
//! speed, so counts are asserted exactly and nothing depends on timing.

use std::net::SocketAddr;
use std::time::Duration;

use flashgate_tests::redis::{RedisCluster, RedisServer};
use flashgate_tests::{
    edge, empty, full, gateway, metric, send, wait_until, Cfg, Gateway, Got, Upstream,
};
use http::Request;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

const SECRET: &str = "rate-limit-test-secret-0123";

fn token(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(req.body(empty()).unwrap()).await
}

/// The statuses of `n` requests, in order.
async fn statuses(addr: SocketAddr, path: &str, headers: &[(&str, &str)], n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(get_with(addr, path, headers).await.status);
    }
    out
}

fn count(s: &[u16], status: u16) -> usize {
    s.iter().filter(|x| **x == status).count()
}

/// One item of a structured-field list (RFC 8941): a string with its
/// integer parameters, as the RateLimit fields use them.
#[derive(Debug, PartialEq)]
struct Item {
    name: String,
    params: Vec<(String, i64)>,
}

impl Item {
    fn param(&self, key: &str) -> i64 {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no {key} in {self:?}"))
            .1
    }
}

/// A small parser of sf-lists whose members are sf-strings with
/// sf-integer parameters (`"a";q=1;w=2, "b";r=0`); panics on anything
/// else, which is what the test wants.
fn parse_list(field: &str) -> Vec<Item> {
    let mut items = Vec::new();
    let mut rest = field.trim_start_matches(' ');
    loop {
        let s = rest.strip_prefix('"').expect("an sf-string");
        let end = s.find('"').expect("a closed string");
        let name = &s[..end];
        assert!(
            name.chars().all(|c| (' '..='~').contains(&c) && c != '\\'),
            "{name:?}"
        );
        rest = &s[end + 1..];
        let mut params = Vec::new();
        while let Some(p) = rest.strip_prefix(';') {
            let key_end = p.find('=').expect("key=value");
            let key = &p[..key_end];
            assert!(key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.*".contains(c)));
            let v = &p[key_end + 1..];
            let v_end = v.find([';', ',']).unwrap_or(v.len());
            let value: i64 = v[..v_end].parse().expect("an sf-integer");
            params.push((key.to_string(), value));
            rest = &v[v_end..];
        }
        items.push(Item {
            name: name.into(),
            params,
        });
        match rest.strip_prefix(',') {
            Some(r) => rest = r.trim_start_matches(' '),
            None => {
                assert!(rest.is_empty(), "trailing {rest:?}");
                return items;
            }
        }
    }
}

#[tokio::test]
async fn per_ip_with_and_without_trusted_forwarded_for() {
    let up = Upstream::fixed("ok").await;
    let route = "rate_limit = { per_ip = { rate = \"1/m\", burst = 3 } }";
    // The peer (127.0.0.1) is not a trusted proxy: its x-forwarded-for is
    // ignored, so a spoofed header gets no new budget.
    let gw = gateway(&edge::config(up.addr, "", route)).await;
    let addr = gw.addr("public").unwrap();
    assert_eq!(statuses(addr, "/", &[], 4).await, [200, 200, 200, 429]);
    let spoofed = statuses(addr, "/", &[("x-forwarded-for", "203.0.113.9")], 3).await;
    assert_eq!(spoofed, [429, 429, 429]);
    let admin = gw.admin_addr();
    assert_eq!(
        metric(
            admin,
            "flashgate_rate_limit_decisions_total{limit=\"per_ip\",outcome=\"limited\",route=\"default\"}"
        )
        .await,
        4.0
    );

    // Behind a trusted proxy each forwarded client has its own budget.
    let gw = gateway(&edge::config(
        up.addr,
        "trusted_proxies = [\"127.0.0.1/32\"]",
        route,
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    let a = [("x-forwarded-for", "203.0.113.1")];
    let b = [("x-forwarded-for", "203.0.113.2")];
    assert_eq!(statuses(addr, "/", &a, 4).await, [200, 200, 200, 429]);
    assert_eq!(statuses(addr, "/", &b, 4).await, [200, 200, 200, 429]);
}

#[tokio::test]
async fn per_user_with_a_verified_jwt() {
    let up = Upstream::fixed("ok").await;
    let text = Cfg::new(&[up.addr])
        .route("rate_limit = { per_user = { rate = \"1/m\", burst = 2 } }")
        .section(format!(
            "[jwt]\nalgorithm = \"HS256\"\nsecret = \"{SECRET}\""
        ))
        .build();
    let gw = gateway(&text).await;
    let addr = gw.addr("public").unwrap();
    let alice = format!("Bearer {}", token("alice"));
    let bob = format!("Bearer {}", token("bob"));
    let a = [("authorization", alice.as_str())];
    assert_eq!(statuses(addr, "/", &a, 3).await, [200, 200, 429]);
    assert_eq!(
        statuses(addr, "/", &[("authorization", bob.as_str())], 2).await,
        [200, 200]
    );
    // No verified subject, no per-user limit (a forged user header or a
    // bad token is not a subject either).
    assert_eq!(count(&statuses(addr, "/", &[], 5).await, 200), 5);
    let forged = [("x-user-id", "alice"), ("authorization", "Bearer nope")];
    assert_eq!(count(&statuses(addr, "/", &forged, 3).await, 200), 3);
}

#[tokio::test]
async fn refusals_carry_retry_after_and_ratelimit_fields() {
    let up = Upstream::fixed("ok").await;
    let gw = gateway(&edge::config(
        up.addr,
        "",
        "rate_limit = { per_ip = \"1/m\", burst = 2 }",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    let ok = get_with(addr, "/", &[]).await;
    assert_eq!(ok.status, 200);
    assert!(
        ok.header("ratelimit").is_none(),
        "allowed answers carry none"
    );
    get_with(addr, "/", &[]).await;
    let refused = get_with(addr, "/", &[]).await;
    assert_eq!(refused.status, 429);
    assert_eq!(up.hits(), 2, "a refused request never reaches the upstream");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let policy = parse_list(refused.header("ratelimit-policy").unwrap());
    assert_eq!(policy.len(), 1);
    assert_eq!(policy[0].name, "per_ip");
    assert_eq!(policy[0].param("q"), 2);
    assert_eq!(policy[0].param("w"), 120);
    let now = parse_list(refused.header("ratelimit").unwrap());
    assert_eq!(now[0].name, "per_ip");
    assert_eq!(now[0].param("r"), 0);
    assert_eq!(now[0].param("t"), retry as i64);
    let body = refused.json();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert_eq!(refused.header("x-flashgate-error"), Some("rate_limited"));
}

#[tokio::test]
async fn headers_always_puts_the_fields_on_allowed_answers() {
    let up = Upstream::fixed("ok").await;
    // Two limits: the answer names the one with the fewest cells left.
    let gw = gateway(&edge::config(
        up.addr,
        "",
        "rate_limit = { per_ip = { rate = \"1/m\", burst = 3 }, route = { rate = \"1/m\", burst = 10 }, headers = \"always\" }",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    for left in [2, 1, 0] {
        let ok = get_with(addr, "/", &[("x-request-id", "allowed-1")]).await;
        assert_eq!(ok.status, 200);
        let policy = parse_list(ok.header("ratelimit-policy").expect("on an allowed answer"));
        assert_eq!(policy.len(), 1);
        assert_eq!(policy[0].name, "per_ip");
        assert_eq!(policy[0].param("q"), 3);
        let now = parse_list(ok.header("ratelimit").unwrap());
        assert_eq!(now[0].name, "per_ip");
        assert_eq!(now[0].param("r"), left);
        // The spent cells come back one a minute.
        let t = now[0].param("t");
        assert!((1..=180).contains(&t), "{t}");
    }
    let refused = get_with(addr, "/", &[("x-request-id", "refused-1")]).await;
    assert_eq!(refused.status, 429);
    assert_eq!(
        parse_list(refused.header("ratelimit").unwrap())[0].param("r"),
        0
    );
    assert_eq!(refused.header("x-request-id"), Some("refused-1"));
    assert_eq!(refused.json()["request_id"], "refused-1");

    // Without `headers`, allowed answers stay bare.
    let gw = gateway(&edge::config(
        up.addr,
        "",
        "rate_limit = { per_ip = { rate = \"1/m\", burst = 3 }, headers = \"limited\" }",
    ))
    .await;
    let ok = get_with(gw.addr("public").unwrap(), "/", &[]).await;
    assert_eq!(ok.status, 200);
    assert!(ok.header("ratelimit").is_none());
}

#[tokio::test]
async fn per_header_and_route_budgets() {
    let up = Upstream::fixed("ok").await;
    let gw = gateway(&edge::config(
        up.addr,
        "",
        "rate_limit = { per_header = { header = \"x-api-key\", rate = \"1/m\", burst = 2 }, route = { rate = \"1/m\", burst = 5 } }",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    let k1 = [("x-api-key", "k1")];
    assert_eq!(statuses(addr, "/", &k1, 3).await, [200, 200, 429]);
    // Another key has its own two; the route's five are spent after them.
    let k2 = [("x-api-key", "k2")];
    assert_eq!(statuses(addr, "/", &k2, 2).await, [200, 200]);
    // Without the header only the route's budget applies: 1 left.
    assert_eq!(statuses(addr, "/", &[], 2).await, [200, 429]);
    let refused = get_with(addr, "/", &[]).await;
    assert_eq!(
        parse_list(refused.header("ratelimit").unwrap())[0].name,
        "route"
    );
}

#[tokio::test]
async fn a_random_ip_flood_keeps_tracked_keys_at_the_cap() {
    let up = Upstream::fixed("ok").await;
    let mut text = edge::config(
        up.addr,
        "trusted_proxies = [\"127.0.0.1/32\"]",
        "rate_limit = { per_ip = { rate = \"1/m\", burst = 1 } }",
    );
    text.push_str("[rate_limit]\nmax_keys = 50\nsweep_interval = \"100ms\"\n");
    let gw = gateway(&text).await;
    let addr = gw.addr("public").unwrap();
    let mut passed = 0;
    for i in 0..300u32 {
        let ip = format!("198.18.{}.{}", i / 250, i % 250 + 1);
        if get_with(addr, "/", &[("x-forwarded-for", &ip)])
            .await
            .status
            == 200
        {
            passed += 1;
        }
    }
    // 50 tracked keys with one request each, and one overflow budget of
    // one request shared by the 250 keys beyond the cap.
    assert_eq!(passed, 51);
    let admin = gw.admin_addr();
    wait_until(
        Duration::from_secs(10),
        "the sweep counts the keys",
        || async { metric(admin, "flashgate_rate_limit_keys ").await == 50.0 },
    )
    .await;
    // A tracked client keeps its own (spent) budget.
    let first = [("x-forwarded-for", "198.18.0.1")];
    assert_eq!(get_with(addr, "/", &first).await.status, 429);
}

#[tokio::test]
async fn a_hot_item_is_limited_while_others_pass() {
    let up = Upstream::fixed("ok").await;
    let gw = gateway(&edge::config(
        up.addr,
        "",
        "rate_limit = { hot = { path_segment = 1, rate = \"1/m\", burst = 2, overrides = { vip = { rate = \"1/m\", burst = 4 } } } }",
    ))
    .await;
    let addr = gw.addr("public").unwrap();
    assert_eq!(statuses(addr, "/items/hot", &[], 3).await, [200, 200, 429]);
    assert_eq!(statuses(addr, "/items/cold", &[], 2).await, [200, 200]);
    assert_eq!(
        statuses(addr, "/items/vip", &[], 5).await,
        [200, 200, 200, 200, 429]
    );
    // No value, no hot limit.
    assert_eq!(statuses(addr, "/", &[], 3).await, [200, 200, 200]);
}

#[tokio::test]
async fn a_hot_sku_in_the_checkout_body() {
    let up = Upstream::fixed("{}").await;
    let text = Cfg::new(&[up.addr])
        .route("priority = \"critical\"\ncheckout = {}")
        .route("rate_limit = { hot = { body_field = \"sku\", rate = \"1/m\", burst = 2 } }")
        .section(format!(
            "[jwt]\nalgorithm = \"HS256\"\nsecret = \"{SECRET}\""
        ))
        .build();
    let gw = gateway(&text).await;
    let addr = gw.addr("public").unwrap();
    let auth = format!("Bearer {}", token("buyer"));
    let buy = |sku: &'static str| {
        let auth = auth.clone();
        async move {
            send(
                Request::post(format!("http://{addr}/checkout"))
                    .header("authorization", auth)
                    .header("content-type", "application/json")
                    .body(full(format!("{{\"sku\":\"{sku}\",\"qty\":1}}")))
                    .unwrap(),
            )
            .await
            .status
        }
    };
    assert_eq!(
        [buy("A").await, buy("A").await, buy("A").await],
        [200, 200, 429]
    );
    assert_eq!(buy("B").await, 200);
}

async fn two_gateways(
    redis_section: &str,
    route: &str,
    extra: &str,
) -> (Upstream, Gateway, Gateway) {
    let up = Upstream::fixed("ok").await;
    let text = Cfg::new(&[up.addr])
        .route(route)
        .section(redis_section)
        .section(extra)
        .build();
    let a = gateway(&text).await;
    let b = gateway(&text).await;
    (up, a, b)
}

/// Alternates `n` requests between the two gateways; the 200s.
async fn alternate(a: &Gateway, b: &Gateway, n: usize) -> usize {
    let mut passed = 0;
    for i in 0..n {
        let g = if i % 2 == 0 { a } else { b };
        if get_with(g.addr("public").unwrap(), "/", &[]).await.status == 200 {
            passed += 1;
        }
    }
    passed
}

const FLEET_ROUTE: &str =
    "rate_limit = { route = { rate = \"1/m\", burst = 6 }, per_ip = { rate = \"1/m\", burst = 100 }, scope = \"fleet\" }";

#[tokio::test]
async fn two_gateways_share_a_fleet_limit() {
    let redis = RedisServer::start();
    let section = format!("[redis]\nurl = \"{}\"", redis.url());
    let (_up, a, b) = two_gateways(&section, FLEET_ROUTE, "").await;
    // Six for the fleet, not six each: one atomic script per decision
    // leaves no overshoot.
    assert_eq!(alternate(&a, &b, 16).await, 6);
    let limited = metric(
        a.admin_addr(),
        "flashgate_rate_limit_decisions_total{limit=\"route\",outcome=\"limited\"",
    )
    .await
        + metric(
            b.admin_addr(),
            "flashgate_rate_limit_decisions_total{limit=\"route\",outcome=\"limited\"",
        )
        .await;
    assert_eq!(limited, 10.0);
}

#[tokio::test]
async fn two_gateways_share_a_fleet_limit_on_redis_cluster() {
    let cluster = RedisCluster::start();
    let seeds: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let section = format!(
        "[redis]\ncluster = [{}]\ntimeout = \"1s\"",
        seeds.join(", ")
    );
    let (_up, a, b) = two_gateways(&section, FLEET_ROUTE, "").await;
    assert_eq!(alternate(&a, &b, 16).await, 6);
}

/// A fleet limit of 6 (fleet_size 2): two pass through Redis, then Redis
/// is killed and the gateway follows `mode`.
async fn redis_killed(mode: &str) -> (Vec<u16>, Gateway) {
    let mut redis = RedisServer::start();
    let up = Upstream::fixed("ok").await;
    let text = Cfg::new(&[up.addr])
        .route("rate_limit = { route = { rate = \"1/m\", burst = 6 }, scope = \"fleet\" }")
        .section(format!(
            "[redis]\nurl = \"{}\"\nretry_interval = \"60s\"",
            redis.url()
        ))
        .section(format!(
            "[rate_limit]\nredis_down = \"{mode}\"\nfleet_size = 2"
        ))
        .build();
    let gw = gateway(&text).await;
    let addr = gw.addr("public").unwrap();
    assert_eq!(statuses(addr, "/", &[], 2).await, [200, 200]);
    assert_eq!(
        metric(gw.admin_addr(), "flashgate_rate_limit_redis_up ").await,
        1.0
    );
    redis.stop();
    let after = statuses(addr, "/", &[], 6).await;
    assert_eq!(
        metric(gw.admin_addr(), "flashgate_rate_limit_redis_up ").await,
        0.0
    );
    assert!(
        metric(gw.admin_addr(), "flashgate_rate_limit_redis_errors_total").await >= 1.0,
        "the failed call is counted"
    );
    drop(up);
    (after, gw)
}

#[tokio::test]
async fn redis_down_local_falls_back_to_the_gateways_share() {
    // This gateway's share: burst 6 / fleet_size 2 = 3.
    let (after, _gw) = redis_killed("local").await;
    assert_eq!(after, [200, 200, 200, 429, 429, 429]);
}

#[tokio::test]
async fn redis_down_open_lets_everything_pass() {
    let (after, _gw) = redis_killed("open").await;
    assert_eq!(after, [200; 6]);
}

#[tokio::test]
async fn redis_down_closed_refuses() {
    let (after, _gw) = redis_killed("closed").await;
    assert_eq!(after, [503; 6]);
}

#[tokio::test]
async fn limits_reload_with_the_config_and_keep_state_when_unchanged() {
    let up = Upstream::fixed("ok").await;
    let dir = std::env::temp_dir().join(format!("flashgate-rl-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gw.toml");
    let with = |burst: u32, extra: &str| {
        Cfg::new(&[up.addr])
            .route(format!(
                "rate_limit = {{ per_ip = {{ rate = \"1/m\", burst = {burst} }} }}"
            ))
            .section(extra)
            .build()
    };
    std::fs::write(&path, with(2, "")).unwrap();
    let gw = Gateway::start(
        flashgate_tests::Config::load(&path).unwrap(),
        Some(path.clone()),
    )
    .await
    .unwrap();
    let addr = gw.addr("public").unwrap();
    assert_eq!(statuses(addr, "/", &[], 3).await, [200, 200, 429]);
    // Another route added: this route's limit is the same, so is its state.
    let other = "[[routes]]\nname = \"other\"\npath_prefix = \"/other\"\nupstream = \"origin\"";
    std::fs::write(&path, with(2, other)).unwrap();
    gw.shared.reload().await.unwrap();
    assert_eq!(statuses(addr, "/", &[], 1).await, [429]);
    // A changed limit starts with its full (new) burst.
    std::fs::write(&path, with(4, other)).unwrap();
    gw.shared.reload().await.unwrap();
    assert_eq!(statuses(addr, "/", &[], 5).await, [200, 200, 200, 200, 429]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `flashgate check` (the built binary) refuses bad rate limit keys with
/// their key paths.
#[test]
fn flashgate_check_names_rate_limit_keys() {
    let base = Cfg::new(&["127.0.0.1:9".parse().unwrap()]);
    let cases = [
        (
            base.clone()
                .route("rate_limit = { per_ip = \"5/fortnight\" }"),
            "routes[0].rate_limit.per_ip",
        ),
        (
            base.clone()
                .route("rate_limit = { per_ip = \"5/s\", scope = \"fleet\" }"),
            "routes[0].rate_limit.scope",
        ),
        (
            base.clone()
                .route("rate_limit = { hot = { body_field = \"sku\", rate = \"1/s\" } }"),
            "routes[0].rate_limit.hot.body_field",
        ),
        (
            base.clone()
                .route("rate_limit = { per_ip = \"5/s\", headers = \"sometimes\" }"),
            "routes[0].rate_limit.headers",
        ),
        (
            base.clone().section("[rate_limit]\nmax_keys = 0"),
            "rate_limit.max_keys",
        ),
    ];
    let cases = cases.map(|(cfg, expected)| (cfg.build(), expected));
    let dir = flashgate_tests::check_refuses("rl-check", &cases);
    let _ = std::fs::remove_dir_all(&dir);
}
