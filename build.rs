//! Build script of the `tollgate` CLI package: it only tells the test harness whether Envoy is
//! installed, so that `tests/envoy.rs` is reported as ignored ("skipped"), with the reason and
//! the install command, instead of passing vacuously on a machine without Envoy. Under CI (`CI`
//! set) the test always runs, and fails if Envoy is missing.

use std::path::PathBuf;
use std::process::Command;

fn envoy_found() -> bool {
    if std::env::var_os("ENVOY_BIN").is_some_and(|path| PathBuf::from(path).is_file()) {
        return true;
    }
    if let Some(paths) = std::env::var_os("PATH")
        && std::env::split_paths(&paths).any(|dir| dir.join("envoy").is_file())
    {
        return true;
    }
    Command::new("python3")
        .args([
            "-c",
            "import envoy, os, sys; sys.exit(0 if os.path.isfile(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy')) else 1)",
        ])
        .output()
        .is_ok_and(|output| output.status.success())
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(envoy_missing)");
    println!("cargo::rerun-if-env-changed=ENVOY_BIN");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CI").is_none() && !envoy_found() {
        println!("cargo::rustc-cfg=envoy_missing");
    }
}
