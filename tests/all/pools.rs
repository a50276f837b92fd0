//! Forwarding through the built binary: pools changed by editing the config
//! file and by SIGHUP while traffic flows, two processes agreeing on endpoints,
//! sockets freed by idle expiry, replies drained at shutdown, `wasmgate send`.

use crate::common;
use crate::common::fixtures::config;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{Upstream, client, wait_until, write_file};

#[test]
fn the_dns_proxy_config_file_describes_its_pool() {
    let file = wasmgate::config::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dns-proxy.toml"),
        1,
    )
    .unwrap();
    let l = &file.listeners[0];
    assert!(l.module.as_ref().unwrap().ends_with("dns-proxy/dns_proxy.wasm"));
    assert_eq!(l.pools.len(), 1);
    assert_eq!(l.pools[0].name, "resolvers");
    assert_eq!(l.pools[0].idle_timeout, Duration::from_secs(10));
    assert_eq!(l.pools[0].shared, Some(wasmgate::config::SharedSpec::default()));
}

#[test]
fn pool_and_endpoint_metrics_move_with_traffic_and_health() {
    let a = Upstream::echo("a:");
    let down = common::closed_port();
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "gateway.toml",
        config(&[a.addr, down], "eject_for = \"30s\"\n").as_bytes(),
    );
    let served = common::Service::start(&["--config", &path, "--metrics", "127.0.0.1:0"]);
    let metrics = served.metrics_addr();
    // Clients until three have drawn the ICMP error from the closed port (their
    // first datagram is lost; three in a row eject it), and three that are answered.
    let mut answered = 0;
    for _ in 0..60 {
        let c = client();
        c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        c.send_to(b"m", served.addr).unwrap();
        let mut buf = [0u8; 16];
        if c.recv_from(&mut buf).is_ok() {
            answered += 1;
        }
        if answered >= 3
            && common::sample(
                &common::scrape(metrics),
                "wasmgate_sessions_created_total{listener=\"fwd\"}",
            ) >= answered as f64 + 3.0
        {
            break;
        }
    }
    let label = |addr: SocketAddr| format!("{{listener=\"fwd\",pool=\"backend\",endpoint=\"{addr}\"}}");
    wait_until("the ejection to show", || {
        common::sample(
            &common::scrape(metrics),
            &format!("wasmgate_endpoint_healthy{}", label(down)),
        ) == 0.0
    });
    let body = common::scrape(metrics);
    let get = |name: &str, addr: SocketAddr| common::sample(&body, &format!("{name}{}", label(addr)));
    assert_eq!(get("wasmgate_endpoint_healthy", a.addr), 1.0);
    assert_eq!(get("wasmgate_endpoint_datagrams_sent_total", a.addr), answered as f64);
    assert_eq!(
        get("wasmgate_endpoint_datagrams_received_total", a.addr),
        answered as f64
    );
    assert_eq!(
        get("wasmgate_endpoint_bytes_received_total", a.addr),
        3.0 * answered as f64,
        "a:m"
    );
    assert_eq!(get("wasmgate_endpoint_sessions_active", a.addr), answered as f64);
    assert_eq!(get("wasmgate_endpoint_sessions_created_total", a.addr), answered as f64);
    assert_eq!(
        get("wasmgate_endpoint_sessions_active", down),
        0.0,
        "closed when refused"
    );
    assert!(get("wasmgate_endpoint_datagrams_sent_total", down) >= 3.0);
    assert_eq!(get("wasmgate_endpoint_refusals_total", down), 3.0);
    assert_eq!(get("wasmgate_endpoint_ejections_total", down), 1.0);
    assert_eq!(get("wasmgate_endpoint_refusals_total", a.addr), 0.0);
    let listener = |name: &str| common::sample(&body, &format!("{name}{{listener=\"fwd\"}}"));
    assert_eq!(
        listener("wasmgate_datagrams_forwarded_total"),
        listener("wasmgate_datagrams_received_total")
    );
    assert_eq!(listener("wasmgate_sessions_active"), answered as f64);
}
