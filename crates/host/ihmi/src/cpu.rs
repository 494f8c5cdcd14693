//! The Bochs 2.7 CPU models and the VMX features each one exposes.
//!
//! This is the one place these facts live. Source: the bochs-emu/Bochs repository at tag
//! `REL_2_7_FINAL` (the release Debian ships as 2.7):
//! - `bochs/cpu/cpudb/intel/*.cc`: `enable_cpu_extension(BX_ISA_VMX)` gives VMX, and each model's
//!   `get_vmx_extensions_bitmask()` lists `BX_VMX_EPT`, `BX_VMX_UNRESTRICTED_GUEST`,
//!   `BX_VMX_EPTP_SWITCHING` (VM function 0, i.e. VMFUNC EPTP switching, see `bochs/cpu/vmcs.cc`)
//!   `BX_VMX_EPT_EXCEPTION` (EPT-violation #VE) and `BX_VMX_VMCS_SHADOWING` (VMCS shadowing, which
//!   every model with EPTP switching also lists: Haswell and later);
//! - `bochs/cpu/cpudb/amd/*.cc` enable SVM at most, never VMX;
//! - `bx_generic` takes its features from `cpuid:` options; with none given (our template sets none)
//!   `bochs/config.cc` defaults `cpuid: vmx=1`, which is VMX without EPT.
//!
//! The model names are those `bochs --help cpu` prints.

use std::fmt;

use thiserror::Error;

/// A VMX capability a scenario may need from the emulated CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Vmx,
    Ept,
    UnrestrictedGuest,
    /// VMFUNC leaf 0, EPTP switching.
    Vmfunc,
    /// EPT-violation virtualization exception (#VE).
    VirtualizationException,
    /// VMCS shadowing (for the guest hypervisor's VMREADs and VMWRITEs).
    VmcsShadowing,
}

impl Feature {
    /// Every feature, in the order tables print them.
    pub const ALL: [Feature; 6] = [
        Feature::Vmx,
        Feature::Ept,
        Feature::UnrestrictedGuest,
        Feature::Vmfunc,
        Feature::VirtualizationException,
        Feature::VmcsShadowing,
    ];

    /// Short column name.
    pub fn short(self) -> &'static str {
        match self {
            Feature::Vmx => "VMX",
            Feature::Ept => "EPT",
            Feature::UnrestrictedGuest => "UG",
            Feature::Vmfunc => "VMFUNC",
            Feature::VirtualizationException => "#VE",
            Feature::VmcsShadowing => "shadow",
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Feature::Vmx => "VMX",
            Feature::Ept => "EPT",
            Feature::UnrestrictedGuest => "unrestricted guest",
            Feature::Vmfunc => "VMFUNC (EPTP switching)",
            Feature::VirtualizationException => "#VE (EPT-violation virtualization exception)",
            Feature::VmcsShadowing => "VMCS shadowing",
        })
    }
}

/// One Bochs CPU model and what it exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuModel {
    pub name: &'static str,
    pub vmx: bool,
    pub ept: bool,
    pub unrestricted_guest: bool,
    pub vmfunc: bool,
    pub ve: bool,
    pub vmcs_shadowing: bool,
}

impl CpuModel {
    pub fn has(&self, feature: Feature) -> bool {
        match feature {
            Feature::Vmx => self.vmx,
            Feature::Ept => self.ept,
            Feature::UnrestrictedGuest => self.unrestricted_guest,
            Feature::Vmfunc => self.vmfunc,
            Feature::VirtualizationException => self.ve,
            Feature::VmcsShadowing => self.vmcs_shadowing,
        }
    }

    /// The features in `required` this model lacks, in the order given.
    pub fn missing(&self, required: &[Feature]) -> Vec<Feature> {
        required.iter().copied().filter(|f| !self.has(*f)).collect()
    }
}

/// The model used when `--cpu` is not given: VMX, EPT, VMFUNC and #VE.
pub const DEFAULT_MODEL: &str = "corei7_skylake_x";

const fn none(name: &'static str) -> CpuModel {
    CpuModel {
        name,
        vmx: false,
        ept: false,
        unrestricted_guest: false,
        vmfunc: false,
        ve: false,
        vmcs_shadowing: false,
    }
}

const fn vmx_only(name: &'static str) -> CpuModel {
    CpuModel {
        vmx: true,
        ..none(name)
    }
}

const fn ept(name: &'static str, unrestricted_guest: bool) -> CpuModel {
    CpuModel {
        vmx: true,
        ept: true,
        unrestricted_guest,
        ..none(name)
    }
}

const fn full(name: &'static str) -> CpuModel {
    CpuModel {
        name,
        vmx: true,
        ept: true,
        unrestricted_guest: true,
        vmfunc: true,
        ve: true,
        vmcs_shadowing: true,
    }
}

/// Every model `bochs --help cpu` lists for Bochs 2.7, in its order. See the module docs for sources.
pub const MODELS: &[CpuModel] = &[
    vmx_only("bx_generic"),
    none("pentium"),
    none("pentium_mmx"),
    none("amd_k6_2_chomper"),
    none("p2_klamath"),
    none("p3_katmai"),
    none("p4_willamette"),
    vmx_only("core_duo_t2400_yonah"),
    none("atom_n270"),
    none("p4_prescott_celeron_336"),
    none("athlon64_clawhammer"),
    none("athlon64_venice"),
    none("turion64_tyler"),
    none("phenom_8650_toliman"),
    vmx_only("core2_penryn_t9600"),
    ept("corei5_lynnfield_750", false),
    ept("corei5_arrandale_m520", true),
    ept("corei7_sandy_bridge_2600k", true),
    none("zambezi"),
    none("trinity_apu"),
    none("ryzen"),
    ept("corei7_ivy_bridge_3770k", true),
    full("corei7_haswell_4770"),
    full("broadwell_ult"),
    full("corei7_skylake_x"),
    full("corei3_cnl"),
    full("corei7_icelake_u"),
    full("tigerlake"),
];

/// Why a `--cpu` value was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("unknown Bochs CPU model `{name}`; valid models: {valid}")]
    Unknown { name: String, valid: String },
    #[error(
        "CPU model `{model}` has no {missing}, which {purpose} needs; \
         use --cpu with one of: {suggest}"
    )]
    LacksFeature {
        model: String,
        missing: String,
        purpose: String,
        suggest: String,
    },
}

/// Looks a model up by its Bochs name.
pub fn lookup(name: &str) -> Option<&'static CpuModel> {
    MODELS.iter().find(|m| m.name == name)
}

/// The models that have every feature in `required`.
pub fn models_with(required: &[Feature]) -> impl Iterator<Item = &'static CpuModel> + '_ {
    MODELS
        .iter()
        .filter(move |m| m.missing(required).is_empty())
}

/// Returns the model named `name` if it has every feature in `required`; `purpose` names what needs
/// them ("scenario boot") for the error message.
pub fn select(
    name: &str,
    required: &[Feature],
    purpose: &str,
) -> Result<&'static CpuModel, ModelError> {
    let model = lookup(name).ok_or_else(|| ModelError::Unknown {
        name: name.to_string(),
        valid: join(MODELS.iter()),
    })?;
    let missing = model.missing(required);
    if missing.is_empty() {
        return Ok(model);
    }
    Err(ModelError::LacksFeature {
        model: model.name.to_string(),
        missing: missing
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" and no "),
        purpose: purpose.to_string(),
        suggest: join(models_with(required)),
    })
}

fn join<'a>(models: impl Iterator<Item = &'a CpuModel>) -> String {
    models.map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// The table as text, one model a line, for `ihmi models`.
pub fn table() -> String {
    let mut out = format!("{:<28}", "model");
    for f in Feature::ALL {
        out.push_str(&format!(" {:<7}", f.short()));
    }
    out.push('\n');
    for m in MODELS {
        out.push_str(&format!("{:<28}", m.name));
        for f in Feature::ALL {
            out.push_str(&format!(" {:<7}", if m.has(f) { "yes" } else { "-" }));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX_EPT: &[Feature] = &[Feature::Vmx, Feature::Ept];

    #[test]
    fn names_are_unique_and_default_exists() {
        for (i, a) in MODELS.iter().enumerate() {
            assert!(
                MODELS[i + 1..].iter().all(|b| b.name != a.name),
                "{}",
                a.name
            );
        }
        assert!(lookup(DEFAULT_MODEL).is_some());
    }

    #[test]
    fn features_imply_vmx_and_ept() {
        for m in MODELS {
            if m.ept || m.unrestricted_guest || m.vmfunc || m.ve {
                assert!(m.vmx, "{}", m.name);
            }
            if m.unrestricted_guest || m.vmfunc || m.ve {
                assert!(m.ept, "{}", m.name);
            }
        }
    }

    #[test]
    fn brief_models_have_vmfunc_and_ve() {
        for name in [
            "corei7_haswell_4770",
            "broadwell_ult",
            "corei7_skylake_x",
            "corei7_icelake_u",
            "tigerlake",
        ] {
            let m = lookup(name).unwrap();
            assert!(m.vmfunc && m.ve && m.ept && m.unrestricted_guest, "{name}");
        }
        for name in ["corei7_sandy_bridge_2600k", "corei7_ivy_bridge_3770k"] {
            let m = lookup(name).unwrap();
            assert!(m.ept && !m.vmfunc && !m.ve, "{name}");
        }
    }

    #[test]
    fn default_model_is_accepted() {
        let m = select(DEFAULT_MODEL, VMX_EPT, "scenario boot").unwrap();
        assert_eq!(m.name, "corei7_skylake_x");
        let all = Feature::ALL;
        assert!(select(DEFAULT_MODEL, &all, "x").is_ok());
    }

    #[test]
    fn unknown_model_lists_valid_ones() {
        let err = select("corei9", VMX_EPT, "scenario boot").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown Bochs CPU model `corei9`"), "{msg}");
        assert!(
            msg.contains("tigerlake") && msg.contains("pentium"),
            "{msg}"
        );
    }

    #[test]
    fn model_without_ept_is_refused() {
        let err = select("core2_penryn_t9600", VMX_EPT, "scenario boot").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("has no EPT, which scenario boot needs"),
            "{msg}"
        );
        assert!(msg.contains("corei7_sandy_bridge_2600k"), "{msg}");
        assert!(!msg.contains("core2_penryn_t9600,"), "{msg}");
    }

    #[test]
    fn model_without_vmx_names_both_missing_features() {
        let err = select("ryzen", VMX_EPT, "scenario boot").unwrap_err();
        assert!(err.to_string().contains("has no VMX and no EPT"), "{err}");
    }

    #[test]
    fn vmfunc_requirement_refuses_sandy_bridge() {
        let req = [Feature::Vmx, Feature::Ept, Feature::Vmfunc];
        let err = select("corei7_sandy_bridge_2600k", &req, "scenario gate").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("has no VMFUNC"), "{msg}");
        assert!(msg.contains("corei7_haswell_4770"), "{msg}");
        assert!(!msg.contains("corei7_ivy_bridge_3770k"), "{msg}");
        assert!(select("broadwell_ult", &req, "scenario gate").is_ok());
    }

    #[test]
    fn table_has_a_line_per_model() {
        assert_eq!(table().lines().count(), MODELS.len() + 1);
    }
}
