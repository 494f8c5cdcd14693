//! `nested-vmxon` (nested VMX, milestone M1): L0 offers this guest VMX, and the guest checks what a
//! hypervisor would before VMXON (CPUID.VMX, IA32_FEATURE_CONTROL, the capability MSRs), then enters
//! and leaves VMX operation, and tries each wrong way the SDM answers differently: VMXON with
//! CR4.VMXE clear and VMXOFF outside VMX operation (#UD), a region without the revision identifier,
//! one in L0's memory and a misaligned one (VMfailInvalid), clearing CR4.VMXE in VMX operation
//! (#GP), VMXON in VMX operation (VMfailInvalid: there is no current VMCS). L0 judges the outcomes
//! it gave (`ihmi_judge::scenario::NESTED_VMXON_STEPS`); the guest checks what it saw.

use ihmi_abi::BootInfo;

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

/// VMXON with the region pointer at `*pointer`, as one 4-byte instruction (`F3 0F C7 30`); returns
/// RFLAGS after it.
fn vmxon(pointer: &u64) -> u64 {
    let rflags: u64;
    // SAFETY: VMXON reads the 8-byte pointer and, on success, enters VMX operation, which L0
    // emulates; it faults (and the handler skips it) or sets RFLAGS. No memory of ours changes.
    unsafe {
        core::arch::asm!(
            "vmxon qword ptr [rax]",
            "pushfq",
            "pop {f}",
            in("rax") core::ptr::from_ref(pointer),
            f = out(reg) rflags,
        );
    }
    rflags
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
    let mut check = |ok: bool, what: &str| {
        say!(
            "testguest: {what}: {}",
            if ok { "as expected" } else { "WRONG" }
        );
        failures += u64::from(!ok);
    };
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
    failures
}
