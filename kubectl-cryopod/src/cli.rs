//! The command line, as kubectl users expect it: global `-n`, `-A`, `--kubeconfig`,
//! `--context`, `-o json|yaml`, `--wait` and `--timeout`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// `kubectl cryopod`: checkpoint, restore, migrate and evacuate with live progress.
#[derive(Parser, Debug)]
#[command(name = "kubectl cryopod", version, about)]
pub struct Cli {
    /// The namespace; default: the kubeconfig context's, else `default`.
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// `status`: every namespace.
    #[arg(short = 'A', long = "all-namespaces", global = true)]
    pub all_namespaces: bool,
    /// The kubeconfig file; default: `$KUBECONFIG`, else `~/.kube/config`.
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Print the created or observed object(s) instead of a summary.
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<OutputFormat>,
    /// Block until the operation ends, showing its progress.
    #[arg(long, global = true)]
    pub wait: bool,
    /// With `--wait`: give up after this long (`90s`, `10m`, `1h`; a bare number is seconds).
    #[arg(long, global = true, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `-o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// JSON, as `kubectl get -o json`.
    Json,
    /// YAML, as `kubectl get -o yaml`.
    Yaml,
}

/// `--transfer`: how a migration's checkpoint goes to the target (PodMigration
/// `spec.transfer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Transfer {
    /// Through the CheckpointStorage.
    #[value(name = "ViaStore")]
    ViaStore,
    /// From the source node's agent to the target's, no object store.
    #[value(name = "Direct")]
    Direct,
}

impl Transfer {
    /// As the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ViaStore => "ViaStore",
            Self::Direct => "Direct",
        }
    }
}

/// `--unmigratable`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Unmigratable {
    /// Evict what cannot migrate.
    #[value(name = "Evict")]
    Evict,
    /// Leave it on the node.
    #[value(name = "Skip")]
    Skip,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Checkpoint a pod (a PodCheckpoint); it keeps running.
    Checkpoint {
        /// The pod.
        pod: String,
        /// The CheckpointStorage; default: the cluster's default one.
        #[arg(long)]
        storage: Option<String>,
        /// The PodCheckpoint's name; default: generated from the pod's.
        #[arg(long)]
        name: Option<String>,
    },
    /// Restore a checkpoint as a new pod (a PodRestore).
    Restore {
        /// The PodCheckpoint.
        checkpoint: String,
        /// The node to restore on; default: one the operator picks.
        #[arg(long = "to", value_name = "NODE")]
        to: Option<String>,
        /// The restored pod's name; default: the checkpointed pod's when free.
        #[arg(long)]
        pod_name: Option<String>,
        /// The PodRestore's name; default: generated from the checkpoint's.
        #[arg(long)]
        name: Option<String>,
    },
    /// Move a running pod to another node with its memory (a PodMigration).
    Migrate {
        /// The pod.
        pod: String,
        /// The target node.
        #[arg(long = "to", value_name = "NODE", required = true)]
        to: String,
        /// The CheckpointStorage of the migration's checkpoint.
        #[arg(long, conflicts_with = "transfer")]
        storage: Option<String>,
        /// How the checkpoint goes to the target (default: the API's, ViaStore).
        #[arg(long, value_enum)]
        transfer: Option<Transfer>,
        /// The PodMigration's name; default: generated from the pod's.
        #[arg(long)]
        name: Option<String>,
    },
    /// Empty a node: cordon it and migrate its pods (a NodeEvacuation).
    Evacuate {
        /// The node.
        node: String,
        /// Pods moved at once.
        #[arg(long)]
        max_concurrent: Option<i32>,
        /// What happens to pods that cannot migrate.
        #[arg(long, value_enum)]
        unmigratable: Option<Unmigratable>,
        /// How each migration's checkpoint goes to its target.
        #[arg(long, value_enum)]
        transfer: Option<Transfer>,
        /// The NodeEvacuation's name; default: generated from the node's.
        #[arg(long)]
        name: Option<String>,
    },
    /// Operations in flight and recent ones, like `kubectl get`.
    Status,
    /// What a checkpoint holds, from its status (no memory image is downloaded).
    Inspect {
        /// The PodCheckpoint.
        checkpoint: String,
    },
    /// Emergency: thaw a pod the cryopod agent holds frozen. Its checkpoint or
    /// migration fails; the pod runs on from where it was frozen.
    Thaw {
        /// The pod.
        pod: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Recorded with the thaw, beside who ran it.
        #[arg(long)]
        reason: Option<String>,
        /// cryopod's Helm release.
        #[arg(long, default_value = "cryopod")]
        release: String,
        /// The namespace cryopod is installed in.
        #[arg(long, default_value = "cryopod-system")]
        release_namespace: String,
        /// The agent's URL (`https://host:port`), e.g. through `kubectl port-forward`;
        /// default: the agent pod's address on the pod's node.
        #[arg(long)]
        agent_endpoint: Option<String>,
        /// The name in the agent's certificate; default: the node's name (the chart's
        /// per-node certificates), `cryopod-node-agent` with a shared certificate.
        #[arg(long)]
        agent_tls_name: Option<String>,
        /// The agents' gRPC port (the chart's `agent.port`).
        #[arg(long, default_value_t = 9443)]
        agent_port: u16,
    },
}

/// Parses `90s`, `10m`, `1h`, `1h30m` or a bare number of seconds, like kubectl's
/// `--timeout`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => return Err(format!("{text:?}: unknown unit {c:?} (use s, m or h)")),
        };
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{text:?}: a number must come before {c:?}"))?;
        total = total.saturating_add(n.saturating_mul(unit));
        number.clear();
    }
    if !number.is_empty() || text.is_empty() {
        return Err(format!("{text:?} is not a duration such as 90s, 10m or 1h"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations_read_as_kubectl_writes_them() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("10").is_ok());
        assert!(parse_duration("ten").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("5m3").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_command_line_parses_like_kubectl() {
        let cli = Cli::try_parse_from([
            "kubectl-cryopod",
            "migrate",
            "web-0",
            "--to",
            "node-2",
            "-n",
            "shop",
            "--wait",
            "--timeout",
            "5m",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.namespace.as_deref(), Some("shop"));
        assert!(cli.wait);
        assert_eq!(cli.timeout, Duration::from_secs(300));
        assert_eq!(cli.output, Some(OutputFormat::Json));
        assert!(matches!(cli.command, Command::Migrate { ref pod, ref to, .. } if pod == "web-0" && to == "node-2"));
        // A migration needs its target.
        assert!(Cli::try_parse_from(["kubectl-cryopod", "migrate", "web-0"]).is_err());
        let cli = Cli::try_parse_from(["kubectl-cryopod", "evacuate", "node-1", "--unmigratable", "Skip"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Evacuate {
                unmigratable: Some(Unmigratable::Skip),
                ..
            }
        ));
        assert!(
            Cli::try_parse_from(["kubectl-cryopod", "status", "-A"])
                .unwrap()
                .all_namespaces
        );
    }
}
