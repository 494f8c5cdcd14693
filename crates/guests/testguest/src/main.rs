#![doc = include_str!("../README.md")]
#![no_std]
#![no_main]

mod attacks;
mod bench;
mod hooks;
mod hypercall;
mod idt;
mod nested;
mod process;
mod user_programs;

use hypercall::hypercall;
use ihmi_abi::{
    BootInfo, CpuidRecord, Hypercall, ReportKind, Scenario, Status, BAD_HYPERCALL_CASES,
    BOOT_INFO_MAGIC, CONSOLE_MAX, CPUID_LEAF_ABI, CPUID_LEAF_SIGNATURE, CPUID_SIGNATURE,
    PING_REPLY,
};

ihmi_rt::provide_mem_functions!();

macro_rules! say {
    ($($arg:tt)*) => {{
        let mut c = $crate::hypercall::GuestConsole::new();
        let _ = core::fmt::Write::write_fmt(&mut c, format_args!("{}\n", format_args!($($arg)*)));
        c.flush();
    }};
}
pub(crate) use say;

core::arch::global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    /* L0 set RSP to a 16-byte-aligned stack top; keep the ABI's alignment at the call. */
    and $-16, %rsp
    call guest_main
1:  cli
    hlt
    jmp 1b
"#,
    options(att_syntax)
);

/// Turns on process-context identifiers where the CPU has them (CPUID.1:ECX.PCID, SDM 4.10.1), so the
/// in-box gate's CR3 loads keep the kernel's TLB entries. Returns whether it did.
fn enable_pcid() -> bool {
    const CPUID_PCID: u32 = 1 << 17;
    const CR4_PCIDE: u64 = 1 << 17;
    if ihmi_rt::cpu::cpuid(1, 0)[2] & CPUID_PCID == 0 {
        return false;
    }
    // SAFETY: the CPU has PCIDs, the guest is in IA-32e mode and its CR3 (page-aligned, L0-built) has
    // bits 11:0 clear, which is what setting CR4.PCIDE requires (SDM 4.10.1).
    unsafe { ihmi_rt::cpu::write_cr4(ihmi_rt::cpu::read_cr4() | CR4_PCIDE) };
    true
}

#[no_mangle]
extern "C" fn guest_main(info: *const BootInfo) -> ! {
    // SAFETY: L0 passes the guest-physical address of a BootInfo it wrote, identity-mapped by the page
    // tables it built; we only read it, unaligned-safe.
    let info = unsafe { core::ptr::read_unaligned(info) };
    if info.magic != BOOT_INFO_MAGIC {
        done(90);
    }
    idt::init();
    let pcid = enable_pcid();
    let Some(scenario) = Scenario::from_raw(info.scenario) else {
        done(91)
    };
    say!(
        "testguest: running scenario {} ({} RAM ranges, PCIDs {})",
        scenario.name(),
        info.ram().len(),
        if pcid { "on" } else { "off" }
    );
    let code = match scenario {
        Scenario::Boot => boot_checks(),
        Scenario::EptGuard => ept_guard(&info),
        Scenario::BadHypercall => bad_hypercalls(&info),
        Scenario::Demo => demo(),
        Scenario::Sim | Scenario::SimOutbox => sim(),
        Scenario::Attack(attack) => attacks::run(attack, &info),
        Scenario::Bench(_) => bench::run(),
        Scenario::NestedVmxon => nested::run(&info),
        Scenario::NestedVmcs => nested::run_vmcs(&info),
        Scenario::NestedMini | Scenario::NestedMiniShadow => nested::mini::run(&info),
        Scenario::NestedMiniEpt => nested::mini::run_ept(&info),
        // L0 breaks VM entry in these; the guest running at all is the failure.
        Scenario::EntryBadControl | Scenario::EntryBadGuestState => 97,
        // L0 boots Linux or a multiboot kernel in these; the test guest running at all is the
        // failure.
        Scenario::LinuxBoot
        | Scenario::LinuxSim
        | Scenario::LinuxAttack(_)
        | Scenario::LinuxSimOutbox
        | Scenario::LinuxBench(_)
        | Scenario::NestedKvm
        | Scenario::NestedKvmShadow
        | Scenario::NestedKvmEpt
        | Scenario::NestedKvmSim
        | Scenario::IhmiKvm
        | Scenario::IhmiAttack(_)
        | Scenario::IhmiKvmOutbox
        | Scenario::NestedLinux
        | Scenario::Multiboot1
        | Scenario::Multiboot2
        | Scenario::Kernel
        | Scenario::KernelNested => 96,
    };
    done(code)
}

fn done(code: u64) -> ! {
    hypercall(Hypercall::Done as u64, [code, 0, 0, 0]);
    // L0 never resumes a guest after Done; if it did, stop here.
    ihmi_rt::cpu::halt_forever()
}

/// CPUID leaves L0 changes or adds, reported to L0 and checked here as well. Returns 0 or a failure code.
fn boot_checks() -> u64 {
    let mut failures = 0;
    for leaf in [0, 1, CPUID_LEAF_SIGNATURE, CPUID_LEAF_ABI] {
        let regs = ihmi_rt::cpu::cpuid(leaf, 0);
        let record = CpuidRecord {
            leaf,
            subleaf: 0,
            regs,
        };
        let bytes = record.encode();
        let (status, _) = hypercall(
            Hypercall::Report as u64,
            [
                ReportKind::Cpuid as u64,
                bytes.as_ptr() as u64,
                bytes.len() as u64,
                0,
            ],
        );
        if status != Status::Ok.to_raw() {
            say!("testguest: report of leaf {leaf:#x} failed: {status:#x}");
            failures += 1;
        }
    }
    let sig = ihmi_rt::cpu::cpuid(CPUID_LEAF_SIGNATURE, 0);
    let mut seen = [0u8; 12];
    for (chunk, r) in seen.chunks_exact_mut(4).zip([sig[1], sig[2], sig[3]]) {
        chunk.copy_from_slice(&r.to_le_bytes());
    }
    let vmx_visible = ihmi_rt::cpu::cpuid(1, 0)[2] & (1 << 5) != 0;
    say!(
        "testguest: hypervisor signature '{}', VMX visible: {vmx_visible}",
        core::str::from_utf8(&seen).unwrap_or("?")
    );
    if &seen != CPUID_SIGNATURE || vmx_visible {
        failures += 1;
    }
    let (status, reply) = hypercall(Hypercall::Ping as u64, [0; 4]);
    if status != Status::Ok.to_raw() || reply != PING_REPLY {
        say!("testguest: ping returned status {status:#x} value {reply:#x}");
        failures += 1;
    }
    failures
}

fn ept_guard(info: &BootInfo) -> u64 {
    say!("testguest: reading L0-owned frame at {:#x}", info.probe_gpa);
    // SAFETY: the guest's page tables identity-map the first 4 GiB, so this address translates; reading it
    // is the attack under test: L0's EPT must stop it before the load completes.
    let value = unsafe { core::ptr::read_volatile(info.probe_gpa as *const u64) };
    say!("testguest: the read returned {value:#x}: L0 memory is exposed");
    1
}

fn bad_hypercalls(info: &BootInfo) -> u64 {
    let buf = *b"0123456789abcdef0123456789abcdef";
    let p = buf.as_ptr() as u64;
    let unmapped = 0x0000_7000_0000_0000u64; // beyond the 4 GiB the page tables map
    let ram_end = info.ram().first().map_or(0, |r| r.start + r.len);
    let console = Hypercall::ConsoleWrite as u64;
    let report = Hypercall::Report as u64;
    let cpuid = ReportKind::Cpuid as u64;
    let bench_end = [ihmi_abi::bench::Bench::InvokeNull as u64, 1, 0, 0];
    let calls: [(u64, [u64; 4]); BAD_HYPERCALL_CASES.len()] = [
        (0xdead, [0; 4]),
        (u64::MAX, [0; 4]),
        (console, [p, 0, 0, 0]),
        (console, [p, CONSOLE_MAX + 1, 0, 0]),
        (console, [0x8000_0000_0000_0000, 4, 0, 0]),
        (console, [unmapped, 4, 0, 0]),
        (console, [info.probe_gpa, 4, 0, 0]),
        (console, [ram_end - 8, 16, 0, 0]),
        (report, [99, p, CpuidRecord::LEN as u64, 0]),
        (report, [cpuid, p, CpuidRecord::LEN as u64 - 1, 0]),
        (report, [cpuid, unmapped, CpuidRecord::LEN as u64, 0]),
        (Hypercall::Bench as u64, bench_end),
    ];
    let mut failures = 0;
    for (i, ((nr, args), (name, expected))) in calls.iter().zip(BAD_HYPERCALL_CASES).enumerate() {
        let (status, _) = hypercall(*nr, *args);
        let got = Status::from_raw(status);
        let ok = got == Some(*expected);
        say!(
            "testguest: case {i:2} {name}: {} ({})",
            got.map_or("?", Status::name),
            if ok { "as expected" } else { "WRONG" }
        );
        failures += u64::from(!ok);
    }
    let (status, reply) = hypercall(Hypercall::Ping as u64, [0; 4]);
    if status != Status::Ok.to_raw() || reply != PING_REPLY {
        failures += 1;
    }
    say!(
        "testguest: L0 still answers after the battery: {}",
        status == Status::Ok.to_raw()
    );
    failures
}

/// In-VM monitoring: the process workload with the monitor in-box. L0 judges the monitor's events; the
/// guest only checks that the hooks reach a monitor and that init saw what it expected.
fn sim() -> u64 {
    if !hooks::enabled() {
        say!("testguest: no monitor gate configured");
        return 1;
    }
    let null = hooks::call(ihmi_abi::monitor::RequestCode::Null, [0; 4]);
    say!("testguest: null monitor call returned {null:?}");
    process::init();
    match process::run_init(0, 0) {
        Ok(0) if null == Some(ihmi_abi::monitor::Verdict::Allow) => 0,
        Ok(code) => {
            say!("testguest: init exited with {code}");
            2
        }
        Err(e) => {
            say!("testguest: could not create init: {e}");
            3
        }
    }
}

fn demo() -> u64 {
    let mut failures = boot_checks();
    // Port I/O that L0 intercepts.
    for b in b"testguest: hello through port 0xe9\n" {
        // SAFETY: port 0xE9 is the debug console; L0 intercepts it.
        unsafe { x86::io::outb(0xe9, *b) };
    }
    // MSRs: feature control reads as locked without VMX; VMX MSRs and writes fault.
    let fc = rdmsr(0x3a);
    let vmx_basic_faults = idt::expect_gp(|| {
        let _ = rdmsr(0x480);
    });
    let fc_write_faults = idt::expect_gp(|| wrmsr(0x3a, 5));
    say!("testguest: IA32_FEATURE_CONTROL={fc:#x}, VMX MSR read faults: {vmx_basic_faults}, write faults: {fc_write_faults}");
    if fc != 1 || !vmx_basic_faults || !fc_write_faults {
        failures += 1;
    }
    // A breakpoint L0 intercepts and reflects back.
    let before = idt::breakpoints();
    // SAFETY: int3 raises #BP, which the guest's own handler takes and returns from.
    unsafe { core::arch::asm!("int3") };
    let reflected = idt::breakpoints() == before + 1;
    say!("testguest: breakpoint reached the guest's handler: {reflected}");
    failures += u64::from(!reflected);
    // HLT with interrupts on: L0 wakes us at once (nothing else can).
    // SAFETY: masking every line of the primary PIC only stops legacy interrupts, which we do not use.
    unsafe { x86::io::outb(0x21, 0xff) };
    // SAFETY: the same for the secondary PIC.
    unsafe { x86::io::outb(0xa1, 0xff) };
    // SAFETY: with the PICs masked, enabling interrupts delivers nothing; HLT exits to L0, which resumes us.
    unsafe { core::arch::asm!("sti", "hlt", "cli") };
    say!("testguest: woke from HLT");
    // User mode: init spawns worker and intruder; every process makes real system calls.
    process::init();
    match process::run_init(0, 0) {
        Ok(0) => say!("testguest: init exited with 0 (pids and the process tree as expected)"),
        Ok(code) => {
            say!("testguest: init exited with {code}");
            failures += 1;
        }
        Err(e) => {
            say!("testguest: could not create init: {e}");
            failures += 1;
        }
    }
    if failures != 0 {
        return failures;
    }
    say!("testguest: all checks passed, powering off");
    for b in b"Shutdown" {
        // SAFETY: port 0x8900 is the emulator's power-off port, intercepted by L0.
        unsafe { x86::io::outb(0x8900, *b) };
    }
    // L0 ends the guest at the last byte; getting here means it did not.
    99
}

/// RDMSR as one 2-byte instruction, with no `nomem` promise, so the compiler keeps it where it is
/// relative to the #GP bookkeeping around it.
pub(crate) fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: at CPL0 RDMSR either returns a value or raises #GP, which the guest's handler recovers from
    // when the caller expects it.
    unsafe { core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// WRMSR as one 2-byte instruction; see [`rdmsr`].
pub(crate) fn wrmsr(msr: u32, value: u64) {
    // SAFETY: as for `rdmsr`.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32)
    };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    say!("testguest: panic: {info}");
    done(98)
}
