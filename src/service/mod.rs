//! Running wasmgate as a service: every listener with its own sandbox, gateway and
//! reloader, the metrics endpoint, upstream pools kept current (SIGHUP, a change
//! of the config file, host names looked up again), and the signals (SIGHUP
//! reloads every module; SIGINT and SIGTERM stop reading, answer what is in
//! flight, and exit).

pub mod exposition;
mod guest_metrics;
pub mod reload;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::config::{ListenerSpec, PoolSpec};
use crate::engine::child::Compiler;
use crate::gateway::{Gateway, Publisher};
use crate::guest::{Env, Runtime};
use crate::service::reload::{Reloader, Role};

/// File descriptors kept for everything but sessions: listener sockets, module
/// files, the watcher, the metrics endpoint.
const FD_RESERVE: u64 = 256;

/// Scales every pool's `max_sessions` down in proportion (to at least `floor`,
/// the most workers of any listener, each of which needs a share), so that all
/// of them together fit in `budget` sockets. Returns the total they asked for
/// when it had to. A shared pool is left out: its sockets are a few per
/// endpoint and worker, and its `max_sessions` counts client handles.
fn fit_sessions(pools: &mut [&mut PoolSpec], budget: u64, floor: usize) -> Option<usize> {
    let asked: usize = pools
        .iter()
        .filter(|p| p.shared.is_none())
        .map(|p| p.max_sessions)
        .sum();
    if asked as u64 <= budget {
        return None;
    }
    for p in pools.iter_mut().filter(|p| p.shared.is_none()) {
        let scaled = (p.max_sessions as u128 * u128::from(budget) / asked as u128) as usize;
        p.max_sessions = scaled.max(floor).min(p.max_sessions);
    }
    Some(asked)
}

/// One listener, serving.
struct Running {
    spec: ListenerSpec,
    gateway: Gateway,
    reloader: Option<Reloader>,
    /// `--candidate`'s reloader.
    candidate: Option<Reloader>,
}

/// Serves `listeners` (and metrics at `metrics`) until SIGINT or SIGTERM.
/// Every module is loaded and checked before anything binds, so a bad one stops
/// start-up with its file and reason and nothing half-started. Modules are
/// compiled by `compiler`, at start-up and on reload.
/// `config` is the file the listeners came from, if any: its pools are read
/// again on SIGHUP and when it changes.
pub fn run(
    listeners: Vec<ListenerSpec>,
    config: Option<&Path>,
    metrics: Option<SocketAddr>,
    compiler: &Compiler,
) -> anyhow::Result<()> {
    run_until(listeners, config, metrics, compiler, terminated, |_| {})
}

/// The binary's shutdown: SIGINT (Ctrl-C) or SIGTERM. Registered when called
/// (inside the runtime), so a signal sent once "serving" is logged is handled.
fn terminated() -> anyhow::Result<impl Future<Output = ()>> {
    let register = |kind: SignalKind, name: &str| signal(kind).with_context(|| format!("cannot listen for {name}"));
    let mut interrupt = register(SignalKind::interrupt(), "SIGINT")?;
    let mut terminate = register(SignalKind::terminate(), "SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// What a started service is bound to: each listener's name and address, and
/// the metrics endpoint's (the real ports where 0 was asked for).
#[derive(Clone, Debug)]
pub struct Bound {
    pub listeners: Vec<(String, SocketAddr)>,
    pub metrics: Option<SocketAddr>,
}

/// As [`run`], but serving until the future `shutdown()` makes completes (it is
/// called inside the service's runtime), and telling `ready` what every
/// listener (and the metrics endpoint) is bound to once all of them serve:
/// tests and embedders run the whole service in-process on port 0 this way
/// (mini-redis's `server::run(listener, shutdown)`).
pub fn run_until<S: Future<Output = ()>>(
    listeners: Vec<ListenerSpec>,
    config: Option<&Path>,
    metrics: Option<SocketAddr>,
    compiler: &Compiler,
    shutdown: impl FnOnce() -> anyhow::Result<S>,
    ready: impl FnOnce(&Bound),
) -> anyhow::Result<()> {
    // One engine for the process, with an instance slot per worker of every
    // listener plus one each for checking a reloaded module. Pooled, so that
    // a fresh instance per datagram (`--isolation fresh`, WASI commands) is
    // cheap whatever module a listener starts or is reloaded with; each
    // store is still held to its own listener's memory cap.
    let mut slots = 0u32;
    for spec in &listeners {
        let workers = spec.workers.max(1);
        let mut wanted = workers + 1;
        if let Some(c) = &spec.candidate {
            // The shadow's instance, the candidate's reload check, and a
            // canary instance per worker.
            wanted += 2 + if c.canary_percent > 0.0 { workers } else { 0 };
        }
        slots = slots.saturating_add(u32::try_from(wanted)?);
    }
    let runtime = Runtime::with_instance_pool(slots).context("cannot start the WebAssembly engine")?;
    let mut loaded = Vec::new();
    for spec in listeners {
        // Every endpoint resolves before anything binds.
        for pool in &spec.pools {
            pool.resolve().with_context(|| format!("listener `{}`", spec.name))?;
        }
        let env = Env::on(Arc::clone(&runtime), spec.limits).with_compiler(compiler.clone());
        if let Some(cluster) = &spec.cluster {
            if cluster.namespace.is_none() && spec.name == crate::config::DEFAULT_LISTENER_NAME {
                tracing::warn!(
                    redis = crate::text::redacted(&cluster.url),
                    "state: shared through Redis under the name `{}`, as every gateway started \
                     from flags is: unrelated services on this Redis share their buckets, counters and \
                     penalties; give --state-redis-namespace to keep them apart",
                    spec.name
                );
            }
            env.state()
                .join_cluster(&spec.name, cluster)
                .with_context(|| format!("listener `{}`", spec.name))?;
        }
        let program = env
            .load_file(spec.module.as_deref())
            .with_context(|| format!("listener `{}`", spec.name))?;
        loaded.push((spec, env, program));
    }

    let mut fd_budget = None;
    if loaded.iter().any(|(spec, _, _)| !spec.pools.is_empty()) {
        // A socket per session: the default soft limit (often 1,024) would cap
        // sessions long before max_sessions does.
        let limit = crate::upstream::raise_fd_limit()?;
        let budget = limit.saturating_sub(FD_RESERVE);
        fd_budget = Some(budget);
        let floor = loaded.iter().map(|(spec, _, _)| spec.workers).max().unwrap_or(1);
        let mut pools: Vec<&mut PoolSpec> = loaded
            .iter_mut()
            .flat_map(|(spec, _, _)| spec.pools.iter_mut())
            .collect();
        match fit_sessions(&mut pools, budget, floor) {
            Some(asked) => tracing::warn!(
                open_files = limit,
                max_sessions = asked,
                "the open-file limit is below the pools' max_sessions: each pool's max_sessions is scaled down to fit; \
                 raise the hard limit (ulimit -Hn, LimitNOFILE=) to have them all"
            ),
            None => tracing::debug!(open_files = limit, "open-file limit"),
        }
    }

    let mut running = Vec::new();
    for (spec, env, program) in loaded {
        let gateway = Gateway::start(&env, program, &spec).with_context(|| format!("listener `{}`", spec.name))?;
        // Watch before saying "serving": a change made after that line must be seen.
        let candidate = match &spec.candidate {
            Some(c) => {
                let publisher = gateway.publisher();
                Some(Reloader::start_as(
                    Role::Candidate,
                    env.clone(),
                    c.path.clone(),
                    publisher,
                    spec.watch,
                )?)
            }
            None => None,
        };
        let reloader = match &spec.module {
            Some(path) => Some(Reloader::start(env, path.clone(), gateway.publisher(), spec.watch)?),
            None => None,
        };
        running.push(Running {
            spec,
            gateway,
            reloader,
            candidate,
        });
    }
    serve_until_stopped(running, config, metrics, fd_budget, shutdown, ready)
}

fn serve_until_stopped<S: Future<Output = ()>>(
    running: Vec<Running>,
    config: Option<&Path>,
    metrics: Option<SocketAddr>,
    fd_budget: Option<u64>,
    shutdown: impl FnOnce() -> anyhow::Result<S>,
    ready: impl FnOnce(&Bound),
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Registered before "serving" is logged: a signal sent after that line must be
    // handled, not fatal.
    let (signals, shutdown, metrics_server, metrics_bound) = {
        let _runtime = runtime.enter();
        let signals = Signals::new()?;
        let shutdown = shutdown()?;
        let metrics_server = match metrics {
            Some(addr) => {
                let listener =
                    std::net::TcpListener::bind(addr).with_context(|| format!("cannot serve metrics on {addr}"))?;
                listener.set_nonblocking(true)?;
                let local = listener.local_addr()?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let registry = crate::service::exposition::registry(
                    running
                        .iter()
                        .map(|r| (r.spec.name.clone(), r.gateway.publisher()))
                        .collect(),
                );
                tracing::info!(metrics = %format_args!("http://{local}/metrics"), "serving metrics");
                Some((
                    runtime.spawn(crate::service::exposition::serve(listener, Arc::new(registry))),
                    local,
                ))
            }
            None => None,
        };
        let metrics_bound = metrics_server.as_ref().map(|(_, local)| *local);
        (signals, shutdown, metrics_server.map(|(task, _)| task), metrics_bound)
    };
    for r in &running {
        let program = r.gateway.program();
        tracing::info!(
            listener = r.spec.name,
            listen = %r.gateway.local_addr(),
            module = program.origin(),
            abi = program.kind().name(),
            sha256 = program.short_sha256(),
            // Compiling (or finding it in the cache), checking and trying it out.
            load_ms = program.compile_time().as_millis() as u64,
            workers = r.spec.workers,
            // A WASI command gets a fresh instance per datagram, whatever was asked.
            isolation = %program.isolation(r.spec.isolation),
            timeout_ms = r.spec.limits.timeout.as_millis() as u64,
            max_memory = r.spec.limits.max_memory,
            max_reply_ratio = r.spec.max_reply_ratio,
            batch = r.spec.batch,
            proxy_protocol_from = %r.spec.proxy_protocol_from,
            watch = r.reloader.is_some() && r.spec.watch,
            upstreams = r.gateway.publisher().pools().map(|p| p.describe()).unwrap_or_default(),
            "serving"
        );
        if let (Some(c), Some(program)) = (&r.spec.candidate, r.gateway.publisher().candidate()) {
            tracing::info!(
                listener = r.spec.name,
                candidate = program.origin(),
                sha256 = program.short_sha256(),
                shadow_sample = c.shadow_sample,
                canary_percent = c.canary_percent,
                promote_after = c.promote_after,
                mismatches = c.mismatches.as_ref().map(|m| m.display().to_string()),
                "candidate loaded beside the active module"
            );
        }
        let forwards = program
            .imports()
            .iter()
            // Not for components: their toolchains import every function of the world.
            .any(|i| i == "wasmgate.forward" || i == "wasmgate.forward_key");
        if forwards && r.spec.pools.is_empty() {
            tracing::warn!(
                listener = r.spec.name,
                module = program.origin(),
                "the module imports wasmgate.forward, but the listener has no upstream pools: every forward \
                 will be refused as unknown_pool; add --upstream NAME=ENDPOINTS or [upstreams.NAME]"
            );
        }
    }
    let reloaders: Vec<&Reloader> = running
        .iter()
        .flat_map(|r| r.reloader.iter().chain(&r.candidate))
        .collect();
    let publishers: Vec<(String, Publisher)> = running
        .iter()
        .filter(|r| r.spec.candidate.is_some())
        .map(|r| (r.spec.name.clone(), r.gateway.publisher()))
        .collect();
    let pools = PoolKeeper::new(config, &running, fd_budget);
    ready(&Bound {
        listeners: running
            .iter()
            .map(|r| (r.spec.name.clone(), r.gateway.local_addr()))
            .collect(),
        metrics: metrics_bound,
    });
    let logs: Vec<Publisher> = running
        .iter()
        .filter(|r| r.spec.access_log.is_some())
        .map(|r| r.gateway.publisher())
        .collect();
    runtime.block_on(signals.wait(&reloaders, &publishers, &logs, pools, shutdown));
    // Every listener stops reading and every reloader stops publishing at once,
    // before saying so; then each worker answers the batch it holds.
    for r in &running {
        r.gateway.stop_reading();
        for reloader in r.reloader.iter().chain(&r.candidate) {
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
        reloaders.extend(r.candidate);
        let stats = r.gateway.shutdown();
        tracing::info!(listener = r.spec.name, %stats, "stopped");
    }
    // A reload still compiling is waited for briefly, then left behind; so is
    // a pool reload still looking up names.
    drop(reloaders);
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// Keeps every listener's upstream pools current: on SIGHUP and when the config
/// file changes (checked every second), the pools are read from the file again;
/// host names are looked up again every `resolve_every`. The work (file, DNS)
/// runs on a blocking thread, one reload at a time, so that signals are never
/// kept waiting. An invalid change is logged and the old pools keep serving.
struct PoolKeeper {
    config: Option<PathBuf>,
    /// The file's identity (device, inode, size, mtime) when last read.
    seen: Option<(u64, u64, u64, i64, i64)>,
    targets: Arc<Vec<(String, Publisher)>>,
    last_resolve: Instant,
    busy: Option<tokio::task::JoinHandle<()>>,
    /// A reload asked for while another ran (SIGHUP), done at the next tick.
    pending: Option<(&'static str, bool)>,
    /// Sockets the sessions of every pool may have together; pools read again
    /// are fitted into it as at start-up.
    fd_budget: Option<u64>,
}

impl PoolKeeper {
    fn new(config: Option<&Path>, running: &[Running], fd_budget: Option<u64>) -> Self {
        // Every listener: one started without pools is told, when the file
        // gives it some, that this needs a restart.
        let targets: Vec<(String, Publisher)> = running
            .iter()
            .map(|r| (r.spec.name.clone(), r.gateway.publisher()))
            .collect();
        Self {
            // Unknown at first: the first tick reads the file again, so that a
            // change made while the modules compiled is not missed (an unchanged
            // file changes nothing).
            seen: None,
            config: config.map(Path::to_path_buf),
            targets: Arc::new(targets),
            last_resolve: Instant::now(),
            busy: None,
            pending: None,
            fd_budget,
        }
    }

    /// Called every second: reloads when the config file changed or names are due.
    fn tick(&mut self) {
        if let Some((why, from_file)) = self.pending.take() {
            self.reload(why, from_file);
            return;
        }
        if let Some(path) = &self.config {
            let now = identity(path);
            // Marked as seen only once a reload of it has started: a change made
            // while another reload runs is taken at a later tick, not lost.
            if now.is_some() && now != self.seen && self.reload("the config file changed", true) {
                self.seen = now;
                return;
            }
        }
        if self
            .resolve_every()
            .is_some_and(|every| self.last_resolve.elapsed() >= every)
        {
            self.reload("host names are due to be looked up again", false);
        }
    }

    /// Whether some listener serves pools.
    fn serves_pools(&self) -> bool {
        self.targets.iter().any(|(_, p)| p.pools().is_some())
    }

    /// The shortest `resolve_every` of the pools serving now that name a host:
    /// pools a reload brought in count as soon as they serve.
    fn resolve_every(&self) -> Option<Duration> {
        self.targets
            .iter()
            .filter_map(|(_, p)| p.pools())
            .flat_map(|pools| pools.specs())
            .filter(PoolSpec::has_host_names)
            .map(|p| p.resolve_every)
            .min()
    }

    /// Re-reads the pools (from the file when `from_file` and there is one; else
    /// the current ones, with names looked up again) and publishes what changed.
    /// False when another reload is still running (nothing started).
    fn reload(&mut self, why: &'static str, from_file: bool) -> bool {
        if !self.serves_pools() && (self.config.is_none() || !from_file) {
            return false;
        }
        if self.busy.as_ref().is_some_and(|b| !b.is_finished()) {
            self.pending = Some((why, from_file));
            return false;
        }
        self.last_resolve = Instant::now();
        let (targets, config) = (Arc::clone(&self.targets), self.config.clone().filter(|_| from_file));
        let budget = self.fd_budget;
        self.busy = Some(tokio::task::spawn_blocking(move || {
            reload_pools(&targets, config.as_deref(), budget, why);
        }));
        true
    }
}

/// A file's identity, to notice that it changed.
fn identity(path: &Path) -> Option<(u64, u64, u64, i64, i64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

fn reload_pools(targets: &[(String, Publisher)], config: Option<&Path>, fd_budget: Option<u64>, why: &str) {
    let mut specs: Vec<(String, Vec<PoolSpec>)> = match config {
        Some(path) => match crate::config::load(path, 1) {
            Ok(file) => file.listeners.into_iter().map(|l| (l.name, l.pools)).collect(),
            Err(e) => {
                tracing::error!(config = %path.display(), "{why}, but it is refused; the old pools keep serving: {e:#}");
                return;
            }
        },
        None => targets
            .iter()
            .filter_map(|(name, p)| Some((name.clone(), p.pools()?.specs())))
            .collect(),
    };
    if let Some(budget) = fd_budget {
        let floor = targets
            .iter()
            .filter_map(|(_, p)| Some(p.pools()?.workers()))
            .max()
            .unwrap_or(1);
        let mut pools: Vec<&mut PoolSpec> = specs.iter_mut().flat_map(|(_, p)| p.iter_mut()).collect();
        if fit_sessions(&mut pools, budget, floor).is_some() {
            tracing::warn!("{why}: the pools' max_sessions are scaled down to fit the open-file limit");
        }
    }
    for (name, publisher) in targets {
        let Some((_, pools)) = specs.iter().find(|(n, _)| n == name) else {
            // Without a file, only listeners with pools are looked at.
            if config.is_some() {
                tracing::warn!(
                    listener = name,
                    "{why}: the listener is gone from the file; restart to remove it"
                );
            }
            continue;
        };
        if pools.is_empty() && publisher.pools().is_none() {
            continue; // no pools before, none now
        }
        match publisher.set_pools(pools) {
            Ok(true) => {
                let now = publisher.pools().map(|p| p.describe()).unwrap_or_default();
                tracing::info!(listener = name, upstreams = now, "{why}: pools reloaded");
            }
            Ok(false) => tracing::debug!(listener = name, "{why}: the pools are unchanged"),
            Err(e) => tracing::error!(
                listener = name,
                "{why}, but the new pools are refused; the old ones keep serving: {e:#}"
            ),
        }
    }
}

/// SIGHUP and SIGUSR1, registered up front (shutdown comes from the caller).
struct Signals {
    hangup: Signal,
    user1: Signal,
}

impl Signals {
    /// Registers the handlers; must run inside the runtime.
    fn new() -> anyhow::Result<Self> {
        let register = |kind: SignalKind, name: &str| signal(kind).with_context(|| format!("cannot listen for {name}"));
        Ok(Self {
            hangup: register(SignalKind::hangup(), "SIGHUP")?,
            user1: register(SignalKind::user_defined1(), "SIGUSR1")?,
        })
    }

    /// Reloads (and opens the access logs again) on SIGHUP, promotes
    /// candidates on SIGUSR1; returns when `shutdown` completes.
    async fn wait(
        mut self,
        reloaders: &[&Reloader],
        candidates: &[(String, Publisher)],
        logs: &[Publisher],
        mut pools: PoolKeeper,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut second = tokio::time::interval(Duration::from_secs(1));
        second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = second.tick() => pools.tick(),
                _ = self.user1.recv() => {
                    let mut promoted = false;
                    for (listener, publisher) in candidates {
                        promoted |= publisher.promote();
                        tracing::debug!(listener, "SIGUSR1");
                    }
                    if !promoted {
                        tracing::warn!("SIGUSR1: no listener has a candidate loaded; nothing to promote");
                    }
                }
                _ = self.hangup.recv() => {
                    // logrotate's convention: the file was moved away; a new one is made.
                    for log in logs {
                        log.reopen_access_log();
                    }
                    pools.reload("SIGHUP", true);
                    if reloaders.is_empty() && !pools.serves_pools() && pools.config.is_none() && logs.is_empty() {
                        tracing::warn!("SIGHUP: only the embedded guest is served, there is no module file to reload");
                    } else if !reloaders.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_past_the_open_file_budget_are_scaled_down_in_proportion() {
        let mut a = PoolSpec::new("a", vec![]);
        let mut b = PoolSpec::new("b", vec![]);
        (a.max_sessions, b.max_sessions) = (30_000, 10_000);
        assert_eq!(fit_sessions(&mut [&mut a, &mut b], 40_000, 1), None, "they fit");
        assert_eq!((a.max_sessions, b.max_sessions), (30_000, 10_000));
        assert_eq!(fit_sessions(&mut [&mut a, &mut b], 800, 1), Some(40_000));
        assert_eq!((a.max_sessions, b.max_sessions), (600, 200));
        let mut tiny = PoolSpec::new("t", vec![]);
        tiny.max_sessions = 1;
        fit_sessions(&mut [&mut tiny, &mut a], 10, 1);
        assert_eq!(tiny.max_sessions, 1, "never below one");
        (a.max_sessions, b.max_sessions) = (600, 200);
        fit_sessions(&mut [&mut a, &mut b], 10, 4);
        assert_eq!(
            (a.max_sessions, b.max_sessions),
            (7, 4),
            "never below a session per worker"
        );
        // A shared pool's max_sessions counts handles, not sockets: left as it is.
        let mut shared = PoolSpec {
            shared: Some(crate::config::SharedSpec::default()),
            max_sessions: 1_000_000,
            ..PoolSpec::new("s", vec![])
        };
        assert_eq!(fit_sessions(&mut [&mut shared], 10, 1), None);
        assert_eq!(shared.max_sessions, 1_000_000);
    }

    fn config_with_endpoint(path: &Path, endpoint: &str) {
        let text = format!(
            "[[listener]]\nname = \"default\"\nlisten = \"127.0.0.1:0\"\n\n\
             [upstreams.backend]\nendpoints = [\"{endpoint}\"]\n"
        );
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_config_edit_made_while_a_reload_runs_is_taken_once_that_reload_ends() {
        // Before: the edit was marked as seen while the running reload blocked
        // the new one, so it was never applied.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmgate.toml");
        config_with_endpoint(&path, "127.0.0.1:1001");
        let env = Env::new(crate::config::Limits::default()).unwrap();
        let program = env.load("<embedded>", crate::DEFAULT_GUEST_WASM).unwrap();
        let config = ListenerSpec {
            listen: "127.0.0.1:0".parse().unwrap(),
            workers: 1,
            pools: vec![PoolSpec::new("backend", vec!["127.0.0.1:1001".into()])],
            ..ListenerSpec::default()
        };
        let gateway = Gateway::start(&env, program, &config).unwrap();
        let publisher = gateway.publisher();
        let endpoints = || {
            let pools = publisher.pools().unwrap();
            let addrs: Vec<String> = pools
                .endpoints(Instant::now())
                .iter()
                .map(|e| e.addr.to_string())
                .collect();
            addrs
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut keeper = PoolKeeper {
                config: Some(path.clone()),
                seen: identity(&path),
                targets: Arc::new(vec![("default".into(), gateway.publisher())]),
                last_resolve: Instant::now(),
                busy: None,
                pending: None,
                fd_budget: None,
            };
            // A slow reload (a name that takes long to look up) is running...
            let (release, held) = std::sync::mpsc::channel::<()>();
            keeper.busy = Some(tokio::task::spawn_blocking(move || {
                let _ = held.recv();
            }));
            // ...when the file is edited. Two ticks see the edit and wait.
            std::thread::sleep(Duration::from_millis(20)); // a new mtime
            config_with_endpoint(&path, "127.0.0.1:1002");
            keeper.tick();
            keeper.tick();
            assert_eq!(endpoints(), ["127.0.0.1:1001"], "nothing applied while busy");
            release.send(()).unwrap();
            while !keeper.busy.as_ref().is_some_and(|b| b.is_finished()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // The next ticks take the edit.
            for _ in 0..100 {
                keeper.tick();
                if endpoints() == ["127.0.0.1:1002"] {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(endpoints(), ["127.0.0.1:1002"], "the edit was lost");
        });
        gateway.shutdown();
    }
}
