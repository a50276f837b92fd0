//! Modules that do not fit the ABI or the limits are refused, at start-up and by
//! `wasmgate check`, with a message that names the file and the problem. Runs the
//! built binary.

use crate::common;

use common::{run_to_end, write_file};

/// A valid guest with `items` added.
fn valid_with(items: &str) -> String {
    format!(
        r#"(module
        {items}
        (memory (export "memory") 1)
        (func (export "alloc") (param i32) (result i32) i32.const 0)
        (func (export "handle") (param i32 i32) (result i64) i64.const -1))"#
    )
}

/// Each bad module, with words its error message must contain.
fn bad_modules() -> Vec<(&'static str, String, Vec<&'static str>)> {
    vec![
        (
            "missing_handle.wat",
            r#"(module (memory (export "memory") 1)
                (func (export "alloc") (param i32) (result i32) i32.const 0))"#
                .to_string(),
            vec!["missing export `handle`", "(func (param i32 i32) (result i64))"],
        ),
        (
            "missing_memory.wat",
            r#"(module (memory 1)
                (func (export "alloc") (param i32) (result i32) i32.const 0)
                (func (export "handle") (param i32 i32) (result i64) i64.const -1))"#
                .to_string(),
            vec!["missing export `memory`"],
        ),
        (
            "wrong_signature.wat",
            r#"(module (memory (export "memory") 1)
                (func (export "alloc") (param i32) (result i32) i32.const 0)
                (func (export "handle") (param i32 i32) (result i32) i32.const 0))"#
                .to_string(),
            vec![
                "export `handle` has type (func (param i32 i32) (result i32))",
                "expected (func (param i32 i32) (result i64))",
            ],
        ),
        (
            "wasi_import.wat",
            valid_with(r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#),
            vec!["wasi_snapshot_preview1.fd_write", "WASI"],
        ),
        (
            "half_a_probe.wat",
            valid_with(r#"(func (export "probe") (param i32 i32) (result i64) i64.const -1)"#),
            vec!["exports one of `probe` and `probe_reply`"],
        ),
        (
            "unknown_import.wat",
            valid_with(r#"(import "env" "now" (func (result i64)))"#),
            vec!["env.now", "wasmgate.log", "wasmgate.peer"],
        ),
        (
            "wrong_host_signature.wat",
            valid_with(r#"(import "wasmgate" "peer" (func (param i32) (result i32)))"#),
            vec!["import `wasmgate.peer` has type (func (param i32) (result i32))"],
        ),
        (
            "endless_start.wat",
            valid_with("(func $s (loop $l (br $l))) (start $s)"),
            vec!["start function ran past the 10 ms time budget"],
        ),
        (
            "trapping_start.wat",
            valid_with("(func $s unreachable) (start $s)"),
            vec!["start function failed", "unreachable"],
        ),
        (
            "four_gib_memory.wat",
            r#"(module (memory (export "memory") 65536)
                (func (export "alloc") (param i32) (result i32) i32.const 0)
                (func (export "handle") (param i32 i32) (result i64) i64.const -1))"#
                .to_string(),
            vec!["4294967296 bytes", "memory limit", "--max-memory"],
        ),
        (
            "not_wasm.wasm",
            "\u{1}\u{2}\u{3} definitely not WebAssembly \u{ff}".to_string(),
            vec!["is not valid WebAssembly"],
        ),
        (
            "precompiled.cwasm",
            "\u{7f}ELF precompiled".to_string(),
            vec!["precompiled"],
        ),
        ("empty.wat", String::new(), vec!["empty"]),
        // AssemblyScript-style: imports `env.abort`, forgot to export `alloc`.
        (
            "assemblyscript_without_alloc.wat",
            r#"(module (import "env" "abort" (func (param i32 i32 i32 i32)))
                (memory (export "memory") 1)
                (func (export "handle") (param i32 i32) (result i64) i64.const -1))"#
                .to_string(),
            vec!["missing export `alloc` with type (func (param i32) (result i32))"],
        ),
        (
            "abort_wrong_type.wat",
            valid_with(r#"(import "env" "abort" (func (param i32)))"#),
            vec![
                "import `env.abort` has type (func (param i32))",
                "expected (func (param i32 i32 i32 i32))",
            ],
        ),
        (
            "wasi_command_with_host_import.wat",
            wasi_command(r#"(import "wasmgate" "log" (func (param i32 i32 i32)))"#),
            vec!["wasmgate.log", "WASI command", "stderr", "WASMGATE_PEER"],
        ),
        (
            "wasi_preview0.wat",
            wasi_command(r#"(import "wasi_unstable" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#),
            vec!["wasi_unstable.fd_write", "preview 0", "wasm32-wasip1"],
        ),
        (
            "wasi_unknown_function.wat",
            wasi_command(r#"(import "wasi_snapshot_preview1" "no_such_call" (func))"#),
            vec!["no_such_call", "cannot be linked as a WASI command"],
        ),
        (
            "wasi_wrong_import_type.wat",
            wasi_command(r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32)))"#),
            vec!["fd_write", "cannot be linked as a WASI command"],
        ),
        (
            "on_reply_wrong_type.wat",
            valid_with(r#"(func (export "on_reply") (param i32) (result i64) i64.const -1)"#),
            vec![
                "export `on_reply` has type (func (param i32) (result i64))",
                "expected (func (param i32 i32) (result i64))",
            ],
        ),
        (
            "forward_wrong_type.wat",
            valid_with(r#"(import "wasmgate" "forward" (func (param i32 i32) (result i32)))"#),
            vec![
                "import `wasmgate.forward` has type (func (param i32 i32) (result i32))",
                "expected (func (param i32 i32 i32 i32) (result i32))",
            ],
        ),
        (
            "wasi_start_wrong_type.wat",
            r#"(module (memory (export "memory") 1)
                (func (export "_start") (param i32)))"#
                .to_string(),
            vec!["export `_start` has type (func (param i32))", "expected (func)"],
        ),
        (
            "wasi_reactor.wat",
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (func (export "_initialize")))"#
                .to_string(),
            vec!["_initialize", "reactor", "`main`"],
        ),
    ]
}

/// A WASI command that does nothing, with `items` added.
fn wasi_command(items: &str) -> String {
    format!(
        r#"(module
        {items}
        (memory (export "memory") 1)
        (func (export "_start")))"#
    )
}

#[test]
fn bad_modules_are_refused_by_check_with_the_file_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    for (name, source, words) in bad_modules() {
        let path = write_file(dir.path(), name, source.as_bytes());
        let (code, stdout, stderr) = run_to_end(&["check", &path]);
        assert_eq!(
            code,
            Some(1),
            "check {name} should fail; stdout: {stdout} stderr: {stderr}"
        );
        assert!(
            stderr.contains(&path),
            "{name}: message does not name the file: {stderr}"
        );
        for word in words {
            assert!(stderr.contains(word), "{name}: message lacks {word:?}: {stderr}");
        }
    }
}

#[test]
fn bad_modules_stop_the_gateway_at_start_up_with_the_file_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    for (name, source, words) in bad_modules() {
        let path = write_file(dir.path(), name, source.as_bytes());
        let (code, _, stderr) = run_to_end(&["--listen", "127.0.0.1:0", "--module", &path]);
        assert_eq!(code, Some(1), "{name} should stop the gateway: {stderr}");
        assert!(
            stderr.contains(&path),
            "{name}: message does not name the file: {stderr}"
        );
        assert!(
            stderr.contains(words[0]),
            "{name}: message lacks {:?}: {stderr}",
            words[0]
        );
        assert!(
            !stderr.contains("serving"),
            "{name}: the gateway served anyway: {stderr}"
        );
    }
}

#[test]
fn all_problems_of_a_module_are_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "many.wat",
        br#"(module (import "env" "x" (func)) (func (export "alloc")))"#,
    );
    let (code, _, stderr) = run_to_end(&["check", &path]);
    assert_eq!(code, Some(1));
    for word in [
        "missing export `memory`",
        "export `alloc` has type",
        "missing export `handle`",
        "env.x",
    ] {
        assert!(stderr.contains(word), "lacks {word:?}: {stderr}");
    }
}

#[test]
fn check_accepts_good_modules_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "good.wat",
        valid_with(r#"(import "wasmgate" "log" (func (param i32 i32 i32)))"#).as_bytes(),
    );
    let (code, stdout, stderr) = run_to_end(&["check", &path]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("ok") && stdout.contains("imports: wasmgate.log"),
        "{stdout}"
    );

    let embedded = write_file(dir.path(), "uppercase.wasm", wasmgate::DEFAULT_GUEST_WASM);
    let (code, stdout, _) = run_to_end(&["check", &embedded]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("imports: none"), "{stdout}");
}

#[test]
fn limits_apply_to_check_too() {
    let dir = tempfile::tempdir().unwrap();
    // Two pages at start: fine at 64 MiB, too big at 64 KiB.
    let path = write_file(
        dir.path(),
        "two_pages.wat",
        br#"(module (memory (export "memory") 2)
            (func (export "alloc") (param i32) (result i32) i32.const 0)
            (func (export "handle") (param i32 i32) (result i64) i64.const -1))"#,
    );
    assert_eq!(run_to_end(&["check", &path]).0, Some(0));
    let (code, _, stderr) = run_to_end(&["check", &path, "--max-memory", "64KiB"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("131072 bytes"), "{stderr}");
}

#[test]
fn missing_module_file_and_bad_flags_are_clear_errors() {
    let (code, _, stderr) = run_to_end(&["--module", "no/such/guest.wasm", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot read module no/such/guest.wasm"), "{stderr}");

    let (code, _, stderr) = run_to_end(&["--listen", "localhost"]);
    assert_eq!(code, Some(2), "clap's usage error code");
    assert!(stderr.contains("IP:PORT"), "{stderr}");

    let (code, _, stderr) = run_to_end(&["--max-memory", "lots"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("not a size"), "{stderr}");

    let (code, _, stderr) = run_to_end(&["--timeout-ms", "0"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--timeout-ms"), "{stderr}");
}

#[test]
fn an_address_in_use_is_a_clear_error() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, stderr) = run_to_end(&["--listen", &addr]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
}

#[test]
fn a_bad_proxy_protocol_setting_is_refused_naming_the_flag_or_key_and_the_value() {
    let (code, _, err) = run_to_end(&["--listen", "127.0.0.1:0", "--proxy-protocol-from", "10.0.0.0/33"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--proxy-protocol-from") && err.contains("10.0.0.0/33"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    for (toml, words) in [
        (
            "[[listener]]\nname = \"edge\"\nlisten = \"127.0.0.1:0\"\nproxy_protocol_from = [\"10.0.0.0/8\", \"proxy.example\"]\n",
            ["proxy_protocol_from", "proxy.example"],
        ),
        (
            "[upstreams.backend]\nendpoints = [\"127.0.0.1:9\"]\nproxy_protocol = \"v1\"\n\n[[listener]]\nname = \"edge\"\nlisten = \"127.0.0.1:0\"\n",
            [
                "upstreams.backend: proxy_protocol",
                "v1 is not a PROXY protocol version",
            ],
        ),
    ] {
        let path = write_file(dir.path(), "bad.toml", toml.as_bytes());
        let (code, _, err) = run_to_end(&["--config", &path]);
        assert_eq!(code, Some(1), "{err}");
        for w in words {
            assert!(err.contains(w), "{w:?} not in {err}");
        }
    }
}
