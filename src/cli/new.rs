//! `wasmgate new`: writes a minimal handler project for a language (from
//! `templates/`), with `wit/handler.wit` for components, and says the commands
//! that build and serve it.

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::guest::component::HANDLER_WIT;

/// The languages a project can be started in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A component built with componentize-py.
    Python,
    /// A component built with componentize-js (SpiderMonkey).
    Js,
    /// A component built with cargo and wit-bindgen (wasm32-wasip2).
    Rust,
    /// An ABI v1 module in freestanding C, built with clang.
    C,
    /// An ABI v1 module in WebAssembly text: nothing to build.
    Wat,
}

/// A template file: its path in the project and its text, `{{name}}` standing
/// for the project's name.
type File = (&'static str, &'static str);

const PYTHON: &[File] = &[
    ("app.py", include_str!("../../templates/python/app.py")),
    (
        "requirements.txt",
        include_str!("../../templates/python/requirements.txt"),
    ),
];
const JS: &[File] = &[
    ("handler.js", include_str!("../../templates/js/handler.js")),
    ("package.json", include_str!("../../templates/js/package.json")),
];
const RUST: &[File] = &[
    ("Cargo.toml", include_str!("../../templates/rust/Cargo.toml")),
    ("src/lib.rs", include_str!("../../templates/rust/src/lib.rs")),
];
const C: &[File] = &[("handler.c", include_str!("../../templates/c/handler.c"))];
const WAT: &[File] = &[("handler.wat", include_str!("../../templates/wat/handler.wat"))];

/// Checks a project name: it names a directory, a Python module's output, an
/// npm package and a crate, so lowercase ASCII letters, digits, `-` and `_`,
/// starting with a letter.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_start = name.starts_with(|c: char| c.is_ascii_lowercase());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if name.len() > 64 || !ok_start || !ok_chars {
        return Err(format!(
            "`{name}` cannot name a project: use lowercase letters, digits, `-` and `_`, starting with a letter (at most 64)"
        ));
    }
    Ok(())
}

/// Writes the project `name` for `lang` into `parent/name`, which must not
/// exist yet, and returns the commands that build and serve it, in order (the
/// first is `cd name`; the last serves).
pub fn create(lang: Lang, name: &str, parent: &Path) -> anyhow::Result<Vec<String>> {
    check_name(name).map_err(anyhow::Error::msg)?;
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} already exists; choose another name or remove it", dir.display());
    }
    let (files, component) = match lang {
        Lang::Python => (PYTHON, true),
        Lang::Js => (JS, true),
        Lang::Rust => (RUST, true),
        Lang::C => (C, false),
        Lang::Wat => (WAT, false),
    };
    let mut all: Vec<(&str, String)> = files
        .iter()
        .map(|(path, text)| (*path, text.replace("{{name}}", name)))
        .collect();
    if component {
        all.push(("wit/handler.wit", HANDLER_WIT.to_string()));
    }
    for (path, text) in &all {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let serve = |module: &str, extra: &str| format!("wasmgate --module {module}{extra}");
    let mut steps = vec![format!("cd {name}")];
    match lang {
        Lang::Python => steps.extend([
            "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt".to_string(),
            format!(".venv/bin/componentize-py -d wit -w handler componentize app -o {name}.wasm"),
            serve(&format!("{name}.wasm"), ""),
        ]),
        Lang::Js => steps.extend([
            "npm install".to_string(),
            "npm run build".to_string(),
            // SpiderMonkey's heap starts at about 65 MiB, past the default cap,
            // and a garbage collection now and then outlasts the default 10 ms.
            serve(&format!("{name}.wasm"), " --max-memory 128MiB --timeout-ms 50"),
        ]),
        Lang::Rust => steps.extend([
            "rustup target add wasm32-wasip2".to_string(),
            "cargo build --release --target wasm32-wasip2".to_string(),
            serve(
                &format!("target/wasm32-wasip2/release/{}.wasm", name.replace('-', "_")),
                "",
            ),
        ]),
        Lang::C => steps.extend([
            format!("clang --target=wasm32 -O2 -s -nostdlib -Wl,--no-entry -o {name}.wasm handler.c"),
            serve(&format!("{name}.wasm"), ""),
        ]),
        Lang::Wat => steps.push(serve("handler.wat", "")),
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_name_a_project_are_refused() {
        for bad in ["", "Upper", "1st", "a b", "a/b", "../x", "é", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "my-handler", "dns_2"] {
            assert_eq!(check_name(good), Ok(()));
        }
    }

    #[test]
    fn every_language_writes_its_files_with_the_name_and_the_world() {
        let tmp = tempfile::tempdir().unwrap();
        for (lang, file) in [
            (Lang::Python, "app.py"),
            (Lang::Js, "package.json"),
            (Lang::Rust, "Cargo.toml"),
            (Lang::C, "handler.c"),
            (Lang::Wat, "handler.wat"),
        ] {
            let name = format!("p-{lang:?}").to_lowercase();
            let steps = create(lang, &name, tmp.path()).unwrap();
            assert_eq!(steps[0], format!("cd {name}"));
            assert!(steps.last().unwrap().starts_with("wasmgate --module "), "{steps:?}");
            let text = std::fs::read_to_string(tmp.path().join(&name).join(file)).unwrap();
            assert!(!text.contains("{{name}}"), "{file}");
            let has_world = tmp.path().join(&name).join("wit/handler.wit").exists();
            assert_eq!(
                has_world,
                matches!(lang, Lang::Python | Lang::Js | Lang::Rust),
                "{lang:?}"
            );
            // A second time the directory exists: refused, nothing overwritten.
            let err = create(lang, &name, tmp.path()).unwrap_err().to_string();
            assert!(err.contains("already exists"), "{err}");
        }
    }
}
