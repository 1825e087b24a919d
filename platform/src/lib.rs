//! The production machinery of a tonic gRPC service, naming no service: a service crate registers its
//! gRPC services, their policy and its readiness checks, and this crate runs them.

pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod health;
pub mod healthcheck;
pub mod methods;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod tls;

/// What the running service is: its Cargo package's name and version, and the commit and compiler
/// it was built from. [`service_info!`] fills it in from the service's own crate; the platform
/// reports it in `<name>_build_info` and in the traces' resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: &'static str,
    pub version: &'static str,
    /// The commit (`BUILD_REVISION`, set by the service's `build.rs`).
    pub revision: &'static str,
    /// The compiler's version (`BUILD_RUSTC_VERSION`, set by the service's `build.rs`).
    pub rustc: &'static str,
}

/// The [`ServiceInfo`] of the crate that expands it (the service's, not the platform's).
#[macro_export]
macro_rules! service_info {
    () => {
        $crate::ServiceInfo {
            name: env!("CARGO_PKG_NAME"),
            version: env!("CARGO_PKG_VERSION"),
            revision: env!("BUILD_REVISION"),
            rustc: env!("BUILD_RUSTC_VERSION"),
        }
    };
}

/// The platform's test services (`proto/platform/testing/v1`), for its tests and for tests of
/// servers built on it.
#[cfg(any(test, feature = "test-support"))]
pub mod testing {
    include!(concat!(env!("OUT_DIR"), "/platform.testing.v1.rs"));

    /// Encoded descriptors of the test services, as a service registers its own.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("testing_descriptor");

    /// Every method a test server serves: the test services' and the platform's own.
    pub fn served_methods() -> Vec<crate::methods::Method> {
        let mut sets = vec![FILE_DESCRIPTOR_SET];
        sets.extend(crate::methods::PLATFORM_DESCRIPTOR_SETS);
        crate::methods::methods_in(&sets)
    }

    /// The service the tests run as.
    pub const SERVICE: crate::ServiceInfo = crate::ServiceInfo {
        name: "platform-testing",
        version: "0.0.0",
        revision: "test",
        rustc: "test",
    };
}
