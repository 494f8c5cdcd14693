//! The nested entry and exit paths on the hypervisor: L1's VMLAUNCH or VMRESUME that passed every
//! check becomes an entry to L2 on VMCS02 ([`NestedSwitch::ToL2`]); an exit from L2 is either
//! L1's, saved into its VMCS12 and reflected ([`NestedSwitch::ToL1`]), or L0's own, handled as
//! L1's would be, and L2 goes on (with the event it was delivering re-injected).
//!
//! L0's exit stub saves and restores the general-purpose registers around every exit, and a VMX
//! transition changes none of them but RSP and RIP (SDM 27.3, 28.5): L2 starts with the registers L1
//! had at its VMLAUNCH, and L1 gets L2's at an exit, as on a CPU.

use ihmi_addr::{Gpa, Gva};
use ihmi_ept::Perm;
use ihmi_vmcs::fields::{control, guest};
use ihmi_vmcs::{
    EptViolationQualification, ExitInformation, ExitReason, InterruptionInfo, VmExit, VmcsField,
};

use super::ept::{self, Walk};
use super::l2::{self, Owner};
use super::msr_area::Area;
use super::vmx::Level;
use crate::policy::io::INTERCEPTED_PORTS;
use crate::vcpu::{gpr, set_gpr};
use crate::{
    policy, skip_instruction, Action, Alert, GuestEnd, Hypervisor, NestedSwitch, Observation,
    Observer, Platform, RegionKind, Vcpu,
};

/// The costs of the nested path so far (L0's end-of-run report; `ihmi bench --nested` to come).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NestedStats {
    /// Entries to L2 (VMLAUNCH and VMRESUME that passed their checks).
    pub entries: u64,
    /// Exits from L2.
    pub l2_exits: u64,
    /// Of those, the ones that went to L1.
    pub reflected: u64,
    /// Entries L1 asked for that failed the guest-state checks (an exit to L1 with reason 33).
    pub entry_failures: u64,
    /// L0 exits from the last reflected exit up to now, while L1 handles it.
    pub(crate) pending_round_trip: Option<RoundTrip>,
    /// The round trips of reflected exits (see [`Observation::L2Entry`]): their sum and largest.
    pub round_trip_total: u64,
    pub round_trip_max: u64,
    pub round_trips: u64,
    /// Of the L1 exits in those round trips, VMREADs and VMWRITEs (what VMCS shadowing removes), and
    /// the others but the VMRESUMEs.
    pub round_trip_vmread_vmwrite: u64,
    pub round_trip_other: u64,
    /// The round trips of reflected CPUID exits alone (NESTED.md A.6's measure, the same work for
    /// any L1): how many, their L0 exits, the most in one.
    pub cpuid_round_trips: u64,
    pub cpuid_round_trip_total: u64,
    pub cpuid_round_trip_max: u64,
    /// The same for reflected page faults (shadow paging in L1: each is L2 touching a page its
    /// hypervisor had not mapped yet): how many, their L0 exits.
    pub page_fault_round_trips: u64,
    pub page_fault_round_trip_total: u64,
}

/// The L0 exits of one reflected exit so far: all of them, and L1's VMREADs/VMWRITEs and other
/// exits among them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RoundTrip {
    /// Whether the reflected exit was a CPUID, or a page fault.
    cpuid: bool,
    page_fault: bool,
    exits: u64,
    vmread_vmwrite: u64,
    other: u64,
}

/// The page-fault exception's vector.
const PF_VECTOR: u8 = 14;

impl Hypervisor {
    /// Whether L2 is running (VMCS02 current).
    #[must_use]
    pub fn in_l2(&self) -> bool {
        self.nested.as_ref().is_some_and(|n| n.level == Level::L2)
    }

    /// An exit of L1's while it handles a reflected exit: counted into the round trip, and by kind.
    pub(crate) fn count_l1_exit(&mut self, reason: ExitReason) {
        let Some(n) = self.nested.as_mut() else {
            return;
        };
        let Some(c) = n.stats.pending_round_trip.as_mut() else {
            return;
        };
        c.exits += 1;
        match reason {
            ExitReason::Vmread | ExitReason::Vmwrite => c.vmread_vmwrite += 1,
            ExitReason::Vmresume | ExitReason::Vmlaunch => {}
            _ => c.other += 1,
        }
    }

    /// After L0 made the VMCS of `NestedSwitch` current, as [`Action::SwitchVmcs`] asked: VMCS02 is
    /// written for L2 from VMCS12 and L0's controls, or VMCS01 gets L1's host state back.
    pub fn on_vmcs_switched(
        &mut self,
        vcpu: &mut impl Vcpu,
        obs: &mut impl Observer,
        to: NestedSwitch,
    ) -> Action {
        let Some(n) = self.nested.as_mut() else {
            return Action::End(GuestEnd::L0Stopped {
                why: "a nested-VMX switch without nested VMX",
            });
        };
        let l0 = n.l0;
        let launch = n.launching;
        let ept02 = n.vmcs02_eptp;
        let Some(v) = n.current_mut() else {
            return Action::End(GuestEnd::L0Stopped {
                why: "a nested-VMX switch without a current VMCS12",
            });
        };
        match to {
            NestedSwitch::ToL2 => {
                l2::write_vmcs02(v, &l0, ept02, vcpu);
                v.launched = true;
                n.level = Level::L2;
                n.stats.entries += 1;
                let finished = n.stats.pending_round_trip.take();
                if let Some(r) = finished {
                    n.stats.round_trips += 1;
                    n.stats.round_trip_total += r.exits;
                    n.stats.round_trip_max = n.stats.round_trip_max.max(r.exits);
                    n.stats.round_trip_vmread_vmwrite += r.vmread_vmwrite;
                    n.stats.round_trip_other += r.other;
                    if r.cpuid {
                        n.stats.cpuid_round_trips += 1;
                        n.stats.cpuid_round_trip_total += r.exits;
                        n.stats.cpuid_round_trip_max = n.stats.cpuid_round_trip_max.max(r.exits);
                    }
                    if r.page_fault {
                        n.stats.page_fault_round_trips += 1;
                        n.stats.page_fault_round_trip_total += r.exits;
                    }
                }
                let round_trip = finished.map(|r| r.exits);
                obs.observe(Observation::L2Entry { launch, round_trip });
            }
            NestedSwitch::ToL1 => {
                l2::load_l1_host_state(v, vcpu);
                n.level = Level::L1;
                // L1 reads the exit's information and L2's state from the shadow.
                self.shadow_load(vcpu);
            }
        }
        Action::Resume
    }

    /// L1's entry passed the checks before it (SDM 27.1-27.2); the guest-state checks (27.3) decide
    /// between an entry to L2 and an exit to L1 with reason 33. `Ok(SwitchVmcs(ToL2))` when the
    /// entry goes on, `Ok(Resume)` when it failed (L1 is at its host state already), `Err` for what
    /// L0 does not emulate yet.
    pub(crate) fn nested_entry(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        launch: bool,
    ) -> Result<Action, &'static str> {
        let Some(n) = self.nested.as_mut() else {
            return Err("no nested VMX");
        };
        let offer = *n.offer();
        let Some(v) = n.current_mut() else {
            return Err("no current VMCS12");
        };
        // The guest-state checks (SDM 27.3), then the VM-entry MSR-load area (SDM 26.4): an entry
        // L0 cannot load fails the VM entry with reason 34 and the entry's number.
        let mut l1_area_msrs = None;
        let failure = match super::entry::check_guest_state(v, &offer) {
            Err(why) => {
                platform.log(format_args!(
                    "nested: VM entry to L2 failed the guest-state checks: {why}"
                ));
                Some((ExitReason::EntryFailInvalidGuestState, 0))
            }
            Ok(()) => {
                let entry_load = area(
                    v,
                    control::VMENTRY_MSR_LOAD_COUNT,
                    control::VMENTRY_MSR_LOAD_ADDR_FULL,
                );
                // L1's values, should the CPU still fail the entry (VMCS02's guest state) after L0
                // loaded L2's.
                l1_area_msrs = (entry_load.count != 0)
                    .then(|| super::msr_area::AREA_MSRS.map(|m| platform.read_msr(m)));
                entry_load.load(platform, &self.memory).err().map(|number| {
                    platform.log(format_args!(
                        "nested: VM entry to L2 failed loading entry {number} of its MSR-load area (L0 loads STAR, FMASK and KERNEL_GS_BASE, with values WRMSR takes)"
                    ));
                    (ExitReason::EntryFailMsrLoading, number)
                })
            }
        };
        // Either failure is an exit to L1 at its host state, with its VM-exit MSR-load area
        // loaded, as after any VM-entry failure once guest state is loaded (SDM 26.8).
        if let Some((reason, qualification)) = failure {
            let info = ExitInformation::entry_failure(reason, qualification);
            for (f, value) in info.fields() {
                let _ = v.set(f, value);
            }
            l2::load_l1_host_state(v, vcpu);
            let exit_load = area(
                v,
                control::VMEXIT_MSR_LOAD_COUNT,
                control::VMEXIT_MSR_LOAD_ADDR_FULL,
            );
            n.stats.entry_failures += 1;
            if let Err(entry) = exit_load.load(platform, &self.memory) {
                return Ok(Action::End(GuestEnd::VmxAbort {
                    indicator: 4,
                    entry,
                }));
            }
            self.shadow_load(vcpu);
            return Ok(Action::Resume);
        }
        let eptp12 = l2::l1_eptp(v);
        n.l1_area_msrs = l1_area_msrs;
        n.l0 = l2::L0Controls::read(vcpu);
        n.launching = launch;
        n.vmcs02_eptp = match eptp12 {
            None => None,
            Some(eptp12) => Some(Self::ept02_for(n, platform, eptp12)?),
        };
        // L2's LSTAR and CSTAR, where L1 set others than its own locked ones, go in for L2.
        for (i, &msr) in super::vmx::L2_ENTRY_MSRS.iter().enumerate() {
            if let Some(value) = n.l2_entry_msrs[i] {
                n.l1_entry_msrs[i] = platform.read_msr(msr);
                platform.write_msr(msr, value);
            }
        }
        Ok(Action::SwitchVmcs(NestedSwitch::ToL2))
    }

    /// EPT02 for `eptp12`, a new one (and the CPU's cached translations of the old one dropped)
    /// when the last entry used another EPTP12 or none, or L0's view of L1 changed since; its
    /// EPTP.
    fn ept02_for(
        n: &mut super::vmx::NestedVmx,
        platform: &mut impl Platform,
        eptp12: u64,
    ) -> Result<u64, &'static str> {
        let generation = platform.guest_view_generation();
        if let Some(e) = n
            .ept02
            .as_ref()
            .filter(|e| e.eptp12 == eptp12 && e.view_generation == generation)
        {
            return Ok(e.eptp().raw());
        }
        let tables = platform
            .ept02_tables()
            .ok_or("nested EPT without tables for EPT02")?;
        let mut fresh =
            ept::Ept02::new(tables, eptp12, generation).map_err(|_| "no room for EPT02's root")?;
        // The costs go on across EPTP12s: the old EPT02 was emptied for the new one.
        if let Some(old) = &n.ept02 {
            fresh.fills = old.fills;
            fresh.resets = old.resets + 1;
        }
        let eptp = fresh.eptp();
        n.ept02 = Some(fresh);
        platform.invept(eptp);
        Ok(eptp.raw())
    }

    /// An exit while L2 runs (VMCS02 current).
    pub(crate) fn on_l2_exit(
        &mut self,
        exit: VmExit,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
    ) -> Action {
        let memory = &self.memory;
        let Some(n) = self.nested.as_mut() else {
            return Action::End(GuestEnd::L0Stopped {
                why: "an L2 exit without nested VMX",
            });
        };
        let (l0, launching) = (n.l0, n.launching);
        n.stats.l2_exits += 1;
        // L0 took rights away in its view of L1 since EPT02 was built from it: EPT02 starts over.
        let generation = platform.guest_view_generation();
        if let Some(e) = n.ept02.as_mut().filter(|e| e.view_generation != generation) {
            if let Some(tables) = platform.ept02_tables() {
                if e.reset(tables).is_err() {
                    return Action::End(GuestEnd::L0Stopped {
                        why: "no room for EPT02's root",
                    });
                }
                e.view_generation = generation;
                platform.invept(e.eptp());
                if n.vmcs02_eptp.is_some() {
                    vcpu.write(control::EPTP_FULL, e.eptp().raw());
                    n.vmcs02_eptp = Some(e.eptp().raw());
                }
            }
        }
        let Some(v) = n.current_mut() else {
            return Action::End(GuestEnd::L0Stopped {
                why: "an L2 exit without a current VMCS12",
            });
        };
        let read_l1 = |p: &dyn Platform, at: u64| {
            let gpa = ihmi_addr::Gpa::new(at);
            if !memory.is_guest_ram(gpa, 1) {
                return None;
            }
            let mut b = [0u8; 1];
            p.read_guest(gpa, &mut b).ok().map(|()| b[0])
        };
        // Nested EPT: what L1's EPT says of the page L2 touched decides whose the exit is.
        let mut walk = None;
        let mut reason = exit.reason();
        let mut qualification = None;
        let mut reflected_page = None;
        let eptp12 = l2::l1_eptp(v);
        let owner = match exit {
            // VMCS02 failed an entry check L0 did not make itself: that is L1's guest state, and a
            // VMLAUNCH that fails leaves the VMCS clear.
            VmExit::EntryFailure { .. } => {
                if launching {
                    v.launched = false;
                }
                Owner::L1
            }
            VmExit::EptViolation {
                gpa,
                qualification: q,
                ..
            } if eptp12.is_some() => {
                let w = ept::walk(&*platform, eptp12.unwrap_or(0), gpa);
                walk = Some(w);
                match w {
                    Walk::Mapped { perm, .. } if perm.contains(ept::needed(q)) => Owner::L0,
                    Walk::Unreadable { .. } => Owner::L0,
                    // EPT12 does not allow it: L1's EPT violation, with EPT12's rights in it.
                    Walk::Mapped { perm, .. } => {
                        qualification = Some(ept::reflected_qualification(q, perm));
                        reflected_page = Some(gpa);
                        Owner::L1
                    }
                    Walk::NotPresent => {
                        qualification = Some(ept::reflected_qualification(q, Perm::empty()));
                        reflected_page = Some(gpa);
                        Owner::L1
                    }
                    // EPT12 is malformed: an EPT misconfiguration of L1's (no qualification).
                    Walk::Misconfig => {
                        reason = ExitReason::EptMisconfig;
                        qualification = Some(0);
                        reflected_page = Some(gpa);
                        Owner::L1
                    }
                }
            }
            _ => l2::owner(&exit, v, vcpu, &*platform, read_l1),
        };
        let info = ExitInformation::read(|f| vcpu.read(f));
        if owner == Owner::L1 {
            l2::save_l2_state(v, &l0, vcpu);
            let mut info12 = info;
            if let Some(q) = qualification {
                info12.reason = u32::from(reason.number());
                info12.qualification = q;
            }
            for (f, value) in info12.fields() {
                let _ = v.set(f, value);
            }
            let store = area(
                v,
                control::VMEXIT_MSR_STORE_COUNT,
                control::VMEXIT_MSR_STORE_ADDR_FULL,
            );
            let load = area(
                v,
                control::VMEXIT_MSR_LOAD_COUNT,
                control::VMEXIT_MSR_LOAD_ADDR_FULL,
            );
            // What EPT02 had for that page goes: L1 may map it anew without INVEPT, as the
            // violation dropped what the CPU had cached of it.
            if let (Some(page), Some(e)) = (reflected_page, n.ept02.as_mut()) {
                if let Some(tables) = platform.ept02_tables() {
                    e.drop_page(tables, page);
                }
            }
            n.stats.reflected += 1;
            if matches!(exit, VmExit::EntryFailure { .. }) {
                // The CPU failed VMCS02's entry, which a CPU does before it loads an MSR: L1's
                // values of the ones L0 loaded for it come back, and nothing is stored (SDM 26.8).
                if let Some(saved) = n.l1_area_msrs.take() {
                    for (&msr, value) in super::msr_area::AREA_MSRS.iter().zip(saved) {
                        platform.write_msr(msr, value);
                    }
                }
            } else if let Err(entry) = store.store(platform, memory) {
                // L1's VM-exit MSR-store area gets L2's values (SDM 28.4)...
                return Action::End(GuestEnd::VmxAbort {
                    indicator: 1,
                    entry,
                });
            }
            // L1's own LSTAR and CSTAR (the locked ones) are back before L1 runs again.
            for (i, &msr) in super::vmx::L2_ENTRY_MSRS.iter().enumerate() {
                if n.l2_entry_msrs[i].is_some() {
                    platform.write_msr(msr, n.l1_entry_msrs[i]);
                }
            }
            // ...and its VM-exit MSR-load area is loaded (SDM 28.6).
            if let Err(entry) = load.load(platform, memory) {
                return Action::End(GuestEnd::VmxAbort {
                    indicator: 4,
                    entry,
                });
            }
            // This exit and the entry that ends L1's handling of it count; L1's exits in between add.
            n.stats.pending_round_trip = Some(RoundTrip {
                cpuid: reason == ExitReason::Cpuid,
                page_fault: matches!(exit, VmExit::Exception { info, .. } if info.vector() == PF_VECTOR),
                exits: 1,
                ..RoundTrip::default()
            });
            obs.observe(Observation::L2Exit {
                reason,
                reflected: true,
            });
            return Action::SwitchVmcs(NestedSwitch::ToL1);
        }
        obs.observe(Observation::L2Exit {
            reason,
            reflected: false,
        });
        let action = match (exit, walk) {
            (
                VmExit::EptViolation {
                    gpa,
                    gla,
                    qualification,
                },
                Some(Walk::Mapped { l1, perm }),
            ) => self.fill_ept02(
                vcpu,
                platform,
                obs,
                (gpa, gla, qualification, info.idt_vectoring_info),
                l1,
                perm,
            ),
            (VmExit::EptViolation { .. }, Some(Walk::Unreadable { table })) => {
                platform.log(format_args!(
                    "nested: L1's EPT has a table at {table}, which is not its RAM"
                ));
                if let Some(region @ (RegionKind::L0 | RegionKind::Monitor)) =
                    self.memory.classify(table)
                {
                    let rip = vcpu.read(guest::RIP);
                    let alert = Alert::VmxPointerRefused {
                        gpa: table,
                        region,
                        rip,
                    };
                    self.alert(platform, obs, alert);
                }
                Action::End(GuestEnd::L0Stopped {
                    why: "L1's EPT has a table outside its RAM",
                })
            }
            _ => self.l0_handles_l2_exit(exit, vcpu, platform, obs),
        };
        // An event L2 was being delivered when L0 took the exit is delivered again (SDM 28.2.4),
        // unless the handler injected one of its own.
        let vectoring = InterruptionInfo::from_raw(info.idt_vectoring_info);
        if action == Action::Resume && vectoring.valid() {
            let pending = InterruptionInfo::from_raw(
                vcpu.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32,
            );
            if !pending.valid() {
                // Bit 12 of the vectoring information is undefined; the injection field reserves it.
                vcpu.write(
                    control::VMENTRY_INTERRUPTION_INFO_FIELD,
                    u64::from(vectoring.raw() & !(1 << 12)),
                );
                if vectoring.error_code_valid() {
                    vcpu.write(
                        control::VMENTRY_EXCEPTION_ERR_CODE,
                        u64::from(info.idt_vectoring_error),
                    );
                }
                vcpu.write(
                    control::VMENTRY_INSTRUCTION_LEN,
                    u64::from(info.instruction_len),
                );
            }
        }
        action
    }

    /// Nested EPT: L2's access at `l2` that EPT12 allows (to `l1`, with `perm12`) goes into EPT02,
    /// with the rights of EPT12 and of L0's own view of L1's page both, and L2 goes on. An access
    /// L0's view does not give L1 is L0's EPT violation at `l1`, as if L1 had made it (an L0 or
    /// monitor frame ends the guest, naming it; a locked page of a Linux L1 alerts too).
    fn fill_ept02(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        (l2, gla, qualification, vectoring): (Gpa, Option<Gva>, EptViolationQualification, u32),
        l1: Gpa,
        perm12: Perm,
    ) -> Action {
        let needed = ept::needed(qualification);
        let Some(m) = platform
            .guest_mapping(l1)
            .filter(|m| m.perm.contains(needed))
        else {
            if let Some(region @ (RegionKind::L0 | RegionKind::Monitor)) = self.memory.classify(l1)
            {
                let page = |a: Gpa| a.align_down(ihmi_addr::PAGE_SIZE);
                let alert = Alert::Ept12MappingRefused {
                    l2: page(l2),
                    l1: page(l1),
                    region,
                };
                self.alert(platform, obs, alert);
            }
            return self.on_ept_violation(vcpu, platform, obs, l1, gla, qualification);
        };
        let Some(e) = self.nested.as_mut().and_then(|n| n.ept02.as_mut()) else {
            return Action::End(GuestEnd::L0Stopped {
                why: "an EPT violation of L2's without EPT02",
            });
        };
        let Some(tables) = platform.ept02_tables() else {
            return Action::End(GuestEnd::L0Stopped {
                why: "nested EPT without tables for EPT02",
            });
        };
        match e.fill(tables, l2, m, perm12 & m.perm) {
            Ok(emptied) => {
                // The EPT violation itself dropped what the CPU cached for this address (SDM
                // 29.4.3.1); when EPT02 started over (maybe at another root), it forgets all of it.
                if emptied {
                    let eptp = e.eptp();
                    platform.invept(eptp);
                    vcpu.write(control::EPTP_FULL, eptp.raw());
                    if let Some(n) = self.nested.as_mut() {
                        n.vmcs02_eptp = Some(eptp.raw());
                    }
                }
                // A violation in an IRET that unblocked NMIs: L2 resumes with them blocked again,
                // as the IRET left them (SDM 28.2.3), unless an event's delivery was interrupted.
                let vectoring = InterruptionInfo::from_raw(vectoring);
                if qualification.raw() & (1 << 12) != 0 && !vectoring.valid() {
                    let state = vcpu.read(guest::INTERRUPTIBILITY_STATE);
                    vcpu.write(guest::INTERRUPTIBILITY_STATE, state | 1 << 3);
                }
                Action::Resume
            }
            Err(why) => {
                platform.log(format_args!(
                    "nested: EPT02 could not map L2's {l2} (L1's {l1}): {why:?}"
                ));
                Action::End(GuestEnd::L0Stopped {
                    why: "EPT02 could not map a page of L2's",
                })
            }
        }
    }

    /// An exit from L2 that L1 did not ask for: L0's own controls caused it, and L0 does what it
    /// does for L1 (its I/O ports, its MSR policy, its EPT), or passes the access through as L1's
    /// own setup would.
    fn l0_handles_l2_exit(
        &mut self,
        exit: VmExit,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
    ) -> Action {
        let rip = vcpu.read(guest::RIP);
        let unhandled = |reason, qualification| {
            Action::End(GuestEnd::Unhandled {
                reason,
                qualification,
                rip,
            })
        };
        match exit {
            // L0's exception bitmap, not L1's: the exception is L2's to take.
            VmExit::Exception {
                info,
                error_code,
                instruction_len,
            } => policy::exception::reinject(vcpu, info, error_code, instruction_len),
            VmExit::Nmi { .. } => {
                policy::exception::reinject(vcpu, InterruptionInfo::nmi(), None, 0)
            }
            VmExit::PreemptionTimer => Action::Resume,
            VmExit::Io {
                qualification,
                instruction,
            } => {
                let port = qualification.port();
                if INTERCEPTED_PORTS.contains(&port) {
                    return self.on_io(vcpu, platform, obs, qualification, instruction);
                }
                if qualification.is_string() || qualification.size() != 1 {
                    // L1 lets L2 reach this port; L0 passes single bytes through and has no emulation
                    // of string or wider accesses to the devices.
                    platform.log(format_args!(
                        "nested: L2's {}-byte{} access to port {port:#x} is not passed through",
                        qualification.size(),
                        if qualification.is_string() {
                            " string"
                        } else {
                            ""
                        }
                    ));
                    return unhandled(ExitReason::IoInstruction, qualification.raw());
                }
                if qualification.is_in() {
                    let value = platform.port_in(port);
                    let rax = gpr(vcpu, ihmi_vmcs::Gpr::Rax);
                    set_gpr(vcpu, ihmi_vmcs::Gpr::Rax, (rax & !0xff) | u64::from(value));
                } else {
                    let value = gpr(vcpu, ihmi_vmcs::Gpr::Rax) as u8;
                    platform.port_out(port, value);
                }
                skip_instruction(vcpu, instruction);
                Action::Resume
            }
            VmExit::Rdmsr(i) | VmExit::Wrmsr(i) => {
                let write = matches!(exit, VmExit::Wrmsr(_));
                let msr = vcpu.regs().rcx as u32;
                if let Some(action) = self.l2_entry_msr(vcpu, platform, i, msr, write) {
                    return action;
                }
                if l0_takes_msr(msr, write) {
                    // L0's policy, as for L1's own access (VMCS02 has no MSR bitmap: L0 decides).
                    return if write {
                        self.on_wrmsr(vcpu, platform, obs, i)
                    } else {
                        self.on_rdmsr(vcpu, platform, obs, i)
                    };
                }
                match l2_msr(vcpu, platform, msr, write) {
                    Some(true) => {
                        skip_instruction(vcpu, i);
                        Action::Resume
                    }
                    Some(false) => Action::Resume,
                    None => {
                        platform.log(format_args!(
                            "nested: L2's {} of MSR {msr:#x}, which L1 passes through, is not emulated",
                            if write { "WRMSR" } else { "RDMSR" }
                        ));
                        unhandled(exit.reason(), u64::from(msr))
                    }
                }
            }
            VmExit::Hlt(i) => policy::exception::on_hlt(vcpu, i),
            VmExit::EptViolation {
                gpa,
                gla,
                qualification,
            } => self.on_ept_violation(vcpu, platform, obs, gpa, gla, qualification),
            VmExit::EptMisconfig { gpa } => Action::End(GuestEnd::EptMisconfig { gpa }),
            VmExit::CrAccess { qualification, .. } => {
                // Only CR4.VMXE is L0's alone; L2 changing it without L1 masking it is not emulated.
                platform.log(format_args!(
                    "nested: L2's control-register access {:#x} is L0's only and not emulated",
                    qualification.raw()
                ));
                unhandled(ExitReason::CrAccess, qualification.raw())
            }
            other => unhandled(other.reason(), 0),
        }
    }

    /// L2's access to a system-call entry MSR that L1 passes through: L2's own, never L1's (which
    /// L0 may have locked): IA32_SYSENTER_EIP in VMCS02; IA32_LSTAR and IA32_CSTAR in the CPU
    /// while L2 runs, kept as L2's to load at each entry, with L1's put back at each exit to L1.
    /// `None` for any other MSR.
    fn l2_entry_msr(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        instruction: ihmi_vmcs::Instruction,
        msr: u32,
        write: bool,
    ) -> Option<Action> {
        if msr == ihmi_arch::msr::IA32_SYSENTER_EIP {
            if l2_msr(vcpu, platform, msr, write) == Some(true) {
                skip_instruction(vcpu, instruction);
            }
            return Some(Action::Resume);
        }
        let slot = super::vmx::L2_ENTRY_MSRS.iter().position(|&m| m == msr)?;
        let n = self.nested.as_mut()?;
        if write {
            let value = vcpu.regs().edx_eax();
            if !super::entry::canonical(value) {
                crate::inject_exception(vcpu, ihmi_arch::vector::GP, Some(0));
                return Some(Action::Resume);
            }
            if n.l2_entry_msrs[slot].is_none() {
                n.l1_entry_msrs[slot] = platform.read_msr(msr);
            }
            n.l2_entry_msrs[slot] = Some(value);
            platform.write_msr(msr, value);
        } else {
            let value = platform.read_msr(msr);
            vcpu.regs().set_edx_eax(value);
        }
        skip_instruction(vcpu, instruction);
        Some(Action::Resume)
    }

    /// The round trip of reflected exits so far, for the end-of-run report.
    #[must_use]
    pub fn nested_stats(&self) -> Option<NestedStats> {
        self.nested.as_ref().map(|n| n.stats)
    }
}

/// Whether L0's MSR policy takes this access when L1 runs (its bitmap intercepts it, or the MSR is
/// outside the bitmap's ranges, where every access exits).
fn l0_takes_msr(msr: u32, write: bool) -> bool {
    use crate::policy::msr::{is_intercepted, READ_INTERCEPTED, WRITE_INTERCEPTED};
    let one_way = if write {
        WRITE_INTERCEPTED
    } else {
        READ_INTERCEPTED
    };
    ihmi_vmcs::MsrBitmap::bit_of(msr, write).is_none()
        || is_intercepted(msr)
        || one_way.iter().any(|&(a, b)| (a..=b).contains(&msr))
}

/// An MSR access of L2's that L1 passes through and L0 does not intercept: those whose value lives
/// in the VMCS (VM entry loads them, VM exit saves them) are read and written there, and
/// IA32_KERNEL_GS_BASE, which no VMX transition switches and L0 never uses, in the CPU (where L1
/// put L2's before the entry: KVM passes it through); `None` for the rest, which L0 cannot reach
/// safely from root operation (the physical MSR may be L0's, and one that does not exist would
/// fault in L0). `Some(true)`: done, step past it; `Some(false)`: the instruction faulted instead.
fn l2_msr(
    vcpu: &mut impl Vcpu,
    platform: &mut impl Platform,
    msr: u32,
    write: bool,
) -> Option<bool> {
    use ihmi_arch::msr::{
        IA32_FS_BASE, IA32_GS_BASE, IA32_KERNEL_GSBASE, IA32_SYSENTER_CS, IA32_SYSENTER_EIP,
        IA32_SYSENTER_ESP,
    };
    let field = match msr {
        IA32_FS_BASE => Some(guest::FS_BASE),
        IA32_GS_BASE => Some(guest::GS_BASE),
        IA32_SYSENTER_CS => Some(guest::IA32_SYSENTER_CS),
        IA32_SYSENTER_ESP => Some(guest::IA32_SYSENTER_ESP),
        IA32_SYSENTER_EIP => Some(guest::IA32_SYSENTER_EIP),
        IA32_KERNEL_GSBASE => None,
        _ => return None,
    };
    if write {
        let value = vcpu.regs().edx_eax();
        if msr != IA32_SYSENTER_CS && !super::entry::canonical(value) {
            // A non-canonical base or address: WRMSR's #GP(0).
            crate::inject_exception(vcpu, ihmi_arch::vector::GP, Some(0));
            return Some(false);
        }
        match field {
            Some(f) => vcpu.write(f, value),
            None => platform.write_msr(msr, value),
        }
    } else {
        let value = match field {
            Some(f) => vcpu.read(f),
            None => platform.read_msr(msr),
        };
        vcpu.regs().set_edx_eax(value);
    }
    Some(true)
}

/// One of VMCS12's MSR areas, by its count and address fields.
fn area(v: &super::vmcs12::Vmcs12, count: VmcsField, base: VmcsField) -> Area {
    Area {
        base: v.read(base).unwrap_or(0),
        count: v.read(count).unwrap_or(0),
    }
}
