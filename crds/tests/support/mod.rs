//! Checks manifests against the generated CRD schemas the way the API server does:
//! defaulting, structural validation (types, required, enums, ranges, patterns,
//! unknown fields as `kubectl --validate=strict` reports them), then the CEL rules.
//! Findings are worded like the API server's, so one expectation serves both this
//! tier and the real API server.

use std::path::{Path, PathBuf};

use cryopod_crds::examples::Manifest;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

pub fn repo_root() -> PathBuf {
    // Cargo's run-time value, so a binary built in another checkout (one shared
    // target directory) reads this checkout's files.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(),
            std::path::PathBuf::from,
        )
        .join("..")
}

/// Every manifest in `dir`.
pub fn manifests(dir: &Path) -> Vec<Manifest> {
    cryopod_crds::examples::load_dir(dir).unwrap_or_else(|e| panic!("{e}"))
}

/// The schema of the CRD serving `object`'s kind, or `None` for a foreign kind.
pub fn schema_for(crds: &[CustomResourceDefinition], object: &Value) -> Option<Value> {
    let kind = object.get("kind")?.as_str()?;
    let api_version = object.get("apiVersion")?.as_str()?;
    let crd = crds.iter().find(|crd| {
        crd.spec.names.kind == kind
            && crd
                .spec
                .versions
                .iter()
                .any(|v| format!("{}/{}", crd.spec.group, v.name) == api_version)
    })?;
    let version = crd
        .spec
        .versions
        .iter()
        .find(|v| format!("{}/{}", crd.spec.group, v.name) == api_version)?;
    let schema = version.schema.as_ref()?.open_api_v3_schema.as_ref()?;
    Some(serde_json::to_value(schema).unwrap())
}

/// Everything the API server would refuse about `object` (an update when `old` is given).
pub fn check(schema: &Value, object: &Value, old: Option<&Value>) -> Vec<String> {
    let defaulted = kube_cel::apply_defaults(schema, object);
    let mut findings = Vec::new();
    structural(schema, &defaulted, "", &mut findings);
    if let Err(errors) = kube_cel::validate(schema, object, old) {
        for e in errors.as_slice() {
            findings.push(format!("{}: Invalid value: \"object\": {}", e.field_path, e.message));
        }
    }
    findings
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn structural(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    if value.is_null() {
        if !schema.get("nullable").and_then(Value::as_bool).unwrap_or(false) {
            out.push(format!(
                "{path}: Invalid value: \"null\": {path} in body must be of type {}",
                type_of(schema)
            ));
        }
        return;
    }
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let actual = match value {
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::String(_) => "string",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::Null => "null",
    };
    let expected = type_of(schema);
    if !expected.is_empty() && expected != actual && !(expected == "number" && actual == "integer") {
        out.push(format!(
            "{path}: Invalid value: \"{actual}\": {path} in body must be of type {expected}: \"{actual}\""
        ));
        return;
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for req in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if let Some(key) = req.as_str()
                    && !map.contains_key(key)
                {
                    out.push(format!("{}: Required value", join(path, key)));
                }
            }
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
                && map.len() as u64 > max
            {
                out.push(format!(
                    "{path}: Too many: {}: must have at most {max} items",
                    map.len()
                ));
            }
            for (key, child) in map {
                // The API server validates metadata itself; the CRD schema leaves it open.
                if path.is_empty() && matches!(key.as_str(), "metadata" | "apiVersion" | "kind") {
                    continue;
                }
                match (props.and_then(|p| p.get(key)), schema.get("additionalProperties")) {
                    (Some(sub), _) => structural(sub, child, &join(path, key), out),
                    (None, Some(sub)) if sub.is_object() => structural(sub, child, &join(path, key), out),
                    _ if preserve => {}
                    _ => out.push(format!("unknown field \"{}\"", join(path, key))),
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                out.push(format!(
                    "{path}: Too many: {}: must have at most {max} items",
                    items.len()
                ));
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                out.push(format!(
                    "{path}: Invalid value: {}: {path} in body should have at least {min} items",
                    items.len()
                ));
            }
            if let Some(sub) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    structural(sub, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        Value::String(s) => {
            if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
                && !allowed.iter().any(|a| a.as_str() == Some(s))
            {
                let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
                out.push(format!(
                    "{path}: Unsupported value: \"{s}\": supported values: {}",
                    list.join(", ")
                ));
            }
            let len = s.chars().count() as u64;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                out.push(format!("{path}: Too long: may not be more than {max} bytes"));
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                out.push(format!(
                    "{path}: Invalid value: \"{s}\": {path} in body should be at least {min} chars long"
                ));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
                let re =
                    regex::Regex::new(pattern).unwrap_or_else(|e| panic!("schema pattern {pattern} at {path}: {e}"));
                if !re.is_match(s) {
                    out.push(format!(
                        "{path}: Invalid value: \"{s}\": {path} in body should match '{pattern}'"
                    ));
                }
            }
        }
        Value::Number(n) => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && v > max
            {
                out.push(format!(
                    "{path}: Invalid value: {n}: {path} in body should be less than or equal to {max}"
                ));
            }
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && v < min
            {
                out.push(format!(
                    "{path}: Invalid value: {n}: {path} in body should be greater than or equal to {min}"
                ));
            }
        }
        Value::Bool(_) | Value::Null => {}
    }
}

fn type_of(schema: &Value) -> &str {
    schema.get("type").and_then(Value::as_str).unwrap_or("")
}
