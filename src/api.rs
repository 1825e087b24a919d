//! The gRPC API generated from `proto/` by `build.rs`. The proto package is named here and in
//! `build.rs` only.

tonic::include_proto!("order.v1");

/// Encoded descriptors of the API and its imports, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("api_descriptor");
