//! Builds the demo's guest filters (`wasm-plugins/add-headers` and
//! `wasm-plugins/degrade-recommendations`) for `wasm32-wasip1`, so
//! `flashgate demo` shows Wasm filters from a plain `cargo run`. The
//! modules are embedded with `include_bytes!` (`demo::wasm`); see
//! docs/decisions.md ("The demo's Wasm filter").
//!
//! The gateway build never fails because of this: without the target (or
//! without `wasm-plugins/`, or if the guest build fails) empty files are
//! embedded and the demo says how to add the target.
//!
//! The guests are built by a second cargo with its own target dir
//! (`<target dir>/wasm-guests`): sharing the caller's would deadlock on its
//! build lock. Cargo reruns this script only when the guest's sources, the
//! guest workspace's manifest or lock file, or the installed targets change,
//! so a build with nothing changed stays as fast as before.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Each guest: its package, the module cargo writes, and the file in
/// `OUT_DIR` that `demo::wasm` embeds. Built by one cargo call.
const GUESTS: &[(&str, &str, &str)] = &[
    ("add-headers", "add_headers", "demo-filter.wasm"),
    (
        "degrade-recommendations",
        "degrade_recommendations",
        "demo-degrade.wasm",
    ),
];
const TARGET: &str = "wasm32-wasip1";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let plugins = manifest.join("../wasm-plugins");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=FLASHGATE_SKIP_WASM_BUILD");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    for p in ["Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", plugins.join(p).display());
    }
    for (package, _, _) in GUESTS {
        println!("cargo:rerun-if-changed={}", plugins.join(package).display());
    }
    let copy = |dir: &Path| -> Result<(), String> {
        for (_, module, dest) in GUESTS {
            let wasm = dir.join(format!("{module}.wasm"));
            std::fs::copy(&wasm, out.join(dest))
                .map_err(|e| format!("copying {}: {e}", wasm.display()))?;
        }
        Ok(())
    };
    let note = match build(&plugins, &out).and_then(|dir| copy(&dir)) {
        Ok(()) => "built".to_string(),
        Err(why) => why,
    };
    if note != "built" {
        println!("cargo:warning=the demo runs without its Wasm filters: {note}");
        for (_, _, dest) in GUESTS {
            std::fs::write(out.join(dest), b"").expect("writing to OUT_DIR");
        }
    }
    println!("cargo:rustc-env=FLASHGATE_DEMO_WASM_NOTE={note}");
}

/// Builds the guests; the directory of their `.wasm` files, or why there
/// are none.
fn build(plugins: &Path, out: &Path) -> Result<PathBuf, String> {
    if env::var_os("FLASHGATE_SKIP_WASM_BUILD").is_some() {
        return Err("FLASHGATE_SKIP_WASM_BUILD is set".into());
    }
    if !plugins.join("Cargo.toml").is_file() {
        return Err("wasm-plugins/ is not in the source tree".into());
    }
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .ok_or("`rustc --print sysroot` failed")?;
    // Adding a target adds a directory here: the script runs again then.
    let rustlib = sysroot.join("lib/rustlib");
    println!("cargo:rerun-if-changed={}", rustlib.display());
    if !rustlib.join(TARGET).is_dir() {
        return Err(format!(
            "the {TARGET} target is not installed (rustup target add {TARGET})"
        ));
    }
    let target_dir = target_root(out).join("wasm-guests");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(plugins)
        .args(["build", "--release", "--locked", "--target", TARGET]);
    for (package, _, _) in GUESTS {
        cmd.args(["-p", package]);
    }
    // What the outer build set for the host must not reach the guest build
    // (clippy's wrapper, host rustflags, a forced target).
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CARGO_TARGET_DIR", &target_dir);
    let output = cmd
        .output()
        .map_err(|e| format!("running cargo for wasm-plugins/: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        return Err(format!(
            "building the demo's guests in wasm-plugins/ failed: {}",
            last.unwrap_or("no output")
        ));
    }
    Ok(target_dir.join(format!("{TARGET}/release")))
}

/// The caller's target dir (`CARGO_TARGET_DIR`, else the ancestor cargo
/// tagged with `CACHEDIR.TAG`), so debug and release builds share one
/// guest build; else `OUT_DIR` itself.
fn target_root(out: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("CARGO_TARGET_DIR").filter(|d| Path::new(d).is_absolute()) {
        return PathBuf::from(dir);
    }
    out.ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .unwrap_or(out)
        .to_path_buf()
}
