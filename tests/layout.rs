//! The limits that keep the layout navigable (docs/LAYOUT.md): no source file over
//! `MAX_LINES` lines, and no import circle between the library's modules.
//!
//! An import circle is a cycle of module dependencies: module A names an item of module B
//! (`use crate::b::X` or an inline `crate::b::x()`), and B, directly or through others, names one of
//! A's. A parent and its own submodules are one unit here (a module's children implement what it
//! declares, and it re-exports them), so only edges between modules where neither contains the
//! other count. Re-exports are followed to the module that defines the item, so a facade
//! (`backend::PAIR_METRICS` re-exporting `loss::PAIR_METRICS`) is not a dependency on the facade.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The longest a source file may be.
const MAX_LINES: usize = 800;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn no_source_file_is_longer_than_the_limit() {
    let mut files = vec![root().join("build.rs")];
    for dir in ["src", "kernels", "tests", "benches", "scripts"] {
        files_under(&root().join(dir), &mut files);
    }
    let source = ["rs", "cu", "cuh", "h", "cpp", "py", "sh"];
    let mut too_long: Vec<String> = files
        .iter()
        .filter(|p| p.extension().and_then(|e| e.to_str()).is_some_and(|e| source.contains(&e)))
        .filter_map(|p| {
            let lines = fs::read_to_string(p).ok()?.lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", p.strip_prefix(root()).unwrap().display()))
        })
        .collect();
    too_long.sort();
    assert!(too_long.is_empty(), "source files over {MAX_LINES} lines (split them by concept): {too_long:?}");
}

/// A module path, e.g. `["backend", "cuda", "device"]` (empty: the crate root).
type ModPath = Vec<String>;

/// The library's modules, each with its file's text (comments removed).
fn library_modules() -> BTreeMap<ModPath, String> {
    let src = root().join("src");
    let mut files = Vec::new();
    files_under(&src, &mut files);
    let mut modules = BTreeMap::new();
    for file in files {
        if file.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let rel = file.strip_prefix(&src).unwrap();
        let mut path: ModPath = rel.iter().map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
        match path.last().map(String::as_str) {
            Some("lib") if path.len() == 1 => path.clear(),
            Some("main") if path.len() == 1 => continue, // the binary: a separate crate
            Some("mod") => {
                path.pop();
            }
            _ => {}
        }
        modules.insert(path, strip_comments(&fs::read_to_string(&file).unwrap()));
    }
    modules
}

/// The text without `//` comments (doc comments included) and without string literals' contents,
/// so that paths named in prose or messages are not taken for dependencies.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_string = false;
        let mut prev = ' ';
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let ch = chars[i];
            if !in_string && ch == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if ch == '"' && prev != '\\' && !(prev == '\'' && chars.get(i + 1) == Some(&'\'')) {
                in_string = !in_string;
                out.push('"');
            } else if !in_string {
                out.push(ch);
            }
            prev = if prev == '\\' && ch == '\\' { ' ' } else { ch };
            i += 1;
        }
        out.push('\n');
    }
    out
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Expands a `use` tree (`a::{b, c::{d, e as f}, g::*}`) into its paths.
fn expand_use_tree(tree: &str) -> Vec<String> {
    // `x as y` keeps `x`: mark the rename before whitespace goes.
    let words: Vec<&str> = tree.split_whitespace().collect();
    let tree: String = words.join(" ").replace(" as ", "@").chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree.split('@').next().unwrap().to_string()];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| expand_use_tree(&format!("{prefix}{p}")))
        .map(|p| p.strip_suffix("::self").map(str::to_string).unwrap_or(p))
        .collect()
}

/// Every path a module names: the expanded `use` trees (with whether they are `pub use`) and the
/// inline `crate::…` / `super::…` paths.
fn named_paths(text: &str) -> Vec<(String, bool)> {
    let mut paths = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("use ") {
        let before = &rest[..at];
        let starts_item = before.chars().last().is_none_or(|c| !is_ident_char(c));
        let after = &rest[at + 4..];
        if starts_item {
            if let Some(end) = after.find(';') {
                let tree = &after[..end];
                if tree.chars().all(|c| is_ident_char(c) || ":{}, *\n\t".contains(c) || c == ' ') {
                    let is_pub = before.trim_end().ends_with("pub") || before.trim_end().ends_with(')');
                    paths.extend(expand_use_tree(tree).into_iter().map(|p| (p, is_pub)));
                }
            }
        }
        rest = after;
    }
    for root in ["crate::", "super::"] {
        let mut rest = text;
        while let Some(at) = rest.find(root) {
            let before_ok = rest[..at].chars().last().is_none_or(|c| !is_ident_char(c) && c != ':');
            let tail = &rest[at..];
            let len = tail.find(|c: char| !(is_ident_char(c) || c == ':')).unwrap_or(tail.len());
            if before_ok {
                paths.push((tail[..len].trim_end_matches(':').to_string(), false));
            }
            rest = &rest[at + root.len()..];
        }
    }
    paths
}

/// Resolves `path`, named in module `from`, to the module that defines the item (following
/// re-exports), or `None` for paths outside the crate.
fn resolve(modules: &BTreeMap<ModPath, String>, from: &ModPath, path: &str, depth: usize) -> Option<ModPath> {
    let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: ModPath = match segments.first().copied() {
        Some("crate") => {
            segments.remove(0);
            Vec::new()
        }
        Some("super") | Some("self") => {
            let mut base = from.clone();
            while let Some(&s) = segments.first() {
                match s {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                segments.remove(0);
            }
            base
        }
        Some(first) if modules.contains_key(&[from.clone(), vec![first.to_string()]].concat()) => from.clone(),
        _ => return None,
    };
    let mut consumed = 0;
    for s in &segments {
        let next = [base.clone(), vec![s.to_string()]].concat();
        if modules.contains_key(&next) {
            base = next;
            consumed += 1;
        } else {
            break;
        }
    }
    // Follow a re-export of the item this module does not define itself.
    if let (Some(item), true) = (segments.get(consumed), depth < 8) {
        for (reexport, is_pub) in named_paths(&modules[&base]) {
            if is_pub && reexport.rsplit("::").next() == Some(item) && reexport != *path {
                if let Some(target) = resolve(modules, &base, &reexport, depth + 1) {
                    return Some(target);
                }
            }
        }
    }
    Some(base)
}

fn nested(a: &ModPath, b: &ModPath) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

#[test]
fn no_import_circles_between_modules() {
    let modules = library_modules();
    let mut edges: BTreeMap<ModPath, BTreeMap<ModPath, String>> = BTreeMap::new();
    for (module, text) in &modules {
        for (path, is_pub) in named_paths(text) {
            if is_pub {
                continue; // a re-export is resolved through, not a dependency of its own
            }
            if let Some(target) = resolve(&modules, module, &path, 0) {
                if !nested(module, &target) {
                    edges.entry(module.clone()).or_default().entry(target).or_insert(path);
                }
            }
        }
    }
    // Tarjan's strongly connected components: any component of two or more modules is a circle.
    struct Search<'a> {
        edges: &'a BTreeMap<ModPath, BTreeMap<ModPath, String>>,
        index: BTreeMap<ModPath, usize>,
        low: BTreeMap<ModPath, usize>,
        stack: Vec<ModPath>,
        on_stack: BTreeSet<ModPath>,
        circles: Vec<Vec<ModPath>>,
    }
    impl Search<'_> {
        fn visit(&mut self, v: &ModPath) {
            let i = self.index.len();
            self.index.insert(v.clone(), i);
            self.low.insert(v.clone(), i);
            self.stack.push(v.clone());
            self.on_stack.insert(v.clone());
            for w in self.edges.get(v).map(|e| e.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
                if !self.index.contains_key(&w) {
                    self.visit(&w);
                    let low = self.low[v].min(self.low[&w]);
                    self.low.insert(v.clone(), low);
                } else if self.on_stack.contains(&w) {
                    let low = self.low[v].min(self.index[&w]);
                    self.low.insert(v.clone(), low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(&w);
                    let done = w == *v;
                    component.push(w);
                    if done {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.circles.push(component);
                }
            }
        }
    }
    let mut search = Search {
        edges: &edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        circles: Vec::new(),
    };
    for module in modules.keys() {
        if !search.index.contains_key(module) {
            search.visit(module);
        }
    }
    let name = |m: &ModPath| if m.is_empty() { "crate".to_string() } else { m.join("::") };
    let report: Vec<String> = search
        .circles
        .iter()
        .map(|component| {
            let members: BTreeSet<&ModPath> = component.iter().collect();
            let links: Vec<String> = component
                .iter()
                .flat_map(|a| {
                    edges[a]
                        .iter()
                        .filter(|(b, _)| members.contains(b))
                        .map(move |(b, via)| format!("{} -> {} (via `{via}`)", name(a), name(b)))
                })
                .collect();
            links.join("; ")
        })
        .collect();
    assert!(report.is_empty(), "import circles between modules:\n{}", report.join("\n"));
}

#[test]
fn the_import_parser_sees_groups_and_inline_paths() {
    let text = "use crate::a::{b, c::{D, E as F}};\npub use super::g::H;\nfn f() { crate::x::y(); }\n";
    let paths = named_paths(&strip_comments(text));
    let names: Vec<&str> = paths.iter().map(|(p, _)| p.as_str()).collect();
    for want in ["crate::a::b", "crate::a::c::D", "crate::a::c::E", "super::g::H", "crate::x::y"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(paths.iter().any(|(p, is_pub)| p == "super::g::H" && *is_pub));
    assert!(named_paths(&strip_comments("// use crate::a::b;\nlet s = \"crate::q\";\n")).is_empty());
}
