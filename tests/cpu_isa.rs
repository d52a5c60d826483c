//! The CPU backend's instruction-set paths: `SAFEDPO_CPU_ISA` caps the row kernels (portable, AVX2,
//! AVX-512) and `bench` reports the path each kernel family took with the CPU's flags. Every level
//! of the row kernels gives the same bits, so a benchmark's loss is the same at each.

use std::process::Command;

fn bench_json(isa: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_safedpo"));
    cmd.args(["bench", "--device", "cpu", "--steps", "2", "--warmup", "0", "--json", "--pairs", "2"]);
    cmd.args(["--seq-len", "16", "--model.n_positions", "16", "--model.n_layer", "1", "--model.n_embd", "16"]);
    cmd.args(["--model.n_head", "2", "--model.vocab_size", "64"]);
    match isa {
        Some(isa) => cmd.env("SAFEDPO_CPU_ISA", isa),
        None => cmd.env_remove("SAFEDPO_CPU_ISA"),
    };
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn widest_row_level() -> &'static str {
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl")
    {
        "avx512"
    } else if std::is_x86_feature_detected!("avx2") {
        "avx2"
    } else {
        "portable"
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn the_row_kernel_level_is_capped_by_the_environment_and_gives_the_same_bits() {
    let widest = bench_json(None);
    let isa = &widest["cpu_isa"];
    assert_eq!(isa["row kernels"], widest_row_level(), "{isa}");
    assert!(["avx512f", "avx2+fma", "scalar"].contains(&isa["gemm"].as_str().unwrap()), "{isa}");
    if std::is_x86_feature_detected!("avx2") {
        assert!(isa["cpu flags"].as_str().unwrap().split(' ').any(|f| f == "avx2"), "{isa}");
    }
    for cap in ["portable", "avx2"] {
        let capped = bench_json(Some(cap));
        let want = if cap == "avx2" && widest_row_level() == "portable" { "portable" } else { cap };
        assert_eq!(capped["cpu_isa"]["row kernels"], want);
        // The same matrix products and bit-identical row kernels: the same loss to the last bit.
        assert_eq!(capped["final_loss"], widest["final_loss"], "row kernels at {cap}");
    }
    // An unknown value is ignored with a warning, not an error.
    let out = Command::new(env!("CARGO_BIN_EXE_safedpo"))
        .args(["bench", "--device", "cpu", "--steps", "1", "--warmup", "0", "--pairs", "1", "--seq-len", "8"])
        .args(["--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2", "--model.vocab_size", "32"])
        .env("SAFEDPO_CPU_ISA", "avx9000")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SAFEDPO_CPU_ISA=avx9000"));
}
