//! Where things are in a TOML document: the line and column of an error, the dotted path of the
//! key at a position, the line a key is set on.

use std::path::Path;

/// `file:line:column: message (field)` for a TOML parse or type error.
pub(crate) fn describe_toml_error(e: &toml::de::Error, text: &str, file: &Path) -> String {
    let msg = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
            let field = field_at(text, span.start).map(|f| format!("{f}: ")).unwrap_or_default();
            format!("{}:{line}:{col}: {field}{msg}\n  | {snippet}", file.display())
        }
        None => format!("{}: {msg}", file.display()),
    }
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
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut keys = field.split('.');
    let first = keys.next()?;
    let mut value = doc.get_ref().get(first)?;
    for k in keys {
        value = value.get_ref().get(k)?;
    }
    Some(line_col(text, value.span().start).0)
}
