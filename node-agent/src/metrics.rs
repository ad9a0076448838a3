//! Prometheus metrics of the agent: operations by result, the freeze window, dump
//! and upload durations, bytes stored and fetched, the pods frozen now, and the
//! validity of the served certificate. Served as OpenMetrics text on `/metrics`, plain
//! HTTP on its own port (scrapers rarely hold client certificates).
//!
//! No metric names its node: one agent runs per node, and the scrape's target labels
//! (the chart's PodMonitor adds `node`) say which.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::journal::{Journal, ObservedFreeze};

/// Labels of an operation count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `checkpoint` (and, later, `restore`).
    pub kind: String,
    /// `succeeded`, `failed` or `cancelled`.
    pub result: String,
}

/// The agent's metrics.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    operations: Family<OperationLabels, Counter>,
    freeze_window: Histogram,
    dump: Histogram,
    upload: Histogram,
    stored_bytes: Counter,
    captured_bytes: Counter,
    restore_fetch: Histogram,
    fetched_bytes: Counter,
    frozen_pods: Gauge,
    frozen_past_deadline: Gauge,
    oldest_freeze: Gauge<f64, AtomicU64>,
}

/// The pods of this node frozen now, as the alerts read them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FrozenNow {
    /// Pods frozen now.
    pub pods: i64,
    /// Of those, the ones past their freeze deadline: the watchdog should have
    /// thawed them, so their thaw failed.
    pub past_deadline: i64,
    /// How long the longest-frozen of them has been (zero when none is, or none
    /// says when it was frozen).
    pub oldest: Duration,
}

/// Counts the freezes that are frozen now, at `now`.
pub fn frozen_now(freezes: &[ObservedFreeze], now: SystemTime) -> FrozenNow {
    let frozen: Vec<&ObservedFreeze> = freezes.iter().filter(|f| f.frozen()).collect();
    FrozenNow {
        pods: frozen.len() as i64,
        past_deadline: frozen.iter().filter(|f| f.deadline <= now).count() as i64,
        oldest: frozen
            .iter()
            .filter_map(|f| now.duration_since(f.frozen_at?).ok())
            .max()
            .unwrap_or_default(),
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Registers every metric under the `cryopod_agent` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cryopod_agent");
        let operations = Family::<OperationLabels, Counter>::default();
        // 1 ms to about 2 minutes.
        let seconds = || Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let (freeze_window, dump, upload, restore_fetch) = (seconds(), seconds(), seconds(), seconds());
        let (stored_bytes, captured_bytes, fetched_bytes) =
            (Counter::default(), Counter::default(), Counter::default());
        let (frozen_pods, frozen_past_deadline) = (Gauge::default(), Gauge::default());
        let oldest_freeze = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "operations",
            "Operations finished, by kind and result",
            operations.clone(),
        );
        registry.register(
            "freeze_window_seconds",
            "From the pod freeze to the last thaw (or, for a stopped pod, to the end of the dump)",
            freeze_window.clone(),
        );
        registry.register(
            "dump_seconds",
            "Capturing shared state and dumping every container, inside the freeze",
            dump.clone(),
        );
        registry.register(
            "upload_seconds",
            "Packaging, uploading and verifying a checkpoint",
            upload.clone(),
        );
        registry.register("stored_bytes", "Bytes stored, after compression", stored_bytes.clone());
        registry.register(
            "captured_bytes",
            "Bytes captured, before compression",
            captured_bytes.clone(),
        );
        registry.register(
            "restore_fetch_seconds",
            "Fetching, verifying and unpacking a checkpoint for a restore",
            restore_fetch.clone(),
        );
        registry.register(
            "fetched_bytes",
            "Bytes fetched for restores, as stored",
            fetched_bytes.clone(),
        );
        registry.register(
            "frozen_pods",
            "Pods of this node frozen now (a checkpoint's freeze, a held migration source)",
            frozen_pods.clone(),
        );
        registry.register(
            "frozen_past_deadline_pods",
            "Pods of this node still frozen past their freeze deadline: their thaw failed",
            frozen_past_deadline.clone(),
        );
        registry.register(
            "oldest_freeze_seconds",
            "How long the longest-frozen pod of this node has been frozen (0 when none is)",
            oldest_freeze.clone(),
        );
        Self {
            registry,
            operations,
            freeze_window,
            dump,
            upload,
            stored_bytes,
            captured_bytes,
            restore_fetch,
            fetched_bytes,
            frozen_pods,
            frozen_past_deadline,
            oldest_freeze,
        }
    }

    /// Exports the validity of the certificate the agent serves with (registered
    /// only when it can be read).
    pub fn certificate(&mut self, pem: &[u8]) -> Result<cryopod_runtime::certificate::Validity, String> {
        cryopod_runtime::certificate::register(&mut self.registry, pem)
    }

    /// Sets the frozen-pod gauges.
    pub fn frozen(&self, now: FrozenNow) {
        self.frozen_pods.set(now.pods);
        self.frozen_past_deadline.set(now.past_deadline);
        self.oldest_freeze.set(now.oldest.as_secs_f64());
    }

    /// Reads the crash journal and the kernel's freezer states into the frozen-pod
    /// gauges. A journal that cannot be listed leaves them as they were, and says so.
    pub fn observe_freezes(&self, journal: &Journal) {
        match crate::journal::observe(journal) {
            Ok(freezes) => self.frozen(frozen_now(&freezes, SystemTime::now())),
            Err(e) => tracing::warn!(error = %e, "cannot read the crash journal for the frozen-pod metrics"),
        }
    }

    /// Counts a finished operation.
    pub fn finished(&self, kind: &str, result: &str) {
        self.operations
            .get_or_create(&OperationLabels {
                kind: kind.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Records the figures of a stored checkpoint.
    pub fn checkpoint_stored(&self, outcome: &crate::checkpoint::CheckpointOutcome) {
        self.freeze_window
            .observe(outcome.manifest.freeze_window_millis as f64 / 1000.0);
        self.dump.observe(outcome.dump.as_secs_f64());
        self.upload.observe(outcome.upload.as_secs_f64());
        self.stored_bytes.inc_by(outcome.stored_bytes());
        self.captured_bytes
            .inc_by(outcome.manifest.objects.iter().map(|o| o.raw_size).sum());
    }

    /// Records the figures of a prepared restore.
    pub fn restore_prepared(&self, prepared: &crate::restore::PreparedRestore) {
        self.restore_fetch.observe(prepared.fetch.as_secs_f64());
        self.fetched_bytes.inc_by(prepared.fetched_bytes);
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` on a bound listener until it fails. The frozen-pod gauges are
/// read at each scrape from the journal and the kernel, not kept up to date by the
/// code that freezes: a thaw that failed, or a watchdog that thawed first, shows as
/// it is (a few small file reads per scrape).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<AgentMetrics>,
    journal: Journal,
) -> std::io::Result<()> {
    cryopod_runtime::serve_metrics(listener, move || {
        metrics.observe_freezes(&journal);
        metrics.encode()
    })
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::cgroup::FreezerState;
    use crate::journal::ContainerFreezer;

    #[test]
    fn every_metric_is_registered() {
        let metrics = AgentMetrics::new();
        // A family shows once it has a member.
        metrics.finished("checkpoint", "succeeded");
        let text = metrics.encode();
        for name in [
            "operations",
            "freeze_window_seconds",
            "dump_seconds",
            "upload_seconds",
            "stored_bytes",
            "captured_bytes",
            "restore_fetch_seconds",
            "fetched_bytes",
            "frozen_pods",
            "frozen_past_deadline_pods",
            "oldest_freeze_seconds",
        ] {
            assert!(
                text.contains(&format!("# TYPE cryopod_agent_{name} ")),
                "{name} missing:\n{text}"
            );
        }
    }

    fn freeze(frozen_at: Option<u64>, deadline: u64, containers: &[ContainerFreezer]) -> ObservedFreeze {
        let at = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        ObservedFreeze {
            frozen_at: frozen_at.map(at),
            deadline: at(deadline),
            containers: containers.to_vec(),
        }
    }

    #[test]
    fn frozen_pods_are_those_the_kernel_says_are_frozen() {
        use ContainerFreezer::*;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let freezes = [
            // A checkpoint's freeze under way.
            freeze(
                Some(990),
                1050,
                &[State(FreezerState::Frozen), State(FreezerState::Frozen)],
            ),
            // A held source whose deadline passed and whose thaw failed.
            freeze(
                Some(700),
                900,
                &[State(FreezerState::Thawed), State(FreezerState::Freezing)],
            ),
            // Thawed by its watchdog, released later: not frozen.
            freeze(Some(100), 400, &[State(FreezerState::Thawed)]),
            // Its pod is gone.
            freeze(Some(100), 400, &[Gone]),
            // Unreadable: the journal's word stands. An old entry without a start.
            freeze(None, 2000, &[Gone, Unreadable]),
        ];
        assert_eq!(
            frozen_now(&freezes, now),
            FrozenNow {
                pods: 3,
                past_deadline: 1,
                oldest: Duration::from_secs(300),
            }
        );
        assert_eq!(frozen_now(&[], now), FrozenNow::default());
    }

    #[test]
    fn frozen_pods_are_exported() {
        let metrics = AgentMetrics::new();
        metrics.frozen(FrozenNow {
            pods: 2,
            past_deadline: 1,
            oldest: Duration::from_millis(1500),
        });
        let text = metrics.encode();
        assert!(text.contains("cryopod_agent_frozen_pods 2\n"), "{text}");
        assert!(text.contains("cryopod_agent_frozen_past_deadline_pods 1\n"), "{text}");
        assert!(text.contains("cryopod_agent_oldest_freeze_seconds 1.5\n"), "{text}");
    }

    #[test]
    fn operations_are_counted_by_kind_and_result() {
        let metrics = AgentMetrics::new();
        metrics.finished("checkpoint", "succeeded");
        metrics.finished("checkpoint", "failed");
        metrics.finished("checkpoint", "failed");
        let text = metrics.encode();
        assert!(
            text.contains(r#"cryopod_agent_operations_total{kind="checkpoint",result="failed"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("# TYPE cryopod_agent_freeze_window_seconds histogram"),
            "{text}"
        );
    }
}
