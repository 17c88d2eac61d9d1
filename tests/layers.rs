//! The library's modules point one way (docs/ARCHITECTURE.md): each module of src/ may use only
//! modules of a lower layer, so that, for example, nothing under data/, lora/ or io/ imports
//! train/, and gpu/ and ops/ import nothing above them. The check reads every .rs file under
//! src/ (no build needed), collects its `crate::name` paths (also inside `use crate::{...}`
//! groups and in `super::`-free full paths anywhere in the code) and compares the layers.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use modules of its own entry only where the entry
/// says so (`autograd` and `ops`: the tape and the ops it records, each op defining its
/// backward rule, are one layer), and anything in a lower entry.
const LAYERS: &[&[&str]] = &[
    // Leaves: errors, random numbers, and the leaf file helpers every reader uses.
    &["error", "rng", "io::files"],
    &["gpu"],
    &["quant"],
    &["autograd+ops"],
    &["model"],
    &["data"],
    &["io"],
    &["lora", "generate"],
    &["train"],
    &["session"],
    &["web"],
];

/// The layer index and group name of a module path (`io::files`, `train`, ...).
fn layer_of(path: &str) -> Option<(usize, String)> {
    for (i, group) in LAYERS.iter().enumerate() {
        for g in group.iter() {
            for name in g.split('+') {
                if path == name || path.starts_with(&format!("{name}::")) {
                    // The most specific entry wins (io::files before io): checked below.
                    return Some((i, g.to_string()));
                }
            }
        }
    }
    None
}

/// Most specific layer: a leaf entry such as `io::files` is tried before its parent `io`.
fn layer_most_specific(path: &str) -> Option<(usize, String)> {
    let mut best: Option<(usize, String, usize)> = None;
    for (i, group) in LAYERS.iter().enumerate() {
        for g in group.iter() {
            for name in g.split('+') {
                if path == name || path.starts_with(&format!("{name}::")) {
                    let len = name.len();
                    if best.as_ref().is_none_or(|b| len > b.2) {
                        best = Some((i, g.to_string(), len));
                    }
                }
            }
        }
    }
    best.map(|(i, g, _)| (i, g)).or_else(|| layer_of(path))
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file under src/ (`src/io/files.rs` -> `io::files`, `src/web.rs` ->
/// `web`, `src/io/mod.rs` -> `io`); None for the crate root and the binary.
fn module_of(rel: &Path) -> Option<String> {
    let parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if parts[0] == "lib" || parts[0] == "bin" {
        return None;
    }
    let parts: Vec<&str> = parts.iter().map(|s| s.as_str()).filter(|s| *s != "mod").collect();
    Some(parts.join("::"))
}

/// Every `crate::a::b` path in `src` (comments and strings included: a doc link to a higher
/// layer is a reference too), with `crate::{x::y, z}` groups expanded one level.
fn crate_paths(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = src.as_bytes();
    let mut i = 0;
    while let Some(k) = src[i..].find("crate::") {
        let at = i + k;
        // `qlora_webgpu::...` or `some_crate::` do not count: `crate` must start a word.
        let word_start = at == 0 || !(b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_');
        let mut j = at + "crate::".len();
        if word_start {
            if j < b.len() && b[j] == b'{' {
                let end = src[j..].find('}').map(|e| j + e).unwrap_or(b.len());
                for item in src[j + 1..end].split(',') {
                    let item = item.trim();
                    if !item.is_empty() {
                        out.insert(item.split(" as ").next().unwrap().trim().to_string());
                    }
                }
                j = end;
            } else {
                let end = src[j..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                    .map(|e| j + e)
                    .unwrap_or(b.len());
                out.insert(src[j..end].trim_end_matches(':').to_string());
                j = end;
            }
        }
        i = j.max(at + 1);
    }
    out
}

#[test]
fn modules_use_only_lower_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&root, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut checked = 0;
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap();
        let Some(module) = module_of(rel) else { continue };
        let (from_layer, from_group) =
            layer_most_specific(&module).unwrap_or_else(|| panic!("{}: module `{module}` is in no layer of LAYERS", rel.display()));
        let text = std::fs::read_to_string(f).unwrap();
        for path in crate_paths(&text) {
            // `crate::Error`, `crate::Result`: the root's re-exports of error.
            let first = path.split("::").next().unwrap();
            if first == "Error" || first == "Result" {
                continue;
            }
            let Some((to_layer, to_group)) = layer_most_specific(&path) else {
                violations.push(format!("{}: `crate::{path}` names no module of LAYERS", rel.display()));
                continue;
            };
            checked += 1;
            let same_group = to_group == from_group;
            if to_layer > from_layer || (to_layer == from_layer && !same_group) {
                violations.push(format!(
                    "{} (layer {from_layer}, {from_group}) uses `crate::{path}` (layer {to_layer}, {to_group})",
                    rel.display()
                ));
            }
        }
    }
    assert!(checked > 100, "only {checked} crate paths found: the scan is broken");
    assert!(violations.is_empty(), "modules that use a higher layer:\n{}", violations.join("\n"));
}

/// The scan itself: grouped imports, nested paths and look-alikes.
#[test]
fn crate_paths_are_found() {
    let src = "use crate::{Error, Result};\nuse crate::io::files::read_regular;\n// see crate::train\nuse qlora_webgpu_crate::x;\nlet a = my_crate::y;";
    let got: Vec<String> = crate_paths(src).into_iter().collect();
    assert_eq!(got, ["Error", "Result", "io::files::read_regular", "train"]);
    assert_eq!(layer_most_specific("io::files::read_regular").unwrap().0, 0);
    assert_eq!(layer_most_specific("io::gguf").unwrap().1, "io");
    assert_eq!(layer_most_specific("ops::matmul").unwrap().1, "autograd+ops");
}
