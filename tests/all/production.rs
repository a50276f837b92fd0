//! Running it in production, with the built binary: listeners from a config file,
//! Prometheus metrics, JSON logs, graceful shutdown, and the `send` client.

use crate::common;

use std::time::Duration;

use common::{ask, client};

#[test]
fn the_example_config_file_is_valid() {
    let file = wasmgate::config::load(std::path::Path::new("examples/wasmgate.toml"), 2).unwrap();
    let names: Vec<&str> = file.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["upper", "echo"]);
    assert!(file.metrics.is_some());
}

#[test]
fn the_whole_service_runs_in_process_serves_every_listener_and_stops_when_told() {
    use wasmgate::config::{DEFAULT_BATCH, DEFAULT_REPLY_RATIO, ListenerSpec};
    use wasmgate::config::{Isolation, Limits};
    use wasmgate::engine::child::Compiler;
    use wasmgate::net::source_filter::PortSet;

    let spec = |name: &str| ListenerSpec {
        name: name.to_string(),
        listen: "127.0.0.1:0".parse().unwrap(),
        module: None,
        workers: 1,
        isolation: Isolation::Reuse,
        limits: Limits::default(),
        max_reply_ratio: DEFAULT_REPLY_RATIO,
        batch: DEFAULT_BATCH,
        watch: false,
        pools: Vec::new(),
        deny_source_ports: PortSet::default(),
        proxy_protocol_from: Default::default(),
        record: None,
        access_log: None,
        candidate: None,
        cluster: None,
    };
    let (ready, bound) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = std::thread::spawn(move || {
        wasmgate::service::run_until(
            vec![spec("a"), spec("b")],
            None,
            None,
            &Compiler::InProcess,
            move || {
                Ok(async move {
                    let _ = stopped.await;
                })
            },
            move |bound| ready.send(bound.listeners.clone()).unwrap(),
        )
    });
    let bound = bound.recv_timeout(Duration::from_secs(60)).unwrap();
    let names: Vec<&str> = bound.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let c = client();
    for (_, addr) in &bound {
        assert_ne!(addr.port(), 0, "the real port, not the asked-for 0");
        assert_eq!(ask(&c, *addr, b"in process"), b"IN PROCESS");
    }
    stop.send(()).unwrap();
    service.join().unwrap().unwrap();
    // Stopped: nothing answers any more.
    c.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    c.send_to(b"late", bound[0].1).unwrap();
    assert!(c.recv_from(&mut [0; 16]).is_err(), "a stopped service answered");
}
