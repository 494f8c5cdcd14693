//! Boot stages from the guest on: which guest the scenario boots ([`Guest::prepare`]), the monitor
//! ([`load_monitor`]), then [`setup`]: the EPT views, the guest's memory (image or kernel, boot
//! structures, hooks), the guard, and the VMs (the out-of-box monitor VM first, the guest's VMCS
//! last, so it is current at launch). What comes out is L0's whole state, ready to launch.

use ihmi_abi::monitor::Mode;
use ihmi_abi::Scenario;
use ihmi_addr::{Gpa, GpaRange, Gva, Hpa};
use ihmi_hv::linux::gate::GateEntry;
use ihmi_hv::linux::hooks::{ExecHook, HookSite};
use ihmi_hv::{
    Guard, GuestRegs, Hypervisor, KernelImage, LinuxGate, MemoryMap, MonitorWord, ViewEptps,
};
use ihmi_judge::{BenchContext, Judge};
use ihmi_rt::tables::TableBases;
use ihmi_vmcs::VmcsId;
use ihmi_vmx::Vmcss;

use crate::boot_info::BootInfo;
use crate::error::LoadError;
use crate::frames::Pool;
use crate::frames::{Ept02Pool, EPT02_TABLES};
use crate::guest::{EntryMode, GuestBoot, GuestRam, TestGuest};
use crate::linux::LinuxGuest;
use crate::memory::MemoryPlan;
use crate::monitor::{self, Loaded, MonitorOs};
use crate::multiboot::MultibootGuest;
use crate::outbox::MonitorVm;
use crate::ranges::Ranges;
use crate::state::{GrantedWord, L0State, Machine};
use crate::vmcs_setup::{self, VmParams};
use crate::vmx::Vmx;
use crate::{dump_vmcs, log, outbox, views};

/// The guest a scenario boots.
// One value, on L0's boot stack: there is no heap to box the larger variant into.
#[allow(clippy::large_enum_variant)]
pub enum Guest {
    /// ihmi's test guest.
    Test(TestGuest<'static>),
    /// An unmodified Linux kernel.
    Linux(LinuxGuest),
    /// A multiboot kernel.
    Multiboot(MultibootGuest),
}

impl Guest {
    /// The guest the scenario boots, from its module(s); a Linux kernel is placed now, before the
    /// monitor takes its frames out of guest RAM.
    pub fn prepare(boot: &BootInfo, memory: &MemoryMap) -> Result<Self, LoadError> {
        if boot.scenario.is_linux() {
            return Ok(Self::Linux(LinuxGuest::prepare(boot, memory)?));
        }
        if boot.scenario.is_multiboot() {
            let protocol = crate::multiboot::protocol(boot)?;
            return Ok(Self::Multiboot(MultibootGuest::prepare(
                boot, memory, protocol,
            )?));
        }
        let bytes = boot.modules.testguest.ok_or(LoadError::MissingModule {
            name: "testguest",
            how: "the ISO must load it with module2",
        })?;
        Ok(Self::Test(TestGuest::parse(bytes)?))
    }

    /// The guest's code, which the guest view keeps read + execute only (the test guest's hooks live
    /// there; a Linux guest's code is its own business until the monitors are on).
    fn protected_code(&self) -> Ranges {
        match self {
            Self::Test(t) => t.code,
            Self::Linux(_) | Self::Multiboot(_) => Ranges::new(),
        }
    }
}

/// The monitor, if the scenario runs one: in the box (two views of the guest switched by VMFUNC) or
/// out of it (the same image as the kernel of a VM of its own). Its frames come out of guest RAM
/// either way, away from what the guest needs where it is.
pub fn load_monitor(
    boot: &BootInfo,
    memory: &mut MemoryMap,
    guest: &Guest,
    scenario: Scenario,
    vmx: &Vmx,
) -> Result<Option<Loaded>, LoadError> {
    let mode = scenario.monitor_mode();
    if mode == Mode::None {
        return Ok(None);
    }
    let bytes = boot.modules.monitor.ok_or(LoadError::MissingModule {
        name: "monitor",
        how: "the ISO must load it with module2",
    })?;
    let full = |_| LoadError::MemoryMap(ihmi_hv::memory::MapError::Full);
    // The process-creation allow-list: the test guest's own, or for Linux `allow=` on L0's command
    // line (none: monitor without enforcing).
    let (os, taken, allowed) = match guest {
        Guest::Linux(l) => {
            let mut taken = Ranges::new();
            taken
                .push(GpaRange::new(Gpa::new(0), Gpa::new(0x10_0000)))
                .map_err(full)?;
            taken.push(l.span()).map_err(full)?;
            (
                MonitorOs::Linux(
                    l.profile,
                    [
                        l.image_pages(l.profile.text, memory)?,
                        l.image_pages(l.profile.rodata, memory)?,
                        l.image_pages(l.profile.data, memory)?,
                        l.image_pages(l.profile.bss, memory)?,
                    ],
                ),
                taken,
                boot.cmdline.value("allow").unwrap_or(""),
            )
        }
        Guest::Multiboot(_) => {
            return Err(LoadError::MissingModule {
                name: "monitor",
                how: "a multiboot kernel runs without a monitor",
            })
        }
        Guest::Test(t) => (
            MonitorOs::TestGuest {
                current: Gva::new(t.image.symbol("CURRENT_PROCESS")?),
            },
            t.all,
            monitor::TESTGUEST_ALLOWED,
        ),
    };
    monitor::load(
        bytes,
        memory,
        taken.as_slice(),
        &os,
        allowed,
        mode,
        vmx.page_1g,
    )
    .map(Some)
}

/// L0's state, ready to launch, and the registers the guest starts with.
pub struct Launch {
    pub state: L0State,
    pub regs: GuestRegs,
}

/// The remaining stages: views, guest memory, guard, VMs.
pub fn setup(
    boot: &BootInfo,
    plan: MemoryPlan,
    vmx: Vmx,
    tables: &TableBases,
    guest: Guest,
    monitor: Option<Loaded>,
    scenario: Scenario,
) -> Result<Launch, LoadError> {
    let MemoryPlan { memory, mut frames } = plan;
    let mode = scenario.monitor_mode();
    let inbox = monitor
        .as_ref()
        .filter(|_| mode == Mode::InBox)
        .map(|m| m.layout);
    // A Linux guest sees the gate page and its tables in both modes: out of the box its hooks'
    // VMCALL stubs live there.
    let shown = monitor
        .as_ref()
        .filter(|_| mode == Mode::InBox || scenario.is_linux())
        .map(|m| m.layout);
    let guest_code = guest.protected_code();
    let views = views::build(
        &mut frames,
        &memory,
        shown.as_ref(),
        inbox.as_ref(),
        &guest_code,
        &vmx.features,
    )?;

    // The guest's memory: its image and boot structures, and the test guest's hooks.
    let gate = monitor
        .as_ref()
        .filter(|_| mode == Mode::InBox)
        .map(|m| m.gate_gva);
    let probe = vmx.probe();
    let (boot_state, hook, handed) = load_guest(
        boot,
        &memory,
        &guest,
        monitor.as_ref(),
        shown.as_ref(),
        scenario,
        gate,
        probe,
        &vmx,
    )?;

    // The guard: in the box, of the views; for Linux in either mode, of the hooks.
    let guard = guard(&guest, monitor.as_ref(), &views, hook, gate, &memory)?;

    // The VMs: the out-of-box monitor VM's VMCS first, the guest's last (current at launch).
    let Vms {
        vmcss,
        guest_vmcs,
        nested_vmcs,
        shadow_vmcs,
        outbox,
    } = create_vms(
        &memory,
        &vmx,
        tables,
        &mut frames,
        monitor.as_ref(),
        &views,
        &boot_state,
        scenario,
    )?;
    log!(
        "frames: {} of {} pool frames used",
        frames.used(),
        frames.total()
    );

    // What a benchmark line says of one invocation: the gate's switches per pass, counted in its
    // code at load (in the box only).
    let (vmfuncs, cr3_loads) = match (mode, &monitor) {
        (Mode::InBox, Some(m)) => (m.gate_vmfuncs, m.gate_cr3_loads),
        _ => (0, 0),
    };
    let mut judge = Judge::new(
        scenario,
        BenchContext {
            mode,
            vmfuncs,
            cr3_loads,
        },
    );
    judge.log.multiboot_handed = handed;
    judge.log.multiboot_moved = boot.modules_moved;
    let monitor_words = monitor
        .as_ref()
        .and_then(Loaded::granted_words_at_load)
        .map(|w| w.map(|(at, value)| GrantedWord { at, value }));
    let vmcs_registry = monitor.as_ref().and_then(|m| m.vmcs_registry);
    let fence = memory.clone();
    let mut hv = Hypervisor::new(memory);
    hv.guard = guard;
    hv.linux = match &guest {
        Guest::Linux(l) => Some(l.profile),
        Guest::Test(_) | Guest::Multiboot(_) => None,
    };
    hv.outbox_monitor = outbox.is_some();
    let mut ept02 = None;
    if scenario.offers_vmx() {
        use ihmi_hv::nested::caps::{NestedFeatures, VirtualVmx};
        // Shadow paging (L1's guests run under L0's view of L1) unless the scenario offers nested
        // EPT, whose EPT02 gets tables of its own.
        let features = if scenario.offers_nested_ept() {
            ept02 = Some(Ept02Pool::new(&mut frames, EPT02_TABLES)?);
            NestedFeatures::NestedEpt
        } else {
            NestedFeatures::ShadowPaging
        };
        let offer = VirtualVmx::offer(&vmx.caps, features).map_err(LoadError::NestedOffer)?;
        let nested = ihmi_hv::nested::vmx::NestedVmx::new(offer);
        hv.nested = Some(if shadow_vmcs.is_some() {
            nested.with_shadowing()
        } else {
            nested
        });
        log!(
            "nested: VMX offered to the guest ({}, VMCS revision {:#x})",
            match features {
                NestedFeatures::ShadowPaging => "shadow paging",
                NestedFeatures::NestedEpt => "nested EPT",
            },
            ihmi_hv::nested::caps::VMCS12_REVISION
        );
        if let Some(pool) = &ept02 {
            log!(
                "nested: EPT02 gets {} tables at {:#x}",
                pool.total(),
                pool.base().raw()
            );
        }
    }
    let regs = match boot_state.mode {
        EntryMode::Long => GuestRegs {
            rdi: boot_state.boot_info.raw(),
            rsi: boot_state.boot_info.raw(),
            ..GuestRegs::default()
        },
        EntryMode::Protected { eax, ebx } => GuestRegs {
            rax: u64::from(eax),
            rbx: u64::from(ebx),
            ..GuestRegs::default()
        },
    };
    Ok(Launch {
        state: L0State {
            hv,
            vmcss,
            guest_vmcs,
            nested_vmcs,
            shadow_vmcs,
            outbox,
            hook_liveness: Default::default(),
            monitor,
            judge,
            probe,
            guest_code,
            hook,
            machine: Machine {
                guest_view: views.guest,
                frames,
                fence,
                monitor_words,
                vmcs_registry,
                ept02,
                view_generation: 0,
            },
        },
        regs,
    })
}

/// The guard of the guest's monitor: the views (in the box), the test guest's hook word, and for a
/// Linux guest the system-call gate to put in front of the kernel's entry when it installs it.
fn guard(
    guest: &Guest,
    monitor: Option<&Loaded>,
    views: &views::Views,
    hook: Option<Gpa>,
    gate: Option<Gva>,
    memory: &MemoryMap,
) -> Result<Option<Guard>, LoadError> {
    let inbox = views.monitor.is_some();
    let linux = match guest {
        Guest::Linux(l) => monitor.map(|m| (l, m)),
        Guest::Test(_) | Guest::Multiboot(_) => None,
    };
    if !inbox && linux.is_none() {
        return Ok(None);
    }
    let guard = Guard::new(
        ViewEptps {
            guest: views.guest.eptp(),
            monitor: views.monitor.map(|(eptp, _)| eptp),
        },
        hook.zip(gate.map(Gva::raw)),
    );
    let Some((l, info)) = linux.and_then(|(l, m)| m.linux_gate.map(|g| (l, g))) else {
        return Ok(Some(guard));
    };
    let p = &l.profile;
    let pgd = l.text_pa(p.init_top_pgt, memory)?;
    // A hook the kernel has (its function's address), through its trampoline in the slot.
    let site = |at: Option<u64>, trampoline| -> Result<Option<HookSite>, LoadError> {
        at.map(|at| {
            Ok(HookSite {
                site: Gva::new(at),
                site_pa: l.text_pa(at, memory)?,
                trampoline,
            })
        })
        .transpose()
    };
    let kvm = p.kvm.as_ref();
    Ok(Some(guard.with_linux_gate(LinuxGate {
        entries: info.entries.map(|(gate, slot, outbox_vmcall)| GateEntry {
            gate,
            kernel_slot: MonitorWord::new(slot),
            outbox_vmcall,
        }),
        pgd,
        slot: info.slot,
        pml4e: info.pml4e,
        pti_pgd_pair: p.pti_pgd_pair,
        gate_page: info.gate_page,
        exec_hook: Some(ExecHook {
            site: Gva::new(p.exec_hook),
            site_pa: l.text_pa(p.exec_hook, memory)?,
            trampoline: info.hook_trampoline,
            slot_va: info.hook_slot,
            table: info.hook_table,
            gate_page: info.gate_page,
            pgd,
        }),
        kernel: KernelImage {
            text: l.image_pages(p.text, memory)?,
            rodata: l.image_pages(p.rodata, memory)?,
            idt: l.image_pages([p.idt_table, p.idt_table + 1], memory)?,
        },
        call_vmcall: info.call_vmcall,
        io_uring_hook: site(p.io_uring.map(|(at, _)| at), info.io_uring_trampoline)?,
        kvm_exit_hook: site(kvm.map(|k| k.handle_exit), info.kvm_exit_trampoline)?,
        l2_map_hook: site(kvm.map(|k| k.make_spte), info.l2_map_trampoline)?,
        memslot_hook: site(kvm.map(|k| k.commit_memory_region), info.memslot_trampoline)?,
        vcpu_create_hook: site(kvm.map(|k| k.vcpu_create), info.vcpu_create_trampoline)?,
        vcpu_destroy_hook: site(kvm.map(|k| k.vcpu_destroy), info.vcpu_destroy_trampoline)?,
    })))
}

/// Loads the guest into its RAM: the test guest's image and boot information (and its hooks' gate
/// pointer, with a monitor), the Linux kernel, initrd and boot structures, or the multiboot kernel,
/// its modules and boot information. Returns how it starts, where the test guest's hook word is,
/// and for a multiboot kernel the digest of what it was handed.
#[allow(clippy::too_many_arguments)]
fn load_guest(
    boot: &BootInfo,
    memory: &MemoryMap,
    guest: &Guest,
    monitor: Option<&Loaded>,
    shown: Option<&ihmi_hv::guard::views::MonitorLayout>,
    scenario: Scenario,
    gate: Option<Gva>,
    probe: Gpa,
    vmx: &Vmx,
) -> Result<(GuestBoot, Option<Gpa>, Option<u64>), LoadError> {
    let mode = scenario.monitor_mode();
    // SAFETY: the guest has not run yet, guest RAM is identity-mapped below 4 GiB, and this is the
    // only writer of it (the monitor's frames were taken out of guest RAM already).
    let mut ram = unsafe { GuestRam::new(memory) };
    match guest {
        Guest::Linux(l) => {
            let monitor_at = monitor.map(|m| m.layout.region.start);
            let gate_pages = shown.and_then(|l| l.linux).map(|l| l.all());
            let b = l.load(
                &mut ram,
                boot.firmware.as_slice(),
                monitor_at,
                gate_pages,
                vmx.page_1g,
            )?;
            Ok((b, None, None))
        }
        Guest::Multiboot(k) => {
            let (b, handed) = k.load(&mut ram, boot.firmware.as_slice())?;
            Ok((b, None, Some(handed)))
        }
        Guest::Test(t) => {
            let b = t.load(&mut ram, scenario, probe, mode, gate, vmx.page_1g)?;
            let hook = match monitor {
                Some(_) => Some(t.install_hook(&mut ram, mode, gate)?),
                None => None,
            };
            Ok((b, hook, None))
        }
    }
}

/// The VMCSs: the out-of-box monitor VM's first (when the scenario has one), the guest's last, so
/// it is current at launch; with the VMCS fault the scenario injects, if any.
#[allow(clippy::too_many_arguments)]
fn create_vms(
    memory: &MemoryMap,
    vmx: &Vmx,
    tables: &TableBases,
    frames: &mut Pool,
    monitor: Option<&Loaded>,
    views: &views::Views,
    boot_state: &GuestBoot,
    scenario: Scenario,
) -> Result<Vms, LoadError> {
    let mut vmcss = Vmcss::new();
    let outbox = match (monitor, scenario.monitor_mode()) {
        (Some(m), Mode::OutBox) => Some(outbox::setup(
            m, &mut vmcss, memory, &vmx.caps, tables, frames,
        )?),
        _ => None,
    };
    // With nested VMX, the VMCS L2 runs on (VMCS02): L0's host state now, the rest from each entry.
    let nested_vmcs = if scenario.offers_vmx() {
        let frame = frames.frame()?;
        // SAFETY: VMX is on; `frame` is a fresh, identity-mapped pool frame given to the arena for
        // good; the guest's VMCS is made current after it, before the launch.
        let id = unsafe { vmcss.create(frame, &vmx.caps) }.map_err(|error| LoadError::Vmx {
            what: "the VMCS for the guest's own guest (VMCS02)",
            error,
        })?;
        vmcs_setup::configure_nested(vmcss.active(), &vmx.caps, tables).map_err(|error| {
            LoadError::VmcsSetup {
                which: "the guest's own guest (VMCS02)",
                error,
            }
        })?;
        Some(id)
    } else {
        None
    };
    let frame = frames.frame()?;
    // SAFETY: VMX is on; `frame` is a fresh, identity-mapped pool frame given to the arena for good;
    // this VMCS stays current until the launch enters it.
    let guest_vmcs = unsafe { vmcss.create(frame, &vmx.caps) }.map_err(|error| LoadError::Vmx {
        what: "the guest's VMCS",
        error,
    })?;
    // Linux handles its own breakpoints and idles in HLT with interrupts on: neither needs L0.
    let params = VmParams {
        eptp: views.guest.eptp(),
        eptp_list: views.monitor.map(|(_, list)| list),
        boot: boot_state,
        exceptions: if scenario.is_linux() {
            0
        } else {
            ihmi_hv::EXCEPTION_BITMAP
        },
        hlt_exits: !scenario.is_linux(),
        // A monitored Linux guest can change the gate's slot in a process's PGD without an exit.
        audit_period: (scenario.is_linux() && monitor.is_some())
            .then_some(ihmi_hv::linux::gate::AUDIT_PERIOD_TSC),
        nmi_exiting: monitor.is_some(),
    };
    if let Err(error) = vmcs_setup::configure(vmcss.active(), &vmx.caps, tables, frames, &params) {
        dump_vmcs(&vmcss);
        return Err(LoadError::VmcsSetup {
            which: "the guest",
            error,
        });
    }
    if let Some(fault) = ihmi_judge::setup::vmcs_fault(scenario) {
        vmcss
            .active()
            .write(fault.field, fault.value)
            .map_err(|error| LoadError::Vmx {
                what: "breaking the VMCS for the scenario",
                error,
            })?;
        log!(
            "scenario {}: VMCS deliberately made invalid: {}",
            scenario.name(),
            fault.why
        );
    }
    let shadow = if scenario.shadows_vmcs() {
        Some(shadow_vmcs(&mut vmcss, vmx, frames)?)
    } else {
        None
    };
    Ok(Vms {
        vmcss,
        guest_vmcs,
        nested_vmcs,
        shadow_vmcs: shadow,
        outbox,
    })
}

/// The VMCSs of a scenario: the guest's (current at launch), with nested VMX the one its own guest
/// runs on and the shadow VMCS, and the out-of-box monitor VM.
struct Vms {
    vmcss: Vmcss,
    guest_vmcs: VmcsId,
    nested_vmcs: Option<VmcsId>,
    shadow_vmcs: Option<Hpa>,
    outbox: Option<MonitorVm>,
}

/// VMCS shadowing for the guest hypervisor (SDM 25.10): a shadow VMCS, the VMREAD and VMWRITE
/// bitmaps that let the shadowed fields through (`ihmi_hv::nested::shadow`), and the guest's VMCS
/// (current) set to use them; its link pointer stays all ones until the guest has a current VMCS.
/// Refused with the reason if the CPU cannot shadow or cannot take every shadowed field.
fn shadow_vmcs(vmcss: &mut Vmcss, vmx: &Vmx, frames: &mut Pool) -> Result<Hpa, LoadError> {
    use ihmi_hv::nested::shadow;
    use ihmi_vmcs::fields::control;
    use ihmi_vmcs::SecondaryControls;
    if !vmx.features.vmcs_shadowing || !vmx.caps.vmwrite_any_field() {
        return Err(LoadError::Cpu(
            "this scenario needs VMCS shadowing and VMWRITE to any field (IA32_VMX_MISC bit 29); choose a CPU model with them (e.g. corei7_skylake_x)",
        ));
    }
    let vmx_error = |what| move |error| LoadError::Vmx { what, error };
    // SAFETY: VMX is on; the frame is a fresh pool frame, L0's for good.
    let region = unsafe { ihmi_vmx::create_shadow(frames.frame()?, &vmx.caps) }
        .map_err(vmx_error("the shadow VMCS"))?;
    // SAFETY: VMX is on, `region` came from `create_shadow`, the guest's VMCS is current.
    match unsafe {
        ihmi_vmx::shadow_accepts(region, vmcss.active(), shadow::shadowed().map(|(f, _)| f))
    } {
        Ok(()) => {}
        Err(Some(field)) => {
            log!("vmx: the shadow VMCS refuses {field}");
            return Err(LoadError::Cpu(
                "the CPU's shadow VMCS lacks a field L0 shadows",
            ));
        }
        Err(None) => return Err(LoadError::Cpu("VMPTRLD of the shadow VMCS failed")),
    }
    let bitmap = |write: bool, frames: &mut Pool| {
        frames.page(|b: &mut FieldBitmap| {
            b.0.fill(0xff);
            for (f, writable) in shadow::shadowed() {
                if writable || !write {
                    for e in shadow::encodings(f) {
                        let bit = (e & 0x7fff) as usize;
                        b.0[bit / 8] &= !(1 << (bit % 8));
                    }
                }
            }
        })
    };
    let (read, write) = (bitmap(false, frames)?, bitmap(true, frames)?);
    let vmcs = vmcss.active();
    let secondary = vmcs.read(control::SECONDARY_PROCBASED_EXEC_CONTROLS)
        | u64::from(SecondaryControls::VMCS_SHADOWING.bits());
    for (f, v) in [
        (control::VMREAD_BITMAP_ADDR_FULL, read.raw()),
        (control::VMWRITE_BITMAP_ADDR_FULL, write.raw()),
        (control::SECONDARY_PROCBASED_EXEC_CONTROLS, secondary),
    ] {
        vmcs.write(f, v)
            .map_err(vmx_error("turning VMCS shadowing on"))?;
    }
    log!(
        "nested: VMCS shadowing on (shadow VMCS at {:#x})",
        region.raw()
    );
    Ok(region)
}

/// A VMREAD or VMWRITE bitmap (SDM 25.6.15): one bit per field encoding's bits 14:0, set to exit.
#[repr(C, align(4096))]
pub struct FieldBitmap(pub [u8; 4096]);

// SAFETY: one page of bytes, `#[repr(C, align(4096))]`.
unsafe impl crate::frames::PageLayout for FieldBitmap {
    const PAGES: usize = 1;
}
