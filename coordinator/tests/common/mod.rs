//! Test harness shared by the integration tests.
#![allow(dead_code)] // each test file uses part of it

pub mod etcd;
pub mod server;
