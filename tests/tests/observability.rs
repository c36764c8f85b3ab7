//! The Grafana dashboard (`deploy/grafana/flashgate.json`) and the alert
//! rules (`deploy/prometheus/alerts.yml`) name only metrics a running
//! gateway exports: every PromQL expression is tokenized, its metric names
//! taken out, and each must be a sample name in the `/metrics` text of a
//! gateway that has done what makes each series appear (cache lookups with
//! Redis down, an ejection, shedding, a Wasm filter, a checkout the core
//! answers 503, a 429, a blocked and a challenged bot, a TLS listener). The order core exports no metrics of its own; its 503s are
//! seen by the gateway (`flashgate_checkout_unavailable_retries_total`).
//! `promtool check rules` runs where Debian's `prometheus` package gives it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use flashgate_tests::*;
use http::Request;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::Value;

/// PromQL words that are never metric names.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "atan2",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Aggregation operators: their grouping may come before the parentheses
/// (`sum by (route) (...)`).
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Punct(char),
    Other,
}

fn tokens(expr: &str) -> Vec<Tok> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            // A comment runs to the end of the line.
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            let mut s = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                if let Some(&ch) = chars.get(i) {
                    s.push(ch);
                }
                i += 1;
            }
            i += 1;
            out.push(Tok::Str(s));
        } else if c == '$' {
            // A Grafana variable (`$__rate_interval`, `${datasource}`).
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            out.push(Tok::Other);
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // Numbers and durations (`0.99`, `5m`, `1e3`, `1h30m`).
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            out.push(Tok::Other);
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else {
            out.push(Tok::Punct(c));
            i += 1;
        }
    }
    out
}

/// The metric names a PromQL expression selects: identifiers that are not
/// functions or aggregations (followed by `(`), keywords, label names in
/// matchers (`{...}`) or in `by`/`without`/`on`/`ignoring`/`group_*` lists,
/// plus `{__name__="..."}` matchers.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let toks = tokens(expr);
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Punct('{') => {
                // Label matchers: only `__name__` names a metric.
                i += 1;
                while i < toks.len() && toks[i] != Tok::Punct('}') {
                    if toks[i] == Tok::Ident("__name__".into()) {
                        if let (Some(Tok::Punct('=')), Some(Tok::Str(n))) =
                            (toks.get(i + 1), toks.get(i + 2))
                        {
                            names.insert(n.clone());
                        }
                    }
                    i += 1;
                }
            }
            Tok::Punct('[') => {
                // A range or subquery: durations only.
                while i < toks.len() && toks[i] != Tok::Punct(']') {
                    i += 1;
                }
            }
            Tok::Ident(word) => {
                let lower = word.to_ascii_lowercase();
                let next_is_paren = toks.get(i + 1) == Some(&Tok::Punct('('));
                let grouping_next = matches!(toks.get(i + 1),
                    Some(Tok::Ident(w)) if ["by", "without"].contains(&w.to_ascii_lowercase().as_str()));
                if LABEL_LISTS.contains(&lower.as_str()) && next_is_paren {
                    while i < toks.len() && toks[i] != Tok::Punct(')') {
                        i += 1;
                    }
                } else if AGGREGATIONS.contains(&lower.as_str()) && grouping_next {
                    // `sum by (...)`: the operator, not a metric.
                } else if !next_is_paren && !KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word.clone());
                }
            }
            _ => {}
        }
        i += 1;
    }
    names
}

#[test]
fn promql_names_are_taken_from_selectors_only() {
    let got = metric_names(
        r#"histogram_quantile(0.99, sum by (route, le) (rate(flashgate_request_duration_seconds_bucket{route=~"a|b", status!="5xx"}[$__rate_interval])))
           / on (route) group_left (x) sum without (le) (increase(flashgate_requests_total[5m] offset 1h)) > bool 2
           or {__name__="flashgate_load_level", job="gw"} unless absent(up)"#,
    );
    let want: BTreeSet<String> = [
        "flashgate_request_duration_seconds_bucket",
        "flashgate_requests_total",
        "flashgate_load_level",
        "up",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(got, want);
}

/// Every PromQL expression of the dashboard (panels, rows' panels) and of
/// the rules, with where it is.
fn expressions() -> Vec<(String, String)> {
    let root = repo_root().join("deploy");
    let mut out = Vec::new();
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/flashgate.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(dash["title"].is_string() && dash["panels"].is_array());
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().expect("a Prometheus target has expr");
                out.push((
                    format!("panel {:?}", p["title"].as_str().unwrap_or("")),
                    expr.to_string(),
                ));
            }
            walk(&p["panels"], out);
        }
    }
    walk(&dash["panels"], &mut out);
    let panels = out.len();
    assert!(
        panels >= 15,
        "the dashboard has its views: {panels} queries"
    );
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("prometheus/alerts.yml")).unwrap())
            .expect("the rules are YAML");
    for g in rules["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap();
            out.push((
                format!("rule {name}"),
                r["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    assert!(out.len() - panels >= 7, "the rules are there");
    out
}

/// Sample names in a Prometheus text exposition (format 0.0.4), parsed
/// line by line: `name{labels} value [timestamp]`.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let (name, rest) = line.split_at(end);
        let value_part = match rest.strip_prefix('{') {
            Some(r) => {
                // Label values are quoted and may hold `}`.
                let mut in_str = false;
                let mut esc = false;
                let close = r
                    .char_indices()
                    .find(|&(_, c)| {
                        let end = !in_str && c == '}';
                        if esc {
                            esc = false;
                        } else if c == '\\' {
                            esc = true;
                        } else if c == '"' {
                            in_str = !in_str;
                        }
                        end
                    })
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"))
                    .0;
                &r[close + 1..]
            }
            None => rest,
        };
        let value = value_part.split_whitespace().next().unwrap_or("");
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value in {line:?}"
        );
        names.insert(name.to_string());
    }
    names
}

const SECRET: &str = "observability-test-secret";

/// A gateway that has done what makes every series the views use appear.
async fn exercised_gateway() -> (Gateway, Vec<Upstream>) {
    let origin = Upstream::start(|_req| async {
        let mut r = reply(200, "ok");
        r.headers_mut()
            .insert("cache-control", "public, max-age=60".parse().unwrap());
        r
    })
    .await;
    let core = Upstream::start(|_req| async {
        let mut r = reply(503, r#"{"error":"unavailable"}"#);
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    })
    .await;
    let nowhere = closed_port().await;
    let redis_nowhere = closed_port().await;
    let trap = wasm_plugin("test_trap");
    let certs = tls::temp_dir("observability");
    let cert = tls::write_cert(&certs, "site", &["views.test"]);
    let room_key =
        std::env::temp_dir().join(format!("flashgate-obs-room-{}.key", std::process::id()));
    std::fs::write(&room_key, "observability-room-key-0123456789abcdef\n").unwrap();
    let text = Cfg::new(&[origin.addr, nowhere])
        .upstream("[upstreams.outlier]\nconsecutive_failures = 1")
        .route("cache = { ttl = \"60s\" }")
        .section(format!(
            "[[upstreams]]\nname = \"core\"\nendpoints = [\"{}\"]\n\
             [[routes]]\nname = \"checkout\"\npath_prefix = \"/checkout\"\nupstream = \"core\"\n\
             priority = \"critical\"\ncheckout = {{ retry_unavailable = \"200ms\" }}\n\
             [[routes]]\nname = \"reco\"\npath_prefix = \"/reco\"\nupstream = \"origin\"\n\
             priority = \"sheddable\"\n\
             [[routes]]\nname = \"trap\"\npath_prefix = \"/trap\"\nupstream = \"origin\"\n\
             filters = [\"trap\"]\n\
             [[routes]]\nname = \"room\"\npath_prefix = \"/room\"\nupstream = \"origin\"\n\
             waiting_room = \"drop\"\n\
             [[waiting_rooms]]\nname = \"drop\"\nnew_users = \"5/s\"\nactive_users = 5\nkey_file = \"{room_key}\"\n\
             [[filters]]\nname = \"trap\"\nwasm = \"{}\"\nconfig = \"panic\"\n\
             [jwt]\nalgorithm = \"HS256\"\nsecret = \"{SECRET}\"\n\
             [overload]\nallow_forced_level = true\n\
             [redis]\nurl = \"redis://{redis_nowhere}/\"\ntimeout = \"200ms\"\n",
            core.addr,
            trap.display(),
            room_key = room_key.display()
        ))
        .section(
            "[[routes]]\nname = \"limited\"\npath_prefix = \"/limited\"\nupstream = \"origin\"\n\
             rate_limit = { per_ip = { rate = \"1/m\", burst = 1 } }\n\
             [[bot_rules]]\nname = \"blocked\"\nuser_agent = [\"python-requests\"]\naction = \"block\"\n\
             [[bot_rules]]\nname = \"challenged\"\nuser_agent = [\"scrapy\"]\naction = \"challenge\"\n",
        )
        .section(format!(
            "[[listeners]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\n\
             [listeners.tls]\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            cert.cert.display(),
            cert.key.display()
        ))
        .build();
    let gw = gateway(&text).await;
    let base = format!("http://{}", gw.addr("public").unwrap());
    // Cache lookups (Redis down: L2 errors); the closed endpoint fails
    // and is ejected.
    for i in 0..6 {
        get(&format!("{base}/p/{i}")).await;
    }
    // A trap in the Wasm filter.
    send(
        Request::get(format!("{base}/trap"))
            .header("x-trap", "1")
            .body(empty())
            .unwrap(),
    )
    .await;
    // A forged waiting-room ticket (refused by reason; Redis is down, so
    // the room holds).
    let room = send(
        Request::get(format!("{base}/room"))
            .header(
                "cookie",
                "flashgate_wr_drop=v1.1.0.9999999999.abcdefabcdef.00",
            )
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(room.status, 200, "{}", room.text());
    // A checkout the core answers 503 unavailable until the retries end.
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let jwt = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "u1", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let checkout = send(
        Request::post(format!("{base}/checkout"))
            .header("authorization", format!("Bearer {jwt}"))
            .header("idempotency-key", "k1")
            .header("content-type", "application/json")
            .body(full(r#"{"sku":"x","qty":1}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(checkout.status, 503, "{}", checkout.text());
    // Shedding: a forced level 3 sheds the sheddable route.
    let admin = gw.admin_addr();
    let force = |body: &'static str| {
        send(
            Request::post(format!("http://{admin}/admin/load-level"))
                .header("authorization", "Bearer test-token")
                .body(full(body))
                .unwrap(),
        )
    };
    assert_eq!(force(r#"{"level": 3, "for": "60s"}"#).await.status, 200);
    let shed = get(&format!("{base}/reco")).await;
    assert_eq!(shed.status, 503, "shed at level 3");
    assert_eq!(force(r#"{"level": null}"#).await.status, 200);
    // A 429 from a rate limit, a blocked and a challenged bot.
    assert_eq!(get(&format!("{base}/limited")).await.status, 200);
    assert_eq!(get(&format!("{base}/limited")).await.status, 429);
    for (agent, status) in [("python-requests/2.32", 403), ("scrapy/2.11", 403)] {
        let got = send(
            Request::get(format!("{base}/p/1"))
                .header("user-agent", agent)
                .header("accept", "application/json")
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, status, "{agent}");
    }
    (gw, vec![origin, core])
}

#[tokio::test]
async fn every_metric_the_dashboard_and_rules_name_is_exported() {
    let exprs = expressions();
    let (gw, _upstreams) = exercised_gateway().await;
    let admin: SocketAddr = gw.admin_addr();
    let metrics_url = format!("http://{admin}/metrics");
    // The ejection is counted when the failure is observed; poll for it.
    wait_until(Duration::from_secs(30), "an ejection counted", || {
        let url = metrics_url.clone();
        async move {
            get(&url)
                .await
                .text()
                .contains("flashgate_upstream_ejections_total{")
        }
    })
    .await;
    let names = exported(&get(&metrics_url).await.text());
    assert!(names.contains("flashgate_requests_total"), "{names:?}");
    let mut missing = Vec::new();
    for (where_, expr) in &exprs {
        let used = metric_names(expr);
        assert!(!used.is_empty(), "{where_}: no metric in {expr:?}");
        for m in used {
            if !names.contains(&m) {
                missing.push(format!("{where_}: {m}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not exported by the gateway:\n{}",
        missing.join("\n")
    );
}

#[test]
fn promtool_accepts_the_rules() {
    let Some(promtool) = system_tool(&["promtool"], "prometheus") else {
        return;
    };
    let rules = repo_root().join("deploy/prometheus/alerts.yml");
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
