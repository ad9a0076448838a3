//! Application hooks run before the freeze: a command in a container (through the
//! runtime, like `kubectl exec`), an HTTP GET to the pod IP (like a probe), or a
//! signal to a container's main process. Each has a deadline; a failure fails the
//! checkpoint or, when the hook says so, is reported and ignored.

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cri::ContainerRuntime;
use crate::discovery::PodRuntime;

/// What a hook does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookAction {
    /// Run this command (no shell) in the container; exit code 0 is success.
    Exec { command: Vec<String> },
    /// GET `path` on the pod IP at `port`; a 2xx answer is success.
    HttpGet { port: u16, path: String, https: bool },
    /// Send this signal to the container's main process.
    Signal { signal: Signal },
}

/// One hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// Container it acts on (for `HttpGet`, only checked to exist).
    pub container: String,
    /// What it does.
    pub action: HookAction,
    /// Its deadline.
    pub timeout: Duration,
    /// A failure is reported and ignored instead of failing the operation.
    pub ignore_failure: bool,
}

impl Hook {
    fn describe(&self, index: usize) -> String {
        let what = match &self.action {
            HookAction::Exec { command } => format!("exec {:?}", command.first().map_or("", String::as_str)),
            HookAction::HttpGet { port, path, https } => {
                format!("{} GET :{port}{path}", if *https { "HTTPS" } else { "HTTP" })
            }
            HookAction::Signal { signal } => format!("signal {signal}"),
        };
        format!("hook {index} ({what} in container {})", self.container)
    }
}

/// A hook failed and its policy is to fail the operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookError {
    /// Which hook, e.g. `hook 0 (exec "flush" in container app)`.
    pub hook: String,
    /// Why, e.g. the exit code and the command's stderr.
    pub detail: String,
}

impl std::fmt::Display for HookError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.hook, self.detail)
    }
}

impl std::error::Error for HookError {}

/// Runs the hooks in order. Returns the failures that were ignored, as messages.
pub async fn run_hooks(
    hooks: &[Hook],
    pod: &PodRuntime,
    runtime: &impl ContainerRuntime,
) -> Result<Vec<String>, HookError> {
    let mut ignored = Vec::new();
    for (index, hook) in hooks.iter().enumerate() {
        let hook_name = hook.describe(index);
        let span = tracing::info_span!("hook", hook = %hook_name);
        let result = tokio::time::timeout(hook.timeout, run_one(hook, pod, runtime))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", hook.timeout)));
        let _entered = span.enter();
        match result {
            Ok(()) => tracing::info!("hook succeeded"),
            Err(detail) if hook.ignore_failure => {
                tracing::warn!(%detail, "hook failed; ignored as its failurePolicy says");
                ignored.push(format!("{hook_name} failed (ignored): {detail}"));
            }
            Err(detail) => {
                return Err(HookError {
                    hook: hook_name,
                    detail,
                });
            }
        }
    }
    Ok(ignored)
}

async fn run_one(hook: &Hook, pod: &PodRuntime, runtime: &impl ContainerRuntime) -> Result<(), String> {
    let container = pod
        .containers
        .iter()
        .find(|c| c.name == hook.container)
        .ok_or_else(|| format!("the pod has no running container {:?}", hook.container))?;
    match &hook.action {
        HookAction::Exec { command } => {
            let out = runtime
                .exec_sync(&container.id, command, hook.timeout)
                .await
                .map_err(|e| {
                    format!(
                        "{e}: {}",
                        std::error::Error::source(&e).map_or(String::new(), |s| s.to_string())
                    )
                })?;
            if out.exit_code == 0 {
                Ok(())
            } else {
                Err(format!(
                    "exit code {}: {}",
                    out.exit_code,
                    tail(&String::from_utf8_lossy(&out.stderr))
                ))
            }
        }
        HookAction::HttpGet { port, path, https } => http_get(&pod.pod_ip, *port, path, *https, hook.timeout).await,
        HookAction::Signal { signal } => {
            let pid = i32::try_from(container.pid).map_err(|_| format!("PID {} is out of range", container.pid))?;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), *signal)
                .map_err(|e| format!("cannot signal PID {pid}: {e}"))
        }
    }
}

/// The URL of an HTTP hook (IPv6 addresses in brackets).
pub fn hook_url(pod_ip: &str, port: u16, path: &str, https: bool) -> String {
    let scheme = if https { "https" } else { "http" };
    if pod_ip.contains(':') {
        format!("{scheme}://[{pod_ip}]:{port}{path}")
    } else {
        format!("{scheme}://{pod_ip}:{port}{path}")
    }
}

async fn http_get(pod_ip: &str, port: u16, path: &str, https: bool, timeout: Duration) -> Result<(), String> {
    if pod_ip.is_empty() {
        return Err("the runtime reports no pod IP".to_owned());
    }
    // As for kubelet probes: no certificate check, no redirects followed.
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .tls_danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let url = hook_url(pod_ip, port, path, https);
    let response = client.get(&url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        let body = response.text().await.unwrap_or_default();
        Err(format!("GET {url} answered {status}: {}", tail(&body)))
    }
}

/// The end of a long message, on one line.
fn tail(text: &str) -> String {
    let text = text.trim().replace('\n', " | ");
    match text.char_indices().rev().nth(299) {
        Some((at, _)) => format!("...{}", &text[at..]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use super::*;
    use crate::cgroup::CgroupPath;
    use crate::cri::{ContainerView, CriError, ExecOutput, SandboxView};
    use crate::discovery::RunningContainer;

    /// Records exec calls and answers with a fixed exit code.
    #[derive(Debug, Default)]
    struct Execs {
        exit_code: i32,
        calls: Mutex<Vec<(String, Vec<String>)>>,
    }

    impl ContainerRuntime for Execs {
        async fn sandboxes_of_pod(&self, _: &str) -> Result<Vec<SandboxView>, CriError> {
            Ok(vec![])
        }
        async fn containers_of_sandbox(&self, _: &str) -> Result<Vec<ContainerView>, CriError> {
            Ok(vec![])
        }
        async fn exec_sync(&self, id: &str, command: &[String], _: Duration) -> Result<ExecOutput, CriError> {
            self.calls.lock().unwrap().push((id.to_owned(), command.to_vec()));
            Ok(ExecOutput {
                exit_code: self.exit_code,
                stdout: vec![],
                stderr: b"disk full\n".to_vec(),
            })
        }
    }

    fn pod() -> PodRuntime {
        PodRuntime {
            sandbox_id: "s".into(),
            sandbox_pid: 1,
            pod_ip: String::new(),
            pod_cgroup: CgroupPath::new("/p"),
            sandbox_cgroup: CgroupPath::new("/p/s"),
            runc_root: "/run/runc".into(),
            runc_binary: "runc".into(),
            containers: vec![RunningContainer {
                name: "app".into(),
                id: "c1".into(),
                pid: 0,
                cgroup: CgroupPath::new("/p/c1"),
                image: String::new(),
                image_ref: String::new(),
                created_at: 0,
                mounts: vec![],
                spec: serde_json::Value::Null,
            }],
        }
    }

    fn exec(container: &str, ignore_failure: bool) -> Hook {
        Hook {
            container: container.into(),
            action: HookAction::Exec {
                command: vec!["flush".into()],
            },
            timeout: Duration::from_secs(1),
            ignore_failure,
        }
    }

    #[tokio::test]
    async fn exec_hooks_run_in_order_in_their_container() {
        let runtime = Execs::default();
        let ignored = run_hooks(&[exec("app", false), exec("app", false)], &pod(), &runtime)
            .await
            .unwrap();
        assert!(ignored.is_empty());
        assert_eq!(runtime.calls.lock().unwrap().len(), 2);
        assert_eq!(
            runtime.calls.lock().unwrap()[0],
            ("c1".to_owned(), vec!["flush".to_owned()])
        );
    }

    #[tokio::test]
    async fn a_failed_hook_names_itself_and_stops_the_rest_unless_ignored() {
        let runtime = Execs {
            exit_code: 3,
            ..Default::default()
        };
        let err = run_hooks(&[exec("app", false), exec("app", false)], &pod(), &runtime)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"hook 0 (exec "flush" in container app) failed: exit code 3: disk full"#
        );
        assert_eq!(runtime.calls.lock().unwrap().len(), 1);

        let ignored = run_hooks(&[exec("app", true), exec("app", true)], &pod(), &runtime)
            .await
            .unwrap();
        assert_eq!(ignored.len(), 2, "{ignored:?}");
        assert!(ignored[1].starts_with("hook 1 "), "{ignored:?}");
    }

    #[tokio::test]
    async fn unknown_containers_and_missing_pod_ips_are_named() {
        let runtime = Execs::default();
        let err = run_hooks(&[exec("db", false)], &pod(), &runtime).await.unwrap_err();
        assert!(err.detail.contains(r#"no running container "db""#), "{err}");
        let http = Hook {
            container: "app".into(),
            action: HookAction::HttpGet {
                port: 8080,
                path: "/quiesce".into(),
                https: false,
            },
            timeout: Duration::from_secs(1),
            ignore_failure: false,
        };
        let err = run_hooks(&[http], &pod(), &runtime).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "hook 0 (HTTP GET :8080/quiesce in container app) failed: the runtime reports no pod IP"
        );
    }

    /// Answers one HTTP request with `status` and returns the request line.
    async fn answer_once(status: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = socket.read(&mut buf).await.unwrap();
            let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 5\r\nconnection: close\r\n\r\nbusy\n");
            socket.write_all(reply.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        });
        (port, task)
    }

    fn http_hook(port: u16) -> Hook {
        Hook {
            container: "app".into(),
            action: HookAction::HttpGet {
                port,
                path: "/quiesce?x=1".into(),
                https: false,
            },
            timeout: Duration::from_secs(5),
            ignore_failure: false,
        }
    }

    #[tokio::test]
    async fn http_hooks_get_the_pod_ip_and_want_a_2xx() {
        let mut pod = pod();
        pod.pod_ip = "127.0.0.1".into();
        let (port, request) = answer_once("204 No Content").await;
        run_hooks(&[http_hook(port)], &pod, &Execs::default()).await.unwrap();
        assert_eq!(request.await.unwrap(), "GET /quiesce?x=1 HTTP/1.1");

        let (port, _) = answer_once("503 Service Unavailable").await;
        let err = run_hooks(&[http_hook(port)], &pod, &Execs::default())
            .await
            .unwrap_err();
        assert!(err.detail.ends_with("answered 503 Service Unavailable: busy"), "{err}");
    }

    #[test]
    fn urls_bracket_ipv6() {
        assert_eq!(hook_url("10.0.0.5", 80, "/x", false), "http://10.0.0.5:80/x");
        assert_eq!(hook_url("fd00::5", 443, "/", true), "https://[fd00::5]:443/");
    }
}
