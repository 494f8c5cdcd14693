//! `nested-vmxon` (nested VMX, milestone M1): L0 offers this guest VMX, and the guest checks what a
//! hypervisor would before VMXON (CPUID.VMX, IA32_FEATURE_CONTROL, the capability MSRs), then enters
//! and leaves VMX operation, and tries each wrong way the SDM answers differently: VMXON with
//! CR4.VMXE clear and VMXOFF outside VMX operation (#UD), a region without the revision identifier,
//! one in L0's memory and a misaligned one (VMfailInvalid), clearing CR4.VMXE in VMX operation
//! (#GP), VMXON in VMX operation (VMfailInvalid: there is no current VMCS). L0 judges the outcomes
//! it gave (`ihmi_judge::scenario::NESTED_VMXON_STEPS`); the guest checks what it saw.

use ihmi_abi::BootInfo;

pub mod mini;

use crate::{idt, rdmsr, say};

const CF: u64 = 1 << 0;
const ZF: u64 = 1 << 6;
const CR4_VMXE: u64 = 1 << 13;
const UD: u64 = 6;
const GP: u64 = 13;

/// Two VMXON regions: one with the revision identifier L0 offers, one without.
#[repr(C, align(4096))]
struct Region(core::cell::UnsafeCell<[u8; 4096]>);
// SAFETY: only `run` touches the regions, once, on the guest's one CPU.
unsafe impl Sync for Region {}
static GOOD: Region = Region(core::cell::UnsafeCell::new([0; 4096]));
static BAD: Region = Region(core::cell::UnsafeCell::new([0; 4096]));

impl Region {
    /// Writes the revision identifier and returns the region's address (the guest's page tables
    /// identity-map its memory, so it is guest-physical too).
    fn prepare(&self, revision: u32) -> u64 {
        // SAFETY: no reference to the region is alive (see `Sync` above).
        unsafe { core::ptr::write_unaligned(self.0.get().cast::<u32>(), revision) };
        self.0.get() as u64
    }
}

/// A check the guest reports on the console ("as expected" or "WRONG"), counting the wrong ones
/// into `failures` (the scenario's exit code).
fn checker(failures: &mut u64) -> impl FnMut(bool, &str) + '_ {
    |ok, what| {
        say!(
            "testguest: {what}: {}",
            if ok { "as expected" } else { "WRONG" }
        );
        *failures += u64::from(!ok);
    }
}

/// VMXOFF (`0F 01 C4`, 3 bytes); returns RFLAGS after it.
fn vmxoff() -> u64 {
    let rflags: u64;
    // SAFETY: VMXOFF leaves VMX operation or faults; no memory changes.
    unsafe { core::arch::asm!("vmxoff", "pushfq", "pop {f}", f = out(reg) rflags) };
    rflags
}

fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 at CPL0 has no effect.
    unsafe { core::arch::asm!("mov {v}, cr4", v = out(reg) v, options(nomem, nostack)) };
    v
}

/// MOV to CR4 from RAX (`0F 22 E0`, 3 bytes).
fn write_cr4(value: u64) {
    // SAFETY: the callers change only CR4.VMXE, which nothing else in the guest depends on.
    unsafe { core::arch::asm!("mov cr4, rax", in("rax") value, options(nostack)) };
}

/// The status flags a VMX instruction left: `Ok` for VMsucceed, `Err(true)` for VMfailInvalid,
/// `Err(false)` for anything else.
fn status(rflags: u64) -> Result<(), bool> {
    match rflags & (CF | ZF) {
        0 => Ok(()),
        CF => Err(true),
        _ => Err(false),
    }
}

pub fn run(info: &BootInfo) -> u64 {
    let mut failures = 0u64;
    let mut check = checker(&mut failures);
    // What a hypervisor checks before VMXON.
    check(
        ihmi_rt::cpu::cpuid(1, 0)[2] & (1 << 5) != 0,
        "CPUID.1:ECX.VMX is set",
    );
    check(
        rdmsr(0x3a) == 5,
        "IA32_FEATURE_CONTROL is locked with VMX on outside SMX",
    );
    let basic = rdmsr(0x480);
    let revision = basic as u32 & 0x7fff_ffff;
    check(
        (basic >> 32) & 0x1fff == 4096 && basic & (1 << 55) != 0,
        "IA32_VMX_BASIC: 4 KiB regions, true controls",
    );
    // Every control MSR: what must be 1 may be 1 (allowed-0 within allowed-1).
    let controls = [0x481, 0x482, 0x483, 0x484, 0x48d, 0x48e, 0x48f, 0x490];
    check(
        controls.iter().all(|&m| {
            let v = rdmsr(m);
            (v as u32) & !((v >> 32) as u32) == 0
        }),
        "every control MSR is well formed",
    );
    // Shadow paging is offered: no secondary controls, so no EPT/VPID capabilities; no VM functions.
    check(
        [0x48b, 0x48c, 0x491].iter().all(|&m| {
            idt::expect_gp(|| {
                let _ = rdmsr(m);
            })
        }),
        "the secondary-control, EPT/VPID and VM-function MSRs do not exist",
    );
    let cr4 = read_cr4();
    check(
        cr4 & CR4_VMXE == 0,
        "CR4.VMXE reads 0 before the guest sets it",
    );

    let (good, bad) = (GOOD.prepare(revision), BAD.prepare(revision ^ 1));
    check(
        idt::expect_fault(UD, 4, || {
            vmxon(&good);
        }),
        "VMXON with CR4.VMXE clear: #UD",
    );
    check(
        idt::expect_fault(UD, 3, || {
            vmxoff();
        }),
        "VMXOFF outside VMX operation: #UD",
    );
    write_cr4(cr4 | CR4_VMXE);
    check(read_cr4() & CR4_VMXE != 0, "CR4.VMXE reads 1 once set");
    check(
        status(vmxon(&bad)) == Err(true),
        "VMXON of a region without the revision identifier: VMfailInvalid",
    );
    let l0_frame = info.probe_gpa & !0xfff;
    check(
        status(vmxon(&l0_frame)) == Err(true),
        "VMXON of a region in L0's memory: VMfailInvalid",
    );
    check(
        status(vmxon(&(good + 8))) == Err(true),
        "VMXON of a misaligned region: VMfailInvalid",
    );
    check(status(vmxon(&good)).is_ok(), "VMXON: VMsucceed");
    check(
        idt::expect_fault(GP, 3, || write_cr4(cr4 & !CR4_VMXE)),
        "clearing CR4.VMXE in VMX operation: #GP",
    );
    check(
        status(vmxon(&good)) == Err(true),
        "VMXON in VMX operation, no current VMCS: VMfailInvalid",
    );
    check(status(vmxoff()).is_ok(), "VMXOFF: VMsucceed");
    check(
        idt::expect_fault(UD, 3, || {
            vmxoff();
        }),
        "VMXOFF again: #UD",
    );
    write_cr4(cr4 & !CR4_VMXE);
    check(
        read_cr4() & CR4_VMXE == 0,
        "CR4.VMXE clears outside VMX operation",
    );
    drop(check);
    failures
}

/// One more region, for a VMCS.
static VMCS: Region = Region(core::cell::UnsafeCell::new([0; 4096]));

/// The VMX instructions on a region pointer at `*pointer` (`vmclear`, `vmptrld`, `vmptrst`); RFLAGS
/// after.
macro_rules! on_pointer {
    ($name:ident, $insn:literal) => {
        fn $name(pointer: &u64) -> u64 {
            let rflags: u64;
            // SAFETY: the instruction reads (VMPTRST: writes) the 8 bytes at `pointer`, which are ours,
            // and changes only the VMX state L0 emulates.
            unsafe {
                core::arch::asm!(
                    concat!($insn, " qword ptr [rax]"),
                    "pushfq",
                    "pop {f}",
                    in("rax") core::ptr::from_ref(pointer),
                    f = out(reg) rflags,
                );
            }
            rflags
        }
    };
}
// VMXON is 4 bytes with RAX as the pointer's register (`F3 0F C7 30`): the #UD checks skip that.
on_pointer!(vmxon, "vmxon");
on_pointer!(vmclear, "vmclear");
on_pointer!(vmptrld, "vmptrld");
on_pointer!(vmptrst, "vmptrst");

/// VMREAD of `field` into a register; (value, RFLAGS).
fn vmread(field: u64) -> (u64, u64) {
    let (value, rflags): (u64, u64);
    // SAFETY: VMREAD writes only its register operand (and RFLAGS).
    unsafe {
        core::arch::asm!(
            "xor eax, eax",
            "vmread rax, rcx",
            "pushfq",
            "pop {f}",
            in("rcx") field,
            out("rax") value,
            f = out(reg) rflags,
        );
    }
    (value, rflags)
}

/// VMREAD of `field` into memory; (value, RFLAGS).
fn vmread_to_memory(field: u64) -> (u64, u64) {
    let mut value = 0u64;
    let rflags: u64;
    // SAFETY: VMREAD stores 8 bytes at `value`, which is ours.
    unsafe {
        core::arch::asm!(
            "vmread qword ptr [rax], rcx",
            "pushfq",
            "pop {f}",
            in("rax") core::ptr::addr_of_mut!(value),
            in("rcx") field,
            f = out(reg) rflags,
        );
    }
    (value, rflags)
}

/// VMLAUNCH (`launch`) or VMRESUME; RFLAGS after it (it fails here: the checks before the entry).
fn vmentry(launch: bool) -> u64 {
    let rflags: u64;
    if launch {
        // SAFETY: a VM entry that fails goes on after the instruction with RFLAGS set; one that
        // passed its checks is not emulated (L0 ends the guest), so nothing returns into a changed
        // state.
        unsafe { core::arch::asm!("vmlaunch", "pushfq", "pop {f}", f = out(reg) rflags) };
    } else {
        // SAFETY: as for VMLAUNCH.
        unsafe { core::arch::asm!("vmresume", "pushfq", "pop {f}", f = out(reg) rflags) };
    }
    rflags
}

/// VMWRITE of `value` into `field`; RFLAGS.
fn vmwrite(field: u64, value: u64) -> u64 {
    let rflags: u64;
    // SAFETY: VMWRITE changes only the current VMCS, which L0 keeps.
    unsafe {
        core::arch::asm!(
            "vmwrite rcx, rax",
            "pushfq",
            "pop {f}",
            in("rcx") field,
            in("rax") value,
            f = out(reg) rflags,
        );
    }
    rflags
}

/// `nested-vmcs` (the first half of milestone M2): in VMX operation, the current VMCS and its fields.
/// L0 judges the outcomes (`ihmi_judge::scenario::NESTED_VMCS_STEPS`); the guest checks the values.
pub fn run_vmcs(info: &BootInfo) -> u64 {
    const GUEST_RIP: u64 = 0x681e;
    const GUEST_CS_SELECTOR: u64 = 0x802;
    const EXIT_REASON: u64 = 0x4402;
    const VM_INSTRUCTION_ERROR: u64 = 0x4400;
    let mut failures = 0u64;
    let mut check = checker(&mut failures);
    let revision = rdmsr(0x480) as u32 & 0x7fff_ffff;
    let (vmxon_region, vmcs, bad) = (
        GOOD.prepare(revision),
        VMCS.prepare(revision),
        BAD.prepare(revision ^ 1),
    );
    write_cr4(read_cr4() | CR4_VMXE);
    check(status(vmxon(&vmxon_region)).is_ok(), "VMXON: VMsucceed");
    check(
        status(vmread(GUEST_RIP).1) == Err(true),
        "VMREAD with no current VMCS: VMfailInvalid",
    );
    let mut stored = 0u64;
    check(
        status(vmptrst(&stored)).is_ok(),
        "VMPTRST with no current VMCS: VMsucceed",
    );
    // SAFETY: `stored` is a local the instruction wrote; read it back as memory.
    stored = unsafe { core::ptr::read_volatile(&stored) };
    check(stored == u64::MAX, "... and it stores all ones");
    check(
        status(vmptrld(&vmxon_region)) == Err(true),
        "VMPTRLD of the VMXON region, no current VMCS: VMfailInvalid",
    );
    check(status(vmptrld(&vmcs)).is_ok(), "VMPTRLD: VMsucceed");
    check(status(vmptrst(&stored)).is_ok(), "VMPTRST: VMsucceed");
    // SAFETY: as above.
    stored = unsafe { core::ptr::read_volatile(&stored) };
    check(stored == vmcs, "... and it stores the current VMCS");
    let failed_with =
        |rflags: u64, n: u64| status(rflags) == Err(false) && vmread(VM_INSTRUCTION_ERROR).0 == n;
    check(
        failed_with(vmptrld(&vmxon_region), 10),
        "VMPTRLD of the VMXON region: VMfailValid(10)",
    );
    check(
        failed_with(vmptrld(&bad), 11),
        "VMPTRLD without the revision identifier: VMfailValid(11)",
    );
    let l0_frame = info.probe_gpa & !0xfff;
    check(
        failed_with(vmptrld(&l0_frame), 9),
        "VMPTRLD of L0's memory: VMfailValid(9)",
    );
    let rip = 0x1234_5678_9abc;
    check(
        status(vmwrite(GUEST_RIP, rip)).is_ok(),
        "VMWRITE guest RIP: VMsucceed",
    );
    let (read_back, rflags) = vmread(GUEST_RIP);
    check(
        read_back == rip && status(rflags).is_ok(),
        "VMREAD guest RIP reads it back",
    );
    check(
        status(vmwrite(GUEST_CS_SELECTOR, 0x1_2345)).is_ok()
            && vmread(GUEST_CS_SELECTOR).0 == 0x2345,
        "a 16-bit field keeps 16 bits",
    );
    check(
        failed_with(vmread(1 << 15).1, 12),
        "VMREAD of an encoding that names no field: VMfailValid(12)",
    );
    check(
        failed_with(vmwrite(EXIT_REASON, 1), 13),
        "VMWRITE of a read-only field: VMfailValid(13)",
    );
    let (to_memory, rflags) = vmread_to_memory(GUEST_RIP);
    check(
        status(rflags).is_ok() && to_memory == rip,
        "VMREAD to memory",
    );
    check(
        status(vmclear(&vmcs)).is_ok(),
        "VMCLEAR of the current VMCS: VMsucceed",
    );
    check(
        status(vmread(GUEST_RIP).1) == Err(true),
        "... it is current no more: VMREAD fails invalid",
    );
    check(status(vmptrld(&vmcs)).is_ok(), "VMPTRLD of it again");
    check(
        vmread(GUEST_RIP).0 == rip,
        "its fields kept their values through VMCLEAR",
    );
    // The checks before a VM entry, on this VMCS12.
    check(
        failed_with(vmentry(false), 5),
        "VMRESUME of a clear VMCS: VMfailValid(5)",
    );
    check(
        failed_with(vmentry(true), 7),
        "VMLAUNCH with every control zero: VMfailValid(7)",
    );
    // The controls as a hypervisor would set them: what each TRUE capability MSR makes 1, and a
    // 64-bit host. The host state stays zero.
    let must = |m: u32| rdmsr(m) & 0xffff_ffff;
    let controls = [
        (0x4000, must(0x48d)),          // pin-based
        (0x4002, must(0x48e)),          // primary processor-based
        (0x400c, must(0x48f) | 1 << 9), // VM-exit, host address-space size
        (0x4012, must(0x490)),          // VM-entry
    ];
    check(
        controls.iter().all(|&(f, v)| status(vmwrite(f, v)).is_ok()),
        "VMWRITE of the four control words",
    );
    check(
        failed_with(vmentry(true), 8),
        "VMLAUNCH with a zero host state: VMfailValid(8)",
    );
    check(
        failed_with(vmclear(&vmxon_region), 3),
        "VMCLEAR of the VMXON region: VMfailValid(3)",
    );
    check(status(vmxoff()).is_ok(), "VMXOFF: VMsucceed");
    write_cr4(read_cr4() & !CR4_VMXE);
    drop(check);
    failures
}
