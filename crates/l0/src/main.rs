//! ihmi L0: the trusted bottom layer. It boots by multiboot2, takes the machine, turns VMX on, gives
//! its guest an EPT that maps guest RAM and leaves out every frame L0 owns, launches it, and handles
//! its exits with the policy in `ihmi-hv`. The boot is a sequence of stages, one module each, in this
//! order: boot information (`boot_info`) → memory plan (`memory`) → VMX on (`vmx`) → the guest
//! (`guest`, `linux`) → the monitor (`monitor`) → EPT views (`views`) → the guest's memory and the
//! guard → the VMs (`vms`, `outbox`) → launch; then exits (`exit`) until the verdict.
//!
//! A stage that cannot do its part returns a [`LoadError`]; `l0_main` prints it, once, as the run's
//! failure. After launch nothing the guest does can end L0: a guest fault ends the guest, reported
//! and judged (`exit::finish`).

#![no_std]
#![no_main]

mod boot;
mod boot_info;
mod elf_image;
mod error;
mod exit;
mod frames;
mod guest;
mod linux;
mod memory;
mod monitor;
mod multiboot;
mod outbox;
mod platform;
mod ranges;
mod state;
mod views;
mod vmcs_setup;
mod vms;
mod vmx;

use core::convert::Infallible;
use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

use ihmi_abi::monitor::Mode;
use ihmi_abi::Scenario;
use ihmi_vmcs::{field_name, DUMP_FIELDS};
use ihmi_vmx::Vmcss;

use crate::error::LoadError;

ihmi_rt::provide_mem_functions!();

/// Prints one line on serial and port 0xE9.
macro_rules! log {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(
            &mut ihmi_rt::console::Console(ihmi_rt::console::Sink::Both),
            format_args!("{}\n", format_args!($($arg)*)),
        );
    }};
}
pub(crate) use log;

/// The scenario (`Scenario::to_raw`, 0 before it is known), for the failure marker of a boot that
/// fails before the judge exists.
static SCENARIO: AtomicU32 = AtomicU32::new(0);

fn scenario_name() -> &'static str {
    Scenario::from_raw(SCENARIO.load(Ordering::Relaxed)).map_or("unknown", Scenario::name)
}

/// The 64-bit entry from `boot.rs`: the loader's magic and boot information (CR0 and EFLAGS at entry
/// are the multiboot test kernel's business, not L0's).
extern "C" fn l0_main(magic: u32, info: u32, _cr0: u32, _eflags: u32) -> ! {
    ihmi_rt::console::init_serial();
    log!("");
    log!(
        "ihmi L0 {}: trusted hypervisor for in-box monitoring",
        env!("CARGO_PKG_VERSION")
    );
    match boot(magic, info) {
        Ok(never) => match never {},
        Err(e) => fail(format_args!("{e}")),
    }
}

/// The boot stages, in order; the last one enters the guest and never returns.
fn boot(magic: u32, info: u32) -> Result<Infallible, LoadError> {
    let mut boot = boot_info::read(magic, info)?;
    let scenario = boot.scenario;
    SCENARIO.store(scenario.to_raw(), Ordering::Relaxed);
    log!("scenario: {}", scenario.name());
    let tables = ihmi_rt::tables::init(on_exception);
    enable_os_xsave();
    // A multiboot kernel's modules out of its way first, and its span kept free of L0's pool.
    let kernel_span = if scenario.is_multiboot() {
        Some(multiboot::make_room(&mut boot)?)
    } else {
        None
    };
    let mut plan = memory::plan(&mut boot, scenario.is_linux(), kernel_span)?;
    let vmx = vmx::on(&mut plan.frames)?;
    if scenario.monitor_mode() == Mode::InBox && !vmx.features.eptp_switching {
        return Err(LoadError::Cpu(
            "this CPU has no VMFUNC EPTP switching, which in-box monitoring needs; choose a CPU model that has it (e.g. corei7_skylake_x), or run the out-of-box mode",
        ));
    }
    let guest = vms::Guest::prepare(&boot, &plan.memory)?;
    let monitor = vms::load_monitor(&boot, &mut plan.memory, &guest, scenario, &vmx)?;
    let vms::Launch { state, regs } =
        vms::setup(&boot, plan, vmx, &tables, guest, monitor, scenario)?;
    let st = state::install(state);
    log!(
        "launching the guest at rip={:#x}",
        st.vmcss.active().read(ihmi_vmcs::fields::guest::RIP)
    );
    // SAFETY: `vms::setup` configured the current VMCS (the guest's) with host RIP at the exit stub
    // and host RSP at the top of L0's exit stack, and valid host and guest state; both handlers are
    // safe on that stack at any exit, and take the state `install` put in place.
    unsafe { ihmi_vmx::launch(&mut st.vmcss, &regs, exit::on_exit, exit::on_entry_failed) }
}

/// XSETBV always exits and L0 executes it for the guest, which needs CR4.OSXSAVE in L0 too.
fn enable_os_xsave() {
    const CPUID_1_ECX_XSAVE: u32 = 1 << 26;
    if ihmi_rt::cpu::cpuid(1, 0)[2] & CPUID_1_ECX_XSAVE != 0 {
        // SAFETY: the CPU has XSAVE (CPUID.1:ECX.XSAVE); setting OSXSAVE only enables XGETBV/XSETBV and
        // the XSAVE family, and XCR0 keeps its reset value (x87) until a guest sets it.
        unsafe { ihmi_rt::cpu::write_cr4(ihmi_rt::cpu::read_cr4() | ihmi_arch::cr::CR4_OSXSAVE) };
    }
}

/// Prints every VMCS field of the current VMCS that can be read, for a failed VM entry or a broken VM.
pub(crate) fn dump_vmcs(vmcss: &Vmcss) {
    let Some(vmcs) = vmcss.active_ref() else {
        log!("VMCS dump: no current VMCS");
        return;
    };
    log!("VMCS dump ({}):", vmcs.region());
    for field in DUMP_FIELDS {
        if let Some(v) = vmcs.try_read(*field) {
            log!("  {:<40} {v:#018x}", field_name(*field));
        }
    }
}

/// Prints the failure marker and powers off. Never returns, never hangs silently. Called for L0's own
/// failures only: a boot stage's error (once, in `l0_main`), or an exception or panic in L0 (a bug).
/// No path a guest controls leads here: a guest's fault ends the guest (`exit::finish`).
pub(crate) fn fail(reason: fmt::Arguments<'_>) -> ! {
    log!("IHMI-FAIL {}: {reason}", scenario_name());
    power_off()
}

/// Ends the run: the end marker, then Bochs's power-off port (real hardware ignores it and halts).
pub(crate) fn power_off() -> ! {
    log!("IHMI-END");
    ihmi_rt::console::drain_serial();
    for b in b"Shutdown" {
        // SAFETY: port 0x8900 is Bochs's power-off port and unused elsewhere; L0 is done with the machine.
        unsafe { x86::io::outb(0x8900, *b) };
    }
    ihmi_rt::cpu::halt_forever()
}

/// L0's exception handler. An NMI is the guest's (a device it owns raised it, or another CPU sent it):
/// L0 keeps it for the guest and goes on. Any other exception in L0 is a bug: report everything and
/// stop.
fn on_exception(f: &mut ihmi_rt::tables::ExceptionFrame) {
    if f.vector == u64::from(ihmi_arch::vector::NMI) {
        platform::NMI_FOR_GUEST.store(true, core::sync::atomic::Ordering::SeqCst);
        return;
    }
    fatal_exception(f);
}

/// An exception in L0: report everything and stop.
fn fatal_exception(f: &mut ihmi_rt::tables::ExceptionFrame) {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effect.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    log!("L0 EXCEPTION vector {} error {:#x} at rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} cr2={cr2:#x}", f.vector, f.error_code, f.rip, f.cs, f.rflags, f.rsp);
    log!(
        "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx
    );
    log!(
        "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}",
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8
    );
    log!(
        "  r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}",
        f.r9,
        f.r10,
        f.r11,
        f.r12
    );
    log!(
        "  r13={:#018x} r14={:#018x} r15={:#018x}",
        f.r13,
        f.r14,
        f.r15
    );
    fail(format_args!(
        "exception {} in L0 at rip={:#x}",
        f.vector, f.rip
    ))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    fail(format_args!("L0 panic: {info}"))
}
