//! Runs every program in `examples/` on its tiny random model (few steps) and checks that it
//! succeeds: the examples are documentation, and documentation that does not run is wrong.
//! The example binaries are built first (`cargo build --examples`, a no-op when `cargo test` has
//! built them), in this test's own profile.

use std::path::PathBuf;
use std::process::Command;

/// The target directory's profile folder (`target/release`) this test binary runs from.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>").to_path_buf()
}

fn build_examples() {
    let release = profile_dir().file_name().is_some_and(|name| name == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--examples", "--quiet"]).current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        build.arg("--release");
    }
    let status = build.status().expect("running cargo build --examples");
    assert!(status.success(), "cargo build --examples failed");
}

fn run_example(name: &str, args: &[&str]) -> String {
    let path = profile_dir().join("examples").join(name);
    let out = Command::new(&path).args(args).output().unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "example {name} failed ({})\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn every_example_runs() {
    build_examples();
    let logps = run_example("logps", &[]);
    assert!(logps.contains("policy    log p(chosen)"), "{logps}");
    let step = run_example("safedpo_step", &["cpu"]);
    assert!(step.contains("SafeDPO loss"), "{step}");
    let custom = run_example("custom_loop", &["10"]);
    assert!(custom.contains("step  10:"), "{custom}");
    let bench = run_example("kernel_bench", &["2"]);
    assert!(bench.contains("GFLOP/s"), "{bench}");
}
