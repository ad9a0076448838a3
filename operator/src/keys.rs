//! age key pairs the operator makes for what it seals on its own accord: a
//! migration's checkpoint, and every checkpoint when encryption is the default. Each
//! lives in a Secret owned by the resource it seals (`recipients`, `identity`), so it
//! goes with it, and one not owned by that resource is never used.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::PostParams;

use crate::context::{Context, Error, kube_err};

/// The key Secret's name for the resource `name`.
pub fn key_name(name: &str) -> String {
    format!("{name}-key")
}

fn owned_by(secret: &Secret, uid: &str) -> bool {
    secret.metadata.owner_references.iter().flatten().any(|o| o.uid == uid)
}

/// The Secret `name` in `ns` holding a fresh age key pair owned by `owner`, created
/// once. Err (inner): a Secret of that name exists and `owner` does not own it.
pub async fn ensure_owned_key(
    ctx: &Context,
    ns: &str,
    name: &str,
    owner: OwnerReference,
) -> Result<Result<String, String>, Error> {
    use age::secrecy::ExposeSecret;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let not_ours = || {
        format!(
            "Secret {name} exists and is not the key of {} {}: delete or rename it",
            owner.kind, owner.name
        )
    };
    let uid = owner.uid.clone();
    if let Some(existing) = secrets.get_opt(name).await.map_err(kube_err("read a key Secret"))? {
        return Ok(if owned_by(&existing, &uid) {
            Ok(name.to_owned())
        } else {
            Err(not_ours())
        });
    }
    let identity = age::x25519::Identity::generate();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            owner_references: Some(vec![owner.clone()]),
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
        Ok(_) => Ok(Ok(name.to_owned())),
        // Made meanwhile: ours only if this owner made it.
        Err(kube::Error::Api(e)) if e.code == 409 => match secrets.get_opt(name).await {
            Ok(Some(existing)) if owned_by(&existing, &uid) => Ok(Ok(name.to_owned())),
            _ => Ok(Err(not_ours())),
        },
        Err(source) => Err(Error::Kube {
            action: "create a key Secret",
            source,
        }),
    }
}

/// The data of Secret `name` in `ns` if `uid` owns it; `None` when it is missing or
/// someone else's (a tenant cannot plant a key that a restore would use).
pub async fn owned_key(
    ctx: &Context,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<Option<std::collections::BTreeMap<String, k8s_openapi::ByteString>>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    Ok(secrets
        .get_opt(name)
        .await
        .map_err(kube_err("read a key Secret"))?
        .filter(|s| owned_by(s, uid))
        .and_then(|s| s.data))
}
