//! The end-to-end harness: brings tests onto the real local cluster (`make cluster-up`)
//! and checks real outcomes there.
//!
//! Not built yet; see issues #8 and #6.

#![forbid(unsafe_code)]
