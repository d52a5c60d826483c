//! Reading preference datasets from JSONL, pair selection, and the SafeDPO transform T(D).
//!
//! Two row formats of pairs, one JSON object per line (blank lines are skipped):
//! - PKU-SafeRLHF: `prompt`, `response_0`, `response_1`, `is_response_0_safe`, `is_response_1_safe`,
//!   `better_response_id`, `safer_response_id` (ids 0 or 1); other fields are ignored.
//! - generic: `prompt`, `chosen`, `rejected`, and optional booleans `chosen_unsafe`, `rejected_unsafe`
//!   (missing or null = false); other fields are ignored. `chosen` and `rejected` may also be lists
//!   of messages, TRL's conversational rows, with the prompt as messages or implicit (see
//!   `conversation`); those need the chat template (`data.template = "chat"`).
//!
//! A third format, unpaired rows (`prompt`, `completion`, `label`), is the objectives on unpaired
//! examples' (KTO): `super::unpaired` reads it with this module's line reader and field checks.
//!
//! Every error names the file, the 1-based line and the field, and says what was expected. A row that
//! names a field twice is an error naming the field (JSON parsers differ on which value wins). A UTF-8
//! byte order mark at the start of the file is skipped.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::conversation::{is_conversational, parse_conversation};
use super::{PreferencePair, CHAT_TEMPLATE};

/// The row format of a dataset file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// Detected from the first valid line: `response_0` means PKU-SafeRLHF, `chosen` the generic format.
    #[default]
    Auto,
    /// PKU-SafeRLHF rows.
    #[serde(rename = "pku-saferlhf", alias = "pku")]
    PkuSafeRlhf,
    /// Generic `prompt` / `chosen` / `rejected` rows.
    Jsonl,
    /// Unpaired `prompt` / `completion` / `label` rows (TRL's unpaired preference format), for the
    /// objectives on unpaired examples (KTO): see `crate::data::load_examples`.
    Unpaired,
}

impl FromStr for DataFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DataFormat::Auto),
            "pku" | "pku-saferlhf" | "pku_saferlhf" | "pkusaferlhf" => Ok(DataFormat::PkuSafeRlhf),
            "jsonl" => Ok(DataFormat::Jsonl),
            "unpaired" => Ok(DataFormat::Unpaired),
            _ => {
                bail!("unknown data format '{s}': expected auto, pku-saferlhf or jsonl (pairs), or unpaired (examples)")
            }
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataFormat::Auto => "auto",
            DataFormat::PkuSafeRlhf => "pku-saferlhf",
            DataFormat::Jsonl => "jsonl",
            DataFormat::Unpaired => "unpaired",
        })
    }
}

/// Which response of a row is the preferred one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairSelection {
    /// Helpfulness order: PKU `better_response_id`; generic rows as written.
    Better,
    /// Safety order: PKU `safer_response_id`. Generic rows have no safer id: a pair with one unsafe
    /// response is ordered safe-first (swapped if needed), a pair whose responses are equally safe
    /// carries no safety preference and is dropped.
    Safer,
    /// `Better` pairs through T(D) ([`safedpo_transform`]).
    #[default]
    SafeDpo,
}

impl FromStr for PairSelection {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "better" => Ok(PairSelection::Better),
            "safer" => Ok(PairSelection::Safer),
            "safedpo" | "safe-dpo" | "safe_dpo" => Ok(PairSelection::SafeDpo),
            _ => bail!("unknown pair selection '{s}': expected better, safer or safedpo"),
        }
    }
}

impl fmt::Display for PairSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PairSelection::Better => "better",
            PairSelection::Safer => "safer",
            PairSelection::SafeDpo => "safedpo",
        })
    }
}

/// What loading a file did. Every non-blank line is counted exactly once:
/// `lines = kept + swapped + dropped + skipped_invalid`; the pairs returned are `kept + swapped`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The format the rows were read as (detected when `Auto` was asked for).
    pub format: DataFormat,
    /// Non-blank lines read.
    pub lines: usize,
    /// Pairs returned in their selected orientation.
    pub kept: usize,
    /// Pairs returned with chosen and rejected exchanged (T(D), or generic rows under `Safer`).
    pub swapped: usize,
    /// Rows that yield no pair (T(D): both unsafe; generic `Safer`: equally safe).
    pub dropped: usize,
    /// Invalid lines skipped (only with `skip_invalid`).
    pub skipped_invalid: usize,
    /// The first invalid line skipped and why: `line 3: field 'prompt': …`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_invalid: Option<String>,
    /// Pairs returned from conversational rows (message lists).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub conversational: usize,
    /// The line of the first of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_conversational_line: Option<usize>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl LoadReport {
    /// Number of pairs returned.
    pub fn pairs(&self) -> usize {
        self.kept + self.swapped
    }

    /// Fails, naming `path` and the line, when the file has conversational rows and `template` is not
    /// the chat template (`CHAT_TEMPLATE`) that renders them.
    pub fn check_template(&self, path: &Path, template: &str) -> Result<()> {
        match self.first_conversational_line {
            Some(line) if template != CHAT_TEMPLATE => bail!(
                "{}:{line}: a conversational row (lists of messages) needs data.template = \"{CHAT_TEMPLATE}\" \
                 (the model's chat template renders the messages), got {template:?}",
                path.display()
            ),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} lines ({}): {} pairs ({} kept, {} swapped), {} dropped, {} invalid skipped",
            self.lines,
            self.format,
            self.pairs(),
            self.kept,
            self.swapped,
            self.dropped,
            self.skipped_invalid
        )?;
        if let Some(first) = &self.first_invalid {
            write!(f, " (the first, {first})")?;
        }
        if self.conversational > 0 {
            write!(f, "; {} conversational", self.conversational)?;
        }
        Ok(())
    }
}

/// What T(D) did to a list of pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransformCounts {
    /// Preferred response safe: kept as is.
    pub kept: usize,
    /// Preferred unsafe, the other safe: chosen and rejected exchanged.
    pub swapped: usize,
    /// Both unsafe: removed.
    pub dropped: usize,
}

/// The result of selecting one row.
enum Selected {
    Kept(PreferencePair),
    Swapped(PreferencePair),
    Dropped,
}

/// T(D) on one pair.
fn transform_one(pair: PreferencePair) -> Selected {
    match (pair.chosen_unsafe, pair.rejected_unsafe) {
        (false, _) => Selected::Kept(pair),
        (true, false) => Selected::Swapped(pair.swapped()),
        (true, true) => Selected::Dropped,
    }
}

/// The SafeDPO transform T(D) (arXiv 2505.20065): keep a pair whose preferred response is safe; swap a
/// pair whose preferred response is unsafe and the other safe; drop a pair whose responses are both
/// unsafe. Order is preserved.
pub fn safedpo_transform(pairs: Vec<PreferencePair>) -> (Vec<PreferencePair>, TransformCounts) {
    let mut counts = TransformCounts::default();
    let mut out = Vec::with_capacity(pairs.len());
    for pair in pairs {
        match transform_one(pair) {
            Selected::Kept(p) => {
                counts.kept += 1;
                out.push(p);
            }
            Selected::Swapped(p) => {
                counts.swapped += 1;
                out.push(p);
            }
            Selected::Dropped => counts.dropped += 1,
        }
    }
    (out, counts)
}

/// One PKU-SafeRLHF row (the fields this crate reads).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PkuRow {
    pub prompt: String,
    pub response_0: String,
    pub response_1: String,
    pub is_response_0_safe: bool,
    pub is_response_1_safe: bool,
    /// 0 or 1: the more helpful response.
    pub better_response_id: u8,
    /// 0 or 1: the safer response.
    pub safer_response_id: u8,
}

impl PkuRow {
    /// The pair preferring response `id` (0 or 1) over the other.
    pub fn pair_preferring(&self, id: u8) -> PreferencePair {
        let (w, l) = if id == 0 { (0, 1) } else { (1, 0) };
        let response = |i: usize| if i == 0 { &self.response_0 } else { &self.response_1 };
        let is_safe = |i: usize| if i == 0 { self.is_response_0_safe } else { self.is_response_1_safe };
        PreferencePair {
            prompt: self.prompt.clone(),
            chosen: response(w).clone(),
            rejected: response(l).clone(),
            chosen_unsafe: !is_safe(w),
            rejected_unsafe: !is_safe(l),
            conversation: None,
        }
    }

    /// The pair in helpfulness order (`better_response_id`).
    pub fn better_pair(&self) -> PreferencePair {
        self.pair_preferring(self.better_response_id)
    }

    /// The pair in safety order (`safer_response_id`).
    pub fn safer_pair(&self) -> PreferencePair {
        self.pair_preferring(self.safer_response_id)
    }
}

fn select_pku(row: &PkuRow, selection: PairSelection) -> Selected {
    match selection {
        PairSelection::Better => Selected::Kept(row.better_pair()),
        PairSelection::Safer => Selected::Kept(row.safer_pair()),
        PairSelection::SafeDpo => transform_one(row.better_pair()),
    }
}

fn select_generic(pair: PreferencePair, selection: PairSelection) -> Selected {
    match selection {
        PairSelection::Better => Selected::Kept(pair),
        PairSelection::Safer => match (pair.chosen_unsafe, pair.rejected_unsafe) {
            (false, true) => Selected::Kept(pair),
            (true, false) => Selected::Swapped(pair.swapped()),
            _ => Selected::Dropped,
        },
        PairSelection::SafeDpo => transform_one(pair),
    }
}

/// A short description of a JSON value for error messages.
pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) if s.trim().is_empty() => "an empty string".into(),
        Value::String(s) => {
            let short: String = s.chars().take(24).collect();
            let ellipsis = if short.len() < s.len() { "…" } else { "" };
            format!("string {short:?}{ellipsis}")
        }
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A non-empty (not all-whitespace) string field.
pub(super) fn req_str(obj: &Map<String, Value>, field: &str) -> std::result::Result<String, String> {
    match obj.get(field) {
        None => Err(format!("field '{field}': missing, expected a non-empty string")),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(v) => Err(format!("field '{field}': expected a non-empty string, found {}", describe(v))),
    }
}

pub(super) fn req_bool(obj: &Map<String, Value>, field: &str) -> std::result::Result<bool, String> {
    match obj.get(field) {
        None => Err(format!("field '{field}': missing, expected true or false")),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("field '{field}': expected true or false, found {}", describe(v))),
    }
}

/// An optional boolean: missing or null is false.
pub(super) fn opt_bool(obj: &Map<String, Value>, field: &str) -> std::result::Result<bool, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("field '{field}': expected true, false or null, found {}", describe(v))),
    }
}

/// A response id: the integer 0 or 1.
fn req_id(obj: &Map<String, Value>, field: &str) -> std::result::Result<u8, String> {
    match obj.get(field) {
        None => Err(format!("field '{field}': missing, expected 0 or 1")),
        Some(v) => match v.as_u64() {
            Some(id @ (0 | 1)) => Ok(id as u8),
            _ => Err(format!("field '{field}': expected 0 or 1, found {}", describe(v))),
        },
    }
}

fn parse_pku(obj: &Map<String, Value>) -> std::result::Result<PkuRow, String> {
    Ok(PkuRow {
        prompt: req_str(obj, "prompt")?,
        response_0: req_str(obj, "response_0")?,
        response_1: req_str(obj, "response_1")?,
        is_response_0_safe: req_bool(obj, "is_response_0_safe")?,
        is_response_1_safe: req_bool(obj, "is_response_1_safe")?,
        better_response_id: req_id(obj, "better_response_id")?,
        safer_response_id: req_id(obj, "safer_response_id")?,
    })
}

fn parse_generic(obj: &Map<String, Value>) -> std::result::Result<PreferencePair, String> {
    if is_conversational(obj) {
        let pair = PreferencePair::from_conversation(parse_conversation(obj, describe)?);
        return Ok(pair.with_safety(opt_bool(obj, "chosen_unsafe")?, opt_bool(obj, "rejected_unsafe")?));
    }
    Ok(PreferencePair {
        prompt: req_str(obj, "prompt").map_err(|e| match obj.get("prompt") {
            Some(Value::Array(_)) => {
                format!("{e} (a prompt of messages needs 'chosen' and 'rejected' as messages too)")
            }
            _ => e,
        })?,
        chosen: req_str(obj, "chosen")?,
        rejected: req_str(obj, "rejected")?,
        chosen_unsafe: opt_bool(obj, "chosen_unsafe")?,
        rejected_unsafe: opt_bool(obj, "rejected_unsafe")?,
        conversation: None,
    })
}

/// A JSON value read with every object key of its top level checked to be unique.
enum Row {
    Object(Map<String, Value>),
    Other(Value),
}

impl<'de> Deserialize<'de> for Row {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(RowVisitor)
    }
}

/// Reads an object key by key (refusing a key seen before); any other value as a [`Value`].
struct RowVisitor;

impl<'de> Visitor<'de> for RowVisitor {
    type Value = Row;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Row, A::Error> {
        let mut obj = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<Value>()?;
            if obj.contains_key(&key) {
                return Err(de::Error::custom(format!("field '{key}' appears twice in the row")));
            }
            obj.insert(key, value);
        }
        Ok(Row::Object(obj))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> std::result::Result<Row, A::Error> {
        Value::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Row::Other)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Row, E> {
        Ok(Row::Other(Value::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Row, E> {
        Ok(Row::Other(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Row, E> {
        Ok(Row::Other(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Row, E> {
        Ok(Row::Other(v.into()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Row, E> {
        Ok(Row::Other(v.into()))
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<Row, E> {
        Ok(Row::Other(Value::Null))
    }
}

/// Decodes one line into a JSON object with unique keys (errors without the `path:line:` prefix).
pub(super) fn parse_object(bytes: &[u8]) -> std::result::Result<Map<String, Value>, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("invalid UTF-8 at byte {} of the line, expected UTF-8 text", e.valid_up_to() + 1))?;
    match serde_json::from_str::<Row>(text) {
        Ok(Row::Object(obj)) => Ok(obj),
        Ok(Row::Other(v)) => Err(format!("expected a JSON object, found {}", describe(&v))),
        // Our own error (a repeated key), without serde_json's position within the line.
        Err(e) if e.is_data() => {
            let msg = e.to_string();
            Err(msg.rsplit_once(" at line ").map_or(msg.clone(), |(m, _)| m.to_string()))
        }
        Err(e) => Err(format!("malformed JSON ({e}), expected one JSON object per line")),
    }
}

/// The format a row's fields announce, if any.
pub(super) fn detect_format(obj: &Map<String, Value>) -> Option<DataFormat> {
    if obj.contains_key("response_0") || obj.contains_key("response_1") {
        Some(DataFormat::PkuSafeRlhf)
    } else if obj.contains_key("chosen") || obj.contains_key("rejected") {
        Some(DataFormat::Jsonl)
    } else if obj.contains_key("completion") || obj.contains_key("label") {
        Some(DataFormat::Unpaired)
    } else {
        None
    }
}

/// Parses and selects one non-blank line; `format` is detected here when still `Auto`.
fn read_row(bytes: &[u8], format: &mut DataFormat, selection: PairSelection) -> std::result::Result<Selected, String> {
    let obj = parse_object(bytes)?;
    if *format == DataFormat::Auto {
        *format = detect_format(&obj).ok_or_else(|| {
            "cannot detect the format: expected fields 'response_0'/'response_1' (PKU-SafeRLHF), \
             'chosen'/'rejected' (generic JSONL) or 'completion'/'label' (unpaired)"
                .to_string()
        })?;
    }
    Ok(match format {
        DataFormat::PkuSafeRlhf => select_pku(&parse_pku(&obj)?, selection),
        DataFormat::Unpaired => return Err(UNPAIRED_ROWS.to_string()),
        _ => select_generic(parse_generic(&obj)?, selection),
    })
}

/// Why a file of unpaired rows gives no pairs.
const UNPAIRED_ROWS: &str =
    "unpaired rows ('prompt', 'completion', 'label') are the data of the objectives on unpaired \
                             examples: set objective.name = \"kto\" or \"apo_zero_unpaired\"";

/// The byte order mark some editors put at the start of a UTF-8 file.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads preference pairs from a JSONL file.
///
/// `format` may be forced or `Auto` (detected from the first valid line). With `skip_invalid`, an
/// invalid line is counted in [`LoadReport::skipped_invalid`] and skipped; without it, the first
/// invalid line is an error `path:line: field 'x': what was expected` (line numbers are 1-based).
/// A file without a single non-blank line is an error, and so is one whose every line is invalid
/// (naming the first and why), and a file of unpaired rows.
pub fn load_pairs(
    path: &Path,
    format: DataFormat,
    selection: PairSelection,
    skip_invalid: bool,
) -> Result<(Vec<PreferencePair>, LoadReport)> {
    if format == DataFormat::Unpaired {
        bail!("{}: data.format = unpaired: {UNPAIRED_ROWS}", path.display());
    }
    let mut report = LoadReport { format, ..Default::default() };
    let mut pairs = Vec::new();
    let lines = read_jsonl_lines(path, skip_invalid, |line_no, bytes| {
        let selected = read_row(bytes, &mut report.format, selection)?;
        if let Selected::Kept(p) | Selected::Swapped(p) = &selected {
            if p.conversation.is_some() {
                report.conversational += 1;
                report.first_conversational_line.get_or_insert(line_no);
            }
        }
        match selected {
            Selected::Kept(p) => {
                report.kept += 1;
                pairs.push(p);
            }
            Selected::Swapped(p) => {
                report.swapped += 1;
                pairs.push(p);
            }
            Selected::Dropped => report.dropped += 1,
        }
        Ok(())
    })?;
    if report.format == DataFormat::Unpaired {
        bail!("{}: {UNPAIRED_ROWS}", path.display());
    }
    (report.lines, report.skipped_invalid, report.first_invalid) =
        (lines.lines, lines.skipped_invalid, lines.first_invalid);
    Ok((pairs, report))
}

/// What [`read_jsonl_lines`] read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct LineCounts {
    /// Non-blank lines.
    pub lines: usize,
    /// Invalid lines skipped (only with `skip_invalid`), and the first of them: `line N: why`.
    pub skipped_invalid: usize,
    pub first_invalid: Option<String>,
}

/// Reads a JSONL file line by line (a UTF-8 byte order mark at its start skipped): `row` gets each
/// non-blank line (its 1-based number and its bytes without the line ending). A line `row` refuses
/// is counted and skipped with `skip_invalid`, else it is the error `path:line: message`. A file
/// without a non-blank line is an error, and so is one whose every line is invalid.
pub(super) fn read_jsonl_lines(
    path: &Path,
    skip_invalid: bool,
    mut row: impl FnMut(usize, &[u8]) -> std::result::Result<(), String>,
) -> Result<LineCounts> {
    let file = File::open(path).with_context(|| format!("opening dataset {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut lines = LineCounts::default();
    let mut line = Vec::new();
    let mut line_no = 0usize;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let bytes = line.strip_suffix(b"\n").unwrap_or(&line);
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        let bytes = match line_no {
            1 => bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes),
            _ => bytes,
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        lines.lines += 1;
        match row(line_no, bytes) {
            Ok(()) => {}
            Err(msg) if skip_invalid => {
                lines.skipped_invalid += 1;
                lines.first_invalid.get_or_insert_with(|| format!("line {line_no}: {msg}"));
            }
            Err(msg) => return Err(anyhow!("{}:{line_no}: {msg}", path.display())),
        }
    }
    if lines.lines == 0 {
        bail!("{}: empty dataset, expected one JSON object per line", path.display());
    }
    if lines.skipped_invalid == lines.lines {
        bail!(
            "{}: all {} lines are invalid (skipped with skip_invalid); the first, {}",
            path.display(),
            lines.lines,
            lines.first_invalid.as_deref().unwrap_or("?")
        );
    }
    Ok(lines)
}

/// Writes rows as JSON lines, atomically.
pub(super) fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    crate::util::write_atomic_with(path, |f| {
        let mut w = BufWriter::new(f);
        for row in rows {
            serde_json::to_writer(&mut w, row)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        Ok(())
    })
}

/// Writes PKU-SafeRLHF rows as a JSONL file (atomic), readable by [`load_pairs`].
pub fn write_pku_jsonl(path: &Path, rows: &[PkuRow]) -> Result<()> {
    write_jsonl(path, rows)
}

/// Writes pairs in the generic JSONL format (`prompt`, `chosen`, `rejected`, `chosen_unsafe`,
/// `rejected_unsafe`; a conversational pair's parts as lists of messages), atomically.
pub fn write_pairs_jsonl(path: &Path, pairs: &[PreferencePair]) -> Result<()> {
    let rows: Vec<Value> = pairs
        .iter()
        .map(|pair| match &pair.conversation {
            None => serde_json::to_value(pair),
            Some(conversation) => {
                let mut row = conversation.to_row();
                row.insert("chosen_unsafe".into(), pair.chosen_unsafe.into());
                row.insert("rejected_unsafe".into(), pair.rejected_unsafe.into());
                Ok(Value::Object(row))
            }
        })
        .collect::<serde_json::Result<_>>()?;
    write_jsonl(path, &rows)
}
