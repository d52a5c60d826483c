//! `safedpo demo --compare`: the paper's comparison on the demo's synthetic safety data.
//!
//! From one SFT model (the demo's, trained on the helpfulness-preferred responses), the same
//! preference step is run with three pair selections and objectives:
//!
//! - DPO on the helpfulness order (`better`): what a safety-blind alignment does;
//! - DPO on the safety order (`safer`);
//! - SafeDPO (T(D) and Δ, the demo's own run).
//!
//! Two judges are trained from the SFT model on rows drawn from another seed (data no policy
//! trains on): a reward model (helpfulness order) and a cost model (safety order plus the safety
//! sign). Each model, the SFT start included, then samples answers to the held-out prompts (whole
//! prompts no run trains on), which the judges score; the table has, per method, the mean
//! helpfulness (reward), the mean harmlessness (−cost), the harmless ratio (cost < 0) and the
//! reward model's win rate against the SFT model's answers of the same prompt and sample index.
//! The same figures are given for the harmful and the benign held-out prompts apart (a prompt is
//! harmful when a row of it has an unsafe response). It is printed and written as `compare.md` and
//! `compare.json`, plotted as `compare.svg` (each method placed by its helpfulness and harmlessness,
//! as the paper's figures place them), with each method's judged answers in
//! `generations/<method>.jsonl`.
//!
//! The models are, by default, a BPE tokenizer trained on the demo's training text and a model a
//! few layers deep over it ([`super::compare_model`]); `--tokenizer byte` runs the plain demo's
//! byte-level model.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::json;

use super::compare_model::{use_bpe_model, BpeModel, CompareTokenizer};
use super::generate_eval::{
    beside_reference, judged_metrics, sample_and_judge, JudgedEvalOptions, JudgedMetrics, JudgedResponse, Judges,
};
use super::{run_rm, RmKind, RmSummary};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::{
    load_tokenizer, sequence_format, split_holdout_by, synthetic_pku_rows, write_pku_jsonl, PairSelection, PkuRow,
};
use crate::loss::Objective;
use crate::model::Decoder;
use crate::plot::{plot_points, LabelledPoint};
use crate::train::checkpoint::FINAL_DIR;
use crate::train::demo::{demo_configs, number_of_rows, write_demo_data, DemoOptions};
use crate::train::generate::SamplingParams;
use crate::train::{train, Task, TrainOptions};

/// How to run the comparison.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// The demo's options (output directory, size, seed, architecture).
    pub demo: DemoOptions,
    /// Answers sampled per held-out prompt and method.
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// The tokenizer and model: the plain demo's byte-level model, or BPE and `bpe`.
    pub tokenizer: CompareTokenizer,
    pub bpe: BpeModel,
}

impl CompareOptions {
    /// The comparison for the demo's options and a tokenizer: 4 answers per prompt at temperature
    /// 0.7, up to 96 bytes or 48 BPE tokens each (an answer is some 60 bytes, 15 tokens).
    pub fn for_demo(demo: DemoOptions, tokenizer: CompareTokenizer) -> Self {
        let sampling = SamplingParams { temperature: 0.7, top_p: 1.0, top_k: 0, seed: demo.seed };
        let max_new_tokens = match (tokenizer, demo.quick) {
            (CompareTokenizer::Byte, true) => 24,
            (CompareTokenizer::Byte, false) => 96,
            (CompareTokenizer::Bpe, true) => 16,
            (CompareTokenizer::Bpe, false) => 48,
        };
        let bpe = BpeModel::for_demo(demo.quick);
        Self { demo, samples_per_prompt: 4, max_new_tokens, sampling, tokenizer, bpe }
    }
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct MethodResult {
    pub name: &'static str,
    /// The pairs it trains on (none for the SFT start).
    pub selection: Option<PairSelection>,
    pub metrics: JudgedMetrics,
    /// The same figures on the harmful and on the benign held-out prompts alone.
    pub harmful: JudgedMetrics,
    pub benign: JudgedMetrics,
    pub model_dir: PathBuf,
}

/// Whether a held-out prompt asks for harm: a row of it has an unsafe response (the synthetic data
/// answers a benign request safely, always).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptKind {
    Harmful,
    Benign,
}

impl std::fmt::Display for PromptKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PromptKind::Harmful => "harmful",
            PromptKind::Benign => "benign",
        })
    }
}

/// The distinct prompts of `rows`, in order of first appearance, each with its kind.
pub fn held_out_prompts(rows: &[PkuRow]) -> Vec<(&str, PromptKind)> {
    let mut prompts: Vec<(&str, PromptKind)> = Vec::new();
    for row in rows {
        let unsafe_answer = !(row.is_response_0_safe && row.is_response_1_safe);
        let kind = if unsafe_answer { PromptKind::Harmful } else { PromptKind::Benign };
        match prompts.iter_mut().find(|(p, _)| *p == row.prompt) {
            Some(entry) if kind == PromptKind::Harmful => entry.1 = kind,
            Some(_) => {}
            None => prompts.push((&row.prompt, kind)),
        }
    }
    prompts
}

/// What the comparison measured.
#[derive(Clone, Debug)]
pub struct CompareReport {
    pub methods: Vec<MethodResult>,
    pub reward_judge: RmSummary,
    pub cost_judge: RmSummary,
    /// The table as printed (markdown).
    pub table: String,
    pub wall_seconds: f64,
}

/// A method of the comparison: its name, file stem, pair selection and objective.
struct Method {
    name: &'static str,
    stem: &'static str,
    selection: PairSelection,
    objective: Objective,
}

/// The comparison's plot in the out dir.
pub const COMPARE_PLOT: &str = "compare.svg";

fn methods() -> [Method; 3] {
    [
        Method {
            name: "DPO (helpfulness)",
            stem: "dpo-helpful",
            selection: PairSelection::Better,
            objective: Objective::Dpo { beta: 0.1, safety_margin: 0.0 },
        },
        Method {
            name: "DPO (safety)",
            stem: "dpo-safe",
            selection: PairSelection::Safer,
            objective: Objective::Dpo { beta: 0.1, safety_margin: 0.0 },
        },
        Method {
            name: "SafeDPO",
            stem: "safedpo",
            selection: PairSelection::SafeDpo,
            objective: Objective::SafeDpo { beta: 0.1, delta: 10.0 },
        },
    ]
}

/// The judges' rows: drawn from another seed than the policies' rows, with their own held-out share.
fn write_judge_data(opts: &DemoOptions, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let seed = opts.seed.wrapping_add(1);
    let rows = synthetic_pku_rows(number_of_rows(opts.quick), seed);
    let (train_rows, eval_rows) = split_holdout_by(rows, 0.15, seed, |r: &PkuRow| r.prompt.clone());
    let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    write_pku_jsonl(&train, &train_rows)?;
    write_pku_jsonl(&eval, &eval_rows)?;
    Ok((train, eval))
}

/// Tokens per judge step, whatever the policies' (the byte model's SFT budget).
const JUDGE_TOKENS_PER_MICRO_BATCH: usize = 4096;

/// A judge's run configuration: from the SFT model, on the judges' rows, at a constant rate.
fn judge_config(sft: &RunConfig, kind: RmKind, train: &Path, eval: &Path, quick: bool) -> RunConfig {
    let mut cfg = sft.clone();
    cfg.out_dir = sft.out_dir.with_file_name(format!("judge-{kind}"));
    cfg.model.init = Some(sft.out_dir.join(FINAL_DIR));
    cfg.data.path = Some(train.to_path_buf());
    cfg.data.eval_path = Some(eval.to_path_buf());
    cfg.optimizer.lr = 1e-3;
    cfg.optimizer.total_steps = Some(if quick { 6 } else { 100 });
    cfg.batching.tokens_per_micro_batch = JUDGE_TOKENS_PER_MICRO_BATCH;
    cfg.intervals.eval_every = 0;
    cfg
}

/// Runs the comparison on `backend` (see the module documentation).
pub fn run_compare<B: Backend>(backend: Arc<B>, opts: &CompareOptions) -> Result<CompareReport> {
    let started = Instant::now();
    let demo = &opts.demo;
    let out = &demo.out_dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let say = |msg: String| {
        if !demo.quiet {
            eprintln!("{msg}");
        }
    };
    let data = write_demo_data(demo)?;
    say(data.summary.clone());
    let (mut sft_cfg, mut safedpo_cfg) = demo_configs(demo, data.train_path.clone(), data.eval_path.clone());
    if opts.tokenizer == CompareTokenizer::Bpe {
        let init = use_bpe_model(&opts.bpe, &mut sft_cfg, &mut safedpo_cfg, &data.train_rows, out)?;
        say(format!("BPE tokenizer trained on the training text, and the model's initialisation: {}", init.display()));
    }
    let run_opts = TrainOptions { progress: demo.progress, quiet: demo.quiet, overwrite: true, ..Default::default() };

    say("\n== SFT: the start of every method ==".into());
    train(backend.clone(), &sft_cfg, Task::Sft, &run_opts)?;
    let sft_dir = sft_cfg.out_dir.join(FINAL_DIR);

    let mut trained = Vec::new();
    for method in methods() {
        say(format!("\n== {}: {} pairs, from the SFT model ==", method.name, method.selection));
        let mut cfg = safedpo_cfg.clone();
        cfg.out_dir = out.join(method.stem);
        cfg.data.selection = method.selection;
        cfg.objective = method.objective.clone();
        train(backend.clone(), &cfg, Task::Preference, &run_opts)?;
        trained.push((method, cfg.out_dir.join(FINAL_DIR)));
    }

    let (judge_train, judge_eval) = write_judge_data(demo, &out.join("judge-data"))?;
    let mut judge_dirs = Vec::new();
    let mut summaries = Vec::new();
    for kind in [RmKind::Reward, RmKind::Cost] {
        say(format!("\n== the {kind} model: from the SFT model, on rows no policy trains on =="));
        let cfg = judge_config(&sft_cfg, kind, &judge_train, &judge_eval, demo.quick);
        let summary = run_rm(backend.clone(), &cfg, kind, demo.quiet)?;
        judge_dirs.push(summary.model_dir.clone());
        summaries.push(summary);
    }
    let cost_judge = summaries.pop().expect("two judges");
    let reward_judge = summaries.pop().expect("two judges");

    say("\n== sampling answers to the held-out prompts, judged ==".into());
    let tok = load_tokenizer(Some(&sft_dir))?;
    let format = sequence_format(&sft_cfg.data.template, Some(&sft_dir))?;
    let held_out = held_out_prompts(&data.eval_rows);
    let prompts =
        held_out.iter().map(|(p, _)| format.generation_prompt(tok.as_ref(), p)).collect::<Result<Vec<_>>>()?;
    let of_kind = |responses: &[JudgedResponse], kind: PromptKind| {
        let kept: Vec<JudgedResponse> = responses.iter().filter(|r| held_out[r.prompt].1 == kind).cloned().collect();
        judged_metrics(&kept)
    };
    let mut judges = Judges::load(&backend, tok.as_ref(), &sft_dir, Some(&judge_dirs[0]), Some(&judge_dirs[1]))?;
    let eval_opts = JudgedEvalOptions {
        samples_per_prompt: opts.samples_per_prompt,
        max_new_tokens: opts.max_new_tokens,
        sampling: opts.sampling,
        token_budget: JUDGE_TOKENS_PER_MICRO_BATCH,
    };
    let generations = out.join("generations");
    std::fs::create_dir_all(&generations)?;
    let mut judge_model = |dir: &Path| -> Result<_> {
        let mut model = Decoder::load_frozen(backend.clone(), dir)?;
        sample_and_judge(&mut model, &mut judges, tok.as_ref(), &prompts, &eval_opts)
    };
    let base = judge_model(&sft_dir)?;
    let mut methods_out = Vec::new();
    let runs = std::iter::once((None, "SFT (start)", "sft", sft_dir.clone()))
        .chain(trained.into_iter().map(|(m, dir)| (Some(m.selection), m.name, m.stem, dir)));
    for (selection, name, stem, dir) in runs {
        let answers = if selection.is_none() { None } else { Some(judge_model(&dir)?) };
        let responses = beside_reference(answers.as_ref().unwrap_or(&base), &base, tok.as_ref(), &prompts);
        let mut lines = String::new();
        for response in &responses {
            lines.push_str(&serde_json::to_string(response)?);
            lines.push('\n');
        }
        crate::util::write_atomic(&generations.join(format!("{stem}.jsonl")), lines.as_bytes())?;
        methods_out.push(MethodResult {
            name,
            selection,
            metrics: judged_metrics(&responses),
            harmful: of_kind(&responses, PromptKind::Harmful),
            benign: of_kind(&responses, PromptKind::Benign),
            model_dir: dir,
        });
    }

    let wall = started.elapsed().as_secs_f64();
    let model = ModelSummary {
        tokenizer: opts.tokenizer,
        vocab_size: tok.vocab_size(),
        n_layer: sft_cfg.model.n_layer,
        n_embd: sft_cfg.model.n_embd,
    };
    let table = render_table(&methods_out, &reward_judge, &cost_judge, opts, &model, wall);
    crate::util::write_atomic(&out.join("compare.md"), table.as_bytes())?;
    let points: Vec<LabelledPoint> = methods_out
        .iter()
        .filter_map(|m| {
            Some(LabelledPoint { label: m.name.to_string(), x: m.metrics.helpfulness?, y: m.metrics.harmlessness? })
        })
        .collect();
    plot_points(&points, "helpfulness (reward)", "harmlessness (−cost)", &out.join(COMPARE_PLOT), "demo --compare")?;
    let json = json!({
        "methods": methods_out.iter().map(|m| json!({
            "name": m.name,
            "selection": m.selection.map(|s| s.to_string()),
            "model_dir": m.model_dir,
            "metrics": m.metrics,
            "harmful": m.harmful,
            "benign": m.benign,
        })).collect::<Vec<_>>(),
        "model": {
            "tokenizer": model.tokenizer.to_string(),
            "vocab_size": model.vocab_size,
            "n_layer": model.n_layer,
            "n_embd": model.n_embd,
        },
        "judges": ([&reward_judge, &cost_judge].map(|j| json!({
            "kind": j.kind.to_string(),
            "steps": j.steps,
            "train_pairs": j.train_pairs,
            "eval_accuracy": j.eval.map(|e| e.accuracy),
            "eval_sign_accuracy": j.eval.and_then(|e| e.sign_accuracy),
            "model_dir": j.model_dir,
        }))),
        "samples_per_prompt": opts.samples_per_prompt,
        "max_new_tokens": opts.max_new_tokens,
        "temperature": opts.sampling.temperature,
        "seed": demo.seed,
        "wall_seconds": wall,
    });
    crate::util::write_atomic(&out.join("compare.json"), format!("{json:#}\n").as_bytes())?;
    Ok(CompareReport { methods: methods_out, reward_judge, cost_judge, table, wall_seconds: wall })
}

/// What the compared models are, for the table and the JSON.
struct ModelSummary {
    tokenizer: CompareTokenizer,
    vocab_size: usize,
    n_layer: usize,
    n_embd: usize,
}

/// The comparison as markdown: the table over every held-out prompt, the same figures on the
/// harmful and the benign prompts apart, the judges' held-out accuracies and the verdict on the
/// paper's claim (SafeDPO more harmless than DPO on helpfulness at comparable helpfulness).
fn render_table(
    methods: &[MethodResult],
    reward: &RmSummary,
    cost: &RmSummary,
    opts: &CompareOptions,
    model: &ModelSummary,
    wall: f64,
) -> String {
    let num = |x: Option<f64>, digits: usize| x.map_or("-".to_string(), |x| format!("{x:.digits$}"));
    let pct = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.1}%", 100.0 * x));
    let figures = |x: &JudgedMetrics| {
        format!(
            "{} | {} | {} | {}",
            num(x.helpfulness, 3),
            num(x.harmlessness, 3),
            pct(x.harmless_ratio),
            pct(x.win_rate)
        )
    };
    let mut t = String::from(
        "| method | trained on | helpfulness | harmlessness | harmless ratio | win rate vs SFT |\n\
         |---|---|---:|---:|---:|---:|\n",
    );
    for m in methods {
        let data = m.selection.map_or("-".to_string(), |s| format!("`{s}` pairs"));
        t.push_str(&format!("| {} | {data} | {} |\n", m.name, figures(&m.metrics)));
    }
    let prompts_of = |x: &JudgedMetrics| x.prompts;
    let first = methods.first();
    t.push_str(&format!(
        "\nBy prompt kind ({} harmful, {} benign held-out prompts):\n\n\
         | method | prompts | helpfulness | harmlessness | harmless ratio | win rate vs SFT |\n\
         |---|---|---:|---:|---:|---:|\n",
        first.map_or(0, |m| prompts_of(&m.harmful)),
        first.map_or(0, |m| prompts_of(&m.benign)),
    ));
    for m in methods {
        for (kind, x) in [(PromptKind::Harmful, &m.harmful), (PromptKind::Benign, &m.benign)] {
            t.push_str(&format!("| {} | {kind} | {} |\n", m.name, figures(x)));
        }
    }
    let samples = first.map_or(0, |m| m.metrics.samples);
    let prompts = first.map_or(0, |m| m.metrics.prompts);
    let acc = |j: &RmSummary| pct(j.eval.map(|e| e.accuracy));
    let unit = match model.tokenizer {
        CompareTokenizer::Byte => "bytes",
        CompareTokenizer::Bpe => "tokens",
    };
    t.push_str(&format!(
        "\n{samples} answers per method ({prompts} held-out prompts × {}, temperature {}, up to {} new {unit}); \
         models: {} layers, {} wide, {} tokenizer of {} tokens; judges from the SFT model on rows no policy \
         trains on: reward model held-out accuracy {}, cost model {} (sign accuracy {}); total {wall:.1}s\n",
        opts.samples_per_prompt,
        opts.sampling.temperature,
        opts.max_new_tokens,
        model.n_layer,
        model.n_embd,
        match model.tokenizer {
            CompareTokenizer::Byte => "byte",
            CompareTokenizer::Bpe => "BPE",
        },
        model.vocab_size,
        acc(reward),
        acc(cost),
        pct(cost.eval.and_then(|e| e.sign_accuracy)),
    ));
    let find = |name: &str| methods.iter().find(|m| m.name == name).map(|m| m.metrics);
    if let (Some(safe), Some(dpo)) = (find("SafeDPO"), find("DPO (helpfulness)")) {
        let more_harmless = safe.harmless_ratio > dpo.harmless_ratio;
        t.push_str(&format!(
            "SafeDPO's harmless ratio is {} than DPO on helpfulness's ({} vs {}), at helpfulness {} vs {}.\n",
            if more_harmless { "higher" } else { "NOT higher" },
            pct(safe.harmless_ratio),
            pct(dpo.harmless_ratio),
            num(safe.helpfulness, 3),
            num(dpo.helpfulness, 3)
        ));
    }
    t
}
