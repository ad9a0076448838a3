//! What every cryopod binary does at its edges: JSON logs on stderr, and a fatal
//! error reported on stderr and in `/dev/termination-log`, where Kubernetes shows it.

use std::process::ExitCode;

/// JSON lines on stderr with the current span's fields (an operation's id);
/// `RUST_LOG` filters, `info` by default.
pub fn init_json_logs() {
    tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The exit code of a run; a failure is reported with its cause first.
pub fn exit_code<E: std::error::Error>(program: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let cause = e.source().map(|s| format!(": {s}")).unwrap_or_default();
            let message = format!("{program}: {e}{cause}");
            eprintln!("{message}");
            let _ = std::fs::write("/dev/termination-log", &message);
            ExitCode::FAILURE
        }
    }
}
