//! The host side of the `wasmgate:handler` worlds (`wit/handler.wit`): the
//! bindings, the store's data ([`ComponentHost`]), the world's imports (each an
//! adapter from WIT types to the host calls of `guest::host`), WASI 0.2 denied,
//! and the linked component's typed exports.

use bytes::Bytes;
use wasmtime::component::{Component, ComponentExportIndex, Func, InstancePre, Linker, Resource, ResourceTable};
use wasmtime::{Engine, StoreContextMut};
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::log_pipe::LogPipe;
use crate::guest::host::{Calls, CallsView, Update};
use crate::metrics::guest::{MetricKind, Recorded, Spec};
use crate::verdict::{CallError, MetricError, StateError};

/// The world files, compiled in so that `wasmgate new` can write them out.
pub const HANDLER_WIT: &str = include_str!("../../../wit/handler.wit");

/// The export every component handler has.
pub const HANDLE: &str = "handle";

/// The export of the `proxy` world, for answers from upstreams.
pub const ON_REPLY: &str = "on-reply";

/// The exports of the `probes` world, for a handler that writes its pools'
/// health probes (both or neither).
pub(crate) const PROBE: &str = "probe";
pub(crate) const PROBE_REPLY: &str = "probe-reply";

/// The package whose interfaces the gateway provides besides WASI.
pub(super) const PACKAGE: &str = "wasmgate:handler/";

/// The functions the gateway provides at the top level of the world.
pub(super) const WORLD_FUNCTIONS: [&str; 4] = ["log", "forward", "forward-key", "send"];

/// The host side of the worlds, generated from `wit/handler.wit`: the world
/// with both exports of a proxy (the probes' are looked up on their own).
pub(crate) mod bindings {
    wasmtime::component::bindgen!({ path: "wit", world: "stateful-proxy" });
}

/// The `metered-proxy` world: every import (`clients` and `metrics` too), for the linker.
mod shared_bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "metered-proxy",
        with: {
            "wasmgate:handler/types": crate::guest::component::host::bindings::wasmgate::handler::types,
            "wasmgate:handler/state": crate::guest::component::host::bindings::wasmgate::handler::state,
        },
    });
}

/// The `handler` world: the same imports, without `on-reply`.
mod handler_bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "handler",
        with: { "wasmgate:handler/types": crate::guest::component::host::bindings::wasmgate::handler::types },
    });
}

use bindings::wasmgate::handler::state::StateError as WitStateError;
use bindings::wasmgate::handler::types::CallError as WitCallError;

/// Per-store state of a component instance.
pub(crate) struct ComponentHost {
    /// What the forwarding verbs and `log` work on, as for ABI v1.
    pub(crate) calls: Calls,
    wasi: WasiCtx,
    table: ResourceTable,
    stdout: LogPipe,
    stderr: LogPipe,
    /// Label values joined for a metric update, kept to reuse its allocation.
    joined: Vec<u8>,
}

impl ComponentHost {
    pub(crate) fn new(calls: Calls) -> Self {
        let (stdout, stderr) = (LogPipe::default(), LogPipe::default());
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .max_random_size(crate::guest::wasi_command::host::MAX_RANDOM_BYTES)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            calls,
            wasi,
            table: ResourceTable::new(),
            stdout,
            stderr,
            joined: Vec::new(),
        }
    }

    /// What the component wrote to stdout and stderr since this was last asked.
    pub(crate) fn take_output(&mut self) -> (Bytes, Bytes) {
        (self.stdout.take(), self.stderr.take())
    }
}

impl CallsView for ComponentHost {
    fn calls(&self) -> &Calls {
        &self.calls
    }

    fn calls_mut(&mut self) -> &mut Calls {
        &mut self.calls
    }
}

impl WasiView for ComponentHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl From<CallError> for WitCallError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::UnknownPool => Self::UnknownPool,
            CallError::NoHealthyEndpoint => Self::NoHealthyEndpoint,
            CallError::SessionOverflow => Self::SessionOverflow,
            CallError::Oversize => Self::Oversize,
            CallError::NoClient => Self::NoClient,
            CallError::UpstreamError => Self::UpstreamError,
            CallError::Amplification => Self::Amplification,
            CallError::TooMany => Self::TooManyCalls,
        }
    }
}

impl bindings::StatefulProxyImports for ComponentHost {
    fn log(&mut self, level: u8, message: String) {
        self.calls.log(i32::from(level), message.as_bytes());
    }

    fn forward(&mut self, pool: String, datagram: Vec<u8>) -> Result<(), WitCallError> {
        self.calls.forward(pool.as_bytes(), None, &datagram).map_err(Into::into)
    }

    fn forward_key(&mut self, pool: String, key: Vec<u8>, datagram: Vec<u8>) -> Result<(), WitCallError> {
        self.calls
            .forward(pool.as_bytes(), Some(&key), &datagram)
            .map_err(Into::into)
    }

    fn send(&mut self, datagram: Vec<u8>) -> Result<(), WitCallError> {
        self.calls.send(&datagram).map_err(Into::into)
    }
}

impl bindings::wasmgate::handler::types::Host for ComponentHost {}

/// The same top-level imports, as the `metered-proxy` world names them.
impl shared_bindings::MeteredProxyImports for ComponentHost {
    fn log(&mut self, level: u8, message: String) {
        bindings::StatefulProxyImports::log(self, level, message);
    }

    fn forward(&mut self, pool: String, datagram: Vec<u8>) -> Result<(), WitCallError> {
        bindings::StatefulProxyImports::forward(self, pool, datagram)
    }

    fn forward_key(&mut self, pool: String, key: Vec<u8>, datagram: Vec<u8>) -> Result<(), WitCallError> {
        bindings::StatefulProxyImports::forward_key(self, pool, key, datagram)
    }

    fn send(&mut self, datagram: Vec<u8>) -> Result<(), WitCallError> {
        bindings::StatefulProxyImports::send(self, datagram)
    }
}

/// `wasmgate:handler/clients`: `client` and `reply_to` of `guest::host`; the
/// reasons for a refusal are the host's to count.
impl shared_bindings::wasmgate::handler::clients::Host for ComponentHost {
    fn client(&mut self) -> Option<u64> {
        self.calls.client().ok()
    }

    fn reply_to(&mut self, handle: u64) -> bool {
        self.calls.reply_to(handle).is_ok()
    }
}

use shared_bindings::wasmgate::handler::metrics::{MetricError as WitMetricError, MetricKind as WitMetricKind};

impl From<MetricError> for WitMetricError {
    fn from(e: MetricError) -> Self {
        match e {
            MetricError::TooManyCalls => Self::TooManyCalls,
            MetricError::Invalid => Self::Invalid,
            MetricError::Conflict => Self::Conflict,
            MetricError::Unknown => Self::UnknownMetric,
            MetricError::Cap => Self::Cap,
        }
    }
}

impl ComponentHost {
    /// An update of the series of `values`, joined by `\n` as ABI v1 passes
    /// them (a value holding one is invalid: it would name other labels).
    fn metric_update(
        &mut self,
        update: Update,
        id: u32,
        values: &[String],
        value: f64,
    ) -> Result<bool, WitMetricError> {
        if values.iter().any(|v| v.contains('\n')) {
            return Err(self.calls.metric_refused(MetricError::Invalid).into());
        }
        // Joined in a buffer kept from call to call.
        let mut joined = std::mem::take(&mut self.joined);
        joined.clear();
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                joined.push(b'\n');
            }
            joined.extend_from_slice(v.as_bytes());
        }
        let result = self.calls.metric_update(update, id, &joined, value);
        self.joined = joined;
        Ok(result? == Recorded::Series)
    }
}

/// `wasmgate:handler/notes`: `note` of `guest::host`.
impl shared_bindings::wasmgate::handler::notes::Host for ComponentHost {
    fn note(&mut self, text: String) {
        // Past the call limit the note is refused and counted by the host.
        let _ = self.calls.note(text.as_bytes());
    }
}

/// `wasmgate:handler/metrics`: the metric verbs of `guest::host`, typed.
impl shared_bindings::wasmgate::handler::metrics::Host for ComponentHost {
    fn define(
        &mut self,
        kind: WitMetricKind,
        name: String,
        labels: Vec<String>,
        buckets: Vec<f64>,
    ) -> Result<u32, WitMetricError> {
        let kind = match kind {
            WitMetricKind::Counter => MetricKind::Counter,
            WitMetricKind::Gauge => MetricKind::Gauge,
            WitMetricKind::Histogram => MetricKind::Histogram,
        };
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let spec = Spec {
            kind,
            name: &name,
            labels: &labels,
            buckets: &buckets,
        };
        Ok(self.calls.metric_define(&spec)?)
    }

    fn add(&mut self, id: u32, values: Vec<String>, value: f64) -> Result<bool, WitMetricError> {
        self.metric_update(Update::Add, id, &values, value)
    }

    fn set(&mut self, id: u32, values: Vec<String>, value: f64) -> Result<bool, WitMetricError> {
        self.metric_update(Update::Set, id, &values, value)
    }

    fn observe(&mut self, id: u32, values: Vec<String>, value: f64) -> Result<bool, WitMetricError> {
        self.metric_update(Update::Observe, id, &values, value)
    }
}

impl From<StateError> for WitStateError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::TooManyCalls => Self::TooManyCalls,
            StateError::NotFound => Self::NotFound,
            StateError::Full => Self::Full,
            StateError::KeyTooLong => Self::KeyTooLong,
            StateError::ValueTooLong => Self::ValueTooLong,
            StateError::Mismatch => Self::Mismatch,
            StateError::NotACounter => Self::NotACounter,
        }
    }
}

/// `wasmgate:handler/state`: the state verbs of `guest::host`, typed.
impl bindings::wasmgate::handler::state::Host for ComponentHost {
    fn get(&mut self, key: Vec<u8>) -> Result<Option<Vec<u8>>, WitStateError> {
        match self.calls.state_get(&key, <[u8]>::to_vec) {
            Ok(value) => Ok(Some(value)),
            Err(StateError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn set(&mut self, key: Vec<u8>, value: Vec<u8>, ttl_ms: i64) -> Result<(), WitStateError> {
        Ok(self.calls.state_set(&key, &value, ttl_ms)?)
    }

    fn delete(&mut self, key: Vec<u8>) -> Result<bool, WitStateError> {
        Ok(self.calls.state_delete(&key)?)
    }

    fn incr(&mut self, key: Vec<u8>, delta: i64, ttl_ms: i64) -> Result<i64, WitStateError> {
        Ok(self.calls.state_incr(&key, delta, ttl_ms)?)
    }

    fn cas(
        &mut self,
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: i64,
    ) -> Result<bool, WitStateError> {
        match self.calls.state_cas(&key, expected.as_deref(), &value, ttl_ms) {
            Ok(()) => Ok(true),
            Err(StateError::Mismatch) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn limit(&mut self, key: Vec<u8>, rate_per_s: u32, burst: u32) -> Result<bool, WitStateError> {
        Ok(self.calls.limit(&key, rate_per_s, burst)?)
    }

    fn penalize(&mut self, key: Vec<u8>, ttl_ms: i64) -> Result<(), WitStateError> {
        Ok(self.calls.penalize(&key, ttl_ms)?)
    }

    fn penalized(&mut self, key: Vec<u8>) -> Result<bool, WitStateError> {
        Ok(self.calls.penalized(&key)?)
    }
}

/// A linker with the world's imports and WASI 0.2, but for the calls that wait.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<ComponentHost>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    shared_bindings::MeteredProxy::add_to_linker::<_, wasmtime::component::HasSelf<ComponentHost>>(&mut linker, |h| h)?;
    // Waiting blocks the worker in the host, where the epoch deadline cannot reach;
    // a handler has nothing to wait for (its datagram is a parameter), so a wait
    // is a bug or an attack, and traps at once.
    linker.allow_shadowing(true);
    let mut poll = linker.instance(POLL_INTERFACE)?;
    poll.func_wrap(
        "poll",
        |_: StoreContextMut<'_, ComponentHost>, _: (Vec<Resource<DynPollable>>,)| -> wasmtime::Result<(Vec<u32>,)> {
            wasmtime::bail!("{POLL_INTERFACE}.poll: a handler may not wait (it would block the worker)")
        },
    )?;
    poll.func_wrap(
        "[method]pollable.block",
        |_: StoreContextMut<'_, ComponentHost>, _: (Resource<DynPollable>,)| -> wasmtime::Result<()> {
            wasmtime::bail!("{POLL_INTERFACE}.pollable.block: a handler may not wait (it would block the worker)")
        },
    )?;
    Ok(linker)
}

/// The version of `wasi:io/poll` wasmtime-wasi defines; components importing any
/// earlier 0.2.x version are linked to it.
const POLL_INTERFACE: &str = "wasi:io/poll@0.2.12";

/// A component's exports: `handle` (and `on-reply`) typed by the `handler` or
/// the `proxy` world, and the `probes` world's functions if it writes probes.
pub(crate) struct Exports {
    world: World,
    probes: Option<(Func, Func)>,
}

enum World {
    Handler(handler_bindings::Handler),
    Proxy(bindings::StatefulProxy),
}

/// A linked component, ready to instantiate: where its exports are, found once.
#[derive(Clone)]
pub(crate) struct ComponentPre {
    pre: InstancePre<ComponentHost>,
    world: Indices,
    /// `probe` and `probe-reply`, both or neither (checked with the world).
    probes: Option<(ComponentExportIndex, ComponentExportIndex)>,
}

#[derive(Clone)]
enum Indices {
    Handler(handler_bindings::HandlerIndices),
    Proxy(bindings::StatefulProxyIndices),
}

impl ComponentPre {
    /// Links `component` (already checked with [`check`](super::check)).
    pub(crate) fn new(linker: &Linker<ComponentHost>, component: &Component) -> wasmtime::Result<Self> {
        let pre = linker.instantiate_pre(component)?;
        let world = if component.get_export_index(None, ON_REPLY).is_some() {
            Indices::Proxy(bindings::StatefulProxyIndices::new(&pre)?)
        } else {
            Indices::Handler(handler_bindings::HandlerIndices::new(&pre)?)
        };
        let probes = component
            .get_export_index(None, PROBE)
            .zip(component.get_export_index(None, PROBE_REPLY));
        Ok(Self { pre, world, probes })
    }

    pub(crate) fn has_on_reply(&self) -> bool {
        matches!(self.world, Indices::Proxy(_))
    }

    pub(crate) fn writes_probes(&self) -> bool {
        self.probes.is_some()
    }

    pub(crate) fn instantiate(&self, store: &mut wasmtime::Store<ComponentHost>) -> wasmtime::Result<Exports> {
        let instance = self.pre.instantiate(&mut *store)?;
        let world = match &self.world {
            Indices::Handler(i) => World::Handler(i.load(&mut *store, &instance)?),
            Indices::Proxy(i) => World::Proxy(i.load(&mut *store, &instance)?),
        };
        let probes = match self.probes {
            Some((probe, reply)) => {
                let mut func = |index| {
                    instance
                        .get_func(&mut *store, index)
                        .ok_or_else(|| wasmtime::format_err!("a probe export is missing"))
                };
                Some((func(probe)?, func(reply)?))
            }
            None => None,
        };
        Ok(Exports { world, probes })
    }
}

impl Exports {
    pub(crate) fn handle(
        &self,
        store: &mut wasmtime::Store<ComponentHost>,
        datagram: &[u8],
        peer: &str,
    ) -> wasmtime::Result<Option<Vec<u8>>> {
        match &self.world {
            World::Handler(h) => h.call_handle(store, datagram, peer),
            World::Proxy(p) => p.call_handle(store, datagram, peer),
        }
    }

    pub(crate) fn on_reply(
        &self,
        store: &mut wasmtime::Store<ComponentHost>,
        datagram: &[u8],
        peer: &str,
        upstream: &str,
    ) -> wasmtime::Result<Option<Vec<u8>>> {
        match &self.world {
            World::Handler(_) => wasmtime::bail!("the component does not export `{ON_REPLY}`"),
            World::Proxy(p) => p.call_on_reply(store, datagram, peer, upstream),
        }
    }

    /// `probe(endpoint)`: the probe datagram, or `None`.
    pub(crate) fn probe(
        &self,
        store: &mut wasmtime::Store<ComponentHost>,
        endpoint: &str,
    ) -> wasmtime::Result<Option<Vec<u8>>> {
        let Some((probe, _)) = &self.probes else {
            wasmtime::bail!("the component does not export `{PROBE}`")
        };
        let (datagram,) = probe
            .typed::<(&str,), (Option<Vec<u8>>,)>(&*store)?
            .call(store, (endpoint,))?;
        Ok(datagram)
    }

    /// `probe-reply(endpoint, answer)`: whether the endpoint is healthy.
    pub(crate) fn probe_reply(
        &self,
        store: &mut wasmtime::Store<ComponentHost>,
        endpoint: &str,
        answer: &[u8],
    ) -> wasmtime::Result<bool> {
        let Some((_, reply)) = &self.probes else {
            wasmtime::bail!("the component does not export `{PROBE_REPLY}`")
        };
        let (healthy,) = reply
            .typed::<(&str, &[u8]), (bool,)>(&*store)?
            .call(store, (endpoint, answer))?;
        Ok(healthy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn call_errors_reach_components_as_the_same_named_case() {
        for e in CallError::ALL {
            let wit: WitCallError = e.into();
            let wit_name = wit.name().replace('-', "");
            let name = format!("{e:?}").to_lowercase();
            // `TooMany` is `too-many-calls` in the WIT.
            assert!(wit_name.starts_with(&name), "{e:?} -> {wit_name}");
        }
    }
}
