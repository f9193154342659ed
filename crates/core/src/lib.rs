//! Tollgate's core: the data model of a compiled snapshot, usage periods, the pure decision
//! engine, and the clock seam. This crate depends on no async runtime, HTTP, JSON, logging or
//! I/O crate (its `Cargo.toml` is the proof), so it is what an application embeds in-process.
//!
//! Modules in reading order: `model` (what a snapshot holds), `period` (usage windows),
//! `rules` (license preference and quota rules, shared by the engine and the control plane),
//! `engine` (`decide` and `entitlements`), `clock` (the only place time is read).

pub mod clock;
pub mod engine;
pub mod model;
pub mod period;
pub mod rules;
