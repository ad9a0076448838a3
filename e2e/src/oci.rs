//! Builds OCI image archives without a registry or a container engine: one
//! uncompressed, reproducible layer from host files, a config and an `index.json`
//! naming the image, which `ctr images import` reads.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

/// What goes into an image.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// Full reference, e.g. `registry.k8s.io/pause:3.10`.
    pub name: String,
    /// Host files copied in: (host path, path in the image).
    pub files: Vec<(PathBuf, String)>,
    /// Symbolic links: (path in the image, target).
    pub symlinks: Vec<(String, String)>,
    /// Empty directories (mode 1777, like /tmp).
    pub dirs: Vec<String>,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Default arguments.
    pub cmd: Vec<String>,
    /// Environment, `KEY=value`.
    pub env: Vec<String>,
}

/// Building an image failed.
#[derive(Debug)]
pub enum OciError {
    /// A host file could not be read.
    ReadFile { path: PathBuf, source: std::io::Error },
    /// The layer could not be assembled.
    Layer { source: std::io::Error },
    /// The archive could not be written.
    WriteArchive { path: PathBuf, source: std::io::Error },
}

impl std::fmt::Display for OciError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ReadFile { path, .. } => write!(f, "cannot read {}", path.display()),
            Self::Layer { .. } => write!(f, "cannot assemble the image layer"),
            Self::WriteArchive { path, .. } => write!(f, "cannot write the image archive {}", path.display()),
        }
    }
}

impl std::error::Error for OciError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::ReadFile { source, .. } | Self::Layer { source } | Self::WriteArchive { source, .. } => Some(source),
        }
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in hash.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    // A fixed time keeps layers (and so image digests) reproducible.
    h.set_mtime(0);
    h
}

fn in_image(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// The layer tar: parent directories first, then directories, files and links, each
/// sorted, so the same spec always gives the same bytes.
pub fn build_layer(spec: &ImageSpec) -> Result<Vec<u8>, OciError> {
    let mut parents = std::collections::BTreeSet::new();
    let all_paths = spec
        .files
        .iter()
        .map(|(_, p)| p.as_str())
        .chain(spec.symlinks.iter().map(|(p, _)| p.as_str()))
        .chain(spec.dirs.iter().map(String::as_str));
    for path in all_paths {
        let mut p = Path::new(in_image(path)).parent();
        while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
            parents.insert(dir.to_path_buf());
            p = dir.parent();
        }
    }
    let mut builder = tar::Builder::new(Vec::new());
    let layer = |e| OciError::Layer { source: e };
    for dir in &parents {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        builder.append_data(&mut h, dir, std::io::empty()).map_err(layer)?;
    }
    let mut dirs = spec.dirs.clone();
    dirs.sort();
    for dir in &dirs {
        let mut h = header(tar::EntryType::Directory, 0o1777, 0);
        builder
            .append_data(&mut h, in_image(dir), std::io::empty())
            .map_err(layer)?;
    }
    let mut files = spec.files.clone();
    files.sort_by(|a, b| a.1.cmp(&b.1));
    for (src, dest) in &files {
        let data = std::fs::read(src).map_err(|source| OciError::ReadFile {
            path: src.clone(),
            source,
        })?;
        let mut h = header(tar::EntryType::Regular, 0o755, data.len() as u64);
        builder
            .append_data(&mut h, in_image(dest), data.as_slice())
            .map_err(layer)?;
    }
    let mut links = spec.symlinks.clone();
    links.sort();
    for (link, target) in &links {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        builder.append_link(&mut h, in_image(link), target).map_err(layer)?;
    }
    builder.into_inner().map_err(layer)
}

/// Writes the image as an OCI layout tar archive and returns the manifest digest.
pub fn write_archive(spec: &ImageSpec, out: &Path) -> Result<String, OciError> {
    let layer = build_layer(spec)?;
    let layer_digest = sha256_digest(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint,
            "Cmd": spec.cmd,
            "Env": spec.env,
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .map_err(|e| OciError::Layer { source: e.into() })?;
    let config_digest = sha256_digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .map_err(|e| OciError::Layer { source: e.into() })?;
    let manifest_digest = sha256_digest(&manifest);
    let tag = spec.name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": spec.name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .map_err(|e| OciError::Layer { source: e.into() })?;

    let write = |source| OciError::WriteArchive {
        path: out.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(out).map_err(write)?;
    let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        archive.append_data(&mut h, name, data)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(write)?;
    add("index.json", &index).map_err(write)?;
    for (digest, data) in [
        (&manifest_digest, &manifest),
        (&config_digest, &config),
        (&layer_digest, &layer),
    ] {
        add(&format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")), data).map_err(write)?;
    }
    archive.into_inner().map_err(write)?.flush().map_err(write)?;
    Ok(manifest_digest)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(dir: &Path) -> ImageSpec {
        let file = dir.join("hello");
        std::fs::write(&file, b"#!/bin/true\n").unwrap();
        ImageSpec {
            name: "cryopod.local/test:1".into(),
            files: vec![(file, "/bin/hello".into())],
            symlinks: vec![("/bin/hi".into(), "hello".into())],
            dirs: vec!["/tmp".into()],
            entrypoint: vec!["/bin/hello".into()],
            ..Default::default()
        }
    }

    #[test]
    fn layers_are_reproducible_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let a = build_layer(&spec).unwrap();
        assert_eq!(a, build_layer(&spec).unwrap());
        let mut names = Vec::new();
        for entry in tar::Archive::new(a.as_slice()).entries().unwrap() {
            let entry = entry.unwrap();
            names.push((
                entry.path().unwrap().display().to_string(),
                entry.header().mode().unwrap(),
            ));
        }
        assert_eq!(
            names,
            vec![
                ("bin".into(), 0o755),
                ("tmp".into(), 0o1777),
                ("bin/hello".into(), 0o755),
                ("bin/hi".into(), 0o777)
            ]
        );
    }

    #[test]
    fn archive_blobs_match_their_digests() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("image.tar");
        let manifest_digest = write_archive(&spec(dir.path()), &out).unwrap();
        let mut archive = tar::Archive::new(std::fs::File::open(&out).unwrap());
        let mut blobs = 0;
        let mut index = None;
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                assert_eq!(sha256_digest(&data), format!("sha256:{hex}"));
                blobs += 1;
            } else if path == "index.json" {
                index = Some(serde_json::from_slice::<serde_json::Value>(&data).unwrap());
            }
        }
        assert_eq!(blobs, 3);
        let index = index.unwrap();
        assert_eq!(index["manifests"][0]["digest"], manifest_digest.as_str());
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "cryopod.local/test:1"
        );
    }
}
