//! `thaw POD`, the emergency action: the pod's node agent thaws every freeze it holds
//! of the pod (its Thaw RPC). The agent accepts only the operator's client
//! certificate, so the plugin uses it, read from the release's Secret that only
//! cluster admins can read; it dials the agent pod on the pod's node (the agents use
//! the host network) or the URL given, e.g. a `kubectl port-forward`.

use std::collections::BTreeMap;

use cryopod_agent_api::pb;

/// Whether to ask before thawing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confirmation {
    /// `--yes`: no question.
    Skip,
    /// Ask on the terminal.
    Ask,
    /// No terminal to ask on and no `--yes`: refuse.
    Refuse,
}

/// What confirmation a thaw needs: an emergency action is never taken silently by a
/// script that forgot `--yes`.
pub fn confirmation(yes: bool, interactive: bool) -> Confirmation {
    match (yes, interactive) {
        (true, _) => Confirmation::Skip,
        (false, true) => Confirmation::Ask,
        (false, false) => Confirmation::Refuse,
    }
}

/// The question asked before a thaw.
pub fn question(namespace: &str, pod: &str, uid: &str, node: &str) -> String {
    format!(
        "Thaw pod {namespace}/{pod} (uid {uid}) on node {node}? Its running checkpoint or migration fails and \
         the pod runs on from where it was frozen. Type the pod's name to confirm: "
    )
}

/// Whether the answer confirms: the pod's name, typed out.
pub fn confirmed(answer: &str, pod: &str) -> bool {
    answer.trim() == pod
}

/// The operator's client pair and the CA, as a Secret holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientMaterial {
    /// The CA the agents' certificates chain to (PEM).
    pub ca: Vec<u8>,
    /// The operator's certificate (PEM).
    pub cert: Vec<u8>,
    /// Its key (PEM).
    pub key: Vec<u8>,
}

/// The client pair in a Secret's data: the chart's `<release>-tls` holds
/// `operator.crt`/`operator.key`, cert-manager's `<release>-operator-tls` holds
/// `tls.crt`/`tls.key`; both hold `ca.crt`. `Err`: the keys missing.
pub fn client_material(data: &BTreeMap<String, Vec<u8>>) -> Result<ClientMaterial, String> {
    let ca = data.get("ca.crt").ok_or("it has no ca.crt")?;
    let pair = [("operator.crt", "operator.key"), ("tls.crt", "tls.key")]
        .into_iter()
        .find_map(|(c, k)| Some((data.get(c)?, data.get(k)?)));
    let (cert, key) = pair.ok_or("it has neither operator.crt and operator.key nor tls.crt and tls.key")?;
    Ok(ClientMaterial {
        ca: ca.clone(),
        cert: cert.clone(),
        key: key.clone(),
    })
}

/// The agent's URL at `ip` (the agent pod's, which is its node's: host network).
pub fn agent_url(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("https://[{ip}]:{port}")
    } else {
        format!("https://{ip}:{port}")
    }
}

/// What the agent records as the reason: the tool, who ran it, and theirs.
pub fn reason(user: Option<&str>, given: Option<&str>) -> String {
    let mut reason = format!("kubectl cryopod thaw by {}", user.unwrap_or("an unnamed user"));
    if let Some(given) = given.map(str::trim).filter(|g| !g.is_empty()) {
        reason.push_str(": ");
        reason.push_str(given);
    }
    reason
}

/// What the thaw did, for the terminal.
pub fn summary(namespace: &str, pod: &str, node: &str, response: &pb::ThawResponse) -> String {
    if response.freezes.is_empty() {
        return format!(
            "pod {namespace}/{pod}: the cryopod agent of node {node} holds no freeze of it; nothing to thaw\n"
        );
    }
    let mut out = String::new();
    for freeze in &response.freezes {
        if freeze.thawed_now {
            out.push_str(&format!(
                "pod {namespace}/{pod} thawed (operation {}); it runs on\n",
                freeze.operation_id
            ));
        } else {
            out.push_str(&format!(
                "pod {namespace}/{pod}: the freeze of operation {} had already ended ({})\n",
                freeze.operation_id, freeze.why
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_thaw_asks_first_and_refuses_without_a_terminal_or_yes() {
        assert_eq!(confirmation(true, false), Confirmation::Skip);
        assert_eq!(confirmation(true, true), Confirmation::Skip);
        assert_eq!(confirmation(false, true), Confirmation::Ask);
        assert_eq!(confirmation(false, false), Confirmation::Refuse);
        assert!(confirmed("web-0\n", "web-0"));
        assert!(!confirmed("y", "web-0"));
        assert!(!confirmed("", "web-0"));
        assert!(question("shop", "web-0", "u-1", "node-1").contains("shop/web-0 (uid u-1) on node node-1"));
    }

    #[test]
    fn the_client_pair_is_read_from_either_secret_layout() {
        let data = |keys: &[&str]| -> BTreeMap<String, Vec<u8>> {
            keys.iter().map(|k| ((*k).to_owned(), k.as_bytes().to_vec())).collect()
        };
        let chart = client_material(&data(&[
            "ca.crt",
            "ca.key",
            "operator.crt",
            "operator.key",
            "agent.crt",
        ]))
        .unwrap();
        assert_eq!(chart.cert, b"operator.crt");
        assert_eq!(chart.key, b"operator.key");
        let cert_manager = client_material(&data(&["ca.crt", "tls.crt", "tls.key"])).unwrap();
        assert_eq!(cert_manager.cert, b"tls.crt");
        assert!(
            client_material(&data(&["operator.crt", "operator.key"]))
                .unwrap_err()
                .contains("ca.crt")
        );
        assert!(
            client_material(&data(&["ca.crt", "operator.crt"]))
                .unwrap_err()
                .contains("neither")
        );
    }

    #[test]
    fn urls_reasons_and_summaries() {
        assert_eq!(agent_url("10.0.0.7", 9443), "https://10.0.0.7:9443");
        assert_eq!(agent_url("fd00::7", 9443), "https://[fd00::7]:9443");
        assert_eq!(
            reason(Some("alice"), Some(" stuck at dump ")),
            "kubectl cryopod thaw by alice: stuck at dump"
        );
        assert_eq!(reason(None, None), "kubectl cryopod thaw by an unnamed user");
        let nothing = summary("shop", "web-0", "node-1", &pb::ThawResponse::default());
        assert!(nothing.contains("holds no freeze of it"), "{nothing}");
        let response = pb::ThawResponse {
            freezes: vec![
                pb::ThawedFreeze {
                    operation_id: "op-1".into(),
                    thawed_now: true,
                    why: "x".into(),
                    ended_unix_millis: 1,
                },
                pb::ThawedFreeze {
                    operation_id: "op-0".into(),
                    thawed_now: false,
                    why: "released".into(),
                    ended_unix_millis: 1,
                },
            ],
        };
        let text = summary("shop", "web-0", "node-1", &response);
        assert!(
            text.contains("pod shop/web-0 thawed (operation op-1); it runs on"),
            "{text}"
        );
        assert!(text.contains("operation op-0 had already ended (released)"), "{text}");
    }
}
