//! Boot stage 3: VMX on. L0 checks what the CPU offers (VMX, EPT; 1 GiB pages for its own tables),
//! says so, and enters VMX root operation with a VMXON region from its pool.

use ihmi_addr::Gpa;
use ihmi_frames::Frame;
use ihmi_vmcs::{VmxCapabilities, VmxFeatures};

use crate::error::LoadError;
use crate::frames::Pool;
use crate::log;

/// CPUID.1:ECX.VMX (SDM Vol. 2A, CPUID).
const CPUID_1_ECX_VMX: u32 = 1 << 5;
/// CPUID.80000001H:EDX.Page1GB (SDM 4.1.4).
const CPUID_80000001_EDX_PAGE1GB: u32 = 1 << 26;

/// VMX, on.
pub struct Vmx {
    pub caps: VmxCapabilities,
    pub features: VmxFeatures,
    /// Whether the CPU has 1 GiB pages (for the page tables L0 builds for guests and the monitor).
    pub page_1g: bool,
    /// The VMXON region, L0's for as long as VMX is on.
    vmxon: Frame,
}

impl Vmx {
    /// An address L0 owns, which no guest may read: the `ept-guard` scenario's probe.
    pub fn probe(&self) -> Gpa {
        Gpa::from_identity_hpa(self.vmxon.start())
    }
}

/// Checks the CPU and turns VMX on.
pub fn on(frames: &mut Pool) -> Result<Vmx, LoadError> {
    if ihmi_rt::cpu::cpuid(1, 0)[2] & CPUID_1_ECX_VMX == 0 {
        return Err(LoadError::Cpu(
            "this CPU has no VMX; choose a VMX-capable CPU model (e.g. corei7_skylake_x)",
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
        return Err(LoadError::Cpu("this CPU has VMX but no EPT; L0 needs EPT"));
    }
    let vmxon = frames.frame()?;
    // SAFETY: `vmxon` is a fresh frame from L0's pool (identity-mapped), kept in the returned `Vmx` for
    // good; we run at CPL0 with interrupts off and have not entered VMX operation before.
    unsafe { ihmi_vmx::enable(&vmxon, &caps) }.map_err(|error| LoadError::Vmx {
        what: "VMXON",
        error,
    })?;
    log!("VMX on (VMCS revision {:#x})", caps.revision_id());
    let page_1g = ihmi_rt::cpu::cpuid(0x8000_0001, 0)[3] & CPUID_80000001_EDX_PAGE1GB != 0;
    Ok(Vmx {
        caps,
        features,
        page_1g,
        vmxon,
    })
}
