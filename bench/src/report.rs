//! Figures, their baselines and ratios: the summary over repeats, the table printed
//! and written to `docs/performance.md`, and the plot.

use std::fmt::Write as _;
use std::path::Path;

/// Min, median and max over the repeats of one measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Summary {
    /// The summary of some samples; `None` without samples.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let (first, last) = (*sorted.first()?, *sorted.last()?);
        let mid = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Some(Self {
            min: first,
            median,
            max: last,
        })
    }

    fn cell(&self, unit: &str) -> String {
        format!(
            "{} {unit} ({}–{})",
            fmt_num(self.median),
            fmt_num(self.min),
            fmt_num(self.max)
        )
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// What a ratio must be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    /// The ratio must be at most this.
    AtMost(f64),
    /// Only reported.
    None,
}

/// One line of the report: a figure against its baseline from the same run.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// What was measured, e.g. `freeze window`.
    pub measure: String,
    /// The workload, e.g. `2 containers, 256 MiB`.
    pub workload: String,
    /// cryopod's figure.
    pub ours: Summary,
    /// What the baseline is, e.g. `raw CRIU dump`.
    pub baseline_name: String,
    pub baseline: Summary,
    /// `ms`, `MiB`, ...
    pub unit: String,
    pub goal: Goal,
}

impl Row {
    /// ours / baseline, on medians.
    pub fn ratio(&self) -> f64 {
        self.ours.median / self.baseline.median
    }

    /// Whether the goal is met; `None` without one.
    pub fn meets_goal(&self) -> Option<bool> {
        match self.goal {
            Goal::AtMost(limit) => Some(self.ratio() <= limit),
            Goal::None => None,
        }
    }
}

/// The rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| measure | workload | cryopod, median (min–max) | baseline | baseline, median (min–max) | ratio | goal |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let goal = match (row.goal, row.meets_goal()) {
            (Goal::AtMost(limit), Some(true)) => format!("≤ {limit:.2}: met"),
            (Goal::AtMost(limit), _) => format!("≤ {limit:.2}: **missed**"),
            (Goal::None, _) => "—".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.2} | {goal} |",
            row.measure,
            row.workload,
            row.ours.cell(&row.unit),
            row.baseline_name,
            row.baseline.cell(&row.unit),
            row.ratio()
        );
    }
    out
}

/// The machine the figures come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: u64,
    pub kernel: String,
    pub criu: String,
    pub date: String,
}

impl Machine {
    /// Reads this machine's facts from /proc.
    pub fn this(criu: &str, date: &str) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_default();
        let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
        let memory_gib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| (kib + (1 << 19)) >> 20);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        Self {
            cpu,
            cores,
            memory_gib,
            kernel,
            criu: criu.to_owned(),
            date: date.to_owned(),
        }
    }
}

/// `docs/performance.md`: how to run, the machine, the table, and what was not measured.
pub fn markdown(rows: &[Row], machine: &Machine, repeats: usize, plot: &str, notes: &[String]) -> String {
    let mut out = String::from(
        "# Performance\n\n\
         Written by `make bench` (`bench/`); do not edit by hand. Every figure is measured\n\
         against its baseline in the same run, on the local cluster (`docs/testbed.md`):\n\
         the pod figures through the node agent's library as the agent binary runs it,\n\
         migrations through the chart installed by Helm, the scale figures through the\n\
         operator binary. Ratios compare medians; lower is better.\n\n",
    );
    let _ = writeln!(
        out,
        "Machine: {} ({} cores), {} GiB, kernel {}, CRIU {}; {} repeats; {}.\n",
        machine.cpu, machine.cores, machine.memory_gib, machine.kernel, machine.criu, repeats, machine.date
    );
    out.push_str(&table(rows));
    let _ = writeln!(
        out,
        "\n![freeze window and checkpoint time against their baselines]({plot})\n"
    );
    out.push_str("## What each figure is\n\n");
    out.push_str(
        "- **freeze window**: from the pod's freeze to its thaw, the application's pause, with\n  \
         the pod left running. Baseline: the raw CRIU dumps of the same containers through\n  \
         runc, in parallel, leaving them running, without cryopod around them.\n\
         - **checkpoint**: the whole checkpoint until every object is stored in the S3\n  \
         server and verified, manifest last. Baseline: the larger of the raw dump and a plain\n  \
         upload of the raw images to the same server.\n\
         - **stored size**: bytes stored (zstd) against the raw CRIU images.\n\
         - **restore preparation**: fetching, verifying and unpacking the checkpoint on the\n  \
         other node, against fetching the same bytes without verifying or unpacking.\n",
    );
    if !notes.is_empty() {
        out.push_str("\n## Notes\n\n");
        for note in notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    out
}

/// Draws the medians with their baselines, one panel per measure, into a PNG.
pub fn plot(rows: &[Row], measures: &[&str], font: &'static [u8], path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "the font cannot be read".to_owned())?;
    let root = BitMapBackend::new(path, (560 * measures.len() as u32, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((1, measures.len()));
    for (panel, measure) in panels.iter().zip(measures) {
        let picked: Vec<&Row> = rows.iter().filter(|r| r.measure == *measure).collect();
        let top = picked
            .iter()
            .map(|r| r.ours.max.max(r.baseline.max))
            .fold(1.0_f64, f64::max)
            * 1.15;
        let unit = picked.first().map_or("", |r| r.unit.as_str());
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{measure} ({unit})"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..picked.len() as f64, 0.0..top)
            .map_err(|e| e.to_string())?;
        let labels: Vec<String> = picked.iter().map(|r| r.workload.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(picked.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 {
                    labels.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(|e| e.to_string())?;
        let grey = RGBColor(150, 150, 150);
        let blue = RGBColor(31, 119, 180);
        let name = picked.first().map_or_else(String::new, |r| r.baseline_name.clone());
        let series = [(name, grey, 0.12, true), ("cryopod".to_owned(), blue, 0.52, false)];
        for (label, color, offset, baseline) in series {
            let bars = picked.iter().enumerate().map(move |(i, r)| {
                let value = if baseline { r.baseline.median } else { r.ours.median };
                let x = i as f64 + offset;
                Rectangle::new([(x, 0.0), (x + 0.36, value)], color.filled())
            });
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    fn row(ours: &[f64], baseline: &[f64], goal: Goal) -> Row {
        Row {
            measure: "freeze window".into(),
            workload: "2 × 32 MiB".into(),
            ours: Summary::of(ours).unwrap(),
            baseline_name: "raw CRIU dump".into(),
            baseline: Summary::of(baseline).unwrap(),
            unit: "ms".into(),
            goal,
        }
    }

    #[test]
    fn summaries_take_min_median_max() {
        assert_eq!(
            Summary::of(&[3.0, 1.0, 2.0]).unwrap(),
            Summary {
                min: 1.0,
                median: 2.0,
                max: 3.0
            }
        );
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn ratios_are_on_medians_and_goals_are_judged() {
        let met = row(&[110.0, 100.0, 130.0], &[100.0, 95.0, 105.0], Goal::AtMost(1.15));
        assert!((met.ratio() - 1.1).abs() < 1e-9);
        assert_eq!(met.meets_goal(), Some(true));
        let missed = row(&[200.0], &[100.0], Goal::AtMost(1.15));
        assert_eq!(missed.meets_goal(), Some(false));
        let text = table(&[met, missed]);
        assert!(text.contains("| freeze window | 2 × 32 MiB | 110 ms (100–130) | raw CRIU dump | 100 ms (95.0–105) | 1.10 | ≤ 1.15: met |"), "{text}");
        assert!(text.contains("**missed**"), "{text}");
    }

    #[test]
    fn the_plot_is_a_png() {
        let Ok(font) = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf") else {
            panic!("the DejaVu font (hack/ensure-host-packages.sh installs fonts-dejavu-core) is missing");
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plot.png");
        let rows = [row(&[110.0], &[100.0], Goal::None)];
        plot(&rows, &["freeze window"], Box::leak(font.into_boxed_slice()), &path).unwrap();
        assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
    }
}
