//! One pod checkpoint, end to end on the node: discover, freeze at one instant,
//! capture the shared state and rootfs changes once, dump every container in
//! parallel, thaw (or leave stopped), then package and store outside the freeze
//! window, the manifest last.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use object_store::ObjectStore;

use crate::capture::{CaptureError, capture_shared_state, rootfs_diff};
use crate::cgroup::Freezer;
use crate::cri::ContainerRuntime;
use crate::discovery::{DiscoveryError, discover};
use crate::dump::{DumpError, DumpOptions, NodeExec, dump_containers};
use crate::freeze::{FreezeError, FreezeLimits, FreezeReport, freeze_pod};
use crate::journal::Journal;
use crate::package::{
    ContainerParts, MANIFEST_API_VERSION, MANIFEST_KIND, Manifest, ManifestContainer, NodeFacts, PackageError, PodRef,
    rfc3339_from_nanos, write_container_archive, write_shared_state,
};
use crate::store::{StoreError, store_checkpoint};

/// What the pod does after the dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterDump {
    /// Thawed; it carries on.
    Running,
    /// CRIU stops its processes.
    Stopped,
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
    /// Running or stopped afterwards.
    pub after: AfterDump,
    /// Keep established TCP connections.
    pub tcp_established: bool,
    /// Freeze limits.
    pub limits: FreezeLimits,
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
    /// Where checkpoints go.
    pub store: Arc<dyn ObjectStore>,
    /// Private scratch space (0700), one directory per operation.
    pub work_dir: PathBuf,
    /// Facts of this node.
    pub node: NodeFacts,
}

/// The result of a checkpoint.
#[derive(Clone, Debug)]
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
    /// Packaging failed.
    Package { source: PackageError },
    /// Storing failed; nothing was left in the store.
    Store { source: StoreError },
    /// A background task died.
    Task { step: &'static str },
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
            Self::Package { source } => write!(f, "{source}"),
            Self::Store { source } => write!(f, "{source}"),
            Self::Task { step } => write!(f, "the {step} task died"),
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
            Self::FreezeExpired { .. } | Self::Task { .. } => None,
        }
    }
}

impl<R: ContainerRuntime> NodeAgent<R> {
    /// Takes the checkpoint. The work directory is removed whatever happens.
    pub async fn checkpoint(&self, req: &CheckpointRequest) -> Result<CheckpointOutcome, CheckpointError> {
        let work = self.work_dir.join(&req.operation_id);
        let result = self.checkpoint_in(req, &work).await;
        let _ = tokio::fs::remove_dir_all(&work).await;
        result
    }

    async fn checkpoint_in(
        &self,
        req: &CheckpointRequest,
        work: &std::path::Path,
    ) -> Result<CheckpointOutcome, CheckpointError> {
        let pod = discover(&self.runtime, &req.pod.uid)
            .await
            .map_err(|source| CheckpointError::Discovery { source })?;
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(work)
                .map_err(|source| CheckpointError::Workspace {
                    path: work.to_path_buf(),
                    source,
                })?;
        }

        let frozen_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let frozen = freeze_pod(
            self.freezer.clone(),
            &self.journal,
            &req.operation_id,
            &pod.freeze_targets(),
            req.limits,
        )
        .map_err(|source| CheckpointError::Freeze { source })?;
        let dump_started = Instant::now();

        // Shared state and rootfs changes first: CRIU may stop the processes whose
        // /proc entries they are read through.
        let (containers, state_dir) = (pod.containers.clone(), work.to_path_buf());
        let captured = tokio::task::spawn_blocking(move || {
            let shared = capture_shared_state(&containers, &state_dir)?;
            let diffs = containers
                .iter()
                .map(|c| {
                    let dir = state_dir.join(&c.name);
                    std::fs::create_dir_all(&dir).map_err(|source| CaptureError::Archive {
                        what: format!("the rootfs changes of container {}", c.name),
                        path: dir.clone(),
                        source,
                    })?;
                    rootfs_diff(c, &dir.join("rootfs-diff.tar"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, CaptureError>((shared, diffs))
        })
        .await
        .map_err(|_| CheckpointError::Task { step: "capture" })?
        .map_err(|source| CheckpointError::Capture { source })?;

        let options = DumpOptions {
            leave_running: req.after == AfterDump::Running,
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
            req.limits.max_freeze,
        )
        .await
        .map_err(|source| CheckpointError::Dump { source })?;
        if frozen.expired() {
            return Err(CheckpointError::FreezeExpired {
                after: req.limits.max_freeze,
            });
        }
        let dump = dump_started.elapsed();
        let freeze = frozen.thaw().map_err(|source| CheckpointError::Freeze { source })?;

        // Outside the freeze window from here on.
        let upload_started = Instant::now();
        let checkpointed_at = rfc3339_from_nanos(frozen_at);
        let (shared, diffs) = captured;
        let (containers, dir, at) = (pod.containers.clone(), work.to_path_buf(), checkpointed_at.clone());
        let objects = tokio::task::spawn_blocking(move || {
            let mut objects = Vec::new();
            for ((c, d), diff) in containers.iter().zip(&dumps).zip(&diffs) {
                let parts = ContainerParts {
                    container: c,
                    images: &d.images,
                    work: &dir.join(&c.name).join("work"),
                    rootfs_diff: &diff.tar,
                    deleted: &diff.deleted,
                    runtime: "io.containerd.runc.v2",
                    checkpointed_at: &at,
                };
                objects.push(write_container_archive(&dir.join("objects"), &parts)?);
            }
            for s in &shared {
                objects.push(write_shared_state(&dir.join("objects"), &s.name, &s.tar)?);
            }
            Ok::<_, PackageError>(objects)
        })
        .await
        .map_err(|_| CheckpointError::Task { step: "package" })?
        .map_err(|source| CheckpointError::Package { source })?;

        let manifest = Manifest {
            api_version: MANIFEST_API_VERSION.to_owned(),
            kind: MANIFEST_KIND.to_owned(),
            pod: req.pod.clone(),
            node: self.node.clone(),
            checkpointed_at,
            freeze_window_millis: freeze.window.as_millis() as u64,
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
        };
        let manifest_digest = store_checkpoint(&self.store, &req.prefix, &objects, &manifest)
            .await
            .map_err(|source| CheckpointError::Store { source })?;
        Ok(CheckpointOutcome {
            manifest,
            manifest_digest,
            freeze,
            dump,
            upload: upload_started.elapsed(),
        })
    }
}
