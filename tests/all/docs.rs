//! The guests shown in docs/HANDLERS.md, docs/ABI.md and examples/ work as
//! documented, and every link in the README and docs/ leads somewhere.

use crate::common;

use common::{ask, client, start};

/// The first ```wat block of a Markdown file.
fn wat_block(markdown: &str) -> String {
    let start = markdown.find("```wat\n").expect("a ```wat block") + "```wat\n".len();
    let len = markdown[start..].find("```").expect("the block's end");
    markdown[start..start + len].to_string()
}

fn assert_echoes(module: &[u8]) {
    let gateway = start(module);
    let c = client();
    for payload in [&b"chen"[..], b"", &vec![b'x'; 65_507]] {
        assert_eq!(ask(&c, gateway.local_addr(), payload), payload);
    }
}

#[test]
fn handlers_guide_guest_echoes() {
    assert_echoes(wat_block(include_str!("../../docs/HANDLERS.md")).as_bytes());
}

#[test]
fn abi_document_guest_echoes() {
    assert_echoes(wat_block(include_str!("../../docs/ABI.md")).as_bytes());
}

#[test]
fn examples_echo_wat_echoes() {
    assert_echoes(include_bytes!("../../examples/echo.wat"));
}

#[test]
fn every_handler_in_the_handlers_table_exists_with_its_module() {
    let readme = include_str!("../../docs/HANDLERS.md");
    let start = readme.find("| language | ABI |").expect("the handler table");
    let table: Vec<&str> = readme[start..].lines().take_while(|l| l.starts_with('|')).collect();
    assert!(table.len() >= 9, "a header, a rule and seven handlers: {table:#?}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut modules = 0;
    for row in &table[2..] {
        // Every `examples/…` or `guest/…` path named in the row, alone or in a
        // build command, exists; the built modules are wasm binaries.
        let spans = row.split('`').skip(1).step_by(2);
        for path in spans.flat_map(str::split_whitespace) {
            let path = path.trim_end_matches('/');
            if !(path.starts_with("examples/") || path.starts_with("guest/")) {
                continue;
            }
            assert!(
                root.join(path).exists(),
                "{path} in the docs/HANDLERS.md table does not exist"
            );
            if path.ends_with(".wasm") {
                modules += 1;
                let bytes = std::fs::read(root.join(path)).unwrap();
                assert!(bytes.starts_with(b"\0asm"), "{path} is not a wasm binary");
            }
        }
    }
    assert!(modules >= 6, "the table names every built module: {modules}");
}

/// Where a test named `module::…::name` in the docs may live:
/// `tests/all/module.rs` and `tests/cli/module.rs`, and every `src/…/module.rs`
/// or `module/mod.rs` (names such as `sessions` or `state` are taken by more
/// than one).
fn test_files(root: &std::path::Path, module: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for suite in ["tests/all", "tests/cli"] {
        let in_tests = root.join(suite).join(format!("{module}.rs"));
        if in_tests.exists() {
            found.push(in_tests);
        }
    }
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == module) && path.join("mod.rs").exists() {
                    found.push(path.join("mod.rs"));
                    // A folder's own tests may sit beside its mod.rs.
                    if path.join("tests.rs").exists() {
                        found.push(path.join("tests.rs"));
                    }
                }
                dirs.push(path);
            } else if path.file_stem().is_some_and(|n| n == module) {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn every_test_the_reliability_page_names_exists() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("docs/RELIABILITY.md")).unwrap();
    let mut checked = 0;
    let mut missing = Vec::new();
    for span in page.split('`').skip(1).step_by(2) {
        let parts: Vec<&str> = span.split("::").collect();
        let (Some(module), Some(name)) = (parts.first(), parts.last()) else {
            continue;
        };
        let looks_like_a_test = parts.len() >= 2
            && !module.is_empty()
            && module.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '*');
        if !looks_like_a_test {
            continue;
        }
        let files = test_files(root, module);
        if files.is_empty() {
            missing.push(format!("{span}: no tests/{module}.rs nor src/…/{module}.rs"));
            continue;
        }
        // `name_*` and `name…` name a family of tests by their start.
        let prefix = name.trim_end_matches(['*', '…']);
        if prefix.is_empty() {
            continue;
        }
        let wanted = if prefix.len() < name.len() {
            format!("fn {prefix}")
        } else {
            format!("fn {prefix}(")
        };
        let found = files
            .iter()
            .any(|f| std::fs::read_to_string(f).is_ok_and(|text| text.contains(&wanted)));
        if found {
            checked += 1;
        } else {
            missing.push(format!("{span}: no {wanted} in {files:?}"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/RELIABILITY.md names tests that do not exist:\n{}",
        missing.join("\n")
    );
    assert!(
        checked >= 40,
        "only {checked} tests named: has the page's form changed?"
    );
}

/// The anchors GitHub makes of a Markdown file's headings: lower case, only
/// letters, digits, `-`, `_` and spaces kept, spaces as `-`.
fn anchors(markdown: &str) -> Vec<String> {
    let mut fenced = false;
    let mut found = Vec::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let Some(heading) = line.strip_prefix('#').filter(|_| !fenced) else {
            continue;
        };
        let text = heading.trim_start_matches('#').trim().to_lowercase();
        let slug: String = text
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        found.push(slug);
    }
    found
}

/// The targets of `[text](target)` links outside code blocks.
fn links(markdown: &str) -> Vec<String> {
    let mut fenced = false;
    let mut found = Vec::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        for (i, _) in line.match_indices("](") {
            let rest = &line[i + 2..];
            if let Some(end) = rest.find(')') {
                found.push(rest[..end].to_string());
            }
        }
    }
    found
}

#[test]
fn every_link_in_the_readme_and_docs_resolves() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") || link.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if path.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(path)
            };
            let shown = page.strip_prefix(root).unwrap().display();
            if !target.exists() {
                broken.push(format!("{shown}: {link} (no such file)"));
            } else if !anchor.is_empty()
                && target.extension().is_some_and(|e| e == "md")
                && !anchors(&std::fs::read_to_string(&target).unwrap())
                    .iter()
                    .any(|a| a == anchor)
            {
                broken.push(format!("{shown}: {link} (no such heading)"));
            }
        }
    }
    assert!(checked >= 20, "only {checked} links found: the parser lost them");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_is_a_front_door() {
    let readme = include_str!("../../README.md");
    let lines = readme.lines().count();
    assert!(lines <= 150, "the README has {lines} lines: the rest belongs in docs/");
}

/// docs/REFERENCE.md is what the code generates from clap and the config
/// schema, so no flag or key is missing or stale.
#[test]
fn the_reference_is_what_the_code_generates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("docs/REFERENCE.md");
    let generated = wasmgate::cli::Cli::reference();
    if std::env::var_os("WASMGATE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/REFERENCE.md is out of date: regenerate it with \
         `WASMGATE_BLESS=1 cargo test --test all docs::the_reference` and commit it"
    );
    // Every serving flag and every key is in it.
    for flag in [
        "--state-redis-ca",
        "--shadow-mismatches",
        "--record-sample",
        "--cache-key",
    ] {
        assert!(generated.contains(&format!("`{flag}")), "{flag}");
    }
    for key in [
        "`resolve_every`",
        "`redis_ca`",
        "`max_sessions_per_prefix`",
        "`promote_min_time`",
    ] {
        assert!(generated.contains(key), "{key}");
    }
}
