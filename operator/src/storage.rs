//! Where a checkpoint goes: the named CheckpointStorage, else the one annotated as
//! default, else the node-local directory; turned into what the agents are sent,
//! with the credentials read from their Secret.

use std::collections::BTreeMap;

use cryopod_agent_api::pb;
use cryopod_crds::v1alpha1::{
    CheckpointLocation, CheckpointLocationType, CheckpointStorage, DEFAULT_STORAGE_ANNOTATION, EMBEDDED_LOCAL_PATH,
    NodeLocalLocation, ObjectStoreLocation, StorageType,
};
use k8s_openapi::ByteString;

/// A resolved storage: what the agent is sent and what the status records.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedStorage {
    /// For the agent.
    pub storage: pb::Storage,
    /// For `status.checkpointLocation`.
    pub location: CheckpointLocation,
    /// The checkpoint's key prefix, ending in `/`.
    pub prefix: String,
}

/// Why a storage cannot be used; the message names the object and field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageProblem(pub String);

impl std::fmt::Display for StorageProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which CheckpointStorage applies: the named one, else the single default.
pub fn choose<'a>(
    named: Option<&str>,
    all: &'a [CheckpointStorage],
) -> Result<Option<&'a CheckpointStorage>, StorageProblem> {
    let name_of = |s: &CheckpointStorage| s.metadata.name.clone().unwrap_or_default();
    if let Some(name) = named {
        return all
            .iter()
            .find(|s| name_of(s) == name)
            .map(Some)
            .ok_or_else(|| StorageProblem(format!("spec.storage: CheckpointStorage {name:?} does not exist")));
    }
    let defaults: Vec<&CheckpointStorage> = all
        .iter()
        .filter(|s| {
            s.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DEFAULT_STORAGE_ANNOTATION))
                .is_some_and(|v| v == "true")
        })
        .collect();
    match defaults.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => {
            let mut names: Vec<String> = many.iter().map(|s| name_of(s)).collect();
            names.sort();
            Err(StorageProblem(format!(
                "more than one CheckpointStorage is annotated {DEFAULT_STORAGE_ANNOTATION}=true: {}; name one in spec.storage",
                names.join(", ")
            )))
        }
    }
}

/// A checkpoint's key prefix: `<storage prefix>/<namespace>/<pod>/<checkpoint uid>/`.
pub fn checkpoint_prefix(storage_prefix: Option<&str>, namespace: &str, pod: &str, uid: &str) -> String {
    let base = storage_prefix.unwrap_or("").trim_matches('/');
    if base.is_empty() {
        format!("{namespace}/{pod}/{uid}/")
    } else {
        format!("{base}/{namespace}/{pod}/{uid}/")
    }
}

fn text(data: &BTreeMap<String, ByteString>, key: &str, secret: &str) -> Result<String, StorageProblem> {
    data.get(key)
        .map(|v| String::from_utf8_lossy(&v.0).trim().to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| StorageProblem(format!("Secret {secret} has no key {key:?}")))
}

/// Builds what the agents are sent. `secret` is the credentials Secret's data, when
/// the storage names one; `node` is the source pod's node (for node-local storage).
pub fn resolve(
    storage: Option<&CheckpointStorage>,
    secret: Option<(&str, &BTreeMap<String, ByteString>)>,
    node: &str,
    checkpoint: (&str, &str, &str),
) -> Result<ResolvedStorage, StorageProblem> {
    let (namespace, pod, uid) = checkpoint;
    let Some(storage) = storage else {
        // No CheckpointStorage at all: the node's own directory.
        return Ok(ResolvedStorage {
            storage: pb::Storage {
                backend: Some(pb::storage::Backend::Local(pb::LocalStorage {
                    path: EMBEDDED_LOCAL_PATH.to_owned(),
                })),
            },
            location: CheckpointLocation {
                type_: CheckpointLocationType::NodeLocal,
                object_store: None,
                node_local: Some(NodeLocalLocation {
                    node_name: node.to_owned(),
                    path: format!("{EMBEDDED_LOCAL_PATH}/{}", checkpoint_prefix(None, namespace, pod, uid)),
                }),
            },
            prefix: checkpoint_prefix(None, namespace, pod, uid),
        });
    };
    let name = storage.metadata.name.clone().unwrap_or_default();
    let spec = &storage.spec;
    let prefix = checkpoint_prefix(spec.prefix.as_deref(), namespace, pod, uid);
    let missing = |member: &str| StorageProblem(format!("CheckpointStorage {name}: spec.{member} is missing"));
    let backend = match spec.type_ {
        StorageType::S3 => {
            let s3 = spec.s3.as_ref().ok_or_else(|| missing("s3"))?;
            let (access_key_id, secret_access_key) = match secret {
                Some((secret_name, data)) => (
                    text(data, "accessKeyId", secret_name)?,
                    text(data, "secretAccessKey", secret_name)?,
                ),
                None => (String::new(), String::new()),
            };
            pb::storage::Backend::S3(pb::S3Storage {
                endpoint: s3.endpoint.clone().unwrap_or_default(),
                bucket: s3.bucket.clone(),
                region: s3.region.clone(),
                force_path_style: s3.force_path_style,
                access_key_id,
                secret_access_key,
            })
        }
        StorageType::Gcs => {
            let gcs = spec.gcs.as_ref().ok_or_else(|| missing("gcs"))?;
            let key = match secret {
                Some((secret_name, data)) => text(data, "serviceAccountKey", secret_name)?,
                None => String::new(),
            };
            pb::storage::Backend::Gcs(pb::GcsStorage {
                bucket: gcs.bucket.clone(),
                service_account_key: key,
            })
        }
        StorageType::Azure => {
            let azure = spec.azure.as_ref().ok_or_else(|| missing("azure"))?;
            let key = match secret {
                Some((secret_name, data)) => text(data, "accessKey", secret_name)?,
                None => String::new(),
            };
            pb::storage::Backend::Azure(pb::AzureStorage {
                account: azure.account.clone(),
                container: azure.container.clone(),
                access_key: key,
                endpoint: String::new(),
            })
        }
        StorageType::Local => {
            let local = spec.local.as_ref().ok_or_else(|| missing("local"))?;
            if local.persistent_volume_claim.is_some() {
                return Err(StorageProblem(format!(
                    "CheckpointStorage {name}: spec.local.persistentVolumeClaim is not supported yet; use a node directory or S3"
                )));
            }
            let location = CheckpointLocation {
                type_: CheckpointLocationType::NodeLocal,
                object_store: None,
                node_local: Some(NodeLocalLocation {
                    node_name: node.to_owned(),
                    path: format!("{}/{prefix}", local.path.trim_end_matches('/')),
                }),
            };
            return Ok(ResolvedStorage {
                storage: pb::Storage {
                    backend: Some(pb::storage::Backend::Local(pb::LocalStorage {
                        path: local.path.clone(),
                    })),
                },
                location,
                prefix,
            });
        }
    };
    Ok(ResolvedStorage {
        storage: pb::Storage { backend: Some(backend) },
        location: CheckpointLocation {
            type_: CheckpointLocationType::ObjectStore,
            object_store: Some(ObjectStoreLocation {
                storage: name,
                prefix: prefix.clone(),
            }),
            node_local: None,
        },
        prefix,
    })
}

/// The Secret a storage's credentials are in, if any.
pub fn credentials_secret(storage: &CheckpointStorage) -> Option<(String, String)> {
    let spec = &storage.spec;
    let reference = match spec.type_ {
        StorageType::S3 => spec.s3.as_ref().and_then(|s| s.credentials_secret_ref.as_ref()),
        StorageType::Gcs => spec.gcs.as_ref().and_then(|s| s.credentials_secret_ref.as_ref()),
        StorageType::Azure => spec.azure.as_ref().and_then(|s| s.credentials_secret_ref.as_ref()),
        StorageType::Local => None,
    }?;
    Some((reference.namespace.clone(), reference.name.clone()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    fn storage(name: &str, default: bool, spec: serde_json::Value) -> CheckpointStorage {
        let mut annotations = serde_json::json!({});
        if default {
            annotations[DEFAULT_STORAGE_ANNOTATION] = serde_json::json!("true");
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "CheckpointStorage",
            "metadata": {"name": name, "annotations": annotations},
            "spec": spec
        }))
        .unwrap()
    }

    fn s3(name: &str, default: bool) -> CheckpointStorage {
        storage(
            name,
            default,
            serde_json::json!({"type": "S3", "prefix": "/cp/", "s3": {"bucket": "ckpts", "endpoint": "http://s3:7070",
                "forcePathStyle": true, "credentialsSecretRef": {"name": "s3-creds", "namespace": "cryopod-system"}}}),
        )
    }

    #[test]
    fn the_named_storage_else_the_single_default_else_none() {
        let all = [s3("a", false), s3("b", true)];
        assert_eq!(
            choose(Some("a"), &all).unwrap().unwrap().metadata.name.as_deref(),
            Some("a")
        );
        assert_eq!(choose(None, &all).unwrap().unwrap().metadata.name.as_deref(), Some("b"));
        assert_eq!(
            choose(Some("c"), &all).unwrap_err().0,
            r#"spec.storage: CheckpointStorage "c" does not exist"#
        );
        assert!(choose(None, &[s3("a", false)]).unwrap().is_none());
        let err = choose(None, &[s3("x", true), s3("y", true)]).unwrap_err();
        assert!(err.0.contains("more than one") && err.0.contains("x, y"), "{err}");
    }

    #[test]
    fn s3_storage_carries_its_credentials_and_prefix() {
        let data: BTreeMap<String, ByteString> = [
            ("accessKeyId".to_owned(), ByteString(b"AK".to_vec())),
            ("secretAccessKey".to_owned(), ByteString(b"SK\n".to_vec())),
        ]
        .into();
        let storage = s3("a", false);
        assert_eq!(
            credentials_secret(&storage),
            Some(("cryopod-system".into(), "s3-creds".into()))
        );
        let resolved = resolve(
            Some(&storage),
            Some(("s3-creds", &data)),
            "node-1",
            ("ns", "db-0", "u1"),
        )
        .unwrap();
        assert_eq!(resolved.prefix, "cp/ns/db-0/u1/");
        let Some(pb::storage::Backend::S3(s3)) = resolved.storage.backend else {
            panic!("S3 expected")
        };
        assert_eq!((s3.access_key_id.as_str(), s3.secret_access_key.as_str()), ("AK", "SK"));
        assert_eq!(
            resolved.location.object_store.unwrap(),
            ObjectStoreLocation {
                storage: "a".into(),
                prefix: "cp/ns/db-0/u1/".into()
            }
        );
        let err = resolve(
            Some(&storage),
            Some(("s3-creds", &BTreeMap::new())),
            "node-1",
            ("ns", "p", "u"),
        )
        .unwrap_err();
        assert_eq!(err.0, r#"Secret s3-creds has no key "accessKeyId""#);
    }

    #[test]
    fn without_any_storage_checkpoints_stay_on_the_node() {
        let resolved = resolve(None, None, "node-2", ("ns", "p", "u")).unwrap();
        assert_eq!(resolved.location.type_, CheckpointLocationType::NodeLocal);
        assert_eq!(
            resolved.location.node_local.unwrap(),
            NodeLocalLocation {
                node_name: "node-2".into(),
                path: "/var/lib/cryopod/checkpoints/ns/p/u/".into()
            }
        );
    }
}
