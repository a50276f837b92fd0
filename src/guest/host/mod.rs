//! The host calls, written once for every kind of guest: the store's [`Calls`]
//! (the client, the sessions lent for one call, what the call asked for in its
//! [`Outbox`]), the forwarding verbs (`forward`, `send`), `log` and `peer`
//! here, the state verbs in `state.rs`. A kind's store reaches them through
//! [`CallsView`], as wasmtime-wasi's hosts reach `WasiCtx` through `WasiView`;
//! each kind's imports only adapt guest memory or WIT types to these.

mod calls;
mod metrics;
mod state;

pub(crate) use calls::{Calls, CallsView, MetricsLink, Outbox, peer_text};
pub(crate) use metrics::Update;
