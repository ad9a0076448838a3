//! Installing the runtime handler on a node (opt-in): the `cryopod-runc` binary and its
//! settings into a host directory, and a containerd drop-in that declares the
//! `cryopod` runtime (the runc shim with `BinaryName` set to it, and the pod
//! annotations `cryopod.io/*` passed to it). containerd reads drop-ins at start, so it
//! must be restarted once after the first install; later upgrades replace the binary
//! in place. Files are written to a temporary name and renamed, so a running shim
//! never sees a half-written one.

use std::path::{Path, PathBuf};

use crate::handler::HandlerConfig;

/// The RuntimeClass handler name.
pub const HANDLER_NAME: &str = "cryopod";

/// What to install where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerInstall {
    /// The `cryopod-runc` binary to copy.
    pub source: PathBuf,
    /// Where the node's root is mounted (`/` when run on the node itself); the
    /// other paths are as the node sees them.
    pub host_root: PathBuf,
    /// Host directory for the binary and its settings.
    pub bin_dir: PathBuf,
    /// The containerd drop-in to write (e.g. `/etc/containerd/conf.d/cryopod.toml`).
    pub dropin: PathBuf,
    /// The handler's settings.
    pub config: HandlerConfig,
    /// runc's state root for the handler, as the node's runc handler has it.
    pub runc_root: Option<PathBuf>,
    /// Whether the node's runc uses the systemd cgroup driver.
    pub systemd_cgroup: bool,
}

impl HandlerInstall {
    /// Where the binary goes.
    pub fn binary(&self) -> PathBuf {
        self.bin_dir.join("cryopod-runc")
    }
}

/// The containerd (config version 3) drop-in declaring the handler.
pub fn containerd_dropin(install: &HandlerInstall) -> String {
    let table = format!("plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{HANDLER_NAME}");
    let root = install
        .runc_root
        .as_ref()
        .map(|r| format!("    Root = '{}'\n", r.display()))
        .unwrap_or_default();
    format!(
        "# Written by `cryopod-node-agent install-handler`; containerd reads it at start.\n\
         version = 3\n\n\
         [{table}]\n  runtime_type = 'io.containerd.runc.v2'\n  pod_annotations = ['cryopod.io/*']\n\
         \x20 [{table}.options]\n    BinaryName = '{}'\n    SystemdCgroup = {}\n{root}",
        install.binary().display(),
        install.systemd_cgroup,
    )
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("cryopod-tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}

/// Installs the binary, its settings and the drop-in; returns the paths written.
pub fn install_handler(install: &HandlerInstall) -> std::io::Result<Vec<PathBuf>> {
    let on_host = |path: &Path| install.host_root.join(path.strip_prefix("/").unwrap_or(path));
    let binary = on_host(&install.binary());
    write_atomically(&binary, &std::fs::read(&install.source)?, 0o755)?;
    let settings = binary.with_file_name("cryopod-runc.json");
    let json = serde_json::json!({
        "runc": install.config.runc,
        "restores": install.config.restores,
        "criuDir": install.config.criu_dir,
        "iptables": install.config.iptables,
        "nsenter": install.config.nsenter,
    });
    write_atomically(&settings, json.to_string().as_bytes(), 0o644)?;
    let dropin = on_host(&install.dropin);
    write_atomically(&dropin, containerd_dropin(install).as_bytes(), 0o644)?;
    Ok(vec![binary, settings, dropin])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn installs_the_binary_its_settings_and_a_drop_in() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("built");
        std::fs::write(&source, b"#!/bin/true\n").unwrap();
        let install = HandlerInstall {
            source,
            host_root: dir.path().to_path_buf(),
            bin_dir: "/opt/cryopod/bin".into(),
            dropin: "/etc/containerd/conf.d/cryopod.toml".into(),
            config: HandlerConfig {
                runc: "/usr/sbin/runc".into(),
                restores: "/var/lib/cryopod/restores".into(),
                criu_dir: Some("/opt/criu/bin".into()),
                iptables: "iptables".into(),
                nsenter: "nsenter".into(),
            },
            runc_root: Some("/run/containerd/runc".into()),
            systemd_cgroup: false,
        };
        let written = install_handler(&install).unwrap();
        assert_eq!(written.len(), 3);
        let settings: HandlerConfig = serde_json::from_slice(&std::fs::read(&written[1]).unwrap()).unwrap();
        assert_eq!(settings, install.config);
        assert_eq!(written[2], dir.path().join("etc/containerd/conf.d/cryopod.toml"));
        let toml = std::fs::read_to_string(&written[2]).unwrap();
        assert!(
            toml.contains("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.cryopod]"),
            "{toml}"
        );
        assert!(toml.contains("pod_annotations = ['cryopod.io/*']"), "{toml}");
        assert!(toml.contains("BinaryName = '/opt/cryopod/bin/cryopod-runc'"), "{toml}");
        assert!(toml.contains("Root = '/run/containerd/runc'"), "{toml}");
    }
}
