//! Tollgate: an entitlement policy decision point.
//!
//! Modules in reading order: the data model of a compiled snapshot, usage periods, the policy
//! files and their compiler, the pure decision engine, signed snapshot files, the in-memory
//! usage store, metrics, the JSON wire types, the sidecar server, and the synthetic policy
//! generator.

pub mod container;
pub mod control_plane;
pub mod engine;
pub mod generate;
pub mod model;
pub mod period;
pub mod policy;
pub mod serve;
pub mod sidecar;
pub mod snapshot;
pub mod telemetry;
pub mod usage;
pub mod wire;
