//! Everything the exit handler needs, kept in one static: the exit stub calls a plain function, so
//! L0's state cannot travel in its arguments. It is written once, just before the first VM entry,
//! and from then on reached only through [`get`], once per exit.

use core::cell::UnsafeCell;

use ihmi_addr::Gpa;
use ihmi_ept::EptView;
use ihmi_hv::{Hypervisor, MemoryMap};
use ihmi_judge::Judge;
use ihmi_vmcs::VmcsId;
use ihmi_vmx::Vmcss;

use crate::frames::Pool;
use crate::monitor::Loaded;
use crate::outbox::MonitorVm;
use crate::platform::HwPlatform;
use crate::ranges::Ranges;

/// What the exit policy's platform works on.
pub struct Machine {
    /// The guest's EPT view and the frames it may still need (a Linux guest's hook changes it).
    pub guest_view: EptView,
    pub frames: Pool,
    /// The guest's memory map, which fences every access L0 makes on the guest's behalf.
    pub fence: MemoryMap,
    /// The monitor words the exit policy may have L0 write (the Linux gate's kernel entries).
    pub monitor_words: Option<[GrantedWord; 3]>,
    /// The in-hypervisor monitor's VMCS registry, which L0 reads (never writes) for the rogue-VMCS
    /// check (`Platform::vmcs_registered`).
    pub vmcs_registry: Option<Gpa>,
    /// EPT02's tables, with nested EPT.
    pub ept02: Option<crate::frames::Ept02Pool>,
    /// How many times the exit policy changed the guest's view (`Platform::guest_view_generation`).
    pub view_generation: u64,
}

/// A word of monitor memory L0 may write for the exit policy, and what it last wrote there (its value
/// at load until then): the monitor's integrity check expects exactly that value in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantedWord {
    pub at: Gpa,
    pub value: u64,
}

impl Machine {
    /// The platform for one exit.
    pub fn platform(&mut self) -> HwPlatform<'_> {
        HwPlatform {
            guest_view: &mut self.guest_view,
            frames: &mut self.frames,
            fence: &self.fence,
            monitor_words: self.monitor_words.as_mut(),
            vmcs_registry: self.vmcs_registry,
            ept02: self.ept02.as_mut(),
            view_generation: &mut self.view_generation,
        }
    }
}

/// L0 after boot.
pub struct L0State {
    pub hv: Hypervisor,
    /// Every VMCS, and which one is current.
    pub vmcss: Vmcss,
    /// The guest's VMCS.
    pub guest_vmcs: VmcsId,
    /// The VMCS the guest's own guest runs on (VMCS02), when nested VMX is offered.
    pub nested_vmcs: Option<VmcsId>,
    /// The guest's shadow VMCS, with VMCS shadowing.
    pub shadow_vmcs: Option<ihmi_addr::Hpa>,
    /// The out-of-box monitor VM, when the scenario runs one.
    pub outbox: Option<MonitorVm>,
    /// Whether the in-hypervisor monitor's hook in L1's KVM keeps firing (P7).
    pub hook_liveness: ihmi_hv::nested::liveness::HookLiveness,
    /// The in-VM monitor, when the scenario runs one.
    pub monitor: Option<Loaded>,
    /// The scenario's judge: it observes the exits and the monitor's events.
    pub judge: Judge,
    /// The frame the test guest is told to probe (`ept-guard`).
    pub probe: Gpa,
    /// The guest kernel's code (where its hooks are).
    pub guest_code: Ranges,
    /// The test guest's hook gate pointer.
    pub hook: Option<Gpa>,
    pub machine: Machine,
}

struct StateCell(UnsafeCell<Option<L0State>>);
// SAFETY: L0 runs on one CPU with interrupts off. The state is written once before the first VM entry
// and afterwards touched only by the exit handlers, which never nest (exits cannot happen while L0
// runs) and each take it once.
unsafe impl Sync for StateCell {}
static STATE: StateCell = StateCell(UnsafeCell::new(None));

/// Puts the state in place for the exit handlers; returns it for the launch.
pub fn install(state: L0State) -> &'static mut L0State {
    // SAFETY: called once, at boot on the only CPU, before the first VM entry: no exit handler runs
    // and no other reference to the cell exists.
    let cell = unsafe { &mut *STATE.0.get() };
    cell.insert(state)
}

/// The state, for one exit handler.
///
/// # Safety
/// 1. Called at most once per VM exit, by the handler the exit stub calls, and the reference does
///    not outlive that handler (the next exit takes it again).
/// 2. [`install`] has run and its reference is no longer used (L0 has entered the guest).
pub unsafe fn get() -> Option<&'static mut L0State> {
    // SAFETY: preconditions 1 and 2: this is the only live reference to the cell.
    unsafe { (*STATE.0.get()).as_mut() }
}
