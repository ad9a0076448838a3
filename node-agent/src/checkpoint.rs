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
    /// The operation id cannot name a work directory and journal entry.
    BadOperationId { id: String },
    /// An operation with this id is already running on this node.
    AlreadyRunning { id: String },
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
            Self::BadOperationId { id } => write!(f, "operation id {id:?} is not usable"),
            Self::AlreadyRunning { id } => write!(f, "operation {id} is already running on this node"),
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

        // Shared state and rootfs changes first, while the processes whose /proc
        // entries they are read through are frozen.
        let (containers, state_dir) = (pod.containers.clone(), work.to_path_buf());
        progress(Stage::Dumping);
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
            // The pod always runs on. Stopping it for a migration happens only once
            // the checkpoint is stored, so a failed upload never loses the pod.
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
            return Err(CheckpointError::FreezeExpired {
                after: req.limits.max_freeze,
            });
        }
        let dumps = dumps.map_err(|source| CheckpointError::Dump { source })?;
        let dump = dump_started.elapsed();
        let freeze = tokio::task::spawn_blocking(move || frozen.thaw())
            .await
            .map_err(|_| CheckpointError::Task { step: "thaw" })?
            .map_err(|source| CheckpointError::Freeze { source })?;

        // Outside the freeze window from here on.
        progress(Stage::Thawed);
        progress(Stage::Storing);
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
        let manifest_digest = store_checkpoint(&store, &req.prefix, &objects, &manifest)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use object_store::memory::InMemory;

    use super::*;
    use crate::cgroup::V1Freezer;
    use crate::cri::{ContainerView, CriError, SandboxView};

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
    }

    fn agent(dir: &std::path::Path) -> NodeAgent<NoPods> {
        NodeAgent {
            runtime: NoPods,
            freezer: Arc::new(V1Freezer::new(dir.join("cgroup"))),
            journal: Journal::open(dir.join("journal")).unwrap(),
            exec: NodeExec::default(),
            work_dir: dir.join("work"),
            node: NodeFacts::default(),
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
}
