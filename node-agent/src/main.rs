//! `cryopod-node-agent`: reads its settings from the environment and runs the agent.
//! Fatal errors go to stderr and to /dev/termination-log, where Kubernetes shows them.

use std::process::ExitCode;

use cryopod_node_agent::run::{AgentConfig, RunError, handler_install_from_lookup, run};
use cryopod_runtime::process::{exit_code, init_json_logs};

#[tokio::main]
async fn main() -> ExitCode {
    init_json_logs();
    let env = |k: &str| std::env::var(k).ok();
    let result = if std::env::args().nth(1).as_deref() == Some("install-handler") {
        install_handler(env)
    } else {
        match AgentConfig::from_lookup(env) {
            Ok(config) => run(config).await,
            Err(e) => Err(e),
        }
    };
    exit_code("cryopod-node-agent", result)
}

/// Installs the runtime handler (opt-in; the DaemonSet runs it in an init container).
fn install_handler(env: impl Fn(&str) -> Option<String>) -> Result<(), RunError> {
    let this = std::env::current_exe().map_err(|source| RunError::Install { source })?;
    let install = handler_install_from_lookup(env, &this)?;
    for path in cryopod_node_agent::install::install_handler(&install).map_err(|source| RunError::Install { source })? {
        tracing::info!(path = %path.display(), "installed");
    }
    Ok(())
}
