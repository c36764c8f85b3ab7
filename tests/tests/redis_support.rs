//! The Redis test support itself: a server survives a kill and restart with
//! its AOF data, and a three-node cluster spreads hash slots over its nodes.

use std::time::Duration;

use flashgate_tests::redis::{Durability, RedisCluster, RedisServer};

#[test]
fn aof_server_keeps_data_across_a_kill() {
    let mut r = RedisServer::start_with(Durability::AofAlways);
    assert_eq!(r.cmd(&["SET", "k", "v"]), "+OK");
    r.stop();
    assert!(!r.is_running());
    assert!(std::net::TcpStream::connect_timeout(&r.addr(), Duration::from_millis(200)).is_err());
    r.restart();
    assert_eq!(r.cmd(&["EXISTS", "k"]), ":1");
}

#[test]
fn cluster_serves_every_slot() {
    let c = RedisCluster::start();
    assert_eq!(c.urls().len(), 3);
    // Each node owns a third of the slots: the keys of different slots land
    // on different nodes, and a node answers MOVED for a slot it does not own.
    let moved = c
        .nodes
        .iter()
        .filter(|n| n.cmd(&["GET", "{a}x"]).starts_with("-MOVED"))
        .count();
    assert_eq!(moved, 2, "exactly one node owns the slot of {{a}}");
}
