//! The contract between the in-box gate (or the out-of-box VMCALL) and the monitor's single entry point.
//!
//! A caller passes a request code and up to four arguments; the monitor's invocation checkpoint decodes
//! them into a typed request and refuses anything else. The monitor never takes data describing the
//! guest from the caller: it reads the guest's own structures (the current process, its name, its
//! parent) through introspection, so a compromised caller can lie only about what it asks, not about
//! what happened.

/// Request codes (first argument of the entry point).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum RequestCode {
    /// Do nothing and return: the null invocation the benchmark measures.
    Null = 0,
    /// A system call is being made: args = (number, arg0, arg1, arg2).
    Syscall = 1,
    /// A process is about to be created: args = (GVA of the new process record, program number).
    ProcessCreate = 2,
    /// Linux: the running process is about to execute a new program (`execve`): args = (GVA of the
    /// kernel's `linux_binprm`, 0, 0, 0).
    Exec = 3,
    /// Linux: a 32-bit system call through `int $0x80`: args = (i386 number, EBX, ECX, EDX).
    SyscallInt80 = 4,
    /// Linux: a 32-bit system call through SYSENTER: args = (i386 number, EBX, ECX, EDX).
    SyscallSysenter = 5,
    /// Linux: an operation submitted through an io_uring ring is about to be issued: args = (GVA of
    /// the kernel's `io_kiocb`, 0, 0, 0).
    IoUring = 6,
    /// Linux with KVM (the in-hypervisor monitor): KVM is about to handle an exit of its guest (L2):
    /// args = (GVA of the `kvm_vcpu`, 0, 0, 0), from the hook in `vmx_handle_exit`.
    KvmExit = 7,
    /// Linux with KVM: KVM is about to make a mapping for its guest: args = (GVA of the `kvm_vcpu`,
    /// GVA of the `kvm_memory_slot`, the guest frame number, the host frame number), from the hook in
    /// `make_spte`.
    L2Map = 8,
    /// Linux with KVM: KVM commits a memslot change it accepted: args = (GVA of the `kvm`, of the
    /// old slot (0 when created), of the new slot (0 when deleted), the change: 0 create, 1 delete,
    /// 2 move, 3 flags only), from the hook in `kvm_arch_commit_memory_region`.
    Memslot = 9,
    /// Linux with KVM: KVM has created a vCPU: args = (GVA of the `kvm_vcpu`, 0, 0, 0), from the
    /// hook in `kvm_arch_vcpu_postcreate`.
    VcpuCreate = 10,
    /// Linux with KVM: KVM is destroying a vCPU: args = (GVA of the `kvm_vcpu`, 0, 0, 0), from the
    /// hook in `kvm_arch_vcpu_destroy`.
    VcpuDestroy = 11,
}

/// Which way a request reached the monitor, as the gate code itself (in the box) or L0 (out of it)
/// records it where the guest cannot write. On Linux each way serves its own requests only: the call
/// gate is the process-creation trampoline's (exec requests), the system-call gates make system-call
/// requests; anything else is a forgery and is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Entry {
    /// The call gate (`ihmi_gate_entry`), or out of the box the call stub's VMCALL.
    CallGate = 0,
    /// A system-call gate, or out of the box a system-call stub's VMCALL.
    SyscallGate = 1,
    /// Out of the box: a `Monitor` hypercall from anywhere else in a Linux guest.
    Unverified = 2,
}

impl Entry {
    /// Decodes the recorded entry; anything unknown counts as unverified.
    #[must_use]
    pub const fn from_raw(raw: u64) -> Self {
        match raw {
            0 => Self::CallGate,
            1 => Self::SyscallGate,
            _ => Self::Unverified,
        }
    }
}

/// The ways into a Linux kernel's system-call handling, each behind a gate entry of its own: SYSCALL
/// from 64-bit code (IA32_LSTAR), and the 32-bit ones every kernel with IA32 emulation has, SYSENTER
/// (IA32_SYSENTER_EIP) and `int $0x80` (the IDT). SYSCALL from compatibility mode (IA32_CSTAR) faults
/// on Intel CPUs; L0 locks that MSR without a gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum SyscallEntry {
    Syscall = 0,
    Sysenter = 1,
    Int80 = 2,
}

impl SyscallEntry {
    /// Every entry, in the order of the gate's kernel-entry words.
    pub const ALL: [SyscallEntry; 3] = [Self::Syscall, Self::Sysenter, Self::Int80];

    /// The request its gate makes.
    #[must_use]
    pub const fn request(self) -> RequestCode {
        match self {
            Self::Syscall => RequestCode::Syscall,
            Self::Sysenter => RequestCode::SyscallSysenter,
            Self::Int80 => RequestCode::SyscallInt80,
        }
    }

    /// Whether its calls use the i386 numbers and registers.
    #[must_use]
    pub const fn is_compat(self) -> bool {
        !matches!(self, Self::Syscall)
    }

    /// The name in events.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Syscall => "syscall",
            Self::Sysenter => "sysenter",
            Self::Int80 => "int80",
        }
    }

    /// Decodes an event's `detail`.
    #[must_use]
    pub const fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            0 => Self::Syscall,
            1 => Self::Sysenter,
            2 => Self::Int80,
            _ => return None,
        })
    }
}

impl RequestCode {
    /// Decodes a request code; `None` for anything the monitor does not serve.
    #[must_use]
    pub const fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            0 => Self::Null,
            1 => Self::Syscall,
            2 => Self::ProcessCreate,
            3 => Self::Exec,
            4 => Self::SyscallInt80,
            5 => Self::SyscallSysenter,
            6 => Self::IoUring,
            7 => Self::KvmExit,
            8 => Self::L2Map,
            9 => Self::Memslot,
            10 => Self::VcpuCreate,
            11 => Self::VcpuDestroy,
            _ => return None,
        })
    }
}

/// What the monitor returns to its caller (RAX after the gate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum Verdict {
    /// Carry on.
    Allow = 0,
    /// The policy refuses the operation (a process creation is not permitted).
    Deny = 1,
    /// The request failed the invocation checkpoint and was ignored.
    Rejected = -1,
}

impl Verdict {
    /// The register value.
    #[must_use]
    pub const fn to_raw(self) -> u64 {
        self as i64 as u64
    }

    /// Decodes a register value.
    #[must_use]
    pub const fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw as i64 {
            0 => Self::Allow,
            1 => Self::Deny,
            -1 => Self::Rejected,
            _ => return None,
        })
    }
}

/// Slots in the monitor's event ring: enough that a benchmark window (which makes no exit in-box, so
/// L0 cannot drain meanwhile) never overflows it.
pub const RING_LEN: usize = 4096;
/// Undrained events at which the in-box monitor asks L0 to drain its ring
/// ([`crate::Hypercall::RingHighWater`]): one exit per this many events under a flood, none for a
/// burst that fits (the Linux benchmark's 2,000-event window).
pub const RING_HIGH_WATER: usize = RING_LEN * 3 / 4;

/// Magic at the start of [`MonitorConfig`] ("IHMICONF").
pub const CONFIG_MAGIC: u64 = 0x464e_4f43_494d_4849;
/// Largest allow-list L0 can hand the monitor.
pub const MAX_ALLOWED: usize = 16;
/// Bytes of a program's path an event keeps (NUL-padded; longer paths are cut and flagged).
pub const PATH_LEN: usize = 64;
/// Longest path the monitor reads to find a program's name (the kernel's PATH_MAX).
pub const PATH_MAX: usize = 4096;

/// What L0 writes into the monitor's data before the guest can call it (the monitor symbol
/// `IHMI_MONITOR_CONFIG`). The guest never sees or touches it: it lives in monitor frames.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct MonitorConfig {
    /// [`CONFIG_MAGIC`].
    pub magic: u64,
    /// Monitor-virtual address where guest-physical address 0 is mapped (the direct map).
    pub direct_map_base: u64,
    /// Guest RAM the direct map covers; reads elsewhere are refused.
    pub ram: [crate::RamRange; crate::BOOT_INFO_MAX_RANGES],
    /// Valid entries in `ram`.
    pub ram_count: u64,
    /// Guest-virtual address of the guest kernel's "current process" pointer.
    pub current_process_ptr: u64,
    /// Process names the creation policy allows (NUL-padded); zero entries means allow all.
    pub allowed: [[u8; crate::guest_os::COMM_LEN]; MAX_ALLOWED],
    /// Valid entries in `allowed`.
    pub allowed_count: u64,
    /// The guest kernel: [`OS_TESTGUEST`] or [`OS_LINUX`].
    pub os: u64,
    /// Offsets in the guest's process record (Linux: `task_struct`): the process id, the parent (a
    /// pid for the test guest, a pointer to the parent's record for Linux), the name.
    pub pid_offset: u64,
    pub parent_offset: u64,
    pub comm_offset: u64,
    /// Linux: the kernel PGD is the even page of a CR3's 8 KiB pair (page-table isolation built in).
    pub pti_pgd_pair: u64,
    /// Linux: offset of `filename` (the path `execve` was given) in the kernel's `linux_binprm`.
    pub binprm_filename_offset: u64,
    /// Linux: where the process-creation trampoline's call of the gate returns (in its alias in the
    /// kernel's image mapping), and where the hooked function's call of the trampoline returns: an exec
    /// request is served only with both on the calling kernel stack, as a real exec leaves them.
    pub exec_hook_return: u64,
    pub exec_site_return: u64,
    /// Linux: the same two returns for the io_uring hook (in `io_issue_sqe`), 0 without it.
    pub io_uring_hook_return: u64,
    pub io_uring_site_return: u64,
    /// Linux: offset of `opcode` (one byte) in the kernel's `io_kiocb`.
    pub io_kiocb_opcode_offset: u64,
    /// Linux: the SHA-256 digests of the programs the exec policy allows; zero entries means allow
    /// all. (Linux programs are allowed by identity; `allowed` names serve the test guest.)
    pub allowed_digests: [[u8; 32]; MAX_ALLOWED],
    /// Valid entries in `allowed_digests`.
    pub allowed_digest_count: u64,
    /// Linux: where the kernel keeps an exec's file, for the program's identity.
    pub files: FileOffsets,
    /// Linux with KVM: the KVM exit hook and what it audits; all zero without it.
    pub kvm: KvmOffsets,
    /// Linux in the box: the kernel's linear mappings, which the monitor reads without walking the
    /// guest's page tables; all zero out of the box.
    pub linear: LinearMaps,
}

/// Where a Linux kernel maps physical memory linearly: its direct map (all of RAM at one offset) and
/// its image mapping (the kernel image at another). In the box the monitor reads those addresses as a
/// subtraction and a load, after checking once, by a walk of the guest's own tables, that the kernel
/// maps them so; out of the box L0 leaves this zero and every read walks the guest's tables in software,
/// as a monitor outside the guest must (BRIEF.md section 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LinearMaps {
    /// The address of the kernel variable `page_offset_base` (where the direct map starts); 0: none.
    pub page_offset_base: u64,
    /// The kernel image's mapping, `_stext`..`_end` (guest-virtual); 0 when not known.
    pub image: [u64; 2],
}

/// Most entries of KVM's exit-handler table the monitor holds (`ihmi_linux`'s `MAX_EXIT_HANDLERS`).
pub const KVM_EXIT_HANDLERS_MAX: usize = 96;

/// Most words of KVM's `kvm_x86_ops` the monitor holds (`ihmi_linux`'s `MAX_X86_OPS_WORDS`; 6.1's
/// is 121).
pub const KVM_X86_OPS_MAX: usize = 160;

/// What the in-hypervisor monitor needs of a Linux kernel with KVM built in (from its System.map, BTF
/// and image; see `ihmi_linux::KvmProfile`).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct KvmOffsets {
    /// Where the KVM exit trampoline's call of the gate returns, and where the hooked
    /// `vmx_handle_exit`'s call of the trampoline returns: 0 without the hook.
    pub hook_return: u64,
    pub site_return: u64,
    /// Offset of the exit reason (4 bytes) from a `kvm_vcpu` pointer.
    pub exit_reason_offset: u64,
    /// `kvm_vmx_exit_handlers`: its address, its entries, and their values in the kernel image.
    pub exit_handlers: u64,
    pub exit_handler_count: u64,
    pub exit_handler_values: [u64; KVM_EXIT_HANDLERS_MAX],
    /// The mapping hook (`make_spte`): where its trampoline's call of the gate returns and where the
    /// hooked function's call of the trampoline returns, 0 without it.
    pub map_hook_return: u64,
    pub map_site_return: u64,
    /// Offsets of `kvm_memory_slot.base_gfn`, `.npages`, `.userspace_addr` and of
    /// `kvm_mmu_page.role`.
    pub slot_base_gfn_offset: u64,
    pub slot_npages_offset: u64,
    pub slot_userspace_addr_offset: u64,
    pub mmu_page_role_offset: u64,
    /// What the watched kernel keeps of its image for good: its text, read-only data, data and
    /// zero-initialised data, guest-physical `[start, end)` each. No mapping KVM makes for its guest
    /// may reach into them.
    pub image: [[u64; 2]; KERNEL_IMAGE_RANGES],
    /// The memslot hook (`kvm_arch_commit_memory_region`) and the vCPU hook
    /// (`kvm_arch_vcpu_postcreate`): their returns as for the mapping hook, 0 without them.
    pub memslot_hook_return: u64,
    pub memslot_site_return: u64,
    pub vcpu_hook_return: u64,
    pub vcpu_site_return: u64,
    /// The same for the hook on vCPU destruction (`kvm_arch_vcpu_destroy`).
    pub vcpu_destroy_hook_return: u64,
    pub vcpu_destroy_site_return: u64,
    /// Offsets of `kvm_memory_slot.id`, `.as_id`, `.flags`, of `kvm_vcpu.kvm`, `.vcpu_id`, and of
    /// `vcpu_vmx.vmcs01` and `.loaded_vmcs` from the `kvm_vcpu` pointer.
    pub slot_id_offset: u64,
    pub slot_as_id_offset: u64,
    pub slot_flags_offset: u64,
    pub vcpu_kvm_offset: u64,
    pub vcpu_id_offset: u64,
    pub vcpu_vmcs01_offset: u64,
    pub vcpu_loaded_vmcs_offset: u64,
    /// KVM's `kvm_x86_ops` (the vendor module's operations, filled in once at boot from
    /// `vmx_x86_ops` as `hardware_setup` left it): its address, and its words as L0 copied them when
    /// the boot was over (the first system call, before any hook can fire), 0 words until then or
    /// without KVM. The monitor holds the live struct to them (P2).
    pub x86_ops: u64,
    pub x86_ops_words: u64,
    pub x86_ops_values: [u64; KVM_X86_OPS_MAX],
}

/// The ranges of [`KvmOffsets::image`].
pub const KERNEL_IMAGE_RANGES: usize = 4;

/// The vCPUs the in-hypervisor monitor can hold in its VMCS registry at once.
pub const KVM_VMCS_REGISTRY_LEN: usize = 64;

/// The VMCS regions of the vCPUs L1's KVM created (NESTED.md B.1.3 P6, no rogue VMs): the monitor
/// registers each vCPU from its hook in `kvm_arch_vcpu_postcreate`, and L0 refuses a VMLAUNCH or
/// VMRESUME of any region not here. It lives in the monitor's frames (the image's
/// `IHMI_KVM_VMCSS`), which L1 cannot reach; the monitor writes it, L0 only reads it. Each entry is
/// `[the vCPU's address, its VMCS region's guest-physical address]`, `[0, 0]` when free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct KvmVmcsRegistry {
    pub entries: [[u64; 2]; KVM_VMCS_REGISTRY_LEN],
}

impl KvmVmcsRegistry {
    /// Nothing registered.
    pub const EMPTY: Self = Self {
        entries: [[0; 2]; KVM_VMCS_REGISTRY_LEN],
    };

    /// Registers `vcpu`'s VMCS region `vmcs`. A vCPU at an address already registered replaces that
    /// entry: KVM frees a vCPU before its memory holds another, so the old one is gone with its
    /// VMCS. Whether there was room (a full registry registers nothing, and L0 then refuses the
    /// vCPU's entries: it fails closed).
    pub fn register(&mut self, vcpu: u64, vmcs: u64) -> bool {
        let at = self
            .entries
            .iter()
            .position(|e| e[0] == vcpu)
            .or_else(|| self.entries.iter().position(|e| *e == [0, 0]));
        match at {
            Some(i) if vcpu != 0 => {
                self.entries[i] = [vcpu, vmcs];
                true
            }
            _ => false,
        }
    }

    /// Takes `vcpu` out as KVM destroys it, its VMCS with it. Whether it was registered.
    pub fn unregister(&mut self, vcpu: u64) -> bool {
        match self.entries.iter_mut().find(|e| vcpu != 0 && e[0] == vcpu) {
            Some(e) => {
                *e = [0, 0];
                true
            }
            None => false,
        }
    }

    /// Whether the VMCS region at `vmcs` is a registered vCPU's.
    #[must_use]
    pub fn holds(&self, vmcs: u64) -> bool {
        vmcs != 0 && self.entries.iter().any(|e| e[0] != 0 && e[1] == vmcs)
    }
}

impl Default for KvmVmcsRegistry {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl KvmOffsets {
    /// No KVM hooks: every offset and return 0 (what `Default` gives, usable in a `static`).
    pub const EMPTY: Self = Self {
        hook_return: 0,
        site_return: 0,
        exit_reason_offset: 0,
        exit_handlers: 0,
        exit_handler_count: 0,
        exit_handler_values: [0; KVM_EXIT_HANDLERS_MAX],
        map_hook_return: 0,
        map_site_return: 0,
        slot_base_gfn_offset: 0,
        slot_npages_offset: 0,
        slot_userspace_addr_offset: 0,
        mmu_page_role_offset: 0,
        image: [[0; 2]; KERNEL_IMAGE_RANGES],
        memslot_hook_return: 0,
        memslot_site_return: 0,
        vcpu_hook_return: 0,
        vcpu_site_return: 0,
        vcpu_destroy_hook_return: 0,
        vcpu_destroy_site_return: 0,
        slot_id_offset: 0,
        slot_as_id_offset: 0,
        slot_flags_offset: 0,
        vcpu_kvm_offset: 0,
        vcpu_id_offset: 0,
        vcpu_vmcs01_offset: 0,
        vcpu_loaded_vmcs_offset: 0,
        x86_ops: 0,
        x86_ops_words: 0,
        x86_ops_values: [0; KVM_X86_OPS_MAX],
    };
}

impl Default for KvmOffsets {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Where a Linux kernel keeps the bytes of the file an exec runs (offsets from its BTF; see the
/// monitor's `identity` module). All zero: not known, so no program has an identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FileOffsets {
    /// `linux_binprm.file`, `file.f_mapping`, `address_space.host`.
    pub binprm_file: u64,
    pub file_mapping: u64,
    pub mapping_host: u64,
    /// `address_space.i_pages` plus `xarray.xa_head`.
    pub mapping_pages: u64,
    /// `inode.i_ino`, `.i_size`, `.i_ctime`, `.i_mtime`.
    pub inode_ino: u64,
    pub inode_size: u64,
    pub inode_ctime: u64,
    pub inode_mtime: u64,
    /// `xa_node.shift`, `xa_node.slots`, and log2 of the slots per node.
    pub node_shift: u64,
    pub node_slots: u64,
    pub chunk_shift: u64,
    /// `sizeof(struct page)`.
    pub page_struct_size: u64,
    /// The address of the kernel variable `vmemmap_base`; 0 when not known.
    pub vmemmap_base: u64,
}

/// [`MonitorConfig::os`] for ihmi's own test guest.
pub const OS_TESTGUEST: u64 = 0;
/// [`MonitorConfig::os`] for Linux.
pub const OS_LINUX: u64 = 1;

/// Where the in-box gate sits in a Linux guest's address space: PML4 slot 466, an "unused hole" of the
/// x86-64 layout (the kernel's Documentation/x86/x86_64/mm.rst). L0 installs the slot in the kernel's
/// top-level page table before any process exists, and Linux copies every slot from
/// `KERNEL_PGD_BOUNDARY` (the direct map's, 273) up into each new page table, so every address space
/// inherits it. (The hypervisor-reserved slots 256-272 lie below that boundary and are never copied.)
pub const LINUX_GATE_GVA: u64 = 0xffff_e900_0000_0000;
/// The per-CPU scratch page next to the gate, guest-writable: the system-call gate parks RAX and RCX
/// there before it may switch views (they are the guest's own registers, so the guest gains nothing
/// by changing them).
pub const LINUX_SCRATCH_GVA: u64 = LINUX_GATE_GVA + 0x1000;

/// RAX of the VMCALL with which the monitor VM hands its verdict (in RBX) back to L0.
pub const OUTBOX_DONE: u64 = 0x6f75_7462_6f78; // "outbox"

/// How a guest reaches the monitor. L0 tells the guest in [`crate::BootInfo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Mode {
    /// No monitor.
    None = 0,
    /// In-box: call the gate at [`crate::BootInfo::gate_gva`].
    InBox = 1,
    /// Out-of-box: [`crate::Hypercall::Monitor`]; L0 runs the request in the monitor VM.
    OutBox = 2,
}

impl Mode {
    /// The name used in events and reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::InBox => "inbox",
            Self::OutBox => "outbox",
        }
    }

    /// Decodes the boot-information field.
    #[must_use]
    pub const fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::None,
            1 => Self::InBox,
            2 => Self::OutBox,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmcs_registry_holds_what_was_registered_replaces_a_reused_vcpu_and_fails_closed() {
        let mut r = KvmVmcsRegistry::EMPTY;
        assert!(!r.holds(0x1000) && !r.holds(0));
        assert!(r.register(0xffff_8880_0100_0000, 0x7000));
        assert!(r.holds(0x7000));
        // The same vCPU address again: the old vCPU is gone, and its VMCS with it.
        assert!(r.register(0xffff_8880_0100_0000, 0x9000));
        assert!(r.holds(0x9000) && !r.holds(0x7000));
        // No vCPU, no entry.
        assert!(!r.register(0, 0x5000));
        assert!(!r.holds(0x5000));
        for i in 1..KVM_VMCS_REGISTRY_LEN as u64 {
            assert!(r.register(0xffff_8880_0200_0000 + i * 0x4000, 0x10_0000 + i * 0x1000));
        }
        // Full: the next vCPU is not registered, so L0 refuses its entries.
        assert!(!r.register(0xffff_8880_0300_0000, 0x20_0000));
        assert!(!r.holds(0x20_0000));
        assert!(r.holds(0x10_0000 + 0x1000) && r.holds(0x9000));
        // Destroyed: its VMCS goes, and its entry takes the next vCPU.
        assert!(r.unregister(0xffff_8880_0100_0000));
        assert!(!r.holds(0x9000) && !r.unregister(0xffff_8880_0100_0000) && !r.unregister(0));
        assert!(r.register(0xffff_8880_0300_0000, 0x20_0000));
        assert!(r.holds(0x20_0000));
    }
}
