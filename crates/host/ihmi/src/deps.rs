//! The host tools `ihmi` needs (GRUB, xorriso, mtools, Bochs and its BIOS images), checked before a
//! build, and installed with apt when running as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Bochs's system BIOS (Debian package `bochsbios`).
pub const BIOS_IMAGE: &str = "/usr/share/bochs/BIOS-bochs-latest";
/// The VGA BIOS (Debian package `vgabios`).
pub const VGA_BIOS_IMAGE: &str = "/usr/share/vgabios/vgabios.bin";
/// GRUB's BIOS platform files, which `grub-mkrescue` needs to make a BIOS-bootable ISO.
const GRUB_I386_PC: &str = "/usr/lib/grub/i386-pc";

/// Everything in one apt command, so a fresh machine needs one step.
pub const PACKAGES: &[&str] = &[
    "grub-pc-bin",
    "grub-common",
    "xorriso",
    "mtools",
    "bochs",
    "bochsbios",
    "vgabios",
];

#[derive(Debug, Clone, Copy)]
enum Need {
    Program(&'static str),
    Path(&'static str),
}

#[derive(Debug, Clone, Copy)]
struct Requirement {
    need: Need,
    package: &'static str,
}

/// Where Debian's `linux-source-6.1` puts the kernel source.
pub const LINUX_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Debian's `busybox-static`: a statically linked busybox for the guest's initramfs.
pub const BUSYBOX: &str = "/bin/busybox";

/// What building the Linux guest images needs: the kernel source and the tools its build uses, and
/// busybox for the initramfs.
pub const LINUX_PACKAGES: &[&str] = &[
    "linux-source-6.1",
    "busybox-static",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "xz-utils",
    "make",
    "dwarves",
];

const LINUX_REQUIREMENTS: &[Requirement] = &[
    Requirement {
        need: Need::Path(LINUX_SOURCE),
        package: "linux-source-6.1",
    },
    Requirement {
        need: Need::Path(BUSYBOX),
        package: "busybox-static",
    },
    Requirement {
        need: Need::Program("flex"),
        package: "flex",
    },
    Requirement {
        need: Need::Program("bison"),
        package: "bison",
    },
    Requirement {
        need: Need::Program("bc"),
        package: "bc",
    },
    Requirement {
        need: Need::Path("/usr/include/gelf.h"),
        package: "libelf-dev",
    },
    Requirement {
        need: Need::Program("xz"),
        package: "xz-utils",
    },
    Requirement {
        need: Need::Program("make"),
        package: "make",
    },
    Requirement {
        need: Need::Program("pahole"),
        package: "dwarves",
    },
];

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        need: Need::Program("grub-mkrescue"),
        package: "grub-common",
    },
    Requirement {
        need: Need::Path(GRUB_I386_PC),
        package: "grub-pc-bin",
    },
    Requirement {
        need: Need::Program("xorriso"),
        package: "xorriso",
    },
    Requirement {
        need: Need::Program("mformat"),
        package: "mtools",
    },
    Requirement {
        need: Need::Program("bochs"),
        package: "bochs",
    },
    Requirement {
        need: Need::Path(BIOS_IMAGE),
        package: "bochsbios",
    },
    Requirement {
        need: Need::Path(VGA_BIOS_IMAGE),
        package: "vgabios",
    },
];

/// Where `program` is on `PATH`, if anywhere.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn missing(requirements: &[Requirement]) -> Vec<Requirement> {
    requirements
        .iter()
        .copied()
        .filter(|r| match r.need {
            Need::Program(p) => find_program(p).is_none(),
            Need::Path(p) => !Path::new(p).exists(),
        })
        .collect()
}

fn describe(missing: &[Requirement]) -> String {
    missing
        .iter()
        .map(|r| match r.need {
            Need::Program(p) => format!("{p} (package {})", r.package),
            Need::Path(p) => format!("{p} (package {})", r.package),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_root() -> bool {
    // `id -u` rather than libc::geteuid: this crate has no unsafe code and no libc dependency.
    Command::new("id")
        .arg("-u")
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn install_command(packages: &[&str]) -> String {
    format!("apt-get install -y {}", packages.join(" "))
}

/// Makes sure every tool for booting scenarios is there; as root, installs the missing ones with apt.
pub fn ensure() -> Result<()> {
    ensure_set(REQUIREMENTS, PACKAGES)
}

/// Makes sure what building the Linux guest images needs is there, as [`ensure`] does.
pub fn ensure_linux() -> Result<()> {
    ensure_set(LINUX_REQUIREMENTS, LINUX_PACKAGES)
}

fn ensure_set(requirements: &[Requirement], packages: &[&str]) -> Result<()> {
    let gone = missing(requirements);
    if gone.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing {}: install them with `sudo apt-get update && sudo {}`",
            describe(&gone),
            install_command(packages)
        );
    }
    eprintln!(
        "[ihmi] missing {}; installing with apt-get (running as root)",
        describe(&gone)
    );
    run_apt(&["update"], packages)?;
    let mut install = vec!["install", "-y"];
    install.extend_from_slice(packages);
    run_apt(&install, packages)?;
    let still = missing(requirements);
    if !still.is_empty() {
        bail!(
            "still missing after apt-get install: {}; check the apt output above",
            describe(&still)
        );
    }
    Ok(())
}

fn run_apt(args: &[&str], packages: &[&str]) -> Result<()> {
    eprintln!("[ihmi] $ apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .context("could not run apt-get: install the packages by hand")?;
    if !status.success() {
        bail!(
            "`apt-get {}` failed ({status}); run `{}` by hand",
            args.join(" "),
            install_command(packages)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_requirement_names_a_listed_package() {
        for r in REQUIREMENTS {
            assert!(PACKAGES.contains(&r.package), "{r:?}");
        }
        for r in LINUX_REQUIREMENTS {
            assert!(LINUX_PACKAGES.contains(&r.package), "{r:?}");
        }
    }

    #[test]
    fn description_names_package() {
        let d = describe(&[REQUIREMENTS[0], REQUIREMENTS[5]]);
        assert_eq!(
            d,
            "grub-mkrescue (package grub-common), /usr/share/bochs/BIOS-bochs-latest (package bochsbios)"
        );
    }

    #[test]
    fn finds_sh_on_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("surely-not-a-program-ihmi").is_none());
    }
}
