//! The control plane (filled in by the cluster work).
