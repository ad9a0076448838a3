//! What is only known once the pod is frozen and holds still: SysV shared memory
//! attached from more than one container (stock CRIU restores a segment into one
//! container only), and the TCP connections bound to the pod IP (a restored pod
//! usually gets another IP).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

/// An established TCP connection of the pod whose local end is not loopback.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodIpConnection {
    /// Local end (the pod IP).
    pub local: SocketAddr,
    /// Remote end.
    pub remote: SocketAddr,
}

impl std::fmt::Display for PodIpConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.local, self.remote)
    }
}

/// Parses `/proc/<pid>/net/tcp` or `tcp6` and returns the established connections
/// whose local address is not loopback.
pub fn pod_ip_connections(table: &str) -> Vec<PodIpConnection> {
    const ESTABLISHED: &str = "01";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (fields.get(1)?, fields.get(2)?, fields.get(3)?);
            if *state != ESTABLISHED {
                return None;
            }
            let (local, remote) = (proc_socket_addr(local)?, proc_socket_addr(remote)?);
            (!is_loopback(local.ip())).then_some(PodIpConnection { local, remote })
        })
        .collect()
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// `0100007F:1F90` (IPv4) or 32 hex digits then the port (IPv6): the kernel prints
/// each 32-bit word of the address in host (little-endian) order.
fn proc_socket_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
            .ok()
            .map(u32::swap_bytes)
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?.to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The established pod-IP connections of the network namespace that `pid` is in.
pub fn pod_ip_connections_of(proc_root: &Path, pid: u32) -> std::io::Result<Vec<PodIpConnection>> {
    let mut all = Vec::new();
    for table in ["tcp", "tcp6"] {
        match std::fs::read_to_string(proc_root.join(pid.to_string()).join("net").join(table)) {
            Ok(text) => all.extend(pod_ip_connections(&text)),
            // A kernel without IPv6 has no tcp6 table.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && table == "tcp6" => {}
            Err(e) => return Err(e),
        }
    }
    all.sort();
    Ok(all)
}

/// The SysV shm ids mapped in `/proc/<pid>/maps` (the inode column of `/SYSV…` lines).
pub fn sysv_shm_ids(maps: &str) -> BTreeSet<u64> {
    maps.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let path = fields.get(5)?;
            path.starts_with("/SYSV").then(|| fields.get(4)?.parse().ok())?
        })
        .collect()
}

/// A SysV segment mapped by processes of more than one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedSysvSegment {
    /// The shm id.
    pub shmid: u64,
    /// The containers that map it, in name order.
    pub containers: Vec<String>,
}

/// Finds SysV segments mapped from more than one container. `processes` lists each
/// container's name and PIDs.
pub fn shared_sysv_segments(proc_root: &Path, processes: &[(String, Vec<u32>)]) -> Vec<SharedSysvSegment> {
    let mut users: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for (container, pids) in processes {
        for pid in pids {
            // A process that exited meanwhile maps nothing.
            let Ok(maps) = std::fs::read_to_string(proc_root.join(pid.to_string()).join("maps")) else {
                continue;
            };
            for id in sysv_shm_ids(&maps) {
                users.entry(id).or_default().insert(container.clone());
            }
        }
    }
    users
        .into_iter()
        .filter(|(_, containers)| containers.len() > 1)
        .map(|(shmid, containers)| SharedSysvSegment {
            shmid,
            containers: containers.into_iter().collect(),
        })
        .collect()
}

/// The PIDs listed in a cgroup's `cgroup.procs`.
pub fn cgroup_pids(cgroup_dir: &Path) -> std::io::Result<Vec<u32>> {
    Ok(std::fs::read_to_string(cgroup_dir.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:2328 0100007F:A2F4 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0500F40A:2328 0100C80A:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0500F40A:9C40 0100C80A:0050 06 00000000:00000000 00:00000000 00000000     0        0 0 3 0 0 0 0 0 0
";

    #[test]
    fn only_established_non_loopback_connections_count() {
        assert_eq!(
            pod_ip_connections(TCP),
            vec![PodIpConnection {
                local: "10.244.0.5:9000".parse().unwrap(),
                remote: "10.200.0.1:54321".parse().unwrap(),
            }]
        );
    }

    #[test]
    fn ipv6_words_are_little_endian_and_mapped_loopback_is_loopback() {
        let tcp6 = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:2328 00000000000000000000000001000000:A2F4 01
   1: 0000000000000000FFFF00000100007F:2328 0000000000000000FFFF00000100007F:A2F4 01
   2: 000080FE00000000FF0000000100FE02:2328 000080FE00000000FF0000000200FE02:0050 01
";
        let found = pod_ip_connections(tcp6);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].local.to_string(), "[fe80::ff:2fe:1]:9000");
    }

    #[test]
    fn sysv_mappings_are_read_from_maps() {
        let maps = "7f0000000000-7f0000100000 rw-s 00000000 00:01 32769                      /SYSV0000002a (deleted)
7f0000200000-7f0000300000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6
7f0000400000-7f0000500000 rw-s 00000000 00:01 5                          /SYSV00000000 (deleted)
";
        assert_eq!(sysv_shm_ids(maps), BTreeSet::from([5, 32769]));
    }
}
