//! TRL's two log-prob modifiers, LD-DPO's `ld_alpha` and WPO's `use_weighting`
//! (`safedpo::loss::batch_loss_parts`): against TRL's own code paths on per-token inputs
//! (`tests/fixtures/trl_ld_wpo.json`, from `scripts/make-trl-loss-fixtures.py`), against their
//! formulas written out here, their gradients against central differences, the plain objective bit
//! for bit when they are off, and how they are written and refused. Then the model's side (each
//! sequence's log-prob split at the pair's shared length, WPO's aligned sums, the split backward)
//! against the f64 reference model and on the emulated device, and training through the trainer
//! and the command line.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::reference::{cpu, pack, sequences, Reference, Seq};
use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::cuda::{CudaBackend, Device, Precision};
use safedpo::backend::prelude::*;
use safedpo::config::{RunConfig, RunOverrides};
use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};
use safedpo::loss::{
    batch_loss_parts, batch_loss_with, LossState, Objective, PairInput, PairParts, PartsOutput, SharedSplit,
};
use safedpo::model::{Decoder, DecoderConfig, DeviceBatch, ForwardExtras, HostWeights, RowSplit};
use safedpo::train::{train, CacheStatus, Task, TrainOptions};

fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    (a - b).abs() <= abs + rel * a.abs().max(b.abs())
}

fn parse(text: &str) -> Objective {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e:#}"))
}

/// A random pair with its parts: log-probs of real text split at a random shared length, a
/// reference near the policy, aligned log-probs of either sign.
fn random_pair(rng: &mut ChaCha8Rng) -> (PairInput, PairParts) {
    let (chosen_len, rejected_len) = (rng.random_range(1..40u32), rng.random_range(1..40u32));
    let shared = chosen_len.min(rejected_len);
    let split = |len: u32, rng: &mut ChaCha8Rng| SharedSplit {
        shared: shared as f64 * -rng.random_range(0.05..2.0),
        tail: (len - shared) as f64 * -rng.random_range(0.05..2.0),
    };
    let (policy_chosen, policy_rejected) = (split(chosen_len, rng), split(rejected_len, rng));
    let near = |s: SharedSplit, rng: &mut ChaCha8Rng| SharedSplit {
        shared: s.shared + rng.random_range(-2.0..2.0),
        tail: s.tail + if s.tail == 0.0 { 0.0 } else { rng.random_range(-2.0..2.0) },
    };
    let (ref_chosen, ref_rejected) = (near(policy_chosen, rng), near(policy_rejected, rng));
    let parts = PairParts {
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        aligned_chosen: chosen_len as f64 * rng.random_range(-0.8..0.5),
        aligned_rejected: rejected_len as f64 * rng.random_range(-0.8..0.5),
    };
    let total = |s: SharedSplit| s.shared + s.tail;
    let pair = PairInput {
        policy_chosen: total(policy_chosen),
        policy_rejected: total(policy_rejected),
        ref_chosen: total(ref_chosen),
        ref_rejected: total(ref_rejected),
        chosen_unsafe: rng.random_bool(0.3),
        rejected_unsafe: rng.random_bool(0.5),
        chosen_len,
        rejected_len,
    };
    (pair, parts)
}

fn random_batch(rng: &mut ChaCha8Rng) -> (Vec<PairInput>, Vec<PairParts>) {
    let n = rng.random_range(1..7);
    (0..n).map(|_| random_pair(rng)).unzip()
}

/// Every objective (with a safety margin of 1.5 where it has one) with `modifiers` appended, those
/// that take them: WPO is refused for the sorting objectives, LD-DPO alone for `sft`.
fn every_objective_with(modifiers: &str) -> Vec<Objective> {
    let mut out = Vec::new();
    for spec in Objective::ALL.iter() {
        let margin = spec.params.iter().find(|p| p.is_safety_margin()).map(|p| format!(",{}=1.5", p.name));
        if let Ok(objective) = format!("{}:{modifiers}{}", spec.name, margin.unwrap_or_default()).parse() {
            out.push(objective);
        }
    }
    for text in ["0.8*dpo+0.2*bco_pair+sft", "ipo+0.5*cpo_simpo:beta=0.4", "robust:rpo_alpha=0.7"] {
        out.push(parse(&with(text, modifiers)));
    }
    out
}

/// `text` with `items` appended to its `key=value` list.
fn with(text: &str, items: &str) -> String {
    format!("{text}{}{items}", if text.contains(':') { ',' } else { ':' })
}

// ---- the loss ---------------------------------------------------------------------------------

fn fixture() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_ld_wpo.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn numbers(value: &serde_json::Value) -> Vec<f64> {
    value.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn matrix(case: &serde_json::Value, key: &str) -> Vec<Vec<f64>> {
    case[key].as_array().unwrap().iter().map(numbers).collect()
}

#[test]
fn ld_alpha_and_use_weighting_match_trl_on_per_token_inputs() {
    let fixture = fixture();
    let mut covered = (false, false, false);
    for case in fixture["cases"].as_array().unwrap() {
        let objective = parse(case["objective"].as_str().unwrap());
        let what = format!("{objective} (TRL {})", case["trl"]);
        let lens = |key: &str| numbers(&case[key]).into_iter().map(|x| x as usize).collect::<Vec<_>>();
        let (chosen_len, rejected_len) = (lens("chosen_len"), lens("rejected_len"));
        let (policy, reference, squares) =
            (matrix(case, "per_token_logps"), matrix(case, "ref_per_token_logps"), matrix(case, "log_sum_sq_probs"));
        let want_d = matrix(case, "d_per_token_logps");
        let pairs_n = chosen_len.len();
        // TRL's rows: the chosen responses first, then the rejected ones.
        let row_len = |row: usize| if row < pairs_n { chosen_len[row] } else { rejected_len[row - pairs_n] };
        let shared_len = |row: usize| chosen_len[row % pairs_n].min(rejected_len[row % pairs_n]);
        let split = |x: &[Vec<f64>], row: usize| SharedSplit {
            shared: x[row][..shared_len(row)].iter().sum(),
            tail: x[row][shared_len(row)..row_len(row)].iter().sum(),
        };
        let aligned = |row: usize| (0..row_len(row)).map(|t| policy[row][t] - squares[row][t]).sum::<f64>();
        let total = |x: &[Vec<f64>], row: usize| x[row][..row_len(row)].iter().sum::<f64>();
        let (pairs, parts): (Vec<PairInput>, Vec<PairParts>) = (0..pairs_n)
            .map(|i| {
                let (c, r) = (i, pairs_n + i);
                let pair = PairInput {
                    policy_chosen: total(&policy, c),
                    policy_rejected: total(&policy, r),
                    ref_chosen: total(&reference, c),
                    ref_rejected: total(&reference, r),
                    chosen_len: chosen_len[i] as u32,
                    rejected_len: rejected_len[i] as u32,
                    ..Default::default()
                };
                let parts = PairParts {
                    policy_chosen: split(&policy, c),
                    policy_rejected: split(&policy, r),
                    ref_chosen: split(&reference, c),
                    ref_rejected: split(&reference, r),
                    aligned_chosen: aligned(c),
                    aligned_rejected: aligned(r),
                };
                (pair, parts)
            })
            .unzip();
        let out = batch_loss_parts(&objective, &pairs, &parts, &LossState::default());
        let (losses, chosen_rewards, rejected_rewards) =
            (numbers(&case["losses"]), numbers(&case["chosen_rewards"]), numbers(&case["rejected_rewards"]));
        for (i, o) in out.iter().enumerate() {
            assert!(
                close(o.pair.loss, losses[i], 1e-12, 1e-14),
                "{what}, pair {i}: loss {} vs {}",
                o.pair.loss,
                losses[i]
            );
            assert!(close(o.pair.reward_chosen, chosen_rewards[i], 1e-12, 1e-14), "{what}, pair {i}: chosen reward");
            assert!(
                close(o.pair.reward_rejected, rejected_rewards[i], 1e-12, 1e-14),
                "{what}, pair {i}: rejected reward"
            );
            // Each response token's gradient: its part's.
            for (row, shared, tail) in [
                (i, o.pair.d_policy_chosen, o.d_tail_chosen),
                (pairs_n + i, o.pair.d_policy_rejected, o.d_tail_rejected),
            ] {
                for (t, &want) in want_d[row][..row_len(row)].iter().enumerate() {
                    let got = if t < shared_len(row) { shared } else { tail };
                    assert!(close(got, want, 1e-10, 1e-14), "{what}, row {row}, token {t}: d {got} vs TRL {want}");
                }
            }
        }
        let (ld, weighted) = (objective.ld_alpha().is_some(), objective.uses_weighting());
        covered = (covered.0 || (ld && !weighted), covered.1 || (weighted && !ld), covered.2 || (ld && weighted));
    }
    assert_eq!(covered, (true, true, true), "cases for ld_alpha, use_weighting and both");
}

#[test]
fn without_the_modifiers_the_objective_is_the_plain_one_bit_for_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // `ld_alpha = 1` and `use_weighting = false` are no modifier.
    let plain_objectives =
        every_objective_with("ld_alpha=1").into_iter().chain(every_objective_with("use_weighting=false"));
    let plain_objectives: Vec<Objective> = plain_objectives.collect();
    assert_eq!(plain_objectives.len(), 2 * (Objective::ALL.len() + 3));
    for objective in plain_objectives {
        assert!(objective.ld_alpha().is_none() && !objective.uses_weighting(), "{objective}");
        // Written alike, with them or without.
        let text = objective.to_string();
        let off = parse(&with(&text, "ld_alpha=1,use_weighting=false"));
        assert_eq!(off, objective, "{text}");
        assert_eq!(off.to_string(), text);
        let (pairs, parts) = random_batch(&mut rng);
        let plain = batch_loss_with(&objective, &pairs, &LossState::default());
        let with_parts = batch_loss_parts(&objective, &pairs, &parts, &LossState::default());
        for (a, b) in plain.iter().zip(&with_parts) {
            let bits = |o: &safedpo::loss::PairOutput| o.metrics_row().map(f64::to_bits);
            assert_eq!(bits(a), bits(&b.pair), "{text}");
            assert_eq!(a.d_policy_chosen.to_bits(), b.pair.d_policy_chosen.to_bits(), "{text}");
            assert_eq!(a.d_policy_rejected.to_bits(), b.pair.d_policy_rejected.to_bits(), "{text}");
            assert_eq!((b.d_tail_chosen, b.d_tail_rejected), (a.d_policy_chosen, a.d_policy_rejected), "{text}");
        }
    }
}

/// The objective read on the LD-DPO log-probs, each pair's loss times WPO's weight, and the NLL
/// parts on the plain log-probs, written out for objectives with and without an NLL part.
#[test]
fn the_modifiers_are_their_formulas() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let state = LossState::default();
    for _ in 0..30 {
        let (pairs, parts) = random_batch(&mut rng);
        let alpha = rng.random_range(0.0..1.0);
        let ld_pairs: Vec<PairInput> = pairs
            .iter()
            .zip(&parts)
            .map(|(p, q)| PairInput {
                policy_chosen: q.policy_chosen.shared + alpha * q.policy_chosen.tail,
                policy_rejected: q.policy_rejected.shared + alpha * q.policy_rejected.tail,
                ref_chosen: q.ref_chosen.shared + alpha * q.ref_chosen.tail,
                ref_rejected: q.ref_rejected.shared + alpha * q.ref_rejected.tail,
                ..*p
            })
            .collect();
        let weights: Vec<f64> = pairs
            .iter()
            .zip(&parts)
            .map(|(p, q)| {
                (q.aligned_chosen / p.chosen_len as f64).exp() * (q.aligned_rejected / p.rejected_len as f64).exp()
            })
            .collect();
        for name in ["dpo", "ipo", "nca_pair", "apo_down", "simpo", "sigmoid_norm", "aot"] {
            let base = parse(&format!("{name}:safety_margin=2"));
            let ld = parse(&with(&base.to_string(), &format!("ld_alpha={alpha}")));
            let want = batch_loss_with(&base, &ld_pairs, &state);
            for (o, w) in batch_loss_parts(&ld, &pairs, &parts, &state).iter().zip(&want) {
                assert!(close(o.pair.loss, w.loss, 1e-14, 1e-14), "{ld}");
                assert!(close(o.pair.margin, w.margin, 1e-14, 1e-14), "{ld}: the rewards are LD's");
                assert!(close(o.pair.d_policy_chosen, w.d_policy_chosen, 1e-14, 1e-14), "{ld}");
                assert!(close(o.d_tail_rejected, alpha * w.d_policy_rejected, 1e-14, 1e-14), "{ld}");
            }
            if name == "aot" {
                continue; // WPO is refused for the sorting objectives
            }
            let wpo = parse(&with(&base.to_string(), "use_weighting=true"));
            let want = batch_loss_with(&base, &pairs, &state);
            for ((o, w), weight) in batch_loss_parts(&wpo, &pairs, &parts, &state).iter().zip(&want).zip(&weights) {
                assert!(close(o.pair.loss, weight * w.loss, 1e-13, 1e-14), "{wpo}");
                assert!(close(o.pair.reward_chosen, w.reward_chosen, 0.0, 0.0), "{wpo}: the rewards are unweighted");
                assert!(close(o.pair.d_policy_rejected, weight * w.d_policy_rejected, 1e-13, 1e-14), "{wpo}");
            }
        }
        // `dpo + α·sft` (RPO as TRL 1.x writes it) with both: DPO on LD's log-probs, weighted; the
        // batch's NLL of the plain chosen log-probs, weighted per row.
        let beta = 0.1;
        let objective = parse(&format!("dpo:rpo_alpha=0.7,ld_alpha={alpha},use_weighting=true"));
        let tokens: u32 = pairs.iter().map(|p| p.chosen_len).sum();
        let nll = -pairs.iter().map(|p| p.policy_chosen).sum::<f64>() / tokens as f64;
        let out = batch_loss_parts(&objective, &pairs, &parts, &state);
        for (i, o) in out.iter().enumerate() {
            let p = &ld_pairs[i];
            let z = beta * ((p.policy_chosen - p.ref_chosen) - (p.policy_rejected - p.ref_rejected));
            let want = weights[i] * (1.0 + (-z).exp()).ln() + weights[i] * 0.7 * nll;
            assert!(close(o.pair.loss, want, 1e-12, 1e-14), "{objective}: {} vs {want}", o.pair.loss);
            // The tail's gradient: α·(DPO's) plus the NLL's, Σ_i w_i · 0.7 · (−1/Σ|yc|).
            let d_dpo = -beta * weights[i] / (1.0 + z.exp());
            let d_nll = -0.7 * weights.iter().sum::<f64>() / tokens as f64;
            assert!(close(o.d_tail_chosen, alpha * d_dpo + d_nll, 1e-12, 1e-14), "{objective}");
            assert!(close(o.pair.d_policy_chosen, d_dpo + d_nll, 1e-12, 1e-14), "{objective}");
        }
    }
}

/// Every row's gradients of the parts (each token's) against central differences of the batch's
/// total loss in the shared part and the tail of each response (the plain log-prob their sum; WPO's
/// weights held, as they are detached).
fn check_part_gradients(objective: &Objective, pairs: &[PairInput], parts: &[PairParts]) {
    let state = LossState::default();
    let out: Vec<PartsOutput> = batch_loss_parts(objective, pairs, parts, &state);
    let step = 1e-5;
    for (i, o) in out.iter().enumerate() {
        let total_at = |rejected: bool, tail: bool, delta: f64| {
            let (mut pairs, mut parts) = (pairs.to_vec(), parts.to_vec());
            let (total, split) = match rejected {
                false => (&mut pairs[i].policy_chosen, &mut parts[i].policy_chosen),
                true => (&mut pairs[i].policy_rejected, &mut parts[i].policy_rejected),
            };
            *total += delta;
            if tail {
                split.tail += delta;
            } else {
                split.shared += delta;
            }
            batch_loss_parts(objective, &pairs, &parts, &state).iter().map(|o| o.pair.loss).sum::<f64>()
        };
        for (rejected, tail, got) in [
            (false, false, o.pair.d_policy_chosen),
            (false, true, o.d_tail_chosen),
            (true, false, o.pair.d_policy_rejected),
            (true, true, o.d_tail_rejected),
        ] {
            let fd = (total_at(rejected, tail, step) - total_at(rejected, tail, -step)) / (2.0 * step);
            let what = if tail { "tail" } else { "shared part" };
            let side = if rejected { "rejected" } else { "chosen" };
            assert!(close(got, fd, 1e-5, 1e-8), "{objective}, pair {i}, {side} {what}: {got} vs {fd}");
        }
    }
}

#[test]
fn every_objective_with_the_modifiers_has_the_gradient_of_its_loss() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for modifiers in ["ld_alpha=0.4", "use_weighting=true", "ld_alpha=0.7,use_weighting=true", "ld_alpha=0"] {
        for objective in every_objective_with(modifiers) {
            for _ in 0..3 {
                let (pairs, parts) = random_batch(&mut rng);
                check_part_gradients(&objective, &pairs, &parts);
            }
        }
    }
}

fn resolve(args: &[(&str, &str)]) -> anyhow::Result<Objective> {
    let mut overrides = RunOverrides::default();
    for (key, value) in args {
        overrides = overrides.set(key, value);
    }
    Ok(RunConfig::resolve(&overrides)?.objective)
}

#[test]
fn the_modifiers_are_written_as_trl_writes_them_and_refused_where_they_do_not_apply() {
    let objective = parse("safedpo:ld_alpha=0.5,use_weighting=true");
    assert_eq!((objective.ld_alpha(), objective.uses_weighting()), (Some(0.5), true));
    assert_eq!(objective.safety_margin(), 10.0);
    // Text, TOML and flags, TRL's names.
    for text in ["safedpo:ld_alpha=0.5,use_weighting=true", "0.8*dpo+0.2*bco_pair+sft:ld_alpha=0,safety_margin=2"] {
        let objective = parse(text);
        assert_eq!(parse(&objective.to_string()), objective, "{text}");
        let toml = toml::to_string(&objective).unwrap();
        assert_eq!(toml::from_str::<Objective>(&toml).unwrap(), objective, "{toml}");
    }
    let table = "name = \"sigmoid\"\nld_alpha = 0.5\nuse_weighting = true\n";
    assert_eq!(toml::from_str::<Objective>(table).unwrap(), parse("dpo:ld_alpha=0.5,use_weighting=true"));
    let flags = [("objective.name", "dpo"), ("objective.use_weighting", "true"), ("objective.ld_alpha", "0.5")];
    assert_eq!(resolve(&flags).unwrap(), parse("dpo:ld_alpha=0.5,use_weighting=true"));

    for (bad, words) in [
        ("aot:use_weighting=true", &["use_weighting", "aot", "sorts the batch"][..]),
        ("dpo+aot_unpaired:use_weighting=true", &["use_weighting", "aot_unpaired"]),
        ("dpo:ld_alpha=1.5", &["ld_alpha", "[0, 1]", "1.5"]),
        ("dpo:ld_alpha=-0.1", &["ld_alpha", "[0, 1]"]),
        ("sft:ld_alpha=0.5", &["ld_alpha", "sft", "plain"]),
        ("dpo:use_weighting=maybe", &["use_weighting"]),
    ] {
        let err = match bad.parse::<Objective>() {
            Ok(o) => panic!("{bad} must be refused, got {o:?}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(words.iter().all(|w| err.contains(w)), "{bad}: {err}");
    }
    let err = resolve(&[("objective.name", "aot"), ("objective.use_weighting", "true")]).unwrap_err().to_string();
    assert!(err.contains("objective.use_weighting"), "{err}");
}

// ---- the model ----------------------------------------------------------------------------------

fn tiny_config() -> DecoderConfig {
    DecoderConfig::gpt2(29, 48, 16, 2, 2)
}

/// Pairs of sequences (length, prompt length): more target rows than the smallest head chunk, a pair
/// with equal lengths, an empty response (its partner's tokens are all past the shared length).
const PAIR_LENS: [(usize, usize); 8] = [(20, 3), (14, 2), (9, 3), (25, 5), (1, 1), (18, 4), (30, 6), (30, 6)];

/// Each sequence's `(shared, tail, aligned)` sums in f64 from the reference model's logits.
fn reference_parts(weights: &HostWeights, seqs: &[Seq]) -> Vec<(f64, f64, f64)> {
    let v = weights.config.vocab_size;
    let (logits, _) = Reference::new(weights).forward(seqs);
    let mut offset = 0;
    let mut token_parts = Vec::new();
    for seq in seqs {
        let rows: Vec<(f64, f64)> = (0..seq.response.len())
            .map(|j| {
                let row = &logits[(offset + seq.prompt.len() - 1 + j) * v..][..v];
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + row.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
                let squares = row.iter().map(|z| (2.0 * (z - lse)).exp()).sum::<f64>().ln();
                (row[seq.response[j] as usize] - lse, squares)
            })
            .collect();
        offset += seq.tokens().len();
        token_parts.push(rows);
    }
    (0..seqs.len())
        .map(|s| {
            let shared = token_parts[s].len().min(token_parts[s ^ 1].len());
            let rows = &token_parts[s];
            let sum = |range: std::ops::Range<usize>| rows[range].iter().map(|r| r.0).sum::<f64>();
            (sum(0..shared), sum(shared..rows.len()), rows.iter().map(|(lp, sq)| lp - sq).sum())
        })
        .collect()
}

/// The extras of a forward: `(total, split, aligned)` on the host.
fn forward_parts<B: Backend>(model: &mut Decoder<B>, batch: &DeviceBatch<B>) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let b = model.backend().clone();
    let split = RowSplit::shared_length(&*b, batch).unwrap();
    let out = model.forward_with(batch, &ForwardExtras { split: Some(&split), aligned: true }).unwrap();
    let download = |x: &B::Buf| b.download(x).unwrap();
    (download(out.total), download(out.split.unwrap()), download(out.aligned.unwrap()))
}

#[test]
fn the_split_and_aligned_sums_are_the_reference_models() {
    let config = tiny_config();
    let weights = test_weights(&config, 21);
    let seqs = sequences(22, &PAIR_LENS, config.vocab_size);
    let want = reference_parts(&weights, &seqs);
    let backend = cpu();
    let batch = DeviceBatch::upload(&*backend, &pack(&seqs)).unwrap();
    for frozen in [false, true] {
        let mut model = match frozen {
            false => Decoder::from_host(backend.clone(), &weights).unwrap(),
            true => Decoder::from_host_frozen(backend.clone(), &weights).unwrap(),
        };
        let plain = model.forward(&batch).unwrap().clone();
        let (total, split, aligned) = forward_parts(&mut model, &batch);
        assert_bitwise_eq("the log-probs with the extras", &total, &plain);
        let shared: Vec<f64> = want.iter().flat_map(|w| [w.0, w.1]).collect();
        assert_close("split", &split, &shared, 1e-5, 1e-5);
        assert_close("aligned", &aligned, &want.iter().map(|w| w.2).collect::<Vec<_>>(), 1e-5, 1e-5);
        // The head in chunks of whole sequences sums the same rows: the same bits on the CPU.
        model.set_head_chunk_rows(20).unwrap();
        let chunked = forward_parts(&mut model, &batch);
        assert_eq!(chunked, (total, split, aligned), "frozen = {frozen}: the head in chunks");
    }
}

/// The split backward: a gradient per part (each token its part's) matches central differences of
/// the reference model's `Σ a_s·shared_s + b_s·tail_s`; with both parts' gradients equal it is the
/// plain backward, bit for bit; with the head in chunks, the same within summation noise.
#[test]
fn the_split_backward_is_the_gradient_of_the_parts() {
    let config = tiny_config();
    let weights = test_weights(&config, 23);
    let seqs = sequences(24, &PAIR_LENS, config.vocab_size);
    let backend = cpu();
    let batch = DeviceBatch::upload(&*backend, &pack(&seqs)).unwrap();
    let split = RowSplit::shared_length(&*backend, &batch).unwrap();
    let mut model = Decoder::from_host(backend.clone(), &weights).unwrap();
    let dsplit = uniform(&mut rng(25), 2 * seqs.len(), -1.0, 1.0);
    let grads_of = |model: &mut Decoder<CpuBackend>, dsplit: Option<&[f32]>, dseq: Option<&[f32]>| {
        model.zero_grad().unwrap();
        model.forward_with(&batch, &ForwardExtras { split: Some(&split), aligned: false }).unwrap();
        match (dsplit, dseq) {
            (Some(d), _) => model.backward_split(&batch, &split, &d.to_vec()).unwrap(),
            (_, Some(d)) => model.backward(&batch, &d.to_vec()).unwrap(),
            _ => unreachable!(),
        }
        model.grads().unwrap().into_iter().cloned().collect::<Vec<Vec<f32>>>()
    };
    let got = grads_of(&mut model, Some(&dsplit), None);

    // Central differences through the f64 reference model, at a few entries of two tensors.
    let loss = |w: &HostWeights| {
        let parts = reference_parts(w, &seqs);
        parts.iter().enumerate().map(|(s, p)| dsplit[2 * s] as f64 * p.0 + dsplit[2 * s + 1] as f64 * p.1).sum::<f64>()
    };
    let names: Vec<String> = config.parameter_shapes().into_iter().map(|(name, _)| name).collect();
    for (k, name) in names.iter().enumerate().filter(|(_, n)| *n == "wte.weight" || n.ends_with("0.mlp.c_fc.weight")) {
        let len = got[k].len();
        let idx = sample_indices(&mut rng(26 + k as u64), len, 6);
        let fd: Vec<f64> = idx
            .iter()
            .map(|&i| {
                let mut moved = weights.clone();
                let at = |moved: &mut HostWeights, x: f32| {
                    moved.tensors.get_mut(name).unwrap().1[i] = x;
                    loss(moved)
                };
                let x = weights.tensors[name].1[i];
                let (up, down) = (x + 1e-3, x - 1e-3);
                (at(&mut moved, up) - at(&mut moved, down)) / (up as f64 - down as f64)
            })
            .collect();
        let picked: Vec<f32> = idx.iter().map(|&i| got[k][i]).collect();
        let scale = fd.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert_close(&format!("d/d {name}"), &picked, &fd, 3e-3, 3e-3 * scale);
    }

    // Equal gradients in both parts: the plain backward, bit for bit.
    let dseq = uniform(&mut rng(27), seqs.len(), -1.0, 1.0);
    let both: Vec<f32> = dseq.iter().flat_map(|&d| [d, d]).collect();
    assert_eq!(grads_of(&mut model, Some(&both), None), grads_of(&mut model, None, Some(&dseq)));
    // The head in chunks.
    model.set_head_chunk_rows(20).unwrap();
    for (a, b) in grads_of(&mut model, Some(&dsplit), None).iter().zip(&got) {
        assert_close("chunked head", a, &to_f64(b), 1e-5, 1e-6);
    }
}

/// The model's extras and the split backward on the emulated device against the CPU.
#[test]
fn the_model_parts_on_the_emulated_device_match_the_cpu() {
    safedpo::backend::cuda::emu::use_test_mode();
    let config = tiny_config();
    let weights = test_weights(&config, 28);
    let seqs = sequences(29, &PAIR_LENS, config.vocab_size);
    let dsplit = uniform(&mut rng(30), 2 * seqs.len(), -1.0, 1.0);
    let emu = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::F32));
    fn run<B: Backend>(b: Arc<B>, w: &HostWeights, seqs: &[Seq], dsplit: &[f32], chunk: usize) -> Vec<Vec<f32>> {
        let batch = DeviceBatch::upload(&*b, &pack(seqs)).unwrap();
        let mut model = Decoder::from_host(b.clone(), w).unwrap();
        model.set_head_chunk_rows(chunk).unwrap();
        model.zero_grad().unwrap();
        let (total, split, aligned) = forward_parts(&mut model, &batch);
        let row_split = RowSplit::shared_length(&*b, &batch).unwrap();
        model.backward_split(&batch, &row_split, &b.upload(dsplit).unwrap()).unwrap();
        let grads: Vec<f32> = model.grads().unwrap().into_iter().flat_map(|g| b.download(g).unwrap()).collect();
        vec![total, split, aligned, grads]
    }
    for chunk in [usize::MAX, 20] {
        let want = run(cpu(), &weights, &seqs, &dsplit, chunk);
        let got = run(emu.clone(), &weights, &seqs, &dsplit, chunk);
        for (name, (g, w)) in ["total", "split", "aligned", "gradients"].iter().zip(got.iter().zip(&want)) {
            assert_close_scaled(&format!("{name} (head chunk {chunk})"), g, &to_f64(w), 1e-4);
        }
    }
}

// ---- training -----------------------------------------------------------------------------------

fn quiet() -> TrainOptions {
    TrainOptions { quiet: true, ..Default::default() }
}

/// A tiny run with a reference other than the policy's init (so that the reference's parts matter).
fn tiny_run(dir: &Path, objective: &str) -> RunConfig {
    let data = dir.join("data.jsonl");
    write_pku_jsonl(&data, &synthetic_pku_rows(40, 17)).unwrap();
    let mut c = RunConfig { out_dir: dir.join("run"), seed: 5, ..Default::default() };
    c.data.path = Some(data);
    (c.data.template, c.data.max_len, c.data.eval_fraction) = ("U: {prompt} A:".into(), 96, 0.2);
    (c.model.n_positions, c.model.n_layer, c.model.n_embd, c.model.n_head) = (96, 1, 16, 2);
    (c.batching.tokens_per_micro_batch, c.batching.grad_accum) = (900, 2);
    (c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.total_steps) = (2e-3, 0, Some(3));
    (c.intervals.eval_every, c.intervals.checkpoint_every) = (2, 0);
    c.objective = parse(objective);
    let tok = safedpo::train::run_tokenizer(&c).unwrap();
    let reference = dir.join("reference");
    Decoder::random(cpu(), c.model.random_shape(tok.vocab_size()), 41).unwrap().save(&reference).unwrap();
    c.model.reference = Some(reference);
    c
}

fn records(run: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut records = safedpo::plot::read_metrics(&run.join("metrics.jsonl")).unwrap();
    records.iter_mut().for_each(|r| drop(r.remove("tokens_per_second")));
    records
}

/// With both modifiers (and a safety margin): the cached reference (its split read from the cache)
/// and the live one train to the same bits; the emulated device trains to the CPU's weights.
#[test]
fn the_modifiers_train_alike_with_a_cached_or_live_reference_and_on_the_emulated_device() {
    let dir = tempfile::tempdir().unwrap();
    let live = tiny_run(dir.path(), "dpo:ld_alpha=0.5,use_weighting=true,safety_margin=2,rpo_alpha=0.3");
    let mut cached = live.clone();
    (cached.precompute_ref, cached.out_dir) = (true, dir.path().join("cached"));
    let a = train(cpu(), &live, Task::Preference, &quiet()).unwrap();
    let b = train(cpu(), &cached, Task::Preference, &quiet()).unwrap();
    assert_eq!(b.reference_cache, Some(CacheStatus::Miss));
    let final_file = |run: &RunConfig| std::fs::read(run.out_dir.join("final/model.safetensors")).unwrap();
    assert!(final_file(&live) == final_file(&cached), "the live and the cached reference train differently");
    assert_eq!(records(&live.out_dir), records(&cached.out_dir));
    assert!(
        a.completed && records(&live.out_dir).iter().all(|r| r.values().all(|v| v.as_f64().is_none_or(f64::is_finite)))
    );

    let mut on_emu = live.clone();
    on_emu.out_dir = dir.path().join("emu");
    let emu = Arc::new(CudaBackend::new(Device::emulated().unwrap(), Precision::F32));
    train(emu, &on_emu, Task::Preference, &quiet()).unwrap();
    let weights = |run: &RunConfig| Decoder::load(cpu(), &run.out_dir.join("final")).unwrap().to_host().unwrap();
    let (x, y) = (weights(&live), weights(&on_emu));
    for (name, (_, a)) in &x.tensors {
        let b = &y.tensors[name].1;
        let max = a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(max < 2e-4, "{name}: max |cpu − emu| = {max}");
    }
}

/// `safedpo train` with each flag, and both with a safety margin, on the CPU and the emulated device.
#[test]
fn the_modifiers_train_through_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_pku_jsonl(&data, &synthetic_pku_rows(24, 11)).unwrap();
    let runs: [(&[&str], &str); 4] = [
        (&["--objective.name", "dpo", "--objective.use_weighting", "true"], "cpu"),
        (&["--objective.name", "dpo", "--objective.ld_alpha", "0.5"], "cpu"),
        (&["--objective.name", "safedpo", "--objective.ld_alpha", "0.3", "--objective.use_weighting"], "cpu"),
        (&["--objective.name", "ipo,sft", "--objective.ld_alpha", "0.5", "--objective.use_weighting"], "emu"),
    ];
    for (k, (objective, device)) in runs.iter().enumerate() {
        let out_dir = dir.path().join(format!("run{k}"));
        let mut args = vec!["train", "--data.path", data.to_str().unwrap()];
        args.extend_from_slice(objective);
        args.extend(["--out-dir", out_dir.to_str().unwrap(), "--no-progress", "--device", device]);
        args.extend(["--data.template", "U: {prompt} A:", "--data.max_len", "96", "--model.n_positions", "96"]);
        args.extend(["--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2"]);
        args.extend(["--batching.tokens_per_micro_batch", "800", "--optimizer.total_steps", "3"]);
        let out = Command::new(env!("CARGO_BIN_EXE_safedpo")).args(&args).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "safedpo train {objective:?} failed:\n{stdout}\n{stderr}");
        let losses: Vec<f64> =
            records(&out_dir).iter().filter_map(|r| r.get("loss").and_then(|v| v.as_f64())).collect();
        assert!(losses.len() >= 3 && losses.iter().all(|l| l.is_finite()), "{objective:?}: losses {losses:?}");
        let config = RunConfig::from_toml_file(&out_dir.join("config.toml")).unwrap();
        assert!(config.validate().is_empty(), "{objective:?}");
        assert!(config.objective.ld_alpha().is_some() || config.objective.uses_weighting(), "{objective:?}");
    }
}
