//! The offered VMX capabilities against Linux 6.1's `kvm_intel`: a replay of what its
//! `setup_vmcs_config` and `hardware_setup` check (arch/x86/kvm/vmx/vmx.c, the masks of vmx.h, as
//! NESTED.md A.1.1-A.1.2 records them), written here from those facts.

extern crate std;

use std::string::String;

use ihmi_arch::msr;
use ihmi_vmcs::VmxCapabilities;

use super::caps::{NestedFeatures, OfferError, VirtualVmx, FEATURE_CONTROL, VMCS12_REVISION};

/// Linux 6.1's required (`min`) and optional (`opt`) controls for x86-64, per capability MSR.
const PIN: (u32, u32) = (0x9, (1 << 5) | (1 << 6) | (1 << 7));
const PROC: (u32, u32) = (
    0x2199_8e8c,
    (1 << 12)
        | (1 << 17)
        | (1 << 21)
        | (1 << 22)
        | (1 << 25)
        | (1 << 27)
        | (1 << 28)
        | (1 << 30)
        | (1 << 31),
);
const PROC2_OPT: u32 = 0b1100_0111_0001_1011_1111_1111_1111_1111;
const EXIT: (u32, u32) = (
    0x8204,
    (1 << 12)
        | (1 << 18)
        | (1 << 19)
        | (1 << 20)
        | (1 << 21)
        | (1 << 22)
        | (1 << 23)
        | (1 << 24)
        | (1 << 25),
);
const ENTRY: (u32, u32) = (
    0x204,
    (1 << 13) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 17) | (1 << 18),
);
/// Entry and exit controls KVM wants both or neither of: perf-global, PAT, EFER, BNDCFGS, RTIT.
const PAIRS: [(u32, u32); 5] = [
    (1 << 13, 1 << 12),
    (1 << 14, 1 << 19),
    (1 << 15, 1 << 21),
    (1 << 16, 1 << 23),
    (1 << 18, 1 << 25),
];
const SECONDARY: u32 = 1 << 31;
const TERTIARY: u32 = 1 << 17;
const PROC2_EPT: u32 = 1 << 1;
const PROC2_VPID: u32 = 1 << 5;

/// What `kvm_intel` ends up using.
#[derive(Debug, PartialEq, Eq)]
struct Kvm61 {
    pin: u32,
    proc: u32,
    proc2: u32,
    exit: u32,
    entry: u32,
    ept: bool,
}

/// `adjust_vmx_controls`: the required and optional bits the MSR allows, plus its default-1 bits;
/// an error if a required one is not allowed. The MSR is read with plain RDMSR: one that faults
/// stops `kvm_intel` too.
fn adjust(what: &'static str, (min, opt): (u32, u32), value: Option<u64>) -> Result<u32, String> {
    let value = value.ok_or(std::format!("RDMSR of the {what} capability faults"))?;
    let (low, high) = (value as u32, (value >> 32) as u32);
    let ctl = ((min | opt) & high) | low;
    if min & !ctl != 0 {
        return Err(std::format!(
            "{what}: required {:#x} not allowed",
            min & !ctl
        ));
    }
    Ok(ctl)
}

/// Whether Linux 6.1's `kvm_intel` loads on a CPU whose VMX MSRs `read` answers (`None`: #GP).
fn kvm61_accepts(read: impl Fn(u32) -> Option<u64>) -> Result<Kvm61, String> {
    // The kernel's feat_ctl.c first: the MSR must read, locked with VMX outside SMX.
    let fc = read(msr::IA32_FEATURE_CONTROL).ok_or("IA32_FEATURE_CONTROL faults")?;
    if fc & 0b101 != 0b101 {
        return Err("VMX disabled in IA32_FEATURE_CONTROL".into());
    }
    let proc = adjust("processor-based", PROC, read(msr::IA32_VMX_PROCBASED_CTLS))?;
    let proc2 = if proc & SECONDARY != 0 {
        adjust(
            "secondary",
            (0, PROC2_OPT),
            read(msr::IA32_VMX_PROCBASED_CTLS2),
        )?
    } else {
        0
    };
    // rdmsr_safe: a fault reads as 0. Capabilities without their control are an error.
    let ept_vpid = read(msr::IA32_VMX_EPT_VPID_CAP).unwrap_or(0);
    if proc2 & PROC2_EPT == 0 && ept_vpid as u32 != 0 {
        return Err("EPT capabilities without the EPT control".into());
    }
    if proc2 & PROC2_VPID == 0 && ept_vpid >> 32 != 0 {
        return Err("VPID capabilities without the VPID control".into());
    }
    if proc & TERTIARY != 0 {
        read(0x492).ok_or("tertiary controls allowed but IA32_VMX_PROCBASED_CTLS3 faults")?;
    }
    let exit = adjust("exit", EXIT, read(msr::IA32_VMX_EXIT_CTLS))?;
    let pin = adjust("pin-based", PIN, read(msr::IA32_VMX_PINBASED_CTLS))?;
    let entry = adjust("entry", ENTRY, read(msr::IA32_VMX_ENTRY_CTLS))?;
    for (n, x) in PAIRS {
        if (entry & n == 0) != (exit & x == 0) {
            return Err(std::format!(
                "entry control {n:#x} and exit control {x:#x} differ"
            ));
        }
    }
    let basic = read(msr::IA32_VMX_BASIC).ok_or("IA32_VMX_BASIC faults")? >> 32;
    if basic & 0x1fff > 4096 || basic & (1 << 16) != 0 || (basic >> 18) & 15 != 6 {
        return Err(std::format!("IA32_VMX_BASIC high half {basic:#x} refused"));
    }
    read(msr::IA32_VMX_MISC).ok_or("IA32_VMX_MISC faults")?;
    // hardware_setup: EPT only with 4-level walks, write-back tables and global INVEPT.
    let ept = proc2 & PROC2_EPT != 0
        && ept_vpid & (1 << 6 | 1 << 14 | 1 << 26) == 1 << 6 | 1 << 14 | 1 << 26;
    Ok(Kvm61 {
        pin,
        proc,
        proc2,
        exit,
        entry,
        ept,
    })
}

/// The mock's host CPU (`crate::mock::vmx_host_caps`).
fn host(overrides: &[(u32, u64)]) -> VmxCapabilities {
    crate::mock::vmx_host_caps(overrides)
}

const BOTH: [NestedFeatures; 2] = [NestedFeatures::ShadowPaging, NestedFeatures::NestedEpt];

#[test]
fn every_offer_is_one_linux_6_1_kvm_loads_on() {
    for features in BOTH {
        let v = VirtualVmx::offer(&host(&[]), features).unwrap();
        let kvm = kvm61_accepts(|i| v.read_msr(i)).unwrap_or_else(|e| panic!("{features:?}: {e}"));
        // What KVM will ask for: exits on external interrupts and NMIs, virtual NMIs, the bitmaps;
        // EPT exactly with nested EPT.
        assert_eq!(kvm.pin & 0x29, 0x29, "{features:?}");
        assert_eq!(kvm.proc & (1 << 25 | 1 << 28), 1 << 25 | 1 << 28);
        assert_eq!(
            kvm.exit & (1 << 15),
            1 << 15,
            "acknowledge interrupt on exit"
        );
        assert_eq!(kvm.ept, features == NestedFeatures::NestedEpt);
        assert_eq!(
            kvm.proc2 & (1 << 13 | 1 << 14),
            0,
            "no VM functions, no VMCS shadowing"
        );
        // VPID exactly with nested EPT, with what hardware_setup keeps it for: INVVPID with the
        // single- or the all-context type.
        let cap = v.read_msr(msr::IA32_VMX_EPT_VPID_CAP).unwrap_or(0);
        let vpid =
            kvm.proc2 & PROC2_VPID != 0 && cap & (1 << 32) != 0 && cap & (1 << 41 | 1 << 42) != 0;
        assert_eq!(vpid, features == NestedFeatures::NestedEpt, "{features:?}");
        assert_eq!(
            kvm.pin & (1 << 6 | 1 << 7),
            0,
            "no posted interrupts, no timer"
        );
    }
}

#[test]
fn invvpid_checks_its_descriptor_by_type() {
    use crate::nested::vmx::invvpid;
    const BAD: u32 = 28;
    let canonical = 0xffff_8000_0000_1000;
    // Individual-address: a VPID and a canonical address.
    assert_eq!(invvpid(0, 5, canonical), Ok(()));
    assert_eq!(invvpid(0, 0, canonical), Err(BAD));
    assert_eq!(invvpid(0, 5, 0x0000_8000_0000_0000), Err(BAD));
    // Single-context (and retaining globals): a VPID, any address.
    for kind in [1, 3] {
        assert_eq!(invvpid(kind, 1, 0x0000_8000_0000_0000), Ok(()));
        assert_eq!(invvpid(kind, 0, 0), Err(BAD));
    }
    // All-context: nothing but the reserved bits.
    assert_eq!(invvpid(2, 0, 0x0000_8000_0000_0000), Ok(()));
    for kind in 0..4 {
        assert_eq!(
            invvpid(kind, 1 << 16 | 1, canonical),
            Err(BAD),
            "bits 63:16"
        );
    }
    assert_eq!(invvpid(4, 1, canonical), Err(BAD));
}

#[test]
fn the_replay_refuses_what_kvm_refuses() {
    // So that the test above can fail: each table is refused for its own reason.
    let v = VirtualVmx::offer(&host(&[]), NestedFeatures::NestedEpt).unwrap();
    let with = |index: u32, value: Option<u64>| {
        move |i: u32| if i == index { value } else { v.read_msr(i) }
    };
    let exit = v.read_msr(msr::IA32_VMX_EXIT_CTLS).unwrap();
    let entry = v.read_msr(msr::IA32_VMX_ENTRY_CTLS).unwrap();
    let basic = v.read_msr(msr::IA32_VMX_BASIC).unwrap();
    let refused = [
        kvm61_accepts(with(msr::IA32_VMX_EXIT_CTLS, Some(exit & !(1 << 47)))), // no ack-interrupt
        kvm61_accepts(with(msr::IA32_VMX_EXIT_CTLS, Some(exit & !(1 << 53)))), // EFER load unpaired
        kvm61_accepts(with(msr::IA32_VMX_ENTRY_CTLS, Some(entry & !(1 << 41)))), // no IA-32e guest
        kvm61_accepts(with(msr::IA32_VMX_PROCBASED_CTLS2, Some(0))), // EPT caps without EPT
        kvm61_accepts(with(msr::IA32_VMX_BASIC, Some(basic & !(0xf << 50)))), // uncacheable VMCS
        kvm61_accepts(with(msr::IA32_VMX_MISC, None)),
        kvm61_accepts(with(msr::IA32_FEATURE_CONTROL, Some(1))), // locked with VMX off
        kvm61_accepts(with(msr::IA32_VMX_PINBASED_CTLS, None)),
    ];
    for (i, r) in refused.iter().enumerate() {
        assert!(r.is_err(), "table {i} accepted: {r:?}");
    }
}

#[test]
fn an_offer_needs_the_controls_it_passes_through() {
    // A CPU without NMI exiting (pin bit 3), or without EPT underneath for nested EPT.
    let no_nmi = host(&[(msr::IA32_VMX_PINBASED_CTLS, 0x0000_0077_0000_0016)]);
    assert_eq!(
        VirtualVmx::offer(&no_nmi, NestedFeatures::ShadowPaging),
        Err(OfferError {
            msr: msr::IA32_VMX_PINBASED_CTLS,
            missing: 1 << 3
        })
    );
    let no_ept = host(&[(msr::IA32_VMX_PROCBASED_CTLS2, 0x0017_b0fd_0000_0000)]);
    assert!(VirtualVmx::offer(&no_ept, NestedFeatures::ShadowPaging).is_ok());
    assert_eq!(
        VirtualVmx::offer(&no_ept, NestedFeatures::NestedEpt)
            .unwrap_err()
            .msr,
        msr::IA32_VMX_PROCBASED_CTLS2
    );
}

#[test]
fn the_msrs_read_as_the_sdm_lays_them_out() {
    for features in BOTH {
        let v = VirtualVmx::offer(&host(&[]), features).unwrap();
        let basic = v.read_msr(msr::IA32_VMX_BASIC).unwrap();
        assert_eq!(basic as u32, VMCS12_REVISION);
        assert_eq!(basic & (1 << 31), 0, "revision bit 31 is 0");
        assert_eq!((basic >> 32) & 0x1fff, 4096);
        assert_ne!(basic & (1 << 55), 0, "TRUE controls");
        assert_eq!(v.read_msr(msr::IA32_FEATURE_CONTROL), Some(FEATURE_CONTROL));
        // Every control MSR: allowed-0 within allowed-1; the TRUE allowed-0 within the other.
        for (plain, true_msr) in [
            (
                msr::IA32_VMX_PINBASED_CTLS,
                msr::IA32_VMX_TRUE_PINBASED_CTLS,
            ),
            (
                msr::IA32_VMX_PROCBASED_CTLS,
                msr::IA32_VMX_TRUE_PROCBASED_CTLS,
            ),
            (msr::IA32_VMX_EXIT_CTLS, msr::IA32_VMX_TRUE_EXIT_CTLS),
            (msr::IA32_VMX_ENTRY_CTLS, msr::IA32_VMX_TRUE_ENTRY_CTLS),
        ] {
            let (p, t) = (v.read_msr(plain).unwrap(), v.read_msr(true_msr).unwrap());
            for value in [p, t] {
                assert_eq!(value as u32 & !((value >> 32) as u32), 0, "{plain:#x}");
            }
            assert_eq!(t as u32 & !(p as u32), 0, "{true_msr:#x}");
            assert_eq!(p >> 32, t >> 32, "{plain:#x}: one allowed-1 set");
        }
        // The MSRs a CPU has only with what they describe: never VM functions; the secondary
        // controls and EPT capabilities only with nested EPT.
        let epted = features == NestedFeatures::NestedEpt;
        assert_eq!(v.read_msr(msr::IA32_VMX_PROCBASED_CTLS2).is_some(), epted);
        assert_eq!(v.read_msr(msr::IA32_VMX_EPT_VPID_CAP).is_some(), epted);
        let proc = v.read_msr(msr::IA32_VMX_PROCBASED_CTLS).unwrap();
        assert_eq!(proc & (1 << 63) != 0, epted);
        assert_eq!(v.read_msr(msr::IA32_VMX_VMFUNC), None);
        assert_eq!(v.read_msr(0x492), None);
        // The fixed CR bits: protected mode, paging and NE in CR0 (no unrestricted guest), VMXE in
        // CR4; VMCS_ENUM names the highest field index L0 knows.
        assert_eq!(v.read_msr(msr::IA32_VMX_CR0_FIXED0), Some(0x8000_0021));
        assert_eq!(v.read_msr(msr::IA32_VMX_CR4_FIXED0), Some(0x2000));
        let max = ihmi_vmcs::fields::ALL
            .iter()
            .map(|f| f.index())
            .max()
            .unwrap();
        assert_eq!(
            v.read_msr(msr::IA32_VMX_VMCS_ENUM),
            Some(u64::from(max) << 1)
        );
    }
}

/// VMX operation as L0 emulates it (milestone M1), against the mock: each wrong way into or out of
/// VMX operation gets the SDM's answer, and the right way changes the state.
mod vmx_operation {
    use super::std::vec::Vec;

    use ihmi_arch::cr::CR4_VMXE;
    use ihmi_vmcs::fields::{control, guest, ro};
    use ihmi_vmcs::{InterruptionInfo, VmxInstruction};

    use super::super::caps::{NestedFeatures, VirtualVmx, VMCS12_REVISION};
    use super::super::vmx::{NestedVmx, VmxOutcome};
    use super::host;
    use crate::mock::{MockPlatform, MockVcpu, L0_HOLE};
    use crate::testing::{hv, platform_with_identity_paging, TestHv};
    use crate::{Action, Alert, Observation, RegionKind};

    const VMXON: u32 = 27;
    const VMXOFF: u32 = 26;
    const VMCLEAR: u32 = 19;
    const VMLAUNCH: u32 = 20;
    const VMPTRLD: u32 = 21;
    const VMPTRST: u32 = 22;
    const VMREAD: u32 = 23;
    const VMWRITE: u32 = 25;
    const INVEPT: u32 = 50;
    const INVVPID: u32 = 53;
    /// A VMCS region.
    const VMCS: u64 = 0x7000;
    const RIP: u64 = 0x10_0000;
    /// Where the operand (the region pointer) is, and the region.
    const OPERAND: u64 = 0x5000;
    const REGION: u64 = 0x6000;
    /// `[rax]`: 64-bit addresses, segment DS, no index, base RAX.
    const INFO_RAX: u64 = (2 << 7) | (3 << 15) | (1 << 22);

    fn nested() -> (TestHv, MockPlatform) {
        let mut h = hv();
        let offer = VirtualVmx::offer(&host(&[]), NestedFeatures::ShadowPaging).unwrap();
        h.hv.nested = Some(NestedVmx::new(offer));
        let mut p = platform_with_identity_paging();
        p.write_bytes(REGION, &VMCS12_REVISION.to_le_bytes());
        p.write_u64(OPERAND, REGION);
        (h, p)
    }

    /// The guest in 64-bit ring 0 with CR4.VMXE set as it sees it, executing `reason` on `[rax]`.
    fn vmx_exit(reason: u32, len: u64) -> MockVcpu {
        let mut v = MockVcpu::exited(reason, RIP, len);
        v.fields.insert(ro::VMEXIT_INSTRUCTION_INFO, INFO_RAX);
        v.fields.insert(guest::IA32_EFER_FULL, 0x500);
        v.fields.insert(guest::CS_ACCESS_RIGHTS, 0xa09b);
        v.fields.insert(guest::CR4, 0x2020 | CR4_VMXE);
        v.fields.insert(control::CR4_GUEST_HOST_MASK, CR4_VMXE);
        v.fields.insert(control::CR4_READ_SHADOW, CR4_VMXE);
        v.regs.rax = OPERAND;
        v
    }

    fn outcomes(h: &TestHv) -> Vec<(VmxInstruction, VmxOutcome)> {
        h.rec
            .seen
            .iter()
            .filter_map(|s| match s {
                crate::mock::Seen::Other(Observation::Vmx {
                    instruction,
                    outcome,
                }) => Some((*instruction, *outcome)),
                _ => None,
            })
            .collect()
    }

    fn injected(v: &MockVcpu) -> Option<u64> {
        v.fields
            .get(&control::VMENTRY_INTERRUPTION_INFO_FIELD)
            .map(|&i| u64::from(InterruptionInfo::from_raw(i as u32).vector()))
    }

    #[test]
    fn successes_are_logged_up_to_a_limit_failures_always() {
        use crate::nested::vmx::LOGGED_SUCCESSES;
        let (mut h, mut p) = nested();
        let mut v = vmx_exit(VMXON, 4);
        h.handle_exit(&mut v, &mut p);
        // VMXON again: VMfailInvalid, then VMXOFF and VMXON, over the limit.
        for _ in 0..LOGGED_SUCCESSES {
            let mut v = vmx_exit(VMXOFF, 3);
            h.handle_exit(&mut v, &mut p);
            let mut v = vmx_exit(VMXON, 4);
            h.handle_exit(&mut v, &mut p);
        }
        let mut v = vmx_exit(VMXON, 4);
        h.handle_exit(&mut v, &mut p);
        let logs = p.logs();
        let vmx = |what: &str| logs.iter().filter(|l| l.contains(what)).count();
        assert_eq!(vmx(": VMsucceed"), LOGGED_SUCCESSES as usize, "{logs:?}");
        assert_eq!(vmx("later successes are counted, not logged"), 1);
        assert_eq!(vmx("Vmxon at 0x100000: VMfailInvalid"), 1, "{logs:?}");
        assert_eq!(outcomes(&h).len(), 2 + 2 * LOGGED_SUCCESSES as usize);
    }

    #[test]
    fn vmxon_and_vmxoff_follow_the_sdm() {
        let (mut h, mut p) = nested();
        // Right: VMsucceed, the status flags clear, past the instruction.
        let mut v = vmx_exit(VMXON, 4);
        v.fields.insert(guest::RFLAGS, 0x202 | 0x8d5);
        assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
        assert_eq!(v.fields[&guest::RFLAGS], 0x202);
        assert_eq!(v.fields[&guest::RIP], RIP + 4);
        assert_eq!(
            h.nested.as_ref().unwrap().vmxon_region(),
            Some(ihmi_addr::Gpa::new(REGION))
        );
        // Again, in VMX operation with no current VMCS: VMfailInvalid (CF alone).
        let mut v = vmx_exit(VMXON, 4);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(v.fields[&guest::RFLAGS], 0x203);
        // VMXOFF leaves; a second one is #UD, the guest left at the instruction.
        let mut v = vmx_exit(VMXOFF, 3);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(h.nested.as_ref().unwrap().vmxon_region(), None);
        let mut v = vmx_exit(VMXOFF, 3);
        h.handle_exit(&mut v, &mut p);
        assert_eq!((injected(&v), v.fields[&guest::RIP]), (Some(6), RIP));
        assert_eq!(
            outcomes(&h),
            [
                (VmxInstruction::Vmxon, VmxOutcome::Succeed),
                (VmxInstruction::Vmxon, VmxOutcome::FailInvalid),
                (VmxInstruction::Vmxoff, VmxOutcome::Succeed),
                (VmxInstruction::Vmxoff, VmxOutcome::Fault { vector: 6 }),
            ]
        );
    }

    #[test]
    fn wrong_vmxons_fault_or_fail_and_an_l0_region_is_an_alert() {
        let (mut h, mut p) = nested();
        let run = |h: &mut TestHv, p: &mut MockPlatform, change: &dyn Fn(&mut MockVcpu)| {
            let mut v = vmx_exit(VMXON, 4);
            change(&mut v);
            h.handle_exit(&mut v, p);
            v
        };
        // CR4.VMXE clear as the guest sees it (the real bit is set): #UD. At CPL 3: #GP(0).
        let v = run(&mut h, &mut p, &|v| {
            v.fields.insert(control::CR4_READ_SHADOW, 0);
        });
        assert_eq!(injected(&v), Some(6));
        let v = run(&mut h, &mut p, &|v| {
            v.fields.insert(guest::SS_ACCESS_RIGHTS, 0xc0f3);
        });
        assert_eq!(injected(&v), Some(13));
        // Misaligned, beyond the address width, L0's, not L0's revision: VMfailInvalid each.
        for (pointer, revision) in [
            (REGION + 8, VMCS12_REVISION),
            (1 << 50, VMCS12_REVISION),
            (L0_HOLE, VMCS12_REVISION),
            (REGION, VMCS12_REVISION ^ 1),
            (REGION, VMCS12_REVISION | 1 << 31),
        ] {
            p.write_u64(OPERAND, pointer);
            p.write_bytes(REGION, &revision.to_le_bytes());
            let v = run(&mut h, &mut p, &|_| {});
            assert_eq!(v.fields[&guest::RFLAGS] & 0x41, 1, "{pointer:#x}");
            assert_eq!(h.nested.as_ref().unwrap().vmxon_region(), None);
        }
        assert_eq!(
            h.rec.alerts(),
            [Alert::VmxRegionRefused {
                gpa: ihmi_addr::Gpa::new(L0_HOLE),
                region: RegionKind::L0,
                rip: RIP,
            }]
        );
        // An operand that does not translate to guest RAM (here: in L0's hole): #GP(0).
        p.write_bytes(REGION, &VMCS12_REVISION.to_le_bytes());
        let v = run(&mut h, &mut p, &|v| v.regs.rax = L0_HOLE + 0x100);
        assert_eq!(injected(&v), Some(13));
    }

    #[test]
    fn outside_vmx_operation_the_vmcs_instructions_fault_and_vmlaunch_checks_before_entering() {
        let (mut h, mut p) = nested();
        let mut v = vmx_exit(VMCLEAR, 4);
        assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
        assert_eq!(injected(&v), Some(6));
        h.handle_exit(&mut vmx_exit(VMXON, 4), &mut p);
        // No EPT, no VPID offered: INVEPT and INVVPID do not exist, in VMX operation too.
        for reason in [INVEPT, INVVPID] {
            let mut v = vmx_exit(reason, 5);
            h.handle_exit(&mut v, &mut p);
            assert_eq!(injected(&v), Some(6));
        }
        // VMLAUNCH with no current VMCS fails invalid; with one whose controls are all zero, valid
        // with error 7; under MOV-SS blocking, 26.
        let mut v = vmx_exit(VMLAUNCH, 3);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(v.fields[&guest::RFLAGS] & 0x41, 1);
        p.write_bytes(VMCS, &VMCS12_REVISION.to_le_bytes());
        p.write_u64(OPERAND, VMCS);
        h.handle_exit(&mut vmx_exit(VMPTRLD, 4), &mut p);
        let mut v = vmx_exit(VMLAUNCH, 3);
        assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
        assert_eq!(v.fields[&guest::RFLAGS] & 0x41, 0x40);
        let mut v = vmx_exit(VMLAUNCH, 3);
        v.fields.insert(guest::INTERRUPTIBILITY_STATE, 0b10);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(
            outcomes(&h).last(),
            Some(&(VmxInstruction::Vmlaunch, VmxOutcome::FailValid(26)))
        );
        // Without nested VMX, every VMX instruction is #UD and nothing is observed.
        let mut plain = hv();
        let mut v = vmx_exit(VMXON, 4);
        assert_eq!(plain.handle_exit(&mut v, &mut p), Action::Resume);
        assert_eq!(injected(&v), Some(6));
        assert!(outcomes(&plain).is_empty());
    }

    /// In VMX operation, with `vmcs` current.
    fn with_current_vmcs() -> (TestHv, MockPlatform) {
        let (mut h, mut p) = nested();
        h.handle_exit(&mut vmx_exit(VMXON, 4), &mut p);
        p.write_bytes(VMCS, &VMCS12_REVISION.to_le_bytes());
        p.write_u64(OPERAND, VMCS);
        h.handle_exit(&mut vmx_exit(VMPTRLD, 4), &mut p);
        assert_eq!(
            h.nested.as_ref().unwrap().current_vmcs(),
            Some(ihmi_addr::Gpa::new(VMCS))
        );
        (h, p)
    }

    /// VMREAD or VMWRITE with the field encoding in RCX (Reg2 = 1) and the value in RDX (Reg1 = 2).
    fn vmread_vmwrite(reason: u32, field: u64, value: u64) -> MockVcpu {
        let mut v = vmx_exit(reason, 3);
        v.fields.insert(
            ro::VMEXIT_INSTRUCTION_INFO,
            (1 << 10) | (2 << 3) | (1 << 28) | (2 << 7),
        );
        v.regs.rcx = field;
        v.regs.rdx = value;
        v
    }

    #[test]
    fn vmread_and_vmwrite_keep_fields_with_their_widths_and_fail_valid_with_the_sdm_s_numbers() {
        let (mut h, mut p) = with_current_vmcs();
        let rip = guest::RIP.raw().into();
        h.handle_exit(&mut vmread_vmwrite(VMWRITE, rip, 0xdead_beef_1234), &mut p);
        let mut v = vmread_vmwrite(VMREAD, rip, 0);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(
            (v.regs.rdx, v.fields[&guest::RFLAGS] & 0x41),
            (0xdead_beef_1234, 0)
        );
        // A 16-bit field keeps 16 bits; the HIGH half of a 64-bit field is bits 63:32.
        let cs = guest::CS_SELECTOR.raw().into();
        h.handle_exit(&mut vmread_vmwrite(VMWRITE, cs, 0x1_2345), &mut p);
        let mut v = vmread_vmwrite(VMREAD, cs, 0);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(v.regs.rdx, 0x2345);
        let link = guest::LINK_PTR_FULL.raw().into();
        h.handle_exit(
            &mut vmread_vmwrite(VMWRITE, link, 0x1111_2222_3333_4444),
            &mut p,
        );
        let mut v = vmread_vmwrite(VMREAD, u64::from(guest::LINK_PTR_HIGH.raw()), 0);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(v.regs.rdx, 0x1111_2222);
        // No such field (12), a read-only one (13), an encoding above 32 bits (12): VMfailValid,
        // the number in the VM-instruction error field.
        let error = |h: &mut TestHv, p: &mut MockPlatform| {
            let f = ro::VM_INSTRUCTION_ERROR.raw().into();
            let mut v = vmread_vmwrite(VMREAD, f, 0);
            h.handle_exit(&mut v, p);
            v.regs.rdx
        };
        for (reason, field, n) in [
            (VMREAD, 1u64 << 15, 12),
            (VMWRITE, ro::EXIT_REASON.raw().into(), 13),
            (VMREAD, rip | 1 << 32, 12),
        ] {
            let mut v = vmread_vmwrite(reason, field, 1);
            h.handle_exit(&mut v, &mut p);
            assert_eq!(v.fields[&guest::RFLAGS] & 0x41, 0x40, "{field:#x}");
            assert_eq!(error(&mut h, &mut p), n, "{field:#x}");
        }
    }

    #[test]
    fn vmptrld_and_vmclear_check_their_pointer_and_the_values_survive_in_the_region() {
        let (mut h, mut p) = with_current_vmcs();
        let rip = guest::RIP.raw().into();
        h.handle_exit(&mut vmread_vmwrite(VMWRITE, rip, 0x4242), &mut p);
        let error = |h: &mut TestHv, p: &mut MockPlatform| {
            let mut v = vmread_vmwrite(VMREAD, ro::VM_INSTRUCTION_ERROR.raw().into(), 0);
            h.handle_exit(&mut v, p);
            v.regs.rdx
        };
        // The VMXON pointer (10 for VMPTRLD, 3 for VMCLEAR), a misaligned one (9, 2), L0's memory (9,
        // with an alert), a region without the revision identifier (11).
        p.write_bytes(REGION + 0x2000, &(VMCS12_REVISION ^ 1).to_le_bytes());
        for (reason, pointer, n) in [
            (VMPTRLD, REGION, 10),
            (VMCLEAR, REGION, 3),
            (VMPTRLD, VMCS + 8, 9),
            (VMCLEAR, VMCS + 8, 2),
            (VMPTRLD, L0_HOLE, 9),
            (VMPTRLD, REGION + 0x2000, 11),
        ] {
            p.write_u64(OPERAND, pointer);
            let mut v = vmx_exit(reason, 4);
            h.handle_exit(&mut v, &mut p);
            assert_eq!(v.fields[&guest::RFLAGS] & 0x41, 0x40, "{pointer:#x}");
            assert_eq!(error(&mut h, &mut p), n, "{pointer:#x}");
        }
        assert_eq!(h.rec.alerts().len(), 1);
        // A region on a page L0 keeps read-only for the guest (a locked kernel page): L0 would
        // write VMCS12 there at VMCLEAR, so both refuse it as an invalid address, with an alert.
        p.write_bytes(REGION + 0x3000, &VMCS12_REVISION.to_le_bytes());
        p.read_only.push(REGION + 0x3000);
        for (reason, n) in [(VMPTRLD, 9), (VMCLEAR, 2)] {
            p.write_u64(OPERAND, REGION + 0x3000);
            let mut v = vmx_exit(reason, 4);
            h.handle_exit(&mut v, &mut p);
            assert_eq!(v.fields[&guest::RFLAGS] & 0x41, 0x40);
            assert_eq!(error(&mut h, &mut p), n);
        }
        assert!(matches!(
            h.rec.alerts().as_slice(),
            [
                _,
                _,
                crate::Alert::VmxRegionRefused {
                    region: RegionKind::GuestRam,
                    ..
                }
            ]
        ));
        // VMCLEAR writes L0's copy into the region; the next VMPTRLD reads it back.
        p.write_u64(OPERAND, VMCS);
        h.handle_exit(&mut vmx_exit(VMCLEAR, 4), &mut p);
        assert_eq!(h.nested.as_ref().unwrap().current_vmcs(), None);
        assert_eq!(
            p.read_u64(VMCS + super::super::vmcs12::SAVED_AT as u64),
            super::super::vmcs12::SAVED_MAGIC
        );
        h.handle_exit(&mut vmx_exit(VMPTRLD, 4), &mut p);
        let mut v = vmread_vmwrite(VMREAD, rip, 0);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(v.regs.rdx, 0x4242);
        // VMPTRST stores the current VMCS.
        p.write_u64(OPERAND, 0);
        h.handle_exit(&mut vmx_exit(VMPTRST, 4), &mut p);
        assert_eq!(p.read_u64(OPERAND), VMCS);
    }

    #[test]
    fn cr4_vmxe_lives_in_the_read_shadow_and_cpuid_and_the_msrs_show_the_offer() {
        let (mut h, mut p) = nested();
        let mov_cr4 = |value: u64| {
            let mut v = MockVcpu::exited(28, RIP, 3); // control-register access
            v.fields.insert(ro::EXIT_QUALIFICATION, 4); // MOV to CR4 from RAX
            v.fields.insert(guest::CR4, 0x2020);
            v.fields.insert(control::CR4_GUEST_HOST_MASK, CR4_VMXE);
            v.regs.rax = value;
            v
        };
        p.msrs.insert(ihmi_arch::msr::IA32_VMX_CR4_FIXED1, 0x3727ff);
        let mut v = mov_cr4(0x20 | CR4_VMXE);
        assert_eq!(h.handle_exit(&mut v, &mut p), Action::Resume);
        assert_eq!(v.fields[&guest::CR4], 0x20 | CR4_VMXE);
        assert_eq!(v.fields[&control::CR4_READ_SHADOW], 0x20 | CR4_VMXE);
        assert_eq!(v.fields[&guest::RIP], RIP + 3);
        // Clearing it keeps the real bit; a bit the CPU does not allow is #GP.
        let mut v = mov_cr4(0x20);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(v.fields[&guest::CR4], 0x20 | CR4_VMXE);
        assert_eq!(v.fields[&control::CR4_READ_SHADOW], 0x20);
        let mut v = mov_cr4(0x20 | 1 << 30);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(injected(&v), Some(13));
        // In VMX operation, clearing it is #GP.
        h.handle_exit(&mut vmx_exit(VMXON, 4), &mut p);
        let mut v = mov_cr4(0x20);
        h.handle_exit(&mut v, &mut p);
        assert_eq!(injected(&v), Some(13));
        // CPUID.1:ECX.VMX, IA32_FEATURE_CONTROL and the capability MSRs from the offer.
        let mut v = MockVcpu::exited(10, RIP, 2);
        v.regs.rax = 1;
        h.handle_exit(&mut v, &mut p);
        assert_ne!(v.regs.rcx & (1 << 5), 0);
        for (msr, value) in [
            (0x3a, Some(5)),
            (0x480, h.nested.as_ref().unwrap().offer().read_msr(0x480)),
            (0x48b, None),
        ] {
            let mut v = MockVcpu::exited(31, RIP, 2);
            v.regs.rcx = msr;
            h.handle_exit(&mut v, &mut p);
            match value {
                Some(x) => assert_eq!((v.regs.rdx << 32) | v.regs.rax, x, "{msr:#x}"),
                None => assert_eq!(injected(&v), Some(13), "{msr:#x}"),
            }
        }
    }
}

/// What VMLAUNCH and VMRESUME check before the entry: a VMCS12 a hypervisor would write passes, and
/// breaking any one rule gives that rule's refusal.
mod entry_checks {
    use ihmi_arch::msr;
    use ihmi_vmcs::fields::{control, host};
    use ihmi_vmcs::VmcsField;

    use super::super::caps::{NestedFeatures, VirtualVmx};
    use super::super::entry::{check, EntryRefusal};
    use super::super::vmcs12::Vmcs12;
    use super::host as host_caps;

    fn offer() -> VirtualVmx {
        VirtualVmx::offer(&host_caps(&[]), NestedFeatures::ShadowPaging).unwrap()
    }

    /// The least every control word must set, a 64-bit host that L1's own state would be.
    fn good(offer: &VirtualVmx) -> Vmcs12 {
        let must = |m: u32| offer.read_msr(m).unwrap() & 0xffff_ffff;
        let mut v = Vmcs12::default();
        for (f, value) in [
            (
                control::PINBASED_EXEC_CONTROLS,
                must(msr::IA32_VMX_TRUE_PINBASED_CTLS),
            ),
            (
                control::PRIMARY_PROCBASED_EXEC_CONTROLS,
                must(msr::IA32_VMX_TRUE_PROCBASED_CTLS),
            ),
            (
                control::VMEXIT_CONTROLS,
                must(msr::IA32_VMX_TRUE_EXIT_CTLS) | 1 << 9,
            ),
            (
                control::VMENTRY_CONTROLS,
                must(msr::IA32_VMX_TRUE_ENTRY_CTLS),
            ),
            (host::CR0, 0x8000_0031),
            (host::CR4, 0x2020),
            (host::CR3, 0x1000),
            (host::CS_SELECTOR, 0x10),
            (host::SS_SELECTOR, 0x18),
            (host::TR_SELECTOR, 0x28),
            (host::RIP, 0xffff_ffff_8100_0000),
            (host::GS_BASE, 0xffff_8880_0000_0000),
            (control::VMEXIT_MSR_STORE_COUNT, 1),
            (control::VMEXIT_MSR_STORE_ADDR_FULL, 0x2000),
        ] {
            v.write(f, value).unwrap();
        }
        v
    }

    #[test]
    fn a_hypervisor_s_vmcs_passes_and_each_broken_rule_is_refused_with_its_number() {
        let o = offer();
        let v = good(&o);
        assert_eq!(check(&v, &o, true, true), Ok(()));
        assert_eq!(
            check(&v, &o, false, true).map_err(EntryRefusal::instruction_error),
            Err(5),
            "VMRESUME of a clear VMCS"
        );
        let mut launched = v.clone();
        launched.launched = true;
        assert_eq!(
            check(&launched, &o, true, true).map_err(EntryRefusal::instruction_error),
            Err(4)
        );
        assert_eq!(check(&launched, &o, false, true), Ok(()));
        let broken = |f: VmcsField, value: u64| {
            let mut b = v.clone();
            b.write(f, value).unwrap();
            check(&b, &o, true, true).map_err(EntryRefusal::instruction_error)
        };
        let pin = v.read(control::PINBASED_EXEC_CONTROLS).unwrap();
        let proc = v.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS).unwrap();
        for (f, value, n) in [
            // Controls (7): a default-1 bit clear, a bit the offer does not allow, virtual NMIs
            // without NMI exiting, secondary controls (not offered), an unaligned MSR area, an
            // injected event of a reserved type and an NMI that is not vector 2.
            (control::PINBASED_EXEC_CONTROLS, 0, 7),
            (control::PINBASED_EXEC_CONTROLS, pin | 1 << 30, 7),
            (control::PINBASED_EXEC_CONTROLS, pin | 1 << 5, 7),
            (control::PRIMARY_PROCBASED_EXEC_CONTROLS, proc | 1 << 31, 7),
            (control::VMEXIT_MSR_STORE_ADDR_FULL, 0x2008, 7),
            (
                control::VMENTRY_INTERRUPTION_INFO_FIELD,
                1 << 31 | 1 << 8,
                7,
            ),
            (
                control::VMENTRY_INTERRUPTION_INFO_FIELD,
                1 << 31 | 2 << 8 | 3,
                7,
            ),
            (
                control::VMENTRY_INTERRUPTION_INFO_FIELD,
                1 << 31 | 3 << 8 | 13,
                7,
            ),
            // Host state (8): CR0 without PG, CR4 without VMXE, a wide CR3, a selector with RPL, a
            // null TR, a non-canonical base or RIP, a 32-bit host for a 64-bit L1.
            (host::CR0, 0x31, 8),
            (host::CR4, 0x20, 8),
            (host::CR3, 1 << 50, 8),
            (host::CS_SELECTOR, 0x13, 8),
            (host::TR_SELECTOR, 0, 8),
            (host::GS_BASE, 0x0000_8000_0000_0000, 8),
            (host::RIP, 0x0001_0000_0000_0000, 8),
            (
                control::VMEXIT_CONTROLS,
                v.read(control::VMEXIT_CONTROLS).unwrap() & !(1 << 9),
                8,
            ),
        ] {
            assert_eq!(broken(f, value), Err(n), "{f} = {value:#x}");
        }
        // A #GP injected with its error code is a valid event.
        let mut gp = v.clone();
        gp.write(
            control::VMENTRY_INTERRUPTION_INFO_FIELD,
            1 << 31 | 1 << 11 | 3 << 8 | 13,
        )
        .unwrap();
        assert_eq!(check(&gp, &o, true, true), Ok(()));
    }

    #[test]
    fn vpid_comes_with_nested_ept_and_needs_a_nonzero_vpid() {
        let o = VirtualVmx::offer(&host_caps(&[]), NestedFeatures::NestedEpt).unwrap();
        let mut v = good(&o);
        let proc = v.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS).unwrap();
        v.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, proc | 1 << 31)
            .unwrap();
        v.write(control::SECONDARY_PROCBASED_EXEC_CONTROLS, 1 << 5)
            .unwrap();
        assert_eq!(
            check(&v, &o, true, true).map_err(EntryRefusal::instruction_error),
            Err(7),
            "VPID 0"
        );
        v.write(control::VPID, 1).unwrap();
        assert_eq!(check(&v, &o, true, true), Ok(()));
        // Without nested EPT there are no secondary controls to turn it on with.
        let shadow = offer();
        assert_eq!(
            check(&v, &shadow, true, true).map_err(EntryRefusal::instruction_error),
            Err(7)
        );
    }
}

/// Running L2 (milestone M2): the guest-state checks, VMCS02 as the merge of VMCS12 and L0's
/// controls, whose each exit from L2 is, and the whole path through the hypervisor against the mock:
/// VMLAUNCH, an entry, a reflected exit, L1 back at its host state, an exit L0 keeps.
mod running_l2 {
    use super::std::vec::Vec;

    use ihmi_arch::cr::CR4_VMXE;
    use ihmi_vmcs::fields::{control, guest, host, ro};
    use ihmi_vmcs::{ExitReason, VmcsField};

    use super::super::caps::{NestedFeatures, VirtualVmx, VMCS12_REVISION};
    use super::super::entry::check_guest_state;
    use super::super::l2::{load_l1_host_state, owner, write_vmcs02, L0Controls, Owner};
    use super::super::vmcs12::Vmcs12;
    use super::super::vmx::NestedVmx;
    use super::host as host_caps;
    use crate::mock::{MockPlatform, MockVcpu};
    use crate::testing::{hv, platform_with_identity_paging};
    use crate::{Action, NestedSwitch, Observation, Platform, Vcpu};

    fn offer() -> VirtualVmx {
        VirtualVmx::offer(&host_caps(&[]), NestedFeatures::ShadowPaging).unwrap()
    }

    const L2_RIP: u64 = 0x40_0000;
    const HOST_RIP: u64 = 0x20_0000;

    /// A VMCS12 a tiny hypervisor writes: valid controls, its own 64-bit state as host state, and a
    /// 64-bit L2 at `L2_RIP` sharing its tables.
    fn vmcs12(offer: &VirtualVmx) -> Vmcs12 {
        let must = |m: u32| offer.read_msr(m).unwrap() & 0xffff_ffff;
        let mut v = Vmcs12::default();
        let fields: &[(VmcsField, u64)] = &[
            (
                control::PINBASED_EXEC_CONTROLS,
                must(ihmi_arch::msr::IA32_VMX_TRUE_PINBASED_CTLS),
            ),
            (
                control::PRIMARY_PROCBASED_EXEC_CONTROLS,
                must(ihmi_arch::msr::IA32_VMX_TRUE_PROCBASED_CTLS) | 1 << 25,
            ),
            (control::IO_BITMAP_A_ADDR_FULL, 0x8000),
            (control::IO_BITMAP_B_ADDR_FULL, 0x9000),
            (control::EXCEPTION_BITMAP, 1 << 3),
            (
                control::VMEXIT_CONTROLS,
                must(ihmi_arch::msr::IA32_VMX_TRUE_EXIT_CTLS) | 1 << 9 | 1 << 20 | 1 << 21,
            ),
            (
                control::VMENTRY_CONTROLS,
                must(ihmi_arch::msr::IA32_VMX_TRUE_ENTRY_CTLS) | 1 << 9 | 1 << 15,
            ),
            (host::CR0, 0x8000_0031),
            (host::CR4, 0x2020),
            (host::CR3, 0x1000),
            (host::CS_SELECTOR, 0x8),
            (host::SS_SELECTOR, 0x10),
            (host::DS_SELECTOR, 0x10),
            (host::TR_SELECTOR, 0x28),
            (host::TR_BASE, 0x5000),
            (host::GDTR_BASE, 0x4000),
            (host::IDTR_BASE, 0x4800),
            (host::IA32_EFER_FULL, 0x500),
            (host::RIP, HOST_RIP),
            (host::RSP, 0x20_8000),
            (guest::CR0, 0x8000_0031),
            (guest::CR4, 0x2020),
            (guest::CR3, 0x1000),
            (guest::IA32_EFER_FULL, 0x500),
            (guest::CS_SELECTOR, 0x8),
            (guest::CS_ACCESS_RIGHTS, 0xa09b),
            (guest::CS_LIMIT, 0xffff_ffff),
            (guest::SS_SELECTOR, 0x10),
            (guest::SS_ACCESS_RIGHTS, 0xc093),
            (guest::SS_LIMIT, 0xffff_ffff),
            (guest::DS_SELECTOR, 0x10),
            (guest::DS_ACCESS_RIGHTS, 0xc093),
            (guest::DS_LIMIT, 0xffff_ffff),
            (guest::ES_ACCESS_RIGHTS, 1 << 16),
            (guest::FS_ACCESS_RIGHTS, 1 << 16),
            (guest::GS_ACCESS_RIGHTS, 1 << 16),
            (guest::LDTR_ACCESS_RIGHTS, 1 << 16),
            (guest::TR_SELECTOR, 0x28),
            (guest::TR_ACCESS_RIGHTS, 0x8b),
            (guest::TR_LIMIT, 0x67),
            (guest::TR_BASE, 0x5000),
            (guest::GDTR_BASE, 0x4000),
            (guest::GDTR_LIMIT, 0x37),
            (guest::IDTR_BASE, 0x4800),
            (guest::IDTR_LIMIT, 0x1ff),
            (guest::RIP, L2_RIP),
            (guest::RSP, 0x41_0000),
            (guest::RFLAGS, 0x2),
            (guest::DR7, 0x400),
            (guest::LINK_PTR_FULL, u64::MAX),
        ];
        for &(f, value) in fields {
            v.write(f, value).unwrap();
        }
        v
    }

    #[test]
    fn a_64_bit_l2_passes_the_guest_state_checks_and_each_broken_rule_fails() {
        let o = offer();
        let v = vmcs12(&o);
        assert_eq!(check_guest_state(&v, &o), Ok(()));
        let broken = |f: VmcsField, value: u64| {
            let mut b = v.clone();
            b.write(f, value).unwrap();
            check_guest_state(&b, &o)
        };
        for (f, value) in [
            (guest::CR0, 0x31),                         // PG clear (fixed0)
            (guest::CR4, 0x20),                         // VMXE clear (fixed0)
            (guest::CR3, 1 << 50),                      // beyond the address width
            (guest::CS_ACCESS_RIGHTS, 1 << 16),         // CS unusable
            (guest::CS_ACCESS_RIGHTS, 0xe09b),          // L and D both set
            (guest::SS_ACCESS_RIGHTS, 0xc09b),          // SS a code segment
            (guest::TR_ACCESS_RIGHTS, 0x89),            // TSS not busy
            (guest::TR_ACCESS_RIGHTS, 1 << 16),         // TR unusable
            (guest::LDTR_ACCESS_RIGHTS, 0x82 | 1 << 4), // an LDT with S set
            (guest::CS_LIMIT, 0xfff0_0000),             // a limit the G bit cannot give
            (guest::RIP, 0x0000_8000_0000_0000),        // non-canonical
            (guest::RFLAGS, 0x0),                       // bit 1 clear
            (guest::RFLAGS, 0x2 | 1 << 15),             // reserved
            (guest::RFLAGS, 0x2 | 1 << 17),             // VM in IA-32e mode
            (guest::IA32_EFER_FULL, 0x100),             // LMA clear for an IA-32e guest
            (guest::GDTR_BASE, 0x0000_8000_0000_0000),
            (guest::IDTR_LIMIT, 0x1_0000),
            (guest::ACTIVITY_STATE, 4),
            (guest::INTERRUPTIBILITY_STATE, 0b11), // STI and MOV SS
            (guest::INTERRUPTIBILITY_STATE, 0b1),  // STI with IF clear
            (guest::INTERRUPTIBILITY_STATE, 1 << 5),
            (guest::PENDING_DBG_EXCEPTIONS, 1 << 13),
            (guest::LINK_PTR_FULL, 0x7000),
        ] {
            assert!(broken(f, value).is_err(), "{f} = {value:#x} passed");
        }
        // An external interrupt injected into an L2 with IF clear.
        assert!(broken(control::VMENTRY_INTERRUPTION_INFO_FIELD, 1 << 31 | 0x30).is_err());
    }

    fn l0_controls() -> L0Controls {
        L0Controls {
            pin: 1 << 6,                                   // VMX-preemption timer
            primary: 1 << 7 | 1 << 25 | 1 << 28 | 1 << 31, // HLT, I/O and MSR bitmaps, secondary
            secondary: 1 << 1 | 1 << 13,                   // EPT, VM functions
            exit: 1 << 9 | 1 << 15 | 1 << 20 | 1 << 21,    // 64-bit host, ack, EFER
            entry: 1 << 9 | 1 << 14 | 1 << 15,             // IA-32e, PAT, EFER
            exceptions: 1 << 3,
            eptp: 0xabc0_001e,
            cr0_mask: 0,
            cr4_mask: CR4_VMXE,
            tsc_offset: 100,
            preemption_timer: 5000,
            l1_efer: 0xd01,
            l1_pat: 0x0007_0406_0007_0406,
            l1_dr7: 0x400,
            l1_debugctl: 0,
        }
    }

    fn written(v: &MockVcpu, f: VmcsField) -> u64 {
        v.fields
            .get(&f)
            .copied()
            .unwrap_or_else(|| panic!("{f} not written"))
    }

    #[test]
    fn vmcs02_is_vmcs12_s_guest_state_with_l0_s_controls_merged_in() {
        let o = offer();
        let mut v = vmcs12(&o);
        v.write(control::EXCEPTION_BITMAP, 1 << 6).unwrap();
        v.write(control::CR4_GUEST_HOST_MASK, 0x20).unwrap(); // L1 owns PAE
        v.write(control::CR4_READ_SHADOW, 0x20).unwrap();
        v.write(
            control::VMENTRY_INTERRUPTION_INFO_FIELD,
            1 << 31 | 3 << 8 | 3,
        )
        .unwrap();
        let mut vcpu = MockVcpu::default();
        write_vmcs02(&v, &l0_controls(), None, &mut vcpu);
        assert_eq!(written(&vcpu, guest::RIP), L2_RIP);
        assert_eq!(written(&vcpu, guest::CR3), 0x1000);
        assert_eq!(written(&vcpu, guest::CR4), 0x2020 | CR4_VMXE);
        assert_eq!(
            written(&vcpu, guest::IA32_EFER_FULL),
            0x500,
            "VMCS12 loads EFER"
        );
        assert_eq!(written(&vcpu, guest::LINK_PTR_FULL), u64::MAX);
        let primary = written(&vcpu, control::PRIMARY_PROCBASED_EXEC_CONTROLS);
        assert_ne!(primary & 1 << 24, 0, "unconditional I/O exiting");
        assert_eq!(primary & (1 << 25 | 1 << 28), 0, "no I/O or MSR bitmaps");
        assert_ne!(primary & 1 << 7, 0, "L0's HLT exiting stays");
        let secondary = written(&vcpu, control::SECONDARY_PROCBASED_EXEC_CONTROLS);
        assert_eq!(secondary, 1 << 1, "EPT, never VM functions");
        assert_eq!(written(&vcpu, control::EPTP_FULL), 0xabc0_001e);
        assert_eq!(written(&vcpu, control::EXCEPTION_BITMAP), 1 << 3 | 1 << 6);
        assert_eq!(
            written(&vcpu, control::CR4_GUEST_HOST_MASK),
            0x20 | CR4_VMXE
        );
        // PAE from L1's shadow, VMXE (L0's only) as L2 has it.
        assert_eq!(written(&vcpu, control::CR4_READ_SHADOW), 0x20 | CR4_VMXE);
        assert_eq!(written(&vcpu, guest::VMX_PREEMPTION_TIMER_VALUE), 5000);
        assert_eq!(written(&vcpu, control::TSC_OFFSET_FULL), 100);
        let exit = written(&vcpu, control::VMEXIT_CONTROLS);
        assert_eq!(exit & 1 << 15, 0, "no acknowledge-on-exit unless L1 asks");
        assert_ne!(written(&vcpu, control::VMENTRY_CONTROLS) & 1 << 9, 0);
        assert_eq!(
            written(&vcpu, control::VMENTRY_INTERRUPTION_INFO_FIELD),
            1 << 31 | 3 << 8 | 3,
            "L1's event is injected"
        );
        // Without L1's "load IA32_EFER", L2 keeps L1's with LMA and LME from the IA-32e control.
        let mut no_efer = v.clone();
        let entry = no_efer.read(control::VMENTRY_CONTROLS).unwrap();
        no_efer
            .write(control::VMENTRY_CONTROLS, entry & !(1 << 15))
            .unwrap();
        let mut vcpu = MockVcpu::default();
        write_vmcs02(&no_efer, &l0_controls(), None, &mut vcpu);
        assert_eq!(written(&vcpu, guest::IA32_EFER_FULL), 0xd01);
        assert_eq!(written(&vcpu, guest::IA32_PAT_FULL), 0x0007_0406_0007_0406);
    }

    #[test]
    fn l1_gets_its_host_state_back() {
        let v = vmcs12(&offer());
        let mut vcpu = MockVcpu::default();
        vcpu.fields
            .insert(control::VMENTRY_CONTROLS, 1 << 9 | 1 << 15);
        vcpu.fields.insert(guest::INTERRUPTIBILITY_STATE, 0b1011);
        load_l1_host_state(&v, &mut vcpu);
        for (f, value) in [
            (guest::RIP, HOST_RIP),
            (guest::RSP, 0x20_8000),
            (guest::RFLAGS, 0x2),
            (guest::CR3, 0x1000),
            (guest::CR4, 0x2020),
            (guest::IA32_EFER_FULL, 0x500),
            (guest::CS_SELECTOR, 0x8),
            (guest::CS_ACCESS_RIGHTS, 0xa09b),
            (guest::SS_ACCESS_RIGHTS, 0xc093),
            (guest::ES_ACCESS_RIGHTS, 1 << 16), // a null selector: unusable
            (guest::TR_BASE, 0x5000),
            (guest::TR_ACCESS_RIGHTS, 0x8b),
            (guest::GDTR_LIMIT, 0xffff),
            (guest::IDTR_BASE, 0x4800),
            (guest::DR7, 0x400),
            (guest::INTERRUPTIBILITY_STATE, 0b1000), // only NMI blocking survives
            (control::VMENTRY_INTERRUPTION_INFO_FIELD, 0),
        ] {
            assert_eq!(written(&vcpu, f), value, "{f}");
        }
    }

    /// An exit from L2 as the CPU reports it.
    fn l2_exit(reason: u32) -> MockVcpu {
        MockVcpu::exited(reason, L2_RIP, 2)
    }

    #[test]
    fn each_exit_from_l2_goes_where_the_sdm_and_l1_s_controls_say() {
        let o = offer();
        let v = vmcs12(&o);
        let mut p = MockPlatform::default();
        p.write_bytes(0x8000 + 0x80 / 8, &[1]); // port 0x80 in L1's bitmap A
        let read_l1 = |p: &dyn Platform, at: u64| {
            let mut b = [0u8];
            p.read_guest(ihmi_addr::Gpa::new(at), &mut b)
                .ok()
                .map(|()| b[0])
        };
        let whose = |vcpu: &mut MockVcpu, v: &Vmcs12, p: &MockPlatform| {
            let exit = vcpu.exit();
            owner(&exit, v, vcpu, p, read_l1)
        };
        // Exceptions: #BP is in L1's bitmap, #UD is not (L0's bitmap took it).
        let mut e = l2_exit(0);
        e.fields.insert(ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0603);
        assert_eq!(whose(&mut e, &v, &p), Owner::L1);
        e.fields.insert(ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0306);
        assert_eq!(whose(&mut e, &v, &p), Owner::L0);
        // #PF: bit clear, so exits whose error code does not match (mask 1, match 1: not-present).
        let mut pf = v.clone();
        pf.write(control::PAGE_FAULT_ERR_CODE_MASK, 1).unwrap();
        pf.write(control::PAGE_FAULT_ERR_CODE_MATCH, 1).unwrap();
        e.fields.insert(ro::VMEXIT_INTERRUPTION_INFO, 0x8000_0b0e);
        e.fields.insert(ro::VMEXIT_INTERRUPTION_ERR_CODE, 0);
        assert_eq!(whose(&mut e, &pf, &p), Owner::L1);
        e.fields.insert(ro::VMEXIT_INTERRUPTION_ERR_CODE, 1);
        assert_eq!(whose(&mut e, &pf, &p), Owner::L0);
        // Port I/O: 1 byte IN from 0x80 is in the bitmap, 0x61 is not; a word at 0x7f covers 0x80.
        let mut io = l2_exit(30);
        io.fields
            .insert(ro::EXIT_QUALIFICATION, 0x80 << 16 | 1 << 3);
        assert_eq!(whose(&mut io, &v, &p), Owner::L1);
        io.fields
            .insert(ro::EXIT_QUALIFICATION, 0x61 << 16 | 1 << 3);
        assert_eq!(whose(&mut io, &v, &p), Owner::L0);
        io.fields
            .insert(ro::EXIT_QUALIFICATION, 0x7f << 16 | 1 << 3 | 1);
        assert_eq!(whose(&mut io, &v, &p), Owner::L1);
        // Without MSR bitmaps every MSR access is L1's; with them, the bit decides.
        let mut rdmsr = l2_exit(31);
        rdmsr.regs.rcx = 0x10;
        assert_eq!(whose(&mut rdmsr, &v, &p), Owner::L1);
        let mut bitmaps = v.clone();
        let proc = bitmaps
            .read(control::PRIMARY_PROCBASED_EXEC_CONTROLS)
            .unwrap();
        bitmaps
            .write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, proc | 1 << 28)
            .unwrap();
        bitmaps
            .write(control::MSR_BITMAPS_ADDR_FULL, 0xa000)
            .unwrap();
        assert_eq!(whose(&mut rdmsr, &bitmaps, &p), Owner::L0);
        p.write_bytes(0xa000 + 2, &[1]); // read bit of MSR 0x10
        assert_eq!(whose(&mut rdmsr, &bitmaps, &p), Owner::L1);
        rdmsr.regs.rcx = 0x4000_0000; // outside both ranges
        assert_eq!(whose(&mut rdmsr, &bitmaps, &p), Owner::L1);
        // HLT is L1's only with its HLT exiting.
        assert_eq!(whose(&mut l2_exit(12), &v, &p), Owner::L0);
        // MOV to CR4 changing a bit L1 masks (PAE) is L1's; one only L0 masks is L0's.
        let mut cr = v.clone();
        cr.write(control::CR4_GUEST_HOST_MASK, 0x20).unwrap();
        cr.write(control::CR4_READ_SHADOW, 0x20).unwrap();
        let mut mov = l2_exit(28);
        mov.fields.insert(ro::EXIT_QUALIFICATION, 4); // MOV to CR4 from RAX
        mov.regs.rax = 0x0;
        assert_eq!(whose(&mut mov, &cr, &p), Owner::L1);
        mov.regs.rax = 0x20 | CR4_VMXE;
        assert_eq!(whose(&mut mov, &cr, &p), Owner::L0);
        // Always L1's: CPUID, VMCALL, the VMX instructions, triple fault. Always L0's: its EPT and
        // its timer.
        for reason in [10, 18, 19, 20, 24, 2] {
            assert_eq!(
                whose(&mut l2_exit(reason), &v, &p),
                Owner::L1,
                "reason {reason}"
            );
        }
        for reason in [48, 49, 52] {
            assert_eq!(
                whose(&mut l2_exit(reason), &v, &p),
                Owner::L0,
                "reason {reason}"
            );
        }
    }

    /// The hypervisor with nested VMX, L1 in VMX operation with `vmcs12` current.
    fn in_vmx_operation(v: Vmcs12) -> (crate::testing::TestHv, MockPlatform) {
        let mut h = hv();
        let mut n = NestedVmx::new(offer());
        n.test_make_current(ihmi_addr::Gpa::new(0x7000), v);
        h.hv.nested = Some(n);
        let mut p = platform_with_identity_paging();
        p.write_bytes(0x7000, &VMCS12_REVISION.to_le_bytes());
        (h, p)
    }

    /// L1's VMLAUNCH, in 64-bit ring 0 with CR4.VMXE set.
    fn vmlaunch() -> MockVcpu {
        let mut v = MockVcpu::exited(20, 0x10_0000, 3);
        v.fields.insert(guest::IA32_EFER_FULL, 0x500);
        v.fields.insert(guest::CS_ACCESS_RIGHTS, 0xa09b);
        v.fields.insert(guest::CR4, 0x2020 | CR4_VMXE);
        v.fields.insert(control::CR4_GUEST_HOST_MASK, CR4_VMXE);
        v.fields.insert(control::CR4_READ_SHADOW, CR4_VMXE);
        v.fields.insert(control::EPTP_FULL, 0xabc0_001e);
        v
    }

    /// The guest was stopped at an EPT violation in L0's memory.
    fn assert_ended_in_l0_memory(action: &Action) {
        assert!(
            matches!(
                action,
                Action::End(crate::GuestEnd::EptViolation {
                    region: Some(crate::RegionKind::L0),
                    ..
                })
            ),
            "{action:?}"
        );
    }

    /// L1's VMRESUME, in 64-bit ring 0 with CR4.VMXE set.
    fn vmresume() -> MockVcpu {
        let mut v = vmlaunch();
        v.fields.insert(ro::EXIT_REASON, 24);
        v
    }

    fn l2_observations(h: &crate::testing::TestHv) -> Vec<Observation<'static>> {
        h.rec
            .seen
            .iter()
            .filter_map(|s| match s {
                crate::mock::Seen::Other(
                    o @ (Observation::L2Entry { .. } | Observation::L2Exit { .. }),
                ) => Some(*o),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn vmlaunch_enters_l2_a_cpuid_goes_back_to_l1_and_an_exit_l0_keeps_stays_in_l2() {
        let (mut h, mut p) = in_vmx_operation(vmcs12(&offer()));
        let mut vmcs01 = vmlaunch();
        assert_eq!(
            h.handle_exit(&mut vmcs01, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL2)
        );
        // L1's RIP stays at its VMLAUNCH: it goes on at its host state when L2 exits.
        assert_eq!(vmcs01.fields[&guest::RIP], 0x10_0000);
        let mut vmcs02 = MockVcpu::default();
        assert_eq!(
            h.hv.on_vmcs_switched(&mut vmcs02, &mut h.rec, NestedSwitch::ToL2),
            Action::Resume
        );
        assert!(h.in_l2());
        assert_eq!(written(&vmcs02, guest::RIP), L2_RIP);
        assert_eq!(written(&vmcs02, control::EPTP_FULL), 0xabc0_001e);
        // L2's CPUID: reflected, with L2's state and the exit's information in VMCS12.
        let mut exit = MockVcpu::exited(10, L2_RIP + 4, 2);
        exit.fields
            .extend(vmcs02.fields.iter().filter(|(f, _)| **f != guest::RIP));
        exit.calls.clear();
        assert_eq!(
            h.handle_exit(&mut exit, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL1)
        );
        assert!(
            exit.writes().is_empty(),
            "a reflected exit changes nothing in VMCS02"
        );
        let mut l1 = vmlaunch();
        assert_eq!(
            h.hv.on_vmcs_switched(&mut l1, &mut h.rec, NestedSwitch::ToL1),
            Action::Resume
        );
        assert!(!h.in_l2());
        assert_eq!(written(&l1, guest::RIP), HOST_RIP);
        let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
        assert_eq!(v.read(ro::EXIT_REASON), Ok(10));
        assert_eq!(v.read(ro::VMEXIT_INSTRUCTION_LEN), Ok(2));
        assert_eq!(v.read(guest::RIP), Ok(L2_RIP + 4));
        assert!(v.launched);
        // L1 resumes it: the round trip (the exit, this VMRESUME) is counted.
        let mut resume = vmresume();
        assert_eq!(
            h.handle_exit(&mut resume, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL2)
        );
        let mut vmcs02 = MockVcpu::default();
        h.hv.on_vmcs_switched(&mut vmcs02, &mut h.rec, NestedSwitch::ToL2);
        // An I/O exit L1 did not ask for (port 0x61): L0 passes the byte through, L2 goes on.
        let mut io = MockVcpu::exited(30, L2_RIP + 6, 2);
        io.fields
            .insert(ro::EXIT_QUALIFICATION, 0x61 << 16 | 1 << 3 | 1 << 6);
        assert_eq!(h.handle_exit(&mut io, &mut p), Action::Resume);
        assert_eq!(io.fields[&guest::RIP], L2_RIP + 8);
        assert!(h.in_l2());
        assert_eq!(
            l2_observations(&h),
            [
                Observation::L2Entry {
                    launch: true,
                    round_trip: None
                },
                Observation::L2Exit {
                    reason: ExitReason::Cpuid,
                    reflected: true
                },
                Observation::L2Entry {
                    launch: false,
                    round_trip: Some(2)
                },
                Observation::L2Exit {
                    reason: ExitReason::IoInstruction,
                    reflected: false
                },
            ]
        );
        let stats = h.nested_stats().unwrap();
        assert_eq!((stats.entries, stats.l2_exits, stats.reflected), (2, 2, 1));
        assert_eq!(
            (stats.round_trip_vmread_vmwrite, stats.round_trip_other),
            (0, 0),
            "L1 went straight to VMRESUME"
        );
        assert_eq!(
            (
                stats.cpuid_round_trips,
                stats.cpuid_round_trip_total,
                stats.cpuid_round_trip_max
            ),
            (1, 2, 2),
            "the reflected exit was a CPUID"
        );
        assert_eq!(
            (
                stats.page_fault_round_trips,
                stats.page_fault_round_trip_total
            ),
            (0, 0),
            "and not a page fault"
        );
    }

    /// With Linux + KVM as L1 (a profile that names `vmx_vmexit`), an entry whose VMCS12 host state
    /// is L1's own enters L2 and says it was checked; one whose HOST_RIP is anywhere but
    /// `vmx_vmexit` (or whose HOST_RSP is not L1's stack) fails with VMfailValid 8 and an alert
    /// naming the field; without the profile nothing is compared.
    #[test]
    fn with_kvm_as_l1_vmcs12_s_host_state_must_be_l1_s_own() {
        const VMX_VMEXIT: u64 = 0xffff_ffff_8127_7a0d;
        // L1 at its VMLAUNCH: the state KVM would have written into the host-state area.
        let l1 = || {
            let mut launch = vmlaunch();
            for (f, value) in [
                (guest::RSP, 0xffff_c900_0040_bd48),
                (guest::CS_SELECTOR, 0x10),
                (guest::TR_SELECTOR, 0x40),
                (guest::TR_BASE, 0xffff_fe00_0000_3000),
                (guest::GDTR_BASE, 0xffff_fe00_0000_1000),
                (guest::IDTR_BASE, 0xffff_fe00_0000_0000),
            ] {
                launch.fields.insert(f, value);
            }
            launch
        };
        let kvm_s = |tamper: Option<(VmcsField, u64)>| {
            let mut v = vmcs12(&offer());
            let launch = l1();
            for (h, g) in [
                (host::RSP, guest::RSP),
                (host::CR0, guest::CR0),
                (host::CR3, guest::CR3),
                (host::CS_SELECTOR, guest::CS_SELECTOR),
                (host::TR_SELECTOR, guest::TR_SELECTOR),
                (host::FS_BASE, guest::FS_BASE),
                (host::GS_BASE, guest::GS_BASE),
                (host::TR_BASE, guest::TR_BASE),
                (host::GDTR_BASE, guest::GDTR_BASE),
                (host::IDTR_BASE, guest::IDTR_BASE),
            ] {
                v.write(h, launch.fields.get(&g).copied().unwrap_or(0))
                    .unwrap();
            }
            // CR4 as L1 reads it, VMXE through the read shadow.
            v.write(host::CR4, 0x2020 | CR4_VMXE).unwrap();
            v.write(host::RIP, VMX_VMEXIT).unwrap();
            if let Some((f, value)) = tamper {
                v.write(f, value).unwrap();
            }
            let (mut h, mut p) = in_vmx_operation(v);
            h.hv.linux = Some(ihmi_linux::LinuxProfile {
                kvm: Some(ihmi_linux::KvmProfile {
                    vmx_vmexit: VMX_VMEXIT,
                    ..Default::default()
                }),
                ..Default::default()
            });
            let mut launch = l1();
            let action = h.handle_exit(&mut launch, &mut p);
            (h, launch, action)
        };
        let checked = |h: &crate::testing::TestHv| {
            h.rec
                .seen
                .iter()
                .filter(|s| matches!(s, crate::mock::Seen::Other(Observation::L1HostStateChecked)))
                .count()
        };
        let (h, _, action) = kvm_s(None);
        assert_eq!(action, Action::SwitchVmcs(NestedSwitch::ToL2));
        assert_eq!(checked(&h), 1);
        assert!(h.rec.alerts().is_empty());
        for (field, name, value) in [
            (host::RIP, "HOST_RIP", 0xffff_ffff_c000_0000),
            (host::RSP, "HOST_RSP", 0xffff_c900_0040_c000),
        ] {
            let (mut h, launch, action) = kvm_s(Some((field, value)));
            assert_eq!(action, Action::Resume);
            assert_eq!(launch.fields[&guest::RFLAGS] & 0x41, 0x40, "VMfailValid");
            let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
            assert_eq!(v.read(super::super::vmcs12::VM_INSTRUCTION_ERROR), Ok(8));
            assert!(!h.in_l2());
            assert_eq!(checked(&h), 0);
            assert!(
                matches!(
                    h.rec.alerts().as_slice(),
                    [crate::Alert::Vmcs12HostState { field: f, found, .. }]
                        if *f == name && *found == value
                ),
                "{:?}",
                h.rec.alerts()
            );
        }
        // Without KVM's profile (another L1), nothing is compared: the same VMCS12 enters L2.
        let mut v = vmcs12(&offer());
        v.write(host::RIP, 0xffff_ffff_c000_0000).unwrap();
        let (mut h, mut p) = in_vmx_operation(v);
        let mut launch = vmlaunch();
        assert_eq!(
            h.handle_exit(&mut launch, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL2)
        );
        assert_eq!(checked(&h), 0);
    }

    /// With the in-hypervisor monitor's VMCS registry (P6): a VMCS12 the monitor registered as a
    /// KVM vCPU's enters L2; any other region, however well-formed, fails VMLAUNCH and VMRESUME with
    /// VMfailValid 7 and a `rogue-vmcs` alert, before its contents are looked at (a malformed one
    /// gets the alert too, not the consistency check's error); without a registry nothing is checked.
    #[test]
    fn with_the_monitor_s_registry_only_a_registered_vmcs_enters_l2() {
        let run = |registry: Option<Vec<u64>>, resume: bool, malformed: bool| {
            let mut v = vmcs12(&offer());
            v.launched = resume;
            if malformed {
                // No VM-exit controls at all: the consistency checks would refuse it.
                v.write(control::VMEXIT_CONTROLS, 0).unwrap();
            }
            let (mut h, mut p) = in_vmx_operation(v);
            p.vmcs_registry = registry;
            let mut at = if resume { vmresume() } else { vmlaunch() };
            let action = h.handle_exit(&mut at, &mut p);
            (h, at, action)
        };
        for resume in [false, true] {
            for registry in [None, Some(super::std::vec![0x9000, 0x7000])] {
                let (h, _, action) = run(registry, resume, false);
                assert_eq!(action, Action::SwitchVmcs(NestedSwitch::ToL2));
                assert!(h.rec.alerts().is_empty());
            }
            for (registry, malformed) in [
                (super::std::vec![], false),
                (super::std::vec![0x9000], false),
                (super::std::vec![0x9000], true),
            ] {
                let (mut h, at, action) = run(Some(registry), resume, malformed);
                assert_eq!(action, Action::Resume);
                assert_eq!(at.fields[&guest::RFLAGS] & 0x41, 0x40, "VMfailValid");
                let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
                assert_eq!(v.read(super::super::vmcs12::VM_INSTRUCTION_ERROR), Ok(7));
                assert!(!h.in_l2());
                assert!(
                    matches!(
                        h.rec.alerts().as_slice(),
                        [crate::Alert::RogueVmcs { gpa, launch, .. }]
                            if gpa.raw() == 0x7000 && *launch != resume
                    ),
                    "{:?}",
                    h.rec.alerts()
                );
            }
        }
        // Without the registry, the malformed one fails the consistency check as before, no alert.
        let (mut h, _, action) = run(None, false, true);
        assert_eq!(action, Action::Resume);
        let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
        assert_eq!(v.read(super::super::vmcs12::VM_INSTRUCTION_ERROR), Ok(7));
        assert!(h.rec.alerts().is_empty());
    }

    #[test]
    fn an_entry_with_a_bitmap_or_msr_area_in_l0_s_memory_fails_valid_with_an_alert() {
        let hole = crate::mock::L0_HOLE;
        for (field, value) in [
            (control::IO_BITMAP_B_ADDR_FULL, hole),
            (control::VMEXIT_MSR_STORE_ADDR_FULL, hole + 0x100),
        ] {
            let mut v = vmcs12(&offer());
            v.write(field, value).unwrap();
            v.write(control::VMEXIT_MSR_STORE_COUNT, 1).unwrap();
            let (mut h, mut p) = in_vmx_operation(v);
            let mut launch = vmlaunch();
            assert_eq!(h.handle_exit(&mut launch, &mut p), Action::Resume);
            assert_eq!(launch.fields[&guest::RFLAGS] & 0x41, 0x40, "VMfailValid");
            let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
            assert_eq!(v.read(super::super::vmcs12::VM_INSTRUCTION_ERROR), Ok(7));
            assert!(!h.in_l2());
            assert!(
                matches!(
                    h.rec.alerts().as_slice(),
                    [crate::Alert::VmxPointerRefused { gpa, region: crate::RegionKind::L0, .. }]
                        if gpa.raw() == value
                ),
                "{:?}",
                h.rec.alerts()
            );
        }
    }

    #[test]
    fn msr_areas_load_l2_s_store_them_at_exit_and_load_l1_s_back() {
        use super::super::msr_area::IA32_FMASK;
        use ihmi_arch::msr::IA32_STAR;
        const ENTRY_LOAD: u64 = 0xa000;
        const EXIT_STORE: u64 = 0xa100;
        const EXIT_LOAD: u64 = 0xa200;
        let mut v = vmcs12(&offer());
        for (f, value) in [
            (control::VMENTRY_MSR_LOAD_COUNT, 2),
            (control::VMENTRY_MSR_LOAD_ADDR_FULL, ENTRY_LOAD),
            (control::VMEXIT_MSR_STORE_COUNT, 1),
            (control::VMEXIT_MSR_STORE_ADDR_FULL, EXIT_STORE),
            (control::VMEXIT_MSR_LOAD_COUNT, 1),
            (control::VMEXIT_MSR_LOAD_ADDR_FULL, EXIT_LOAD),
        ] {
            v.write(f, value).unwrap();
        }
        let (mut h, mut p) = in_vmx_operation(v);
        let entry = |p: &mut MockPlatform, at: u64, msr: u32, value: u64| {
            p.write_u64(at, u64::from(msr));
            p.write_u64(at + 8, value);
        };
        entry(&mut p, ENTRY_LOAD, IA32_STAR, 0x0023_0010_0000_0000);
        entry(&mut p, ENTRY_LOAD + 16, IA32_FMASK, 0x4700);
        entry(&mut p, EXIT_STORE, IA32_STAR, 0);
        entry(&mut p, EXIT_LOAD, IA32_STAR, 0x0033_0008_0000_0000);
        let writes = |p: &MockPlatform| {
            p.calls
                .borrow()
                .iter()
                .filter_map(|c| match c {
                    crate::mock::Call::WriteMsr(m, v) => Some((*m, *v)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        // VMLAUNCH: L2's STAR and FMASK go into the CPU.
        assert_eq!(
            h.handle_exit(&mut vmlaunch(), &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL2)
        );
        assert_eq!(
            writes(&p),
            [(IA32_STAR, 0x0023_0010_0000_0000), (IA32_FMASK, 0x4700)]
        );
        let mut vmcs02 = MockVcpu::default();
        h.hv.on_vmcs_switched(&mut vmcs02, &mut h.rec, NestedSwitch::ToL2);
        // L2 changed its STAR; its CPUID exits to L1: the store area gets it, L1's comes back.
        p.msrs.insert(IA32_STAR, 0x0043_0018_0000_0000);
        let mut exit = MockVcpu::exited(10, L2_RIP + 4, 2);
        exit.fields
            .extend(vmcs02.fields.iter().filter(|(f, _)| **f != guest::RIP));
        assert_eq!(
            h.handle_exit(&mut exit, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL1)
        );
        assert_eq!(p.read_u64(EXIT_STORE + 8), 0x0043_0018_0000_0000);
        assert_eq!(writes(&p).last(), Some(&(IA32_STAR, 0x0033_0008_0000_0000)));
        h.hv.on_vmcs_switched(&mut vmlaunch(), &mut h.rec, NestedSwitch::ToL1);

        // The CPU fails VMCS02's entry after L0 loaded L2's MSRs: L1's come back as they were
        // before the entry, and nothing is stored.
        p.msrs.insert(IA32_STAR, 0x0033_0008_0000_0000);
        p.msrs.insert(IA32_FMASK, 0x4700_0000);
        p.write_u64(EXIT_STORE + 8, 0x5555);
        let mut resume = vmresume();
        assert_eq!(
            h.handle_exit(&mut resume, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL2)
        );
        h.hv.on_vmcs_switched(&mut vmcs02, &mut h.rec, NestedSwitch::ToL2);
        let before = writes(&p).len();
        let mut failed = MockVcpu::exited(33 | 1 << 31, L2_RIP, 0);
        failed
            .fields
            .extend(vmcs02.fields.iter().filter(|(f, _)| **f != guest::RIP));
        assert_eq!(
            h.handle_exit(&mut failed, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL1)
        );
        let after = writes(&p)[before..].to_vec();
        assert!(after.contains(&(IA32_STAR, 0x0033_0008_0000_0000)));
        assert!(after.contains(&(IA32_FMASK, 0x4700_0000)), "{after:x?}");
        assert_eq!(p.read_u64(EXIT_STORE + 8), 0x5555, "nothing stored");
        h.hv.on_vmcs_switched(&mut vmlaunch(), &mut h.rec, NestedSwitch::ToL1);

        // An entry L0 does not load (IA32_FEATURE_CONTROL, L0's): the VM entry fails with reason
        // 34 and the entry's number, nothing of the area loaded, L1's exit area loaded.
        entry(&mut p, ENTRY_LOAD + 16, 0x3a, 0);
        let before = writes(&p).len();
        let mut resume = vmresume();
        assert_eq!(h.handle_exit(&mut resume, &mut p), Action::Resume);
        let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
        assert_eq!(v.read(ro::EXIT_REASON), Ok(34 | 1 << 31));
        assert_eq!(v.read(ro::EXIT_QUALIFICATION), Ok(2));
        assert_eq!(
            &writes(&p)[before..],
            [(IA32_STAR, 0x0033_0008_0000_0000)],
            "only L1's exit area"
        );
        // An exit-store entry L0 does not store: a VMX abort ends the guest.
        entry(&mut p, ENTRY_LOAD + 16, IA32_FMASK, 0);
        entry(&mut p, EXIT_STORE, 0xc000_0082, 0);
        let mut resume = vmresume();
        assert_eq!(
            h.handle_exit(&mut resume, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL2)
        );
        h.hv.on_vmcs_switched(&mut vmcs02, &mut h.rec, NestedSwitch::ToL2);
        let mut exit = MockVcpu::exited(10, L2_RIP + 4, 2);
        exit.fields
            .extend(vmcs02.fields.iter().filter(|(f, _)| **f != guest::RIP));
        assert_eq!(
            h.handle_exit(&mut exit, &mut p),
            Action::End(crate::GuestEnd::VmxAbort {
                indicator: 1,
                entry: 1
            })
        );
    }

    #[test]
    fn l1_s_lstar_stays_locked_while_l2_s_is_in_the_cpu_only_while_l2_runs() {
        use ihmi_arch::msr::IA32_LSTAR;
        let (mut h, mut p) = in_vmx_operation(vmcs12(&offer()));
        let (g, _) = crate::testing::guarded();
        h.hv.guard = g.hv.guard;
        p.write_u64(crate::testing::HOOK_GPA, crate::testing::GATE);
        let lstar_writes = |p: &MockPlatform| {
            p.calls
                .borrow()
                .iter()
                .filter_map(|c| match c {
                    crate::mock::Call::WriteMsr(IA32_LSTAR, v) => Some(*v),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        // L1's kernel sets its entry: installed and locked, as without nested VMX.
        let entry = 0xffff_ffff_8100_0040;
        h.handle_exit(&mut crate::testing::wrmsr_lstar(entry), &mut p);
        p.msrs.insert(IA32_LSTAR, entry);
        // KVM sets its guest's: no alert, no #GP, and not in the CPU while L1 runs.
        let mut kvm = crate::testing::wrmsr_lstar(0x1234);
        assert_eq!(h.handle_exit(&mut kvm, &mut p), Action::Resume);
        assert_eq!(kvm.fields[&guest::RIP], 0x8002, "performed for L2");
        assert!(h.rec.alerts().is_empty());
        assert_eq!(lstar_writes(&p), [entry]);
        assert!(
            h.rec.seen.iter().any(|s| matches!(
                s,
                crate::mock::Seen::Other(Observation::L2EntryMsr { msr: IA32_LSTAR })
            )),
            "observed as L2's"
        );
        // The entry to L2 puts it in; the exit to L1 takes L1's back.
        let mut vmcs02 = MockVcpu::default();
        assert_eq!(
            h.handle_exit(&mut vmlaunch(), &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL2)
        );
        h.hv.on_vmcs_switched(&mut vmcs02, &mut h.rec, NestedSwitch::ToL2);
        assert_eq!(lstar_writes(&p), [entry, 0x1234]);
        let mut exit = MockVcpu::exited(10, L2_RIP + 4, 2);
        exit.fields
            .extend(vmcs02.fields.iter().filter(|(f, _)| **f != guest::RIP));
        assert_eq!(
            h.handle_exit(&mut exit, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL1)
        );
        assert_eq!(lstar_writes(&p), [entry, 0x1234, entry]);
        h.hv.on_vmcs_switched(&mut vmlaunch(), &mut h.rec, NestedSwitch::ToL1);
        // KVM puts the host's back on its way to user space: L2 has none of its own any more, and
        // that write is not one of L2's.
        h.handle_exit(&mut crate::testing::wrmsr_lstar(entry), &mut p);
        let l2_writes = h
            .rec
            .seen
            .iter()
            .filter(|s| matches!(s, crate::mock::Seen::Other(Observation::L2EntryMsr { .. })))
            .count();
        assert_eq!(l2_writes, 1);
        let mut resume = vmresume();
        h.handle_exit(&mut resume, &mut p);
        assert_eq!(lstar_writes(&p), [entry, 0x1234, entry], "nothing to load");
        // Out of VMX operation, another value is L1's own again: refused, with the alert.
        h.hv.on_vmcs_switched(&mut MockVcpu::default(), &mut h.rec, NestedSwitch::ToL2);
        let mut exit = MockVcpu::exited(10, L2_RIP + 4, 2);
        exit.fields
            .extend(vmcs02.fields.iter().filter(|(f, _)| **f != guest::RIP));
        h.handle_exit(&mut exit, &mut p);
        h.hv.on_vmcs_switched(&mut vmlaunch(), &mut h.rec, NestedSwitch::ToL1);
        let mut off = vmlaunch();
        off.fields.insert(ro::EXIT_REASON, 26);
        h.handle_exit(&mut off, &mut p);
        let mut attack = crate::testing::wrmsr_lstar(0x1234);
        h.handle_exit(&mut attack, &mut p);
        assert_eq!(attack.fields[&guest::RIP], 0x8000, "#GP, not performed");
        assert!(matches!(
            h.rec.alerts().as_slice(),
            [crate::Alert::EntryMsrWriteRefused { value: 0x1234, .. }]
        ));
    }

    #[test]
    fn l2_s_own_lstar_write_l1_lets_through_is_l2_s_and_l1_s_comes_back() {
        use ihmi_arch::msr::IA32_LSTAR;
        let mut v = vmcs12(&offer());
        let proc = v.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS).unwrap();
        v.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, proc | 1 << 28)
            .unwrap();
        v.write(control::MSR_BITMAPS_ADDR_FULL, 0xa000).unwrap(); // all clear: L1 asks for none
        let (mut h, mut p) = in_vmx_operation(v);
        let (g, _) = crate::testing::guarded();
        h.hv.guard = g.hv.guard;
        p.write_u64(crate::testing::HOOK_GPA, crate::testing::GATE);
        let entry = 0xffff_ffff_8100_0040;
        h.handle_exit(&mut crate::testing::wrmsr_lstar(entry), &mut p);
        p.msrs.insert(IA32_LSTAR, entry);
        let mut vmcs02 = MockVcpu::default();
        h.handle_exit(&mut vmlaunch(), &mut p);
        h.hv.on_vmcs_switched(&mut vmcs02, &mut h.rec, NestedSwitch::ToL2);
        // L2's WRMSR, which L1's bitmap lets through: into the CPU now, no alert.
        let mut w = crate::testing::wrmsr_lstar(0x5678);
        w.fields
            .extend(vmcs02.fields.iter().filter(|(f, _)| **f != guest::RIP));
        assert_eq!(h.handle_exit(&mut w, &mut p), Action::Resume);
        assert!(h.rec.alerts().is_empty());
        let mut exit = MockVcpu::exited(10, L2_RIP + 4, 2);
        exit.fields
            .extend(vmcs02.fields.iter().filter(|(f, _)| **f != guest::RIP));
        h.handle_exit(&mut exit, &mut p);
        let writes: Vec<u64> = p
            .calls
            .borrow()
            .iter()
            .filter_map(|c| match c {
                crate::mock::Call::WriteMsr(IA32_LSTAR, v) => Some(*v),
                _ => None,
            })
            .collect();
        assert_eq!(
            writes,
            [entry, 0x5678, entry],
            "L1's own is back at the exit"
        );
        // L2's SYSENTER_EIP, which L1 lets through, is L2's in VMCS02: no alert, no #GP.
        let mut se = crate::testing::wrmsr_lstar(0xffff_ffff_8100_2000);
        se.regs.rcx = u64::from(ihmi_arch::msr::IA32_SYSENTER_EIP);
        se.fields
            .extend(vmcs02.fields.iter().filter(|(f, _)| **f != guest::RIP));
        h.hv.on_vmcs_switched(&mut MockVcpu::default(), &mut h.rec, NestedSwitch::ToL2);
        assert_eq!(h.handle_exit(&mut se, &mut p), Action::Resume);
        assert_eq!(se.fields[&guest::IA32_SYSENTER_EIP], 0xffff_ffff_8100_2000);
        assert!(h.rec.alerts().is_empty());
    }

    /// Nested EPT: L1 in VMX operation with a VMCS12 that gives L2 the EPT12 at [`EPT12`], which
    /// maps L2's page 0x1000 to L1's 0x50_0000 read and write, 0x2000 to L0's frame, and has a
    /// malformed (write-only) entry for 0x3000; EPT02 has eight tables.
    const EPT12: u64 = 0x30_0000;

    fn nested_ept() -> (crate::testing::TestHv, MockPlatform) {
        let offer = VirtualVmx::offer(&host_caps(&[]), NestedFeatures::NestedEpt).unwrap();
        let mut v = vmcs12(&offer);
        let proc = v.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS).unwrap();
        v.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, proc | 1 << 31)
            .unwrap();
        v.write(control::SECONDARY_PROCBASED_EXEC_CONTROLS, 1 << 1)
            .unwrap();
        v.write(control::EPTP_FULL, EPT12 | 0x1e).unwrap();
        let mut h = hv();
        let mut n = NestedVmx::new(offer);
        n.test_make_current(ihmi_addr::Gpa::new(0x7000), v);
        h.hv.nested = Some(n);
        let mut p = platform_with_identity_paging();
        p.write_bytes(0x7000, &VMCS12_REVISION.to_le_bytes());
        p.write_u64(EPT12, (EPT12 + 0x1000) | 7);
        p.write_u64(EPT12 + 0x1000, (EPT12 + 0x2000) | 7);
        p.write_u64(EPT12 + 0x2000, (EPT12 + 0x3000) | 7);
        p.write_u64(EPT12 + 0x3000 + 8, 0x50_0000 | 3 | 6 << 3);
        p.write_u64(EPT12 + 0x3000 + 16, crate::mock::L0_HOLE | 7 | 6 << 3);
        p.write_u64(EPT12 + 0x3000 + 24, 0x60_0000 | 2 | 6 << 3);
        p.fence = Some(crate::mock::memory_with_l0_hole());
        p.ept02 = Some(crate::mock::MockEpt02Tables::new(8));
        (h, p)
    }

    /// An EPT violation of L2's at `gpa`: a read (1), write (2) or fetch (4), with a linear address,
    /// L2's state what the entry wrote into `vmcs02`.
    fn ept_violation(vmcs02: &MockVcpu, gpa: u64, access: u64) -> MockVcpu {
        let mut v = MockVcpu::exited(48, L2_RIP, 3);
        v.fields
            .extend(vmcs02.fields.iter().filter(|(f, _)| **f != guest::RIP));
        v.fields
            .insert(ro::EXIT_QUALIFICATION, access | 1 << 7 | 1 << 8);
        v.fields.insert(ro::GUEST_PHYSICAL_ADDR_FULL, gpa);
        v
    }

    #[test]
    fn nested_ept_fills_ept02_reflects_what_ept12_refuses_and_invept_empties_it() {
        let (mut h, mut p) = nested_ept();
        let enter = |h: &mut crate::testing::TestHv, p: &mut MockPlatform, mut exit: MockVcpu| {
            assert_eq!(
                h.handle_exit(&mut exit, p),
                Action::SwitchVmcs(NestedSwitch::ToL2)
            );
            let mut vmcs02 = MockVcpu::default();
            h.hv.on_vmcs_switched(&mut vmcs02, &mut h.rec, NestedSwitch::ToL2);
            vmcs02
        };
        let vmcs02 = enter(&mut h, &mut p, vmlaunch());
        // VMCS02 runs on EPT02 (write-back, 4 levels), not L0's view; L1's EPT stays on.
        let root = crate::mock::MockEpt02Tables::BASE;
        assert_eq!(written(&vmcs02, control::EPTP_FULL), root | 0x1e);
        assert_ne!(
            written(&vmcs02, control::SECONDARY_PROCBASED_EXEC_CONTROLS) & 1 << 1,
            0
        );
        // L2 writes its page 0x1000: EPT02 maps it where EPT01 has L1's 0x50_0000, read and
        // write; L2 goes on at the same instruction.
        let mut w = ept_violation(&vmcs02, 0x1008, 2);
        assert_eq!(h.handle_exit(&mut w, &mut p), Action::Resume);
        assert_eq!(w.fields[&guest::RIP], L2_RIP, "no step past it");
        let ept02 = |h: &crate::testing::TestHv, p: &mut MockPlatform, gpa: u64| {
            let e = h.hv.nested.as_ref().unwrap().ept02.as_ref().unwrap();
            e.lookup(p.ept02.as_mut().unwrap(), ihmi_addr::Gpa::new(gpa))
        };
        let m = ept02(&h, &mut p, 0x1000).unwrap();
        assert_eq!(
            (m.hpa.raw(), m.perm),
            (0x50_0000, ihmi_ept::Perm::RW),
            "EPT12's rights, within L0's"
        );
        // A fetch there: EPT12 does not allow it, so the violation is L1's, with EPT12's read and
        // write in bits 5:3 of the qualification.
        let mut x = ept_violation(&vmcs02, 0x1010, 4);
        assert_eq!(
            h.handle_exit(&mut x, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL1)
        );
        let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
        assert_eq!(v.read(ro::EXIT_REASON), Ok(48));
        assert_eq!(
            v.read(ro::EXIT_QUALIFICATION),
            Ok(4 | 3 << 3 | 1 << 7 | 1 << 8)
        );
        assert_eq!(v.read(ro::GUEST_PHYSICAL_ADDR_FULL), Ok(0x1010));
        assert!(
            ept02(&h, &mut p, 0x1000).is_none(),
            "EPT02's entry for the page goes with the violation L1 gets"
        );
        h.hv.on_vmcs_switched(&mut vmlaunch(), &mut h.rec, NestedSwitch::ToL1);
        let resume = vmresume();
        let vmcs02 = enter(&mut h, &mut p, resume);
        // Filled again; then L0 takes rights away in its view of L1 (a gate opening, say): at
        // L2's next exit EPT02 starts over, and the CPU forgets the old one.
        let mut w = ept_violation(&vmcs02, 0x1008, 2);
        assert_eq!(h.handle_exit(&mut w, &mut p), Action::Resume);
        assert!(ept02(&h, &mut p, 0x1000).is_some());
        p.view_generation += 1;
        let invepts = |p: &MockPlatform| {
            p.calls
                .borrow()
                .iter()
                .filter(|c| matches!(c, crate::mock::Call::Invept(_)))
                .count()
        };
        let before = invepts(&p);
        let mut again = ept_violation(&vmcs02, 0x1008, 2);
        again.fields.insert(ro::EXIT_QUALIFICATION, 2 | 1 << 12);
        assert_eq!(h.handle_exit(&mut again, &mut p), Action::Resume);
        assert_eq!(invepts(&p), before + 1);
        assert_eq!(written(&again, control::EPTP_FULL), root | 0x1e);
        // And a violation in an IRET that unblocked NMIs leaves them blocked again for L2.
        assert_ne!(written(&again, guest::INTERRUPTIBILITY_STATE) & 1 << 3, 0);
        assert_eq!(
            written(&vmcs02, control::EPTP_FULL),
            root | 0x1e,
            "the same EPTP12: the same EPT02"
        );
        // A page EPT12 has no entry for: L1's violation, with no rights.
        let mut none = ept_violation(&vmcs02, 0x9000, 1);
        h.handle_exit(&mut none, &mut p);
        let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
        assert_eq!(v.read(ro::EXIT_QUALIFICATION), Ok(1 | 1 << 7 | 1 << 8));
        h.hv.on_vmcs_switched(&mut vmlaunch(), &mut h.rec, NestedSwitch::ToL1);
        let resume = vmresume();
        let vmcs02 = enter(&mut h, &mut p, resume);
        // A malformed entry: L1's EPT misconfiguration (reason 49).
        let mut bad = ept_violation(&vmcs02, 0x3000, 1);
        h.handle_exit(&mut bad, &mut p);
        let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
        assert_eq!(v.read(ro::EXIT_REASON), Ok(49));
        assert_eq!(v.read(ro::EXIT_QUALIFICATION), Ok(0));
        h.hv.on_vmcs_switched(&mut vmlaunch(), &mut h.rec, NestedSwitch::ToL1);
        assert_eq!(
            l2_observations(&h)
                .iter()
                .filter_map(|o| match o {
                    Observation::L2Exit { reason, reflected } => Some((*reason, *reflected)),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            [
                (ExitReason::EptViolation, false),
                (ExitReason::EptViolation, true),
                (ExitReason::EptViolation, false),
                (ExitReason::EptViolation, false),
                (ExitReason::EptViolation, true),
                (ExitReason::EptMisconfig, true),
            ]
        );
        // L1's INVEPT of all contexts (descriptor at 0x6000, type in RBX): EPT02 is emptied and the
        // CPU told to forget it.
        let invept = |kind: u64| {
            let mut inv = vmlaunch();
            inv.fields.insert(ro::EXIT_REASON, 50);
            inv.fields.insert(
                ro::VMEXIT_INSTRUCTION_INFO,
                (2 << 7) | (3 << 15) | (1 << 22) | (3 << 28),
            );
            inv.regs.rax = 0x6000;
            inv.regs.rbx = kind;
            inv
        };
        let mut inv = invept(2);
        p.write_u64(0x6000, EPT12 | 0x1e);
        let before = invepts(&p);
        assert_eq!(h.handle_exit(&mut inv, &mut p), Action::Resume);
        assert_eq!(inv.fields[&guest::RFLAGS] & 0x41, 0, "VMsucceed");
        assert_eq!(invepts(&p), before + 1);
        assert!(ept02(&h, &mut p, 0x1000).is_none(), "EPT02 is empty");
        // A type the offer lacks (3, single-context retaining globals): VMfailValid 28.
        let mut inv3 = invept(3);
        h.handle_exit(&mut inv3, &mut p);
        let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
        assert_eq!(v.read(super::super::vmcs12::VM_INSTRUCTION_ERROR), Ok(28));
        // INVVPID (exit 53), offered with nested EPT: the descriptor (VPID, then the address) read
        // through the guest's page tables, checked, and nothing else to do.
        let invvpid = |kind: u64, vpid: u64, address: u64, p: &mut MockPlatform| {
            p.write_u64(0x6000, vpid);
            p.write_u64(0x6008, address);
            let mut inv = invept(kind);
            inv.fields.insert(ro::EXIT_REASON, 53);
            inv
        };
        for (kind, vpid, address, ok) in [
            (0, 1, 0xffff_8000_0000_0000, true),
            (1, 1, 0, true),
            (2, 0, 0, true),
            (3, 7, 0, true),
            (0, 1, 0x0000_8000_0000_0000, false),
            (1, 0, 0, false),
            (2, 1 << 16, 0, false),
            (4, 1, 0, false),
        ] {
            let mut inv = invvpid(kind, vpid, address, &mut p);
            assert_eq!(h.handle_exit(&mut inv, &mut p), Action::Resume);
            let flags = inv.fields[&guest::RFLAGS] & 0x41;
            let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
            let error = v.read(super::super::vmcs12::VM_INSTRUCTION_ERROR);
            if ok {
                assert_eq!(flags, 0, "VMsucceed: type {kind}, VPID {vpid:#x}");
            } else {
                assert_eq!(
                    (flags, error),
                    (0x40, Ok(28)),
                    "type {kind}, VPID {vpid:#x}"
                );
            }
        }
        // L2 reaching L0's frame through EPT12: L0's violation at that frame, naming it.
        let resume = vmresume();
        let vmcs02 = enter(&mut h, &mut p, resume);
        let mut l0 = ept_violation(&vmcs02, 0x2000, 1);
        let action = h.handle_exit(&mut l0, &mut p);
        assert_ended_in_l0_memory(&action);
        assert_eq!(
            h.rec.alerts().as_slice(),
            [crate::Alert::Ept12MappingRefused {
                l2: ihmi_addr::Gpa::new(0x2000),
                l1: ihmi_addr::Gpa::new(crate::mock::L0_HOLE),
                region: crate::RegionKind::L0,
            }]
        );
    }

    #[test]
    fn l2_touching_l0_s_memory_is_l0_s_exit_and_ends_the_guest_with_the_region_named() {
        let (mut h, mut p) = in_vmx_operation(vmcs12(&offer()));
        assert_eq!(
            h.handle_exit(&mut vmlaunch(), &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL2)
        );
        h.hv.on_vmcs_switched(&mut MockVcpu::default(), &mut h.rec, NestedSwitch::ToL2);
        let mut read = MockVcpu::exited(48, L2_RIP, 3);
        read.fields.insert(ro::EXIT_QUALIFICATION, 1); // a data read
        read.fields
            .insert(ro::GUEST_PHYSICAL_ADDR_FULL, crate::mock::L0_HOLE);
        let action = h.handle_exit(&mut read, &mut p);
        assert_ended_in_l0_memory(&action);
        assert_eq!(
            l2_observations(&h).last(),
            Some(&Observation::L2Exit {
                reason: ExitReason::EptViolation,
                reflected: false
            }),
            "never L1's: L2 runs under L0's EPT"
        );
    }

    #[test]
    fn an_msr_l1_passes_through_is_read_from_vmcs02_or_l0_s_policy_or_ends_the_guest_said_so() {
        let mut v = vmcs12(&offer());
        let proc = v.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS).unwrap();
        v.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, proc | 1 << 28)
            .unwrap();
        v.write(control::MSR_BITMAPS_ADDR_FULL, 0xa000).unwrap(); // all clear: L1 asks for none
        let (mut h, mut p) = in_vmx_operation(v);
        h.handle_exit(&mut vmlaunch(), &mut p);
        h.hv.on_vmcs_switched(&mut MockVcpu::default(), &mut h.rec, NestedSwitch::ToL2);
        let rdmsr = |msr: u32| {
            let mut r = MockVcpu::exited(31, L2_RIP, 2);
            r.regs.rcx = u64::from(msr);
            r.fields.insert(guest::FS_BASE, 0x1234_5678_9000);
            r
        };
        // FS base lives in the VMCS: L2 reads its own.
        let mut fs = rdmsr(0xc000_0100);
        assert_eq!(h.handle_exit(&mut fs, &mut p), Action::Resume);
        assert_eq!((fs.regs.rax, fs.regs.rdx), (0x5678_9000, 0x1234));
        assert_eq!(fs.fields[&guest::RIP], L2_RIP + 2);
        // IA32_KERNEL_GS_BASE is in the CPU, where L1 put L2's: L0 reads and writes it there.
        p.msrs.insert(0xc000_0102, 0xffff_8880_0123_4000);
        let mut kgs = rdmsr(0xc000_0102);
        assert_eq!(h.handle_exit(&mut kgs, &mut p), Action::Resume);
        assert_eq!((kgs.regs.rax, kgs.regs.rdx), (0x0123_4000, 0xffff_8880));
        let mut w = rdmsr(0xc000_0102);
        w.fields.insert(ro::EXIT_REASON, 32);
        (w.regs.rax, w.regs.rdx) = (0x5000, 0xffff_8880);
        assert_eq!(h.handle_exit(&mut w, &mut p), Action::Resume);
        assert!(p.calls.borrow().contains(&crate::mock::Call::WriteMsr(
            0xc000_0102,
            0xffff_8880_0000_5000
        )));
        // IA32_FEATURE_CONTROL is L0's to answer, as for L1 (the offer: locked, VMX on).
        let mut fc = rdmsr(0x3a);
        assert_eq!(h.handle_exit(&mut fc, &mut p), Action::Resume);
        assert_eq!(fc.regs.rax, 5);
        // An MSR L0 cannot reach for L2 from root operation ends the guest, said so.
        let mut tsc = rdmsr(0x10);
        assert!(matches!(
            h.handle_exit(&mut tsc, &mut p),
            Action::End(crate::GuestEnd::Unhandled {
                qualification: 0x10,
                ..
            })
        ));
        assert!(p.logs().iter().any(|l| l.contains("MSR 0x10")));
    }

    #[test]
    fn with_vmcs_shadowing_l1_s_writes_in_the_shadow_reach_the_entry_and_the_exit_reaches_the_shadow(
    ) {
        use super::std::collections::BTreeMap;
        let (mut h, mut p) = in_vmx_operation(vmcs12(&offer()));
        let n = h.hv.nested.take().unwrap();
        h.hv.nested = Some(n.with_shadowing());
        // L1 wrote a new guest RIP with VMWRITE into the shadow, which made no exit.
        let mut shadow = BTreeMap::new();
        super::super::shadow::load(
            h.hv.nested.as_mut().unwrap().test_current().unwrap(),
            &mut {
                struct Map<'a>(&'a mut BTreeMap<VmcsField, u64>);
                impl crate::ShadowFields for Map<'_> {
                    fn read(&mut self, f: VmcsField) -> u64 {
                        self.0.get(&f).copied().unwrap_or(0)
                    }
                    fn write(&mut self, f: VmcsField, v: u64) {
                        self.0.insert(f, v);
                    }
                }
                Map(&mut shadow)
            },
        );
        shadow.insert(guest::RIP, L2_RIP + 0x100);
        let mut vmcs01 = vmlaunch();
        vmcs01.shadow = Some(shadow);
        assert_eq!(
            h.handle_exit(&mut vmcs01, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL2)
        );
        let mut vmcs02 = MockVcpu::default();
        h.hv.on_vmcs_switched(&mut vmcs02, &mut h.rec, NestedSwitch::ToL2);
        assert_eq!(
            written(&vmcs02, guest::RIP),
            L2_RIP + 0x100,
            "the entry used the shadow's value"
        );
        // A reflected CPUID: its exit information lands in the shadow, which VMCS01 links.
        let mut exit = MockVcpu::exited(10, L2_RIP + 0x104, 2);
        assert_eq!(
            h.handle_exit(&mut exit, &mut p),
            Action::SwitchVmcs(NestedSwitch::ToL1)
        );
        let mut l1 = vmlaunch();
        l1.shadow = vmcs01.shadow.take();
        h.hv.on_vmcs_switched(&mut l1, &mut h.rec, NestedSwitch::ToL1);
        let shadow = l1.shadow.as_ref().unwrap();
        assert_eq!(shadow.get(&ro::EXIT_REASON), Some(&10));
        assert_eq!(shadow.get(&guest::RIP), Some(&(L2_RIP + 0x104)));
        assert_eq!(
            written(&l1, guest::LINK_PTR_FULL),
            crate::mock::MOCK_SHADOW_VMCS
        );
        // VMXOFF: no current VMCS, the link is all ones again.
        let mut off = vmlaunch();
        off.fields.insert(ro::EXIT_REASON, 26);
        off.shadow = l1.shadow.take();
        assert_eq!(h.handle_exit(&mut off, &mut p), Action::Resume);
        assert_eq!(written(&off, guest::LINK_PTR_FULL), u64::MAX);
    }

    #[test]
    fn an_entry_with_a_bad_guest_state_exits_to_l1_with_reason_33() {
        let mut bad = vmcs12(&offer());
        bad.write(guest::RFLAGS, 0).unwrap();
        let (mut h, mut p) = in_vmx_operation(bad);
        let mut vmcs01 = vmlaunch();
        assert_eq!(h.handle_exit(&mut vmcs01, &mut p), Action::Resume);
        assert!(!h.in_l2());
        assert_eq!(vmcs01.fields[&guest::RIP], HOST_RIP);
        let v = h.hv.nested.as_mut().unwrap().test_current().unwrap();
        assert_eq!(v.read(ro::EXIT_REASON), Ok(33 | 1 << 31));
        assert!(!v.launched, "a failed VMLAUNCH leaves the VMCS clear");
        assert_eq!(h.nested_stats().unwrap().entry_failures, 1);
    }
}
