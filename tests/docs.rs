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
