//! `wasmgate new`: each generated project is built with the commands it
//! prints and served by the gateway, which must answer with the template's
//! uppercase handler.
//!
//! The WAT project needs nothing and always runs. The others need their
//! toolchain (componentize-py from PyPI, componentize-js from npm, the Rust
//! wasm32-wasip2 target, clang with lld); they are `#[ignore]`d here and run by
//! `.ci/run` after scripts/build-guests.sh has installed those toolchains.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{Served, ask, client};

/// Runs `wasmgate new`, then every printed step but the last in the project
/// directory, then serves the project as the last step says; checks a reply.
fn create_build_and_serve(lang: &str, name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = common::wasmgate(&["new", "--lang", lang, name, "--dir", &tmp.path().display().to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let steps: Vec<&str> = stdout
        .lines()
        .skip_while(|l| *l != "next:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(str::trim)
        .collect();
    assert_eq!(steps.first(), Some(&format!("cd {name}").as_str()), "{stdout}");
    let project = tmp.path().join(name);
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_wasmgate")).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let (serve, build) = steps[1..].split_last().unwrap();
    for step in build {
        let status = Command::new("sh")
            .arg("-c")
            .arg(step)
            .current_dir(&project)
            .env("PATH", &path)
            .status()
            .unwrap();
        assert!(status.success(), "`{step}` failed in the {lang} project");
    }
    let mut args: Vec<String> = serve.split_whitespace().skip(1).map(String::from).collect();
    assert_eq!(args[0], "--module", "{serve}");
    args[1] = project.join(&args[1]).display().to_string();
    args.extend(["--listen", "127.0.0.1:0", "--no-cache"].iter().map(|s| s.to_string()));
    if !args.iter().any(|a| a == "--timeout-ms") {
        // Room for a debug build, which instantiates slowly.
        args.extend(["--timeout-ms".to_string(), "1000".to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gw = Served::start(&args);
    let c = client();
    assert_eq!(ask(&c, gw.addr, b"hello from new"), b"HELLO FROM NEW", "{lang}");
}

#[test]
fn a_new_wat_project_serves_with_the_printed_command() {
    create_build_and_serve("wat", "hello-wat");
}

#[test]
#[ignore = "needs python3 and PyPI (componentize-py); run by .ci/run"]
fn a_new_python_project_builds_and_serves_with_the_printed_commands() {
    create_build_and_serve("python", "hello-py");
}

#[test]
#[ignore = "needs the wasm32-wasip2 Rust target and crates.io; run by .ci/run"]
fn a_new_rust_project_builds_and_serves_with_the_printed_commands() {
    create_build_and_serve("rust", "hello-rs");
}

#[test]
#[ignore = "needs npm (componentize-js); run by .ci/run"]
fn a_new_js_project_builds_and_serves_with_the_printed_commands() {
    create_build_and_serve("js", "hello-js");
}

#[test]
#[ignore = "needs clang and lld; run by .ci/run"]
fn a_new_c_project_builds_and_serves_with_the_printed_commands() {
    create_build_and_serve("c", "hello-c");
}
