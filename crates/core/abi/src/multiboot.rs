//! The `multiboot1` and `multiboot2` scenarios: what the multiboot test kernel (`ihmi-mbkernel`)
//! reports on the debug port, and the digest of the boot information that L0 (from what it handed
//! over) and the kernel (from what it found) both compute, each on its own, field by field.

/// How every line of the test kernel starts.
pub const REPORT: &str = "ihmi-mbkernel: ";
/// Its line with the digest: `ihmi-mbkernel: handed digest=<16 hex digits> ...`.
pub const HANDED: &str = "ihmi-mbkernel: handed digest=";
/// Its last line: `ihmi-mbkernel: checks failed: <n>`, the number of its own checks that failed.
pub const CHECKS_FAILED: &str = "ihmi-mbkernel: checks failed: ";

/// The test kernel's command line, after its name (the host puts it on the kernel's module line).
pub const TEST_CMDLINE: &str = "ihmi-mbkernel first=1 second=two";
/// The test kernel's modules' command lines, in order (their contents are files of the ISO).
pub const TEST_MODULES: [&str; 2] = ["first-module with words", "second-module"];

/// FNV-1a (64-bit), folded over the boot information's fields in one fixed order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Self::new()
    }
}

impl Digest {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// The empty digest.
    #[must_use]
    pub const fn new() -> Self {
        Self(Self::OFFSET)
    }

    /// Folds in raw bytes.
    pub fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(Self::PRIME);
        }
    }

    /// Folds in a number.
    pub fn word(&mut self, w: u64) {
        self.bytes(&w.to_le_bytes());
    }

    /// Folds in a string: its length, then its bytes (so field boundaries count).
    pub fn text(&mut self, t: &[u8]) {
        self.word(t.len() as u64);
        self.bytes(t);
    }

    /// The value.
    #[must_use]
    pub const fn value(self) -> u64 {
        self.0
    }
}

/// What a multiboot kernel is handed, as both sides fold it: the protocol, the command line, the
/// loader's name, then per module its length, a digest of its contents and its command line, then
/// the memory: lower and upper KiB, and the bytes of available RAM in the map with its entry count.
#[derive(Clone, Copy, Debug, Default)]
pub struct Handed {
    digest: Digest,
}

impl Handed {
    /// Starts with the protocol (1 or 2), the kernel's command line and the loader's name.
    #[must_use]
    pub fn new(protocol: u8, cmdline: &[u8], loader: &[u8]) -> Self {
        let mut digest = Digest::new();
        digest.word(u64::from(protocol));
        digest.text(cmdline);
        digest.text(loader);
        Self { digest }
    }

    /// One module, in the order the boot information lists them.
    pub fn module(&mut self, contents: &[u8], cmdline: &[u8]) {
        self.module_digest(contents.len() as u64, Self::contents(contents), cmdline);
    }

    /// The digest of a module's contents, for [`Handed::module_digest`].
    #[must_use]
    pub fn contents(contents: &[u8]) -> u64 {
        let mut inner = Digest::new();
        inner.bytes(contents);
        inner.value()
    }

    /// One module by its length and the [`Handed::contents`] digest of its bytes, taken where they
    /// were first (L0 takes it from the boot loader's copy, before it moves or copies anything).
    pub fn module_digest(&mut self, len: u64, contents: u64, cmdline: &[u8]) {
        self.digest.word(len);
        self.digest.word(contents);
        self.digest.text(cmdline);
    }

    /// The memory, last: `mem_lower`/`mem_upper` in KiB, available RAM in bytes, map entries.
    #[must_use]
    pub fn memory(mut self, lower_kib: u32, upper_kib: u32, ram: u64, entries: u64) -> u64 {
        self.digest.word(u64::from(lower_kib));
        self.digest.word(u64::from(upper_kib));
        self.digest.word(ram);
        self.digest.word(entries);
        self.digest.value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_its_published_vectors() {
        // The FNV reference test vectors for FNV-1a 64: "" and "a".
        assert_eq!(Digest::new().value(), 0xcbf2_9ce4_8422_2325);
        let mut d = Digest::new();
        d.bytes(b"a");
        assert_eq!(d.value(), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn every_field_and_its_boundary_changes_the_digest() {
        let base = || {
            let mut h = Handed::new(2, b"k a=1", b"ihmi");
            h.module(b"abc", b"m");
            h.memory(639, 1000, 1 << 20, 3)
        };
        let b = base();
        assert_eq!(b, base());
        let mut h = Handed::new(1, b"k a=1", b"ihmi");
        h.module(b"abc", b"m");
        assert_ne!(h.memory(639, 1000, 1 << 20, 3), b, "protocol");
        let mut h = Handed::new(2, b"k a=", b"1ihmi");
        h.module(b"abc", b"m");
        assert_ne!(h.memory(639, 1000, 1 << 20, 3), b, "where a string ends");
        let mut h = Handed::new(2, b"k a=1", b"ihmi");
        h.module(b"abd", b"m");
        assert_ne!(h.memory(639, 1000, 1 << 20, 3), b, "module contents");
        let mut h = Handed::new(2, b"k a=1", b"ihmi");
        h.module(b"abc", b"m");
        assert_ne!(h.memory(639, 1000, 1 << 20, 4), b, "map entries");
    }
}
