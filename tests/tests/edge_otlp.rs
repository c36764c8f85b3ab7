//! OpenTelemetry span export (`[tracing]`): the real gateway exports one
//! server span per request to an OTLP/HTTP receiver started here (a hyper
//! server that records `POST /v1/traces` bodies, decoded with the
//! opentelemetry-proto types). The span continues the client's trace, its
//! id is the `parent-id` the upstream receives, and a collector that is
//! down or hangs never slows or fails a request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flashgate_tests::{
    closed_port, empty, eventually, gateway, metric, reply, send, wait_until, wasm_plugin, Cfg,
    Upstream,
};
use http::Request;
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;
use tokio::net::TcpListener;

/// One export request as the receiver saw it.
struct Export {
    path: String,
    content_type: String,
    body: Bytes,
}

/// An OTLP/HTTP receiver on loopback: records every request and answers
/// 200 with an empty (protobuf) `ExportTraceServiceResponse`.
struct Collector {
    addr: SocketAddr,
    exports: Arc<Mutex<Vec<Export>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exports = Arc::new(Mutex::new(Vec::new()));
        let seen = exports.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let content_type = req
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            seen.lock().unwrap().push(Export {
                                path,
                                content_type,
                                body,
                            });
                            let mut r = reply(200, "");
                            r.headers_mut()
                                .insert("content-type", "application/x-protobuf".parse().unwrap());
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector {
            addr,
            exports,
            task,
        }
    }

    /// Every span received so far, with its resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let mut out = Vec::new();
        for e in self.exports.lock().unwrap().iter() {
            let req = ExportTraceServiceRequest::decode(e.body.clone()).expect("protobuf body");
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| str_attr(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        out.push((service.clone(), s));
                    }
                }
            }
        }
        out
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn str_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key)? {
        Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// (trace id, parent id, flags) of a traceparent, as bytes.
fn split_traceparent(tp: &str) -> (Vec<u8>, Vec<u8>, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    (unhex(parts[1]), unhex(parts[2]), parts[3].to_string())
}

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

#[tokio::test]
async fn request_span_continues_the_clients_trace_and_is_the_upstreams_parent() {
    let collector = Collector::start().await;
    let echo = Upstream::echo().await;
    let dead = closed_port().await;
    let toml = Cfg::new(&[echo.addr])
        .section(format!(
            "[[upstreams]]\nname = \"dead\"\nendpoints = [\"{dead}\"]\nretries = 0\n\
             [[routes]]\nname = \"broken\"\npath_prefix = \"/broken\"\nupstream = \"dead\"\n\
             [tracing]\nendpoint = \"http://{}/v1/traces\"\nservice_name = \"edge-test\"\n\
             scheduled_delay = \"50ms\"\n",
            collector.addr
        ))
        .build();
    let gw = gateway(&toml).await;
    let base = format!("http://{}", gw.addr("public").unwrap());

    // A sampled client trace: continued, its span is our parent.
    let got = send(
        Request::get(format!("{base}/items/7?x=1"))
            .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
            .header("user-agent", "otlp-test/1")
            .header("x-request-id", "req-otlp-1")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    let upstream_tp = got.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    let (up_trace, up_parent, up_flags) = split_traceparent(&upstream_tp);
    assert_eq!(up_trace, unhex(CLIENT_TRACE), "same trace upstream");
    assert_ne!(up_parent, unhex(CLIENT_SPAN), "a new parent id for our hop");
    assert_eq!(up_flags, "01");

    // A client that decided "not sampled": continued, flags kept, and no
    // span exported for it.
    let unsampled_trace = "1af7651916cd43dd8448eb211c80319c";
    let got = send(
        Request::get(format!("{base}/quiet"))
            .header(
                "traceparent",
                format!("00-{unsampled_trace}-{CLIENT_SPAN}-00"),
            )
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    let tp = got.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(tp.starts_with(&format!("00-{unsampled_trace}-")), "{tp}");
    assert!(tp.ends_with("-00"), "{tp}");

    // No traceparent: a new trace is started and sampled (ratio 1.0).
    let got = send(Request::get(format!("{base}/fresh")).body(empty()).unwrap()).await;
    let fresh_tp = got.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    let (fresh_trace, fresh_span, fresh_flags) = split_traceparent(&fresh_tp);
    assert_eq!(fresh_flags, "01");

    // A gateway 502 (connect refused): the span carries the error.
    let broken_trace = "2af7651916cd43dd8448eb211c80319c";
    let got = send(
        Request::post(format!("{base}/broken/x"))
            .header("traceparent", format!("00-{broken_trace}-{CLIENT_SPAN}-01"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 502);

    let admin = gw.admin_addr();
    assert!(
        eventually(Duration::from_secs(15), || async {
            collector.spans().len() >= 3
        })
        .await,
        "three spans exported within 15s; got {}",
        collector.spans().len()
    );
    {
        let exports = collector.exports.lock().unwrap();
        assert!(exports.iter().all(|e| e.path == "/v1/traces"));
        assert!(exports
            .iter()
            .all(|e| e.content_type == "application/x-protobuf"));
    }
    let spans = collector.spans();
    let by_trace = |t: &[u8]| {
        spans
            .iter()
            .find(|(_, s)| s.trace_id == t)
            .map(|(svc, s)| (svc.clone(), s.clone()))
    };

    let (service, s) = by_trace(&unhex(CLIENT_TRACE)).expect("span of the client's trace");
    assert_eq!(service, "edge-test");
    assert_eq!(
        s.parent_span_id,
        unhex(CLIENT_SPAN),
        "child of the client's span"
    );
    assert_eq!(
        s.span_id, up_parent,
        "its id is the parent-id the upstream received"
    );
    assert_eq!(s.kind, SpanKind::Server as i32);
    assert_eq!(s.name, "GET default");
    let a = &s.attributes;
    assert_eq!(str_attr(a, "flashgate.route").as_deref(), Some("default"));
    assert_eq!(int_attr(a, "http.response.status_code"), Some(200));
    assert_eq!(str_attr(a, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(str_attr(a, "url.path").as_deref(), Some("/items/7"));
    assert_eq!(str_attr(a, "url.scheme").as_deref(), Some("http"));
    assert_eq!(str_attr(a, "client.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        str_attr(a, "network.peer.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(str_attr(a, "server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        str_attr(a, "flashgate.upstream"),
        Some(echo.addr.to_string())
    );
    assert_eq!(
        str_attr(a, "user_agent.original").as_deref(),
        Some("otlp-test/1")
    );
    assert_eq!(
        str_attr(a, "flashgate.request_id").as_deref(),
        Some("req-otlp-1")
    );
    assert!(int_attr(a, "http.response.body.size").unwrap() > 0);
    assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
    assert!(s.start_time_unix_nano > 0);
    assert_eq!(
        s.status.as_ref().map_or(0, |st| st.code),
        StatusCode::Unset as i32
    );

    let (_, s) = by_trace(&fresh_trace).expect("span of the new trace");
    assert!(s.parent_span_id.is_empty(), "a root span");
    assert_eq!(s.span_id, fresh_span);
    assert_eq!(s.name, "GET default");

    let (_, s) = by_trace(&unhex(broken_trace)).expect("span of the 502");
    assert_eq!(s.name, "POST broken");
    assert_eq!(
        int_attr(&s.attributes, "http.response.status_code"),
        Some(502)
    );
    assert_eq!(
        str_attr(&s.attributes, "error.type").as_deref(),
        Some("connect_refused")
    );
    assert_eq!(
        s.status.as_ref().map(|st| st.code),
        Some(StatusCode::Error as i32)
    );

    assert!(
        by_trace(&unhex(unsampled_trace)).is_none(),
        "the client's not-sampled decision is honoured"
    );
    wait_until(
        Duration::from_secs(5),
        "three exported spans counted",
        || async { metric(admin, "flashgate_otlp_spans_total{result=\"exported\"}").await >= 3.0 },
    )
    .await;
    assert_eq!(
        metric(admin, "flashgate_otlp_spans_dropped_total").await,
        0.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn collector_down_never_fails_or_slows_requests() {
    let echo = Upstream::echo().await;
    let down = closed_port().await;
    let toml = Cfg::new(&[echo.addr])
        .section(format!(
            "[tracing]\nendpoint = \"http://{down}/v1/traces\"\n\
             scheduled_delay = \"20ms\"\nexport_timeout = \"500ms\"\n"
        ))
        .build();
    let gw = gateway(&toml).await;
    let base = format!("http://{}", gw.addr("public").unwrap());
    let started = Instant::now();
    for i in 0..30 {
        let got = send(Request::get(format!("{base}/n/{i}")).body(empty()).unwrap()).await;
        assert_eq!(got.status, 200, "request {i}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "30 requests took {:?}",
        started.elapsed()
    );
    let admin = gw.admin_addr();
    wait_until(
        Duration::from_secs(10),
        "failed exports are counted",
        || async {
            metric(
                admin,
                "flashgate_otlp_spans_total{result=\"export_failed\"}",
            )
            .await
                >= 1.0
        },
    )
    .await;
    // Shutdown gives up on the dead collector within the export timeout.
    let t = Instant::now();
    gw.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// A collector that accepts connections and reads but never answers: each
/// export hangs for the whole export timeout, the queue fills, and spans
/// are dropped (and counted) instead of requests waiting.
#[tokio::test]
async fn hanging_collector_drops_spans_not_requests() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            open.push(s);
        }
    });
    let echo = Upstream::echo().await;
    let toml = Cfg::new(&[echo.addr])
        .section(format!(
            "[tracing]\nendpoint = \"http://{hang}/v1/traces\"\n\
             scheduled_delay = \"20ms\"\nexport_timeout = \"5s\"\n\
             max_queue_size = 4\nmax_export_batch_size = 2\n"
        ))
        .build();
    let gw = gateway(&toml).await;
    let base = format!("http://{}", gw.addr("public").unwrap());
    let admin = gw.admin_addr();
    // Let the first batch reach the hanging collector, then keep sending.
    let got = send(Request::get(format!("{base}/first")).body(empty()).unwrap()).await;
    assert_eq!(got.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    for i in 0..40 {
        let got = send(Request::get(format!("{base}/n/{i}")).body(empty()).unwrap()).await;
        assert_eq!(got.status, 200, "request {i}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "40 requests took {:?} with the collector hanging",
        started.elapsed()
    );
    let dropped = metric(admin, "flashgate_otlp_spans_dropped_total").await;
    let queued = metric(admin, "flashgate_otlp_spans_total{result=\"queued\"}").await;
    assert!(dropped >= 30.0, "dropped {dropped}, queued {queued}");
    assert_eq!(dropped + queued, 41.0, "every span is queued or dropped");
    held.abort();
}

/// `[tracing]` is read at start: a reload that changes, adds or removes it
/// is applied for the rest and reports `tracing` as needing a restart.
#[tokio::test]
async fn tracing_changes_need_a_restart() {
    let echo = Upstream::echo().await;
    let down = closed_port().await;
    let with = |ratio: &str| {
        Cfg::new(&[echo.addr])
            .section(format!(
                "[tracing]\nendpoint = \"http://{down}\"\nsample_ratio = {ratio}\n"
            ))
            .build()
    };
    let dir = flashgate_tests::tls::temp_dir("otlp-reload");
    let path = dir.join("gw.toml");
    std::fs::write(&path, with("1.0")).unwrap();
    let cfg = flashgate_tests::Config::load(&path).unwrap();
    let gw = flashgate_tests::Gateway::start(cfg, Some(path.clone()))
        .await
        .unwrap();
    let same = gw.shared.reload().await.unwrap();
    assert!(same.restart_required.is_empty(), "{same:?}");
    std::fs::write(&path, with("0.5")).unwrap();
    let changed = gw.shared.reload().await.unwrap();
    assert_eq!(changed.restart_required, vec!["tracing".to_string()]);
    std::fs::write(&path, Cfg::new(&[echo.addr]).build()).unwrap();
    let removed = gw.shared.reload().await.unwrap();
    assert_eq!(removed.restart_required, vec!["tracing".to_string()]);
    // The exporter started with keeps running.
    assert!(gw.shared.otel.is_some());
    std::fs::write(
        &path,
        with("1.0").replace(&format!("http://{down}"), "ftp://x"),
    )
    .unwrap();
    let refused = gw.shared.reload().await.unwrap_err();
    assert!(refused.starts_with("tracing.endpoint: "), "{refused}");
    gw.shutdown().await;
}

/// A stream a filter resets has no response, but its span still ends and
/// is exported, with status 444 as the request metrics count it.
#[tokio::test]
async fn a_stream_a_filter_resets_still_exports_its_span() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let collector = Collector::start().await;
    let echo = Upstream::echo().await;
    let toml = Cfg::new(&[echo.addr])
        .route("filters = [\"f\"]")
        .section(format!(
            "[[filters]]\nname = \"f\"\nwasm = \"{}\"\ntimeout = \"2s\"\n\
             [tracing]\nendpoint = \"http://{}/v1/traces\"\nscheduled_delay = \"50ms\"\n",
            wasm_plugin("test_host").display(),
            collector.addr
        ))
        .build();
    let gw = gateway(&toml).await;
    let trace = "3af7651916cd43dd8448eb211c80319c";
    let mut s = tokio::net::TcpStream::connect(gw.addr("public").unwrap())
        .await
        .unwrap();
    s.write_all(
        format!(
            "GET /reset HTTP/1.1\r\nhost: gw\r\nx-test: close-request\r\n\
             traceparent: 00-{trace}-{CLIENT_SPAN}-01\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(
        got.is_empty(),
        "no response: {}",
        String::from_utf8_lossy(&got)
    );
    wait_until(
        Duration::from_secs(15),
        "the reset request's span is exported",
        || async {
            collector
                .spans()
                .iter()
                .any(|(_, s)| s.trace_id == unhex(trace))
        },
    )
    .await;
    let spans = collector.spans();
    let (_, span) = spans
        .iter()
        .find(|(_, s)| s.trace_id == unhex(trace))
        .unwrap();
    assert_eq!(
        int_attr(&span.attributes, "http.response.status_code"),
        Some(444)
    );
    assert_eq!(
        str_attr(&span.attributes, "flashgate.route").as_deref(),
        Some("default")
    );
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);
    gw.shutdown().await;
}
