//! The order service as a library: everything `main` wires together, and what the tests drive.

pub mod api;
pub mod config;
pub mod domain;
pub mod error;
pub mod service;
pub mod store;
