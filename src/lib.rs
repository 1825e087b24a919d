//! The order service as a library: everything `main` wires together, and what the tests drive.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod domain;
pub mod error;
pub mod server;
pub mod service;
pub mod status;
pub mod store;

/// This service's name, version and build, as the platform reports them (metrics, traces).
pub const SERVICE: platform::ServiceInfo = platform::service_info!();
