//! The guest profile the host hands L0 as a module (text L0 parses at boot): any text is refused or
//! parses to a profile that prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = core::str::from_utf8(data) else {
        return;
    };
    if let Ok(profile) = ihmi_linux::profile::LinuxProfile::parse(text) {
        let again = ihmi_linux::profile::LinuxProfile::parse(&profile.to_string())
            .expect("a printed profile parses");
        assert_eq!(again, profile);
    }
});
