//! The end-to-end harness for the real local cluster (`make cluster-up`): image
//! building without a registry, and what the end-to-end tests share.

#![forbid(unsafe_code)]

pub mod chart;
pub mod compat;
pub mod matrix;
pub mod oci;
pub mod reliability;
pub mod testbed;
pub mod tls;
pub mod vm;
