//! What owns a migrated pod decides how its replacement comes to be:
//!
//! - a bare pod: the restored pod gets a new name and the source is deleted;
//! - a ReplicaSet's pod (a Deployment's too): the restored pod is created without
//!   the labels the ReplicaSet selects on, so the ReplicaSet neither counts nor
//!   adopts it while it restores. Once it is Ready, the source is marked cheapest to
//!   delete and the labels are put back: the ReplicaSet adopts the restored pod, has
//!   one pod too many, and scales down the source. It never creates a pod;
//! - a StatefulSet's pod: the restored pod must have the same name, so the source is
//!   stopped and deleted first. A fence (a ConfigMap read by the
//!   `cryopod-restore-fence` ValidatingAdmissionPolicy) keeps the StatefulSet from
//!   recreating the name meanwhile; the restored pod, matching its selector and
//!   name, is adopted by it with its PersistentVolumeClaims.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};

/// The label by which the fence policy finds fences.
pub const FENCE_LABEL: &str = "cryopod.io/fence";
/// The policy that enforces fences (installed by the chart).
pub const FENCE_POLICY: &str = "cryopod-restore-fence";
/// Set on a PodRestore by a migration: label keys, comma-separated, that the
/// restored pod is created without (put back when the migration adopts it).
pub const WITHHOLD_LABELS_ANNOTATION: &str = "cryopod.io/withhold-labels";
/// The ReplicaSet controller deletes pods with the lowest cost first.
pub const DELETION_COST_ANNOTATION: &str = "controller.kubernetes.io/pod-deletion-cost";

/// The owner reference that controls the pod, if one does.
pub fn controller_of(pod: &Pod) -> Option<&OwnerReference> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

/// The controller of a pod, as far as migration cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workload {
    /// No controller.
    Bare,
    /// Owned by this ReplicaSet.
    ReplicaSet(String),
    /// Owned by this StatefulSet.
    StatefulSet(String),
}

impl Workload {
    /// The pod's controller, or why a pod of that controller cannot be migrated.
    pub fn of(pod: &Pod) -> Result<Self, String> {
        match controller_of(pod) {
            None => Ok(Self::Bare),
            Some(o) if o.api_version == "apps/v1" && o.kind == "ReplicaSet" => Ok(Self::ReplicaSet(o.name.clone())),
            Some(o) if o.api_version == "apps/v1" && o.kind == "StatefulSet" => Ok(Self::StatefulSet(o.name.clone())),
            Some(o) => Err(format!(
                "pod {} is managed by {} {}; cryopod migrates bare pods and pods of ReplicaSets, Deployments and StatefulSets",
                pod.metadata.name.clone().unwrap_or_default(),
                o.kind,
                o.name
            )),
        }
    }

    /// `Kind/name` as recorded in `status.sourceController`; `None` for a bare pod.
    pub fn recorded(&self) -> Option<String> {
        match self {
            Self::Bare => None,
            Self::ReplicaSet(name) => Some(format!("ReplicaSet/{name}")),
            Self::StatefulSet(name) => Some(format!("StatefulSet/{name}")),
        }
    }

    /// Reads back what [`Workload::recorded`] wrote.
    pub fn from_recorded(recorded: Option<&str>) -> Self {
        match recorded.and_then(|r| r.split_once('/')) {
            Some(("ReplicaSet", name)) => Self::ReplicaSet(name.to_owned()),
            Some(("StatefulSet", name)) => Self::StatefulSet(name.to_owned()),
            _ => Self::Bare,
        }
    }
}

/// Whether a label selector selects these labels (`matchLabels` and
/// `matchExpressions` with In, NotIn, Exists, DoesNotExist).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// The pod labels a ReplicaSet's restored pod is created without, so that the
/// ReplicaSet does not select it; or why no such set exists.
pub fn withheld_labels(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    let keys: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .chain(selector.match_expressions.iter().flatten().map(|e| e.key.clone()))
        .filter(|k| labels.contains_key(k))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut without = labels.clone();
    without.retain(|k, _| !keys.contains(k));
    if selects(selector, &without) {
        return Err(
            "the ReplicaSet's selector selects the pod even without its labels; cryopod cannot keep the restored \
             pod apart until it is Ready"
                .to_owned(),
        );
    }
    Ok(keys)
}

/// The labels to put back on a restored pod: the withheld keys with the source's
/// values.
pub fn labels_to_restore(withheld: &[String], source: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    source
        .iter()
        .filter(|(k, _)| withheld.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Parses [`WITHHOLD_LABELS_ANNOTATION`].
pub fn parse_withheld(annotation: Option<&str>) -> Vec<String> {
    annotation
        .into_iter()
        .flat_map(|a| a.split(','))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The fence that keeps pod `pod` of a StatefulSet from being recreated while a
/// migration (its owner) restores it.
pub fn fence(name: &str, namespace: &str, pod: &str, owner: OwnerReference) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([(FENCE_LABEL.to_owned(), "true".to_owned())].into()),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        data: Some([("pod".to_owned(), pod.to_owned())].into()),
        ..ConfigMap::default()
    }
}

/// Whether the refusal of a pod creation came from the fence policy.
pub fn refused_by_fence(status: u16, message: &str) -> bool {
    status == 403 && message.contains(FENCE_POLICY)
}

/// Whether a pod is controlled by the object with this UID.
pub fn controlled_by(pod: &Pod, uid: &str) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn selector(value: serde_json::Value) -> LabelSelector {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn owners_decide_the_workload() {
        let pod = |owner: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "p", "ownerReferences": owner}})).unwrap()
        };
        assert_eq!(Workload::of(&Pod::default()).unwrap(), Workload::Bare);
        let rs = pod(
            serde_json::json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d", "uid": "1", "controller": true}]),
        );
        assert_eq!(Workload::of(&rs).unwrap(), Workload::ReplicaSet("web-7d".into()));
        let sts = pod(
            serde_json::json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "1", "controller": true}]),
        );
        let workload = Workload::of(&sts).unwrap();
        assert_eq!(workload, Workload::StatefulSet("db".into()));
        assert_eq!(Workload::from_recorded(workload.recorded().as_deref()), workload);
        assert_eq!(Workload::from_recorded(None), Workload::Bare);
        // A non-controller owner leaves the pod bare.
        let owned = pod(serde_json::json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "c", "uid": "1"}]));
        assert_eq!(Workload::of(&owned).unwrap(), Workload::Bare);
        let job = pod(
            serde_json::json!([{"apiVersion": "batch/v1", "kind": "Job", "name": "nightly", "uid": "1", "controller": true}]),
        );
        assert!(Workload::of(&job).unwrap_err().contains("managed by Job nightly"));
    }

    #[test]
    fn the_selected_labels_are_withheld_and_put_back() {
        let source = labels(&[("app", "web"), ("pod-template-hash", "7d"), ("team", "a")]);
        let sel = selector(serde_json::json!({"matchLabels": {"app": "web", "pod-template-hash": "7d"}}));
        let withheld = withheld_labels(&sel, &source).unwrap();
        assert_eq!(withheld, ["app", "pod-template-hash"]);
        assert_eq!(
            labels_to_restore(&withheld, &source),
            labels(&[("app", "web"), ("pod-template-hash", "7d")])
        );
        assert_eq!(parse_withheld(Some(&withheld.join(","))), withheld);
        assert!(parse_withheld(None).is_empty());
        // Expressions count too.
        let sel =
            selector(serde_json::json!({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a"]}]}));
        assert_eq!(withheld_labels(&sel, &source).unwrap(), ["team"]);
        // A selector that only says what must be absent selects the stripped pod.
        let sel = selector(serde_json::json!({"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]}));
        assert!(
            withheld_labels(&sel, &source)
                .unwrap_err()
                .contains("even without its labels")
        );
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let pod = labels(&[("app", "db"), ("tier", "data")]);
        assert!(selects(&selector(serde_json::json!({})), &pod));
        assert!(selects(
            &selector(serde_json::json!({"matchLabels": {"app": "db"}})),
            &pod
        ));
        assert!(!selects(
            &selector(serde_json::json!({"matchLabels": {"app": "web"}})),
            &pod
        ));
        let expr = |op: &str, values: serde_json::Value| {
            selector(serde_json::json!({"matchExpressions": [{"key": "tier", "operator": op, "values": values}]}))
        };
        assert!(selects(&expr("In", serde_json::json!(["data"])), &pod));
        assert!(!selects(&expr("NotIn", serde_json::json!(["data"])), &pod));
        assert!(selects(&expr("Exists", serde_json::json!(null)), &pod));
        assert!(!selects(&expr("DoesNotExist", serde_json::json!(null)), &pod));
    }

    #[test]
    fn fences_name_the_pod_and_refusals_are_recognised() {
        let owner = OwnerReference {
            api_version: "cryopod.io/v1alpha1".into(),
            kind: "PodMigration".into(),
            name: "m".into(),
            uid: "u".into(),
            ..OwnerReference::default()
        };
        let cm = fence("m-fence", "ns", "db-0", owner);
        assert_eq!(cm.data.unwrap()["pod"], "db-0");
        assert_eq!(cm.metadata.labels.unwrap()[FENCE_LABEL], "true");
        assert!(refused_by_fence(
            403,
            "pods \"db-0\" is forbidden: ValidatingAdmissionPolicy 'cryopod-restore-fence' with binding 'cryopod-restore-fence' denied request"
        ));
        assert!(!refused_by_fence(409, "pods \"db-0\" already exists"));
    }
}
