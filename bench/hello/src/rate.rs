//! `bench-rate`: an open-loop, constant-rate HTTP/1.1 load generator (what
//! wrk2 does), used by `bench/run --fixed-rate` to compare latencies at equal
//! offered load.
//!
//! Request `i` (counted over all connections, from 0) is due at
//! `start + i / rate`; requests are dealt to the keep-alive connections in
//! turn, so each connection sends one every `connections / rate` seconds.
//! The latency of a request is measured from its *due* time to the end of
//! its response body, not from the moment it was written: a connection still
//! waiting for its previous answer sends the next request late, and that
//! delay counts (coordinated-omission correction, as in wrk2). A server that
//! stalls for 100 ms therefore shows 100 ms in the tail, not one slow
//! request.
//!
//! The wait for a due time is a tokio sleep until `--spin-us` before it
//! (tokio's timer has millisecond ticks), then a busy wait that yields to the
//! runtime (and so keeps polling the sockets) until the due time: sends are
//! microsecond-exact at the price of a busy CPU. The send lag (from the due
//! time, or from the end of the connection's previous answer if that came
//! later, to the actual send) is reported so that a late generator is
//! visible; a connection busy with its previous answer is not the
//! generator's lateness and is already in the latency. So is the service
//! time (actual send to the end of the answer, what a closed-loop tool
//! would measure).
//!
//! One current-thread tokio runtime; the caller pins it (`taskset`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

#[derive(Parser)]
#[command(
    name = "bench-rate",
    about = "Open-loop constant-rate HTTP/1.1 load generator (latency from the intended send time)"
)]
struct Cli {
    /// Target: `http://host:port/path` or `host:port`.
    target: String,
    /// Request path (default: the URL's path, else `/`).
    #[arg(long)]
    path: Option<String>,
    /// Requests per second, over all connections.
    #[arg(long)]
    rate: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Keep-alive connections; each has at most one request in flight.
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: u64,
    /// Seconds at the same rate before the measured ones (not recorded).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds a request may take from its send to the end of its answer;
    /// also how long the backlog is sent after the schedule ends.
    #[arg(long, default_value_t = 2.0)]
    timeout: f64,
    /// Busy-wait this many microseconds before each due time (0: tokio's
    /// millisecond timer only, which sends up to ~2 ms late).
    #[arg(long, default_value_t = 2000)]
    spin_us: u64,
    /// One JSON line instead of the table.
    #[arg(long)]
    json: bool,
    /// The `user-agent` sent (a bot flood is told from shoppers by it).
    #[arg(long, default_value = "bench-rate")]
    user_agent: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let target = Target::parse(&cli.target, cli.path.as_deref())?;
    let plan = Plan::new(&cli)?;
    let report = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run(target.clone(), plan, &cli.user_agent))?;
    if let Some(e) = &report.first_error {
        eprintln!("bench-rate: first error: {e}");
    }
    if cli.json {
        println!("{}", report.json(&plan));
    } else {
        print!("{}", report.table(&target, &plan));
    }
    Ok(())
}

// ---------------------------------------------------------------- target

#[derive(Clone, Debug, PartialEq)]
struct Target {
    /// `host:port` as given: what the `Host` header says.
    authority: String,
    host: String,
    port: u16,
    path: String,
}

impl Target {
    fn parse(target: &str, path: Option<&str>) -> anyhow::Result<Target> {
        let full = if target.contains("://") {
            target.to_string()
        } else {
            format!("http://{target}")
        };
        let uri: Uri = full.parse().with_context(|| {
            format!("bad target {target:?} (want http://host:port/path or host:port)")
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(s) => bail!("target {target:?}: scheme {s:?} is not supported (plain http only)"),
            None => bail!("target {target:?}: no scheme"),
        }
        let authority = uri
            .authority()
            .with_context(|| format!("target {target:?} has no host"))?;
        let path = match path {
            Some(p) => p.to_string(),
            None => uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".to_string()),
        };
        if !path.starts_with('/') {
            bail!("path {path:?} must start with /");
        }
        path.parse::<Uri>()
            .with_context(|| format!("bad request path {path:?}"))?;
        Ok(Target {
            authority: authority.as_str().to_string(),
            host: authority.host().to_string(),
            port: authority.port_u16().unwrap_or(80),
            path,
        })
    }
}

// ---------------------------------------------------------------- schedule

/// The schedule, the same for every connection.
#[derive(Clone, Copy, Debug)]
struct Plan {
    rate: f64,
    connections: u64,
    warmup: Duration,
    duration: Duration,
    timeout: Duration,
    spin: Duration,
}

impl Plan {
    fn new(cli: &Cli) -> anyhow::Result<Plan> {
        if !(cli.rate.is_finite() && cli.rate > 0.0) {
            bail!("--rate must be > 0");
        }
        if cli.connections == 0 {
            bail!("--connections must be >= 1");
        }
        let secs = |name: &str, v: f64, min: f64| -> anyhow::Result<Duration> {
            if !(v.is_finite() && v >= min) {
                bail!("--{name} must be >= {min}");
            }
            Ok(Duration::from_secs_f64(v))
        };
        Ok(Plan {
            rate: cli.rate,
            connections: cli.connections,
            warmup: secs("warmup", cli.warmup, 0.0)?,
            duration: secs("duration", cli.duration, 0.001)?,
            timeout: secs("timeout", cli.timeout, 0.001)?,
            spin: Duration::from_micros(cli.spin_us),
        })
    }

    /// End of the schedule (warm-up and measured time), from its start.
    fn end(&self) -> Duration {
        self.warmup + self.duration
    }

    /// Requests due in the measured window, over all connections.
    fn measured_requests(&self) -> u64 {
        due_before(self.end(), self.rate) - due_before(self.warmup, self.rate)
    }
}

/// When request `index` (over all connections, from 0) is due, from the
/// start of the schedule: `index / rate` seconds.
fn due_offset(index: u64, rate: f64) -> Duration {
    Duration::from_nanos((index as f64 * 1e9 / rate).round() as u64)
}

/// How many requests are due strictly before `t`.
fn due_before(t: Duration, rate: f64) -> u64 {
    // An estimate, then exact by `due_offset` (rounding at the boundary).
    let mut n = (t.as_secs_f64() * rate).ceil() as u64;
    while n > 0 && due_offset(n - 1, rate) >= t {
        n -= 1;
    }
    while due_offset(n, rate) < t {
        n += 1;
    }
    n
}

/// The index over all connections of connection `conn`'s `k`-th request:
/// requests are dealt to the connections in turn.
fn global_index(conn: u64, k: u64, connections: u64) -> u64 {
    k * connections + conn
}

/// How late the generator sent a request: from its due time, or from the
/// moment its connection became free (the previous answer's end) if that
/// is later, to the send. Waiting for a busy connection is not counted here
/// (it is in the latency, which runs from the due time).
fn send_lag(due: Instant, free_at: Instant, sent_at: Instant) -> Duration {
    sent_at.saturating_duration_since(due.max(free_at))
}

/// Waits until `due`: a tokio sleep until `spin` before it, then yields to
/// the runtime until the clock says so.
async fn wait_until(due: Instant, spin: Duration) {
    let now = Instant::now();
    if due > now + spin {
        tokio::time::sleep_until((due - spin).into()).await;
    }
    while Instant::now() < due {
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------- statistics

/// Nearest-rank percentile of ascending `sorted`: the smallest value that at
/// least `ppm` parts per million of the values do not exceed. `None` when
/// empty.
fn percentile(sorted: &[u32], ppm: u64) -> Option<u32> {
    let n = sorted.len() as u64;
    if n == 0 {
        return None;
    }
    let rank = (n * ppm.min(1_000_000)).div_ceil(1_000_000).clamp(1, n);
    Some(sorted[rank as usize - 1])
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// What one connection saw of the measured requests.
#[derive(Default)]
struct Tally {
    /// Due time to end of the answer, per completed request.
    latency_us: Vec<u32>,
    /// The generator's lateness per attempted request ([`send_lag`]).
    lag_us: Vec<u32>,
    /// Send to end of the answer, per completed request.
    service_us: Vec<u32>,
    /// Attempted (including those whose connection could not be opened).
    sent: u64,
    /// Answered in full, whatever the status.
    completed: u64,
    non_2xx: u64,
    /// Connect, send or receive errors and timeouts.
    failed: u64,
    /// Due in the measured window but not attempted before the run stopped.
    unsent: u64,
    last_done: Option<Instant>,
    first_error: Option<String>,
}

impl Tally {
    fn fail(&mut self, measured: bool, what: String) {
        if measured {
            self.failed += 1;
        }
        self.first_error.get_or_insert(what);
    }

    fn merge(&mut self, o: Tally) {
        self.latency_us.extend(o.latency_us);
        self.lag_us.extend(o.lag_us);
        self.service_us.extend(o.service_us);
        self.sent += o.sent;
        self.completed += o.completed;
        self.non_2xx += o.non_2xx;
        self.failed += o.failed;
        self.unsent += o.unsent;
        self.last_done = self.last_done.max(o.last_done);
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

struct Report {
    scheduled: u64,
    sent: u64,
    completed: u64,
    non_2xx: u64,
    failed: u64,
    unsent: u64,
    /// Completed requests per second of the measured window (longer if
    /// answers came in after it).
    achieved_rate: f64,
    /// p50, p90, p99, p99.9, max of the latency.
    latency_us: [Option<u32>; 5],
    /// p50, p99, max of the send lag.
    lag_us: [Option<u32>; 3],
    /// p50, p90, p99, p99.9, max of the service time.
    service_us: [Option<u32>; 5],
    first_error: Option<String>,
}

const LATENCY_PPM: [u64; 5] = [500_000, 900_000, 990_000, 999_000, 1_000_000];
const LAG_PPM: [u64; 3] = [500_000, 990_000, 1_000_000];

impl Report {
    fn new(mut t: Tally, plan: &Plan, start: Instant) -> Report {
        t.latency_us.sort_unstable();
        t.lag_us.sort_unstable();
        t.service_us.sort_unstable();
        let window_start = start + plan.warmup;
        let elapsed = t
            .last_done
            .map(|d| d.saturating_duration_since(window_start))
            .unwrap_or_default()
            .max(plan.duration);
        Report {
            scheduled: plan.measured_requests(),
            sent: t.sent,
            completed: t.completed,
            non_2xx: t.non_2xx,
            failed: t.failed,
            unsent: t.unsent,
            achieved_rate: t.completed as f64 / elapsed.as_secs_f64(),
            latency_us: LATENCY_PPM.map(|p| percentile(&t.latency_us, p)),
            lag_us: LAG_PPM.map(|p| percentile(&t.lag_us, p)),
            service_us: LATENCY_PPM.map(|p| percentile(&t.service_us, p)),
            first_error: t.first_error,
        }
    }

    fn errors(&self) -> u64 {
        self.non_2xx + self.failed
    }

    fn json(&self, plan: &Plan) -> String {
        let n = |v: Option<u32>| v.map_or("null".to_string(), |v| v.to_string());
        let [p50, p90, p99, p999, max] = self.latency_us;
        let [l50, l99, lmax] = self.lag_us;
        let [s50, _, s99, s999, smax] = self.service_us;
        format!(
            concat!(
                "{{\"rate\":{},\"connections\":{},\"duration_s\":{},\"warmup_s\":{},",
                "\"scheduled\":{},\"sent\":{},\"completed\":{},\"errors\":{},\"non_2xx\":{},\"failed\":{},\"unsent\":{},",
                "\"achieved_rate\":{:.1},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},",
                "\"lag_p50_us\":{},\"lag_p99_us\":{},\"lag_max_us\":{},",
                "\"service_p50_us\":{},\"service_p99_us\":{},\"service_p999_us\":{},\"service_max_us\":{}}}"
            ),
            plan.rate,
            plan.connections,
            plan.duration.as_secs_f64(),
            plan.warmup.as_secs_f64(),
            self.scheduled,
            self.sent,
            self.completed,
            self.errors(),
            self.non_2xx,
            self.failed,
            self.unsent,
            self.achieved_rate,
            n(p50),
            n(p90),
            n(p99),
            n(p999),
            n(max),
            n(l50),
            n(l99),
            n(lmax),
            n(s50),
            n(s99),
            n(s999),
            n(smax),
        )
    }

    fn table(&self, target: &Target, plan: &Plan) -> String {
        let n = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
        let [p50, p90, p99, p999, max] = self.latency_us;
        let [l50, l99, lmax] = self.lag_us;
        let [s50, s90, s99, s999, smax] = self.service_us;
        format!(
            "bench-rate: http://{}{} at {} req/s over {} connections, {} s measured after {} s warm-up\n\
             \n\
             | scheduled | sent | completed | errors (non-2xx + failed) | unsent | achieved req/s |\n\
             |---:|---:|---:|---:|---:|---:|\n\
             | {} | {} | {} | {} ({} + {}) | {} | {:.1} |\n\
             \n\
             | us | p50 | p90 | p99 | p99.9 | max |\n\
             |---|---:|---:|---:|---:|---:|\n\
             | latency (from the due time) | {} | {} | {} | {} | {} |\n\
             | send lag (due time or previous answer to send) | {} | | {} | | {} |\n\
             | service time (send to answer, uncorrected) | {} | {} | {} | {} | {} |\n",
            target.authority,
            target.path,
            plan.rate,
            plan.connections,
            plan.duration.as_secs_f64(),
            plan.warmup.as_secs_f64(),
            self.scheduled,
            self.sent,
            self.completed,
            self.errors(),
            self.non_2xx,
            self.failed,
            self.unsent,
            self.achieved_rate,
            n(p50),
            n(p90),
            n(p99),
            n(p999),
            n(max),
            n(l50),
            n(l99),
            n(lmax),
            n(s50),
            n(s90),
            n(s99),
            n(s999),
            n(smax),
        )
    }
}

// ---------------------------------------------------------------- load

/// A keep-alive client connection; its driver task ends with it.
struct Conn {
    sender: http1::SendRequest<Empty<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    let driver = tokio::spawn(async move {
        // Errors surface on the request side.
        let _ = conn.await;
    });
    Ok(Conn { sender, driver })
}

/// The request, built once and cloned per send.
struct Template {
    uri: Uri,
    host: HeaderValue,
    user_agent: HeaderValue,
}

impl Template {
    fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.method_mut() = Method::GET;
        *req.uri_mut() = self.uri.clone();
        req.headers_mut().insert(header::HOST, self.host.clone());
        req.headers_mut()
            .insert(header::USER_AGENT, self.user_agent.clone());
        req
    }
}

/// A connection ready for the next request: `conn` if it still is, else
/// a new one (a server may close a keep-alive connection between two
/// requests; that is not the next request's failure).
async fn ready(conn: Option<Conn>, addr: SocketAddr, timeout: Duration) -> anyhow::Result<Conn> {
    if let Some(mut c) = conn {
        if !c.sender.is_closed()
            && matches!(
                tokio::time::timeout(timeout, c.sender.ready()).await,
                Ok(Ok(()))
            )
        {
            return Ok(c);
        }
    }
    tokio::time::timeout(timeout, connect(addr))
        .await
        .with_context(|| format!("connecting to {addr}: timed out"))?
}

/// Sends one request on `conn` and reads the whole answer; its status.
async fn exchange(conn: &mut Conn, req: Request<Empty<Bytes>>) -> anyhow::Result<u16> {
    let resp = conn
        .sender
        .send_request(req)
        .await
        .context("sending the request / reading the answer's head")?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        frame.context("reading the answer's body")?;
    }
    Ok(status)
}

async fn run(target: Target, plan: Plan, user_agent: &str) -> anyhow::Result<Report> {
    let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .with_context(|| format!("resolving {}", target.host))?
        .next()
        .with_context(|| format!("{} has no address", target.host))?;
    let template = std::sync::Arc::new(Template {
        uri: target.path.parse().context("request path")?,
        host: HeaderValue::from_str(&target.authority).context("Host header")?,
        user_agent: HeaderValue::from_str(user_agent).context("--user-agent")?,
    });
    // All connections first: connecting is not part of any request.
    let mut conns = Vec::new();
    for _ in 0..plan.connections {
        conns.push(
            connect(addr)
                .await
                .with_context(|| format!("cannot open the connections to {}", target.authority))?,
        );
    }
    let start = Instant::now() + Duration::from_millis(20);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(id, conn)| {
            let template = template.clone();
            tokio::spawn(connection(id as u64, conn, addr, plan, start, template))
        })
        .collect();
    let mut total = Tally::default();
    for t in tasks {
        total.merge(t.await.context("a connection task failed")?);
    }
    Ok(Report::new(total, &plan, start))
}

/// Connection `id`'s share of the schedule.
async fn connection(
    id: u64,
    conn: Conn,
    addr: SocketAddr,
    plan: Plan,
    start: Instant,
    template: std::sync::Arc<Template>,
) -> Tally {
    let mut t = Tally::default();
    let mut conn = Some(conn);
    // Backlog left at the end of the schedule is sent until this point.
    let stop = start + plan.end() + plan.timeout;
    // When the previous request on this connection ended.
    let mut free_at = start;
    for k in 0.. {
        let offset = due_offset(global_index(id, k, plan.connections), plan.rate);
        if offset >= plan.end() {
            break;
        }
        let measured = offset >= plan.warmup;
        if Instant::now() >= stop {
            if measured {
                t.unsent += 1;
            }
            continue;
        }
        let due = start + offset;
        wait_until(due, plan.spin).await;
        if measured {
            t.sent += 1;
        }
        let mut c = match ready(conn.take(), addr, plan.timeout).await {
            Ok(c) => c,
            Err(e) => {
                t.fail(measured, format!("{e:#}"));
                free_at = Instant::now();
                continue;
            }
        };
        let sent_at = Instant::now();
        if measured {
            t.lag_us.push(micros(send_lag(due, free_at, sent_at)));
        }
        let result = tokio::time::timeout(plan.timeout, exchange(&mut c, template.request())).await;
        let done = Instant::now();
        free_at = done;
        match result {
            Ok(Ok(status)) => {
                conn = Some(c);
                if measured {
                    t.completed += 1;
                    t.latency_us.push(micros(done - due));
                    t.service_us.push(micros(done - sent_at));
                    t.last_done = Some(done);
                    if !(200..300).contains(&status) {
                        t.non_2xx += 1;
                        t.first_error
                            .get_or_insert_with(|| format!("answer with status {status}"));
                    }
                }
            }
            Ok(Err(e)) => t.fail(measured, format!("{e:#}")),
            Err(_) => t.fail(
                measured,
                format!("no complete answer within {:?}", plan.timeout),
            ),
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 500_000), Some(500));
        assert_eq!(percentile(&v, 900_000), Some(900));
        assert_eq!(percentile(&v, 990_000), Some(990));
        assert_eq!(percentile(&v, 999_000), Some(999));
        assert_eq!(percentile(&v, 1_000_000), Some(1000));
        assert_eq!(percentile(&v, 0), Some(1));
        // Not a multiple: rounds the rank up.
        let v = [10, 20, 30];
        assert_eq!(percentile(&v, 500_000), Some(20));
        assert_eq!(percentile(&v, 990_000), Some(30));
        assert_eq!(percentile(&v, 330_000), Some(10));
        assert_eq!(percentile(&v, 340_000), Some(20));
        assert_eq!(percentile(&[7], 999_000), Some(7));
        assert_eq!(percentile(&[], 500_000), None);
        // Above 100 %: the maximum.
        assert_eq!(percentile(&v, 2_000_000), Some(30));
    }

    #[test]
    fn schedule_is_spread_over_the_connections() {
        // 4000 req/s: one every 250 us overall.
        assert_eq!(due_offset(0, 4000.0), Duration::ZERO);
        assert_eq!(due_offset(1, 4000.0), Duration::from_micros(250));
        assert_eq!(due_offset(4000, 4000.0), Duration::from_secs(1));
        // 4 connections: each sends every 1 ms, offset by 250 us.
        let offsets = |conn| -> Vec<Duration> {
            (0..3)
                .map(|k| due_offset(global_index(conn, k, 4), 4000.0))
                .collect()
        };
        let ms = Duration::from_millis;
        assert_eq!(offsets(0), [ms(0), ms(1), ms(2)]);
        assert_eq!(
            offsets(3),
            [
                Duration::from_micros(750),
                Duration::from_micros(1750),
                Duration::from_micros(2750)
            ]
        );
        // Together: every index exactly once.
        let mut all: Vec<u64> = (0..4)
            .flat_map(|c| (0..5).map(move |k| global_index(c, k, 4)))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn fractional_rate() {
        // 3 req/s: 0, 333.333 ms, 666.667 ms (rounded to the nanosecond).
        assert_eq!(due_offset(1, 3.0), Duration::from_nanos(333_333_333));
        assert_eq!(due_offset(2, 3.0), Duration::from_nanos(666_666_667));
        assert_eq!(due_offset(3, 3.0), Duration::from_secs(1));
    }

    #[test]
    fn requests_due_in_a_window() {
        let s = Duration::from_secs;
        assert_eq!(due_before(Duration::ZERO, 1000.0), 0);
        // [0, 1 s) at 1000 req/s: indices 0..=999.
        assert_eq!(due_before(s(1), 1000.0), 1000);
        assert_eq!(due_before(Duration::from_micros(1500), 1000.0), 2);
        assert_eq!(due_before(s(1), 3.0), 3);
        assert_eq!(due_before(Duration::from_millis(334), 3.0), 2);
        let plan = Plan {
            rate: 4000.0,
            connections: 16,
            warmup: s(1),
            duration: s(5),
            timeout: s(2),
            spin: Duration::ZERO,
        };
        assert_eq!(plan.measured_requests(), 20_000);
        // The connections' shares add up to the whole schedule.
        let per_conn: u64 = (0..plan.connections)
            .map(|c| {
                (0..)
                    .map(|k| due_offset(global_index(c, k, plan.connections), plan.rate))
                    .take_while(|o| *o < plan.end())
                    .filter(|o| *o >= plan.warmup)
                    .count() as u64
            })
            .sum();
        assert_eq!(per_conn, plan.measured_requests());
    }

    #[test]
    fn targets() {
        let t = Target::parse("http://127.0.0.1:8080/a?b=1", None).unwrap();
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.host, "127.0.0.1");
        assert_eq!(t.port, 8080);
        assert_eq!(t.path, "/a?b=1");
        let t = Target::parse("localhost:9000", None).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("localhost", 9000, "/")
        );
        let t = Target::parse("http://localhost", Some("/x")).unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/x"));
        assert!(Target::parse("https://localhost:443/", None).is_err());
        assert!(Target::parse("localhost:9000", Some("x")).is_err());
        assert!(Target::parse("not a url", None).is_err());
    }

    #[test]
    fn lag_is_the_generator_s_own() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        // Connection free before the due time: lag from the due time.
        assert_eq!(send_lag(t0 + us(100), t0, t0 + us(103)), us(3));
        // Connection busy until after the due time: lag from its release.
        assert_eq!(send_lag(t0 + us(100), t0 + us(900), t0 + us(902)), us(2));
        // Never negative.
        assert_eq!(send_lag(t0 + us(100), t0, t0 + us(50)), Duration::ZERO);
    }

    #[test]
    fn micros_saturate() {
        assert_eq!(micros(Duration::from_nanos(1999)), 1);
        assert_eq!(micros(Duration::from_secs(1 << 40)), u32::MAX);
    }
}
