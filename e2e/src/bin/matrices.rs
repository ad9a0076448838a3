//! Renders the matrices from the rows the end-to-end tests recorded:
//! `OUT_DIR/compatibility.md` and `OUT_DIR/reliability.md`.
//! usage: matrices TESTBED_DIR OUT_DIR

use std::path::Path;
use std::process::ExitCode;

use cryopod_e2e::{compat, matrix, reliability};

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let [testbed, out] = args.as_slice() else {
        eprintln!("usage: matrices TESTBED_DIR OUT_DIR");
        return ExitCode::from(2);
    };
    let (testbed, out) = (Path::new(testbed), Path::new(out));
    let rendered = matrix::load(testbed, compat::KIND)
        .map(|rows| ("compatibility.md", compat::render(&rows)))
        .and_then(|first| {
            matrix::load(testbed, reliability::KIND).map(|rows| [first, ("reliability.md", reliability::render(&rows))])
        });
    let result = rendered.and_then(|docs| {
        docs.into_iter().try_for_each(|(name, text)| {
            std::fs::write(out.join(name), text).map_err(|e| format!("cannot write {}: {e}", out.join(name).display()))
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
