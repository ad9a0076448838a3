//! `cryopod-node-agent`: reads its settings from the environment and runs the agent.
//! Fatal errors go to stderr and to /dev/termination-log, where Kubernetes shows them.

use std::process::ExitCode;

use cryopod_node_agent::run::{AgentConfig, RunError, handler_install_from_lookup, run};

#[tokio::main]
async fn main() -> ExitCode {
    // JSON lines with the operation id on every event of an operation; RUST_LOG filters.
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let env = |k: &str| std::env::var(k).ok();
    let result = if std::env::args().nth(1).as_deref() == Some("install-handler") {
        install_handler(env)
    } else {
        match AgentConfig::from_lookup(env) {
            Ok(config) => run(config).await,
            Err(e) => Err(e),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            let message = format!("cryopod-node-agent: {e}{cause}");
            eprintln!("{message}");
            let _ = std::fs::write("/dev/termination-log", &message);
            ExitCode::FAILURE
        }
    }
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
