//! One pod checkpoint, end to end on the node: discover, freeze at one instant,
//! capture the shared state and rootfs changes once, dump every container in
//! parallel, thaw (or leave stopped), then package and store outside the freeze
//! window, the manifest last.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::{ObjectStore, ObjectStoreExt};

use crate::capture::{CaptureError, capture_shared_state, rootfs_diff};
use crate::cgroup::Freezer;
use crate::cri::ContainerRuntime;
use crate::discovery::{DiscoveryError, PodRuntime, discover};
use crate::dump::{DumpError, DumpOptions, NodeExec, dump_containers};
use crate::freeze::{FreezeError, FreezeLimits, FreezeReport, FrozenPod, freeze_pod};
use crate::hooks::{Hook, HookError, run_hooks};
use crate::inspect::PodIpConnection;
use crate::inspect::{cgroup_pids, pod_ip_connections_of, shared_sysv_segments};
use crate::journal::Journal;
use crate::package::{
    ContainerParts, LocalObject, MANIFEST_API_VERSION, MANIFEST_KIND, Manifest, ManifestContainer, NodeFacts,
    PackageError, PodRef, Seal, rfc3339_from_nanos, write_container_archive, write_shared_state,
};
use crate::store::{StoreError, delete_checkpoint, store_manifest, store_object};

/// Where a checkpoint is, for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Asking the runtime about the pod.
    Discovering,
    /// Freezing the pod.
    Freezing,
    /// Capturing shared state and dumping containers (the pod is frozen).
    Dumping,
    /// The pod is thawed; nothing more happens to it.
    Thawed,
    /// Packaging, uploading and verifying.
    Storing,
    /// The pod is frozen since this instant (microseconds since the Unix epoch).
    Frozen { at_unix_micros: u64 },
    /// Objects stored so far: their bytes before compression, of `total`.
    Stored { done: u64, total: u64 },
}

/// What the pod does once it is dumped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AfterDump {
    /// Thawed at once; it carries on while the checkpoint is stored.
    #[default]
    Running,
    /// Held frozen until the checkpoint is stored, then its containers are killed.
    /// If storing fails it is thawed and carries on.
    Stopped,
    /// Held frozen after the checkpoint is stored, and handed back in the outcome:
    /// a migration's source, stopped for good or thawed once the target runs or
    /// fails. The freeze deadline still holds, so it is thawed if nobody decides.
    Held,
}

/// What to do about established TCP connections bound to the pod IP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodIpPolicy {
    /// Record them; a restore brings them back closed.
    #[default]
    Close,
    /// Fail the checkpoint, naming them.
    Refuse,
}

/// One checkpoint to take.
#[derive(Clone, Debug)]
pub struct CheckpointRequest {
    /// Operation id (journal entry, work directory, logs).
    pub operation_id: String,
    /// The pod.
    pub pod: PodRef,
    /// Key prefix in the store, ending in `/`.
    pub prefix: String,
    /// Keep established TCP connections.
    pub tcp_established: bool,
    /// Freeze limits. With [`AfterDump::Stopped`], `max_freeze` must cover storing.
    pub limits: FreezeLimits,
    /// Hooks run before the freeze.
    pub hooks: Vec<Hook>,
    /// What the pod does after the dump.
    pub after: AfterDump,
    /// Connections bound to the pod IP.
    pub pod_ip_connections: PodIpPolicy,
    /// Encryption of the stored objects.
    pub seal: Seal,
    /// zstd's level for them.
    pub zstd_level: i32,
    /// The local store's directory, when the storage is one: each object is moved
    /// there (and read back), not copied.
    pub local_root: Option<std::path::PathBuf>,
    /// The sanitized pod (a `PodTemplateSpec`), kept in the manifest.
    pub pod_template: Option<serde_json::Value>,
}

/// Writes one object of the checkpoint on the local disk.
type PackageJob = Box<dyn FnOnce() -> Result<LocalObject, PackageError> + Send>;

/// Objects packaged and stored at once: enough to overlap one's compression with
/// another's upload and to use both directions of the link, few enough that their
/// upload buffers (four 8 MiB parts in flight each) stay well inside the agent's memory.
const OBJECTS_AT_ONCE: usize = 3;

/// Runs the jobs, [`OBJECTS_AT_ONCE`] at a time, storing each object as soon as it is
/// packaged. After a failure no further job starts; once the running ones have ended,
/// every object stored is removed and the first error returned. The objects come back
/// in job order.
async fn package_and_store(
    (store, local_root): (&Arc<dyn ObjectStore>, Option<&std::path::Path>),
    prefix: &str,
    jobs: Vec<PackageJob>,
    stored: &(dyn Fn(u64) + Send + Sync),
) -> Result<Vec<LocalObject>, CheckpointError> {
    use futures::StreamExt;
    let failed = AtomicBool::new(false);
    let stop = || failed.load(Ordering::Relaxed);
    // Futures made up front (they start only when polled): a stream closure here
    // would trip the compiler's Send check of the agent's service.
    let runs: Vec<_> = jobs
        .into_iter()
        .map(|job| package_then_store((store, local_root), prefix, &failed, job, stored))
        .collect();
    let results: Vec<Result<Option<LocalObject>, CheckpointError>> =
        futures::stream::iter(runs).buffered(OBJECTS_AT_ONCE).collect().await;
    if !stop() {
        return Ok(results.into_iter().flatten().flatten().collect());
    }
    let mut first = None;
    for result in results {
        match result {
            Ok(Some(object)) => {
                let _ = store
                    .delete(&object_store::path::Path::from(format!("{prefix}{}", object.entry.key)))
                    .await;
            }
            Ok(None) => {}
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first.unwrap_or(CheckpointError::Task { step: "package" }))
}

/// One job of [`package_and_store`]: nothing once `failed` is set, else the object
/// packaged and stored; a failure sets `failed`.
async fn package_then_store(
    (store, local_root): (&Arc<dyn ObjectStore>, Option<&std::path::Path>),
    prefix: &str,
    failed: &AtomicBool,
    job: PackageJob,
    stored: &(dyn Fn(u64) + Send + Sync),
) -> Result<Option<LocalObject>, CheckpointError> {
    let result = async {
        if failed.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let object = tokio::task::spawn_blocking(job)
            .await
            .map_err(|_| CheckpointError::Task { step: "package" })?
            .map_err(|source| CheckpointError::Package { source })?;
        if failed.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match local_root {
            // The local store is a directory on this node: the object moves there.
            Some(root) => crate::store::place_local_object(root, prefix, &object).await,
            None => store_object(store, prefix, &object).await,
        }
        .map_err(|source| CheckpointError::Store { source })?;
        stored(object.entry.raw_size);
        Ok(Some(object))
    }
    .await;
    if result.is_err() {
        failed.store(true, Ordering::Relaxed);
    }
    result
}

impl<R> NodeAgent<R> {
    /// Why a freeze ended before its checkpoint was done, as the watchdog recorded it
    /// (before it marked the freeze expired): an emergency thaw, or the deadline.
    fn thawed_while_frozen(&self, req: &CheckpointRequest) -> CheckpointError {
        match self.journal.end_of(&req.operation_id) {
            Ok(Some(crate::journal::FreezeEnd::ThawedWithoutRelease { why, .. }))
                if why != crate::freeze::deadline_passed(req.limits.max_freeze) =>
            {
                CheckpointError::ThawedEarly { why }
            }
            _ => CheckpointError::FreezeExpired {
                after: req.limits.max_freeze,
            },
        }
    }
}

/// About how many bytes the files under `dir` make as tar archives (a header and
/// padding to 512 bytes each): the total that storing progress is measured against.
/// Symlinks are not followed.
pub fn archived_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => 512 + archived_size(&entry.path()),
            Ok(t) if t.is_file() => 512 + entry.metadata().map_or(0, |m| m.len().div_ceil(512) * 512),
            // A link or special file is its header alone.
            Ok(_) => 512,
            Err(_) => 0,
        })
        .sum()
}

/// What the agent works with on its node.
#[derive(Debug)]
pub struct NodeAgent<R> {
    /// The container runtime.
    pub runtime: R,
    /// The freezer of the node's cgroup hierarchy.
    pub freezer: Arc<dyn Freezer>,
    /// The crash journal.
    pub journal: Journal,
    /// How runc is started.
    pub exec: NodeExec,
    /// Private scratch space (0700), one directory per operation.
    pub work_dir: PathBuf,
    /// Where restores are prepared for the runtime handler.
    pub restores: PathBuf,
    /// Facts of this node.
    pub node: NodeFacts,
    /// Signs the manifests this agent stores and verifies those it restores.
    pub manifest_key: crate::signing::ManifestKey,
}

/// A pod left frozen after its checkpoint ([`AfterDump::Held`]).
#[derive(Debug)]
pub struct HeldPod {
    /// The frozen pod; dropping it thaws it.
    pub frozen: FrozenPod,
    /// Its containers' cgroups (the sandbox's left out), to stop them.
    pub containers: Vec<crate::cgroup::CgroupPath>,
}

/// The result of a checkpoint.
#[derive(Debug)]
pub struct CheckpointOutcome {
    /// The stored manifest.
    pub manifest: Manifest,
    /// sha256 of the stored manifest.
    pub manifest_digest: String,
    /// The freeze.
    pub freeze: FreezeReport,
    /// Captures and dumps, inside the freeze.
    pub dump: Duration,
    /// Packaging, upload and verification.
    pub upload: Duration,
    /// The pod, still frozen, with [`AfterDump::Held`].
    pub held: Option<HeldPod>,
}

impl CheckpointOutcome {
    /// Bytes stored, manifest aside.
    pub fn stored_bytes(&self) -> u64 {
        self.manifest.objects.iter().map(|o| o.size).sum()
    }
}

/// A checkpoint failed; the pod was thawed (or left stopped as asked) first.
#[derive(Debug)]
pub enum CheckpointError {
    /// The pod could not be found or is not checkpointable.
    Discovery { source: DiscoveryError },
    /// The operation's scratch directory could not be prepared.
    Workspace { path: PathBuf, source: std::io::Error },
    /// Freezing failed.
    Freeze { source: FreezeError },
    /// Capturing shared state or rootfs changes failed.
    Capture { source: CaptureError },
    /// A container's dump failed.
    Dump { source: DumpError },
    /// The freeze outlasted `max_freeze` and the watchdog thawed the pod.
    FreezeExpired { after: Duration },
    /// The pod was thawed before its checkpoint was done, by an emergency thaw: `why`
    /// is what was recorded.
    ThawedEarly { why: String },
    /// Packaging failed.
    Package { source: PackageError },
    /// Storing failed; nothing was left in the store.
    Store { source: StoreError },
    /// The operation id cannot name a work directory and journal entry.
    BadOperationId { id: String },
    /// An operation with this id is already running on this node.
    AlreadyRunning { id: String },
    /// A background task died.
    Task { step: &'static str },
    /// A pre-checkpoint hook failed; nothing was frozen.
    Hook { source: HookError },
    /// Something seen while frozen cannot be checkpointed; the pod was thawed.
    Unsupported { reason: String },
}

impl std::fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Discovery { source } => write!(f, "{source}"),
            Self::Workspace { path, .. } => write!(f, "cannot prepare the work directory {}", path.display()),
            Self::Freeze { source } => write!(f, "{source}"),
            Self::Capture { source } => write!(f, "{source}"),
            Self::Dump { source } => write!(f, "{source}"),
            Self::FreezeExpired { after } => write!(f, "the pod stayed frozen longer than {after:?} and was thawed"),
            Self::ThawedEarly { why } => write!(f, "the pod was thawed before its checkpoint was done: {why}"),
            Self::Package { source } => write!(f, "{source}"),
            Self::Store { source } => write!(f, "{source}"),
            Self::Task { step } => write!(f, "the {step} task died"),
            Self::BadOperationId { id } => write!(f, "operation id {id:?} is not usable"),
            Self::AlreadyRunning { id } => write!(f, "operation {id} is already running on this node"),
            Self::Hook { source } => write!(f, "{source}"),
            Self::Unsupported { reason } => write!(f, "the pod cannot be checkpointed: {reason}"),
        }
    }
}

impl std::error::Error for CheckpointError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Discovery { source } => source.source(),
            Self::Freeze { source } => source.source(),
            Self::Capture { source } => source.source(),
            Self::Dump { source } => source.source(),
            Self::Package { source } => source.source(),
            Self::Store { source } => source.source(),
            Self::Workspace { source, .. } => Some(source),
            Self::FreezeExpired { .. }
            | Self::ThawedEarly { .. }
            | Self::Hook { .. }
            | Self::Unsupported { .. }
            | Self::Task { .. }
            | Self::BadOperationId { .. }
            | Self::AlreadyRunning { .. } => None,
        }
    }
}

impl<R: ContainerRuntime> NodeAgent<R> {
    /// Takes the checkpoint. The pod keeps running. Its work directory (created
    /// here, so a second operation with the same id is refused) is removed whatever
    /// happens.
    pub async fn checkpoint(
        &self,
        req: &CheckpointRequest,
        store: Arc<dyn ObjectStore>,
        progress: &(dyn Fn(Stage) + Send + Sync),
    ) -> Result<CheckpointOutcome, CheckpointError> {
        Journal::check_operation_id(&req.operation_id).map_err(|_| CheckpointError::BadOperationId {
            id: req.operation_id.clone(),
        })?;
        let work = self.work_dir.join(&req.operation_id);
        {
            use std::os::unix::fs::DirBuilderExt;
            let werr = |source| CheckpointError::Workspace {
                path: self.work_dir.clone(),
                source,
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.work_dir)
                .map_err(werr)?;
            match std::fs::DirBuilder::new().mode(0o700).create(&work) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(CheckpointError::AlreadyRunning {
                        id: req.operation_id.clone(),
                    });
                }
                Err(source) => return Err(CheckpointError::Workspace { path: work, source }),
            }
        }
        let result = self.checkpoint_in(req, &work, store, progress).await;
        let _ = tokio::fs::remove_dir_all(&work).await;
        result
    }

    async fn checkpoint_in(
        &self,
        req: &CheckpointRequest,
        work: &std::path::Path,
        store: Arc<dyn ObjectStore>,
        progress: &(dyn Fn(Stage) + Send + Sync),
    ) -> Result<CheckpointOutcome, CheckpointError> {
        progress(Stage::Discovering);
        let pod = discover(&self.runtime, &req.pod.uid)
            .await
            .map_err(|source| CheckpointError::Discovery { source })?;
        let mut warnings = run_hooks(&req.hooks, &pod, &self.runtime)
            .await
            .map_err(|source| CheckpointError::Hook { source })?;

        let frozen_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        // Freezing polls sysfs; keep it off the async workers.
        let (freezer, journal, op, targets, limits) = (
            self.freezer.clone(),
            self.journal.clone(),
            req.operation_id.clone(),
            pod.freeze_targets(),
            req.limits,
        );
        progress(Stage::Freezing);
        let frozen = tokio::task::spawn_blocking(move || freeze_pod(freezer, &journal, &op, &targets, limits))
            .await
            .map_err(|_| CheckpointError::Task { step: "freeze" })?
            .map_err(|source| CheckpointError::Freeze { source })?;
        let dump_started = Instant::now();
        tracing::info!(containers = pod.containers.len(), "pod frozen");
        progress(Stage::Frozen {
            at_unix_micros: frozen
                .report_so_far()
                .began
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
        });

        // Held still now: what CRIU cannot bring back is refused before any work.
        let pod_ip_connections = self.inspect_frozen(&pod, req.pod_ip_connections)?;

        // Shared state and rootfs changes first, while the processes whose /proc
        // entries they are read through are frozen.
        let (containers, state_dir) = (pod.containers.clone(), work.to_path_buf());
        let (node_root, node_mountinfo) = (self.exec.node_root(), self.exec.node_mountinfo());
        progress(Stage::Dumping);
        let captured = tokio::task::spawn_blocking(move || {
            let shared = capture_shared_state(&containers, &node_root, &state_dir)?;
            let mountinfo = std::fs::read_to_string(&node_mountinfo).map_err(|source| CaptureError::Archive {
                what: "the container runtime's mounts".to_owned(),
                path: node_mountinfo.clone(),
                source,
            })?;
            let diffs = containers
                .iter()
                .map(|c| {
                    let dir = state_dir.join(&c.name);
                    std::fs::create_dir_all(&dir).map_err(|source| CaptureError::Archive {
                        what: format!("the rootfs changes of container {}", c.name),
                        path: dir.clone(),
                        source,
                    })?;
                    rootfs_diff(c, &node_root, &mountinfo, &dir.join("rootfs-diff.tar"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, CaptureError>((shared, diffs))
        })
        .await
        .map_err(|_| CheckpointError::Task { step: "capture" })?
        .map_err(|source| CheckpointError::Capture { source })?;

        let options = DumpOptions {
            // CRIU always leaves the processes alive: a stopped pod is killed only
            // once its checkpoint is stored, so a failed upload never loses it.
            leave_running: true,
            tcp_established: req.tcp_established,
            file_locks: true,
        };
        let dumps = dump_containers(
            &self.exec,
            &pod.runc_binary,
            &pod.runc_root,
            &pod.containers,
            work,
            options,
            frozen.remaining(),
        )
        .await;
        // A dump cut short by the watchdog is reported as the expired freeze it is.
        if frozen.expired() {
            return Err(self.thawed_while_frozen(req));
        }
        let dumps = dumps.map_err(|source| CheckpointError::Dump { source })?;
        let dump = dump_started.elapsed();
        tracing::info!(dump_ms = dump.as_millis() as u64, "containers dumped");

        // With `Running`, outside the freeze window from here on; with `Stopped` the
        // pod stays frozen until the checkpoint is stored.
        let (held, freeze_window) = match req.after {
            AfterDump::Running => {
                let report = tokio::task::spawn_blocking(move || frozen.thaw())
                    .await
                    .map_err(|_| CheckpointError::Task { step: "thaw" })?
                    .map_err(|source| CheckpointError::Freeze { source })?;
                progress(Stage::Thawed);
                (Held::Thawed(report), report.window)
            }
            AfterDump::Stopped | AfterDump::Held => {
                let window = frozen.elapsed();
                (Held::Frozen(frozen), window)
            }
        };
        progress(Stage::Storing);
        let upload_started = Instant::now();
        let checkpointed_at = rfc3339_from_nanos(frozen_at);
        let (shared, diffs) = captured;
        let (containers, dir, at, seal) = (
            pod.containers.clone(),
            work.to_path_buf(),
            checkpointed_at.clone(),
            req.seal.clone(),
        );
        let level = req.zstd_level;
        // Each object is packaged and stored on its own, so one's compression overlaps
        // another's upload and read-back.
        let objects_dir = dir.join("objects");
        let mut jobs: Vec<PackageJob> = Vec::new();
        for ((c, d), diff) in containers.into_iter().zip(dumps).zip(diffs) {
            let (objects_dir, seal, at, dir) = (objects_dir.clone(), seal.clone(), at.clone(), dir.clone());
            jobs.push(Box::new(move || {
                let parts = ContainerParts {
                    container: &c,
                    images: &d.images,
                    work: &dir.join(&c.name).join("work"),
                    rootfs_diff: &diff.tar,
                    deleted: &diff.deleted,
                    runtime: "io.containerd.runc.v2",
                    checkpointed_at: &at,
                };
                write_container_archive(&objects_dir, (&seal, level), &parts)
            }));
        }
        for s in shared {
            let (objects_dir, seal) = (objects_dir.clone(), seal.clone());
            jobs.push(Box::new(move || {
                write_shared_state(&objects_dir, (&seal, level), &s.name, &s.tar)
            }));
        }
        // Progress in bytes before compression, against what the work directory holds.
        let total = AtomicU64::new(archived_size(work));
        let done = AtomicU64::new(0);
        let stored = |bytes: u64| {
            let done = done.fetch_add(bytes, Ordering::Relaxed) + bytes;
            let total = total.fetch_max(done, Ordering::Relaxed).max(done);
            progress(Stage::Stored { done, total });
        };
        let objects = package_and_store((&store, req.local_root.as_deref()), &req.prefix, jobs, &stored).await?;

        if !pod_ip_connections.is_empty() {
            warnings.push(format!(
                "{} TCP connection(s) bound to the pod IP will be restored closed",
                pod_ip_connections.len()
            ));
        }
        let manifest = Manifest {
            api_version: MANIFEST_API_VERSION.to_owned(),
            kind: MANIFEST_KIND.to_owned(),
            pod: req.pod.clone(),
            node: self.node.clone(),
            checkpointed_at,
            freeze_window_millis: freeze_window.as_millis() as u64,
            containers: pod
                .containers
                .iter()
                .map(|c| ManifestContainer {
                    name: c.name.clone(),
                    image: c.image.clone(),
                    image_ref: c.image_ref.clone(),
                    archive: format!("containers/{}.tar.zst", c.name),
                })
                .collect(),
            shared: objects
                .iter()
                .filter(|o| o.entry.key.starts_with("pod/"))
                .map(|o| o.entry.key.clone())
                .collect(),
            objects: objects.iter().map(|o| o.entry.clone()).collect(),
            encryption: req.seal.manifest_entry(),
            post_checkpoint_state: match req.after {
                AfterDump::Running => "Running",
                AfterDump::Stopped | AfterDump::Held => "Stopped",
            }
            .to_owned(),
            pod_ip_connections: pod_ip_connections.iter().map(ToString::to_string).collect(),
            warnings,
            checkpointed_pod_template: req.pod_template.clone(),
        };
        let manifest_digest = match store_manifest(&store, &req.prefix, &manifest, &self.manifest_key).await {
            Ok(digest) => digest,
            Err(source) => {
                let _ = delete_checkpoint(&store, &req.prefix, &manifest).await;
                return Err(CheckpointError::Store { source });
            }
        };
        let upload = upload_started.elapsed();
        tracing::info!(upload_ms = upload.as_millis() as u64, %manifest_digest, "checkpoint stored");

        let mut handed_back = None;
        let freeze = match held {
            Held::Thawed(report) => report,
            // The pod must not have run on past its checkpoint; if the watchdog thawed
            // it, the stored checkpoint is stale and goes.
            Held::Frozen(frozen) if frozen.deadline_passed() => {
                let _ = delete_checkpoint(&store, &req.prefix, &manifest).await;
                return Err(self.thawed_while_frozen(req));
            }
            Held::Frozen(frozen) if req.after == AfterDump::Held => {
                tracing::info!("checkpoint stored; the pod stays frozen until it is released");
                let report = frozen.report_so_far();
                handed_back = Some(HeldPod {
                    frozen,
                    containers: pod.containers.iter().map(|c| c.cgroup.clone()).collect(),
                });
                report
            }
            Held::Frozen(frozen) => {
                let containers: Vec<_> = pod.containers.iter().map(|c| c.cgroup.clone()).collect();
                let stopped = tokio::task::spawn_blocking(move || frozen.stop(&containers))
                    .await
                    .map_err(|_| CheckpointError::Task { step: "stop" })?;
                let report = stopped.map_err(|source| CheckpointError::Freeze { source })?;
                // The watchdog came first: nothing was killed, the pod ran on.
                if report.expired {
                    let _ = delete_checkpoint(&store, &req.prefix, &manifest).await;
                    return Err(self.thawed_while_frozen(req));
                }
                tracing::info!("pod stopped after its checkpoint was stored");
                progress(Stage::Thawed);
                report
            }
        };
        Ok(CheckpointOutcome {
            manifest,
            manifest_digest,
            freeze,
            dump,
            upload,
            held: handed_back,
        })
    }

    /// SysV segments shared across containers and TCP connections on the pod IP,
    /// read while the pod is frozen.
    fn inspect_frozen(&self, pod: &PodRuntime, policy: PodIpPolicy) -> Result<Vec<PodIpConnection>, CheckpointError> {
        let proc_root = std::path::Path::new("/proc");
        let processes: Vec<(String, Vec<u32>)> = pod
            .containers
            .iter()
            .map(|c| {
                let pids = cgroup_pids(&c.cgroup.under(self.freezer.root())).unwrap_or_else(|_| vec![c.pid]);
                (c.name.clone(), pids)
            })
            .collect();
        if let Some(shared) = shared_sysv_segments(proc_root, &processes).first() {
            return Err(CheckpointError::Unsupported {
                reason: format!(
                    "SysV shared memory segment {} is attached by containers {}; CRIU restores a segment into one container only",
                    shared.shmid,
                    shared.containers.join(" and ")
                ),
            });
        }
        let connections =
            pod_ip_connections_of(proc_root, pod.sandbox_pid).map_err(|e| CheckpointError::Unsupported {
                reason: format!("cannot read the pod's TCP connections: {e}"),
            })?;
        if policy == PodIpPolicy::Refuse && !connections.is_empty() {
            let list: Vec<String> = connections.iter().map(ToString::to_string).collect();
            return Err(CheckpointError::Unsupported {
                reason: format!(
                    "tcp.podIPConnections is Refuse and the pod has established connections on its IP: {}",
                    list.join(", ")
                ),
            });
        }
        Ok(connections)
    }
}

/// The pod after the dump.
enum Held {
    Thawed(FreezeReport),
    Frozen(FrozenPod),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use object_store::memory::InMemory;

    use super::*;
    use crate::cgroup::V1Freezer;
    use crate::cri::{ContainerView, CriError, ExecOutput, SandboxView};

    /// A job that writes `data` as object `key` under `dir`, or fails to.
    fn job(dir: &std::path::Path, key: &str, data: Option<&'static [u8]>) -> PackageJob {
        use sha2::Digest;
        let (path, key) = (dir.join(key.replace('/', "_")), key.to_owned());
        Box::new(move || {
            let Some(data) = data else {
                return Err(PackageError::Write {
                    object: key,
                    source: std::io::Error::other("disk full"),
                });
            };
            std::fs::write(&path, data).unwrap();
            let entry = crate::package::ObjectEntry {
                key,
                size: data.len() as u64,
                sha256: crate::package::sha256_hex(sha2::Sha256::digest(data)),
                raw_size: data.len() as u64,
            };
            Ok(LocalObject { entry, path })
        })
    }

    #[tokio::test]
    async fn objects_are_stored_in_job_order_and_a_failure_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let jobs = vec![
            job(dir.path(), "containers/a.tar.zst", Some(b"aaa")),
            job(dir.path(), "pod/shm.tar.zst", Some(b"shm")),
        ];
        let reported = std::sync::Mutex::new(Vec::new());
        let objects = package_and_store((&store, None), "p/", jobs, &|bytes| {
            reported.lock().unwrap().push(bytes)
        })
        .await
        .unwrap();
        // Each stored object is reported once, with its size before compression.
        let mut reported = reported.into_inner().unwrap();
        reported.sort_unstable();
        assert_eq!(reported, [3, 3]);
        let keys: Vec<&str> = objects.iter().map(|o| o.entry.key.as_str()).collect();
        assert_eq!(keys, ["containers/a.tar.zst", "pod/shm.tar.zst"]);
        let stored = store
            .get(&"p/pod/shm.tar.zst".into())
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&stored[..], b"shm");

        let jobs = vec![
            job(dir.path(), "containers/a.tar.zst", Some(b"aaa")),
            job(dir.path(), "containers/b.tar.zst", None),
        ];
        let err = package_and_store((&store, None), "q/", jobs, &|_| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains("containers/b.tar.zst"), "{err}");
        let left: Vec<_> = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(Some(&"q/".into())))
            .await
            .unwrap();
        assert!(left.is_empty(), "left behind: {left:?}");

        // After a failure, a job that has not started never does (the first three
        // fill every slot and all fail, so the fourth can only start after one has).
        let mut jobs: Vec<PackageJob> = ["containers/x.tar.zst", "containers/y.tar.zst", "containers/z.tar.zst"]
            .into_iter()
            .map(|key| job(dir.path(), key, None))
            .collect();
        assert_eq!(jobs.len(), OBJECTS_AT_ONCE);
        jobs.push(job(dir.path(), "pod/late.tar.zst", Some(b"data")));
        let dropped = dir.path().join("pod_late.tar.zst");
        assert!(package_and_store((&store, None), "r/", jobs, &|_| {}).await.is_err());
        assert!(!dropped.exists(), "a job started after the failure");
    }

    #[test]
    fn the_storing_total_counts_each_file_as_a_tar_member() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/pages-1.img"), vec![0u8; 1000]).unwrap();
        std::fs::write(dir.path().join("spec.json"), b"{}").unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("link")).unwrap();
        // images/ (512) + its file (512 + 1024) + spec.json (512 + 512) + the link (512).
        assert_eq!(archived_size(dir.path()), 512 + 1536 + 1024 + 512);
        assert_eq!(archived_size(&dir.path().join("missing")), 0);
    }

    /// A runtime that knows no pods.
    #[derive(Debug)]
    struct NoPods;

    impl ContainerRuntime for NoPods {
        async fn sandboxes_of_pod(&self, _: &str) -> Result<Vec<SandboxView>, CriError> {
            Ok(vec![])
        }
        async fn containers_of_sandbox(&self, _: &str) -> Result<Vec<ContainerView>, CriError> {
            Ok(vec![])
        }
        async fn exec_sync(&self, _: &str, _: &[String], _: Duration) -> Result<ExecOutput, CriError> {
            Ok(ExecOutput::default())
        }
    }

    fn agent(dir: &std::path::Path) -> NodeAgent<NoPods> {
        NodeAgent {
            runtime: NoPods,
            freezer: Arc::new(V1Freezer::new(dir.join("cgroup"))),
            journal: Journal::open(dir.join("journal")).unwrap(),
            exec: NodeExec::default(),
            work_dir: dir.join("work"),
            restores: dir.join("restores"),
            node: NodeFacts::default(),
            manifest_key: crate::signing::ManifestKey::new(&[7; 32]).unwrap(),
        }
    }

    fn request(id: &str) -> CheckpointRequest {
        CheckpointRequest {
            operation_id: id.into(),
            pod: PodRef {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "uid".into(),
            },
            prefix: "ns/p/".into(),
            tcp_established: true,
            limits: FreezeLimits {
                max_freeze: Duration::from_secs(5),
                settle: Duration::from_secs(1),
            },
            hooks: vec![],
            after: AfterDump::Running,
            pod_ip_connections: PodIpPolicy::Close,
            seal: Seal::Clear,
            zstd_level: crate::package::DEFAULT_ZSTD_LEVEL,
            local_root: None,
            pod_template: None,
        }
    }

    #[tokio::test]
    async fn operation_ids_cannot_escape_or_collide() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path());
        for bad in ["", "../x", "/", ".hidden", "a/b"] {
            let err = agent
                .checkpoint(&request(bad), Arc::new(InMemory::new()), &|_| {})
                .await
                .unwrap_err();
            assert!(matches!(err, CheckpointError::BadOperationId { .. }), "{bad:?}: {err}");
        }
        // An operation already running owns its work directory; a second one is refused
        // and leaves it alone.
        let busy = dir.path().join("work/op-1");
        std::fs::create_dir_all(&busy).unwrap();
        std::fs::write(busy.join("keep"), b"x").unwrap();
        let err = agent
            .checkpoint(&request("op-1"), Arc::new(InMemory::new()), &|_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, CheckpointError::AlreadyRunning { .. }), "{err}");
        assert!(busy.join("keep").exists());
        // A pod the runtime does not know fails discovery and leaves no work directory.
        let err = agent
            .checkpoint(&request("op-2"), Arc::new(InMemory::new()), &|_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, CheckpointError::Discovery { .. }), "{err}");
        assert!(!dir.path().join("work/op-2").exists());
    }

    /// A freezer that records what it was asked and models only the state asked for.
    #[derive(Debug, Default)]
    struct Recording {
        frozen: std::sync::Mutex<std::collections::BTreeSet<String>>,
        calls: std::sync::Mutex<Vec<String>>,
    }

    impl crate::cgroup::Freezer for Recording {
        fn freeze(&self, cgroup: &crate::cgroup::CgroupPath) -> Result<(), crate::cgroup::CgroupError> {
            self.calls.lock().unwrap().push(format!("freeze {cgroup}"));
            self.frozen.lock().unwrap().insert(cgroup.as_str().to_owned());
            Ok(())
        }
        fn thaw(&self, cgroup: &crate::cgroup::CgroupPath) -> Result<(), crate::cgroup::CgroupError> {
            self.calls.lock().unwrap().push(format!("thaw {cgroup}"));
            self.frozen.lock().unwrap().remove(cgroup.as_str());
            Ok(())
        }
        fn state(
            &self,
            cgroup: &crate::cgroup::CgroupPath,
        ) -> Result<crate::cgroup::FreezerState, crate::cgroup::CgroupError> {
            let frozen = self.frozen.lock().unwrap();
            let under = frozen
                .iter()
                .any(|f| cgroup.as_str() == f || cgroup.as_str().starts_with(&format!("{f}/")));
            Ok(if under {
                crate::cgroup::FreezerState::Frozen
            } else {
                crate::cgroup::FreezerState::Thawed
            })
        }
        fn self_frozen(&self, cgroup: &crate::cgroup::CgroupPath) -> Result<bool, crate::cgroup::CgroupError> {
            Ok(self.frozen.lock().unwrap().contains(cgroup.as_str()))
        }
        fn version(&self) -> crate::cgroup::CgroupVersion {
            crate::cgroup::CgroupVersion::V1
        }
        fn root(&self) -> &std::path::Path {
            std::path::Path::new("/fake-freezer")
        }
    }

    /// A runtime with one running pod of one container, whose process is this test's;
    /// its sandbox's process is `sandbox_pid`.
    #[derive(Debug)]
    struct OnePod {
        sandbox_pid: u32,
    }

    impl ContainerRuntime for OnePod {
        async fn sandboxes_of_pod(&self, _: &str) -> Result<Vec<SandboxView>, CriError> {
            let mut sandbox = crate::discovery::tests::sandbox(crate::cri::api::NamespaceMode::Pod);
            let info = sandbox.info.get_mut("info").unwrap();
            let mut parsed: serde_json::Value = serde_json::from_str(info).unwrap();
            parsed["pid"] = self.sandbox_pid.into();
            *info = parsed.to_string();
            Ok(vec![sandbox])
        }
        async fn containers_of_sandbox(&self, _: &str) -> Result<Vec<ContainerView>, CriError> {
            Ok(vec![crate::discovery::tests::container(
                "app",
                crate::cri::api::ContainerState::ContainerRunning,
                i64::from(std::process::id()),
                &format!("{}/app", crate::discovery::tests::POD),
                serde_json::json!({}),
            )])
        }
        async fn exec_sync(&self, _: &str, _: &[String], _: Duration) -> Result<ExecOutput, CriError> {
            Ok(ExecOutput::default())
        }
    }

    /// A failure after the freeze ends the checkpoint with that failure, and the pod
    /// thawed: every cgroup frozen is thawed again, the journal records the freeze
    /// ended, and the work directory goes. Two such failures: the pod's sockets cannot
    /// be read (its sandbox's process is gone), and the capture finds no root
    /// filesystem the runtime mounted for the container.
    #[tokio::test]
    async fn a_failure_once_frozen_thaws_the_pod() {
        let gone = u32::MAX - 7;
        for (sandbox_pid, failed_at) in [(gone, "inspect"), (std::process::id(), "capture")] {
            let dir = tempfile::tempdir().unwrap();
            let freezer = Arc::new(Recording::default());
            let agent = NodeAgent {
                runtime: OnePod { sandbox_pid },
                freezer: freezer.clone(),
                journal: Journal::open(dir.path().join("journal")).unwrap(),
                exec: NodeExec::default(),
                work_dir: dir.path().join("work"),
                restores: dir.path().join("restores"),
                node: NodeFacts::default(),
                manifest_key: crate::signing::ManifestKey::new(&[7; 32]).unwrap(),
            };
            let err = agent
                .checkpoint(&request("op-thaw"), Arc::new(InMemory::new()), &|_| {})
                .await
                .unwrap_err();
            match failed_at {
                "inspect" => assert!(matches!(err, CheckpointError::Unsupported { .. }), "{err}"),
                _ => assert!(matches!(err, CheckpointError::Capture { .. }), "{err}"),
            }
            let calls = freezer.calls.lock().unwrap().clone();
            assert!(
                calls.iter().any(|c| c.starts_with("freeze ")),
                "{failed_at}: it froze first: {calls:?}"
            );
            assert!(
                freezer.frozen.lock().unwrap().is_empty(),
                "{failed_at}: every cgroup thawed again: {calls:?}"
            );
            assert!(
                calls.iter().rposition(|c| c.starts_with("thaw "))
                    > calls.iter().rposition(|c| c.starts_with("freeze ")),
                "{failed_at}: thawed after the last freeze: {calls:?}"
            );
            assert!(
                agent.journal.end_of("op-thaw").unwrap().is_some(),
                "{failed_at}: the freeze's end is journaled"
            );
            assert!(
                !dir.path().join("work/op-thaw").exists(),
                "{failed_at}: the work directory goes"
            );
        }
    }
}
