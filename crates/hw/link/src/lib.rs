//! How every bare-metal binary of ihmi (L0, the test guest, the monitor image) is linked: as a
//! freestanding static ELF laid out by the crate's own `linker.ld` (BRIEF.md §3: `rustup` has no
//! `x86_64-unknown-none` here, so they are built for the host target with no start files, no libc and
//! no PIE). Each of those crates' build script is one call to [`freestanding`].

/// Emits the link arguments for the calling crate's binaries; call it from `build.rs`.
pub fn freestanding() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed={dir}/linker.ld");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=4096",
        "-Wl,--gc-sections",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/linker.ld");
}
