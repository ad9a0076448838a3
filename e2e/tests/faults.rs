//! The fault matrix (issue #15, `docs/reliability.md`): faults injected into the agent's
//! checkpoint and restore of real pods on the local cluster, each in one phase, with
//! the outcome asserted: the pod thawed and counting on without a restart, the
//! operation ended in a terminal state naming the fault, and nothing half-done left
//! as if it were whole (no manifest for a checkpoint, no prepared restore). Each case
//! records a row of the matrix once its assertions held. The migration's phases are
//! covered by the operator's failure tests (`operator.rs`), which record rows too.
//!
//! Every checkpoint here holds the pod frozen after its dump
//! (`POST_CHECKPOINT_STATE_HELD`, as a migration's source), the hardest case: the pod
//! is frozen through every phase, so every fault must end with it thawed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use cryopod_node_agent::cgroup::{Freezer, FreezerState, V1Freezer};
use cryopod_node_agent::server::pb;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use pods::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Stream = tonic::Streaming<pb::Operation>;

const FREEZE_SECONDS: u32 = 30;

/// One case: the trio pod on node-1, an agent binary of its own, and its state.
struct Case {
    tb: Testbed,
    client: kube::Client,
    ns: TestNamespace,
    trio: Trio,
    pod_uid: String,
    tls: AgentTls,
    state: PathBuf,
    process: AgentProcess,
    agent: AgentClient,
    /// Words the agent is started under (`nsenter` into the node's mount namespace).
    wrap: Vec<String>,
}

async fn case(prefix: &str, in_node_mount_ns: bool) -> Case {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, prefix).await.unwrap();
    let node = tb.nodes[0].clone();
    let trio = start_trio(&tb, &client, &ns, &node).await;
    let pod_uid = ns.pods(&client).get("trio").await.unwrap().metadata.uid.unwrap();
    let tls = agent_tls();
    let state = tb.dir.join(format!("e2e-fault-{}", ns.name));
    std::fs::create_dir_all(state.join("work")).unwrap();
    std::fs::create_dir_all(state.join("restores")).unwrap();
    let wrap = if in_node_mount_ns {
        node_mount_ns(&tb, &node)
    } else {
        vec![]
    };
    let (process, agent) = start_agent_wrapped(&tb, &node, &tls, &state, &[], free_port(), &wrap).await;
    Case {
        tb,
        client,
        ns,
        trio,
        pod_uid,
        tls,
        state,
        process,
        agent,
        wrap,
    }
}

/// `nsenter` into the mount namespace of `node`'s containerd, where the agent runs
/// CRIU: a tmpfs mounted there is seen by both.
fn node_mount_ns(tb: &Testbed, node: &str) -> Vec<String> {
    let pid = cryopod_node_agent::dump::socket_peer_pid(&tb.cri_socket(node)).unwrap();
    ["nsenter", "-t", &pid.to_string(), "-m", "--"]
        .map(str::to_owned)
        .to_vec()
}

impl Case {
    fn prefix(&self) -> String {
        format!("e2e/{}/trio/{}/", self.ns.name, self.pod_uid)
    }

    fn checkpoint_request(&self, storage: pb::Storage) -> pb::CheckpointRequest {
        pb::CheckpointRequest {
            operation_id: format!("fault-{}", self.ns.name),
            pod: Some(pb::PodRef {
                namespace: self.ns.name.clone(),
                name: "trio".into(),
                uid: self.pod_uid.clone(),
            }),
            storage: Some(storage),
            prefix: self.prefix(),
            tcp_established: true,
            max_freeze_seconds: FREEZE_SECONDS,
            post_checkpoint_state: pb::PostCheckpointState::Held as i32,
            ..Default::default()
        }
    }

    /// The trio's containers that are frozen now.
    fn frozen(&self) -> Vec<String> {
        let freezer = V1Freezer::new("/sys/fs/cgroup/freezer");
        self.trio
            .runtime
            .containers
            .iter()
            .filter(|c| freezer.state(&c.cgroup).ok() != Some(FreezerState::Thawed))
            .map(|c| c.name.clone())
            .collect()
    }

    /// Waits until no container of the trio is frozen.
    async fn thawed(&self, within: Duration) {
        wait_until("every container of the pod to be thawed", within, || async {
            self.frozen().is_empty().then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: still frozen {:?}\n{}", self.frozen(), self.agent_log()));
    }

    /// The agent killed with SIGKILL, then started again on its port and state.
    async fn restart_agent(&mut self) {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
        let (process, agent) = start_agent_wrapped(
            &self.tb,
            &self.tb.nodes[0],
            &self.tls,
            &self.state,
            &[],
            self.process.port,
            &self.wrap,
        )
        .await;
        self.process = process;
        self.agent = agent;
    }

    /// `path` as the agent sees it: through its root when it runs in the node's
    /// mount namespace, where the small disks are mounted.
    fn seen(&self, path: &Path) -> PathBuf {
        if self.wrap.is_empty() {
            return path.to_owned();
        }
        PathBuf::from(format!("/proc/{}/root{}", self.process.child.id(), path.display()))
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.process.log).unwrap_or_default()
    }

    /// The pod counts on from `then`, Ready, never restarted.
    async fn counts_on(&self, then: &[u64]) {
        assert_counting_on(&self.ns, &self.client, &self.trio.data, then).await;
    }

    /// Asks again under the same operation id: a restarted agent answers with what
    /// happened (interrupted), and starts nothing new.
    async fn reattached(&mut self, request: pb::CheckpointRequest) -> pb::Operation {
        let asked = async {
            ended(self.agent.checkpoint(request).await.unwrap().into_inner())
                .await
                .0
        };
        tokio::time::timeout(Duration::from_secs(60), asked)
            .await
            .expect("the restarted agent answers at once from its journal")
    }

    /// The objects stored under the case's prefix.
    async fn stored(&self) -> Vec<String> {
        let store = self.tb.s3_store(&self.tb.s3.endpoint, &self.tb.s3.secret_key).unwrap();
        store
            .list(Some(&ObjectPath::from(self.prefix().as_str())))
            .map(|o| o.unwrap().location.to_string())
            .collect()
            .await
    }

    /// No manifest was stored: nothing can take the parts for a whole checkpoint.
    async fn no_manifest(&self) {
        let stored = self.stored().await;
        assert!(
            !stored.iter().any(|k| k.ends_with("manifest.json")),
            "no manifest for a checkpoint that did not finish: {stored:?}"
        );
    }

    /// A whole checkpoint of the trio (thawed after its dump), for the restore cases.
    async fn checkpointed(&mut self) -> String {
        let mut request = self.checkpoint_request(s3_storage(&self.tb));
        request.operation_id = format!("whole-{}", self.ns.name);
        request.post_checkpoint_state = pb::PostCheckpointState::Running as i32;
        let (done, _) = ended(self.agent.checkpoint(request).await.unwrap().into_inner()).await;
        assert_eq!(done.state, pb::State::Succeeded as i32, "{}", done.error_message);
        done.result.unwrap().manifest_digest
    }

    fn restore_request(&self, storage: pb::Storage, digest: &str) -> pb::PrepareRestoreRequest {
        pb::PrepareRestoreRequest {
            operation_id: format!("fault-r-{}", self.ns.name),
            storage: Some(storage),
            prefix: self.prefix(),
            manifest_digest: digest.to_owned(),
            age_identities: vec![],
            restored_pod: Some(pb::PodRef {
                namespace: self.ns.name.clone(),
                name: "trio-restored".into(),
                uid: String::new(),
            }),
            start_stopped: false,
        }
    }

    /// No prepared restore is left on the node under the case's restore id.
    fn nothing_prepared(&self, id: &str) {
        let left: Vec<String> = std::fs::read_dir(self.seen(&self.state.join("restores")))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.trim_start_matches('.').starts_with(id))
            .collect();
        assert!(left.is_empty(), "nothing prepared for {id} is left: {left:?}");
    }

    fn record(&self, operation: &str, phase: &str, fault: &str, outcome: &str, recovered: Duration, test: &str) {
        pods::control::record_fault(
            &self.tb,
            (operation, phase, fault),
            outcome,
            recovered,
            &format!("faults::{test}"),
        );
    }

    async fn done(self) {
        let store = self.tb.s3_store(&self.tb.s3.endpoint, &self.tb.s3.secret_key).unwrap();
        for key in self.stored().await {
            let _ = store.delete(&ObjectPath::from(key.as_str())).await;
        }
        let Case { process, state, .. } = self;
        drop(process);
        let _ = std::fs::remove_dir_all(state);
    }
}

/// Reads `stream` until the operation reports `stage`, and returns that report; the
/// operation's end before it is an error showing the end.
async fn until_stage(stream: &mut Stream, stage: pb::Stage) -> pb::Operation {
    while let Some(op) = stream.next().await {
        let op = op.unwrap();
        if op.stage == stage as i32 && op.state == pb::State::Running as i32 {
            return op;
        }
        assert_eq!(op.state, pb::State::Running as i32, "ended before {stage:?}: {op:?}");
    }
    panic!("the stream ended before {stage:?}");
}

/// Reads `stream` to its end; returns the end and every stage reported on the way.
async fn ended(mut stream: Stream) -> (pb::Operation, Vec<i32>) {
    let (mut end, mut stages) = (None, Vec::new());
    while let Some(op) = stream.next().await {
        let op = op.unwrap();
        stages.push(op.stage);
        end = Some(op);
    }
    (end.expect("the operation reported something"), stages)
}

fn stage_name(stage: i32) -> String {
    pb::Stage::try_from(stage).map_or_else(|_| stage.to_string(), |s| format!("{s:?}"))
}

/// What a [`Proxy`] does once it has carried its budget.
#[derive(Clone, Copy, PartialEq)]
enum Spent {
    /// Stops like the server would: cuts every connection and refuses new ones.
    Cut,
    /// Forwards nothing more and holds the connections open: an upload or a
    /// download that never ends, for a fault to strike in the middle of it.
    Stall,
}

/// A TCP proxy to the testbed's S3 server that carries `budget` bytes either way,
/// then does what [`Spent`] says. The budget runs out inside an upload or a download
/// whatever the timing.
struct Proxy {
    port: u16,
    cut_at: Arc<std::sync::Mutex<Option<Instant>>>,
    stop: tokio::sync::broadcast::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        self.task.abort();
    }
}

impl Proxy {
    async fn start(tb: &Testbed, budget: u64, spent: Spent) -> Self {
        Self::start_to(tb.s3.endpoint.trim_start_matches("http://").to_owned(), budget, spent).await
    }

    /// A proxy to `upstream` (`host:port`).
    async fn start_to(upstream: String, budget: u64, spent: Spent) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let carried = Arc::new(AtomicU64::new(0));
        let cut_at = Arc::new(std::sync::Mutex::new(None));
        let (cut, _) = tokio::sync::broadcast::channel::<()>(1);
        let (cut_seen, cut_tx) = (cut_at.clone(), cut.clone());
        let task = tokio::spawn(async move {
            let mut stopped = cut_tx.subscribe();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((conn, _)) = accepted else { continue };
                        let (upstream, carried, cut, cut_seen) =
                            (upstream.clone(), carried.clone(), cut_tx.clone(), cut_seen.clone());
                        tokio::spawn(async move {
                            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                            let (cr, cw) = conn.into_split();
                            let (sr, sw) = server.into_split();
                            let up = pipe(cr, sw, (carried.clone(), budget, spent), cut.clone(), cut_seen.clone());
                            let down = pipe(sr, cw, (carried, budget, spent), cut, cut_seen);
                            tokio::join!(up, down);
                        });
                    }
                    // The listener goes with the loop: new connections are refused.
                    _ = stopped.recv() => break,
                }
            }
        });
        Self {
            port,
            cut_at,
            stop: cut,
            task,
        }
    }

    fn storage(&self, tb: &Testbed) -> pb::Storage {
        let mut storage = s3_storage(tb);
        if let Some(pb::storage::Backend::S3(s3)) = &mut storage.backend {
            s3.endpoint = format!("http://127.0.0.1:{}", self.port);
        }
        storage
    }

    fn cut_at(&self) -> Option<Instant> {
        *self.cut_at.lock().unwrap()
    }
}

/// Copies `from` to `to` until either closes, the proxy stops, or the budget is
/// spent (then it cuts every connection, or stalls this one).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    (carried, budget, spent): (Arc<AtomicU64>, u64, Spent),
    cut: tokio::sync::broadcast::Sender<()>,
    cut_at: Arc<std::sync::Mutex<Option<Instant>>>,
) {
    let mut stop = cut.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => {
                let n = match read { Ok(0) | Err(_) => break, Ok(n) => n };
                if carried.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > budget {
                    cut_at.lock().unwrap().get_or_insert_with(Instant::now);
                    if spent == Spent::Cut {
                        let _ = cut.send(());
                    }
                    let _ = stop.recv().await;
                    break;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            _ = stop.recv() => break,
        }
    }
}

/// Bytes the proxies let through before they stop: the manifest's and the early
/// requests' few kilobytes pass, the dumps and their fetch do not.
const PROXY_BUDGET: u64 = 48 * 1024;

/// A tmpfs of `size` on `dir` in the node's mount namespace (where the case's agent
/// and CRIU run), unmounted when dropped.
struct SmallDisk {
    wrap: Vec<String>,
    dir: PathBuf,
}

impl SmallDisk {
    fn mount(wrap: &[String], dir: &Path, size: &str) -> Self {
        let status = std::process::Command::new(&wrap[0])
            .args(&wrap[1..])
            .args([
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "cryopod-fault",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount a {size} tmpfs on {}", dir.display());
        Self {
            wrap: wrap.to_vec(),
            dir: dir.to_owned(),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.wrap[0])
            .args(&self.wrap[1..])
            .arg("umount")
            .arg(&self.dir)
            .status();
    }
}

/// The agent killed (SIGKILL) while a checkpoint is in `stage`, then started again:
/// its journal recovery thaws the pod, and asking again under the same id says the
/// checkpoint was interrupted instead of running a new one.
async fn agent_killed_during(stage: pb::Stage, phase: &str, test: &str) {
    let mut case = case(&format!("e2e-f-kill-{phase}"), false).await;
    // The upload never ends, so the kill falls before the checkpoint is stored
    // whatever the timing.
    let proxy = Proxy::start(&case.tb, PROXY_BUDGET, Spent::Stall).await;
    let request = case.checkpoint_request(proxy.storage(&case.tb));
    let mut stream = case.agent.checkpoint(request.clone()).await.unwrap().into_inner();
    until_stage(&mut stream, stage).await;
    case.process.child.kill().unwrap();
    let killed = Instant::now();
    case.process.child.wait().unwrap();
    let frozen_at_kill = case.frozen();
    println!("agent killed during {phase}: frozen {frozen_at_kill:?}");
    let at_kill = counts(&case.trio.data);
    case.restart_agent().await;
    case.thawed(Duration::from_secs(10)).await;
    let again = case.reattached(request).await;
    assert_eq!(
        (again.state, again.error_code),
        (pb::State::Failed as i32, tonic::Code::Aborted as i32),
        "{again:?}"
    );
    println!("re-attached: {}", again.error_message);
    case.counts_on(&at_kill).await;
    let recovered = killed.elapsed();
    assert!(case.frozen().is_empty(), "not frozen again");
    drop(proxy);
    case.no_manifest().await;
    case.record(
        "checkpoint",
        phase,
        "SIGKILL of the agent (restarted)",
        &format!(
            "{} of 4 containers frozen at the kill, none once the agent is back (its journal recovery thaws); asked again, it answers Failed (Aborted: interrupted) and starts nothing; no manifest stored",
            frozen_at_kill.len()
        ),
        recovered,
        test,
    );
    case.done().await;
}

#[tokio::test]
async fn the_agent_killed_while_freezing() {
    agent_killed_during(pb::Stage::Freezing, "freezing", "the_agent_killed_while_freezing").await;
}

#[tokio::test]
async fn the_agent_killed_while_dumping() {
    agent_killed_during(pb::Stage::Dumping, "dumping", "the_agent_killed_while_dumping").await;
}

#[tokio::test]
async fn the_agent_killed_while_storing() {
    agent_killed_during(pb::Stage::Storing, "storing", "the_agent_killed_while_storing").await;
}

/// CRIU killed (SIGKILL) in the middle of a dump: the checkpoint fails naming the
/// container and the pod is thawed.
#[tokio::test]
async fn criu_killed_while_dumping() {
    let test = "criu_killed_while_dumping";
    let mut case = case("e2e-f-criu", false).await;
    let request = case.checkpoint_request(s3_storage(&case.tb));
    let mut stream = case.agent.checkpoint(request).await.unwrap().into_inner();
    until_stage(&mut stream, pb::Stage::Dumping).await;
    let agent_pid = i32::try_from(case.process.child.id()).unwrap();
    // A container's dump lasts a fraction of a second: looked for closely.
    let deadline = Instant::now() + Duration::from_secs(20);
    let criu = loop {
        if let Some(pid) = descendant_criu(agent_pid) {
            break pid;
        }
        assert!(Instant::now() < deadline, "no CRIU under the agent within 20 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let at_kill = counts(&case.trio.data);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(criu), nix::sys::signal::Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let (end, stages) = ended(stream).await;
    println!(
        "CRIU {criu} killed: {} after {:?}",
        end.error_message,
        stages.iter().map(|s| stage_name(*s)).collect::<Vec<_>>()
    );
    assert_eq!(end.state, pb::State::Failed as i32, "{end:?}");
    assert!(
        end.error_message.contains("container"),
        "names the container: {}",
        end.error_message
    );
    case.thawed(Duration::from_secs(10)).await;
    case.counts_on(&at_kill).await;
    let recovered = killed.elapsed();
    case.no_manifest().await;
    case.record(
        "checkpoint",
        "dumping",
        "SIGKILL of CRIU",
        &format!(
            "Failed ({:?}); the pod thawed and counting, no restart; no manifest stored",
            tonic::Code::from(end.error_code)
        ),
        recovered,
        test,
    );
    case.done().await;
}

/// The first CRIU among the descendants of `ancestor`.
fn descendant_criu(ancestor: i32) -> Option<i32> {
    criu_where(|pid| {
        let mut up = proc_parent(pid).unwrap_or(0);
        while up > 1 {
            if up == ancestor {
                return true;
            }
            up = proc_parent(up).unwrap_or(0);
        }
        false
    })
}

/// The parent of process `pid`.
fn proc_parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The command line of process `pid` (empty once it is gone).
fn proc_cmdline(pid: i32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()
}

/// The first CRIU process for which `chosen` holds: a process whose command is `criu`
/// (on the host nodes it runs through its own loader, so its name is the loader's and
/// `criu` is an argument).
fn criu_where(chosen: impl Fn(i32) -> bool) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|&pid| {
            proc_cmdline(pid)
                .split(|b| *b == 0)
                .take(8)
                .any(|arg| arg == b"criu" || arg.ends_with(b"/criu"))
                && chosen(pid)
        })
}

/// The agent's disk full while CRIU dumps (its work directory on a 1 MiB tmpfs): the
/// checkpoint fails saying so, the pod is thawed and the work directory emptied.
#[tokio::test]
async fn the_disk_full_while_dumping() {
    let test = "the_disk_full_while_dumping";
    let case = case("e2e-f-full", true).await;
    let disk = SmallDisk::mount(&case.wrap, &case.state.join("work"), "1m");
    let request = case.checkpoint_request(s3_storage(&case.tb));
    let at_start = counts(&case.trio.data);
    let started = Instant::now();
    let mut agent = case.agent.clone();
    let (end, stages) = ended(agent.checkpoint(request).await.unwrap().into_inner()).await;
    let stages: Vec<String> = stages.iter().map(|s| stage_name(*s)).collect();
    println!("disk full: {} after {stages:?}", end.error_message);
    assert_eq!(end.state, pb::State::Failed as i32, "{end:?}");
    assert!(
        stages.iter().any(|s| s == "Dumping") && !stages.iter().any(|s| s == "Storing"),
        "failed while dumping: {stages:?}"
    );
    assert!(
        end.error_message.starts_with("no space left on the filesystem of"),
        "names the cause first: {}",
        end.error_message
    );
    case.thawed(Duration::from_secs(10)).await;
    case.counts_on(&at_start).await;
    let recovered = started.elapsed();
    let left: Vec<_> = std::fs::read_dir(case.seen(&case.state.join("work")))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "the work directory is emptied: {left:?}");
    drop(disk);
    case.no_manifest().await;
    case.record(
        "checkpoint",
        "dumping",
        "the agent's disk full (1 MiB tmpfs)",
        "Failed, saying first that the work directory's filesystem has no space left; the pod thawed and counting, no restart; work directory emptied; no manifest stored",
        recovered,
        test,
    );
    case.done().await;
}

/// The S3 server stops in the middle of the upload, while the pod is held frozen:
/// the checkpoint fails naming the store, and the pod is thawed.
#[tokio::test]
async fn the_store_stopped_while_storing() {
    let test = "the_store_stopped_while_storing";
    let case = case("e2e-f-s3-put", false).await;
    let proxy = Proxy::start(&case.tb, PROXY_BUDGET, Spent::Cut).await;
    let request = case.checkpoint_request(proxy.storage(&case.tb));
    let at_start = counts(&case.trio.data);
    let mut agent = case.agent.clone();
    let (end, stages) = ended(agent.checkpoint(request).await.unwrap().into_inner()).await;
    let stages: Vec<String> = stages.iter().map(|s| stage_name(*s)).collect();
    let cut = proxy.cut_at().expect("the proxy stopped");
    println!("store stopped: {} after {stages:?}", end.error_message);
    assert_eq!(end.state, pb::State::Failed as i32, "{end:?}");
    assert!(
        stages.iter().any(|s| s == "Storing"),
        "failed while storing: {stages:?}"
    );
    case.thawed(Duration::from_secs(10)).await;
    case.counts_on(&at_start).await;
    let recovered = cut.elapsed();
    case.no_manifest().await;
    case.record(
        "checkpoint",
        "storing",
        "the S3 server stopped",
        &format!(
            "Failed ({:?}), naming the store; the held pod thawed and counting, no restart; no manifest stored",
            tonic::Code::from(end.error_code)
        ),
        recovered,
        test,
    );
    case.done().await;
}

/// The S3 server stops while the target's agent fetches a checkpoint: the restore
/// fails naming the store and nothing is left prepared.
#[tokio::test]
async fn the_store_stopped_while_fetching() {
    let test = "the_store_stopped_while_fetching";
    let mut case = case("e2e-f-s3-get", false).await;
    let digest = case.checkpointed().await;
    let proxy = Proxy::start(&case.tb, PROXY_BUDGET, Spent::Cut).await;
    let request = case.restore_request(proxy.storage(&case.tb), &digest);
    let id = request.operation_id.clone();
    let (end, stages) = ended(case.agent.prepare_restore(request).await.unwrap().into_inner()).await;
    let cut = proxy.cut_at().expect("the proxy stopped");
    println!(
        "store stopped while fetching: {} after {:?}",
        end.error_message,
        stages.iter().map(|s| stage_name(*s)).collect::<Vec<_>>()
    );
    assert_eq!(end.state, pb::State::Failed as i32, "{end:?}");
    case.nothing_prepared(&id);
    let recovered = cut.elapsed();
    case.record(
        "restore",
        "fetching",
        "the S3 server stopped",
        &format!(
            "Failed ({:?}), naming the store; nothing prepared is left, so no pod can start from it",
            tonic::Code::from(end.error_code)
        ),
        recovered,
        test,
    );
    case.done().await;
}

/// The target's agent killed while it fetches: nothing half-prepared can serve a pod,
/// and asking again prepares the restore whole.
#[tokio::test]
async fn the_agent_killed_while_fetching() {
    let test = "the_agent_killed_while_fetching";
    let mut case = case("e2e-f-kill-fetch", false).await;
    let digest = case.checkpointed().await;
    let request = case.restore_request(s3_storage(&case.tb), &digest);
    let id = request.operation_id.clone();
    let mut stream = case.agent.prepare_restore(request.clone()).await.unwrap().into_inner();
    until_stage(&mut stream, pb::Stage::Fetching).await;
    case.process.child.kill().unwrap();
    let killed = Instant::now();
    case.process.child.wait().unwrap();
    assert!(
        !case.state.join("restores").join(&id).exists(),
        "a restore killed half-way is not in place"
    );
    case.restart_agent().await;
    let (again, _) = ended(case.agent.prepare_restore(request).await.unwrap().into_inner()).await;
    let recovered = killed.elapsed();
    assert_eq!(again.state, pb::State::Succeeded as i32, "{again:?}");
    assert!(
        case.state.join("restores").join(&id).is_dir(),
        "prepared whole the second time"
    );
    case.record(
        "restore",
        "fetching",
        "SIGKILL of the agent (restarted)",
        "no prepared restore in place after the kill; asked again, the restarted agent prepares it whole (Succeeded)",
        recovered,
        test,
    );
    case.done().await;
}

/// A Direct transfer whose source agent is cut off while the target reads from it
/// (a proxy between them stops): the restore fails naming the transfer, nothing
/// prepared is left, and the staged checkpoint stays whole on the source.
#[tokio::test]
async fn the_source_agent_cut_off_while_transferring() {
    let test = "the_source_agent_cut_off_while_transferring";
    let mut case = case("e2e-f-peer-cut", false).await;
    // Staged in the agent's own local store, as a Direct migration's checkpoint is.
    let local = pb::LocalStorage {
        path: "/var/lib/cryopod/checkpoints".into(),
    };
    let staged = std::path::Path::new(&local.path).join(case.prefix());
    let mut request = case.checkpoint_request(pb::Storage {
        backend: Some(pb::storage::Backend::Local(local.clone())),
    });
    request.operation_id = format!("staged-{}", case.ns.name);
    request.post_checkpoint_state = pb::PostCheckpointState::Running as i32;
    let (done, _) = ended(case.agent.checkpoint(request).await.unwrap().into_inner()).await;
    assert_eq!(done.state, pb::State::Succeeded as i32, "{}", done.error_message);
    let digest = done.result.unwrap().manifest_digest;
    let token = case
        .agent
        .grant_read(pb::GrantReadRequest {
            local: Some(local),
            prefix: case.prefix(),
            ttl_seconds: 120,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    // The target reads through a proxy that stops once the manifest has passed.
    let proxy = Proxy::start_to(format!("127.0.0.1:{}", case.process.port), PROXY_BUDGET, Spent::Cut).await;
    let peer = pb::Storage {
        backend: Some(pb::storage::Backend::Peer(pb::PeerStorage {
            endpoint: format!("https://localhost:{}", proxy.port),
            server_name: "localhost".into(),
            token,
        })),
    };
    let request = case.restore_request(peer, &digest);
    let id = request.operation_id.clone();
    let (end, stages) = ended(case.agent.prepare_restore(request).await.unwrap().into_inner()).await;
    let cut = proxy.cut_at().expect("the proxy stopped");
    println!(
        "source agent cut off while transferring: {} after {:?}",
        end.error_message,
        stages.iter().map(|s| stage_name(*s)).collect::<Vec<_>>()
    );
    assert_eq!(end.state, pb::State::Failed as i32, "{end:?}");
    case.nothing_prepared(&id);
    assert!(
        staged.join("manifest.json").is_file(),
        "the staged checkpoint stays whole"
    );
    let recovered = cut.elapsed();
    case.record(
        "restore",
        "fetching",
        "the source agent cut off (Direct transfer)",
        &format!(
            "Failed ({:?}), naming the object it was reading; nothing prepared is left; the staged checkpoint stays whole on the source",
            tonic::Code::from(end.error_code)
        ),
        recovered,
        test,
    );
    let _ = std::fs::remove_dir_all(&staged);
    case.done().await;
}

/// The target's disk full while it unpacks (its restores directory on a 1 MiB
/// tmpfs): the restore fails saying so and nothing is left.
#[tokio::test]
async fn the_disk_full_while_fetching() {
    let test = "the_disk_full_while_fetching";
    let mut case = case("e2e-f-full-fetch", true).await;
    let digest = case.checkpointed().await;
    let disk = SmallDisk::mount(&case.wrap, &case.state.join("restores"), "1m");
    let request = case.restore_request(s3_storage(&case.tb), &digest);
    let id = request.operation_id.clone();
    let started = Instant::now();
    let (end, _) = ended(case.agent.prepare_restore(request).await.unwrap().into_inner()).await;
    println!("disk full while fetching: {}", end.error_message);
    assert_eq!(end.state, pb::State::Failed as i32, "{end:?}");
    assert!(
        end.error_message.contains("No space left on device"),
        "names the cause: {}",
        end.error_message
    );
    case.nothing_prepared(&id);
    let recovered = started.elapsed();
    drop(disk);
    case.record(
        "restore",
        "fetching",
        "the agent's disk full (1 MiB tmpfs)",
        "Failed, naming \"No space left on device\"; nothing prepared is left",
        recovered,
        test,
    );
    case.done().await;
}

/// A CRIU that restores a container under the runtime handler, for the restore whose
/// id is `restore_id` (runc's `--image-path` names it): found by an ancestor's
/// command line.
fn criu_restoring(restore_id: &str) -> Option<i32> {
    criu_where(|pid| {
        let mut up = proc_parent(pid).unwrap_or(0);
        for _ in 0..6 {
            if up <= 1 {
                break;
            }
            if String::from_utf8_lossy(&proc_cmdline(up)).contains(restore_id) {
                return true;
            }
            up = proc_parent(up).unwrap_or(0);
        }
        false
    })
}

/// CRIU killed (SIGKILL) while the runtime handler restores a container of a
/// PodRestore on node-2: the restore fails naming the container, the half-restored
/// pod is deleted, and the target's agent discards the prepared memory. The source
/// (a restore leaves it running) counts on.
#[tokio::test]
async fn criu_killed_while_restoring() {
    use cryopod_crds::v1alpha1::{CheckpointPhase, PodCheckpoint, PodRestore, RestorePhase};
    use kube::Api;
    use pods::control::*;
    use serde_json::json;

    let test = "criu_killed_while_restoring";
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-f-rcriu").await.unwrap();
    let trio = start_trio(&tb, &client, &ns, &tb.nodes[0]).await;
    let control = start_control(&tb, &ns.name).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "cp"},
                "spec": {"sourcePodName": "trio", "storage": storage}}),
    );
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let cp = control::ended(&checkpoints, "cp").await;
    assert_eq!(cp.status.as_ref().unwrap().phase, Some(CheckpointPhase::Ready));
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "back"},
                "spec": {"checkpointName": "cp", "target": {"nodeName": tb.nodes[1]}, "podName": "trio-back"}}),
    );
    let restores: Api<PodRestore> = Api::namespaced(client.clone(), &ns.name);
    let restore_id = wait_until("the PodRestore's UID", Duration::from_secs(10), || async {
        restores.get("back").await.ok()?.metadata.uid
    })
    .await
    .unwrap();
    // A container's restore lasts a fraction of a second: looked for closely.
    let deadline = Instant::now() + Duration::from_secs(90);
    let criu = loop {
        if let Some(pid) = criu_restoring(&restore_id) {
            break pid;
        }
        assert!(Instant::now() < deadline, "no CRIU restoring {restore_id} within 90 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(criu), nix::sys::signal::Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let ended = restore_ended(&restores, "back").await;
    let status = ended.status.clone().unwrap();
    let (_, reason, message) = ready_of(&status.conditions);
    println!("CRIU {criu} killed while restoring: {reason}: {message}");
    assert_eq!(status.phase, Some(RestorePhase::Failed), "{message}");
    assert_eq!(reason, "RestoreFailed", "{message}");
    assert!(
        message.contains("could not be restored"),
        "names the container: {message}"
    );
    // The half-restored pod goes, and its prepared memory with it.
    wait_until("the restored pod to go", Duration::from_secs(60), || async {
        ns.pods(&client)
            .get_opt("trio-back")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .unwrap();
    let prepared = tb.dir.join(&tb.nodes[1]).join("cryopod/restores").join(&restore_id);
    let images = prepared.join("containers");
    let memory_left: Vec<PathBuf> = std::fs::read_dir(&images)
        .into_iter()
        .flatten()
        .flatten()
        .map(|c| c.path().join("checkpoint"))
        .filter(|p| p.exists())
        .collect();
    assert!(
        memory_left.is_empty(),
        "the prepared memory is discarded: {memory_left:?}"
    );
    let recovered = killed.elapsed();
    // The source runs on.
    let before = counts(&trio.data);
    wait_until("the source to count on", Duration::from_secs(20), || async {
        counts(&trio.data)
            .iter()
            .zip(&before)
            .all(|(now, then)| now > then)
            .then_some(())
    })
    .await
    .unwrap();
    pods::control::record_fault(
        &tb,
        ("restore", "restoring", "SIGKILL of CRIU"),
        "Failed (RestoreFailed), naming the container; the half-restored pod deleted, its prepared memory discarded; the source runs on",
        recovered,
        &format!("faults::{test}"),
    );
    checkpoints.delete("cp", &Default::default()).await.unwrap();
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&control.state);
}
