//! The `safedpo` command line.
//!
//! ```text
//! safedpo train    --config run.toml [settings]   preference training (SafeDPO, DPO, IPO, …)
//! safedpo sft      --config run.toml [settings]   supervised fine-tuning on the safe responses
//! safedpo logps    --model DIR --data.path FILE --out FILE   per-pair policy and reference log-probs
//! safedpo eval     --model DIR --data.path FILE   preference metrics of a model on a dataset (JSON)
//! safedpo generate --model DIR --prompt TEXT      greedy or sampled continuation
//! safedpo rm       --rm.kind reward|cost [settings]   a reward or cost model (a HF sequence classifier)
//! safedpo bench    [settings] [--steps N …]      timed training steps on synthetic data
//! safedpo demo     [--quick]                      the whole method on synthetic data in minutes
//! safedpo demo     --data-only [--rows N]         only the demo's synthetic PKU-SafeRLHF data
//! safedpo demo     --compare [--quick]            the paper's comparison: DPO vs SafeDPO, judged
//! safedpo plot     RUN_DIR... [--out FILE]        training curves of runs overlaid, as an SVG
//! safedpo launch   --gpus N -- train [settings]   N data-parallel ranks on this node (as torchrun)
//! ```
//!
//! `train` and `sft` run as one rank of a data-parallel group when the environment describes one
//! (`WORLD_SIZE` > 1, from torchrun, Slurm or `safedpo launch`; `safedpo::dist`).
//!
//! Settings (`safedpo::config`) come from the command's defaults, then the `--config` TOML file, then
//! the flags, each named by its TOML path (`--optimizer.lr 1e-6`, `--set optimizer.lr=1e-6`); a flag
//! wins. Each command has flags for only the settings it uses (`eval` has no `--optimizer.lr`); a
//! `--config` file may hold any (one file serves `train` and `eval`). Errors go to stderr with
//! exit code 1.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use safedpo::backend::prelude::*;
use safedpo::backend::DeviceKind;
use safedpo::config::model_dir::{adopt_init_settings, max_len_caps, print_settings_notes};
use safedpo::config::{
    check_init_shape, Evaluation, Generation, ModelDirSettings, Resolved, RunConfig, SettingsArgs, Training,
};
use safedpo::data::{check_same_tokenizer, load_tokenizer, sequence_format, tokenizer_source};
use safedpo::loss::LossState;
use safedpo::model::checkpoint::LoadOptions;
use safedpo::model::Decoder;
use safedpo::train::demo::{run_demo, DemoOptions};
use safedpo::train::generate::{generate, SamplingParams};
use safedpo::train::metrics::Record;
use safedpo::train::refcache::{sequence_logp_parts, sequence_logps, ReferenceLogps};
use safedpo::train::{self, evaluate_pairs_with, load_inference_weights, prepare_data, Resume, Task, TrainOptions};
use safedpo::with_backend;

#[derive(Parser)]
#[command(name = "safedpo", version, about = "SafeDPO and the DPO family on GPT-2 and Llama-family models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Preference training (the objective from [objective]: safedpo by default).
    Train(TrainArgs),
    /// Supervised fine-tuning on prompt + chosen response of the pairs whose chosen response is safe;
    /// writes a HF model directory (out_dir/final) to use as reference and initial policy.
    Sft(TrainArgs),
    /// Writes one JSON line per pair: token ids, prompt length, policy and reference log-probs.
    Logps(LogpsArgs),
    /// Evaluates a model on a dataset against a reference; prints the metrics as JSON.
    Eval(EvalArgs),
    /// Continues a prompt: greedy, or temperature + top-p sampling.
    Generate(GenerateArgs),
    /// Trains a judge on the preference data: a reward model (`--rm.kind reward`, Bradley–Terry on
    /// the helpfulness order) or a cost model (`cost`: safe-rlhf's, on the safety order with the
    /// responses' safety labels); writes a HF sequence classifier to out_dir/final.
    Rm(RmArgs),
    /// SFT then SafeDPO of a tiny model on synthetic safety data, with a before/after summary.
    Demo(DemoArgs),
    /// Times training steps on synthetic data: tokens/s, step time, MFU, peak memory, phases.
    Bench(safedpo::bench::BenchArgs),
    /// Overlays the training curves of run directories (their metrics.jsonl) in one SVG: a panel per
    /// metric against the optimizer step, a colour per run.
    Plot(PlotArgs),
    /// Merges a LoRA adapter (PEFT's adapter_config.json + adapter_model.safetensors) into its base
    /// model and writes the merged HF model directory (PEFT's merge_and_unload).
    Merge(MergeArgs),
    /// Runs N copies of a command on this node as the ranks of a data-parallel group (as `torchrun
    /// --nproc-per-node N`): `safedpo launch --gpus 2 -- train --config run.toml`. Each rank's output
    /// lines are prefixed with `[rank R]`; when one fails, the others are stopped.
    Launch(LaunchArgs),
    /// Checks the group the environment describes (under `launch`, torchrun or srun): joins it (the
    /// TCP rendezvous, then NCCL on cuda), sums a value over the ranks and prints what it found.
    DistCheck(DistCheckArgs),
}

#[derive(clap::Args)]
struct LaunchArgs {
    /// Ranks to start: one per GPU on `cuda`, processes sharing the machine on `cpu` and `emu`.
    #[arg(long, value_name = "N")]
    gpus: usize,
    /// Passed on to the command as its `--device`.
    #[arg(long, value_enum)]
    device: Option<DeviceKind>,
    /// The command each rank runs, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<std::ffi::OsString>,
}

#[derive(clap::Args)]
struct DistCheckArgs {
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceKind,
    /// Make this rank exit with an error once it joined (to test how a job ends).
    #[arg(long, hide = true, value_name = "RANK")]
    fail_rank: Option<usize>,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// The base model's HF directory.
    #[arg(long, value_name = "DIR")]
    base: PathBuf,
    /// The adapter's directory (PEFT's format, as training with [lora] writes in each checkpoint).
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// Where the merged model is written.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct PlotArgs {
    /// Run directories (each with a metrics.jsonl), named in the legend as given.
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// The SVG file written.
    #[arg(long, default_value = "plot.svg", value_name = "FILE")]
    out: PathBuf,
    /// A metric to draw (repeatable), e.g. `eval/loss`; by default loss, eval loss, reward margins
    /// and accuracies, safe-preferred accuracy and learning rate, those the runs have.
    #[arg(long = "metric", value_name = "NAME")]
    metrics: Vec<String>,
}

#[derive(clap::Args)]
struct TrainArgs {
    #[command(flatten)]
    run: SettingsArgs<Training>,
    /// Continue from a checkpoint directory, a run directory (its `latest`), or `auto`, the default
    /// (this out_dir's latest checkpoint if there is one, else a fresh start). Without it (or
    /// --overwrite) an out_dir that holds a run is refused.
    #[arg(long, value_name = "DIR|auto", num_args = 0..=1, default_missing_value = "auto")]
    resume: Option<Resume>,
    /// Start over in an out_dir that holds a run, deleting its checkpoints and metrics.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(clap::Args)]
struct ModelDataArgs {
    /// The policy: a HF model directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Which pairs of the data: all, or the train / eval side of the run's holdout split.
    #[arg(long, value_enum, default_value = "all")]
    split: Split,
    /// Load models whose weights hold NaN or infinite values (otherwise an error).
    #[arg(long)]
    allow_nonfinite: bool,
    #[command(flatten)]
    run: SettingsArgs<Evaluation>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Split {
    All,
    Train,
    Eval,
}

#[derive(clap::Args)]
struct LogpsArgs {
    #[command(flatten)]
    common: ModelDataArgs,
    /// Output JSONL file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[command(flatten)]
    common: ModelDataArgs,
    /// Judge what the model says instead: sample --samples responses per prompt of the data from the
    /// model and from the reference, score them with --judge.reward and --judge.cost, and write
    /// metrics.json (helpfulness, harmlessness = −cost, harmless ratio, win rate against the
    /// reference) and generations.jsonl to --out.
    #[arg(long)]
    generate: bool,
    /// A reward model (a HF sequence classifier, e.g. from `safedpo rm --rm.kind reward`).
    #[arg(long = "judge.reward", value_name = "DIR", requires = "generate")]
    judge_reward: Option<PathBuf>,
    /// A cost model (`safedpo rm --rm.kind cost`): cost < 0 reads as harmless.
    #[arg(long = "judge.cost", value_name = "DIR", requires = "generate")]
    judge_cost: Option<PathBuf>,
    /// Responses sampled per prompt (sample k uses seed + k).
    #[arg(long, default_value_t = 1, requires = "generate")]
    samples: usize,
    #[arg(long, default_value_t = 64, requires = "generate")]
    max_new_tokens: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 1.0, requires = "generate")]
    temperature: f32,
    #[arg(long, default_value_t = 1.0, requires = "generate")]
    top_p: f32,
    /// 0: no top-k cut.
    #[arg(long, default_value_t = 0, requires = "generate")]
    top_k: usize,
    /// Where --generate writes its files.
    #[arg(long, value_name = "DIR", default_value = "runs/eval-generate", requires = "generate")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A HF model directory.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Sample among the K most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Feed the prompt as is (after the tokenizer's BOS, if it has one). Otherwise `--data.template`
    /// wraps it (`chat`: the model's chat template); when that is not set, the template the model was
    /// trained with (its `run_config.toml`), else the PKU-SafeRLHF conversation format.
    #[arg(long)]
    raw: bool,
    /// Load a model whose weights hold NaN or infinite values (otherwise an error).
    #[arg(long)]
    allow_nonfinite: bool,
    /// `seed` seeds the sampling.
    #[command(flatten)]
    settings: SettingsArgs<Generation>,
}

#[derive(clap::Args)]
struct RmArgs {
    #[command(flatten)]
    /// `--rm.kind reward | cost` (`[rm]` `kind` in a config file) among them.
    run: SettingsArgs<Training>,
    /// No per-step lines on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Where the runs, the data and the plot go.
    #[arg(long, alias = "out_dir", default_value = "runs/demo", value_name = "DIR")]
    out_dir: PathBuf,
    /// A much smaller run (smoke test).
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceKind,
    /// Model family: gpt2, or llama / mistral / qwen2 (a tiny model of that architecture).
    #[arg(long, default_value = "gpt2", value_name = "FAMILY")]
    arch: safedpo::model::Family,
    /// No progress bars or status lines (the summary table is still printed).
    #[arg(long)]
    quiet: bool,
    /// The paper's comparison instead: DPO on helpfulness, DPO on safety and SafeDPO from the same
    /// SFT model, judged by a reward and a cost model on held-out prompts (compare.md, compare.json).
    #[arg(long, conflicts_with = "data_only")]
    compare: bool,
    /// The comparison's tokenizer: bpe (the default: one trained on the demo's text, with a model a
    /// few layers deep) or byte (the plain demo's byte-level model).
    #[arg(long, value_name = "byte|bpe", requires = "compare")]
    tokenizer: Option<safedpo::judge::compare_model::CompareTokenizer>,
    /// Only write the demo's synthetic PKU-SafeRLHF data to OUT_DIR/data.jsonl and stop (data for a
    /// `train` run of another shape; scripts/gpu-check.sh uses it).
    #[arg(long)]
    data_only: bool,
    /// Rows of synthetic data written by --data-only.
    #[arg(long, default_value_t = 2000, requires = "data_only")]
    rows: usize,
}

fn main() -> ExitCode {
    // Output piped into `head` and closed early ends the process quietly, as for any Unix tool,
    // instead of `println!` panicking on the broken pipe (Rust ignores SIGPIPE by default).
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition at startup, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A rank whose group broke because of another rank says so (`safedpo launch` names the
            // rank that failed first).
            if safedpo::dist::is_group_broken(&e) {
                ExitCode::from(safedpo::dist::launch::FOLLOWER_EXIT_CODE)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => run_training(args, Task::Preference),
        Command::Sft(args) => run_training(args, Task::Sft),
        Command::Logps(args) => run_logps(args),
        Command::Eval(args) => run_eval(args),
        Command::Generate(args) => run_generate(args),
        Command::Rm(args) => run_rm(args),
        Command::Bench(args) => {
            let cfg = args.to_config()?;
            let device: DeviceKind = cfg.device.parse()?;
            if let Some(threads) = args.threads {
                rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
            }
            let report = with_backend!(device, |backend| safedpo::bench::run_bench(backend, &cfg)?);
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{report}");
            }
            Ok(())
        }
        Command::Merge(args) => {
            safedpo::model::peft::merge_dirs(&args.base, &args.adapter, &args.out)?;
            println!("{}", args.out.display());
            Ok(())
        }
        Command::Plot(args) => {
            let runs = args.runs.iter().map(|dir| safedpo::plot::Run::load(dir)).collect::<Result<Vec<_>>>()?;
            safedpo::plot::plot_runs(&runs, &args.metrics, &args.out)?;
            println!("{}", args.out.display());
            Ok(())
        }
        Command::Launch(args) => safedpo::dist::launch::launch(&safedpo::dist::launch::LaunchOptions {
            ranks: args.gpus,
            device: args.device,
            program: std::env::current_exe().context("finding this program to launch it")?,
            args: args.command,
        }),
        Command::DistCheck(args) => safedpo::dist::group::dist_check(args.device, args.fail_rank),
        Command::Demo(args) if args.data_only => write_demo_data(&args),
        Command::Demo(args) => {
            let opts = DemoOptions {
                out_dir: args.out_dir,
                quick: args.quick,
                seed: args.seed,
                quiet: args.quiet,
                progress: !args.quiet,
                arch: args.arch,
            };
            if args.compare {
                let opts = safedpo::judge::compare::CompareOptions::for_demo(opts, args.tokenizer.unwrap_or_default());
                let report =
                    with_backend!(args.device, |backend| safedpo::judge::compare::run_compare(backend, &opts))?;
                println!("\n{}", report.table);
                return Ok(());
            }
            let report = with_backend!(args.device, |backend| run_demo(backend, &opts))?;
            println!("\n{}", report.table);
            Ok(())
        }
    }
}

/// `demo --data-only`: the demo's synthetic rows as PKU-SafeRLHF JSONL, read back through the loader
/// (so the file is known to load) with the T(D) counts on stderr; the file's path on stdout.
fn write_demo_data(args: &DemoArgs) -> Result<()> {
    use safedpo::data::{load_pairs, synthetic_pku_rows, write_pku_jsonl, DataFormat, PairSelection};
    if args.rows == 0 {
        bail!("--rows must be at least 1");
    }
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("creating {}", args.out_dir.display()))?;
    let path = args.out_dir.join("data.jsonl");
    write_pku_jsonl(&path, &synthetic_pku_rows(args.rows, args.seed))?;
    let (_, report) = load_pairs(&path, DataFormat::PkuSafeRlhf, PairSelection::SafeDpo, false)?;
    if !args.quiet {
        eprintln!(
            "synthetic safety data: {} PKU-SafeRLHF rows; T(D): {} kept, {} swapped, {} dropped",
            args.rows, report.kept, report.swapped, report.dropped
        );
    }
    println!("{}", path.display());
    Ok(())
}

fn run_training(args: TrainArgs, task: Task) -> Result<()> {
    let cfg = args.run.resolve_adjusted(adopt_init_settings)?.config;
    cfg.require_data()?;
    let opts = TrainOptions {
        resume: args.resume,
        overwrite: args.overwrite,
        progress: !args.no_progress,
        ..Default::default()
    };
    use safedpo::dist::{join_group, RankEnv, RankGroup};
    use safedpo::train::data_parallel::train_in_group;
    let group_env = RankEnv::from_env()?.filter(|env| env.world_size > 1);
    let summary = match &group_env {
        None => with_backend!(cfg.device, |backend| train::train(backend, &cfg, task, &opts))?,
        Some(env) => {
            // One progress bar and one set of status lines: rank 0's.
            let opts = TrainOptions { progress: opts.progress && env.rank == 0, quiet: env.rank != 0, ..opts };
            match join_group(cfg.device, env)? {
                RankGroup::Cpu(backend, group) => train_in_group(backend, &cfg, task, &opts, group)?,
                RankGroup::Cuda(backend, group) => train_in_group(backend, &cfg, task, &opts, group)?,
            }
        }
    };
    // The run's summary once, from rank 0 (the others' would repeat it without the evaluation).
    if group_env.is_none_or(|env| env.rank == 0) {
        println!("{}", summary.to_json());
    }
    Ok(())
}

fn run_rm(args: RmArgs) -> Result<()> {
    let cfg = args.run.resolve_adjusted(adopt_init_settings)?.config;
    let kind: safedpo::judge::RmKind = cfg.rm.kind.parse()?;
    cfg.require_data()?;
    let s = with_backend!(cfg.device, |backend| safedpo::judge::run_rm(backend, &cfg, kind, args.quiet))?;
    let eval = s
        .eval
        .map(|e| json!({"pairs": e.pairs, "loss": e.loss, "accuracy": e.accuracy, "sign_accuracy": e.sign_accuracy}));
    let out = json!({"kind": s.kind.to_string(), "model": s.model_dir, "steps": s.steps, "train_pairs": s.train_pairs,
        "final_loss": s.final_loss, "eval": eval});
    println!("{out}");
    Ok(())
}

/// The run configuration of `logps` / `eval`: the policy is `--model`; the reference is
/// `model.reference`, else `model.init` (the policy a run started from), else the policy itself. The
/// data settings the flags and the file leave unset come from the policy's directory (the template it
/// was trained with; `data.max_len`: the models' context, at most the length it was trained with).
fn model_data_config(args: &ModelDataArgs) -> Result<(RunConfig, PathBuf)> {
    let mut reference = args.model.clone();
    let adopt = |settings: &mut Resolved| -> Result<()> {
        let cfg = &settings.config;
        reference = cfg.model.reference.clone().or(cfg.model.init.clone()).unwrap_or_else(|| args.model.clone());
        let policy =
            ModelDirSettings::read(&args.model).with_context(|| format!("--model {}", args.model.display()))?;
        check_init_shape(settings, &policy)?;
        let reference_settings =
            ModelDirSettings::read(&reference).with_context(|| format!("the reference {}", reference.display()))?;
        let mut notes: Vec<String> = policy.adopt_template(settings).into_iter().collect();
        let caps = max_len_caps(settings, false);
        notes.push(policy.adopt_max_len(settings, &[&reference_settings], &caps)?);
        notes.push(format!("the tokenizer {}", tokenizer_source(Some(&args.model))));
        print_settings_notes(&notes);
        Ok(())
    };
    let mut cfg = args.run.resolve_adjusted(adopt)?.config;
    cfg.require_data()?;
    cfg.model.init = Some(args.model.clone());
    Ok((cfg, reference))
}

/// The pairs of `split`, tokenized with the policy's tokenizer (which the reference's, when it has one
/// of its own, must equal).
fn split_pairs(cfg: &RunConfig, split: Split, reference: &Path) -> Result<Vec<safedpo::data::TokenizedPair>> {
    let tok = load_tokenizer(cfg.model.init.as_deref())?;
    check_same_tokenizer(tok.as_ref(), cfg.model.init.as_deref(), reference)?;
    let mut cfg = cfg.clone();
    if split == Split::All {
        cfg.data.eval_fraction = 0.0;
        cfg.data.eval_path = None;
    }
    let data = prepare_data(&cfg, tok.as_ref(), Task::Preference)?;
    for line in &data.report {
        eprintln!("{line}");
    }
    Ok(match split {
        Split::All | Split::Train => data.train,
        Split::Eval => data.eval,
    })
}

/// A model directory as a frozen model (inference only), with `adapter` (`--lora.adapter`) merged in.
fn load_frozen<B: Backend>(
    backend: &Arc<B>,
    dir: &Path,
    adapter: Option<&Path>,
    allow_nonfinite: bool,
) -> Result<Decoder<B>> {
    let weights = load_inference_weights(dir, adapter, LoadOptions { allow_nonfinite })?;
    Decoder::from_host_frozen(backend.clone(), &weights)
}

/// The policy (with `lora.adapter` merged in) and the reference, both frozen: `logps` and `eval` only
/// run forwards.
fn load_models<B: Backend>(
    backend: &Arc<B>,
    args: &ModelDataArgs,
    cfg: &RunConfig,
    reference: &Path,
) -> Result<(Decoder<B>, Decoder<B>)> {
    let policy = &args.model;
    let p = load_frozen(backend, policy, cfg.lora.adapter.as_deref(), args.allow_nonfinite)
        .with_context(|| format!("loading --model {}", policy.display()))?;
    let r = load_frozen(backend, reference, None, args.allow_nonfinite)
        .with_context(|| format!("loading the reference {}", reference.display()))?;
    Ok((p, r))
}

fn run_logps(args: LogpsArgs) -> Result<()> {
    let (cfg, reference) = model_data_config(&args.common)?;
    with_backend!(cfg.device, |backend| write_logps(backend, &args, &cfg, &reference))
}

fn write_logps<B: Backend>(backend: Arc<B>, args: &LogpsArgs, cfg: &RunConfig, reference: &Path) -> Result<()> {
    let pairs = split_pairs(cfg, args.common.split, reference)?;
    let (mut policy, mut reference) = load_models(&backend, &args.common, cfg, reference)?;
    let budget = cfg.batching.tokens_per_micro_batch;
    let pol = sequence_logps(&mut policy, &pairs, budget)?;
    let refl = sequence_logps(&mut reference, &pairs, budget)?;
    let mut text = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        let full = |resp: &[i32]| p.prompt.iter().chain(resp).copied().collect::<Vec<i32>>();
        let line = json!({
            "pair": i,
            "prompt_tokens": p.prompt.len(),
            "chosen_ids": full(&p.chosen),
            "rejected_ids": full(&p.rejected),
            "chosen_unsafe": p.chosen_unsafe,
            "rejected_unsafe": p.rejected_unsafe,
            "policy_chosen_logp": pol[2 * i],
            "policy_rejected_logp": pol[2 * i + 1],
            "reference_chosen_logp": refl[2 * i],
            "reference_rejected_logp": refl[2 * i + 1],
        });
        writeln!(text, "{line}")?;
    }
    safedpo::util::write_atomic(&args.out, &text)?;
    eprintln!("wrote {} pairs to {}", pairs.len(), args.out.display());
    Ok(())
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let (cfg, reference) = model_data_config(&args.common)?;
    with_backend!(cfg.device, |backend| evaluate_model(backend, &args, &cfg, &reference))
}

fn evaluate_model<B: Backend>(backend: Arc<B>, args: &EvalArgs, cfg: &RunConfig, reference: &Path) -> Result<()> {
    let pairs = split_pairs(cfg, args.common.split, reference)?;
    if args.generate {
        return judge_model(backend, args, cfg, reference, &pairs);
    }
    let objective = &cfg.objective;
    let (mut policy, mut reference) = load_models(&backend, &args.common, cfg, reference)?;
    let budget = cfg.batching.tokens_per_micro_batch;
    let refl = if objective.uses_reference() {
        sequence_logp_parts(&mut reference, &pairs, budget)?
    } else {
        ReferenceLogps::totals(vec![0.0; 2 * pairs.len()])
    };
    drop(reference);
    let stats = evaluate_pairs_with(&mut policy, &refl, &pairs, objective, &LossState::default(), budget)?;
    stats.ensure_finite("eval/")?;
    let mut rec = Record::new();
    rec.insert("pairs".into(), pairs.len().into());
    stats.write_means("eval/", &mut rec);
    println!("{}", serde_json::Value::Object(rec));
    Ok(())
}

/// `eval --generate` (see `safedpo::judge::generate_eval`).
fn judge_model<B: Backend>(
    backend: Arc<B>,
    args: &EvalArgs,
    cfg: &RunConfig,
    reference: &Path,
    pairs: &[safedpo::data::TokenizedPair],
) -> Result<()> {
    use safedpo::judge::generate_eval::{judge_generations, judged_metrics, JudgedEvalOptions, Judges};
    let (mut policy, mut reference) = load_models(&backend, &args.common, cfg, reference)?;
    let tok = load_tokenizer(Some(&args.common.model))?;
    let (reward, cost) = (args.judge_reward.as_deref(), args.judge_cost.as_deref());
    let mut judges = Judges::load(&backend, tok.as_ref(), &args.common.model, reward, cost)?;
    let mut prompts: Vec<Vec<i32>> = Vec::new();
    for pair in pairs {
        if !prompts.contains(&pair.prompt) {
            prompts.push(pair.prompt.clone());
        }
    }
    let sampling =
        SamplingParams { temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed: cfg.seed };
    let budget = cfg.batching.tokens_per_micro_batch;
    let opts = JudgedEvalOptions {
        samples_per_prompt: args.samples,
        max_new_tokens: args.max_new_tokens,
        sampling,
        token_budget: budget,
    };
    let judged = judge_generations(&mut policy, &mut reference, &mut judges, tok.as_ref(), &prompts, &opts)?;
    let metrics = serde_json::to_value(judged_metrics(&judged))?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut lines = String::new();
    for response in &judged {
        lines.push_str(&serde_json::to_string(response)?);
        lines.push('\n');
    }
    std::fs::write(args.out.join("generations.jsonl"), lines)?;
    std::fs::write(args.out.join("metrics.json"), format!("{metrics}\n"))?;
    println!("{metrics}");
    Ok(())
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let settings = args.settings.resolve_adjusted(|settings| {
        let model = ModelDirSettings::read(&args.model).with_context(|| format!("--model {}", args.model.display()))?;
        check_init_shape(settings, &model)?;
        let mut notes: Vec<String> = Vec::new();
        if !args.raw {
            notes.extend(model.adopt_template(settings));
        }
        notes.push(format!("the tokenizer {}", tokenizer_source(Some(&args.model))));
        print_settings_notes(&notes);
        Ok(())
    })?;
    with_backend!(settings.config.device, |backend| generate_text(backend, &args, &settings))
}

fn generate_text<B: Backend>(backend: Arc<B>, args: &GenerateArgs, settings: &Resolved) -> Result<()> {
    let tok = load_tokenizer(Some(&args.model))?;
    let adapter = settings.config.lora.adapter.as_deref();
    let mut model = load_frozen(&backend, &args.model, adapter, args.allow_nonfinite)
        .with_context(|| format!("loading --model {}", args.model.display()))?;
    let prompt = if args.raw {
        [tok.bos_ids(), &tok.encode(&args.prompt)].concat()
    } else {
        let format = sequence_format(&settings.config.data.template, Some(&args.model)).context("data.template")?;
        format.generation_prompt(tok.as_ref(), &args.prompt)?
    };
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0, got {}", args.temperature);
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    let seed = settings.config.seed;
    let params = SamplingParams { temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed };
    let new = generate(&mut model, &prompt, &tok.stop_ids(), args.max_new_tokens, &params)?;
    println!("{}", tok.decode(&new));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<()> {
        run(Cli::try_parse_from(std::iter::once("safedpo").chain(args.iter().copied()))?)
    }

    #[test]
    fn demo_data_only_writes_loadable_rows_and_nothing_else() {
        use safedpo::data::{load_pairs, DataFormat, PairSelection};
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("data");
        run_args(&[
            "demo",
            "--data-only",
            "--rows",
            "123",
            "--seed",
            "5",
            "--quiet",
            "--out-dir",
            out.to_str().unwrap(),
        ])
        .unwrap();
        let path = out.join("data.jsonl");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 123);
        let (pairs, report) = load_pairs(&path, DataFormat::PkuSafeRlhf, PairSelection::SafeDpo, false).unwrap();
        assert_eq!(report.kept + report.swapped + report.dropped, 123);
        assert_eq!(pairs.len(), report.kept + report.swapped);
        let entries: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
        assert_eq!(entries.len(), 1, "--data-only trains nothing: {entries:?}");
        // Same seed, same file.
        let again = dir.path().join("again");
        run_args(&[
            "demo",
            "--data-only",
            "--rows",
            "123",
            "--seed",
            "5",
            "--quiet",
            "--out-dir",
            again.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(std::fs::read_to_string(again.join("data.jsonl")).unwrap(), text);

        let err = Cli::try_parse_from(["safedpo", "demo", "--rows", "10"]).err().expect("--rows needs --data-only");
        assert!(err.to_string().contains("--data-only"), "{err}");
        let err = run_args(&["demo", "--data-only", "--rows", "0", "--out-dir", out.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("--rows"), "{err}");
    }

    #[test]
    fn train_with_vocab_size_builds_a_model_of_that_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let run_dir = dir.path().join("run");
        run_args(&["demo", "--data-only", "--rows", "40", "--quiet", "--out-dir", data.to_str().unwrap()]).unwrap();
        let data_file = data.join("data.jsonl");
        let mut args = vec!["train", "--device", "cpu", "--no-progress", "--optimizer.total_steps", "2"];
        args.extend(["--data.max_len", "96", "--model.n_positions", "96", "--model.n_layer", "1"]);
        args.extend(["--model.n_embd", "16", "--model.n_head", "2", "--batching.tokens_per_micro_batch", "800"]);
        args.extend(["--data.path", data_file.to_str().unwrap()]);
        let common = args.clone();
        args.extend(["--model.vocab_size", "300", "--out-dir", run_dir.to_str().unwrap()]);
        run_args(&args).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run_dir.join("final/config.json")).unwrap()).unwrap();
        assert_eq!(config["vocab_size"], 300, "{config}");

        // Smaller than the byte tokenizer's 258 ids: the data's ids do not fit, and the error says so.
        let small = dir.path().join("small");
        let mut bad = common;
        bad.extend(["--model.vocab_size", "200", "--out-dir", small.to_str().unwrap()]);
        let err = format!("{:#}", run_args(&bad).unwrap_err());
        assert!(err.contains("vocabulary has 200 tokens"), "{err}");
    }
}
