//! Building L0 and the test guest, and packing them into a GRUB ISO per scenario.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::scenario::validate_name;

/// The packages the bare-metal build produces, in the order GRUB loads them.
const BARE_PACKAGES: &[&str] = &[
    "ihmi-l0",
    "ihmi-testguest",
    "ihmi-monitor-image",
    "ihmi-mbkernel",
];

/// Codegen for the freestanding binaries (BRIEF.md section 3: static, no PIE). Only the bare build
/// sees these flags; that is why it has its own target directory. `sha2` is built with its portable
/// code only: its default picks SHA-NI at run time with CPUID, and a CPUID in the monitor's view
/// would be a VM exit.
const BARE_RUSTFLAGS: &str =
    "-C relocation-model=static -C force-frame-pointers=yes --cfg sha2_backend=\"soft\"";

/// The host target: `rustup` cannot fetch `x86_64-unknown-none` here (BRIEF.md section 3).
const BARE_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Where everything lives, from the workspace root.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    /// The workspace this binary was built from; falls back to `cargo locate-project` when the
    /// compile-time path is gone (a binary copied elsewhere).
    pub fn discover() -> Result<Self> {
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..");
        if here.join("Cargo.toml").is_file() && here.join("bochs").is_dir() {
            let root = here
                .canonicalize()
                .with_context(|| format!("cannot resolve {}", here.display()))?;
            return Ok(Layout { root });
        }
        let out = Command::new(cargo())
            .args(["locate-project", "--workspace", "--message-format", "plain"])
            .stderr(Stdio::inherit())
            .output()
            .context("could not run `cargo locate-project`")?;
        if !out.status.success() {
            bail!("cannot find the ihmi workspace: run ihmi from inside it");
        }
        let manifest = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let root = manifest
            .parent()
            .context("`cargo locate-project` printed no directory")?
            .to_path_buf();
        Ok(Layout { root })
    }

    pub fn bare_target_dir(&self) -> PathBuf {
        self.root.join("target/bare")
    }

    pub fn bare_binary(&self, package: &str) -> PathBuf {
        self.bare_target_dir()
            .join(BARE_TARGET)
            .join("bare")
            .join(package)
    }

    pub fn l0_elf(&self) -> PathBuf {
        self.bare_binary("ihmi-l0")
    }

    pub fn guest_elf(&self) -> PathBuf {
        self.bare_binary("ihmi-testguest")
    }

    /// The in-VM monitor image (package `ihmi-monitor-image`, binary `ihmi-monitor`).
    /// The multiboot test kernel (`multiboot1`, `multiboot2`).
    pub fn mbkernel_elf(&self) -> PathBuf {
        self.bare_binary("ihmi-mbkernel")
    }

    pub fn monitor_elf(&self) -> PathBuf {
        self.bare_binary("ihmi-monitor")
    }

    /// `target/ihmi`: ISOs and per-run directories.
    pub fn out_dir(&self) -> PathBuf {
        self.root.join("target/ihmi")
    }

    pub fn iso_tree(&self) -> PathBuf {
        self.out_dir().join("iso")
    }

    pub fn iso(&self, scenario: &str) -> PathBuf {
        self.out_dir().join(format!("ihmi-{scenario}.iso"))
    }

    pub fn run_dir(&self, scenario: &str) -> PathBuf {
        self.out_dir().join(format!("run-{scenario}"))
    }

    pub fn bochsrc_template(&self) -> PathBuf {
        self.root.join("bochs/bochsrc.template")
    }
}

/// The cargo that runs us (`cargo run` sets `CARGO`), so nested builds use the same toolchain.
pub fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

/// Builds L0 and the test guest. Cargo's output goes straight to the terminal so build errors show.
pub fn build_bare(layout: &Layout) -> Result<()> {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(&layout.root)
        .args(["build", "--profile", "bare", "--target", BARE_TARGET])
        .arg("--target-dir")
        .arg(layout.bare_target_dir());
    for package in BARE_PACKAGES {
        cmd.args(["-p", package]);
    }
    // CARGO_ENCODED_RUSTFLAGS would win over RUSTFLAGS, so a value inherited from the caller goes.
    cmd.env("RUSTFLAGS", BARE_RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stdin(Stdio::null());
    eprintln!(
        "[ihmi] building {} (profile bare, RUSTFLAGS=\"{BARE_RUSTFLAGS}\")",
        BARE_PACKAGES.join(", ")
    );
    let status = cmd.status().context("could not run cargo")?;
    if !status.success() {
        bail!(
            "building {} failed ({status}): fix the errors above, then rerun",
            BARE_PACKAGES.join(" and ")
        );
    }
    for elf in [layout.l0_elf(), layout.guest_elf(), layout.mbkernel_elf()] {
        if !elf.is_file() {
            bail!(
                "cargo succeeded but {} is missing: does the crate define a binary of that name?",
                elf.display()
            );
        }
    }
    Ok(())
}

/// GRUB's config for one scenario: boot L0 with the scenario on its command line, and the test guest and
/// the monitor image as multiboot2 modules (L0 loads the monitor only for scenarios that use it). A
/// Linux scenario adds the kernel, with its command line after the word `linux`, and the initramfs,
/// which GRUB must pass on compressed (`--nounzip`; it would inflate it otherwise, below the tiny
/// kernel's fixed 16 MiB) and the kernel inflates itself. A multiboot kernel (the user's, or the
/// test kernel of `multiboot1` and `multiboot2`) comes instead of the test guest and the monitor,
/// with its modules (`kernel::UserKernel::grub_lines`), and L0's command line says the protocol
/// the user asked for, if any.
pub fn grub_cfg(
    scenario: &str,
    linux_cmdline: Option<&str>,
    allow: Option<&str>,
    kernel: Option<&crate::kernel::UserKernel>,
) -> String {
    let allow = allow.map_or(String::new(), |a| format!(" allow={a}"));
    let linux = linux_cmdline.map_or(String::new(), |c| {
        format!(
            "module2 /boot/bzImage linux {c}\n    module2 --nounzip /boot/initrd.cpio.gz initrd\n    \
             module2 /boot/linux-profile.txt linux-profile\n    "
        )
    });
    let fixed = ihmi_abi::Scenario::from_name(scenario).and_then(|s| s.multiboot());
    let (protocol, guest) = match kernel {
        Some(k) => (
            k.protocol
                .filter(|_| fixed.is_none())
                .map_or(String::new(), |p| format!(" multiboot={p}")),
            k.grub_lines(),
        ),
        None => (
            String::new(),
            "module2 /boot/testguest.elf testguest\n    \
             module2 /boot/monitor.elf monitor\n    "
                .to_string(),
        ),
    };
    format!(
        "set timeout=0\n\
         set default=0\n\
         menuentry \"ihmi {scenario}\" {{\n    \
             multiboot2 /boot/ihmi-l0.elf scenario={scenario}{allow}{protocol}\n    \
             {guest}{linux}boot\n\
         }}\n"
    )
}

/// Stages the ISO tree for `scenario` and runs `grub-mkrescue`; returns the ISO's path. The tree is
/// shared, so ISOs are made one at a time.
pub fn make_iso(
    layout: &Layout,
    scenario: &str,
    linux: Option<&crate::linux::LinuxImages>,
    user: Option<&crate::kernel::UserKernel>,
) -> Result<PathBuf> {
    validate_name(scenario)?;
    let tree = layout.iso_tree();
    let boot = tree.join("boot");
    fs::create_dir_all(boot.join("grub"))
        .with_context(|| format!("cannot create {}", boot.display()))?;
    for (from, to) in [
        (layout.l0_elf(), boot.join("ihmi-l0.elf")),
        (layout.guest_elf(), boot.join("testguest.elf")),
        (layout.monitor_elf(), boot.join("monitor.elf")),
    ] {
        fs::copy(&from, &to).with_context(|| {
            format!(
                "cannot copy {} to {}: run `ihmi build` first",
                from.display(),
                to.display()
            )
        })?;
    }
    for name in ["bzImage", "initrd.cpio.gz", "linux-profile.txt"] {
        let _ = fs::remove_file(boot.join(name));
    }
    if let Some(l) = linux {
        if l.cmdline.contains(['"', '\n', '\\', '$', ';']) {
            bail!("the kernel command line may not contain quotes, backslashes, `$`, `;` or newlines (GRUB would read them)");
        }
        for (from, to) in [
            (&l.kernel, "bzImage"),
            (&l.initrd, "initrd.cpio.gz"),
            (&l.profile, "linux-profile.txt"),
        ] {
            fs::copy(from, boot.join(to))
                .with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    // A multiboot kernel: the user's for `kernel`/`kernel-nested`, the test kernel for `multiboot1`
    // and `multiboot2`.
    let s = ihmi_abi::Scenario::from_name(scenario);
    let test_kernel = s.and_then(|s| s.multiboot()).map(|p| {
        crate::kernel::UserKernel::test(
            layout.mbkernel_elf(),
            [layout.guest_elf(), layout.monitor_elf()],
            p,
        )
    });
    let kernel = match (s.is_some_and(|s| s.is_multiboot()), &test_kernel, user) {
        (true, Some(t), _) => Some(t),
        (true, None, Some(u)) => Some(u),
        (true, None, None) => {
            bail!("scenario `{scenario}` boots a kernel of yours: `ihmi run --kernel FILE`")
        }
        (false, _, _) => None,
    };
    let dir = boot.join("kernel");
    let _ = fs::remove_dir_all(&dir);
    if let Some(k) = kernel {
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (from, to) in k.files() {
            fs::copy(from, dir.join(&to))
                .with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    let cmdline = linux.map(|l| {
        let extra = crate::scenario::kernel_args(scenario);
        if extra.is_empty() {
            l.cmdline.clone()
        } else {
            format!("{} {extra}", l.cmdline)
        }
    });
    fs::write(
        boot.join("grub/grub.cfg"),
        grub_cfg(
            scenario,
            cmdline.as_deref(),
            linux.map(|l| l.allow.as_str()).filter(|a| !a.is_empty()),
            kernel,
        ),
    )
    .context("cannot write grub.cfg")?;

    let iso = layout.iso(scenario);
    let out = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(&tree)
        .stdin(Stdio::null())
        .output()
        .context("grub-mkrescue not found: install grub-pc-bin grub-common xorriso mtools")?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        bail!(
            "grub-mkrescue failed ({}); see its output above (missing grub-pc-bin, xorriso or \
             mtools?)",
            out.status
        );
    }
    Ok(iso)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_boots_l0_with_scenario_and_guest_module() {
        let linux = grub_cfg(
            "linux-sim",
            Some("console=ttyS0 nokaslr"),
            Some("sha256:00ff,sha256:ab12"),
            None,
        );
        assert!(linux.contains(
            "multiboot2 /boot/ihmi-l0.elf scenario=linux-sim allow=sha256:00ff,sha256:ab12\n"
        ));
        assert!(linux.contains(
            "    module2 /boot/bzImage linux console=ttyS0 nokaslr\n    module2 --nounzip /boot/initrd.cpio.gz initrd\n    module2 /boot/linux-profile.txt linux-profile\n    boot\n"
        ));
        assert_eq!(
            grub_cfg("ept-guard", None, None, None),
            "set timeout=0\n\
             set default=0\n\
             menuentry \"ihmi ept-guard\" {\n\
             \x20   multiboot2 /boot/ihmi-l0.elf scenario=ept-guard\n\
             \x20   module2 /boot/testguest.elf testguest\n\
             \x20   module2 /boot/monitor.elf monitor\n\
             \x20   boot\n\
             }\n"
        );
        // A multiboot kernel comes instead of the test guest and monitor, with its modules; L0's
        // line names the protocol the user asked for, not the one a scenario fixes.
        let k = crate::kernel::UserKernel::test(
            PathBuf::from("mb.elf"),
            [PathBuf::from("a"), PathBuf::from("b")],
            1,
        );
        let mb = grub_cfg("multiboot1", None, None, Some(&k));
        assert!(mb.contains(
            "    multiboot2 /boot/ihmi-l0.elf scenario=multiboot1\n    \
             module2 /boot/kernel/kernel kernel ihmi-mbkernel first=1 second=two\n    \
             module2 /boot/kernel/module-0 kmodule first-module with words\n    \
             module2 /boot/kernel/module-1 kmodule second-module\n    boot\n"
        ));
        assert!(!mb.contains("testguest"));
        let user = grub_cfg("kernel", None, None, Some(&k));
        assert!(user.contains("scenario=kernel multiboot=1\n"));
        assert!(!grub_cfg("boot", None, None, None).contains("kernel"));
    }

    #[test]
    fn layout_paths() {
        let l = Layout {
            root: PathBuf::from("/w"),
        };
        assert_eq!(
            l.l0_elf(),
            Path::new("/w/target/bare/x86_64-unknown-linux-gnu/bare/ihmi-l0")
        );
        assert_eq!(
            l.guest_elf(),
            Path::new("/w/target/bare/x86_64-unknown-linux-gnu/bare/ihmi-testguest")
        );
        assert_eq!(l.iso("boot"), Path::new("/w/target/ihmi/ihmi-boot.iso"));
        assert_eq!(l.run_dir("boot"), Path::new("/w/target/ihmi/run-boot"));
    }

    #[test]
    fn discovers_this_workspace() {
        let l = Layout::discover().unwrap();
        assert!(l.bochsrc_template().is_file());
        assert!(l.root.join("crates/host/ihmi/Cargo.toml").is_file());
    }
}
