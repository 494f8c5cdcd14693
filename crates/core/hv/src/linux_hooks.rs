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

use core::fmt;

use ihmi_addr::{Gpa, PAGE_SIZE};
use ihmi_ept::Perm;

use crate::Platform;

/// What `ftrace_init` leaves at an `__fentry__` site: the 5-byte NOP (`nopl 0x0(%rax,%rax,1)`).
pub const FENTRY_NOP: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `endbr64`, which a kernel built for indirect branch tracking puts before the `__fentry__` site.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Page-table entry bits (SDM 4.5): present, writable, accessed, page size.
const PTE_P: u64 = 1 << 0;
const PTE_W: u64 = 1 << 1;
const PTE_A: u64 = 1 << 5;
const PTE_PS: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Where L0 puts the process-creation hook, worked out when the monitor was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecHook {
    /// The hooked function (`begin_new_exec`), guest-virtual, and where its first bytes are.
    pub site: u64,
    pub site_pa: Gpa,
    /// The trampoline's entry, guest-virtual: inside the 2 MiB slot `slot_va`, whose first page maps
    /// the gate page.
    pub trampoline: u64,
    pub slot_va: u64,
    /// The page table that maps `slot_va` (filled at load; read-only in the guest view).
    pub table: Gpa,
    /// The gate page, guest-physical.
    pub gate_page: Gpa,
    /// The kernel's top-level page table (`init_top_pgt`).
    pub pgd: Gpa,
}

/// The hook as installed: what L0 audits afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArmedHook {
    /// The kernel's page-directory entry for the trampoline's slot, and the value L0 wrote there.
    pub pd_entry: Gpa,
    pub pd_value: u64,
    /// Where the call went (guest-physical), and the five bytes written.
    pub call_at: Gpa,
    pub call: [u8; 5],
}

/// Why the hook could not go in. The guest keeps running, without process-creation monitoring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookError {
    /// The function does not start with the `__fentry__` NOP (ftrace is tracing it, or the kernel was
    /// built without `__fentry__` sites).
    NotAnFentrySite { found: [u8; 9] },
    /// The trampoline is beyond the reach of a 32-bit call from the site.
    OutOfReach { site: u64, trampoline: u64 },
    /// The kernel's page tables do not lead to a page directory for the slot (the level that failed
    /// and the entry found there).
    NoPageDirectory { level: u8, entry: u64 },
    /// The kernel maps something in the slot the trampoline needs.
    SlotInUse { slot_va: u64, entry: u64 },
    /// L0 could not read or write guest memory it must.
    Memory(Gpa),
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
                "the trampoline at {trampoline:#x} is out of reach of a call from {site:#x}"
            ),
            Self::NoPageDirectory { level, entry } => write!(
                f,
                "the kernel's page tables have no page directory for the trampoline (level {level} entry {entry:#x})"
            ),
            Self::SlotInUse { slot_va, entry } => write!(
                f,
                "the kernel maps {slot_va:#x} (page-directory entry {entry:#x}); the trampoline needs that 2 MiB slot free"
            ),
            Self::Memory(gpa) => write!(f, "guest memory at {gpa} is out of L0's reach"),
        }
    }
}

fn read_u64(platform: &impl Platform, gpa: Gpa) -> Result<u64, HookError> {
    let mut b = [0u8; 8];
    if platform.read_phys(gpa, &mut b) {
        Ok(u64::from_le_bytes(b))
    } else {
        Err(HookError::Memory(gpa))
    }
}

/// The guest-physical address of the kernel's page-directory entry for `va`, walking from `pgd`.
fn pd_entry_of(platform: &impl Platform, pgd: Gpa, va: u64) -> Result<Gpa, HookError> {
    let index = |level: u32| (va >> (12 + 9 * (level - 1))) & 0x1ff;
    let mut table = pgd;
    for level in [4u32, 3] {
        let at = Gpa::new(table.raw() + index(level) * 8);
        let entry = read_u64(platform, at)?;
        if entry & PTE_P == 0 || entry & PTE_PS != 0 {
            return Err(HookError::NoPageDirectory {
                level: level as u8,
                entry,
            });
        }
        table = Gpa::new(entry & ADDR_MASK);
    }
    Ok(Gpa::new(table.raw() + index(2) * 8))
}

/// The `call rel32` from `site` to `target`, if the distance fits.
fn call_rel32(site: u64, target: u64) -> Option<[u8; 5]> {
    let rel = i32::try_from((target as i64).wrapping_sub(site.wrapping_add(5) as i64)).ok()?;
    let r = rel.to_le_bytes();
    Some([0xe8, r[0], r[1], r[2], r[3]])
}

/// Puts the hook in (steps 1 and 2 of the module's description): checks everything first, then
/// writes the page-directory entry and the call. The caller changes the guest view's permissions.
pub fn install(platform: &mut impl Platform, hook: &ExecHook) -> Result<ArmedHook, HookError> {
    let mut head = [0u8; 9];
    if !platform.read_phys(hook.site_pa, &mut head) {
        return Err(HookError::Memory(hook.site_pa));
    }
    let offset = if head[..4] == ENDBR64 { 4 } else { 0 };
    if head[offset..offset + 5] != FENTRY_NOP {
        return Err(HookError::NotAnFentrySite { found: head });
    }
    let site = hook.site + offset as u64;
    let call = call_rel32(site, hook.trampoline).ok_or(HookError::OutOfReach {
        site,
        trampoline: hook.trampoline,
    })?;
    let pd_entry = pd_entry_of(platform, hook.pgd, hook.slot_va)?;
    let entry = read_u64(platform, pd_entry)?;
    if entry != 0 {
        return Err(HookError::SlotInUse {
            slot_va: hook.slot_va,
            entry,
        });
    }
    // Accessed set in advance: the guest view shows the table read-only, so the CPU must never need
    // to write the entries below this one; this one is the kernel's own memory.
    let pd_value = hook.table.raw() | PTE_P | PTE_W | PTE_A;
    let call_at = Gpa::new(hook.site_pa.raw() + offset as u64);
    if !platform.write_phys(pd_entry, &pd_value.to_le_bytes()) {
        return Err(HookError::Memory(pd_entry));
    }
    if !platform.write_phys(call_at, &call) {
        // Leave nothing half done: without the call the slot's mapping is harmless, but take it out.
        let _ = platform.write_phys(pd_entry, &[0; 8]);
        return Err(HookError::Memory(call_at));
    }
    Ok(ArmedHook {
        pd_entry,
        pd_value,
        call_at,
        call,
    })
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

/// The guest-view permission changes that finish the installation: the page holding the call is no
/// longer writable, the gate becomes executable. `None` for the hook when it did not go in.
#[must_use]
pub fn view_changes(gate_page: Gpa, armed: Option<&ArmedHook>) -> [Option<(Gpa, Perm)>; 2] {
    let page = |g: Gpa| Gpa::new(g.raw() & !(PAGE_SIZE - 1));
    [
        armed.map(|a| (page(a.call_at), Perm::RX)),
        Some((gate_page, Perm::RX)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_reach_within_two_gib_only() {
        let site = 0xffff_ffff_8112_606f;
        let c = call_rel32(site, 0xffff_ffff_81e0_0040).unwrap();
        let rel = i32::from_le_bytes([c[1], c[2], c[3], c[4]]);
        assert_eq!(c[0], 0xe8);
        assert_eq!(
            site as i64 + 5 + i64::from(rel),
            0xffff_ffff_81e0_0040u64 as i64
        );
        assert!(call_rel32(site, 0xffff_e900_0000_0000).is_none());
    }
}
