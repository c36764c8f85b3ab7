//! Config text for the edge tests: one listener with its own keys
//! (`proxy_protocol`, `trusted_proxies`, limits), one upstream, one route.

use std::net::SocketAddr;

/// Like [`crate::Cfg`], with `listener_extra` inside the `[[listeners]]`
/// table and `route_extra` inside the catch-all `[[routes]]` table.
pub fn config(upstream: SocketAddr, listener_extra: &str, route_extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"test-token\"\n\
         [log]\naccess_log = false\n\
         [[listeners]]\nname = \"public\"\nlisten = \"127.0.0.1:0\"\n{listener_extra}\n\
         [[upstreams]]\nname = \"origin\"\nendpoints = [\"{upstream}\"]\n\
         [[routes]]\nname = \"default\"\npath_prefix = \"/\"\nupstream = \"origin\"\n{route_extra}\n"
    )
}
