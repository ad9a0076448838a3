//! The cryopod node agent: a privileged DaemonSet that freezes a pod at one instant,
//! dumps it with CRIU, stores the images, and restores pods.
//!
//! Not built yet; see issues #3 and #4 and `docs/design.md`. The crate exists so the
//! workspace layout, lints and CI are in place from the start.

#![forbid(unsafe_code)]
