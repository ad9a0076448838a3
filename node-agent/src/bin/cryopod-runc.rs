//! `cryopod-runc`: the OCI runtime of cryopod's RuntimeClass, run by containerd's
//! runc shim (`BinaryName`). It passes every call to runc, except the restore of a
//! checkpointed container (see `cryopod_node_agent::handler`). Its settings are in
//! `<this binary>.json`.

use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use cryopod_node_agent::handler::{Action, ContainerRestore, HandlerConfig, RuncCall, action};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match load_config() {
        Ok(config) => config,
        Err(message) => return fail(&args, &format!("cryopod-runc: {message}")),
    };
    let Some(call) = RuncCall::parse(&args) else {
        // Flags only (`--version`, `--help`): runc answers.
        return run_runc(&config, &args);
    };
    match action(&call, &config) {
        Action::Runc => run_runc(&config, &args),
        Action::Nothing => ExitCode::SUCCESS,
        Action::Refuse(message) => fail(&args, &format!("cryopod-runc: {message}")),
        Action::Restore { dir, name } => {
            let restore = ContainerRestore {
                config: &config,
                call: &call,
                dir: &dir,
                name: &name,
            };
            match restore.run() {
                Ok(()) => {
                    log(
                        &args,
                        "info",
                        &format!("cryopod-runc: restored container {name} from {}", dir.display()),
                    );
                    ExitCode::SUCCESS
                }
                Err(message) => fail(&args, &format!("cryopod-runc: {message}")),
            }
        }
    }
}

fn load_config() -> Result<HandlerConfig, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let path = exe.with_file_name(format!(
        "{}.json",
        exe.file_name().and_then(|n| n.to_str()).unwrap_or("cryopod-runc")
    ));
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Replaces this process with runc, same arguments; returns only if that fails.
fn run_runc(config: &HandlerConfig, args: &[String]) -> ExitCode {
    let mut cmd = std::process::Command::new(&config.runc);
    cmd.args(args);
    if let Some(criu_dir) = &config.criu_dir {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", criu_dir.display()));
    }
    let err = cmd.exec();
    fail(
        args,
        &format!("cryopod-runc: cannot run {}: {err}", config.runc.display()),
    )
}

/// Reports on stderr and in runc's JSON log, where containerd looks for the cause.
fn fail(args: &[String], message: &str) -> ExitCode {
    eprintln!("{message}");
    log(args, "error", message);
    ExitCode::FAILURE
}

fn log(args: &[String], level: &str, message: &str) {
    let call = RuncCall::parse(args);
    let json = call
        .as_ref()
        .is_some_and(|c| c.globals.windows(2).any(|w| w[0] == "--log-format" && w[1] == "json"));
    let Some(path) = call
        .as_ref()
        .and_then(|c| c.globals.windows(2).find(|w| w[0] == "--log").map(|w| w[1].clone()))
    else {
        return;
    };
    let line = if json {
        serde_json::json!({"level": level, "msg": message}).to_string()
    } else {
        format!("level={level} msg={message:?}")
    };
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes());
    }
}
