//! The Linux process-creation hook: a call from the `__fentry__` site of the kernel's `begin_new_exec`
//! into a trampoline in the gate page, put in by L0 once the kernel has booted.
//!
//! The kernel is compiled with ftrace's `__fentry__` call at the start of every traceable function
//! and turns each into a 5-byte NOP while it boots (`ftrace_init`). L0 must patch after that, or the
//! kernel's check of the site would find L0's call and disable ftrace. So L0 waits for the first
//! system call: by then the kernel has finished booting and runs /init. Until then the gate page is
//! readable but not executable in the guest view, and the first SYSCALL, which enters the gate, exits
//! to L0 with an EPT violation. L0 then:
//! 1. maps the gate page a second time, in a free 2 MiB slot of the kernel's image mapping above
//!    `_end` (the kernel unmaps that part of its image mapping at boot and never uses it again),
//!    through a page table in monitor frames that the guest view shows read-only; a `call rel32`
//!    from kernel text reaches it;
//! 2. writes `call trampoline` over the NOP;
//! 3. makes the page holding the call read + execute only in the guest view, and the gate page
//!    executable;
//! 4. resumes the SYSCALL, which now goes through the gate.
//!
//! The trampoline (in the monitor image, `ihmi_hook_exec`) calls the monitor through the gate and,
//! when the verdict is anything but allow, returns -EPERM from `begin_new_exec` without running it.
//!
//! The kernel can still change its own page table entry for the trampoline's slot, or the top-level
//! slot of the gate; L0 audits both at every exit (the hook's integrity check, BRIEF.md §4 item 11).
//!
//! More functions are hooked the same way through the same slot ([`HookSite`], [`install_site`]):
//! `io_issue_sqe`, where a kernel with io_uring issues every operation a ring submits.

use core::fmt;

use ihmi_addr::{Gpa, GpaRange, Gva, PAGE_SIZE};
use ihmi_paging::{PageTableEntry, PteFlags, WalkError};

use crate::memory::PlatformReader;
use crate::platform::read_guest_u64;
use crate::{Platform, PlatformError};

/// What `ftrace_init` leaves at an `__fentry__` site: the 5-byte NOP (`nopl 0x0(%rax,%rax,1)`).
pub const FENTRY_NOP: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `endbr64`, which a kernel built for indirect branch tracking puts before the `__fentry__` site.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Where L0 puts the process-creation hook, worked out when the monitor was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecHook {
    /// The hooked function (`begin_new_exec`), and where its first bytes are.
    pub site: Gva,
    pub site_pa: Gpa,
    /// The trampoline's entry: inside the 2 MiB slot `slot_va`, whose first page maps the gate page.
    pub trampoline: Gva,
    pub slot_va: Gva,
    /// The page table that maps `slot_va` (filled at load; read-only in the guest view).
    pub table: Gpa,
    /// The gate page, guest-physical.
    pub gate_page: Gpa,
    /// The kernel's top-level page table (`init_top_pgt`).
    pub pgd: Gpa,
}

/// Another hooked function, reached through the same slot as the process-creation hook (its
/// trampoline is elsewhere in the gate page): the io_uring hook in `io_issue_sqe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookSite {
    /// The function, and where its first bytes are.
    pub site: Gva,
    pub site_pa: Gpa,
    /// Its trampoline, in the slot.
    pub trampoline: Gva,
}

/// A call L0 wrote over a hooked function's NOP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArmedCall {
    /// Where (guest-physical), and the five bytes.
    pub call_at: Gpa,
    pub call: [u8; 5],
}

impl ArmedCall {
    /// The page that holds the call, which the guest view makes read + execute only.
    #[must_use]
    pub fn call_page(&self) -> GpaRange {
        let start = self.call_at.align_down(PAGE_SIZE);
        GpaRange::new(start, Gpa::new(start.raw() + PAGE_SIZE))
    }
}

/// The hook as installed: what L0 audits afterwards, and what it takes out again if it must.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArmedHook {
    /// The kernel's page-directory entry for the trampoline's slot, and the value L0 wrote there.
    pub pd_entry: Gpa,
    pub pd_value: u64,
    /// The call written over the hooked function's NOP.
    pub call: ArmedCall,
}

/// Why the hook could not go in. The guest keeps running, without process-creation monitoring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookError {
    /// The function does not start with the `__fentry__` NOP (ftrace is tracing it, or the kernel was
    /// built without `__fentry__` sites).
    NotAnFentrySite { found: [u8; 9] },
    /// The trampoline is beyond the reach of a 32-bit call from the site.
    OutOfReach { site: Gva, trampoline: Gva },
    /// The kernel's page tables do not lead to a page directory for the slot.
    NoPageDirectory(WalkError),
    /// The kernel maps something in the slot the trampoline needs.
    SlotInUse { slot_va: Gva, entry: u64 },
    /// L0 could not read or write guest memory it must.
    Memory(PlatformError),
}

impl From<PlatformError> for HookError {
    fn from(e: PlatformError) -> Self {
        Self::Memory(e)
    }
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAnFentrySite { found } => write!(
                f,
                "the hooked function does not start with the __fentry__ NOP (found {found:02x?}): build the kernel with CONFIG_FUNCTION_TRACER and CONFIG_DYNAMIC_FTRACE, and do not trace it"
            ),
            Self::OutOfReach { site, trampoline } => write!(
                f,
                "the trampoline at {trampoline} is out of reach of a call from {site}"
            ),
            Self::NoPageDirectory(e) => write!(
                f,
                "the kernel's page tables have no page directory for the trampoline ({e})"
            ),
            Self::SlotInUse { slot_va, entry } => write!(
                f,
                "the kernel maps {slot_va} (page-directory entry {entry:#x}); the trampoline needs that 2 MiB slot free"
            ),
            Self::Memory(e) => write!(f, "guest memory: {e}"),
        }
    }
}

/// The `call rel32` from `site` to `target`, if the distance fits.
fn call_rel32(site: Gva, target: Gva) -> Option<[u8; 5]> {
    let next = site.raw().wrapping_add(5) as i64;
    let rel = i32::try_from((target.raw() as i64).wrapping_sub(next)).ok()?;
    let r = rel.to_le_bytes();
    Some([0xe8, r[0], r[1], r[2], r[3]])
}

/// The call to write over a function's `__fentry__` NOP (after its ENDBR64, if it has one), once the
/// site is checked to hold the NOP and the trampoline to be in reach.
fn prepare_call(platform: &impl Platform, s: &HookSite) -> Result<ArmedCall, HookError> {
    let mut head = [0u8; 9];
    platform.read_guest(s.site_pa, &mut head)?;
    let offset = if head[..4] == ENDBR64 { 4 } else { 0 };
    if head[offset..offset + 5] != FENTRY_NOP {
        return Err(HookError::NotAnFentrySite { found: head });
    }
    let site = Gva::new(s.site.raw().wrapping_add(offset as u64));
    let call = call_rel32(site, s.trampoline).ok_or(HookError::OutOfReach {
        site,
        trampoline: s.trampoline,
    })?;
    let call_at = s
        .site_pa
        .checked_add(offset as u64)
        .ok_or(PlatformError::Fenced {
            gpa: s.site_pa,
            len: 9,
        })?;
    Ok(ArmedCall { call_at, call })
}

/// Hooks one more function through the slot the process-creation hook mapped (so only after
/// [`install`]): checks the site, then writes the call. The caller changes the guest view.
pub fn install_site(platform: &mut impl Platform, s: &HookSite) -> Result<ArmedCall, HookError> {
    let armed = prepare_call(platform, s)?;
    platform.write_guest(armed.call_at, &armed.call)?;
    Ok(armed)
}

/// Takes such a call out again: the NOP back.
pub fn remove_site(platform: &mut impl Platform, armed: &ArmedCall) -> Result<(), PlatformError> {
    platform.write_guest(armed.call_at, &FENTRY_NOP)
}

/// Puts the hook in (steps 1 and 2 of the module's description): checks everything first, then
/// writes the page-directory entry and the call. The caller changes the guest view's permissions.
pub fn install(platform: &mut impl Platform, hook: &ExecHook) -> Result<ArmedHook, HookError> {
    let call = prepare_call(
        platform,
        &HookSite {
            site: hook.site,
            site_pa: hook.site_pa,
            trampoline: hook.trampoline,
        },
    )?;
    // The kernel's page-directory entry for the slot, found by the one page walker.
    let tables = PlatformReader(platform);
    let pd_entry = ihmi_paging::entry_address(&tables, hook.pgd, hook.slot_va, 2)
        .map_err(HookError::NoPageDirectory)?;
    let entry = read_guest_u64(platform, pd_entry)?;
    if entry != 0 {
        return Err(HookError::SlotInUse {
            slot_va: hook.slot_va,
            entry,
        });
    }
    // Accessed set in advance: the guest view shows the table read-only, so the CPU must never need
    // to write the entries below this one; this one is the kernel's own memory.
    let pd_value = PageTableEntry::new(
        hook.table,
        PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::ACCESSED,
    )
    .raw();
    platform.write_guest(pd_entry, &pd_value.to_le_bytes())?;
    if let Err(e) = platform.write_guest(call.call_at, &call.call) {
        // Leave nothing half done: without the call the slot's mapping is harmless, but take it out.
        let _ = platform.write_guest(pd_entry, &[0; 8]);
        return Err(e.into());
    }
    Ok(ArmedHook {
        pd_entry,
        pd_value,
        call,
    })
}

/// Takes an installed hook out: the NOP back over the call, the slot's page-directory entry cleared.
pub fn remove(platform: &mut impl Platform, armed: &ArmedHook) -> Result<(), PlatformError> {
    remove_site(platform, &armed.call)?;
    platform.write_guest(armed.pd_entry, &[0; 8])
}

impl ArmedHook {
    /// What the audit compares: the page-directory entry (a changed one would send the hook's call to
    /// whatever the kernel maps there instead). The call itself sits in a page the guest view cannot
    /// write.
    #[must_use]
    pub fn audited(&self) -> (Gpa, u64) {
        (self.pd_entry, self.pd_value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_reach_within_two_gib_only() {
        let site = Gva::new(0xffff_ffff_8112_606f);
        let c = call_rel32(site, Gva::new(0xffff_ffff_81e0_0040)).unwrap();
        let rel = i32::from_le_bytes([c[1], c[2], c[3], c[4]]);
        assert_eq!(c[0], 0xe8);
        assert_eq!(
            site.raw() as i64 + 5 + i64::from(rel),
            0xffff_ffff_81e0_0040u64 as i64
        );
        assert!(call_rel32(site, Gva::new(0xffff_e900_0000_0000)).is_none());
    }
}
