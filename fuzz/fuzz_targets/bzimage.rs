//! The bzImage setup header of a kernel L0 boots: any bytes are refused or give a kernel whose
//! placement, entry and zero page L0 can compute without a panic or an overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut kernel) = ihmi_linux::Kernel::parse(data) else {
        return;
    };
    // Guest RAM: 16 MiB to 256 MiB.
    let placed = kernel.place(|at, span| {
        at >= 0x100_0000 && at.checked_add(span).is_some_and(|end| end <= 0x1000_0000)
    });
    if let Some(at) = placed {
        assert_eq!(kernel.load_address, at);
        assert!(at.checked_add(kernel.span()).is_some());
        let _ = kernel.entry_64();
        let _ = kernel.phys_offset();
    }
    let mut params = ihmi_linux::BootParams::new(&kernel);
    let _ = params.set_cmdline(&kernel, 0x2_3000, 200);
    params.set_initrd(0x800_0000, 0x10_0000);
});
