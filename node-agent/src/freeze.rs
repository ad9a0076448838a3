//! Freezing a whole pod at one instant without hanging CRIU.
//!
//! CRIU cannot seize tasks whose parent cgroup is frozen, and freezing containers one
//! by one is not one instant. So: freeze the pod cgroup (every container stops at
//! once), freeze each container cgroup (a self-freeze that outlives the parent's),
//! then thaw the pod cgroup. Every container stays frozen, and CRIU can work on each.
//!
//! Before anything is frozen the crash journal records it. A watchdog thaws the pod
//! when `max_freeze` passes, whatever the caller is doing; a crashed agent thaws on
//! restart from the journal. Every error path thaws before it returns.
//!
//! An emergency thaw (the agent's Thaw RPC) brings the watchdog's deadline forward:
//! it thaws at once and records why, exactly as at the deadline.
//!
//! Whoever ends a freeze first (a release, the watchdog, a drop) claims it and
//! records how in the journal. A release that comes after the watchdog neither kills
//! nor claims the pod, which ran on: it reads that end instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::cgroup::{CgroupError, CgroupPath, Freezer, FreezerState};
use crate::journal::{FreezeEnd, Journal, JournalEntry, JournalError};

/// How soon a watchdog sees an emergency thaw.
const EARLY_THAW_POLL: Duration = Duration::from_millis(50);

/// The cgroups of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroups {
    /// The pod cgroup, parent of every container cgroup.
    pub pod: CgroupPath,
    /// One cgroup per running container (the sandbox's included).
    pub containers: Vec<CgroupPath>,
}

/// Limits of one freeze.
#[derive(Clone, Copy, Debug)]
pub struct FreezeLimits {
    /// How long the pod may stay frozen before the watchdog thaws it.
    pub max_freeze: Duration,
    /// How long the kernel may take to stop every task (tasks in
    /// uninterruptible sleep can delay it).
    pub settle: Duration,
}

/// Freezing failed; the pod was thawed before this was returned.
#[derive(Debug)]
pub enum FreezeError {
    /// The crash journal could not record the freeze, so nothing was frozen.
    Journal { source: JournalError },
    /// Asking a cgroup to freeze failed.
    Freeze { cgroup: CgroupPath, source: CgroupError },
    /// Asking a cgroup to thaw failed.
    Thaw { cgroup: CgroupPath, source: CgroupError },
    /// Reading a cgroup's state failed.
    State { cgroup: CgroupPath, source: CgroupError },
    /// The kernel did not report the cgroup frozen in time.
    NotSettled {
        cgroup: CgroupPath,
        state: String,
        after: Duration,
    },
    /// A container was not frozen by itself after the pod cgroup was thawed.
    NotSelfFrozen { cgroup: CgroupPath },
    /// The deadline watchdog could not be started, so nothing was frozen.
    Watchdog { source: std::io::Error },
    /// The watchdog thawed the pod before the freeze was complete.
    Expired { after: Duration },
    /// The pod was thawed, but its journal entry could not be removed (a restarted
    /// agent would thaw it once more, which is harmless).
    JournalClear { source: JournalError },
    /// Stopping the containers failed; the pod was thawed, possibly partly killed.
    Kill { cgroup: CgroupPath, source: std::io::Error },
}

impl std::fmt::Display for FreezeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Journal { .. } => write!(f, "cannot record the freeze in the crash journal"),
            Self::Freeze { cgroup, .. } => write!(f, "cannot freeze cgroup {cgroup}"),
            Self::Thaw { cgroup, .. } => write!(f, "cannot thaw cgroup {cgroup}"),
            Self::State { cgroup, .. } => write!(f, "cannot read the freezer state of cgroup {cgroup}"),
            Self::NotSettled { cgroup, state, after } => {
                write!(
                    f,
                    "cgroup {cgroup} was still {state} after {after:?}; some task did not stop"
                )
            }
            Self::NotSelfFrozen { cgroup } => write!(f, "cgroup {cgroup} did not stay frozen on its own"),
            Self::Watchdog { .. } => write!(f, "cannot start the thaw watchdog"),
            Self::Expired { after } => write!(f, "the pod reached its freeze deadline of {after:?} and was thawed"),
            Self::JournalClear { .. } => write!(f, "the pod was thawed but its crash-journal entry remains"),
            Self::Kill { cgroup, .. } => write!(f, "cannot kill the processes of cgroup {cgroup}"),
        }
    }
}

impl std::error::Error for FreezeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Journal { source } | Self::JournalClear { source } => Some(source),
            Self::Watchdog { source } | Self::Kill { source, .. } => Some(source),
            Self::Freeze { source, .. } | Self::Thaw { source, .. } | Self::State { source, .. } => Some(source),
            Self::NotSettled { .. } | Self::NotSelfFrozen { .. } | Self::Expired { .. } => None,
        }
    }
}

/// How a freeze ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreezeReport {
    /// When the pod freeze was requested (wall clock).
    pub began: std::time::SystemTime,
    /// From the pod freeze request to the last thaw: the application's pause.
    pub window: Duration,
    /// How long the kernel took to stop every task of the pod.
    pub settle: Duration,
    /// The watchdog thawed the pod because `max_freeze` passed.
    pub expired: bool,
}

fn wait_until_frozen(freezer: &dyn Freezer, cgroup: &CgroupPath, limit: Duration) -> Result<(), FreezeError> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(100);
    loop {
        let state = freezer.state(cgroup).map_err(|source| FreezeError::State {
            cgroup: cgroup.clone(),
            source,
        })?;
        if state == FreezerState::Frozen {
            return Ok(());
        }
        if start.elapsed() >= limit {
            return Err(FreezeError::NotSettled {
                cgroup: cgroup.clone(),
                state: format!("{state:?}"),
                after: limit,
            });
        }
        // The kernel offers no notification for v1; poll with a short, growing pause.
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// Thaws one cgroup, retrying a few times; a cgroup that is gone is thawed.
fn thaw_one(freezer: &dyn Freezer, cgroup: &CgroupPath) -> Result<(), CgroupError> {
    let mut attempt = 0;
    loop {
        match freezer.thaw(cgroup) {
            Ok(()) => return Ok(()),
            Err(CgroupError::Write { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if attempt >= 4 => return Err(e),
            Err(_) => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(20 << attempt));
            }
        }
    }
}

/// Thaws containers first, then the pod; keeps going past errors and returns the first.
fn thaw_all(freezer: &dyn Freezer, cgroups: &PodCgroups) -> Result<(), FreezeError> {
    let mut first = None;
    for cgroup in cgroups.containers.iter().chain(std::iter::once(&cgroups.pod)) {
        if let Err(source) = thaw_one(freezer, cgroup) {
            first.get_or_insert(FreezeError::Thaw {
                cgroup: cgroup.clone(),
                source,
            });
        }
    }
    first.map_or(Ok(()), Err)
}

/// A pod whose containers are frozen. Thaw it with [`FrozenPod::thaw`]; dropping it
/// thaws too, so no early return leaves it frozen.
#[derive(Debug)]
pub struct FrozenPod {
    freezer: Arc<dyn Freezer>,
    journal: Journal,
    operation_id: String,
    cgroups: PodCgroups,
    started: Instant,
    began: std::time::SystemTime,
    settle: Duration,
    max_freeze: Duration,
    expired: Arc<AtomicBool>,
    /// Set by whoever ends the freeze first.
    claimed: Arc<AtomicBool>,
    disarm: Option<mpsc::Sender<()>>,
    watchdog: Option<JoinHandle<()>>,
}

impl FrozenPod {
    /// Whether the watchdog has already thawed the pod.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::SeqCst)
    }

    /// The cgroups held frozen.
    pub fn cgroups(&self) -> &PodCgroups {
        &self.cgroups
    }

    /// The freeze so far, while it goes on.
    pub fn report_so_far(&self) -> FreezeReport {
        FreezeReport {
            began: self.began,
            window: self.started.elapsed(),
            settle: self.settle,
            expired: self.expired(),
        }
    }

    /// Time since the freeze began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Time left before the watchdog thaws the pod.
    pub fn remaining(&self) -> Duration {
        self.max_freeze.saturating_sub(self.started.elapsed())
    }

    /// The journal this freeze is recorded in.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Whether the watchdog ended the freeze (it alone can while the owner holds it):
    /// the pod ran on, or is about to.
    pub fn deadline_passed(&self) -> bool {
        self.claimed.load(Ordering::SeqCst)
    }

    /// Claims the end of the freeze; `false` when the watchdog ended it first (the
    /// pod ran on).
    fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::SeqCst)
    }

    /// Records how the freeze ended, as its claimer.
    fn record(&self, end: &FreezeEnd) {
        match self.journal.record_end(&self.operation_id, end) {
            Ok(true) => {}
            // The pod is thawed all the same; a later release reads what was recorded
            // (or nothing) and is told the pod may have run on.
            Ok(false) => tracing::warn!(operation_id = %self.operation_id, "an end of this freeze was recorded before"),
            Err(e) => {
                tracing::warn!(operation_id = %self.operation_id, error = %e, "cannot record how the freeze ended");
            }
        }
    }

    /// Thaws every container and removes the journal entry.
    pub fn thaw(mut self) -> Result<FreezeReport, FreezeError> {
        if self.claim() {
            self.record(&FreezeEnd::released(false));
        }
        self.finish()
    }

    /// Stops these containers for good: SIGKILL to each of their processes while
    /// frozen, then the thaw, on which they die without running another
    /// instruction. Other cgroups (the sandbox's) just thaw.
    /// When the watchdog thawed the pod first, nothing is killed: it runs on.
    pub fn stop(mut self, containers: &[CgroupPath]) -> Result<FreezeReport, FreezeError> {
        let mut first = None;
        let ours = self.claim();
        for cgroup in containers.iter().filter(|_| ours) {
            if let Err(source) = kill_all(&cgroup.under(self.freezer.root())) {
                first.get_or_insert(FreezeError::Kill {
                    cgroup: cgroup.clone(),
                    source,
                });
            }
        }
        // Recorded once the kill is done: a failed kill leaves processes that run on.
        if ours {
            self.record(&match &first {
                None => FreezeEnd::released(true),
                Some(e) => FreezeEnd::thawed_without_release(format!("its containers could not all be killed: {e}")),
            });
        }
        let report = self.finish()?;
        first.map_or(Ok(report), Err)
    }

    fn finish(&mut self) -> Result<FreezeReport, FreezeError> {
        let thawed = thaw_all(self.freezer.as_ref(), &self.cgroups);
        let window = self.started.elapsed();
        // The watchdog stays armed until the thaw went through: if it failed, the
        // watchdog retries at the deadline, and the journal entry stays for a restart.
        thawed?;
        if let Some(disarm) = self.disarm.take() {
            let _ = disarm.send(());
        }
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
        self.journal
            .clear(&self.operation_id)
            .map_err(|source| FreezeError::JournalClear { source })?;
        Ok(FreezeReport {
            began: self.began,
            window,
            settle: self.settle,
            expired: self.expired(),
        })
    }
}

impl Drop for FrozenPod {
    fn drop(&mut self) {
        if self.disarm.is_some() {
            if self.claim() {
                self.record(&FreezeEnd::thawed_without_release(
                    "its operation ended without releasing it",
                ));
            }
            // If this thaw fails too, the watchdog (detached with the handle) thaws
            // at the deadline, and the journal entry stays for a restarted agent.
            let _ = self.finish();
        }
    }
}

fn kill_all(cgroup_dir: &std::path::Path) -> std::io::Result<()> {
    use nix::sys::signal::{Signal, kill};
    for pid in crate::inspect::cgroup_pids(cgroup_dir)? {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).map_err(std::io::Error::other)?);
        match kill(pid, Signal::SIGKILL) {
            // Gone already.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Freezes every container of the pod at one instant and leaves them frozen, the pod
/// cgroup thawed, so CRIU can dump each container.
pub fn freeze_pod(
    freezer: Arc<dyn Freezer>,
    journal: &Journal,
    operation_id: &str,
    cgroups: &PodCgroups,
    limits: FreezeLimits,
) -> Result<FrozenPod, FreezeError> {
    let frozen_at = SystemTime::now();
    let deadline = frozen_at + limits.max_freeze;
    let entry = JournalEntry {
        operation_id: operation_id.to_owned(),
        version: freezer.version(),
        root: freezer.root().to_path_buf(),
        pod: cgroups.pod.clone(),
        containers: cgroups.containers.clone(),
        deadline_unix_millis: crate::journal::unix_millis(deadline),
        frozen_at_unix_millis: crate::journal::unix_millis(frozen_at),
    };
    // An operation run again (its agent restarted mid-way) freezes anew: how its
    // earlier freeze ended says nothing of this one.
    journal
        .forget_end(operation_id)
        .map_err(|source| FreezeError::Journal { source })?;
    journal
        .record(&entry)
        .map_err(|source| FreezeError::Journal { source })?;

    let started = Instant::now();
    let began = std::time::SystemTime::now();
    let expired = Arc::new(AtomicBool::new(false));
    let claimed = Arc::new(AtomicBool::new(false));
    let (disarm, disarmed) = mpsc::channel::<()>();
    let early = journal.live().register(operation_id);
    // Forgotten when the watchdog ends (or, when it cannot start, with its closure).
    let registered = journal.live().forget_on_drop(operation_id);
    let watchdog = {
        let (freezer, cgroups, expired, claimed) = (freezer.clone(), cgroups.clone(), expired.clone(), claimed.clone());
        let (journal, operation_id) = (journal.clone(), operation_id.to_owned());
        std::thread::Builder::new()
            .name(format!("thaw-{operation_id}"))
            .spawn(move || {
                // While it waits, an emergency thaw (the Thaw RPC) can bring it forward.
                let _registered = registered;
                // Thaw at the deadline unless disarmed first. A dropped sender without a
                // disarm (a failed thaw) still waits for the deadline and thaws then.
                let deadline = Instant::now() + limits.max_freeze;
                let early = loop {
                    if let Some(why) = early.lock().unwrap_or_else(PoisonError::into_inner).take() {
                        break Some(why);
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break None;
                    }
                    // Woken in slices, to see an emergency thaw soon.
                    let slice = left.min(EARLY_THAW_POLL);
                    match disarmed.recv_timeout(slice) {
                        Ok(()) => return,
                        Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(slice),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                    }
                };
                if claimed.swap(true, Ordering::SeqCst) {
                    // A release is ending it (killing, then thawing): thaw only if it
                    // failed to, never in the middle of its kill.
                    if disarmed.recv().is_ok() {
                        return;
                    }
                    let _ = thaw_all(freezer.as_ref(), &cgroups);
                    return;
                }
                // Thawed first, recorded after: the pod's deadline comes before the books.
                let _ = thaw_all(freezer.as_ref(), &cgroups);
                let why = early.unwrap_or_else(|| deadline_passed(limits.max_freeze));
                if let Err(e) = journal.record_end(&operation_id, &FreezeEnd::thawed_without_release(why)) {
                    tracing::warn!(%operation_id, error = %e, "cannot record how the freeze ended");
                }
                expired.store(true, Ordering::SeqCst);
            })
    };
    let watchdog = match watchdog {
        Ok(handle) => handle,
        Err(source) => {
            let _ = journal.clear(operation_id);
            return Err(FreezeError::Watchdog { source });
        }
    };
    let mut frozen = FrozenPod {
        freezer: freezer.clone(),
        journal: journal.clone(),
        operation_id: operation_id.to_owned(),
        cgroups: cgroups.clone(),
        started,
        began,
        settle: Duration::ZERO,
        max_freeze: limits.max_freeze,
        expired,
        claimed,
        disarm: Some(disarm),
        watchdog: Some(watchdog),
    };

    // From here on, any error returns through `frozen`'s drop, which thaws.
    let pod = &cgroups.pod;
    freezer.freeze(pod).map_err(|source| FreezeError::Freeze {
        cgroup: pod.clone(),
        source,
    })?;
    wait_until_frozen(freezer.as_ref(), pod, limits.settle)?;
    frozen.settle = started.elapsed();
    for cgroup in &cgroups.containers {
        freezer.freeze(cgroup).map_err(|source| FreezeError::Freeze {
            cgroup: cgroup.clone(),
            source,
        })?;
    }
    freezer.thaw(pod).map_err(|source| FreezeError::Thaw {
        cgroup: pod.clone(),
        source,
    })?;
    for cgroup in &cgroups.containers {
        let own = freezer.self_frozen(cgroup).map_err(|source| FreezeError::State {
            cgroup: cgroup.clone(),
            source,
        })?;
        if !own {
            return Err(FreezeError::NotSelfFrozen { cgroup: cgroup.clone() });
        }
        wait_until_frozen(freezer.as_ref(), cgroup, limits.settle)?;
    }
    // Had the watchdog fired meanwhile (only it can have claimed the end yet), the
    // freezes above would have outlived it.
    if frozen.claimed.load(Ordering::SeqCst) {
        return Err(FreezeError::Expired {
            after: limits.max_freeze,
        });
    }
    Ok(frozen)
}

/// What the journal records of a freeze its deadline ended.
pub fn deadline_passed(max_freeze: Duration) -> String {
    format!("its freeze deadline ({} s) passed", max_freeze.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::*;
    use crate::cgroup::CgroupVersion;

    /// Models the kernel: a cgroup is effectively frozen when it or an ancestor asked.
    #[derive(Debug, Default)]
    struct FakeFreezer {
        own: Mutex<HashMap<String, bool>>,
        calls: Mutex<Vec<String>>,
        fail_freeze: Option<String>,
        /// Thaws of this cgroup fail this many times.
        fail_thaw: Option<(String, std::sync::atomic::AtomicUsize)>,
        root: PathBuf,
    }

    impl FakeFreezer {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn effective(&self, cgroup: &CgroupPath) -> bool {
            let own = self.own.lock().unwrap();
            own.iter().any(|(path, &frozen)| {
                frozen && (cgroup.as_str() == path || cgroup.as_str().starts_with(&format!("{path}/")))
            })
        }
    }

    impl Freezer for FakeFreezer {
        fn freeze(&self, cgroup: &CgroupPath) -> Result<(), CgroupError> {
            self.calls.lock().unwrap().push(format!("freeze {cgroup}"));
            if self.fail_freeze.as_deref() == Some(cgroup.as_str()) {
                return Err(CgroupError::Write {
                    path: cgroup.under(Path::new("/fake")),
                    source: std::io::ErrorKind::PermissionDenied.into(),
                });
            }
            self.own.lock().unwrap().insert(cgroup.as_str().to_owned(), true);
            Ok(())
        }
        fn thaw(&self, cgroup: &CgroupPath) -> Result<(), CgroupError> {
            self.calls.lock().unwrap().push(format!("thaw {cgroup}"));
            if let Some((path, left)) = &self.fail_thaw
                && path == cgroup.as_str()
                && left.load(Ordering::SeqCst) > 0
            {
                left.fetch_sub(1, Ordering::SeqCst);
                return Err(CgroupError::Write {
                    path: cgroup.under(Path::new("/fake")),
                    source: std::io::ErrorKind::Other.into(),
                });
            }
            self.own.lock().unwrap().insert(cgroup.as_str().to_owned(), false);
            Ok(())
        }
        fn state(&self, cgroup: &CgroupPath) -> Result<FreezerState, CgroupError> {
            Ok(if self.effective(cgroup) {
                FreezerState::Frozen
            } else {
                FreezerState::Thawed
            })
        }
        fn self_frozen(&self, cgroup: &CgroupPath) -> Result<bool, CgroupError> {
            Ok(*self.own.lock().unwrap().get(cgroup.as_str()).unwrap_or(&false))
        }
        fn version(&self) -> CgroupVersion {
            CgroupVersion::V1
        }
        fn root(&self) -> &Path {
            &self.root
        }
    }

    fn pod() -> PodCgroups {
        PodCgroups {
            pod: CgroupPath::new("/p"),
            containers: vec![CgroupPath::new("/p/a"), CgroupPath::new("/p/b")],
        }
    }

    const LIMITS: FreezeLimits = FreezeLimits {
        max_freeze: Duration::from_secs(30),
        settle: Duration::from_secs(1),
    };

    #[test]
    fn freezes_the_pod_at_once_then_hands_over_to_the_containers() {
        let freezer = Arc::new(FakeFreezer::default());
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let frozen = freeze_pod(freezer.clone(), &journal, "op-1", &pod(), LIMITS).unwrap();
        assert_eq!(freezer.calls(), ["freeze /p", "freeze /p/a", "freeze /p/b", "thaw /p"]);
        assert!(freezer.effective(&CgroupPath::new("/p/a")) && freezer.effective(&CgroupPath::new("/p/b")));
        assert!(
            !freezer.effective(&CgroupPath::new("/p")),
            "the pod cgroup is thawed so CRIU can seize the tasks"
        );
        assert_eq!(
            journal.entries().unwrap().len(),
            1,
            "the freeze is journaled while it lasts"
        );

        let report = frozen.thaw().unwrap();
        assert!(!report.expired);
        assert!(!freezer.effective(&CgroupPath::new("/p/a")) && !freezer.effective(&CgroupPath::new("/p/b")));
        assert!(journal.entries().unwrap().is_empty());
    }

    #[test]
    fn a_failed_container_freeze_thaws_everything() {
        let freezer = Arc::new(FakeFreezer {
            fail_freeze: Some("/p/b".into()),
            ..Default::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let err = freeze_pod(freezer.clone(), &journal, "op-2", &pod(), LIMITS).unwrap_err();
        assert!(
            matches!(&err, FreezeError::Freeze { cgroup, .. } if cgroup.as_str() == "/p/b"),
            "{err}"
        );
        for cg in ["/p", "/p/a", "/p/b"] {
            assert!(!freezer.effective(&CgroupPath::new(cg)), "{cg} left frozen");
        }
        assert!(journal.entries().unwrap().is_empty());
    }

    #[test]
    fn dropping_a_frozen_pod_thaws_it() {
        let freezer = Arc::new(FakeFreezer::default());
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        drop(freeze_pod(freezer.clone(), &journal, "op-3", &pod(), LIMITS).unwrap());
        assert!(!freezer.effective(&CgroupPath::new("/p/a")));
        assert!(journal.entries().unwrap().is_empty());
    }

    /// Waits for the watchdog to fire (5 s at the most).
    fn wait_expired(frozen: &FrozenPod) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !frozen.expired() {
            assert!(Instant::now() < deadline, "the watchdog did not fire");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A pod frozen as operation `op` for 50 ms, once the watchdog thawed it.
    fn expired_freeze(op: &str) -> (Arc<FakeFreezer>, tempfile::TempDir, Journal, FrozenPod) {
        let freezer = Arc::new(FakeFreezer::default());
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let limits = FreezeLimits {
            max_freeze: Duration::from_millis(50),
            ..LIMITS
        };
        let frozen = freeze_pod(freezer.clone(), &journal, op, &pod(), limits).unwrap();
        wait_expired(&frozen);
        (freezer, dir, journal, frozen)
    }

    #[test]
    fn the_watchdog_thaws_at_the_deadline() {
        let (freezer, _dir, _journal, frozen) = expired_freeze("op-4");
        assert!(!freezer.effective(&CgroupPath::new("/p/a")) && !freezer.effective(&CgroupPath::new("/p/b")));
        assert!(frozen.thaw().unwrap().expired);
    }

    #[test]
    fn a_release_after_the_watchdog_kills_nothing_and_learns_the_pod_ran_on() {
        let (_freezer, _dir, journal, frozen) = expired_freeze("op-late");
        // Killing would read the fake cgroups' pids and fail: Ok means nothing was tried.
        let report = frozen.stop(&[CgroupPath::new("/p/a")]).unwrap();
        assert!(report.expired);
        match journal.end_of("op-late").unwrap() {
            Some(FreezeEnd::ThawedWithoutRelease { why, .. }) => assert_eq!(why, "its freeze deadline (0 s) passed"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_emergency_thaw_ends_the_freeze_as_its_deadline_would_and_a_release_then_kills_nothing() {
        let freezer = Arc::new(FakeFreezer::default());
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        // A migration's source, held long after its checkpoint.
        let frozen = freeze_pod(freezer.clone(), &journal, "op-held", &pod(), LIMITS).unwrap();
        assert!(journal.live().contains("op-held"));
        assert!(journal.live().thaw_now("op-held", "thawed by an SRE"));
        wait_expired(&frozen);
        assert!(!freezer.effective(&CgroupPath::new("/p/a")) && !freezer.effective(&CgroupPath::new("/p/b")));
        match journal.end_of("op-held").unwrap() {
            Some(FreezeEnd::ThawedWithoutRelease { why, .. }) => assert_eq!(why, "thawed by an SRE"),
            other => panic!("{other:?}"),
        }
        // The watchdog is gone: asked again, nothing is under way.
        let deadline = Instant::now() + Duration::from_secs(5);
        while journal.live().contains("op-held") {
            assert!(Instant::now() < deadline, "the watchdog did not forget its freeze");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!journal.live().thaw_now("op-held", "again"));
        // The migration's release after it: nothing killed (the fake's pids would fail
        // a kill), the pod ran on, and that end stands.
        let report = frozen.stop(&[CgroupPath::new("/p/a")]).unwrap();
        assert!(report.expired);
        assert!(matches!(
            journal.end_of("op-held").unwrap(),
            Some(FreezeEnd::ThawedWithoutRelease { why, .. }) if why == "thawed by an SRE"
        ));
        assert!(journal.entries().unwrap().is_empty());
    }

    #[test]
    fn an_emergency_thaw_after_the_release_changes_nothing() {
        let freezer = Arc::new(FakeFreezer::default());
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        freeze_pod(freezer.clone(), &journal, "op-done", &pod(), LIMITS)
            .unwrap()
            .thaw()
            .unwrap();
        assert!(
            !journal.live().contains("op-done"),
            "a disarmed watchdog forgets its freeze"
        );
        assert!(!journal.live().thaw_now("op-done", "late"));
        assert!(matches!(
            journal.end_of("op-done").unwrap(),
            Some(FreezeEnd::Released { stopped: false, .. })
        ));
    }

    #[test]
    fn each_freeze_records_how_it_ended_once() {
        let freezer = Arc::new(FakeFreezer::default());
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        freeze_pod(freezer.clone(), &journal, "op-t", &pod(), LIMITS)
            .unwrap()
            .thaw()
            .unwrap();
        assert!(matches!(
            journal.end_of("op-t").unwrap(),
            Some(FreezeEnd::Released { stopped: false, .. })
        ));
        drop(freeze_pod(freezer.clone(), &journal, "op-d", &pod(), LIMITS).unwrap());
        assert!(matches!(
            journal.end_of("op-d").unwrap(),
            Some(FreezeEnd::ThawedWithoutRelease { .. })
        ));
        // A later end (a restarted agent's recovery) does not overwrite the first.
        assert!(
            !journal
                .record_end("op-t", &FreezeEnd::thawed_without_release("later"))
                .unwrap()
        );
        assert!(matches!(
            journal.end_of("op-t").unwrap(),
            Some(FreezeEnd::Released { .. })
        ));
        assert_eq!(journal.end_of("op-never").unwrap(), None);
        assert!(journal.entries().unwrap().is_empty(), "ends are not entries");
    }

    #[test]
    fn recovery_records_that_the_pod_ran_on_unless_it_was_released_first() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        for id in ["op-crash", "op-released"] {
            // What a killed agent leaves (a hierarchy that is not mounted here).
            journal
                .record(&JournalEntry {
                    operation_id: id.into(),
                    version: CgroupVersion::V1,
                    root: dir.path().join("no-hierarchy"),
                    pod: CgroupPath::new("/p"),
                    containers: vec![CgroupPath::new("/p/a")],
                    deadline_unix_millis: 0,
                    frozen_at_unix_millis: 0,
                })
                .unwrap();
        }
        journal.record_end("op-released", &FreezeEnd::released(true)).unwrap();
        crate::journal::recover(&journal).unwrap();
        assert!(matches!(
            journal.end_of("op-crash").unwrap(),
            Some(FreezeEnd::ThawedWithoutRelease { why, .. }) if why == "the agent restarted and thawed it"
        ));
        assert!(matches!(
            journal.end_of("op-released").unwrap(),
            Some(FreezeEnd::Released { stopped: true, .. })
        ));
    }

    #[test]
    fn the_journal_and_the_kernel_tell_which_recorded_pods_are_frozen_now() {
        use crate::journal::{ContainerFreezer, observe};
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path().join("journal")).unwrap();
        // A unified hierarchy as the kernel shows it: one container frozen, one running.
        let root = dir.path().join("cgroup");
        for (cgroup, frozen) in [("p/a", "1"), ("p/b", "0")] {
            std::fs::create_dir_all(root.join(cgroup)).unwrap();
            std::fs::write(
                root.join(cgroup).join("cgroup.events"),
                format!("populated 1\nfrozen {frozen}\n"),
            )
            .unwrap();
            std::fs::write(root.join(cgroup).join("cgroup.freeze"), frozen).unwrap();
        }
        journal
            .record(&JournalEntry {
                operation_id: "op-1".into(),
                version: CgroupVersion::V2,
                root,
                pod: CgroupPath::new("/p"),
                containers: vec![
                    CgroupPath::new("/p/a"),
                    CgroupPath::new("/p/b"),
                    CgroupPath::new("/p/gone"),
                ],
                deadline_unix_millis: 5_000,
                frozen_at_unix_millis: 2_000,
            })
            .unwrap();
        let seen = observe(&journal).unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].containers,
            [
                ContainerFreezer::State(crate::cgroup::FreezerState::Frozen),
                ContainerFreezer::State(crate::cgroup::FreezerState::Thawed),
                ContainerFreezer::Gone,
            ]
        );
        assert!(seen[0].frozen());
        assert_eq!(seen[0].frozen_at, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2)));
        assert_eq!(seen[0].deadline, SystemTime::UNIX_EPOCH + Duration::from_secs(5));
    }

    #[test]
    fn a_failed_thaw_is_retried_by_the_watchdog_at_the_deadline() {
        // Two thaw rounds of five attempts fail; the watchdog's round at the deadline works.
        let freezer = Arc::new(FakeFreezer {
            fail_thaw: Some(("/p/a".into(), 10.into())),
            ..Default::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let limits = FreezeLimits {
            max_freeze: Duration::from_secs(3),
            ..LIMITS
        };
        let frozen = freeze_pod(freezer.clone(), &journal, "op-5", &pod(), limits).unwrap();
        assert!(matches!(frozen.thaw(), Err(FreezeError::Thaw { .. })));
        assert_eq!(
            journal.entries().unwrap().len(),
            1,
            "the entry stays for a restarted agent"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while freezer.effective(&CgroupPath::new("/p/a")) {
            assert!(
                Instant::now() < deadline,
                "the watchdog did not thaw after the failed thaw"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_vanished_cgroup_counts_as_thawed() {
        #[derive(Debug)]
        struct Gone(FakeFreezer);
        impl Freezer for Gone {
            fn freeze(&self, c: &CgroupPath) -> Result<(), CgroupError> {
                self.0.freeze(c)
            }
            fn thaw(&self, c: &CgroupPath) -> Result<(), CgroupError> {
                if c.as_str() == "/p/b" {
                    return Err(CgroupError::Write {
                        path: c.under(Path::new("/fake")),
                        source: std::io::ErrorKind::NotFound.into(),
                    });
                }
                self.0.thaw(c)
            }
            fn state(&self, c: &CgroupPath) -> Result<FreezerState, CgroupError> {
                self.0.state(c)
            }
            fn self_frozen(&self, c: &CgroupPath) -> Result<bool, CgroupError> {
                self.0.self_frozen(c)
            }
            fn version(&self) -> CgroupVersion {
                CgroupVersion::V1
            }
            fn root(&self) -> &Path {
                self.0.root()
            }
        }
        let freezer = Arc::new(Gone(FakeFreezer::default()));
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let frozen = freeze_pod(freezer, &journal, "op-6", &pod(), LIMITS).unwrap();
        let thawed = frozen.thaw();
        assert!(thawed.is_ok(), "{thawed:?}");
        assert!(journal.entries().unwrap().is_empty());
    }

    #[test]
    fn a_bad_operation_id_freezes_nothing() {
        let freezer = Arc::new(FakeFreezer::default());
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let err = freeze_pod(freezer.clone(), &journal, "../escape", &pod(), LIMITS).unwrap_err();
        assert!(matches!(err, FreezeError::Journal { .. }));
        assert!(freezer.calls().is_empty());
    }
}
