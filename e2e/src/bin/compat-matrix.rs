//! Renders the compatibility matrix from the rows the end-to-end tests recorded.
//! usage: compat-matrix TESTBED_DIR   (Markdown on stdout)

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(testbed) = std::env::args_os().nth(1) else {
        eprintln!("usage: compat-matrix TESTBED_DIR");
        return ExitCode::from(2);
    };
    let dir = cryopod_e2e::compat::dir(std::path::Path::new(&testbed));
    let mut rows = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) => {
            eprintln!("no recorded outcomes in {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    for entry in entries.flatten() {
        let parsed = std::fs::read_to_string(entry.path())
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()));
        match parsed {
            Ok(row) => rows.push(row),
            Err(e) => {
                eprintln!("{}: {e}", entry.path().display());
                return ExitCode::FAILURE;
            }
        }
    }
    print!("{}", cryopod_e2e::compat::render(&rows));
    ExitCode::SUCCESS
}
