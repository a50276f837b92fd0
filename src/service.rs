//! Running wasmgate as a service: every listener with its own sandbox, gateway and
//! reloader, the metrics endpoint, and the signals (SIGHUP reloads every module;
//! SIGINT and SIGTERM stop reading, answer what is in flight, and exit).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::abi::GuestKind;
use crate::cli::load_module;
use crate::compiler::Compiler;
use crate::config::ListenerSpec;
use crate::reload::Reloader;
use crate::sandbox::{Isolation, Sandbox};
use crate::server::{Gateway, ServeConfig};

/// File descriptors kept for everything but sessions: listener sockets, module
/// files, the watcher, the metrics endpoint.
const FD_RESERVE: u64 = 256;

/// One listener, serving.
struct Running {
    spec: ListenerSpec,
    gateway: Gateway,
    reloader: Option<Reloader>,
}

/// Serves `listeners` (and metrics at `metrics`) until SIGINT or SIGTERM.
/// Every module is loaded and checked before anything binds, so a bad one stops
/// start-up with its file and reason and nothing half-started. Modules are
/// compiled by `compiler`, at start-up and on reload. `native_uppercase`
/// is for benchmarks: the guest is replaced by a native function.
pub fn run(
    listeners: Vec<ListenerSpec>,
    metrics: Option<SocketAddr>,
    compiler: &Compiler,
    native_uppercase: bool,
) -> anyhow::Result<()> {
    let mut loaded = Vec::new();
    for spec in listeners {
        let sandbox_for = |pooled: bool| -> anyhow::Result<Sandbox> {
            let sandbox = if pooled {
                // One live instance per worker, plus one for checking a reloaded module.
                Sandbox::with_instance_pool(spec.limits, u32::try_from(spec.workers + 1)?)?
            } else {
                Sandbox::new(spec.limits)?
            };
            Ok(sandbox.with_compiler(compiler.clone()))
        };
        let load = |sandbox: &Sandbox| {
            load_module(sandbox, spec.module.as_deref()).with_context(|| format!("listener `{}`", spec.name))
        };
        // Every endpoint resolves before anything binds.
        for pool in &spec.pools {
            pool.resolve().with_context(|| format!("listener `{}`", spec.name))?;
        }
        let mut sandbox = sandbox_for(spec.isolation == Isolation::Fresh)?;
        let mut program = load(&sandbox)?;
        if spec.isolation == Isolation::Reuse && program.kind() == GuestKind::WasiCommand {
            // A WASI command gets a fresh instance per datagram whatever the
            // isolation, and those come fastest from a pool.
            sandbox = sandbox_for(true)?;
            program = load(&sandbox)?;
        }
        loaded.push((spec, sandbox, program));
    }

    let sessions: usize = loaded
        .iter()
        .map(|(spec, _, _)| spec.pools.iter().map(|p| p.max_sessions).sum::<usize>())
        .sum();
    if sessions > 0 {
        // A socket per session: the default soft limit (often 1,024) would cap
        // sessions long before max_sessions does.
        let limit = crate::upstream::raise_fd_limit()?;
        if sessions as u64 + FD_RESERVE > limit {
            tracing::warn!(
                open_files = limit,
                max_sessions = sessions,
                "the open-file limit is below the pools' max_sessions: past it new sessions fail as upstream_error; \
                 raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower max_sessions"
            );
        } else {
            tracing::debug!(open_files = limit, max_sessions = sessions, "open-file limit");
        }
    }

    let mut running = Vec::new();
    for (spec, sandbox, program) in loaded {
        let config = ServeConfig {
            listen: spec.listen,
            workers: spec.workers,
            isolation: spec.isolation,
            max_reply_ratio: spec.max_reply_ratio,
            batch: spec.batch,
            native_uppercase,
            pools: spec.pools.clone(),
        };
        let gateway =
            Gateway::start(&sandbox, program, &config).with_context(|| format!("listener `{}`", spec.name))?;
        // Watch before saying "serving": a change made after that line must be seen.
        let reloader = match &spec.module {
            Some(path) => Some(Reloader::start(sandbox, path.clone(), gateway.publisher(), spec.watch)?),
            None => None,
        };
        running.push(Running {
            spec,
            gateway,
            reloader,
        });
    }
    serve_until_stopped(running, metrics, native_uppercase)
}

fn serve_until_stopped(running: Vec<Running>, metrics: Option<SocketAddr>, native: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Registered before "serving" is logged: a signal sent after that line must be
    // handled, not fatal.
    let (signals, metrics_server) = {
        let _runtime = runtime.enter();
        let signals = Signals::new()?;
        let metrics_server = match metrics {
            Some(addr) => {
                let listener =
                    std::net::TcpListener::bind(addr).with_context(|| format!("cannot serve metrics on {addr}"))?;
                listener.set_nonblocking(true)?;
                let local = listener.local_addr()?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let registry = crate::exposition::registry(
                    running
                        .iter()
                        .map(|r| (r.spec.name.clone(), r.gateway.publisher()))
                        .collect(),
                );
                tracing::info!(metrics = %format_args!("http://{local}/metrics"), "serving metrics");
                Some(runtime.spawn(crate::exposition::serve(listener, Arc::new(registry))))
            }
            None => None,
        };
        (signals, metrics_server)
    };
    for r in &running {
        let program = r.gateway.program();
        tracing::info!(
            listener = r.spec.name,
            listen = %r.gateway.local_addr(),
            module = program.origin(),
            abi = program.kind().name(),
            sha256 = program.short_sha256(),
            workers = r.spec.workers,
            // A WASI command gets a fresh instance per datagram, whatever was asked.
            isolation = %match program.kind() {
                GuestKind::WasiCommand => Isolation::Fresh,
                GuestKind::AbiV1 => r.spec.isolation,
            },
            timeout_ms = r.spec.limits.timeout.as_millis() as u64,
            max_memory = r.spec.limits.max_memory,
            max_reply_ratio = r.spec.max_reply_ratio,
            batch = r.spec.batch,
            watch = r.reloader.is_some() && r.spec.watch,
            native,
            upstreams = r.gateway.publisher().pools().map(|p| p.describe()).unwrap_or_default(),
            "serving"
        );
    }
    let reloaders: Vec<&Reloader> = running.iter().filter_map(|r| r.reloader.as_ref()).collect();
    runtime.block_on(signals.wait(&reloaders));
    // Every listener stops reading and every reloader stops publishing at once,
    // before saying so; then each worker answers the batch it holds.
    for r in &running {
        r.gateway.stop_reading();
        if let Some(reloader) = &r.reloader {
            reloader.stop();
        }
    }
    tracing::info!("shutting down: no new datagrams are read; answering those in flight");
    if let Some(task) = metrics_server {
        task.abort();
    }
    let mut reloaders = Vec::new();
    for r in running {
        reloaders.extend(r.reloader);
        let stats = r.gateway.shutdown();
        tracing::info!(listener = r.spec.name, %stats, "stopped");
    }
    // A reload still compiling is waited for briefly, then left behind.
    drop(reloaders);
    Ok(())
}

/// The signals the gateway acts on, registered up front.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    /// Registers the handlers; must run inside the runtime.
    fn new() -> anyhow::Result<Self> {
        let register = |kind: SignalKind, name: &str| signal(kind).with_context(|| format!("cannot listen for {name}"));
        Ok(Self {
            interrupt: register(SignalKind::interrupt(), "SIGINT")?,
            terminate: register(SignalKind::terminate(), "SIGTERM")?,
            hangup: register(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Reloads on SIGHUP; returns on SIGINT (Ctrl-C) or SIGTERM.
    async fn wait(mut self, reloaders: &[&Reloader]) {
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => return,
                _ = self.terminate.recv() => return,
                _ = self.hangup.recv() => {
                    if reloaders.is_empty() {
                        tracing::warn!("SIGHUP: only the embedded guest is served, there is no module file to reload");
                    } else {
                        tracing::info!("SIGHUP: reloading every module");
                        for reloader in reloaders {
                            reloader.force();
                        }
                    }
                }
            }
        }
    }
}
