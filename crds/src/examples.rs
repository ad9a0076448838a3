//! Reads the manifests in `examples/`: their YAML documents and, for the ones in
//! `examples/invalid/`, the `# expect: <field path> | <message part>` line that says
//! what a refusal must name. Shared by the schema tests and the real API server tests.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// One manifest file.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its YAML documents; two for an update (the original, then the change).
    pub documents: Vec<Value>,
    /// What the refusal must say, for an invalid manifest.
    pub expect: Option<Expectation>,
}

/// What a refusal must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    /// The field path, e.g. `spec.timeoutSeconds`.
    pub field: String,
    /// A part of the message, e.g. `less than or equal to 3600`.
    pub message: String,
}

impl Expectation {
    /// Whether an error message names the field and carries the message part. The
    /// field counts when it opens the message (`spec.x: Invalid value`), is quoted
    /// (`unknown field "spec.x"`) or follows the API server's `is invalid: `.
    pub fn matches(&self, message: &str) -> bool {
        let field = &self.field;
        let names_field = message.starts_with(&format!("{field}: "))
            || message.contains(&format!("\"{field}\""))
            || message.contains(&format!(" {field}: "));
        names_field && message.contains(&self.message)
    }
}

/// Reading a manifest failed.
#[derive(Debug)]
pub enum ExampleError {
    /// The directory or file could not be read.
    Read { path: PathBuf, source: std::io::Error },
    /// A document is not YAML.
    Yaml { path: PathBuf, source: serde_yaml::Error },
    /// The `# expect:` line lacks its `|`.
    BadExpectLine { path: PathBuf },
}

impl std::fmt::Display for ExampleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read { path, .. } => write!(f, "cannot read {}", path.display()),
            Self::Yaml { path, .. } => write!(f, "{} is not valid YAML", path.display()),
            Self::BadExpectLine { path } => {
                write!(
                    f,
                    "{}: the expect line must read `# expect: <field> | <message>`",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for ExampleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            Self::Yaml { source, .. } => Some(source),
            Self::BadExpectLine { .. } => None,
        }
    }
}

/// Parses one manifest's text.
pub fn parse(path: &Path, text: &str) -> Result<Manifest, ExampleError> {
    let expect = match text.lines().find_map(|l| l.strip_prefix("# expect:")) {
        Some(rest) => {
            let (field, message) = rest
                .split_once('|')
                .ok_or_else(|| ExampleError::BadExpectLine { path: path.to_owned() })?;
            Some(Expectation {
                field: field.trim().to_owned(),
                message: message.trim().to_owned(),
            })
        }
        None => None,
    };
    let documents = serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            Value::deserialize(doc).map_err(|source| ExampleError::Yaml {
                path: path.to_owned(),
                source,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Manifest {
        path: path.to_owned(),
        documents,
        expect,
    })
}

/// Every `*.yaml` directly in `dir`, sorted by name.
pub fn load_dir(dir: &Path) -> Result<Vec<Manifest>, ExampleError> {
    let read = |source| ExampleError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            paths.push(path);
        }
    }
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|source| ExampleError::Read {
                path: path.clone(),
                source,
            })?;
            parse(&path, &text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn expectation_names_the_field_exactly() {
        let e = Expectation {
            field: "spec".into(),
            message: "immutable".into(),
        };
        assert!(e.matches("spec: Invalid value: \"object\": spec is immutable after creation"));
        assert!(e.matches("PodCheckpoint.cryopod.io \"x\" is invalid: spec: Invalid value: \"object\": immutable"));
        assert!(!e.matches("spec.storage: Invalid value: immutable"));
        let u = Expectation {
            field: "spec.sourcePod".into(),
            message: "unknown field".into(),
        };
        assert!(u.matches("strict decoding error: unknown field \"spec.sourcePod\""));
    }

    #[test]
    fn parses_documents_and_the_expect_line() {
        let m = parse(
            Path::new("x.yaml"),
            "# expect: spec.a | Required value\na: 1\n---\na: 2\n",
        )
        .unwrap();
        assert_eq!(m.documents.len(), 2);
        assert_eq!(
            m.expect,
            Some(Expectation {
                field: "spec.a".into(),
                message: "Required value".into()
            })
        );
        assert!(parse(Path::new("x.yaml"), "# expect: no bar\n").is_err());
    }
}
