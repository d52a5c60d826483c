//! The C ABI of [`Engine`]: an opaque `SafedpoEngine*`, models from HF directories or a random init,
//! log-probs, losses and training steps on token ids (pairs, and unpaired examples for KTO), and
//! saving. The header is
//! `include/safedpo.h` (`tests/capi.rs` holds it to the functions exported here and runs the C test
//! program `tests/c/engine.c` against the library).
//!
//! Every function returns a status code (`SAFEDPO_OK` = 0) and never unwinds into C: an error or a
//! panic becomes a code, and `safedpo_last_error()` gives its message (per thread, until the next
//! call). Outputs are written only on success. An engine may be used from one thread at a time.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};

use crate::data::{TokenizedExample, TokenizedPair};
use crate::loss::Objective;
use crate::model::DecoderConfig;
use crate::{DeviceKind, Engine, Logps};

/// Success.
pub const SAFEDPO_OK: c_int = 0;
/// The call failed; `safedpo_last_error()` says why.
pub const SAFEDPO_ERROR: c_int = 1;
/// A null pointer where one is not allowed, or a string that is not UTF-8.
pub const SAFEDPO_INVALID_ARGUMENT: c_int = 2;
/// A bug: the library panicked (the message is the panic's). The engine may be left half-updated.
pub const SAFEDPO_PANIC: c_int = 3;

/// An engine, opaque to C: made by `safedpo_engine_new`, released by `safedpo_engine_free`.
pub struct SafedpoEngine {
    engine: Engine,
}

/// One preference pair of token ids: `prompt` then each response (with its EOS, if it has one).
/// A pointer may be null only when its length is 0. The flags are 1 for an unsafe response.
#[repr(C)]
pub struct SafedpoPair {
    pub prompt: *const i32,
    pub prompt_len: usize,
    pub chosen: *const i32,
    pub chosen_len: usize,
    pub rejected: *const i32,
    pub rejected_len: usize,
    pub chosen_unsafe: c_int,
    pub rejected_unsafe: c_int,
}

/// One unpaired example of token ids (KTO's rows): the prompt, then the completion (with its EOS,
/// if it has one). A pointer may be null only when its length is 0. `desirable` is 1 for a
/// desirable completion (TRL's label), `completion_unsafe` 1 for an unsafe one.
#[repr(C)]
pub struct SafedpoExample {
    pub prompt: *const i32,
    pub prompt_len: usize,
    pub completion: *const i32,
    pub completion_len: usize,
    pub desirable: c_int,
    pub completion_unsafe: c_int,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// An argument error (code `SAFEDPO_INVALID_ARGUMENT`).
#[derive(Debug)]
struct InvalidArgument(String);

impl std::fmt::Display for InvalidArgument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidArgument {}

fn set_last_error(message: &str) {
    let message = CString::new(message.replace('\0', " ")).expect("no NUL left");
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

/// Runs `body`, turning an error or a panic into a code and the last error's message.
fn guard(body: impl FnOnce() -> Result<()>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => {
            set_last_error("");
            SAFEDPO_OK
        }
        Ok(Err(e)) => {
            set_last_error(&format!("{e:#}"));
            if e.downcast_ref::<InvalidArgument>().is_some() {
                SAFEDPO_INVALID_ARGUMENT
            } else {
                SAFEDPO_ERROR
            }
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic without a message");
            set_last_error(&format!("internal error (panic): {what}"));
            SAFEDPO_PANIC
        }
    }
}

fn invalid(message: impl Into<String>) -> anyhow::Error {
    anyhow!(InvalidArgument(message.into()))
}

/// # Safety
/// `s` is null or a NUL-terminated string.
unsafe fn text<'a>(s: *const c_char, what: &str) -> Result<&'a str> {
    if s.is_null() {
        return Err(invalid(format!("`{what}` is null")));
    }
    CStr::from_ptr(s).to_str().map_err(|_| invalid(format!("`{what}` is not UTF-8")))
}

/// # Safety
/// `engine` is null or a live engine from `safedpo_engine_new`, used by no other thread.
unsafe fn engine_mut<'a>(engine: *mut SafedpoEngine) -> Result<&'a mut Engine> {
    engine.as_mut().map(|e| &mut e.engine).ok_or_else(|| invalid("`engine` is null"))
}

/// # Safety
/// `ptr` points to `len` readable values, or `len` is 0.
unsafe fn ids<'a>(ptr: *const i32, len: usize, what: &str) -> Result<&'a [i32]> {
    match (ptr.is_null(), len) {
        (_, 0) => Ok(&[]),
        (true, _) => Err(invalid(format!("`{what}` is null but its length is {len}"))),
        (false, _) => Ok(std::slice::from_raw_parts(ptr, len)),
    }
}

/// The `n` records at `ptr` (pairs, examples), refused when null or empty.
///
/// # Safety
/// `ptr` is null or points to `n` readable records.
unsafe fn records<'a, T>(ptr: *const T, n: usize, what: &str, count: &str) -> Result<&'a [T]> {
    if ptr.is_null() || n == 0 {
        return Err(invalid(format!("`{what}` is null or `{count}` is 0")));
    }
    Ok(std::slice::from_raw_parts(ptr, n))
}

/// # Safety
/// `pairs` points to `n` pairs whose pointers satisfy [`SafedpoPair`]'s rule.
unsafe fn tokenized(pairs: *const SafedpoPair, n: usize) -> Result<Vec<TokenizedPair>> {
    records(pairs, n, "pairs", "n_pairs")?
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(TokenizedPair {
                prompt: ids(p.prompt, p.prompt_len, &format!("pairs[{i}].prompt"))?.to_vec(),
                chosen: ids(p.chosen, p.chosen_len, &format!("pairs[{i}].chosen"))?.to_vec(),
                rejected: ids(p.rejected, p.rejected_len, &format!("pairs[{i}].rejected"))?.to_vec(),
                chosen_unsafe: p.chosen_unsafe != 0,
                rejected_unsafe: p.rejected_unsafe != 0,
            })
        })
        .collect()
}

/// # Safety
/// `examples` points to `n` examples whose pointers satisfy [`SafedpoExample`]'s rule.
unsafe fn tokenized_examples(examples: *const SafedpoExample, n: usize) -> Result<Vec<TokenizedExample>> {
    records(examples, n, "examples", "n_examples")?
        .iter()
        .enumerate()
        .map(|(i, e)| {
            Ok(TokenizedExample {
                prompt: ids(e.prompt, e.prompt_len, &format!("examples[{i}].prompt"))?.to_vec(),
                completion: ids(e.completion, e.completion_len, &format!("examples[{i}].completion"))?.to_vec(),
                desirable: e.desirable != 0,
                completion_unsafe: e.completion_unsafe != 0,
            })
        })
        .collect()
}

/// The objective named by `objective` (`name:key=value,…`), or the engine's training objective
/// when it is null.
///
/// # Safety
/// `objective` is null or a NUL-terminated string.
unsafe fn objective_or_training(engine: &Engine, objective: *const c_char) -> Result<Objective> {
    match objective.is_null() {
        true => Ok(engine.objective().clone()),
        false => text(objective, "objective")?.parse(),
    }
}

/// # Safety
/// `out` is null or points to `values.len()` writable floats.
unsafe fn write_out(out: *mut f32, values: &[f32]) {
    if !out.is_null() {
        std::slice::from_raw_parts_mut(out, values.len()).copy_from_slice(values);
    }
}

/// # Safety
/// `out` is null or points to a writable float.
unsafe fn write_scalar(out: *mut f32, value: f32) {
    if let Some(out) = out.as_mut() {
        *out = value;
    }
}

/// The message of this thread's last failed call ("" after a success). Valid until the thread's
/// next call into the library; never null.
#[no_mangle]
pub extern "C" fn safedpo_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library's version, e.g. "0.1.0" (static).
#[no_mangle]
pub extern "C" fn safedpo_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Makes an engine on `device` ("auto", "cpu", "cuda", "emu"; null = "auto") in that device's
/// precision and stores it in `*out` (left unchanged on failure).
///
/// # Safety
/// `device` is null or a NUL-terminated string; `out` points to a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn safedpo_engine_new(device: *const c_char, out: *mut *mut SafedpoEngine) -> c_int {
    guard(|| {
        let out = out.as_mut().ok_or_else(|| invalid("`out` is null"))?;
        let device: DeviceKind = if device.is_null() { DeviceKind::Auto } else { text(device, "device")?.parse()? };
        let engine = Engine::new(device)?;
        *out = Box::into_raw(Box::new(SafedpoEngine { engine }));
        Ok(())
    })
}

/// Releases an engine (null is ignored).
///
/// # Safety
/// `engine` is null or an engine from `safedpo_engine_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn safedpo_engine_free(engine: *mut SafedpoEngine) {
    if !engine.is_null() {
        // A panic in a destructor must not cross into C either.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(engine))));
    }
}

/// Loads the trainable policy (and its tokenizer) from a HF model directory.
///
/// # Safety
/// `engine` is a live engine; `dir` a NUL-terminated path.
#[no_mangle]
pub unsafe extern "C" fn safedpo_load_policy(engine: *mut SafedpoEngine, dir: *const c_char) -> c_int {
    guard(|| engine_mut(engine)?.load_policy(PathBuf::from(text(dir, "dir")?)))
}

/// Loads the frozen reference from a HF model directory.
///
/// # Safety
/// `engine` is a live engine; `dir` a NUL-terminated path.
#[no_mangle]
pub unsafe extern "C" fn safedpo_load_reference(engine: *mut SafedpoEngine, dir: *const c_char) -> c_int {
    guard(|| engine_mut(engine)?.load_reference(PathBuf::from(text(dir, "dir")?)))
}

/// A randomly initialised policy from a HF `config.json` text (e.g. `{"model_type": "gpt2",
/// "vocab_size": 258, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2, "layer_norm_epsilon": 1e-5}`) and a seed.
///
/// # Safety
/// `engine` is a live engine; `config_json` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn safedpo_random_policy(
    engine: *mut SafedpoEngine,
    config_json: *const c_char,
    seed: u64,
) -> c_int {
    guard(|| {
        let engine = engine_mut(engine)?;
        let value: serde_json::Value = serde_json::from_str(text(config_json, "config_json")?)
            .map_err(|e| invalid(format!("`config_json` is not JSON: {e}")))?;
        let object = value.as_object().ok_or_else(|| invalid("`config_json` is not a JSON object"))?;
        engine.random_policy(DecoderConfig::from_hf_object(object)?, seed)
    })
}

/// Makes a frozen copy of the policy's current weights the reference.
///
/// # Safety
/// `engine` is a live engine.
#[no_mangle]
pub unsafe extern "C" fn safedpo_reference_from_policy(engine: *mut SafedpoEngine) -> c_int {
    guard(|| engine_mut(engine)?.reference_from_policy())
}

/// Sets the training objective, written `name:key=value,…` (e.g. "safedpo:beta=0.1,delta=10",
/// "dpo", "simpo:beta=2,gamma=0.5").
///
/// # Safety
/// `engine` is a live engine; `objective` a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn safedpo_set_objective(engine: *mut SafedpoEngine, objective: *const c_char) -> c_int {
    guard(|| {
        let engine = engine_mut(engine)?;
        engine.set_objective(text(objective, "objective")?.parse()?)
    })
}

/// Sequence log-probs of `n_pairs` pairs: the policy's into `policy_chosen[n_pairs]` and
/// `policy_rejected[n_pairs]`, the reference's into `reference_chosen` and `reference_rejected`
/// (either may be null; an error when they are not and no reference is loaded).
///
/// # Safety
/// `engine` is a live engine; `pairs` points to `n_pairs` pairs; each non-null output to `n_pairs`
/// writable floats.
#[no_mangle]
pub unsafe extern "C" fn safedpo_logps(
    engine: *mut SafedpoEngine,
    pairs: *const SafedpoPair,
    n_pairs: usize,
    policy_chosen: *mut f32,
    policy_rejected: *mut f32,
    reference_chosen: *mut f32,
    reference_rejected: *mut f32,
) -> c_int {
    guard(|| {
        let engine = engine_mut(engine)?;
        let logps = engine.logps_tokens(&tokenized(pairs, n_pairs)?)?;
        let wants_reference = !reference_chosen.is_null() || !reference_rejected.is_null();
        let reference = match (&logps.reference, wants_reference) {
            (None, true) => bail!("reference log-probs asked for, but no reference is loaded"),
            (reference, _) => reference.clone().unwrap_or_default(),
        };
        let write = |out: (*mut f32, *mut f32), side: &Logps| {
            write_out(out.0, &side.chosen);
            write_out(out.1, &side.rejected);
        };
        write((policy_chosen, policy_rejected), &logps.policy);
        if wants_reference {
            write((reference_chosen, reference_rejected), &reference);
        }
        Ok(())
    })
}

/// The loss of `n_pairs` pairs under `objective` (`name:key=value,…`; null = the training
/// objective): the mean into `*mean_loss`, each pair's into `per_pair_loss[n_pairs]` (may be null).
///
/// # Safety
/// `engine` is a live engine; `pairs` points to `n_pairs` pairs; `objective` is null or a
/// NUL-terminated string; `mean_loss` is null or writable; `per_pair_loss` null or `n_pairs` floats.
#[no_mangle]
pub unsafe extern "C" fn safedpo_loss(
    engine: *mut SafedpoEngine,
    pairs: *const SafedpoPair,
    n_pairs: usize,
    objective: *const c_char,
    mean_loss: *mut f32,
    per_pair_loss: *mut f32,
) -> c_int {
    guard(|| {
        let engine = engine_mut(engine)?;
        let objective = objective_or_training(engine, objective)?;
        let report = engine.loss_tokens(&tokenized(pairs, n_pairs)?, &objective)?;
        write_scalar(mean_loss, report.loss);
        write_out(per_pair_loss, &report.metrics.loss);
        Ok(())
    })
}

/// One optimizer step (AdamW, the default `[optimizer]` settings, grad-norm clip 1) on the mean
/// loss of `n_pairs` pairs under the training objective, at learning rate `lr`. Writes the loss
/// before the update and the gradient norm (either pointer may be null).
///
/// # Safety
/// `engine` is a live engine; `pairs` points to `n_pairs` pairs; `loss` and `grad_norm` are null or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn safedpo_train_step(
    engine: *mut SafedpoEngine,
    pairs: *const SafedpoPair,
    n_pairs: usize,
    lr: f32,
    loss: *mut f32,
    grad_norm: *mut f32,
) -> c_int {
    guard(|| {
        let engine = engine_mut(engine)?;
        let report = engine.train_step_tokens(&tokenized(pairs, n_pairs)?, lr).context("train step")?;
        write_scalar(loss, report.loss);
        write_scalar(grad_norm, report.grad_norm);
        Ok(())
    })
}

/// One optimizer step whose gradient is accumulated over micro-batches, run one after another: the
/// `n_pairs` pairs cut, in order, into `n_micro` micro-batches of `micro_sizes[k]` pairs (which
/// must add up to `n_pairs`); the mean loss over all of them, as [`safedpo_train_step`] on all the
/// pairs at once. Writes the loss before the update and the gradient norm (either may be null).
///
/// # Safety
/// As [`safedpo_train_step`]; `micro_sizes` points to `n_micro` sizes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn safedpo_accumulated_step(
    engine: *mut SafedpoEngine,
    pairs: *const SafedpoPair,
    n_pairs: usize,
    micro_sizes: *const usize,
    n_micro: usize,
    lr: f32,
    loss: *mut f32,
    grad_norm: *mut f32,
) -> c_int {
    guard(|| {
        let engine = engine_mut(engine)?;
        let all = tokenized(pairs, n_pairs)?;
        if micro_sizes.is_null() || n_micro == 0 {
            return Err(invalid("`micro_sizes` is null or `n_micro` is 0"));
        }
        let sizes = std::slice::from_raw_parts(micro_sizes, n_micro);
        if sizes.iter().sum::<usize>() != n_pairs {
            return Err(invalid(format!("the micro-batch sizes {sizes:?} do not add up to n_pairs = {n_pairs}")));
        }
        let mut micro = Vec::with_capacity(n_micro);
        let mut rest = all.as_slice();
        for &size in sizes {
            let (head, tail) = rest.split_at(size);
            micro.push(head);
            rest = tail;
        }
        let report = engine.accumulated_step_tokens(&micro, lr).context("accumulated step")?;
        write_scalar(loss, report.loss);
        write_scalar(grad_norm, report.grad_norm);
        Ok(())
    })
}

/// The loss of `n_examples` unpaired examples, one batch, under `objective` (`kto:…` or
/// `apo_zero_unpaired:…`; null = the training objective): the mean into `*mean_loss`, each
/// example's (weighted by λ_D or λ_U) into `per_example_loss[n_examples]`, KTO's KL estimate of the
/// batch into `*kl` (each may be null).
///
/// # Safety
/// `engine` is a live engine; `examples` points to `n_examples` examples; `objective` is null or a
/// NUL-terminated string; `mean_loss` and `kl` are null or writable; `per_example_loss` null or
/// `n_examples` floats.
#[no_mangle]
pub unsafe extern "C" fn safedpo_unpaired_loss(
    engine: *mut SafedpoEngine,
    examples: *const SafedpoExample,
    n_examples: usize,
    objective: *const c_char,
    mean_loss: *mut f32,
    per_example_loss: *mut f32,
    kl: *mut f32,
) -> c_int {
    guard(|| {
        let engine = engine_mut(engine)?;
        let objective = objective_or_training(engine, objective)?;
        let report = engine.unpaired_loss_tokens(&tokenized_examples(examples, n_examples)?, &objective)?;
        write_scalar(mean_loss, report.loss);
        write_out(per_example_loss, &report.metrics.loss);
        write_scalar(kl, report.kl);
        Ok(())
    })
}

/// One optimizer step (AdamW, grad-norm clip 1) on the mean loss of `n_examples` unpaired
/// examples, one batch, under the training objective (which must be `kto` or `apo_zero_unpaired`),
/// at learning rate `lr`. Writes the loss before the update, the gradient norm and KTO's KL
/// estimate (each may be null).
///
/// # Safety
/// `engine` is a live engine; `examples` points to `n_examples` examples; `loss`, `grad_norm` and
/// `kl` are null or writable.
#[no_mangle]
pub unsafe extern "C" fn safedpo_unpaired_train_step(
    engine: *mut SafedpoEngine,
    examples: *const SafedpoExample,
    n_examples: usize,
    lr: f32,
    loss: *mut f32,
    grad_norm: *mut f32,
    kl: *mut f32,
) -> c_int {
    guard(|| {
        let engine = engine_mut(engine)?;
        let examples = tokenized_examples(examples, n_examples)?;
        let report = engine.unpaired_train_step_tokens(&[&examples], lr).context("unpaired train step")?;
        write_scalar(loss, report.loss);
        write_scalar(grad_norm, report.grad_norm);
        write_scalar(kl, report.kl);
        Ok(())
    })
}

/// Writes the policy as a HF model directory (with the optimizer state once it has trained).
///
/// # Safety
/// `engine` is a live engine; `dir` a NUL-terminated path.
#[no_mangle]
pub unsafe extern "C" fn safedpo_save(engine: *mut SafedpoEngine, dir: *const c_char) -> c_int {
    guard(|| {
        let engine = engine_mut(engine)?;
        engine.save(PathBuf::from(text(dir, "dir")?))
    })
}
