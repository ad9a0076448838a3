//! Pieces shared by several kinds: node targets, condition helpers, schema helpers.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The condition every cryopod resource reports; `kubectl wait --for=condition=Ready`.
pub const CONDITION_READY: &str = "Ready";

/// Set while an operation holds its source pod frozen: `True` from the freeze, with
/// the freeze's instant as `lastTransitionTime`; `False` once it is thawed or stopped.
pub const CONDITION_SOURCE_FROZEN: &str = "SourceFrozen";

/// How far an operation has moved its data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationProgress {
    /// Bytes stored (or fetched) so far, before compression.
    pub bytes_done: i64,
    /// All the bytes to store (or fetch), before compression; an estimate until the
    /// end, never below `bytesDone`.
    pub bytes_total: i64,
}

/// Regex for a DNS-1123 subdomain (pod, node and object names).
pub const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Regex for a DNS-1123 label (names that end up in other names).
pub const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Regex for a Kubernetes UID.
pub const UID: &str = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";

/// Where a restored or migrated pod should run.
///
/// Give at most one of `nodeName` and `nodeSelector`; with neither, the operator
/// picks a ready node that passes the compatibility check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.nodeName) && has(self.nodeSelector))")
    .message("give at most one of nodeName and nodeSelector"))]
pub struct NodeTarget {
    /// The exact node to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub node_name: Option<String>,

    /// Node labels that the chosen node must carry (all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32), schema_with = "bounded_string_map")]
    pub node_selector: Option<BTreeMap<String, String>>,
}

/// A reference to a Secret in the same namespace as the referring object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalSecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
}

/// A reference to a Secret in a named namespace (used by cluster-scoped objects).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
    /// Namespace of the Secret.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub namespace: String,
}

/// Schema of a label/annotation-like map with bounded keys and values, so CEL
/// rules over it stay within the API server's cost budget.
pub fn bounded_string_map(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": 64,
        "additionalProperties": { "type": "string", "maxLength": 4096 },
    })
}

/// Schema of labels or annotations a tenant sets on a pod the operator creates: keys
/// under `cryopod.io/` are the operator's own (a restore's binding among them).
pub fn tenant_string_map(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": 64,
        "additionalProperties": { "type": "string", "maxLength": 4096 },
        "x-kubernetes-validations": [{
            "rule": "self.all(k, !k.startsWith('cryopod.io/') && !k.contains('.cryopod.io/'))",
            "message": "keys under cryopod.io/ are reserved for the operator",
        }],
    })
}

/// Whether `key` is one of the operator's own label or annotation keys.
pub fn reserved_key(key: &str) -> bool {
    key.starts_with(RESERVED_PREFIX) || key.contains(&format!(".{RESERVED_PREFIX}"))
}

/// The prefix of the operator's own keys.
pub const RESERVED_PREFIX: &str = "cryopod.io/";

/// Schema of a value that the operator stores verbatim (a sanitized Pod template).
pub fn preserve_unknown_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Schema of a standard `conditions` list, a map keyed by `type` for server-side apply.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

/// Status of a condition, as in `metav1.ConditionStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not yet known.
    Unknown,
}

impl ConditionStatus {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// Sets `type_` in `conditions` to the given state.
///
/// `lastTransitionTime` changes only when the status flips, as the API conventions ask,
/// so repeated reconciles with the same outcome do not churn the object.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) {
    let status = status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = now;
            }
            existing.status = status.to_owned();
            existing.reason = reason.to_owned();
            existing.message = message.to_owned();
            existing.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation,
            last_transition_time: now,
        }),
    }
}

/// The condition of the given type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    #[test]
    fn transition_time_changes_only_when_status_flips() {
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            CONDITION_READY,
            ConditionStatus::False,
            "Pending",
            "waiting",
            Some(1),
            at(10),
        );
        set_condition(
            &mut conds,
            CONDITION_READY,
            ConditionStatus::False,
            "CheckpointInProgress",
            "dumping",
            Some(1),
            at(20),
        );
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, at(10));
        assert_eq!(conds[0].reason, "CheckpointInProgress");
        set_condition(
            &mut conds,
            CONDITION_READY,
            ConditionStatus::True,
            "CheckpointCompleted",
            "done",
            Some(1),
            at(30),
        );
        assert_eq!(conds[0].last_transition_time, at(30));
        assert_eq!(
            find_condition(&conds, CONDITION_READY).map(|c| c.status.as_str()),
            Some("True")
        );
    }
}
