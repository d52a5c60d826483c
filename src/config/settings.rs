//! The one definition of every setting. `settings!` declares a configuration struct: its fields,
//! their defaults and their help (the doc comments), and from the same text the [`Setting`] listing
//! of its keys, from which the command line's flags and their `--help` are made (see `cli`).

use std::path::PathBuf;

use crate::backend::DeviceKind;
use crate::data::{DataFormat, PairSelection, TruncationMode};
use crate::loss::{Objective, ObjectiveSpec, Param, MODIFIER_KEYS, PARAM_ALIASES};

/// How a setting's value is read from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Parsed as a TOML value (`42`, `1e-6`, `true`); a string when it does not parse as one.
    Number,
    /// `true` or `false`; the flag alone means `true`.
    Bool,
    /// Taken as it is (paths, names, templates).
    Text,
}

/// One setting: its dotted TOML path (`optimizer.lr`), how its value is read, and its help.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub path: String,
    pub kind: Kind,
    pub help: String,
}

/// A type a setting can have: a value (one key) or a table of settings (its keys under a prefix).
pub trait Setting {
    /// Appends the keys of a setting at `path` whose doc comment is `doc`.
    fn keys(path: &str, doc: &str, out: &mut Vec<Key>);
}

/// Every key of a configuration type, in declaration order.
pub fn keys_of<T: Setting>() -> Vec<Key> {
    let mut out = Vec::new();
    T::keys("", "", &mut out);
    out
}

/// `prefix.name`, or `name` at the top level.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// A doc comment as one line of help.
fn tidy(doc: &str) -> String {
    doc.split_whitespace().collect::<Vec<_>>().join(" ")
}

macro_rules! value_settings {
    ($($ty:ty => $kind:ident),+ $(,)?) => {$(
        impl Setting for $ty {
            fn keys(path: &str, doc: &str, out: &mut Vec<Key>) {
                out.push(Key { path: path.to_string(), kind: Kind::$kind, help: tidy(doc) });
            }
        }
    )+};
}

value_settings!(
    u64 => Number,
    usize => Number,
    f32 => Number,
    f64 => Number,
    bool => Bool,
    String => Text,
    PathBuf => Text,
    DeviceKind => Text,
    DataFormat => Text,
    PairSelection => Text,
    TruncationMode => Text,
    crate::model::Family => Text,
    crate::optim::LrSchedulerType => Text,
    crate::optim::GradDtype => Text,
);

/// An optional value is set like the value (and absent by default).
impl<T: Setting> Setting for Option<T> {
    fn keys(path: &str, doc: &str, out: &mut Vec<Key>) {
        T::keys(path, doc, out)
    }
}

/// `[objective]`: `name`, then every parameter any objective takes, each with the objectives that
/// take it, their bounds and defaults (all from [`Objective::specs`]), TRL's spellings of parameters,
/// and the keys of a combination and of TRL's modifiers ([`MODIFIER_KEYS`]).
impl Setting for Objective {
    fn keys(path: &str, _doc: &str, out: &mut Vec<Key>) {
        let help = format!(
            "The preference objective: {}; several (TRL's `loss_type` list) joined by `,` or `+`, each \
             optionally weighted (`0.8*sigmoid+0.2*bco_pair+sft`)",
            Objective::name_list()
        );
        out.push(Key { path: join(path, "name"), kind: Kind::Text, help });
        let mut names: Vec<&str> = Vec::new();
        for param in Objective::specs().flat_map(|spec| spec.params) {
            if !names.contains(&param.name) {
                names.push(param.name);
            }
        }
        for name in names {
            let takers: Vec<(&ObjectiveSpec, &Param)> =
                Objective::specs().filter_map(|spec| spec.param(name).map(|p| (spec, p))).collect();
            out.push(Key { path: join(path, name), kind: Kind::Number, help: param_help(&takers) });
        }
        for (alias, name) in PARAM_ALIASES {
            let help = format!("TRL's name of `{name}`");
            out.push(Key { path: join(path, alias), kind: Kind::Number, help });
        }
        for key in MODIFIER_KEYS {
            let (kind, help) = match key {
                "loss_weights" => (Kind::Number, "The weights of the objectives named (TRL `loss_weights`), e.g. 0.8,0.2,1; absent: 1 each"),
                "rpo_alpha" => (Kind::Number, "Adds the `sft` term (the chosen responses' token-mean NLL) with this weight to any objective (TRL < 1.0 `rpo_alpha`)"),
                "f_divergence_type" => (Kind::Text, "The f-divergence of the log-ratios (TRL `f_divergence_type`): reverse_kl (default), forward_kl, js_divergence, alpha_divergence"),
                "f_alpha_divergence_coef" => (Kind::Number, "α of alpha_divergence (TRL `f_alpha_divergence_coef`, default 0.5)"),
                "bco_running_mean" => (Kind::Bool, "bco_pair subtracts the running mean of the rewards (BCO's δ, TRL < 1.0; default false, as TRL 1.x)"),
                "ld_alpha" => (Kind::Number, "LD-DPO's weight of the tokens past a pair's shared length in the log-probs (TRL `ld_alpha`, in [0, 1]; default 1: none)"),
                "use_weighting" => (Kind::Bool, "WPO's per-pair weights, the policy's length-normalised aligned probabilities of both responses (TRL `use_weighting`; default false)"),
                other => unreachable!("modifier {other} has no help"),
            };
            out.push(Key { path: join(path, key), kind, help: help.to_string() });
        }
    }
}

/// `β, … (must be …, default 0.1; simpo: must be …, default 2)`: the objectives that share a bound
/// and a default grouped; when every objective takes the parameter the first group goes unnamed.
fn param_help(takers: &[(&ObjectiveSpec, &Param)]) -> String {
    let mut groups: Vec<(Vec<&str>, &Param)> = Vec::new();
    for (spec, param) in takers {
        match groups.iter_mut().find(|(_, p)| p.default == param.default && p.bound == param.bound) {
            Some((names, _)) => names.push(spec.name),
            None => groups.push((vec![spec.name], param)),
        }
    }
    let everyone = takers.len() == Objective::specs().count();
    let parts: Vec<String> = groups
        .iter()
        .enumerate()
        .map(|(i, (names, p))| {
            let what = format!("must be {}, default {}", p.bound, p.default);
            if everyone && i == 0 {
                what
            } else {
                format!("{}: {what}", names.join(", "))
            }
        })
        .collect();
    format!("{} ({})", takers[0].1.help, parts.join("; "))
}

/// Declares a configuration struct and its [`Setting`] listing from one definition:
///
/// ```text
/// settings! {
///     /// `[batching]`: …
///     pub struct BatchingConfig {
///         /// Micro-batches per optimizer step.
///         pub grad_accum: usize = 1,
///     }
/// }
/// ```
///
/// Each field's doc comment is its `--help` text and the expression after `=` its default. The
/// struct reads TOML with unknown keys rejected and absent keys defaulted. A field whose type is
/// itself such a struct (or [`Objective`]) is a table of settings.
macro_rules! settings {
    (
        $(#[doc = $struct_doc:literal])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $(#[serde($($serde:tt)*)])*
                pub $field:ident: $ty:ty = $default:expr,
            )+
        }
    ) => {
        $(#[doc = $struct_doc])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $( $(#[doc = $doc])* $(#[serde($($serde)*)])* pub $field: $ty, )+
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $($field: $default),+ }
            }
        }

        impl $crate::config::settings::Setting for $name {
            fn keys(path: &str, _doc: &str, out: &mut Vec<$crate::config::settings::Key>) {
                $(
                    <$ty as $crate::config::settings::Setting>::keys(
                        &$crate::config::settings::join(path, stringify!($field)),
                        concat!($($doc, "\n"),*),
                        out,
                    );
                )+
            }
        }
    };
}

pub(crate) use settings;
