//! Proving a module before it serves: captures of real traffic (read, and
//! recorded by a listener) and `wasmgate replay`, which runs a capture through
//! a module and compares.

pub(crate) mod canary;
pub mod candidate;
pub mod capture;
pub(crate) mod offline;
pub mod replay;
pub mod shadow;
pub(crate) mod tap;

pub use candidate::ShadowResult;
pub use offline::{Offline, Outcome};
pub use shadow::SHADOW_NICE;
