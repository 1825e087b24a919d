//! The gRPC API generated from `proto/` by `build.rs`, which also names its proto package.

include!(concat!(
    env!("OUT_DIR"),
    "/",
    env!("API_PROTO_PACKAGE"),
    ".rs"
));

/// Encoded descriptors of the API and its imports, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("api_descriptor");

pub use platform::methods::{Method, MethodKind};

/// The API's full service name, as health checks and configuration name it.
pub const ORDER_SERVICE_NAME: &str = order_service_server::SERVICE_NAME;

/// Every method the server serves: the API's and the platform's (health, reflection). The server
/// reads the same descriptors when it is built; this is for the tests that check the API against it.
pub fn served_methods() -> Vec<Method> {
    let mut sets = vec![FILE_DESCRIPTOR_SET];
    sets.extend(platform::methods::PLATFORM_DESCRIPTOR_SETS);
    platform::methods::methods_in(&sets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_knows_every_served_method_and_its_kind() {
        let methods = served_methods();
        let kind = |full: &str| {
            methods
                .iter()
                .find(|method| method.full_name() == full)
                .map(|method| method.kind)
        };
        let service = ORDER_SERVICE_NAME;
        assert_eq!(
            kind(&format!("{service}/GetOrder")),
            Some(MethodKind::Unary)
        );
        assert_eq!(
            kind(&format!("{service}/UpdateOrders")),
            Some(MethodKind::ClientStream)
        );
        assert_eq!(
            kind(&format!("{service}/SearchOrders")),
            Some(MethodKind::ServerStream)
        );
        assert_eq!(
            kind(&format!("{service}/ProcessOrders")),
            Some(MethodKind::BidiStream)
        );
        // The platform's own services are served beside it (their kinds are the platform's tests').
        assert!(kind("grpc.health.v1.Health/Check").is_some());
    }
}
