//! The fuzz crate (`fuzz/`) sits outside the workspace with a lock file of
//! its own, and depends on the leaf and the proto crates, so every new
//! dependency of theirs changes `fuzz/Cargo.lock` too. CI's fuzz step
//! fetches with `--locked` and fails at once when that lock is stale; this
//! test says so in the test command, where a change is checked before it
//! is submitted.
//!
//! Skipped, saying why, when cargo cannot read the fuzz crate's
//! dependencies for another reason (no registry reachable, say).

use std::process::Command;

#[test]
fn the_fuzz_crates_lock_file_matches_what_it_depends_on() {
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/Cargo.toml");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--manifest-path", manifest])
        .env_remove("RUSTC_BOOTSTRAP")
        .output()
        .expect("cargo runs");
    if out.status.success() {
        return;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("cannot update the lock file"),
        "fuzz/Cargo.lock does not match the crates it depends on: update it with \
         `cd fuzz && cargo metadata --format-version 1 > /dev/null` and commit it.\n{stderr}"
    );
    eprintln!("SKIPPED: cargo cannot read the fuzz crate's dependencies: {stderr}");
}
