//! The turns checkpoints take: one at a time per pod, a limit per node. The watch
//! shows what runs; a start this operator made counts until the watch shows it.

use std::collections::HashMap;
use std::sync::Arc;

use cryopod_crds::v1alpha1::{CheckpointPhase, PodCheckpoint};
use kube::ResourceExt;

/// A checkpoint in flight elsewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// `namespace/name`.
    pub name: String,
    /// Its pod's UID.
    pub pod_uid: String,
    /// Its node.
    pub node: String,
}

/// Checkpoints this operator started (by PodCheckpoint UID) whose start the watch has
/// not shown yet. A claim ends once the watched object has left Pending, or is gone.
#[derive(Debug, Default)]
pub struct Starts(HashMap<String, InFlight>);

impl Starts {
    /// Records a start.
    pub fn claim(&mut self, uid: &str, flight: InFlight) {
        self.0.insert(uid.to_owned(), flight);
    }

    /// The checkpoints in flight, `except` this one: those the watch shows
    /// Checkpointing or Uploading, and the claims it does not show started yet.
    pub fn in_flight(&mut self, watched: &[Arc<PodCheckpoint>], except: &str) -> Vec<InFlight> {
        let phase_of = |uid: &str| {
            watched
                .iter()
                .find(|cp| cp.metadata.uid.as_deref() == Some(uid))
                .map(|cp| cp.status.as_ref().and_then(|s| s.phase))
        };
        self.0
            .retain(|uid, _| matches!(phase_of(uid), Some(None | Some(CheckpointPhase::Pending))));
        let mut flights: Vec<InFlight> = watched
            .iter()
            .filter(|cp| cp.metadata.uid.as_deref() != Some(except))
            .filter_map(|cp| {
                let status = cp.status.as_ref()?;
                matches!(
                    status.phase?,
                    CheckpointPhase::Checkpointing | CheckpointPhase::Uploading
                )
                .then(|| InFlight {
                    name: format!("{}/{}", cp.namespace().unwrap_or_default(), cp.name_any()),
                    pod_uid: status.source_pod_uid.clone().unwrap_or_default(),
                    node: status.node_name.clone().unwrap_or_default(),
                })
            })
            .collect();
        flights.extend(
            self.0
                .iter()
                .filter(|(uid, _)| uid.as_str() != except)
                .map(|(_, flight)| flight.clone()),
        );
        flights
    }
}

/// Why a checkpoint of pod `pod_uid` on `node` must wait, if it must: another one of
/// the same pod is in flight, or `per_node` are running on the node already.
pub fn must_wait(pod_uid: &str, node: &str, others: &[InFlight], per_node: usize) -> Option<String> {
    if let Some(same) = others.iter().find(|o| o.pod_uid == pod_uid) {
        return Some(format!(
            "waiting for PodCheckpoint {} of the same pod to finish",
            same.name
        ));
    }
    let on_node = others.iter().filter(|o| o.node == node).count();
    (on_node >= per_node).then(|| format!("waiting: {on_node} checkpoints already run on node {node} (the limit)"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn operations_on_one_pod_are_serialized_and_nodes_limited() {
        let running = |name: &str, pod: &str, node: &str| InFlight {
            name: name.into(),
            pod_uid: pod.into(),
            node: node.into(),
        };
        let others = [running("ns/a", "p1", "n1"), running("ns/b", "p2", "n1")];
        assert_eq!(
            must_wait("p1", "n1", &others, 5).unwrap(),
            "waiting for PodCheckpoint ns/a of the same pod to finish"
        );
        assert!(
            must_wait("p3", "n1", &others, 2)
                .unwrap()
                .contains("2 checkpoints already run on node n1")
        );
        assert_eq!(must_wait("p3", "n1", &others, 3), None);
        assert_eq!(must_wait("p3", "n2", &others, 1), None);
    }

    #[test]
    fn a_start_counts_until_the_watch_shows_it_and_no_longer() {
        let watched = |uid: &str, phase: Option<&str>| {
            let mut value = serde_json::json!({
                "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
                "metadata": {"name": uid, "namespace": "ns", "uid": uid},
                "spec": {"sourcePodName": "p"}
            });
            if let Some(phase) = phase {
                value["status"] = serde_json::json!({"phase": phase, "sourcePodUID": "p1", "nodeName": "n1"});
            }
            Arc::new(serde_json::from_value::<PodCheckpoint>(value).unwrap())
        };
        let flight = InFlight {
            name: "ns/a".into(),
            pod_uid: "p1".into(),
            node: "n1".into(),
        };
        let mut starts = Starts::default();
        starts.claim("a", flight.clone());
        // The watch still shows a as new: the claim stands in for it, except for a itself.
        let view = [watched("a", None), watched("b", None)];
        assert_eq!(starts.in_flight(&view, "b"), vec![flight.clone()]);
        assert_eq!(starts.in_flight(&view, "a"), vec![]);
        // The watch caught up: it alone counts, once.
        let view = [watched("a", Some("Checkpointing")), watched("b", None)];
        assert_eq!(starts.in_flight(&view, "b").len(), 1);
        // Finished, or deleted: nothing is in flight and the claim is gone.
        let view = [watched("a", Some("Ready")), watched("b", None)];
        assert_eq!(starts.in_flight(&view, "b"), vec![]);
        starts.claim("c", flight.clone());
        assert_eq!(starts.in_flight(&view, "b"), vec![]);
    }
}
