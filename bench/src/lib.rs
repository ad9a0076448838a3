//! `make bench`: cryopod's figures against the baselines users have today, measured
//! side by side in the same run on the local cluster, printed as a table and written
//! to `docs/performance.md` with a plot.

pub mod measure;
pub mod migration;
pub mod report;
pub mod scale;

use measure::Sample;
use migration::MigrationSample;
use report::{Goal, Row, Summary};
use scale::ScaleSample;

/// A figure of a sample.
type Figure = fn(&Sample) -> f64;

/// What the report shows, per pod size: measure, cryopod's figure, the baseline's
/// name and figure, the unit, the goal.
const MEASURES: [(&str, Figure, &str, Figure, &str, Goal); 4] = [
    (
        "freeze window",
        |s| s.freeze_ms,
        "raw CRIU dump",
        |s| s.raw_dump_ms,
        "ms",
        Goal::AtMost(1.15),
    ),
    (
        "checkpoint",
        |s| s.checkpoint_ms,
        "max(raw dump, plain upload)",
        |s| s.raw_dump_ms.max(s.upload_ms),
        "ms",
        Goal::AtMost(1.2),
    ),
    (
        "stored size",
        |s| s.stored_bytes / 1048576.0,
        "raw CRIU images",
        |s| s.raw_bytes / 1048576.0,
        "MiB",
        Goal::None,
    ),
    (
        "restore preparation",
        |s| s.prepare_ms,
        "plain fetch",
        |s| s.fetch_ms,
        "ms",
        Goal::None,
    ),
];

/// The rows of one pod size from its samples.
pub fn rows(mib: u64, samples: &[Sample]) -> Vec<Row> {
    let of = |f: Figure| Summary::of(&samples.iter().map(f).collect::<Vec<_>>());
    MEASURES
        .iter()
        .filter_map(|(measure, ours, name, baseline, unit, goal)| {
            Some(Row {
                measure: (*measure).to_owned(),
                workload: format!("2 × {} MiB", mib / 2),
                ours: of(*ours)?,
                baseline_name: (*name).to_owned(),
                baseline: of(*baseline)?,
                unit: (*unit).to_owned(),
                goal: *goal,
            })
        })
        .collect()
}

/// The rows of migrations of one pod size, one per transfer mode.
pub fn migration_rows(mib: u64, samples: &[MigrationSample]) -> Vec<Row> {
    let of = |f: fn(&MigrationSample) -> f64| Summary::of(&samples.iter().map(f).collect::<Vec<_>>());
    let Some(baseline) = of(MigrationSample::per_container_ms) else {
        return vec![];
    };
    // #17's goal for Direct is at 2 × 512 MiB and up, where the data dominates.
    let direct_goal = if mib >= 1024 { Goal::AtMost(0.25) } else { Goal::None };
    [
        ("migration downtime, ViaStore", of(|s| s.downtime_ms), Goal::AtMost(0.5)),
        ("migration downtime, Direct", of(|s| s.direct_downtime_ms), direct_goal),
    ]
    .into_iter()
    .filter_map(|(measure, ours, goal)| {
        Some(Row {
            measure: measure.to_owned(),
            workload: format!("2 × {} MiB", mib / 2),
            ours: ours?,
            baseline_name: "per container: kubelet checkpoints, uploads, restore credited".to_owned(),
            baseline,
            unit: "ms".to_owned(),
            goal,
        })
    })
    .collect()
}

/// The operator's peak resident memory must stay under this, MiB.
pub const OPERATOR_RSS_LIMIT_MIB: f64 = 100.0;

/// The rows of the operator at scale, `count` PodCheckpoints per repeat.
pub fn scale_rows(count: usize, samples: &[ScaleSample]) -> Vec<Row> {
    let of = |f: fn(&ScaleSample) -> f64| Summary::of(&samples.iter().map(f).collect::<Vec<_>>());
    let workload = format!("{count} PodCheckpoints, stub agents");
    let row =
        |measure: &str, ours: Option<Summary>, baseline_name: &str, baseline: Option<Summary>, unit: &str, goal| {
            Some(Row {
                measure: measure.to_owned(),
                workload: workload.clone(),
                ours: ours?,
                baseline_name: baseline_name.to_owned(),
                baseline: baseline?,
                unit: unit.to_owned(),
                goal,
            })
        };
    let limit = Summary::of(&[OPERATOR_RSS_LIMIT_MIB]);
    [
        row(
            "operator: all Ready",
            of(|s| s.reconcile_s),
            "plain client: one status write each",
            of(|s| s.status_writes_s),
            "s",
            Goal::None,
        ),
        row(
            "operator: all deleted",
            of(|s| s.delete_s),
            "plain delete, no finalizer",
            of(|s| s.plain_delete_s),
            "s",
            Goal::None,
        ),
        row(
            "operator peak RSS",
            of(|s| s.peak_rss_mib),
            "the limit",
            limit,
            "MiB",
            Goal::AtMost(1.0),
        ),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn samples_become_rows_against_their_baselines() {
        let sample = |freeze: f64| Sample {
            raw_dump_ms: 100.0,
            raw_bytes: 64.0 * 1048576.0,
            upload_ms: 150.0,
            freeze_ms: freeze,
            checkpoint_ms: 170.0,
            stored_bytes: 32.0 * 1048576.0,
            prepare_ms: 90.0,
            fetch_ms: 30.0,
        };
        let rows = rows(64, &[sample(105.0), sample(110.0), sample(120.0)]);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].workload, "2 × 32 MiB");
        assert!((rows[0].ratio() - 1.1).abs() < 1e-9);
        // The checkpoint's baseline is the slower of dump and upload.
        assert_eq!(rows[1].baseline.median, 150.0);
        assert_eq!(rows[1].meets_goal(), Some(true));
        assert!((rows[2].ratio() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn the_operator_at_scale_is_held_to_its_memory_limit() {
        let sample = |rss: f64| ScaleSample {
            reconcile_s: 20.0,
            status_writes_s: 4.0,
            delete_s: 10.0,
            plain_delete_s: 2.0,
            peak_rss_mib: rss,
        };
        let rows = scale_rows(1000, &[sample(40.0), sample(60.0), sample(50.0)]);
        assert_eq!(rows.len(), 3);
        assert!((rows[0].ratio() - 5.0).abs() < 1e-9);
        assert_eq!(rows[2].meets_goal(), Some(true));
        let rows = scale_rows(1000, &[sample(140.0)]);
        assert_eq!(rows[2].meets_goal(), Some(false));
    }
}
