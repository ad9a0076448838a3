//! age key pairs the operator makes for what it seals on its own accord: every
//! checkpoint when encryption is the default, and a migration's checkpoint always.
//! Each lives in the operator's own namespace, as Secret `cryopod-key-<checkpoint
//! uid>` (`recipients`, `identity`): no tenant can create a Secret there, so none
//! can plant a key of their own for someone else's checkpoint to be sealed to. The
//! checkpoint's finalizer deletes it.

use std::collections::BTreeMap;

use cryopod_crds::v1alpha1::PodCheckpoint;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};

use crate::context::{Context, Error, kube_err};

/// The checkpoint a sealing key belongs to, as labels (for `kubectl get`).
const CHECKPOINT_NAMESPACE_LABEL: &str = "cryopod.io/checkpoint-namespace";
const CHECKPOINT_NAME_LABEL: &str = "cryopod.io/checkpoint-name";

/// The name of the sealing key of the checkpoint with `uid`.
pub fn sealing_key_name(uid: &str) -> String {
    format!("cryopod-key-{uid}")
}

/// The sealing key of `cp`, made once; its name.
pub async fn ensure_sealing_key(ctx: &Context, cp: &PodCheckpoint) -> Result<String, Error> {
    use age::secrecy::ExposeSecret;
    let uid = cp.uid().unwrap_or_default();
    let name = sealing_key_name(&uid);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    if secrets
        .get_opt(&name)
        .await
        .map_err(kube_err("read a sealing key"))?
        .is_some()
    {
        return Ok(name);
    }
    let identity = age::x25519::Identity::generate();
    let labels = [
        (
            CHECKPOINT_NAMESPACE_LABEL.to_owned(),
            cp.namespace().unwrap_or_default(),
        ),
        (CHECKPOINT_NAME_LABEL.to_owned(), cp.name_any()),
    ];
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels.into()),
            ..ObjectMeta::default()
        },
        string_data: Some(
            [
                ("recipients".to_owned(), identity.to_public().to_string()),
                ("identity".to_owned(), identity.to_string().expose_secret().to_owned()),
            ]
            .into(),
        ),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        // Made meanwhile, by this operator: its namespace is its own.
        Ok(_) => Ok(name),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(name),
        Err(source) => Err(Error::Kube {
            action: "create a sealing key",
            source,
        }),
    }
}

/// The sealing key of the checkpoint with `uid`, if it has one.
pub async fn sealing_key(ctx: &Context, uid: &str) -> Result<Option<BTreeMap<String, ByteString>>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    Ok(secrets
        .get_opt(&sealing_key_name(uid))
        .await
        .map_err(kube_err("read a sealing key"))?
        .and_then(|s| s.data))
}

/// Deletes the sealing key of `cp`, if any: what it sealed can no longer be opened.
pub async fn delete_sealing_key(ctx: &Context, cp: &PodCheckpoint) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    match secrets
        .delete(
            &sealing_key_name(&cp.uid().unwrap_or_default()),
            &DeleteParams::default(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            action: "delete a sealing key",
            source,
        }),
    }
}

/// Whether the operator seals `cp` with a key of its own: it names no key, and
/// encryption is the default or a migration made it.
pub fn sealed_by_operator(cp: &PodCheckpoint, encrypt_by_default: bool) -> bool {
    // A migration's checkpoint crosses a shared bucket, unless it is staged on its
    // node for a Direct transfer: it then stays in the agent's root-only directory
    // and travels over TLS, and sealing it would only lengthen the freeze.
    let migration_via_store = crate::checkpoint::held_for_migration(cp) && !crate::checkpoint::staged_on_node(cp);
    cp.spec.encryption.is_none() && (encrypt_by_default || migration_via_store)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_operator_seals_what_names_no_key_when_asked_to_or_for_a_migration() {
        let cp = |v: serde_json::Value| -> PodCheckpoint { serde_json::from_value(v).unwrap() };
        let plain = cp(
            serde_json::json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "c"}, "spec": {"sourcePodName": "p"}}),
        );
        assert!(!sealed_by_operator(&plain, false));
        assert!(sealed_by_operator(&plain, true));
        let own_key = cp(
            serde_json::json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "c"}, "spec": {"sourcePodName": "p", "encryption": {"secretRef": {"name": "k"}}}}),
        );
        assert!(!sealed_by_operator(&own_key, true));
        let migrating = cp(
            serde_json::json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "c", "annotations": {"cryopod.io/hold-for-migration": "m"},
                         "ownerReferences": [{"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration",
                                              "name": "m", "uid": "u", "controller": true}]},
            "spec": {"sourcePodName": "p"}}),
        );
        assert!(sealed_by_operator(&migrating, false));
        // Staged on its node for a Direct transfer: sealed only when everything is.
        let mut direct = migrating.clone();
        direct
            .metadata
            .annotations
            .get_or_insert_default()
            .insert("cryopod.io/transfer".into(), "Direct".into());
        assert!(!sealed_by_operator(&direct, false));
        assert!(sealed_by_operator(&direct, true));
        assert_eq!(sealing_key_name("0b6f"), "cryopod-key-0b6f");
    }
}
