//! Preparing a restore on the target node: fetch a checkpoint, check that this node
//! can run it, verify every object's size and sha256, decrypt, and unpack it where
//! the runtime handler ([`crate::handler`]) finds it. Nothing is unpacked before every
//! object has verified, and the restore directory appears whole (a rename) or not at
//! all, so no container can start from a tampered, truncated or partial checkpoint.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};

use crate::handler::{RESTORED_POD_FILE, RestoredPod};
use crate::journal::Journal;
use crate::package::{AGE_SCHEME, MANIFEST_API_VERSION, MANIFEST_KIND, Manifest, NodeFacts, sha256_hex};
use crate::signing::{ManifestKey, SIGNATURE_OBJECT};

/// The manifest of a prepared restore, beside what it describes.
pub const PREPARED_MANIFEST: &str = "manifest.json";
/// Larger manifests are refused unread.
const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;
/// A signature is `hmac-sha256:<8 hex>:<64 hex>`.
const MAX_SIGNATURE_BYTES: u64 = 256;

/// One restore to prepare.
#[derive(Clone)]
pub struct RestoreRequest {
    /// Names the restore directory; the restored pod's `cryopod.io/restore` annotation.
    pub restore_id: String,
    /// The checkpoint's key prefix in the store, ending in `/`.
    pub prefix: String,
    /// `sha256:<hex>` the manifest must have, when known (the PodCheckpoint's status).
    pub manifest_digest: Option<String>,
    /// age identities for an encrypted checkpoint.
    pub identities: Vec<age::x25519::Identity>,
    /// The only pod the runtime handler lets use this restore.
    pub restored_pod: RestoredPod,
}

impl std::fmt::Debug for RestoreRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreRequest")
            .field("restore_id", &self.restore_id)
            .field("prefix", &self.prefix)
            .field("manifest_digest", &self.manifest_digest)
            .field("identities", &self.identities.len())
            .field("restored_pod", &self.restored_pod)
            .finish()
    }
}

/// Parses age identities (`AGE-SECRET-KEY-1…`), one a line, `#` comments skipped.
pub fn identities_from_lines(text: &str) -> Result<Vec<age::x25519::Identity>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(
            line.parse::<age::x25519::Identity>()
                .map_err(|e| format!("line {} is not an age X25519 identity: {e}", n + 1))?,
        );
    }
    if out.is_empty() {
        return Err("no age identity".to_owned());
    }
    Ok(out)
}

/// A restore ready for the runtime handler.
#[derive(Clone, Debug)]
pub struct PreparedRestore {
    /// `<restores>/<restore id>`.
    pub dir: PathBuf,
    /// The checkpoint's manifest.
    pub manifest: Manifest,
    /// Bytes fetched from the store.
    pub fetched_bytes: u64,
    /// Fetching and verifying.
    pub fetch: Duration,
    /// Decrypting and unpacking.
    pub unpack: Duration,
}

/// Preparing a restore failed; nothing was left in the restores directory.
#[derive(Debug)]
pub enum RestoreError {
    /// The restore id cannot name a directory.
    BadRestoreId { id: String },
    /// A restore with this id was already prepared on this node.
    AlreadyPrepared { id: String },
    /// Reading from the store failed.
    Fetch { key: String, source: object_store::Error },
    /// The manifest is not the one the caller expected.
    ManifestDigest { expected: String, found: String },
    /// The manifest's signature is missing or wrong: no agent of this cluster wrote
    /// it for this prefix.
    Signature { detail: String },
    /// The manifest cannot be read.
    Manifest { detail: String },
    /// An object's size differs from the manifest's (a truncated or grown object).
    Size { key: String, expected: u64, found: u64 },
    /// An object's sha256 differs from the manifest's (a tampered object).
    Digest {
        key: String,
        expected: String,
        found: String,
    },
    /// This node cannot run the checkpoint.
    Incompatible { reason: String },
    /// The checkpoint is encrypted and no identity opens it.
    Decrypt { key: String, detail: String },
    /// Local files could not be written or read.
    Local { path: PathBuf, source: std::io::Error },
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadRestoreId { id } => write!(f, "restore id {id:?} is not usable"),
            Self::AlreadyPrepared { id } => write!(f, "restore {id} is already prepared on this node"),
            Self::Fetch { key, .. } => write!(f, "cannot read {key} from the checkpoint storage"),
            Self::ManifestDigest { expected, found } => {
                write!(f, "the checkpoint's manifest is {found}, not the expected {expected}")
            }
            Self::Signature { detail } => write!(f, "the checkpoint's manifest is not authentic: {detail}: refused"),
            Self::Manifest { detail } => write!(f, "the checkpoint's manifest is unusable: {detail}"),
            Self::Size { key, expected, found } => {
                write!(
                    f,
                    "{key} is {found} bytes, not the {expected} the manifest lists: refused"
                )
            }
            Self::Digest { key, expected, found } => {
                write!(
                    f,
                    "{key} has digest {found}, not the {expected} the manifest lists: refused"
                )
            }
            Self::Incompatible { reason } => write!(f, "this node cannot restore the checkpoint: {reason}"),
            Self::Decrypt { key, detail } => write!(f, "cannot decrypt {key}: {detail}"),
            Self::Local { path, .. } => write!(f, "cannot write {}", path.display()),
        }
    }
}

impl std::error::Error for RestoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Fetch { source, .. } => Some(source),
            Self::Local { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Whether this node (`target`) can restore what `source` dumped
/// ([`cryopod_agent_api::compat::check`], the rule the operator also applies before a
/// migration freezes anything).
pub fn check_compatible(source: &NodeFacts, target: &NodeFacts) -> Result<(), String> {
    cryopod_agent_api::compat::check(&compat_facts(source), &compat_facts(target))
}

fn compat_facts(node: &NodeFacts) -> cryopod_agent_api::compat::Facts<'_> {
    cryopod_agent_api::compat::Facts {
        name: &node.name,
        kernel: &node.kernel,
        criu_version: &node.criu_version,
        cgroup_version: &node.cgroup_version,
        cpu_flags: &node.cpu_flags,
    }
}

/// Fetches, verifies and unpacks a checkpoint into `<restores>/<restore id>`.
pub async fn prepare_restore(
    store: &Arc<dyn ObjectStore>,
    req: &RestoreRequest,
    node: &NodeFacts,
    restores: &Path,
    key: &ManifestKey,
) -> Result<PreparedRestore, RestoreError> {
    let at = RestorePlace { node, restores, key };
    prepare_restore_with(store, req, &at, &|_, _| {}).await
}

/// Where a restore is prepared: this node's facts, its restores directory and the
/// key manifests are signed with.
#[derive(Debug, Clone, Copy)]
pub struct RestorePlace<'a> {
    /// The node's facts, checked against the checkpoint's.
    pub node: &'a NodeFacts,
    /// Where prepared restores live.
    pub restores: &'a Path,
    /// The manifests' signing key.
    pub key: &'a ManifestKey,
}

/// [`prepare_restore`], reporting the bytes fetched so far of all the checkpoint's
/// objects (as stored) after each object.
pub async fn prepare_restore_with(
    store: &Arc<dyn ObjectStore>,
    req: &RestoreRequest,
    at: &RestorePlace<'_>,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<PreparedRestore, RestoreError> {
    let restores = at.restores;
    Journal::check_operation_id(&req.restore_id).map_err(|_| RestoreError::BadRestoreId {
        id: req.restore_id.clone(),
    })?;
    let local = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RestoreError::Local { path, source }
    };
    let dir = restores.join(&req.restore_id);
    if dir.exists() {
        // Asked again (the operator or this agent restarted in between): the same
        // request gets what was prepared, from the copy of the manifest verified
        // then; any other request is refused.
        return already_prepared(&dir, req).ok_or_else(|| RestoreError::AlreadyPrepared {
            id: req.restore_id.clone(),
        });
    }
    let partial = restores.join(format!(".{}.partial", req.restore_id));
    let _ = std::fs::remove_dir_all(&partial);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&partial)
            .map_err(local(&partial))?;
    }
    let result = prepare_in(store, req, at, &partial, progress).await;
    match result {
        Ok(mut prepared) => {
            std::fs::rename(&partial, &dir).map_err(local(&dir))?;
            prepared.dir = dir;
            Ok(prepared)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

/// The restore prepared in `dir`, if it was prepared for this very request: the same
/// pod, and a manifest with the digest asked for.
fn already_prepared(dir: &Path, req: &RestoreRequest) -> Option<PreparedRestore> {
    let bound: RestoredPod = serde_json::from_slice(&std::fs::read(dir.join(RESTORED_POD_FILE)).ok()?).ok()?;
    let bytes = std::fs::read(dir.join(PREPARED_MANIFEST)).ok()?;
    let same_manifest = req
        .manifest_digest
        .as_ref()
        .is_none_or(|expected| *expected == sha256_hex(Sha256::digest(&bytes)));
    if bound != req.restored_pod || !same_manifest {
        return None;
    }
    Some(PreparedRestore {
        dir: dir.to_path_buf(),
        manifest: serde_json::from_slice(&bytes).ok()?,
        fetched_bytes: 0,
        fetch: Duration::ZERO,
        unpack: Duration::ZERO,
    })
}

async fn prepare_in(
    store: &Arc<dyn ObjectStore>,
    req: &RestoreRequest,
    at: &RestorePlace<'_>,
    partial: &Path,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<PreparedRestore, RestoreError> {
    let (node, key) = (at.node, at.key);
    let fetch_started = Instant::now();
    let small = |name: &'static str, limit: u64| async move {
        let fetch = |source| RestoreError::Fetch {
            key: name.to_owned(),
            source,
        };
        let object = store
            .get(&ObjectPath::from(format!("{}{name}", req.prefix)))
            .await
            .map_err(fetch)?;
        // A manifest is kilobytes; a huge object here is an attack on memory.
        let too_big = |size: u64| RestoreError::Manifest {
            detail: format!("{name} is {size} bytes or more, more than it can be"),
        };
        if object.meta.size > limit {
            return Err(too_big(object.meta.size));
        }
        // The store's stated size is not trusted either: reading stops at the limit.
        let mut stream = object.into_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk.map_err(fetch)?);
            if bytes.len() as u64 > limit {
                return Err(too_big(bytes.len() as u64));
            }
        }
        Ok(bytes)
    };
    let manifest_bytes = small(PREPARED_MANIFEST, MAX_MANIFEST_BYTES).await?;
    // Authentic before anything in it is trusted: digests, keys, the pod template.
    let signature = match small(SIGNATURE_OBJECT, MAX_SIGNATURE_BYTES).await {
        Err(RestoreError::Fetch {
            source: object_store::Error::NotFound { .. },
            ..
        }) => {
            return Err(RestoreError::Signature {
                detail: format!("{SIGNATURE_OBJECT} is missing"),
            });
        }
        other => other?,
    };
    key.verify(&req.prefix, &manifest_bytes, &signature)
        .map_err(|e| RestoreError::Signature { detail: e.to_string() })?;
    let found = sha256_hex(Sha256::digest(&manifest_bytes));
    if let Some(expected) = &req.manifest_digest
        && *expected != found
    {
        return Err(RestoreError::ManifestDigest {
            expected: expected.clone(),
            found,
        });
    }
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| RestoreError::Manifest { detail: e.to_string() })?;
    if manifest.api_version != MANIFEST_API_VERSION || manifest.kind != MANIFEST_KIND {
        return Err(RestoreError::Manifest {
            detail: format!("{}/{} is not a cryopod manifest", manifest.api_version, manifest.kind),
        });
    }
    check_compatible(&manifest.node, node).map_err(|reason| RestoreError::Incompatible { reason })?;
    match &manifest.encryption {
        Some(e) if e.scheme != AGE_SCHEME => {
            return Err(RestoreError::Manifest {
                detail: format!("unknown encryption scheme {:?}", e.scheme),
            });
        }
        Some(_) if req.identities.is_empty() => {
            return Err(RestoreError::Decrypt {
                key: "the checkpoint".to_owned(),
                detail: "it is encrypted and no age identity was given".to_owned(),
            });
        }
        _ => {}
    }

    // Every object is fetched and verified before anything is unpacked.
    let fetched_dir = partial.join(".fetched");
    std::fs::create_dir_all(&fetched_dir).map_err(|source| RestoreError::Local {
        path: fetched_dir.clone(),
        source,
    })?;
    let mut fetched_bytes = manifest_bytes.len() as u64;
    let total = fetched_bytes + manifest.objects.iter().map(|o| o.size).sum::<u64>();
    progress(fetched_bytes, total);
    // A few objects at once: one's transfer overlaps another's hashing and writing.
    let done = std::sync::atomic::AtomicU64::new(fetched_bytes);
    let fetches: Vec<_> = manifest
        .objects
        .iter()
        .enumerate()
        .map(|(n, object)| {
            let (path, done) = (fetched_dir.join(n.to_string()), &done);
            async move {
                let size = fetch_verified(store, &req.prefix, object, &path).await?;
                let now = done.fetch_add(size, std::sync::atomic::Ordering::Relaxed) + size;
                progress(now, total);
                Ok::<_, RestoreError>((object.key.clone(), path))
            }
        })
        .collect();
    // The first failure ends the others (they run in this task, nothing is left
    // writing): the rest of a tampered checkpoint is not fetched for nothing.
    let fetched: Vec<(String, PathBuf)> = futures::stream::iter(fetches)
        .buffered(FETCHES_AT_ONCE)
        .try_collect()
        .await?;
    fetched_bytes = done.into_inner();
    let fetch = fetch_started.elapsed();

    // Everything verified: the objects unpack side by side, each into its own place.
    let unpack_started = Instant::now();
    let encrypted = manifest.encryption.is_some();
    let unpacks = fetched.into_iter().map(|(key, path)| {
        let (identities, target) = (req.identities.clone(), partial.to_path_buf());
        async move {
            tokio::task::spawn_blocking(move || {
                unpack_object(&key, &path, encrypted, &identities, &target)?;
                let _ = std::fs::remove_file(&path);
                Ok::<_, RestoreError>(())
            })
            .await
            .unwrap_or_else(|_| {
                Err(RestoreError::Manifest {
                    detail: "the unpack task died".to_owned(),
                })
            })
        }
    });
    // A core each, at most; every one ends before a failure is reported, so none
    // writes after its caller cleans up.
    let results: Vec<Result<(), RestoreError>> =
        futures::stream::iter(unpacks).buffered(UNPACKS_AT_ONCE).collect().await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    let _ = std::fs::remove_dir_all(&fetched_dir);
    // The binding the runtime handler checks before it restores into any pod.
    let binding_path = partial.join(RESTORED_POD_FILE);
    let binding =
        serde_json::to_vec(&req.restored_pod).map_err(|e| RestoreError::Manifest { detail: e.to_string() })?;
    std::fs::write(&binding_path, binding).map_err(|source| RestoreError::Local {
        path: binding_path,
        source,
    })?;
    let manifest_path = partial.join(PREPARED_MANIFEST);
    std::fs::write(&manifest_path, &manifest_bytes).map_err(|source| RestoreError::Local {
        path: manifest_path,
        source,
    })?;
    Ok(PreparedRestore {
        dir: partial.to_path_buf(),
        manifest,
        fetched_bytes,
        fetch,
        unpack: unpack_started.elapsed(),
    })
}

/// Objects fetched at once.
const FETCHES_AT_ONCE: usize = 3;
/// Objects unpacked at once.
const UNPACKS_AT_ONCE: usize = 2;

/// Streams one object to `path`, checking its size and sha256; returns its size.
async fn fetch_verified(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    object: &crate::package::ObjectEntry,
    path: &Path,
) -> Result<u64, RestoreError> {
    let fetch_err = |source| RestoreError::Fetch {
        key: object.key.clone(),
        source,
    };
    let local = |source| RestoreError::Local {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = store
        .get(&ObjectPath::from(format!("{prefix}{}", object.key)))
        .await
        .map_err(fetch_err)?
        .into_stream();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(local)?);
    let (mut hash, mut size) = (Sha256::new(), 0u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(fetch_err)?;
        hash.update(&chunk);
        size += chunk.len() as u64;
        // A grown object stops here, not when the node's disk is full.
        if size > object.size {
            return Err(RestoreError::Size {
                key: object.key.clone(),
                expected: object.size,
                found: size,
            });
        }
        file.write_all(&chunk).map_err(local)?;
    }
    file.flush().map_err(local)?;
    if size != object.size {
        return Err(RestoreError::Size {
            key: object.key.clone(),
            expected: object.size,
            found: size,
        });
    }
    let found = sha256_hex(hash.finalize());
    if found != object.sha256 {
        return Err(RestoreError::Digest {
            key: object.key.clone(),
            expected: object.sha256.clone(),
            found,
        });
    }
    Ok(size)
}

/// Where an object unpacks: `containers/<name>.tar.zst` into `containers/<name>/`,
/// `pod/<name>.tar.zst` (one tar inside) into `pod/`.
fn unpack_object(
    key: &str,
    path: &Path,
    encrypted: bool,
    identities: &[age::x25519::Identity],
    target: &Path,
) -> Result<(), RestoreError> {
    let local = |p: &Path| {
        let p = p.to_path_buf();
        move |source| RestoreError::Local { path: p, source }
    };
    let file = std::fs::File::open(path).map_err(local(path))?;
    let plain: Box<dyn Read> = if encrypted {
        let decryptor = age::Decryptor::new(std::io::BufReader::new(file)).map_err(|e| RestoreError::Decrypt {
            key: key.to_owned(),
            detail: e.to_string(),
        })?;
        Box::new(
            decryptor
                .decrypt(identities.iter().map(|i| i as &dyn age::Identity))
                .map_err(|e| RestoreError::Decrypt {
                    key: key.to_owned(),
                    detail: e.to_string(),
                })?,
        )
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let decoder = zstd::Decoder::new(plain).map_err(local(path))?;
    let Some(dest) = object_destination(key) else {
        return Err(RestoreError::Local {
            path: target.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "object key {key} is not one of a checkpoint's (containers/<name>, pod/shm, pod/volume/<name>)"
                ),
            ),
        });
    };
    let dest = target.join(dest);
    std::fs::create_dir_all(&dest).map_err(local(&dest))?;
    // Bucket objects are hostile: plain files and directories only, all inside `dest`,
    // so no prepared path the handler later opens can be a link elsewhere.
    crate::safe_fs::unpack(decoder, &dest, crate::safe_fs::UnpackOptions::FILES).map_err(|e| RestoreError::Local {
        path: dest,
        source: std::io::Error::other(e),
    })
}

/// Where an object of the checkpoint layout unpacks, relative to the restore
/// directory, or `None` for any other key. `pod/volume/data` holds `data.tar` and
/// `pod/shm` holds `shm.tar`: they unpack beside their siblings; a container archive
/// unpacks into its own directory.
pub fn object_destination(key: &str) -> Option<PathBuf> {
    let stem = key.strip_suffix(".tar.zst")?;
    let one =
        |name: &str| !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.starts_with('.');
    match stem.split_once('/')? {
        ("containers", name) if one(name) => Some(PathBuf::from(stem)),
        ("pod", "shm") => Some(PathBuf::from("pod")),
        ("pod", rest) => match rest.split_once('/')? {
            ("volume", name) if one(name) => Some(PathBuf::from("pod/volume")),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use age::secrecy::ExposeSecret;
    use object_store::PutPayload;
    use object_store::memory::InMemory;

    use super::*;
    use crate::package::{LocalObject, ManifestContainer, PodRef, Seal, write_shared_state};

    fn facts(criu: &str, kernel: &str, flags: &[&str]) -> NodeFacts {
        NodeFacts {
            name: "node".into(),
            kernel: kernel.into(),
            criu_version: criu.into(),
            cgroup_version: "V1".into(),
            cpu_flags: flags.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    #[test]
    fn only_the_checkpoint_layouts_keys_unpack_and_where_they_belong() {
        let table = [
            ("containers/app.tar.zst", Some("containers/app")),
            ("pod/shm.tar.zst", Some("pod")),
            ("pod/volume/data.tar.zst", Some("pod/volume")),
            ("containers/.tar.zst", None),
            ("containers/..tar.zst", None),
            ("containers/a/b.tar.zst", None),
            ("pod/volume/../x.tar.zst", None),
            (".tar.zst", None),
            ("manifest.json", None),
            ("pod/other.tar.zst", None),
            ("/etc/x.tar.zst", None),
        ];
        for (key, expected) in table {
            assert_eq!(object_destination(key), expected.map(PathBuf::from), "{key}");
        }
    }

    /// A stored checkpoint of one shared-state object; returns the store and the
    /// manifest digest.
    async fn stored(seal: &Seal) -> (Arc<dyn ObjectStore>, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("shm");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("token"), b"shared").unwrap();
        let tar_path = dir.path().join("shm.tar");
        {
            let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
            b.append_dir_all(".", &tree).unwrap();
            b.finish().unwrap();
        }
        let object: LocalObject = write_shared_state(
            &dir.path().join("objects"),
            (seal, crate::package::DEFAULT_ZSTD_LEVEL),
            "shm",
            &tar_path,
        )
        .unwrap();
        let manifest = Manifest {
            api_version: MANIFEST_API_VERSION.into(),
            kind: MANIFEST_KIND.into(),
            pod: PodRef {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
            },
            node: facts("4.2.1", "6.1.0", &["avx2"]),
            checkpointed_at: "2026-01-01T00:00:00Z".into(),
            freeze_window_millis: 1,
            containers: vec![ManifestContainer {
                name: "app".into(),
                image: "busybox".into(),
                image_ref: "sha256:1".into(),
                archive: "containers/app.tar.zst".into(),
            }],
            shared: vec![object.entry.key.clone()],
            objects: vec![object.entry.clone()],
            encryption: seal.manifest_entry(),
            post_checkpoint_state: "Running".into(),
            pod_ip_connections: vec![],
            warnings: vec![],
            checkpointed_pod_template: None,
        };
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let digest = crate::store::store_checkpoint(&store, "ck/", &[object], &manifest, &key())
            .await
            .unwrap();
        (store, digest, dir)
    }

    async fn refused(store: &Arc<dyn ObjectStore>, req: &RestoreRequest, node: &NodeFacts, dir: &Path) -> RestoreError {
        prepare_restore(store, req, node, dir, &key()).await.unwrap_err()
    }

    fn key() -> ManifestKey {
        ManifestKey::new(&[7; 32]).unwrap()
    }

    fn request(id: &str, digest: Option<String>) -> RestoreRequest {
        RestoreRequest {
            restore_id: id.into(),
            prefix: "ck/".into(),
            manifest_digest: digest,
            identities: vec![],
            restored_pod: RestoredPod {
                namespace: "ns".into(),
                name: "p".into(),
                start_stopped: false,
            },
        }
    }

    #[tokio::test]
    async fn a_verified_checkpoint_unpacks_whole() {
        let (store, digest, _keep) = stored(&Seal::Clear).await;
        let restores = tempfile::tempdir().unwrap();
        let node = facts("4.2.1", "6.1.0", &["avx2"]);
        let (req, key) = (request("r1", Some(digest.clone())), key());
        let prepare = || prepare_restore(&store, &req, &node, restores.path(), &key);
        let prepared = prepare().await.unwrap();
        assert_eq!(prepared.dir, restores.path().join("r1"));
        let shm = prepared.dir.join("pod/shm.tar");
        let mut names = Vec::new();
        for e in tar::Archive::new(std::fs::File::open(&shm).unwrap()).entries().unwrap() {
            names.push(e.unwrap().path().unwrap().display().to_string());
        }
        assert!(names.iter().any(|n| n.ends_with("token")), "{names:?}");
        assert!(prepared.dir.join(PREPARED_MANIFEST).exists());
        // The same request again (a restart in between) gets what was prepared.
        let again = prepare().await.unwrap();
        assert_eq!(
            (again.dir, again.manifest),
            (prepared.dir.clone(), prepared.manifest.clone())
        );
        // Another pod, or another manifest, under that id is refused.
        let mut other_pod = request("r1", None);
        other_pod.restored_pod.name = "thief".into();
        let err = refused(&store, &other_pod, &node, restores.path()).await;
        assert!(matches!(err, RestoreError::AlreadyPrepared { .. }), "{err}");
        let err = refused(&store, &request("r1", Some("sha256:00".into())), &node, restores.path()).await;
        assert!(matches!(err, RestoreError::AlreadyPrepared { .. }), "{err}");
    }

    async fn tamper(store: &Arc<dyn ObjectStore>, key: &str, change: impl FnOnce(&mut Vec<u8>)) {
        let path = ObjectPath::from(format!("ck/{key}"));
        let mut bytes = store.get(&path).await.unwrap().bytes().await.unwrap().to_vec();
        change(&mut bytes);
        store.put(&path, PutPayload::from(bytes)).await.unwrap();
    }

    #[tokio::test]
    async fn tampered_truncated_or_foreign_checkpoints_leave_nothing() {
        let node = facts("4.2.1", "6.1.0", &["avx2"]);
        let restores = tempfile::tempdir().unwrap();
        let empty = |dir: &Path| std::fs::read_dir(dir).unwrap().next().is_none();

        let (store, digest, _keep) = stored(&Seal::Clear).await;
        tamper(&store, "pod/shm.tar.zst", |b| {
            let last = b.len() - 1;
            b[last] ^= 1;
        })
        .await;
        let err = refused(&store, &request("r2", Some(digest.clone())), &node, restores.path()).await;
        assert!(matches!(err, RestoreError::Digest { .. }), "{err}");
        assert!(
            err.to_string().starts_with("pod/shm.tar.zst has digest sha256:"),
            "{err}"
        );
        assert!(empty(restores.path()));

        tamper(&store, "pod/shm.tar.zst", |b| b.truncate(b.len() / 2)).await;
        let err = refused(&store, &request("r2", Some(digest)), &node, restores.path()).await;
        assert!(matches!(err, RestoreError::Size { .. }), "{err}");
        assert!(empty(restores.path()));

        let err = refused(&store, &request("r2", Some("sha256:00".into())), &node, restores.path()).await;
        assert!(matches!(err, RestoreError::ManifestDigest { .. }), "{err}");

        let old = facts("4.1", "6.1.0", &["avx2"]);
        let (store, _, _keep) = stored(&Seal::Clear).await;
        let err = refused(&store, &request("r3", None), &old, restores.path()).await;
        assert!(matches!(err, RestoreError::Incompatible { .. }), "{err}");
        assert!(empty(restores.path()));
    }

    #[tokio::test]
    async fn encrypted_checkpoints_need_the_identity() {
        let identity = age::x25519::Identity::generate();
        let seal = Seal::age_from_lines(&identity.to_public().to_string()).unwrap();
        let (store, _, _keep) = stored(&seal).await;
        let node = facts("4.2.1", "6.1.0", &["avx2"]);
        let restores = tempfile::tempdir().unwrap();
        let err = refused(&store, &request("r4", None), &node, restores.path()).await;
        assert!(err.to_string().contains("no age identity"), "{err}");
        let other = age::x25519::Identity::generate();
        let mut req = request("r4", None);
        req.identities = vec![other];
        let err = refused(&store, &req, &node, restores.path()).await;
        assert!(matches!(err, RestoreError::Decrypt { .. }), "{err}");
        req.identities = identities_from_lines(&format!("# key\n{}\n", identity.to_string().expose_secret())).unwrap();
        let prepared = prepare_restore(&store, &req, &node, restores.path(), &key())
            .await
            .unwrap();
        assert!(prepared.dir.join("pod/shm.tar").exists());
    }

    #[tokio::test]
    async fn an_unsigned_rewritten_or_moved_manifest_is_refused_before_anything_is_fetched() {
        let node = facts("4.2.1", "6.1.0", &["avx2"]);
        let restores = tempfile::tempdir().unwrap();
        let read = |store: Arc<dyn ObjectStore>, k: String| async move {
            store.get(&ObjectPath::from(k)).await.unwrap().bytes().await.unwrap()
        };

        // Rewritten, with the digest the caller expects made to match.
        let (store, _, _keep) = stored(&Seal::Clear).await;
        tamper(&store, PREPARED_MANIFEST, |b| {
            let text = String::from_utf8(b.clone())
                .unwrap()
                .replace("\"Running\"", "\"Stopped\"");
            *b = text.into_bytes();
        })
        .await;
        let rewritten = sha256_hex(Sha256::digest(read(store.clone(), "ck/manifest.json".into()).await));
        let err = refused(&store, &request("s1", Some(rewritten)), &node, restores.path()).await;
        assert!(matches!(err, RestoreError::Signature { .. }), "{err}");
        assert!(err.to_string().contains("changed or moved"), "{err}");

        // Signed by another cluster's key.
        let other = ManifestKey::new(&[8; 32]).unwrap();
        let (store, _, _keep) = stored(&Seal::Clear).await;
        let err = prepare_restore(&store, &request("s2", None), &node, restores.path(), &other)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("signed with key"), "{err}");

        // A genuine checkpoint copied under another prefix.
        for name in ["manifest.json", "manifest.sig", "pod/shm.tar.zst"] {
            let bytes = read(store.clone(), format!("ck/{name}")).await;
            store
                .put(&ObjectPath::from(format!("victim/{name}")), PutPayload::from(bytes))
                .await
                .unwrap();
        }
        let mut moved = request("s3", None);
        moved.prefix = "victim/".into();
        let err = refused(&store, &moved, &node, restores.path()).await;
        assert!(matches!(err, RestoreError::Signature { .. }), "{err}");

        // No signature at all.
        store.delete(&ObjectPath::from("ck/manifest.sig")).await.unwrap();
        let err = refused(&store, &request("s4", None), &node, restores.path()).await;
        assert!(err.to_string().contains("manifest.sig is missing"), "{err}");
        assert!(std::fs::read_dir(restores.path()).unwrap().next().is_none());
    }
}
