#![doc = include_str!("../README.md")]
#![no_std]
#![no_main]

mod info;

use core::fmt::Write;

use ihmi_abi::multiboot::{CHECKS_FAILED, HANDED, REPORT};

ihmi_rt::provide_mem_functions!();

/// The loaders' magic values in EAX (multiboot spec §3.2, multiboot2 spec §3.3).
const V1_LOADER_MAGIC: u32 = 0x2bad_b002;
const V2_LOADER_MAGIC: u32 = 0x36d7_6289;

core::arch::global_asm!(
    r#"
    .section .multiboot, "a"
    .balign 4
mb1_header:
    .long 0x1badb002                 /* magic */
    .long 0x3                        /* flags: page-aligned modules, memory information */
    .long -(0x1badb002 + 0x3)        /* checksum */

    .section .multiboot2, "a"
    .balign 8
mb2_header:
    .long 0xe85250d6                 /* magic */
    .long 0                          /* architecture: i386 protected mode */
    .long mb2_header_end - mb2_header
    .long 0x100000000 - (0xe85250d6 + (mb2_header_end - mb2_header))
    .balign 8
    /* Information request (required): command line, modules, basic memory, memory map. */
    .short 1
    .short 0
    .long 24
    .long 1, 3, 4, 6
    .balign 8
    /* Module alignment: page-aligned modules. */
    .short 6
    .short 0
    .long 8
    .balign 8
    .short 0                         /* end tag */
    .short 0
    .long 8
mb2_header_end:
"#,
    options(att_syntax)
);

ihmi_rt::long_mode_entry!(
    main = kernel_main,
    stack = 64 * 1024,
    section = ".text.boot"
);

/// The debug console (port 0xE9): Bochs's and QEMU's, which L0 intercepts.
struct DebugPort;

impl Write for DebugPort {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            // SAFETY: port 0xE9 is the debug console; writing it has no other effect.
            unsafe { x86::io::outb(0xe9, b) };
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(DebugPort, "{}{}", REPORT, format_args!($($arg)*));
    }};
}

/// Counts the checks that fail, each reported as it fails.
pub(crate) struct Checks {
    failed: u32,
}

impl Checks {
    pub(crate) fn check(&mut self, ok: bool, what: &str) {
        if !ok {
            self.failed += 1;
            say!("FAILED: {what}");
        }
    }
}

const CR0_PE: u32 = 1 << 0;
const CR0_PG: u32 = 1 << 31;
const EFLAGS_IF: u32 = 1 << 9;
const EFLAGS_VM: u32 = 1 << 17;

/// The 64-bit entry from `long_mode_entry!`, with what the loader left in EAX, EBX, CR0 and EFLAGS.
extern "C" fn kernel_main(magic: u32, info: u32, cr0: u32, eflags: u32) -> ! {
    let mut checks = Checks { failed: 0 };
    let protocol = match magic {
        V1_LOADER_MAGIC => Some(1),
        V2_LOADER_MAGIC => Some(2),
        _ => None,
    };
    say!(
        "entered by multiboot{} with cr0={cr0:#x} eflags={eflags:#x} info={info:#x}",
        protocol.map_or("?", |p| if p == 1 { "1" } else { "2" })
    );
    checks.check(protocol.is_some(), "EAX holds a multiboot loader's magic");
    checks.check(cr0 & CR0_PE != 0, "protected mode at entry");
    checks.check(cr0 & CR0_PG == 0, "paging off at entry");
    checks.check(eflags & EFLAGS_IF == 0, "interrupts off at entry");
    checks.check(eflags & EFLAGS_VM == 0, "not virtual-8086 mode at entry");
    checks.check(
        info != 0 && info.is_multiple_of(8),
        "boot information 8-byte aligned",
    );
    checks.check(bss_is_zero(), "the BSS (16 MiB of it) is zero");
    if let Some(protocol) = protocol {
        // SAFETY: a multiboot loader put its magic in EAX, so EBX holds the physical address of its
        // boot information, which the entry's identity map (the first 4 GiB) covers and which
        // nothing else uses; `read` checks every pointer in it against that 4 GiB before following it.
        let found = unsafe { info::read(protocol, info, &mut checks) };
        if let Some(f) = found {
            say!("cmdline: {}", f.cmdline);
            let _ = writeln!(
                DebugPort,
                "{HANDED}{:016x} modules={} ram={} map={}",
                f.digest, f.modules, f.ram, f.entries
            );
        }
    }
    let _ = writeln!(DebugPort, "{CHECKS_FAILED}{}", checks.failed);
    power_off()
}

/// 16 MiB of BSS, which the loader must zero (ELF: memory size beyond the file's), and which puts
/// the kernel's span over where GRUB loads modules.
const BSS_WORDS: usize = 2 * 1024 * 1024;
#[used]
static mut BSS: [u64; BSS_WORDS] = [0; BSS_WORDS];

fn bss_is_zero() -> bool {
    let base = core::ptr::addr_of!(BSS).cast::<u64>();
    // SAFETY: every word read is inside `BSS`, which nothing writes; volatile, so the reads are the
    // memory's, not the initializer's.
    (0..BSS_WORDS).all(|i| unsafe { core::ptr::read_volatile(base.wrapping_add(i)) } == 0)
}

/// Bochs's power-off port (L0 intercepts it); halts where there is none.
fn power_off() -> ! {
    for b in b"Shutdown" {
        // SAFETY: port 0x8900 is Bochs's power-off port; elsewhere the write goes nowhere.
        unsafe { x86::io::outb(0x8900, *b) };
    }
    loop {
        // SAFETY: interrupts are off; nothing is left to do.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    say!("panic: {info}");
    power_off()
}
