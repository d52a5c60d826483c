//! Objectives as text: `FromStr`/`Display` (`safedpo:beta=0.2,delta=5`,
//! `0.8*dpo+0.2*bco_pair+sft:beta=0.1,bco_running_mean=true`) and serde (a table with `name` and the
//! parameters, as the run configuration's `[objective]` holds it).
//!
//! `name` is one objective or several, as TRL's `loss_type` list: a TOML array (`["sigmoid",
//! "bco_pair", "sft"]`), or one string with the names joined by `+` or `,` (each may carry its
//! weight, `0.8*sigmoid`). The weights may instead be `loss_weights` (a TOML array, or a string of
//! numbers joined by `,`, as a command-line flag gives it). A parameter applies to every objective
//! that takes it (a combination shares its parameters, as TRL's `DPOConfig` has one `beta`); TRL's
//! modifiers are the keys of [`MODIFIER_KEYS`].

use std::fmt;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::objectives::{
    Combination, FDivergence, Objective, ObjectiveSpec, DEFAULT_ALPHA_DIVERGENCE_COEF, NO_LD_ALPHA,
};
use super::params::canonical_param;

/// The keys of an objective besides `name` and the parameters: the combination's weights
/// (`loss_weights`), RPO's weight of the `sft` term added to any objective (`rpo_alpha`, TRL < 1.0),
/// the f-divergence (`f_divergence_type`: `reverse_kl`, `forward_kl`, `js_divergence`,
/// `alpha_divergence`; `f_alpha_divergence_coef`, default 0.5), `bco_pair`'s running reward
/// mean (`bco_running_mean`), LD-DPO's weight of the tokens past the pair's shared length
/// (`ld_alpha`) and WPO's per-pair weights (`use_weighting`).
pub const MODIFIER_KEYS: [&str; 7] = [
    "loss_weights",
    "rpo_alpha",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "bco_running_mean",
    "ld_alpha",
    "use_weighting",
];

/// One value of an objective's table or text.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
enum Value {
    Bool(bool),
    Number(f64),
    Text(String),
    List(Vec<Value>),
}

impl Value {
    /// `true`, `1.5`, or text, as `key=value` text holds them.
    fn from_text(text: &str) -> Value {
        let text = text.trim();
        match (text.parse::<f64>(), text.parse::<bool>()) {
            (Ok(x), _) => Value::Number(x),
            (_, Ok(b)) => Value::Bool(b),
            _ => Value::Text(text.to_string()),
        }
    }

    fn number(&self, key: &str) -> Result<f64> {
        match self {
            Value::Number(x) => Ok(*x),
            Value::Text(t) => t.trim().parse().map_err(|_| anyhow!("{key} = {t:?} is not a number")),
            other => bail!("{key} must be a number, got {other:?}"),
        }
    }

    fn flag(&self, key: &str) -> Result<bool> {
        match self {
            Value::Bool(b) => Ok(*b),
            Value::Text(t) => t.trim().parse().map_err(|_| anyhow!("{key} = {t:?} is not true or false")),
            other => bail!("{key} must be true or false, got {other:?}"),
        }
    }

    fn text(&self, key: &str) -> Result<&str> {
        match self {
            Value::Text(t) => Ok(t),
            other => bail!("{key} must be a string, got {other:?}"),
        }
    }

    /// A list of numbers: an array, or a string `0.8,0.2,1` or `[0.8, 0.2, 1]`.
    fn numbers(&self, key: &str) -> Result<Vec<f64>> {
        match self {
            Value::List(items) => items.iter().map(|v| v.number(key)).collect(),
            Value::Text(t) => split_list(t).map(|item| Value::Text(item.to_string()).number(key)).collect(),
            Value::Number(x) => Ok(vec![*x]),
            other => bail!("{key} must be a list of numbers, got {other:?}"),
        }
    }
}

/// The items of `a,b`, `a+b` or `[a, b]`, trimmed, quotes removed.
fn split_list(text: &str) -> impl Iterator<Item = &str> {
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    inner.split([',', '+']).map(|item| item.trim().trim_matches(['"', '\''])).filter(|item| !item.is_empty())
}

/// The terms a `name` names, each with its weight where it is written with one (`0.8*sigmoid`):
/// `dpo`, `0.8*dpo+0.2*bco_pair+sft`, `sigmoid,sft`, `["sigmoid", "sft"]`. Names are
/// case-insensitive and may be TRL's.
pub fn parse_terms(text: &str) -> Result<Vec<(Option<f64>, &'static ObjectiveSpec)>> {
    let terms: Vec<(Option<f64>, &'static ObjectiveSpec)> = split_list(text)
        .map(|item| match item.split_once('*') {
            Some((weight, name)) => {
                let weight: f64 = weight.trim().parse().with_context(|| format!("the weight of {item:?}"))?;
                Ok((Some(weight), Objective::spec_of(name)?))
            }
            None => Ok((None, Objective::spec_of(item)?)),
        })
        .collect::<Result<_>>()?;
    if terms.is_empty() {
        bail!("no objective named in {text:?}; expected one of: {}", Objective::name_list());
    }
    Ok(terms)
}

/// The message for a key none of `terms` takes and that is no modifier, if `key` is one.
pub fn unknown_key(terms: &[&'static ObjectiveSpec], key: &str) -> Option<String> {
    if key == "name" || MODIFIER_KEYS.contains(&key) || terms.iter().any(|spec| spec.param(key).is_some()) {
        return None;
    }
    Some(match terms {
        [spec] => spec.not_a_parameter(key),
        _ => {
            let mut names: Vec<&str> = Vec::new();
            for p in terms.iter().flat_map(|s| s.params) {
                if !names.contains(&p.name) {
                    names.push(p.name);
                }
            }
            let objectives: Vec<&str> = terms.iter().map(|s| s.name).collect();
            format!(
                "`{key}` is not a parameter of objectives {} (their parameters: {}; and {})",
                objectives.join("+"),
                names.join(", "),
                MODIFIER_KEYS.join(", ")
            )
        }
    })
}

/// Whether `key` holds a number: a parameter of some objective (or TRL's spelling of one),
/// `rpo_alpha`, `f_alpha_divergence_coef` or `ld_alpha`.
fn is_number_key(key: &str) -> bool {
    let key = canonical_param(key);
    key == "rpo_alpha"
        || key == "f_alpha_divergence_coef"
        || key == "ld_alpha"
        || Objective::specs().any(|spec| spec.params.iter().any(|p| p.name == key))
}

/// An objective from its terms and the other keys given (parameters and modifiers, any order).
/// Parameters left out take each term's default.
fn build(terms: &[(Option<f64>, &'static ObjectiveSpec)], given: &[(String, Value)]) -> Result<Objective> {
    let specs: Vec<&'static ObjectiveSpec> = terms.iter().map(|(_, s)| *s).collect();
    let mut seen: Vec<&str> = Vec::new();
    for (key, _) in given {
        if let Some(message) = unknown_key(&specs, key) {
            bail!("{message}");
        }
        let canonical = canonical_param(key);
        if seen.contains(&canonical) {
            bail!("`{key}` is given twice (`{canonical}` and TRL's spelling of it name the same parameter)");
        }
        seen.push(canonical);
    }
    let find = |name: &str| given.iter().find(|(k, _)| k == name).map(|(_, v)| v);

    let inline: Vec<Option<f64>> = terms.iter().map(|(w, _)| *w).collect();
    let weights: Vec<f64> = match find("loss_weights") {
        Some(value) => {
            if inline.iter().any(Option::is_some) {
                bail!("the weights are given twice: in `name` and in `loss_weights`");
            }
            let weights = value.numbers("loss_weights")?;
            if weights.len() != terms.len() {
                bail!("loss_weights has {} weights for {} objectives", weights.len(), terms.len());
            }
            weights
        }
        None => inline.iter().map(|w| w.unwrap_or(1.0)).collect(),
    };
    let mut objectives: Vec<(f64, Objective)> = Vec::new();
    for ((_, spec), weight) in terms.iter().zip(weights) {
        let mut objective = spec.defaults();
        for (key, value) in given.iter().filter(|(k, _)| spec.param(k).is_some()) {
            objective.set_param(key, value.number(key)?)?;
        }
        objectives.push((weight, objective));
    }

    let mut combination = Combination { terms: objectives, ..Combination::of(Objective::default()) };
    if let Some(value) = find("rpo_alpha") {
        let alpha = value.number("rpo_alpha")?;
        if !(alpha.is_finite() && alpha >= 0.0) {
            bail!("rpo_alpha must be a finite number >= 0, got {alpha}");
        }
        if alpha > 0.0 {
            let beta = combination.terms[0].1.beta();
            combination.terms.push((alpha, Objective::Sft { beta }));
        }
    }
    let coef = match find("f_alpha_divergence_coef") {
        Some(value) => Some(value.number("f_alpha_divergence_coef")?),
        None => None,
    };
    if let Some(value) = find("f_divergence_type") {
        let name = value.text("f_divergence_type")?;
        combination.f_divergence = FDivergence::from_name(name, coef.unwrap_or(DEFAULT_ALPHA_DIVERGENCE_COEF))
            .with_context(|| {
                format!("f_divergence_type {name:?}: expected one of {}", FDivergence::NAMES.join(", "))
            })?;
    }
    if coef.is_some() && !matches!(combination.f_divergence, FDivergence::Alpha(_)) {
        bail!("f_alpha_divergence_coef applies only with f_divergence_type = \"alpha_divergence\"");
    }
    if let Some(value) = find("bco_running_mean") {
        combination.bco_running_mean = value.flag("bco_running_mean")?;
    }
    if let Some(value) = find("ld_alpha") {
        combination.ld_alpha = value.number("ld_alpha")?;
    }
    if let Some(value) = find("use_weighting") {
        combination.use_weighting = value.flag("use_weighting")?;
    }
    Ok(combination.into_objective())
}

/// Parses `name` or `name:key=value,key=value` (e.g. `safedpo:beta=0.2,delta=5`,
/// `0.8*dpo+0.2*bco_pair+sft:beta=0.1`); parameters not given keep their defaults. The result is
/// validated.
impl FromStr for Objective {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (name, overrides) = match s.split_once(':') {
            Some((name, rest)) => (name, Some(rest)),
            None => (s, None),
        };
        let terms = parse_terms(name)?;
        let mut given: Vec<(String, Value)> = Vec::new();
        for item in overrides.into_iter().flat_map(|rest| rest.split(',')).filter(|item| !item.trim().is_empty()) {
            let (key, value) =
                item.split_once('=').with_context(|| format!("objective {s:?}: expected key=value, got {item:?}"))?;
            let (key, value) = (key.trim(), Value::from_text(value));
            let is_param = terms.iter().any(|(_, spec)| spec.param(key).is_some());
            if is_param && !matches!(value, Value::Number(_)) {
                bail!("objective {s:?}: {key} = {value:?} is not a number");
            }
            given.push((key.to_string(), value));
        }
        let objective = build(&terms, &given).map_err(|e| anyhow!("objective {s:?}: {e:#}"))?;
        objective.validate()?;
        Ok(objective)
    }
}

/// Writes the `FromStr` syntax with every parameter, e.g. `safedpo:beta=0.1,delta=10`, or
/// `0.8*dpo+0.2*bco_pair+sft:beta=0.1,safety_margin=0,bco_running_mean=true`.
impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.describe())?;
        let mut items: Vec<String> = self.params().into_iter().map(|(key, value)| format!("{key}={value}")).collect();
        if let Objective::Combination(c) = self {
            items.extend(modifier_items(c).into_iter().map(|(key, value)| format!("{key}={value}")));
        }
        for (i, item) in items.iter().enumerate() {
            write!(f, "{}{item}", if i == 0 { ':' } else { ',' })?;
        }
        Ok(())
    }
}

/// A combination's modifiers that differ from TRL's defaults, as (key, value text).
fn modifier_items(c: &Combination) -> Vec<(&'static str, String)> {
    let mut items = Vec::new();
    if c.f_divergence != FDivergence::ReverseKl {
        items.push(("f_divergence_type", c.f_divergence.name().to_string()));
    }
    if let FDivergence::Alpha(coef) = c.f_divergence {
        items.push(("f_alpha_divergence_coef", coef.to_string()));
    }
    if c.bco_running_mean {
        items.push(("bco_running_mean", "true".to_string()));
    }
    if c.ld_alpha != NO_LD_ALPHA {
        items.push(("ld_alpha", c.ld_alpha.to_string()));
    }
    if c.use_weighting {
        items.push(("use_weighting", "true".to_string()));
    }
    items
}

/// A table tagged with `name`: `{name = "safedpo", beta = 0.1, delta = 10.0}`, every parameter
/// written; a combination's `name` is the list of its objectives, with `loss_weights` unless every
/// weight is 1, and its modifiers where they differ from TRL's defaults.
impl Serialize for Objective {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        match self {
            Objective::Combination(c) => {
                let names: Vec<&str> = c.terms.iter().map(|(_, t)| t.name()).collect();
                if names.len() == 1 {
                    map.serialize_entry("name", names[0])?;
                } else {
                    map.serialize_entry("name", &names)?;
                }
                if c.terms.iter().any(|(w, _)| *w != 1.0) {
                    map.serialize_entry("loss_weights", &c.terms.iter().map(|(w, _)| *w).collect::<Vec<f64>>())?;
                }
            }
            single => map.serialize_entry("name", single.name())?,
        }
        for (key, value) in self.params() {
            map.serialize_entry(key, &value)?;
        }
        if let Objective::Combination(c) = self {
            if c.f_divergence != FDivergence::ReverseKl {
                map.serialize_entry("f_divergence_type", c.f_divergence.name())?;
            }
            if let FDivergence::Alpha(coef) = c.f_divergence {
                map.serialize_entry("f_alpha_divergence_coef", &coef)?;
            }
            if c.bco_running_mean {
                map.serialize_entry("bco_running_mean", &true)?;
            }
            if c.ld_alpha != NO_LD_ALPHA {
                map.serialize_entry("ld_alpha", &c.ld_alpha)?;
            }
            if c.use_weighting {
                map.serialize_entry("use_weighting", &true)?;
            }
        }
        map.end()
    }
}

/// Reads the table `Serialize` writes. `name` may be an alias (or a list, see the module docs) and
/// defaults to `safedpo`; parameters left out take the objective's defaults; a parameter the
/// objective does not take is an error. Bounds are checked by [`Objective::validate`], not here.
impl<'de> Deserialize<'de> for Objective {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_map(ObjectiveVisitor)
    }
}

struct ObjectiveVisitor;

impl<'de> Visitor<'de> for ObjectiveVisitor {
    type Value = Objective;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an objective: a table with `name` ({}) and its parameters", Objective::name_list())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Objective, A::Error> {
        use serde::de::Error;
        // The keys may come in any order (TOML's in sorted order, `name` after most parameters).
        let mut terms = None;
        let mut given: Vec<(String, Value)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if key == "name" {
                let parsed = match map.next_value::<Value>()? {
                    Value::Text(text) => parse_terms(&text),
                    Value::List(items) => {
                        let names: Result<Vec<&str>> = items.iter().map(|v| v.text("name")).collect();
                        names.and_then(|names| parse_terms(&names.join("+")))
                    }
                    other => Err(anyhow!("name must be a string or a list of strings, got {other:?}")),
                };
                terms = Some(parsed.map_err(|e| A::Error::custom(format!("{e:#}")))?);
            } else {
                // Typed where the key's type is known, so that a bad value is reported at the value.
                let value = if is_number_key(&key) {
                    Value::Number(map.next_value()?)
                } else if key == "bco_running_mean" || key == "use_weighting" {
                    Value::Bool(map.next_value()?)
                } else if key == "f_divergence_type" {
                    Value::Text(map.next_value()?)
                } else {
                    map.next_value()?
                };
                given.push((key, value));
            }
        }
        let terms = terms.unwrap_or_else(|| vec![(None, Objective::default().spec())]);
        build(&terms, &given).map_err(|e| A::Error::custom(format!("{e:#}")))
    }
}
