//! One module per command family.

pub mod bench;
pub mod data;
pub mod generate;
pub mod train;
