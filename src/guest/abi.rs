//! The two kinds of guest module: ABI v1 (what a module must export and may import,
//! and how a reply is decoded and checked) and WASI command modules (`_start`, stdin
//! in, stdout out). See `docs/ABI.md` for the guest author's view.
//!
//! Everything here is pure: it looks at module types and numbers, never runs a guest.

use std::fmt;
use std::ops::Range;

use wasmtime::{ExternType, FuncType, Module};

use crate::verdict::DropReason;
use crate::verdict::MAX_DATAGRAM;

/// What `handle` returns for "send nothing back".
pub const NO_REPLY: i64 = -1;

/// The module that the host's imports come from.
pub const HOST_MODULE: &str = "wasmgate";

/// The import module of WASI preview 1, the only WASI version accepted.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// How the host drives a module: told apart by its exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestKind {
    /// Exports `memory`, `alloc` and `handle`; one instance may serve many datagrams.
    AbiV1,
    /// A WASI preview 1 command: `_start` reads the datagram from stdin and writes
    /// the reply to stdout, in a fresh instance per datagram.
    WasiCommand,
    /// A component of the `wasmgate:handler` world (`wit/handler.wit`); one
    /// instance may serve many datagrams, as for ABI v1.
    Component,
}

impl GuestKind {
    /// A short name for logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::AbiV1 => "abi-v1",
            Self::WasiCommand => "wasi-command",
            Self::Component => "component",
        }
    }
}

impl fmt::Display for GuestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AbiV1 => "the wasmgate guest ABI v1",
            Self::WasiCommand => "a WASI command (stdin to stdout)",
            Self::Component => "the wasmgate:handler world (a component)",
        })
    }
}

/// A function signature: parameter and result types, by their WAT names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signature {
    pub params: &'static [&'static str],
    pub results: &'static [&'static str],
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_signature(f, self.params, self.results)
    }
}

/// The functions a guest must export, with their signatures.
pub const REQUIRED_EXPORTS: [(&str, Signature); 2] = [
    (
        "alloc",
        Signature {
            params: &["i32"],
            results: &["i32"],
        },
    ),
    (
        "handle",
        Signature {
            params: &["i32", "i32"],
            results: &["i64"],
        },
    ),
];

/// The export an ABI v1 guest may add to see what upstreams send back.
pub const ON_REPLY: (&str, Signature) = (
    "on_reply",
    Signature {
        params: &["i32", "i32"],
        results: &["i64"],
    },
);

/// The exports an ABI v1 guest may add to write its pools' health probes
/// (both or neither): `probe` returns the probe datagram for the endpoint that
/// `upstream` names, `probe_reply` judges that endpoint's answer (0: healthy,
/// -1: not). Same type as `handle`.
pub const PROBE: (&str, Signature) = (
    "probe",
    Signature {
        params: &["i32", "i32"],
        results: &["i64"],
    },
);
pub const PROBE_REPLY: (&str, Signature) = (
    "probe_reply",
    Signature {
        params: &["i32", "i32"],
        results: &["i64"],
    },
);

/// The functions the host offers an ABI v1 guest, as (module, name, type); a
/// guest may import any of them. `env.abort` is what AssemblyScript imports by default.
pub const HOST_FUNCTIONS: [(&str, &str, Signature); 23] = [
    host(HOST_MODULE, "log", &["i32", "i32", "i32"], &[]),
    host(HOST_MODULE, "peer", &["i32", "i32"], &["i32"]),
    host(HOST_MODULE, "forward", &["i32", "i32", "i32", "i32"], &["i32"]),
    host(
        HOST_MODULE,
        "forward_key",
        &["i32", "i32", "i32", "i32", "i32", "i32"],
        &["i32"],
    ),
    host(HOST_MODULE, "send", &["i32", "i32"], &["i32"]),
    host(HOST_MODULE, "upstream", &["i32", "i32"], &["i32"]),
    host(HOST_MODULE, "note", &["i32", "i32"], &["i32"]),
    host(HOST_MODULE, "client", &[], &["i64"]),
    host(HOST_MODULE, "reply_to", &["i64"], &["i32"]),
    host(HOST_MODULE, "state_get", &["i32", "i32", "i32", "i32"], &["i32"]),
    host(HOST_MODULE, "state_set", &["i32", "i32", "i32", "i32", "i64"], &["i32"]),
    host(HOST_MODULE, "state_delete", &["i32", "i32"], &["i32"]),
    host(HOST_MODULE, "state_incr", &["i32", "i32", "i64", "i64"], &["i64"]),
    host(
        HOST_MODULE,
        "state_cas",
        &["i32", "i32", "i32", "i32", "i32", "i32", "i64"],
        &["i32"],
    ),
    host(HOST_MODULE, "limit", &["i32", "i32", "i32", "i32"], &["i32"]),
    host(HOST_MODULE, "penalize", &["i32", "i32", "i64"], &["i32"]),
    host(HOST_MODULE, "penalized", &["i32", "i32"], &["i32"]),
    host(HOST_MODULE, "now_ms", &[], &["i64"]),
    host(
        HOST_MODULE,
        "metric_define",
        &["i32", "i32", "i32", "i32", "i32", "i32", "i32"],
        &["i32"],
    ),
    host(HOST_MODULE, "metric_add", &["i32", "i32", "i32", "f64"], &["i32"]),
    host(HOST_MODULE, "metric_set", &["i32", "i32", "i32", "f64"], &["i32"]),
    host(HOST_MODULE, "metric_observe", &["i32", "i32", "i32", "f64"], &["i32"]),
    host("env", "abort", &["i32", "i32", "i32", "i32"], &[]),
];

/// One host function, as [`HOST_FUNCTIONS`] lists it.
const fn host(
    module: &'static str,
    name: &'static str,
    params: &'static [&'static str],
    results: &'static [&'static str],
) -> (&'static str, &'static str, Signature) {
    (module, name, Signature { params, results })
}

fn write_signature(f: &mut impl fmt::Write, params: &[&str], results: &[&str]) -> fmt::Result {
    f.write_str("(func")?;
    for (word, list) in [("param", params), ("result", results)] {
        if !list.is_empty() {
            write!(f, " ({word}")?;
            for t in list {
                write!(f, " {t}")?;
            }
            f.write_str(")")?;
        }
    }
    f.write_str(")")
}

fn matches(actual: &FuncType, expected: &Signature) -> bool {
    actual
        .params()
        .map(|t| t.to_string())
        .eq(expected.params.iter().map(|s| s.to_string()))
        && actual
            .results()
            .map(|t| t.to_string())
            .eq(expected.results.iter().map(|s| s.to_string()))
}

fn describe(actual: &FuncType) -> String {
    let params: Vec<String> = actual.params().map(|t| t.to_string()).collect();
    let results: Vec<String> = actual.results().map(|t| t.to_string()).collect();
    let (params, results): (Vec<&str>, Vec<&str>) = (
        params.iter().map(String::as_str).collect(),
        results.iter().map(String::as_str).collect(),
    );
    let mut s = String::new();
    let _ = write_signature(&mut s, &params, &results);
    s
}

fn kind(ty: &ExternType) -> &'static str {
    match ty {
        ExternType::Func(_) => "a function",
        ExternType::Global(_) => "a global",
        ExternType::Table(_) => "a table",
        ExternType::Memory(_) => "a memory",
        ExternType::Tag(_) => "a tag",
    }
}

/// Everything that makes a module unfit for the kind it was taken for, so that a
/// guest author can fix all of it in one go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbiViolations {
    pub kind: GuestKind,
    pub problems: Vec<String>,
}

impl fmt::Display for AbiViolations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "does not fit {}: {}", self.kind, self.problems.join("; "))
    }
}

impl std::error::Error for AbiViolations {}

/// Tells what kind of guest `module` is and checks it against that kind's rules.
///
/// A module that exports `handle` is an ABI v1 guest. One that does not, but
/// exports `_start` or imports WASI, is a WASI command. Anything else is judged as
/// ABI v1, whose messages say what is missing.
pub fn check_module(module: &Module) -> Result<GuestKind, AbiViolations> {
    let imports_wasi = module.imports().any(|i| i.module().starts_with("wasi"));
    let kind = if module.get_export("handle").is_none() && (module.get_export("_start").is_some() || imports_wasi) {
        GuestKind::WasiCommand
    } else {
        GuestKind::AbiV1
    };
    let mut problems = check_memory(module);
    match kind {
        GuestKind::AbiV1 => check_abi_v1(module, &mut problems),
        GuestKind::WasiCommand => check_wasi_command(module, &mut problems),
        // A core module is never judged a component.
        GuestKind::Component => {}
    }
    if problems.is_empty() {
        Ok(kind)
    } else {
        Err(AbiViolations { kind, problems })
    }
}

fn check_memory(module: &Module) -> Vec<String> {
    let mut problems = Vec::new();
    match module.get_export("memory") {
        None => problems.push("missing export `memory` (the guest must export its linear memory)".to_string()),
        Some(ExternType::Memory(m)) => {
            if m.is_64() {
                problems.push("export `memory` is a 64-bit memory; a 32-bit one is needed".to_string());
            }
            if m.is_shared() {
                problems.push("export `memory` is a shared memory; an unshared one is needed".to_string());
            }
        }
        Some(other) => problems.push(format!("export `memory` is {}, not a memory", kind(&other))),
    }
    problems
}

/// Checks the export `name` against `expected`; a missing one is a problem only
/// when it is `required`.
fn check_export(module: &Module, name: &str, expected: &Signature, required: bool, problems: &mut Vec<String>) {
    match module.get_export(name) {
        None if required => problems.push(format!("missing export `{name}` with type {expected}")),
        None => {}
        Some(ExternType::Func(f)) if matches(&f, expected) => {}
        Some(ExternType::Func(f)) => problems.push(format!(
            "export `{name}` has type {}, expected {expected}",
            describe(&f)
        )),
        Some(other) => problems.push(format!(
            "export `{name}` is {}, not a function {expected}",
            kind(&other)
        )),
    }
}

fn check_abi_v1(module: &Module, problems: &mut Vec<String>) {
    for (name, expected) in &REQUIRED_EXPORTS {
        check_export(module, name, expected, true, problems);
    }
    check_export(module, ON_REPLY.0, &ON_REPLY.1, false, problems);
    check_export(module, PROBE.0, &PROBE.1, false, problems);
    check_export(module, PROBE_REPLY.0, &PROBE_REPLY.1, false, problems);
    if module.get_export(PROBE.0).is_some() != module.get_export(PROBE_REPLY.0).is_some() {
        problems.push("exports one of `probe` and `probe_reply`: a guest that writes probes exports both".to_string());
    }
    if module.get_export("handle").is_none() {
        problems.push("(a WASI command module exports `_start` instead of `alloc` and `handle`)".to_string());
    }

    let offered = || {
        HOST_FUNCTIONS
            .iter()
            .map(|(m, n, s)| format!("`{m}.{n}` {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for import in module.imports() {
        let (module_name, name, ty) = (import.module(), import.name(), import.ty());
        let host_fn = HOST_FUNCTIONS.iter().find(|(m, n, _)| module_name == *m && name == *n);
        match (host_fn, &ty) {
            (Some((_, _, expected)), ExternType::Func(f)) if matches(f, expected) => {}
            (Some((_, _, expected)), ExternType::Func(f)) => problems.push(format!(
                "import `{module_name}.{name}` has type {}, expected {expected}",
                describe(f)
            )),
            (Some((_, _, expected)), other) => problems.push(format!(
                "import `{module_name}.{name}` is {}, expected a function {expected}",
                kind(other)
            )),
            (None, _) if module_name.starts_with("wasi") => problems.push(format!(
                "imports `{module_name}.{name}`, but a module that exports `handle` gets no WASI: \
                 build it for wasm32-unknown-unknown (or without libc), or make it a WASI command \
                 that exports `_start` and no `handle`; the host offers only {}",
                offered()
            )),
            (None, _) => problems.push(format!(
                "imports `{module_name}.{name}` ({}), which the host does not provide; it offers only {}",
                kind(&ty),
                offered()
            )),
        }
    }
}

fn check_wasi_command(module: &Module, problems: &mut Vec<String>) {
    match module.get_export("_start") {
        Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => {}
        Some(ExternType::Func(f)) => {
            problems.push(format!("export `_start` has type {}, expected (func)", describe(&f)))
        }
        Some(other) => problems.push(format!("export `_start` is {}, not a function (func)", kind(&other))),
        None if module.get_export("_initialize").is_some() => problems.push(
            "missing export `_start`: it exports `_initialize`, so it was built as a WASI reactor (a library); \
             build it as a command, a program with `main`"
                .to_string(),
        ),
        None => problems.push(
            "missing export `_start` (func): a WASI handler must be a command, a program with `main`; \
             an ABI v1 handler exports `alloc` and `handle` and imports no WASI"
                .to_string(),
        ),
    }
    for import in module.imports() {
        let (module_name, name) = (import.module(), import.name());
        match module_name {
            WASI_MODULE => {}
            "wasi_unstable" => problems.push(format!(
                "imports `{module_name}.{name}` from WASI preview 0, which is not supported: \
                 rebuild for WASI preview 1 (`wasm32-wasip1`, `wasi_snapshot_preview1`)"
            )),
            HOST_MODULE => problems.push(format!(
                "imports `{module_name}.{name}`, which only ABI v1 guests get: a WASI command logs \
                 by writing to stderr and finds the client in the environment variable WASMGATE_PEER"
            )),
            _ => problems.push(format!(
                "imports `{module_name}.{name}`, which the host does not provide; \
                 a WASI command may import only `{WASI_MODULE}` functions"
            )),
        }
    }
}

/// Where the reply lies in guest memory, or why it is not sent.
///
/// `packed` is what `handle` returned: `(ptr << 32) | len`, both unsigned, or
/// [`NO_REPLY`]. The checks run in an order that blames the right party: a region
/// outside memory is the guest's bug; size and ratio are the host's policy.
/// A `max_ratio` of 0 turns the amplification check off.
pub fn reply_range(
    packed: i64,
    memory_len: usize,
    request_len: usize,
    max_ratio: f64,
) -> Result<Range<usize>, DropReason> {
    if packed == NO_REPLY {
        return Err(DropReason::NoReply);
    }
    let packed = packed as u64;
    let (ptr, len) = (packed >> 32, packed & 0xffff_ffff);
    // Both halves are below 2^32, so the sum cannot overflow a u64.
    if ptr + len > memory_len as u64 {
        return Err(DropReason::BadReply);
    }
    let (ptr, len) = (ptr as usize, len as usize);
    check_reply_len(len, request_len, max_ratio)?;
    Ok(ptr..ptr + len)
}

/// Whether a reply of `len` bytes to a request of `request_len` may be sent: the
/// host's size and amplification policy, for every kind of guest.
pub fn check_reply_len(len: usize, request_len: usize, max_ratio: f64) -> Result<(), DropReason> {
    if len > MAX_DATAGRAM {
        return Err(DropReason::Oversize);
    }
    if max_ratio > 0.0 && len as f64 > max_ratio * request_len as f64 {
        return Err(DropReason::Amplification);
    }
    Ok(())
}

/// Where the datagram is to be copied, given what `alloc(len)` returned.
pub fn alloc_range(ptr: i32, len: usize, memory_len: usize) -> Result<Range<usize>, DropReason> {
    let start = ptr as u32 as usize;
    match start.checked_add(len) {
        Some(end) if end <= memory_len => Ok(start..end),
        _ => Err(DropReason::BadAlloc),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: usize = 65_536 * 2;

    fn pack(ptr: u32, len: u32) -> i64 {
        ((u64::from(ptr) << 32) | u64::from(len)) as i64
    }

    #[test]
    fn reply_inside_memory_is_sent() {
        assert_eq!(reply_range(pack(1024, 4), MEM, 4, 3.0), Ok(1024..1028));
        assert_eq!(
            reply_range(pack(0, 0), MEM, 0, 3.0),
            Ok(0..0),
            "an empty reply is a reply"
        );
        assert_eq!(reply_range(pack(MEM as u32 - 8, 8), MEM, 8, 3.0), Ok(MEM - 8..MEM));
    }

    #[test]
    fn minus_one_means_no_reply() {
        assert_eq!(reply_range(NO_REPLY, MEM, 4, 3.0), Err(DropReason::NoReply));
    }

    #[test]
    fn a_region_whose_32_bit_sum_wraps_into_memory_is_refused() {
        // 0xffff_fff0 + 0x20 wraps to 0x10 in 32 bits: inside memory if the check
        // were done in u32, so it must be done wider.
        assert_eq!(
            reply_range(pack(0xffff_fff0, 0x20), MEM, 0x20, 3.0),
            Err(DropReason::BadReply)
        );
        assert_eq!(alloc_range(-16, 0x20, MEM), Err(DropReason::BadAlloc));
        assert_eq!(alloc_range(-1, 1, MEM), Err(DropReason::BadAlloc));
        assert_eq!(alloc_range(MEM as i32 - 1, 1, MEM), Ok(MEM - 1..MEM));
    }

    #[test]
    fn regions_past_memory_are_bad_replies_without_overflow() {
        assert_eq!(
            reply_range(pack(MEM as u32 - 3, 4), MEM, 4, 3.0),
            Err(DropReason::BadReply)
        );
        assert_eq!(
            reply_range(pack(u32::MAX, u32::MAX - 1), MEM, 4, 0.0),
            Err(DropReason::BadReply)
        );
        // (u32::MAX, u32::MAX) packs to -1, which is "no reply".
        assert_eq!(
            reply_range(pack(u32::MAX, u32::MAX), MEM, 4, 0.0),
            Err(DropReason::NoReply)
        );
        assert_eq!(reply_range(pack(16, 1 << 31), MEM, 4, 0.0), Err(DropReason::BadReply));
        // Any other negative value is a pointer with its top bit set: far outside memory.
        assert_eq!(reply_range(-2, MEM, 4, 0.0), Err(DropReason::BadReply));
    }

    #[test]
    fn replies_larger_than_a_datagram_are_oversize() {
        let big = 4 * 65_536;
        assert_eq!(
            reply_range(pack(0, 65_508), big, 65_507, 0.0),
            Err(DropReason::Oversize)
        );
        assert_eq!(reply_range(pack(0, 65_507), big, 65_507, 3.0), Ok(0..65_507));
    }

    #[test]
    fn amplification_is_limited_by_ratio_unless_disabled() {
        assert_eq!(reply_range(pack(0, 12), MEM, 4, 3.0), Ok(0..12));
        assert_eq!(reply_range(pack(0, 13), MEM, 4, 3.0), Err(DropReason::Amplification));
        assert_eq!(reply_range(pack(0, 16), MEM, 4, 0.0), Ok(0..16));
        assert_eq!(reply_range(pack(0, 1), MEM, 0, 3.0), Err(DropReason::Amplification));
    }

    #[test]
    fn alloc_region_must_fit_memory() {
        assert_eq!(alloc_range(16, 4, MEM), Ok(16..20));
        assert_eq!(alloc_range(MEM as i32, 0, MEM), Ok(MEM..MEM));
        assert_eq!(alloc_range(MEM as i32 - 1, 2, MEM), Err(DropReason::BadAlloc));
        assert_eq!(alloc_range(-1, 1, MEM), Err(DropReason::BadAlloc));
    }

    #[test]
    fn signatures_print_as_wat() {
        assert_eq!(REQUIRED_EXPORTS[1].1.to_string(), "(func (param i32 i32) (result i64))");
        assert_eq!(HOST_FUNCTIONS[0].2.to_string(), "(func (param i32 i32 i32))");
    }
}
