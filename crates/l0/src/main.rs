//! ihmi L0: the trusted bottom layer. It boots by multiboot2, takes the machine, turns VMX on, gives one
//! guest an EPT that maps guest RAM and leaves out every frame L0 owns, launches it, and handles its exits
//! with the policy in `ihmi-hv`. The flow of this file is the boot order:
//! boot → console → CPU tables → memory → VMX → EPT → guest → VMCS → launch → exits → verdict.

#![no_std]
#![no_main]

mod boot;
mod elf_image;
mod frames;
mod guest;
mod linux;
mod monitor;
mod outbox;
mod platform;
mod ranges;
mod vmcs_setup;

use core::cell::UnsafeCell;
use core::fmt;

use ihmi_abi::monitor::Mode;
use ihmi_abi::Scenario;
use ihmi_addr::{Gpa, GpaRange, Gva, Hpa, HpaRange};
use ihmi_hv::{Action, GuestEnd, GuestRegs, Hypervisor, MemoryMap, Vcpu};
use ihmi_judge::{
    judge_entry_failure, AttackContext, BenchContext, EntryFailure, Facts, Judge, MonitorAudit,
    MonitorCounts, Verdict,
};
use ihmi_rt::console::{Console, Sink};
use ihmi_vmcs::{field_name, VmExit, VmInstructionError, VmxCapabilities, DUMP_FIELDS};
use ihmi_vmx::{ActiveVmcs, HwVcpu};
use platform::HwPlatform;

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

/// Multiboot2 boot-loader magic in EAX (multiboot2 spec §3.3).
const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;
/// L0's frame pool: EPT tables, VMXON/VMCS regions, bitmaps.
const POOL_SIZE: u64 = 4 * 1024 * 1024;
/// Rejected-request events printed per drain of the monitor's ring; the rest are counted.
const REJECTED_PRINTED_PER_DRAIN: u64 = 8;
/// Only the first 4 GiB are identity-mapped by the boot page tables.
const MAPPED_LIMIT: u64 = 4 * 1024 * 1024 * 1024;

/// Everything the exit handler needs. Lives in a static because the exit stub calls a plain function.
pub(crate) struct L0State {
    pub(crate) hv: Hypervisor,
    pub(crate) vmcs: ActiveVmcs,
    pub(crate) probe: Gpa,
    /// The in-VM monitor, when the scenario runs one.
    pub(crate) monitor: Option<monitor::Loaded>,
    /// The guest kernel's code (where its hooks are).
    pub(crate) guest_code: guest::Ranges,
    /// The hooks' gate pointer in guest memory.
    pub(crate) hook: Option<Gpa>,
    /// The out-of-box monitor VM, when the scenario runs one.
    pub(crate) outbox: Option<outbox::MonitorVm>,
    /// The scenario's judge: it observes the exits and the monitor's events.
    pub(crate) judge: Judge,
    /// The guest's EPT view and the frames it may still need (a Linux guest's hook changes it).
    pub(crate) guest_view: ihmi_ept::EptView,
    /// The guest's memory map, which fences every access L0 makes on the guest's behalf.
    pub(crate) fence: MemoryMap,
    /// The monitor word the exit policy may have L0 write (the Linux gate's kernel entry).
    pub(crate) monitor_word: Option<Gpa>,
    pub(crate) frames: frames::Pool,
}

struct StateCell(UnsafeCell<Option<L0State>>);
// SAFETY: L0 runs on one CPU with interrupts off. The state is written once before VMLAUNCH and afterwards
// touched only by the exit handler, which never nests (exits cannot happen while L0 runs).
unsafe impl Sync for StateCell {}
static STATE: StateCell = StateCell(UnsafeCell::new(None));

/// The scenario name, kept for failure paths that run before or outside the hypervisor state.
static SCENARIO_NAME: ScenarioName = ScenarioName(UnsafeCell::new("unknown"));
struct ScenarioName(UnsafeCell<&'static str>);
// SAFETY: written once during boot on the only CPU, read afterwards.
unsafe impl Sync for ScenarioName {}

fn scenario_name() -> &'static str {
    // SAFETY: see `ScenarioName`; reads never race with the single boot-time write.
    unsafe { *SCENARIO_NAME.0.get() }
}

extern "C" {
    static __l0_start: u8;
    static __l0_end: u8;
}

#[no_mangle]
extern "C" fn l0_main(magic: u32, info: u32) -> ! {
    ihmi_rt::console::init_serial();
    log!("");
    log!(
        "ihmi L0 {}: trusted hypervisor for in-box monitoring",
        env!("CARGO_PKG_VERSION")
    );
    if magic != MULTIBOOT2_MAGIC {
        fail(format_args!(
            "not started by a multiboot2 loader (magic {magic:#x}); boot the ISO with GRUB"
        ));
    }
    let tables = ihmi_rt::tables::init(fatal_exception);
    // XSETBV always exits and L0 executes it for the guest, which needs CR4.OSXSAVE in L0 too.
    if ihmi_rt::cpu::cpuid(1, 0)[2] & (1 << 26) != 0 {
        // SAFETY: the CPU has XSAVE (CPUID.1:ECX.XSAVE); setting OSXSAVE only enables XGETBV/XSETBV and
        // the XSAVE family, and XCR0 keeps its reset value (x87) until a guest sets it.
        unsafe { ihmi_rt::cpu::write_cr4(ihmi_rt::cpu::read_cr4() | (1 << 18)) };
    }

    // SAFETY: a multiboot2 loader passed `info` (magic checked above); it points at a valid boot
    // information structure in memory that nothing has reused yet.
    let mbi = match unsafe {
        multiboot2::BootInformation::load(info as usize as *const multiboot2::BootInformationHeader)
    } {
        Ok(m) => m,
        Err(_) => fail(format_args!(
            "the multiboot2 boot information at {info:#x} is malformed"
        )),
    };
    let cmdline = mbi
        .command_line_tag()
        .and_then(|t| t.cmdline().ok())
        .unwrap_or("");
    let scenario_arg = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("scenario="))
        .unwrap_or("testguest-demo");
    let Some(scenario) = Scenario::from_name(scenario_arg) else {
        fail(format_args!(
            "unknown scenario '{scenario_arg}' on the command line"
        ));
    };
    // SAFETY: single CPU at boot; nothing reads the name concurrently.
    unsafe { *SCENARIO_NAME.0.get() = scenario.name() };
    log!("scenario: {}", scenario.name());

    // Memory: what the firmware reports free, minus what L0 keeps.
    let mut available =
        [HpaRange::new(Hpa::new(0), Hpa::new(0)); ihmi_hv::memory::MAX_INPUT_RANGES];
    let mut n_available = 0;
    let Some(mmap) = mbi.memory_map_tag() else {
        fail(format_args!("the boot loader gave no memory map"))
    };
    let mut firmware = [linux::FirmwareRange {
        range: GpaRange::new(Gpa::new(0), Gpa::new(0)),
        kind: ihmi_linux::E820Kind::Reserved,
    }; ihmi_linux::E820_MAX];
    let mut n_firmware = 0;
    for area in mmap.memory_areas() {
        let kind = match area.typ() {
            multiboot2::MemoryAreaType::Available => ihmi_linux::E820Kind::Ram,
            multiboot2::MemoryAreaType::AcpiAvailable => ihmi_linux::E820Kind::Acpi,
            multiboot2::MemoryAreaType::ReservedHibernate => ihmi_linux::E820Kind::Nvs,
            multiboot2::MemoryAreaType::Defective => ihmi_linux::E820Kind::Unusable,
            _ => ihmi_linux::E820Kind::Reserved,
        };
        if n_firmware < firmware.len() && area.start_address() < MAPPED_LIMIT {
            // The guest's e820 map is the firmware's: its EPT maps guest-physical space 1:1.
            firmware[n_firmware] = linux::FirmwareRange {
                range: GpaRange::new(
                    Gpa::new(area.start_address()),
                    Gpa::new(area.end_address().min(MAPPED_LIMIT)),
                ),
                kind,
            };
            n_firmware += 1;
        }
        if area.typ() != multiboot2::MemoryAreaType::Available || n_available == available.len() {
            continue;
        }
        let end = area.end_address().min(MAPPED_LIMIT);
        if area.start_address() < end {
            available[n_available] = HpaRange::new(Hpa::new(area.start_address()), Hpa::new(end));
            n_available += 1;
        }
    }
    let available = &available[..n_available];
    let firmware = &firmware[..n_firmware];
    let image = HpaRange::new(
        Hpa::new(core::ptr::addr_of!(__l0_start) as u64),
        Hpa::new(core::ptr::addr_of!(__l0_end) as u64),
    );
    let mut owned = [image; 12];
    let mut n_owned = 1;
    owned[n_owned] = HpaRange::new(
        Hpa::new(mbi.start_address() as u64),
        Hpa::new(mbi.end_address() as u64),
    );
    n_owned += 1;
    let mut guest_module: Option<&'static [u8]> = None;
    let mut monitor_module: Option<&'static [u8]> = None;
    let mut linux_module: Option<(&'static [u8], &str)> = None;
    let mut initrd_module: Option<&'static [u8]> = None;
    let mut profile_module: Option<&'static [u8]> = None;
    for module in mbi.module_tags() {
        let range = HpaRange::new(
            Hpa::new(u64::from(module.start_address())),
            Hpa::new(u64::from(module.end_address())),
        );
        // One slot stays free for the frame pool. A module L0 could not record would become guest RAM.
        if n_owned >= owned.len() - 1 {
            fail(format_args!(
                "more boot modules than L0 can keep track of ({})",
                owned.len() - 3
            ));
        }
        owned[n_owned] = range;
        n_owned += 1;
        // SAFETY: GRUB loaded the module at [start, end) in RAM; L0 owns that range (it is in `owned`, so
        // never mapped for the guest) and never writes it.
        let bytes = unsafe {
            core::slice::from_raw_parts(range.start.raw() as *const u8, range.len() as usize)
        };
        match module.cmdline().ok() {
            Some("testguest") => guest_module = Some(bytes),
            Some("monitor") => monitor_module = Some(bytes),
            Some("initrd") => initrd_module = Some(bytes),
            Some("linux-profile") => profile_module = Some(bytes),
            // `linux` then the kernel's command line.
            Some(c) if c == "linux" || c.starts_with("linux ") => {
                linux_module = Some((bytes, c.strip_prefix("linux").unwrap_or("").trim()));
            }
            _ => {}
        }
    }
    let Some(pool) = ihmi_hv::memory::choose_pool(
        available,
        &owned[..n_owned],
        POOL_SIZE,
        ihmi_addr::LARGE_PAGE_SIZE,
    ) else {
        fail(format_args!(
            "no room for L0's {} MiB frame pool; give the machine more memory",
            POOL_SIZE >> 20
        ));
    };
    owned[n_owned] = pool;
    n_owned += 1;
    let devices = [
        HpaRange::new(Hpa::new(0xa_0000), Hpa::new(0xc_0000)), // legacy VGA
        HpaRange::new(Hpa::new(0xfec0_0000), Hpa::new(0xfec0_1000)), // I/O APIC
        HpaRange::new(Hpa::new(0xfee0_0000), Hpa::new(0xfee0_1000)), // local APIC
    ];
    let mut memory = match MemoryMap::build(available, &owned[..n_owned], &devices) {
        Ok(m) => m,
        Err(e) => fail(format_args!("cannot build the guest memory map: {e:?}")),
    };
    // A commodity kernel owns the machine's devices and firmware tables: everything below 4 GiB that is
    // neither RAM nor L0's passes through.
    if scenario.is_linux() {
        if let Err(e) = memory.fill_gaps_as_mmio(Gpa::new(MAPPED_LIMIT)) {
            fail(format_args!("cannot pass the devices through: {e:?}"));
        }
    }
    for (range, kind) in memory.regions() {
        log!(
            "memory: {:#011x}-{:#011x} {}",
            range.start.raw(),
            range.end.raw(),
            kind.name()
        );
    }
    let mut frames = frames::Pool::new(pool);

    // VMX.
    if ihmi_rt::cpu::cpuid(1, 0)[2] & (1 << 5) == 0 {
        fail(format_args!(
            "this CPU has no VMX; choose a VMX-capable CPU model (e.g. corei7_skylake_x)"
        ));
    }
    // SAFETY: CPUID reports VMX, so the VMX capability MSRs exist; `read` only reads the ones its own
    // feature checks allow.
    let caps = VmxCapabilities::read(|msr| unsafe { ihmi_rt::cpu::rdmsr(msr) });
    let features = caps.features();
    let yes = |b: bool| if b { "yes" } else { "no" };
    log!(
        "VMX: EPT {}, VMFUNC (EPTP switching) {}, #VE {}, unrestricted guest {}",
        yes(features.ept),
        yes(features.eptp_switching),
        yes(features.ept_violation_ve),
        yes(features.unrestricted_guest)
    );
    log!("VMX features: {features}");
    if !features.ept {
        fail(format_args!("this CPU has VMX but no EPT; L0 needs EPT"));
    }
    let vmxon = frames.alloc_zeroed();
    // SAFETY: `vmxon` is a fresh frame from L0's pool (identity-mapped, reserved for good); we run at CPL0
    // with interrupts off and have not entered VMX operation before.
    if let Err(e) = unsafe { ihmi_vmx::enable(vmxon, &caps) } {
        fail(format_args!("{e}"));
    }
    log!("VMX on (VMCS revision {:#x})", caps.revision_id());

    let probe = Gpa::new(vmxon.raw());
    let Some(module) = guest_module else {
        fail(format_args!(
            "no 'testguest' module; the ISO must load it with module2"
        ));
    };
    let guest_image = elf_image::Image::parse(module, "guest");
    // A Linux guest's code is its own business until the monitors are on; the test guest's is protected.
    let guest_regions = if scenario.is_linux() {
        guest::Regions::empty()
    } else {
        guest::regions(&guest_image)
    };
    // 1 GiB pages only where the CPU has them (CPUID.80000001H:EDX.Page1GB, SDM 4.1.4).
    let page_1g = ihmi_rt::cpu::cpuid(0x8000_0001, 0)[3] & (1 << 26) != 0;

    // The monitor: in the box (two views of the guest switched by VMFUNC) or out of it (the same image
    // as the kernel of a VM of its own). Its frames come out of guest RAM either way.
    let mode = scenario.monitor_mode();
    if mode == Mode::InBox && !features.eptp_switching {
        fail(format_args!(
            "this CPU has no VMFUNC EPTP switching, which in-box monitoring needs; choose a CPU model that has it (e.g. corei7_skylake_x), or run the out-of-box mode"
        ));
    }
    // A Linux guest: what the host found in the kernel's own System.map and BTF.
    let linux_profile = scenario.is_linux().then(|| {
        let Some(text) = profile_module.and_then(|b| core::str::from_utf8(b).ok()) else {
            fail(format_args!(
                "no 'linux-profile' module (the guest profile `ihmi` derives from System.map and BTF)"
            ));
        };
        match ihmi_linux::LinuxProfile::parse(text) {
            Ok(p) => {
                log!(
                    "linux: profile: current_task {:#x}, task_struct pid@{:#x} tgid@{:#x} comm@{:#x} real_parent@{:#x}, PTI PGD pairs {}",
                    p.current_task,
                    p.pid.offset,
                    p.tgid.offset,
                    p.comm.offset,
                    p.real_parent.offset,
                    p.pti_pgd_pair
                );
                p
            }
            Err(e) => fail(format_args!("{e}")),
        }
    });
    // A Linux kernel is placed once, before the monitor takes its frames out of guest RAM.
    let linux_kernel = scenario.is_linux().then(|| {
        let Some((kernel, cmdline)) = linux_module else {
            fail(format_args!(
                "no 'linux' module; the ISO must load the kernel with `module2 /boot/bzImage linux <command line>`"
            ));
        };
        (linux::placed(kernel, &memory), cmdline)
    });
    let monitor = if mode == Mode::None {
        None
    } else {
        let Some(bytes) = monitor_module else {
            fail(format_args!(
                "no 'monitor' module; the ISO must load it with module2"
            ));
        };
        // The monitor's frames come out of guest RAM, away from what the guest needs where it is.
        let (os, taken) = match (linux_profile, &linux_kernel) {
            (Some(p), Some((kernel, _))) => {
                let span = linux::kernel_span(kernel);
                let mut taken = guest::Ranges::new();
                taken.push(GpaRange::new(Gpa::new(0), Gpa::new(0x10_0000)));
                taken.push(span);
                (monitor::MonitorOs::Linux(p), taken)
            }
            _ => (
                monitor::MonitorOs::TestGuest {
                    current: Gva::new(guest_image.symbol("CURRENT_PROCESS")),
                },
                guest_regions.all,
            ),
        };
        // The process-creation allow-list: the test guest's own, or for Linux `allow=` on L0's
        // command line (none: monitor without enforcing).
        let allowed = match os {
            monitor::MonitorOs::TestGuest { .. } => monitor::TESTGUEST_ALLOWED,
            monitor::MonitorOs::Linux(_) => cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix("allow="))
                .unwrap_or(""),
        };
        Some(monitor::load(
            bytes,
            &mut memory,
            taken.as_slice(),
            &os,
            allowed,
            mode,
            page_1g,
        ))
    };
    let inbox = monitor.as_ref().filter(|_| mode == Mode::InBox);
    let layout = inbox.map(|m| m.layout);
    // A Linux guest sees the gate page and its tables in both modes: out of the box its hooks' VMCALL
    // stubs live there.
    let shown = monitor
        .as_ref()
        .filter(|_| mode == Mode::InBox || scenario.is_linux())
        .map(|m| m.layout);
    let guest_view = ihmi_hv::guard::views::build_guest_view(
        &mut frames,
        &memory,
        shown.as_ref(),
        guest_regions.code.as_slice(),
    )
    .unwrap_or_else(|e| fail(format_args!("guest view: {e}")));
    log!(
        "EPT view 0 (guest): root {} ({} 2 MiB pages split)",
        guest_view.root(),
        guest_view.split_count()
    );
    let mut monitor_eptp = None;
    let eptp_list = match &layout {
        Some(l) => {
            let monitor_view = ihmi_hv::guard::views::build_monitor_view(
                &mut frames,
                &memory,
                l,
                features.ept_execute_only,
            )
            .unwrap_or_else(|e| fail(format_args!("monitor view: {e}")));
            log!(
                "EPT view 1 (monitor): root {} ({} 2 MiB pages split)",
                monitor_view.root(),
                monitor_view.split_count()
            );
            monitor_eptp = Some(monitor_view.eptp());
            let frame = frames.alloc_zeroed();
            // SAFETY: a fresh, zeroed, page-aligned pool frame; EptpList is exactly one page.
            let list = unsafe { &mut *(frame.raw() as *mut ihmi_ept::EptpList) };
            for (id, view) in [
                (ihmi_hv::guard::views::GUEST_VIEW, &guest_view),
                (ihmi_hv::guard::views::MONITOR_VIEW, &monitor_view),
            ] {
                list.set(id, view.eptp());
            }
            Some(frame)
        }
        None => None,
    };
    let gate = inbox.map(|m| m.gate_gva);
    let boot = if let Some((kernel, cmdline)) = linux_kernel {
        let modules = linux::Modules {
            kernel,
            cmdline,
            initrd: initrd_module,
        };
        let monitor_at = monitor.as_ref().map(|m| m.layout.region.start);
        let gate_pages = shown.and_then(|l| l.linux).map(|l| l.all());
        linux::load(&modules, &memory, firmware, monitor_at, gate_pages, page_1g)
    } else {
        guest::load(&guest_image, &memory, scenario, probe, mode, gate, page_1g)
    };
    // The test guest's hooks learn where the gate is; a Linux kernel's system calls are redirected
    // when it installs its entry.
    let hook = monitor
        .as_ref()
        .filter(|_| !scenario.is_linux())
        .map(|_| guest::install_hook(&guest_image, &memory, &guest_regions, mode, gate));
    // The guard: in the box, of the views; for Linux in either mode, of the hooks.
    let linux_monitor = monitor.as_ref().filter(|_| scenario.is_linux());
    let guard = (monitor_eptp.is_some() || linux_monitor.is_some()).then(|| {
        let g = ihmi_hv::Guard::new(
            ihmi_hv::ViewEptps {
                guest: guest_view.eptp(),
                monitor: monitor_eptp,
            },
            hook.zip(gate.map(Gva::raw)),
        );
        // Linux: the system-call gate goes in front of the kernel's entry when the kernel installs it.
        if let (Some(p), Some(info), Some((kernel, _))) = (
            linux_profile,
            linux_monitor.and_then(|m| m.linux_gate),
            &linux_kernel,
        ) {
            let phys_offset = kernel.phys_offset();
            return g.with_linux_gate(ihmi_hv::LinuxGate {
                gate_entry: Gva::new(info.gate_entry),
                kernel_entry_slot: ihmi_hv::MonitorWord::new(info.kernel_entry_slot),
                pgd: linux::kernel_text_pa(p.init_top_pgt, phys_offset, &memory),
                slot: info.slot,
                pml4e: info.pml4e,
                pti_pgd_pair: p.pti_pgd_pair,
                gate_page: info.gate_page,
                exec_hook: Some(ihmi_hv::linux::hooks::ExecHook {
                    site: Gva::new(p.exec_hook),
                    site_pa: linux::kernel_text_pa(p.exec_hook, phys_offset, &memory),
                    trampoline: Gva::new(info.hook_trampoline),
                    slot_va: Gva::new(info.hook_slot),
                    table: info.hook_table,
                    gate_page: info.gate_page,
                    pgd: linux::kernel_text_pa(p.init_top_pgt, phys_offset, &memory),
                }),
                outbox_syscall: info.outbox_syscall.map(Gva::new),
            });
        }
        g
    });
    // The out-of-box monitor VM's VMCS is set up first; the guest's is current at launch.
    let outbox = match (&monitor, mode) {
        (Some(m), Mode::OutBox) => Some(outbox::setup(m, &memory, &caps, &tables, &mut frames)),
        _ => None,
    };
    let vmcs_frame = frames.alloc_zeroed();
    // SAFETY: VMX is on; `vmcs_frame` is a fresh pool frame used for nothing else.
    let mut vmcs = match unsafe { ihmi_vmx::load_vmcs(vmcs_frame, &caps) } {
        Ok(v) => v,
        Err(e) => fail(format_args!("{e}")),
    };
    // Linux handles its own breakpoints and idles in HLT with interrupts on: neither needs L0.
    let params = vmcs_setup::VmParams {
        eptp: guest_view.eptp(),
        eptp_list,
        boot: &boot,
        exceptions: if scenario.is_linux() {
            0
        } else {
            ihmi_hv::EXCEPTION_BITMAP
        },
        hlt_exits: !scenario.is_linux(),
    };
    if let Err(e) = vmcs_setup::configure(&mut vmcs, &caps, &tables, &mut frames, &params) {
        log!("VMCS setup failed: {e}");
        dump_vmcs(&vmcs);
        fail(format_args!("VMCS setup failed: {e}"));
    }
    break_vmcs_for_scenario(&mut vmcs, scenario);
    log!(
        "frames: {} of {} pool frames used",
        frames.used(),
        frames.total()
    );
    log!("launching the guest at rip={:#x}", boot.entry);

    let regs = GuestRegs {
        rdi: boot.boot_info.raw(),
        rsi: boot.boot_info.raw(),
        ..GuestRegs::default()
    };
    // What a benchmark line says of one invocation: the gate's switches per pass, counted in its code
    // at load (in the box only).
    let (vmfuncs, cr3_loads) = match (mode, &monitor) {
        (Mode::InBox, Some(m)) => (m.gate_vmfuncs, m.gate_cr3_loads),
        _ => (0, 0),
    };
    let bench_context = BenchContext {
        mode,
        vmfuncs,
        cr3_loads,
    };
    // SAFETY: single CPU at boot; the exit handler is not running yet.
    let state = unsafe { &mut *STATE.0.get() };
    let fence = memory.clone();
    let monitor_word = monitor
        .as_ref()
        .and_then(|m| m.linux_gate)
        .map(|g| g.kernel_entry_slot);
    let mut hv = Hypervisor::new(memory);
    hv.guard = guard;
    hv.linux = linux_profile;
    hv.outbox_monitor = outbox.is_some();
    let outbox = outbox.map(|o| o.with_guest_vmcs(vmcs_frame));
    *state = Some(L0State {
        hv,
        vmcs,
        probe,
        monitor,
        guest_code: guest_regions.code,
        hook,
        outbox,
        judge: Judge::new(scenario, bench_context),
        guest_view,
        fence,
        monitor_word,
        frames,
    });
    let Some(st) = state.as_mut() else {
        fail(format_args!("state lost"))
    };
    // SAFETY: `configure` set host RIP to the exit stub and host RSP to the top of L0's exit stack, and
    // filled valid host and guest state; both handlers are safe on that stack at any exit.
    unsafe { ihmi_vmx::launch(&mut st.vmcs, &regs, on_exit, on_entry_failed) }
}

/// The entry-failure scenarios break the VMCS on purpose, each in one well-defined way, so the failure
/// reporting paths run for real.
fn break_vmcs_for_scenario(vmcs: &mut ActiveVmcs, scenario: Scenario) {
    let Some(fault) = ihmi_judge::setup::vmcs_fault(scenario) else {
        return;
    };
    match vmcs.write(fault.field, fault.value) {
        Ok(()) => log!(
            "scenario {}: VMCS deliberately made invalid: {}",
            scenario.name(),
            fault.why
        ),
        Err(e) => fail(format_args!(
            "could not break the VMCS for the scenario: {e}"
        )),
    }
}

fn state() -> &'static mut L0State {
    // SAFETY: see `StateCell`: one CPU, no nesting; the state was set before VMLAUNCH.
    match unsafe { (*STATE.0.get()).as_mut() } {
        Some(s) => s,
        None => fail(format_args!("VM exit before L0 state was set up")),
    }
}

extern "C" fn on_exit(regs: &mut GuestRegs) {
    let st = state();
    if let VmExit::EntryFailure {
        reason,
        qualification,
    } = HwVcpu::new(&mut st.vmcs, regs).exit()
    {
        log!(
            "VM entry failed: {} (exit qualification {qualification:#x})",
            reason.name()
        );
        dump_vmcs(&st.vmcs);
        entry_failed(st.judge.scenario(), EntryFailure::Exit(reason));
    }
    if st
        .outbox
        .as_ref()
        .is_some_and(outbox::MonitorVm::is_running)
    {
        outbox::on_exit(st, regs);
        return;
    }
    // What the monitor saw happened before this exit: show it first.
    drain_monitor(st);
    let mut vcpu = HwVcpu::new(&mut st.vmcs, regs);
    let mut platform = HwPlatform {
        guest_view: &mut st.guest_view,
        frames: &mut st.frames,
        fence: &st.fence,
        monitor_word: st.monitor_word,
    };
    // The monitor's counts now, for a benchmark window this exit may open or close.
    let counts = MonitorCounts {
        monitor_vm_exits: st.outbox.as_ref().map_or(0, outbox::MonitorVm::exits),
        invocations: st.monitor.as_ref().map_or(0, monitor::Loaded::invocations),
    };
    let mut console = Console(Sink::Both);
    let mut observer = st.judge.observer(counts, &mut console);
    let action = st.hv.handle_exit(&mut vcpu, &mut platform, &mut observer);
    match action {
        Action::Resume => {}
        Action::End(end) => finish(end),
        Action::CallMonitor {
            code,
            args,
            verdict_to_rax,
        } => outbox::enter(st, regs, code, args, verdict_to_rax),
    }
}

extern "C" fn on_entry_failed(rflags: u64) -> ! {
    const CF: u64 = 1;
    const ZF: u64 = 1 << 6;
    let st = state();
    let failure = if rflags & ZF != 0 {
        let err: VmInstructionError = st.vmcs.instruction_error();
        log!(
            "VM entry failed: VMfailValid, VM-instruction error {} ({err})",
            err.raw()
        );
        EntryFailure::FailValid(err)
    } else {
        if rflags & CF == 0 {
            log!("VM entry failed with neither CF nor ZF set (rflags {rflags:#x}); treating as VMfailInvalid");
        }
        log!("VM entry failed: VMfailInvalid (no valid current VMCS)");
        EntryFailure::FailInvalid
    };
    dump_vmcs(&st.vmcs);
    entry_failed(st.judge.scenario(), failure)
}

/// A VM entry failed and has been reported: pass only if the scenario asked for exactly this failure.
fn entry_failed(scenario: Scenario, failure: EntryFailure) -> ! {
    match judge_entry_failure(scenario, failure) {
        Verdict::Pass => {
            log!("IHMI-PASS {}", scenario.name());
            power_off()
        }
        Verdict::Fail(reason) => fail(format_args!("{reason}")),
    }
}

/// The guest has stopped: report, judge, and power off.
pub(crate) fn finish(end: GuestEnd) -> ! {
    let st = state();
    drain_monitor(st);
    // Ends L0 decides itself (a broken monitor VM) reach the judge here; the exit policy's were
    // observed already.
    st.judge.record_end(end);
    log!("guest ended: {end}");
    if let Some(m) = &st.monitor {
        log!(
            "monitor: {} events, {} dropped",
            m.ring().produced(),
            m.ring().dropped()
        );
    }
    if let Some(o) = &st.outbox {
        log!(
            "monitor VM: {} calls, {} exits of its own",
            o.calls(),
            o.exits()
        );
    }
    log!("exit counters ({} exits):", st.hv.counters.total());
    for (reason, count) in st.hv.counters.nonzero() {
        log!("  {:<24} {count:>8}", reason.name());
    }
    // An attack scenario also needs the monitor as L0 finds it now.
    let audit = st
        .monitor
        .as_ref()
        .filter(|_| st.judge.scenario().attack().is_some())
        .map(|m| {
            let checksum = m.checksum();
            let audit = MonitorAudit {
                image_intact: checksum == m.checksum_at_load,
                ring_consistent: m.ring().is_consistent(),
            };
            log!(
                "monitor audit: image checksum {checksum:#018x} (at load {:#018x}), ring consistent: {}",
                m.checksum_at_load,
                audit.ring_consistent
            );
            AttackContext {
                gate: m.layout.gate,
                guest_code: st.guest_code.as_slice(),
                hook: st.hook,
                audit,
            }
        });
    let facts = Facts {
        probe: st.probe,
        probe_region: st.hv.memory.classify(st.probe),
        attack: audit,
    };
    match st
        .judge
        .verdict(&st.hv.counters, &facts, &mut Console(Sink::Both))
    {
        Verdict::Pass => {
            log!("IHMI-PASS {}", st.judge.scenario().name());
            power_off()
        }
        Verdict::Fail(reason) => fail(format_args!("{reason}")),
    }
}

/// Takes the monitor's new events out of its ring: each becomes a JSON line on the console and an entry
/// in the scenario log.
pub(crate) fn drain_monitor(st: &mut L0State) {
    let Some(m) = &st.monitor else { return };
    let ring = m.ring();
    let judge = &mut st.judge;
    let os = &m.os;
    let mode = judge.scenario().monitor_mode().name();
    let print = ihmi_judge::setup::prints_events(judge.scenario());
    // Rejected requests are what a flood is made of: a few are printed per drain, the rest counted and
    // said, so a guest cannot flood the console either.
    let mut rejected = 0u64;
    ring.drain(|e| {
        let is_rejected = e.kind() == Some(ihmi_monitor::EventKind::Rejected);
        rejected += u64::from(is_rejected);
        if print && (!is_rejected || rejected <= REJECTED_PRINTED_PER_DRAIN) {
            log!("event| {}", e.json(mode, os));
        }
        judge.record_monitor_event(e);
    });
    if print && rejected > REJECTED_PRINTED_PER_DRAIN {
        log!(
            "monitor: {} more rejected requests in this drain, counted but not printed",
            rejected - REJECTED_PRINTED_PER_DRAIN
        );
    }
    judge.set_monitor_dropped(ring.dropped());
}

/// Prints every VMCS field that can be read, for a failed VM entry.
pub(crate) fn dump_vmcs(vmcs: &ActiveVmcs) {
    log!("VMCS dump ({}):", vmcs.region());
    for field in DUMP_FIELDS {
        if let Some(v) = vmcs.try_read(*field) {
            log!("  {:<40} {v:#018x}", field_name(*field));
        }
    }
}

/// Prints the failure marker and powers off. Never returns, never hangs silently.
pub(crate) fn fail(reason: fmt::Arguments<'_>) -> ! {
    log!("IHMI-FAIL {}: {reason}", scenario_name());
    power_off()
}

fn power_off() -> ! {
    log!("IHMI-END");
    ihmi_rt::console::drain_serial();
    // Bochs's shutdown port; real hardware ignores it and halts below.
    for b in b"Shutdown" {
        // SAFETY: port 0x8900 is Bochs's power-off port and unused elsewhere; L0 is done with the machine.
        unsafe { x86::io::outb(0x8900, *b) };
    }
    ihmi_rt::cpu::halt_forever()
}

/// L0's exception handler: an exception in L0 is a bug, so report everything and stop.
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
