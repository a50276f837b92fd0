//! WebAssembly components as handlers: the `wasmgate:handler` worlds of
//! `wit/handler.wit`, for languages that compile only to components (Python with
//! componentize-py, JavaScript with componentize-js) and for anyone who wants
//! typed bindings.
//!
//! A component is held to what an ABI v1 module is: one instance per worker,
//! reused and replaced after a trap, the epoch deadline, the store's limits, and
//! the reply checks. WASI 0.2 imports (0.2.0 to 0.2.12) are answered by a
//! deny-all context: no directories, no network, no environment, stdin empty,
//! stdout and stderr to the log, and no call that could block the worker outside
//! wasm, where the time budget cannot interrupt it (waiting on a pollable traps).

use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use wasmtime::component::types::{ComponentFunc, ComponentItem};
use wasmtime::component::{Component, Linker, Resource, ResourceTable, Type};
use wasmtime::{Engine, StoreContextMut};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::guest::hostcalls::{self, HostState};
use crate::verdict::{CallError, OUTPUT_CAP, StateError};

/// The world files, compiled in so that `wasmgate new` can write them out.
pub const HANDLER_WIT: &str = include_str!("../../wit/handler.wit");

/// The export every component handler has.
pub const HANDLE: &str = "handle";

/// The export of the `proxy` world, for answers from upstreams.
pub const ON_REPLY: &str = "on-reply";

/// The package whose interfaces the gateway provides besides WASI.
const PACKAGE: &str = "wasmgate:handler/";

/// The functions the gateway provides at the top level of the world.
const WORLD_FUNCTIONS: [&str; 4] = ["log", "forward", "forward-key", "send"];

/// The host side of the worlds, generated from `wit/handler.wit`: the world
/// with every import and both exports.
mod bindings {
    wasmtime::component::bindgen!({ path: "wit", world: "stateful-proxy" });
}

/// The `handler` world: the same imports, without `on-reply`.
mod handler_bindings {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "handler",
        with: { "wasmgate:handler/types": crate::guest::component::bindings::wasmgate::handler::types },
    });
}

use bindings::wasmgate::handler::state::StateError as WitStateError;
use bindings::wasmgate::handler::types::CallError as WitCallError;

/// Per-store state of a component instance.
pub(crate) struct ComponentHost {
    /// What the forwarding verbs and `log` work on, as for ABI v1.
    pub(crate) calls: HostState,
    wasi: WasiCtx,
    table: ResourceTable,
    stdout: LogPipe,
    stderr: LogPipe,
}

impl ComponentHost {
    pub(crate) fn new(calls: HostState) -> Self {
        let (stdout, stderr) = (LogPipe::default(), LogPipe::default());
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .max_random_size(crate::guest::wasi::MAX_RANDOM_BYTES)
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
        }
    }

    /// What the component wrote to stdout and stderr since this was last asked.
    pub(crate) fn take_output(&mut self) -> (Bytes, Bytes) {
        (self.stdout.take(), self.stderr.take())
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
        hostcalls::log_text(&self.calls, i32::from(level), message.as_bytes());
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

/// `wasmgate:handler/state`: the calls of `state_calls.rs`, typed.
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
    bindings::StatefulProxy::add_to_linker::<_, wasmtime::component::HasSelf<ComponentHost>>(&mut linker, |h| h)?;
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

/// A component's exports, typed: the `handler` world or the `proxy` world.
pub(crate) enum Exports {
    Handler(handler_bindings::Handler),
    Proxy(bindings::StatefulProxy),
}

/// A linked component, ready to instantiate.
#[derive(Clone)]
pub(crate) enum ComponentPre {
    Handler(handler_bindings::HandlerPre<ComponentHost>),
    Proxy(bindings::StatefulProxyPre<ComponentHost>),
}

impl ComponentPre {
    /// Links `component` (already checked with [`check`]).
    pub(crate) fn new(linker: &Linker<ComponentHost>, component: &Component) -> wasmtime::Result<Self> {
        let pre = linker.instantiate_pre(component)?;
        if component.get_export_index(None, ON_REPLY).is_some() {
            Ok(Self::Proxy(bindings::StatefulProxyPre::new(pre)?))
        } else {
            Ok(Self::Handler(handler_bindings::HandlerPre::new(pre)?))
        }
    }

    pub(crate) fn has_on_reply(&self) -> bool {
        matches!(self, Self::Proxy(_))
    }

    pub(crate) fn instantiate(&self, store: &mut wasmtime::Store<ComponentHost>) -> wasmtime::Result<Exports> {
        Ok(match self {
            Self::Handler(pre) => Exports::Handler(pre.instantiate(store)?),
            Self::Proxy(pre) => Exports::Proxy(pre.instantiate(store)?),
        })
    }
}

impl Exports {
    pub(crate) fn handle(
        &self,
        store: &mut wasmtime::Store<ComponentHost>,
        datagram: &[u8],
        peer: &str,
    ) -> wasmtime::Result<Option<Vec<u8>>> {
        match self {
            Self::Handler(h) => h.call_handle(store, datagram, peer),
            Self::Proxy(p) => p.call_handle(store, datagram, peer),
        }
    }

    pub(crate) fn on_reply(
        &self,
        store: &mut wasmtime::Store<ComponentHost>,
        datagram: &[u8],
        peer: &str,
        upstream: &str,
    ) -> wasmtime::Result<Option<Vec<u8>>> {
        match self {
            Self::Handler(_) => wasmtime::bail!("the component does not export `{ON_REPLY}`"),
            Self::Proxy(p) => p.call_on_reply(store, datagram, peer, upstream),
        }
    }
}

/// Checks a component against the worlds: `handle` (and `on-reply`, if
/// exported) with the world's types, and nothing imported that the gateway does
/// not provide. Every problem is listed, each with what to do about it.
pub(crate) fn check(engine: &Engine, component: &Component) -> Vec<String> {
    let mut problems = Vec::new();
    let ty = component.component_type();
    for (name, item) in ty.imports(engine) {
        if let Some(problem) = check_import(name, &item.ty) {
            problems.push(problem);
        }
    }
    let exports: Vec<(&str, ComponentItem)> = ty.exports(engine).map(|(n, e)| (n, e.ty)).collect();
    let find = |name: &str| exports.iter().find(|(n, _)| *n == name).map(|(_, item)| item);
    match find(HANDLE) {
        None => problems.push(format!(
            "it exports no `{HANDLE}` function: a handler exports `handle: func(datagram: list<u8>, peer: string) -> option<list<u8>>` (world `handler` in wit/handler.wit)"
        )),
        Some(item) => check_export(HANDLE, item, &["list<u8>", "string"], &mut problems),
    }
    if let Some(item) = find(ON_REPLY) {
        check_export(ON_REPLY, item, &["list<u8>", "string", "string"], &mut problems);
    }
    problems
}

/// The component's world as the gateway sees it: its exports with their
/// types, then its imports by name, one per line, in a stable order (what
/// `wasmgate check` prints, and what a rebuild must keep).
pub(crate) fn describe(engine: &Engine, component: &Component) -> String {
    let ty = component.component_type();
    let mut exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, item)| match item.ty {
            ComponentItem::ComponentFunc(f) => format!("  export {name}: {}", signature(&f)),
            _ => format!("  export {name}"),
        })
        .collect();
    let mut imports: Vec<String> = ty.imports(engine).map(|(name, _)| format!("  import {name}")).collect();
    exports.sort();
    imports.sort();
    let mut text = String::from("world:");
    for line in exports.iter().chain(&imports) {
        text.push('\n');
        text.push_str(line);
    }
    text
}

fn check_import(name: &str, item: &ComponentItem) -> Option<String> {
    if WORLD_FUNCTIONS.contains(&name) || name.starts_with(PACKAGE) {
        return None; // the linker checks their types, naming any mismatch
    }
    if let Some(rest) = name.strip_prefix("wasi:") {
        let version_ok = rest.rsplit_once('@').is_some_and(|(_, v)| v.starts_with("0.2."));
        let provided = ["cli/", "clocks/", "random/", "io/", "filesystem/", "sockets/"]
            .iter()
            .any(|p| rest.starts_with(p));
        if provided && version_ok {
            return None;
        }
        let hint = if rest.starts_with("http/") {
            "; a handler gets its datagram as a parameter and cannot make HTTP requests: rebuild without it \
             (componentize-js: `-d http -d fetch-event`; componentize-py: do not target a world with wasi:http)"
        } else if provided {
            "; the gateway provides WASI 0.2.x: rebuild against WASI 0.2"
        } else {
            ""
        };
        return Some(format!("it imports `{name}`, which the gateway does not provide{hint}"));
    }
    let what = match item {
        ComponentItem::ComponentFunc(_) => "function",
        ComponentItem::ComponentInstance(_) => "interface",
        ComponentItem::Resource(_) => "resource",
        ComponentItem::Type(_) => "type",
        _ => "item",
    };
    Some(format!(
        "it imports the {what} `{name}`, which the gateway does not provide (it provides `log`, `forward`, \
         `forward-key`, `send`, `wasmgate:handler/types`, `wasmgate:handler/state` and WASI 0.2)"
    ))
}

fn check_export(name: &str, item: &ComponentItem, params: &[&str], problems: &mut Vec<String>) {
    let ComponentItem::ComponentFunc(func) = item else {
        problems.push(format!("its export `{name}` is not a function"));
        return;
    };
    let actual = signature(func);
    let expected = format!(
        "func({}) -> option<list<u8>>",
        params
            .iter()
            .zip(["datagram", "peer", "upstream"])
            .map(|(ty, p)| format!("{p}: {ty}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let found: Vec<String> = func.params().map(|(_, t)| wit_type(&t)).collect();
    let results: Vec<String> = func.results().map(|t| wit_type(&t)).collect();
    if found != params || results != ["option<list<u8>>"] {
        problems.push(format!(
            "its export `{name}` is `{actual}`; the world wants `{expected}`"
        ));
    }
}

/// A function type in WIT syntax.
fn signature(func: &ComponentFunc) -> String {
    let mut s = String::from("func(");
    for (i, (name, ty)) in func.params().enumerate() {
        let sep = if i > 0 { ", " } else { "" };
        let _ = write!(s, "{sep}{name}: {}", wit_type(&ty));
    }
    s.push(')');
    let results: Vec<String> = func.results().map(|t| wit_type(&t)).collect();
    if !results.is_empty() {
        let _ = write!(s, " -> {}", results.join(", "));
    }
    s
}

/// A value type in WIT syntax, as far as a mismatch needs it said.
fn wit_type(ty: &Type) -> String {
    match ty {
        Type::Bool => "bool".into(),
        Type::S8 => "s8".into(),
        Type::U8 => "u8".into(),
        Type::S16 => "s16".into(),
        Type::U16 => "u16".into(),
        Type::S32 => "s32".into(),
        Type::U32 => "u32".into(),
        Type::S64 => "s64".into(),
        Type::U64 => "u64".into(),
        Type::Float32 => "f32".into(),
        Type::Float64 => "f64".into(),
        Type::Char => "char".into(),
        Type::String => "string".into(),
        Type::List(l) => format!("list<{}>", wit_type(&l.ty())),
        Type::Option(o) => format!("option<{}>", wit_type(&o.ty())),
        Type::Result(r) => format!(
            "result<{}, {}>",
            r.ok().map_or_else(|| "_".into(), |t| wit_type(&t)),
            r.err().map_or_else(|| "_".into(), |t| wit_type(&t))
        ),
        Type::Tuple(_) => "tuple<…>".into(),
        Type::Record(_) => "record".into(),
        Type::Variant(_) => "variant".into(),
        Type::Enum(_) => "enum".into(),
        Type::Flags(_) => "flags".into(),
        Type::Own(_) | Type::Borrow(_) => "resource".into(),
        _ => "an async type".into(),
    }
}

/// A component's stdout or stderr: kept in memory, at most
/// [`OUTPUT_CAP`] per datagram (the rest dropped, not refused: a chatty `print` must not fail a handler), taken by the host after each call.
#[derive(Clone, Default)]
struct LogPipe(Arc<Pipe>);

#[derive(Default)]
struct Pipe {
    /// Whether anything was written since the last take: most datagrams print
    /// nothing, and are then not charged a lock per stream.
    written: AtomicBool,
    buffer: Mutex<BytesMut>,
}

impl LogPipe {
    fn take(&self) -> Bytes {
        if !self.0.written.swap(false, Ordering::Acquire) {
            return Bytes::new();
        }
        match self.0.buffer.lock() {
            Ok(mut buf) => buf.split().freeze(),
            Err(_) => Bytes::new(),
        }
    }

    fn push(&self, bytes: &[u8]) {
        if let Ok(mut buf) = self.0.buffer.lock() {
            let room = OUTPUT_CAP.saturating_sub(buf.len());
            buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
            self.0.written.store(true, Ordering::Release);
        }
    }
}

impl OutputStream for LogPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always room: what is past the cap is dropped, not refused.
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogPipe {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for LogPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(wat: &str) -> (Engine, Component) {
        let engine = Engine::default();
        let component = Component::new(&engine, wat).unwrap();
        (engine, component)
    }

    /// A component exporting `handle` as `func(x: u32) -> u32`.
    const WRONG_HANDLE: &str = r#"
        (core module $m (func (export "h") (param i32) (result i32) local.get 0))
        (core instance $i (instantiate $m))
        (func $h (param "x" u32) (result u32) (canon lift (core func $i "h")))
        (export "handle" (func $h))"#;

    #[test]
    fn every_problem_of_a_component_is_named_with_what_to_do() {
        let (engine, c) = component(&format!(
            r#"(component
                (import "wasi:http/types@0.2.0" (instance))
                (import "wasi:cli/stdout@0.3.0" (instance))
                (import "acme-thing" (func))
                (import "wasi:clocks/monotonic-clock@0.2.3" (instance))
                {WRONG_HANDLE})"#
        ));
        let problems = check(&engine, &c);
        assert_eq!(problems.len(), 4, "{problems:#?}");
        let has = |needle: &str| problems.iter().any(|p| p.contains(needle));
        assert!(has(
            "`wasi:http/types@0.2.0`, which the gateway does not provide; a handler gets its datagram"
        ));
        assert!(has(
            "`wasi:cli/stdout@0.3.0`, which the gateway does not provide; the gateway provides WASI 0.2.x"
        ));
        assert!(has("the function `acme-thing`, which the gateway does not provide"));
        assert!(
            has(
                "its export `handle` is `func(x: u32) -> u32`; the world wants `func(datagram: list<u8>, peer: string) -> option<list<u8>>`"
            ),
            "{problems:#?}"
        );
        assert!(!has("monotonic-clock"), "WASI 0.2 clocks are provided");
    }

    #[test]
    fn a_component_without_handle_is_told_the_signature_to_export() {
        let (engine, c) = component("(component)");
        let problems = check(&engine, &c);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("exports no `handle` function"), "{problems:?}");
    }

    #[test]
    fn a_description_lists_exports_then_imports_each_sorted() {
        let (engine, c) = component(&format!(
            r#"(component (import "zeta" (func)) (import "alpha" (func)) {WRONG_HANDLE})"#
        ));
        assert_eq!(
            describe(&engine, &c),
            "world:\n  export handle: func(x: u32) -> u32\n  import alpha\n  import zeta"
        );
    }

    #[test]
    fn a_log_pipe_keeps_at_most_max_output_bytes_per_datagram_and_is_emptied_by_take() {
        let pipe = LogPipe::default();
        assert!(pipe.take().is_empty());
        pipe.push(&[b'a'; 1000]);
        pipe.push(&[b'b'; 100]);
        let taken = pipe.take();
        assert_eq!(taken.len(), OUTPUT_CAP);
        assert_eq!(&taken[995..1005], b"aaaaabbbbb");
        assert!(pipe.take().is_empty(), "taken once");
        pipe.push(b"next");
        assert_eq!(&pipe.take()[..], b"next", "the cap is per take, not for ever");
    }

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
