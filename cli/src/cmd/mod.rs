//! One module per command family.

pub mod bench;
pub mod coordinator;
pub mod data;
pub mod generate;
pub mod health;
pub mod job;
pub mod plot;
pub mod quickstart;
pub mod security;
pub mod serve;
pub mod train;
pub mod worker;
