//! Where things are in a TOML document: the line and column of an error, the dotted path of the
//! key at a position, the line a key is set on; the `[objective]` keys its objective does not take.

use std::path::Path;

use crate::loss::{parse_terms, unknown_key, Objective};

/// `file:line:column: field: message` and the line, for a TOML parse or type error.
pub(crate) fn describe_toml_error(e: &toml::de::Error, text: &str, file: &Path) -> String {
    let msg = e.message().trim_end();
    match e.span() {
        Some(span) => describe_at(text, file, span.start, field_at(text, span.start).as_deref(), msg),
        None => format!("{}: {msg}", file.display()),
    }
}

/// `file:line:column: field: message` and the line, for a problem at byte `offset`.
pub(crate) fn describe_at(text: &str, file: &Path, offset: usize, field: Option<&str>, msg: &str) -> String {
    let (line, col) = line_col(text, offset);
    let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
    let field = field.map(|f| format!("{f}: ")).unwrap_or_default();
    format!("{}:{line}:{col}: {field}{msg}\n  | {snippet}", file.display())
}

/// The first key of the `[objective]` table that its objective does not take, as (dotted path,
/// message). Checked on the table, not left to serde, which hands an objective its keys in sorted
/// order (`name` after most parameters), too late to point at the key.
pub(crate) fn objective_key_error(table: &toml::Table) -> Option<(String, String)> {
    let objective = table.get("objective")?.as_table()?;
    let terms = match objective.get("name") {
        // Not a string or a list of strings, or an unknown name: serde reports it at the name.
        Some(toml::Value::String(name)) => parse_terms(name).ok()?,
        Some(toml::Value::Array(items)) => {
            let names: Option<Vec<&str>> = items.iter().map(|v| v.as_str()).collect();
            parse_terms(&names?.join("+")).ok()?
        }
        Some(_) => return None,
        None => parse_terms(Objective::default().name()).ok()?,
    };
    let specs: Vec<_> = terms.into_iter().map(|(_, spec)| spec).collect();
    objective.keys().find_map(|key| unknown_key(&specs, key).map(|message| (format!("objective.{key}"), message)))
}

/// 1-based line and column of byte `offset`.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |nl| before.len() - nl - 1) + 1;
    (line, col)
}

/// The dotted path of the key or value at byte `offset` of a TOML document, if any.
pub(crate) fn field_at(text: &str, offset: usize) -> Option<String> {
    fn walk(table: &toml::de::DeTable<'_>, offset: usize, prefix: &str) -> Option<String> {
        for (key, value) in table.iter() {
            let path =
                if prefix.is_empty() { key.get_ref().to_string() } else { format!("{prefix}.{}", key.get_ref()) };
            if let Some(inner) = value.get_ref().as_table() {
                if let Some(found) = walk(inner, offset, &path) {
                    return Some(found);
                }
            }
            let (k, v) = (key.span(), value.span());
            if k.contains(&offset) || v.contains(&offset) {
                return Some(path);
            }
        }
        None
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    walk(doc.get_ref(), offset, "")
}

/// The 1-based line of the value of a dotted `field` in a TOML document, if it is set there.
pub(crate) fn toml_field_line(text: &str, field: &str) -> Option<usize> {
    Some(line_col(text, field_offset(text, field)?).0)
}

/// The byte offset of the value of a dotted `field` in a TOML document, if it is set there.
pub(crate) fn field_offset(text: &str, field: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut keys = field.split('.');
    let first = keys.next()?;
    let mut value = doc.get_ref().get(first)?;
    for k in keys {
        value = value.get_ref().get(k)?;
    }
    Some(value.span().start)
}
