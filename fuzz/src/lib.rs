//! The gateway's parsers of untrusted bytes, built from the gateway's own
//! files (one source, two crates): each is a leaf module with no
//! `crate::` imports, which gateway/tests/layers.rs and this build keep
//! true. A module that grows a gateway import breaks this build in CI.
#![allow(dead_code, unused_imports)]

#[path = "../../gateway/src/edge/framing.rs"]
pub mod framing;

#[path = "../../gateway/src/edge/proxy_protocol.rs"]
pub mod proxy_protocol;

#[path = "../../gateway/src/cache/entry.rs"]
pub mod entry;

#[path = "../../gateway/src/pipeline/route/router.rs"]
pub mod router;

#[path = "../../gateway/src/pipeline/authority.rs"]
pub mod authority;

#[path = "../../gateway/src/config/mod.rs"]
pub mod config;
