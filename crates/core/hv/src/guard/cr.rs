//! Pinning a booted kernel's protection bits in CR0 and CR4: CR0.WP (supervisor writes honour
//! read-only pages, which keeps the kernel's own read-only-after-init data read-only), CR4.SMEP (no
//! supervisor execution of user pages) and CR4.SMAP (no supervisor access to user pages outside
//! STAC/CLAC windows). When the Linux gate opens, the bits the kernel has set are pinned through the
//! CR guest/host masks (SDM 25.6.6), so a MOV to CR0 or CR4 that would clear one exits; L0 refuses it
//! with #GP and a `cr-pin-refused` alert, and the register keeps its value. A write that keeps them set
//! makes no exit, so the kernel's own CR4 traffic (PGE toggles for TLB flushes) costs nothing.
//!
//! The same masks already hide CR4.VMXE, which L0 keeps set for itself: a guest that sets it while
//! L0 offers no VMX gets the #GP a CPU without VMX gives.

use core::fmt;

use ihmi_arch::cr::{CR0_WP, CR4_SMAP, CR4_SMEP, CR4_VMXE};
use ihmi_arch::vector::GP;
use ihmi_vmcs::fields::{control, guest};
use ihmi_vmcs::{CrAccessQualification, CrAccessType};

use crate::{gpr, inject_exception, Action, Alert, GuestEnd, Hypervisor, Observer, Platform, Vcpu};

/// The CR0 bits L0 pins once the kernel has set them.
pub const CR0_PINNED: u64 = CR0_WP;
/// The CR4 bits L0 pins once the kernel has set them.
pub const CR4_PINNED: u64 = CR4_SMEP | CR4_SMAP;

/// The bits pinned in each register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrPins {
    pub cr0: u64,
    pub cr4: u64,
}

impl CrPins {
    /// The pins of control register `cr` (0 or 4).
    #[must_use]
    pub const fn of(self, cr: u8) -> u64 {
        if cr == 0 {
            self.cr0
        } else {
            self.cr4
        }
    }
}

/// The names of the pinned bits in `bits` of CR`cr`, for the console.
#[derive(Clone, Copy, Debug)]
pub struct PinNames {
    pub cr: u8,
    pub bits: u64,
}

impl fmt::Display for PinNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: &[(u64, &str)] = if self.cr == 0 {
            &[(CR0_WP, "WP")]
        } else {
            &[(CR4_SMEP, "SMEP"), (CR4_SMAP, "SMAP")]
        };
        let mut first = true;
        for &(bit, name) in names {
            if self.bits & bit != 0 {
                write!(f, "{}CR{}.{name}", if first { "" } else { ", " }, self.cr)?;
                first = false;
            }
        }
        if first {
            write!(f, "nothing in CR{}", self.cr)?;
        }
        Ok(())
    }
}

impl Hypervisor {
    /// Pins the protection bits the guest kernel has set now (its boot is over: the gate is opening).
    pub(crate) fn pin_control_registers(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
    ) {
        let Some(guard) = self.guard.as_mut() else {
            return;
        };
        let cr0 = vcpu.read(guest::CR0);
        let cr4 = vcpu.read(guest::CR4);
        let pins = CrPins {
            cr0: cr0 & CR0_PINNED,
            cr4: cr4 & CR4_PINNED,
        };
        // The read shadow answers for the masked bits: the guest reads them as it set them.
        vcpu.write(control::CR0_READ_SHADOW, cr0);
        vcpu.write(control::CR0_GUEST_HOST_MASK, pins.cr0);
        let shadow = vcpu.read(control::CR4_READ_SHADOW);
        vcpu.write(control::CR4_READ_SHADOW, (shadow & !CR4_PINNED) | pins.cr4);
        vcpu.write(control::CR4_GUEST_HOST_MASK, CR4_VMXE | pins.cr4);
        guard.pins = pins;
        platform.log(format_args!(
            "linux: pinned {}; {}",
            PinNames {
                cr: 0,
                bits: pins.cr0
            },
            PinNames {
                cr: 4,
                bits: pins.cr4
            }
        ));
    }

    /// A MOV to CR0 or CR4 that the masks made exit: it clears a pinned bit (refused, alert) or sets
    /// CR4.VMXE (refused, as without VMX). Nothing else exits; anything else ends the guest, as an
    /// exit L0 did not ask for.
    pub(crate) fn on_cr_access(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        obs: &mut impl Observer,
        qualification: CrAccessQualification,
        instruction: ihmi_vmcs::Instruction,
    ) -> Action {
        let cr = qualification.cr();
        if qualification.access_type() != CrAccessType::MovToCr || !matches!(cr, 0 | 4) {
            return Action::End(GuestEnd::Unhandled {
                reason: ihmi_vmcs::ExitReason::CrAccess,
                qualification: qualification.raw(),
                rip: vcpu.read(guest::RIP),
            });
        }
        let value = gpr(vcpu, qualification.gpr());
        let pinned = self.guard.as_ref().map_or(0, |g| g.pins.of(cr));
        let cleared = pinned & !value;
        if cleared != 0 {
            let rip = vcpu.read(guest::RIP);
            self.alert(
                platform,
                obs,
                Alert::CrPinRefused {
                    cr,
                    value,
                    cleared,
                    rip,
                },
            );
        }
        if cleared == 0 && cr == 4 && self.nested.is_some() {
            return self.on_cr4_vmxe(vcpu, platform, value, instruction);
        }
        // Either a pinned bit cleared or CR4.VMXE set: the write does not happen.
        inject_exception(vcpu, GP, Some(0));
        Action::Resume
    }

    /// With nested VMX, a MOV to CR4 that changes VMXE (the only bit the mask adds beyond the pins):
    /// the guest reads VMXE as it wrote it through the read shadow, and the real bit stays set, as VMX
    /// non-root operation requires. Clearing it in VMX operation, or setting a bit the CPU does not
    /// allow in CR4, is #GP (SDM 23.8, and MOV to CR4's "Protected Mode Exceptions").
    fn on_cr4_vmxe(
        &mut self,
        vcpu: &mut impl Vcpu,
        platform: &mut impl Platform,
        value: u64,
        instruction: ihmi_vmcs::Instruction,
    ) -> Action {
        let allowed = platform.read_msr(ihmi_arch::msr::IA32_VMX_CR4_FIXED1);
        let in_vmx = self
            .nested
            .as_ref()
            .is_some_and(|n| n.vmxon_region().is_some());
        if value & !allowed != 0 || (in_vmx && value & CR4_VMXE == 0) {
            inject_exception(vcpu, GP, Some(0));
            return Action::Resume;
        }
        vcpu.write(guest::CR4, value | CR4_VMXE);
        vcpu.write(control::CR4_READ_SHADOW, value);
        crate::skip_instruction(vcpu, instruction);
        Action::Resume
    }
}
