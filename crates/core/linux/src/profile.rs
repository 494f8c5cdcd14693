//! What L0 and the monitors need to know about one guest kernel, found by the host in the kernel's own
//! `System.map` and BTF, and handed to L0 as a small text module. One definition serves both sides:
//! the host writes it with [`fmt::Display`], L0 reads it with [`LinuxProfile::parse`].
//!
//! ```text
//! ihmi-linux-profile 10
//! symbol current_task 0xffffffff8180a8c0
//! field task_struct.pid 0x4b8 4
//! size page 64
//! object kvm_x86_ops 0xffffffff81d15720 968
//! flag pti_pgd_pair 1
//! ```

use core::fmt;

/// The first line.
const HEADER: &str = "ihmi-linux-profile 10";

/// The kernel PGD of a CR3: its root without PCID or flags and, when page-table isolation is built in
/// (every PGD an 8 KiB pair, kernel half first), without bit 12, since a user CR3 points at the user
/// half (the kernel's arch/x86/include/asm/pgtable.h, `kernel_to_user_pgdp`).
#[must_use]
pub const fn kernel_pgd(cr3: u64, pti_pgd_pair: bool) -> u64 {
    let root = cr3 & 0x000f_ffff_ffff_f000;
    if pti_pgd_pair {
        root & !(1 << 12)
    } else {
        root
    }
}

/// A struct member: byte offset and size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Field {
    pub offset: u64,
    pub size: u64,
}

/// One guest kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinuxProfile {
    /// The running task pointer: a kernel address, or (SMP kernels) an offset into the per-CPU area
    /// that the kernel's GS base points at.
    pub current_task: u64,
    /// The kernel's top-level page table (`init_top_pgt`), where the gate's mapping will go.
    pub init_top_pgt: u64,
    /// The system-call entry the kernel installs in IA32_LSTAR.
    pub entry_syscall_64: u64,
    /// The process-creation hook point: `begin_new_exec`, which the binary loader calls with the
    /// `linux_binprm` in RDI once it has opened and accepted a program, before the point of no return
    /// (a failed `execve` of a missing file never gets there; a refusal there fails the `execve`
    /// cleanly).
    pub exec_hook: u64,
    /// The end of the kernel image (`_end`): the kernel maps nothing in the 2 MiB slots of its image
    /// mapping above it once it has booted, so the hook's trampoline can go there, within reach of a
    /// 32-bit call from kernel text.
    pub kernel_end: u64,
    /// The kernel's text (`_stext`..`_etext`) and read-only data (`__start_rodata`..`__end_rodata`),
    /// which never change once it has booted: L0 write-protects them then. The gaps between them the
    /// kernel frees at boot (`mark_rodata_ro`), so they are not included.
    pub text: [u64; 2],
    pub rodata: [u64; 2],
    /// The kernel's data (`_sdata`..`__init_begin`) and zero-initialised data (`__bss_start`..
    /// `__bss_stop`): with text and read-only data, what of its image the kernel keeps for good. The
    /// rest (the gaps above, init code and data, the unused part of the brk area) goes back to the page
    /// allocator at boot and may hold anything after.
    pub data: [u64; 2],
    pub bss: [u64; 2],
    /// The interrupt descriptor table (`idt_table`, one page).
    pub idt_table: u64,
    /// The kernel variable `page_offset_base`: where the direct map of all physical memory starts
    /// (chosen at boot with memory randomization; the monitor reads it there).
    pub page_offset_base: u64,
    /// `task_struct.pid`.
    pub pid: Field,
    /// `task_struct.tgid`.
    pub tgid: Field,
    /// `task_struct.comm`.
    pub comm: Field,
    /// `task_struct.real_parent`.
    pub real_parent: Field,
    /// `linux_binprm.filename`: the path `execve` was given.
    pub binprm_filename: Field,
    /// Page-table isolation is built in: every PGD is an 8 KiB pair (kernel half first), so the kernel
    /// PGD of a user CR3 is found by clearing bit 12.
    pub pti_pgd_pair: bool,
    /// With io_uring: the io_uring hook point, `io_issue_sqe`, which issues every operation a ring
    /// submits (with the `io_kiocb` in RDI), and `io_kiocb.opcode`. Optional: a kernel without
    /// io_uring has neither.
    pub io_uring: Option<(u64, Field)>,
    /// Where the kernel keeps the bytes of the file an exec runs, for the program's identity.
    pub files: FileFields,
    /// With KVM built in (the `l1` kernel): what the in-hypervisor monitor hooks and audits.
    pub kvm: Option<KvmProfile>,
}

/// Most entries of KVM's exit-handler table a profile carries (6.1 has 76, one per basic exit reason up
/// to `EXIT_REASON_NOTIFY`).
pub const MAX_EXIT_HANDLERS: usize = 96;

/// What the in-hypervisor monitor needs of a kernel with KVM (`kvm_intel`) built in: the hook point on
/// the L2-exit path, where KVM keeps a vCPU's exit reason, and its exit-handler table with the values
/// the kernel image gives it (the table is writable data, `static int (*kvm_vmx_exit_handlers[])`, so a
/// root attacker can redirect an exit to code of its own without touching text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmProfile {
    /// `vmx_handle_exit(struct kvm_vcpu *vcpu, fastpath_t)`: every exit of L2 that KVM handles, with
    /// the vCPU in RDI.
    pub handle_exit: u64,
    /// `vmx_vmexit`: where every exit from KVM's guest returns (VMCS12's HOST_RIP).
    pub vmx_vmexit: u64,
    /// `vcpu_vmx.exit_reason` (4 bytes), as an offset from the `kvm_vcpu` pointer (`vcpu_vmx.vcpu`
    /// taken off).
    pub exit_reason: Field,
    /// `kvm_vmx_exit_handlers`: where, how many entries, and each entry's value in the image.
    pub exit_handlers: u64,
    pub exit_handler_count: usize,
    pub exit_handler_values: [u64; MAX_EXIT_HANDLERS],
    /// `make_spte(struct kvm_vcpu *, struct kvm_mmu_page *, const struct kvm_memory_slot *,
    /// unsigned int pte_access, gfn_t, kvm_pfn_t, ...)`: every mapping KVM makes for its guest, shadow
    /// paging and TDP alike, with the vCPU in RDI, the shadow page in RSI, the memslot in RDX, the
    /// guest frame in R8 and the host frame in R9.
    pub make_spte: u64,
    /// `kvm_memory_slot.base_gfn`, `.npages`, `.userspace_addr` (8 bytes each), and
    /// `kvm_mmu_page.role` (its low 4 bits are the level of the shadow page, 1 = 4 KiB).
    pub slot_base_gfn: Field,
    pub slot_npages: Field,
    pub slot_userspace_addr: Field,
    pub mmu_page_role: Field,
    /// `kvm_arch_commit_memory_region(struct kvm *, struct kvm_memory_slot *old, const struct
    /// kvm_memory_slot *new, enum kvm_mr_change)`: every memslot change KVM has accepted, as it
    /// commits it; and `kvm_arch_vcpu_postcreate(struct kvm_vcpu *)`: every vCPU KVM has created,
    /// once its VMCS exists and before its VMM can run it.
    pub commit_memory_region: u64,
    pub vcpu_create: u64,
    /// `kvm_arch_vcpu_destroy(struct kvm_vcpu *)`: every vCPU KVM destroys, before it frees its VMCS.
    pub vcpu_destroy: u64,
    /// `kvm_memory_slot.id` (2 bytes), `.as_id` (2), `.flags` (4); `kvm_vcpu.kvm` (8) and
    /// `.vcpu_id` (4).
    pub slot_id: Field,
    pub slot_as_id: Field,
    pub slot_flags: Field,
    pub vcpu_kvm: Field,
    pub vcpu_id: Field,
    /// `vcpu_vmx.vmcs01` (the vCPU's own `loaded_vmcs`, whose first member is the `struct vmcs *`)
    /// and `vcpu_vmx.loaded_vmcs` (8 bytes each), as offsets from the `kvm_vcpu` pointer: the VMCS
    /// the vCPU runs its guest on, which the monitor registers for L0's rogue-VMCS check.
    pub vcpu_vmcs01: Field,
    pub vcpu_loaded_vmcs: Field,
    /// `kvm_x86_ops` (`struct kvm_x86_ops`, writable data filled in at boot): its address and size in
    /// bytes (a multiple of 8, at most [`MAX_X86_OPS_WORDS`] words).
    pub x86_ops: u64,
    pub x86_ops_size: u64,
}

/// Most words of `kvm_x86_ops` a profile may give (6.1's struct is 121).
pub const MAX_X86_OPS_WORDS: u64 = 160;

/// The `field` lines of the KVM hooks' members, in [`KvmProfile`] order, with the size each must
/// have.
const KVM_MAP_FIELD_NAMES: [(&str, u64); 11] = [
    ("kvm_memory_slot.base_gfn", 8),
    ("kvm_memory_slot.npages", 8),
    ("kvm_memory_slot.userspace_addr", 8),
    ("kvm_mmu_page.role", 4),
    ("kvm_memory_slot.id", 2),
    ("kvm_memory_slot.as_id", 2),
    ("kvm_memory_slot.flags", 4),
    ("kvm_vcpu.kvm", 8),
    ("kvm_vcpu.vcpu_id", 4),
    ("kvm_vcpu.vmcs01", 8),
    ("kvm_vcpu.loaded_vmcs", 8),
];

impl Default for KvmProfile {
    fn default() -> Self {
        Self {
            handle_exit: 0,
            vmx_vmexit: 0,
            exit_reason: Field::default(),
            exit_handlers: 0,
            exit_handler_count: 0,
            exit_handler_values: [0; MAX_EXIT_HANDLERS],
            make_spte: 0,
            slot_base_gfn: Field::default(),
            slot_npages: Field::default(),
            slot_userspace_addr: Field::default(),
            mmu_page_role: Field::default(),
            commit_memory_region: 0,
            vcpu_create: 0,
            vcpu_destroy: 0,
            slot_id: Field::default(),
            slot_as_id: Field::default(),
            slot_flags: Field::default(),
            vcpu_kvm: Field::default(),
            vcpu_id: Field::default(),
            vcpu_vmcs01: Field::default(),
            vcpu_loaded_vmcs: Field::default(),
            x86_ops: 0,
            x86_ops_size: 0,
        }
    }
}

impl KvmProfile {
    /// The exit-handler table's entries as the kernel image has them.
    #[must_use]
    pub fn exit_handler_values(&self) -> &[u64] {
        &self.exit_handler_values[..self.exit_handler_count.min(MAX_EXIT_HANDLERS)]
    }

    fn map_fields_mut(&mut self) -> [&mut Field; 11] {
        [
            &mut self.slot_base_gfn,
            &mut self.slot_npages,
            &mut self.slot_userspace_addr,
            &mut self.mmu_page_role,
            &mut self.slot_id,
            &mut self.slot_as_id,
            &mut self.slot_flags,
            &mut self.vcpu_kvm,
            &mut self.vcpu_id,
            &mut self.vcpu_vmcs01,
            &mut self.vcpu_loaded_vmcs,
        ]
    }

    /// The mapping hook's members, in `KVM_MAP_FIELD_NAMES` order.
    #[must_use]
    pub const fn map_fields(&self) -> [Field; 11] {
        [
            self.slot_base_gfn,
            self.slot_npages,
            self.slot_userspace_addr,
            self.mmu_page_role,
            self.slot_id,
            self.slot_as_id,
            self.slot_flags,
            self.vcpu_kvm,
            self.vcpu_id,
            self.vcpu_vmcs01,
            self.vcpu_loaded_vmcs,
        ]
    }
}

/// The members and sizes the monitor follows from a `linux_binprm` to its file's pages in the page
/// cache (include/linux/xarray.h, include/linux/fs.h).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileFields {
    /// `linux_binprm.file`, `file.f_mapping`, `address_space.host`, `address_space.i_pages`,
    /// `xarray.xa_head`.
    pub binprm_file: Field,
    pub file_mapping: Field,
    pub mapping_host: Field,
    pub mapping_pages: Field,
    pub xa_head: Field,
    /// `inode.i_ino`, `inode.i_size`, `inode.i_ctime`, `inode.i_mtime`.
    pub inode_ino: Field,
    pub inode_size: Field,
    pub inode_ctime: Field,
    pub inode_mtime: Field,
    /// `xa_node.shift` and `xa_node.slots` (its size says the slots per node).
    pub node_shift: Field,
    pub node_slots: Field,
    /// `sizeof(struct page)`.
    pub page_size: u64,
    /// The kernel variable `vmemmap_base`: where the `struct page` array starts.
    pub vmemmap_base: u64,
}

/// The `field` lines of [`FileFields`], in order.
const FILE_FIELD_NAMES: [&str; 11] = [
    "linux_binprm.file",
    "file.f_mapping",
    "address_space.host",
    "address_space.i_pages",
    "xarray.xa_head",
    "inode.i_ino",
    "inode.i_size",
    "inode.i_ctime",
    "inode.i_mtime",
    "xa_node.shift",
    "xa_node.slots",
];

impl FileFields {
    fn fields_mut(&mut self) -> [&mut Field; 11] {
        [
            &mut self.binprm_file,
            &mut self.file_mapping,
            &mut self.mapping_host,
            &mut self.mapping_pages,
            &mut self.xa_head,
            &mut self.inode_ino,
            &mut self.inode_size,
            &mut self.inode_ctime,
            &mut self.inode_mtime,
            &mut self.node_shift,
            &mut self.node_slots,
        ]
    }

    /// The fields in [`FILE_FIELD_NAMES`] order.
    #[must_use]
    pub const fn fields(&self) -> [Field; 11] {
        [
            self.binprm_file,
            self.file_mapping,
            self.mapping_host,
            self.mapping_pages,
            self.xa_head,
            self.inode_ino,
            self.inode_size,
            self.inode_ctime,
            self.inode_mtime,
            self.node_shift,
            self.node_slots,
        ]
    }
}

/// Why a profile could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileError {
    /// Not a profile (first line), or of another version.
    Header,
    /// A line that is not `symbol`, `field` or `flag` with the right number of values.
    Line(usize),
    /// A value that is not a number.
    Number(usize),
    /// A required entry is missing (its name).
    Missing(&'static str),
    /// A required `field` line is missing (the member's name).
    MissingField(&'static str),
    /// An entry no kernel has (its name).
    Implausible(&'static str),
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header => write!(f, "not a guest profile (the first line must be `{HEADER}`)"),
            Self::Line(n) => write!(f, "guest profile line {n} is malformed"),
            Self::Number(n) => write!(f, "guest profile line {n} has a bad number"),
            Self::Missing(name) => write!(f, "the guest profile lacks `{name}`"),
            Self::MissingField(name) => write!(f, "the guest profile lacks `field {name}`"),
            Self::Implausible(name) => write!(f, "the guest profile's `{name}` is implausible"),
        }
    }
}

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

impl LinuxProfile {
    /// Reads a profile; every entry is required.
    pub fn parse(text: &str) -> Result<Self, ProfileError> {
        let mut lines = text.lines().enumerate();
        if lines.next().map(|(_, l)| l.trim()) != Some(HEADER) {
            return Err(ProfileError::Header);
        }
        let mut p = Self::default();
        let mut seen = 0u32;
        // The io_uring entries are optional, but come together.
        let mut io_uring_seen = 0u8;
        // So are the KVM entries.
        let mut kvm_seen = 0u32;
        let mut files_seen = 0u32;
        for (i, line) in lines {
            let n = i + 1;
            let words: [&str; 4] = {
                let mut w = [""; 4];
                let mut it = line.split_whitespace();
                for slot in &mut w {
                    *slot = it.next().unwrap_or("");
                }
                if it.next().is_some() {
                    return Err(ProfileError::Line(n));
                }
                w
            };
            let num = |s: &str| number(s).ok_or(ProfileError::Number(n));
            match words {
                ["", ..] => continue,
                ["symbol", name, value, ""] => {
                    let v = num(value)?;
                    let (slot, bit) = match name {
                        "current_task" => (&mut p.current_task, 0),
                        "init_top_pgt" => (&mut p.init_top_pgt, 1),
                        "entry_SYSCALL_64" => (&mut p.entry_syscall_64, 2),
                        "begin_new_exec" => (&mut p.exec_hook, 8),
                        "_end" => (&mut p.kernel_end, 9),
                        "_stext" => (&mut p.text[0], 11),
                        "_etext" => (&mut p.text[1], 12),
                        "__start_rodata" => (&mut p.rodata[0], 13),
                        "__end_rodata" => (&mut p.rodata[1], 14),
                        "idt_table" => (&mut p.idt_table, 15),
                        "_sdata" => (&mut p.data[0], 18),
                        "__init_begin" => (&mut p.data[1], 19),
                        "__bss_start" => (&mut p.bss[0], 20),
                        "__bss_stop" => (&mut p.bss[1], 21),
                        "vmemmap_base" => (&mut p.files.vmemmap_base, 16),
                        "page_offset_base" => (&mut p.page_offset_base, 22),
                        "io_issue_sqe" => {
                            p.io_uring.get_or_insert_with(Default::default).0 = v;
                            io_uring_seen |= 1;
                            continue;
                        }
                        "vmx_handle_exit" => {
                            p.kvm.get_or_insert_with(Default::default).handle_exit = v;
                            kvm_seen |= 1;
                            continue;
                        }
                        "vmx_vmexit" => {
                            p.kvm.get_or_insert_with(Default::default).vmx_vmexit = v;
                            kvm_seen |= 8;
                            continue;
                        }
                        "make_spte" => {
                            p.kvm.get_or_insert_with(Default::default).make_spte = v;
                            kvm_seen |= 16;
                            continue;
                        }
                        "kvm_arch_commit_memory_region" => {
                            p.kvm
                                .get_or_insert_with(Default::default)
                                .commit_memory_region = v;
                            kvm_seen |= 32;
                            continue;
                        }
                        "kvm_arch_vcpu_postcreate" => {
                            p.kvm.get_or_insert_with(Default::default).vcpu_create = v;
                            kvm_seen |= 64;
                            continue;
                        }
                        "kvm_arch_vcpu_destroy" => {
                            p.kvm.get_or_insert_with(Default::default).vcpu_destroy = v;
                            kvm_seen |= 128;
                            continue;
                        }
                        _ => return Err(ProfileError::Line(n)),
                    };
                    *slot = v;
                    seen |= 1 << bit;
                }
                ["field", name, offset, size] => {
                    let f = Field {
                        offset: num(offset)?,
                        size: num(size)?,
                    };
                    let (slot, bit) = match name {
                        "task_struct.pid" => (&mut p.pid, 3),
                        "task_struct.tgid" => (&mut p.tgid, 4),
                        "task_struct.comm" => (&mut p.comm, 5),
                        "task_struct.real_parent" => (&mut p.real_parent, 6),
                        "linux_binprm.filename" => (&mut p.binprm_filename, 10),
                        "io_kiocb.opcode" => {
                            p.io_uring.get_or_insert_with(Default::default).1 = f;
                            io_uring_seen |= 2;
                            continue;
                        }
                        "kvm_vcpu.exit_reason" => {
                            p.kvm.get_or_insert_with(Default::default).exit_reason = f;
                            kvm_seen |= 2;
                            continue;
                        }
                        other => {
                            if let Some(i) = KVM_MAP_FIELD_NAMES.iter().position(|x| x.0 == other) {
                                *p.kvm.get_or_insert_with(Default::default).map_fields_mut()[i] = f;
                                kvm_seen |= 256 << i;
                                continue;
                            }
                            match FILE_FIELD_NAMES.iter().position(|&x| x == other) {
                                Some(i) => {
                                    *p.files.fields_mut()[i] = f;
                                    files_seen |= 1 << i;
                                    continue;
                                }
                                None => return Err(ProfileError::Line(n)),
                            }
                        }
                    };
                    *slot = f;
                    seen |= 1 << bit;
                }
                ["object", "kvm_x86_ops", at, size] => {
                    let k = p.kvm.get_or_insert_with(Default::default);
                    k.x86_ops = num(at)?;
                    k.x86_ops_size = num(size)?;
                    kvm_seen |= 1 << 19;
                }
                ["table", "kvm_vmx_exit_handlers", at, values] => {
                    let k = p.kvm.get_or_insert_with(Default::default);
                    k.exit_handlers = num(at)?;
                    let mut count = 0;
                    for v in values.split(',') {
                        let slot = k
                            .exit_handler_values
                            .get_mut(count)
                            .ok_or(ProfileError::Implausible("table kvm_vmx_exit_handlers"))?;
                        *slot = num(v)?;
                        count += 1;
                    }
                    k.exit_handler_count = count;
                    kvm_seen |= 4;
                }
                ["size", "page", value, ""] => {
                    p.files.page_size = num(value)?;
                    seen |= 1 << 17;
                }
                ["flag", "pti_pgd_pair", value, ""] => {
                    p.pti_pgd_pair = num(value)? != 0;
                    seen |= 1 << 7;
                }
                _ => return Err(ProfileError::Line(n)),
            }
        }
        const NAMES: [&str; 23] = [
            "symbol current_task",
            "symbol init_top_pgt",
            "symbol entry_SYSCALL_64",
            "field task_struct.pid",
            "field task_struct.tgid",
            "field task_struct.comm",
            "field task_struct.real_parent",
            "flag pti_pgd_pair",
            "symbol begin_new_exec",
            "symbol _end",
            "field linux_binprm.filename",
            "symbol _stext",
            "symbol _etext",
            "symbol __start_rodata",
            "symbol __end_rodata",
            "symbol idt_table",
            "symbol vmemmap_base",
            "size page",
            "symbol _sdata",
            "symbol __init_begin",
            "symbol __bss_start",
            "symbol __bss_stop",
            "symbol page_offset_base",
        ];
        for (bit, name) in NAMES.iter().enumerate() {
            if seen & (1 << bit) == 0 {
                return Err(ProfileError::Missing(name));
            }
        }
        for (i, name) in FILE_FIELD_NAMES.iter().enumerate() {
            if files_seen & (1 << i) == 0 {
                return Err(ProfileError::MissingField(name));
            }
        }
        let slots = p.files.node_slots.size;
        if slots % 8 != 0 || !(slots / 8).is_power_of_two() || !(32..=2048).contains(&slots) {
            return Err(ProfileError::Implausible("field xa_node.slots"));
        }
        if p.files.page_size == 0 {
            return Err(ProfileError::Implausible("size page"));
        }
        if p.data[0] >= p.data[1] {
            return Err(ProfileError::Implausible("symbol __init_begin"));
        }
        if p.bss[0] > p.bss[1] {
            return Err(ProfileError::Implausible("symbol __bss_stop"));
        }
        match io_uring_seen {
            0 | 3 => {}
            1 => return Err(ProfileError::Missing("field io_kiocb.opcode")),
            _ => return Err(ProfileError::Missing("symbol io_issue_sqe")),
        }
        match kvm_seen {
            0 | 0xf_ffff => {}
            s if s & 1 == 0 => return Err(ProfileError::Missing("symbol vmx_handle_exit")),
            s if s & 8 == 0 => return Err(ProfileError::Missing("symbol vmx_vmexit")),
            s if s & 2 == 0 => return Err(ProfileError::Missing("field kvm_vcpu.exit_reason")),
            s if s & 4 == 0 => return Err(ProfileError::Missing("table kvm_vmx_exit_handlers")),
            s if s & 16 == 0 => return Err(ProfileError::Missing("symbol make_spte")),
            s if s & 32 == 0 => {
                return Err(ProfileError::Missing(
                    "symbol kvm_arch_commit_memory_region",
                ))
            }
            s if s & 64 == 0 => {
                return Err(ProfileError::Missing("symbol kvm_arch_vcpu_postcreate"))
            }
            s if s & 128 == 0 => return Err(ProfileError::Missing("symbol kvm_arch_vcpu_destroy")),
            s if s & (1 << 19) == 0 => return Err(ProfileError::Missing("object kvm_x86_ops")),
            s => {
                let i = (0..KVM_MAP_FIELD_NAMES.len())
                    .find(|i| s & (256 << i) == 0)
                    .unwrap_or(0);
                return Err(ProfileError::MissingField(KVM_MAP_FIELD_NAMES[i].0));
            }
        }
        if let Some(k) = &p.kvm {
            if k.exit_reason.size != 4 {
                return Err(ProfileError::Implausible("field kvm_vcpu.exit_reason"));
            }
            if k.exit_handlers % 8 != 0 || k.exit_handler_count == 0 {
                return Err(ProfileError::Implausible("table kvm_vmx_exit_handlers"));
            }
            if k.x86_ops % 8 != 0
                || k.x86_ops_size % 8 != 0
                || !(1..=MAX_X86_OPS_WORDS).contains(&(k.x86_ops_size / 8))
            {
                return Err(ProfileError::Implausible("object kvm_x86_ops"));
            }
            for (&(name, size), f) in KVM_MAP_FIELD_NAMES.iter().zip(k.map_fields()) {
                if f.size != size || f.offset % size != 0 {
                    return Err(ProfileError::Implausible(name));
                }
            }
        }
        Ok(p)
    }

    /// The kernel PGD to walk for kernel addresses, from the CR3 the guest had.
    #[must_use]
    pub const fn kernel_pgd(&self, cr3: u64) -> u64 {
        kernel_pgd(cr3, self.pti_pgd_pair)
    }
}

impl fmt::Display for LinuxProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{HEADER}")?;
        writeln!(f, "symbol current_task {:#x}", self.current_task)?;
        writeln!(f, "symbol init_top_pgt {:#x}", self.init_top_pgt)?;
        writeln!(f, "symbol entry_SYSCALL_64 {:#x}", self.entry_syscall_64)?;
        writeln!(f, "symbol begin_new_exec {:#x}", self.exec_hook)?;
        writeln!(f, "symbol _end {:#x}", self.kernel_end)?;
        for (name, value) in [
            ("_stext", self.text[0]),
            ("_etext", self.text[1]),
            ("__start_rodata", self.rodata[0]),
            ("__end_rodata", self.rodata[1]),
            ("idt_table", self.idt_table),
            ("_sdata", self.data[0]),
            ("__init_begin", self.data[1]),
            ("__bss_start", self.bss[0]),
            ("__bss_stop", self.bss[1]),
            ("page_offset_base", self.page_offset_base),
        ] {
            writeln!(f, "symbol {name} {value:#x}")?;
        }
        for (name, fld) in [
            ("pid", self.pid),
            ("tgid", self.tgid),
            ("comm", self.comm),
            ("real_parent", self.real_parent),
        ] {
            writeln!(f, "field task_struct.{name} {:#x} {}", fld.offset, fld.size)?;
        }
        writeln!(
            f,
            "field linux_binprm.filename {:#x} {}",
            self.binprm_filename.offset, self.binprm_filename.size
        )?;
        if let Some((hook, opcode)) = self.io_uring {
            writeln!(f, "symbol io_issue_sqe {hook:#x}")?;
            writeln!(
                f,
                "field io_kiocb.opcode {:#x} {}",
                opcode.offset, opcode.size
            )?;
        }
        if let Some(k) = &self.kvm {
            writeln!(f, "symbol vmx_handle_exit {:#x}", k.handle_exit)?;
            writeln!(f, "symbol vmx_vmexit {:#x}", k.vmx_vmexit)?;
            writeln!(f, "symbol make_spte {:#x}", k.make_spte)?;
            writeln!(
                f,
                "symbol kvm_arch_commit_memory_region {:#x}",
                k.commit_memory_region
            )?;
            writeln!(f, "symbol kvm_arch_vcpu_postcreate {:#x}", k.vcpu_create)?;
            writeln!(f, "symbol kvm_arch_vcpu_destroy {:#x}", k.vcpu_destroy)?;
            for ((name, _), fld) in KVM_MAP_FIELD_NAMES.iter().zip(k.map_fields()) {
                writeln!(f, "field {name} {:#x} {}", fld.offset, fld.size)?;
            }
            writeln!(
                f,
                "field kvm_vcpu.exit_reason {:#x} {}",
                k.exit_reason.offset, k.exit_reason.size
            )?;
            writeln!(f, "object kvm_x86_ops {:#x} {}", k.x86_ops, k.x86_ops_size)?;
            write!(f, "table kvm_vmx_exit_handlers {:#x} ", k.exit_handlers)?;
            for (i, v) in k.exit_handler_values().iter().enumerate() {
                let sep = if i == 0 { "" } else { "," };
                write!(f, "{sep}{v:#x}")?;
            }
            writeln!(f)?;
        }
        writeln!(f, "symbol vmemmap_base {:#x}", self.files.vmemmap_base)?;
        writeln!(f, "size page {}", self.files.page_size)?;
        for (name, fld) in FILE_FIELD_NAMES.iter().zip(self.files.fields()) {
            writeln!(f, "field {name} {:#x} {}", fld.offset, fld.size)?;
        }
        writeln!(f, "flag pti_pgd_pair {}", u8::from(self.pti_pgd_pair))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString;

    use super::*;

    fn sample() -> LinuxProfile {
        LinuxProfile {
            current_task: 0xffff_ffff_8180_a8c0,
            init_top_pgt: 0xffff_ffff_8180_0000,
            entry_syscall_64: 0xffff_ffff_8120_0080,
            exec_hook: 0xffff_ffff_8112_606f,
            kernel_end: 0xffff_ffff_81c1_8000,
            text: [0xffff_ffff_8100_0000, 0xffff_ffff_8140_10b2],
            rodata: [0xffff_ffff_8160_0000, 0xffff_ffff_8181_0000],
            data: [0xffff_ffff_81a0_0000, 0xffff_ffff_81b2_1000],
            bss: [0xffff_ffff_81bd_b000, 0xffff_ffff_81e0_0000],
            idt_table: 0xffff_ffff_81bb_1000,
            page_offset_base: 0xffff_ffff_816b_1ca8,
            pid: Field {
                offset: 0x4b8,
                size: 4,
            },
            tgid: Field {
                offset: 0x4bc,
                size: 4,
            },
            comm: Field {
                offset: 0x6b0,
                size: 16,
            },
            real_parent: Field {
                offset: 0x4c8,
                size: 8,
            },
            binprm_filename: Field {
                offset: 0x60,
                size: 8,
            },
            pti_pgd_pair: true,
            io_uring: Some((
                0xffff_ffff_8116_0f20,
                Field {
                    offset: 0x8,
                    size: 1,
                },
            )),
            files: FileFields {
                binprm_file: Field {
                    offset: 0x40,
                    size: 8,
                },
                file_mapping: Field {
                    offset: 0xf0,
                    size: 8,
                },
                mapping_host: Field { offset: 0, size: 8 },
                mapping_pages: Field {
                    offset: 0x8,
                    size: 16,
                },
                xa_head: Field { offset: 8, size: 8 },
                inode_ino: Field {
                    offset: 0x40,
                    size: 8,
                },
                inode_size: Field {
                    offset: 0x50,
                    size: 8,
                },
                inode_ctime: Field {
                    offset: 0x78,
                    size: 16,
                },
                inode_mtime: Field {
                    offset: 0x68,
                    size: 16,
                },
                node_shift: Field { offset: 0, size: 1 },
                node_slots: Field {
                    offset: 0x28,
                    size: 128,
                },
                page_size: 64,
                vmemmap_base: 0xffff_ffff_816b_1ca0,
            },
            kvm: Some(KvmProfile {
                handle_exit: 0xffff_ffff_8106_ca51,
                vmx_vmexit: 0xffff_ffff_8127_7a0d,
                exit_reason: Field {
                    offset: 0x1a2c,
                    size: 4,
                },
                exit_handlers: 0xffff_ffff_81c4_7940,
                exit_handler_count: 3,
                exit_handler_values: {
                    let mut v = [0; MAX_EXIT_HANDLERS];
                    v[0] = 0xffff_ffff_8106_1000;
                    v[2] = 0xffff_ffff_8106_2000;
                    v
                },
                make_spte: 0xffff_ffff_8104_2b60,
                slot_base_gfn: Field {
                    offset: 0x60,
                    size: 8,
                },
                slot_npages: Field {
                    offset: 0x68,
                    size: 8,
                },
                slot_userspace_addr: Field {
                    offset: 0x98,
                    size: 8,
                },
                mmu_page_role: Field {
                    offset: 0x2c,
                    size: 4,
                },
                commit_memory_region: 0xffff_ffff_8103_5962,
                vcpu_create: 0xffff_ffff_8103_38a2,
                vcpu_destroy: 0xffff_ffff_8103_391b,
                slot_id: Field {
                    offset: 0xa4,
                    size: 2,
                },
                slot_as_id: Field {
                    offset: 0xa6,
                    size: 2,
                },
                slot_flags: Field {
                    offset: 0xa0,
                    size: 4,
                },
                vcpu_kvm: Field { offset: 0, size: 8 },
                vcpu_id: Field {
                    offset: 0x30,
                    size: 4,
                },
                vcpu_vmcs01: Field {
                    offset: 0x1a30,
                    size: 8,
                },
                vcpu_loaded_vmcs: Field {
                    offset: 0x1ad0,
                    size: 8,
                },
                x86_ops: 0xffff_ffff_81d1_5720,
                x86_ops_size: 0x3c8,
            }),
        }
    }

    /// The profile's lines but those that contain any of `what`.
    fn lines_without(text: &str, what: &[&str]) -> std::string::String {
        text.lines()
            .filter(|l| !what.iter().any(|w| l.contains(w)))
            .map(|l| l.to_string() + "\n")
            .collect()
    }

    #[test]
    fn written_profiles_read_back() {
        let text = sample().to_string();
        assert!(text.starts_with("ihmi-linux-profile 10\n"));
        assert_eq!(LinuxProfile::parse(&text), Ok(sample()));
    }

    #[test]
    fn the_io_uring_entries_are_optional_but_come_together() {
        let text = sample().to_string();
        let without = |what: &str| lines_without(&text, &[what]);
        let none = LinuxProfile {
            io_uring: None,
            ..sample()
        };
        assert_eq!(LinuxProfile::parse(&without("io_")), Ok(none));
        assert_eq!(
            LinuxProfile::parse(&without("io_kiocb")),
            Err(ProfileError::Missing("field io_kiocb.opcode"))
        );
        assert_eq!(
            LinuxProfile::parse(&without("io_issue_sqe")),
            Err(ProfileError::Missing("symbol io_issue_sqe"))
        );
    }

    #[test]
    fn the_kvm_entries_are_optional_but_come_together() {
        let text = sample().to_string();
        let without = |what: &str| lines_without(&text, &[what]);
        let none = LinuxProfile {
            kvm: None,
            ..sample()
        };
        assert_eq!(
            LinuxProfile::parse(&lines_without(&text, &["kvm", "vmx_", "make_spte"])),
            Ok(none)
        );
        assert_eq!(
            LinuxProfile::parse(&without("make_spte")),
            Err(ProfileError::Missing("symbol make_spte"))
        );
        assert_eq!(
            LinuxProfile::parse(&without("userspace_addr")),
            Err(ProfileError::MissingField("kvm_memory_slot.userspace_addr"))
        );
        assert_eq!(
            LinuxProfile::parse(&without("kvm_arch_vcpu_postcreate")),
            Err(ProfileError::Missing("symbol kvm_arch_vcpu_postcreate"))
        );
        assert_eq!(
            LinuxProfile::parse(&without("vcpu_id")),
            Err(ProfileError::MissingField("kvm_vcpu.vcpu_id"))
        );
        assert_eq!(
            LinuxProfile::parse(&without("kvm_x86_ops")),
            Err(ProfileError::Missing("object kvm_x86_ops"))
        );
        for size in ["0x3c4", "0", "0x508"] {
            assert_eq!(
                LinuxProfile::parse(&text.replace(
                    "kvm_x86_ops 0xffffffff81d15720 968",
                    &std::format!("kvm_x86_ops 0xffffffff81d15720 {size}")
                )),
                Err(ProfileError::Implausible("object kvm_x86_ops")),
                "{size}"
            );
        }
        assert_eq!(
            LinuxProfile::parse(
                &text.replace("kvm_mmu_page.role 0x2c 4", "kvm_mmu_page.role 0x2c 8")
            ),
            Err(ProfileError::Implausible("kvm_mmu_page.role"))
        );
        assert_eq!(
            LinuxProfile::parse(&without("vmx_handle_exit")),
            Err(ProfileError::Missing("symbol vmx_handle_exit"))
        );
        assert_eq!(
            LinuxProfile::parse(&without("vmx_vmexit")),
            Err(ProfileError::Missing("symbol vmx_vmexit"))
        );
        assert_eq!(
            LinuxProfile::parse(&without("kvm_vmx_exit_handlers")),
            Err(ProfileError::Missing("table kvm_vmx_exit_handlers"))
        );
        let long: std::string::String = (0..=MAX_EXIT_HANDLERS)
            .map(|_| "0x1")
            .collect::<std::vec::Vec<_>>()
            .join(",");
        let too_long = text.replace("0xffffffff81061000,0x0,0xffffffff81062000", &long);
        assert_ne!(too_long, text);
        assert_eq!(
            LinuxProfile::parse(&too_long),
            Err(ProfileError::Implausible("table kvm_vmx_exit_handlers"))
        );
    }

    #[test]
    fn every_entry_is_required_and_checked() {
        let text = sample().to_string();
        let without_comm = lines_without(&text, &[".comm"]);
        assert_eq!(
            LinuxProfile::parse(&without_comm),
            Err(ProfileError::Missing("field task_struct.comm"))
        );
        assert_eq!(LinuxProfile::parse("hello\n"), Err(ProfileError::Header));
        let bad = text.replace("0x4b8 4", "0xzz 4");
        assert!(matches!(
            LinuxProfile::parse(&bad),
            Err(ProfileError::Number(_))
        ));
        let extra = text.replace("flag pti_pgd_pair 1", "flag pti_pgd_pair 1 2");
        assert!(matches!(
            LinuxProfile::parse(&extra),
            Err(ProfileError::Line(_))
        ));
        let without_slots = lines_without(&text, &["xa_node.slots"]);
        assert_eq!(
            LinuxProfile::parse(&without_slots),
            Err(ProfileError::MissingField("xa_node.slots"))
        );
        let odd = text.replace("xa_node.slots 0x28 128", "xa_node.slots 0x28 120");
        assert_eq!(
            LinuxProfile::parse(&odd),
            Err(ProfileError::Implausible("field xa_node.slots"))
        );
        let unknown = text.replace("symbol init_top_pgt", "symbol something_else");
        assert!(matches!(
            LinuxProfile::parse(&unknown),
            Err(ProfileError::Line(_))
        ));
    }

    #[test]
    fn kernel_pgd_of_a_user_cr3() {
        let p = sample();
        // PTI: the user PGD is the second page of the pair, with a PCID in the low bits.
        assert_eq!(p.kernel_pgd(0x0123_5000 | 0x801), 0x0123_4000);
        assert_eq!(p.kernel_pgd(0x0123_4000), 0x0123_4000);
        let no_pti = LinuxProfile {
            pti_pgd_pair: false,
            ..p
        };
        assert_eq!(no_pti.kernel_pgd(0x0123_5003), 0x0123_5000);
    }
}
