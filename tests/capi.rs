//! The C ABI: `include/safedpo.h` declares exactly the functions and codes `src/capi.rs` exports,
//! and the C program `tests/c/engine.c`, compiled with the system's C compiler against the shared
//! library, runs the engine end to end (skipped, saying so, only where there is no C compiler).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Identifiers that follow `prefix` in `text` (up to the first character not in `[A-Za-z0-9_]`).
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .map(|(at, _)| {
            let rest = &text[at + prefix.len()..];
            rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

#[test]
fn the_header_declares_what_the_library_exports() {
    let (header, rust) = (read("include/safedpo.h"), read("src/capi.rs"));
    let exported: BTreeSet<String> = names_after(&rust, "extern \"C\" fn ");
    // A declaration: a name followed by `(` on a line that is not a comment.
    let declared: BTreeSet<String> = header
        .lines()
        .filter(|line| !line.trim_start().starts_with('*') && !line.trim_start().starts_with("/*"))
        .flat_map(|line| names_after(line, " safedpo_").into_iter().chain(names_after(line, "*safedpo_")))
        .filter(|name| header.contains(&format!("safedpo_{name}(")))
        .map(|name| format!("safedpo_{name}"))
        .collect();
    assert_eq!(declared, exported, "include/safedpo.h and src/capi.rs disagree on the functions");

    let codes = |text: &str, prefix: &str| -> BTreeSet<(String, String)> {
        text.lines()
            .filter_map(|line| line.trim().strip_prefix(prefix))
            .map(|rest| {
                let mut words = rest.split(|c: char| c.is_whitespace() || c == ':' || c == '=' || c == ';');
                let name = words.next().unwrap_or_default().to_string();
                let value = words.rfind(|w| w.parse::<i32>().is_ok()).unwrap_or_default().to_string();
                (name, value)
            })
            .collect()
    };
    let defined = codes(&header, "#define SAFEDPO_");
    let defined: BTreeSet<_> = defined.into_iter().filter(|(name, _)| name != "H").collect();
    assert_eq!(defined, codes(&rust, "pub const SAFEDPO_"), "the status codes differ");
}

/// The target directory's profile folder (`target/release`) this test binary runs from.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>").to_path_buf()
}

fn c_compiler() -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    Command::new(&cc).arg("--version").output().ok().filter(|o| o.status.success()).map(|_| cc)
}

#[test]
fn the_c_test_program_runs() {
    let Some(cc) = c_compiler() else {
        eprintln!("SKIPPED: no C compiler (`cc`, or $CC) on this machine; the C ABI test did not run");
        return;
    };
    // The shared library (`cargo test` builds the lib as an rlib only), in this test's profile.
    let lib_dir = profile_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--lib", "--quiet"]).current_dir(ROOT);
    if lib_dir.file_name().is_some_and(|name| name == "release") {
        build.arg("--release");
    }
    assert!(build.status().expect("running cargo build --lib").success(), "cargo build --lib failed");

    let tmp = tempfile::tempdir().expect("a temporary directory");
    let exe = tmp.path().join("engine");
    let compiled = Command::new(&cc)
        .arg(Path::new(ROOT).join("tests/c/engine.c"))
        .arg("-std=c99")
        .arg("-Wall")
        .arg("-Werror")
        .arg(format!("-I{}", Path::new(ROOT).join("include").display()))
        .arg(format!("-L{}", lib_dir.display()))
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .args(["-lsafedpo", "-lm", "-o"])
        .arg(&exe)
        .output()
        .expect("running the C compiler");
    assert!(
        compiled.status.success(),
        "compiling tests/c/engine.c failed:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );

    let run = Command::new(&exe).arg(tmp.path().join("saved")).output().expect("running the C test program");
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(
        run.status.success() && stdout.trim() == "ok",
        "tests/c/engine.c failed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
}
