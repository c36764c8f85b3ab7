//! The failover drill: a sale on a real 3-master + 3-replica Redis Cluster
//! (AOF `appendfsync always`, `cluster-node-timeout 2000`) through the real
//! `order-core run` (no broker: the Redis path alone), with the master of
//! the SKU's slot failed mid-sale:
//!
//! - killed (`kill -9`), and hung (`DEBUG SLEEP`, longer than the whole
//!   failover): exactly the seeded stock is sold, never more; every order
//!   a buyer was given is still there after the old master rejoined as a
//!   replica; and buyers stop getting 503 within a bound measured from the
//!   promotion (generous: a busy machine), long before a hung master wakes.
//! - replication lag made real (the replica frozen with `DEBUG SLEEP`):
//!   with `replicas_ack` no order is acknowledged while its replica cannot
//!   have it, while a core with `replicas_ack = 0` on the same shard does
//!   acknowledge such orders (the check would catch the bug); then the
//!   master is killed and every acknowledged order survives.
//!
//! Buyers retry a 503 with the same Idempotency-Key, as the gateway and a
//! well-behaved client do.
//!
//! The gateway's cache L2 on the same kind of cluster (it uses the same
//! Redis client as the core), with the master of a cached key's slot
//! killed and hung: every request is answered (the cache fails open to the
//! origin while L2 is unreachable), L2 hits resume between two gateways
//! after the promotion, and the fleet's fill lock still holds a stampede
//! to one origin request.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flashgate_tests::order::{
    checkout, set_stock, start_core, stock, CoreFiles, CoreProc, CoreSetup, RedisAt,
};
use flashgate_tests::redis::{ClusterSpec, Durability, RedisCluster};
use flashgate_tests::{
    client, free_port, gateway, metric, reply, send, Cfg, Gateway, HttpClient, Upstream,
};

/// How long a hung master sleeps: far longer than detection + promotion
/// (~3-5 s with a 2 s node timeout), so a core that waits for it to wake
/// fails the bound below.
const HANG_SECS: u32 = 25;

/// The 503 window must end within this long after the promotion was seen.
/// The goal is about one second; the rest is room for a busy 2-core box.
const AFTER_PROMOTION: Duration = Duration::from_secs(5);

fn cluster_3x3() -> RedisCluster {
    RedisCluster::start_with(ClusterSpec {
        masters: 3,
        replicas: 1,
        durability: Durability::AofAlways,
        debug: true,
    })
}

async fn start_cluster() -> RedisCluster {
    tokio::task::spawn_blocking(cluster_3x3)
        .await
        .expect("cluster starts")
}

/// A core on the cluster, without a broker, with extra `[redis]` keys.
async fn core_on(cluster: &RedisCluster, redis_extra: &str, log: &str) -> (CoreFiles, CoreProc) {
    let mut setup = CoreSetup::new(RedisAt::Cluster(cluster.urls()), String::new());
    setup.redis_extra = redis_extra.to_string();
    let port = free_port();
    let files = CoreFiles::write(&setup, port);
    let core = start_core(&files, port, &[], log).await;
    (files, core)
}

/// The shard (master, replica) serving `sku`, as a live node sees it.
fn shard(cluster: &RedisCluster, sku: &str) -> (usize, usize) {
    let slot = cluster.slot_of(&format!("fg:{{{sku}}}:stock"));
    let (master, replicas) = cluster.shard_of(slot, 0).expect("a master serves the slot");
    assert_eq!(replicas.len(), 1, "one replica per master");
    (master, replicas[0])
}

/// What the buyers were told.
#[derive(Default)]
struct Tally {
    /// Order ids answered 201, or 200 (a retry of the same key).
    orders: Mutex<HashSet<String>>,
    /// When each 503 arrived, since the sale started.
    unavailable: Mutex<Vec<Duration>>,
    sold_out: AtomicUsize,
    other: Mutex<Vec<String>>,
}

/// One buyer: retries a 503 with the same key every 200 ms until answered.
async fn buyer(
    http: HttpClient,
    core: std::net::SocketAddr,
    sku: String,
    i: usize,
    t0: Instant,
    tally: Arc<Tally>,
) {
    let (user, key) = (format!("u{i}"), format!("k{i}"));
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        let got = checkout(&http, core, &sku, 1, Some(&user), Some(&key)).await;
        match got.status {
            200 | 201 => {
                let id = got.json()["order"]["id"]
                    .as_str()
                    .expect("order id")
                    .to_string();
                tally.orders.lock().unwrap().insert(id);
                return;
            }
            409 => {
                tally.sold_out.fetch_add(1, Ordering::Relaxed);
                return;
            }
            503 => {
                tally.unavailable.lock().unwrap().push(t0.elapsed());
                assert!(Instant::now() < give_up, "buyer {i} got 503 for 2 minutes");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            s => {
                tally
                    .other
                    .lock()
                    .unwrap()
                    .push(format!("{s}: {}", got.text()));
                return;
            }
        }
    }
}

/// Waits (polling a live node) until `replica` serves `slot` as a master;
/// returns when that was first seen.
async fn promoted(
    cluster: &RedisCluster,
    slot: u16,
    replica: usize,
    via: usize,
    within: Duration,
) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        let now = Instant::now();
        let serving = tokio::task::block_in_place(|| cluster.shard_of(slot, via));
        if serving.is_some_and(|(m, _)| m == replica) {
            return now;
        }
        assert!(now < deadline, "replica {replica} was never promoted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until node `old` is a replica of `new` with its link up.
async fn rejoined(cluster: &RedisCluster, old: usize, new: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let ok = tokio::task::block_in_place(|| {
            let info = cluster.nodes[old]
                .try_bulk(&["INFO", "replication"])
                .unwrap_or_default();
            info.contains("role:slave")
                && info.contains("master_link_status:up")
                && info.contains(&format!("master_port:{}", cluster.nodes[new].port))
        });
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "old master {old} never rejoined as a replica of {new}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Kill,
    Hang,
}

/// The drill: 400 units, 1,200 buyers at about 200/s, the SKU's master
/// failed after the 100th order.
async fn drill(how: Failure) {
    const STOCK: i64 = 400;
    const BUYERS: usize = 1200;
    let mut cluster = start_cluster().await;
    let sku = "drill";
    let (master, replica) = shard(&cluster, sku);
    let slot = cluster.slot_of(&format!("fg:{{{sku}}}:stock"));
    // A node of another shard watches the promotion.
    let via = (0..cluster.nodes.len())
        .find(|&i| i != master && i != replica)
        .unwrap();
    let (files, core) = core_on(&cluster, "", "core.log").await;
    assert_eq!(set_stock(core.addr, sku, STOCK).await.status, 200);

    let http = client();
    let tally = Arc::new(Tally::default());
    let t0 = Instant::now();
    let mut buyers = Vec::new();
    let mut failed_at = None;
    for i in 0..BUYERS {
        buyers.push(tokio::spawn(buyer(
            http.clone(),
            core.addr,
            sku.to_string(),
            i,
            t0,
            tally.clone(),
        )));
        if failed_at.is_none() && tally.orders.lock().unwrap().len() >= 100 {
            failed_at = Some(t0.elapsed());
            match how {
                Failure::Kill => cluster.nodes[master].stop(),
                Failure::Hang => {
                    tokio::task::block_in_place(|| cluster.nodes[master].hang_for(HANG_SECS))
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let failed_at = failed_at.expect("100 orders before the last buyer arrived");
    let promoted_at = promoted(&cluster, slot, replica, via, Duration::from_secs(60)).await;
    for b in buyers {
        b.await.expect("buyer");
    }
    let sale_took = t0.elapsed();
    let promoted_after = promoted_at.duration_since(t0);

    let unavailable = tally.unavailable.lock().unwrap().clone();
    let last_503 = unavailable.iter().max().copied().unwrap_or_default();
    // Signed: the watcher polls a third node, which may learn of the
    // promotion after the core already moved to the new master.
    let end_vs_promotion = last_503.as_secs_f64() - promoted_after.as_secs_f64();
    eprintln!(
        "drill {how:?}: failed at {failed_at:?}; promotion seen {:?} after the failure; {} answers 503 (buyers retry every 200 ms), the last {:?} after the failure, {end_vs_promotion:+.2} s from the promotion seen; sale took {sale_took:?}",
        promoted_after.saturating_sub(failed_at),
        unavailable.len(),
        last_503.saturating_sub(failed_at),
    );
    assert!(
        tally.other.lock().unwrap().is_empty(),
        "unexpected answers: {:?}",
        tally.other.lock().unwrap()
    );
    assert!(
        last_503 <= promoted_after + AFTER_PROMOTION,
        "503s went on until {last_503:?}, promotion seen at {promoted_after:?}; core log:\n{}",
        flashgate_tests::order::log(&files, "core.log")
    );
    if how == Failure::Hang {
        assert!(
            last_503 < failed_at + Duration::from_secs(u64::from(HANG_SECS)),
            "the core waited for the hung master to wake"
        );
    }

    // The old master back: killed -> restarted from its AOF; hung -> wakes.
    if how == Failure::Kill {
        tokio::task::block_in_place(|| cluster.nodes[master].restart());
    }
    rejoined(&cluster, master, replica, Duration::from_secs(90)).await;

    // Exactly the seeded stock sold, and every order given out is there.
    let orders = tally.orders.lock().unwrap().clone();
    assert_eq!(orders.len() as i64, STOCK, "orders given to buyers");
    assert_eq!(
        tally.sold_out.load(Ordering::Relaxed),
        BUYERS - STOCK as usize
    );
    assert_eq!(stock(core.addr, sku).await, (0, STOCK));
    all_readable(core.addr, &orders, "order lost after the failover").await;
    drop(core);
}

/// Every order in `ids` can be read back from the core (`what` says what a
/// missing one means).
async fn all_readable<'a>(
    core: std::net::SocketAddr,
    ids: impl IntoIterator<Item = &'a String>,
    what: &str,
) {
    let http = client();
    for id in ids {
        let got = flashgate_tests::send_with(
            &http,
            http::Request::get(format!("http://{core}/orders/{id}"))
                .body(flashgate_tests::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, 200, "{what}: {id}: {}", got.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sale_survives_the_master_killed() {
    drill(Failure::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sale_survives_the_master_hung() {
    drill(Failure::Hang).await;
}

/// Checkouts of `sku` at `core` from `n` buyers, one attempt each, one
/// after the other: (status, order id if 201, sent, answered).
async fn one_attempt_each(
    core: std::net::SocketAddr,
    sku: &str,
    tag: &str,
    n: usize,
) -> Vec<(u16, Option<String>, Instant, Instant)> {
    let http = client();
    let mut out = Vec::new();
    for i in 0..n {
        let started = Instant::now();
        let got = checkout(
            &http,
            core,
            sku,
            1,
            Some(&format!("{tag}{i}")),
            Some(&format!("{tag}k{i}")),
        )
        .await;
        let id = (got.status == 201)
            .then(|| got.json()["order"]["id"].as_str().map(str::to_string))
            .flatten();
        out.push((got.status, id, started, Instant::now()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_order_is_acknowledged_before_its_replica_has_it() {
    const STOCK: i64 = 100;
    const FREEZE_SECS: u32 = 6;
    let mut cluster = start_cluster().await;
    let acked = "lag-ack";
    let (master, replica) = shard(&cluster, acked);
    // A SKU on the same shard for the core without replicated acks.
    let unacked = (0..500)
        .map(|i| format!("lag-{i}"))
        .find(|s| shard(&cluster, s).0 == master)
        .expect("a SKU on the same master");
    let (files, core) = core_on(&cluster, "", "core.log").await;
    let (_files0, core0) = core_on(&cluster, "replicas_ack = 0", "core0.log").await;
    assert_eq!(set_stock(core.addr, acked, STOCK).await.status, 200);
    assert_eq!(set_stock(core0.addr, &unacked, STOCK).await.status, 200);
    // Both sell while the replica keeps up.
    let mut acknowledged: Vec<String> = Vec::new();
    for (c, s, tag) in [(core.addr, acked, "a"), (core0.addr, unacked.as_str(), "b")] {
        let r = one_attempt_each(c, s, tag, 5).await;
        assert!(
            r.iter().all(|x| x.0 == 201),
            "{s}: {:?}",
            r.iter().map(|x| x.0).collect::<Vec<_>>()
        );
        if c == core.addr {
            acknowledged.extend(r.into_iter().filter_map(|x| x.1));
        }
    }

    // Freeze the replica: it reads nothing from its master meanwhile.
    let sent = Instant::now();
    tokio::task::block_in_place(|| cluster.nodes[replica].hang_for(FREEZE_SECS));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen_from = Instant::now();
    // Conservative end: the sleep started no earlier than `sent`.
    let frozen_until =
        sent + Duration::from_secs(u64::from(FREEZE_SECS)) - Duration::from_millis(200);
    let (with_ack, without) = tokio::join!(
        one_attempt_each(core.addr, acked, "c", 10),
        one_attempt_each(core0.addr, &unacked, "d", 10),
    );
    let inside =
        |r: &(u16, Option<String>, Instant, Instant)| r.2 >= frozen_from && r.3 <= frozen_until;
    let early_acks: Vec<_> = with_ack
        .iter()
        .filter(|r| r.0 == 201 && inside(r))
        .collect();
    let control: Vec<_> = without.iter().filter(|r| r.0 == 201 && inside(r)).collect();
    eprintln!(
        "replica frozen: with replicas_ack {:?}; without {:?}",
        with_ack.iter().map(|r| r.0).collect::<Vec<_>>(),
        without.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(
        !control.is_empty(),
        "the control core (replicas_ack = 0) acknowledged nothing while the replica was frozen: the check proves nothing"
    );
    assert!(
        early_acks.is_empty(),
        "{} orders were acknowledged while their replica was frozen; core log:\n{}",
        early_acks.len(),
        flashgate_tests::order::log(&files, "core.log")
    );

    // Fail the master while the replica still lags; the replica wakes and
    // is promoted; the old master comes back as its replica.
    cluster.nodes[master].stop();
    let slot = cluster.slot_of(&format!("fg:{{{acked}}}:stock"));
    let via = (0..cluster.nodes.len())
        .find(|&i| i != master && i != replica)
        .unwrap();
    promoted(&cluster, slot, replica, via, Duration::from_secs(60)).await;
    tokio::task::block_in_place(|| cluster.nodes[master].restart());
    rejoined(&cluster, master, replica, Duration::from_secs(90)).await;

    // Every order acknowledged with replicas_ack is there, and stock and
    // orders still add up (nothing sold twice).
    acknowledged.extend(with_ack.iter().filter_map(|r| r.1.clone()));
    all_readable(core.addr, &acknowledged, "acknowledged order lost").await;
    let (left, orders) = stock(core.addr, acked).await;
    assert_eq!(left + orders, STOCK, "stock and orders of {acked}");
    assert!(orders as usize >= acknowledged.len());
}

/// The cache's Host: the L2 key of `/p` is `flashgate:cache:{shop.test/p}:e`.
const HOST: &str = "shop.test";

/// L2 hits must resume within this long after the promotion was seen.
const L2_BACK_AFTER_PROMOTION: Duration = Duration::from_secs(10);

/// Cached paths whose L2 keys live on `master` (as node `via` sees it).
fn paths_on(cluster: &RedisCluster, master: usize, via: usize, tag: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("/{tag}/{i}"))
        .filter(|p| {
            let slot = cluster.slot_of(&format!("{HOST}{p}"));
            cluster
                .shard_of(slot, via)
                .is_some_and(|(m, _)| m == master)
        })
        .take(n)
        .collect()
}

async fn fetch(gw: &Gateway, path: &str) -> flashgate_tests::Got {
    send(
        http::Request::get(format!("http://{}{path}", gw.addr("public").unwrap()))
            .header("host", HOST)
            .body(flashgate_tests::empty())
            .unwrap(),
    )
    .await
}

/// Origin requests per path; paths under `/slow/` answer after 300 ms (so
/// a stampede overlaps one fill).
#[derive(Clone, Default)]
struct OriginHits(Arc<Mutex<std::collections::HashMap<String, usize>>>);

impl OriginHits {
    fn get(&self, path: &str) -> usize {
        self.0.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

async fn counting_origin() -> (Upstream, OriginHits) {
    let hits = OriginHits::default();
    let h = hits.clone();
    let up = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let h = h.clone();
        async move {
            let path = req.uri().path().to_string();
            *h.0.lock().unwrap().entry(path.clone()).or_default() += 1;
            if path.starts_with("/slow/") {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let mut r = reply(200, path);
            r.headers_mut()
                .insert("cache-control", "public, max-age=600".parse().unwrap());
            r
        }
    })
    .await;
    (up, hits)
}

/// The L2 drill: two gateways with the default `[redis]` settings on a
/// 3+3 cluster, clients fetching new paths through both all along, and
/// the master of the probed keys' slots failed.
async fn l2_drill(how: Failure) {
    let mut cluster = start_cluster().await;
    let (up, hits) = counting_origin().await;
    let seeds: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let cfg = Cfg::new(&[up.addr])
        .upstream("max_concurrent_requests = 4096")
        .route("cache = { ttl = \"600s\" }\n")
        // A 1 s attempt: a busy 2-core box must not time out a healthy
        // call, or a gateway would fill on its own and the lock check fail.
        .section(format!(
            "[redis]\ncluster = [{}]\ntimeout = \"1s\"\n",
            seeds.join(", ")
        ))
        .build();
    let a = Arc::new(gateway(&cfg).await);
    let b = Arc::new(gateway(&cfg).await);

    // The shard to fail: the one serving the first probe path.
    let via0 = 0;
    let first = format!("{HOST}/probe/0");
    let (master, replicas) = cluster
        .shard_of(cluster.slot_of(&first), via0)
        .expect("a master serves the slot");
    let replica = replicas[0];
    let via = (0..cluster.nodes.len())
        .find(|&i| i != master && i != replica)
        .unwrap();
    let probes = paths_on(&cluster, master, via, "probe", 200);
    let slow = paths_on(&cluster, master, via, "slow", 1).remove(0);
    let slot = cluster.slot_of(&format!("{HOST}{}", probes[0]));

    // L2 is shared before the failure.
    assert_eq!(fetch(&a, &probes[0]).await.header("x-cache"), Some("MISS"));
    assert_eq!(fetch(&b, &probes[0]).await.header("x-cache"), Some("HIT"));
    assert_eq!(hits.get(&probes[0]), 1);

    // Clients: new paths (misses: L2 get, lock, set) through both gateways.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for w in 0..4 {
        let gw = if w % 2 == 0 { a.clone() } else { b.clone() };
        let (stop, sent, bad) = (stop.clone(), sent.clone(), bad.clone());
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let path = format!("/load/{w}/{i}");
                let got = fetch(&gw, &path).await;
                sent.fetch_add(1, Ordering::SeqCst);
                if got.status != 200 || got.text() != path {
                    bad.lock()
                        .unwrap()
                        .push(format!("{path}: {} {}", got.status, got.text()));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failed_at = Instant::now();
    match how {
        Failure::Kill => tokio::task::block_in_place(|| cluster.nodes[master].stop()),
        Failure::Hang => tokio::task::block_in_place(|| cluster.nodes[master].hang_for(HANG_SECS)),
    }
    let promoted_at = promoted(&cluster, slot, replica, via, Duration::from_secs(60)).await;

    // L2 hits resume: a key filled through one gateway is a hit in the
    // other (whose L1 never saw it), both ways.
    let deadline = promoted_at + L2_BACK_AFTER_PROMOTION;
    let mut probes = probes.into_iter().skip(1);
    let mut back_at = Vec::new();
    for (filler, reader) in [(&a, &b), (&b, &a)] {
        loop {
            let p = probes.next().expect("enough probe paths");
            let filled = fetch(filler, &p).await;
            assert_eq!(filled.status, 200, "{p}: {}", filled.text());
            if fetch(reader, &p).await.header("x-cache") == Some("HIT") {
                back_at.push(Instant::now());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no L2 hit within {L2_BACK_AFTER_PROMOTION:?} of the promotion"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "L2 drill {how:?}: promotion seen {:?} after the failure; L2 hits back {:?} / {:?} after it",
        promoted_at - failed_at,
        back_at[0].saturating_duration_since(promoted_at),
        back_at[1].saturating_duration_since(promoted_at),
    );

    // The fleet's fill lock holds a stampede on the new master to one
    // origin request.
    let stampede: Vec<_> = (0..100)
        .map(|i| {
            let gw = if i % 2 == 0 { a.clone() } else { b.clone() };
            let slow = slow.clone();
            tokio::spawn(async move { fetch(&gw, &slow).await })
        })
        .collect();
    for t in stampede {
        let got = t.await.expect("stampede request");
        assert_eq!((got.status, got.text()), (200, slow.clone()));
    }
    assert_eq!(
        hits.get(&slow),
        1,
        "one origin request for the fleet's stampede"
    );

    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.expect("client");
    }
    assert!(
        bad.lock().unwrap().is_empty(),
        "answers: {:?}",
        bad.lock().unwrap()
    );
    assert!(sent.load(Ordering::SeqCst) > 100, "the clients kept going");
    let errors = metric(a.admin_addr(), "flashgate_cache_l2_errors_total").await
        + metric(b.admin_addr(), "flashgate_cache_l2_errors_total").await;
    assert!(
        errors > 0.0,
        "the gateways saw L2 fail (the drill reached it)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_l2_survives_the_master_killed() {
    l2_drill(Failure::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_l2_survives_the_master_hung() {
    l2_drill(Failure::Hang).await;
}
