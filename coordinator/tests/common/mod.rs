//! Test harness shared by the integration tests.

pub mod etcd;
pub mod server;
