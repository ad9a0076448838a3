//! After `make cluster-down`, nothing of the cluster is left: no processes, network
//! namespaces, cgroups, mounts, iptables rules or state besides the logs.
//! Run by e2e/run.sh after the cluster is down; on a running cluster it fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

fn testbed_dir() -> PathBuf {
    PathBuf::from(std::env::var("CRYOPOD_TESTBED").expect("CRYOPOD_TESTBED is set by e2e/run.sh"))
}

/// Programs the cluster runs; none may survive it.
const CLUSTER_PROGRAMS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "containerd",
    "containerd-shim-runc-v2",
    "s3s-fs",
];

#[test]
fn no_cluster_process_is_left() {
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        let name = exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .replace('\0', " ");
        if CLUSTER_PROGRAMS.contains(&name.as_str())
            || cgroups.contains(":/cryopod-")
            || (name == "socat" && cmdline.contains("cryopod-hub"))
            // The VM node's QEMU, whose disk and share live in the testbed.
            || (name == "qemu-system-x86_64" && cmdline.contains(&*testbed_dir().to_string_lossy()))
        {
            left.push(format!("{pid} {}", exe.display()));
        }
    }
    assert!(left.is_empty(), "processes of the cluster are still running: {left:#?}");
}

#[test]
fn no_network_namespace_is_left() {
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let ours: Vec<&String> = left
        .iter()
        .filter(|n| n.starts_with("cryopod-") || n.starts_with("cni-"))
        .collect();
    assert!(ours.is_empty(), "network namespaces left: {ours:?}");
}

#[test]
fn no_cgroup_is_left() {
    let mut left = Vec::new();
    for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        for entry in std::fs::read_dir(controller.path()).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with("cryopod-") {
                left.push(entry.path());
            }
        }
    }
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

#[test]
fn no_mount_is_left() {
    let dir = testbed_dir();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(dir.to_str().unwrap()) || l.contains("cryopod-node") || l.contains("cryopod-hub"))
        .collect();
    assert!(left.is_empty(), "mounts left: {left:#?}");
}

#[test]
fn no_iptables_rule_or_link_is_left_in_the_host_namespace() {
    // The cluster writes rules only inside its node namespaces.
    let save = std::process::Command::new("iptables-save").output().unwrap();
    let rules = String::from_utf8_lossy(&save.stdout);
    let ours: Vec<&str> = rules
        .lines()
        .filter(|l| l.contains("KUBE-") || l.contains("CNI-") || l.contains("cryopod"))
        .collect();
    assert!(ours.is_empty(), "iptables rules left in the host namespace: {ours:#?}");
    let links = std::process::Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains("cryopod") && !links.contains("cni0") && !links.contains("veth-n"),
        "links left: {links}"
    );
}

#[test]
fn only_logs_are_left_of_the_state_directory() {
    let dir = testbed_dir();
    let left: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.iter().all(|n| n == "logs"),
        "{} still holds {left:?}",
        dir.display()
    );
}
