//! The crash journal: before the agent freezes a pod it writes down what it is about
//! to freeze, durably; after the thaw it removes the entry. An agent that starts and
//! finds entries thaws what they name, so a crash never leaves a pod frozen.
//!
//! How each freeze ended is kept too (`ended/<operation id>.json`), written once by
//! whoever ended it first: a release, the deadline watchdog, an error path or the
//! recovery of a restarted agent. A late or repeated release reads it, so it can tell
//! "released" from "the pod ran on after its checkpoint".

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
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
    /// When the freeze was recorded, in milliseconds since the epoch; 0 in entries
    /// written by an agent from before it was kept.
    #[serde(default)]
    pub frozen_at_unix_millis: u64,
}

impl JournalEntry {
    /// The deadline as a time.
    pub fn deadline(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.deadline_unix_millis)
    }
}

/// How a freeze ended. Only the first end counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum FreezeEnd {
    /// Its operation released it: the containers killed (`stopped`) or thawed.
    #[serde(rename_all = "camelCase")]
    Released { stopped: bool, at_unix_millis: u64 },
    /// Thawed without a release: the pod ran on past its checkpoint.
    #[serde(rename_all = "camelCase")]
    ThawedWithoutRelease { at_unix_millis: u64, why: String },
}

impl FreezeEnd {
    /// A release now.
    pub fn released(stopped: bool) -> Self {
        Self::Released {
            stopped,
            at_unix_millis: unix_millis(SystemTime::now()),
        }
    }

    /// A thaw without release now, for `why`.
    pub fn thawed_without_release(why: impl Into<String>) -> Self {
        Self::ThawedWithoutRelease {
            at_unix_millis: unix_millis(SystemTime::now()),
            why: why.into(),
        }
    }
}

/// Milliseconds since the epoch (0 before it).
pub fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
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

/// Removes a file; a missing one is fine.
fn remove_if_there(path: PathBuf) -> Result<(), JournalError> {
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(JournalError::Remove { path, source }),
    }
}

/// Writes `bytes` durably to a temporary file of `dir` (made 0700 if need be), for
/// the caller to link or rename into place.
fn write_aside(dir: &Path, operation_id: &str, bytes: &[u8]) -> (PathBuf, std::io::Result<()>) {
    let tmp = dir.join(format!(".{operation_id}.{}.tmp", std::process::id()));
    let written = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
        })
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    (tmp, written)
}

/// The subdirectory of freeze ends.
const ENDED: &str = "ended";
/// How finished operations ended, for callers that re-attach after a restart.
const OUTCOMES: &str = "outcomes";

/// The freezes under way in this process, by operation id: each one's watchdog
/// waits with a slot where an emergency thaw puts why it asks (the agent's Thaw
/// RPC), and then thaws at once as at its deadline. Memory only: after a restart
/// nothing is frozen (recovery thawed it).
#[derive(Debug, Clone, Default)]
pub struct LiveFreezes(Arc<Mutex<HashMap<String, EarlyThaw>>>);

/// Where an emergency thaw leaves its reason for a freeze's watchdog.
pub type EarlyThaw = Arc<Mutex<Option<String>>>;

/// Removes a freeze from [`LiveFreezes`] when dropped (its watchdog ended).
#[derive(Debug)]
pub struct Registered {
    live: LiveFreezes,
    operation_id: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.live.forget(&self.operation_id);
    }
}

impl LiveFreezes {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, EarlyThaw>> {
        // The table holds no invariant a panicking holder could break.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the freeze of `operation_id`; its watchdog watches the slot returned.
    pub fn register(&self, operation_id: &str) -> EarlyThaw {
        let slot = EarlyThaw::default();
        self.table().insert(operation_id.to_owned(), slot.clone());
        slot
    }

    /// A guard that forgets `operation_id` when dropped.
    pub fn forget_on_drop(&self, operation_id: &str) -> Registered {
        Registered {
            live: self.clone(),
            operation_id: operation_id.to_owned(),
        }
    }

    /// Forgets the freeze of `operation_id`.
    pub fn forget(&self, operation_id: &str) {
        self.table().remove(operation_id);
    }

    /// Asks the watchdog of `operation_id` to thaw now, recording `why`; `false` when
    /// no freeze of it is under way here (it ended before).
    pub fn thaw_now(&self, operation_id: &str, why: &str) -> bool {
        let Some(slot) = self.table().get(operation_id).cloned() else {
            return false;
        };
        slot.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| why.to_owned());
        true
    }

    /// Whether a freeze of `operation_id` is under way here.
    pub fn contains(&self, operation_id: &str) -> bool {
        self.table().contains_key(operation_id)
    }
}

/// A directory of entries, one file per operation; private to root (0700).
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
    live: LiveFreezes,
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
        Ok(Self {
            dir,
            live: LiveFreezes::default(),
        })
    }

    /// The freezes under way in this process.
    pub fn live(&self) -> &LiveFreezes {
        &self.live
    }

    fn path_of(&self, operation_id: &str) -> Result<PathBuf, JournalError> {
        Self::check_operation_id(operation_id)?;
        Ok(self.dir.join(format!("{operation_id}.json")))
    }

    /// Checks that an operation id can name a journal entry and a work directory:
    /// ASCII letters, digits, `-`, `_` and `.`, at most 128, not starting with `.`.
    pub fn check_operation_id(operation_id: &str) -> Result<(), JournalError> {
        let usable = !operation_id.is_empty()
            && operation_id.len() <= 128
            && operation_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !operation_id.starts_with('.');
        if usable {
            Ok(())
        } else {
            Err(JournalError::BadOperationId {
                id: operation_id.to_owned(),
            })
        }
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
        remove_if_there(self.path_of(operation_id)?)
    }

    /// The entry files, sorted by name.
    fn entry_paths(&self) -> Result<Vec<PathBuf>, JournalError> {
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
        Ok(paths)
    }

    fn read_entry(&self, path: &Path) -> Result<JournalEntry, JournalError> {
        let text = std::fs::read(path).map_err(|source| JournalError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|e| JournalError::Read {
            path: path.to_path_buf(),
            source: e.into(),
        })
    }

    /// Every entry, oldest operation id first; fails on the first unreadable one.
    pub fn entries(&self) -> Result<Vec<JournalEntry>, JournalError> {
        self.entry_paths()?.iter().map(|p| self.read_entry(p)).collect()
    }

    fn end_path(&self, operation_id: &str) -> Result<PathBuf, JournalError> {
        Self::check_operation_id(operation_id)?;
        Ok(self.dir.join(ENDED).join(format!("{operation_id}.json")))
    }

    /// Records how the freeze of `operation_id` ended, unless an end was recorded
    /// before (that one stands). Durable; `true` when this end was the first.
    pub fn record_end(&self, operation_id: &str, end: &FreezeEnd) -> Result<bool, JournalError> {
        let path = self.end_path(operation_id)?;
        let werr = |source| JournalError::Write {
            path: path.clone(),
            source,
        };
        let dir = self.dir.join(ENDED);
        let bytes = serde_json::to_vec(end).map_err(|e| werr(e.into()))?;
        let (tmp, written) = write_aside(&dir, operation_id, &bytes);
        // A hard link is created only where nothing is: the first end wins, atomically.
        let linked = written.and_then(|()| std::fs::hard_link(&tmp, &path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => File::open(&dir).and_then(|d| d.sync_all()).map(|()| true).map_err(werr),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(werr(e)),
        }
    }

    /// Forgets how an earlier freeze of `operation_id` ended.
    pub fn forget_end(&self, operation_id: &str) -> Result<(), JournalError> {
        remove_if_there(self.end_path(operation_id)?)
    }

    /// How the freeze of `operation_id` ended, if it did and it was recorded.
    pub fn end_of(&self, operation_id: &str) -> Result<Option<FreezeEnd>, JournalError> {
        let path = self.end_path(operation_id)?;
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| JournalError::Read { path, source: e.into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Read { path, source }),
        }
    }

    fn outcome_path(&self, operation_id: &str) -> Result<PathBuf, JournalError> {
        Self::check_operation_id(operation_id)?;
        Ok(self.dir.join(OUTCOMES).join(operation_id))
    }

    /// Records how operation `operation_id` ended (its final state, encoded by the
    /// caller), durably: a caller that re-attaches after a restart of the agent gets
    /// it, and no second run.
    pub fn record_outcome(&self, operation_id: &str, encoded: &[u8]) -> Result<(), JournalError> {
        let path = self.outcome_path(operation_id)?;
        let werr = |source| JournalError::Write {
            path: path.clone(),
            source,
        };
        let dir = self.dir.join(OUTCOMES);
        let (tmp, written) = write_aside(&dir, operation_id, encoded);
        written
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| File::open(&dir).and_then(|d| d.sync_all()))
            .map_err(werr)
    }

    /// How operation `operation_id` ended, if that was recorded.
    pub fn outcome_of(&self, operation_id: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let path = self.outcome_path(operation_id)?;
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(JournalError::Read { path, source }),
        }
    }

    /// Forgets ends and outcomes recorded longer than `age` ago: no release or
    /// re-attach comes that late (a hold lasts at most an hour). What could not be
    /// removed is returned.
    pub fn forget_ends_before(&self, age: Duration) -> Vec<PathBuf> {
        let now = SystemTime::now();
        [ENDED, OUTCOMES]
            .into_iter()
            .filter_map(|d| std::fs::read_dir(self.dir.join(d)).ok())
            .flatten()
            .flatten()
            .filter(|e| {
                e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > age)
            })
            .filter_map(|e| std::fs::remove_file(e.path()).err().map(|_| e.path()))
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
    /// The entry, unless it could not be read.
    pub entry: Option<JournalEntry>,
    /// Its file.
    pub path: PathBuf,
    /// Cgroups that could not be thawed (gone ones count as thawed), with why; or
    /// why the entry could not be read.
    pub failures: Vec<(CgroupPath, String)>,
}

impl Recovered {
    fn unreadable(path: PathBuf, why: String) -> Self {
        Self {
            entry: None,
            failures: vec![(CgroupPath::new("/"), why)],
            path,
        }
    }
}

/// What the journal and the kernel say of one freeze the journal names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedFreeze {
    /// When it was recorded, if the entry says.
    pub frozen_at: Option<SystemTime>,
    /// When the watchdog must have thawed it.
    pub deadline: SystemTime,
    /// What each container cgroup's freezer reports.
    pub containers: Vec<ContainerFreezer>,
}

/// What one container cgroup's freezer reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerFreezer {
    /// The cgroup is gone (its pod too).
    Gone,
    /// Its state could not be read.
    Unreadable,
    /// Its state.
    State(crate::cgroup::FreezerState),
}

impl ObservedFreeze {
    /// Whether the pod is frozen now: some container is frozen or freezing, or cannot
    /// be read (the journal says it was frozen and nothing shows it was thawed).
    pub fn frozen(&self) -> bool {
        use crate::cgroup::FreezerState;
        self.containers.iter().any(|c| {
            matches!(
                c,
                ContainerFreezer::Unreadable | ContainerFreezer::State(FreezerState::Frozen | FreezerState::Freezing)
            )
        })
    }
}

/// Every freeze the journal names, with its containers' freezer states as the kernel
/// reports them now. An entry stays from before the freeze until after the thaw (a
/// held pod's until its release), and past a thaw that failed, so the kernel decides
/// whether the pod is still frozen. Unreadable entries are left out (recovery reports
/// them at start).
pub fn observe(journal: &Journal) -> Result<Vec<ObservedFreeze>, JournalError> {
    let mut seen = Vec::new();
    for path in journal.entry_paths()? {
        let Ok(entry) = journal.read_entry(&path) else {
            continue;
        };
        let freezer = freezer_for(entry.version, entry.root.clone());
        let containers = entry
            .containers
            .iter()
            .map(|cgroup| match freezer.state(cgroup) {
                Ok(state) => ContainerFreezer::State(state),
                Err(crate::cgroup::CgroupError::Read { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    ContainerFreezer::Gone
                }
                Err(_) => ContainerFreezer::Unreadable,
            })
            .collect();
        seen.push(ObservedFreeze {
            frozen_at: (entry.frozen_at_unix_millis > 0)
                .then(|| UNIX_EPOCH + Duration::from_millis(entry.frozen_at_unix_millis)),
            deadline: entry.deadline(),
            containers,
        });
    }
    Ok(seen)
}

/// Thaws everything the journal names and removes the entries. Run at agent start,
/// before serving. Each entry is handled on its own: one unreadable entry does not
/// keep the others frozen. A cgroup that no longer exists (the pod is gone) counts as
/// thawed, but only when its hierarchy is mounted at all.
pub fn recover(journal: &Journal) -> Result<Vec<Recovered>, JournalError> {
    let mut done = Vec::new();
    for path in journal.entry_paths()? {
        let entry = match journal.read_entry(&path) {
            Ok(entry) => entry,
            Err(e) => {
                // Left in place for a human; reported so the agent can log it.
                done.push(Recovered::unreadable(path, e.to_string()));
                continue;
            }
        };
        let freezer = freezer_for(entry.version, entry.root.clone());
        let mut failures = Vec::new();
        let hierarchy_mounted = entry.root.join("cgroup.procs").exists();
        for cgroup in entry.containers.iter().chain(std::iter::once(&entry.pod)) {
            if hierarchy_mounted && !cgroup.under(&entry.root).exists() {
                continue;
            }
            if let Err(e) = freezer.thaw(cgroup) {
                failures.push((cgroup.clone(), e.to_string()));
            }
        }
        // Recorded before the entry goes: a pod thawed here ran on after its
        // checkpoint, unless its release was recorded first (that end stands).
        // Unrecorded, the entry stays for the next start; recovery goes on meanwhile.
        if let Err(e) = journal.record_end(
            &entry.operation_id,
            &FreezeEnd::thawed_without_release("the agent restarted and thawed it"),
        ) {
            failures.push((entry.pod.clone(), e.to_string()));
        }
        if failures.is_empty() {
            journal.clear(&entry.operation_id)?;
        }
        done.push(Recovered {
            entry: Some(entry),
            path,
            failures,
        });
    }
    Ok(done)
}
