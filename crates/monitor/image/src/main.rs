#![doc = include_str!("../README.md")]
#![no_std]
#![no_main]

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use ihmi_abi::monitor::{Entry, MonitorConfig, Verdict, CONFIG_MAGIC};
use ihmi_addr::{Gpa, Gva};
use ihmi_monitor::{
    CallContext, EventRing, FileLayout, IoUringHook, KvmHook, KvmMapHook, KvmOps, KvmVmHooks,
    LinearHints, LinearWindows, Monitor, OsProfile, Policy, RamGranules,
};
use ihmi_paging::{Cr3, GuestPhysRead, PhysReadError};

ihmi_rt::provide_mem_functions!();

/// Single-CPU cells: the monitor runs with interrupts off, entered only through the gate, never
/// re-entered while it runs.
struct Cell<T>(UnsafeCell<T>);
// SAFETY: see above; one invocation at a time on one CPU.
unsafe impl<T> Sync for Cell<T> {}

/// Written by L0 before the guest runs.
#[no_mangle]
static IHMI_MONITOR_CONFIG: Cell<MonitorConfig> = Cell(UnsafeCell::new(MonitorConfig {
    magic: 0,
    direct_map_base: 0,
    ram: [ihmi_abi::RamRange { start: 0, len: 0 }; ihmi_abi::BOOT_INFO_MAX_RANGES],
    ram_count: 0,
    current_process_ptr: 0,
    allowed: [[0; ihmi_abi::guest_os::COMM_LEN]; ihmi_abi::monitor::MAX_ALLOWED],
    allowed_count: 0,
    os: 0,
    pid_offset: 0,
    parent_offset: 0,
    comm_offset: 0,
    pti_pgd_pair: 0,
    binprm_filename_offset: 0,
    exec_hook_return: 0,
    exec_site_return: 0,
    io_uring_hook_return: 0,
    io_uring_site_return: 0,
    io_kiocb_opcode_offset: 0,
    allowed_digests: [[0; 32]; ihmi_abi::monitor::MAX_ALLOWED],
    allowed_digest_count: 0,
    files: ihmi_abi::monitor::FileOffsets {
        binprm_file: 0,
        file_mapping: 0,
        mapping_host: 0,
        mapping_pages: 0,
        inode_ino: 0,
        inode_size: 0,
        inode_ctime: 0,
        inode_mtime: 0,
        node_shift: 0,
        node_slots: 0,
        chunk_shift: 0,
        page_struct_size: 0,
        vmemmap_base: 0,
    },
    kvm: ihmi_abi::monitor::KvmOffsets::EMPTY,
    linear: ihmi_abi::monitor::LinearMaps {
        page_offset_base: 0,
        image: [0; 2],
    },
}));

/// Calls of the entry point, for L0's benchmark accounting (L0 reads it while the monitor is stopped).
#[no_mangle]
static IHMI_INVOCATIONS: AtomicU64 = AtomicU64::new(0);

/// KVM exits the monitor served (requests from the hook in `vmx_handle_exit` it allowed), which L0
/// holds against the exits it reflected to KVM: a hook that stops firing shows here (liveness, P7).
#[no_mangle]
static IHMI_KVM_EXITS: AtomicU64 = AtomicU64::new(0);

/// The VMCS regions of the vCPUs KVM created, registered from the hook in
/// `kvm_arch_vcpu_postcreate`: L0 refuses L1's VMLAUNCH or VMRESUME of any other (no rogue VMs, P6).
/// Only this image writes it; L0 reads it at those instructions.
#[no_mangle]
static IHMI_KVM_VMCSS: Cell<ihmi_abi::monitor::KvmVmcsRegistry> =
    Cell(UnsafeCell::new(ihmi_abi::monitor::KvmVmcsRegistry::EMPTY));

/// The in-hypervisor hooks' costs, for `ihmi bench --nested` (L0 reads them while the monitor is
/// stopped): the TSC ticks spent in the monitor's handling of the KVM exits it served, the mappings
/// it checked (requests from the hook in `make_spte` it allowed), and the ticks spent on those. From
/// the checkpoint's start to the event in the ring: the gate's own path is not in them (its VMFUNCs
/// and CR3 loads are counted apart), nor the out-of-box VMCALLs.
#[no_mangle]
static IHMI_HOOK_COUNTS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// The kernel's linear mappings the monitor reads without a walk, once its first Linux invocation has
/// checked them against the guest's tables: checked (1) or not (0), then the direct map's and the
/// image mapping's length in bytes (0: not held). L0 reports them at the end of a run.
#[no_mangle]
static IHMI_LINEAR: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// Drained by L0.
#[no_mangle]
static IHMI_EVENT_RING: Cell<EventRing> = Cell(UnsafeCell::new(EventRing::new()));

/// The gate saves the guest's CR3 and RSP here (monitor memory, invisible to the guest), the guest
/// kernel's per-CPU base (its GS base: IA32_GS_BASE when called from the kernel, IA32_KERNEL_GS_BASE
/// when entered by SYSCALL from user mode), where an SMP Linux keeps `current_task`, and which gate it
/// was (`ihmi_abi::monitor::Entry`): the gate's own code writes it after the view switch, so a guest
/// cannot choose it.
#[no_mangle]
static IHMI_GATE_SAVE: Cell<[u64; 4]> = Cell(UnsafeCell::new([0; 4]));

/// The guest's x87/SSE state while the monitor runs: the monitor is Rust and may use SSE registers, and
/// the guest's may be live (a system call from user mode).
#[repr(C, align(16))]
struct FxArea([u8; 512]);
#[no_mangle]
static IHMI_GATE_FXSAVE: Cell<FxArea> = Cell(UnsafeCell::new(FxArea([0; 512])));

const STACK_SIZE: usize = 32 * 1024;
#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);
#[no_mangle]
static IHMI_MONITOR_STACK: Cell<Stack> = Cell(UnsafeCell::new(Stack([0; STACK_SIZE])));

static MONITOR: Cell<Option<Monitor>> = Cell(UnsafeCell::new(None));

/// Guest RAM by granule, filled at the first invocation (see `monitor`). Monitor memory: the guest
/// cannot reach it.
static IHMI_RAM_GRANULES: Cell<RamGranules> = Cell(UnsafeCell::new(RamGranules::EMPTY));

/// Guest-physical reads through the direct map, refused outside guest RAM so a guest pointer can never
/// make the monitor fault or read its own (or L0's) frames.
struct DirectMap<'a> {
    config: &'a MonitorConfig,
    granules: &'a RamGranules,
}

impl<'a> DirectMap<'a> {
    fn new(config: &'a MonitorConfig) -> Self {
        // SAFETY: written only by `monitor`'s first call, which has returned; one invocation at a
        // time.
        let granules = unsafe { &*IHMI_RAM_GRANULES.0.get() };
        Self { config, granules }
    }

    /// Where the `len` bytes at `gpa` are in the monitor's address space, if they are all guest RAM.
    #[inline(always)]
    fn at(&self, gpa: Gpa, len: u64) -> Result<*const u8, PhysReadError> {
        if self.granules.holds(gpa, len) {
            return Ok(self.config.direct_map_base.wrapping_add(gpa.raw()) as *const u8);
        }
        self.at_scanned(gpa, len)
    }

    /// [`Self::at`] against the ranges themselves.
    #[inline(never)]
    fn at_scanned(&self, gpa: Gpa, len: u64) -> Result<*const u8, PhysReadError> {
        let n = (self.config.ram_count as usize).min(self.config.ram.len());
        let inside = self.config.ram[..n].iter().any(|r| {
            gpa.raw() >= r.start
                && gpa
                    .raw()
                    .checked_add(len)
                    .is_some_and(|end| end <= r.start.saturating_add(r.len))
        });
        if !inside {
            return Err(PhysReadError { gpa });
        }
        Ok(self.config.direct_map_base.wrapping_add(gpa.raw()) as *const u8)
    }
}

// SAFETY (each read below): `at` checked the range is guest RAM against the configuration L0 wrote
// (through the granule bitmap derived from it, or its ranges themselves), and L0 mapped all guest
// RAM readable at `direct_map_base + gpa` in the monitor's page tables.
impl GuestPhysRead for DirectMap<'_> {
    #[inline(always)]
    fn read_bytes(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), PhysReadError> {
        let src = self.at(gpa, buf.len() as u64)?;
        // SAFETY: see above.
        unsafe { core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    // A word is one load, not a byte copy: most of what the monitor reads is words.
    #[inline(always)]
    fn read_u64(&self, gpa: Gpa) -> Result<u64, PhysReadError> {
        let src = self.at(gpa, 8)?;
        // SAFETY: see above; unaligned loads are allowed on x86.
        Ok(u64::from_le(unsafe {
            core::ptr::read_unaligned(src.cast::<u64>())
        }))
    }

    #[inline(always)]
    fn read_u32(&self, gpa: Gpa) -> Result<u32, PhysReadError> {
        let src = self.at(gpa, 4)?;
        // SAFETY: see above.
        Ok(u32::from_le(unsafe {
            core::ptr::read_unaligned(src.cast::<u32>())
        }))
    }

    // One check for the whole range, then a load per word: no buffer to zero, no byte copy.
    fn each_u64<F: FnMut(usize, u64)>(
        &self,
        gpa: Gpa,
        n: usize,
        mut f: F,
    ) -> Result<(), PhysReadError> {
        let len = (n as u64).checked_mul(8).ok_or(PhysReadError { gpa })?;
        if n == 0 {
            return Ok(());
        }
        let src = self.at(gpa, len)?.cast::<u64>();
        for i in 0..n {
            // SAFETY: see above; word `i` is inside the `len` bytes checked.
            let word = unsafe { src.add(i) };
            // SAFETY: as above.
            f(i, u64::from_le(unsafe { core::ptr::read_unaligned(word) }));
        }
        Ok(())
    }
}

// Not inlined: its first-call set-up (the policy, the profile, the RAM bitmap) inlined into the entry
// point made every call's frame and register spills larger (19.6 instructions on a null call).
#[inline(never)]
fn monitor(config: &MonitorConfig) -> &'static mut Monitor {
    // SAFETY: one invocation at a time (see `Cell`); no other reference to MONITOR is alive.
    let slot = unsafe { &mut *MONITOR.0.get() };
    slot.get_or_insert_with(|| {
        let ram = (config.ram_count as usize).min(config.ram.len());
        // SAFETY: one invocation at a time, and no `DirectMap` exists yet in this one.
        unsafe { &mut *IHMI_RAM_GRANULES.0.get() }.fill(
            config.ram[..ram]
                .iter()
                .map(|r| (r.start, r.start.saturating_add(r.len))),
        );
        let mut policy = Policy::allow_all();
        let n = (config.allowed_count as usize).min(config.allowed.len());
        for name in &config.allowed[..n] {
            let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            // The configuration holds at most MAX_ALLOWED names, which the policy can take.
            let _ = policy.allow(&name[..len]);
        }
        let n = (config.allowed_digest_count as usize).min(config.allowed_digests.len());
        for digest in &config.allowed_digests[..n] {
            // As many as the policy takes.
            let _ = policy.allow_digest(*digest);
        }
        let current = Gva::new(config.current_process_ptr);
        let os = if config.os == ihmi_abi::monitor::OS_LINUX {
            let linux = OsProfile::linux(
                current,
                config.pid_offset,
                config.parent_offset,
                config.comm_offset,
                config.pti_pgd_pair != 0,
                config.binprm_filename_offset,
            );
            let linux = if config.exec_hook_return != 0 {
                linux.with_exec_returns(config.exec_hook_return, config.exec_site_return)
            } else {
                linux
            };
            let linux = if config.io_uring_hook_return != 0 {
                linux.with_io_uring(IoUringHook {
                    returns: [config.io_uring_hook_return, config.io_uring_site_return],
                    opcode: config.io_kiocb_opcode_offset,
                })
            } else {
                linux
            };
            let k = &config.kvm;
            let linux = if k.hook_return != 0 {
                linux.with_kvm(KvmHook {
                    returns: [k.hook_return, k.site_return],
                    exit_reason: k.exit_reason_offset,
                    handlers: k.exit_handlers,
                    handler_count: (k.exit_handler_count as usize)
                        .min(ihmi_abi::monitor::KVM_EXIT_HANDLERS_MAX),
                    expected: k.exit_handler_values,
                    map: (k.map_hook_return != 0).then_some(KvmMapHook {
                        returns: [k.map_hook_return, k.map_site_return],
                        slot_base_gfn: k.slot_base_gfn_offset,
                        slot_npages: k.slot_npages_offset,
                        slot_userspace_addr: k.slot_userspace_addr_offset,
                        role: k.mmu_page_role_offset,
                        image: k.image,
                    }),
                    vm: (k.memslot_hook_return != 0 && k.vcpu_hook_return != 0).then_some(
                        KvmVmHooks {
                            memslot_returns: [k.memslot_hook_return, k.memslot_site_return],
                            vcpu_returns: [k.vcpu_hook_return, k.vcpu_site_return],
                            vcpu_destroy_returns: [
                                k.vcpu_destroy_hook_return,
                                k.vcpu_destroy_site_return,
                            ],
                            slot_base_gfn: k.slot_base_gfn_offset,
                            slot_npages: k.slot_npages_offset,
                            slot_userspace_addr: k.slot_userspace_addr_offset,
                            slot_id: k.slot_id_offset,
                            slot_as_id: k.slot_as_id_offset,
                            slot_flags: k.slot_flags_offset,
                            vcpu_kvm: k.vcpu_kvm_offset,
                            vcpu_id: k.vcpu_id_offset,
                            vcpu_vmcs01: k.vcpu_vmcs01_offset,
                            vcpu_loaded_vmcs: k.vcpu_loaded_vmcs_offset,
                        },
                    ),
                    // L0 copied the struct when the boot was over, before any hook could fire.
                    ops: (k.x86_ops != 0 && k.x86_ops_words != 0).then_some(KvmOps {
                        at: k.x86_ops,
                        words: (k.x86_ops_words as usize).min(ihmi_abi::monitor::KVM_X86_OPS_MAX),
                        expected: k.x86_ops_values,
                    }),
                })
            } else {
                linux
            };
            let f = &config.files;
            // L0 writes a layout the profile's parser checked: 4 to 256 slots a node.
            let linux = if f.vmemmap_base != 0 && (2..=8).contains(&f.chunk_shift) {
                linux.with_files(FileLayout {
                    binprm_file: f.binprm_file,
                    file_mapping: f.file_mapping,
                    mapping_host: f.mapping_host,
                    mapping_pages: f.mapping_pages,
                    inode_ino: f.inode_ino,
                    inode_size: f.inode_size,
                    inode_ctime: f.inode_ctime,
                    inode_mtime: f.inode_mtime,
                    node_shift: f.node_shift,
                    node_slots: f.node_slots,
                    chunk_shift: f.chunk_shift as u32,
                    page_struct_size: f.page_struct_size,
                    vmemmap_base: Gva::new(f.vmemmap_base),
                })
            } else {
                linux
            };
            // In the box L0 names the kernel's linear mappings; the monitor checks them at its first
            // invocation.
            let l = &config.linear;
            if l.page_offset_base != 0 {
                let n = (config.ram_count as usize).min(config.ram.len());
                let ram_top = config.ram[..n]
                    .iter()
                    .map(|r| r.start.saturating_add(r.len))
                    .max()
                    .unwrap_or(0);
                linux.with_linear(LinearHints {
                    page_offset_base: Gva::new(l.page_offset_base),
                    image: l.image,
                    ram_top,
                })
            } else {
                linux
            }
        } else {
            OsProfile::testguest(current)
        };
        Monitor::new(os, policy)
    })
}

/// The single entry point, called by the gate on the monitor stack in the monitor's address space.
#[no_mangle]
extern "C" fn ihmi_monitor_entry(code: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> u64 {
    IHMI_INVOCATIONS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: L0 wrote the configuration before the guest could call the gate; nothing writes it now.
    let config = unsafe { &*IHMI_MONITOR_CONFIG.0.get() };
    if config.magic != CONFIG_MAGIC {
        return Verdict::Rejected.to_raw();
    }
    // SAFETY: the gate wrote the guest's CR3 and per-CPU base just before calling us; one invocation
    // at a time.
    let [guest_cr3, caller_rsp, percpu_base, entry] = unsafe { *IHMI_GATE_SAVE.0.get() };
    // SAFETY: one invocation at a time; L0 reads the ring only while the guest (and so we) are stopped.
    let ring = unsafe { &mut *IHMI_EVENT_RING.0.get() };
    let ctx = CallContext {
        cr3: Cr3::new(guest_cr3),
        tsc: ihmi_rt::cpu::rdtsc(),
        percpu_base,
        entry: Entry::from_raw(entry),
        caller_rsp,
    };
    let m = monitor(config);
    let verdict = m.handle(code, [a0, a1, a2, a3], &ctx, &DirectMap::new(config), ring);
    // Only a Linux monitor in the box has windows to check; once published, two loads a call.
    if config.linear.page_offset_base != 0 && IHMI_LINEAR[0].load(Ordering::Relaxed) == 0 {
        publish_linear(m.linear_windows());
    }
    // The KVM hooks' costs: a second TSC read for them alone, off the system-call path.
    if verdict == Verdict::Allow {
        let ticks = || ihmi_rt::cpu::rdtsc().wrapping_sub(ctx.tsc);
        if code == ihmi_abi::monitor::RequestCode::KvmExit as u64 {
            IHMI_KVM_EXITS.fetch_add(1, Ordering::Relaxed);
            IHMI_HOOK_COUNTS[0].fetch_add(ticks(), Ordering::Relaxed);
        } else if code == ihmi_abi::monitor::RequestCode::L2Map as u64 {
            IHMI_HOOK_COUNTS[1].fetch_add(1, Ordering::Relaxed);
            IHMI_HOOK_COUNTS[2].fetch_add(ticks(), Ordering::Relaxed);
        } else if code == ihmi_abi::monitor::RequestCode::VcpuCreate as u64 {
            // The vCPU's VMCS for L0's rogue-VMCS check (P6); off the system-call path.
            if let Some([vcpu, vmcs]) = m.take_created_vcpu() {
                // SAFETY: one invocation at a time; L0 reads the registry only while we are
                // stopped.
                let registry = unsafe { &mut *IHMI_KVM_VMCSS.0.get() };
                // A full registry registers nothing: L0 then refuses that vCPU's entries (fail
                // closed).
                let _ = registry.register(vcpu, vmcs);
            }
        } else if code == ihmi_abi::monitor::RequestCode::VcpuDestroy as u64 {
            // SAFETY: as above.
            let registry = unsafe { &mut *IHMI_KVM_VMCSS.0.get() };
            let _ = registry.unregister(a0);
        }
    }
    if ring.wants_drain() {
        ask_l0_to_drain();
    }
    verdict.to_raw()
}

/// What the check of the kernel's linear mappings found, for L0, once it has run.
#[cold]
fn publish_linear(w: &LinearWindows) {
    if w.checked {
        IHMI_LINEAR[1].store(w.windows[0].len, Ordering::Relaxed);
        IHMI_LINEAR[2].store(w.windows[1].len, Ordering::Relaxed);
        IHMI_LINEAR[0].store(1, Ordering::Relaxed);
    }
}

/// One VMCALL from the monitor view: L0 drains the ring at the exit, so a flood loses nothing. L0
/// answers in RAX (and RBX, which LLVM keeps for itself in inline assembly, so it is saved around the
/// call by hand).
fn ask_l0_to_drain() {
    let mut rax = ihmi_abi::Hypercall::RingHighWater as u64;
    // SAFETY: VMCALL exits to L0, which returns a status in RAX and a value in RBX and changes no
    // memory of ours; RBX is restored from the scratch register before LLVM sees it.
    unsafe {
        core::arch::asm!(
            "mov {saved}, rbx",
            "vmcall",
            "mov rbx, {saved}",
            saved = out(reg) _,
            inout("rax") rax,
            options(nostack),
        )
    };
    let _ = rax;
}

// The gate: this page is mapped at the same virtual address in the guest's and the monitor's address
// spaces, executable in both views. Request code and arguments arrive as in a C call (RDI, RSI, RDX, RCX,
// R8); the verdict returns in RAX; RFLAGS, RSP and CR3 come back exactly as they were. Its own input
// section, which the linker script puts first: the test guest calls the gate page's first byte, and
// the order in which the compiler emits the `global_asm!` blocks is not the source's.
core::arch::global_asm!(
    r#"
    .section .gate.entry, "ax"
    .global ihmi_gate_entry
ihmi_gate_entry:
    endbr64                        /* a kernel with indirect branch tracking calls it indirectly */
    pushfq
    cli
    mov %rcx, %r10                 /* VMFUNC takes ECX */
    xor %eax, %eax                 /* VM function 0: EPTP switching */
    mov $1, %ecx                   /* EPTP-list index 1: the monitor view */
    vmfunc
    mov %cr3, %r11                 /* the guest's CR3, restored on the way out */
    .global ihmi_gate_cr3_imm
ihmi_gate_cr3_imm:
    movabs $0, %rax                /* L0 patches the monitor's CR3 (root | PCID 1) into this immediate */
    mov %cr4, %rcx
    bt $17, %rcx                   /* CR4.PCIDE: keep the guest's TLB entries */
    jnc 1f
    bts $63, %rax
1:  mov %rax, %cr3
    movabs $IHMI_GATE_SAVE, %rax
    mov %r11, 0(%rax)
    mov %rsp, 8(%rax)
    movq ${call_gate}, 24(%rax)    /* which gate: this one */
    movabs $(IHMI_MONITOR_STACK + {stack_size}), %rsp
    mov %rdx, %r11                 /* RDMSR takes EDX: keep the second argument */
    mov $0xc0000101, %ecx          /* IA32_GS_BASE: called from the kernel, GS is its per-CPU base */
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    movabs $IHMI_GATE_SAVE, %rcx
    mov %rax, 16(%rcx)
    mov %r11, %rdx
    movabs $IHMI_GATE_FXSAVE, %rax
    fxsave64 (%rax)
    mov %r10, %rcx
    movabs $ihmi_monitor_entry, %rax
    call *%rax
    mov %rax, %r10                 /* the verdict */
    movabs $IHMI_GATE_FXSAVE, %rax
    fxrstor64 (%rax)
    movabs $IHMI_GATE_SAVE, %rcx
    mov 8(%rcx), %rsp
    mov 0(%rcx), %r11
    mov %cr4, %rcx
    bt $17, %rcx
    jnc 2f
    bts $63, %r11                  /* return without flushing the guest's PCID */
2:  mov %r11, %cr3
    xor %eax, %eax
    xor %ecx, %ecx                 /* EPTP-list index 0: the guest view */
    vmfunc
    mov %r10, %rax
    xor %ecx, %ecx                 /* leave no monitor values in scratch registers */
    xor %r11d, %r11d
    popfq
    ret
    .global ihmi_gate_entry_end
ihmi_gate_entry_end:
"#,
    stack_size = const STACK_SIZE,
    call_gate = const ihmi_abi::monitor::Entry::CallGate as u64,
    options(att_syntax)
);

// The out-of-box entry: the same monitor as the kernel of a VM of its own. L0 enters it here with the
// request in RDI, RSI, RDX, RCX, R8 (as the gate passes it), the guest's CR3 in R9, its kernel's
// per-CPU base in R10, the guest's RSP at its VMCALL in R11 and the entry L0 saw it come through
// (`Entry`) in R12, RSP at the top of the monitor stack and CR3 at the monitor's root; the verdict
// goes back by VMCALL.
core::arch::global_asm!(
    r#"
    .section .text.ihmi_outbox, "ax"
    .global ihmi_outbox_entry
ihmi_outbox_entry:
    movabs $IHMI_GATE_SAVE, %rax
    mov %r9, 0(%rax)
    mov %r11, 8(%rax)
    mov %r10, 16(%rax)
    mov %r12, 24(%rax)
    movabs $ihmi_monitor_entry, %rax
    call *%rax
    mov %rax, %rbx
    movabs ${done}, %rax
    vmcall
    ud2

    .global IHMI_MONITOR_STACK_TOP
    .set IHMI_MONITOR_STACK_TOP, IHMI_MONITOR_STACK + {stack_size}
"#,
    done = const ihmi_abi::monitor::OUTBOX_DONE,
    stack_size = const STACK_SIZE,
    options(att_syntax)
);

// The Linux system-call gates, in the gate page (mapped at LINUX_GATE_GVA in the kernel's address
// spaces and the monitor's): one per way into the kernel, each ending in a jump to the kernel's own
// entry for it, read from the gate page (read + execute only in the guest view), where L0 wrote it.
// - SYSCALL (IA32_LSTAR) arrives with RCX = the user RIP, R11 = the user RFLAGS, RAX = the call number,
//   the user's RSP and (with KPTI) the user CR3, interrupts off.
// - SYSENTER (IA32_SYSENTER_EIP) arrives on the kernel's SYSENTER stack, interrupts off, with the
//   i386 number in EAX and the arguments in EBX, ECX, EDX.
// - `int $0x80` (IDT vector 0x80, an interrupt gate) arrives on the kernel's entry stack with the
//   interrupt frame pushed, interrupts off, registers as for SYSENTER.
// Every register is the caller's and must reach the kernel's entry unchanged; only RAX and RCX may
// be used before the view switch: they go to the guest's scratch page first. The guest CR3 is kept
// in monitor memory (never the scratch page) so nothing the guest writes can choose the CR3 the gate
// loads on its way back in the monitor view. All three run on the monitor's own stack, so none
// touches a kernel stack.
core::arch::global_asm!(
    r#"
    .macro IHMI_SYSCALL_GATE name, request, kernel_entry, compat
    .section .gate, "ax"
    .global \name
\name:
    endbr64                        /* SYSCALL targets need it under indirect branch tracking */
    movabs %rax, {scratch}
    mov %rcx, %rax
    movabs %rax, {scratch} + 8
    xor %eax, %eax
    mov $1, %ecx
    vmfunc
    mov %cr3, %rcx                 /* the guest's CR3, kept in RCX across the switch */
    mov %cr4, %rax
    bt $17, %rax                   /* CF = CR4.PCIDE; movabs leaves flags alone */
    .global \name\()_cr3_imm
\name\()_cr3_imm:
    movabs $0, %rax                /* L0 patches the monitor's CR3 (root | PCID 1) in here */
    jnc 1f
    bts $63, %rax
1:  mov %rax, %cr3
    movabs $IHMI_GATE_SAVE, %rax
    mov %rcx, 0(%rax)
    mov %rsp, 8(%rax)
    movq ${syscall_gate}, 24(%rax) /* which gate: a system-call one */
    movabs $(IHMI_MONITOR_STACK + {stack_size}), %rsp
    push %r11
    push %r10
    push %r9
    push %r8
    push %rdi
    push %rsi
    push %rdx
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    sub $8, %rsp                   /* 13 pushes + 8: 16-byte aligned at the call */
    mov $0xc0000102, %ecx          /* IA32_KERNEL_GS_BASE: from user mode, the kernel's per-CPU base */
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    movabs $IHMI_GATE_SAVE, %rcx
    mov %rax, 16(%rcx)
    mov 56(%rsp), %rdx             /* the caller's RDX again (pushed seventh) */
    movabs $IHMI_GATE_FXSAVE, %rax
    fxsave64 (%rax)
  .if \compat
    /* ihmi_monitor_entry(request, eax, ebx, ecx, edx): the i386 registers, zero-extended */
    mov %edx, %r8d
    movabs {scratch} + 8, %rax
    mov %eax, %ecx
    mov %ebx, %edx
    movabs {scratch}, %rax
    mov %eax, %esi
  .else
    /* ihmi_monitor_entry(Syscall, nr, arg0, arg1, arg2) */
    mov %rdx, %r8
    mov %rsi, %rcx
    mov %rdi, %rdx
    movabs {scratch}, %rax
    mov %rax, %rsi
  .endif
    mov $\request, %edi
    movabs $ihmi_monitor_entry, %rax
    call *%rax
    movabs $IHMI_GATE_FXSAVE, %rax
    fxrstor64 (%rax)
    add $8, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    pop %rdx
    pop %rsi
    pop %rdi
    pop %r8
    pop %r9
    pop %r10
    pop %r11
    movabs $IHMI_GATE_SAVE, %rax
    mov 8(%rax), %rsp
    mov 0(%rax), %rcx
    mov %cr4, %rax
    bt $17, %rax
    jnc 2f
    bts $63, %rcx                  /* back without flushing the guest's PCID */
2:  mov %rcx, %cr3
    xor %eax, %eax
    xor %ecx, %ecx
    vmfunc
    movabs {scratch} + 8, %rax
    mov %rax, %rcx
    movabs {scratch}, %rax
    jmp *\kernel_entry(%rip)
    .global \name\()_end
\name\()_end:
    .endm

    IHMI_SYSCALL_GATE ihmi_gate_syscall, {syscall}, ihmi_gate_kernel_entry, 0
    IHMI_SYSCALL_GATE ihmi_gate_sysenter, {sysenter}, ihmi_gate_kernel_sysenter, 1
    IHMI_SYSCALL_GATE ihmi_gate_int80, {int80}, ihmi_gate_kernel_int80, 1

    .section .gate, "ax"
    .balign 8
    /* L0 writes the kernel's own entries here, in this order (`SyscallEntry::ALL`). */
    .global ihmi_gate_kernel_entry
ihmi_gate_kernel_entry:
    .quad 0                        /* IA32_LSTAR */
    .global ihmi_gate_kernel_sysenter
ihmi_gate_kernel_sysenter:
    .quad 0                        /* IA32_SYSENTER_EIP */
    .global ihmi_gate_kernel_int80
ihmi_gate_kernel_int80:
    .quad 0                        /* the IDT's vector 0x80 */
"#,
    scratch = const ihmi_abi::monitor::LINUX_SCRATCH_GVA,
    stack_size = const STACK_SIZE,
    syscall = const ihmi_abi::monitor::RequestCode::Syscall as u64,
    sysenter = const ihmi_abi::monitor::RequestCode::SyscallSysenter as u64,
    int80 = const ihmi_abi::monitor::RequestCode::SyscallInt80 as u64,
    syscall_gate = const ihmi_abi::monitor::Entry::SyscallGate as u64,
    options(att_syntax)
);

// The Linux hooks' trampolines, in the gate page, which L0 also maps in a free 2 MiB slot of the
// kernel's image mapping: the call L0 writes over the `__fentry__` NOP of the hooked function
// (`begin_new_exec` for process creation, `io_issue_sqe` for io_uring; for the in-hypervisor monitor
// KVM's `vmx_handle_exit`, `make_spte`, `kvm_arch_commit_memory_region` and
// `kvm_arch_vcpu_postcreate`)
// lands here with the function's arguments live (RDI = the `linux_binprm`, the `io_kiocb`, the
// `kvm_vcpu`, the `kvm`; for `make_spte` also RDX = the memslot, R8 = the guest frame, R9 = the host
// frame, which it passes on too) and the stack holding the return into the function, then the return
// to its caller. Every register the function may read comes back as it was. The monitor is reached
// through the call gate at its own address (L0 patches it in): the trampoline's alias is not mapped in
// the monitor's address space. Any verdict but allow refuses: the trampoline then returns -EPERM to
// the function's caller (the binary loader, which fails the `execve` with it; io_uring, which completes
// the operation with it; KVM, which ends KVM_RUN with it; `kvm_arch_vcpu_postcreate` returns
// nothing, so a refused vCPU is left without the rest of its set-up and unregistered, and L0 refuses
// its entries) without running it. `make_spte` and `kvm_arch_commit_memory_region` always
// run: they have no failure their callers handle (an SPTE never written, a memslot half committed),
// so the monitor only watches them; the latter's trampoline passes RDI, RSI, RDX and RCX on (the
// `kvm`, the old and new slots, the change). `kvm_arch_vcpu_destroy` always runs too (`watch`: one
// argument, never refused), since skipping it would leak the vCPU.
core::arch::global_asm!(
    r#"
    .macro IHMI_HOOK_TRAMPOLINE name, request, args=one
    .section .gate, "ax"
    .global \name
\name:
    endbr64
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    .ifc \args, map
    mov %r8, %rcx                  /* ihmi_monitor_entry(request, RDI, RDX, R8, R9) */
    mov %r9, %r8
    .else
    .ifc \args, four
    mov %rcx, %r8                  /* ihmi_monitor_entry(request, RDI, RSI, RDX, RCX) */
    mov %rdx, %rcx
    mov %rsi, %rdx
    .else
    xor %edx, %edx                 /* ihmi_monitor_entry(request, RDI, 0, 0, 0) */
    xor %ecx, %ecx
    xor %r8d, %r8d
    .endif
    .endif
    mov %rdi, %rsi
    mov $\request, %edi
    .global \name\()_gate_imm
\name\()_gate_imm:
    movabs $0, %rax                /* L0 patches the call gate's address here */
    call *%rax
    .global \name\()_gate_return
\name\()_gate_return:              /* the monitor checks this return is on the request's stack */
    test %rax, %rax                /* 0 = allow; pops keep the flags */
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    .ifc \args, one
    jnz 1f
    .endif
    ret                            /* on into the hooked function */
1:  add $8, %rsp                   /* drop the return into it: return from it instead */
    mov ${eperm}, %rax
    ret
    .endm

    IHMI_HOOK_TRAMPOLINE ihmi_hook_exec, {exec_request}
    IHMI_HOOK_TRAMPOLINE ihmi_hook_io_uring, {io_uring_request}
    IHMI_HOOK_TRAMPOLINE ihmi_hook_kvm_exit, {kvm_exit_request}
    IHMI_HOOK_TRAMPOLINE ihmi_hook_l2_map, {l2_map_request}, map
    IHMI_HOOK_TRAMPOLINE ihmi_hook_memslot, {memslot_request}, four
    IHMI_HOOK_TRAMPOLINE ihmi_hook_vcpu_create, {vcpu_create_request}
    IHMI_HOOK_TRAMPOLINE ihmi_hook_vcpu_destroy, {vcpu_destroy_request}, watch
"#,
    exec_request = const ihmi_abi::monitor::RequestCode::Exec as u64,
    io_uring_request = const ihmi_abi::monitor::RequestCode::IoUring as u64,
    kvm_exit_request = const ihmi_abi::monitor::RequestCode::KvmExit as u64,
    l2_map_request = const ihmi_abi::monitor::RequestCode::L2Map as u64,
    memslot_request = const ihmi_abi::monitor::RequestCode::Memslot as u64,
    vcpu_create_request = const ihmi_abi::monitor::RequestCode::VcpuCreate as u64,
    vcpu_destroy_request = const ihmi_abi::monitor::RequestCode::VcpuDestroy as u64,
    eperm = const -1i64,
    options(att_syntax)
);

// The Linux hooks out of the box, also in the gate page (shown to the guest read + execute; the
// monitor itself runs in a VM of its own). The system-call stub is IA32_LSTAR's target: its VMCALL, at
// an address L0 knows, is a system call for the monitor VM, after which every register is as the
// SYSCALL left it and the stub jumps on to the kernel's entry. The call stub is what the
// hook trampolines call instead of the call gate: the `Monitor` hypercall (RAX), with the request code in
// RBX and its four arguments in RCX, RDX, RSI and RDI; the verdict comes back in RAX.
core::arch::global_asm!(
    r#"
    .section .gate, "ax"
    .global ihmi_outbox_syscall
ihmi_outbox_syscall:
    endbr64
    .global ihmi_outbox_syscall_vmcall
ihmi_outbox_syscall_vmcall:
    vmcall
    jmp *ihmi_gate_kernel_entry(%rip)

    /* The same for the 32-bit entries: each VMCALL's address tells L0 which entry it was. */
    .global ihmi_outbox_sysenter
ihmi_outbox_sysenter:
    endbr64
    .global ihmi_outbox_sysenter_vmcall
ihmi_outbox_sysenter_vmcall:
    vmcall
    jmp *ihmi_gate_kernel_sysenter(%rip)

    .global ihmi_outbox_int80
ihmi_outbox_int80:
    endbr64
    .global ihmi_outbox_int80_vmcall
ihmi_outbox_int80_vmcall:
    vmcall
    jmp *ihmi_gate_kernel_int80(%rip)

    .global ihmi_outbox_call
ihmi_outbox_call:
    endbr64
    push %rbx
    mov %rdi, %rbx                 /* the request; its arguments on in RCX, RDX, RSI, RDI */
    mov %rcx, %rax
    mov %rsi, %rcx
    mov %rax, %rsi
    mov %r8, %rdi
    mov ${monitor_call}, %eax
    .global ihmi_outbox_call_vmcall
ihmi_outbox_call_vmcall:
    vmcall
    pop %rbx
    ret
"#,
    monitor_call = const ihmi_abi::Hypercall::Monitor as u64,
    options(att_syntax)
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // The monitor cannot print (it has no device); a ud2 in monitor code is an invalid-opcode exception
    // delivered through the guest IDT, which the monitor view cannot execute: L0 sees and reports it.
    loop {
        // SAFETY: ud2 only raises #UD.
        unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    }
}
