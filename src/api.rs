//! The gRPC API generated from `proto/` by `build.rs`, which also names its proto package.

include!(concat!(
    env!("OUT_DIR"),
    "/",
    env!("API_PROTO_PACKAGE"),
    ".rs"
));

/// Encoded descriptors of the API and its imports, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("api_descriptor");
