//! `ihmi bench`: the invocation benchmark's report. L0 prints one `bench|` line per window with the
//! counts it measured; this turns them into per-call figures, adds the Bochs wall time of the window
//! (from when the lines arrived) and a modeled cycle count built from published hardware costs.
//!
//! Bochs is not silicon: its time stamp counter counts retired instructions (every VM transition one),
//! a VMFUNC costs it about 4–5 µs because it flushes its whole TLB, a VM exit about 10–15 µs. So the
//! counts are the result and the Bochs wall time is shown beside them, never alone.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ihmi_wire::BenchLine;
use serde_json::Value;

use crate::bochs::arrival_of;

/// The published costs the model is built from, each cited once, here (BRIEF.md §2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// One VMFUNC (EPTP switch): 134 cycles, SkyBridge (Mi et al., EuroSys 2019).
    pub vmfunc: f64,
    /// One CR3 write: 186 cycles, SkyBridge (EuroSys 2019).
    pub cr3_load: f64,
    /// One system call round trip without KPTI: 181 cycles, SkyBridge (EuroSys 2019).
    pub syscall: f64,
    /// One VM exit round trip (exit, handler entry and resume): 1,300 cycles, the low end of the
    /// 1,300–2,000 measured on recent Intel cores (SkyBridge and others). The low end flatters the
    /// out-of-box baseline, so the in-box advantage is not overstated.
    pub exit_round_trip: f64,
    /// Everything else: one cycle per retired instruction. Not a published figure: an assumption,
    /// stated as such.
    pub cycles_per_instruction: f64,
}

/// The model every figure uses.
pub const COST: CostModel = CostModel {
    vmfunc: 134.0,
    cr3_load: 186.0,
    syscall: 181.0,
    exit_round_trip: 1300.0,
    cycles_per_instruction: 1.0,
};

/// What the model leaves out (no published figure), each with the way it would move the ratio.
pub const NOT_MODELED: &str =
    "not modeled (no published figure): the two VMPTRLDs per out-of-box call \
    (would widen the gap), the gate's FXSAVE/FXRSTOR (in-box only: would narrow it), cache and TLB \
    effects (both modes)";

/// SIM (Sharif et al., CCS 2009): invoking the in-VM monitor was "almost 11x" faster than invoking one
/// in another VM.
pub const SIM_INVOKE_RATIO: f64 = 11.0;

/// SIM's application overheads against no monitor, in percent (in-box, out-of-box): its system-call
/// monitor and its process-creation monitor (Sharif et al., CCS 2009).
pub const SIM_SYSCALL_OVERHEAD: (f64, f64) = (4.15, 46.10);
pub const SIM_PROCESS_OVERHEAD: (f64, f64) = (13.0, 690.0);

/// One window, per call.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    pub bench: String,
    pub mode: String,
    pub calls: u64,
    /// Instructions retired per call (the guest's TSC delta over the window / calls).
    pub instructions: f64,
    pub exits: f64,
    pub vmfuncs: f64,
    pub cr3_loads: f64,
    /// System calls per call (1 in invoke-syscall, 2 in linux-syscall; the fork-exec loop's are not
    /// known without a monitor, so they are not priced).
    pub syscalls: f64,
    /// Monitor invocations per call (for a Linux operation: the system calls and exec events it made).
    pub invocations: f64,
    pub modeled_cycles: f64,
    /// Bochs wall time per call, from when L0's start and end lines arrived.
    pub bochs_ns: Option<f64>,
}

impl BenchRow {
    /// The `--json` object.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "bench": self.bench,
            "mode": self.mode,
            "calls": self.calls,
            "instructions": round1(self.instructions),
            "exits": round1(self.exits),
            "vmfuncs": round1(self.vmfuncs),
            "cr3_loads": round1(self.cr3_loads),
            "invocations": round1(self.invocations),
            "modeled_cycles": round1(self.modeled_cycles),
            "bochs_ns": self.bochs_ns.map(round1),
        })
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Modeled cycles of one call: the instructions at one cycle each, except the transitions the model
/// prices (each counted as one instruction by Bochs's TSC), which cost what the literature says.
pub fn modeled_cycles(
    m: &CostModel,
    instructions: f64,
    exits: f64,
    vmfuncs: f64,
    cr3: f64,
    syscalls: f64,
) -> f64 {
    // A system call is two instructions (SYSCALL, SYSRET) in the count.
    let priced = exits + vmfuncs + cr3 + 2.0 * syscalls;
    (instructions - priced).max(0.0) * m.cycles_per_instruction
        + exits * m.exit_round_trip
        + vmfuncs * m.vmfunc
        + cr3 * m.cr3_load
        + syscalls * m.syscall
}

/// The rows of one run's E9 output.
pub fn parse(e9: &str, arrivals: &[(usize, Duration)]) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let mut starts: Vec<(String, Option<Duration>)> = Vec::new();
    let mut offset = 0usize;
    for line in e9.split_inclusive('\n') {
        let end = offset + line.len().saturating_sub(1);
        offset += line.len();
        let Some(json) = line.trim_end().strip_prefix("bench| ") else {
            continue;
        };
        let line: BenchLine<String> =
            serde_json::from_str(json).with_context(|| format!("bad bench line: {json}"))?;
        let at = arrival_of(arrivals, end);
        let w = match line {
            BenchLine::Start(s) => {
                starts.push((s.start, at));
                continue;
            }
            BenchLine::Window(w) => w,
        };
        if w.calls == 0 {
            bail!("bench line with no calls: {json}");
        }
        let calls = w.calls as f64;
        let invocations = w.invocations as f64;
        // The invocation benchmark reports per invocation; the Linux one per operation, which makes
        // many (or, without a monitor, none).
        let linux = w.bench.starts_with("linux-");
        let per = if linux || invocations <= 0.0 {
            calls
        } else {
            invocations
        };
        let exits = w.exits as f64 / per;
        let instructions = w.tsc as f64 / calls;
        let scale = if linux { invocations / calls } else { 1.0 };
        let vmfuncs = w.vmfuncs_per_invocation as f64 * scale;
        let cr3_loads = w.cr3_loads_per_invocation as f64 * scale;
        let syscalls = match w.bench.as_str() {
            "invoke-syscall" => 1.0,
            "linux-syscall" => 2.0,
            _ => 0.0,
        };
        let started = starts
            .iter()
            .rev()
            .find(|(n, _)| *n == w.bench)
            .and_then(|(_, t)| *t);
        let bochs_ns = match (started, at) {
            (Some(s), Some(e)) if e > s => Some((e - s).as_nanos() as f64 / calls),
            _ => None,
        };
        rows.push(BenchRow {
            bench: w.bench,
            mode: w.mode,
            calls: w.calls,
            instructions,
            exits,
            vmfuncs,
            cr3_loads,
            syscalls,
            invocations: invocations / calls,
            modeled_cycles: modeled_cycles(
                &COST,
                instructions,
                exits,
                vmfuncs,
                cr3_loads,
                syscalls,
            ),
            bochs_ns,
        });
    }
    Ok(rows)
}

/// The table `ihmi bench` prints, with the out-of-box / in-box ratios and the seed paper's figure.
pub fn table(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<15} {:<7} {:>7} {:>13} {:>6} {:>8} {:>9} {:>15} {:>14}",
        "bench",
        "mode",
        "calls",
        "instructions",
        "exits",
        "VMFUNCs",
        "CR3 loads",
        "modeled cycles",
        "Bochs ns/call"
    );
    for r in rows {
        let ns = r.bochs_ns.map_or("n/a".to_string(), |n| format!("{n:.0}"));
        let _ = writeln!(
            out,
            "{:<15} {:<7} {:>7} {:>13.1} {:>6.1} {:>8.1} {:>9.1} {:>15.0} {:>14}",
            r.bench,
            r.mode,
            r.calls,
            r.instructions,
            r.exits,
            r.vmfuncs,
            r.cr3_loads,
            r.modeled_cycles,
            ns
        );
    }
    let find = |b: &str, m: &str| rows.iter().find(|r| r.bench == b && r.mode == m);
    for bench in ["invoke-null", "invoke-syscall"] {
        if let (Some(i), Some(o)) = (find(bench, "inbox"), find(bench, "outbox")) {
            let bochs = match (i.bochs_ns, o.bochs_ns) {
                (Some(a), Some(b)) if a > 0.0 => format!("{:.1}x", b / a),
                _ => "n/a".to_string(),
            };
            let _ = writeln!(
                out,
                "{bench}: out-of-box / in-box = {:.1}x modeled, {:.1}x in instructions, {bochs} in Bochs wall time (SIM, CCS 2009: almost {SIM_INVOKE_RATIO:.0}x)",
                o.modeled_cycles / i.modeled_cycles,
                o.instructions / i.instructions,
            );
        }
    }
    let _ = writeln!(
        out,
        "model: VMFUNC {} cycles, CR3 load {}, syscall {}, VM exit round trip {}, other instructions {} cycle each; {NOT_MODELED}",
        COST.vmfunc, COST.cr3_load, COST.syscall, COST.exit_round_trip, COST.cycles_per_instruction
    );
    out
}

/// The table `ihmi bench --linux` prints: per operation, then each monitored mode's overhead against
/// no monitor beside SIM's.
pub fn linux_table(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<7} {:>5} {:>13} {:>11} {:>7} {:>8} {:>9} {:>15} {:>12}",
        "bench",
        "mode",
        "ops",
        "instructions",
        "invocations",
        "exits",
        "VMFUNCs",
        "CR3 loads",
        "modeled cycles",
        "Bochs us/op"
    );
    for r in rows {
        let us = r
            .bochs_ns
            .map_or("n/a".to_string(), |n| format!("{:.1}", n / 1000.0));
        let _ = writeln!(
            out,
            "{:<16} {:<7} {:>5} {:>13.0} {:>11.1} {:>7.1} {:>8.1} {:>9.1} {:>15.0} {:>12}",
            r.bench,
            r.mode,
            r.calls,
            r.instructions,
            r.invocations,
            r.exits,
            r.vmfuncs,
            r.cr3_loads,
            r.modeled_cycles,
            us
        );
    }
    let find = |b: &str, m: &str| rows.iter().find(|r| r.bench == b && r.mode == m);
    let pct = |x: f64, base: f64| 100.0 * (x - base) / base;
    for (bench, what, sim) in [
        ("linux-syscall", "system calls", SIM_SYSCALL_OVERHEAD),
        ("linux-fork-exec", "process creation", SIM_PROCESS_OVERHEAD),
    ] {
        let Some(none) = find(bench, "none") else {
            continue;
        };
        let mut parts = Vec::new();
        for mode in ["inbox", "outbox"] {
            let Some(r) = find(bench, mode) else { continue };
            let bochs = match (r.bochs_ns, none.bochs_ns) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:+.0}%", pct(a, b)),
                _ => "n/a".to_string(),
            };
            parts.push(format!(
                "{mode} {:+.1}% modeled ({:+.1}% instructions, {bochs} Bochs time)",
                pct(r.modeled_cycles, none.modeled_cycles),
                pct(r.instructions, none.instructions),
            ));
        }
        let _ = writeln!(
            out,
            "{what} ({bench}) overhead vs none: {}; SIM (CCS 2009): in-box {:.2}%, out-of-box {:.2}%",
            parts.join("; "),
            sim.0,
            sim.1
        );
    }
    let _ = writeln!(
        out,
        "model: VMFUNC {} cycles, CR3 load {}, syscall {} (linux-syscall's two per operation only), VM exit round trip {}, other instructions {} cycle each; {NOT_MODELED}",
        COST.vmfunc, COST.cr3_load, COST.syscall, COST.exit_round_trip, COST.cycles_per_instruction
    );
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_nested_line_is_read_back_and_tabled_per_reflected_exit() {
        let e9 = "guest| x\nnested| {\"l2_exits\":13,\"reflected\":12,\"round_trips\":11,\"round_trip_exits\":93,\"round_trip_max\":10,\"vmread_vmwrite\":71,\"other\":0,\"cpuid_round_trips\":8,\"cpuid_round_trip_exits\":64,\"cpuid_round_trip_max\":8,\"shadowing\":false}\nIHMI-PASS nested-mini\n";
        let row = parse_nested("nested-mini", e9, Duration::from_millis(5400))
            .unwrap()
            .unwrap();
        assert_eq!(row.line.round_trip_exits, 93);
        let table = nested_table(&[row]);
        assert!(
            table.contains(
                "| nested-mini | off | 13 | 12 | 8.45, 10 | 6.45 | 0.00 | none | 10991 | 8.00, 8 | 5.4 s |"
            ),
            "{table}"
        );
        // Out of the box, the monitor VM's exits are counted in the model beside L1's.
        let outbox = e9.replace(
            "\"shadowing\":false}",
            "\"shadowing\":false,\"monitor_invocations\":24,\"kvm_exits_served\":12,\"monitor_vm_exits\":24}",
        );
        let row = parse_nested("ihmi-kvm-outbox", &outbox, Duration::from_millis(5400))
            .unwrap()
            .unwrap();
        let table = nested_table(&[row]);
        assert!(table.contains("| 1.00, 1.00 | 12291 |"), "{table}");
        assert!(parse_nested("boot", "IHMI-PASS boot\n", Duration::ZERO)
            .unwrap()
            .is_none());
        assert!(parse_nested("x", "nested| {\"l2_exits\":1}\n", Duration::ZERO).is_err());
    }
    use super::*;

    const E9: &str = concat!(
        "bench| {\"start\":\"invoke-null\"}\n",
        "bench| {\"bench\":\"invoke-null\",\"mode\":\"inbox\",\"calls\":1000,\"tsc\":209000,\"exits\":0,\"invocations\":1000,\"vmfuncs_per_invocation\":2,\"cr3_loads_per_invocation\":2,\"vmcs_switches_per_invocation\":0}\n",
    );

    #[test]
    fn model_prices_transitions_once() {
        // 209 instructions, 4 of them priced: 205 + 2*134 + 2*186.
        assert_eq!(modeled_cycles(&COST, 209.0, 0.0, 2.0, 2.0, 0.0), 845.0);
        // Out of the box: 907 instructions, 2 exits.
        assert_eq!(
            modeled_cycles(&COST, 907.0, 2.0, 0.0, 0.0, 0.0),
            905.0 + 2600.0
        );
        // A system call: its two instructions become 181 cycles.
        assert_eq!(
            modeled_cycles(&COST, 71.0, 0.0, 0.0, 0.0, 1.0),
            69.0 + 181.0
        );
    }

    #[test]
    fn rows_are_per_call_and_timed_from_line_arrival() {
        let first_line_end = E9.find('\n').unwrap();
        let arrivals = [
            (first_line_end + 1, Duration::from_millis(100)),
            (E9.len(), Duration::from_millis(300)),
        ];
        let rows = parse(E9, &arrivals).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.instructions, r.exits, r.vmfuncs), (209.0, 0.0, 2.0));
        assert_eq!(r.modeled_cycles, 845.0);
        assert_eq!(r.bochs_ns, Some(200_000.0), "200 ms over 1000 calls");
        let json = r.to_json();
        for k in [
            "bench",
            "mode",
            "instructions",
            "exits",
            "vmfuncs",
            "cr3_loads",
            "modeled_cycles",
            "bochs_ns",
        ] {
            assert!(json.get(k).is_some(), "{k}");
        }
        assert!(table(&rows).contains("invoke-null"));
        assert_eq!(r.invocations, 1.0);
        // Without arrival times there is no wall time, and nothing pretends otherwise.
        assert_eq!(parse(E9, &[]).unwrap()[0].bochs_ns, None);
        assert!(parse("bench| {\"bench\":\"x\"}\n", &[]).is_err());
    }

    #[test]
    fn linux_rows_are_per_operation_with_overheads_against_none() {
        let line = |mode: &str, tsc: u64, exits: u64, inv: u64| {
            format!(
                "bench| {{\"bench\":\"linux-syscall\",\"mode\":\"{mode}\",\"calls\":1000,\"tsc\":{tsc},\"exits\":{exits},\"invocations\":{inv},\"vmfuncs_per_invocation\":{v},\"cr3_loads_per_invocation\":{v},\"vmcs_switches_per_invocation\":0}}\n",
                v = if mode == "inbox" { 2 } else { 0 }
            )
        };
        let e9 = [
            line("none", 1_000_000, 0, 0),
            line("inbox", 3_000_000, 0, 2000),
            line("outbox", 5_000_000, 4000, 2000),
        ]
        .concat();
        let rows = parse(&e9, &[]).unwrap();
        let inbox = &rows[1];
        // Per operation: 2 invocations, each with the gate's 2 VMFUNCs and 2 CR3 loads.
        assert_eq!(
            (inbox.invocations, inbox.vmfuncs, inbox.cr3_loads),
            (2.0, 4.0, 4.0)
        );
        assert_eq!(
            rows[2].exits, 4.0,
            "two exits per invocation, two invocations per operation"
        );
        assert_eq!(rows[0].syscalls, 2.0);
        let t = linux_table(&rows);
        assert!(
            t.contains("system calls (linux-syscall) overhead vs none: inbox +"),
            "{t}"
        );
        assert!(
            t.contains("SIM (CCS 2009): in-box 4.15%, out-of-box 46.10%"),
            "{t}"
        );
        // 1000 instructions per operation, 4 of them priced as 2 system calls: 996 + 362 = 1358.
        assert_eq!(rows[0].modeled_cycles, 996.0 + 362.0);
    }
}

/// One run's `nested|` line, with the run's Bochs wall time.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedRow {
    pub scenario: String,
    pub line: ihmi_wire::NestedLine,
    pub wall: Duration,
}

/// The `nested|` line of one run's E9 output, if it has one.
pub fn parse_nested(scenario: &str, e9: &str, wall: Duration) -> Result<Option<NestedRow>> {
    for line in e9.lines() {
        if let Some(json) = line.trim_end().strip_prefix("nested| ") {
            let line: ihmi_wire::NestedLine =
                serde_json::from_str(json).with_context(|| format!("bad nested line: {json}"))?;
            return Ok(Some(NestedRow {
                scenario: scenario.to_string(),
                line,
                wall,
            }));
        }
    }
    Ok(None)
}

/// The nested benchmark's table: per reflected exit of L2, the L0 exits (the exit, L1's handling,
/// its VMRESUME) and their kinds, the modeled cycles (each L0 exit one exit round trip of the cost
/// model), and the whole run's Bochs wall time beside.
pub fn nested_table(rows: &[NestedRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | VMCS shadowing | L2 exits | reflected | L0 exits per reflected exit (mean, max) | of them L1 VMREAD/VMWRITE | L1 other | KVM exits the monitor served per reflected exit, monitor-VM exits per invocation | modeled cycles per reflected exit | per reflected CPUID (mean, max) | Bochs wall (whole run) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let l = &r.line;
        let per = |x: u64| {
            if l.round_trips == 0 {
                0.0
            } else {
                x as f64 / l.round_trips as f64
            }
        };
        let cpuid = if l.cpuid_round_trips == 0 {
            0.0
        } else {
            l.cpuid_round_trip_exits as f64 / l.cpuid_round_trips as f64
        };
        let served = l.kvm_exits_served as f64 / l.reflected.max(1) as f64;
        let vm_exits = if l.monitor_invocations == 0 {
            0.0
        } else {
            l.monitor_vm_exits as f64 / l.monitor_invocations as f64
        };
        let monitor = if l.monitor_invocations == 0 {
            "none".to_string()
        } else {
            format!("{served:.2}, {vm_exits:.2}")
        };
        // Out of the box, each KVM exit served costs the monitor VM's exit too: an L0 exit round
        // trip outside L1's count.
        let exits = per(l.round_trip_exits) + served * vm_exits;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.2}, {} | {:.2} | {:.2} | {} | {:.0} | {:.2}, {} | {:.1} s |",
            r.scenario,
            if l.shadowing { "on" } else { "off" },
            l.l2_exits,
            l.reflected,
            per(l.round_trip_exits),
            l.round_trip_max,
            per(l.vmread_vmwrite),
            per(l.other),
            monitor,
            exits * COST.exit_round_trip,
            cpuid,
            l.cpuid_round_trip_max,
            r.wall.as_secs_f64()
        );
    }
    let _ = writeln!(
        out,
        "modeled: {} cycles per L0 exit round trip (the cost model's figure), the monitor VM's exits included; L0's own work per exit, L1's between exits and the in-box gate's VMFUNCs and CR3 loads not modeled",
        COST.exit_round_trip
    );
    out
}

/// What one pass into the in-hypervisor monitor and back costs in the model, without its work: in
/// the box, the gate's VMFUNCs and CR3 loads; out of the box, the hook's VMCALL and the monitor VM's
/// (two exit round trips). `None` for a run without the monitor.
fn monitor_pass_cycles(l: &ihmi_wire::NestedLine) -> Option<f64> {
    if l.kvm_exits_served == 0 {
        return None;
    }
    Some(if l.monitor_vm_exits > 0 {
        let per = l.monitor_vm_exits as f64 / l.monitor_invocations.max(1) as f64;
        (1.0 + per) * COST.exit_round_trip
    } else {
        l.gate_vmfuncs as f64 * COST.vmfunc + l.gate_cr3_loads as f64 * COST.cr3_load
    })
}

/// The in-hypervisor monitor's invocations, per run with it: the null invocation (a pass in and out,
/// modeled), the real one at each KVM exit (the exit check: the vCPU's reason, the running thread,
/// the whole exit-handler table; the monitor's own TSC ticks, which Bochs counts one per
/// instruction, priced as instructions, plus the pass) and the check of one mapping (`make_spte`),
/// then out of the box against in the box.
pub fn nested_monitor_table(rows: &[NestedRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | null invocation (modeled cycles: the pass) | KVM exits served | monitor instructions per exit check | real invocation (modeled cycles) | mappings checked | monitor instructions per mapping check | mapping check (modeled cycles) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    let mut priced = Vec::new();
    for r in rows {
        let l = &r.line;
        let Some(pass) = monitor_pass_cycles(l) else {
            continue;
        };
        let per_exit = l.kvm_exit_ticks as f64 / l.kvm_exits_served as f64;
        let per_map = l.l2_map_ticks as f64 / l.l2_maps_checked.max(1) as f64;
        let price = |instructions: f64| instructions * COST.cycles_per_instruction + pass;
        let _ = writeln!(
            out,
            "| {} | {pass:.0} | {} | {per_exit:.0} | {:.0} | {} | {per_map:.0} | {:.0} |",
            r.scenario,
            l.kvm_exits_served,
            price(per_exit),
            l.l2_maps_checked,
            price(per_map),
        );
        priced.push((
            l.monitor_vm_exits > 0,
            pass,
            price(per_exit),
            price(per_map),
        ));
    }
    let inbox = priced.iter().find(|r| !r.0);
    let outbox = priced.iter().find(|r| r.0);
    if let (Some(i), Some(o)) = (inbox, outbox) {
        let _ = writeln!(
            out,
            "out-of-box / in-box: null invocation {:.1}x, real invocation {:.1}x, mapping check {:.1}x",
            o.1 / i.1,
            o.2 / i.2,
            o.3 / i.3
        );
    }
    let _ = writeln!(
        out,
        "modeled: the monitor's instructions at {} cycle each (an assumption), the pass at {} cycles per VMFUNC, {} per CR3 load, {} per exit round trip; the trampoline's and the gate's own instructions not counted (a few dozen, both modes); {NOT_MODELED}",
        COST.cycles_per_instruction, COST.vmfunc, COST.cr3_load, COST.exit_round_trip
    );
    out
}

/// The probe's L2 workloads under KVM with no monitor (`nested-kvm-shadow`), the monitor in the box
/// (`ihmi-kvm`) and out of it (`ihmi-kvm-outbox`), per iteration, modeled: the CPUID loop (each
/// iteration one reflected exit KVM handles, so one exit check of the monitor's) and the
/// memory-touch loop (per page: its reflected page faults, KVM's mapping of it and the monitor's
/// checks of both). Each L0 exit of the round trips is an exit round trip of the model; the
/// monitor's work is its own instructions at a cycle each, with in the box the gate's VMFUNCs and
/// CR3 loads and out of it the monitor VM's own exit (the hooks' VMCALLs are L1 exits, inside the
/// round trips). Empty without the three runs.
pub fn nested_workload_table(rows: &[NestedRow]) -> String {
    let find = |name: &str| rows.iter().find(|r| r.scenario == name).map(|r| &r.line);
    let (Some(none), Some(inbox), Some(outbox)) = (
        find("nested-kvm-shadow"),
        find("ihmi-kvm"),
        find("ihmi-kvm-outbox"),
    ) else {
        return String::new();
    };
    let pages = ihmi_abi::NESTED_KVM_PAGES as f64;
    let ratio = |x: u64, n: u64| if n == 0 { 0.0 } else { x as f64 / n as f64 };
    // Per iteration: (L0 exits, modeled cycles) of the CPUID loop and the memory-touch loop.
    let costs = |l: &ihmi_wire::NestedLine| {
        let extra = if l.kvm_exits_served == 0 {
            0.0
        } else if l.monitor_vm_exits > 0 {
            ratio(l.monitor_vm_exits, l.monitor_invocations) * COST.exit_round_trip
        } else {
            l.gate_vmfuncs as f64 * COST.vmfunc + l.gate_cr3_loads as f64 * COST.cr3_load
        };
        let exit_check = ratio(l.kvm_exit_ticks, l.kvm_exits_served) * COST.cycles_per_instruction;
        let map_check = ratio(l.l2_map_ticks, l.l2_maps_checked) * COST.cycles_per_instruction;
        let monitored = l.kvm_exits_served > 0;
        let cpuid_exits = ratio(l.cpuid_round_trip_exits, l.cpuid_round_trips);
        let mut cpuid = cpuid_exits * COST.exit_round_trip;
        let page_exits = l.page_fault_round_trip_exits as f64 / pages;
        let mut page = page_exits * COST.exit_round_trip;
        if monitored {
            cpuid += exit_check + extra;
            page += l.page_fault_round_trips as f64 / pages * (exit_check + extra)
                + l.l2_maps_checked as f64 / pages * (map_check + extra);
        }
        ((cpuid_exits, cpuid), (page_exits, page))
    };
    let (n, i, o) = (costs(none), costs(inbox), costs(outbox));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| L2 workload, per iteration: modeled cycles (L0 exits) | none (nested-kvm-shadow) | in the box (ihmi-kvm) | out of the box (ihmi-kvm-outbox) |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    let cell = |(exits, cycles): (f64, f64), base: f64| {
        if base == cycles {
            format!("{cycles:.0} ({exits:.2})")
        } else {
            format!(
                "{cycles:.0} ({exits:.2}), {:+.0}%",
                (cycles - base) / base * 100.0
            )
        }
    };
    let _ = writeln!(
        out,
        "| CPUID loop ({} iterations, one reflected exit each) | {} | {} | {} |",
        ihmi_abi::NESTED_KVM_CPUIDS,
        cell(n.0, n.0 .1),
        cell(i.0, n.0 .1),
        cell(o.0, n.0 .1)
    );
    let _ = writeln!(
        out,
        "| memory-touch loop ({} pages, per page; page faults reflected: {}, {}, {}) | {} | {} | {} |",
        ihmi_abi::NESTED_KVM_PAGES,
        none.page_fault_round_trips,
        inbox.page_fault_round_trips,
        outbox.page_fault_round_trips,
        cell(n.1, n.1 .1),
        cell(i.1, n.1 .1),
        cell(o.1, n.1 .1)
    );
    let _ = writeln!(
        out,
        "modeled: {} cycles per L0 exit round trip, the monitor's instructions at {} cycle each, {} per VMFUNC, {} per CR3 load; L2's own instructions (the same in every mode) and L0's and L1's work between exits not modeled",
        COST.exit_round_trip, COST.cycles_per_instruction, COST.vmfunc, COST.cr3_load
    );
    out
}

#[cfg(test)]
mod monitor_table_tests {
    use super::*;

    #[test]
    fn the_monitor_table_sets_the_pass_beside_the_monitor_s_own_count() {
        let line = |outbox: bool| ihmi_wire::NestedLine {
            l2_exits: 10,
            reflected: 10,
            round_trips: 10,
            round_trip_exits: 20,
            round_trip_max: 2,
            vmread_vmwrite: 0,
            other: 0,
            cpuid_round_trips: 0,
            cpuid_round_trip_exits: 0,
            cpuid_round_trip_max: 0,
            page_fault_round_trips: 0,
            page_fault_round_trip_exits: 0,
            shadowing: true,
            monitor_invocations: 20,
            kvm_exits_served: 10,
            monitor_vm_exits: if outbox { 20 } else { 0 },
            kvm_exit_ticks: 30_000,
            l2_maps_checked: 4,
            l2_map_ticks: 4_000,
            gate_vmfuncs: if outbox { 0 } else { 2 },
            gate_cr3_loads: if outbox { 0 } else { 2 },
        };
        let row = |name: &str, outbox| NestedRow {
            scenario: name.into(),
            line: line(outbox),
            wall: Duration::ZERO,
        };
        let t = nested_monitor_table(&[row("ihmi-kvm", false), row("ihmi-kvm-outbox", true)]);
        // In the box: 2 * 134 + 2 * 186 = 640 a pass; 3,000 instructions an exit check, 1,000 a
        // mapping check. Out of it: two exit round trips, 2,600.
        assert!(
            t.contains("| ihmi-kvm | 640 | 10 | 3000 | 3640 | 4 | 1000 | 1640 |"),
            "{t}"
        );
        assert!(
            t.contains("| ihmi-kvm-outbox | 2600 | 10 | 3000 | 5600 | 4 | 1000 | 3600 |"),
            "{t}"
        );
        assert!(
            t.contains("null invocation 4.1x, real invocation 1.5x, mapping check 2.2x"),
            "{t}"
        );
        // A run without the monitor has no row.
        let mut none = row("nested-kvm-shadow", false);
        none.line.kvm_exits_served = 0;
        assert!(!nested_monitor_table(&[none.clone()]).contains("nested-kvm-shadow"));

        // The workloads: 1,000 CPUIDs of 2 L0 exits each (3 out of the box: the hook's VMCALL),
        // 256 page faults of 2 (3) exits and 256 mappings checked.
        let kvm = |l: &mut ihmi_wire::NestedLine, outbox: bool| {
            let per = if outbox { 3 } else { 2 };
            l.cpuid_round_trips = 1000;
            l.cpuid_round_trip_exits = 1000 * per;
            l.page_fault_round_trips = 256;
            l.page_fault_round_trip_exits = 256 * (per + u64::from(outbox));
            l.kvm_exits_served = 1256;
            l.monitor_invocations = 1512;
            l.monitor_vm_exits = if outbox { 1512 } else { 0 };
            l.kvm_exit_ticks = 1256 * 3000;
            l.l2_maps_checked = 256;
            l.l2_map_ticks = 256 * 1000;
        };
        kvm(&mut none.line, false);
        none.line.kvm_exits_served = 0;
        let (mut i, mut o) = (row("ihmi-kvm", false), row("ihmi-kvm-outbox", true));
        kvm(&mut i.line, false);
        kvm(&mut o.line, true);
        let t = nested_workload_table(&[none.clone(), i.clone(), o.clone()]);
        // None: 2 exits, 2,600 a CPUID; in the box + 3,000 + 640 = 6,240 (+140%); out of it
        // 3 exits + 3,000 + 1,300 = 8,200 (+215%).
        assert!(
            t.contains("| CPUID loop (1000 iterations, one reflected exit each) | 2600 (2.00) | 6240 (2.00), +140% | 8200 (3.00), +215% |"),
            "{t}"
        );
        // A page: none 2,600; in the box 2,600 + 3,640 + 1,640 = 7,880; out of it 4 exits
        // (5,200) + 4,300 + 2,300 = 11,800.
        assert!(
            t.contains("| 2600 (2.00) | 7880 (2.00), +203% | 11800 (4.00), +354% |"),
            "{t}"
        );
        assert!(nested_workload_table(&[none, i]).is_empty());
    }
}
