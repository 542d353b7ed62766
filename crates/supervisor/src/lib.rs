//! The per-sandbox supervisor and the daemon's client for it.
//!
//! One supervisor process per sandbox owns the `runsc run` child, the agent's
//! protocol pipes and every process's output. The daemon reaches it over a
//! unix socket (see [`wire`]) and may die and restart at any time without the
//! sandbox noticing. This crate must not know about HTTP or the registry.

pub mod client;
pub mod secrets;
pub mod server;
pub mod wire;

pub use client::SupClient;
pub use wire::*;
