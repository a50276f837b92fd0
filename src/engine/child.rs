//! Compiling modules under bounds. A module can be built to make the compiler run
//! for minutes and take gigabytes (a million empty functions, millions of nested
//! blocks), and a compile cannot be cancelled. So the gateway compiles in a child
//! process, the `wasmgate` binary itself run as `wasmgate __compile`, under a
//! memory limit and a CPU-time limit (`RLIMIT_CPU`, so that a compile starved
//! by a busy host is not refused for time it did not get), with a wall-time
//! ceiling: past any of them it is killed and the module refused, saying which
//! bound it hit. The child hands back wasmtime's serialized module,
//! which the parent keeps in the authenticated [`crate::engine::cache`] and looks for
//! there before starting a child.
//!
//! Library users and tests that trust their modules can compile in-process
//! ([`Compiler::InProcess`], the default of a `Env`).

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use wasmtime::component::Component;
use wasmtime::{Engine, Module, Precompiled};

use super::compile::{Compiled, MAX_MODULE_BYTES, compile};
use super::settings::engine_config;
use crate::engine::cache::{Cache, Lookup};

/// The hidden subcommand the child runs.
pub const CHILD_COMMAND: &str = "__compile";

/// How a compile may grow before it is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompileBounds {
    /// CPU time the child may use (all its threads together), in whole seconds.
    pub timeout: Duration,
    /// Wall-clock time from starting the child to its answer, however little
    /// CPU time it got.
    pub wall_timeout: Duration,
    /// The child's data limit (`RLIMIT_DATA`: heap and private writable mappings).
    pub max_memory: u64,
}

impl Default for CompileBounds {
    /// 60 s of CPU, 600 s of wall time and 1 GiB: an 18 MB Python component
    /// compiles in 6–16 s (11 s of CPU) within about 400 MB here, and the hostile
    /// modules above need far more of one or the other.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            wall_timeout: Duration::from_secs(600),
            max_memory: 1 << 30,
        }
    }
}

/// Where modules are compiled.
#[derive(Clone, Debug, Default)]
pub enum Compiler {
    /// In this process, without bounds.
    #[default]
    InProcess,
    /// In a child process running `program __compile`, under `bounds`, keeping
    /// what it compiles in `cache` (if any), so that the next start with the
    /// same module skips the compile.
    Child {
        program: PathBuf,
        bounds: CompileBounds,
        cache: Option<Cache>,
    },
}

impl Compiler {
    /// A bounded compiler that runs this very executable as the child. On Linux
    /// that is `/proc/self/exe`, the running image even after a package upgrade
    /// has replaced the file on disk (whose compiled modules this process could
    /// not load).
    pub fn this_executable(bounds: CompileBounds, cache: Option<Cache>) -> anyhow::Result<Self> {
        let running = Path::new("/proc/self/exe");
        let program = if running.exists() {
            running.to_path_buf()
        } else {
            std::env::current_exe().context("cannot find the wasmgate executable to compile modules with")?
        };
        Ok(Self::Child { program, bounds, cache })
    }

    /// Compiles `bytes` (a `\0asm` binary or WAT text) for `engine`.
    pub(crate) fn compile(&self, engine: &Engine, bytes: &[u8]) -> anyhow::Result<Compiled> {
        match self {
            Self::InProcess => compile(engine, bytes),
            Self::Child { program, bounds, cache } => match cache {
                Some(cache) => compile_cached(engine, program, *bounds, cache, bytes),
                None => compile_in_child(engine, program, *bounds, bytes).map(|(compiled, _)| compiled),
            },
        }
    }
}

/// Kills the child when dropped, so that no early return leaves it running.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How often the parent looks whether the child has finished.
const POLL: Duration = Duration::from_millis(2);

/// The most of the child's stderr kept for an error message.
const MAX_ERROR_BYTES: u64 = 64 << 10;

/// Takes the module from `cache` when an authentic entry is there; else
/// compiles it in a child and stores the result. A refused entry is said once
/// and replaced; a cache that cannot be written only costs the next start time.
fn compile_cached(
    engine: &Engine,
    program: &PathBuf,
    bounds: CompileBounds,
    cache: &Cache,
    bytes: &[u8],
) -> anyhow::Result<Compiled> {
    match cache.get(engine, bytes) {
        Lookup::Hit(artifact) => match deserialize(engine, &artifact) {
            Ok(compiled) => {
                tracing::info!(cache = %cache.dir().display(), "compiled module found in the cache");
                return Ok(compiled);
            }
            Err(e) => tracing::warn!(
                cache = %cache.dir().display(),
                "compile cache entry refused: it does not load ({e:#}); compiling afresh"
            ),
        },
        Lookup::Rejected(why) => tracing::warn!(
            cache = %cache.dir().display(),
            "compile cache entry refused: it {why}; compiling afresh"
        ),
        Lookup::Miss => {}
    }
    let (compiled, serialized) = compile_in_child(engine, program, bounds, bytes)?;
    if let Err(e) = cache.put(engine, bytes, &serialized) {
        tracing::warn!("the compiled module could not be cached: {e:#}");
    }
    Ok(compiled)
}

fn compile_in_child(
    engine: &Engine,
    program: &PathBuf,
    bounds: CompileBounds,
    bytes: &[u8],
) -> anyhow::Result<(Compiled, Vec<u8>)> {
    let started = Instant::now();
    let mut command = Command::new(program);
    command
        .arg(CHILD_COMMAND)
        .arg(bounds.max_memory.to_string())
        .arg(bounds.timeout.as_secs().max(1).to_string());
    let child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Nothing the child logs belongs in the gateway's log.
        .env_remove("RUST_LOG")
        .spawn()
        .with_context(|| format!("cannot start {} to compile the module", program.display()))?;
    let mut child = Reaper(child);
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) =
        (child.0.stdin.take(), child.0.stdout.take(), child.0.stderr.take())
    else {
        bail!("cannot talk to the compiling process");
    };
    // Each pipe on its own thread, so that none can fill up and stall the others.
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).map(|_| out)
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = (&mut stderr).take(MAX_ERROR_BYTES).read_to_string(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if started.elapsed() > bounds.wall_timeout {
            // Dropping the reaper kills it; the pipe threads then end.
            drop(child);
            bail!(
                "compiling it took longer than the {} s compile wall-time ceiling (--compile-wall-timeout)",
                bounds.wall_timeout.as_secs_f64()
            );
        }
        std::thread::sleep(POLL);
    };
    let _ = writer.join();
    let serialized = reader.join().ok().and_then(Result::ok).unwrap_or_default();
    let error_text = errors.join().unwrap_or_default();
    if !status.success() {
        return Err(child_failure(status, error_text.trim(), bounds));
    }
    let compiled =
        deserialize(engine, &serialized).context("the compiling process sent back a module that cannot be loaded")?;
    Ok((compiled, serialized))
}

/// Loads a serialized module or component.
fn deserialize(engine: &Engine, serialized: &[u8]) -> anyhow::Result<Compiled> {
    // SAFETY: `deserialize` runs the machine code it is given, so the bytes must
    // come from wasmtime's own `serialize` for a compatible engine: they do, from
    // this same executable in `run_child`, either just now or through the cache,
    // whose entries are authenticated with a key only this user can read (and
    // wasmtime checks the header, version and engine settings). A child subverted
    // by a hostile module could send anything, but compiling that module
    // in-process would have given the same attacker this process already: the
    // child takes away no trust.
    let compiled = match Engine::detect_precompiled(serialized) {
        // SAFETY: as above.
        Some(Precompiled::Component) => unsafe { Component::deserialize(engine, serialized) }.map(Compiled::Component),
        // SAFETY: as above.
        _ => unsafe { Module::deserialize(engine, serialized) }.map(Compiled::Module),
    };
    compiled.map_err(anyhow::Error::from)
}

/// Says why the child failed: the module's own error (exit status 1), or the
/// bound it hit.
fn child_failure(status: ExitStatus, stderr: &str, bounds: CompileBounds) -> anyhow::Error {
    use std::os::unix::process::ExitStatusExt as _;
    let out_of_memory = stderr.contains("memory allocation of") || status.signal() == Some(libc::SIGABRT);
    if out_of_memory || status.signal() == Some(libc::SIGSEGV) {
        // Running out of memory aborts (or, on a stack that cannot grow, faults).
        return anyhow::anyhow!(
            "compiling it needed more than the {} compile memory bound (--compile-memory)",
            human_bytes(bounds.max_memory)
        );
    }
    // RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one a second on
    // (the parent kills only past the wall ceiling, and says so itself).
    if matches!(status.signal(), Some(libc::SIGXCPU | libc::SIGKILL)) {
        return anyhow::anyhow!(
            "compiling it took more than the {} s compile time bound (--compile-timeout), in CPU time",
            bounds.timeout.as_secs()
        );
    }
    match status.code() {
        Some(1) if !stderr.is_empty() => anyhow::anyhow!("{stderr}"),
        _ => anyhow::anyhow!("the compiling process failed ({status}): {stderr}"),
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n => format!("{n} bytes"),
    }
}

/// The child's side: `wasmgate __compile MAX_MEMORY CPU_SECONDS`. Reads a module
/// from stdin, compiles it and writes the serialized module to stdout; on
/// failure writes the reason to stderr and exits 1.
pub fn run_child(max_memory: &str, cpu_seconds: &str) -> ExitCode {
    let result = (|| -> anyhow::Result<Vec<u8>> {
        let max_memory: u64 = max_memory.parse().context("bad memory bound")?;
        let cpu_seconds: u64 = cpu_seconds.parse().context("bad CPU time bound")?;
        limit_this_process(max_memory, cpu_seconds)?;
        let mut bytes = Vec::new();
        std::io::stdin()
            .take(MAX_MODULE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)?;
        let engine = Engine::new(&engine_config(None))?;
        Ok(match compile(&engine, &bytes)? {
            Compiled::Module(module) => module.serialize()?,
            Compiled::Component(component) => component.serialize()?,
        })
    })();
    match result {
        Ok(serialized) => match std::io::stdout().lock().write_all(&serialized) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(2),
        },
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How far below the gateway the compiling child runs: a compile takes CPU
/// from serving as little as it can, yet not so little that a busy host starves
/// it (10 below, six busy loops on 2 cores leave it under 7% of a core; 5
/// below, about 20%).
const CHILD_NICE: libc::c_int = 5;

/// Caps the child's data and CPU time, writes no core file when it hits them,
/// has it killed if the gateway dies, and lowers its priority.
fn limit_this_process(max_memory: u64, cpu_seconds: u64) -> anyhow::Result<()> {
    let data = libc::rlimit {
        rlim_cur: max_memory,
        rlim_max: max_memory,
    };
    // SIGXCPU at the soft limit; SIGKILL at the hard one, should it be caught.
    let cpu = libc::rlimit {
        rlim_cur: cpu_seconds,
        rlim_max: cpu_seconds.saturating_add(1),
    };
    let core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on this process with valid arguments; the
    // limits outlive the calls.
    let (data, cpu, core, death, nice) = unsafe {
        (
            libc::setrlimit(libc::RLIMIT_DATA, &data),
            libc::setrlimit(libc::RLIMIT_CPU, &cpu),
            libc::setrlimit(libc::RLIMIT_CORE, &core),
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL),
            libc::nice(CHILD_NICE),
        )
    };
    let _ = core; // a core file the limit could not prevent is still only a file
    if data != 0 || cpu != 0 || death != 0 {
        bail!(
            "cannot limit the compiling process: {}",
            std::io::Error::last_os_error()
        );
    }
    let _ = nice; // a compile at normal priority is still a compile
    // The parent may have died before the death signal was set.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } == 1 {
        bail!("the gateway is gone");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_named_in_human_units() {
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(256 << 20), "256 MiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
        assert_eq!(CompileBounds::default().timeout, Duration::from_secs(60));
        assert_eq!(CompileBounds::default().wall_timeout, Duration::from_secs(600));
        assert_eq!(CompileBounds::default().max_memory, 1 << 30);
    }
}
