//! The VM node of the testbed (`hack/vm/`, joined by `e2e/cluster/vm-node.sh`): its own
//! kernel, systemd, cgroup v2 and the systemd cgroup driver. The host reaches it in
//! two ways: the command channel, a 9p share where the host drops scripts that the
//! guest runs as root (`hack/vm/lib.sh` is the shell side), and the network, through the
//! hub's namespace, where its address lives.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::testbed::{HarnessError, Testbed};

/// A VM node of the running testbed.
#[derive(Debug, Clone)]
pub struct VmNode {
    /// Its node name.
    pub name: String,
    /// Its address on the hub's bridge.
    pub ip: String,
    /// The host side of its 9p share (`/mnt/host` in the guest).
    pub share: PathBuf,
}

/// What a script run in the guest gave.
#[derive(Debug)]
pub struct Ran {
    pub status: i32,
    pub output: String,
}

impl VmNode {
    /// The VM nodes that `e2e/run.sh` names in `CRYOPOD_VM_NODES`. None is an error:
    /// the VM tier never passes by skipping.
    pub fn all(tb: &Testbed) -> Result<Vec<Self>, HarnessError> {
        let names = std::env::var("CRYOPOD_VM_NODES").unwrap_or_default();
        let nodes: Vec<Self> = names
            .split_whitespace()
            .map(|name| {
                let index: u32 = name.trim_start_matches("node-").parse().unwrap_or(0);
                Self {
                    name: name.to_owned(),
                    ip: format!("10.200.0.{}", 10 + index),
                    share: tb.dir.join(name).join("share"),
                }
            })
            .collect();
        if nodes.is_empty() {
            return Err(HarnessError::MissingEnv {
                name: "CRYOPOD_VM_NODES",
            });
        }
        Ok(nodes)
    }

    /// Runs `script` with bash as root in the guest and waits for it within `timeout`.
    pub async fn exec(&self, script: &str, timeout: Duration) -> Result<Ran, String> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = format!(
            "rs-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let (req, res) = (self.share.join("req"), self.share.join("res"));
        let tmp = req.join(format!(".{id}.tmp"));
        std::fs::write(&tmp, script).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, req.join(format!("{id}.sh"))).map_err(|e| format!("cannot queue {id}: {e}"))?;
        let rc = res.join(format!("{id}.rc"));
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(status) = std::fs::read_to_string(&rc)
                && let Ok(status) = status.trim().parse()
            {
                let output = std::fs::read_to_string(res.join(format!("{id}.out"))).unwrap_or_default();
                return Ok(Ran { status, output });
            }
            if Instant::now() > deadline {
                let output = std::fs::read_to_string(res.join(format!("{id}.out"))).unwrap_or_default();
                return Err(format!(
                    "{}: the script did not end within {timeout:?}; output so far: {output}",
                    self.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// [`exec`](Self::exec) that must succeed; its output.
    pub async fn run(&self, script: &str) -> Result<String, String> {
        let ran = self.exec(script, Duration::from_secs(300)).await?;
        if ran.status == 0 {
            Ok(ran.output)
        } else {
            Err(format!(
                "{}: exit {} from {script:?}: {}",
                self.name, ran.status, ran.output
            ))
        }
    }

    /// A directory of the share for this test's files, and where the guest sees it.
    pub fn share_dir(&self, name: &str) -> Result<(PathBuf, PathBuf), String> {
        let host = self.share.join("tests").join(name);
        std::fs::create_dir_all(&host).map_err(|e| format!("cannot make {}: {e}", host.display()))?;
        Ok((host, Path::new("/mnt/host/tests").join(name)))
    }
}

/// A loopback port of the host forwarded into the hub's namespace, to `ip:port`
/// (where a VM node listens). Stopped when dropped.
#[derive(Debug)]
pub struct Forward {
    child: std::process::Child,
    /// The host's loopback port.
    pub port: u16,
}

impl Forward {
    /// Starts `socat` on 127.0.0.1:`port`, each connection reaching `ip:target` from
    /// the hub's namespace, as up.sh forwards the API server.
    pub fn start(port: u16, ip: &str, target: u16) -> Result<Self, String> {
        let child = std::process::Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
            .arg(format!(
                "SYSTEM:exec nsenter --net=/run/netns/cryopod-hub socat STDIO TCP\\:{ip}\\:{target}"
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start socat: {e}"))?;
        Ok(Self { child, port })
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
