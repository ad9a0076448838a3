//! `cryopod-operator`: reads its settings from the environment and runs the controllers.

use std::process::ExitCode;

use cryopod_operator::run::{OperatorConfig, run};
use cryopod_runtime::process::{exit_code, init_json_logs};

#[tokio::main]
async fn main() -> ExitCode {
    init_json_logs();
    let result = match OperatorConfig::from_lookup(|k| std::env::var(k).ok()) {
        Ok(config) => run(config).await,
        Err(e) => Err(e),
    };
    exit_code("cryopod-operator", result)
}
