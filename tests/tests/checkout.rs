//! The order core end to end: real redis-server (AOF `appendfsync always`)
//! or a real three-node Redis Cluster, a real RocketMQ name server and
//! broker, the real `order-core run` / `order-core consume` processes, and
//! the real gateway in front for the sale.
//!
//! Each test starts its own Redis and broker on free ports, so they run in
//! parallel; the timeouts are generous (a 2-core machine shared with other
//! builds) but every assertion is exact.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flashgate_tests::order::{
    checkout, set_stock, start_consumer, start_core, stock, CoreFiles, CoreProc, CoreSetup, RedisAt,
};
use flashgate_tests::redis::{Durability, RedisCluster, RedisServer};
use flashgate_tests::rocketmq::RocketMq;
use flashgate_tests::{client, eventually, free_port, gateway, wait_until, Proc};

/// Redis, broker, core and consumer for one test.
struct Stack {
    setup: CoreSetup,
    files: CoreFiles,
    core: CoreProc,
    consumer: Option<Proc>,
    mq: RocketMq,
}

impl Stack {
    /// Starts everything and waits until an order goes all the way through
    /// (the warm-up also creates the topic on the broker).
    async fn start(redis: RedisAt, tweak: impl FnOnce(&mut CoreSetup)) -> Stack {
        Self::start_with(redis, tweak, &[]).await
    }

    async fn start_with(
        redis: RedisAt,
        tweak: impl FnOnce(&mut CoreSetup),
        consumer_env: &[(&str, &str)],
    ) -> Stack {
        let mq = tokio::task::block_in_place(RocketMq::start);
        let mut setup = CoreSetup::new(redis, mq.namesrv());
        tweak(&mut setup);
        let port = free_port();
        let files = CoreFiles::write(&setup, port);
        let core = start_core(&files, port, &[], "core.log").await;
        let consumer = Some(start_consumer(&files, consumer_env, "consumer.log"));
        let stack = Stack {
            setup,
            files,
            core,
            consumer,
            mq,
        };
        stack.warm_up().await;
        stack
    }

    async fn warm_up(&self) {
        assert_eq!(
            set_stock(self.core.addr, "warmup", 1_000_000).await.status,
            200
        );
        let c = client();
        let addr = self.core.addr;
        // The first sends may fail while the producer learns the route.
        let created = eventually(Duration::from_secs(60), || {
            let c = c.clone();
            async move {
                checkout(&c, addr, "warmup", 1, Some("warm"), Some("w"))
                    .await
                    .status
                    == 201
            }
        })
        .await;
        assert!(
            created,
            "warm-up checkout never succeeded\ncore:\n{}",
            self.core_log()
        );
        let delivered = eventually(Duration::from_secs(90), || async {
            !self.files.sink_for("warmup").is_empty()
        })
        .await;
        assert!(
            delivered,
            "the warm-up order never reached the consumer\ncore:\n{}\nconsumer:\n{}",
            self.core_log(),
            self.consumer_log()
        );
    }
}

async fn single_redis() -> RedisServer {
    tokio::task::spawn_blocking(|| RedisServer::start_with(Durability::AofAlways))
        .await
        .unwrap()
}

/// The sale: `attempts` checkouts by distinct users, at most `in_flight`
/// at once, through `base`; returns the answers' statuses and order ids,
/// while a watcher checks that stock never goes below zero.
async fn sale(
    base: SocketAddr,
    core: SocketAddr,
    sku: &'static str,
    attempts: usize,
    in_flight: usize,
) -> (HashMap<u16, usize>, Vec<String>, Duration) {
    let min_seen = Arc::new(AtomicI64::new(i64::MAX));
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (min_seen, watching) = (min_seen.clone(), watching.clone());
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                let (s, _) = stock(core, sku).await;
                min_seen.fetch_min(s, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let busy = Arc::new(AtomicUsize::new(0));
    let c = client();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(attempts);
    for i in 0..attempts {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let c = c.clone();
        let busy = busy.clone();
        tasks.push(tokio::spawn(async move {
            let token = jwt(&format!("buyer-{i}"));
            let mut sent;
            // A buyer's app does what the 503 asks: the same checkout
            // again (same Idempotency-Key) after `retry-after`. On a busy
            // machine the gateway's overload gate answers some buyers so;
            // what this test proves is that none of them is lost or sold
            // twice, so each one retries until it gets a final answer.
            let mut got;
            let mut tries = 0;
            loop {
                let req = http::Request::post(format!("http://{base}/checkout"))
                    .header("authorization", format!("Bearer {token}"))
                    .header("idempotency-key", format!("key-{i}"))
                    .header("content-type", "application/json")
                    .body(flashgate_tests::full(format!(
                        r#"{{"sku":"{sku}","qty":1}}"#
                    )))
                    .unwrap();
                sent = Instant::now();
                got = flashgate_tests::send_with(&c, req).await;
                tries += 1;
                let wait = got
                    .header("retry-after")
                    .and_then(|v| v.parse::<u64>().ok());
                match wait {
                    Some(s) if got.status == 503 && tries < 30 => {
                        busy.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200 + 300 * s.min(3))).await;
                    }
                    _ => break,
                }
            }
            let latency = sent.elapsed();
            drop(permit);
            let id = (got.status == 201)
                .then(|| got.json()["order"]["id"].as_str().unwrap().to_string());
            (got.status, id, latency)
        }));
    }
    let mut statuses = HashMap::new();
    let mut ids = Vec::new();
    let mut loser_latency = Vec::new();
    for t in tasks {
        let (status, id, latency) = t.await.unwrap();
        *statuses.entry(status).or_insert(0) += 1;
        ids.extend(id);
        if status == 409 {
            loser_latency.push(latency);
        }
    }
    let took = started.elapsed();
    eprintln!(
        "503 with retry-after, retried: {}",
        busy.load(Ordering::Relaxed)
    );
    loser_latency.sort();
    if !loser_latency.is_empty() {
        let p = |q: f64| {
            loser_latency[((loser_latency.len() as f64 * q) as usize).min(loser_latency.len() - 1)]
        };
        eprintln!("409 latency: p50 {:?} p99 {:?}", p(0.5), p(0.99));
        // No loser waits for the gateway's 20 s request timeout (the
        // edge's sold-out flag answers them), even with 1,000 in flight on
        // a small machine busy with other work: a bound on being stuck,
        // not a speed figure.
        assert!(
            p(0.99) < Duration::from_secs(15),
            "losers waited: p99 {:?}",
            p(0.99)
        );
    }
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();
    assert!(
        min_seen.load(Ordering::Relaxed) >= 0,
        "stock went below zero: {}",
        min_seen.load(Ordering::Relaxed)
    );
    (statuses, ids, took)
}

const JWT_SECRET: &str = "sale-test-secret-0123456789";

/// A token for `user`, as the shop's login service would issue it.
fn jwt(user: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// The gateway in front of the core: a critical checkout route with JWT
/// identity and the edge's sold-out flag.
async fn gateway_for(core: SocketAddr) -> flashgate_tests::Gateway {
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n[log]\naccess_log = false\n\
         [[listeners]]\nname = \"public\"\nlisten = \"127.0.0.1:0\"\n\
         [[upstreams]]\nname = \"order-core\"\nendpoints = [\"{core}\"]\n\
         max_concurrent_requests = 2048\nrequest_timeout = \"20s\"\n\
         [[routes]]\nname = \"checkout\"\npath_prefix = \"/checkout\"\nupstream = \"order-core\"\n\
         priority = \"critical\"\ncheckout = {{}}\n\
         [jwt]\nalgorithm = \"HS256\"\nsecret = \"{JWT_SECRET}\"\n"
    );
    gateway(&toml).await
}

/// The first few warnings and errors of a log, one per line.
fn first_warnings(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(5)
        .collect::<Vec<_>>()
        .join("\n")
}

async fn the_sale(redis: RedisAt) {
    let stack = Stack::start(redis, |_| {}).await;
    let sku = "sneaker";
    assert_eq!(set_stock(stack.core.addr, sku, 100).await.status, 200);
    let gw = gateway_for(stack.core.addr).await;
    let base = gw.addr("public").unwrap();

    let (statuses, ids, took) = sale(base, stack.core.addr, sku, 10_000, 1_000).await;
    eprintln!(
        "sale: {statuses:?} in {took:?} ({:.0} attempts/s)",
        10_000.0 / took.as_secs_f64()
    );
    assert_eq!(
        statuses.get(&201),
        Some(&100),
        "exactly 100 orders: {statuses:?}"
    );
    assert_eq!(
        statuses.get(&409),
        Some(&9_900),
        "every loser gets 409: {statuses:?}; first core warnings:\n{}",
        first_warnings(&stack.core_log())
    );
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 100, "order ids are unique");
    let (left, orders) = stock(stack.core.addr, sku).await;
    assert_eq!((left, orders), (0, 100));
    assert_eq!(left + orders, 100, "orders + remaining = initial");

    // Every order reaches the consumer exactly once.
    let delivered = eventually(Duration::from_secs(60), || async {
        stack.files.sink_for(sku).len() >= 100
    })
    .await;
    let lines = stack.files.sink_for(sku);
    assert!(
        delivered,
        "only {} of 100 orders reached the sink",
        lines.len()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lines = stack.files.sink_for(sku);
    let sunk: HashSet<String> = lines
        .iter()
        .map(|l| l["order_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(lines.len(), 100, "one sink line per order");
    assert_eq!(
        sunk,
        ids.into_iter().collect::<HashSet<_>>(),
        "the sink holds exactly the created orders"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sale_of_100_units_to_10000_buyers_through_the_gateway() {
    let redis = single_redis().await;
    the_sale(RedisAt::Single(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sale_on_redis_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    the_sale(RedisAt::Cluster(cluster.urls())).await;
}

impl Stack {
    /// Another `order-core run` of the same producer group on its own port
    /// (own config file, same Redis and broker), with test hooks in `env`.
    async fn second_core(&self, env: &[(&str, &str)]) -> (CoreFiles, CoreProc) {
        let port = free_port();
        let files = CoreFiles::write(&self.setup, port);
        let core = start_core(&files, port, env, "core.log").await;
        (files, core)
    }

    fn core_log(&self) -> String {
        flashgate_tests::order::log(&self.files, "core.log")
    }

    fn consumer_log(&self) -> String {
        flashgate_tests::order::log(&self.files, "consumer.log")
    }

    /// Waits until the sink holds `n` lines of `sku`, then a little longer
    /// to catch late duplicates, and returns the lines.
    async fn sink_settles(&self, sku: &str, n: usize) -> Vec<serde_json::Value> {
        let ok = eventually(Duration::from_secs(90), || async {
            self.files.sink_for(sku).len() >= n
        })
        .await;
        assert!(
            ok,
            "sink has {} of {n} orders of {sku}\nconsumer log:\n{}",
            self.files.sink_for(sku).len(),
            self.consumer_log()
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.files.sink_for(sku)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_user_limit_and_concurrent_replays_give_one_order_per_key() {
    let redis = single_redis().await;
    let stack = Stack::start(RedisAt::Single(redis.url()), |s| s.per_user = 2).await;
    let core = stack.core.addr;
    assert_eq!(set_stock(core, "tee", 10).await.status, 200);

    // The same key 20 times at once: one order, every answer names it.
    let c = client();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { checkout(&c, core, "tee", 1, Some("ann"), Some("k1")).await })
        })
        .collect();
    let mut ids = HashSet::new();
    let mut created = 0;
    for t in tasks {
        let got = t.await.unwrap();
        assert!(
            got.status == 201 || got.status == 200,
            "{} {}",
            got.status,
            got.text()
        );
        if got.status == 201 {
            created += 1;
        } else {
            assert_eq!(got.header("idempotent-replay"), Some("true"));
        }
        ids.insert(got.json()["order"]["id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        created, 1,
        "one of the concurrent replays creates the order"
    );
    assert_eq!(ids.len(), 1, "all answers name the same order");

    // A second key is a second order; a third is over the limit of 2.
    assert_eq!(
        checkout(&c, core, "tee", 1, Some("ann"), Some("k2"))
            .await
            .status,
        201
    );
    let over = checkout(&c, core, "tee", 1, Some("ann"), Some("k3")).await;
    assert_eq!(over.status, 429, "{}", over.text());
    assert!(over.header("retry-after").is_some());
    // The same key with another quantity is a client bug, not a replay.
    assert_eq!(
        checkout(&c, core, "tee", 2, Some("ann"), Some("k1"))
            .await
            .status,
        422
    );
    // Bad input is refused before anything happens.
    assert_eq!(
        checkout(&c, core, "tee", 1, None, Some("k9")).await.status,
        422
    );
    assert_eq!(
        checkout(&c, core, "tee", 1, Some("bob"), None).await.status,
        422
    );
    assert_eq!(
        checkout(&c, core, "bad sku", 1, Some("bob"), Some("k"))
            .await
            .status,
        422
    );
    assert_eq!(
        checkout(&c, core, "tee", 0, Some("bob"), Some("k"))
            .await
            .status,
        422
    );

    assert_eq!(stock(core, "tee").await, (8, 2));
    let lines = stack.sink_settles("tee", 2).await;
    assert_eq!(lines.len(), 2, "each order reaches the consumer once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_killed_after_the_lua_is_committed_by_the_check_back() {
    let redis = single_redis().await;
    let stack = Stack::start(RedisAt::Single(redis.url()), |_| {}).await;
    assert_eq!(set_stock(stack.core.addr, "boot", 5).await.status, 200);
    let marker = stack.files.dir.0.join("paused-after-local");
    let spec = format!("after_local:{}", marker.display());
    let (files_a, mut a) = stack.second_core(&[("ORDER_CORE_TEST_PAUSE", &spec)]).await;

    let addr_a = a.addr;
    let pending = tokio::spawn(async move {
        checkout(&client(), addr_a, "boot", 1, Some("cat"), Some("k")).await
    });
    assert!(
        eventually(Duration::from_secs(30), || async { marker.exists() }).await,
        "core A never reached the pause point; log:\n{}",
        flashgate_tests::order::log(&files_a, "core.log")
    );
    // The Lua ran (stock is held), the commit was never sent: kill -9.
    assert_eq!(stock(stack.core.addr, "boot").await, (4, 1));
    a.proc.signal("KILL");
    a.proc
        .wait_exit(Duration::from_secs(10))
        .expect("core A exits");
    let _ = pending.await;

    // The broker asks the surviving producer of the group; Redis says the
    // order exists, so it commits and the consumer gets the order once.
    let lines = stack.sink_settles("boot", 1).await;
    assert_eq!(lines.len(), 1, "exactly one delivery");
    let id = lines[0]["order_id"].as_str().unwrap();
    let got = flashgate_tests::get(&format!("http://{}/orders/{id}", stack.core.addr)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["order"]["user"], "cat");
    assert_eq!(stock(stack.core.addr, "boot").await, (4, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_back_before_the_lua_rolls_back_and_fences_the_late_lua() {
    let redis = single_redis().await;
    let stack = Stack::start(RedisAt::Single(redis.url()), |_| {}).await;
    assert_eq!(set_stock(stack.core.addr, "cap", 5).await.status, 200);
    let marker = stack.files.dir.0.join("paused-after-half");
    let spec = format!("after_half:{}", marker.display());
    let (files_a, a) = stack.second_core(&[("ORDER_CORE_TEST_PAUSE", &spec)]).await;

    let addr_a = a.addr;
    let pending =
        tokio::spawn(
            async move { checkout(&client(), addr_a, "cap", 1, Some("dan"), Some("k")).await },
        );
    wait_until(
        Duration::from_secs(30),
        "core A reaches the pause point",
        || async { marker.exists() },
    )
    .await;
    // The half message is on the broker; the Lua has not run. The broker's
    // check-back finds no order, fences the transaction and rolls back.
    wait_until(Duration::from_secs(60), "a rollback check-back", || async {
        let logs = format!(
            "{}{}",
            flashgate_tests::order::log(&files_a, "core.log"),
            stack.core_log()
        );
        logs.contains("transaction check-back") && logs.contains("Rollback")
    })
    .await;
    // Now the slow producer goes on: its Lua run is refused by the fence.
    std::fs::remove_file(&marker).unwrap();
    let late = pending.await.unwrap();
    assert_eq!(late.status, 503, "late Lua refused: {}", late.text());
    assert_eq!(
        stock(stack.core.addr, "cap").await,
        (5, 0),
        "nothing deducted"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        stack.files.sink_for("cap").is_empty(),
        "a rolled-back order was delivered"
    );
    // A retry with the same key is a fresh attempt and succeeds.
    let retry = checkout(&client(), stack.core.addr, "cap", 1, Some("dan"), Some("k")).await;
    assert_eq!(retry.status, 201, "{}", retry.text());
    assert_eq!(stack.sink_settles("cap", 1).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_mid_sale_answers_503_and_deducts_nothing() {
    let mut redis = single_redis().await;
    let stack = Stack::start(RedisAt::Single(redis.url()), |_| {}).await;
    let core = stack.core.addr;
    assert_eq!(set_stock(core, "hat", 50).await.status, 200);
    let c = client();
    for i in 0..20 {
        let got = checkout(&c, core, "hat", 1, Some(&format!("u{i}")), Some("k")).await;
        assert_eq!(got.status, 201, "{}", got.text());
    }
    let redis = tokio::task::spawn_blocking(move || {
        redis.stop();
        redis
    })
    .await
    .unwrap();
    for i in 20..30 {
        let got = checkout(&c, core, "hat", 1, Some(&format!("u{i}")), Some("k")).await;
        assert_eq!(got.status, 503, "{}", got.text());
        assert_eq!(got.header("retry-after"), Some("1"));
    }
    let mut redis = redis;
    let _redis = tokio::task::spawn_blocking(move || {
        redis.restart();
        redis
    })
    .await
    .unwrap();
    // The sale goes on; the buyers who got 503 simply retry.
    wait_until(
        Duration::from_secs(30),
        "a checkout succeeds once Redis is back",
        || async {
            matches!(
                checkout(&c, core, "hat", 1, Some("u20"), Some("k"))
                    .await
                    .status,
                201
            )
        },
    )
    .await;
    let mut created = 21;
    for i in 21..100 {
        let got = checkout(&c, core, "hat", 1, Some(&format!("u{i}")), Some("k")).await;
        match got.status {
            201 => created += 1,
            409 => {}
            s => panic!("unexpected {s}: {}", got.text()),
        }
    }
    assert_eq!(created, 50, "exactly the stock was sold");
    assert_eq!(stock(core, "hat").await, (0, 50));
    assert_eq!(stack.sink_settles("hat", 50).await.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_down_answers_503_before_any_deduction() {
    let redis = single_redis().await;
    let mut stack = Stack::start(RedisAt::Single(redis.url()), |_| {}).await;
    let core = stack.core.addr;
    assert_eq!(set_stock(core, "sock", 10).await.status, 200);
    let c = client();
    assert_eq!(
        checkout(&c, core, "sock", 1, Some("a"), Some("k"))
            .await
            .status,
        201
    );
    stack.mq.stop_broker();
    for u in ["b", "c", "d"] {
        let got = checkout(&c, core, "sock", 1, Some(u), Some("k")).await;
        assert_eq!(got.status, 503, "{}", got.text());
    }
    assert_eq!(
        stock(core, "sock").await,
        (9, 1),
        "nothing deducted while the broker is down"
    );
    tokio::task::block_in_place(|| stack.mq.start_broker());
    wait_until(
        Duration::from_secs(60),
        "a checkout succeeds once the broker is back",
        || async {
            checkout(&c, core, "sock", 1, Some("b"), Some("k"))
                .await
                .status
                == 201
        },
    )
    .await;
    assert_eq!(stock(core, "sock").await, (8, 2));
    assert_eq!(stack.sink_settles("sock", 2).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_crash_before_ack_redelivers_and_the_sink_keeps_one_line() {
    let redis = single_redis().await;
    // The warm-up order is the one: the consumer writes its line, then
    // aborts before acknowledging.
    let mut stack = Stack::start_with(
        RedisAt::Single(redis.url()),
        |_| {},
        &[("ORDER_CORE_TEST_CRASH_AFTER_SINK", "1")],
    )
    .await;
    let mut crashed = stack.consumer.take().unwrap();
    assert!(
        crashed.wait_exit(Duration::from_secs(30)).is_some(),
        "the consumer did not crash"
    );
    let lines = stack.files.sink_for("warmup");
    assert_eq!(lines.len(), 1, "the line was on disk before the crash");
    let id = lines[0]["order_id"].as_str().unwrap().to_string();
    stack.consumer = Some(start_consumer(&stack.files, &[], "consumer2.log"));
    let log2 = || flashgate_tests::order::log(&stack.files, "consumer2.log");
    assert!(
        eventually(Duration::from_secs(90), || async {
            log2().contains("duplicate delivery ignored")
        })
        .await,
        "the unacknowledged order was not redelivered; log:\n{}",
        log2()
    );
    let same: Vec<_> = stack
        .files
        .sink_lines()
        .into_iter()
        .filter(|l| l["order_id"] == id.as_str())
        .collect();
    assert_eq!(same.len(), 1, "still one line for the redelivered order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_message_goes_to_the_dlq_and_replays_once_fixed() {
    let redis = single_redis().await;
    let mut stack = Stack::start_with(
        RedisAt::Single(redis.url()),
        |s| s.max_attempts = 2,
        &[("ORDER_CORE_TEST_FAIL_SKU", "bad")],
    )
    .await;
    let core = stack.core.addr;
    assert_eq!(set_stock(core, "bad", 3).await.status, 200);
    let got = checkout(&client(), core, "bad", 1, Some("eve"), Some("k")).await;
    assert_eq!(got.status, 201);
    let id = got.json()["order"]["id"].as_str().unwrap().to_string();
    assert!(
        eventually(Duration::from_secs(90), || async {
            stack.files.dlq_lines().len() == 1
        })
        .await,
        "the poison message did not reach the DLQ; log:\n{}",
        stack.consumer_log()
    );
    assert!(stack.files.sink_for("bad").is_empty());
    let listed = flashgate_tests::order::dlq(&stack.files, "list");
    assert!(listed.contains(&id), "dlq list shows the order: {listed}");

    // Fixed: the consumer is redeployed without the fault; replay.
    stack.consumer = None;
    stack.consumer = Some(start_consumer(&stack.files, &[], "consumer2.log"));
    let out = flashgate_tests::order::dlq(&stack.files, "replay");
    assert!(out.contains("replayed 1"), "{out}");
    assert!(
        stack.files.dlq_lines().is_empty(),
        "replayed letters leave the DLQ"
    );
    let lines = stack.sink_settles("bad", 1).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["order_id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unpaid_orders_expire_and_return_stock_once_with_two_sweepers() {
    let redis = single_redis().await;
    let stack = Stack::start(RedisAt::Single(redis.url()), |s| {
        s.expiry = "2s".into();
        s.sweep_every = "100ms".into();
    })
    .await;
    // A second process sweeps the same Redis: every expiry runs twice.
    let (_files_b, _b) = stack.second_core(&[]).await;
    let core = stack.core.addr;
    assert_eq!(set_stock(core, "mug", 5).await.status, 200);
    let c = client();
    let mut ids = Vec::new();
    for u in ["p", "q", "r"] {
        let got = checkout(&c, core, "mug", 1, Some(u), Some("k")).await;
        assert_eq!(got.status, 201);
        ids.push(got.json()["order"]["id"].as_str().unwrap().to_string());
    }
    assert_eq!(stock(core, "mug").await, (2, 3));
    let paid = flashgate_tests::send(
        http::Request::post(format!("http://{core}/orders/{}/pay", ids[0]))
            .body(flashgate_tests::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(paid.json()["order"]["status"], "paid");
    assert!(
        eventually(Duration::from_secs(30), || async {
            stock(core, "mug").await == (4, 1)
        })
        .await,
        "unpaid orders did not expire: {:?}",
        stock(core, "mug").await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stock(core, "mug").await,
        (4, 1),
        "stock returned exactly once"
    );
    for (id, want) in ids.iter().zip(["paid", "cancelled", "cancelled"]) {
        let got = flashgate_tests::get(&format!("http://{core}/orders/{id}")).await;
        assert_eq!(got.json()["order"]["status"], want);
    }
    // The expired buyer's quota came back with the stock.
    assert_eq!(
        checkout(&c, core, "mug", 1, Some("q"), Some("k2"))
            .await
            .status,
        201
    );
}
