//! The Helm chart as Helm renders it (`helm template`, with helm built from its Go
//! module; `make unit` sets `CRYOPOD_HELM`): what it installs, with least privilege.

use std::path::PathBuf;

/// The chart in this checkout.
pub fn chart_dir() -> PathBuf {
    crate::testbed::repo_root().join("charts/cryopod")
}

/// `helm install` of the chart on the testbed, as `release` in `namespace`: the
/// images imported on the nodes (never pulled) and CRIU from the node packages.
pub fn testbed_install_args(tb: &crate::testbed::Testbed, release: &str, namespace: &str) -> Vec<String> {
    let mut args: Vec<String> = ["install", release]
        .into_iter()
        .map(str::to_owned)
        .chain([chart_dir().to_string_lossy().into_owned()])
        .collect();
    args.extend(
        [
            "--namespace",
            namespace,
            "--create-namespace",
            "--wait",
            "--timeout",
            "3m",
            "--set",
            "image.operator.pullPolicy=Never",
            "--set",
            "image.agent.pullPolicy=Never",
            "--set",
        ]
        .map(str::to_owned),
    );
    args.push(format!("agent.criuDir={}", tb.node_packages.join("bin").display()));
    args
}

/// Renders the chart with `--set` values; the error is helm's message.
pub fn render(sets: &[&str]) -> Result<Vec<serde_json::Value>, String> {
    render_with(sets, &[])
}

/// [`render`], with `--set-file` values too (`key=path`).
pub fn render_with(sets: &[&str], files: &[&str]) -> Result<Vec<serde_json::Value>, String> {
    let helm = std::env::var("CRYOPOD_HELM").map_err(|_| "CRYOPOD_HELM is not set (make unit sets it)".to_owned())?;
    let mut cmd = std::process::Command::new(helm);
    cmd.args(["template", "cryopod", "--namespace", "cryopod-system"])
        .arg(chart_dir());
    for set in sets {
        cmd.args(["--set", set]);
    }
    for file in files {
        cmd.args(["--set-file", file]);
    }
    let out = cmd.output().map_err(|e| format!("cannot run helm: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value =
            serde::Deserialize::deserialize(doc).map_err(|e| format!("helm printed bad YAML: {e}"))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use serde_json::Value;

    use super::*;

    fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    #[test]
    fn the_chart_installs_the_operator_the_agents_and_the_runtime_class() {
        let docs = render(&[]).unwrap();
        let mut kinds: Vec<String> = docs.iter().map(|d| d["kind"].as_str().unwrap().to_owned()).collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                "ClusterRole",
                "ClusterRole",
                "ClusterRole",
                "ClusterRole",
                "ClusterRoleBinding",
                "ClusterRoleBinding",
                "DaemonSet",
                "Deployment",
                "MutatingAdmissionPolicy",
                "MutatingAdmissionPolicyBinding",
                "Role",
                "RoleBinding",
                "RuntimeClass",
                "Secret",
                "Secret",
                "Secret",
                "Service",
                "ServiceAccount",
                "ServiceAccount",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
                "ValidatingAdmissionPolicyBinding",
                "ValidatingAdmissionPolicyBinding",
                "ValidatingAdmissionPolicyBinding",
                "ValidatingAdmissionPolicyBinding"
            ]
        );
        assert_eq!(find(&docs, "RuntimeClass", "cryopod")["handler"], "cryopod");
        // The fence policy as the e2e tests apply it, with the chart's labels.
        let binding = find(&docs, "ValidatingAdmissionPolicyBinding", "cryopod-restore-fence");
        assert_eq!(binding["spec"]["policyName"], "cryopod-restore-fence");
        assert_eq!(
            binding["spec"]["paramRef"]["selector"]["matchLabels"]["cryopod.io/fence"],
            "true"
        );
        assert_eq!(binding["metadata"]["labels"]["app.kubernetes.io/name"], "cryopod");
        let operator = &find(&docs, "Deployment", "cryopod-operator")["spec"]["template"]["spec"];
        assert_eq!(operator["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            operator["containers"][0]["readinessProbe"]["httpGet"]["port"],
            "metrics"
        );
        assert_eq!(
            operator["containers"][0]["securityContext"]["readOnlyRootFilesystem"],
            true
        );
        let env: Vec<&str> = operator["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert!(
            env.contains(&"CRYOPOD_NAMESPACE") && env.contains(&"POD_NAME"),
            "{env:?}"
        );
        // Encryption at rest is the default, and a value turns it off.
        let encrypt = |docs: &[Value]| {
            find(docs, "Deployment", "cryopod-operator")["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "CRYOPOD_ENCRYPT_BY_DEFAULT")
                .map(|e| e["value"].as_str().unwrap().to_owned())
        };
        assert_eq!(encrypt(&docs).as_deref(), Some("true"));
        let clear = render(&["encryption.byDefault=false"]).unwrap();
        assert_eq!(encrypt(&clear).as_deref(), Some("false"));
    }

    #[test]
    fn only_the_agents_hold_the_manifest_signing_key() {
        let docs = render(&[]).unwrap();
        let secret = find(&docs, "Secret", "cryopod-signing");
        assert_eq!(secret["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
        let key = secret["data"]["key"].as_str().unwrap();
        assert!(key.len() >= 64, "a random key of 64 characters, base64: {key}");
        assert!(agent_secrets(&docs).contains(&"cryopod-signing".to_owned()));
        assert!(!secrets_mounted(&docs, "Deployment", "cryopod-operator").contains(&"cryopod-signing".to_owned()));
        // A key the admin chose (shared with another cluster): none is made.
        let chosen = render(&["signing.existingSecret=shared-key"]).unwrap();
        assert!(
            !chosen
                .iter()
                .any(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "cryopod-signing")
        );
        assert!(agent_secrets(&chosen).contains(&"shared-key".to_owned()));
    }

    #[test]
    fn the_agent_gets_the_host_access_it_needs_and_no_more() {
        let docs = render(&[]).unwrap();
        let agent = &find(&docs, "DaemonSet", "cryopod-node-agent")["spec"]["template"]["spec"];
        assert_eq!(
            (agent["hostNetwork"].as_bool(), agent["hostPID"].as_bool()),
            (Some(true), Some(true))
        );
        // Its token only asks for its node's certificate, and only then.
        assert_eq!(agent["automountServiceAccountToken"], true);
        let asks = &find(&docs, "ClusterRole", "cryopod-node-agent")["rules"];
        assert_eq!(
            asks,
            &serde_json::json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
                                 "verbs": ["create", "get"]}])
        );
        let shared = render(&["tls.perNodeCertificates=false"]).unwrap();
        let agent_shared = &find(&shared, "DaemonSet", "cryopod-node-agent")["spec"]["template"]["spec"];
        assert_eq!(
            agent_shared["automountServiceAccountToken"], false,
            "with one shared certificate the agent needs no API access"
        );
        assert!(
            !shared
                .iter()
                .any(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "cryopod-node-agent")
        );
        assert!(agent.get("initContainers").is_none(), "the handler install is opt-in");
        let mut host_paths: Vec<&str> = agent["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["hostPath"]["path"].as_str())
            .collect();
        host_paths.sort();
        assert_eq!(
            host_paths,
            ["/run/containerd/containerd.sock", "/sys/fs/cgroup", "/var/lib/cryopod"]
        );
        // runc and CRIU run in the runtime's mount namespace, found through its socket.
        let env = &agent["containers"][0]["env"];
        let node_exec = env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "CRYOPOD_NODE_EXEC");
        assert_eq!(node_exec.unwrap()["value"], "nsenter -t {runtime-pid} -m --");
        let with_handler = render(&["agent.installHandler=true"]).unwrap();
        let agent = &find(&with_handler, "DaemonSet", "cryopod-node-agent")["spec"]["template"]["spec"];
        assert_eq!(agent["initContainers"][0]["args"][0], "install-handler");
        assert!(
            agent["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["hostPath"]["path"] == "/")
        );
    }

    #[test]
    fn rbac_is_least_privilege() {
        let docs = render(&[]).unwrap();
        let role = find(&docs, "ClusterRole", "cryopod-operator");
        for rule in role["rules"].as_array().unwrap() {
            let verbs: Vec<&str> = rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert!(!verbs.contains(&"*"), "{rule}");
            if rule["resources"].as_array().unwrap().iter().any(|r| r == "secrets") {
                // Read by name, never listed, never created outside the release's namespace.
                assert_eq!(verbs, ["get"], "Secrets are read by name only");
            }
        }
        // The operator signs for its own signer name only.
        let signs: Vec<&serde_json::Value> = role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["resources"][0] == "signers")
            .collect();
        assert_eq!(signs.len(), 1);
        assert_eq!(signs[0]["resourceNames"], serde_json::json!(["cryopod.io/node-agent"]));
        let lease = find(&docs, "Role", "cryopod-operator-lease");
        assert_eq!(lease["rules"][0]["resources"][0], "leases");
        assert_eq!(lease["rules"][1]["resources"][0], "secrets");
        assert_eq!(lease["rules"][1]["verbs"], serde_json::json!(["create", "delete"]));
        // Users get the cryopod kinds through the built-in roles, by aggregation.
        let labels = &find(&docs, "ClusterRole", "cryopod-edit")["metadata"]["labels"];
        assert_eq!(labels["rbac.authorization.k8s.io/aggregate-to-edit"], "true");
        assert!(labels.get("rbac.authorization.k8s.io/aggregate-to-view").is_none());
        let labels = &find(&docs, "ClusterRole", "cryopod-view")["metadata"]["labels"];
        assert_eq!(labels["rbac.authorization.k8s.io/aggregate-to-view"], "true");
        // The admission policies exempt the operator's own account, and only it.
        for policy in [
            "cryopod-restore-pods",
            "cryopod-requester-rights",
            "cryopod-operator-annotations",
        ] {
            let policy = find(&docs, "ValidatingAdmissionPolicy", policy);
            assert_eq!(
                policy["spec"]["matchConditions"][0]["expression"],
                "request.userInfo.username != \"system:serviceaccount:cryopod-system:cryopod-operator\""
            );
        }
    }

    #[test]
    fn certificates_are_generated_and_chain_to_the_ca() {
        use base64::Engine;
        let docs = render(&[]).unwrap();
        let data = &find(&docs, "Secret", "cryopod-tls")["data"];
        let dir = tempfile::tempdir().unwrap();
        for key in ["ca.crt", "agent.crt", "agent.key", "operator.crt", "operator.key"] {
            let pem = base64::engine::general_purpose::STANDARD
                .decode(data[key].as_str().unwrap())
                .unwrap();
            std::fs::write(dir.path().join(key), pem).unwrap();
        }
        for cert in ["agent.crt", "operator.crt"] {
            let out = std::process::Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(dir.path().join("ca.crt"))
                .arg(dir.path().join(cert))
                .output()
                .unwrap();
            assert!(out.status.success(), "{cert}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let san = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(dir.path().join("agent.crt"))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&san.stdout).contains("DNS:cryopod-node-agent"));
    }

    /// The Secrets a workload's pods mount as volumes.
    fn secrets_mounted(docs: &[Value], kind: &str, name: &str) -> Vec<String> {
        find(docs, kind, name)["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["secret"]["secretName"].as_str().map(str::to_owned))
            .collect()
    }

    /// The Secrets the agents mount.
    fn agent_secrets(docs: &[Value]) -> Vec<String> {
        secrets_mounted(docs, "DaemonSet", "cryopod-node-agent")
    }

    #[test]
    fn no_key_of_the_ca_or_the_operator_reaches_a_node() {
        // A node's kubelet may read, whole, every Secret its pods mount.
        let docs = render(&[]).unwrap();
        assert_eq!(agent_secrets(&docs), ["cryopod-agent-tls", "cryopod-signing"]);
        let keys = |docs: &[Value], name: &str| -> Vec<String> {
            let mut keys: Vec<String> = find(docs, "Secret", name)["data"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            keys.sort();
            keys
        };
        assert_eq!(keys(&docs, "cryopod-agent-tls"), ["ca.crt"]);
        assert!(keys(&docs, "cryopod-tls").contains(&"ca.key".to_owned()));
        // One shared agent pair: that pair too, still no CA or operator key.
        let shared = render(&["tls.perNodeCertificates=false"]).unwrap();
        assert_eq!(keys(&shared, "cryopod-agent-tls"), ["agent.crt", "agent.key", "ca.crt"]);
    }

    #[test]
    fn cert_manager_issues_the_operators_pair_and_the_signing_ca_and_agents_get_only_the_issuers_ca() {
        use base64::Engine;
        let plain = render(&[]).unwrap();
        let ca = base64::engine::general_purpose::STANDARD
            .decode(
                find(&plain, "Secret", "cryopod-tls")["data"]["ca.crt"]
                    .as_str()
                    .unwrap(),
            )
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("issuer-ca.crt");
        std::fs::write(&bundle, &ca).unwrap();
        let file = format!("tls.certManager.caBundle={}", bundle.display());
        let on = [
            "tls.certManager.enabled=true",
            "tls.certManager.issuerRef.name=cluster-ca",
        ];
        let docs = render_with(&on, &[&file]).unwrap();
        // Nothing generated: no CA key, no operator key in the release's Secrets.
        assert!(
            !docs
                .iter()
                .any(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "cryopod-tls")
        );
        let signer = find(&docs, "Certificate", "cryopod-signer-ca");
        assert_eq!(signer["spec"]["isCA"], true);
        assert_eq!(signer["spec"]["issuerRef"]["name"], "cluster-ca");
        let operator = find(&docs, "Certificate", "cryopod-operator");
        assert_eq!(operator["spec"]["commonName"], "cryopod-operator");
        assert_eq!(
            operator["spec"]["usages"],
            serde_json::json!(["digital signature", "key encipherment", "client auth"])
        );
        // The agents get the issuer's CA alone; the operator its pair and the signing CA.
        let agent_ca = find(&docs, "Secret", "cryopod-agent-tls")["data"].clone();
        assert_eq!(agent_ca.as_object().unwrap().len(), 1);
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(agent_ca["ca.crt"].as_str().unwrap())
                .unwrap(),
            ca
        );
        let volumes = &find(&docs, "Deployment", "cryopod-operator")["spec"]["template"]["spec"]["volumes"];
        let signer_volume = volumes
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "signer")
            .unwrap();
        assert_eq!(signer_volume["secret"]["secretName"], "cryopod-signer-ca");
        assert_eq!(agent_secrets(&docs), ["cryopod-agent-tls", "cryopod-signing"]);
        // What it cannot do is refused, naming the value.
        let err = render(&on).unwrap_err();
        assert!(err.contains("tls.certManager.caBundle"), "{err}");
        let err = render_with(&[on[0], on[1], "tls.perNodeCertificates=false"], &[&file]).unwrap_err();
        assert!(err.contains("tls.certManager needs tls.perNodeCertificates"), "{err}");
    }

    /// The alert names of the rendered rules, and for each whether a test case
    /// expects it firing and one not firing.
    fn alert_cases(rules: &Value, tests: &Value) -> Vec<(String, bool, bool)> {
        let cases: Vec<&Value> = tests["tests"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
            .collect();
        rules["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .filter_map(|r| r["alert"].as_str())
            .map(|alert| {
                let of_it = || cases.iter().filter(|c| c["alertname"] == alert);
                let empty = |c: &&&Value| c["exp_alerts"].as_array().is_none_or(Vec::is_empty);
                (
                    alert.to_owned(),
                    of_it().any(|c| !empty(&c)),
                    of_it().any(|c| empty(&c)),
                )
            })
            .collect()
    }

    /// The chart's alerts as the chart renders them, through `promtool test rules`
    /// with the cases of charts/cryopod/tests/alerts.test.yaml; promtool is built
    /// from its Go module (`make unit` sets `CRYOPOD_PROMTOOL`).
    #[test]
    fn the_alerts_fire_when_and_only_when_their_tests_expect() {
        let promtool = std::env::var("CRYOPOD_PROMTOOL")
            .unwrap_or_else(|_| panic!("CRYOPOD_PROMTOOL is not set (make unit sets it: hack/ensure-promtool.sh)"));
        let docs = render(&["metrics.prometheusRule.enabled=true"]).unwrap();
        let rules = serde_json::json!({ "groups": find(&docs, "PrometheusRule", "cryopod-alerts")["spec"]["groups"] });
        let test_file = chart_dir().join("tests/alerts.test.yaml");
        let tests_text = std::fs::read_to_string(&test_file).unwrap();
        let tests: Value = serde_yaml::from_str(&tests_text).unwrap();
        let cases = alert_cases(&rules, &tests);
        assert_eq!(cases.len(), 6, "{cases:?}");
        for (alert, firing, quiet) in cases {
            assert!(
                firing && quiet,
                "{alert}: a case firing ({firing}) and one not ({quiet}) are needed"
            );
        }
        // promtool reads rule_files relative to the test file.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yaml"), serde_yaml::to_string(&rules).unwrap()).unwrap();
        std::fs::write(dir.path().join("alerts.test.yaml"), tests_text).unwrap();
        let out = std::process::Command::new(&promtool)
            .args(["test", "rules", "alerts.test.yaml"])
            .current_dir(dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {promtool}: {e}"));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{said}");
        assert!(out.status.success(), "promtool test rules failed:\n{said}");
        assert!(said.contains("SUCCESS"), "{said}");
    }

    #[test]
    fn the_dashboard_has_its_variables_units_and_a_panel_per_alert() {
        let docs = render(&["metrics.dashboard.enabled=true", "metrics.prometheusRule.enabled=true"]).unwrap();
        let text = find(&docs, "ConfigMap", "cryopod-dashboard")["data"]["cryopod.json"]
            .as_str()
            .unwrap()
            .to_owned();
        let dashboard: Value = serde_json::from_str(&text).unwrap();
        let variables: Vec<&str> = dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(variables, ["datasource", "namespace", "node"]);
        let panels: Vec<&Value> = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["type"] != "row")
            .collect();
        for panel in &panels {
            assert!(
                panel["fieldConfig"]["defaults"]["unit"].is_string(),
                "no unit: {}",
                panel["title"]
            );
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
        }
        let rules = &find(&docs, "PrometheusRule", "cryopod-alerts")["spec"]["groups"][0]["rules"];
        for alert in rules.as_array().unwrap().iter().filter_map(|r| r["alert"].as_str()) {
            assert!(
                panels
                    .iter()
                    .any(|p| p["title"].as_str().unwrap().starts_with(&format!("Alert {alert}:"))),
                "no panel for {alert}"
            );
        }
    }

    /// The anchors GitHub gives the headings of a Markdown file.
    fn anchors(markdown: &str) -> Vec<String> {
        markdown
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .map(|h| {
                h.trim_start_matches('#')
                    .trim()
                    .to_lowercase()
                    .chars()
                    .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
                    .map(|c| if c == ' ' { '-' } else { c })
                    .collect()
            })
            .collect()
    }

    /// The reasons `pub mod *_reasons` of the API's source define, with the module.
    fn api_reasons() -> Vec<(String, String)> {
        let dir = crate::testbed::repo_root().join("crds/src/v1alpha1");
        let mut reasons = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let Some((before, module)) = text.split_once("_reasons {") else {
                continue;
            };
            let name = before.rsplit("pub mod ").next().unwrap_or_default().to_owned();
            let module = module.split_once("\n}").map_or(module, |(m, _)| m);
            reasons.extend(
                module
                    .lines()
                    .filter_map(|l| l.trim().strip_prefix("pub const "))
                    .filter_map(|l| l.split('"').nth(1))
                    .map(|r| (name.clone(), r.to_owned())),
            );
        }
        reasons
    }

    #[test]
    fn the_runbook_has_a_section_for_every_alert_and_every_failure_reason() {
        let runbook = std::fs::read_to_string(crate::testbed::repo_root().join("docs/runbook.md")).unwrap();
        let sections = anchors(&runbook);
        let docs = render(&["metrics.prometheusRule.enabled=true"]).unwrap();
        let rules = &find(&docs, "PrometheusRule", "cryopod-alerts")["spec"]["groups"][0]["rules"];
        for rule in rules.as_array().unwrap() {
            let url = rule["annotations"]["runbook_url"].as_str().unwrap();
            let (page, anchor) = url.split_once('#').unwrap();
            assert_eq!(page, "docs/runbook.md");
            // The failed-operations alert points to its reason's section.
            if !anchor.contains("{{") {
                assert!(sections.iter().any(|s| s == anchor), "no section #{anchor}");
            }
        }
        let reasons = api_reasons();
        assert!(reasons.len() > 20, "{reasons:?}");
        // A storage's reasons are no operation's: one section lists them.
        let (_, storage) = runbook.split_once("### Storage reasons").unwrap();
        // The ones that are no failure: accepted, under way, done.
        let fine = ["Pending", "Reachable"];
        for (module, reason) in reasons
            .iter()
            .filter(|(_, r)| !fine.contains(&r.as_str()) && !r.ends_with("InProgress") && !r.ends_with("Completed"))
        {
            let covered = if module == "storage" {
                storage.contains(&format!("`{reason}`"))
            } else {
                sections.contains(&reason.to_lowercase())
            };
            assert!(
                covered,
                "docs/runbook.md has no section for {reason} ({module}_reasons)"
            );
        }
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let err = render(&["agent.port=0"]).unwrap_err();
        assert!(err.contains("/agent/port"), "{err}");
        let err = render(&["operator.replicass=2"]).unwrap_err();
        assert!(err.contains("replicass"), "{err}");
    }
}
