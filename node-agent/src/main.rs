//! `cryopod-node-agent`: reads its settings from the environment and runs the agent.
//! Fatal errors go to stderr and to /dev/termination-log, where Kubernetes shows them.

use std::process::ExitCode;

use cryopod_node_agent::run::{AgentConfig, run};

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
    let result = match AgentConfig::from_lookup(|k| std::env::var(k).ok()) {
        Ok(config) => run(config).await,
        Err(e) => Err(e),
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
