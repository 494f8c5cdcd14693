//! A multiboot kernel L0 boots as its guest: the user's (`ihmi run --kernel FILE`), or the test
//! kernel of the `multiboot1` and `multiboot2` scenarios. Both reach the ISO the same way: the kernel
//! and its modules under `/boot/kernel/`, each on a GRUB `module2` line that names its role
//! (`kernel`, `kmodule`) and carries its command line, which L0 hands the kernel as the multiboot
//! loader would have.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ihmi_multiboot::{KernelImage, Protocol};

/// The most modules L0 hands a multiboot kernel (L0's `MAX_KERNEL_MODULES`).
pub const MAX_MODULES: usize = 4;

/// A multiboot kernel with its command line and modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserKernel {
    pub kernel: PathBuf,
    /// The kernel's command line as the kernel reads it: its file name, then the arguments (what
    /// GRUB passes too; kvm-unit-tests take the first word as the program's name).
    pub cmdline: String,
    /// Each module's file and command line (its file name, then its arguments).
    pub modules: Vec<(PathBuf, String)>,
    /// The protocol asked for (`--multiboot 1|2`); `None`: the kernel's multiboot2 header if it has
    /// one, else its multiboot one.
    pub protocol: Option<u8>,
}

/// The file name, for a command line.
fn name_of(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

impl UserKernel {
    /// The user's kernel: `--kernel FILE`, `--cmdline ARGS`, each `--module 'FILE [ARGS]'`,
    /// `--multiboot N`. Checks the kernel here, before anything boots: it must be a multiboot kernel
    /// of that protocol whose segments L0 can load (see [`check_placement`]).
    pub fn from_args(
        kernel: &Path,
        cmdline: Option<&str>,
        modules: &[String],
        protocol: Option<u8>,
        l0: &Path,
    ) -> Result<Self> {
        if modules.len() > MAX_MODULES {
            bail!(
                "{} --module options: L0 hands a multiboot kernel at most {MAX_MODULES} modules",
                modules.len()
            );
        }
        let mut parsed = Vec::new();
        for m in modules {
            let m = m.trim();
            let (file, args) = m.split_once(char::is_whitespace).unwrap_or((m, ""));
            if file.is_empty() {
                bail!("--module needs a file: `--module 'FILE [ARGS]'`");
            }
            let file = PathBuf::from(file);
            if !file.is_file() {
                bail!("--module {}: no such file", file.display());
            }
            let line = format!("{} {}", name_of(&file), args.trim());
            parsed.push((file, line.trim_end().to_string()));
        }
        let line = format!("{} {}", name_of(kernel), cmdline.unwrap_or("").trim());
        let k = Self {
            kernel: kernel.to_path_buf(),
            cmdline: line.trim_end().to_string(),
            modules: parsed,
            protocol,
        };
        k.check_lines()?;
        let bytes = fs::read(kernel)
            .with_context(|| format!("--kernel {}: cannot read it", kernel.display()))?;
        let l0_bytes =
            fs::read(l0).with_context(|| format!("cannot read L0 at {}", l0.display()))?;
        check_placement(&bytes, protocol, &l0_bytes)
            .with_context(|| format!("--kernel {}", kernel.display()))?;
        Ok(k)
    }

    /// The test kernel of `multiboot1`/`multiboot2` with its command line and two modules (the
    /// ISO's test guest and monitor images serve as their contents).
    pub fn test(mbkernel: PathBuf, modules: [PathBuf; 2], protocol: u8) -> Self {
        let [one, two] = ihmi_abi::multiboot::TEST_MODULES;
        let [a, b] = modules;
        Self {
            kernel: mbkernel,
            cmdline: ihmi_abi::multiboot::TEST_CMDLINE.to_string(),
            modules: vec![(a, one.to_string()), (b, two.to_string())],
            protocol: Some(protocol),
        }
    }

    /// GRUB would read quotes, backslashes, `$`, `;` and newlines in a module line.
    fn check_lines(&self) -> Result<()> {
        for line in std::iter::once(&self.cmdline).chain(self.modules.iter().map(|(_, l)| l)) {
            if line.contains([
                '"', '\'', '\n', '\\', '$', ';', '{', '}', '#', '|', '&', '<', '>',
            ]) {
                bail!("the command line `{line}` may not contain quotes, backslashes, braces, `$`, `;`, `#`, `|`, `&`, `<`, `>` or newlines (GRUB would read them)");
            }
        }
        Ok(())
    }

    /// The files to put on the ISO, as (source, path under `/boot/kernel/`).
    pub fn files(&self) -> Vec<(&Path, String)> {
        std::iter::once((self.kernel.as_path(), "kernel".to_string()))
            .chain(
                self.modules
                    .iter()
                    .enumerate()
                    .map(|(i, (f, _))| (f.as_path(), format!("module-{i}"))),
            )
            .collect()
    }

    /// The GRUB lines that hand L0 the kernel and its modules, each ending in a newline and four
    /// spaces (the menu entry's indent).
    pub fn grub_lines(&self) -> String {
        let mut out = format!("module2 /boot/kernel/kernel kernel {}\n    ", self.cmdline);
        for (i, (_, line)) in self.modules.iter().enumerate() {
            out += &format!("module2 /boot/kernel/module-{i} kmodule {line}\n    ");
        }
        out
    }
}

/// Whether L0 can boot `bytes` by `protocol`: a multiboot header of that protocol (or either) that
/// L0's loader accepts, and segments at or above 1 MiB clear of L0's own image (L0 is loaded 1:1
/// at its link address, `l0`'s span). GRUB places the modules where it likes; one that lands
/// under the kernel is refused by L0 at boot, with the range.
pub fn check_placement(bytes: &[u8], protocol: Option<u8>, l0: &[u8]) -> Result<(u64, u64)> {
    let protocol = match protocol {
        None => None,
        Some(1) => Some(Protocol::V1),
        Some(2) => Some(Protocol::V2),
        Some(n) => bail!("--multiboot {n}: the protocol is 1 or 2"),
    };
    let plan = KernelImage::parse(bytes, protocol)
        .map_err(|e| anyhow::anyhow!("not a kernel L0 can boot: {e}"))?;
    let (low, high) = plan.span();
    let (l0_low, l0_high) = KernelImage::parse(l0, Some(Protocol::V2))
        .map(|p| p.span())
        .map_err(|e| anyhow::anyhow!("L0's own image: {e}"))?;
    if low < 0x10_0000 {
        bail!("it loads at {low:#x}, below 1 MiB, which no multiboot loader does");
    }
    if low < l0_high && l0_low < high {
        bail!(
            "it loads at {low:#x}..{high:#x}, over L0 itself ({l0_low:#x}..{l0_high:#x}; guest RAM is \
             1:1, so a kernel cannot sit where L0 does); link it to end below {l0_low:#x} or start \
             at {:#x} or higher",
            (l0_high + 0xf_ffff) & !0xf_ffff
        );
    }
    Ok((low, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A multiboot 1 header with address fields: the file is loaded whole at `load`, entry at it.
    fn v1_kernel(load: u32) -> Vec<u8> {
        let mut f = vec![0u8; 0x2000];
        let flags: u32 = 1 << 16;
        let magic: u32 = 0x1bad_b002;
        let words = [
            magic,
            flags,
            0u32.wrapping_sub(magic.wrapping_add(flags)),
            load,
            load,
            load + 0x2000,
            load + 0x3000,
            load + 0x40,
        ];
        for (i, w) in words.iter().enumerate() {
            f[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        f
    }

    /// Stands in for L0: a multiboot2 header with address fields at 1 MiB.
    fn l0_image() -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        let magic: u32 = 0xe852_50d6;
        let len: u32 = 16 + 24 + 12 + 4 + 8;
        let mut h = Vec::new();
        for w in [magic, 0, len, 0u32.wrapping_sub(magic.wrapping_add(len))] {
            h.extend_from_slice(&w.to_le_bytes());
        }
        // Address tag (2): header_addr, load_addr, load_end_addr, bss_end_addr.
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&24u32.to_le_bytes());
        for w in [0x10_0000u32, 0x10_0000, 0x10_1000, 0x1b_0000] {
            h.extend_from_slice(&w.to_le_bytes());
        }
        // Entry tag (3), padded to 8.
        h.extend_from_slice(&3u16.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&12u32.to_le_bytes());
        h.extend_from_slice(&0x10_0040u32.to_le_bytes());
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&[0, 0, 0, 0, 8, 0, 0, 0]);
        f[..h.len()].copy_from_slice(&h);
        f
    }

    #[test]
    fn a_kernel_clear_of_l0_is_accepted_and_one_over_it_refused_with_the_fix() {
        let l0 = l0_image();
        assert_eq!(
            check_placement(&v1_kernel(0x100_0000), None, &l0).unwrap(),
            (0x100_0000, 0x100_3000)
        );
        assert!(check_placement(&v1_kernel(0x40_0000), Some(1), &l0).is_ok());
        let over = check_placement(&v1_kernel(0x10_0000), None, &l0)
            .unwrap_err()
            .to_string();
        assert!(
            over.contains("over L0 itself") && over.contains("0x200000"),
            "{over}"
        );
        let low = check_placement(&v1_kernel(0x8_0000), None, &l0)
            .unwrap_err()
            .to_string();
        assert!(low.contains("below 1 MiB"), "{low}");
        let v2 = check_placement(&v1_kernel(0x100_0000), Some(2), &l0)
            .unwrap_err()
            .to_string();
        assert!(v2.contains("no multiboot2 header"), "{v2}");
        assert!(check_placement(b"\x7fELF nonsense", None, &l0).is_err());
        assert!(check_placement(&v1_kernel(0x100_0000), Some(3), &l0).is_err());
    }

    #[test]
    fn lines_name_each_file_and_carry_its_arguments() {
        let k = UserKernel {
            kernel: PathBuf::from("/x/vmx.flat"),
            cmdline: "vmx.flat -v".to_string(),
            modules: vec![(PathBuf::from("/y/a.bin"), "a.bin one two".to_string())],
            protocol: None,
        };
        assert_eq!(
            k.grub_lines(),
            "module2 /boot/kernel/kernel kernel vmx.flat -v\n    \
             module2 /boot/kernel/module-0 kmodule a.bin one two\n    "
        );
        assert_eq!(
            k.files(),
            vec![
                (Path::new("/x/vmx.flat"), "kernel".to_string()),
                (Path::new("/y/a.bin"), "module-0".to_string())
            ]
        );
        let bad = UserKernel {
            cmdline: "k $root".to_string(),
            ..k
        };
        assert!(bad.check_lines().is_err());
    }

    #[test]
    fn arguments_are_checked_before_anything_boots() {
        let dir = std::env::temp_dir().join(format!("ihmi-kernel-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (kernel, l0, module) = (dir.join("k.elf"), dir.join("l0.elf"), dir.join("m.bin"));
        fs::write(&kernel, v1_kernel(0x100_0000)).unwrap();
        fs::write(&l0, l0_image()).unwrap();
        fs::write(&module, b"data").unwrap();
        let m = format!("{} first second", module.display());
        let k = UserKernel::from_args(&kernel, Some(" -v "), &[m], None, &l0).unwrap();
        assert_eq!(k.cmdline, "k.elf -v");
        assert_eq!(
            k.modules,
            vec![(module.clone(), "m.bin first second".to_string())]
        );
        let none = UserKernel::from_args(&kernel, None, &[], Some(1), &l0).unwrap();
        assert_eq!(none.cmdline, "k.elf");
        let missing = dir.join("nope");
        let e = UserKernel::from_args(&kernel, None, &[missing.display().to_string()], None, &l0)
            .unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
        let five = vec![module.display().to_string(); 5];
        assert!(UserKernel::from_args(&kernel, None, &five, None, &l0).is_err());
        assert!(UserKernel::from_args(&missing, None, &[], None, &l0).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
