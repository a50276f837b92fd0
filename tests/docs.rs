//! The guests shown in the README, docs/ABI.md and examples/ work as documented.

mod common;

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
fn readme_guest_echoes() {
    assert_echoes(wat_block(include_str!("../README.md")).as_bytes());
}

#[test]
fn abi_document_guest_echoes() {
    assert_echoes(wat_block(include_str!("../docs/ABI.md")).as_bytes());
}

#[test]
fn examples_echo_wat_echoes() {
    assert_echoes(include_bytes!("../examples/echo.wat"));
}

#[test]
fn every_handler_in_the_readme_table_exists_with_its_module() {
    let readme = include_str!("../README.md");
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
            assert!(root.join(path).exists(), "{path} in the README table does not exist");
            if path.ends_with(".wasm") {
                modules += 1;
                let bytes = std::fs::read(root.join(path)).unwrap();
                assert!(bytes.starts_with(b"\0asm"), "{path} is not a wasm binary");
            }
        }
    }
    assert!(modules >= 6, "the table names every built module: {modules}");
}
