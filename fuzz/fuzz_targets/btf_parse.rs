//! The BTF reader on a downloaded kernel's `.BTF` section: any bytes are an error or a type table,
//! never a panic, and member lookups on what parsed terminate with an answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = ihmi_btf::Btf::parse(data) {
        for (ty, member) in [
            ("task_struct", "pid"),
            ("task_struct", "comm"),
            ("linux_binprm", "filename"),
            ("", ""),
        ] {
            if let Ok(m) = btf.member(ty, member) {
                // A member ends where its struct's layout says; the sum must not overflow.
                let _ = m.offset.checked_add(m.size);
            }
        }
    }
});
