//! Agent to agent: a checkpoint in one node's local storage read by the agent of
//! another node, with no object store between them (a `Direct` migration).
//!
//! The reading agent has no client certificate the source would accept for its
//! operator API (an agent's own certificate is a server's), so the source serves
//! reads on a second service, `PeerTransfer`, and authorises each by a token its
//! operator asked for with `GrantRead`. A token reads one checkpoint's keys under one
//! local root, until it expires or the agent restarts. The reader checks the source's
//! certificate names the source node, and verifies every object's size and digest
//! against the signed manifest as it would from an object store: the peer is a
//! transport, never trusted for content.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cryopod_agent_api::pb;
use cryopod_agent_api::pb::peer_transfer_client::PeerTransferClient;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

/// The longest a grant may last.
pub const MAX_GRANT: Duration = Duration::from_secs(3600);
/// Bytes per chunk on the wire: well under gRPC's 4 MiB message limit.
const CHUNK: usize = 1 << 20;
/// Grants kept at once; more is a caller gone wrong, not a migration.
const MAX_GRANTS: usize = 1024;

#[derive(Clone, Debug)]
struct Grant {
    root: PathBuf,
    prefix: String,
    expires: Instant,
}

/// The object a checkpoint has once it is whole: a grant needs it.
const MANIFEST: &str = "manifest.json";

/// The read grants this agent gave, by the sha256 of their token (the token itself is
/// never kept, so a lookup leaks nothing of it through timing).
#[derive(Clone, Debug, Default)]
pub struct Grants(Arc<Mutex<HashMap<String, Grant>>>);

fn token_key(token: &str) -> String {
    crate::package::hex(Sha256::digest(token.as_bytes()))
}

impl Grants {
    /// A token that reads keys starting with `prefix` under `root` for `ttl`. One
    /// grant per checkpoint: a new one replaces the last (a caller that asks again
    /// has lost it), so asking often fills nothing. When the table is full, the grant
    /// closest to its end makes room.
    pub fn grant(&self, root: PathBuf, prefix: String, ttl: Duration) -> Result<String, Status> {
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret).map_err(|_| Status::internal("no randomness for a token"))?;
        let token = crate::package::hex(secret);
        let now = Instant::now();
        let mut grants = self.0.lock().map_err(|_| Status::internal("grant table poisoned"))?;
        grants.retain(|_, g| g.expires > now && !(g.root == root && g.prefix == prefix));
        if grants.len() >= MAX_GRANTS
            && let Some(oldest) = grants.iter().min_by_key(|(_, g)| g.expires).map(|(k, _)| k.clone())
        {
            grants.remove(&oldest);
        }
        grants.insert(
            token_key(&token),
            Grant {
                root,
                prefix,
                expires: now + ttl.min(MAX_GRANT),
            },
        );
        Ok(token)
    }

    /// The root and the path below it that `key` stands for, if `token` grants it.
    pub fn resolve(&self, token: &str, key: &str) -> Result<(PathBuf, PathBuf), Status> {
        let grant = self
            .0
            .lock()
            .map_err(|_| Status::internal("grant table poisoned"))?
            .get(&token_key(token))
            .filter(|g| g.expires > Instant::now())
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the read token is unknown or expired"))?;
        ObjectPath::parse(key).map_err(|e| Status::invalid_argument(format!("key {key:?}: {e}")))?;
        if !key.starts_with(&grant.prefix) || !plain_key(key) {
            return Err(Status::permission_denied(format!(
                "key {key:?} is not under the granted checkpoint"
            )));
        }
        Ok((grant.root, PathBuf::from(key)))
    }
}

/// Whether `key` is a plain relative object key: `ObjectPath::parse` takes it as it is
/// (no empty, `.` or `..` segment, no leading or trailing `/`), so joined to a root it
/// stays below it.
pub fn plain_key(key: &str) -> bool {
    !key.is_empty() && ObjectPath::parse(key).is_ok_and(|p| p.as_ref() == key)
}

/// Whether `root` holds a whole checkpoint at `prefix` (its manifest, a plain file
/// reached through no link): a grant is given for nothing else.
pub fn holds_checkpoint(root: &std::path::Path, prefix: &str) -> bool {
    crate::safe_fs::open_file_in(root, std::path::Path::new(&format!("{prefix}{MANIFEST}"))).is_ok()
}

/// Serves granted reads to other agents.
#[derive(Clone, Debug)]
pub struct PeerService {
    /// Shared with the operator API, which adds to it.
    pub grants: Grants,
}

type ChunkStream = Pin<Box<dyn futures::Stream<Item = Result<pb::ObjectChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::peer_transfer_server::PeerTransfer for PeerService {
    type ReadObjectStream = ChunkStream;

    async fn read_object(
        &self,
        request: Request<pb::ReadObjectRequest>,
    ) -> Result<Response<Self::ReadObjectStream>, Status> {
        let req = request.into_inner();
        let (root, rel) = self.grants.resolve(&req.token, &req.key)?;
        // Opened beneath the root through no link at all, as a plain file.
        let key = req.key.clone();
        let file = tokio::task::spawn_blocking(move || crate::safe_fs::open_file_in(&root, &rel))
            .await
            .map_err(|_| Status::internal("the open task died"))?
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Status::not_found(format!("{key}: no such object")),
                _ => Status::not_found(format!("{key}: not a stored object ({e})")),
            })?;
        let file = tokio::fs::File::from_std(std::fs::File::from(file));
        let size = file
            .metadata()
            .await
            .map_err(|e| Status::internal(format!("{}: {e}", req.key)))?
            .len();
        tracing::debug!(key = %req.key, size, "serving an object to a peer");
        let stream = futures::stream::try_unfold((file, true), move |(mut file, first)| async move {
            let mut buf = vec![0u8; CHUNK];
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| Status::internal(format!("reading the object: {e}")))?;
            if n == 0 && !first {
                return Ok(None);
            }
            buf.truncate(n);
            let chunk = pb::ObjectChunk {
                data: buf,
                size: if first { size } else { 0 },
            };
            Ok(Some((chunk, (file, false))))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Another node's local storage, read through its agent: only `get` is served.
#[derive(Clone)]
pub struct PeerStore {
    client: PeerTransferClient<Channel>,
    token: String,
    endpoint: String,
}

impl std::fmt::Debug for PeerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStore").field("endpoint", &self.endpoint).finish()
    }
}

impl std::fmt::Display for PeerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerStore({})", self.endpoint)
    }
}

/// The store `peer` names, over TLS verified against `ca_pem` for its server name.
pub fn peer_store(peer: &pb::PeerStorage, ca_pem: &[u8]) -> Result<PeerStore, Status> {
    if !peer.endpoint.starts_with("https://") {
        return Err(Status::invalid_argument(format!(
            "storage.peer.endpoint {:?}: an https:// URL is required",
            peer.endpoint
        )));
    }
    if peer.server_name.is_empty() || peer.token.is_empty() {
        return Err(Status::invalid_argument(
            "storage.peer: server_name and token are required",
        ));
    }
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(peer.server_name.clone());
    let channel = Endpoint::from_shared(peer.endpoint.clone())
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| Status::invalid_argument(format!("storage.peer.endpoint: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        // A source that dies mid-transfer ends the read, not the restore's deadline.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .connect_lazy();
    Ok(PeerStore {
        client: PeerTransferClient::new(channel).max_decoding_message_size(2 * CHUNK),
        token: peer.token.clone(),
        endpoint: peer.endpoint.clone(),
    })
}

fn store_error(path: &ObjectPath, status: Status) -> object_store::Error {
    match status.code() {
        tonic::Code::NotFound => object_store::Error::NotFound {
            path: path.to_string(),
            source: Box::new(status),
        },
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => object_store::Error::PermissionDenied {
            path: path.to_string(),
            source: Box::new(status),
        },
        _ => object_store::Error::Generic {
            store: "PeerStore",
            source: Box::new(status),
        },
    }
}

fn read_only(operation: &str) -> object_store::Error {
    object_store::Error::NotImplemented {
        operation: operation.to_owned(),
        implementer: "PeerStore (read only)".to_owned(),
    }
}

#[tonic::async_trait]
impl ObjectStore for PeerStore {
    async fn put_opts(&self, _: &ObjectPath, _: PutPayload, _: PutOptions) -> object_store::Result<PutResult> {
        Err(read_only("put"))
    }

    async fn put_multipart_opts(
        &self,
        _: &ObjectPath,
        _: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(read_only("put_multipart"))
    }

    async fn get_opts(&self, location: &ObjectPath, options: GetOptions) -> object_store::Result<GetResult> {
        if options.range.is_some() || options.head {
            return Err(read_only("a ranged or head get"));
        }
        let mut client = self.client.clone();
        let mut stream = client
            .read_object(pb::ReadObjectRequest {
                token: self.token.clone(),
                key: location.to_string(),
            })
            .await
            .map_err(|s| store_error(location, s))?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(|s| store_error(location, s))?
            .ok_or_else(|| store_error(location, Status::data_loss("the peer sent nothing")))?;
        let size = first.size;
        let path = location.clone();
        let rest = futures::stream::unfold(stream, |mut stream| async move {
            match stream.message().await {
                Ok(Some(chunk)) => Some((Ok(Bytes::from(chunk.data)), stream)),
                Ok(None) => None,
                Err(status) => Some((Err(status), stream)),
            }
        })
        .map(move |r| r.map_err(|s| store_error(&path, s)));
        let body = futures::stream::once(async move { Ok(Bytes::from(first.data)) })
            .chain(rest)
            .boxed();
        Ok(GetResult {
            payload: GetResultPayload::Stream(body),
            meta: ObjectMeta {
                location: location.clone(),
                last_modified: Default::default(),
                size,
                e_tag: None,
                version: None,
            },
            range: 0..size,
            attributes: Default::default(),
            extensions: Default::default(),
        })
    }

    fn delete_stream(
        &self,
        _: BoxStream<'static, object_store::Result<ObjectPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
        futures::stream::once(async { Err(read_only("delete")) }).boxed()
    }

    fn list(&self, _: Option<&ObjectPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        futures::stream::once(async { Err(read_only("list")) }).boxed()
    }

    async fn list_with_delimiter(&self, _: Option<&ObjectPath>) -> object_store::Result<ListResult> {
        Err(read_only("list"))
    }

    async fn copy_opts(&self, _: &ObjectPath, _: &ObjectPath, _: CopyOptions) -> object_store::Result<()> {
        Err(read_only("copy"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn security_a_token_reads_its_own_checkpoint_and_nothing_else() {
        let grants = Grants::default();
        let root = PathBuf::from("/var/lib/cryopod/checkpoints");
        let token = grants
            .grant(root.clone(), "ns/p/u1/".into(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            grants.resolve(&token, "ns/p/u1/manifest.json").unwrap(),
            (root.clone(), PathBuf::from("ns/p/u1/manifest.json"))
        );
        for key in [
            "ns/p/u2/manifest.json",
            "ns/p/u1/../u2/manifest.json",
            "ns/p/u1//x",
            "ns/p/u1/./x",
            "/etc/shadow",
            "ns/p/u1",
        ] {
            assert!(grants.resolve(&token, key).is_err(), "{key} was let through");
        }
        let other = "0".repeat(64);
        assert_eq!(
            grants.resolve(&other, "ns/p/u1/manifest.json").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn asking_again_replaces_the_grant_and_a_full_table_makes_room() {
        let grants = Grants::default();
        let first = grants.grant("/r".into(), "a/".into(), MAX_GRANT).unwrap();
        let second = grants.grant("/r".into(), "a/".into(), MAX_GRANT).unwrap();
        assert!(grants.resolve(&first, "a/b").is_err(), "replaced");
        assert!(grants.resolve(&second, "a/b").is_ok());
        let soonest = grants.grant("/r".into(), "z/".into(), Duration::from_secs(1)).unwrap();
        for n in 0..MAX_GRANTS {
            grants
                .grant("/r".into(), format!("p{n}/"), Duration::from_secs(600))
                .unwrap();
        }
        assert!(grants.resolve(&soonest, "z/b").is_err(), "the soonest to end made room");
        assert!(grants.resolve(&second, "a/b").is_ok());
    }

    #[test]
    fn an_expired_grant_reads_nothing() {
        let grants = Grants::default();
        let token = grants.grant("/r".into(), "a/".into(), Duration::ZERO).unwrap();
        assert_eq!(
            grants.resolve(&token, "a/b").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
