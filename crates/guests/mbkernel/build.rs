//! Links the test guest as a freestanding static ELF with its own linker script (see `ihmi-link`).

fn main() {
    ihmi_link::freestanding();
}
