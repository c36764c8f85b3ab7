//! Builds the demo's guest filter (`wasm-plugins/add-headers`) for
//! `wasm32-wasip1`, so `flashgate demo` shows a Wasm filter from a plain
//! `cargo run`. The module is embedded with `include_bytes!`
//! (`demo::wasm`); see docs/decisions.md ("The demo's Wasm filter").
//!
//! The gateway build never fails because of this: without the target (or
//! without `wasm-plugins/`, or if the guest build fails) an empty file is
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

const GUEST: &str = "add_headers";
const GUEST_PACKAGE: &str = "add-headers";
const TARGET: &str = "wasm32-wasip1";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let plugins = manifest.join("../wasm-plugins");
    let dest = out.join("demo-filter.wasm");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=FLASHGATE_SKIP_WASM_BUILD");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    for p in ["Cargo.toml", "Cargo.lock", GUEST_PACKAGE] {
        println!("cargo:rerun-if-changed={}", plugins.join(p).display());
    }
    let note = match build(&plugins, &out) {
        Ok(wasm) => match std::fs::copy(&wasm, &dest) {
            Ok(_) => "built".to_string(),
            Err(e) => format!("copying {}: {e}", wasm.display()),
        },
        Err(why) => why,
    };
    if note != "built" {
        println!("cargo:warning=the demo runs without its Wasm filter: {note}");
        std::fs::write(&dest, b"").expect("writing to OUT_DIR");
    }
    println!("cargo:rustc-env=FLASHGATE_DEMO_WASM_NOTE={note}");
}

/// Builds the guest; the path of its `.wasm`, or why there is none.
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
        .args(["build", "--release", "--locked", "--target", TARGET, "-p"])
        .arg(GUEST_PACKAGE);
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
            "building wasm-plugins/{GUEST_PACKAGE} failed: {}",
            last.unwrap_or("no output")
        ));
    }
    Ok(target_dir.join(format!("{TARGET}/release/{GUEST}.wasm")))
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
