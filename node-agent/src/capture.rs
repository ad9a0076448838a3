//! What a pod's containers share, captured once while the pod is frozen: `/dev/shm`
//! and the emptyDir volumes, read through a container's `/proc/<pid>/root` so the
//! agent sees them whatever mount namespace it runs in; and each container's rootfs
//! changes (its overlay upper directory), with deletions as OCI whiteouts.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::discovery::RunningContainer;

/// Where kubelet keeps emptyDir volumes; the last path component is the volume name.
pub const EMPTY_DIR_MARKER: &str = "/volumes/kubernetes.io~empty-dir/";

/// A capture step failed.
#[derive(Debug)]
pub enum CaptureError {
    /// Reading the source or writing the tar failed.
    Archive {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The container's root filesystem is not an overlay with an upper directory.
    NoUpperDir { container: String },
}

impl std::fmt::Display for CaptureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Archive { what, path, .. } => write!(f, "cannot capture {what} from {}", path.display()),
            Self::NoUpperDir { container } => {
                write!(
                    f,
                    "container {container} has no overlay upper directory to take its rootfs changes from"
                )
            }
        }
    }
}

impl std::error::Error for CaptureError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Archive { source, .. } => Some(source),
            Self::NoUpperDir { .. } => None,
        }
    }
}

/// One captured piece of shared state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedState {
    /// `shm` or `volume/<name>`.
    pub name: String,
    /// Tar file written.
    pub tar: PathBuf,
}

/// Walks `root` into `builder` under relative names, in a stable order. Sockets are
/// left out (a bound unix socket is recreated by its owner's CRIU restore). With
/// `whiteouts`, overlay deletion markers (0:0 character devices) become OCI `.wh.`
/// entries and are returned as deleted paths.
fn append_tree<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    whiteouts: bool,
) -> Result<Vec<String>, (PathBuf, std::io::Error)> {
    let mut deleted = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let dir = root.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .and_then(|d| d.collect::<Result<_, _>>())
            .map_err(|e| (dir.clone(), e))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = rel.join(entry.file_name());
            let source = entry.path();
            let meta = std::fs::symlink_metadata(&source).map_err(|e| (source.clone(), e))?;
            let kind = meta.file_type();
            let special = |entry_type: tar::EntryType| {
                let mut header = tar::Header::new_gnu();
                header.set_metadata(&meta);
                header.set_entry_type(entry_type);
                header.set_size(0);
                let rdev = meta.rdev();
                let _ = header.set_device_major(((rdev >> 8) & 0xfff) as u32);
                let _ = header.set_device_minor(((rdev & 0xff) | ((rdev >> 12) & 0xfff00)) as u32);
                header
            };
            let added = if whiteouts && kind.is_char_device() && meta.rdev() == 0 {
                let name = rel.join(format!(".wh.{}", entry.file_name().to_string_lossy()));
                deleted.push(format!("/{}", path.display()));
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(0);
                header.set_mode(0);
                builder.append_data(&mut header, name, std::io::empty())
            } else if kind.is_socket() {
                continue;
            } else if kind.is_fifo() {
                builder.append_data(&mut special(tar::EntryType::Fifo), &path, std::io::empty())
            } else if kind.is_char_device() {
                builder.append_data(&mut special(tar::EntryType::Char), &path, std::io::empty())
            } else if kind.is_block_device() {
                builder.append_data(&mut special(tar::EntryType::Block), &path, std::io::empty())
            } else {
                // Directories, regular files and symlinks (not followed).
                builder.append_path_with_name(&source, &path)
            };
            added.map_err(|e| (source.clone(), e))?;
            if kind.is_dir() {
                // An opaque directory hides everything below it in the image: the OCI
                // marker comes right after the directory, before what it holds now.
                if whiteouts && is_opaque(&source) {
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(0);
                    header.set_mode(0);
                    builder
                        .append_data(&mut header, path.join(OPAQUE_MARKER), std::io::empty())
                        .map_err(|e| (source.clone(), e))?;
                }
                pending.push(path);
            }
        }
    }
    Ok(deleted)
}

/// The OCI layer entry marking a directory opaque.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Whether overlayfs marked this upper directory opaque (`trusted.` as root, `user.`
/// with the `userxattr` mount option).
fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"].iter().any(|name| {
        let mut value = [0u8; 4];
        matches!(rustix::fs::lgetxattr(dir, *name, &mut value[..]), Ok(n) if value[..n] == *b"y")
    })
}

/// Tars the tree at `source` into `out`; returns the deleted paths with `whiteouts`.
fn tar_tree(what: &str, source: &Path, out: &Path, whiteouts: bool) -> Result<Vec<String>, CaptureError> {
    let err = |(path, source): (PathBuf, std::io::Error)| CaptureError::Archive {
        what: what.to_owned(),
        path,
        source,
    };
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| err((parent.to_path_buf(), e)))?;
    }
    let file = File::create(out).map_err(|e| err((out.to_path_buf(), e)))?;
    let mut builder = tar::Builder::new(file);
    builder.follow_symlinks(false);
    let deleted = append_tree(&mut builder, source, whiteouts).map_err(err)?;
    builder
        .into_inner()
        .and_then(|f| f.sync_all())
        .map_err(|e| err((out.to_path_buf(), e)))?;
    Ok(deleted)
}

/// Captures `/dev/shm` and every emptyDir once, into `<out>/pod/`.
pub fn capture_shared_state(containers: &[RunningContainer], out: &Path) -> Result<Vec<SharedState>, CaptureError> {
    let mut seen = BTreeSet::new();
    let mut captured = Vec::new();
    for container in containers {
        let root = PathBuf::from(format!("/proc/{}/root", container.pid));
        for mount in &container.mounts {
            let name = if mount.destination == "/dev/shm" {
                "shm".to_owned()
            } else if let Some((_, volume)) = mount.source.split_once(EMPTY_DIR_MARKER) {
                format!("volume/{}", volume.trim_end_matches('/'))
            } else {
                continue;
            };
            // Shared by several containers, captured once.
            if !seen.insert(name.clone()) {
                continue;
            }
            let tar = out.join("pod").join(format!("{name}.tar"));
            tar_tree(
                &name,
                &root.join(mount.destination.trim_start_matches('/')),
                &tar,
                false,
            )?;
            captured.push(SharedState { name, tar });
        }
    }
    Ok(captured)
}

/// The upper directory of the overlay mounted at `/` in a process's mount namespace.
pub fn overlay_upper_dir(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        let mut right = right.split_whitespace();
        let (fs_type, _source, options) = (right.next()?, right.next()?, right.next()?);
        if mount_point != "/" || fs_type != "overlay" {
            return None;
        }
        options
            .split(',')
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from)
    })
}

/// A container's rootfs changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsDiff {
    /// `rootfs-diff.tar`: changed files, deletions as `.wh.<name>` entries.
    pub tar: PathBuf,
    /// Deleted paths, for `deleted.files`.
    pub deleted: Vec<String>,
}

/// Tars a container's overlay upper directory into `out`. The upper directory's
/// path is the runtime's; `node_root` is where the runtime's root is seen from here
/// (`/`, or `/proc/<runtime pid>/root` when the agent runs in a container).
pub fn rootfs_diff(container: &RunningContainer, node_root: &Path, out: &Path) -> Result<RootfsDiff, CaptureError> {
    let mountinfo_path = PathBuf::from(format!("/proc/{}/mountinfo", container.pid));
    let mountinfo = std::fs::read_to_string(&mountinfo_path).map_err(|source| CaptureError::Archive {
        what: format!("the mounts of container {}", container.name),
        path: mountinfo_path.clone(),
        source,
    })?;
    let upper = overlay_upper_dir(&mountinfo).ok_or_else(|| CaptureError::NoUpperDir {
        container: container.name.clone(),
    })?;
    let what = format!("the rootfs changes of container {}", container.name);
    let upper = node_root.join(upper.strip_prefix("/").unwrap_or(&upper));
    let deleted = tar_tree(&what, &upper, out, true)?;
    Ok(RootfsDiff {
        tar: out.to_path_buf(),
        deleted,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn trees_keep_fifos_and_links_and_skip_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/file"), b"data").unwrap();
        std::os::unix::fs::symlink("sub/file", src.join("link")).unwrap();
        assert!(
            std::process::Command::new("mkfifo")
                .arg(src.join("pipe"))
                .status()
                .unwrap()
                .success()
        );
        let _socket = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
        let out = dir.path().join("out.tar");
        assert!(tar_tree("test", &src, &out, false).unwrap().is_empty());
        let bytes = std::fs::read(&out).unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut kinds: Vec<(String, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.header().entry_type())
            })
            .collect();
        kinds.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            kinds,
            vec![
                ("link".into(), tar::EntryType::Symlink),
                ("pipe".into(), tar::EntryType::Fifo),
                ("sub".into(), tar::EntryType::Directory),
                ("sub/file".into(), tar::EntryType::Regular),
            ]
        );
    }

    #[test]
    fn opaque_directories_get_the_oci_marker_before_their_contents() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(upper.join("etc/app")).unwrap();
        std::fs::write(upper.join("etc/app/new.conf"), b"x").unwrap();
        // What overlayfs does when a directory of the image is removed and made anew.
        rustix::fs::setxattr(
            upper.join("etc/app").as_path(),
            "trusted.overlay.opaque",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let out = dir.path().join("diff.tar");
        assert!(tar_tree("test", &upper, &out, true).unwrap().is_empty());
        let bytes = std::fs::read(&out).unwrap();
        let names: Vec<String> = tar::Archive::new(bytes.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["etc", "etc/app", "etc/app/.wh..wh..opq", "etc/app/new.conf"]);
    }

    #[test]
    fn finds_the_root_overlay_upper_dir() {
        let mountinfo = "\
1 0 0:1 / / rw - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/snap/5/fs,workdir=/snap/5/work
2 1 0:2 / /proc rw - proc proc rw
";
        assert_eq!(overlay_upper_dir(mountinfo), Some(PathBuf::from("/snap/5/fs")));
        assert_eq!(overlay_upper_dir("2 1 0:2 / /proc rw - proc proc rw\n"), None);
    }
}
