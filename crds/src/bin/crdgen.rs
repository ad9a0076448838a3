//! Writes the generated CRD YAML into a directory, or checks that it is current.
//!
//! `crdgen <crd-dir> <api-doc>` writes the CRD files and the API reference;
//! `crdgen --check <crd-dir> <api-doc>` exits 1 when one differs.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let check = args.first().is_some_and(|a| a == "--check");
    if check {
        args.remove(0);
    }
    let [dir, api_doc] = args.as_slice() else {
        eprintln!("usage: crdgen [--check] <crd-dir> <api-doc>");
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(dir);
    let files = match cryopod_crds::crdgen::render() {
        Ok(files) => files,
        Err(e) => {
            eprintln!(
                "crdgen: {e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            return ExitCode::FAILURE;
        }
    };
    let mut outputs: Vec<(PathBuf, String)> = files.into_iter().map(|f| (dir.join(f.file_name), f.contents)).collect();
    outputs.push((PathBuf::from(api_doc), cryopod_crds::crdgen::render_api_reference()));
    let mut stale = false;
    for (path, contents) in outputs {
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(contents.as_str()) {
                eprintln!("crdgen: {} is stale; run `make crds`", path.display());
                stale = true;
            }
        } else if let Err(e) = std::fs::write(&path, &contents) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if stale { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
