//! What a pod's containers share, captured once while the pod is frozen: `/dev/shm`
//! and the emptyDir volumes, read through a container's `/proc/<pid>/root` so the
//! agent sees them whatever mount namespace it runs in; and each container's rootfs
//! changes (its overlay upper directory), with deletions as OCI whiteouts.
//!
//! Everything below those roots belongs to the tenant. A mount destination is resolved
//! inside the container's root (`RESOLVE_IN_ROOT`), as runc resolved it when mounting,
//! so an image's `x -> /` cannot point the agent at its own files; the walk below is fd
//! by fd and never follows a symlink (symlinks are archived as symlinks).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};

use crate::discovery::RunningContainer;
use crate::safe_fs;

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
    /// A mount's destination cannot be resolved inside the container's root.
    Resolve {
        container: String,
        mount: String,
        source: std::io::Error,
    },
    /// The container's root filesystem is not an overlay with an upper directory.
    NoUpperDir { container: String },
}

impl std::fmt::Display for CaptureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Archive { what, path, .. } => write!(f, "cannot capture {what} from {}", path.display()),
            // The cause is the point here (what the tenant did), so it is said.
            Self::Resolve {
                container,
                mount,
                source,
            } => write!(f, "mount {mount} of container {container} refused: {source}"),
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
            Self::Archive { source, .. } | Self::Resolve { source, .. } => Some(source),
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

/// A tar header for `st`, with its owner, mode and time.
fn header_for(st: &Stat, kind: tar::EntryType) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(st.st_mode & 0o7777);
    header.set_uid(st.st_uid.into());
    header.set_gid(st.st_gid.into());
    header.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    header.set_size(match kind {
        tar::EntryType::Regular => u64::try_from(st.st_size).unwrap_or(0),
        _ => 0,
    });
    if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
        let _ = header.set_device_major(rustix::fs::major(st.st_rdev));
        let _ = header.set_device_minor(rustix::fs::minor(st.st_rdev));
    }
    header
}

/// The carried xattrs of `fd` as a pax header before the entry (`SCHILY.xattr.*`,
/// which the unpack reads back).
fn append_xattrs<W: std::io::Write>(builder: &mut tar::Builder<W>, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let xattrs = safe_fs::read_xattrs(fd)?;
    let keyed: Vec<(String, &[u8])> = xattrs
        .iter()
        .filter_map(|(name, value)| Some((format!("{}{}", safe_fs::PAX_XATTR, name.to_str()?), value.as_slice())))
        .collect();
    builder.append_pax_extensions(keyed.iter().map(|(k, v)| (k.as_str(), *v)))
}

/// Walks the directory `root` into `builder` under relative names, in a stable order,
/// opening every directory below `root` without following symlinks. Sockets are left
/// out (a bound unix socket is recreated by its owner's CRIU restore). With
/// `whiteouts`, overlay deletion markers (0:0 character devices) become OCI `.wh.`
/// entries and are returned as deleted paths.
fn append_tree<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    root: BorrowedFd<'_>,
    whiteouts: bool,
) -> Result<Vec<String>, (PathBuf, std::io::Error)> {
    let mut deleted = Vec::new();
    let mut pending = vec![PathBuf::new()];
    let volume = mount_id(root, OsStr::new("")).map_err(|e| (PathBuf::new(), e))?;
    while let Some(rel) = pending.pop() {
        let dir = safe_fs::open_dir_beneath(root, &rel).map_err(|e| (rel.clone(), e))?;
        let names = safe_fs::list_dir(dir.as_fd()).map_err(|e| (rel.clone(), e))?;
        for name in names {
            let path = rel.join(&name);
            let at = |e: std::io::Error| (path.clone(), e);
            // Another mount inside the volume (a Secret, a ConfigMap file, a PVC) is
            // not the volume's: it is not captured.
            if mount_id(dir.as_fd(), &name).map_err(at)? != volume {
                continue;
            }
            let st = rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| at(e.into()))?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::CharacterDevice if whiteouts && st.st_rdev == 0 => {
                    // From the name's bytes: a lossy name would delete another file.
                    let mut wh = std::ffi::OsString::from(".wh.");
                    wh.push(&name);
                    let marker = rel.join(wh);
                    deleted.push(format!("/{}", path.display()));
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(0);
                    header.set_mode(0);
                    builder.append_data(&mut header, marker, std::io::empty()).map_err(at)?;
                }
                FileType::Socket | FileType::Unknown => {}
                // A restore refuses device nodes: refused here, before anything is
                // stopped for a checkpoint that could never come back.
                FileType::CharacterDevice | FileType::BlockDevice => {
                    return Err(at(std::io::Error::other(
                        "a device node cannot be checkpointed (a restore would refuse it)",
                    )));
                }
                FileType::Fifo => {
                    builder
                        .append_data(&mut header_for(&st, tar::EntryType::Fifo), &path, std::io::empty())
                        .map_err(at)?;
                }
                FileType::Symlink => {
                    let target = rustix::fs::readlinkat(&dir, &name, Vec::new()).map_err(|e| at(e.into()))?;
                    let target = Path::new(OsStr::from_bytes(target.as_bytes()));
                    builder
                        .append_link(&mut header_for(&st, tar::EntryType::Symlink), &path, target)
                        .map_err(at)?;
                }
                FileType::RegularFile => {
                    // NONBLOCK: a fifo swapped in since the stat must not hang the capture.
                    let fd = rustix::fs::openat(
                        &dir,
                        &name,
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| at(e.into()))?;
                    let st = rustix::fs::fstat(&fd).map_err(|e| at(e.into()))?;
                    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                        return Err(at(std::io::Error::other("replaced while the pod was frozen")));
                    }
                    append_xattrs(builder, fd.as_fd()).map_err(at)?;
                    let mut header = header_for(&st, tar::EntryType::Regular);
                    let size = header.size().unwrap_or(0);
                    let file = File::from(fd);
                    let exact = Exact {
                        inner: (&file).take(size),
                        left: size,
                    };
                    builder.append_data(&mut header, &path, exact).map_err(at)?;
                }
                FileType::Directory => {
                    let fd = safe_fs::open_dir_beneath(dir.as_fd(), Path::new(&name)).map_err(at)?;
                    let st = rustix::fs::fstat(&fd).map_err(|e| at(e.into()))?;
                    append_xattrs(builder, fd.as_fd()).map_err(at)?;
                    builder
                        .append_data(&mut header_for(&st, tar::EntryType::Directory), &path, std::io::empty())
                        .map_err(at)?;
                    // An opaque directory hides everything below it in the image: the OCI
                    // marker comes right after the directory, before what it holds now.
                    if whiteouts && is_opaque(fd.as_fd()) {
                        let mut header = tar::Header::new_gnu();
                        header.set_entry_type(tar::EntryType::Regular);
                        header.set_size(0);
                        header.set_mode(0);
                        builder
                            .append_data(&mut header, path.join(OPAQUE_MARKER), std::io::empty())
                            .map_err(at)?;
                    }
                    pending.push(path);
                }
            }
        }
    }
    Ok(deleted)
}

/// The mount an entry of `dir` is on (`""`: `dir` itself).
fn mount_id(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<u64> {
    let flags = if name.is_empty() {
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW
    } else {
        AtFlags::SYMLINK_NOFOLLOW
    };
    let stx = rustix::fs::statx(dir, name, flags, rustix::fs::StatxFlags::MNT_ID)?;
    if stx.stx_mask & rustix::fs::StatxFlags::MNT_ID.bits() == 0 {
        // Before Linux 5.8: the file system's device stands in (it tells a Secret's
        // tmpfs from the volume's disk, not two bind mounts of one disk).
        return Ok(1 << 63 | u64::from(stx.stx_dev_major) << 32 | u64::from(stx.stx_dev_minor));
    }
    Ok(stx.stx_mnt_id)
}

/// A file's bytes, exactly as many as its header says: a file that shrank since its
/// stat fails instead of padding the archive with what follows.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file shrank while it was read ({} bytes missing)", self.left),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// The id of the mount whose mount point is `destination` in a process's mountinfo
/// (the last one, which is on top), mount points unescaped.
pub fn mount_id_at(mountinfo: &str, destination: &str) -> Option<u64> {
    let unescape = |field: &str| {
        let mut out = Vec::with_capacity(field.len());
        let bytes = field.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let octal = bytes
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(std::str::from_utf8(o).ok()?, 8).ok());
            match (bytes[i], octal) {
                (b'\\', Some(byte)) => {
                    out.push(byte);
                    i += 4;
                }
                (byte, _) => {
                    out.push(byte);
                    i += 1;
                }
            }
        }
        out
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let id = fields.next()?.parse().ok()?;
            let point = fields.nth(3)?;
            (unescape(point) == destination.as_bytes()).then_some(id)
        })
        .next_back()
}

/// The OCI layer entry marking a directory opaque.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Whether overlayfs marked this upper directory opaque (`trusted.` as root, `user.`
/// with the `userxattr` mount option).
fn is_opaque(dir: BorrowedFd<'_>) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"].iter().any(|name| {
        let mut value = [0u8; 4];
        matches!(rustix::fs::fgetxattr(dir, *name, &mut value[..]), Ok(n) if value[..n] == *b"y")
    })
}

/// Tars the directory open at `source` (shown as `shown` in errors) into `out`;
/// returns the deleted paths with `whiteouts`.
fn tar_tree(
    what: &str,
    source: BorrowedFd<'_>,
    shown: &Path,
    out: &Path,
    whiteouts: bool,
) -> Result<Vec<String>, CaptureError> {
    let err = |(path, source): (PathBuf, std::io::Error)| CaptureError::Archive {
        what: what.to_owned(),
        path,
        source,
    };
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| err((parent.to_path_buf(), e)))?;
    }
    let file = File::create(out).map_err(|e| err((out.to_path_buf(), e)))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    let deleted = append_tree(&mut builder, source, whiteouts).map_err(|(path, e)| err((shown.join(path), e)))?;
    builder
        .into_inner()
        .and_then(|w| w.into_inner().map_err(std::io::IntoInnerError::into_error))
        .and_then(|f| f.sync_all())
        .map_err(|e| err((out.to_path_buf(), e)))?;
    Ok(deleted)
}

/// How to know the volume found at a mount's destination is the one the runtime
/// mounted there: either will do.
#[derive(Clone, Copy)]
struct Expected<'a> {
    /// The volume's directory on the node (device, inode): a bind mount shows the
    /// same inode, however the destination was spelled.
    inode: Option<(u64, u64)>,
    /// The container's mountinfo: the mount listed at the destination (where the
    /// node's side is hidden from the runtime's view, e.g. a kubelet tmpfs). Read only
    /// when the inode does not decide: the pod is frozen meanwhile.
    mountinfo: &'a dyn Fn() -> Option<String>,
}

/// Tars the directory at `destination` as seen inside the container of process
/// `pid` into `out`; `source` is the volume's path on the node, seen from `node_root`.
fn tar_mount(
    container: &str,
    what: &str,
    pid: u32,
    (source, node_root): (&str, &Path),
    destination: &str,
    out: &Path,
) -> Result<(), CaptureError> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let inode = rustix::fs::stat(node_root.join(source.trim_start_matches('/')))
        .ok()
        .map(|st| (st.st_dev, st.st_ino));
    let mountinfo = || std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok();
    let expected = Expected {
        inode,
        mountinfo: &mountinfo,
    };
    tar_mount_in(container, what, &root, expected, destination, out)
}

/// [`tar_mount`] inside the root `root`. What is found at `destination` must be the
/// volume the runtime mounted there: a tenant who moved a directory above it and put
/// a symlink in its place (runc resolved the path long ago) would point the agent at
/// a file system that is not the pod's.
fn tar_mount_in(
    container: &str,
    what: &str,
    root: &Path,
    expected: Expected<'_>,
    destination: &str,
    out: &Path,
) -> Result<(), CaptureError> {
    let refused = |source| CaptureError::Resolve {
        container: container.to_owned(),
        mount: destination.to_owned(),
        source,
    };
    let root_fd = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| refused(e.into()))?;
    let dir = safe_fs::open_dir_in_root(root_fd.as_fd(), Path::new(destination)).map_err(refused)?;
    let st = rustix::fs::fstat(&dir).map_err(|e| refused(e.into()))?;
    let same = expected.inode == Some((st.st_dev, st.st_ino))
        || (expected.mountinfo)().is_some_and(|mountinfo| {
            mount_id(dir.as_fd(), OsStr::new("")).is_ok_and(|id| mount_id_at(&mountinfo, destination) == Some(id))
        });
    if !same {
        return Err(refused(std::io::Error::other(
            "what is there now is not the volume the runtime mounted (a directory above it was moved)",
        )));
    }
    let shown = root.join(destination.trim_start_matches('/'));
    tar_tree(what, dir.as_fd(), &shown, out, false)?;
    Ok(())
}

/// Captures `/dev/shm` and every emptyDir once, into `<out>/pod/`.
/// `node_root`: where the node's (the runtime's) root is seen from here.
pub fn capture_shared_state(
    containers: &[RunningContainer],
    node_root: &Path,
    out: &Path,
) -> Result<Vec<SharedState>, CaptureError> {
    let mut seen = BTreeSet::new();
    let mut captured = Vec::new();
    for container in containers {
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
            let source = (mount.source.as_str(), node_root);
            tar_mount(&container.name, &name, container.pid, source, &mount.destination, &tar)?;
            captured.push(SharedState { name, tar });
        }
    }
    Ok(captured)
}

/// The upper directory of the overlay the runtime mounted as container `id`'s root
/// filesystem (its bundle's `.../<id>/rootfs`), read from the runtime's own mount
/// table. Never from the container's: a tenant who can make a user namespace can
/// mount an overlay at its own `/` naming any upper directory, which the agent would
/// then read on the node.
pub fn runtime_upper_dir(mountinfo: &str, id: &str) -> Option<PathBuf> {
    if id.is_empty() || id.contains('/') {
        return None;
    }
    let suffix = format!("/{id}/rootfs");
    // The last mount at a point is the one on top.
    mountinfo.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        let mut right = right.split_whitespace();
        let (fs_type, _source, options) = (right.next()?, right.next()?, right.next()?);
        if !mount_point.ends_with(&suffix) || fs_type != "overlay" {
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

/// Tars a container's overlay upper directory into `out`. The upper directory is the
/// one the runtime's mount table (`runtime_mountinfo`) names for the container;
/// `node_root` is where the runtime's root is seen from here (`/`, or
/// `/proc/<runtime pid>/root` when the agent runs in a container).
pub fn rootfs_diff(
    container: &RunningContainer,
    node_root: &Path,
    runtime_mountinfo: &str,
    out: &Path,
) -> Result<RootfsDiff, CaptureError> {
    let upper = runtime_upper_dir(runtime_mountinfo, &container.id).ok_or_else(|| CaptureError::NoUpperDir {
        container: container.name.clone(),
    })?;
    let what = format!("the rootfs changes of container {}", container.name);
    let upper = node_root.join(upper.strip_prefix("/").unwrap_or(&upper));
    // The upper directory's path is the runtime's; what is below it is the tenant's.
    let upper_fd = safe_fs::open_root(&upper).map_err(|source| CaptureError::Archive {
        what: what.clone(),
        path: upper.clone(),
        source,
    })?;
    let deleted = tar_tree(&what, upper_fd.as_fd(), &upper, out, true)?;
    Ok(RootfsDiff {
        tar: out.to_path_buf(),
        deleted,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn tar_dir(src: &Path, out: &Path, whiteouts: bool) -> Result<Vec<String>, CaptureError> {
        let fd = safe_fs::open_root(src).unwrap();
        tar_tree("test", fd.as_fd(), src, out, whiteouts)
    }

    fn names(tar: &Path) -> Vec<String> {
        let bytes = std::fs::read(tar).unwrap();
        let mut names: Vec<String> = tar::Archive::new(bytes.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn mounts_resolve_inside_the_container_root_not_through_its_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        // The agent's own secret, on the host.
        let host_secret = dir.path().join("agent/tls");
        std::fs::create_dir_all(&host_secret).unwrap();
        std::fs::write(host_secret.join("tls.key"), b"agent key").unwrap();
        // The container's root: its image holds `x -> /`, and its emptyDir is mounted at
        // `/x/<the agent's tls dir>`, which runc resolved inside the root.
        let root = dir.path().join("root");
        let pod_side = root.join(host_secret.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&pod_side).unwrap();
        std::fs::write(pod_side.join("marker"), b"pod data").unwrap();
        std::os::unix::fs::symlink("/", root.join("x")).unwrap();
        let destination = format!("/x{}", host_secret.display());
        let climbing = format!("/../../..{}", host_secret.display());
        // The runtime's mount there, as the kernel lists it.
        let id = mount_id(safe_fs::open_root(&pod_side).unwrap().as_fd(), OsStr::new("")).unwrap();
        let mountinfo =
            format!("{id} 1 0:1 / {destination} rw - tmpfs tmpfs rw\n{id} 1 0:1 / {climbing} rw - tmpfs tmpfs rw\n");
        let mountinfo = Expected {
            inode: None,
            mountinfo: &|| Some(mountinfo.clone()),
        };
        let out = dir.path().join("volume.tar");
        tar_mount_in("app", "volume/tls", &root, mountinfo, &destination, &out).unwrap();
        assert_eq!(names(&out), ["marker"]);
        // `..` stays inside the root too.
        tar_mount_in("app", "volume/tls", &root, mountinfo, &climbing, &out).unwrap();
        assert_eq!(names(&out), ["marker"]);
        // What does not resolve inside is refused, naming the mount and the container.
        let err = tar_mount_in("app", "volume/tls", &root, mountinfo, "/x/missing", &out).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("mount /x/missing of container app refused: "),
            "{err}"
        );
    }

    #[test]
    fn a_volume_whose_path_was_moved_and_replaced_by_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("tmp/moved/kernel")).unwrap();
        // The emptyDir was mounted at /tmp/x/kernel; the tenant moved /tmp/x away and
        // made it a link to a file system of the node's (here /proc, another mount).
        let id = mount_id(
            safe_fs::open_root(&root.join("tmp/moved/kernel")).unwrap().as_fd(),
            OsStr::new(""),
        )
        .unwrap();
        let mountinfo = format!("{id} 1 0:1 / /tmp/moved/kernel rw - tmpfs tmpfs rw\n");
        std::os::unix::fs::symlink("/proc/..", root.join("tmp/x")).unwrap();
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        let out = dir.path().join("volume.tar");
        let listed = Expected {
            inode: None,
            mountinfo: &|| Some(mountinfo.clone()),
        };
        let err = tar_mount_in("app", "volume/data", &root, listed, "/tmp/x/proc", &out).unwrap_err();
        assert!(matches!(err, CaptureError::Resolve { .. }), "{err}");
        assert!(!out.exists(), "nothing was read");
        // Where the node's side is visible, the volume's inode decides: the real one
        // passes whatever the destination's spelling, the stand-in does not.
        let volume = rustix::fs::stat(root.join("tmp/moved/kernel")).unwrap();
        let inode = Expected {
            inode: Some((volume.st_dev, volume.st_ino)),
            mountinfo: &|| Some(mountinfo.clone()),
        };
        tar_mount_in("app", "volume/data", &root, inode, "/tmp/moved/kernel", &out).unwrap();
        std::os::unix::fs::symlink("/tmp/moved", root.join("tmp/link")).unwrap();
        tar_mount_in("app", "volume/data", &root, inode, "/tmp/link/kernel", &out).unwrap();
        let err = tar_mount_in("app", "volume/data", &root, inode, "/tmp/x/proc", &out).unwrap_err();
        assert_eq!(
            err.to_string(),
            "mount /tmp/x/proc of container app refused: what is there now is not the volume the runtime mounted \
             (a directory above it was moved)"
        );
        // Mount points are unescaped as the kernel escapes them.
        assert_eq!(mount_id_at("7 1 0:1 / /a\\040b rw - x x rw", "/a b"), Some(7));
    }

    #[test]
    fn device_nodes_are_refused_at_capture_not_at_restore() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            src.join("null").as_path(),
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o600),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
        let err = tar_dir(&src, &dir.path().join("out.tar"), false).unwrap_err();
        let CaptureError::Archive { source, path, .. } = err else {
            panic!("{err}")
        };
        assert!(path.ends_with("null"), "{}", path.display());
        assert_eq!(
            source.to_string(),
            "a device node cannot be checkpointed (a restore would refuse it)"
        );
    }

    #[test]
    fn a_file_that_shrinks_while_read_fails_the_capture() {
        let mut exact = Exact {
            inner: &b"abc"[..],
            left: 5,
        };
        let mut sink = Vec::new();
        let err = std::io::copy(&mut exact, &mut sink).unwrap_err();
        assert_eq!(err.to_string(), "the file shrank while it was read (2 bytes missing)");
    }

    #[test]
    fn the_walk_archives_symlinked_dirs_as_links_without_entering_them() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"host").unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::os::unix::fs::symlink(&outside, src.join("out")).unwrap();
        let out = dir.path().join("out.tar");
        tar_dir(&src, &out, false).unwrap();
        assert_eq!(names(&out), ["out"]);
    }

    #[test]
    fn owners_setuid_and_xattrs_survive_capture_and_unpack() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        let file = src.join("d/suid");
        std::fs::write(&file, b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::chown(&file, Some(1000), Some(1000)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::chown(src.join("d"), Some(1000), Some(1000)).unwrap();
        rustix::fs::setxattr(file.as_path(), "user.note", b"kept", rustix::fs::XattrFlags::empty()).unwrap();
        let out = dir.path().join("tree.tar");
        tar_dir(&src, &out, false).unwrap();
        let target = dir.path().join("target");
        std::fs::create_dir_all(&target).unwrap();
        safe_fs::unpack(File::open(&out).unwrap(), &target, safe_fs::UnpackOptions::TREE).unwrap();
        let meta = std::fs::metadata(target.join("d/suid")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
        assert_eq!(meta.permissions().mode() & 0o7777, 0o4755);
        let dir_meta = std::fs::metadata(target.join("d")).unwrap();
        assert_eq!((dir_meta.uid(), dir_meta.gid()), (1000, 1000));
        let mut value = [0u8; 8];
        let n = rustix::fs::getxattr(target.join("d/suid").as_path(), "user.note", &mut value[..]).unwrap();
        assert_eq!(&value[..n], b"kept");
    }

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
        assert!(tar_dir(&src, &out, false).unwrap().is_empty());
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
        assert!(tar_dir(&upper, &out, true).unwrap().is_empty());
        let bytes = std::fs::read(&out).unwrap();
        let names: Vec<String> = tar::Archive::new(bytes.as_slice())
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["etc", "etc/app", "etc/app/.wh..wh..opq", "etc/app/new.conf"]);
    }

    #[test]
    fn the_upper_dir_is_the_runtimes_never_the_containers() {
        let id = "0123abcd";
        let runtime = format!(
            "\
1 0 0:1 / / rw - ext4 /dev/vda rw
7 1 0:9 / /run/containerd/io.containerd.runtime.v2.task/k8s.io/{id}/rootfs rw - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/snap/5/fs,workdir=/snap/5/work
8 1 0:10 / /run/containerd/io.containerd.runtime.v2.task/k8s.io/other/rootfs rw - overlay overlay rw,lowerdir=/l3,upperdir=/snap/6/fs,workdir=/snap/6/work
"
        );
        assert_eq!(runtime_upper_dir(&runtime, id), Some(PathBuf::from("/snap/5/fs")));
        assert_eq!(runtime_upper_dir(&runtime, "other"), Some(PathBuf::from("/snap/6/fs")));
        // The container's own table, where a tenant mounted an overlay at `/` naming
        // a node path, never matches: its root is not the runtime's bundle.
        let tenants = "1 0 0:1 / / rw - overlay overlay rw,lowerdir=/l,upperdir=/var/lib/cryopod,workdir=/w\n";
        assert_eq!(runtime_upper_dir(tenants, id), None);
        assert_eq!(runtime_upper_dir(&runtime, ""), None);
        assert_eq!(runtime_upper_dir(&runtime, "k8s.io/other"), None);
    }
}
