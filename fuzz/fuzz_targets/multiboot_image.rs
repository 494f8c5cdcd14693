//! A multiboot kernel L0 boots: any bytes are refused with a reason, or give a load plan whose
//! segments and entry lie below 4 GiB and whose file parts lie in the image; the boot information for
//! it is written, or refused, without a panic.
#![no_main]

use ihmi_multiboot::info::{BootInfo, MemoryRange, Module, MEMORY_AVAILABLE};
use ihmi_multiboot::{KernelImage, Protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for protocol in [None, Some(Protocol::V1), Some(Protocol::V2)] {
        let Ok(kernel) = KernelImage::parse(data, protocol) else {
            continue;
        };
        if let Some(p) = protocol {
            assert_eq!(kernel.header.protocol, p);
        }
        assert!(!kernel.segments().is_empty());
        for s in kernel.segments() {
            assert!(s.file.len() as u64 <= u64::from(s.mem_size));
            assert!(s.end() <= 1 << 32);
            let start = s.file.as_ptr() as usize - data.as_ptr() as usize;
            assert!(s.file.is_empty() || start + s.file.len() <= data.len());
        }
        let (low, high) = kernel.span();
        assert!(low <= high && high <= 1 << 32);
        // The image's own first bytes as a command line: any length, any content.
        let text = core::str::from_utf8(&data[..data.len().min(300)]).unwrap_or("");
        let memory = [MemoryRange {
            base: 0,
            len: high,
            kind: MEMORY_AVAILABLE,
        }];
        let modules = [Module {
            start: 0x80_0000,
            end: 0x80_1000,
            cmdline: text,
        }];
        let info = BootInfo {
            cmdline: text,
            loader_name: "ihmi",
            modules: &modules,
            memory: &memory,
        };
        let mut area = [0u8; 1024];
        if let Ok(len) = info.write(kernel.header.protocol, &mut area, 0x9000) {
            assert!(len <= area.len());
        }
    }
});
