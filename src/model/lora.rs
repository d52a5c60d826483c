//! LoRA adapters as PEFT defines them (`peft.LoraConfig`, `peft.tuners.lora.Linear`): a frozen
//! projection `y = W x (+ b)` gains `(alpha / r) · B (A x)` (`alpha / √r` with rsLoRA), `A [r, in]`
//! initialised kaiming-uniform (a = √5, i.e. U(−1/√in, 1/√in)), `B [out, r]` zero, so that a fresh
//! adapter leaves the model as it was.
//!
//! Targets are PEFT's module names of each family: GPT-2's `c_attn`, `c_proj` (the attention's and
//! the MLP's, both named so; `attn.c_proj` / `mlp.c_proj` pick one) and `c_fc`; the Llama family's
//! `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`; and `all-linear`
//! (every projection of the blocks, not the LM head). A name matches a module when it is the
//! module's name or a dotted suffix of it, as PEFT matches. The engine's fused projections (the
//! Llama family's `qkv_proj`, `gate_up_proj`, see `params.rs`) take an adapter on one of their parts
//! as a product on that part's output columns only ([`Target::columns`]).
//!
//! This file holds the host side: the spec, the targets a model has, the adapters' tensors under
//! PEFT's names, their initialisation and merging into the base weights. `adapters.rs` runs them on
//! a backend; `peft.rs` reads and writes PEFT's adapter directories.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{DecoderConfig, HostWeights};

/// What an adapter set is: PEFT's `r`, `lora_alpha`, `target_modules`, `use_rslora`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    /// PEFT module names (`c_attn`, `q_proj`, `attn.c_proj`, `all-linear`), as given.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl LoraSpec {
    /// PEFT's `scaling`: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora { self.alpha / r.sqrt() } else { self.alpha / r }) as f32
    }

    /// PEFT's default targets of a family (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
    pub fn default_targets(config: &DecoderConfig) -> Vec<String> {
        let names: &[&str] = if config.family.is_gpt2() { &["c_attn"] } else { &["q_proj", "v_proj"] };
        names.iter().map(|s| s.to_string()).collect()
    }
}

/// Which of a block's four products an adapter joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
    Qkv,
    O,
    Up,
    Down,
}

/// The output columns of a fused product that an adapter covers: `[offset, offset + width)` of each
/// `total`-wide row, whole `unit`s of columns (a head, or the MLP's width), so that the product's
/// rows split into `unit`-wide rows and an adapter's part is a selection of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Columns {
    pub(super) offset: usize,
    pub(super) total: usize,
    pub(super) unit: usize,
}

/// One adaptable module of a block: its PEFT name (the last part, `c_attn`, `q_proj`), the part of
/// the module path before it (`attn`, `self_attn`, `mlp`), the block product it joins and its sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) parent: &'static str,
    pub(super) name: &'static str,
    pub(super) slot: Slot,
    pub(super) fan_in: usize,
    pub(super) fan_out: usize,
    /// `None`: the adapter covers the product's whole output.
    pub(super) columns: Option<Columns>,
}

impl Target {
    /// `attn.c_attn`, `self_attn.q_proj`.
    pub(super) fn short_name(&self) -> String {
        format!("{}.{}", self.parent, self.name)
    }

    /// The module's path in the HF model (`transformer.h.3.attn.c_attn`, `model.layers.3.mlp.up_proj`).
    pub(super) fn module_path(&self, config: &DecoderConfig, layer: usize) -> String {
        let block =
            if config.family.is_gpt2() { format!("transformer.h.{layer}") } else { format!("model.layers.{layer}") };
        format!("{block}.{}.{}", self.parent, self.name)
    }
}

/// Every adaptable module of a block of `config`, in the block's order.
pub(super) fn block_modules(config: &DecoderConfig) -> Vec<Target> {
    let c = config.n_embd;
    let layout = config.qkv_layout();
    let (q, kv, width, f) = (layout.q_width(), layout.kv_width(), layout.width(), config.intermediate_size);
    let t = |parent, name, slot, fan_in, fan_out, columns| Target { parent, name, slot, fan_in, fan_out, columns };
    if config.family.is_gpt2() {
        return vec![
            t("attn", "c_attn", Slot::Qkv, c, width, None),
            t("attn", "c_proj", Slot::O, q, c, None),
            t("mlp", "c_fc", Slot::Up, c, f, None),
            t("mlp", "c_proj", Slot::Down, f, c, None),
        ];
    }
    let head = |offset| Some(Columns { offset, total: width, unit: layout.head_dim });
    let half = |offset| Some(Columns { offset, total: 2 * f, unit: f });
    vec![
        t("self_attn", "q_proj", Slot::Qkv, c, q, head(0)),
        t("self_attn", "k_proj", Slot::Qkv, c, kv, head(q)),
        t("self_attn", "v_proj", Slot::Qkv, c, kv, head(q + kv)),
        t("self_attn", "o_proj", Slot::O, q, c, None),
        t("mlp", "gate_proj", Slot::Up, c, f, half(0)),
        t("mlp", "up_proj", Slot::Up, c, f, half(f)),
        t("mlp", "down_proj", Slot::Down, f, c, None),
    ]
}

/// The modules `target_modules` picks in each block, in the block's order; an error for a name that
/// matches no module (listing the model's) and for no names at all.
pub(super) fn resolve_targets(config: &DecoderConfig, target_modules: &[String]) -> Result<Vec<Target>> {
    let modules = block_modules(config);
    ensure!(!target_modules.is_empty(), "lora.target_modules: no module named");
    let all = target_modules.iter().any(|m| m == "all-linear");
    let mut picked = vec![all; modules.len()];
    for key in target_modules.iter().filter(|m| *m != "all-linear") {
        let key = key.trim();
        // PEFT matches a key against the module's full path: equal, or a dotted suffix of it.
        let matches = |t: &Target| {
            let path = t.module_path(config, 0);
            path == key || path.ends_with(&format!(".{key}"))
        };
        let hits: Vec<usize> = (0..modules.len()).filter(|&i| matches(&modules[i])).collect();
        if hits.is_empty() {
            let names: Vec<String> = modules.iter().map(Target::short_name).collect();
            bail!(
                "lora.target_modules: `{key}` matches no module of this {} model; its modules are {} (or all-linear)",
                config.family.model_type(),
                names.join(", ")
            );
        }
        for i in hits {
            picked[i] = true;
        }
    }
    Ok(modules.into_iter().zip(picked).filter(|(_, p)| *p).map(|(t, _)| t).collect())
}

/// Adapters on the host: the spec, the targets of each block, and every `lora_A` / `lora_B` tensor
/// under PEFT's name (`base_model.model.<module path>.lora_A.weight`) with its shape.
#[derive(Clone, Debug)]
pub struct HostAdapters {
    pub spec: LoraSpec,
    pub(super) targets: Vec<Target>,
    pub n_layer: usize,
    /// PEFT name → (shape, data).
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// PEFT's names of one adapter's two tensors.
pub(super) fn peft_names(config: &DecoderConfig, target: &Target, layer: usize) -> [String; 2] {
    let path = target.module_path(config, layer);
    ["lora_A", "lora_B"].map(|m| format!("base_model.model.{path}.{m}.weight"))
}

impl HostAdapters {
    /// Fresh adapters as PEFT initialises them: `A` kaiming-uniform (a = √5: U(−1/√in, 1/√in)), one
    /// ChaCha stream per tensor from `seed`; `B` zero.
    pub fn init(config: &DecoderConfig, spec: LoraSpec, seed: u64) -> Result<Self> {
        ensure!(spec.r > 0, "lora.r must be at least 1");
        let targets = resolve_targets(config, &spec.target_modules)?;
        let mut tensors = BTreeMap::new();
        let mut stream = 0u64;
        for layer in 0..config.n_layer {
            for t in &targets {
                let [a, b] = peft_names(config, t, layer);
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream((1 << 40) + stream);
                stream += 1;
                let bound = 1.0 / (t.fan_in as f64).sqrt();
                let data = (0..spec.r * t.fan_in).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect();
                tensors.insert(a, (vec![spec.r, t.fan_in], data));
                tensors.insert(b, (vec![t.fan_out, spec.r], vec![0.0; t.fan_out * spec.r]));
            }
        }
        Ok(Self { spec, targets, n_layer: config.n_layer, tensors })
    }

    /// Adapters given as tensors (read from a PEFT directory): checks they are exactly those `spec`
    /// gives `config`, naming the first tensor that is missing, extra or of another shape.
    pub fn from_tensors(
        config: &DecoderConfig,
        spec: LoraSpec,
        tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> Result<Self> {
        ensure!(spec.r > 0, "the adapter's r must be at least 1");
        let targets = resolve_targets(config, &spec.target_modules)?;
        let mut expected = BTreeMap::new();
        for layer in 0..config.n_layer {
            for t in &targets {
                let [a, b] = peft_names(config, t, layer);
                expected.insert(a, vec![spec.r, t.fan_in]);
                expected.insert(b, vec![t.fan_out, spec.r]);
            }
        }
        for (name, shape) in &expected {
            let Some((got, data)) = tensors.get(name) else {
                bail!(
                    "the adapter has no tensor {name} (shape {shape:?}), which its target_modules give this base model"
                )
            };
            ensure!(got == shape, "adapter tensor {name} has shape {got:?}; the base model needs {shape:?}");
            ensure!(data.len() == shape.iter().product::<usize>(), "adapter tensor {name}: wrong number of values");
        }
        if let Some(extra) = tensors.keys().find(|k| !expected.contains_key(*k)) {
            bail!("adapter tensor {extra} matches no adapted module of this base model (a different base, or layers?)");
        }
        Ok(Self { spec, targets, n_layer: config.n_layer, tensors })
    }

    /// PEFT's `target_modules` for these targets: each module's name (`c_attn`), or its name with
    /// its parent (`mlp.c_proj`) where the name alone would match a module that is not a target.
    pub fn target_names(&self, config: &DecoderConfig) -> Vec<String> {
        let modules = block_modules(config);
        let names = self.targets.iter().map(|t| {
            let alone = modules.iter().filter(|m| m.name == t.name).all(|m| self.targets.contains(m));
            if alone {
                t.name.to_string()
            } else {
                t.short_name()
            }
        });
        names.collect::<std::collections::BTreeSet<_>>().into_iter().collect()
    }

    /// The base weights with every adapter merged in (PEFT's `merge_and_unload`):
    /// `W += scale · B A` on the adapted rows of the product (transposed for GPT-2's Conv1D
    /// layout, PEFT's `fan_in_fan_out`), summed in f64 and rounded once.
    pub fn merge_into(&self, base: &HostWeights) -> Result<HostWeights> {
        let config = &base.config;
        ensure!(
            self.n_layer == config.n_layer,
            "the adapter has {} layers, the base model {}",
            self.n_layer,
            config.n_layer
        );
        let mut merged = base.clone();
        let scale = self.spec.scale() as f64;
        let r = self.spec.r;
        let gpt2 = config.family.is_gpt2();
        for layer in 0..config.n_layer {
            for t in &self.targets {
                let [a_name, b_name] = peft_names(config, t, layer);
                let (a, b) = (&self.tensors[&a_name].1, &self.tensors[&b_name].1);
                let param = slot_param_name(config, t.slot, layer);
                let (shape, w) = merged.tensors.get_mut(&param).expect("the schema names every slot");
                let offset = t.columns.map_or(0, |c| c.offset);
                let total_out = if gpt2 { shape[1] } else { shape[0] };
                for o in 0..t.fan_out {
                    for i in 0..t.fan_in {
                        let delta: f64 = (0..r).map(|k| b[o * r + k] as f64 * a[k * t.fan_in + i] as f64).sum();
                        let at = if gpt2 { i * total_out + offset + o } else { (offset + o) * t.fan_in + i };
                        w[at] = (w[at] as f64 + scale * delta) as f32;
                    }
                }
            }
        }
        Ok(merged)
    }
}

/// The engine's parameter name of a block product's weight (`h.3.attn.c_attn.weight`,
/// `layers.3.self_attn.qkv_proj.weight`).
pub(super) fn slot_param_name(config: &DecoderConfig, slot: Slot, layer: usize) -> String {
    let gpt2 = config.family.is_gpt2();
    let name = match (slot, gpt2) {
        (Slot::Qkv, true) => "attn.c_attn",
        (Slot::O, true) => "attn.c_proj",
        (Slot::Up, true) => "mlp.c_fc",
        (Slot::Down, true) => "mlp.c_proj",
        (Slot::Qkv, false) => "self_attn.qkv_proj",
        (Slot::O, false) => "self_attn.o_proj",
        (Slot::Up, false) => "mlp.gate_up_proj",
        (Slot::Down, false) => "mlp.down_proj",
    };
    if gpt2 {
        format!("h.{layer}.{name}.weight")
    } else {
        format!("layers.{layer}.{name}.weight")
    }
}
