//! Packaging a dumped pod: one archive per container in the Kubernetes checkpoint
//! archive layout (`checkpoint/`, `config.dump`, `spec.dump`, `rootfs-diff.tar`,
//! `deleted.files`, `dump.log`), so `checkpointctl show` reads it once decompressed;
//! the shared state as tars; everything zstd-compressed and hashed as it is written.
//! The manifest lists every object with its size and sha256.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::discovery::RunningContainer;

/// Version of the manifest format.
pub const MANIFEST_API_VERSION: &str = "cryopod.io/v1alpha1";
/// Kind of the manifest document.
pub const MANIFEST_KIND: &str = "PodCheckpointManifest";

/// A packaging step failed.
#[derive(Debug)]
pub enum PackageError {
    /// Writing an archive failed.
    Write { object: String, source: io::Error },
    /// A piece of the dump could not be read.
    Read {
        object: String,
        path: PathBuf,
        source: io::Error,
    },
}

impl std::fmt::Display for PackageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Write { object, .. } => write!(f, "cannot write the archive {object}"),
            Self::Read { object, path, .. } => write!(f, "cannot read {} for the archive {object}", path.display()),
        }
    }
}

impl std::error::Error for PackageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Write { source, .. } | Self::Read { source, .. } => Some(source),
        }
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: impl AsRef<[u8]>) -> String {
    bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:<hex>`.
pub fn sha256_hex(digest: impl AsRef<[u8]>) -> String {
    format!("sha256:{}", hex(digest))
}

/// Hashes and counts what passes through to the inner writer.
#[derive(Debug)]
struct Tally<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Tally<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts what passes through: the size before compression, which nothing hashes.
#[derive(Debug)]
struct Count<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Count<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// An object ready to upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectEntry {
    /// Key relative to the checkpoint's prefix.
    pub key: String,
    /// Stored (compressed) size.
    pub size: u64,
    /// sha256 of the stored bytes.
    pub sha256: String,
    /// Size before compression.
    pub raw_size: u64,
}

/// A packaged object on local disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalObject {
    /// What the manifest says of it.
    pub entry: ObjectEntry,
    /// Where it is.
    pub path: PathBuf,
}

/// zstd's level unless a request asks another: a good ratio at a few hundred MB/s.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// How stored objects are sealed.
#[derive(Clone, Default)]
pub enum Seal {
    /// Compressed only.
    #[default]
    Clear,
    /// Compressed, then encrypted with age to these X25519 recipients.
    Age(Vec<age::x25519::Recipient>),
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Clear => write!(f, "Clear"),
            Self::Age(recipients) => write!(f, "Age({} recipients)", recipients.len()),
        }
    }
}

impl Seal {
    /// Parses age public keys, one a line (`#` comments and blank lines skipped);
    /// the error names the line.
    pub fn age_from_lines(text: &str) -> Result<Self, String> {
        let mut recipients = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            recipients.push(
                line.parse::<age::x25519::Recipient>()
                    .map_err(|e| format!("line {} is not an age X25519 public key: {e}", n + 1))?,
            );
        }
        if recipients.is_empty() {
            return Err("no age public key".to_owned());
        }
        Ok(Self::Age(recipients))
    }

    /// What the manifest records.
    pub fn manifest_entry(&self) -> Option<Encryption> {
        match self {
            Self::Clear => None,
            Self::Age(recipients) => Some(Encryption {
                scheme: AGE_SCHEME.to_owned(),
                recipients: recipients.iter().map(ToString::to_string).collect(),
            }),
        }
    }
}

/// The `encryption.scheme` of age-encrypted checkpoints.
pub const AGE_SCHEME: &str = "age-x25519";

/// How a checkpoint's objects are encrypted (the manifest itself stays readable, so
/// digests verify before anything is decrypted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Encryption {
    /// [`AGE_SCHEME`].
    pub scheme: String,
    /// The recipients' public keys.
    pub recipients: Vec<String>,
}

type StoredFile = Tally<io::BufWriter<File>>;

/// The stored end of the chain: the file, or age in front of it.
enum Sink {
    Clear(StoredFile),
    Age(age::stream::StreamWriter<StoredFile>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Clear(w) => w.write(buf),
            Self::Age(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Clear(w) => w.flush(),
            Self::Age(w) => w.flush(),
        }
    }
}

impl Sink {
    fn finish(self) -> io::Result<StoredFile> {
        match self {
            Self::Clear(w) => Ok(w),
            Self::Age(w) => w.finish(),
        }
    }
}

/// Writes a tar stream through zstd (and age, when sealed) into `dir/key`, hashing
/// the stored bytes.
fn write_object(
    dir: &Path,
    key: &str,
    (seal, level): (&Seal, i32),
    fill: impl FnOnce(&mut tar::Builder<&mut dyn Write>) -> Result<(), PackageError>,
) -> Result<LocalObject, PackageError> {
    let werr = |source| PackageError::Write {
        object: key.to_owned(),
        source,
    };
    let path = dir.join(key);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(werr)?;
    }
    let file = File::create(&path).map_err(werr)?;
    let stored = Tally {
        inner: io::BufWriter::new(file),
        hash: Sha256::new(),
        bytes: 0,
    };
    let sink = match seal {
        Seal::Clear => Sink::Clear(stored),
        Seal::Age(recipients) => {
            let encryptor = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| werr(io::Error::other(e.to_string())))?;
            Sink::Age(encryptor.wrap_output(stored).map_err(werr)?)
        }
    };
    let encoder = zstd::Encoder::new(sink, level).map_err(werr)?;
    let mut raw = Count {
        inner: encoder,
        bytes: 0,
    };
    {
        let writer: &mut dyn Write = &mut raw;
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        fill(&mut builder)?;
        builder.finish().map_err(werr)?;
    }
    let raw_size = raw.bytes;
    let mut stored = raw.inner.finish().map_err(werr)?.finish().map_err(werr)?;
    stored.flush().map_err(werr)?;
    // Not synced to disk: the file is staging, read back at once for the upload, and
    // an agent that dies before the upload fails the whole operation anyway.
    stored.inner.into_inner().map_err(|e| werr(e.into_error()))?;
    Ok(LocalObject {
        entry: ObjectEntry {
            key: key.to_owned(),
            size: stored.bytes,
            sha256: sha256_hex(stored.hash.finalize()),
            raw_size,
        },
        path,
    })
}

fn add_bytes(
    builder: &mut tar::Builder<&mut dyn Write>,
    object: &str,
    name: &str,
    data: &[u8],
) -> Result<(), PackageError> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o600);
    builder
        .append_data(&mut header, name, data)
        .map_err(|source| PackageError::Write {
            object: object.to_owned(),
            source,
        })
}

/// What goes into one container's archive.
#[derive(Debug)]
pub struct ContainerParts<'a> {
    /// The container.
    pub container: &'a RunningContainer,
    /// CRIU images.
    pub images: &'a Path,
    /// CRIU's work directory (holds `dump.log`).
    pub work: &'a Path,
    /// `rootfs-diff.tar`.
    pub rootfs_diff: &'a Path,
    /// Deleted paths.
    pub deleted: &'a [String],
    /// Runtime name for `config.dump`.
    pub runtime: &'a str,
    /// When the pod was frozen, RFC 3339.
    pub checkpointed_at: &'a str,
}

/// Writes `containers/<name>.tar.zst` in the checkpoint archive layout.
pub fn write_container_archive(
    dir: &Path,
    seal: (&Seal, i32),
    parts: &ContainerParts<'_>,
) -> Result<LocalObject, PackageError> {
    let c = parts.container;
    let key = format!("containers/{}.tar.zst", c.name);
    let object = key.clone();
    let rerr = |path: &Path| {
        let (object, path) = (object.clone(), path.to_path_buf());
        move |source| PackageError::Read { object, path, source }
    };
    write_object(dir, &key, seal, |b| {
        let config = serde_json::json!({
            "id": c.id,
            "name": c.name,
            "rootfsImage": c.image,
            "rootfsImageRef": c.image_ref,
            "rootfsImageName": c.image,
            "runtime": parts.runtime,
            "createdTime": crate::package::rfc3339_from_nanos(c.created_at),
            "checkpointedTime": parts.checkpointed_at,
            "restoredTime": "0001-01-01T00:00:00Z",
            "restored": false,
        });
        let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).unwrap_or_default();
        add_bytes(b, &object, "config.dump", &json(&config))?;
        add_bytes(b, &object, "spec.dump", &json(&c.spec))?;
        add_bytes(b, &object, "deleted.files", &json(&serde_json::json!(parts.deleted)))?;
        b.append_dir_all("checkpoint", parts.images)
            .map_err(rerr(parts.images))?;
        b.append_path_with_name(parts.rootfs_diff, "rootfs-diff.tar")
            .map_err(rerr(parts.rootfs_diff))?;
        let log = parts.work.join("dump.log");
        if log.exists() {
            b.append_path_with_name(&log, "dump.log").map_err(rerr(&log))?;
        }
        let stats = parts.images.join("stats-dump");
        if stats.exists() {
            b.append_path_with_name(&stats, "stats-dump").map_err(rerr(&stats))?;
        }
        Ok(())
    })
}

/// Writes `pod/<name>.tar.zst` from a captured tar, unchanged inside.
pub fn write_shared_state(dir: &Path, seal: (&Seal, i32), name: &str, tar: &Path) -> Result<LocalObject, PackageError> {
    let key = format!("pod/{name}.tar.zst");
    let object = key.clone();
    write_object(dir, &key, seal, |b| {
        // The captured tar is stored as the archive's only member, `<name>.tar`.
        let file_name = format!("{}.tar", name.rsplit('/').next().unwrap_or(name));
        b.append_path_with_name(tar, file_name)
            .map_err(|source| PackageError::Read {
                object,
                path: tar.to_path_buf(),
                source,
            })
    })
}

/// Days-from-civil conversion, so timestamps need no date library.
pub fn rfc3339_from_nanos(nanos: i64) -> String {
    let secs = nanos.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// The pod a manifest describes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

/// Facts of the node that took the checkpoint, for the restore side's compatibility check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeFacts {
    /// Node name.
    pub name: String,
    /// `uname -r`.
    pub kernel: String,
    /// `criu --version`.
    pub criu_version: String,
    /// `V1` or `V2`.
    pub cgroup_version: String,
    /// CPU feature flags.
    pub cpu_flags: Vec<String>,
}

/// One container in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestContainer {
    /// Name.
    pub name: String,
    /// Image as in the pod spec.
    pub image: String,
    /// Image digest.
    pub image_ref: String,
    /// Key of its archive.
    pub archive: String,
}

/// The manifest, written last: a checkpoint exists only once it does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// [`MANIFEST_API_VERSION`].
    pub api_version: String,
    /// [`MANIFEST_KIND`].
    pub kind: String,
    /// The pod.
    pub pod: PodRef,
    /// The node.
    pub node: NodeFacts,
    /// When the pod was frozen, RFC 3339.
    pub checkpointed_at: String,
    /// From freeze to thaw, in milliseconds.
    pub freeze_window_millis: u64,
    /// Containers in pod order.
    pub containers: Vec<ManifestContainer>,
    /// Keys of the shared-state objects (`pod/shm.tar.zst`, `pod/volume/<name>.tar.zst`).
    pub shared: Vec<String>,
    /// Every object with its size and digest.
    pub objects: Vec<ObjectEntry>,
    /// How the objects are encrypted; absent when they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// What happened to the pod after the dump: `Running` or `Stopped`.
    #[serde(default = "running")]
    pub post_checkpoint_state: String,
    /// Established TCP connections bound to the pod IP when it was frozen; a
    /// restore brings them back closed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_ip_connections: Vec<String>,
    /// Ignored hook failures and similar notes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The pod as checkpointed, sanitized (a `PodTemplateSpec`), when the caller
    /// gave it; a restore creates its pod from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointed_pod_template: Option<serde_json::Value>,
}

fn running() -> String {
    "Running".to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Read;

    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339_from_nanos(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_from_nanos(1_795_945_548_380_470_728), "2026-11-29T09:45:48Z");
        assert_eq!(rfc3339_from_nanos(951_782_400_000_000_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn objects_hash_what_is_stored_and_decompress_to_the_tar() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("state.tar");
        std::fs::write(&src, b"not really a tar").unwrap();
        let object = write_shared_state(dir.path(), (&Seal::Clear, DEFAULT_ZSTD_LEVEL), "shm", &src).unwrap();
        let stored = std::fs::read(&object.path).unwrap();
        assert_eq!(object.entry.size, stored.len() as u64);
        assert_eq!(object.entry.sha256, sha256_hex(Sha256::digest(&stored)));
        let mut raw = Vec::new();
        zstd::Decoder::new(stored.as_slice())
            .unwrap()
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(object.entry.raw_size, raw.len() as u64);
        let mut archive = tar::Archive::new(raw.as_slice());
        let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(entry.path().unwrap().to_str(), Some("shm.tar"));
        let mut body = Vec::new();
        entry.read_to_end(&mut body).unwrap();
        assert_eq!(body, b"not really a tar");
    }

    #[test]
    fn sealed_objects_decrypt_with_the_identity_and_hash_the_ciphertext() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("state.tar");
        std::fs::write(&src, b"secret state").unwrap();
        let identity = age::x25519::Identity::generate();
        let seal = Seal::age_from_lines(&format!("# the operator's key\n{}\n", identity.to_public())).unwrap();
        let object = write_shared_state(dir.path(), (&seal, DEFAULT_ZSTD_LEVEL), "shm", &src).unwrap();
        let stored = std::fs::read(&object.path).unwrap();
        assert!(stored.starts_with(b"age-encryption.org/v1"), "an age file");
        assert_eq!(object.entry.sha256, sha256_hex(Sha256::digest(&stored)));
        let decryptor = age::Decryptor::new(stored.as_slice()).unwrap();
        let mut plain = decryptor
            .decrypt(std::iter::once(&identity as &dyn age::Identity))
            .unwrap();
        let mut compressed = Vec::new();
        plain.read_to_end(&mut compressed).unwrap();
        let raw = zstd::decode_all(compressed.as_slice()).unwrap();
        assert_eq!(object.entry.raw_size, raw.len() as u64);
        assert!(raw.windows(12).any(|w| w == b"secret state"));
        assert_eq!(
            seal.manifest_entry().unwrap().recipients,
            vec![identity.to_public().to_string()]
        );
    }

    #[test]
    fn bad_recipients_name_the_line() {
        let err = Seal::age_from_lines("\n# keys\nage1notakey\n").unwrap_err();
        assert!(err.starts_with("line 3 is not an age X25519 public key"), "{err}");
        assert_eq!(Seal::age_from_lines("# none\n").unwrap_err(), "no age public key");
    }
}
