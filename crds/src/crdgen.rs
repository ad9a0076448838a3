//! Renders the CRDs to the YAML files committed under `charts/cryopod/crds/`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::v1alpha1::{CheckpointSchedule, CheckpointStorage, NodeEvacuation, PodCheckpoint, PodMigration, PodRestore};

/// Every CRD of the API, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        PodCheckpoint::crd(),
        PodRestore::crd(),
        PodMigration::crd(),
        CheckpointStorage::crd(),
        NodeEvacuation::crd(),
        CheckpointSchedule::crd(),
    ]
}

/// A rendered CRD file: its name in the chart's `crds/` folder and its contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdFile {
    /// File name, `<group>_<plural>.yaml`.
    pub file_name: String,
    /// YAML document.
    pub contents: String,
}

/// Rendering failed.
#[derive(Debug)]
pub struct RenderError {
    crd: String,
    source: serde_yaml::Error,
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot render the CRD {} as YAML", self.crd)
    }
}

impl std::error::Error for RenderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Renders every CRD as a YAML file with a generated-file header.
pub fn render() -> Result<Vec<CrdFile>, RenderError> {
    all()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_yaml::to_string(&crd).map_err(|source| RenderError {
                crd: name.clone(),
                source,
            })?;
            Ok(CrdFile {
                file_name: format!("{name}.yaml"),
                contents: format!("# Generated from crds/src by `make crds`. Do not edit.\n{yaml}"),
            })
        })
        .collect()
}

/// Renders `docs/api.md`: every field of every kind with its type, constraints,
/// default and description, walked from the same schemas the API server gets.
pub fn render_api_reference() -> String {
    let mut out = String::from(
        "# API reference: `cryopod.io/v1alpha1`\n\n\
         Generated from the Rust types by `make crds`; do not edit. `kubectl explain` shows\n\
         the same descriptions. Every `spec` is immutable after creation, except a\n\
         CheckpointSchedule's.\n",
    );
    for crd in all() {
        let names = &crd.spec.names;
        out.push_str(&format!(
            "\n## {}\n\nScope: {}. Short names: {}. Plural: `{}`.\n\n",
            names.kind,
            crd.spec.scope,
            names.short_names.as_deref().unwrap_or_default().join(", "),
            names.plural
        ));
        let Some(schema) = crd
            .spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
        else {
            continue;
        };
        if let Some(doc) = schema.get("description").and_then(|d| d.as_str()) {
            out.push_str(&format!("{doc}\n\n"));
        }
        out.push_str("| field | type | description |\n|---|---|---|\n");
        for part in ["spec", "status"] {
            if let Some(sub) = schema.pointer(&format!("/properties/{part}")) {
                fields(sub, part, &mut out);
            }
        }
    }
    out
}

fn fields(schema: &serde_json::Value, path: &str, out: &mut String) {
    let Some(props) = schema.get("properties").and_then(|p| p.as_object()) else {
        return;
    };
    let required: Vec<&str> = schema
        .get("required")
        .and_then(|r| r.as_array())
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    for (name, sub) in props {
        let field = format!("{path}.{name}");
        let (item, suffix) = match sub.get("items") {
            Some(items) => (items, "[]"),
            None => (sub, ""),
        };
        let mut kind = format!("{}{suffix}", item.get("type").and_then(|t| t.as_str()).unwrap_or("any"));
        let mut notes = Vec::new();
        if required.contains(&name.as_str()) {
            notes.push("required".to_owned());
        }
        if let Some(values) = item.get("enum").and_then(|e| e.as_array()) {
            let values: Vec<String> = values
                .iter()
                .filter_map(|v| v.as_str())
                .map(|v| format!("`{v}`"))
                .collect();
            kind = format!("enum{suffix}: {}", values.join(", "));
        }
        for (key, label) in [
            ("minimum", "min"),
            ("maximum", "max"),
            ("maxLength", "max length"),
            ("maxItems", "max items"),
        ] {
            if let Some(v) = sub.get(key).and_then(|v| v.as_f64()) {
                // Bounds arrive as floats (1.0); whole numbers read better without ".0".
                notes.push(format!("{label} {}", v as i64));
            }
        }
        if let Some(v) = sub.get("default") {
            notes.push(format!("default `{v}`"));
        }
        let description = sub
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or_default()
            .replace('\n', " ")
            .replace('|', "\\|");
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join("; "))
        };
        out.push_str(&format!("| `{field}` | {kind}{notes} | {description} |\n"));
        // A preserved object (the pod template) is documented by Kubernetes itself.
        if item.get("x-kubernetes-preserve-unknown-fields").is_none() && !field.ends_with(".conditions") {
            fields(item, &format!("{field}{suffix}"), out);
        }
    }
}
