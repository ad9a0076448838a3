//! Removing what no operation will use from the agent's state directory. Prepared
//! restores hold decrypted memory and shared state, and checkpoint work directories
//! hold raw CRIU images: neither may outlive its use. What stays of a restore is its
//! bookkeeping (manifest, bound pod, restored and failed markers), which the runtime
//! handler needs when a restored container restarts.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::restore::PREPARED_MANIFEST;

/// The files of a prepared restore that hold no pod data. `criu.conf` stays because
/// runc reads it again on every later checkpoint of a restored container.
const BOOKKEEPING: [&str; 6] = [
    crate::handler::CONTINUED_FILE,
    PREPARED_MANIFEST,
    crate::handler::RESTORED_POD_FILE,
    ".failed",
    ".network-held",
    "criu.conf",
];

/// What becomes of one entry of the restores directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sweep {
    /// In use, or already holds nothing but bookkeeping.
    Keep,
    /// Remove its pod data, keep its bookkeeping.
    Scrub,
    /// Remove it whole (a preparation that never finished).
    Remove,
}

/// What a prepared restore looks like on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreDir {
    /// A `.<id>.partial` directory, left by a preparation that died.
    pub partial: bool,
    /// Its restore failed: no container of it will run.
    pub failed: bool,
    /// Every container of it was restored.
    pub all_restored: bool,
    /// It still holds pod data.
    pub has_data: bool,
    /// Since it was prepared.
    pub age: Duration,
}

/// Decides one entry. A partial directory older than `dead_after` belongs to a
/// preparation that died (at start: a predecessor's; the margin spares one another
/// agent sharing the directory may still run). A prepared restore nobody used within
/// `ttl` is scrubbed, so that a PodRestore that was deleted or failed before its pod
/// started leaves no memory on the node.
pub fn decide(dir: RestoreDir, dead_after: Duration, ttl: Duration) -> Sweep {
    if dir.partial {
        return if dir.age >= dead_after || dir.age > ttl {
            Sweep::Remove
        } else {
            Sweep::Keep
        };
    }
    if !dir.has_data {
        return Sweep::Keep;
    }
    if dir.failed || dir.all_restored || dir.age > ttl {
        Sweep::Scrub
    } else {
        Sweep::Keep
    }
}

/// Removes the pod data of a prepared restore: shared state, CRIU images, rootfs
/// changes and CRIU work directories; the bookkeeping stays.
pub fn scrub(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if BOOKKEEPING.contains(&name.as_ref()) || name == ".restored-ids" {
            continue;
        }
        if name == "containers" {
            for container in std::fs::read_dir(entry.path())?.flatten() {
                for item in std::fs::read_dir(container.path())?.flatten() {
                    if item.file_name() != ".restored" {
                        remove_any(&item.path())?;
                    }
                }
            }
            continue;
        }
        remove_any(&entry.path())?;
    }
    Ok(())
}

/// Discards prepared restore `id` under `restores` now (its PodRestore failed): the
/// pod data of a prepared one is scrubbed, as a sweep would, and a preparation still
/// in progress loses its directory (its unpack, reopening it, then fails). `true`
/// when there was something. `id` must be a checked operation id.
pub fn discard(restores: &Path, id: &str) -> std::io::Result<bool> {
    let mut found = false;
    let partial = restores.join(format!(".{id}.partial"));
    match std::fs::symlink_metadata(&partial) {
        Ok(_) => {
            remove_any(&partial)?;
            found = true;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = restores.join(id);
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) if meta.is_dir() => {
            scrub(&dir)?;
            found = true;
        }
        Ok(_) => return Err(std::io::Error::other(format!("{} is not a directory", dir.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(found)
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn looks(dir: &Path, partial: bool, now: SystemTime) -> RestoreDir {
    let prepared_at = std::fs::metadata(dir.join(PREPARED_MANIFEST))
        .or_else(|_| std::fs::metadata(dir))
        .and_then(|m| m.modified())
        .unwrap_or(now);
    let containers: Vec<PathBuf> = std::fs::read_dir(dir.join("containers"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let has_data = std::fs::read_dir(dir).is_ok_and(|d| {
        d.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !BOOKKEEPING.contains(&name.as_ref()) && name != "containers"
        })
    }) || containers
        .iter()
        .any(|c| std::fs::read_dir(c).is_ok_and(|d| d.flatten().any(|e| e.file_name() != ".restored")));
    RestoreDir {
        partial,
        failed: dir.join(".failed").exists(),
        all_restored: !containers.is_empty() && containers.iter().all(|c| c.join(".restored").exists()),
        has_data,
        age: now.duration_since(prepared_at).unwrap_or_default(),
    }
}

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Restores whose pod data was removed.
    pub scrubbed: Vec<String>,
    /// Directories removed whole.
    pub removed: Vec<String>,
    /// What could not be removed, with why.
    pub failures: Vec<String>,
}

/// Sweeps `<state>/restores` and `<state>/work` (the staging of checkpoints): a
/// partial restore older than `dead_after`, or a work directory older than
/// `work_dead_after`, is a dead operation's (every operation ends within its timeout,
/// an hour at the most). At start every work directory is dead: a checkpoint the
/// operator retries under the same id must find none.
pub fn sweep(restores: &Path, work: &Path, dead_after: Duration, work_dead_after: Duration, ttl: Duration) -> Swept {
    let now = SystemTime::now();
    let mut swept = Swept::default();
    for entry in std::fs::read_dir(restores).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == ".restored-ids" || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let partial = name.starts_with('.') && name.ends_with(".partial");
        let path = entry.path();
        let result = match decide(looks(&path, partial, now), dead_after, ttl) {
            Sweep::Keep => continue,
            Sweep::Scrub => scrub(&path).map(|()| swept.scrubbed.push(name.clone())),
            Sweep::Remove => remove_any(&path).map(|()| swept.removed.push(name.clone())),
        };
        if let Err(e) = result {
            swept.failures.push(format!("{}: {e}", path.display()));
        }
    }
    for entry in std::fs::read_dir(work).into_iter().flatten().flatten() {
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| now.duration_since(t).unwrap_or_default())
            .unwrap_or_default();
        if age >= work_dead_after {
            let path = entry.path();
            match remove_any(&path) {
                Ok(()) => swept
                    .removed
                    .push(format!("work/{}", entry.file_name().to_string_lossy())),
                Err(e) => swept.failures.push(format!("{}: {e}", path.display())),
            }
        }
    }
    swept
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const MINUTES: Duration = Duration::from_secs(600);

    fn dir(partial: bool, failed: bool, all_restored: bool, has_data: bool, age: Duration) -> RestoreDir {
        RestoreDir {
            partial,
            failed,
            all_restored,
            has_data,
            age,
        }
    }

    #[test]
    fn restores_keep_their_data_only_while_a_pod_may_still_use_it() {
        let fresh = Duration::from_secs(5);
        let table = [
            // (dir, dead after, expected): at start staging is dead after minutes,
            // later after the time to live.
            (dir(false, false, false, true, fresh), HOUR, Sweep::Keep),
            (dir(false, false, false, true, fresh), MINUTES, Sweep::Keep),
            (dir(false, false, false, true, 2 * HOUR), HOUR, Sweep::Scrub),
            (dir(false, true, false, true, fresh), HOUR, Sweep::Scrub),
            (dir(false, false, true, true, fresh), HOUR, Sweep::Scrub),
            (dir(false, true, false, false, 2 * HOUR), MINUTES, Sweep::Keep),
            (dir(true, false, false, true, fresh), HOUR, Sweep::Keep),
            // Another agent's preparation, just begun, survives a start.
            (dir(true, false, false, true, fresh), MINUTES, Sweep::Keep),
            (dir(true, false, false, true, 2 * MINUTES), MINUTES, Sweep::Remove),
            (dir(true, false, false, true, 2 * HOUR), HOUR, Sweep::Remove),
        ];
        for (d, dead_after, expected) in table {
            assert_eq!(decide(d, dead_after, HOUR), expected, "{d:?} dead after {dead_after:?}");
        }
    }

    #[test]
    fn a_sweep_removes_memory_and_keeps_the_handlers_bookkeeping() {
        let state = tempfile::tempdir().unwrap();
        let (restores, work) = (state.path().join("restores"), state.path().join("work"));
        // r1: every container restored, its shared state still there.
        let r1 = restores.join("r1");
        std::fs::create_dir_all(r1.join("containers/app")).unwrap();
        std::fs::create_dir_all(r1.join("pod/volume")).unwrap();
        std::fs::write(r1.join("pod/shm.tar"), b"secret").unwrap();
        std::fs::write(r1.join("containers/app/.restored"), b"id").unwrap();
        std::fs::write(r1.join(PREPARED_MANIFEST), b"{}").unwrap();
        std::fs::write(r1.join(crate::handler::RESTORED_POD_FILE), b"{}").unwrap();
        // r2: prepared, its pod not started yet.
        let r2 = restores.join("r2");
        std::fs::create_dir_all(r2.join("containers/app/checkpoint")).unwrap();
        std::fs::write(r2.join("containers/app/checkpoint/pages-1.img"), b"memory").unwrap();
        std::fs::write(r2.join(PREPARED_MANIFEST), b"{}").unwrap();
        // A preparation that died, and a dead checkpoint's staging.
        std::fs::create_dir_all(restores.join(".r3.partial/.fetched")).unwrap();
        std::fs::create_dir_all(work.join("op-1/containers")).unwrap();

        let swept = sweep(&restores, &work, Duration::ZERO, Duration::ZERO, HOUR);
        assert_eq!(swept.scrubbed, ["r1"]);
        assert_eq!(swept.removed.len(), 2, "{swept:?}");
        assert!(swept.failures.is_empty(), "{swept:?}");
        assert!(!r1.join("pod").exists());
        assert!(r1.join("containers/app/.restored").exists());
        assert!(r1.join(PREPARED_MANIFEST).exists());
        assert!(
            r2.join("containers/app/checkpoint/pages-1.img").exists(),
            "still to be used"
        );
        assert!(!restores.join(".r3.partial").exists());
        assert!(std::fs::read_dir(&work).unwrap().next().is_none());

        // Nobody came for r2 within the time to live.
        let swept = sweep(&restores, &work, HOUR, HOUR, Duration::ZERO);
        assert_eq!(swept.scrubbed, ["r2"]);
        assert!(!r2.join("containers/app/checkpoint").exists());
        assert_eq!(sweep(&restores, &work, HOUR, HOUR, Duration::ZERO), Swept::default());
    }

    #[test]
    fn a_discarded_restore_loses_its_data_prepared_or_in_progress() {
        let state = tempfile::tempdir().unwrap();
        let restores = state.path().join("restores");
        let prepared = restores.join("r1");
        std::fs::create_dir_all(prepared.join("containers/app/checkpoint")).unwrap();
        std::fs::write(prepared.join("containers/app/checkpoint/pages-1.img"), b"memory").unwrap();
        std::fs::write(prepared.join(PREPARED_MANIFEST), b"{}").unwrap();
        std::fs::create_dir_all(restores.join(".r2.partial/containers")).unwrap();
        std::fs::write(restores.join(".r2.partial/containers/pages-1.img"), b"memory").unwrap();
        assert!(discard(&restores, "r1").unwrap());
        assert!(
            !prepared.join("containers/app/checkpoint").exists(),
            "the memory is gone"
        );
        assert!(prepared.join(PREPARED_MANIFEST).exists(), "the bookkeeping stays");
        assert!(discard(&restores, "r2").unwrap());
        assert!(!restores.join(".r2.partial").exists());
        assert!(!discard(&restores, "r3").unwrap(), "nothing there");
    }
}
