//! The source tree reads as the data flow only while no layer imports one
//! above it (lib.rs lists the order). This reads every module's `crate::`
//! paths and fails on the first that points up, naming the file and the path.
use std::{
    fs,
    path::{Path, PathBuf},
};

/// Bottom to top, as in lib.rs's module docs.
const LAYERS: [&str; 7] = ["kernel", "enrich", "metrics", "pipeline", "gpu", "server", "cli"];
/// Shared by every layer: they may be imported from anywhere.
const SHARED: [&str; 2] = ["session", "error"];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == module)
}

/// The first segment of every `crate::` path in `text`, grouped imports
/// (`use crate::{a::b, c};`) included.
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split at commas outside nested braces.
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push(first_segment(&group[start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(first_segment(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(first_segment(rest));
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

fn first_segment(s: &str) -> String {
    s.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let Some(own) = rel.iter().next().and_then(|c| c.to_str()).and_then(rank) else {
            continue; // lib.rs, main.rs and the shared files sit above the layers' rules
        };
        for target in crate_paths(&fs::read_to_string(&file).unwrap()) {
            match rank(&target) {
                Some(r) if r > own => found.push(format!("{}: imports crate::{target}", rel.display())),
                None if !SHARED.contains(&target.as_str()) => found
                    .push(format!("{}: crate::{target} is in no layer (add it to LAYERS or SHARED)", rel.display())),
                _ => {}
            }
        }
    }
    found
}

#[test]
fn no_layer_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(found.is_empty(), "layering broken (order: {LAYERS:?}):\n{}", found.join("\n"));
}

#[test]
fn every_folder_is_a_layer_and_root_files_are_few() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut root_files = Vec::new();
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if path.is_dir() {
            assert!(rank(&name).is_some(), "src/{name}/ is not in LAYERS");
        } else {
            root_files.push(name);
        }
    }
    root_files.sort();
    assert_eq!(root_files, ["error.rs", "lib.rs", "main.rs", "session.rs"]);
}

#[test]
fn the_checker_sees_grouped_and_plain_paths() {
    let text = "use crate::{kernel::btf, metrics::{Metrics, labels}, session};\nlet x = crate::cli::run();";
    assert_eq!(crate_paths(text), ["kernel", "metrics", "session", "cli"]);
    let dir = std::env::temp_dir().join(format!("layers-test-{}", std::process::id()));
    fs::create_dir_all(dir.join("kernel")).unwrap();
    fs::write(dir.join("kernel/x.rs"), "use crate::metrics::Metrics;").unwrap();
    let found = violations(&dir);
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found, ["kernel/x.rs: imports crate::metrics"]);
}
