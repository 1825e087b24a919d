//! The gRPC API generated from `proto/` by `build.rs`, which also names its proto package.

include!(concat!(
    env!("OUT_DIR"),
    "/",
    env!("API_PROTO_PACKAGE"),
    ".rs"
));

/// Encoded descriptors of the API and its imports, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("api_descriptor");

/// How a method streams, as its proto declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    Unary,
    ClientStream,
    ServerStream,
    BidiStream,
}

/// One RPC the server answers, read from the descriptors it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method {
    /// `package.Service`
    pub service: String,
    /// `Method`
    pub name: String,
    pub kind: MethodKind,
    /// The request and response message types, fully qualified (`package.Message`).
    pub input: String,
    pub output: String,
}

impl Method {
    /// `package.Service/Method`, the form configuration uses.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.service, self.name)
    }

    /// `/package.Service/Method`, the HTTP/2 path.
    pub fn path(&self) -> String {
        format!("/{}/{}", self.service, self.name)
    }
}

/// Every method of every service the server can serve: the API, health and both reflection versions.
/// Configuration naming methods (timeouts, public methods) is checked against this at start-up.
pub fn served_methods() -> Vec<Method> {
    use prost::Message;

    [
        FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ]
    .into_iter()
    // The sets are compiled in: one that does not decode is a build defect, and has no methods.
    .filter_map(|encoded| prost_types::FileDescriptorSet::decode(encoded).ok())
    .flat_map(|set| set.file)
    .flat_map(|file| {
        let package = file.package().to_owned();
        file.service.into_iter().flat_map(move |service| {
            let service_name = if package.is_empty() {
                service.name().to_owned()
            } else {
                format!("{package}.{}", service.name())
            };
            service.method.into_iter().map(move |method| Method {
                service: service_name.clone(),
                name: method.name().to_owned(),
                input: method.input_type().trim_start_matches('.').to_owned(),
                output: method.output_type().trim_start_matches('.').to_owned(),
                kind: match (method.client_streaming(), method.server_streaming()) {
                    (false, false) => MethodKind::Unary,
                    (true, false) => MethodKind::ClientStream,
                    (false, true) => MethodKind::ServerStream,
                    (true, true) => MethodKind::BidiStream,
                },
            })
        })
    })
    .collect()
}

/// The API's and the health service's message types, to decode their messages for the log.
pub fn descriptor_pool() -> prost_reflect::DescriptorPool {
    let mut pool = prost_reflect::DescriptorPool::new();
    for encoded in [FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
        // Compiled in: a set that does not load is a build defect, and its messages are logged
        // as undecodable.
        let _ = pool.decode_file_descriptor_set(encoded);
    }
    pool
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
        let service = crate::health::ORDER_SERVICE_NAME;
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
        assert_eq!(
            kind("grpc.health.v1.Health/Watch"),
            Some(MethodKind::ServerStream)
        );
        assert_eq!(
            kind("grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some(MethodKind::BidiStream)
        );
    }
}
