//! The `ferrite.v1` gRPC API (generated code only; filled in by the cluster work).
