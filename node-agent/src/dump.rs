//! Dumping a frozen pod's containers with CRIU, through runc.
//!
//! runc, not CRIU's RPC directly: runc already knows each container's state (its
//! bundle, namespaces, cgroups, external mounts and the joined sandbox namespaces it
//! must mark external) and writes it as the checkpoint needs. Calling CRIU ourselves
//! would mean re-deriving all of that from runc's private state files.
//!
//! runc must see the container's mounts, so it runs in the node's mount namespace
//! ([`NodeExec`]). The containers are dumped in parallel while the pod is frozen.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::discovery::RunningContainer;

/// How node programs are started: directly, or through a prefix such as
/// `nsenter -t {runtime-pid} -m --` when the agent runs in a container.
#[derive(Clone, Debug, Default)]
pub struct NodeExec {
    /// Words put before every command; [`RUNTIME_PID`] in them stands for the
    /// container runtime's PID.
    pub prefix: Vec<OsString>,
    /// Directories put first in PATH (where `criu` is).
    pub path_dirs: Vec<PathBuf>,
    /// The container runtime's socket, whose peer is the runtime process.
    pub runtime_socket: Option<PathBuf>,
}

/// Stands for the PID of the process serving the container runtime's socket. runc
/// must run in the mount namespace the runtime runs in: the host's on a usual node
/// (where PID 1 would do as well), the node's own where nodes are containers or, as
/// in the local cluster, mount namespaces of one machine.
pub const RUNTIME_PID: &str = "{runtime-pid}";

/// Node commands in the mount namespace of the container runtime: the chart's default
/// `agent.nodeExec`.
pub const RUNTIME_NODE_EXEC: &str = "nsenter -t {runtime-pid} -m --";

/// The PID of the process listening on a Unix socket (`SO_PEERCRED`).
pub fn socket_peer_pid(socket: &Path) -> std::io::Result<i32> {
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    let cred = rustix::net::sockopt::socket_peercred(&stream)?;
    Ok(cred.pid.as_raw_nonzero().get())
}

impl NodeExec {
    /// Node commands through [`RUNTIME_NODE_EXEC`] for the runtime serving
    /// `runtime_socket`, with `path_dirs` first in PATH.
    pub fn in_runtime_mount_ns(runtime_socket: PathBuf, path_dirs: Vec<PathBuf>) -> Self {
        Self {
            prefix: RUNTIME_NODE_EXEC.split(' ').map(Into::into).collect(),
            path_dirs,
            runtime_socket: Some(runtime_socket),
        }
    }

    /// The prefix with [`RUNTIME_PID`] resolved now (the runtime may have restarted).
    pub fn resolved_prefix(&self) -> std::io::Result<Vec<OsString>> {
        let needs_pid = self.prefix.iter().any(|w| w.to_string_lossy().contains(RUNTIME_PID));
        if !needs_pid {
            return Ok(self.prefix.clone());
        }
        let socket = self.runtime_socket.as_deref().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no container runtime socket is configured",
            )
        })?;
        let pid = socket_peer_pid(socket)?.to_string();
        Ok(self
            .prefix
            .iter()
            .map(|w| w.to_string_lossy().replace(RUNTIME_PID, &pid).into())
            .collect())
    }

    /// Where the runtime's root directory is seen from this process: through the
    /// runtime process's `/proc` entry, so that paths the runtime reports (overlay
    /// upper directories) resolve in its mount namespace; `/` without a runtime.
    pub fn node_root(&self) -> PathBuf {
        self.runtime_proc()
            .map_or_else(|| PathBuf::from("/"), |proc| proc.join("root"))
    }

    /// The runtime's mount table, where it mounted the containers' root filesystems
    /// (this process's own without a runtime). Tenants cannot mount there.
    pub fn node_mountinfo(&self) -> PathBuf {
        self.runtime_proc()
            .unwrap_or_else(|| PathBuf::from("/proc/self"))
            .join("mountinfo")
    }

    fn runtime_proc(&self) -> Option<PathBuf> {
        self.runtime_socket
            .as_deref()
            .and_then(|socket| socket_peer_pid(socket).ok())
            .map(|pid| PathBuf::from(format!("/proc/{pid}")))
    }

    pub(crate) fn command(&self, program: &Path) -> tokio::process::Command {
        // An unresolvable runtime leaves the placeholder, which the prefix program
        // then rejects in its error output (reported with the command's failure).
        let prefix = self.resolved_prefix().unwrap_or_else(|error| {
            tracing::error!(%error, "cannot find the container runtime's process for {RUNTIME_PID}");
            self.prefix.clone()
        });
        let mut words = prefix.iter();
        let mut cmd = match words.next() {
            Some(first) => {
                let mut cmd = tokio::process::Command::new(first);
                cmd.args(words).arg(program);
                cmd
            }
            None => tokio::process::Command::new(program),
        };
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = self.path_dirs.iter().cloned().chain(std::env::split_paths(&path));
        if let Ok(joined) = std::env::join_paths(dirs) {
            cmd.env("PATH", joined);
        }
        cmd
    }
}

/// What a dump keeps or does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DumpOptions {
    /// Leave the processes alive after the dump (else CRIU kills them).
    pub leave_running: bool,
    /// Dump established TCP connections (else CRIU refuses a pod that has any).
    pub tcp_established: bool,
    /// Dump file locks.
    pub file_locks: bool,
}

/// Where one container's dump went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerDump {
    /// Container name.
    pub name: String,
    /// CRIU images.
    pub images: PathBuf,
    /// How long its dump took.
    pub took: Duration,
}

/// A dump failed. The caller thaws the pod.
#[derive(Debug)]
pub enum DumpError {
    /// The dump directories could not be created.
    Prepare {
        container: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// runc could not be started.
    Spawn { container: String, source: std::io::Error },
    /// Waiting for runc failed.
    Wait { container: String, source: std::io::Error },
    /// runc (CRIU) failed; `criu_log` quotes the relevant lines of its log.
    Criu {
        container: String,
        status: String,
        stderr: String,
        criu_log: String,
        /// Set when the images' filesystem was found full after the failure.
        disk_full: Option<String>,
    },
    /// The dump did not finish before the freeze deadline.
    Timeout { container: String, after: Duration },
}

impl std::fmt::Display for DumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Prepare { container, path, .. } => {
                write!(f, "cannot prepare {} for container {container}", path.display())
            }
            Self::Spawn { container, .. } => write!(f, "cannot start runc to dump container {container}"),
            Self::Wait { container, .. } => write!(f, "lost track of runc dumping container {container}"),
            Self::Criu {
                container,
                status,
                stderr,
                criu_log,
                disk_full,
            } => {
                if let Some(disk) = disk_full {
                    write!(f, "{disk}: ")?;
                }
                write!(
                    f,
                    "CRIU failed to dump container {container} ({status}): {}; CRIU log: {criu_log}",
                    stderr.trim()
                )
            }
            Self::Timeout { container, after } => write!(f, "dumping container {container} took over {after:?}"),
        }
    }
}

impl std::error::Error for DumpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Prepare { source, .. } | Self::Spawn { source, .. } | Self::Wait { source, .. } => Some(source),
            Self::Criu { .. } | Self::Timeout { .. } => None,
        }
    }
}

/// Below this much free space the images' filesystem counts as full.
const FULL_BELOW: u64 = 1024 * 1024;

/// Says so when the filesystem holding `dir` is full: a dump that failed there
/// failed for want of space, whichever tool's error CRIU's log shows first.
pub fn disk_full(dir: &Path) -> Option<String> {
    let stats = rustix::fs::statvfs(dir).ok()?;
    let free = stats.f_bavail.saturating_mul(stats.f_frsize);
    let total = stats.f_blocks.saturating_mul(stats.f_frsize);
    (free < FULL_BELOW.min(total / 2)).then(|| {
        format!(
            "no space left on the filesystem of {} ({} KiB free of {} KiB)",
            dir.display(),
            free / 1024,
            total / 1024
        )
    })
}

/// The lines of a CRIU log worth quoting: its errors (the first ones, which name the
/// cause, and the last ones; a full disk also shows in lines of tools CRIU ran, such
/// as tar), else its last lines.
pub fn criu_log_excerpt(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error") || l.contains("No space left on device"))
        .collect();
    let lines: Vec<&str> = if errors.is_empty() {
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(5)..].to_vec()
    } else if errors.len() > 8 {
        [&errors[..4], &["..."], &errors[errors.len() - 4..]].concat()
    } else {
        errors
    };
    lines.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" | ")
}

/// The runc arguments of one container's dump.
pub fn runc_checkpoint_args(
    runc_root: &Path,
    container_id: &str,
    images: &Path,
    work: &Path,
    options: DumpOptions,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--root".into(),
        runc_root.into(),
        "checkpoint".into(),
        "--image-path".into(),
        images.into(),
        "--work-path".into(),
        work.into(),
    ];
    if options.leave_running {
        args.push("--leave-running".into());
    }
    if options.tcp_established {
        args.push("--tcp-established".into());
    }
    if options.file_locks {
        args.push("--file-locks".into());
    }
    args.push(container_id.into());
    args
}

async fn dump_one(
    exec: &NodeExec,
    runc: &Path,
    runc_root: &Path,
    container: &RunningContainer,
    dir: &Path,
    options: DumpOptions,
    limit: Duration,
) -> Result<ContainerDump, DumpError> {
    let images = dir.join(&container.name).join("checkpoint");
    let work = dir.join(&container.name).join("work");
    for path in [&images, &work] {
        tokio::fs::create_dir_all(path)
            .await
            .map_err(|source| DumpError::Prepare {
                container: container.name.clone(),
                path: path.clone(),
                source,
            })?;
    }
    let started = Instant::now();
    let child = exec
        .command(runc)
        .args(runc_checkpoint_args(runc_root, &container.id, &images, &work, options))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DumpError::Spawn {
            container: container.name.clone(),
            source,
        })?;
    let output = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(source)) => {
            return Err(DumpError::Spawn {
                container: container.name.clone(),
                source,
            });
        }
        Err(_) => {
            return Err(DumpError::Timeout {
                container: container.name.clone(),
                after: limit,
            });
        }
    };
    if !output.status.success() {
        let log = tokio::fs::read_to_string(work.join("dump.log"))
            .await
            .unwrap_or_default();
        return Err(DumpError::Criu {
            container: container.name.clone(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            criu_log: criu_log_excerpt(&log),
            disk_full: disk_full(&images),
        });
    }
    Ok(ContainerDump {
        name: container.name.clone(),
        images,
        took: started.elapsed(),
    })
}

/// Dumps every container in parallel into `<dir>/<name>/checkpoint`; all must succeed.
pub async fn dump_containers(
    exec: &NodeExec,
    runc: &Path,
    runc_root: &Path,
    containers: &[RunningContainer],
    dir: &Path,
    options: DumpOptions,
    limit: Duration,
) -> Result<Vec<ContainerDump>, DumpError> {
    let dumps = containers
        .iter()
        .map(|c| dump_one(exec, runc, runc_root, c, dir, options, limit));
    futures::future::join_all(dumps).await.into_iter().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_runtime_pid_is_the_socket_servers() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("runtime.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(socket_peer_pid(&socket).unwrap(), std::process::id() as i32);
        let exec = NodeExec {
            prefix: ["nsenter", "-t", "{runtime-pid}", "-m", "--"].map(Into::into).to_vec(),
            path_dirs: vec![],
            runtime_socket: Some(socket),
        };
        let pid = std::process::id().to_string();
        assert_eq!(
            exec.resolved_prefix().unwrap(),
            ["nsenter", "-t", pid.as_str(), "-m", "--"].map(std::ffi::OsString::from)
        );
        let gone = NodeExec {
            runtime_socket: Some(dir.path().join("missing.sock")),
            ..exec
        };
        assert!(gone.resolved_prefix().is_err());
        assert_eq!(gone.node_root(), PathBuf::from("/"));
    }

    #[test]
    fn checkpoint_arguments_follow_the_options() {
        let opts = DumpOptions {
            leave_running: true,
            tcp_established: true,
            file_locks: false,
        };
        let args = runc_checkpoint_args(Path::new("/run/runc"), "abc", Path::new("/i"), Path::new("/w"), opts);
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "--root",
                "/run/runc",
                "checkpoint",
                "--image-path",
                "/i",
                "--work-path",
                "/w",
                "--leave-running",
                "--tcp-established",
                "abc"
            ]
        );
    }

    #[test]
    fn the_excerpt_quotes_criu_errors() {
        let log = "(00.001) Dumping\n(00.002) Error (criu/sk-inet.c:188): inet: Connected TCP socket, consider using --tcp-established option.\n(00.003) Unlock\n";
        assert!(criu_log_excerpt(log).contains("Connected TCP socket"));
        assert_eq!(criu_log_excerpt("a\nb\n"), "a | b");
        // The first errors name the cause; a tool's full disk counts as one.
        let mut log = String::from("tar: x: Cannot write: No space left on device\n");
        for i in 0..12 {
            log.push_str(&format!("(00.{i:03}) Error (criu/util.c:657): exited, status={i}\n"));
        }
        let excerpt = criu_log_excerpt(&log);
        assert!(
            excerpt.starts_with("tar: x: Cannot write: No space left on device | "),
            "{excerpt}"
        );
        assert!(
            excerpt.contains(" | ... | ") && excerpt.ends_with("status=11"),
            "{excerpt}"
        );
    }
}
