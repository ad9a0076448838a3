//! The crash journal: before the agent freezes a pod it writes down what it is about
//! to freeze, durably; after the thaw it removes the entry. An agent that starts and
//! finds entries thaws what they name, so a crash never leaves a pod frozen.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cgroup::{CgroupPath, CgroupVersion, freezer_for};

/// One pod freeze in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// The operation that froze the pod.
    pub operation_id: String,
    /// The cgroup interface used.
    pub version: CgroupVersion,
    /// The hierarchy's mount point.
    pub root: PathBuf,
    /// The pod cgroup.
    pub pod: CgroupPath,
    /// The container cgroups.
    pub containers: Vec<CgroupPath>,
    /// When the freeze must end at the latest, in milliseconds since the epoch.
    pub deadline_unix_millis: u64,
}

impl JournalEntry {
    /// The deadline as a time.
    pub fn deadline(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.deadline_unix_millis)
    }
}

/// A journal operation failed.
#[derive(Debug)]
pub enum JournalError {
    /// The journal directory could not be created or listed.
    Directory { path: PathBuf, source: std::io::Error },
    /// An entry could not be written durably.
    Write { path: PathBuf, source: std::io::Error },
    /// An entry could not be read or parsed.
    Read { path: PathBuf, source: std::io::Error },
    /// An entry could not be removed.
    Remove { path: PathBuf, source: std::io::Error },
    /// The operation id cannot be a file name.
    BadOperationId { id: String },
}

impl std::fmt::Display for JournalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Directory { path, .. } => write!(f, "cannot use the journal directory {}", path.display()),
            Self::Write { path, .. } => write!(f, "cannot write the journal entry {}", path.display()),
            Self::Read { path, .. } => write!(f, "cannot read the journal entry {}", path.display()),
            Self::Remove { path, .. } => write!(f, "cannot remove the journal entry {}", path.display()),
            Self::BadOperationId { id } => write!(f, "operation id {id:?} is not usable as a journal name"),
        }
    }
}

impl std::error::Error for JournalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Directory { source, .. }
            | Self::Write { source, .. }
            | Self::Read { source, .. }
            | Self::Remove { source, .. } => Some(source),
            Self::BadOperationId { .. } => None,
        }
    }
}

/// A directory of entries, one file per operation; private to root (0700).
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Opens (creating) the journal directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, JournalError> {
        let dir = dir.into();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| JournalError::Directory {
                path: dir.clone(),
                source,
            })?;
        Ok(Self { dir })
    }

    fn path_of(&self, operation_id: &str) -> Result<PathBuf, JournalError> {
        let usable = !operation_id.is_empty()
            && operation_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !operation_id.starts_with('.');
        if !usable {
            return Err(JournalError::BadOperationId {
                id: operation_id.to_owned(),
            });
        }
        Ok(self.dir.join(format!("{operation_id}.json")))
    }

    /// Writes an entry durably (temp file, fsync, rename, fsync of the directory).
    pub fn record(&self, entry: &JournalEntry) -> Result<(), JournalError> {
        let path = self.path_of(&entry.operation_id)?;
        let tmp = path.with_extension("json.tmp");
        let werr = |source| JournalError::Write {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(entry).map_err(|e| werr(e.into()))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr)?;
        file.write_all(&bytes).map_err(werr)?;
        file.sync_all().map_err(werr)?;
        std::fs::rename(&tmp, &path).map_err(werr)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(werr)
    }

    /// Removes an entry; a missing one is fine.
    pub fn clear(&self, operation_id: &str) -> Result<(), JournalError> {
        let path = self.path_of(operation_id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(JournalError::Remove { path, source }),
        }
    }

    /// Every entry, oldest operation id first.
    pub fn entries(&self) -> Result<Vec<JournalEntry>, JournalError> {
        let derr = |source| JournalError::Directory {
            path: self.dir.clone(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(derr)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .map(|path| {
                let text = std::fs::read(&path).map_err(|source| JournalError::Read {
                    path: path.clone(),
                    source,
                })?;
                serde_json::from_slice(&text).map_err(|e| JournalError::Read { path, source: e.into() })
            })
            .collect()
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// What recovery did with one entry.
#[derive(Debug)]
pub struct Recovered {
    /// The entry.
    pub entry: JournalEntry,
    /// Cgroups that could not be thawed (gone ones count as thawed), with why.
    pub failures: Vec<(CgroupPath, String)>,
}

/// Thaws everything the journal names and removes the entries. Run at agent start,
/// before serving. Cgroups that no longer exist (the pod is gone) are fine.
pub fn recover(journal: &Journal) -> Result<Vec<Recovered>, JournalError> {
    let mut done = Vec::new();
    for entry in journal.entries()? {
        let freezer = freezer_for(entry.version, entry.root.clone());
        let mut failures = Vec::new();
        for cgroup in entry.containers.iter().chain(std::iter::once(&entry.pod)) {
            if !cgroup.under(&entry.root).exists() {
                continue;
            }
            if let Err(e) = freezer.thaw(cgroup) {
                failures.push((cgroup.clone(), e.to_string()));
            }
        }
        if failures.is_empty() {
            journal.clear(&entry.operation_id)?;
        }
        done.push(Recovered { entry, failures });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn recovery_thaws_what_the_journal_names_and_forgets_it() {
        // A v1 hierarchy as plain files: recovery writes THAWED into each freezer.state.
        let root = tempfile::tempdir().unwrap();
        for cg in ["pod", "pod/a", "pod/b"] {
            std::fs::create_dir_all(root.path().join(cg)).unwrap();
            std::fs::write(root.path().join(cg).join("freezer.state"), "FROZEN").unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path().join("journal")).unwrap();
        let entry = JournalEntry {
            operation_id: "op-1".into(),
            version: CgroupVersion::V1,
            root: root.path().to_path_buf(),
            pod: CgroupPath::new("/pod"),
            // A container whose cgroup is gone (pod deleted meanwhile) is no failure.
            containers: vec![
                CgroupPath::new("/pod/a"),
                CgroupPath::new("/pod/b"),
                CgroupPath::new("/pod/gone"),
            ],
            deadline_unix_millis: 1,
        };
        journal.record(&entry).unwrap();
        assert_eq!(journal.entries().unwrap(), vec![entry.clone()]);

        let recovered = recover(&journal).unwrap();
        assert_eq!(recovered.len(), 1);
        assert!(recovered[0].failures.is_empty());
        for cg in ["pod", "pod/a", "pod/b"] {
            assert_eq!(
                std::fs::read_to_string(root.path().join(cg).join("freezer.state")).unwrap(),
                "THAWED"
            );
        }
        assert!(journal.entries().unwrap().is_empty());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(journal.dir()).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o700, "the journal is private to root");
    }
}
