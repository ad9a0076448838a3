//! Outcomes the end-to-end tests asserted, kept as JSON files beside the testbed's logs
//! (which outlive `make cluster-down`) and rendered into `docs/` after the run: the
//! compatibility matrix ([`crate::compat`]) and the fault matrix
//! ([`crate::reliability`]). A test records a row only after its assertions held.

use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};

/// Where the rows of matrix `kind` go.
pub fn dir(testbed: &Path, kind: &str) -> PathBuf {
    testbed.join("logs").join(kind)
}

/// Keeps `row` under `name` (made file-safe) in matrix `kind`.
pub fn record(testbed: &Path, kind: &str, name: &str, row: &impl Serialize) -> Result<(), String> {
    let dir = dir(testbed, kind);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let name: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let text = serde_json::to_string_pretty(row).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(format!("{name}.json")), text).map_err(|e| format!("cannot record {name}: {e}"))
}

/// Every row of matrix `kind`; an unreadable one is an error naming its file.
pub fn load<T: DeserializeOwned>(testbed: &Path, kind: &str) -> Result<Vec<T>, String> {
    let dir = dir(testbed, kind);
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("no recorded outcomes in {}: {e}", dir.display()))?;
    let mut rows = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        rows.push(serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    Ok(rows)
}

/// A Markdown table cell: pipes escaped, line breaks flattened, empty as `-`.
pub fn cell(text: &str) -> String {
    if text.is_empty() {
        return "-".to_owned();
    }
    text.replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn recorded_rows_load_back_and_cells_are_table_safe() {
        let dir = tempfile::tempdir().unwrap();
        record(dir.path(), "m", "a/b c", &serde_json::json!({"x": 1})).unwrap();
        assert!(dir.path().join("logs/m/a_b_c.json").exists());
        let rows: Vec<serde_json::Value> = load(dir.path(), "m").unwrap();
        assert_eq!(rows, [serde_json::json!({"x": 1})]);
        assert!(load::<serde_json::Value>(dir.path(), "none").is_err());
        assert_eq!(cell("a | b\nc"), "a \\| b c");
        assert_eq!(cell(""), "-");
    }
}
