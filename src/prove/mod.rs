//! Proving a module before it serves: captures of real traffic (read, and
//! recorded by a listener) and `wasmgate replay`, which runs a capture through
//! a module and compares.

pub(crate) mod canary;
pub mod capture;
pub mod replay;
pub(crate) mod tap;
