//! The folders of `gateway/src` are layers (see the crate docs): a module
//! may use modules of its own layer or of layers listed before it, never of
//! one listed after it. This test reads the sources and fails on the first
//! `crate::` path that points the wrong way, so an import cycle between
//! layers cannot creep back in.

use std::path::{Path, PathBuf};

/// Lowest first. `Shared` and the other items of the crate root are not
/// modules and may be used from anywhere.
const LAYERS: &[&str] = &[
    "config", "error", "headers", "observe", "edge", "spool", "upstream", "body", "respond",
    "cache", "overload", "pipeline", "admin", "demo",
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == module)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments and without its unit tests.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top modules a piece of code names with `crate::…`.
fn uses(code: &str) -> Vec<String> {
    code.match_indices("crate::")
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

#[test]
fn no_layer_uses_a_later_one() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    let mut seen = 0;
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        // The crate root and the binary wire everything together.
        let Some(own) = rank(&top) else {
            assert!(
                top == "lib" || top == "main",
                "{} is in no layer: add its folder to LAYERS",
                rel.display()
            );
            continue;
        };
        seen += 1;
        for used in uses(&code(&std::fs::read_to_string(&file).unwrap())) {
            if rank(&used).is_some_and(|r| r > own) {
                wrong.push(format!("{} uses crate::{used}", rel.display()));
            }
        }
    }
    assert!(seen > 40, "read only {seen} files");
    assert!(
        wrong.is_empty(),
        "layers used upwards:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_scan_sees_an_upward_use() {
    let upward = code("use crate::pipeline::Stop; // crate::admin\nfn f() {}\n");
    assert_eq!(uses(&upward), ["pipeline"]);
    let tests_only = code("fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::demo;\n}\n");
    assert!(uses(&tests_only).is_empty());
}
