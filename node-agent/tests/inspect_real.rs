//! What the agent reads of a frozen pod, on real processes of this host: SysV
//! segments attached from two "containers" (processes the test starts with perl),
//! and the TCP table of a real network namespace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use cryopod_node_agent::inspect::{pod_ip_connections_of, shared_sysv_segments};

/// Kills and reaps the child when dropped, so a failing test leaves nothing behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A perl process that attaches SysV segment `id` (a new one when `None`), prints the
/// id and waits.
fn attach(id: Option<&str>) -> (Reaped, String) {
    let script = r#"use IPC::SysV qw(IPC_PRIVATE IPC_CREAT shmat);
        my $id = @ARGV ? $ARGV[0] : shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
        defined $id or die "shmget: $!";
        defined shmat($id, undef, 0) or die "shmat: $!";
        $| = 1; print "$id\n"; sleep 600;"#;
    let mut child = Command::new("perl")
        .arg("-e")
        .arg(script)
        .args(id)
        .stdout(Stdio::piped())
        .spawn()
        .expect("perl (installed by hack/ensure-node-packages.sh)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(!line.trim().is_empty(), "perl attached no segment");
    (Reaped(child), line.trim().to_owned())
}

#[test]
fn a_sysv_segment_attached_from_two_containers_is_found() {
    let (first, id) = attach(None);
    let (second, same) = attach(Some(&id));
    assert_eq!(id, same);
    // Marked for removal now: the kernel frees it once both processes are gone.
    let removed = Command::new("ipcrm").args(["-m", &id]).status().unwrap();
    assert!(removed.success());
    let (a, b) = (first.0.id(), second.0.id());

    let found = shared_sysv_segments(
        Path::new("/proc"),
        &[("writer".into(), vec![a]), ("reader".into(), vec![b])],
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].shmid.to_string(), id);
    assert_eq!(found[0].containers, ["reader", "writer"]);

    // Both processes in one container is fine: CRIU restores that.
    assert!(shared_sysv_segments(Path::new("/proc"), &[("app".into(), vec![a, b])]).is_empty());
}

#[test]
fn this_processs_loopback_connections_are_not_pod_ip_connections() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_server, _) = listener.accept().unwrap();
    let connections = pod_ip_connections_of(Path::new("/proc"), std::process::id()).unwrap();
    let port = listener.local_addr().unwrap().port();
    assert!(
        connections
            .iter()
            .all(|c| c.local.port() != port && c.remote.port() != port),
        "{connections:?}"
    );
}
