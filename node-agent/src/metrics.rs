//! Prometheus metrics of the agent: operations by result, the freeze window, dump
//! and upload durations, and bytes stored. Served as OpenMetrics text on
//! `/metrics`, plain HTTP on its own port (scrapers rarely hold client certificates).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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

/// Serves `/metrics` on a bound listener until it fails.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<AgentMetrics>) -> std::io::Result<()> {
    cryopod_runtime::serve_metrics(listener, move || metrics.encode()).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
