#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod attacks;
mod bench;
mod bochs;
mod cpio;
mod cpu;
mod demo;
mod deps;
mod events;
mod fuzz;
mod images;
mod kernel;
mod linux;
mod scenario;
mod symbols;
mod template;
mod verdict;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::bochs::{RunOptions, RunReport};
use crate::cpu::CpuModel;
use crate::images::Layout;
use crate::scenario::Scenario;

/// Lines of the E9 stream and of the Bochs log shown after a FAIL.
const TAIL_LINES: usize = 30;
const DEFAULT_TIMEOUT_SECS: u64 = 300;
const DEFAULT_MEGS: u32 = 256;

/// Exit code when `ihmi` could not do its job at all (as opposed to a scenario that FAILed).
const EXIT_ERROR: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "ihmi",
    version,
    about = "Build the ihmi images and run L0 scenarios under Bochs"
)]
struct Cli {
    /// Bochs CPU model to emulate (`ihmi models` lists them and their VMX features)
    #[arg(long, global = true, value_name = "MODEL", default_value = cpu::DEFAULT_MODEL)]
    cpu: String,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build L0, the test guest and one GRUB ISO per known scenario; print their paths
    Build,
    /// Build, then boot one scenario under Bochs; exit 0 on PASS, 1 on FAIL
    Run {
        /// Scenario name, passed to L0 as `scenario=<name>` (none with --kernel)
        #[arg(required_unless_present = "kernel", conflicts_with = "kernel")]
        scenario: Option<String>,
        /// Boot this multiboot kernel (v1 or v2; ELF32, ELF64 or address fields) as L0's guest
        /// instead of a scenario's: L0 is its boot loader. It passes if it powers off through port
        /// 0x8900 or exits with 0 through the isa-debug-exit port 0xF4 (as kvm-unit-tests do)
        #[arg(long, value_name = "FILE")]
        kernel: Option<PathBuf>,
        /// A module for the --kernel, `FILE [ARGS]` (its command line is the file's name and the
        /// arguments, as GRUB gives it); up to 4, in order
        #[arg(long, value_name = "FILE [ARGS]", allow_hyphen_values = true)]
        module: Vec<String>,
        /// Boot the --kernel by this multiboot protocol (default: multiboot2 if it has that header)
        #[arg(long, value_name = "1|2", value_parser = clap::value_parser!(u8).range(1..=2))]
        multiboot: Option<u8>,
        /// Offer the --kernel VMX, as to a guest hypervisor (nested EPT, VMCS shadowing)
        #[arg(long)]
        nested: bool,
        /// Kill Bochs and FAIL after this many seconds [default: 300, 1800 for the slow scenarios]
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        timeout: Option<u64>,
        /// Guest RAM in MiB (L0 itself sits at 64 MiB)
        #[arg(long, value_name = "N", default_value_t = DEFAULT_MEGS,
              value_parser = clap::value_parser!(u32).range(96..))]
        megs: u32,
        /// Do not stream the serial console (COM1)
        #[arg(long)]
        quiet: bool,
        /// The kernel's command line: for Linux scenarios [default: "console=ttyS0,115200 nokaslr
        /// panic=-1"], or the --kernel's arguments (after its file name, which comes first)
        #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
        cmdline: Option<String>,
        /// Which Linux kernel Linux scenarios boot: `tiny` (built here), `debian` (Debian's stock
        /// kernel, downloaded; about 80 s to boot under Bochs) or `l1` (`tiny` with KVM built in,
        /// which the nested scenarios boot whatever this says)
        #[arg(long, value_enum, default_value_t = linux::Profile::Tiny)]
        profile: linux::Profile,
        /// Programs a Linux guest may run, by content: comma-separated paths of files in the
        /// initramfs (the host hashes them) or `sha256:<64 hex digits>`. A program whose SHA-256 is
        /// not listed is refused, whatever its name or path. `--allow ''` turns enforcement off
        #[arg(long, value_name = "PROGRAMS", default_value = linux::DEFAULT_ALLOW)]
        allow: String,
        /// Write the monitor's events to this file, one JSON object per line
        #[arg(long, value_name = "FILE")]
        events: Option<PathBuf>,
    },
    /// Boot the `tiny` Linux with the system-call and process-creation monitors in the box, run a
    /// short workload (one program not on the allow-list), show the events live, then a summary;
    /// exit 0 on PASS
    Demo {
        /// Also write the monitor's events to this file, one JSON object per line
        #[arg(long, value_name = "FILE")]
        events: Option<PathBuf>,
        /// Which Linux kernel: `tiny` (built here; the demo takes about 30 s under Bochs) or `debian`
        /// (Debian's stock kernel, downloaded; about 105 s)
        #[arg(long, value_enum, default_value_t = linux::Profile::Tiny)]
        profile: linux::Profile,
        /// In-hypervisor monitoring instead: Linux with KVM built in (the `l1` kernel) as L1 under
        /// L0, the monitor in the box and hooked into KVM's exit path, KVM running the L1 VMM's
        /// probe L2 while L1's root rewrites an entry of KVM's exit-handler table (about 80 s)
        #[arg(long, conflicts_with = "profile")]
        nested: bool,
    },
    /// Run the host unit tests, every fuzz target for a fixed time, the Bochs harness's own tests,
    /// then every Bochs scenario the CPU model can run (the others are refused before booting, with
    /// the reason); exit non-zero if anything failed
    Test {
        /// Skip `cargo test --workspace` and the Bochs harness's tests
        #[arg(long)]
        no_unit: bool,
        /// Skip the fuzz targets
        #[arg(long)]
        no_fuzz: bool,
        /// Seconds each fuzz target runs
        #[arg(long, value_name = "SECS", default_value_t = fuzz::DEFAULT_SECONDS,
              value_parser = clap::value_parser!(u64).range(1..))]
        fuzz_seconds: u64,
        /// Run only this Bochs scenario (and neither the unit tests' nor the fuzzers' absence is
        /// implied: combine with --no-unit and --no-fuzz)
        #[arg(long, value_name = "NAME")]
        only: Option<String>,
    },
    /// Run the fuzz targets (cargo-fuzz, libFuzzer) for a fixed time each, from their checked-in
    /// corpora; exit non-zero if one found a crash
    Fuzz {
        /// Seconds each target runs
        #[arg(long, value_name = "SECS", default_value_t = fuzz::DEFAULT_SECONDS,
              value_parser = clap::value_parser!(u64).range(1..))]
        seconds: u64,
        /// Only these targets (default: all)
        targets: Vec<String>,
    },
    /// Run the attack suite (BRIEF.md section 4) and print whether each attack was blocked, reported
    /// and survived with the monitor intact; exit 0 only if all were
    Attacks {
        /// One JSON object per attack instead of the table
        #[arg(long)]
        json: bool,
    },
    /// Run the invocation benchmark (no monitor, in-box, out-of-box) and print per-call instructions,
    /// VM exits, VMFUNCs, CR3 loads, modeled cycles and Bochs wall time
    Bench {
        /// One JSON object per measurement after the table
        #[arg(long)]
        json: bool,
        /// The Linux overhead benchmark instead: a system-call loop and a fork + exec loop in the
        /// `tiny` Linux, per operation, with the overhead against no monitor
        #[arg(long, conflicts_with = "nested")]
        linux: bool,
        /// The nested-VMX cost benchmark instead: L0 exits per exit of L2 that goes to L1, by kind,
        /// without and with VMCS shadowing (our test guest as L1)
        #[arg(long)]
        nested: bool,
    },
    /// List the Bochs CPU models and which VMX features each exposes
    Models,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Models => {
            print!("{}", cpu::table());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Build => {
            cpu::select(&cli.cpu, scenario::BASE, "L0")?;
            build(&scenario::known().map(|s| s.name).collect::<Vec<_>>())
        }
        Cmd::Run {
            scenario,
            kernel,
            module,
            multiboot,
            nested,
            timeout,
            megs,
            quiet,
            cmdline,
            profile,
            allow,
            events,
        } => {
            let user = match &kernel {
                Some(k) => Some(user_kernel(k, cmdline.as_deref(), &module, multiboot)?),
                None if !module.is_empty() || multiboot.is_some() || nested => {
                    bail!("--module, --multiboot and --nested are for a kernel of yours: add --kernel FILE")
                }
                None => None,
            };
            let scenario = match (scenario, user.is_some()) {
                (Some(s), _) => s,
                (None, true) if nested => ihmi_abi::Scenario::KernelNested.name().to_string(),
                (None, _) => ihmi_abi::Scenario::Kernel.name().to_string(),
            };
            if user.is_none() && is_user_scenario(&scenario) {
                bail!("scenario `{scenario}` boots a kernel of yours: `ihmi run --kernel FILE`");
            }
            let opts = RunOptions {
                cpu: model_for(&cli.cpu, &scenario)?,
                megs,
                timeout: timeout.map_or_else(
                    || {
                        scenario::batch_timeout(&scenario)
                            .unwrap_or(Duration::from_secs(DEFAULT_TIMEOUT_SECS))
                    },
                    Duration::from_secs,
                ),
                quiet,
            };
            if !scenario::is_known(&scenario) && !is_user_scenario(&scenario) {
                eprintln!(
                    "[ihmi] note: `{scenario}` is not in ihmi's scenario list ({}); running \
                     it anyway",
                    scenario::test_names()
                );
            }
            let cmdline = match (&user, cmdline) {
                (None, Some(c)) => c,
                _ => linux::DEFAULT_CMDLINE.to_string(),
            };
            let guest = linux::GuestOptions {
                kernel: user,
                ..linux::GuestOptions::new(profile, cmdline, allow)?
            };
            run_one(&scenario, &opts, &guest, events.as_deref()).map(|r| exit_code(&r))
        }
        Cmd::Demo {
            events,
            profile,
            nested,
        } => {
            let name = if nested {
                scenario::NESTED_DEMO
            } else {
                scenario::LINUX_DEMO
            };
            let opts = RunOptions {
                cpu: model_for(&cli.cpu, name)?,
                megs: DEFAULT_MEGS,
                timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
                quiet: false,
            };
            if nested {
                eprintln!(
                    "[ihmi] demo: L0 runs Linux with KVM built in (the `l1` kernel) as L1, with the in-hypervisor monitor in the box and hooked into KVM's exit path; KVM runs the L1 VMM's probe L2 while L1's root rewrites an entry of KVM's exit-handler table"
                );
            } else {
                eprintln!(
                    "[ihmi] demo: Linux (the `{}` profile) with the in-box system-call and process-creation monitors; allow-list {}",
                    profile.name(),
                    linux::DEFAULT_ALLOW
                );
            }
            let guest = linux::GuestOptions {
                profile,
                ..linux::GuestOptions::default()
            };
            let report = run_one(name, &opts, &guest, events.as_deref())?;
            // The summary only for a run that passed: L0 checked the events first.
            if report.verdict.is_pass() {
                print!("{}", demo::Summary::from_output(&report.e9)?.render());
            }
            Ok(exit_code(&report))
        }
        Cmd::Test {
            no_unit,
            no_fuzz,
            fuzz_seconds,
            only,
        } => test(
            &cli.cpu,
            no_unit,
            (!no_fuzz).then_some(fuzz_seconds),
            only.as_deref(),
        ),
        Cmd::Fuzz { seconds, targets } => run_fuzz(seconds, &targets),
        Cmd::Attacks { json } => run_attacks(&cli.cpu, json),
        Cmd::Bench {
            json, nested: true, ..
        } => run_nested_bench(&cli.cpu, json),
        Cmd::Bench { json, linux, .. } => run_bench(&cli.cpu, json, linux),
    }
}

fn run_bench(cpu_name: &str, json: bool, linux: bool) -> Result<ExitCode> {
    let model = cpu::select(cpu_name, scenario::BASE, "the benchmark")?;
    // In-box needs VMFUNC; on a CPU without it the other two modes still run, and the table says why
    // one is missing.
    let inbox_ok = cpu::select(cpu_name, scenario::IN_BOX, "in-box monitoring").is_ok();
    let set: &[scenario::Scenario] = if linux {
        &scenario::LINUX_BENCH_SCENARIOS
    } else {
        &scenario::BENCH_SCENARIOS
    };
    let names: Vec<&str> = set
        .iter()
        .map(|s| s.name)
        .filter(|n| inbox_ok || !n.ends_with("-inbox"))
        .collect();
    let mut rows = Vec::new();
    let ok = run_benchmarks(model, &names, |_, report| {
        rows.extend(bench::parse(&report.e9, &report.e9_arrivals)?);
        Ok(())
    })?;
    if !inbox_ok {
        println!(
            "[ihmi] no in-box rows: CPU model {} has no VMFUNC EPTP switching",
            model.name
        );
    }
    print!(
        "{}",
        if linux {
            bench::linux_table(&rows)
        } else {
            bench::table(&rows)
        }
    );
    if json {
        for r in &rows {
            println!("{}", r.to_json());
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Builds the images of `names`, runs each on `model`, and hands each one that passed to `row`;
/// one that failed is reported as `ihmi run` would. Whether all passed.
fn run_benchmarks(
    model: &'static CpuModel,
    names: &[&str],
    mut row: impl FnMut(&str, &bochs::RunReport) -> Result<()>,
) -> Result<bool> {
    let layout = Layout::discover()?;
    bochs::install_interrupt_handler()?;
    build_images(&layout, names, &linux::GuestOptions::default())?;
    let opts = batch_options(model);
    let mut ok = true;
    for name in names {
        eprintln!("[ihmi] benchmark {name} (cpu {})", model.name);
        let report = bochs::run(&layout, name, &opts)?;
        if report.verdict.is_pass() {
            row(name, &report)?;
        } else {
            print_result(&layout, name, &report, None);
            ok = false;
        }
    }
    Ok(ok)
}

fn run_nested_bench(cpu_name: &str, json: bool) -> Result<ExitCode> {
    // The shadowed run needs VMCS shadowing; the other only VMX and EPT.
    let model = cpu::select(cpu_name, scenario::SHADOW, "the nested benchmark")?;
    let names: Vec<&str> = scenario::NESTED_BENCH_SCENARIOS
        .iter()
        .map(|s| s.name)
        .collect();
    let mut rows = Vec::new();
    let ok = run_benchmarks(model, &names, |name, report| {
        match bench::parse_nested(name, &report.e9, report.elapsed)? {
            Some(row) => rows.push(row),
            None => bail!("{name} passed but printed no `nested|` line"),
        }
        Ok(())
    })?;
    print!("{}", bench::nested_table(&rows));
    println!();
    print!("{}", bench::nested_monitor_table(&rows));
    println!();
    print!("{}", bench::nested_workload_table(&rows));
    if json {
        for r in &rows {
            println!("{}", serde_json::to_string(&r.line)?);
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run_attacks(cpu_name: &str, json: bool) -> Result<ExitCode> {
    let model = cpu::select(cpu_name, scenario::IN_BOX, "the attack suite")?;
    let layout = Layout::discover()?;
    bochs::install_interrupt_handler()?;
    let names: Vec<&str> = scenario::ATTACK_SCENARIOS.iter().map(|s| s.name).collect();
    build_images(&layout, &names, &linux::GuestOptions::default())?;
    let opts = batch_options(model);
    let mut reports = Vec::new();
    for (name, attack) in names.iter().zip(ihmi_abi::Attack::ALL) {
        eprintln!("[ihmi] attack {} (cpu {})", attack.name(), model.name);
        let item = u64::from(attack.brief_item());
        let report = match bochs::run(&layout, name, &opts) {
            Ok(run) => match (attacks::parse(&run.e9), &run.verdict) {
                (Ok(Some(r)), verdict::Verdict::Pass) => r,
                // L0's line said the attack failed, or the run failed around it: not a pass either way.
                (Ok(Some(mut r)), verdict::Verdict::Fail(why)) => {
                    if r.passed() {
                        r.blocked = false;
                        r.detail = format!("{}; but the run failed: {why}", r.detail);
                    }
                    r
                }
                (Ok(None), verdict::Verdict::Fail(why)) => {
                    attacks::missing(attack.name(), item, why)
                }
                (Ok(None), verdict::Verdict::Pass) => {
                    attacks::missing(attack.name(), item, "the run passed without one")
                }
                (Err(e), _) => attacks::missing(attack.name(), item, &format!("{e:#}")),
            },
            Err(e) => attacks::missing(attack.name(), item, &format!("{e:#}")),
        };
        if json {
            println!("{}", attacks::to_json(&report));
        }
        reports.push(report);
    }
    if !json {
        print!("{}", attacks::table(&reports));
    }
    Ok(if reports.iter().all(attacks::AttackReport::passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// How `test`, `bench` and `attacks` run each scenario: default size and timeout, console not streamed.
fn batch_options(model: &'static CpuModel) -> RunOptions {
    RunOptions {
        cpu: model,
        megs: DEFAULT_MEGS,
        timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
        quiet: true,
    }
}

/// The `--cpu` model, refused if it lacks what `scenario` needs.
/// The user's multiboot kernel, checked against L0's image (built first, so its span is known).
fn user_kernel(
    kernel: &Path,
    cmdline: Option<&str>,
    modules: &[String],
    protocol: Option<u8>,
) -> Result<kernel::UserKernel> {
    let layout = Layout::discover()?;
    images::build_bare(&layout)?;
    kernel::UserKernel::from_args(kernel, cmdline, modules, protocol, &layout.l0_elf())
}

/// Whether `name` is a scenario that boots the user's kernel.
fn is_user_scenario(name: &str) -> bool {
    ihmi_abi::Scenario::USER.iter().any(|s| s.name() == name)
}

fn model_for(name: &str, scenario: &str) -> Result<&'static CpuModel> {
    scenario::validate_name(scenario)?;
    Ok(cpu::select(
        name,
        scenario::requirements(scenario),
        &format!("scenario {scenario}"),
    )?)
}

/// Checks the host tools, builds L0 and the guest, and makes one ISO per scenario.
/// What `build_images` made: one ISO per scenario, and the Linux guest's images if one needed them.
struct Built {
    isos: Vec<PathBuf>,
    /// The System.map of each Linux kernel the scenarios boot.
    symbols: Vec<(linux::Profile, symbols::SystemMap)>,
}

impl Built {
    /// The System.map of the kernel `scenario` boots, if it boots Linux.
    fn symbols_of(
        &self,
        scenario: &str,
        guest: &linux::GuestOptions,
    ) -> Option<&symbols::SystemMap> {
        let profile = scenario::kernel_profile(scenario, guest.profile);
        scenario::is_linux(scenario)
            .then(|| self.symbols.iter().find(|(p, _)| *p == profile))
            .flatten()
            .map(|(_, map)| map)
    }
}

fn build_images(layout: &Layout, scenarios: &[&str], guest: &linux::GuestOptions) -> Result<Built> {
    deps::ensure()?;
    images::build_bare(layout)?;
    // The Linux guest's images are built (or found in the cache) once per kernel the scenarios boot:
    // the nested scenarios boot the `l1` kernel, the others the one `--profile` names.
    let mut linux: Vec<linux::LinuxImages> = Vec::new();
    for s in scenarios.iter().filter(|s| scenario::is_linux(s)) {
        let profile = scenario::kernel_profile(s, guest.profile);
        if linux.iter().any(|l| l.kernel_profile == profile) {
            continue;
        }
        let l = linux::prepare(
            layout,
            &linux::GuestOptions {
                profile,
                ..guest.clone()
            },
        )?;
        for i in &l.identities {
            eprintln!(
                "[ihmi] allowed program ({} kernel): {} (sha256 {})",
                profile.name(),
                i.label,
                i.sha256
            );
        }
        linux.push(l);
    }
    let isos = scenarios
        .iter()
        .map(|s| {
            let profile = scenario::kernel_profile(s, guest.profile);
            let l = linux
                .iter()
                .find(|l| scenario::is_linux(s) && l.kernel_profile == profile);
            images::make_iso(layout, s, l, guest.kernel.as_ref())
        })
        .collect::<Result<_>>()?;
    let mut symbols = Vec::new();
    for l in &linux {
        let map = symbols::SystemMap::load(&l.system_map)?;
        // The monitors hook these; a kernel without them is refused now, by name, not at boot.
        for name in linux::HOOK_SYMBOLS {
            map.require(name)?;
        }
        symbols.push((l.kernel_profile, map));
    }
    Ok(Built { isos, symbols })
}

fn build(scenarios: &[&str]) -> Result<ExitCode> {
    let layout = Layout::discover()?;
    let built = build_images(&layout, scenarios, &linux::GuestOptions::default())?;
    for path in [layout.l0_elf(), layout.guest_elf()]
        .iter()
        .chain(&built.isos)
    {
        println!("{}", relative(&layout, path).display());
    }
    Ok(ExitCode::SUCCESS)
}

fn run_one(
    scenario: &str,
    opts: &RunOptions,
    guest: &linux::GuestOptions,
    events: Option<&Path>,
) -> Result<RunReport> {
    let layout = Layout::discover()?;
    bochs::install_interrupt_handler()?;
    let built = build_images(&layout, &[scenario], guest)?;
    eprintln!(
        "[ihmi] booting scenario {scenario} under Bochs (cpu {}, {} MiB, timeout {} s)",
        opts.cpu.name,
        opts.megs,
        opts.timeout.as_secs()
    );
    let report = bochs::run(&layout, scenario, opts)?;
    print_result(
        &layout,
        scenario,
        &report,
        built.symbols_of(scenario, guest),
    );
    if let Some(path) = events {
        let s = events::write_events(&report.e9, path)?;
        let dropped = match s.dropped {
            Some(0) => "none dropped".to_string(),
            Some(n) => format!(
                "{n} DROPPED by the monitor's full ring (their sequence numbers are missing)"
            ),
            None => "no monitor in this run".to_string(),
        };
        println!(
            "[ihmi] {} events written to {} ({dropped})",
            s.events,
            path.display()
        );
    }
    Ok(report)
}

fn exit_code(report: &RunReport) -> ExitCode {
    if report.verdict.is_pass() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One result line per scenario, and the details a failure needs (with kernel symbols for the guest's
/// instruction pointers when the guest was Linux).
fn print_result(
    layout: &Layout,
    scenario: &str,
    report: &RunReport,
    symbols: Option<&symbols::SystemMap>,
) {
    let secs = report.elapsed.as_secs_f64();
    match &report.verdict {
        verdict::Verdict::Pass => println!("[ihmi] scenario {scenario}: PASS ({secs:.1} s)"),
        verdict::Verdict::Fail(reason) => {
            println!("[ihmi] scenario {scenario}: FAIL ({secs:.1} s): {reason}");
            let dir = relative(layout, &report.run_dir);
            print_tail(
                &format!("E9 console ({})", dir.join(bochs::OUTPUT).display()),
                &report.e9,
            );
            print_tail(
                &format!("Bochs log ({})", dir.join(bochs::LOG).display()),
                &report.log,
            );
            if let Some(map) = symbols.filter(|_| scenario::is_linux(scenario)) {
                for line in symbols::annotate(map, &report.e9) {
                    println!("[ihmi] {line}");
                }
            }
        }
    }
}

fn print_tail(what: &str, text: &str) {
    println!("[ihmi] --- last {TAIL_LINES} lines of the {what} ---");
    for line in verdict::tail(text, TAIL_LINES) {
        println!("{line}");
    }
    println!("[ihmi] --- end ---");
}

fn relative<'a>(layout: &Layout, path: &'a Path) -> &'a Path {
    path.strip_prefix(&layout.root).unwrap_or(path)
}

/// Builds the fuzz targets and runs `targets` (all when empty) for `seconds` each; one line per
/// target. Returns (passed, failed).
fn fuzz_checks(layout: &Layout, seconds: u64, targets: &[&'static str]) -> (usize, usize) {
    let prepared = fuzz::ensure_tools().and_then(|()| fuzz::build(layout));
    if let Err(err) = prepared {
        println!("[ihmi] fuzz targets: FAIL: {err:#}");
        return (0, targets.len().max(1));
    }
    let (mut passed, mut failed) = (0, 0);
    for target in targets {
        match fuzz::run(layout, target, seconds) {
            Ok(o) if o.passed => {
                println!(
                    "[ihmi] fuzz {target}: PASS ({:.1} s): {}",
                    o.elapsed.as_secs_f64(),
                    o.detail
                );
                passed += 1;
            }
            Ok(o) => {
                println!(
                    "[ihmi] fuzz {target}: FAIL ({:.1} s): {}",
                    o.elapsed.as_secs_f64(),
                    o.detail
                );
                failed += 1;
            }
            Err(err) => {
                println!("[ihmi] fuzz {target}: FAIL: {err:#}");
                failed += 1;
            }
        }
    }
    (passed, failed)
}

fn run_fuzz(seconds: u64, names: &[String]) -> Result<ExitCode> {
    let targets: Vec<&'static str> = if names.is_empty() {
        fuzz::TARGETS.to_vec()
    } else {
        names
            .iter()
            .map(|n| fuzz::target(n))
            .collect::<Result<_>>()?
    };
    let layout = Layout::discover()?;
    let (passed, failed) = fuzz_checks(&layout, seconds, &targets);
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn test(
    cpu_name: &str,
    no_unit: bool,
    fuzz_seconds: Option<u64>,
    only: Option<&str>,
) -> Result<ExitCode> {
    // Refuse what the model cannot run before spending minutes on unit tests.
    let plan = plan_tests(cpu_name, only)?;
    let layout = Layout::discover()?;
    bochs::install_interrupt_handler()?;

    let mut tally = Tally::default();
    if !no_unit {
        let started = Instant::now();
        let ok = unit_tests(&layout)?;
        let secs = started.elapsed().as_secs_f64();
        let word = if ok { "PASS" } else { "FAIL" };
        println!("[ihmi] unit tests (cargo test --workspace): {word} ({secs:.1} s)");
        tally.record(ok);
    }
    if let Some(seconds) = fuzz_seconds {
        let (p, f) = fuzz_checks(&layout, seconds, fuzz::TARGETS);
        tally.passed += p;
        tally.failed += f;
    }

    let names: Vec<&str> = plan.run.iter().map(|s| s.name).collect();
    match build_images(&layout, &names, &linux::GuestOptions::default()) {
        Err(err) => {
            // Every scenario fails without images; say why once and keep the summary honest.
            println!("[ihmi] building the images failed: {err:#}");
            for name in &names {
                println!("[ihmi] scenario {name}: FAIL (0.0 s): images were not built");
            }
            tally.failed += names.len();
        }
        Ok(built) => {
            // The Bochs harness's own tests need Bochs and GRUB, which building the images has just
            // made sure of.
            if !no_unit {
                tally.record(harness_tests(&layout)?);
            }
            let outputs = run_scenarios(&layout, plan.model, &names, &built, &mut tally);
            same_stream_checks(&names, &outputs, &mut tally);
        }
    }

    for (s, why) in &plan.refused {
        println!("[ihmi] scenario {}: REFUSED before booting: {why}", s.name);
    }
    let (passed, failed) = (tally.passed, tally.failed);
    if plan.refused.is_empty() {
        println!("{passed} passed, {failed} failed");
    } else {
        println!(
            "{passed} passed, {failed} failed, {} refused (cpu {} cannot run them)",
            plan.refused.len(),
            plan.model.name
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Checks passed and failed so far.
#[derive(Debug, Default)]
struct Tally {
    passed: usize,
    failed: usize,
}

impl Tally {
    fn record(&mut self, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }
}

/// Boots each scenario in turn; returns the E9 output of those that passed.
fn run_scenarios<'n>(
    layout: &Layout,
    model: &'static cpu::CpuModel,
    names: &[&'n str],
    built: &Built,
    tally: &mut Tally,
) -> HashMap<&'n str, String> {
    let batch = batch_options(model);
    let mut outputs = HashMap::new();
    for name in names {
        eprintln!("[ihmi] running scenario {name} (cpu {})", model.name);
        let opts = RunOptions {
            timeout: scenario::batch_timeout(name).unwrap_or(batch.timeout),
            ..batch
        };
        match bochs::run(layout, name, &opts) {
            Ok(report) => {
                print_result(
                    layout,
                    name,
                    &report,
                    built.symbols_of(name, &linux::GuestOptions::default()),
                );
                tally.record(report.verdict.is_pass());
                if report.verdict.is_pass() {
                    outputs.insert(*name, report.e9);
                }
            }
            Err(err) => {
                println!("[ihmi] scenario {name}: FAIL (0.0 s): {err:#}");
                tally.record(false);
            }
        }
    }
    outputs
}

/// The in-box and out-of-box monitors must see the same events for the same workload: one check
/// per pair of `scenario::SAME_STREAM` that ran.
fn same_stream_checks(names: &[&str], outputs: &HashMap<&str, String>, tally: &mut Tally) {
    for &(a, b, agreement) in scenario::SAME_STREAM {
        match (names.contains(&a), names.contains(&b)) {
            (true, true) => {}
            (false, false) => continue,
            (false, true) | (true, false) => {
                let absent = if names.contains(&a) { b } else { a };
                println!(
                    "[ihmi] check {a} = {b}: not run ({absent} is not among the scenarios run)"
                );
                continue;
            }
        }
        let check = match (outputs.get(a), outputs.get(b)) {
            (Some(x), Some(y)) => events::same_stream(a, x, b, y, agreement),
            _ => Err(anyhow::anyhow!(
                "{a} or {b} failed, so there is nothing to compare"
            )),
        };
        match check {
            Ok(n) => {
                println!(
                    "[ihmi] check {a} = {b} ({n} events; {}): PASS",
                    agreement.aside()
                );
                tally.record(true);
            }
            Err(e) => {
                println!("[ihmi] check {a} = {b}: FAIL: {e:#}");
                tally.record(false);
            }
        }
    }
}

/// What `ihmi test` will run on a model, and what it refuses up front, each with its reason.
#[derive(Debug)]
struct TestPlan {
    model: &'static cpu::CpuModel,
    run: Vec<&'static Scenario>,
    refused: Vec<(&'static Scenario, String)>,
}

/// Splits the test scenarios (or the one `only` names) into those the model can run and those it
/// cannot, with why. One scenario asked for by name that the model cannot run is an error, as is a
/// model that can run none.
fn plan_tests(cpu_name: &str, only: Option<&str>) -> Result<TestPlan> {
    let selected: Vec<&'static Scenario> = match only {
        None => scenario::TEST_SCENARIOS.iter().collect(),
        Some(name) => match scenario::known().find(|s| s.name == name) {
            Some(s) => {
                let model = cpu::select(cpu_name, s.requires, &format!("scenario {}", s.name))?;
                return Ok(TestPlan {
                    model,
                    run: vec![s],
                    refused: Vec::new(),
                });
            }
            None => bail!(
                "no test scenario `{name}`; the scenarios are: {}",
                scenario::test_names()
            ),
        },
    };
    let model = cpu::select(cpu_name, &[], "ihmi test")?;
    let (run, refused): (Vec<_>, Vec<_>) = selected
        .into_iter()
        .partition(|s| model.missing(s.requires).is_empty());
    let refused: Vec<_> = refused
        .into_iter()
        .map(|s: &'static Scenario| {
            let missing: Vec<String> = model
                .missing(s.requires)
                .iter()
                .map(ToString::to_string)
                .collect();
            let why = format!("cpu {} has no {}", model.name, missing.join(" and no "));
            (s, why)
        })
        .collect();
    if run.is_empty() {
        bail!(
            "cpu {} can run none of the test scenarios: {}",
            model.name,
            refused.first().map_or("", |(_, why)| why.as_str())
        );
    }
    Ok(TestPlan {
        model,
        run,
        refused,
    })
}

/// The Bochs harness's tests (`bochs::tests::bochs_*`, ignored by a plain `cargo test` because they
/// boot Bochs): a GRUB script that prints the pass marker must pass, the fail marker must fail, a
/// shutdown without a marker must fail, and a hang must time out.
fn harness_tests(layout: &Layout) -> Result<bool> {
    eprintln!("[ihmi] $ cargo test -p ihmi --bin ihmi -- --ignored bochs::tests::bochs_");
    let started = Instant::now();
    let status = Command::new(images::cargo())
        .current_dir(&layout.root)
        .args(["test", "-q", "-p", "ihmi", "--bin", "ihmi", "--"])
        .args(["--ignored", "bochs::tests::bochs_"])
        .stdin(Stdio::null())
        .status()
        .context("could not run cargo test")?;
    let word = if status.success() { "PASS" } else { "FAIL" };
    let secs = started.elapsed().as_secs_f64();
    println!("[ihmi] Bochs harness tests (pass, fail, no marker, hang): {word} ({secs:.1} s)");
    Ok(status.success())
}

/// `cargo test --workspace`, output straight to the terminal.
fn unit_tests(layout: &Layout) -> Result<bool> {
    eprintln!("[ihmi] $ cargo test --workspace");
    let status = Command::new(images::cargo())
        .current_dir(&layout.root)
        .args(["test", "--workspace"])
        .stdin(Stdio::null())
        .status()
        .context("could not run cargo test")?;
    Ok(status.success())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ihmi").chain(args.iter().copied()))
    }

    #[test]
    fn a_model_without_vmfunc_refuses_in_box_scenarios_up_front() {
        let all = plan_tests("tigerlake", None).unwrap();
        assert!(all.refused.is_empty());
        assert_eq!(all.run.len(), scenario::TEST_SCENARIOS.len());
        let ivy = plan_tests("corei7_ivy_bridge_3770k", None).unwrap();
        assert!(!ivy.refused.is_empty() && !ivy.run.is_empty());
        for (s, why) in &ivy.refused {
            if s.requires.contains(&cpu::Feature::VmcsShadowing) {
                // Ivy Bridge has no VMCS shadowing either.
                assert!(why.contains("has no VMCS shadowing"), "{why}");
                continue;
            }
            assert!(s.requires.contains(&cpu::Feature::Vmfunc), "{}", s.name);
            assert!(why.contains("has no VMFUNC"), "{why}");
        }
        assert!(ivy.run.iter().all(|s| s.name != "sim"));
        assert!(ivy.run.iter().any(|s| s.name == "sim-outbox"));
        // One scenario by name that the model cannot run, or a model that can run none: an error.
        assert!(plan_tests("corei7_ivy_bridge_3770k", Some("sim")).is_err());
        assert!(plan_tests("corei7_ivy_bridge_3770k", Some("sim-outbox")).is_ok());
        let none = plan_tests("bx_generic", None).unwrap_err().to_string();
        assert!(none.contains("none of the test scenarios"), "{none}");
        assert!(plan_tests("no-such-cpu", None).is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let cli = parse(&["run", "boot"]).unwrap();
        assert_eq!(cli.cpu, "corei7_skylake_x");
        let Cmd::Run {
            scenario,
            timeout,
            megs,
            quiet,
            events,
            ..
        } = cli.command
        else {
            panic!("expected run");
        };
        assert_eq!(
            (scenario.as_deref(), timeout, megs, quiet),
            (Some("boot"), None, 256, false)
        );
        assert_eq!(events, None);
        let with = parse(&["run", "linux-sim", "--events", "out.jsonl"]).unwrap();
        assert!(
            matches!(with.command, Cmd::Run { events: Some(ref p), .. } if p == Path::new("out.jsonl"))
        );
    }

    #[test]
    fn run_kernel_takes_no_scenario_and_its_flags_need_it() {
        let cli = parse(&[
            "run",
            "--kernel",
            "vmx.flat",
            "--module",
            "a.bin x y",
            "--module",
            "b.bin",
            "--multiboot",
            "1",
            "--nested",
            "--cmdline",
            "-v",
        ])
        .unwrap();
        let Cmd::Run {
            scenario,
            kernel,
            module,
            multiboot,
            nested,
            cmdline,
            ..
        } = cli.command
        else {
            panic!("expected run");
        };
        assert_eq!(scenario, None);
        assert_eq!(kernel.as_deref(), Some(Path::new("vmx.flat")));
        assert_eq!(module, ["a.bin x y", "b.bin"]);
        assert_eq!((multiboot, nested), (Some(1), true));
        assert_eq!(cmdline.as_deref(), Some("-v"));
        // (`--module`, `--multiboot` and `--nested` without `--kernel` are refused when the run starts.)
        for bad in [
            &["run"][..],
            &["run", "boot", "--kernel", "k"],
            &["run", "--kernel", "k", "--multiboot", "3"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn run_flags_and_global_cpu_anywhere() {
        let cli = parse(&[
            "run",
            "ept-guard",
            "--cpu",
            "tigerlake",
            "--timeout",
            "20",
            "--megs",
            "512",
            "--quiet",
        ])
        .unwrap();
        assert_eq!(cli.cpu, "tigerlake");
        assert!(matches!(
            cli.command,
            Cmd::Run {
                timeout: Some(20),
                megs: 512,
                quiet: true,
                ..
            }
        ));
        let cli = parse(&["--cpu", "broadwell_ult", "demo"]).unwrap();
        assert_eq!(cli.cpu, "broadwell_ult");
        assert!(matches!(
            cli.command,
            Cmd::Demo {
                events: None,
                profile: linux::Profile::Tiny,
                nested: false,
            }
        ));
        let cli = parse(&["demo", "--nested"]).unwrap();
        assert!(matches!(cli.command, Cmd::Demo { nested: true, .. }));
        assert!(parse(&["demo", "--nested", "--profile", "debian"]).is_err());
    }

    #[test]
    fn test_flags() {
        let cli = parse(&["test", "--no-unit", "--no-fuzz", "--only", "boot"]).unwrap();
        let Cmd::Test {
            no_unit,
            no_fuzz,
            only,
            ..
        } = cli.command
        else {
            panic!("expected test");
        };
        assert!(no_unit && no_fuzz);
        assert_eq!(only.as_deref(), Some("boot"));
        assert!(matches!(
            parse(&["test"]).unwrap().command,
            Cmd::Test {
                no_unit: false,
                no_fuzz: false,
                fuzz_seconds: fuzz::DEFAULT_SECONDS,
                only: None
            }
        ));
        assert!(matches!(
            parse(&["fuzz", "--seconds", "5", "bzimage"]).unwrap().command,
            Cmd::Fuzz { seconds: 5, ref targets } if targets == &["bzimage"]
        ));
        assert!(parse(&["test", "--fuzz-seconds", "0"]).is_err());
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse(&["run"]).is_err());
        assert!(parse(&["run", "boot", "--timeout", "0"]).is_err());
        assert!(parse(&["run", "boot", "--megs", "lots"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }

    #[test]
    fn model_refusal_names_the_scenario() {
        let model = model_for("corei5_lynnfield_750", "boot").unwrap();
        assert_eq!(model.name, "corei5_lynnfield_750");
        let msg = model_for("p4_willamette", "boot").unwrap_err().to_string();
        assert!(msg.contains("which scenario boot needs"), "{msg}");
        let msg = model_for("nope", "boot").unwrap_err().to_string();
        assert!(msg.contains("unknown Bochs CPU model"), "{msg}");
        assert!(model_for(cpu::DEFAULT_MODEL, "Bad Name").is_err());
    }
}
