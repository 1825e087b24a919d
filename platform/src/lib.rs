//! The production machinery of a tonic gRPC service, naming no service: a service crate registers its
//! gRPC services, their policy and its readiness checks, and this crate runs them.

pub mod config;
pub mod shutdown;
