//! Manifests signed with a key only the agents hold. The manifest digest in a
//! PodCheckpoint's status is an anchor anyone with `podcheckpoints/status` (or
//! write access to the bucket) can move together with the manifest; a signature
//! over the manifest and its own key prefix cannot be made without the key, nor
//! moved to another checkpoint's prefix. Restores verify it before anything else
//! of the manifest is trusted.

use std::path::Path;

use aws_lc_rs::hmac;
use sha2::{Digest, Sha256};

/// The object beside `manifest.json` that holds its signature.
pub const SIGNATURE_OBJECT: &str = "manifest.sig";
/// The signature scheme, first word of a signature.
const SCHEME: &str = "hmac-sha256";
/// Shorter keys are refused: the chart makes 64 random characters.
const MIN_KEY_BYTES: usize = 32;

/// The shared signing key of the agents; its bytes are never printed.
#[derive(Clone)]
pub struct ManifestKey {
    key: hmac::Key,
    id: String,
}

impl std::fmt::Debug for ManifestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManifestKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A signature is missing, malformed, from another key, or does not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    /// Not `hmac-sha256:<key id>:<hex>`.
    Malformed,
    /// Signed with a key other than this node's (rotated, or another cluster's).
    OtherKey { signed_with: String, ours: String },
    /// The right key, but the manifest or its prefix changed since it was signed.
    Mismatch,
}

impl std::fmt::Display for SignatureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed => write!(f, "the manifest signature is malformed"),
            Self::OtherKey { signed_with, ours } => write!(
                f,
                "the manifest was signed with key {signed_with}, not this node's key {ours}"
            ),
            Self::Mismatch => write!(
                f,
                "the manifest signature does not match: the manifest was changed or moved from another checkpoint"
            ),
        }
    }
}

impl std::error::Error for SignatureError {}

impl ManifestKey {
    /// A key from its bytes; `None` when it is too short to be a secret.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        (bytes.len() >= MIN_KEY_BYTES).then(|| {
            let digest = Sha256::digest(bytes);
            let id = crate::package::hex(&digest[..4]);
            Self {
                key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
                id,
            }
        })
    }

    /// Reads the key from a file (surrounding whitespace is not part of it).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::new(bytes.trim_ascii()).ok_or_else(|| {
            format!(
                "{} holds fewer than {MIN_KEY_BYTES} bytes: not a signing key",
                path.display()
            )
        })
    }

    /// A short public name of the key (part of its sha256), to tell keys apart.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn message(prefix: &str, manifest: &[u8]) -> Vec<u8> {
        let mut message = Vec::with_capacity(prefix.len() + manifest.len() + 32);
        message.extend_from_slice(b"cryopod manifest v1\0");
        message.extend_from_slice(prefix.as_bytes());
        message.push(0);
        message.extend_from_slice(manifest);
        message
    }

    /// The signature of `manifest` stored under `prefix`.
    pub fn sign(&self, prefix: &str, manifest: &[u8]) -> String {
        let tag = hmac::sign(&self.key, &Self::message(prefix, manifest));
        format!("{SCHEME}:{}:{}", self.id, crate::package::hex(tag))
    }

    /// Checks `signature` (the stored object's bytes) for `manifest` under `prefix`.
    pub fn verify(&self, prefix: &str, manifest: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        let text = std::str::from_utf8(signature)
            .map_err(|_| SignatureError::Malformed)?
            .trim();
        let mut parts = text.split(':');
        let (Some(SCHEME), Some(id), Some(hex), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(SignatureError::Malformed);
        };
        let tag = decode_hex(hex).ok_or(SignatureError::Malformed)?;
        if id != self.id {
            return Err(SignatureError::OtherKey {
                signed_with: id.chars().take(16).collect(),
                ours: self.id.clone(),
            });
        }
        hmac::verify(&self.key, &Self::message(prefix, manifest), &tag).map_err(|_| SignatureError::Mismatch)
    }
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn key(fill: u8) -> ManifestKey {
        ManifestKey::new(&[fill; 40]).expect("long enough")
    }

    #[test]
    fn a_signature_verifies_only_its_manifest_under_its_prefix() {
        let k = key(1);
        let sig = k.sign("ns/p/u1/", b"{\"a\":1}");
        assert_eq!(k.verify("ns/p/u1/", b"{\"a\":1}", sig.as_bytes()), Ok(()));
        assert_eq!(
            k.verify("ns/p/u1/", b"{\"a\":2}", sig.as_bytes()),
            Err(SignatureError::Mismatch)
        );
        // A genuine manifest copied under another checkpoint's prefix.
        assert_eq!(
            k.verify("victim/db/u2/", b"{\"a\":1}", sig.as_bytes()),
            Err(SignatureError::Mismatch)
        );
        // The prefix and manifest cannot trade bytes across the separator.
        let shifted = k.sign("ns/p/u1", b"/{\"a\":1}");
        assert_ne!(shifted, sig);
    }

    #[test]
    fn another_key_is_named_and_refused() {
        let sig = key(1).sign("p/", b"m");
        let err = key(2).verify("p/", b"m", sig.as_bytes()).unwrap_err();
        assert!(matches!(err, SignatureError::OtherKey { .. }), "{err:?}");
    }

    #[test]
    fn malformed_signatures_and_short_keys_are_refused() {
        let k = key(1);
        for bad in [
            &b""[..],
            b"hmac-sha256",
            b"sha1:x:00",
            b"hmac-sha256:abcd:zz",
            b"\xff\xfe",
            b"hmac-sha256:a:b:c",
        ] {
            assert_eq!(k.verify("p/", b"m", bad), Err(SignatureError::Malformed), "{bad:?}");
        }
        assert!(ManifestKey::new(&[0; 31]).is_none());
        assert!(!format!("{k:?}").contains("1, 1"));
    }
}
