//! Checking a component against the worlds before it is linked, and
//! describing what it exports and imports when it does not fit.

use std::fmt::Write as _;

use wasmtime::Engine;
use wasmtime::component::types::{ComponentFunc, ComponentItem};
use wasmtime::component::{Component, Type};

use super::host::{HANDLE, ON_REPLY, PACKAGE, PROBE, PROBE_REPLY, WORLD_FUNCTIONS};

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
        Some(item) => check_export(HANDLE, item, HANDLE_TYPE, &mut problems),
    }
    if let Some(item) = find(ON_REPLY) {
        check_export(ON_REPLY, item, ON_REPLY_TYPE, &mut problems);
    }
    match (find(PROBE), find(PROBE_REPLY)) {
        (Some(probe), Some(reply)) => {
            check_export(PROBE, probe, PROBE_TYPE, &mut problems);
            check_export(PROBE_REPLY, reply, PROBE_REPLY_TYPE, &mut problems);
        }
        (Some(_), None) | (None, Some(_)) => problems.push(format!(
            "it exports one of `{PROBE}` and `{PROBE_REPLY}` but not the other: a handler that writes \
             health probes exports both (world `probes` in wit/handler.wit)"
        )),
        (None, None) => {}
    }
    problems
}

/// An export's type as the worlds want it: its parameters (name and type),
/// and its result.
struct Signature {
    params: &'static [(&'static str, &'static str)],
    result: &'static str,
}

const HANDLE_TYPE: &Signature = &Signature {
    params: &[("datagram", "list<u8>"), ("peer", "string")],
    result: "option<list<u8>>",
};
const ON_REPLY_TYPE: &Signature = &Signature {
    params: &[("datagram", "list<u8>"), ("peer", "string"), ("upstream", "string")],
    result: "option<list<u8>>",
};
const PROBE_TYPE: &Signature = &Signature {
    params: &[("endpoint", "string")],
    result: "option<list<u8>>",
};
const PROBE_REPLY_TYPE: &Signature = &Signature {
    params: &[("endpoint", "string"), ("answer", "list<u8>")],
    result: "bool",
};

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
         `forward-key`, `send`, `wasmgate:handler/types`, `wasmgate:handler/state`, `wasmgate:handler/clients`, `wasmgate:handler/metrics`, `wasmgate:handler/notes` and WASI 0.2)"
    ))
}

fn check_export(name: &str, item: &ComponentItem, want: &Signature, problems: &mut Vec<String>) {
    let ComponentItem::ComponentFunc(func) = item else {
        problems.push(format!("its export `{name}` is not a function"));
        return;
    };
    let actual = signature(func);
    let params: Vec<String> = want.params.iter().map(|(p, ty)| format!("{p}: {ty}")).collect();
    let expected = format!("func({}) -> {}", params.join(", "), want.result);
    let found: Vec<String> = func.params().map(|(_, t)| wit_type(&t)).collect();
    let results: Vec<String> = func.results().map(|t| wit_type(&t)).collect();
    let types_match = found.len() == want.params.len() && found.iter().zip(want.params).all(|(f, (_, ty))| f == ty);
    if !types_match || results != [want.result] {
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

    /// `handle` as the world wants it, and `extra` exports of a core func
    /// `f` of any type.
    fn with_handle(extra: &str) -> String {
        format!(
            r#"(component
                (core module $m
                  (memory (export "memory") 1)
                  (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 0)
                  (func (export "h") (param i32 i32 i32 i32) (result i32) i32.const 0)
                  (func (export "f") (param i32 i32) (result i32) i32.const 0))
                (core instance $i (instantiate $m))
                (func (export "handle") (param "datagram" (list u8)) (param "peer" string) (result (option (list u8)))
                  (canon lift (core func $i "h") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
                {extra})"#
        )
    }

    #[test]
    fn probe_exports_come_both_or_neither_and_with_the_worlds_types() {
        let probe = r#"(func (export "probe") (param "endpoint" string) (result (option (list u8)))
            (canon lift (core func $i "f") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))"#;
        let (engine, c) = component(&with_handle(probe));
        let problems = check(&engine, &c);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("exports one of `probe` and `probe-reply` but not the other"),
            "{problems:?}"
        );
        // `probe-reply` taking the answer as a string.
        let wrong_reply = r#"(func (export "probe-reply") (param "endpoint" string) (result bool)
            (canon lift (core func $i "f") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))"#;
        let (engine, c) = component(&with_handle(&format!("{probe} {wrong_reply}")));
        let problems = check(&engine, &c);
        assert_eq!(
            problems,
            [
                "its export `probe-reply` is `func(endpoint: string) -> bool`; the world wants \
              `func(endpoint: string, answer: list<u8>) -> bool`"
            ]
        );
        let (engine, c) = component(&with_handle(""));
        assert!(check(&engine, &c).is_empty(), "no probes is fine");
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
}
