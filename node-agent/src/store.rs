//! Storing a packaged checkpoint in object storage (S3-compatible, GCS, Azure or the
//! local filesystem, through `object_store`): multipart uploads, each object read
//! back and its sha256 compared, the manifest written last. If anything fails, the
//! objects already written are removed: parts without a manifest are no checkpoint.

use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::package::{LocalObject, Manifest, sha256_hex};
use crate::signing::{ManifestKey, SIGNATURE_OBJECT};

/// Upload parts of this size.
const PART_SIZE: usize = 8 * 1024 * 1024;

/// Storing failed; what was written is removed again.
#[derive(Debug)]
pub enum StoreError {
    /// A local object could not be read.
    ReadLocal { key: String, source: std::io::Error },
    /// A packaged object could not be moved into the local store, or read there.
    PlaceLocal { key: String, source: std::io::Error },
    /// The store refused or failed an upload.
    Upload { key: String, source: object_store::Error },
    /// Reading an object back failed.
    ReadBack { key: String, source: object_store::Error },
    /// An object read back differs from what was written.
    DigestMismatch {
        key: String,
        expected: String,
        found: String,
    },
    /// The manifest could not be encoded.
    Manifest { source: serde_json::Error },
    /// An object could not be deleted.
    Delete { key: String, source: object_store::Error },
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ReadLocal { key, .. } => write!(f, "cannot read the packaged object {key}"),
            Self::PlaceLocal { key, .. } => write!(f, "cannot place {key} in the local checkpoint storage"),
            Self::Upload { key, .. } => write!(f, "cannot upload {key} to the checkpoint storage"),
            Self::ReadBack { key, .. } => write!(f, "cannot read {key} back from the checkpoint storage"),
            Self::DigestMismatch { key, expected, found } => {
                write!(f, "{key} was stored as {found}, not {expected}")
            }
            Self::Manifest { .. } => write!(f, "cannot encode the manifest"),
            Self::Delete { key, .. } => write!(f, "cannot delete {key} from the checkpoint storage"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::ReadLocal { source, .. } | Self::PlaceLocal { source, .. } => Some(source),
            Self::Upload { source, .. } | Self::ReadBack { source, .. } | Self::Delete { source, .. } => Some(source),
            Self::Manifest { source } => Some(source),
            Self::DigestMismatch { .. } => None,
        }
    }
}

async fn upload(store: &Arc<dyn ObjectStore>, key: &ObjectPath, object: &LocalObject) -> Result<(), StoreError> {
    let name = object.entry.key.clone();
    let mut file = tokio::fs::File::open(&object.path)
        .await
        .map_err(|source| StoreError::ReadLocal {
            key: name.clone(),
            source,
        })?;
    let upload = store.put_multipart(key).await.map_err(|source| StoreError::Upload {
        key: name.clone(),
        source,
    })?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = match file.read(&mut buf).await {
            Ok(n) => n,
            Err(source) => {
                // An abandoned multipart upload would keep its parts in the store.
                let _ = writer.abort().await;
                return Err(StoreError::ReadLocal { key: name, source });
            }
        };
        if n == 0 {
            break;
        }
        if let Err(source) = writer.wait_for_capacity(4).await {
            let _ = writer.abort().await;
            return Err(StoreError::Upload { key: name, source });
        }
        writer.write(&buf[..n]);
    }
    writer
        .finish()
        .await
        .map_err(|source| StoreError::Upload { key: name, source })?;
    Ok(())
}

/// Reads an object back and returns its sha256.
pub async fn stored_digest(store: &Arc<dyn ObjectStore>, key: &ObjectPath) -> Result<String, object_store::Error> {
    let mut stream = store.get(key).await?.into_stream();
    let mut hash = Sha256::new();
    while let Some(chunk) = stream.next().await {
        hash.update(chunk?);
    }
    Ok(sha256_hex(hash.finalize()))
}

/// Uploads one object under `prefix` and reads it back; a failed or mismatched object
/// is removed again.
pub async fn store_object(store: &Arc<dyn ObjectStore>, prefix: &str, object: &LocalObject) -> Result<(), StoreError> {
    let key = ObjectPath::from(format!("{prefix}{}", object.entry.key));
    let result = async {
        upload(store, &key, object).await?;
        let found = stored_digest(store, &key)
            .await
            .map_err(|source| StoreError::ReadBack {
                key: object.entry.key.clone(),
                source,
            })?;
        if found != object.entry.sha256 {
            return Err(StoreError::DigestMismatch {
                key: object.entry.key.clone(),
                expected: object.entry.sha256.clone(),
                found,
            });
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = store.delete(&key).await;
    }
    result
}

/// Moves one packaged object into the local store at `root` (a rename; a copy when
/// the two directories are on different filesystems), then reads it back; a
/// mismatched object is removed again.
pub async fn place_local_object(root: &std::path::Path, prefix: &str, object: &LocalObject) -> Result<(), StoreError> {
    let key = object.entry.key.clone();
    let dest = root.join(format!("{prefix}{key}"));
    let from = object.path.clone();
    let upload = |source| StoreError::PlaceLocal {
        key: key.clone(),
        source,
    };
    let placed = {
        let dest = dest.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            // A pod's memory, unsealed when staged for a Direct transfer: for root only.
            if let Some(parent) = dest.parent() {
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
            }
            match std::fs::rename(&from, &dest) {
                Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => std::fs::copy(&from, &dest).map(|_| ()),
                other => other,
            }?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600))?;
            // Read back like any store's object: the digest of what is there now.
            let mut file = std::fs::File::open(&dest)?;
            let (mut hash, mut buf) = (Sha256::new(), vec![0u8; 1 << 20]);
            loop {
                let n = std::io::Read::read(&mut file, &mut buf)?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
            }
            Ok::<_, std::io::Error>(sha256_hex(hash.finalize()))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
    };
    let result = match placed {
        Err(source) => Err(upload(source)),
        Ok(found) if found != object.entry.sha256 => Err(StoreError::DigestMismatch {
            key: key.clone(),
            expected: object.entry.sha256.clone(),
            found,
        }),
        Ok(_) => Ok(()),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&dest);
    }
    result
}

/// Writes the manifest's signature, then the manifest under `prefix` (last: a
/// checkpoint exists only once it does), and returns the manifest's sha256.
pub async fn store_manifest(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    manifest: &Manifest,
    key: &ManifestKey,
) -> Result<String, StoreError> {
    let bytes = serde_json::to_vec_pretty(manifest).map_err(|source| StoreError::Manifest { source })?;
    let digest = sha256_hex(Sha256::digest(&bytes));
    let signature = key.sign(prefix, &bytes);
    for (name, body) in [(SIGNATURE_OBJECT, signature.into_bytes()), ("manifest.json", bytes)] {
        store
            .put(&ObjectPath::from(format!("{prefix}{name}")), PutPayload::from(body))
            .await
            .map_err(|source| StoreError::Upload {
                key: name.to_owned(),
                source,
            })?;
    }
    Ok(digest)
}

/// Uploads every object under `prefix`, verifies each, then writes the manifest and
/// returns its sha256. On failure, removes what it wrote.
pub async fn store_checkpoint(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    objects: &[LocalObject],
    manifest: &Manifest,
    key: &ManifestKey,
) -> Result<String, StoreError> {
    let mut written = Vec::new();
    let result = async {
        for object in objects {
            store_object(store, prefix, object).await?;
            written.push(ObjectPath::from(format!("{prefix}{}", object.entry.key)));
        }
        written.push(ObjectPath::from(format!("{prefix}{SIGNATURE_OBJECT}")));
        store_manifest(store, prefix, manifest, key).await
    }
    .await;
    if result.is_err() {
        for key in written.iter().rev() {
            let _ = store.delete(key).await;
        }
    }
    result
}

/// Removes a stored checkpoint: the manifest first, so a half-removed checkpoint is
/// never taken for a whole one, then every object, even when a delete failed (a
/// manifest left without its objects restores nothing: every digest is checked).
/// Missing objects are fine; the first failure is returned.
pub async fn delete_checkpoint(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    manifest: &Manifest,
) -> Result<(), StoreError> {
    let keys = ["manifest.json", SIGNATURE_OBJECT]
        .map(str::to_owned)
        .into_iter()
        .chain(manifest.objects.iter().map(|o| o.key.clone()));
    // Every key is tried, whatever failed before: a store that fails one delete may
    // take the next.
    let mut first = Ok(());
    for key in keys {
        match store.delete(&ObjectPath::from(format!("{prefix}{key}"))).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                if first.is_ok() {
                    first = Err(StoreError::Delete { key, source });
                }
            }
        }
    }
    first
}

/// Why a probe of the storage failed: a reason word and what was said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    /// `AccessDenied`, `NotFound`, `Unreachable` or `Corrupted`.
    pub reason: &'static str,
    /// The step and the store's own words.
    pub message: String,
}

/// Writes one small object under `prefix` (named `name`), reads it back and deletes
/// it: what a checkpoint does, at the smallest scale. The round trip on success.
pub async fn probe(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    name: &str,
) -> Result<std::time::Duration, ProbeFailure> {
    let started = std::time::Instant::now();
    let key = ObjectPath::from(format!("{prefix}.cryopod-probe/{name}"));
    let body = format!("cryopod storage probe {name}");
    let failed = |step: &str, e: object_store::Error| ProbeFailure {
        reason: match e {
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                "AccessDenied"
            }
            object_store::Error::NotFound { .. } => "NotFound",
            _ => "Unreachable",
        },
        message: format!("{step} {key}: {e}"),
    };
    store
        .put(&key, PutPayload::from(body.clone().into_bytes()))
        .await
        .map_err(|e| failed("cannot write", e))?;
    let read = async { store.get(&key).await?.bytes().await }.await;
    let deleted = store.delete(&key).await;
    let read = read.map_err(|e| failed("cannot read back", e))?;
    if read.as_ref() != body.as_bytes() {
        return Err(ProbeFailure {
            reason: "Corrupted",
            message: format!("{key} read back {} bytes that differ from those written", read.len()),
        });
    }
    deleted.map_err(|e| failed("cannot delete", e))?;
    Ok(started.elapsed())
}

/// Removes every object under `prefix`: the manifest first (so what remains is never
/// taken for a checkpoint), then the rest. Returns how many objects were removed.
pub async fn delete_prefix(store: &Arc<dyn ObjectStore>, prefix: &str) -> Result<u32, StoreError> {
    let listed: Vec<ObjectPath> = store
        .list(Some(&ObjectPath::from(prefix)))
        .map(|meta| meta.map(|m| m.location))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|source| StoreError::Delete {
            key: prefix.to_owned(),
            source,
        })?;
    let manifest = ObjectPath::from(format!("{prefix}manifest.json"));
    let (first, rest): (Vec<_>, Vec<_>) = listed.into_iter().partition(|k| *k == manifest);
    let mut deleted = 0;
    for key in first.into_iter().chain(rest) {
        match store.delete(&key).await {
            Ok(()) => deleted += 1,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(source) => {
                return Err(StoreError::Delete {
                    key: key.to_string(),
                    source,
                });
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use object_store::memory::InMemory;

    use super::*;
    use crate::package::{NodeFacts, ObjectEntry, PodRef};

    fn manifest(objects: Vec<ObjectEntry>) -> Manifest {
        Manifest {
            api_version: crate::package::MANIFEST_API_VERSION.into(),
            kind: crate::package::MANIFEST_KIND.into(),
            pod: PodRef {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
            },
            node: NodeFacts::default(),
            checkpointed_at: "2026-01-01T00:00:00Z".into(),
            freeze_window_millis: 1,
            containers: vec![],
            shared: vec![],
            objects,
            encryption: None,
            post_checkpoint_state: "Running".into(),
            pod_ip_connections: vec![],
            warnings: vec![],
            checkpointed_pod_template: None,
        }
    }

    fn local(dir: &std::path::Path, key: &str, data: &[u8], sha256: Option<String>) -> LocalObject {
        let path = dir.join(key.replace('/', "_"));
        std::fs::write(&path, data).unwrap();
        let entry = ObjectEntry {
            key: key.into(),
            size: data.len() as u64,
            sha256: sha256.unwrap_or_else(|| sha256_hex(Sha256::digest(data))),
            raw_size: data.len() as u64,
        };
        LocalObject { entry, path }
    }

    #[tokio::test]
    async fn a_local_store_takes_the_object_itself_and_refuses_a_changed_one() {
        let (work, root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let object = local(work.path(), "containers/a.tar.zst", b"aaaa", None);
        place_local_object(root.path(), "ns/p/u/", &object).await.unwrap();
        assert_eq!(
            std::fs::read(root.path().join("ns/p/u/containers/a.tar.zst")).unwrap(),
            b"aaaa"
        );
        assert!(!object.path.exists(), "moved, not copied");
        // What is there is not what was packaged: nothing stays.
        let wrong = local(work.path(), "pod/shm.tar.zst", b"s", Some("sha256:00".into()));
        let err = place_local_object(root.path(), "ns/p/u/", &wrong).await.unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!root.path().join("ns/p/u/pod/shm.tar.zst").exists());
    }

    #[tokio::test]
    async fn stores_verifies_and_writes_the_manifest_last() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let objects = vec![
            local(dir.path(), "containers/a.tar.zst", b"aaaa", None),
            local(dir.path(), "pod/shm.tar.zst", b"s", None),
        ];
        let m = manifest(objects.iter().map(|o| o.entry.clone()).collect());
        let key = ManifestKey::new(&[7; 32]).unwrap();
        let digest = store_checkpoint(&store, "ns/p/u/", &objects, &m, &key).await.unwrap();
        let read = |k: &'static str| {
            let store = store.clone();
            async move { store.get(&ObjectPath::from(k)).await.unwrap().bytes().await.unwrap() }
        };
        let stored = read("ns/p/u/manifest.json").await;
        assert_eq!(digest, sha256_hex(Sha256::digest(&stored)));
        let signature = read("ns/p/u/manifest.sig").await;
        assert_eq!(
            key.verify("ns/p/u/", &stored, &signature),
            Ok(()),
            "signed over its own prefix"
        );
        let back: Manifest = serde_json::from_slice(&stored).unwrap();
        assert_eq!(back, m);
    }

    #[tokio::test]
    async fn a_digest_mismatch_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let good = local(dir.path(), "a", b"aaaa", None);
        let bad = local(dir.path(), "b", b"bbbb", Some("sha256:00".into()));
        let m = manifest(vec![good.entry.clone(), bad.entry.clone()]);
        let key = ManifestKey::new(&[7; 32]).unwrap();
        let err = store_checkpoint(&store, "x/", &[good, bad], &m, &key)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        let left: Vec<_> = store.list(None).collect().await;
        assert!(left.is_empty(), "objects without a manifest are removed: {left:?}");
    }

    #[tokio::test]
    async fn a_probe_leaves_nothing_and_names_the_step_that_failed() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        probe(&store, "base/", "node-1").await.unwrap();
        let left: Vec<_> = store.list(None).collect().await;
        assert!(left.is_empty(), "{left:?}");
        // A directory where the probe object goes: it cannot be written.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".cryopod-probe/node-1")).unwrap();
        let blocked: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let failure = probe(&blocked, "", "node-1").await.unwrap_err();
        assert!(
            failure.message.starts_with("cannot write .cryopod-probe/node-1"),
            "{failure:?}"
        );
    }

    #[tokio::test]
    async fn deleting_a_prefix_removes_the_manifest_and_every_object_and_nothing_else() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        for key in [
            "ck/manifest.json",
            "ck/containers/a.tar.zst",
            "ck/pod/shm.tar.zst",
            "other/manifest.json",
        ] {
            store
                .put(&ObjectPath::from(key), PutPayload::from_static(b"x"))
                .await
                .unwrap();
        }
        assert_eq!(delete_prefix(&store, "ck/").await.unwrap(), 3);
        assert_eq!(delete_prefix(&store, "ck/").await.unwrap(), 0);
        assert!(store.get(&ObjectPath::from("other/manifest.json")).await.is_ok());
    }
}
