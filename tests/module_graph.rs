//! The modules of `src/` import downward: no import cycles among them (issue 12). The graph
//! is read from the sources (`crate::<module>` paths outside comments and test modules), so a
//! new cycle fails here with the path that closes it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module of a file under `src/` (`src/a/b.rs` -> `a`, `src/a.rs` -> `a`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    match name.as_str() {
        "lib" | "main" | "bin" => None,
        _ => Some(name),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its `#[cfg(test)]` items.
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut skip_depth: Option<i32> = None;
    let mut pending_test = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        let line = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        if let Some(depth) = skip_depth.as_mut() {
            *depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
            if *depth <= 0 && line.contains('}') {
                skip_depth = None;
            }
            continue;
        }
        if trimmed.starts_with("#[cfg(test)]") {
            pending_test = true;
            continue;
        }
        if pending_test {
            pending_test = false;
            let opens = line.matches('{').count() as i32 - line.matches('}').count() as i32;
            if opens > 0 {
                skip_depth = Some(opens);
            }
            // `mod tests;` (a file of its own) or a one-line item: skipped as well.
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    code
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        let code = code_of(&std::fs::read_to_string(file).expect("read source"));
        let deps = graph.entry(from.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if name != from && modules.contains(&name) {
                deps.insert(name);
            }
        }
        // `use crate::{a, b::c}` groups.
        for (i, _) in code.match_indices("crate::{") {
            let group: String = code[i + 8..].chars().take_while(|c| *c != ';').collect();
            for part in group.split([',', '{', '}']) {
                let name = part.trim().split("::").next().unwrap_or("").trim();
                if name != from && modules.contains(name) {
                    deps.insert(name.to_string());
                }
            }
        }
    }
    graph
}

/// A cycle through `start`, if any: the path of modules back to it.
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    at: &str,
    path: &mut Vec<String>,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    for next in graph.get(at).into_iter().flatten() {
        if next == start {
            let mut cycle = path.clone();
            cycle.push(start.to_string());
            return Some(cycle);
        }
        if seen.insert(next.clone()) {
            path.push(next.clone());
            if let Some(c) = cycle_from(graph, start, next, path, seen) {
                return Some(c);
            }
            path.pop();
        }
    }
    None
}

#[test]
fn the_modules_of_src_import_without_cycles() {
    let graph = graph();
    assert!(
        graph.len() > 10 && graph.values().any(|d| !d.is_empty()),
        "the module graph was not read: {graph:?}"
    );
    let mut cycles = Vec::new();
    for module in graph.keys() {
        let mut path = vec![module.clone()];
        if let Some(cycle) = cycle_from(&graph, module, module, &mut path, &mut BTreeSet::new()) {
            cycles.push(cycle.join(" -> "));
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles among src/ modules:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_graph_reader_sees_a_cycle_when_there_is_one() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("a".into());
    let mut path = vec!["a".to_string()];
    assert_eq!(
        cycle_from(&graph, "a", "a", &mut path, &mut BTreeSet::new()),
        Some(vec!["a".to_string(), "b".to_string(), "a".to_string()])
    );
    let code =
        code_of("use crate::x;\n// crate::y\n#[cfg(test)]\nmod tests {\n    use crate::z;\n}\n");
    assert!(code.contains("crate::x") && !code.contains("crate::y") && !code.contains("crate::z"));
}
