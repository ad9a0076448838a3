//! `cryopod-bench [--parts pods,migration,scale] [--sizes 64,256,1024,2048]
//! [--migrate-sizes 64,256,1024] [--scale 1000] [--repeats 3] [--out docs]`: run by `make bench` (bench/run.sh) against the local
//! cluster it starts.

use std::process::ExitCode;

use cryopod_bench::{measure, migration, migration_rows, report, rows, scale, scale_rows};
use cryopod_e2e::testbed::Testbed;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

struct Args {
    /// `pods` (freeze, checkpoint, size, restore preparation per pod size),
    /// `migration` (downtime against the per-container path) and `scale` (the
    /// operator with many PodCheckpoints).
    parts: Vec<String>,
    sizes: Vec<u64>,
    migrate_sizes: Vec<u64>,
    scale: usize,
    repeats: usize,
    out: std::path::PathBuf,
}

const PARTS: [&str; 3] = ["pods", "migration", "scale"];

fn mib_list(flag: &str, value: &str) -> Result<Vec<u64>, String> {
    value
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| format!("{flag}: {s} is not a number of MiB"))
        })
        .collect()
}

fn args() -> Result<Args, String> {
    let mut parsed = Args {
        parts: vec!["pods".into(), "migration".into(), "scale".into()],
        sizes: vec![64, 256, 1024, 2048],
        migrate_sizes: vec![64, 256, 1024],
        scale: 1000,
        repeats: 3,
        out: "docs".into(),
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let value = words.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sizes" => parsed.sizes = mib_list("--sizes", &value)?,
            "--migrate-sizes" => parsed.migrate_sizes = mib_list("--migrate-sizes", &value)?,
            "--parts" => {
                parsed.parts = value.split(',').map(|p| p.trim().to_owned()).collect();
                if let Some(bad) = parsed.parts.iter().find(|p| !PARTS.contains(&p.as_str())) {
                    return Err(format!("--parts: {bad} is not one of {}", PARTS.join(", ")));
                }
            }
            "--scale" => parsed.scale = value.parse().map_err(|_| format!("--scale: {value}"))?,
            "--repeats" => parsed.repeats = value.parse().map_err(|_| format!("--repeats: {value}"))?,
            "--out" => parsed.out = value.into(),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(parsed)
}

async fn run(args: Args) -> Result<(), String> {
    let tb = Testbed::from_env().map_err(|e| e.to_string())?;
    let client = tb.client().await.map_err(|e| e.to_string())?;
    let (source, target) = match tb.nodes.as_slice() {
        [a, b, ..] => (a.clone(), b.clone()),
        _ => return Err("the bench needs two nodes".into()),
    };
    let work = tb.dir.join("bench-work");
    let _ = std::fs::remove_dir_all(&work);
    let source = measure::Agent::on(&tb, &source, &work.join("source")).await?;
    let target = measure::Agent::on(&tb, &target, &work.join("target")).await?;
    let store = tb
        .s3_store(&tb.s3.endpoint, &tb.s3.secret_key)
        .map_err(|e| e.to_string())?;
    let bench = measure::Bench {
        tb: tb.clone(),
        client,
        source,
        target,
        store,
        work: work.clone(),
    };
    let mut all = Vec::new();
    let sizes = if args.parts.iter().any(|p| p == "pods") {
        args.sizes.as_slice()
    } else {
        &[]
    };
    for mib in sizes {
        println!(
            "pod with {mib} MiB of dirty memory over 2 containers, {} repeats",
            args.repeats
        );
        let samples = measure::pod_size(&bench, *mib, args.repeats).await?;
        all.extend(rows(*mib, &samples));
    }
    let (mut skews, mut restores) = (Vec::new(), Vec::new());
    if args.parts.iter().any(|p| p == "migration") {
        let helm = std::env::var_os("CRYOPOD_HELM")
            .ok_or("CRYOPOD_HELM is not set (bench/run.sh sets it from hack/ensure-helm.sh)")?;
        let measured = migration::migrations(
            &tb,
            &bench.client,
            &bench.store,
            std::path::Path::new(&helm),
            &args.migrate_sizes,
            args.repeats,
        )
        .await?;
        for (mib, samples) in measured {
            let median = |f: fn(&migration::MigrationSample) -> f64| {
                report::Summary::of(&samples.iter().map(f).collect::<Vec<_>>()).map(|s| s.median.round())
            };
            if let (Some(skew), Some(restore), Some(direct)) = (
                median(|s| s.capture_skew_ms),
                median(|s| s.restore_ms),
                median(|s| s.direct_restore_ms),
            ) {
                skews.push(format!("{skew} ms at 2 × {} MiB", mib / 2));
                restores.push(format!("{restore} ms (Direct: {direct} ms) at 2 × {} MiB", mib / 2));
            }
            all.extend(migration_rows(mib, &samples));
        }
    }
    if args.parts.iter().any(|p| p == "scale") {
        println!(
            "the operator with {} PodCheckpoints, agents stubbed, {} repeats",
            args.scale, args.repeats
        );
        let samples =
            scale::operator_at_scale(&tb, &bench.client, &operator_bin()?, &work, args.scale, args.repeats).await?;
        all.extend(scale_rows(args.scale, &samples));
    }
    let _ = std::fs::remove_dir_all(&work);
    let table = report::table(&all);
    println!("\n{table}");
    let font = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (hack/ensure-host-packages.sh installs it)"))?;
    let png = args.out.join("performance.png");
    report::plot(
        &all,
        &[
            "freeze window",
            "checkpoint",
            "migration downtime, ViaStore",
            "migration downtime, Direct",
        ],
        Box::leak(font.into_boxed_slice()),
        &png,
    )?;
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let machine = report::Machine::this(&measure::criu_version(&tb), &date);
    let notes = vec![
        "Each pod's containers are dumped once, unmeasured, before the repeats: a first dump of a \
         process was about 3× slower than the next ones here, whichever tool made it. Within a repeat \
         the baseline and cryopod take turns at going first."
            .to_owned(),
        "Each measured step starts after a `sync`, so none pays for the disk writeback of the one before.".to_owned(),
        "The workload keeps its memory half pseudo-random and half a repeated pattern, so zstd halves it.".to_owned(),
        "The agent code runs as in the images: profile `image`, dependencies at opt-level 2 and \
         cryopod's crates at 1, static."
            .to_owned(),
        "The operator at scale is the operator binary against the cluster's API server, watching one \
         namespace of pods bound to 20 Node objects without kubelets; its agents are the agent's gRPC service \
         over mTLS with a backend that answers at once. Its time runs from the operator's start, with every \
         PodCheckpoint already created, to the last one Ready. The plain client keeps 16 requests in flight."
            .to_owned(),
        "Migration downtime is cryopod's PodMigration through the chart as installed by Helm, to the \
         other node: `status.downtimeMillis`, from the freeze on the source to the restored pod Ready on \
         the target. `ViaStore` goes through the S3 server; `Direct` is staged on the source node and read \
         by the target's agent from the source's over TLS. Each restored pod is checked to have gone on: \
         no restart, and neither container filled its memory again."
            .to_owned(),
        "The per-container path is what Kubernetes offers: the kubelet's checkpoint API \
         (`POST /checkpoint/{ns}/{pod}/{container}`), one container after the other, then a plain upload \
         of each archive. It cannot restore here: containerd 2.1 does not take a checkpoint image (its \
         CreateContainer fails with \"no command specified\"), so its restore is credited with cryopod's \
         own restore time from the same repeat, which favours the baseline."
            .to_owned(),
        format!(
            "cryopod's restore through Kubernetes, the downtime after the checkpoint was stored (the \
             PodRestore, the agent's fetch and verification on the target, the pod's creation, the runtime \
             handler's restore of each container, Ready), took {} (medians).",
            if restores.is_empty() {
                "—".to_owned()
            } else {
                restores.join(", ")
            }
        ),
        format!(
            "The per-container path breaks a pod's shared state: it takes its containers at different \
             instants (the second checkpoint began {} after the first, medians) while they share \
             `/dev/shm`, volumes and the network; restoring one SysV IPC namespace into containers restored \
             one by one fails outright (docs/design.md). cryopod takes them at one freeze.",
            if skews.is_empty() {
                "—".to_owned()
            } else {
                skews.join(", ")
            }
        ),
    ];
    let markdown = report::markdown(&all, &machine, args.repeats, "performance.png", &notes);
    let md = args.out.join("performance.md");
    std::fs::write(&md, markdown).map_err(|e| format!("{}: {e}", md.display()))?;
    println!("written: {} and {}", md.display(), png.display());
    let missed: Vec<String> = all
        .iter()
        .filter(|r| r.meets_goal() == Some(false))
        .map(|r| format!("{} ({})", r.measure, r.workload))
        .collect();
    if !missed.is_empty() {
        println!("goals missed: {}", missed.join(", "));
    }
    Ok(())
}

/// The operator binary: `CRYOPOD_OPERATOR_BIN`, or the one built beside this one.
fn operator_bin() -> Result<std::path::PathBuf, String> {
    let bin = match std::env::var_os("CRYOPOD_OPERATOR_BIN") {
        Some(bin) => bin.into(),
        None => std::env::current_exe()
            .map_err(|e| format!("this binary's path: {e}"))?
            .with_file_name("cryopod-operator"),
    };
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} is missing: bench/run.sh builds it (or set CRYOPOD_OPERATOR_BIN)",
            bin.display()
        ))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("cryopod-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cryopod-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
