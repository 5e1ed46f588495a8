//! The contract shared by every qslice part.
//!
//! # Layout
//! - [`slice`]: Mailman's slice math and queue file names.
//! - [`keys`]: the etcd key layout (the only place that knows the prefix scheme).
//! - [`records`]: the versioned JSON records kept in etcd.
//! - [`mailman`]: what is read of a Mailman 3 site's mailman.cfg and runner command line.
//! - `admin`: the generated gRPC admin API (`qslice.admin.v1`; feature `admin-api`, on
//!   by default).

pub mod keys;
pub mod mailman;
pub mod records;
pub mod slice;

/// The gRPC admin API, generated from `proto/qslice/admin/v1/admin.proto`.
#[cfg(feature = "admin-api")]
#[allow(missing_docs, clippy::all)]
pub mod admin {
    tonic::include_proto!("qslice.admin.v1");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("qslice_admin_descriptor");
}

/// The version of this qslice build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
