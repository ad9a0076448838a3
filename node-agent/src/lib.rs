//! The cryopod node agent: a privileged DaemonSet that freezes a pod at one instant,
//! dumps it with CRIU, stores the images, and restores pods.
//!
//! Built so far: the cgroup freezer ([`cgroup`]), the pod freeze protocol with its
//! deadline watchdog ([`freeze`]) and the crash journal that thaws after an agent
//! crash ([`journal`]). Discovery, dump, packaging, storage and the gRPC API follow
//! (issue #3); `docs/design.md` describes the plan.

#![forbid(unsafe_code)]

pub mod capture;
pub mod cgroup;
pub mod checkpoint;
pub mod cri;
pub mod discovery;
pub mod dump;
pub mod freeze;
pub mod hooks;
pub mod inspect;
pub mod journal;
pub mod metrics;
pub mod package;
pub mod run;
pub mod server;
pub mod store;
