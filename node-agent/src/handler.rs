//! cryopod's runtime handler: an OCI runtime that containerd's runc shim runs in
//! place of runc (`BinaryName`). Every call goes to runc unchanged, except `create`
//! of a container whose pod carries the annotation `cryopod.io/restore` and whose
//! checkpoint the agent has prepared: then the pod's shared state is put back (once),
//! the container's rootfs changes are applied, the pod's loopback is held, and the
//! container is restored with `runc restore` instead of created. Its `start` is then
//! a no-op, since a restored process already runs. The hold is released once the last
//! container of the checkpoint is back, so loopback TCP peers never see the other
//! end missing. A container restarted later starts fresh: each is restored once.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::package::Manifest;
use crate::restore::PREPARED_MANIFEST;

/// The pod annotation naming the prepared restore (its id).
pub const RESTORE_ANNOTATION: &str = "cryopod.io/restore";
/// CRI annotation of the container kind (`sandbox` or `container`).
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI annotation of the container's name in the pod.
const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
/// CRI annotations of the pod a container belongs to.
const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// runc reads CRIU's configuration file from this annotation.
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// The file of a prepared restore naming the one pod that may use it.
pub const RESTORED_POD_FILE: &str = "restored-pod.json";

/// Written in a prepared restore's directory by the agent once it continued the
/// pod's processes (a migration's target, restored stopped).
pub const CONTINUED_FILE: &str = ".continued";

/// The pod a prepared restore is bound to. Any pod may carry the restore annotation
/// (a tenant can copy another restore's id); only this one gets the memory.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct RestoredPod {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// Its processes are restored stopped, and stay so until the agent continues
    /// them (a migration's target, until its source is stopped for good).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub start_stopped: bool,
}

/// The pod the prepared restore in `dir` is bound to, if its binding reads.
fn restored_pod_of(dir: &Path) -> Option<RestoredPod> {
    std::fs::read(dir.join(RESTORED_POD_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The handler's settings: `<handler binary>.json` beside the binary.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HandlerConfig {
    /// The real runc.
    pub runc: PathBuf,
    /// Where the agent prepares restores (`<state dir>/restores`).
    pub restores: PathBuf,
    /// Put first in PATH so runc finds this CRIU.
    #[serde(default)]
    pub criu_dir: Option<PathBuf>,
    /// iptables, to hold the pod's loopback.
    #[serde(default = "default_iptables")]
    pub iptables: PathBuf,
    /// nsenter, to run iptables in the pod's network namespace.
    #[serde(default = "default_nsenter")]
    pub nsenter: PathBuf,
}

fn default_iptables() -> PathBuf {
    PathBuf::from("iptables")
}

fn default_nsenter() -> PathBuf {
    PathBuf::from("nsenter")
}

/// A runc command line, split where the handler needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuncCall {
    /// Global flags, before the command (`--root`, `--log`, ...), kept as given.
    pub globals: Vec<String>,
    /// The command (`create`, `start`, `delete`, ...).
    pub command: String,
    /// The command's arguments, kept as given.
    pub args: Vec<String>,
}

/// runc's global flags that take a value.
const GLOBAL_VALUE_FLAGS: [&str; 5] = ["--root", "--log", "--log-format", "--criu", "--rootless"];

impl RuncCall {
    /// Splits runc's argument list (without the program name).
    pub fn parse(args: &[String]) -> Option<Self> {
        let mut globals = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            if !arg.starts_with('-') {
                return Some(Self {
                    globals,
                    command: arg.clone(),
                    args: args[i + 1..].to_vec(),
                });
            }
            globals.push(arg.clone());
            if GLOBAL_VALUE_FLAGS.contains(&arg.as_str()) {
                globals.push(args.get(i + 1)?.clone());
                i += 1;
            }
            i += 1;
        }
        None
    }

    /// The value of a command flag (`--bundle X`, `--bundle=X`, or `-b X`).
    pub fn flag(&self, long: &str, short: Option<&str>) -> Option<&str> {
        let mut it = self.args.iter();
        while let Some(arg) = it.next() {
            if let Some(value) = arg.strip_prefix(long).and_then(|r| r.strip_prefix('=')) {
                return Some(value);
            }
            if arg == long || short.is_some_and(|s| arg == s) {
                return it.next().map(String::as_str);
            }
        }
        None
    }

    /// The container id: the last argument.
    pub fn container_id(&self) -> Option<&str> {
        self.args.last().map(String::as_str).filter(|a| !a.starts_with('-'))
    }
}

/// What to do with a `create`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateDecision {
    /// Hand it to runc as it is.
    Create,
    /// Restore container `name` from the prepared restore in `dir`.
    Restore { dir: PathBuf, name: String },
}

/// The restored-once marker of a container in a prepared restore.
fn restored_marker(dir: &Path, name: &str) -> PathBuf {
    dir.join("containers").join(name).join(".restored")
}

/// The marker of a restore that failed: no container of its pod may run any more.
fn failed_marker(dir: &Path) -> PathBuf {
    dir.join(".failed")
}

/// The marker that makes `start` a no-op for a restored container id.
fn started_marker(restores: &Path, id: &str) -> PathBuf {
    restores.join(".restored-ids").join(id)
}

/// Decides a `create` from the bundle's OCI spec.
pub fn decide_create(spec: &serde_json::Value, restores: &Path) -> Result<CreateDecision, String> {
    let annotations = &spec["annotations"];
    let Some(restore_id) = annotations[RESTORE_ANNOTATION].as_str() else {
        return Ok(CreateDecision::Create);
    };
    if annotations[CONTAINER_TYPE].as_str() != Some("container") {
        return Ok(CreateDecision::Create);
    }
    let name = annotations[CONTAINER_NAME].as_str().unwrap_or_default();
    if crate::journal::Journal::check_operation_id(restore_id).is_err() {
        return Err(format!("{RESTORE_ANNOTATION}: {restore_id:?} is not a restore id"));
    }
    let dir = restores.join(restore_id);
    if !dir.join(PREPARED_MANIFEST).exists() {
        // Starting afresh would silently lose the state the pod was created to get back.
        return Err(format!(
            "restore {restore_id} is not prepared on this node ({} is missing)",
            dir.display()
        ));
    }
    let bound = restored_pod_of(&dir);
    let (namespace, pod) = (
        annotations[SANDBOX_NAMESPACE].as_str().unwrap_or_default(),
        annotations[SANDBOX_NAME].as_str().unwrap_or_default(),
    );
    let start_stopped = bound.as_ref().is_some_and(|b| b.start_stopped);
    match bound {
        Some(b) if b.namespace == namespace && b.name == pod => {}
        Some(b) => {
            return Err(format!(
                "restore {restore_id} belongs to pod {}/{}, not to {namespace}/{pod}: refused",
                b.namespace, b.name
            ));
        }
        None => {
            return Err(format!(
                "restore {restore_id} names no pod that may use it ({RESTORED_POD_FILE} is missing or unreadable): refused"
            ));
        }
    }
    if let Ok(reason) = std::fs::read_to_string(failed_marker(&dir)) {
        // Half a pod restored is worse than none: once one container failed, none runs.
        return Err(format!(
            "restore {restore_id} failed, so no container of this pod runs: {reason}"
        ));
    }
    // Held stopped for a migration and not yet let run: a restart (a probe failed on
    // the stopped processes) would start it fresh next to a source that may still
    // run. It is refused until the agent continued the pod.
    if start_stopped && restored_marker(&dir, name).exists() && !dir.join(CONTINUED_FILE).exists() {
        return Err(format!(
            "container {name} of restore {restore_id} is held stopped until its migration's source is stopped for good: \
             it is not started afresh"
        ));
    }
    if !dir.join("containers").join(name).join("checkpoint").is_dir() || restored_marker(&dir, name).exists() {
        // Not in the checkpoint (a container added since), or restored before: this is
        // a restart, which starts fresh.
        return Ok(CreateDecision::Create);
    }
    Ok(CreateDecision::Restore {
        dir,
        name: name.to_owned(),
    })
}

/// Applies a `rootfs-diff.tar` to a rootfs built from the tenant's image: OCI whiteouts
/// delete, an opaque marker empties its directory, every other entry is written with
/// its owner, mode and xattrs. Nothing is written or deleted outside `rootfs`, not even
/// through a symlink of the image (`x -> /`): this runs as host root.
pub fn apply_rootfs_diff(diff: &Path, rootfs: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(diff)?;
    crate::safe_fs::unpack(file, rootfs, crate::safe_fs::UnpackOptions::ROOTFS_DIFF).map_err(std::io::Error::other)
}

/// The pod's PID namespace when the container joins it (`shareProcessNamespace`).
pub fn joined_pid_namespace(spec: &serde_json::Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "pid")
        .and_then(|n| n["path"].as_str())
        .map(PathBuf::from)
}

/// Sends SIGCONT to every process of the PID namespace at `ns` (a `/proc/<pid>/ns/pid`
/// path); returns how many it reached.
///
/// Containers sharing a PID namespace are restored stopped, one after the other, and
/// continued together: a restored container that ran would fork children onto PIDs
/// that the next container's processes need ("Can't fork for 90: File exists").
pub fn continue_pid_namespace(ns: &Path) -> std::io::Result<usize> {
    let target = std::fs::read_link(ns)?;
    let mut reached = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_link(entry.path().join("ns/pid")).is_ok_and(|link| link == target)
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGCONT).is_ok()
        {
            reached += 1;
        }
    }
    Ok(reached)
}

/// Puts the pod's shared state back into the mounts of this container that hold it
/// (`/dev/shm`, emptyDirs), each once per restore; returns what it restored.
pub fn restore_shared_state(spec: &serde_json::Value, dir: &Path) -> std::io::Result<Vec<String>> {
    let mut restored = Vec::new();
    for mount in spec["mounts"].as_array().into_iter().flatten() {
        let (destination, source) = (
            mount["destination"].as_str().unwrap_or_default(),
            mount["source"].as_str().unwrap_or_default(),
        );
        let tar = if destination == "/dev/shm" {
            dir.join("pod/shm.tar")
        } else if let Some((_, volume)) = source.split_once(crate::capture::EMPTY_DIR_MARKER) {
            dir.join("pod/volume")
                .join(format!("{}.tar", volume.trim_end_matches('/')))
        } else {
            continue;
        };
        let done = tar.with_extension("restored");
        if !tar.exists() || done.exists() {
            continue;
        }
        // The tar is the tenant's: it stays inside the volume, owners and all.
        crate::safe_fs::unpack(
            std::fs::File::open(&tar)?,
            Path::new(source),
            crate::safe_fs::UnpackOptions::TREE,
        )
        .map_err(std::io::Error::other)?;
        std::fs::write(&done, b"")?;
        restored.push(destination.to_owned());
    }
    Ok(restored)
}

/// The iptables rules that hold the pod's loopback, as argument lists for `-I`/`-D`.
fn hold_rules() -> [[&'static str; 6]; 2] {
    [
        ["INPUT", "-i", "lo", "-j", "DROP", "-w"],
        ["OUTPUT", "-o", "lo", "-j", "DROP", "-w"],
    ]
}

/// The restore of one container, run as the handler's `create`.
#[derive(Debug)]
pub struct ContainerRestore<'a> {
    /// Settings.
    pub config: &'a HandlerConfig,
    /// The shim's call.
    pub call: &'a RuncCall,
    /// The prepared restore.
    pub dir: &'a Path,
    /// The container's name.
    pub name: &'a str,
}

impl ContainerRestore<'_> {
    /// Runs the restore; the error says what failed, for the kubelet's event.
    pub fn run(&self) -> Result<(), String> {
        let bundle = PathBuf::from(self.call.flag("--bundle", Some("-b")).unwrap_or("."));
        let id = self.call.container_id().ok_or("no container id")?.to_owned();
        let spec_path = bundle.join("config.json");
        let mut spec: serde_json::Value = std::fs::read(&spec_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| format!("cannot read {}", spec_path.display()))?;
        let manifest: Manifest = std::fs::read(self.dir.join(PREPARED_MANIFEST))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("cannot read the prepared manifest")?;
        let netns = spec["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .map(str::to_owned);

        // The pod's loopback is held from the first restored container to the last.
        let held = self.dir.join(".network-held");
        if let Some(netns) = &netns
            && !held.exists()
        {
            self.iptables(netns, "-I")?;
            std::fs::write(&held, b"").map_err(|e| format!("cannot mark the hold: {e}"))?;
        }
        // Connections on the old pod IP cannot come back on the new one. CRIU cannot
        // close some connections and keep others, so then all come back closed.
        let close_tcp = !manifest.pod_ip_connections.is_empty();
        let shared_pids = joined_pid_namespace(&spec);
        let start_stopped = restored_pod_of(self.dir).is_some_and(|bound| bound.start_stopped);
        let result = self.restore(
            &mut spec,
            &spec_path,
            &bundle,
            &id,
            close_tcp,
            shared_pids.is_some() || start_stopped,
        );
        if let Err(reason) = &result {
            self.fail_restore(reason);
        }
        let all_back = manifest
            .containers
            .iter()
            .all(|c| restored_marker(self.dir, &c.name).exists());
        // Processes restored stopped go on together, once all are back (or the
        // restore failed: nothing stays stopped), unless they wait for the agent: a
        // failed restore's pod is deleted without running.
        if !start_stopped
            && (result.is_err() || all_back)
            && let Some(pid_ns) = &shared_pids
        {
            continue_pid_namespace(pid_ns).map_err(|e| format!("cannot continue the pod's processes: {e}"))?;
        }
        if (result.is_err() || all_back)
            && let Some(netns) = &netns
            && held.exists()
        {
            self.iptables(netns, "-D")?;
            let _ = std::fs::remove_file(&held);
        }
        // The pod's memory and shared state are not needed once every container is
        // back, or none will be: they leave the node now, not at the next sweep.
        if (result.is_err() || all_back)
            && let Err(e) = crate::sweep::scrub(self.dir)
        {
            eprintln!("cryopod-runc: cannot remove the data of {}: {e}", self.dir.display());
        }
        result
    }

    fn restore(
        &self,
        spec: &mut serde_json::Value,
        spec_path: &Path,
        bundle: &Path,
        id: &str,
        close_tcp: bool,
        leave_stopped: bool,
    ) -> Result<(), String> {
        let container_dir = self.dir.join("containers").join(self.name);
        restore_shared_state(spec, self.dir).map_err(|e| format!("cannot restore the pod's shared state: {e}"))?;
        let rootfs = match spec["root"]["path"].as_str() {
            Some(p) if Path::new(p).is_absolute() => PathBuf::from(p),
            Some(p) => bundle.join(p),
            None => bundle.join("rootfs"),
        };
        let diff = container_dir.join("rootfs-diff.tar");
        if diff.exists() {
            apply_rootfs_diff(&diff, &rootfs).map_err(|e| format!("cannot apply the rootfs changes: {e}"))?;
        }
        // CRIU 4.2's default mount engine cannot restore the host's named cgroup
        // hierarchy; its compatibility mode can (docs/design.md). runc 1.1 has no
        // --tcp-close, so closing goes through CRIU's configuration file too.
        let criu_conf = self.dir.join("criu.conf");
        let mut options = String::from("mntns-compat-mode\n");
        if close_tcp {
            options.push_str("tcp-close\n");
        }
        if leave_stopped {
            options.push_str("leave-stopped\n");
        }
        std::fs::write(&criu_conf, options).map_err(|e| format!("cannot write {criu_conf:?}: {e}"))?;
        spec["annotations"][CRIU_CONFIG_ANNOTATION] = serde_json::json!(criu_conf);
        std::fs::write(spec_path, serde_json::to_vec(spec).map_err(|e| e.to_string())?)
            .map_err(|e| format!("cannot write {}: {e}", spec_path.display()))?;

        let work = container_dir.join(format!("work-{id}"));
        std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
        let mut cmd = std::process::Command::new(&self.config.runc);
        cmd.args(&self.call.globals)
            .args(["restore", "--detach", "--file-locks"])
            .arg("--bundle")
            .arg(bundle)
            .arg("--image-path")
            .arg(container_dir.join("checkpoint"))
            .arg("--work-path")
            .arg(&work);
        if !close_tcp {
            cmd.arg("--tcp-established");
        }
        for (flag, short) in [("--pid-file", None), ("--console-socket", None)] {
            if let Some(value) = self.call.flag(flag, short) {
                cmd.arg(flag).arg(value);
            }
        }
        if self.call.args.iter().any(|a| a == "--no-pivot") {
            cmd.arg("--no-pivot");
        }
        cmd.arg(id);
        if let Some(criu_dir) = &self.config.criu_dir {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", criu_dir.display()));
        }
        // runc hands its own stdio to the restored process (CRIU's inherit-fd for the
        // pipes recorded at the dump): those are the shim's pipes for this container,
        // so they are inherited, never captured (a capture would wait forever for the
        // restored process to close them). runc's own error goes to its --log.
        let status = cmd.status();
        // runc reads the file named by the annotation on every later checkpoint of
        // this container too, and CRIU refuses restore-only options on a dump: the
        // restored container must stay checkpointable.
        let _ = std::fs::write(
            &criu_conf,
            "# the restore's options were applied; none for later dumps\n",
        );
        let status = status.map_err(|e| format!("cannot run {}: {e}", self.config.runc.display()))?;
        if !status.success() {
            let log = std::fs::read_to_string(work.join("restore.log")).unwrap_or_default();
            return Err(format!(
                "runc restore of container {} failed ({status}): {}{}",
                self.name,
                self.runc_errors(),
                crate::dump::criu_log_excerpt(&log)
            ));
        }
        // The marker holds the container id, so a later failure can stop this one.
        std::fs::write(restored_marker(self.dir, self.name), id).map_err(|e| e.to_string())?;
        // Restored: its images are never read again (a restarted container starts
        // afresh), and they are as large as its memory.
        let _ = std::fs::remove_dir_all(container_dir.join("checkpoint"));
        let _ = std::fs::remove_file(&diff);
        let started = started_marker(&self.config.restores, id);
        if let Some(parent) = started.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        std::fs::write(&started, b"").map_err(|e| e.to_string())?;
        Ok(())
    }

    /// runc's error messages from its `--log` (JSON lines), where runc reports what
    /// failed before CRIU ran.
    fn runc_errors(&self) -> String {
        let Some(path) = self
            .call
            .globals
            .windows(2)
            .find(|w| w[0] == "--log")
            .map(|w| w[1].clone())
        else {
            return String::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let errors: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["level"] == "error")
            .filter_map(|l| l["msg"].as_str().map(str::to_owned))
            .collect();
        if errors.is_empty() {
            String::new()
        } else {
            format!("runc: {} | ", errors.join(" | "))
        }
    }

    /// Marks the restore failed and kills the containers already restored from it,
    /// so the pod never runs half restored (the operator deletes it).
    fn fail_restore(&self, reason: &str) {
        let _ = std::fs::write(failed_marker(self.dir), reason);
        let Ok(containers) = std::fs::read_dir(self.dir.join("containers")) else {
            return;
        };
        for container in containers.flatten() {
            let Ok(id) = std::fs::read_to_string(container.path().join(".restored")) else {
                continue;
            };
            let _ = std::process::Command::new(&self.config.runc)
                .args(&self.call.globals)
                .args(["kill", id.trim(), "KILL"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    fn iptables(&self, netns: &str, op: &str) -> Result<(), String> {
        for rule in hold_rules() {
            let status = std::process::Command::new(&self.config.nsenter)
                .arg(format!("--net={netns}"))
                .arg(&self.config.iptables)
                .arg(op)
                .args(rule)
                .status()
                .map_err(|e| format!("cannot run iptables in {netns}: {e}"))?;
            if !status.success() {
                return Err(format!("iptables {op} {} in {netns} failed ({status})", rule.join(" ")));
            }
        }
        Ok(())
    }
}

/// What the handler does for a call.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Run runc with the same arguments.
    Runc,
    /// Nothing: `start` of a container that was restored (it already runs).
    Nothing,
    /// Restore this container.
    Restore { dir: PathBuf, name: String },
    /// Refuse, with this message.
    Refuse(String),
}

/// Decides what a call does.
pub fn action(call: &RuncCall, config: &HandlerConfig) -> Action {
    match call.command.as_str() {
        "create" => {
            let bundle = PathBuf::from(call.flag("--bundle", Some("-b")).unwrap_or("."));
            let spec = match std::fs::read(bundle.join("config.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            {
                Some(spec) => spec,
                // runc says what is wrong with the bundle better than we can.
                None => return Action::Runc,
            };
            match decide_create(&spec, &config.restores) {
                Ok(CreateDecision::Create) => Action::Runc,
                Ok(CreateDecision::Restore { dir, name }) => Action::Restore { dir, name },
                Err(message) => Action::Refuse(message),
            }
        }
        "start" => match call.container_id() {
            Some(id) if started_marker(&config.restores, id).exists() => Action::Nothing,
            _ => Action::Runc,
        },
        "delete" => {
            if let Some(id) = call.container_id() {
                let _ = std::fs::remove_file(started_marker(&config.restores, id));
            }
            Action::Runc
        }
        _ => Action::Runc,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn shim_calls_split_into_globals_command_and_flags() {
        let call = RuncCall::parse(&words(
            "--root /run/runc/k8s.io --log /b/log.json --log-format json create --bundle /b --pid-file /b/init.pid abc",
        ))
        .unwrap();
        assert_eq!(
            call.globals,
            words("--root /run/runc/k8s.io --log /b/log.json --log-format json")
        );
        assert_eq!(call.command, "create");
        assert_eq!(call.flag("--bundle", Some("-b")), Some("/b"));
        assert_eq!(call.flag("--pid-file", None), Some("/b/init.pid"));
        assert_eq!(call.container_id(), Some("abc"));
        let call = RuncCall::parse(&words("--systemd-cgroup start -b=x abc")).unwrap();
        assert_eq!((call.command.as_str(), call.container_id()), ("start", Some("abc")));
        assert!(RuncCall::parse(&words("--root")).is_none());
    }

    fn spec(kind: &str, restore: Option<&str>) -> serde_json::Value {
        let mut annotations =
            json!({CONTAINER_TYPE: kind, CONTAINER_NAME: "app", SANDBOX_NAMESPACE: "ns", SANDBOX_NAME: "p"});
        if let Some(id) = restore {
            annotations[RESTORE_ANNOTATION] = json!(id);
        }
        json!({"annotations": annotations})
    }

    #[test]
    fn only_prepared_containers_of_annotated_pods_are_restored_and_only_once() {
        let restores = tempfile::tempdir().unwrap();
        let root = restores.path();
        assert_eq!(
            decide_create(&spec("container", None), root),
            Ok(CreateDecision::Create)
        );
        assert_eq!(
            decide_create(&spec("sandbox", Some("r1")), root),
            Ok(CreateDecision::Create)
        );
        let err = decide_create(&spec("container", Some("r1")), root).unwrap_err();
        assert!(err.starts_with("restore r1 is not prepared on this node"), "{err}");
        assert!(decide_create(&spec("container", Some("../x")), root).is_err());

        std::fs::create_dir_all(root.join("r1/containers/app/checkpoint")).unwrap();
        std::fs::write(root.join("r1/manifest.json"), b"{}").unwrap();
        let err = decide_create(&spec("container", Some("r1")), root).unwrap_err();
        assert!(err.contains("names no pod that may use it"), "{err}");
        std::fs::write(
            root.join("r1").join(RESTORED_POD_FILE),
            br#"{"namespace":"ns","name":"p"}"#,
        )
        .unwrap();
        // Another pod carrying the same restore id gets nothing.
        let mut thief = spec("container", Some("r1"));
        thief["annotations"][SANDBOX_NAMESPACE] = json!("tenant-b");
        let err = decide_create(&thief, root).unwrap_err();
        assert_eq!(err, "restore r1 belongs to pod ns/p, not to tenant-b/p: refused");
        thief["annotations"][SANDBOX_NAMESPACE] = json!("ns");
        thief["annotations"][SANDBOX_NAME] = json!("p2");
        assert!(decide_create(&thief, root).is_err());
        assert_eq!(
            decide_create(&spec("container", Some("r1")), root),
            Ok(CreateDecision::Restore {
                dir: root.join("r1"),
                name: "app".into()
            })
        );
        std::fs::write(restored_marker(&root.join("r1"), "app"), b"").unwrap();
        assert_eq!(
            decide_create(&spec("container", Some("r1")), root),
            Ok(CreateDecision::Create),
            "a restart starts fresh"
        );
        std::fs::write(failed_marker(&root.join("r1")), "CRIU said no").unwrap();
        let err = decide_create(&spec("container", Some("r1")), root).unwrap_err();
        assert_eq!(err, "restore r1 failed, so no container of this pod runs: CRIU said no");
    }

    #[test]
    fn a_held_container_is_never_started_afresh_until_continued() {
        let restores = tempfile::tempdir().unwrap();
        let root = restores.path();
        std::fs::create_dir_all(root.join("r1/containers/app/checkpoint")).unwrap();
        std::fs::write(root.join("r1/manifest.json"), b"{}").unwrap();
        std::fs::write(
            root.join("r1").join(RESTORED_POD_FILE),
            br#"{"namespace":"ns","name":"p","start_stopped":true}"#,
        )
        .unwrap();
        assert!(matches!(
            decide_create(&spec("container", Some("r1")), root),
            Ok(CreateDecision::Restore { .. })
        ));
        // Restored (stopped), then restarted by the kubelet before its migration let
        // it run: refused, so nothing runs afresh beside a source that may.
        std::fs::write(restored_marker(&root.join("r1"), "app"), b"").unwrap();
        let err = decide_create(&spec("container", Some("r1")), root).unwrap_err();
        assert!(
            err.contains("is held stopped until its migration's source is stopped for good"),
            "{err}"
        );
        // Once continued, a restart starts fresh as any other.
        std::fs::write(root.join("r1").join(CONTINUED_FILE), b"").unwrap();
        assert_eq!(
            decide_create(&spec("container", Some("r1")), root),
            Ok(CreateDecision::Create)
        );
    }

    #[test]
    fn start_is_a_no_op_for_restored_ids_until_deleted() {
        let restores = tempfile::tempdir().unwrap();
        let config = HandlerConfig {
            runc: "runc".into(),
            restores: restores.path().to_path_buf(),
            criu_dir: None,
            iptables: default_iptables(),
            nsenter: default_nsenter(),
        };
        let start = RuncCall::parse(&words("--root /r start abc")).unwrap();
        assert_eq!(action(&start, &config), Action::Runc);
        let marker = started_marker(restores.path(), "abc");
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        std::fs::write(&marker, b"").unwrap();
        assert_eq!(action(&start, &config), Action::Nothing);
        let delete = RuncCall::parse(&words("--root /r delete --force abc")).unwrap();
        assert_eq!(action(&delete, &config), Action::Runc);
        assert_eq!(action(&start, &config), Action::Runc);
    }

    #[test]
    fn only_a_joined_pid_namespace_is_held() {
        let with = |pid: serde_json::Value| serde_json::json!({"linux": {"namespaces": [{"type": "network", "path": "/proc/9/ns/net"}, pid]}});
        assert_eq!(
            joined_pid_namespace(&with(serde_json::json!({"type": "pid", "path": "/proc/9/ns/pid"}))),
            Some(PathBuf::from("/proc/9/ns/pid"))
        );
        assert_eq!(joined_pid_namespace(&with(serde_json::json!({"type": "pid"}))), None);
        assert!(continue_pid_namespace(Path::new("/nonexistent/ns/pid")).is_err());
    }

    #[test]
    fn rootfs_diffs_delete_empty_opaque_dirs_and_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::create_dir_all(rootfs.join("etc/app")).unwrap();
        std::fs::write(rootfs.join("bin/true"), b"x").unwrap();
        std::fs::write(rootfs.join("etc/app/old.conf"), b"old").unwrap();
        let diff = dir.path().join("diff.tar");
        {
            let mut b = tar::Builder::new(std::fs::File::create(&diff).unwrap());
            let mut add = |path: &str, body: &[u8]| {
                let mut h = tar::Header::new_gnu();
                h.set_size(body.len() as u64);
                h.set_mode(0o644);
                b.append_data(&mut h, path, body).unwrap();
            };
            add("bin/.wh.true", b"");
            add("etc/app/.wh..wh..opq", b"");
            add("etc/app/new.conf", b"new");
            b.finish().unwrap();
        }
        apply_rootfs_diff(&diff, &rootfs).unwrap();
        assert!(!rootfs.join("bin/true").exists());
        assert!(!rootfs.join("etc/app/old.conf").exists());
        assert_eq!(std::fs::read(rootfs.join("etc/app/new.conf")).unwrap(), b"new");
    }

    /// A tar of raw entries, names as an attacker writes them (the builder refuses `..`).
    fn raw_tar(path: &Path, entries: &[(&str, u64, u32)]) {
        let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
        for (name, uid, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(*mode);
            h.set_uid(*uid);
            h.set_gid(*uid);
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
        }
        b.finish().unwrap();
    }

    #[test]
    fn rootfs_diffs_never_write_or_delete_through_the_images_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let (rootfs, host) = (dir.path().join("rootfs"), dir.path().join("host"));
        std::fs::create_dir_all(host.join("etc")).unwrap();
        std::fs::write(host.join("etc/passwd"), b"host").unwrap();
        std::fs::create_dir_all(&rootfs).unwrap();
        // The tenant's image holds `x -> /` (here: -> the stand-in for the host's root).
        std::os::unix::fs::symlink(&host, rootfs.join("x")).unwrap();
        let diff = dir.path().join("diff.tar");
        for entry in [
            "x/etc/.wh.passwd",
            "x/etc/.wh..wh..opq",
            "x/etc/passwd",
            "../host/etc/passwd",
        ] {
            raw_tar(&diff, &[(entry, 0, 0o644)]);
            let err = apply_rootfs_diff(&diff, &rootfs).unwrap_err().to_string();
            assert!(err.starts_with(&format!("archive entry {entry} refused")), "{err}");
            assert_eq!(std::fs::read(host.join("etc/passwd")).unwrap(), b"host", "{entry}");
        }
    }

    #[test]
    fn shared_state_stays_in_its_volume_and_keeps_owners() {
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("kubelet/pods/u/volumes/kubernetes.io~empty-dir/data");
        std::fs::create_dir_all(&volume).unwrap();
        std::fs::create_dir_all(dir.path().join("restore/pod/volume")).unwrap();
        let spec = serde_json::json!({"mounts": [{"destination": "/data", "source": volume.to_str().unwrap()}]});
        let tar = dir.path().join("restore/pod/volume/data.tar");
        raw_tar(&tar, &[("suid", 1000, 0o4755), ("../../../../../../escaped", 0, 0o644)]);
        let err = restore_shared_state(&spec, &dir.path().join("restore"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("escaped refused: it climbs out"), "{err}");
        assert!(!dir.path().join("escaped").exists());
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(volume.join("suid")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777),
            (1000, 1000, 0o4755)
        );
    }
}
