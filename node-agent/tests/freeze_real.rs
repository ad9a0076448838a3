//! The freeze protocol on the real kernel, cgroup v1 and v2: a "pod" of two counting
//! processes in cgroups of our own stops at one instant, stays frozen with the pod
//! cgroup thawed (what CRIU needs), and counts on after the thaw; an agent killed
//! with SIGKILL while the pod is frozen leaves a journal that thaws it on restart.
//! Needs root and the cgroup hierarchies; touches only `cryopod-test-*` cgroups.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryopod_node_agent::cgroup::{CgroupPath, CgroupVersion, Freezer, FreezerState, freezer_for};
use cryopod_node_agent::freeze::{FreezeLimits, PodCgroups, freeze_pod};
use cryopod_node_agent::journal::{Journal, recover};

const V1_ROOT: &str = "/sys/fs/cgroup/freezer";

/// The unified hierarchy: its own mount on hybrid hosts, /sys/fs/cgroup on pure v2.
fn v2_root() -> PathBuf {
    let hybrid = Path::new("/sys/fs/cgroup/unified");
    if hybrid.join("cgroup.procs").exists() {
        hybrid.to_path_buf()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

fn root_of(version: CgroupVersion) -> PathBuf {
    match version {
        CgroupVersion::V1 => PathBuf::from(V1_ROOT),
        CgroupVersion::V2 => v2_root(),
    }
}

/// A pod cgroup with two container cgroups, each running a counter that writes to
/// a file; removed with its processes when dropped.
struct TestPod {
    root: PathBuf,
    base: CgroupPath,
    cgroups: PodCgroups,
    counters: Vec<(Child, PathBuf)>,
    _dir: tempfile::TempDir,
}

impl TestPod {
    fn start(version: CgroupVersion, tag: &str) -> Self {
        let root = root_of(version);
        assert!(
            root.exists(),
            "cgroup hierarchy {} is missing: this tier needs it",
            root.display()
        );
        let base = CgroupPath::new(format!("/cryopod-test-{}-{tag}", std::process::id()));
        let pod = CgroupPath::new(format!("{base}/pod"));
        let containers = vec![CgroupPath::new(format!("{pod}/a")), CgroupPath::new(format!("{pod}/b"))];
        let dir = tempfile::tempdir().unwrap();
        let mut counters = Vec::new();
        for (i, cg) in containers.iter().enumerate() {
            std::fs::create_dir_all(cg.under(&root)).unwrap();
            let file = dir.path().join(format!("counter-{i}"));
            let child = Command::new("sh")
                .args([
                    "-c",
                    &format!(
                        "i=0; while :; do i=$((i+1)); echo $i > {}; sleep 0.01; done",
                        file.display()
                    ),
                ])
                .spawn()
                .unwrap();
            std::fs::write(cg.under(&root).join("cgroup.procs"), child.id().to_string()).unwrap();
            counters.push((child, file));
        }
        let pod = Self {
            root,
            base,
            cgroups: PodCgroups { pod, containers },
            counters,
            _dir: dir,
        };
        for i in 0..2 {
            pod.wait_counting(i);
        }
        pod
    }

    fn count(&self, i: usize) -> u64 {
        std::fs::read_to_string(&self.counters[i].1)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until counter `i` moves, with a deadline.
    fn wait_counting(&self, i: usize) {
        let start = self.count(i);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.count(i) <= start {
            assert!(Instant::now() < deadline, "counter {i} does not count");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestPod {
    fn drop(&mut self) {
        let freezer = freezer_for(
            if self.root.ends_with("freezer") {
                CgroupVersion::V1
            } else {
                CgroupVersion::V2
            },
            &self.root,
        );
        for cg in self.cgroups.containers.iter().chain(std::iter::once(&self.cgroups.pod)) {
            let _ = freezer.thaw(cg);
        }
        for (child, _) in &mut self.counters {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Children of the counters (`sleep`) may linger a moment; remove leaf first.
        let deadline = Instant::now() + Duration::from_secs(10);
        for cg in self.cgroups.containers.iter().chain([&self.cgroups.pod, &self.base]) {
            let dir = cg.under(&self.root);
            while dir.exists() && std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                    for pid in procs.split_whitespace() {
                        let _ = Command::new("kill").args(["-KILL", pid]).status();
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

const LIMITS: FreezeLimits = FreezeLimits {
    max_freeze: Duration::from_secs(30),
    settle: Duration::from_secs(5),
};

fn freezes_at_one_instant_and_thaws(version: CgroupVersion) {
    let pod = TestPod::start(version, &format!("{version:?}").to_lowercase());
    let freezer: Arc<dyn Freezer> = Arc::from(freezer_for(version, &pod.root));
    let journal_dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(journal_dir.path()).unwrap();

    let frozen = freeze_pod(freezer.clone(), &journal, "op-real", &pod.cgroups, LIMITS).unwrap();
    for cg in &pod.cgroups.containers {
        assert_eq!(freezer.state(cg).unwrap(), FreezerState::Frozen, "{cg} is frozen");
        assert!(freezer.self_frozen(cg).unwrap(), "{cg} is frozen by itself");
    }
    assert!(
        !freezer.self_frozen(&pod.cgroups.pod).unwrap(),
        "the pod cgroup is thawed for CRIU"
    );
    // Frozen means no progress: the counters stand still over a stretch of time.
    let before = [pod.count(0), pod.count(1)];
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!([pod.count(0), pod.count(1)], before, "a frozen counter moved");

    let report = frozen.thaw().unwrap();
    assert!(!report.expired && report.window >= Duration::from_millis(150));
    assert!(report.settle < LIMITS.settle);
    for i in 0..2 {
        pod.wait_counting(i);
    }
    assert!(journal.entries().unwrap().is_empty());
}

#[test]
fn v1_pod_freezes_at_one_instant_and_thaws() {
    freezes_at_one_instant_and_thaws(CgroupVersion::V1);
}

#[test]
fn v2_pod_freezes_at_one_instant_and_thaws() {
    freezes_at_one_instant_and_thaws(CgroupVersion::V2);
}

const HELPER_ENV: &str = "CRYOPOD_TEST_FREEZE_HELPER";

/// In the helper process only: freezes the pod named in the environment, says so,
/// and waits to be killed. In a normal run it has nothing to do.
#[test]
fn freeze_helper_process() {
    let Ok(spec) = std::env::var(HELPER_ENV) else { return };
    let parts: Vec<&str> = spec.split('|').collect();
    let (version, root, journal_dir) = (
        if parts[0] == "V1" {
            CgroupVersion::V1
        } else {
            CgroupVersion::V2
        },
        parts[1],
        parts[2],
    );
    let cgroups = PodCgroups {
        pod: CgroupPath::new(parts[3]),
        containers: parts[4].split(',').map(CgroupPath::new).collect(),
    };
    let freezer: Arc<dyn Freezer> = Arc::from(freezer_for(version, root));
    let journal = Journal::open(journal_dir).unwrap();
    // Seen once on a cold, loaded machine: the v1 freezer stayed FREEZING past the
    // settle deadline while the counters fork `sleep` every 10 ms. The agent then fails
    // that checkpoint and thaws (freeze::tests cover it); the crash is what is tested
    // here, so a freeze that did not settle is tried again.
    let _frozen = (0..3)
        .find_map(
            |_| match freeze_pod(freezer.clone(), &journal, "op-crash", &cgroups, LIMITS) {
                Err(cryopod_node_agent::freeze::FreezeError::NotSettled { .. }) => None,
                other => Some(other.unwrap()),
            },
        )
        .expect("the pod froze within three tries");
    println!("FROZEN");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn an_agent_killed_while_frozen_thaws_on_restart(version: CgroupVersion) {
    let pod = TestPod::start(version, &format!("crash-{version:?}").to_lowercase());
    let journal_dir = tempfile::tempdir().unwrap();
    let containers: Vec<&str> = pod.cgroups.containers.iter().map(CgroupPath::as_str).collect();
    let spec = format!(
        "{version:?}|{}|{}|{}|{}",
        pod.root.display(),
        journal_dir.path().display(),
        pod.cgroups.pod,
        containers.join(",")
    );
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "freeze_helper_process", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, spec)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("FROZEN"))),
        "the helper did not freeze the pod"
    );
    helper.kill().unwrap(); // SIGKILL: no destructor, no watchdog survives
    helper.wait().unwrap();

    let freezer = freezer_for(version, &pod.root);
    for cg in &pod.cgroups.containers {
        assert_eq!(
            freezer.state(cg).unwrap(),
            FreezerState::Frozen,
            "{cg} stays frozen after the crash"
        );
    }
    let restarted = Instant::now();
    let journal = Journal::open(journal_dir.path()).unwrap();
    let recovered = recover(&journal).unwrap();
    assert_eq!(recovered.len(), 1);
    assert!(recovered[0].failures.is_empty(), "{:?}", recovered[0].failures);
    for i in 0..2 {
        pod.wait_counting(i);
    }
    assert!(restarted.elapsed() < LIMITS.max_freeze, "thawed within the deadline");
    assert!(journal.entries().unwrap().is_empty());
}

#[test]
fn v1_agent_killed_while_frozen_thaws_on_restart() {
    an_agent_killed_while_frozen_thaws_on_restart(CgroupVersion::V1);
}

#[test]
fn v2_agent_killed_while_frozen_thaws_on_restart() {
    an_agent_killed_while_frozen_thaws_on_restart(CgroupVersion::V2);
}
