//! Freezing cgroups through sysfs: v1 (`freezer.state`) and v2 (`cgroup.freeze` with
//! `cgroup.events`). Hidden behind [`Freezer`] so the freeze protocol is tested with
//! a double and with the real kernel.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A cgroup's path inside its hierarchy, e.g. `/kubepods/besteffort/pod<uid>/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CgroupPath(String);

impl CgroupPath {
    /// Wraps a path; a missing leading `/` is added.
    pub fn new(path: impl Into<String>) -> Self {
        let path = path.into();
        if path.starts_with('/') {
            Self(path)
        } else {
            Self(format!("/{path}"))
        }
    }

    /// The path a container runtime names, in either driver's form. With the cgroupfs
    /// driver it is a path already. With the systemd driver a container's is
    /// `<slice>:<prefix>:<name>`, the scope `<prefix>-<name>.scope` in that slice, and
    /// a pod's parent is a slice name alone; a slice `a-b-c.slice` sits at
    /// `/a.slice/a-b.slice/a-b-c.slice` (each dash opens a level, as systemd nests them).
    pub fn from_runtime(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let bad = |why: &str| Err(format!("cgroup {text:?}: {why}"));
        match parts.as_slice() {
            [path] if path.split('/').any(|c| c == ".." || c == ".") => bad("it has a . or .. component"),
            [path] if path.contains('/') || !path.ends_with(".slice") => Ok(Self::new(*path)),
            [slice] => slice_path(slice)
                .map(Self)
                .ok_or_else(|| format!("cgroup {text:?}: not a slice name")),
            [slice, prefix, name] => {
                let Some(parent) = slice_path(slice) else {
                    return bad("its first part is not a slice name");
                };
                if prefix.is_empty() || name.is_empty() || name.contains('/') || prefix.contains('/') {
                    return bad("its scope is not <prefix>:<name>");
                }
                Ok(Self(format!("{parent}/{prefix}-{name}.scope")))
            }
            _ => bad("neither a path nor the systemd driver's <slice>:<prefix>:<name>"),
        }
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The directory of this cgroup under a hierarchy's mount point.
    pub fn under(&self, root: &Path) -> PathBuf {
        root.join(self.0.trim_start_matches('/'))
    }
}

/// Where systemd puts a slice: `-.slice` is the root, and every dash of the name
/// opens a level. `None` for what is not a slice name.
fn slice_path(slice: &str) -> Option<String> {
    let stem = slice.strip_suffix(".slice")?;
    if slice == "-.slice" {
        return Some(String::new());
    }
    if stem.is_empty() || stem.contains('/') || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return None;
    }
    let mut path = String::new();
    let mut name = String::new();
    for (i, part) in stem.split('-').enumerate() {
        if i > 0 {
            name.push('-');
        }
        name.push_str(part);
        path.push_str(&format!("/{name}.slice"));
    }
    Some(path)
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which cgroup interface a freezer speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    /// `freezer.state` in the v1 freezer hierarchy.
    V1,
    /// `cgroup.freeze` and `cgroup.events` in the unified hierarchy.
    V2,
}

/// What a cgroup's freezer reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreezerState {
    /// Running.
    Thawed,
    /// Asked to freeze; some task has not stopped yet.
    Freezing,
    /// Every task is stopped.
    Frozen,
}

/// A freezer operation failed.
#[derive(Debug)]
pub enum CgroupError {
    /// A control file could not be written.
    Write { path: PathBuf, source: std::io::Error },
    /// A control file could not be read.
    Read { path: PathBuf, source: std::io::Error },
    /// A control file held something unexpected.
    UnexpectedContent { path: PathBuf, content: String },
}

impl fmt::Display for CgroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Write { path, .. } => write!(f, "cannot write {}", path.display()),
            Self::Read { path, .. } => write!(f, "cannot read {}", path.display()),
            Self::UnexpectedContent { path, content } => {
                write!(f, "unexpected content {content:?} in {}", path.display())
            }
        }
    }
}

impl std::error::Error for CgroupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Write { source, .. } | Self::Read { source, .. } => Some(source),
            Self::UnexpectedContent { .. } => None,
        }
    }
}

/// Freezes and thaws cgroups. `freeze` and `thaw` only ask; `state` tells when the
/// kernel is done.
pub trait Freezer: Send + Sync + fmt::Debug {
    /// Asks the kernel to freeze every task of the cgroup and its descendants.
    fn freeze(&self, cgroup: &CgroupPath) -> Result<(), CgroupError>;
    /// Lifts this cgroup's own freeze (descendants frozen by themselves stay frozen).
    fn thaw(&self, cgroup: &CgroupPath) -> Result<(), CgroupError>;
    /// The effective state: frozen by itself or by an ancestor.
    fn state(&self, cgroup: &CgroupPath) -> Result<FreezerState, CgroupError>;
    /// Whether this cgroup itself asked to be frozen (not just an ancestor).
    fn self_frozen(&self, cgroup: &CgroupPath) -> Result<bool, CgroupError>;
    /// The interface it speaks, recorded in the crash journal.
    fn version(&self) -> CgroupVersion;
    /// The hierarchy's mount point, recorded in the crash journal.
    fn root(&self) -> &Path;
}

fn write(path: PathBuf, value: &str) -> Result<(), CgroupError> {
    std::fs::write(&path, value).map_err(|source| CgroupError::Write { path, source })
}

fn read(path: PathBuf) -> Result<(PathBuf, String), CgroupError> {
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok((path, s.trim().to_owned())),
        Err(source) => Err(CgroupError::Read { path, source }),
    }
}

/// The v1 freezer hierarchy, usually `/sys/fs/cgroup/freezer`.
#[derive(Debug, Clone)]
pub struct V1Freezer {
    root: PathBuf,
}

impl V1Freezer {
    /// A freezer for the hierarchy mounted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl Freezer for V1Freezer {
    fn freeze(&self, cgroup: &CgroupPath) -> Result<(), CgroupError> {
        write(cgroup.under(&self.root).join("freezer.state"), "FROZEN")
    }

    fn thaw(&self, cgroup: &CgroupPath) -> Result<(), CgroupError> {
        write(cgroup.under(&self.root).join("freezer.state"), "THAWED")
    }

    fn state(&self, cgroup: &CgroupPath) -> Result<FreezerState, CgroupError> {
        let (path, content) = read(cgroup.under(&self.root).join("freezer.state"))?;
        match content.as_str() {
            "THAWED" => Ok(FreezerState::Thawed),
            "FREEZING" => Ok(FreezerState::Freezing),
            "FROZEN" => Ok(FreezerState::Frozen),
            _ => Err(CgroupError::UnexpectedContent { path, content }),
        }
    }

    fn self_frozen(&self, cgroup: &CgroupPath) -> Result<bool, CgroupError> {
        let (path, content) = read(cgroup.under(&self.root).join("freezer.self_freezing"))?;
        match content.as_str() {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(CgroupError::UnexpectedContent { path, content }),
        }
    }

    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn root(&self) -> &Path {
        &self.root
    }
}

/// The unified hierarchy: `/sys/fs/cgroup` on v2 hosts, `/sys/fs/cgroup/unified` on hybrid ones.
#[derive(Debug, Clone)]
pub struct V2Freezer {
    root: PathBuf,
}

impl V2Freezer {
    /// A freezer for the hierarchy mounted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl Freezer for V2Freezer {
    fn freeze(&self, cgroup: &CgroupPath) -> Result<(), CgroupError> {
        write(cgroup.under(&self.root).join("cgroup.freeze"), "1")
    }

    fn thaw(&self, cgroup: &CgroupPath) -> Result<(), CgroupError> {
        write(cgroup.under(&self.root).join("cgroup.freeze"), "0")
    }

    fn state(&self, cgroup: &CgroupPath) -> Result<FreezerState, CgroupError> {
        // `frozen` in cgroup.events is the effective state, ancestors included.
        let (path, events) = read(cgroup.under(&self.root).join("cgroup.events"))?;
        let frozen = events.lines().find_map(|l| l.strip_prefix("frozen ")).map(str::trim);
        match frozen {
            Some("1") => Ok(FreezerState::Frozen),
            Some("0") if self.self_frozen(cgroup)? => Ok(FreezerState::Freezing),
            Some("0") => Ok(FreezerState::Thawed),
            _ => Err(CgroupError::UnexpectedContent { path, content: events }),
        }
    }

    fn self_frozen(&self, cgroup: &CgroupPath) -> Result<bool, CgroupError> {
        let (path, content) = read(cgroup.under(&self.root).join("cgroup.freeze"))?;
        match content.as_str() {
            "0" => Ok(false),
            "1" => Ok(true),
            _ => Err(CgroupError::UnexpectedContent { path, content }),
        }
    }

    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn root(&self) -> &Path {
        &self.root
    }
}

/// A freezer of the given interface at `root`.
pub fn freezer_for(version: CgroupVersion, root: impl Into<PathBuf>) -> Box<dyn Freezer> {
    match version {
        CgroupVersion::V1 => Box::new(V1Freezer::new(root)),
        CgroupVersion::V2 => Box::new(V2Freezer::new(root)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn both_drivers_paths_name_the_cgroup_to_freeze() {
        let uid = "pod4b1c2d3e_0000_4000_8000_000000000001";
        let cases = [
            // cgroupfs: paths as they are.
            ("/kubepods/besteffort/pod1/abc", "/kubepods/besteffort/pod1/abc"),
            ("kubepods/pod1", "/kubepods/pod1"),
            // systemd: a pod's parent slice, nested by its dashes.
            (
                &format!("kubepods-besteffort-{uid}.slice") as &str,
                &format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{uid}.slice") as &str,
            ),
            ("kubepods.slice", "/kubepods.slice"),
            ("-.slice", ""),
            // systemd: a container's scope in its pod's slice.
            (
                &format!("kubepods-burstable-{uid}.slice:cri-containerd:0123abcd"),
                &format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{uid}.slice/cri-containerd-0123abcd.scope"
                ),
            ),
        ];
        for (given, want) in cases {
            assert_eq!(CgroupPath::from_runtime(given).unwrap().as_str(), want, "{given}");
        }
        for bad in [
            "a:b",
            "kubepods.slice:cri-containerd",
            "kubepods.slice::id",
            "notaslice:cri-containerd:id",
            "a--b.slice",
            "kubepods.slice:cri/x:id",
            "/kubepods/../system.slice",
            "kubepods/./pod1",
        ] {
            let err = CgroupPath::from_runtime(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }
}
