//! The edge between the `ferrite.v1` wire types and the domain: conversions with field-named
//! validation ([`convert`]) and the one mapping of [`crate::Error`] to `tonic::Status`
//! ([`status`]). Nothing else in the crate imports `ferrite_proto`.

pub mod convert;
pub mod status;
