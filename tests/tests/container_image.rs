//! The Dockerfile, checked without a container engine: it is parsed into
//! stages and instructions; every path copied from the build context
//! exists in the repository; every path copied from the build stage is one
//! that stage makes (a workspace binary under the target dir, a copied
//! source folder, or a folder its `RUN` creates); the guest filters it
//! installs are crates of `wasm-plugins/`; the runtime runs as the user
//! deploy/gateway.yaml expects, not root, without `HEALTHCHECK`; and the
//! manifests and docs point at it.

use std::path::Path;

use flashgate_tests::repo_root;

struct Instruction {
    op: String,
    args: String,
}

struct Stage {
    name: Option<String>,
    instructions: Vec<Instruction>,
}

/// Instructions with continuation lines joined and comments dropped,
/// grouped by `FROM`.
fn parse(text: &str) -> Vec<Stage> {
    let mut logical = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
        } else {
            cur.push_str(t);
            logical.push(std::mem::take(&mut cur));
        }
    }
    assert!(cur.is_empty(), "a continued line at the end");
    let mut stages: Vec<Stage> = Vec::new();
    for l in logical {
        let (op, args) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let op = op.to_ascii_uppercase();
        let args = args.trim().to_string();
        if op == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                [_] => None,
                _ => panic!("FROM {args}"),
            };
            stages.push(Stage {
                name,
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .expect("FROM comes first")
                .instructions
                .push(Instruction { op, args });
        }
    }
    stages
}

/// `COPY [--from=X] src... dest` (shell form): the `--from`, the sources
/// and the destination.
fn copy_parts(args: &str) -> (Option<String>, Vec<String>, String) {
    let mut from = None;
    let mut words = Vec::new();
    for w in args.split_whitespace() {
        if let Some(f) = w.strip_prefix("--from=") {
            from = Some(f.to_string());
        } else if w.starts_with("--") {
            // --chown, --chmod, --link: not paths.
        } else {
            words.push(w.to_string());
        }
    }
    assert!(
        !args.trim_start().starts_with('['),
        "shell form COPY only: {args}"
    );
    let dest = words.pop().expect("COPY has a destination");
    assert!(!words.is_empty(), "COPY has a source: {args}");
    (from, words, dest)
}

/// The binaries the workspace builds: `[[bin]]` names and packages with a
/// `src/main.rs`.
fn workspace_binaries(root: &Path) -> Vec<String> {
    let mut bins = Vec::new();
    for member in ["gateway", "order-core", "filters", "bench/hello", "tests"] {
        let manifest = std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap();
        for block in manifest.split("[[bin]]").skip(1) {
            if let Some(name) = block
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = "))
                .map(|n| n.trim_matches('"').to_string())
            {
                bins.push(name);
            }
        }
    }
    bins
}

#[test]
fn dockerfile_copies_only_what_exists() {
    let root = repo_root();
    let text = std::fs::read_to_string(root.join("Dockerfile")).expect("a Dockerfile at the root");
    let stages = parse(&text);
    assert!(stages.len() >= 2, "multi-stage: build, then runtime");
    let build = &stages[0];
    let build_name = build.name.clone().expect("the build stage is named");
    let workdir = build
        .instructions
        .iter()
        .rev()
        .find(|i| i.op == "WORKDIR")
        .map(|i| i.args.clone())
        .expect("the build stage has a WORKDIR");
    let binaries = workspace_binaries(&root);
    let target_dir = build
        .instructions
        .iter()
        .find_map(|i| {
            (i.op == "ENV")
                .then(|| i.args.strip_prefix("CARGO_TARGET_DIR="))
                .flatten()
        })
        .map(|t| t.to_string())
        .unwrap_or_else(|| format!("{workdir}/target"));
    let runs: String = build
        .instructions
        .iter()
        .filter(|i| i.op == "RUN")
        .map(|i| i.args.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let mut copied_into_build = Vec::new();
    for (n, stage) in stages.iter().enumerate() {
        for i in stage
            .instructions
            .iter()
            .filter(|i| i.op == "COPY" || i.op == "ADD")
        {
            assert_eq!(i.op, "COPY", "ADD fetches and unpacks: COPY only");
            let (from, sources, dest) = copy_parts(&i.args);
            match from {
                None => {
                    for s in &sources {
                        let p = root.join(s.trim_end_matches('/'));
                        assert!(p.exists(), "COPY {s}: {} does not exist", p.display());
                        let abs = if dest.starts_with('/') {
                            dest.clone()
                        } else if dest == "./" || dest == "." {
                            format!("{workdir}/{s}")
                        } else {
                            format!("{workdir}/{}", dest.trim_end_matches('/'))
                        };
                        copied_into_build.push((abs.trim_end_matches('/').to_string(), s.clone()));
                    }
                }
                Some(f) => {
                    assert_eq!(f, build_name, "stage {n} copies from the build stage");
                    for s in &sources {
                        let s = s.trim_end_matches('/');
                        if let Some(bin) = s.strip_prefix(&format!("{target_dir}/release/")) {
                            assert!(
                                binaries.contains(&bin.to_string()),
                                "{bin} is not a workspace binary: {binaries:?}"
                            );
                            assert!(runs.contains("--release"), "a release build makes {s}");
                        } else if let Some((_, src)) =
                            copied_into_build.iter().find(|(abs, _)| abs == s)
                        {
                            assert!(root.join(src).exists(), "{src}");
                        } else {
                            assert!(
                                runs.contains(&format!("mkdir -p {s}")),
                                "COPY --from={f} {s}: nothing in the build stage makes it"
                            );
                        }
                    }
                }
            }
        }
    }
    // The guest filters it installs are crates of wasm-plugins/.
    let plugins = std::fs::read_to_string(root.join("wasm-plugins/Cargo.toml")).unwrap();
    let cp_loop = runs
        .split("for f in ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .expect("the build stage copies the guest filters");
    for crate_name in cp_loop.split_whitespace() {
        let dir = crate_name.replace('_', "-");
        assert!(
            plugins.contains(&format!("\"{dir}\""))
                && root.join("wasm-plugins").join(&dir).is_dir(),
            "{crate_name} is not a guest filter crate"
        );
    }
    // The runtime: non-root, the user the manifests run as, no HEALTHCHECK.
    let runtime = stages.last().unwrap();
    assert!(
        stages
            .iter()
            .all(|s| s.instructions.iter().all(|i| i.op != "HEALTHCHECK")),
        "no HEALTHCHECK: the kubelet's probes do it"
    );
    let user = runtime
        .instructions
        .iter()
        .rev()
        .find(|i| i.op == "USER")
        .map(|i| i.args.clone())
        .expect("the runtime sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "non-root: {user}");
    let manifest = std::fs::read_to_string(root.join("deploy/gateway.yaml")).unwrap();
    assert!(
        manifest.contains(&format!("runAsUser: {uid}")),
        "deploy/gateway.yaml runs as the image's user {uid}"
    );
    assert!(
        manifest.contains("Dockerfile"),
        "deploy/gateway.yaml names the Dockerfile"
    );
    let deploy_doc = std::fs::read_to_string(root.join("docs/deploy.md")).unwrap();
    assert!(
        deploy_doc.contains("Dockerfile"),
        "docs/deploy.md explains the image"
    );
    let entry = runtime
        .instructions
        .iter()
        .find(|i| i.op == "ENTRYPOINT")
        .expect("an ENTRYPOINT");
    assert!(
        entry.args.contains("/usr/local/bin/flashgate"),
        "{}",
        entry.args
    );
}
