//! The wasmtime engine's settings, shared by serving and the compiling child,
//! and turning module bytes into compiled code ([`compile()`]), in-process or in a
//! bounded child ([`child`]).

pub mod budget;
pub mod cache;
pub mod child;
pub mod compile;
mod settings;
pub mod ticker;

pub use compile::{Compiled, MAX_MODULE_BYTES, compile, read_module};
pub use settings::engine_config;
pub(crate) use settings::{
    COMPONENT_MAX_INSTANCES, COMPONENT_MAX_MEMORIES, COMPONENT_MAX_TABLES, COMPONENT_TABLE_ELEMENTS,
    MAX_TABLE_ELEMENTS, MAX_TABLES,
};
