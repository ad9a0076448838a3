//! The contract between the operator and the node agents: the gRPC API of
//! `proto/cryopod/agent.proto` (messages, client and server), and the Debug of the
//! messages that carry secrets. The operator depends on this crate alone to talk to
//! an agent; the agent implements the server.

pub mod compat;

/// Generated messages, client and server of `cryopod.agent.v1alpha1`.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("cryopod.agent.v1alpha1");
}

/// Debug of the messages that carry credentials, keys or a pod's spec (build.rs
/// leaves their derived Debug out): what identifies a request shows, secrets do not.
mod redacted {
    use std::fmt::{Debug, Formatter, Result};

    use crate::pb;

    const HIDDEN: &str = "<redacted>";

    impl Debug for pb::S3Storage {
        fn fmt(&self, f: &mut Formatter<'_>) -> Result {
            f.debug_struct("S3Storage")
                .field("endpoint", &self.endpoint)
                .field("bucket", &self.bucket)
                .field("region", &self.region)
                .field("force_path_style", &self.force_path_style)
                .field("access_key_id", &HIDDEN)
                .field("secret_access_key", &HIDDEN)
                .finish()
        }
    }

    impl Debug for pb::GcsStorage {
        fn fmt(&self, f: &mut Formatter<'_>) -> Result {
            f.debug_struct("GcsStorage")
                .field("bucket", &self.bucket)
                .field("service_account_key", &HIDDEN)
                .finish()
        }
    }

    impl Debug for pb::AzureStorage {
        fn fmt(&self, f: &mut Formatter<'_>) -> Result {
            f.debug_struct("AzureStorage")
                .field("account", &self.account)
                .field("container", &self.container)
                .field("endpoint", &self.endpoint)
                .field("access_key", &HIDDEN)
                .finish()
        }
    }

    impl Debug for pb::PeerStorage {
        fn fmt(&self, f: &mut Formatter<'_>) -> Result {
            f.debug_struct("PeerStorage")
                .field("endpoint", &self.endpoint)
                .field("server_name", &self.server_name)
                .field("token", &HIDDEN)
                .finish()
        }
    }

    impl Debug for pb::GrantReadResponse {
        fn fmt(&self, f: &mut Formatter<'_>) -> Result {
            f.debug_struct("GrantReadResponse").field("token", &HIDDEN).finish()
        }
    }

    impl Debug for pb::ReadObjectRequest {
        fn fmt(&self, f: &mut Formatter<'_>) -> Result {
            f.debug_struct("ReadObjectRequest")
                .field("token", &HIDDEN)
                .field("key", &self.key)
                .finish()
        }
    }

    impl Debug for pb::CheckpointRequest {
        fn fmt(&self, f: &mut Formatter<'_>) -> Result {
            f.debug_struct("CheckpointRequest")
                .field("operation_id", &self.operation_id)
                .field("pod", &self.pod)
                .field("storage", &self.storage)
                .field("prefix", &self.prefix)
                .field("max_freeze_seconds", &self.max_freeze_seconds)
                .field("post_checkpoint_state", &self.post_checkpoint_state)
                .field("hooks", &self.hooks.len())
                .field("age_recipients", &self.age_recipients.len())
                .field("pod_template_json", &self.pod_template_json.len())
                .finish_non_exhaustive()
        }
    }

    impl Debug for pb::PrepareRestoreRequest {
        fn fmt(&self, f: &mut Formatter<'_>) -> Result {
            f.debug_struct("PrepareRestoreRequest")
                .field("operation_id", &self.operation_id)
                .field("storage", &self.storage)
                .field("prefix", &self.prefix)
                .field("manifest_digest", &self.manifest_digest)
                .field("age_identities", &self.age_identities.len())
                .field("restored_pod", &self.restored_pod)
                .finish()
        }
    }

    impl Debug for pb::RestoreResult {
        fn fmt(&self, f: &mut Formatter<'_>) -> Result {
            f.debug_struct("RestoreResult")
                .field("directory", &self.directory)
                .field("fetched_bytes", &self.fetched_bytes)
                .field("fetch_millis", &self.fetch_millis)
                .field("unpack_millis", &self.unpack_millis)
                .field("containers", &self.containers)
                .field("pod_template_json", &self.pod_template_json.len())
                .finish()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn credentials_never_show_in_debug() {
            let storage = pb::Storage {
                backend: Some(pb::storage::Backend::S3(pb::S3Storage {
                    access_key_id: "AKIDSECRET".into(),
                    secret_access_key: "verysecret".into(),
                    ..Default::default()
                })),
            };
            let restore = pb::PrepareRestoreRequest {
                storage: Some(storage.clone()),
                age_identities: vec!["AGE-SECRET-KEY-1XYZ".into()],
                ..Default::default()
            };
            let checkpoint = pb::CheckpointRequest {
                storage: Some(storage),
                pod_template_json: br#"{"env":"PASSWORD=hunter2"}"#.to_vec(),
                ..Default::default()
            };
            let gcs = pb::GcsStorage {
                service_account_key: "{private_key}".into(),
                ..Default::default()
            };
            let azure = pb::AzureStorage {
                access_key: "azkey".into(),
                ..Default::default()
            };
            let result = pb::Operation {
                restore: Some(pb::RestoreResult {
                    pod_template_json: r#"{"env":"TOKEN=tok3n"}"#.into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let printed = format!("{restore:?} {checkpoint:?} {gcs:?} {azure:?} {result:?}");
            for secret in [
                "AKIDSECRET",
                "verysecret",
                "AGE-SECRET",
                "hunter2",
                "private_key",
                "azkey",
                "tok3n",
            ] {
                assert!(!printed.contains(secret), "{secret} in {printed}");
            }
        }
    }
}
