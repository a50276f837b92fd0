//! The WebAssembly sandbox: a listener's limits on the process's one engine
//! ([`Runtime`], `runtime.rs`), loading modules into
//! checked [`Program`]s (`program.rs`), and running a program as a [`Guest`] under
//! time and memory limits, which gives an [`Answer`] or a [`Rejection`] (`outcome.rs`).
//!
//! A [`Guest`] is I/O-free: it takes a datagram and the client's address and says
//! what to send back, so it is tested without a network.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{ExternType, InstancePre, Memory, Module, Store, StoreLimitsBuilder, Trap, TypedFunc};

use crate::abi::{self, GuestKind, NO_REPLY};
use crate::component::{self as wit, ComponentHost, ComponentPre, Exports};
pub use crate::config::{Isolation, Limits};
use crate::engine::child::Compiler;
use crate::engine::ticker::TICK;
use crate::engine::{
    COMPONENT_MAX_INSTANCES, COMPONENT_MAX_MEMORIES, COMPONENT_MAX_TABLES, COMPONENT_TABLE_ELEMENTS, Compiled,
    MAX_TABLE_ELEMENTS, MAX_TABLES,
};
pub use crate::engine::{MAX_MODULE_BYTES, read_module};
use crate::hostcalls::{HostState, Outbox};
use crate::instance_limits::InstanceLimits;
use crate::upstream::Upstreams;
use crate::verdict::{Allowance, CallError, DropReason, MAX_DATAGRAM};
use crate::wasi::{self, WasiHost};

mod outcome;
mod program;
mod runtime;

pub use outcome::{Answer, Rejection};
use program::Pre;
pub use program::{Program, short_hex};
pub use runtime::Runtime;

/// The stack a worker thread needs: wasmtime stops guests at its 512 KiB
/// `max_wasm_stack` default, and the host needs room on top of that.
pub const WORKER_STACK_BYTES: usize = 4 << 20;

/// A listener's guests: the process's [`Runtime`] with this listener's limits.
/// Cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    runtime: Arc<Runtime>,
    limits: Limits,
    /// The time budget in epoch ticks; one more than the timeout so that a
    /// datagram that starts just before a tick still gets its whole budget.
    deadline_ticks: u64,
    compiler: Arc<Compiler>,
}

impl Sandbox {
    /// A sandbox on an engine of its own that maps memory for each instance as
    /// it is made (see [`Runtime::new`]). A process with several listeners
    /// shares one runtime among them instead ([`Sandbox::on`]).
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        Ok(Self::on(Runtime::new()?, limits))
    }

    /// A sandbox on an engine of its own with a pool of `slots` instance slots
    /// (see [`Runtime::with_instance_pool`]).
    pub fn with_instance_pool(limits: Limits, slots: u32) -> anyhow::Result<Self> {
        Ok(Self::on(Runtime::with_instance_pool(slots)?, limits))
    }

    /// A sandbox with `limits` on `runtime`, which other sandboxes may share.
    pub fn on(runtime: Arc<Runtime>, limits: Limits) -> Self {
        Self {
            runtime,
            deadline_ticks: limits.timeout.as_nanos().div_ceil(TICK.as_nanos()) as u64 + 1,
            limits,
            compiler: Arc::new(Compiler::InProcess),
        }
    }

    /// Compiles modules with `compiler` from now on (in-process by default).
    pub fn with_compiler(mut self, compiler: Compiler) -> Self {
        self.compiler = Arc::new(compiler);
        self
    }
}

impl Sandbox {
    /// Whether instances come from a pool ([`Sandbox::with_instance_pool`]).
    pub fn has_instance_pool(&self) -> bool {
        self.runtime.has_instance_pool()
    }

    /// Reads, checks and compiles the module at `path`, or the embedded default guest
    /// if `None`: the one loader that serving, `wasmgate check` and tests share.
    /// Errors name the file and the reason.
    pub fn load_file(&self, path: Option<&Path>) -> anyhow::Result<Program> {
        let Some(path) = path else {
            return self.load(EMBEDDED_ORIGIN, crate::DEFAULT_GUEST_WASM);
        };
        let name = path.display().to_string();
        let bytes = read_module(path).with_context(|| format!("cannot read module {name}"))?;
        self.load(name.clone(), &bytes)
            .with_context(|| format!("module {name}"))
    }

    /// Compiles `bytes` (a `\0asm` binary or WAT text), tells its kind, checks it
    /// against that kind's rules and the limits, and instantiates it once (running
    /// its start function under the time budget) so that a module that cannot serve
    /// is refused here, never on the serving path. `origin` names the module in logs
    /// and errors.
    pub fn load(&self, origin: impl Into<String>, bytes: &[u8]) -> anyhow::Result<Program> {
        let origin = origin.into();
        let started = Instant::now();
        let module = match self.compiler.compile(&self.runtime.engine, bytes)? {
            Compiled::Module(module) => module,
            Compiled::Component(component) => return self.load_component(origin, bytes, &component, started),
        };
        let kind = abi::check_module(&module)?;
        self.check_memory(&module)?;
        let linked = match kind {
            GuestKind::AbiV1 => self.runtime.linker.instantiate_pre(&module).map(Pre::AbiV1),
            GuestKind::WasiCommand => self.runtime.wasi_linker.instantiate_pre(&module).map(Pre::Wasi),
            GuestKind::Component => unreachable!("a core module is never a component"),
        };
        let pre = linked.map_err(anyhow::Error::from).with_context(|| match kind {
            GuestKind::WasiCommand => format!(
                "cannot be linked as {kind}: its imports must be WASI preview 1 functions with their \
                 standard types (in what follows, the \"expected\" type is the module's and the \"found\" one is WASI's)"
            ),
            _ => format!("cannot be linked as {kind}"),
        })?;
        let program = Program {
            origin,
            sha256: Sha256::digest(bytes).into(),
            imports: module
                .imports()
                .map(|i| format!("{}.{}", i.module(), i.name()))
                .collect(),
            pre,
            compile_time: Duration::ZERO,
            on_reply: kind == GuestKind::AbiV1 && module.get_export(abi::ON_REPLY.0).is_some(),
            world: None,
        };
        self.try_out(program, started)
    }

    /// Checks a component against the worlds, links it, and instantiates it once.
    fn load_component(
        &self,
        origin: String,
        bytes: &[u8],
        component: &Component,
        started: Instant,
    ) -> anyhow::Result<Program> {
        let problems = wit::check(&self.runtime.engine, component);
        if !problems.is_empty() {
            return Err(abi::AbiViolations {
                kind: GuestKind::Component,
                problems,
            }
            .into());
        }
        let pre = ComponentPre::new(&self.runtime.component_linker, component)
            .map_err(anyhow::Error::from)
            .context("cannot be linked as the wasmgate:handler world (wit/handler.wit)")?;
        let engine = &self.runtime.engine;
        let ty = component.component_type();
        let program = Program {
            origin,
            sha256: Sha256::digest(bytes).into(),
            imports: ty.imports(engine).map(|(name, _)| name.to_string()).collect(),
            on_reply: pre.has_on_reply(),
            pre: Pre::Component(pre),
            compile_time: Duration::ZERO,
            world: Some(wit::describe(engine, component)),
        };
        self.try_out(program, started)
    }

    /// Instantiates a program once, running its start function under the time
    /// budget, so that one that cannot serve is refused at load.
    fn try_out(&self, mut program: Program, started: Instant) -> anyhow::Result<Program> {
        let trial = match &program.pre {
            Pre::AbiV1(pre) => self.instantiate(pre).map(drop),
            Pre::Wasi(pre) => {
                wasi::warm_up();
                self.instantiate_wasi(pre, &[], None).map(drop)
            }
            Pre::Component(pre) => self.instantiate_component(pre).map(drop),
        };
        if let Err(e) = trial {
            return Err(match e.downcast_ref::<Trap>() {
                Some(Trap::Interrupt) => anyhow::anyhow!(
                    "its start function ran past the {} ms time budget",
                    self.limits.timeout.as_millis()
                ),
                _ if program.kind() == GuestKind::Component => {
                    anyhow::Error::from(e).context("instantiating it failed")
                }
                _ => anyhow::Error::from(e).context("its start function failed"),
            });
        }
        program.compile_time = started.elapsed();
        Ok(program)
    }

    fn check_memory(&self, module: &Module) -> anyhow::Result<()> {
        if let Some(ExternType::Memory(m)) = module.get_export("memory") {
            let need = m.minimum().saturating_mul(m.page_size());
            let cap = self.limits.max_memory as u64;
            if need > cap {
                bail!(
                    "its memory starts at {} bytes ({} pages), over the memory limit of {cap} bytes (--max-memory)",
                    need,
                    m.minimum()
                );
            }
        }
        Ok(())
    }

    /// What an ABI v1 or WASI instance may hold: one memory, a few tables, and
    /// `--max-memory` for all of them together.
    fn instance_limits(&self) -> InstanceLimits {
        let counts = StoreLimitsBuilder::new()
            .memory_size(self.limits.max_memory)
            .table_elements(MAX_TABLE_ELEMENTS)
            .tables(MAX_TABLES)
            .memories(1)
            .instances(1)
            // A guest that outgrows its cap is stopped and replaced, not left to
            // carry on with a failed `memory.grow`.
            .trap_on_grow_failure(true)
            .build();
        InstanceLimits::new(counts, self.limits.max_memory)
    }

    /// The host state of a new store, held to `limits`. There is no client while
    /// the start function runs, whichever datagram the instance is made for:
    /// `peer` says 0.
    fn host_state(&self, limits: InstanceLimits) -> HostState {
        HostState {
            limits,
            peer: None,
            log_limit: Arc::clone(&self.runtime.log_limit),
            net: None,
            out: Outbox::default(),
            upstream: String::new(),
        }
    }

    /// An ABI v1 instance with its start function run.
    fn instantiate(&self, pre: &InstancePre<HostState>) -> wasmtime::Result<Live> {
        let mut store = Store::new(&self.runtime.engine, self.host_state(self.instance_limits()));
        store.limiter(|h| &mut h.limits);
        store.set_epoch_deadline(self.deadline_ticks);
        let instance = pre.instantiate(&mut store)?;
        // The ABI check guarantees these exports and their types.
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| wasmtime::format_err!("no `memory` export"))?;
        let alloc = instance.get_typed_func(&mut store, "alloc")?;
        let handle = instance.get_typed_func(&mut store, "handle")?;
        let on_reply = match instance.get_func(&mut store, abi::ON_REPLY.0) {
            Some(f) => Some(f.typed(&store)?),
            None => None,
        };
        Ok(Live {
            store,
            memory,
            alloc,
            handle,
            on_reply,
            poisoned: false,
        })
    }

    fn instantiate_wasi(
        &self,
        pre: &InstancePre<WasiHost>,
        datagram: &[u8],
        peer: Option<SocketAddr>,
    ) -> wasmtime::Result<(Store<WasiHost>, TypedFunc<(), ()>)> {
        let mut store = Store::new(
            &self.runtime.engine,
            WasiHost::new(self.instance_limits(), datagram, peer),
        );
        store.limiter(|h| &mut h.limits);
        store.set_epoch_deadline(self.deadline_ticks);
        let instance = pre.instantiate(&mut store)?;
        let start = instance.get_typed_func(&mut store, "_start")?;
        Ok((store, start))
    }

    /// A component instance. A component is made of several core instances,
    /// memories and tables (a Python one of a handful of each); the caps bound
    /// how many, and `--max-memory` what they hold together.
    fn instantiate_component(&self, pre: &ComponentPre) -> wasmtime::Result<LiveComponent> {
        let counts = StoreLimitsBuilder::new()
            .memory_size(self.limits.max_memory)
            .table_elements(COMPONENT_TABLE_ELEMENTS)
            .tables(COMPONENT_MAX_TABLES)
            .memories(COMPONENT_MAX_MEMORIES)
            .instances(COMPONENT_MAX_INSTANCES)
            .trap_on_grow_failure(true)
            .build();
        let limits = InstanceLimits::new(counts, self.limits.max_memory);
        let mut store = Store::new(&self.runtime.engine, ComponentHost::new(self.host_state(limits)));
        store.limiter(|h| &mut h.calls.limits);
        store.set_epoch_deadline(self.deadline_ticks);
        let exports = pre.instantiate(&mut store)?;
        Ok(LiveComponent {
            store,
            exports,
            reply: Vec::new(),
            peer: None,
            poisoned: false,
        })
    }

    /// Runs a WASI command on one datagram in a fresh instance: exit status 0
    /// sends what it wrote to stdout, any other status sends nothing.
    fn run_wasi(
        &self,
        pre: &InstancePre<WasiHost>,
        datagram: &[u8],
        peer: SocketAddr,
        max_ratio: f64,
    ) -> Result<Bytes, Rejection> {
        let (mut store, start) = self.instantiate_wasi(pre, datagram, Some(peer))?;
        let status = wasi::exit_status(start.call(&mut store, ()));
        let (stdout, stderr) = (store.data().stdout(), store.data().stderr());
        if !stderr.is_empty() {
            self.log_stderr(&stderr, peer, status.as_ref().ok().copied());
        }
        match status {
            Ok(0) => {
                abi::check_reply_len(stdout.len(), datagram.len(), max_ratio)?;
                Ok(stdout)
            }
            Ok(_) => Err(DropReason::NoReply.into()),
            // A program whose stdout is full may fail on its next write; what it
            // did wrong first is writing more than a datagram.
            Err(_) if stdout.len() > MAX_DATAGRAM => Err(DropReason::Oversize.into()),
            Err(e) => Err(e.into()),
        }
    }

    /// The tick count now, to measure a datagram's handling from.
    fn now(&self) -> u64 {
        self.runtime.ticks()
    }

    /// The epoch deadline interrupts only wasm code; time spent inside a host call
    /// (WASI above all) is checked here, after the fact, in the same ticks, so that
    /// a datagram whose handling ran past the budget is dropped as a timeout all
    /// the same, and one the deadline would have let through is not.
    fn check_budget(&self, started: u64) -> Result<(), Rejection> {
        if self.now().saturating_sub(started) > self.deadline_ticks {
            return Err(DropReason::Timeout.into());
        }
        Ok(())
    }

    fn log_stderr(&self, stderr: &[u8], peer: SocketAddr, status: Option<i32>) {
        if !tracing::enabled!(target: "wasmgate::guest", tracing::Level::INFO) {
            return;
        }
        let Some(suppressed) = self.runtime.log_limit.allow() else {
            return;
        };
        let text = String::from_utf8_lossy(stderr);
        let text = text.trim_end();
        // The exit status, or "trap" when the program did not exit.
        let status = status.map_or_else(|| "trap".to_string(), |s| s.to_string());
        tracing::info!(target: "wasmgate::guest", %peer, %status, suppressed, "stderr: {text}");
    }
}

impl Sandbox {
    /// Passes what a component printed to the log, rate-limited with the guest's
    /// log lines.
    fn log_output(&self, stream: &str, text: &[u8], peer: SocketAddr) {
        if !tracing::enabled!(target: "wasmgate::guest", tracing::Level::INFO) {
            return;
        }
        let Some(suppressed) = self.runtime.log_limit.allow() else {
            return;
        };
        let text = String::from_utf8_lossy(text);
        tracing::info!(target: "wasmgate::guest", %peer, suppressed, "{stream}: {}", text.trim_end());
    }
}

/// How the embedded default guest is named in logs.
pub const EMBEDDED_ORIGIN: &str = "<embedded uppercase guest>";

/// A live instance: its store and the exports the host calls.
struct Live {
    store: Store<HostState>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    handle: TypedFunc<(i32, i32), i64>,
    on_reply: Option<TypedFunc<(i32, i32), i64>>,
    /// The guest misbehaved; this instance must not see another datagram.
    poisoned: bool,
}

/// Which export a call enters.
#[derive(Clone, Copy)]
enum Entry {
    Handle,
    OnReply,
}

/// What one call is about: the datagram, the client, and (for `on_reply`) the
/// endpoint that sent it.
struct Call<'a> {
    entry: Entry,
    datagram: &'a [u8],
    peer: SocketAddr,
    upstream: &'a str,
    /// What the call may do; `None`: what a request of this size earns.
    allowance: Option<Allowance>,
}

impl Live {
    /// Lends the worker's sessions to the store, runs the call, and takes them back
    /// whatever happened.
    fn call(
        &mut self,
        call: &Call<'_>,
        net: &mut Option<Box<Upstreams>>,
        deadline_ticks: u64,
        max_ratio: f64,
    ) -> Result<Option<Range<usize>>, Rejection> {
        self.store.set_epoch_deadline(deadline_ticks);
        let allowance = call
            .allowance
            .unwrap_or_else(|| Allowance::for_request(call.datagram.len(), max_ratio));
        self.store.data_mut().lend(call.peer, net, allowance, call.upstream);
        let result = self.run(call);
        self.store.data_mut().take_back(net);
        result
    }

    /// Copies the datagram in, runs the export, and says where the reply is.
    fn run(&mut self, call: &Call<'_>) -> Result<Option<Range<usize>>, Rejection> {
        let func = match call.entry {
            Entry::Handle => &self.handle,
            // Only called for programs that export it.
            Entry::OnReply => self.on_reply.as_ref().ok_or(DropReason::Trap)?,
        };
        let len = call.datagram.len();
        // `len` is at most MAX_DATAGRAM, so it fits an i32.
        let ptr = self.alloc.call(&mut self.store, len as i32)?;
        let dst = abi::alloc_range(ptr, len, self.memory.data_size(&self.store))?;
        self.memory.data_mut(&mut self.store)[dst].copy_from_slice(call.datagram);
        let packed = func.call(&mut self.store, (ptr, len as i32))?;
        if packed == NO_REPLY {
            return Ok(None);
        }
        // The ratio is checked here against the budget that `send` shares.
        let range = abi::reply_range(packed, self.memory.data_size(&self.store), len, 0.0)?;
        let admitted = self.store.data_mut().out.admit_reply(range.len())?;
        Ok(admitted.then_some(range))
    }
}

/// A live component instance: its store, its typed exports, and its last reply.
struct LiveComponent {
    store: Store<ComponentHost>,
    exports: Exports,
    reply: Vec<u8>,
    /// The last client and its address as the `peer` parameter gives it.
    peer: Option<(SocketAddr, String)>,
    poisoned: bool,
}

impl LiveComponent {
    /// As [`Live::call`]: lends the sessions, runs the export, takes them back,
    /// and passes on what the component printed. Whether there is a reply (in
    /// `self.reply`).
    fn call(
        &mut self,
        call: &Call<'_>,
        net: &mut Option<Box<Upstreams>>,
        sandbox: &Sandbox,
        max_ratio: f64,
    ) -> Result<bool, Rejection> {
        self.store.set_epoch_deadline(sandbox.deadline_ticks);
        let allowance = call
            .allowance
            .unwrap_or_else(|| Allowance::for_request(call.datagram.len(), max_ratio));
        self.store
            .data_mut()
            .calls
            .lend(call.peer, net, allowance, call.upstream);
        // A client sends many datagrams: its address is written out once.
        if self.peer.as_ref().is_none_or(|(addr, _)| *addr != call.peer) {
            self.peer = Some((call.peer, call.peer.to_string()));
        }
        let peer = self.peer.as_ref().map_or("", |(_, text)| text.as_str());
        let result = match call.entry {
            Entry::Handle => self.exports.handle(&mut self.store, call.datagram, peer),
            Entry::OnReply => self
                .exports
                .on_reply(&mut self.store, call.datagram, peer, call.upstream),
        };
        let host = self.store.data_mut();
        host.calls.take_back(net);
        let (stdout, stderr) = host.take_output();
        for (stream, text) in [("stdout", stdout), ("stderr", stderr)] {
            if !text.is_empty() {
                sandbox.log_output(stream, &text, call.peer);
            }
        }
        let Some(reply) = result? else {
            return Ok(false);
        };
        if reply.len() > MAX_DATAGRAM {
            return Err(DropReason::Oversize.into());
        }
        let admitted = self.store.data_mut().calls.out.admit_reply(reply.len())?;
        self.reply = reply;
        Ok(admitted)
    }
}

/// Runs one [`Program`] for one worker, datagram after datagram.
pub struct Guest {
    sandbox: Sandbox,
    program: Arc<Program>,
    live: Option<Live>,
    component: Option<LiveComponent>,
    /// The last reply of a WASI command, which lives outside any instance.
    wasi_reply: Bytes,
    isolation: Isolation,
    max_ratio: f64,
    /// The (always empty) outbox of a WASI command, which has no host calls.
    no_calls: Outbox,
}

impl Guest {
    /// `max_ratio` caps reply size at that multiple of the request (0: no cap).
    pub fn new(sandbox: Sandbox, program: Arc<Program>, isolation: Isolation, max_ratio: f64) -> Self {
        Self {
            sandbox,
            program,
            live: None,
            component: None,
            wasi_reply: Bytes::new(),
            isolation,
            max_ratio,
            no_calls: Outbox::default(),
        }
    }

    /// Switches to `program` if it is not the one running; the next datagram then
    /// gets an instance of it, and the old instance is freed now.
    pub fn set_program(&mut self, program: &Arc<Program>) {
        if !Arc::ptr_eq(&self.program, program) {
            self.program = Arc::clone(program);
            self.live = None;
            self.component = None;
        }
    }

    /// Runs the guest on one datagram from `peer` and returns the reply to send.
    /// After a trap, timeout or bad alloc/reply the instance is thrown away, so the
    /// next datagram starts from a fresh one. (Without sessions to forward to:
    /// see [`Guest::handle_with`].)
    pub fn handle(&mut self, datagram: &[u8], peer: SocketAddr) -> Result<&[u8], Rejection> {
        match self.handle_with(datagram, peer, &mut None)?.reply {
            Some(reply) => Ok(reply),
            None => Err(DropReason::NoReply.into()),
        }
    }

    /// Runs `handle` on one datagram from `peer`, with the worker's sessions `net`
    /// (lent to the guest's `forward` calls for the length of the call).
    pub fn handle_with(
        &mut self,
        datagram: &[u8],
        peer: SocketAddr,
        net: &mut Option<Box<Upstreams>>,
    ) -> Result<Answer<'_>, Rejection> {
        let call = Call {
            entry: Entry::Handle,
            datagram,
            peer,
            upstream: "",
            allowance: None,
        };
        self.run(&call, net)
    }

    /// The `forward`/`send` calls refused since this was last asked, as
    /// (reason, count): after the call that made them, whether it answered,
    /// trapped or ran out of time; each refusal is given once.
    pub fn take_refused(&mut self) -> impl Iterator<Item = (CallError, u32)> + use<> {
        let out = match (&mut self.live, &mut self.component) {
            (Some(l), _) => Some(&mut l.store.data_mut().out),
            (None, Some(c)) => Some(&mut c.store.data_mut().calls.out),
            (None, None) => None,
        };
        out.map(Outbox::take_refused).into_iter().flatten()
    }

    /// The `forward`/`send` calls the last call made, refused ones included,
    /// whatever its outcome.
    pub fn last_calls(&mut self) -> u32 {
        match (&mut self.live, &mut self.component) {
            (Some(l), _) => l.store.data().out.calls(),
            (None, Some(c)) => c.store.data().calls.out.calls(),
            (None, None) => 0,
        }
    }

    /// Whether the program exports `on_reply`; without it, upstream datagrams go
    /// to the client unchanged and never enter the guest.
    pub fn has_on_reply(&self) -> bool {
        self.program.on_reply
    }

    /// Runs `on_reply` on a datagram that `upstream` (`POOL/ip:port`) sent back
    /// for client `peer`, within `allowance`: what is left of what the client's
    /// own datagrams earned (bytes by the reply ratio, calls by the chain limit).
    /// Call only when [`Guest::has_on_reply`].
    pub fn on_reply(
        &mut self,
        datagram: &[u8],
        peer: SocketAddr,
        upstream: &str,
        net: &mut Option<Box<Upstreams>>,
        allowance: Allowance,
    ) -> Result<Answer<'_>, Rejection> {
        let call = Call {
            entry: Entry::OnReply,
            datagram,
            peer,
            upstream,
            allowance: Some(allowance),
        };
        self.run(&call, net)
    }

    fn run(&mut self, call: &Call<'_>, net: &mut Option<Box<Upstreams>>) -> Result<Answer<'_>, Rejection> {
        if call.datagram.len() > MAX_DATAGRAM {
            return Err(DropReason::Oversize.into());
        }
        let started = self.sandbox.now();
        let pre = match &self.program.pre {
            Pre::AbiV1(pre) => pre,
            Pre::Component(_) => return self.run_component(call, net, started),
            Pre::Wasi(pre) => {
                self.wasi_reply = self.sandbox.run_wasi(pre, call.datagram, call.peer, self.max_ratio)?;
                self.sandbox.check_budget(started)?;
                return Ok(Answer {
                    reply: Some(&self.wasi_reply),
                    out: &self.no_calls,
                });
            }
        };
        // A poisoned instance is replaced here, at the start of the next datagram,
        // so that the reply to this one can still borrow from its memory.
        if self.isolation == Isolation::Fresh || self.live.as_ref().is_some_and(|l| l.poisoned) {
            self.live = None;
        }
        let live = match self.live.take() {
            Some(live) => live,
            None => self.sandbox.instantiate(pre)?,
        };
        let live = self.live.insert(live);
        let result = live
            .call(call, net, self.sandbox.deadline_ticks, self.max_ratio)
            .and_then(|range| self.sandbox.check_budget(started).map(|()| range));
        match result {
            Ok(range) => Ok(Answer {
                reply: range.map(|r| &live.memory.data(&live.store)[r]),
                out: &live.store.data().out,
            }),
            Err(rejection) => {
                live.poisoned = rejection.reason.poisons_instance();
                Err(rejection)
            }
        }
    }
}

impl Guest {
    fn run_component(
        &mut self,
        call: &Call<'_>,
        net: &mut Option<Box<Upstreams>>,
        started: u64,
    ) -> Result<Answer<'_>, Rejection> {
        // Called only for components; anything else is refused, not served.
        let Pre::Component(pre) = &self.program.pre else {
            return Err(DropReason::Trap.into());
        };
        if self.isolation == Isolation::Fresh || self.component.as_ref().is_some_and(|c| c.poisoned) {
            self.component = None;
        }
        let live = match self.component.take() {
            Some(live) => live,
            None => self.sandbox.instantiate_component(pre)?,
        };
        let live = self.component.insert(live);
        let result = live
            .call(call, net, &self.sandbox, self.max_ratio)
            .and_then(|reply| self.sandbox.check_budget(started).map(|()| reply));
        match result {
            Ok(has_reply) => Ok(Answer {
                reply: has_reply.then_some(live.reply.as_slice()),
                out: &live.store.data().calls.out,
            }),
            Err(rejection) => {
                live.poisoned = rejection.reason.poisons_instance();
                Err(rejection)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:4242".parse().unwrap()
    }

    fn sandbox() -> Sandbox {
        Sandbox::new(Limits::default()).unwrap()
    }

    fn guest(wat: &str) -> Guest {
        let sandbox = sandbox();
        let program = Arc::new(sandbox.load("test.wat", wat.as_bytes()).unwrap());
        Guest::new(sandbox, program, Isolation::Reuse, 3.0)
    }

    /// Echoes the datagram, with a counter in global 0 that survives between datagrams
    /// and is reported as the reply's first byte when the datagram is "count".
    const COUNTER: &str = r#"(module
        (memory (export "memory") 1)
        (global $n (mut i32) (i32.const 0))
        (func (export "alloc") (param i32) (result i32) i32.const 16)
        (func (export "handle") (param $p i32) (param $len i32) (result i64)
            (global.set $n (i32.add (global.get $n) (i32.const 1)))
            (i32.store8 (local.get $p) (i32.add (i32.const 48) (global.get $n)))
            (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.const 1)))
    )"#;

    #[test]
    fn embedded_guest_uppercases_like_python() {
        let sandbox = sandbox();
        let program = Arc::new(sandbox.load("<embedded>", crate::DEFAULT_GUEST_WASM).unwrap());
        let mut g = Guest::new(sandbox, program, Isolation::Reuse, 3.0);
        assert_eq!(g.handle(b"chen", peer()).unwrap(), b"CHEN");
        assert_eq!(g.handle(b"", peer()).unwrap(), b"");
        let all: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let expected: Vec<u8> = all.iter().map(u8::to_ascii_uppercase).collect();
        assert_eq!(g.handle(&all, peer()).unwrap(), &expected[..]);
    }

    #[test]
    fn reused_instance_keeps_state_fresh_does_not() {
        let mut g = guest(COUNTER);
        assert_eq!(g.handle(b"x", peer()).unwrap(), b"1");
        assert_eq!(g.handle(b"x", peer()).unwrap(), b"2");
        g.isolation = Isolation::Fresh;
        assert_eq!(g.handle(b"x", peer()).unwrap(), b"1");
        assert_eq!(g.handle(b"x", peer()).unwrap(), b"1");
    }

    #[test]
    fn a_trap_replaces_the_instance() {
        let mut g = guest(
            r#"(module
            (memory (export "memory") 1)
            (global $n (mut i32) (i32.const 0))
            (func (export "alloc") (param i32) (result i32) i32.const 16)
            (func (export "handle") (param $p i32) (param $len i32) (result i64)
                (global.set $n (i32.add (global.get $n) (i32.const 1)))
                (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 33)) (then unreachable))
                (i32.store8 (local.get $p) (i32.add (i32.const 48) (global.get $n)))
                (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.const 1))))"#,
        );
        assert_eq!(g.handle(b"x", peer()).unwrap(), b"1");
        assert_eq!(g.handle(b"x", peer()).unwrap(), b"2");
        let rejection = g.handle(b"!", peer()).unwrap_err();
        assert_eq!(rejection.reason, DropReason::Trap);
        assert!(rejection.to_string().contains("unreachable"), "{rejection}");
        // The counter restarted: the trapped instance is gone.
        assert_eq!(g.handle(b"x", peer()).unwrap(), b"1");
    }

    #[test]
    fn endless_loop_is_interrupted_as_a_timeout() {
        let mut g = guest(
            r#"(module (memory (export "memory") 1)
            (func (export "alloc") (param i32) (result i32) i32.const 0)
            (func (export "handle") (param i32 i32) (result i64) (loop br 0) i64.const -1))"#,
        );
        let started = Instant::now();
        assert_eq!(g.handle(b"x", peer()).unwrap_err().reason, DropReason::Timeout);
        // A 10 ms budget: well under half a second even on a loaded machine.
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn assemblyscript_abort_traps_with_its_message_and_place() {
        let mut g = guest(
            r#"(module
            (import "env" "abort" (func $abort (param i32 i32 i32 i32)))
            (memory (export "memory") 1)
            (data (i32.const 96) "\0a\00\00\00b\00o\00o\00m\00!\00")
            (data (i32.const 196) "\08\00\00\00a\00.\00t\00s\00")
            (func (export "alloc") (param i32) (result i32) i32.const 1024)
            (func (export "handle") (param i32 i32) (result i64)
                (call $abort (i32.const 100) (i32.const 200) (i32.const 3) (i32.const 7))
                i64.const -1))"#,
        );
        let rejection = g.handle(b"x", peer()).unwrap_err();
        assert_eq!(rejection.reason, DropReason::Trap);
        assert!(rejection.to_string().contains("boom! at a.ts:3:7"), "{rejection}");
    }

    #[test]
    fn wasi_commands_read_stdin_write_stdout_and_see_the_peer() {
        // Replies with the environment (`WASMGATE_PEER=…`) followed by the datagram.
        let mut g = guest(
            r#"(module
            (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")
                (local $env i32)
                (drop (call $sizes (i32.const 0) (i32.const 4)))
                (drop (call $environ_get (i32.const 16) (i32.const 1024)))
                ;; The variable without its trailing NUL, then the datagram after it.
                (local.set $env (i32.sub (i32.load (i32.const 4)) (i32.const 1)))
                (i32.store (i32.const 32) (i32.add (i32.const 1024) (local.get $env)))
                (i32.store (i32.const 36) (i32.const 4096))
                (drop (call $fd_read (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 40)))
                (i32.store (i32.const 32) (i32.const 1024))
                (i32.store (i32.const 36) (i32.add (local.get $env) (i32.load (i32.const 40))))
                (drop (call $fd_write (i32.const 1) (i32.const 32) (i32.const 1) (i32.const 44)))))"#,
        );
        g.max_ratio = 0.0;
        assert_eq!(g.program.kind(), GuestKind::WasiCommand);
        assert_eq!(g.handle(b" hi", peer()).unwrap(), b"WASMGATE_PEER=127.0.0.1:4242 hi");
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        assert_eq!(g.handle(b"", v6).unwrap(), b"WASMGATE_PEER=[::1]:9");
    }

    #[test]
    fn peer_is_written_when_it_fits_and_never_past_cap() {
        // Memory from 1024 is filled with `Z` first; the reply is the 32 bytes at
        // 1024, so any byte the host wrote past what fits shows up in it.
        let mut g = guest(
            r#"(module
            (import "wasmgate" "peer" (func $peer (param i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "alloc") (param i32) (result i32) i32.const 0)
            (func (export "handle") (param $p i32) (param $len i32) (result i64)
                (local $n i32)
                (memory.fill (i32.const 1024) (i32.const 90) (i32.const 32))
                ;; cap = 4 * datagram length.
                (local.set $n (call $peer (i32.const 1024) (i32.mul (local.get $len) (i32.const 4))))
                (i32.store8 (i32.const 1056) (local.get $n))
                (i64.const 0x0000040000000021)))"#,
        );
        g.max_ratio = 0.0;
        let text = |reply: &[u8]| (String::from_utf8_lossy(&reply[..32]).into_owned(), reply[32]);
        let (written, len) = text(g.handle(b"xxxxx", peer()).unwrap());
        assert_eq!((written.as_str(), len), ("127.0.0.1:4242ZZZZZZZZZZZZZZZZZZ", 14));
        // cap 4 < 14: nothing at all is written, and the length is still returned.
        let (written, len) = text(g.handle(b"x", peer()).unwrap());
        assert_eq!((written.as_str(), len), ("Z".repeat(32).as_str(), 14));
        // cap exactly the length: written whole, nothing after it.
        let (written, len) = text(g.handle(b"xxxx", "[::1]:9".parse().unwrap()).unwrap());
        assert_eq!((written.as_str(), len), ("[::1]:9ZZZZZZZZZZZZZZZZZZZZZZZZZ", 7));
    }

    /// A guest whose start function calls `peer` (no client yet: 0) and keeps the
    /// answer in a global; `handle` replies with it, or asks for the peer at a
    /// buffer outside memory when the datagram is `!`.
    const PEER_IN_START: &str = r#"(module
        (import "wasmgate" "peer" (func $peer (param i32 i32) (result i32)))
        (memory (export "memory") 1)
        (global $at_start (mut i32) (i32.const -1))
        (func $start (global.set $at_start (call $peer (i32.const 0) (i32.const 64))))
        (start $start)
        (func (export "alloc") (param i32) (result i32) i32.const 0)
        (func (export "handle") (param $p i32) (param $len i32) (result i64)
            (if (i32.eq (i32.load8_u (i32.const 0)) (i32.const 33))
                (then (drop (call $peer (i32.const 65530) (i32.const 64)))))
            (i32.store8 (i32.const 0) (i32.add (i32.const 48) (global.get $at_start)))
            (i64.const 1)))"#;

    #[test]
    fn refused_calls_are_given_once_whatever_follows() {
        // Forwards twice to a pool that does not exist (there are no pools), then
        // traps when the datagram starts with "!".
        let mut g = guest(
            r#"(module
              (import "wasmgate" "forward" (func $f (param i32 i32 i32 i32) (result i32)))
              (memory (export "memory") 2)
              (func (export "alloc") (param i32) (result i32) i32.const 64)
              (func (export "handle") (param $p i32) (param $n i32) (result i64)
                (drop (call $f (i32.const 0) (i32.const 1) (local.get $p) (local.get $n)))
                (drop (call $f (i32.const 0) (i32.const 1) (local.get $p) (local.get $n)))
                (if (i32.eq (i32.load8_u (local.get $p)) (i32.const 33)) (then unreachable))
                i64.const -1))"#,
        );
        let refused = |g: &mut Guest| g.take_refused().collect::<Vec<_>>();
        let answer = g.handle_with(b"x", peer(), &mut None).unwrap();
        assert_eq!(answer.first_refusal(), Some(CallError::UnknownPool));
        assert_eq!(refused(&mut g), [(CallError::UnknownPool, 2)]);
        assert_eq!(refused(&mut g), [], "taken once");
        // A trap after refused calls still has them counted.
        assert!(g.handle_with(b"!", peer(), &mut None).is_err());
        assert_eq!(refused(&mut g), [(CallError::UnknownPool, 2)]);
        // A datagram refused before the guest runs adds none (the last call's
        // refusals are not given again).
        assert!(g.handle_with(&vec![0; MAX_DATAGRAM + 1], peer(), &mut None).is_err());
        assert_eq!(refused(&mut g), []);
    }

    #[test]
    fn peer_in_the_start_function_is_0_and_a_buffer_outside_memory_traps() {
        let mut g = guest(PEER_IN_START);
        assert_eq!(g.handle(b"x", peer()).unwrap(), b"0");
        let rejection = g.handle(b"!", peer()).unwrap_err();
        assert_eq!(rejection.reason, DropReason::Trap);
        assert!(rejection.to_string().contains("outside guest memory"), "{rejection}");
        assert_eq!(g.handle(b"x", peer()).unwrap(), b"0");
    }

    #[test]
    fn tables_are_capped_and_growing_past_the_cap_traps() {
        // A table declared over the cap cannot be instantiated at all.
        let sandbox = sandbox();
        let too_big = format!(
            r#"(module (memory (export "memory") 1) (table {} funcref)
            (func (export "alloc") (param i32) (result i32) i32.const 0)
            (func (export "handle") (param i32 i32) (result i64) i64.const -1))"#,
            MAX_TABLE_ELEMENTS + 1
        );
        let e = format!("{:#}", sandbox.load("big-table.wat", too_big.as_bytes()).unwrap_err());
        assert!(e.contains("table"), "{e}");
        // Growing one past the cap at run time traps, and the next datagram is served.
        let mut g = guest(
            r#"(module (memory (export "memory") 1) (table $t 1 funcref)
            (func (export "alloc") (param i32) (result i32) i32.const 0)
            (func (export "handle") (param $p i32) (param $len i32) (result i64)
                (if (i32.eq (i32.load8_u (i32.const 0)) (i32.const 33))
                    (then (drop (table.grow $t (ref.null func) (i32.const 200000)))))
                (i64.extend_i32_u (local.get $len))))"#,
        );
        assert_eq!(g.handle(b"x", peer()).unwrap(), b"x");
        assert_eq!(g.handle(b"!", peer()).unwrap_err().reason, DropReason::Trap);
        assert_eq!(g.handle(b"y", peer()).unwrap(), b"y");
    }
}
