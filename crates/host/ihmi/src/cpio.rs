//! The "newc" cpio format the kernel unpacks as its initramfs (the kernel's
//! Documentation/driver-api/early-userspace/buffer-format.rst): per entry a 110-byte ASCII header of
//! hex fields, the NUL-terminated name padded to 4 bytes, the data padded to 4 bytes; a `TRAILER!!!`
//! entry ends the archive. Written here because it is a page of code and the kernel needs nothing else.

/// File types and permissions in `mode` (as in `stat`).
pub const DIR: u32 = 0o040_000;
/// Regular file.
pub const FILE: u32 = 0o100_000;
/// Symbolic link (the data is the target).
pub const SYMLINK: u32 = 0o120_000;
/// Character device.
pub const CHAR_DEV: u32 = 0o020_000;

/// An archive being written.
#[derive(Debug, Default)]
pub struct Archive {
    out: Vec<u8>,
    next_ino: u32,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let nlink = if mode & 0o170_000 == DIR { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so the archive is reproducible
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, DIR | 0o755, (0, 0), &[]);
    }

    /// A regular file with permissions `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, FILE | perm, (0, 0), data);
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, SYMLINK | 0o777, (0, 0), target.as_bytes());
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, CHAR_DEV | perm, (major, minor), &[]);
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_hex_encoded() {
        let mut a = Archive::new();
        a.dir("bin");
        a.file("init", 0o755, b"#!/bin/sh\n");
        a.char_dev("dev/console", 0o600, 5, 1);
        let bytes = a.finish();
        assert_eq!(&bytes[..6], b"070701");
        // First header: ino 1, mode 040755, name "bin" (4 bytes with NUL) right after 110 bytes.
        assert_eq!(&bytes[6..14], b"00000001");
        assert_eq!(&bytes[14..22], b"000041ed");
        assert_eq!(&bytes[110..114], b"bin\0");
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("init\0"));
        assert!(text.contains("#!/bin/sh\n"));
        // The console node: mode 020600, rdev 5:1.
        let console = text.find("dev/console").unwrap() - 110;
        assert_eq!(&text[console + 14..console + 22], "00002180");
        assert_eq!(&text[console + 78..console + 94], "0000000500000001");
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!\0"));
    }
}
