//! The Linux guest's images: the kernel of a profile, built once and cached, and the initramfs (busybox,
//! our /init and our static workload programs). Nothing here is committed as a binary.
//!
//! - `tiny`: Debian's `linux-source-6.1`, `make tinyconfig`, then `guest/linux/tiny.config` merged in;
//!   built out of tree under `target/ihmi/linux/`, keyed by the source package's version and the
//!   fragment, so a changed fragment rebuilds and an unchanged one never does.
//! - `l1`: the same with `guest/linux/l1.config` merged on top (KVM built in), the guest hypervisor
//!   of the nested-VMX scenarios; cached the same way, keyed by both fragments.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use ihmi_btf::Btf;
use ihmi_linux::profile::{Field, FileFields, KvmProfile, LinuxProfile};

use crate::cpio::Archive;
use crate::deps;
use crate::images::{cargo, Layout};
use crate::symbols::SystemMap;

/// The kernel command line unless `--cmdline` says otherwise: the serial console at the speed that
/// keeps Bochs fast, and no KASLR so System.map's addresses are the running ones.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0,115200 nokaslr panic=-1";

/// The programs a Linux guest may run unless `--allow` says otherwise, named by their files in the
/// initramfs, allowed by their content: busybox (the shell that runs /init, and every applet, which
/// are links to it), our workload programs (and in the `l1` kernel's initramfs its VMM), and nothing
/// else: `ihmi-intruder` is refused.
pub const DEFAULT_ALLOW: &str =
    "/bin/busybox,/bin/ihmi-workload,/bin/ihmi-attack,/bin/ihmi-bench,/bin/ihmi-poweroff";

/// Which Linux kernel a guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Profile {
    /// A small kernel built here from Debian's linux-source with guest/linux/tiny.config.
    #[default]
    Tiny,
    /// Debian's stock kernel (the package linux-image-amd64 depends on), downloaded, not installed.
    Debian,
    /// The tiny kernel with KVM built in (guest/linux/l1.config on top): the guest hypervisor (L1)
    /// of the nested-VMX scenarios, which run it whatever `--profile` says.
    L1,
}

impl Profile {
    /// The name `--profile` takes.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Debian => "debian",
            Self::L1 => "l1",
        }
    }

    /// The Kconfig fragments a kernel built here merges, in order, over `make tinyconfig`; none for
    /// the downloaded one.
    const fn fragments(self) -> &'static [&'static str] {
        match self {
            Self::Tiny => &["guest/linux/tiny.config"],
            Self::L1 => &["guest/linux/tiny.config", "guest/linux/l1.config"],
            Self::Debian => &[],
        }
    }
}

/// How a Linux guest is booted: its kernel, its command line and the programs the process-creation
/// monitor allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestOptions {
    pub profile: Profile,
    pub cmdline: String,
    /// Comma-separated programs: paths of files in the initramfs (hashed by the host) or
    /// `sha256:<64 hex digits>`; empty: monitor without enforcing.
    pub allow: String,
    /// The user's multiboot kernel, for `ihmi run --kernel` (then there is no Linux guest).
    pub kernel: Option<crate::kernel::UserKernel>,
}

impl Default for GuestOptions {
    fn default() -> Self {
        Self {
            profile: Profile::Tiny,
            cmdline: DEFAULT_CMDLINE.to_string(),
            allow: DEFAULT_ALLOW.to_string(),
            kernel: None,
        }
    }
}

impl GuestOptions {
    /// Checks the allow-list's form: at most 16 programs, each the absolute path of a file in the
    /// initramfs or `sha256:` and 64 hexadecimal digits. Whether a path names a file is checked when
    /// the initramfs is built ([`prepare`]).
    pub fn new(profile: Profile, cmdline: String, allow: String) -> Result<Self> {
        let entries: Vec<&str> = allow.split(',').filter(|n| !n.is_empty()).collect();
        if entries.len() > ihmi_abi::monitor::MAX_ALLOWED {
            bail!(
                "--allow names {} programs; the monitor takes at most {}",
                entries.len(),
                ihmi_abi::monitor::MAX_ALLOWED
            );
        }
        for entry in &entries {
            let ok = match entry.strip_prefix("sha256:") {
                Some(hex) => hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
                None => {
                    entry.starts_with('/')
                        && entry.len() <= 255
                        && entry
                            .bytes()
                            .all(|b| b.is_ascii_graphic() && !b" \"'".contains(&b))
                }
            };
            if !ok {
                bail!("--allow: `{entry}` is neither the absolute path of a file in the initramfs (e.g. /bin/busybox) nor `sha256:` and 64 hexadecimal digits; programs are allowed by their content, not their names");
            }
        }
        Ok(Self {
            profile,
            cmdline,
            allow: entries.join(","),
            kernel: None,
        })
    }
}

/// A program the allow-list names: as the user named it, and its SHA-256 in hexadecimal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub label: String,
    pub sha256: String,
}

/// The SHA-256 of `bytes` in lowercase hexadecimal.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the initramfs holds, for finding the files an allow-list names: regular files by path (no
/// leading slash) and symbolic links with their targets.
#[derive(Debug, Default)]
pub struct InitramfsFiles {
    files: std::collections::BTreeMap<String, Vec<u8>>,
    links: std::collections::BTreeMap<String, String>,
}

impl InitramfsFiles {
    /// The content at `path` (absolute), through symbolic links as the kernel would follow them.
    pub fn content(&self, path: &str) -> Option<&[u8]> {
        let mut at = path.trim_start_matches('/').to_string();
        for _ in 0..8 {
            if let Some(bytes) = self.files.get(&at) {
                return Some(bytes);
            }
            let target = self.links.get(&at)?;
            at = if let Some(abs) = target.strip_prefix('/') {
                abs.to_string()
            } else {
                match at.rsplit_once('/') {
                    Some((dir, _)) => format!("{dir}/{target}"),
                    None => target.clone(),
                }
            };
        }
        None
    }

    /// The allow-list's programs with their digests: each path hashed from the file it names, each
    /// `sha256:` entry as given.
    pub fn identities(&self, allow: &str) -> Result<Vec<Identity>> {
        allow
            .split(',')
            .filter(|e| !e.is_empty())
            .map(|entry| {
                let sha256 = match entry.strip_prefix("sha256:") {
                    Some(hex) => hex.to_ascii_lowercase(),
                    None => sha256_hex(self.content(entry).with_context(|| {
                        format!(
                            "--allow: {entry} is not a file in the initramfs (it has {}); busybox's applets are /bin/busybox",
                            self.files
                                .keys()
                                .filter(|k| k.starts_with("bin/"))
                                .map(|k| format!("/{k}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?),
                };
                Ok(Identity {
                    label: entry.to_string(),
                    sha256,
                })
            })
            .collect()
    }
}

/// Kernel symbols the Linux monitors hook: the system-call entry and the process-creation point.
pub const HOOK_SYMBOLS: &[&str] = &["entry_SYSCALL_64", "begin_new_exec", "__fentry__"];

/// What a Linux scenario boots.
#[derive(Debug, Clone)]
pub struct LinuxImages {
    /// Which kernel.
    pub kernel_profile: Profile,
    pub kernel: PathBuf,
    pub system_map: PathBuf,
    /// The guest profile L0 gets: symbols and struct layouts (`ihmi_linux::LinuxProfile`).
    pub profile: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// The allow-list L0 hands the process-creation monitor (`allow=` on L0's command line): the
    /// identities' digests, `sha256:<hex>` each.
    pub allow: String,
    /// The same programs as the user named them.
    pub identities: Vec<Identity>,
}

/// The static programs the initramfs carries (package `ihmi-linux-workload`).
const WORKLOAD_PROGRAMS: &[&str] = &[
    "ihmi-poweroff",
    "ihmi-workload",
    "ihmi-attack",
    "ihmi-intruder",
    "ihmi-bench",
];
const WORKLOAD_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The guest hypervisor's VMM (package `ihmi-l1-vmm`), in the `l1` kernel's initramfs only.
const L1_VMM: &str = "ihmi-l1-vmm";

/// Builds (or finds cached) the `tiny` kernel and a fresh initramfs.
pub fn prepare(layout: &Layout, guest: &GuestOptions) -> Result<LinuxImages> {
    deps::ensure_linux()?;
    let (kernel, system_map, profile) = match guest.profile {
        Profile::Tiny | Profile::L1 => built_kernel(layout, guest.profile)?,
        Profile::Debian => debian_kernel(layout)?,
    };
    let l1 = guest.profile == Profile::L1;
    let programs = build_workload(layout, l1)?;
    let (initrd, files) = build_initramfs(
        layout,
        guest.profile,
        &programs,
        &attacker_map(&system_map)?,
        l1.then_some(kernel.as_path()),
    )?;
    // The default allow-list names the guest hypervisor's VMM too where the initramfs has it.
    let allow = if l1 && guest.allow == DEFAULT_ALLOW {
        format!("{DEFAULT_ALLOW},/bin/{L1_VMM}")
    } else {
        guest.allow.clone()
    };
    let identities = files.identities(&allow)?;
    Ok(LinuxImages {
        kernel_profile: guest.profile,
        kernel,
        system_map,
        profile,
        initrd,
        cmdline: guest.cmdline.clone(),
        allow: identities
            .iter()
            .map(|i| format!("sha256:{}", i.sha256))
            .collect::<Vec<_>>()
            .join(","),
        identities,
    })
}

fn linux_dir(layout: &Layout) -> PathBuf {
    layout.out_dir().join("linux")
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status}); see its output above");
    }
    Ok(())
}

fn source_version() -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "linux-source-6.1"])
        .output()
        .context("could not run dpkg-query")?;
    if !out.status.success() {
        bail!("linux-source-6.1 is not installed: apt-get install linux-source-6.1");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Debian's stock kernel, its System.map and its guest profile, cached under
/// `target/ihmi/linux/debian-<package>/`: the image package `linux-image-amd64` depends on is
/// downloaded with `apt-get download` (not installed), and only its /boot is unpacked. Its
/// /boot/System.map is a stub ("the real System.map is in the -dbg package"), so the kernel's own
/// System.map comes from `<package>-dbg` (about 860 MB, of which only that file is unpacked; the
/// download is deleted afterwards). The profile's struct layouts come from the BTF in the vmlinux
/// inside the vmlinuz (unpacked with the kernel source's scripts/extract-vmlinux).
fn debian_kernel(layout: &Layout) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()
        .context("could not run apt-cache")?;
    let deps = String::from_utf8_lossy(&out.stdout);
    let Some(package) = deps.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Depends: ")
            .filter(|p| p.starts_with("linux-image-") && !p.contains('<'))
            .map(str::to_string)
    }) else {
        bail!("apt-cache does not know linux-image-amd64's kernel package: run `apt-get update` (as root)");
    };
    let dir = linux_dir(layout).join(format!("debian-{package}"));
    let (bzimage, system_map, profile) = (
        dir.join("bzImage"),
        dir.join("System.map"),
        dir.join("profile.txt"),
    );
    let vmlinux = dir.join("vmlinux");
    let config = dir.join("config");
    if bzimage.is_file() && system_map.is_file() && vmlinux.is_file() && config.is_file() {
        let current = fs::read_to_string(&profile)
            .ok()
            .is_some_and(|t| LinuxProfile::parse(&t).is_ok());
        if !current {
            let p = guest_profile(&system_map, &vmlinux, &fs::read_to_string(&config)?)?;
            fs::write(&profile, p.to_string())?;
        }
        return Ok((bzimage, system_map, profile));
    }
    let download = dir.join("download");
    if download.exists() {
        fs::remove_dir_all(&download)?;
    }
    fs::create_dir_all(&download)?;
    eprintln!("[ihmi] downloading {package} (Debian's stock kernel) with apt-get download");
    let deb = apt_download(&package, &download)?;
    // Only /boot: the modules are not needed (the initramfs is ours) and take hundreds of MiB.
    let unpacked = download.join("root");
    fs::create_dir_all(&unpacked)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$0\" | tar -x -C \"$1\" ./boot")
        .arg(&deb)
        .arg(&unpacked)
        .status()
        .context("could not run dpkg-deb")?;
    if !status.success() {
        bail!("unpacking {} failed ({status})", deb.display());
    }
    let boot_file = |prefix: &str| -> Result<PathBuf> {
        fs::read_dir(unpacked.join("boot"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .with_context(|| format!("{} has no /boot/{prefix}*", deb.display()))
    };
    let (vmlinuz, cfg) = (boot_file("vmlinuz-")?, boot_file("config-")?);
    let kver = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let dbg = format!("{package}-dbg");
    eprintln!("[ihmi] downloading {dbg} for the kernel's System.map (the image ships a stub)");
    let dbg_dir = download.join("dbg");
    fs::create_dir_all(&dbg_dir)?;
    let dbg_deb = apt_download(&dbg, &dbg_dir)?;
    let member = format!("./usr/lib/debug/boot/System.map-{kver}");
    // tar stops at the first match, so dpkg-deb may die of a broken pipe: the file decides.
    let _ = Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$0\" | tar -x --occurrence=1 -C \"$1\" \"$2\"")
        .arg(&dbg_deb)
        .arg(&unpacked)
        .arg(&member)
        .stderr(Stdio::null())
        .status()
        .context("could not run dpkg-deb")?;
    let map = unpacked.join(&member);
    if !map.is_file() {
        bail!("{} has no {member}", dbg_deb.display());
    }
    let src = ensure_source(layout)?;
    eprintln!(
        "[ihmi] extracting vmlinux (for its BTF) from {}",
        vmlinuz.display()
    );
    let extracted = Command::new("sh")
        .arg(src.join("scripts/extract-vmlinux"))
        .arg(&vmlinuz)
        .stdin(Stdio::null())
        .output()
        .context("could not run scripts/extract-vmlinux")?;
    if !extracted.status.success() || extracted.stdout.is_empty() {
        bail!(
            "scripts/extract-vmlinux could not unpack {}: {}",
            vmlinuz.display(),
            String::from_utf8_lossy(&extracted.stderr).trim()
        );
    }
    fs::write(&vmlinux, &extracted.stdout)?;
    fs::copy(&cfg, &config)?;
    let p = guest_profile(&map, &vmlinux, &fs::read_to_string(&config)?)?;
    fs::write(&profile, p.to_string())?;
    fs::copy(&map, &system_map)?;
    fs::copy(&vmlinuz, &bzimage)?;
    fs::remove_dir_all(&download)?;
    Ok((bzimage, system_map, profile))
}

/// Downloads `package`'s .deb into the empty directory `dir` (`apt-get download`); returns its path.
fn apt_download(package: &str, dir: &Path) -> Result<PathBuf> {
    run(
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(dir),
        &format!("apt-get download {package} (is the package index current? `apt-get update`)"),
    )?;
    fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))
}

/// The kernel source tree, extracted from Debian's linux-source package once per version.
fn ensure_source(layout: &Layout) -> Result<PathBuf> {
    let version = source_version()?;
    let src = linux_dir(layout).join("linux-source-6.1");
    let extracted = linux_dir(layout).join(format!(".extracted-{version}"));
    if !extracted.is_file() {
        if src.exists() {
            fs::remove_dir_all(&src).context("cannot clear the old kernel source")?;
        }
        fs::create_dir_all(linux_dir(layout))?;
        eprintln!(
            "[ihmi] extracting {} (linux-source {version})",
            deps::LINUX_SOURCE
        );
        run(
            Command::new("tar")
                .arg("-xf")
                .arg(deps::LINUX_SOURCE)
                .arg("-C")
                .arg(linux_dir(layout)),
            "tar",
        )?;
        fs::write(&extracted, &version)?;
    }
    Ok(src)
}

/// A kernel built here (`tiny`, `l1`): its bzImage, System.map and guest profile, building them if the
/// cache has none for this source version and these fragments.
fn built_kernel(layout: &Layout, which: Profile) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let fragments = which
        .fragments()
        .iter()
        .map(|f| {
            let path = layout.root.join(f);
            let text =
                fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            Ok((path, text))
        })
        .collect::<Result<Vec<_>>>()?;
    let version = source_version()?;
    let mut h = DefaultHasher::new();
    version.hash(&mut h);
    // The tiny kernel's key is the one it had before other profiles existed: its cache stays valid.
    for (_, text) in &fragments {
        text.hash(&mut h);
    }
    let dir = linux_dir(layout).join(format!("{}-{version}-{:016x}", which.name(), h.finish()));
    let (bzimage, system_map, profile) = (
        dir.join("bzImage"),
        dir.join("System.map"),
        dir.join("profile.txt"),
    );
    if bzimage.is_file() && system_map.is_file() {
        // A profile written by an older ihmi is derived again from the kernel the cache kept.
        let current = fs::read_to_string(&profile)
            .ok()
            .is_some_and(|t| LinuxProfile::parse(&t).is_ok());
        let vmlinux = dir.join("build/vmlinux");
        if !current && vmlinux.is_file() {
            let config = fs::read_to_string(dir.join("build/.config"))?;
            let p = guest_profile(&system_map, &vmlinux, &config)?;
            fs::write(&profile, p.to_string())?;
            return Ok((bzimage, system_map, profile));
        }
        if current {
            return Ok((bzimage, system_map, profile));
        }
    }

    let src = ensure_source(layout)?;
    let build = dir.join("build");
    fs::create_dir_all(&build)?;
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(&src)
            .arg(format!("O={}", build.display()))
            .args(args);
        c
    };
    let name = which.name();
    eprintln!(
        "[ihmi] configuring the {name} kernel (tinyconfig + {})",
        which.fragments().join(" + ")
    );
    run(&mut make(&["-s", "tinyconfig"]), "make tinyconfig")?;
    run(
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&src)
            .arg("-m")
            .arg("-O")
            .arg(&build)
            .arg(build.join(".config"))
            .args(fragments.iter().map(|(path, _)| path))
            .stdout(Stdio::null()),
        "merge_config.sh",
    )?;
    run(&mut make(&["-s", "olddefconfig"]), "make olddefconfig")?;
    for (path, text) in &fragments {
        check_config(&build.join(".config"), path, text)?;
    }
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!("[ihmi] building the {name} kernel with {jobs} jobs (about 2 minutes on 2 cores)");
    run(
        &mut make(&["-s", &format!("-j{jobs}"), "bzImage"]),
        "the kernel build",
    )?;
    let config = fs::read_to_string(build.join(".config"))?;
    let p = guest_profile(&build.join("System.map"), &build.join("vmlinux"), &config)?;
    fs::write(&profile, p.to_string())?;
    fs::copy(build.join("System.map"), &system_map)?;
    // The bzImage last: its presence says the cache entry is complete.
    fs::copy(build.join("arch/x86/boot/bzImage"), &bzimage)?;
    Ok((bzimage, system_map, profile))
}

/// The guest profile of a kernel: symbols from its System.map, struct layouts from the BTF in its
/// vmlinux, and whether page-table isolation is built in (from its .config).
pub fn guest_profile(system_map: &Path, vmlinux: &Path, config: &str) -> Result<LinuxProfile> {
    use object::{Object, ObjectSection};
    let map = SystemMap::load(system_map)?;
    let elf = fs::read(vmlinux).with_context(|| format!("cannot read {}", vmlinux.display()))?;
    let file = object::File::parse(&*elf)
        .with_context(|| format!("{} is not an ELF file", vmlinux.display()))?;
    let section = file.section_by_name(".BTF").with_context(|| {
        format!(
            "{} has no .BTF section: build the kernel with CONFIG_DEBUG_INFO_BTF",
            vmlinux.display()
        )
    })?;
    let data = section.data().context("cannot read the .BTF section")?;
    let btf = Btf::parse(data).map_err(|e| anyhow::anyhow!("{}: {e}", vmlinux.display()))?;
    let member = |ty: &str, name: &str| -> Result<Field> {
        let m = btf
            .member(ty, name)
            .map_err(|e| anyhow::anyhow!("{ty}.{name} in the BTF of {}: {e}", vmlinux.display()))?;
        Ok(Field {
            offset: m.offset,
            size: m.size,
        })
    };
    let field = |name: &str| member("task_struct", name);
    Ok(LinuxProfile {
        current_task: map.require("current_task")?,
        init_top_pgt: map.require("init_top_pgt")?,
        entry_syscall_64: map.require("entry_SYSCALL_64")?,
        exec_hook: map.require("begin_new_exec")?,
        kernel_end: map.require("_end")?,
        text: [map.require("_stext")?, map.require("_etext")?],
        rodata: [map.require("__start_rodata")?, map.require("__end_rodata")?],
        data: [map.require("_sdata")?, map.require("__init_begin")?],
        bss: [map.require("__bss_start")?, map.require("__bss_stop")?],
        idt_table: map.require("idt_table")?,
        page_offset_base: map.require("page_offset_base")?,
        pid: field("pid")?,
        tgid: field("tgid")?,
        comm: field("comm")?,
        real_parent: field("real_parent")?,
        binprm_filename: member("linux_binprm", "filename")?,
        pti_pgd_pair: config.lines().any(|l| l == "CONFIG_PAGE_TABLE_ISOLATION=y"),
        // A kernel with io_uring issues every submitted operation through `io_issue_sqe`; one
        // without it (or one that inlined it) has no such hook point, and its rings go unwatched.
        io_uring: match map.get("io_issue_sqe") {
            Some(at) => Some((at, member("io_kiocb", "opcode")?)),
            None => None,
        },
        kvm: match map.get("vmx_handle_exit") {
            Some(handle_exit) => Some(kvm_profile(&map, &file, &member, handle_exit, vmlinux)?),
            None => None,
        },
        files: FileFields {
            binprm_file: member("linux_binprm", "file")?,
            file_mapping: member("file", "f_mapping")?,
            mapping_host: member("address_space", "host")?,
            mapping_pages: member("address_space", "i_pages")?,
            xa_head: member("xarray", "xa_head")?,
            inode_ino: member("inode", "i_ino")?,
            inode_size: member("inode", "i_size")?,
            inode_ctime: member("inode", "i_ctime")?,
            inode_mtime: member("inode", "i_mtime")?,
            node_shift: member("xa_node", "shift")?,
            node_slots: member("xa_node", "slots")?,
            page_size: btf.struct_size("page").map_err(|e| {
                anyhow::anyhow!("struct page in the BTF of {}: {e}", vmlinux.display())
            })?,
            vmemmap_base: map.require("vmemmap_base")?,
        },
    })
}

/// What the in-hypervisor monitor needs of a kernel with KVM built in: the exit reason's place in a
/// vCPU (BTF), and KVM's exit-handler table with its entries as the image has them (the symbol's size
/// and bytes from the vmlinux ELF), which the monitor holds the live table to.
fn kvm_profile(
    map: &SystemMap,
    file: &object::File<'_>,
    member: &dyn Fn(&str, &str) -> Result<Field>,
    handle_exit: u64,
    vmlinux: &Path,
) -> Result<KvmProfile> {
    use ihmi_linux::profile::MAX_EXIT_HANDLERS;
    use object::{Object, ObjectSection, ObjectSymbol};
    let reason = member("vcpu_vmx", "exit_reason")?;
    let vcpu = member("vcpu_vmx", "vcpu")?;
    let offset = reason.offset.checked_sub(vcpu.offset).with_context(|| {
        format!(
            "vcpu_vmx.exit_reason is before vcpu_vmx.vcpu in {}",
            vmlinux.display()
        )
    })?;
    // The vCPU's own VMCS: `vcpu_vmx.vmcs01` is a `struct loaded_vmcs`, whose `vmcs` pointer the
    // monitor reads, so that pointer must be its first member.
    let relative = |f: Field, name: &str| -> Result<Field> {
        let offset = f.offset.checked_sub(vcpu.offset).with_context(|| {
            format!(
                "vcpu_vmx.{name} is before vcpu_vmx.vcpu in {}",
                vmlinux.display()
            )
        })?;
        Ok(Field {
            offset,
            size: f.size,
        })
    };
    let vmcs = member("loaded_vmcs", "vmcs")?;
    if vmcs.offset != 0 || vmcs.size != 8 {
        bail!(
            "loaded_vmcs.vmcs is at {:#x} ({} bytes) in {}; ihmi reads it as the first word",
            vmcs.offset,
            vmcs.size,
            vmlinux.display()
        );
    }
    let vmcs01 = relative(member("vcpu_vmx", "vmcs01")?, "vmcs01")?;
    let loaded_vmcs = relative(member("vcpu_vmx", "loaded_vmcs")?, "loaded_vmcs")?;
    let table = "kvm_vmx_exit_handlers";
    let at = map.require(table)?;
    let sym = file
        .symbol_by_name(table)
        .with_context(|| format!("{} has no symbol {table}", vmlinux.display()))?;
    if sym.address() != at || sym.size() == 0 || sym.size() % 8 != 0 {
        bail!(
            "{table} in {} is at {:#x} with {} bytes; System.map says {at:#x}",
            vmlinux.display(),
            sym.address(),
            sym.size()
        );
    }
    let count = usize::try_from(sym.size() / 8)?;
    if count > MAX_EXIT_HANDLERS {
        bail!("{table} has {count} entries, more than the {MAX_EXIT_HANDLERS} ihmi can hold");
    }
    let section = sym
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .with_context(|| format!("{table} is in no section of {}", vmlinux.display()))?;
    let bytes = section
        .data_range(at, sym.size())
        .ok()
        .flatten()
        .with_context(|| format!("cannot read {table} from {}", vmlinux.display()))?;
    let mut values = [0u64; MAX_EXIT_HANDLERS];
    for (v, b) in values.iter_mut().zip(bytes.chunks_exact(8)) {
        *v = u64::from_le_bytes(b.try_into()?);
    }
    // `kvm_x86_ops`: its size from the ELF symbol; its values exist only once the kernel has booted
    // (L0 copies them then).
    let ops = "kvm_x86_ops";
    let ops_at = map.require(ops)?;
    let ops_sym = file
        .symbol_by_name(ops)
        .with_context(|| format!("{} has no symbol {ops}", vmlinux.display()))?;
    if ops_sym.address() != ops_at
        || ops_sym.size() % 8 != 0
        || !(1..=ihmi_linux::profile::MAX_X86_OPS_WORDS).contains(&(ops_sym.size() / 8))
    {
        bail!(
            "{ops} in {} is at {:#x} with {} bytes (System.map says {ops_at:#x}); ihmi holds up to {} words",
            vmlinux.display(),
            ops_sym.address(),
            ops_sym.size(),
            ihmi_linux::profile::MAX_X86_OPS_WORDS
        );
    }
    Ok(KvmProfile {
        handle_exit,
        vmx_vmexit: map.require("vmx_vmexit")?,
        exit_reason: Field {
            offset,
            size: reason.size,
        },
        exit_handlers: at,
        exit_handler_count: count,
        exit_handler_values: values,
        make_spte: map.require("make_spte")?,
        slot_base_gfn: member("kvm_memory_slot", "base_gfn")?,
        slot_npages: member("kvm_memory_slot", "npages")?,
        slot_userspace_addr: member("kvm_memory_slot", "userspace_addr")?,
        mmu_page_role: member("kvm_mmu_page", "role")?,
        commit_memory_region: map.require("kvm_arch_commit_memory_region")?,
        vcpu_create: map.require("kvm_arch_vcpu_postcreate")?,
        vcpu_destroy: map.require("kvm_arch_vcpu_destroy")?,
        slot_id: member("kvm_memory_slot", "id")?,
        slot_as_id: member("kvm_memory_slot", "as_id")?,
        slot_flags: member("kvm_memory_slot", "flags")?,
        vcpu_kvm: member("kvm_vcpu", "kvm")?,
        vcpu_id: member("kvm_vcpu", "vcpu_id")?,
        // The pointer, not the whole `loaded_vmcs`.
        vcpu_vmcs01: Field {
            offset: vmcs01.offset,
            size: 8,
        },
        vcpu_loaded_vmcs: loaded_vmcs,
        x86_ops: ops_at,
        x86_ops_size: ops_sym.size(),
    })
}

/// Every `=y` and `=n` of the fragment must have survived Kconfig: a dependency it missed would build a
/// kernel without what the monitors rely on, silently.
fn check_config(config: &Path, fragment_path: &Path, fragment: &[u8]) -> Result<()> {
    let built = fs::read_to_string(config)?;
    for line in String::from_utf8_lossy(fragment).lines() {
        let line = line.trim();
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if line.starts_with('#') {
            continue;
        }
        let ok = match value {
            "n" => !built.lines().any(|l| l == format!("{name}=y")),
            _ => built.lines().any(|l| l == line),
        };
        if !ok {
            bail!(
                "{line} from {} did not survive Kconfig (a missing dependency?)",
                fragment_path.display()
            );
        }
    }
    Ok(())
}

/// Whether `elf` is a statically linked 64-bit executable (no PT_INTERP program header). Anything
/// `object` cannot read as ELF64, program headers included, is not.
pub fn is_static_elf(elf: &[u8]) -> bool {
    use object::read::elf::{FileHeader, ProgramHeader};
    let Ok(header) = object::elf::FileHeader64::<object::Endianness>::parse(elf) else {
        return false;
    };
    let Ok(endian) = header.endian() else {
        return false;
    };
    header.program_headers(endian, elf).is_ok_and(|phdrs| {
        phdrs
            .iter()
            .all(|p| p.p_type(endian) != object::elf::PT_INTERP)
    })
}

/// Builds the workload programs (and with `vmm` the L1 VMM) as static binaries; returns (name, path)
/// pairs.
fn build_workload(layout: &Layout, vmm: bool) -> Result<Vec<(&'static str, PathBuf)>> {
    let target_dir = layout.root.join("target/linux-workload");
    let mut cmd = Command::new(cargo());
    cmd.current_dir(&layout.root)
        .args([
            "build",
            "--release",
            "-p",
            "ihmi-linux-workload",
            "--target",
            WORKLOAD_TARGET,
        ])
        .args(if vmm { &["-p", L1_VMM][..] } else { &[] })
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // No symbols: the guest needs none, and the initrd is loaded below the tiny kernel's 16 MiB.
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run(&mut cmd, "building the workload programs")?;
    WORKLOAD_PROGRAMS
        .iter()
        .chain(if vmm { &[L1_VMM][..] } else { &[] })
        .map(|name| {
            let path = target_dir.join(WORKLOAD_TARGET).join("release").join(name);
            let bytes =
                fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            if !is_static_elf(&bytes) {
                bail!("{} is not statically linked", path.display());
            }
            Ok((*name, path))
        })
        .collect()
}

/// The initramfs: busybox, /init, the workload programs, and the nodes init needs before devtmpfs.
/// Kernel symbols the Linux attacks use, as System.map lists them (a name may appear more than once).
const ATTACKER_SYMBOLS: &[&str] = &[
    "_text",
    "begin_new_exec",
    "load_elf_binary",
    "init_top_pgt",
    "printk_sysctls",
    "proc_dointvec",
    "empty_zero_page",
    "idt_table",
];

/// Symbols only some kernels have, which an attack on what they have uses: KVM's exit-handler table
/// and exit path (the `l1` kernel).
const ATTACKER_SYMBOLS_IF_PRESENT: &[&str] =
    &["kvm_vmx_exit_handlers", "vmx_handle_exit", "kvm_x86_ops"];

/// What the compromised root knows of the kernel: the lines of its System.map (which distributions
/// publish) for [`ATTACKER_SYMBOLS`], put in the initramfs as `/etc/ihmi-attacker.map`.
fn attacker_map(system_map: &Path) -> Result<String> {
    let text = fs::read_to_string(system_map)
        .with_context(|| format!("cannot read {}", system_map.display()))?;
    let mut out = String::new();
    for name in ATTACKER_SYMBOLS {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.split_whitespace().nth(2) == Some(name))
            .collect();
        if lines.is_empty() {
            bail!(
                "{} has no `{name}`, which the Linux attack scenarios need",
                system_map.display()
            );
        }
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
    }
    for name in ATTACKER_SYMBOLS_IF_PRESENT {
        for l in text
            .lines()
            .filter(|l| l.split_whitespace().nth(2) == Some(name))
        {
            out.push_str(l);
            out.push('\n');
        }
    }
    Ok(out)
}

/// With `l2_kernel` (the `l1` kernel's), also what the guest hypervisor's VMM boots as a Linux L2:
/// that bzImage and [`l2_initramfs`], in /l2.
fn build_initramfs(
    layout: &Layout,
    profile: Profile,
    programs: &[(&str, PathBuf)],
    attacker_map: &str,
    l2_kernel: Option<&Path>,
) -> Result<(PathBuf, InitramfsFiles)> {
    let busybox =
        fs::read(deps::BUSYBOX).with_context(|| format!("cannot read {}", deps::BUSYBOX))?;
    if !is_static_elf(&busybox) {
        bail!(
            "{} is not statically linked: apt-get install busybox-static",
            deps::BUSYBOX
        );
    }
    let init_path = layout.root.join("guest/linux/init");
    let init =
        fs::read(&init_path).with_context(|| format!("cannot read {}", init_path.display()))?;
    let mut a = Archive::new();
    let mut kept = InitramfsFiles::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc"] {
        a.dir(d);
    }
    a.char_dev("dev/console", 0o600, 5, 1);
    a.char_dev("dev/null", 0o666, 1, 3);
    let mut file = |a: &mut Archive, name: &str, perm: u32, bytes: Vec<u8>| {
        a.file(name, perm, &bytes);
        kept.files.insert(name.to_string(), bytes);
    };
    file(&mut a, "bin/busybox", 0o755, busybox);
    file(&mut a, "init", 0o755, init);
    file(
        &mut a,
        "etc/ihmi-attacker.map",
        0o644,
        attacker_map.as_bytes().to_vec(),
    );
    for (name, path) in programs {
        file(&mut a, &format!("bin/{name}"), 0o755, fs::read(path)?);
    }
    if let Some(kernel) = l2_kernel {
        a.dir("l2");
        let bzimage =
            fs::read(kernel).with_context(|| format!("cannot read {}", kernel.display()))?;
        file(&mut a, L2_KERNEL, 0o644, bzimage);
        let (_, poweroff) = programs
            .iter()
            .find(|(name, _)| *name == "ihmi-poweroff")
            .context("the L2's /init (ihmi-poweroff) was not built")?;
        file(
            &mut a,
            L2_INITRD,
            0o644,
            l2_initramfs(&fs::read(poweroff)?)?,
        );
    }
    a.symlink("bin/sh", "busybox");
    kept.links
        .insert("bin/sh".to_string(), "busybox".to_string());
    let out = linux_dir(layout).join(format!("initrd-{}.cpio.gz", profile.name()));
    fs::create_dir_all(linux_dir(layout))?;
    fs::write(&out, gzip(&a.finish())?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok((out, kept))
}

/// Where the `l1` initramfs keeps the Linux L2's kernel and initramfs (`guest/linux/init` names
/// them to `ihmi-l1-vmm --linux`).
const L2_KERNEL: &str = "l2/bzImage";
const L2_INITRD: &str = "l2/initrd.cpio.gz";

/// The Linux L2's initramfs: one program, `init` (`ihmi-poweroff`, which writes its arguments on
/// the debug port and powers off), and the console node the kernel opens for it.
fn l2_initramfs(init: &[u8]) -> Result<Vec<u8>> {
    let mut a = Archive::new();
    a.dir("dev");
    a.char_dev("dev/console", 0o600, 5, 1);
    a.file("init", 0o755, init);
    gzip(&a.finish())
}

/// The archive gzip-compressed (both kernel profiles have `CONFIG_RD_GZIP`): a third of the size, so
/// the boot modules GRUB loads below the tiny kernel's fixed 16 MiB keep room to grow.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(bytes)?;
    Ok(z.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_name_files_or_digests_and_resolve_through_links() {
        let ok = |a: &str| GuestOptions::new(Profile::Tiny, String::new(), a.to_string());
        assert_eq!(ok("/bin/a,,/bin/b").unwrap().allow, "/bin/a,/bin/b");
        let hex = "0123456789abcdef".repeat(4);
        assert!(ok(&format!("sha256:{hex}")).is_ok());
        for bad in [
            "busybox",
            "exe",
            "sha256:12",
            "/bin/a b",
            &format!("sha256:{hex}0"),
        ] {
            let e = ok(bad).unwrap_err().to_string();
            assert!(e.contains("not their names"), "{bad}: {e}");
        }
        let many = "/bin/x,".repeat(ihmi_abi::monitor::MAX_ALLOWED + 1);
        assert!(ok(&many).is_err());

        let mut f = InitramfsFiles::default();
        f.files.insert("bin/busybox".into(), b"busybox".to_vec());
        f.files.insert("bin/other".into(), b"other".to_vec());
        f.links.insert("bin/sh".into(), "busybox".into());
        f.links.insert("bin/abs".into(), "/bin/other".into());
        f.links.insert("bin/loop".into(), "loop".into());
        assert_eq!(f.content("/bin/sh"), Some(&b"busybox"[..]));
        assert_eq!(f.content("/bin/abs"), Some(&b"other"[..]));
        assert_eq!(f.content("/bin/loop"), None);
        let ids = f
            .identities(&format!("/bin/sh,sha256:{}", hex.to_uppercase()))
            .unwrap();
        assert_eq!(ids[0].label, "/bin/sh");
        assert_eq!(ids[0].sha256, sha256_hex(b"busybox"));
        // FIPS 180-2's first example.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(ids[1].sha256, hex);
        let e = format!("{:#}", f.identities("/bin/ls").unwrap_err());
        assert!(e.contains("/bin/ls is not a file in the initramfs"), "{e}");
        assert!(e.contains("/bin/busybox, /bin/other"), "{e}");
    }

    /// An ELF64 header with one program header of type `ptype`.
    fn elf_with_phdr(ptype: u32) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // ELFCLASS64
        e[5] = 1; // ELFDATA2LSB
        e[6] = 1; // EV_CURRENT
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        e[64..68].copy_from_slice(&ptype.to_le_bytes());
        e
    }

    #[test]
    fn static_elf_check() {
        assert!(is_static_elf(&elf_with_phdr(1)), "PT_LOAD only");
        assert!(!is_static_elf(&elf_with_phdr(3)), "PT_INTERP");
        let mut truncated = elf_with_phdr(1);
        truncated.truncate(66);
        assert!(!is_static_elf(&truncated), "program header cut off");
        let sh = fs::read("/bin/sh").unwrap();
        assert!(!is_static_elf(&sh), "/bin/sh is dynamically linked");
        assert!(!is_static_elf(b"not an elf"));
        assert!(!is_static_elf(&[]));
    }

    #[test]
    fn init_boots_the_l2_the_initramfs_carries_with_the_judged_line() {
        let init = include_str!("../../../../guest/linux/init");
        let line = ihmi_abi::NESTED_LINUX_L2_INIT.strip_prefix("l2: ").unwrap();
        assert!(init.contains(&format!("-- {line}\"")), "{line}");
        assert!(init.contains(&format!("--linux /{L2_KERNEL} /{L2_INITRD} ")));
    }

    #[test]
    fn l2_initramfs_is_init_and_the_console() {
        let gz = l2_initramfs(b"\x7fELF-ish").unwrap();
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
        let text = raw.escape_ascii().to_string();
        for name in [
            "dev\\x00",
            "dev/console\\x00",
            "init\\x00",
            "\\x7fELF-ish",
            "TRAILER!!!",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
    }

    #[test]
    fn config_check_catches_lost_options() {
        let dir = std::env::temp_dir().join(format!("ihmi-cfg-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join(".config");
        fs::write(&cfg, "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n").unwrap();
        let frag = Path::new("guest/linux/x.config");
        assert!(check_config(&cfg, frag, b"CONFIG_A=y\nCONFIG_B=n\n# comment\n").is_ok());
        let err = check_config(&cfg, frag, b"CONFIG_B=y\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CONFIG_B=y from guest/linux/x.config"),
            "{err}"
        );
        assert!(check_config(&cfg, frag, b"CONFIG_C=n\n").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
