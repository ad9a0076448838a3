//! Writes an OCI image archive from host files, for `ctr images import`.
//!
//! oci-image --name REF --out FILE [--file HOST:IMAGE]... [--symlink LINK=TARGET]...
//!           [--dir PATH]... [--entrypoint ARG]... [--cmd ARG]... [--env K=V]...

use std::process::ExitCode;

use cryopod_e2e::oci::{ImageSpec, write_archive};

fn main() -> ExitCode {
    let mut spec = ImageSpec::default();
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            eprintln!("oci-image: {flag} needs a value");
            return ExitCode::from(2);
        };
        match flag.as_str() {
            "--name" => spec.name = value,
            "--out" => out = Some(std::path::PathBuf::from(value)),
            "--file" => match value.split_once(':') {
                Some((host, image)) => spec.files.push((host.into(), image.into())),
                None => {
                    eprintln!("oci-image: --file wants HOST:IMAGE, got {value}");
                    return ExitCode::from(2);
                }
            },
            "--symlink" => match value.split_once('=') {
                Some((link, target)) => spec.symlinks.push((link.into(), target.into())),
                None => {
                    eprintln!("oci-image: --symlink wants LINK=TARGET, got {value}");
                    return ExitCode::from(2);
                }
            },
            "--dir" => spec.dirs.push(value),
            "--entrypoint" => spec.entrypoint.push(value),
            "--cmd" => spec.cmd.push(value),
            "--env" => spec.env.push(value),
            other => {
                eprintln!("oci-image: unknown flag {other}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(out), false) = (out, spec.name.is_empty()) else {
        eprintln!("oci-image: --name and --out are required");
        return ExitCode::from(2);
    };
    match write_archive(&spec, &out) {
        Ok(digest) => {
            println!("{digest}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            eprintln!("oci-image: {e}{cause}");
            ExitCode::FAILURE
        }
    }
}
