//! Fault-injection test beds for qslice's end-to-end tests.
//!
//! qslice's tests run real etcd and real binaries; these beds put faults between them
//! and the world: a file system that lies about renames, serves stale listings, fails
//! opens or hangs, and a TCP proxy that lets a request reach etcd but loses or delays
//! its reply (the "unknown outcome" of a commit).
//!
//! # Layout
//! - [`faultfs`]: the FUSE pass-through file system over a backing directory, its
//!   [`faultfs::Fault`]s, the control socket, and [`faultfs::FaultFs`], the handle a test
//!   mounts it with. `src/bin/qslice-faultfs.rs` is the thin binary that holds the mount.
//! - [`proxy`]: [`proxy::EtcdProxy`], a loopback TCP proxy to an etcd client URL whose
//!   replies can be delayed or dropped, switched at run time.
//!
//! The crate depends on no other qslice crate, so it builds on its own.

pub mod faultfs;
pub mod proxy;
