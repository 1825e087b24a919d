//! The RPCs a server answers, read from the encoded descriptor sets of the services it serves: what
//! configuration naming methods is checked against, and what each call's metrics and logs are
//! labelled with.

use prost::Message;

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

/// The descriptor sets of the services the platform serves beside the service's own: health and
/// both reflection versions.
pub const PLATFORM_DESCRIPTOR_SETS: [&[u8]; 3] = [
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// Every method of every service in `descriptor_sets` (encoded `FileDescriptorSet`s).
pub fn methods_in(descriptor_sets: &[&[u8]]) -> Vec<Method> {
    descriptor_sets
        .iter()
        // The sets are compiled in: one that does not decode is a build defect, and has no methods.
        .filter_map(|encoded| prost_types::FileDescriptorSet::decode(*encoded).ok())
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

/// The message types of `descriptor_sets`, to decode messages for the log.
pub fn descriptor_pool(descriptor_sets: &[&[u8]]) -> prost_reflect::DescriptorPool {
    let mut pool = prost_reflect::DescriptorPool::new();
    for encoded in descriptor_sets {
        // Compiled in: a set that does not load is a build defect, and its messages are logged
        // as undecodable.
        let _ = pool.decode_file_descriptor_set(*encoded);
    }
    pool
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_platform_method_is_found_with_its_kind() {
        let methods = methods_in(&PLATFORM_DESCRIPTOR_SETS);
        let kind = |full: &str| {
            methods
                .iter()
                .find(|method| method.full_name() == full)
                .map(|method| method.kind)
        };
        assert_eq!(kind("grpc.health.v1.Health/Check"), Some(MethodKind::Unary));
        assert_eq!(
            kind("grpc.health.v1.Health/Watch"),
            Some(MethodKind::ServerStream)
        );
        assert_eq!(
            kind("grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some(MethodKind::BidiStream)
        );
        assert_eq!(
            kind("grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Some(MethodKind::BidiStream)
        );
    }
}
