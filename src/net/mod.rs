//! Sockets: the sessions' connected UDP sockets, applying the session table's
//! commands and reading what upstreams send back.

pub mod sessions;
