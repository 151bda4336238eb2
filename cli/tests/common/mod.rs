//! Helpers shared by the CLI tests that run `ferrite` as an operator would.

use std::path::Path;
use std::process::{Command, Output};

/// `ferrite <args>` in `cwd`, without backtraces.
pub fn ferrite(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrite"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run ferrite")
}

/// The command's stdout; fails the test with its stderr if it failed.
pub fn ok(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}
