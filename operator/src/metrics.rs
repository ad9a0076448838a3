//! Prometheus metrics of the operator: operations by kind, result and reason, their
//! durations, how many are in flight, and the validity of its client certificate.
//! Served as OpenMetrics text on `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of an operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// `PodCheckpoint`, `PodRestore` or `PodMigration`.
    pub kind: String,
}

/// Labels of a finished operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// The resource kind.
    pub kind: String,
    /// `succeeded`, `failed` or `rolled back`.
    pub result: String,
    /// The reason of the `Ready` condition it ended with (`CheckpointCompleted`,
    /// `NoCompatibleNode`, ...): one of the API's constants, so a bounded set.
    pub reason: String,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct OperatorMetrics {
    registry: Registry,
    operations: Family<Outcome, Counter>,
    in_flight: Family<Kind, Gauge>,
    durations: Family<Kind, Histogram>,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OperatorMetrics {
    /// Registers every metric under the `cryopod_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cryopod_operator");
        let operations = Family::<Outcome, Counter>::default();
        let in_flight = Family::<Kind, Gauge>::default();
        // 10 ms to about 20 minutes.
        let durations =
            Family::<Kind, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.01, 2.0, 18)));
        registry.register(
            "operations",
            "Operations finished, by kind and result",
            operations.clone(),
        );
        registry.register(
            "operations_in_flight",
            "Operations started and not finished",
            in_flight.clone(),
        );
        registry.register(
            "operation_duration_seconds",
            "From the start of an operation to its end",
            durations.clone(),
        );
        Self {
            registry,
            operations,
            in_flight,
            durations,
        }
    }

    /// An operation started.
    pub fn started(&self, kind: &str) {
        self.in_flight.get_or_create(&Kind { kind: kind.to_owned() }).inc();
    }

    /// Exports the validity of the client certificate the operator presents to the
    /// agents (registered only when it can be read).
    pub fn certificate(&mut self, pem: &[u8]) -> Result<cryopod_runtime::certificate::Validity, String> {
        cryopod_runtime::certificate::register(&mut self.registry, pem)
    }

    /// An operation ended, with the reason of its `Ready` condition.
    pub fn finished(&self, kind: &str, result: &str, reason: &'static str) {
        let gauge = self.in_flight.get_or_create(&Kind { kind: kind.to_owned() });
        if gauge.get() > 0 {
            gauge.dec();
        }
        self.operations
            .get_or_create(&Outcome {
                kind: kind.to_owned(),
                result: result.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// How long a finished operation took.
    pub fn duration(&self, kind: &str, seconds: f64) {
        self.durations
            .get_or_create(&Kind { kind: kind.to_owned() })
            .observe(seconds);
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
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<OperatorMetrics>) -> std::io::Result<()> {
    cryopod_runtime::serve_metrics(listener, move || metrics.encode()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_registered() {
        let metrics = OperatorMetrics::new();
        // A family shows once it has a member.
        metrics.started("PodRestore");
        metrics.finished("PodRestore", "failed", "NoCompatibleNode");
        metrics.duration("PodRestore", 1.0);
        let text = metrics.encode();
        for name in ["operations", "operations_in_flight", "operation_duration_seconds"] {
            assert!(
                text.contains(&format!("# TYPE cryopod_operator_{name} ")),
                "{name} missing:\n{text}"
            );
        }
    }

    #[test]
    fn operations_are_counted_by_reason_and_in_flight_tracked() {
        let metrics = OperatorMetrics::new();
        metrics.started("PodCheckpoint");
        metrics.started("PodCheckpoint");
        metrics.finished("PodCheckpoint", "succeeded", "CheckpointCompleted");
        metrics.started("PodMigration");
        metrics.finished("PodMigration", "rolled back", "SourceResumed");
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"cryopod_operator_operations_total{kind="PodCheckpoint",result="succeeded",reason="CheckpointCompleted"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"cryopod_operator_operations_total{kind="PodMigration",result="rolled back",reason="SourceResumed"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"cryopod_operator_operations_in_flight{kind="PodCheckpoint"} 1"#),
            "{text}"
        );
    }
}
