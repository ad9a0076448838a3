//! The cryopod node agent: a privileged DaemonSet that freezes a pod at one instant,
//! dumps it with CRIU, stores the images, and restores pods.
//!
//! A checkpoint ([`checkpoint::NodeAgent::checkpoint`]): discovery through CRI
//! ([`discovery`]), hooks ([`hooks`]), the one-instant freeze with its watchdog and
//! crash journal ([`freeze`], [`journal`]), checks of the frozen pod ([`inspect`]),
//! capture of shared state and rootfs changes ([`capture`]), parallel CRIU dumps
//! through runc ([`dump`]), packaging and encryption ([`package`]) and verified
//! storage ([`store`]); served over gRPC ([`server`]) by the process in [`run`], with
//! [`metrics`]. A restore: [`restore`] prepares it on the target node, the runtime
//! handler ([`handler`], binary `cryopod-runc`, installed by [`install`]) restores
//! each container where the kubelet would start it. `docs/design.md` describes the whole.

#![forbid(unsafe_code)]

pub mod capture;
pub mod certs;
pub mod cgroup;
pub mod checkpoint;
pub mod cri;
pub mod discovery;
pub mod dump;
pub mod freeze;
pub mod handler;
pub mod hooks;
pub mod inspect;
pub mod install;
pub mod journal;
pub mod metrics;
pub mod package;
pub mod peer;
pub mod restore;
pub mod run;
pub mod safe_fs;
pub mod server;
pub mod signing;
pub mod store;
pub mod sweep;
