//! The Bochs scenarios: names L0 understands (`scenario=<name>` on its command line) and what each
//! needs from the emulated CPU.

use thiserror::Error;

use ihmi_abi::attack::IhmiAttack;
use ihmi_abi::monitor::Mode;
use ihmi_abi::Attack;

use crate::cpu::Feature;
use crate::events::Agreement;
use crate::linux::Profile;

/// What every L0 scenario needs: L0 itself runs its guest under VMX with EPT.
pub const BASE: &[Feature] = &[Feature::Vmx, Feature::Ept];
/// A guest entered in protected mode with paging off (a multiboot kernel): unrestricted guest.
pub const UNRESTRICTED: &[Feature] = &[Feature::Vmx, Feature::Ept, Feature::UnrestrictedGuest];
/// A multiboot kernel offered VMX with VMCS shadowing (`kernel-nested`).
pub const UNRESTRICTED_SHADOW: &[Feature] = &[
    Feature::Vmx,
    Feature::Ept,
    Feature::UnrestrictedGuest,
    Feature::VmcsShadowing,
];
/// A guest hypervisor's VMCS shadowed (`nested-mini-shadow`).
pub const SHADOW: &[Feature] = &[Feature::Vmx, Feature::Ept, Feature::VmcsShadowing];

/// One scenario L0 can run: `ihmi_abi::Scenario` (the catalogue L0 and the guests are built from)
/// with what it needs from the CPU model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    pub scenario: ihmi_abi::Scenario,
    pub name: &'static str,
    /// CPU features the scenario needs; `ihmi` refuses a `--cpu` model that lacks one.
    pub requires: &'static [Feature],
}

impl Scenario {
    /// The scenario and its needs: in-box monitoring needs VMFUNC for the gate; everything else,
    /// the out-of-box baseline included, runs where VMX and EPT do.
    pub const fn of(scenario: ihmi_abi::Scenario) -> Self {
        Scenario {
            scenario,
            name: scenario.name(),
            requires: match scenario.monitor_mode() {
                Mode::InBox => IN_BOX,
                Mode::None | Mode::OutBox if scenario.shadows_vmcs() && scenario.is_multiboot() => {
                    UNRESTRICTED_SHADOW
                }
                Mode::None | Mode::OutBox if scenario.shadows_vmcs() => SHADOW,
                Mode::None | Mode::OutBox if scenario.is_multiboot() => UNRESTRICTED,
                Mode::None | Mode::OutBox => BASE,
            },
        }
    }
}

/// Every scenario, in the order of `ihmi_abi::Scenario::ALL`: the default test set, then the slow
/// ones (`ihmi_abi::Scenario::SLOW`), which `ihmi test --only NAME` runs.
pub const ALL_SCENARIOS: [Scenario; ihmi_abi::Scenario::ALL.len()] = {
    let all = ihmi_abi::Scenario::ALL;
    let mut out = [DEMO; ihmi_abi::Scenario::ALL.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = Scenario::of(all[i]);
        i += 1;
    }
    out
};

/// What `ihmi test` runs by default, in order: all but the slow scenarios.
pub const TEST_SCENARIOS: &[Scenario] = ALL_SCENARIOS
    .split_at(ALL_SCENARIOS.len() - ihmi_abi::Scenario::SLOW.len())
    .0;

/// The attack suite (`ihmi attacks`), one scenario per attack of `ihmi_abi::Attack::ALL`.
pub const ATTACK_SCENARIOS: [Scenario; Attack::ALL.len()] = {
    let mut out = [DEMO; Attack::ALL.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = Scenario::of(ihmi_abi::Scenario::Attack(Attack::ALL[i]));
        i += 1;
    }
    out
};

/// Kernel arguments a Linux scenario adds to the command line: the attack and benchmark scenarios
/// tell their /init.
pub fn kernel_args(name: &str) -> &'static str {
    match ihmi_abi::Scenario::from_name(name) {
        Some(ihmi_abi::Scenario::LinuxAttack(a)) => a.kernel_arg(),
        Some(ihmi_abi::Scenario::LinuxBench(_)) => "ihmi.bench",
        // KVM on shadow paging (L0 offers L1 no EPT yet), with no VMX for its own guests.
        Some(
            ihmi_abi::Scenario::NestedKvm
            | ihmi_abi::Scenario::NestedKvmShadow
            | ihmi_abi::Scenario::IhmiKvm
            | ihmi_abi::Scenario::IhmiKvmOutbox,
        ) => "ihmi.nested=kvm kvm_intel.ept=0 kvm_intel.nested=0",
        // KVM under the in-hypervisor monitor, with L1's root attacking KVM's exit-handler table.
        Some(ihmi_abi::Scenario::IhmiAttack(a)) => match a {
            IhmiAttack::ExitHandler => {
                "ihmi.nested=kvm ihmi.attack=kvm-exit-handler kvm_intel.ept=0 kvm_intel.nested=0"
            }
            IhmiAttack::KvmText => {
                "ihmi.nested=kvm ihmi.attack=kvm-text kvm_intel.ept=0 kvm_intel.nested=0"
            }
            IhmiAttack::Vmcs12Region => {
                "ihmi.nested=kvm ihmi.attack=kvm-vmcs12-region kvm_intel.ept=0 kvm_intel.nested=0"
            }
            IhmiAttack::L2Map => {
                "ihmi.nested=kvm ihmi.attack=kvm-l2-map kvm_intel.ept=0 kvm_intel.nested=0"
            }
            IhmiAttack::L2MapMonitor => {
                "ihmi.nested=kvm ihmi.attack=kvm-l2-map-monitor kvm_intel.ept=0 kvm_intel.nested=0"
            }
            IhmiAttack::L2Vmfunc => {
                "ihmi.nested=kvm ihmi.attack=kvm-l2-vmfunc kvm_intel.ept=0 kvm_intel.nested=0"
            }
            IhmiAttack::HostState => {
                "ihmi.nested=kvm ihmi.attack=kvm-host-state kvm_intel.ept=0 kvm_intel.nested=0"
            }
            IhmiAttack::RogueVmcs => {
                "ihmi.nested=kvm ihmi.attack=kvm-rogue-vmcs kvm_intel.ept=0 kvm_intel.nested=0"
            }
            IhmiAttack::Starve => {
                "ihmi.nested=kvm ihmi.attack=kvm-starve kvm_intel.ept=0 kvm_intel.nested=0"
            }
            IhmiAttack::KvmOps => {
                "ihmi.nested=kvm ihmi.attack=kvm-ops kvm_intel.ept=0 kvm_intel.nested=0"
            }
        },
        // The same KVM, after /init's workload under the in-box monitors.
        Some(ihmi_abi::Scenario::NestedKvmSim) => {
            "ihmi.nested=kvm-sim kvm_intel.ept=0 kvm_intel.nested=0"
        }
        // KVM on EPT, which L0 offers this one.
        Some(ihmi_abi::Scenario::NestedKvmEpt) => {
            "ihmi.nested=kvm kvm_intel.ept=1 kvm_intel.nested=0"
        }
        // The same KVM, booting a Linux L2.
        Some(ihmi_abi::Scenario::NestedLinux) => {
            "ihmi.nested=linux kvm_intel.ept=1 kvm_intel.nested=0"
        }
        _ => "",
    }
}

/// The Linux kernel scenario `name` boots: the nested scenarios' guest hypervisor is the `l1` kernel
/// (KVM built in), whatever `--profile` asked; the others boot the one asked for.
pub fn kernel_profile(name: &str, asked: Profile) -> Profile {
    match ihmi_abi::Scenario::from_name(name) {
        Some(s) if s.is_linux() && s.offers_vmx() => Profile::L1,
        _ => asked,
    }
}

/// The Linux overhead benchmark, one scenario per mode (`ihmi bench --linux`); in `ihmi test` too,
/// where L0 checks their structure.
pub const LINUX_BENCH_SCENARIOS: [Scenario; 3] = [
    Scenario::of(ihmi_abi::Scenario::LinuxBench(Mode::None)),
    Scenario::of(ihmi_abi::Scenario::LinuxBench(Mode::InBox)),
    Scenario::of(ihmi_abi::Scenario::LinuxBench(Mode::OutBox)),
];

/// The invocation benchmark, one scenario per mode (`ihmi bench`). They are in `ihmi test` too, where
/// L0's verdict checks their structure (no exit in-box, two per call out of the box), never time.
pub const BENCH_SCENARIOS: [Scenario; 3] = [
    Scenario::of(ihmi_abi::Scenario::Bench(Mode::None)),
    Scenario::of(ihmi_abi::Scenario::Bench(Mode::InBox)),
    Scenario::of(ihmi_abi::Scenario::Bench(Mode::OutBox)),
];

/// The nested-VMX cost benchmark (`ihmi bench --nested`): the tiny L1's run and KVM's (shadow
/// paging, then nested EPT), without and with VMCS shadowing; then KVM under the in-hypervisor
/// monitor, in the box and out of it.
pub const NESTED_BENCH_SCENARIOS: [Scenario; 7] = [
    Scenario::of(ihmi_abi::Scenario::NestedMini),
    Scenario::of(ihmi_abi::Scenario::NestedMiniShadow),
    Scenario::of(ihmi_abi::Scenario::NestedKvm),
    Scenario::of(ihmi_abi::Scenario::NestedKvmShadow),
    Scenario::of(ihmi_abi::Scenario::NestedKvmEpt),
    Scenario::of(ihmi_abi::Scenario::IhmiKvm),
    Scenario::of(ihmi_abi::Scenario::IhmiKvmOutbox),
];

/// How long `ihmi test` gives `name` under Bochs when the default is too little: the slow
/// scenarios (`ihmi_abi::Scenario::SLOW`) take minutes.
pub fn batch_timeout(name: &str) -> Option<std::time::Duration> {
    ihmi_abi::Scenario::from_name(name)
        .filter(|s| ihmi_abi::Scenario::SLOW.contains(s))
        .map(|_| std::time::Duration::from_secs(SLOW_TIMEOUT_SECS))
}

/// The slow scenarios' timeout: `nested-linux` takes about 175 s under Bochs, ten times that is room
/// for a slower host.
const SLOW_TIMEOUT_SECS: u64 = 1800;

/// Whether `name` boots the Linux guest (and so needs its kernel and initramfs on the ISO).
pub fn is_linux(name: &str) -> bool {
    ihmi_abi::Scenario::from_name(name).is_some_and(ihmi_abi::Scenario::is_linux)
}

/// Scenario pairs that run the same workload in-box and out of the box: `ihmi test` checks that the
/// monitor saw the same events in both, as the pair's guest allows (`events::Agreement`).
pub const SAME_STREAM: &[(&str, &str, Agreement)] = &[
    ("sim", "sim-outbox", Agreement::Exact),
    ("linux-sim", "linux-sim-outbox", Agreement::Scheduled),
    ("ihmi-kvm", "ihmi-kvm-outbox", Agreement::Scheduled),
];

/// What in-box monitoring needs on top of [`BASE`]: VMFUNC EPTP switching for the gate.
pub const IN_BOX: &[Feature] = &[Feature::Vmx, Feature::Ept, Feature::Vmfunc];

/// The test guest's tour of L0 (every exit it can cause, L0's banner and counters).
pub const DEMO: Scenario = Scenario::of(ihmi_abi::Scenario::Demo);

/// What `ihmi demo` runs: the `tiny` Linux with both monitors in the box.
pub const LINUX_DEMO: &str = "linux-sim";

/// What `ihmi demo --nested` runs: Linux + KVM as L1 with the in-hypervisor monitor, and one
/// tampering with KVM that the monitor reports.
pub const NESTED_DEMO: &str = "ihmi-attack-exit-handler";

/// Every scenario `ihmi` knows (the demo is part of the test list).
pub fn known() -> impl Iterator<Item = &'static Scenario> {
    ALL_SCENARIOS.iter()
}

/// What the scenario called `name` needs. One `ihmi` does not list gets the base requirements, since L0
/// may know scenarios this table does not list yet.
pub fn requirements(name: &str) -> &'static [Feature] {
    known()
        .chain(&USER_SCENARIOS)
        .find(|s| s.name == name)
        .map_or(BASE, |s| s.requires)
}

/// The scenarios that boot the user's multiboot kernel (`ihmi run --kernel`), not in the test list.
pub const USER_SCENARIOS: [Scenario; 2] = [
    Scenario::of(ihmi_abi::Scenario::Kernel),
    Scenario::of(ihmi_abi::Scenario::KernelNested),
];

/// Whether `ihmi` lists `name` among its scenarios.
pub fn is_known(name: &str) -> bool {
    known().any(|s| s.name == name)
}

/// Names of the test scenarios (the slow ones too), for messages.
pub fn test_names() -> String {
    ALL_SCENARIOS
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScenarioError {
    #[error(
        "invalid scenario name `{0}`: use 1-64 characters from a-z, 0-9 and '-', starting with a \
         letter or digit"
    )]
    InvalidName(String),
}

/// Scenario names end up in grub.cfg, file names and Bochs's config, so they are kept to a charset
/// that needs no quoting in any of them.
pub fn validate_name(name: &str) -> Result<(), ScenarioError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ScenarioError::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_list_is_in_order_and_valid() {
        let names: Vec<_> = TEST_SCENARIOS.iter().map(|s| s.name).take(18).collect();
        assert_eq!(
            names,
            [
                "boot",
                "ept-guard",
                "bad-hypercall",
                "testguest-demo",
                "entry-bad-control",
                "entry-bad-guest-state",
                "sim",
                "sim-outbox",
                "linux-boot",
                "linux-sim",
                "linux-attack",
                "linux-sim-outbox",
                "bench-none",
                "bench-inbox",
                "bench-outbox",
                "linux-bench-none",
                "linux-bench-inbox",
                "linux-bench-outbox"
            ]
        );
        // Then the other Linux attacks, each with its kernel argument.
        let linux = &TEST_SCENARIOS[18..18 + ihmi_abi::LinuxAttack::ALL.len() - 1];
        for (s, a) in linux.iter().zip(&ihmi_abi::LinuxAttack::ALL[1..]) {
            assert_eq!(s.name, a.scenario_name());
            assert!(is_linux(s.name) && s.requires.contains(&Feature::Vmfunc));
            assert_eq!(kernel_args(s.name), format!("ihmi.attack={}", a.name()));
        }
        assert_eq!(kernel_args("linux-attack"), "ihmi.attack=root");
        // Then every attack, each named as L0 knows it and needing VMFUNC.
        let attacks: Vec<_> = TEST_SCENARIOS[18 + linux.len()..][..Attack::ALL.len()]
            .iter()
            .collect();
        for (s, a) in attacks.iter().zip(Attack::ALL) {
            assert_eq!(s.name, format!("attack-{}", a.name()));
            assert_eq!(
                ihmi_abi::Scenario::from_name(s.name),
                Some(ihmi_abi::Scenario::Attack(a))
            );
            assert!(s.requires.contains(&Feature::Vmfunc));
        }
        // Then the multiboot kernels, and nested VMX's milestones, last.
        let nested: Vec<_> = TEST_SCENARIOS[18 + linux.len() + Attack::ALL.len()..]
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(requirements("multiboot1"), UNRESTRICTED);
        assert_eq!(requirements("kernel"), UNRESTRICTED);
        assert_eq!(requirements("kernel-nested"), UNRESTRICTED_SHADOW);
        assert!(
            !is_known("kernel"),
            "not in the test list: it needs the user's file"
        );
        assert_eq!(
            nested,
            [
                "multiboot1",
                "multiboot2",
                "nested-vmxon",
                "nested-vmcs",
                "nested-mini",
                "nested-mini-shadow",
                "nested-mini-ept",
                "nested-kvm",
                "nested-kvm-shadow",
                "nested-kvm-ept",
                "nested-kvm-sim",
                "ihmi-kvm",
                "ihmi-kvm-outbox",
                "ihmi-attack-exit-handler",
                "ihmi-attack-kvm-text",
                "ihmi-attack-vmcs12-region",
                "ihmi-attack-l2-map",
                "ihmi-attack-l2-map-monitor",
                "ihmi-attack-l2-vmfunc",
                "ihmi-attack-host-state",
                "ihmi-attack-rogue-vmcs",
                "ihmi-attack-starve",
                "ihmi-attack-kvm-ops"
            ]
        );
        // Each IHMI attack tells the attacker which attack, by the word it looks for.
        for a in IhmiAttack::ALL {
            let args = kernel_args(a.scenario_name());
            assert!(
                args.split_whitespace().any(|w| w == a.kernel_arg()),
                "{args}"
            );
            assert!(args.split_whitespace().any(|w| w == "ihmi.nested=kvm"));
            assert_eq!(
                kernel_profile(a.scenario_name(), Profile::Tiny),
                Profile::L1
            );
        }
        // The slow one is known, runs by name and is not in the default set.
        let slow: Vec<_> = ALL_SCENARIOS[TEST_SCENARIOS.len()..]
            .iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(slow, ["nested-linux"]);
        assert!(is_known("nested-linux") && is_linux("nested-linux"));
        assert_eq!(kernel_profile("nested-linux", Profile::Tiny), Profile::L1);
        assert_eq!(requirements("nested-linux"), SHADOW);
        assert!(batch_timeout("nested-linux").is_some() && batch_timeout("nested-kvm").is_none());
        for s in known() {
            validate_name(s.name).unwrap();
            assert!(s.requires.contains(&Feature::Vmx) && s.requires.contains(&Feature::Ept));
        }
    }

    #[test]
    fn names_are_checked() {
        for bad in [
            "",
            "-x",
            "Boot",
            "a b",
            "a\"b",
            "x;reboot",
            "ä",
            &"a".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name("ept-guard2").is_ok());
    }

    #[test]
    fn unknown_names_get_base_requirements() {
        assert_eq!(requirements("future-thing"), BASE);
        assert_eq!(requirements("testguest-demo"), DEMO.requires);
        assert!(is_known("boot") && !is_known("future-thing"));
        assert!(is_linux("linux-boot") && !is_linux("sim") && !is_linux("future-thing"));
        assert_eq!(kernel_profile("nested-kvm", Profile::Debian), Profile::L1);
        assert_eq!(
            kernel_profile("linux-sim", Profile::Debian),
            Profile::Debian
        );
        assert_eq!(kernel_profile("nested-mini", Profile::Tiny), Profile::Tiny);
        assert!(!requirements("nested-kvm").contains(&Feature::VmcsShadowing));
        assert!(requirements("nested-kvm-shadow").contains(&Feature::VmcsShadowing));
    }
}
