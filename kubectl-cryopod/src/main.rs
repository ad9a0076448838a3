//! `kubectl-cryopod`: kubectl finds it on PATH as `kubectl cryopod`. Parses the
//! command line, runs it, and exits as kubectl does: 0, or 1 with `error: <why>`.

use std::process::ExitCode;

use clap::Parser;
use kubectl_cryopod::cli::Cli;
use kubectl_cryopod::error::message;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout and succeed; usage errors fail with 1.
            let code = u8::from(e.use_stderr());
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kubectl_cryopod::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}
