//! The validity of the certificate a binary presents, as two gauges, so that an alert
//! can fire before it expires and once it is past the point where it should have been
//! renewed (the agents renew at two thirds of it).

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// When a certificate starts and stops being valid, in seconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Its notBefore.
    pub not_before: i64,
    /// Its notAfter.
    pub not_after: i64,
}

/// The validity of the first certificate of a PEM chain (the leaf, as TLS presents it).
pub fn validity(pem: &[u8]) -> Result<Validity, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("not PEM: {e}"))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&block.contents).map_err(|e| format!("not a certificate: {e}"))?;
    Ok(Validity {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Registers `certificate_not_before_timestamp_seconds` and
/// `certificate_expiry_timestamp_seconds` (under the registry's prefix) for the
/// certificate in `pem`. Nothing is registered when it cannot be read: a zero would
/// read as a certificate that expired in 1970.
pub fn register(registry: &mut Registry, pem: &[u8]) -> Result<Validity, String> {
    let validity = validity(pem)?;
    let (not_before, expiry) = (Gauge::<i64>::default(), Gauge::<i64>::default());
    not_before.set(validity.not_before);
    expiry.set(validity.not_after);
    registry.register(
        "certificate_not_before_timestamp_seconds",
        "When the certificate this process presents became valid (notBefore)",
        not_before,
    );
    registry.register(
        "certificate_expiry_timestamp_seconds",
        "When the certificate this process presents expires (notAfter)",
        expiry,
    );
    Ok(validity)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A self-signed certificate valid from 2025-01-01T00:00:00Z to 2026-01-01T00:00:00Z,
    /// followed by another, as in a chain.
    const PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBFTCBvAIBATAKBggqhkjOPQQDAjAXMRUwEwYDVQQDDAxjcnlvcG9kLXRlc3Qw
HhcNMjUwMTAxMDAwMDAwWhcNMjYwMTAxMDAwMDAwWjAXMRUwEwYDVQQDDAxjcnlv
cG9kLXRlc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASYr1vt0ubEwWBD1d77
T0C9ZZFQTPjtgu3ZeZt+mXCaYIGaV06qfuDZCcie/RncxQzdnxdwcHTAMLGXjFuf
dVvyMAoGCCqGSM49BAMCA0gAMEUCIQDlAaE8POU+FKbLorLQ+cmZYqGMOu02vchs
cD5NyIQ6dAIgc6LW8zL/RkOqr+GkC5N+GS50aHbnPqRhEsAm5AggDuc=
-----END CERTIFICATE-----
-----BEGIN CERTIFICATE-----
MIIBFTCBvAIBATAKBggqhkjOPQQDAjAXMRUwEwYDVQQDDAxjcnlvcG9kLXRlc3Qw
-----END CERTIFICATE-----
";

    fn encoded(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn the_leaf_validity_is_exported_in_seconds() {
        let mut registry = Registry::with_prefix("cryopod_test");
        let validity = register(&mut registry, PEM.as_bytes()).unwrap();
        assert_eq!(
            validity,
            Validity {
                not_before: 1_735_689_600,
                not_after: 1_767_225_600
            }
        );
        let text = encoded(&registry);
        assert!(
            text.contains("cryopod_test_certificate_expiry_timestamp_seconds 1767225600\n"),
            "{text}"
        );
        assert!(
            text.contains("cryopod_test_certificate_not_before_timestamp_seconds 1735689600\n"),
            "{text}"
        );
    }

    #[test]
    fn not_a_certificate_registers_nothing() {
        let mut registry = Registry::default();
        assert!(register(&mut registry, b"hello").unwrap_err().starts_with("not PEM"));
        assert!(!encoded(&registry).contains("certificate"));
    }
}
