//! The mutation-testing scripts stay runnable (docs/TESTING.md, "Mutation testing as a habit"):
//! the kernel mutator finds mutants of every kind in the kernels and never in GPU-only code, and
//! `scripts/mutants.sh` parses its arguments and refuses a file that does not exist. The mutation
//! runs themselves take hours on two cores and are not part of the suite.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program).args(args).current_dir(root()).output().expect("the script starts");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_kernel_mutator_lists_every_kind_of_mutant() {
    let (ok, out) = run("python3", &["scripts/kernel-mutants.py", "--list"]);
    assert!(ok, "{out}");
    for kind in ["sync", "wide", "compare", "shuffle", "math", "offby1"] {
        assert!(out.lines().any(|l| l.split('\t').nth(1) == Some(kind)), "no `{kind}` mutant listed:\n{out}");
    }
    // Each kernel file the tests can reach has mutants; the selftests are not mutated.
    for file in ["attention.cu", "layernorm.cu", "logsoftmax_gather.cu", "preference_loss.cu", "common.cuh"] {
        assert!(out.contains(&format!("kernels/{file}:")), "no mutant of {file}");
    }
    assert!(!out.contains("kernels/selftest"), "the selftest kernels are mutated:\n{out}");
}

#[test]
fn the_kernel_mutator_skips_gpu_only_lines() {
    // mma.cuh holds inline PTX behind `#ifndef EMU_DEVICE`: none of those lines may be listed.
    let text = std::fs::read_to_string(root().join("kernels/mma.cuh")).unwrap();
    let (ok, out) = run("python3", &["scripts/kernel-mutants.py", "--list", "--files", "kernels/mma.cuh"]);
    assert!(ok, "{out}");
    for line in out.lines().filter(|l| l.starts_with("kernels/mma.cuh:")) {
        let n: usize = line["kernels/mma.cuh:".len()..].split('\t').next().unwrap().parse().unwrap();
        let source = text.lines().nth(n - 1).unwrap();
        assert!(!source.contains("asm"), "a GPU-only line is mutated: {line}");
    }
    let (ok, out) = run("python3", &["scripts/kernel-mutants.py", "--list", "--ops", "nonsense"]);
    assert!(!ok && out.contains("unknown mutation operator"), "{out}");
}

/// A kernel file whose op's tests go by another name (`attention_mma.cu`: `attention::`) must not be
/// run against a filter that matches no test: every mutant of it would survive unseen.
#[test]
fn the_kernel_mutator_runs_each_file_against_tests_that_exist() {
    // `--list` over every kernel file succeeds only when each one's tests are found.
    let (ok, out) = run("python3", &["scripts/kernel-mutants.py", "--list", "--files", "kernels/attention_mma.cu"]);
    assert!(ok && out.contains("kernels/attention_mma.cu:"), "{out}");
    let (ok, out) = run("python3", &["scripts/kernel-mutants.py", "--list", "--files", "kernels/selftest.cu"]);
    assert!(!ok && out.contains("no tests/ops/selftest.rs"), "{out}");
}

#[test]
fn mutants_sh_checks_its_arguments() {
    let (ok, out) = run("bash", &["scripts/mutants.sh", "--help"]);
    assert!(ok && out.contains("--budget"), "{out}");
    let (ok, out) = run("bash", &["scripts/mutants.sh", "src/no/such/file.rs"]);
    assert!(!ok && out.contains("src/no/such/file.rs: no such file"), "{out}");
    let (ok, out) = run("bash", &["scripts/mutants.sh", "--tests", "no_such_target", "src/loss/batch.rs"]);
    assert!(!ok && out.contains("no test target 'no_such_target'"), "{out}");
}
