//! Small CPU helpers that every bare-metal binary needs.

/// Disables interrupts and halts for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli/hlt only stop this CPU; nothing else depends on it running.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// Ends the blocking of NMIs that an NMI leaves behind (an NMI that caused a VM exit blocks later ones
/// once the exit completes, SDM 28.1): an IRET to the next instruction, on the same stack, with the
/// same flags and code segment. Only IRET lifts that blocking.
pub fn unblock_nmis() {
    // SAFETY: builds a 64-bit interrupt frame (SS, RSP, RFLAGS, CS, RIP) for the instruction after
    // IRETQ on the current stack and returns through it: RSP, RFLAGS and CS come back as they were;
    // only the scratch register is clobbered.
    unsafe {
        core::arch::asm!(
            "mov {tmp}, rsp",
            "push {ss}",
            "push {tmp}",
            "pushfq",
            "mov {tmp:e}, cs",
            "push {tmp}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "iretq",
            "2:",
            tmp = out(reg) _,
            ss = in(reg) u64::from(crate::tables::DATA_SELECTOR),
        );
    }
}

/// Executes CPUID for `leaf`/`subleaf`; returns `[eax, ebx, ecx, edx]`.
#[must_use]
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist on this CPU, or the read raises #GP.
#[must_use]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: forwarded to the caller.
    unsafe { x86::msr::rdmsr(msr) }
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist, `value` must be valid for it, and the write must not break the caller's invariants.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { x86::msr::wrmsr(msr, value) }
}

/// Current CR0.
#[must_use]
pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effect at CPL0, where all users of this crate run.
    unsafe { core::arch::asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Current CR3.
#[must_use]
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effect at CPL0.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

/// Current CR4.
#[must_use]
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effect at CPL0.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}

/// Writes CR0.
///
/// # Safety
/// The new value must keep paging, protection and the caller's memory view valid.
pub unsafe fn write_cr0(v: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { core::arch::asm!("mov cr0, {}", in(reg) v, options(nostack)) };
}

/// Writes CR4.
///
/// # Safety
/// The new value must keep paging valid and only enable features the CPU has.
pub unsafe fn write_cr4(v: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { core::arch::asm!("mov cr4, {}", in(reg) v, options(nostack)) };
}

/// Reads the time-stamp counter.
#[must_use]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged unless CR4.TSD, which none of our binaries set.
    unsafe { core::arch::x86_64::_rdtsc() }
}
