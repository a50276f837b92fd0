//! The loader: the one place that tells a module's kind, checks it against
//! that kind's rules and the limits, links it, and makes it a [`Program`].

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sha2::{Digest, Sha256};
use wasmtime::Trap;
use wasmtime::component::Component;

use super::abi::{self, GuestKind};
use super::abi_v1::AbiV1;
use super::component::{self as wit, ComponentGuest, ComponentPre};
use super::env::Env;
use super::kind::Kind;
use super::program::Program;
use super::wasi_command::WasiCommand;
use crate::engine::{Compiled, read_module};

/// The loader: the one place that tells a module's kind and makes it a
/// [`Program`] of that kind.
impl Env {
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
        // The kind is decided here, once: from now on the program is a `Kind`.
        let linked = match kind {
            GuestKind::AbiV1 => self
                .runtime
                .linker
                .instantiate_pre(&module)
                .map(|pre| Box::new(AbiV1(pre)) as Box<dyn Kind>),
            GuestKind::WasiCommand => self
                .runtime
                .wasi_linker
                .instantiate_pre(&module)
                .map(|pre| Box::new(WasiCommand(pre)) as Box<dyn Kind>),
            GuestKind::Component => bail!("a core module is never a component"),
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
            probes: kind == GuestKind::AbiV1 && module.get_export(abi::PROBE.0).is_some(),
            world: None,
            serial: super::program::next_serial(),
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
            probes: pre.writes_probes(),
            pre: Box::new(ComponentGuest(pre)),
            compile_time: Duration::ZERO,
            world: Some(wit::describe(engine, component)),
            serial: super::program::next_serial(),
        };
        self.try_out(program, started)
    }

    /// Instantiates a program once, running its start function under the time
    /// budget, so that one that cannot serve is refused at load.
    fn try_out(&self, mut program: Program, started: Instant) -> anyhow::Result<Program> {
        self.start_meter();
        if let Err(e) = program.pre.try_out(self) {
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
}

/// How the embedded default guest is named in logs.
pub const EMBEDDED_ORIGIN: &str = "<embedded uppercase guest>";
