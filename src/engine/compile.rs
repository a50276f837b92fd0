//! Reading a module file and compiling its bytes: a core module, a component
//! or WAT text, told apart by their first bytes, with a reason for anything else.

use std::fs::OpenOptions;
use std::io::{self, Read as _};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

use anyhow::bail;
use wasmtime::component::Component;
use wasmtime::{Engine, Module};

use crate::text::cut;

/// The largest module file accepted; anything bigger is refused before compiling.
pub const MAX_MODULE_BYTES: usize = 64 << 20;

/// Reads a module file, refusing one over [`MAX_MODULE_BYTES`] without reading it
/// all, and anything that is not a regular file (a FIFO, a directory, a device)
/// without blocking on it or reading from it.
pub fn read_module(path: &Path) -> io::Result<Vec<u8>> {
    read_regular(path, MAX_MODULE_BYTES, "modules")
}

/// Opens `path` for reading if it is a regular file: never a FIFO, a device
/// or a directory (the error says which it is).
pub(crate) fn open_regular(path: &Path) -> io::Result<std::fs::File> {
    // A plain open() of a FIFO blocks until a writer comes; non-blocking it returns
    // at once, and the type check below refuses it.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is {}, not a regular file", file_kind(&meta.file_type())),
        ));
    }
    Ok(file)
}

/// Reads a regular file of at most `max` bytes (`what` names such files in
/// the error): a FIFO, a device (`/dev/zero`) or a directory is refused at
/// once, without blocking and without reading it.
pub(crate) fn read_regular(path: &Path, max: usize, what: &str) -> io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let meta = file.metadata()?;
    let too_large = || {
        io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("it is over the {max} byte limit for {what}"),
        )
    };
    if meta.len() > max as u64 {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// What a file that is not a regular file is, for an error message.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// What compiling gives: a core module or a component.
pub enum Compiled {
    Module(Module),
    Component(Component),
}

/// The layer byte of a component binary (`\0asm`, version 0x0d, layer 1).
const COMPONENT_HEADER: [u8; 4] = [0x0d, 0, 1, 0];

/// Compiles a `\0asm` binary (a core module or a component) or WAT text,
/// refusing other inputs with a reason.
pub fn compile(engine: &Engine, bytes: &[u8]) -> anyhow::Result<Compiled> {
    if bytes.len() > MAX_MODULE_BYTES {
        bail!(
            "is {} bytes, over the {} byte limit for modules",
            bytes.len(),
            MAX_MODULE_BYTES
        );
    }
    let compiled = if let Some(version) = bytes.strip_prefix(b"\0asm") {
        match version.get(..4) {
            Some([1, 0, 0, 0]) => Module::from_binary(engine, bytes).map(Compiled::Module),
            Some(v) if v == COMPONENT_HEADER => Component::from_binary(engine, bytes).map(Compiled::Component),
            _ => bail!(
                "is a WebAssembly binary of an unknown version or layer; wasmgate runs core modules and components"
            ),
        }
    } else if bytes.starts_with(b"\x7fELF") {
        bail!("is a precompiled (serialized) module; only `.wasm` binaries and `.wat` text are accepted");
    } else {
        let Ok(text) = std::str::from_utf8(bytes) else {
            bail!("is neither a WebAssembly binary (it does not start with \\0asm) nor WAT text");
        };
        let trimmed = text.trim_start();
        if trimmed.is_empty() {
            bail!("is empty");
        }
        if trimmed.starts_with("(component") {
            Component::new(engine, text).map(Compiled::Component)
        } else {
            Module::new(engine, text).map(Compiled::Module)
        }
    };
    // A WAT error quotes the offending line, which may be megabytes long.
    compiled.map_err(|e| anyhow::anyhow!("is not valid WebAssembly: {}", cut(&format!("{e:#}"), 1000)))
}
