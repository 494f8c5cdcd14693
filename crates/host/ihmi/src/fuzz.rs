//! The fuzz targets of `fuzz/` (cargo-fuzz, libFuzzer): built once with the nightly toolchain, then
//! each run for a fixed budget from a fresh copy of its checked-in corpus, so a run never changes the
//! repository. A crash is a failure, with the input that caused it kept for reproduction.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::images::{cargo, Layout};

/// The targets, in the order they run (`fuzz/Cargo.toml` declares each).
pub const TARGETS: &[&str] = &[
    "btf_parse",
    "bzimage",
    "multiboot_image",
    "linux_profile",
    "memory_map",
    "hypercall",
    "handle_exit",
    "monitor_handle",
];

/// The budget per target in `ihmi test`.
pub const DEFAULT_SECONDS: u64 = 20;

/// The cargo-fuzz release the project uses (BRIEF.md §3: it builds from crates.io here).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Seconds one input may take before libFuzzer calls it a hang and fails the run: a loop a header
/// field controls (the fuzzer found one in `Kernel::place`), not slowness.
const UNIT_TIMEOUT_SECS: u64 = 5;

/// One target's result.
#[derive(Debug)]
pub struct Outcome {
    pub passed: bool,
    pub elapsed: Duration,
    /// libFuzzer's summary line (`Done N runs in S second(s)`), or why it failed.
    pub detail: String,
}

fn fuzz_dir(layout: &Layout) -> PathBuf {
    layout.root.join("fuzz")
}

/// cargo-fuzz and a nightly toolchain, installing cargo-fuzz from crates.io if it is missing.
pub fn ensure_tools() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !nightly {
        bail!(
            "fuzzing needs a nightly toolchain (libFuzzer's sanitizer flags): `rustup toolchain install nightly`, or run `ihmi test --no-fuzz`"
        );
    }
    let have = Command::new(cargo())
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(());
    }
    eprintln!("[ihmi] installing cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io (about 2 minutes)");
    let status = Command::new(cargo())
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .stdin(Stdio::null())
        .status()
        .context("could not run cargo install")?;
    if !status.success() {
        bail!("`cargo install cargo-fuzz --locked` failed ({status}); install it by hand");
    }
    Ok(())
}

/// `cargo +nightly fuzz` in `fuzz/`, without the host build's flags.
fn fuzz_command(layout: &Layout) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(fuzz_dir(layout))
        .arg("+nightly")
        .arg("fuzz")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdin(Stdio::null());
    cmd
}

/// Builds every target (optimised, with sanitizers and debug assertions, as cargo-fuzz does).
pub fn build(layout: &Layout) -> Result<()> {
    eprintln!("[ihmi] $ cargo +nightly fuzz build -O (in fuzz/)");
    let status = fuzz_command(layout)
        .args(["build", "-O"])
        .status()
        .context("could not run cargo fuzz")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status}): fix the errors above");
    }
    Ok(())
}

/// Runs `target` for `seconds` from a copy of its corpus under `target/fuzz/`.
pub fn run(layout: &Layout, target: &'static str, seconds: u64) -> Result<Outcome> {
    let work = layout.root.join("target/fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    if corpus.exists() {
        fs::remove_dir_all(&corpus)
            .with_context(|| format!("cannot clear {}", corpus.display()))?;
    }
    fs::create_dir_all(&corpus)?;
    fs::create_dir_all(&artifacts)?;
    let seeds = fuzz_dir(layout).join("corpus").join(target);
    let mut seeded = 0;
    if seeds.is_dir() {
        for entry in fs::read_dir(&seeds)? {
            let entry = entry?;
            fs::copy(entry.path(), corpus.join(entry.file_name()))?;
            seeded += 1;
        }
    }
    eprintln!("[ihmi] fuzzing {target} for {seconds} s ({seeded} seeds)");
    let started = Instant::now();
    let output = fuzz_command(layout)
        .args(["run", "-O", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-rss_limit_mb=2048")
        .arg(format!("-timeout={UNIT_TIMEOUT_SECS}"))
        .output()
        .context("could not run cargo fuzz")?;
    let elapsed = started.elapsed();
    let log = String::from_utf8_lossy(&output.stderr);
    let done = log
        .lines()
        .rev()
        .find(|l| l.starts_with("Done "))
        .map(str::to_string);
    Ok(match (output.status.success(), done) {
        (true, Some(summary)) => Outcome {
            passed: true,
            elapsed,
            detail: summary,
        },
        (true, None) => Outcome {
            passed: false,
            elapsed,
            detail: "libFuzzer ended without its summary line".to_string(),
        },
        (false, _) => {
            let why = log
                .lines()
                .find(|l| l.contains("ERROR:") || l.contains("panicked at"))
                .unwrap_or("libFuzzer failed");
            let saved = latest_artifact(&artifacts)
                .map(|p| format!("; input saved to {}", relative(layout, &p).display()))
                .unwrap_or_default();
            Outcome {
                passed: false,
                elapsed,
                detail: format!("{}{saved}", why.trim()),
            }
        }
    })
}

fn latest_artifact(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

fn relative<'a>(layout: &Layout, path: &'a Path) -> &'a Path {
    path.strip_prefix(&layout.root).unwrap_or(path)
}

/// The target called `name`.
pub fn target(name: &str) -> Result<&'static str> {
    TARGETS
        .iter()
        .copied()
        .find(|t| *t == name)
        .with_context(|| {
            format!(
                "no fuzz target `{name}`; the targets are: {}",
                TARGETS.join(", ")
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_declared_and_has_a_corpus() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../fuzz");
        let manifest = fs::read_to_string(root.join("Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "{t} is a [[bin]] of fuzz/Cargo.toml"
            );
            assert!(root.join("fuzz_targets").join(format!("{t}.rs")).is_file());
            let seeds = fs::read_dir(root.join("corpus").join(t)).unwrap().count();
            assert!(seeds > 0, "{t} has a checked-in corpus");
        }
        assert!(TARGETS.len() >= 5);
        assert!(target("nope")
            .unwrap_err()
            .to_string()
            .contains("btf_parse"));
    }
}
