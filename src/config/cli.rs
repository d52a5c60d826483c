//! The settings on the command line, generated from their one definition (`settings::keys_of`):
//! one flag per setting named by its TOML path (`--optimizer.lr 1e-6`, `--model.n_layer 4`,
//! `--seed 1`; `-` and `_` are interchangeable in the name, as in Hugging Face's argument parser),
//! `--set path=value` for any of them, and `--config FILE`. Then their resolution: the command's
//! defaults, the file, the flags in the order given; every value remembers where it came from, so
//! that an error can say.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::LazyLock;

use anyhow::{anyhow, bail, Context, Result};
use clap::error::ErrorKind;
use clap::{Arg, ArgAction, ArgMatches, Command};

use super::settings::{keys_of, Key, Kind};
use super::source::{field_at, objective_key_error, toml_field_line};
use super::{FieldError, RunConfig};

/// Every setting of a run configuration, in declaration order.
pub static KEYS: LazyLock<Vec<Key>> = LazyLock::new(keys_of::<RunConfig>);

/// Pairs of settings of which a layer (the file, the flags) that sets one replaces the other set
/// below it: `--optimizer.total_steps 100` over a file with `epochs = 2` runs 100 steps.
const ALTERNATIVES: [(&str, &str); 2] =
    [("optimizer.total_steps", "optimizer.epochs"), ("optimizer.warmup_steps", "optimizer.warmup_ratio")];

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    Default,
    File {
        path: PathBuf,
        line: Option<usize>,
    },
    /// The flag as given: `--optimizer.lr` or `--set optimizer.lr=1e-6`.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(f, "(default)"),
            Origin::File { path, line: Some(line) } => write!(f, "({}:{line})", path.display()),
            Origin::File { path, line: None } => write!(f, "({})", path.display()),
            Origin::Flag(flag) => write!(f, "(from {flag})"),
        }
    }
}

/// One value given on the command line.
#[derive(Clone, Debug, PartialEq)]
pub struct Override {
    /// The setting's dotted path (`optimizer.lr`).
    pub key: String,
    /// As typed; read according to the setting's [`Kind`].
    pub value: String,
    /// How it was given, for errors.
    pub flag: String,
}

/// The settings given on a command line: the TOML file, then the values in the order given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunOverrides {
    pub config: Option<PathBuf>,
    pub values: Vec<Override>,
}

impl RunOverrides {
    /// Adds `key = value` as `--key value` would.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        let flag = format!("--{key}");
        self.values.push(Override { key: key.to_string(), value: value.to_string(), flag });
        self
    }
}

/// What a command makes of the settings: its defaults, which settings it takes, their checks.
pub trait Profile: 'static {
    /// The defaults the command starts from (shown by `--help`).
    fn base() -> RunConfig;
    /// Whether the command takes the setting at `path` (it has a flag, `--set` accepts it).
    fn takes(path: &str) -> bool;
    /// The checks of the settings the command uses.
    fn validate(cfg: &RunConfig) -> Vec<FieldError>;
}

/// `train`, `sft`: every setting, `RunConfig::default()`, every check.
pub struct Training;

impl Profile for Training {
    fn base() -> RunConfig {
        RunConfig::default()
    }
    fn takes(_path: &str) -> bool {
        true
    }
    fn validate(cfg: &RunConfig) -> Vec<FieldError> {
        cfg.validate()
    }
}

/// `eval`, `logps`: forwards of frozen models on pairs. The models (and a LoRA adapter on the
/// policy), the data, the objective (its metrics), the micro-batch budget, the seed (the holdout
/// split) and the device; no optimizer, intervals, output directory or training-only batching.
pub struct Evaluation;

impl Profile for Evaluation {
    fn base() -> RunConfig {
        RunConfig::default()
    }
    fn takes(path: &str) -> bool {
        let in_section = ["model.", "objective.", "data."].iter().any(|s| path.starts_with(s));
        (in_section && path != "data.sft_safe_only")
            || ["seed", "device", "batching.tokens_per_micro_batch", "lora.adapter"].contains(&path)
    }
    fn validate(cfg: &RunConfig) -> Vec<FieldError> {
        cfg.validate()
    }
}

/// `generate`: the model's shape (and a LoRA adapter on it), the prompt's template, the sampling
/// seed (0 by default) and the device.
pub struct Generation;

impl Profile for Generation {
    fn base() -> RunConfig {
        RunConfig { seed: 0, ..RunConfig::default() }
    }
    fn takes(path: &str) -> bool {
        path.starts_with("model.") || ["seed", "device", "data.template", "lora.adapter"].contains(&path)
    }
    fn validate(cfg: &RunConfig) -> Vec<FieldError> {
        cfg.validate()
    }
}

/// A resolved configuration and where each value set by the file or a flag came from.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub config: RunConfig,
    pub origins: BTreeMap<String, Origin>,
}

impl Resolved {
    pub fn origin(&self, path: &str) -> &Origin {
        self.origins.get(path).unwrap_or(&Origin::Default)
    }

    /// Whether the file or a flag set `path`.
    pub fn is_set(&self, path: &str) -> bool {
        self.origins.contains_key(path)
    }
}

/// `P`'s defaults, then the `--config` file, then the flags; checked by `P::validate`. Errors name
/// the setting and where its value came from (`file:line`, the flag, or the default).
pub fn resolve<P: Profile>(overrides: &RunOverrides) -> Result<Resolved> {
    resolve_adjusted::<P>(overrides, |_| Ok(()))
}

/// [`resolve`], with `adjust` (settings taken from elsewhere, such as a model directory's) applied
/// before the checks.
pub fn resolve_adjusted<P: Profile>(
    overrides: &RunOverrides,
    adjust: impl FnOnce(&mut Resolved) -> Result<()>,
) -> Result<Resolved> {
    let mut merged = base_layer(&P::base())?;
    let mut origins = BTreeMap::new();
    if let Some(path) = &overrides.config {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        // Parsed whole first: a mistake in the file is reported at its line and column.
        RunConfig::from_toml_str(&text, path)?;
        let table: toml::Table = text.parse().with_context(|| format!("parsing {}", path.display()))?;
        let mut layer = Vec::new();
        leaves(&table, "", &mut layer);
        let origin = |key: &str| Origin::File { path: path.clone(), line: toml_field_line(&text, key) };
        apply(&mut merged, &mut origins, layer.into_iter().map(|(key, value)| (origin(&key), key, value)).collect());
    }
    let mut layer = Vec::new();
    for given in &overrides.values {
        let key = setting::<P>(&given.key).map_err(|e| anyhow!("{}: {e}", given.flag))?;
        layer.push((Origin::Flag(given.flag.clone()), key.path.clone(), read_value(key.kind, &given.value)));
    }
    apply(&mut merged, &mut origins, layer);

    if let Some((field, message)) = objective_key_error(&merged) {
        bail!("invalid configuration:\n  {field}: {message} {}", origins.get(&field).unwrap_or(&Origin::Default));
    }
    let text = render(&merged);
    let config: RunConfig = toml::from_str(&text).map_err(|e| {
        let message = e.message().trim_end();
        match e.span().and_then(|span| field_at(&text, span.start)) {
            Some(path) => {
                let origin = origins.get(&path).unwrap_or(&Origin::Default);
                anyhow!("invalid configuration:\n  {path}: {message} {origin}")
            }
            None => anyhow!("invalid configuration: {message}"),
        }
    })?;
    let mut resolved = Resolved { config, origins };
    adjust(&mut resolved)?;
    let Resolved { config, origins } = resolved;
    let errors = P::validate(&config);
    if !errors.is_empty() {
        let lines: Vec<String> = errors
            .iter()
            .map(|e| format!("  {}: {} {}", e.field, e.message, origins.get(&e.field).unwrap_or(&Origin::Default)))
            .collect();
        bail!("invalid configuration:\n{}", lines.join("\n"));
    }
    Ok(Resolved { config, origins })
}

/// The setting a command-line name means (`-` read as `_`), if `P` takes it.
fn setting<P: Profile>(name: &str) -> Result<&'static Key> {
    let path = name.trim().replace('-', "_");
    let Some(key) = KEYS.iter().find(|k| k.path == path) else {
        let last = path.rsplit('.').next().unwrap_or_default();
        let near: Vec<&str> = KEYS
            .iter()
            .filter(|k| P::takes(&k.path) && k.path.rsplit('.').next() == Some(last))
            .map(|k| k.path.as_str())
            .collect();
        let hint = if near.is_empty() { String::new() } else { format!(" (did you mean {}?)", near.join(" or ")) };
        bail!("unknown setting `{path}`{hint}; --help lists them");
    };
    if !P::takes(&key.path) {
        bail!("this command does not take `{}`", key.path);
    }
    Ok(key)
}

/// A command-line value as TOML: text as it is; numbers and booleans parsed as TOML (Rust's float
/// syntax, `NaN` and `inf`, accepted too), else kept as text for the setting's type to reject.
fn read_value(kind: Kind, raw: &str) -> toml::Value {
    if kind == Kind::Text {
        return toml::Value::String(raw.to_string());
    }
    let as_toml = format!("value = {raw}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("value"));
    match as_toml {
        Some(value) if !value.is_table() && !value.is_array() => value,
        _ => match raw.trim().parse::<f64>() {
            Ok(x) => toml::Value::Float(x),
            Err(_) => toml::Value::String(raw.to_string()),
        },
    }
}

/// The defaults as a layer. The objective is its name and only the parameters that differ from that
/// objective's defaults, so that a file or flag naming another objective starts from its defaults.
fn base_layer(base: &RunConfig) -> Result<toml::Table> {
    let mut table = toml::Table::try_from(base).context("serialising the defaults")?;
    let spec = base.objective.spec();
    let mut objective = toml::Table::new();
    objective.insert("name".into(), spec.name.into());
    for (param, value) in spec.params.iter().zip(base.objective.values()) {
        if value != param.default {
            objective.insert(param.name.into(), value.into());
        }
    }
    table.insert("objective".into(), objective.into());
    Ok(table)
}

/// The values (not tables) of `table`, by dotted path.
fn leaves(table: &toml::Table, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
    for (key, value) in table {
        let path = super::settings::join(prefix, key);
        match value.as_table() {
            Some(inner) => leaves(inner, &path, out),
            None => out.push((path, value.clone())),
        }
    }
}

/// Sets a layer's values over `merged`, first removing the alternatives it replaces.
fn apply(merged: &mut toml::Table, origins: &mut BTreeMap<String, Origin>, layer: Vec<(Origin, String, toml::Value)>) {
    let sets = |path: &str| layer.iter().any(|(_, p, _)| p == path);
    for (a, b) in ALTERNATIVES {
        for (given, replaced) in [(a, b), (b, a)] {
            if sets(given) && !sets(replaced) {
                remove_leaf(merged, replaced);
                origins.remove(replaced);
            }
        }
    }
    for (origin, path, value) in layer {
        set_leaf(merged, &path, value);
        origins.insert(path, origin);
    }
}

fn set_leaf(table: &mut toml::Table, path: &str, value: toml::Value) {
    match path.split_once('.') {
        Some((head, rest)) => {
            let inner = table.entry(head).or_insert_with(|| toml::Table::new().into());
            if !inner.is_table() {
                *inner = toml::Table::new().into();
            }
            set_leaf(inner.as_table_mut().expect("a table"), rest, value);
        }
        None => {
            table.insert(path.to_string(), value);
        }
    }
}

fn remove_leaf(table: &mut toml::Table, path: &str) {
    match path.split_once('.') {
        Some((head, rest)) => {
            if let Some(inner) = table.get_mut(head).and_then(|v| v.as_table_mut()) {
                remove_leaf(inner, rest);
            }
        }
        None => {
            table.remove(path);
        }
    }
}

/// `table` as a TOML document, one value per line, so that an error while reading it points at one
/// setting.
fn render(table: &toml::Table) -> String {
    fn key(k: &str) -> String {
        let bare = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if bare {
            k.to_string()
        } else {
            toml::Value::String(k.to_string()).to_string()
        }
    }
    let mut text = String::new();
    for (k, v) in table.iter().filter(|(_, v)| !v.is_table()) {
        let _ = writeln!(text, "{} = {v}", key(k));
    }
    for (k, v) in table {
        let Some(inner) = v.as_table() else { continue };
        let _ = writeln!(text, "[{}]", key(k));
        for (k, v) in inner {
            let _ = writeln!(text, "{} = {v}", key(k));
        }
    }
    text
}

/// One flag per setting, with what clap needs to hold for the whole run.
struct Flag {
    key: &'static Key,
    /// The name with `-` for `_`, also accepted.
    dashed: String,
    value_name: String,
    heading: String,
}

static FLAGS: LazyLock<Vec<Flag>> = LazyLock::new(|| {
    KEYS.iter()
        .map(|key| {
            let (section, name) = key.path.rsplit_once('.').unwrap_or(("", &key.path));
            Flag {
                key,
                dashed: key.path.replace('_', "-"),
                value_name: name.to_ascii_uppercase(),
                heading: if section.is_empty() { "Settings".into() } else { format!("Settings [{section}]") },
            }
        })
        .collect()
});

/// The settings flags of a command that resolves its settings with `P`: `--config`, one flag per
/// setting `P` takes, and `--set`. Flatten it into the command's clap arguments.
pub struct SettingsArgs<P> {
    pub overrides: RunOverrides,
    profile: PhantomData<fn() -> P>,
}

impl<P: Profile> SettingsArgs<P> {
    pub fn resolve(&self) -> Result<Resolved> {
        resolve::<P>(&self.overrides)
    }

    /// [`resolve_adjusted`]: `adjust` runs on the resolved settings before the checks.
    pub fn resolve_adjusted(&self, adjust: impl FnOnce(&mut Resolved) -> Result<()>) -> Result<Resolved> {
        resolve_adjusted::<P>(&self.overrides, adjust)
    }
}

impl<P> Clone for SettingsArgs<P> {
    fn clone(&self) -> Self {
        Self { overrides: self.overrides.clone(), profile: PhantomData }
    }
}

impl<P> fmt::Debug for SettingsArgs<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.overrides.fmt(f)
    }
}

impl<P> Default for SettingsArgs<P> {
    fn default() -> Self {
        Self { overrides: RunOverrides::default(), profile: PhantomData }
    }
}

const CONFIG_ID: &str = "config";
const SET_ID: &str = "set";

impl<P: Profile> clap::Args for SettingsArgs<P> {
    fn augment_args(cmd: Command) -> Command {
        let base = base_layer(&P::base()).expect("the defaults serialise");
        let mut cmd = cmd
            .arg(
                Arg::new(CONFIG_ID)
                    .long("config")
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help_heading("Settings")
                    .help("TOML file of settings (the tables and keys below); the flags override it"),
            )
            .arg(
                Arg::new(SET_ID)
                    .long("set")
                    .value_name("KEY=VALUE")
                    .action(ArgAction::Append)
                    .allow_hyphen_values(true)
                    .help_heading("Settings")
                    .help("Any setting by its TOML path, e.g. --set optimizer.lr=1e-6 (repeatable)"),
            );
        for flag in FLAGS.iter().filter(|f| P::takes(&f.key.path)) {
            let path = flag.key.path.as_str();
            let mut help = flag.key.help.clone();
            if let Some(default) = lookup(&base, path) {
                let shown = match default {
                    toml::Value::String(s) => s.clone(),
                    // An f32 setting's value widened to f64: shown as the f32 it is (1e-5, not 0.00000999…).
                    toml::Value::Float(x) if f64::from(*x as f32) == *x => (*x as f32).to_string(),
                    other => other.to_string(),
                };
                let _ = write!(help, " [default: {shown}]");
            }
            let mut arg = Arg::new(path)
                .long(path)
                .value_name(flag.value_name.as_str())
                .action(ArgAction::Append)
                .value_parser(clap::value_parser!(String))
                .help_heading(flag.heading.as_str())
                .help(help);
            if flag.dashed != flag.key.path {
                arg = arg.alias(flag.dashed.as_str());
            }
            arg = match flag.key.kind {
                Kind::Bool => arg.num_args(0..=1).default_missing_value("true"),
                Kind::Number => arg.allow_negative_numbers(true),
                Kind::Text => arg,
            };
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl<P: Profile> clap::FromArgMatches for SettingsArgs<P> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut given: Vec<(usize, Override)> = Vec::new();
        for flag in FLAGS.iter().filter(|f| P::takes(&f.key.path)) {
            let path = flag.key.path.as_str();
            let (Some(values), Some(indices)) = (matches.get_many::<String>(path), matches.indices_of(path)) else {
                continue;
            };
            for (value, index) in values.zip(indices) {
                let flag = format!("--{path}");
                given.push((index, Override { key: path.to_string(), value: value.clone(), flag }));
            }
        }
        if let (Some(values), Some(indices)) = (matches.get_many::<String>(SET_ID), matches.indices_of(SET_ID)) {
            for (item, index) in values.zip(indices) {
                let flag = format!("--set {item}");
                let Some((key, value)) = item.split_once('=') else {
                    let message = format!("{flag}: expected KEY=VALUE, e.g. --set optimizer.lr=1e-6");
                    return Err(clap::Error::raw(ErrorKind::InvalidValue, message));
                };
                // The key is checked when the settings are resolved.
                given.push((index, Override { key: key.to_string(), value: value.to_string(), flag }));
            }
        }
        given.sort_by_key(|(index, _)| *index);
        let config = matches.get_one::<PathBuf>(CONFIG_ID).cloned();
        let overrides = RunOverrides { config, values: given.into_iter().map(|(_, o)| o).collect() };
        Ok(Self { overrides, profile: PhantomData })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// The value at a dotted path of a table.
fn lookup<'a>(table: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    match path.split_once('.') {
        Some((head, rest)) => lookup(table.get(head)?.as_table()?, rest),
        None => table.get(path),
    }
}
