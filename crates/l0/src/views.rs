//! Boot stage: the EPT views. View 0 is the guest's (its RAM and devices, never an L0 frame, the
//! monitor's frames absent but for the gate); with an in-box monitor, view 1 is the monitor's, and
//! both go in the EPTP list VMFUNC switches between.

use ihmi_addr::Hpa;
use ihmi_ept::{EptView, Eptp, EptpList};
use ihmi_hv::guard::views::{self, MonitorLayout, GUEST_VIEW, MONITOR_VIEW};
use ihmi_hv::MemoryMap;
use ihmi_vmcs::VmxFeatures;

use crate::error::LoadError;
use crate::frames::Pool;
use crate::log;
use crate::ranges::Ranges;

/// The guest's views.
pub struct Views {
    /// View 0.
    pub guest: EptView,
    /// View 1 and the EPTP list, in the box.
    pub monitor: Option<(Eptp, Hpa)>,
}

/// Builds the views: `shown` is the monitor whose gate pages the guest sees (in the box, and for a
/// Linux guest out of the box too: its hooks' VMCALL stubs live there), `inbox` the monitor that gets
/// a view of its own, `read_exec_only` the guest's code (where hooks live).
pub fn build(
    frames: &mut Pool,
    memory: &MemoryMap,
    shown: Option<&MonitorLayout>,
    inbox: Option<&MonitorLayout>,
    read_exec_only: &Ranges,
    features: &VmxFeatures,
) -> Result<Views, LoadError> {
    let guest = views::build_guest_view(frames, memory, shown, read_exec_only.as_slice()).map_err(
        |error| LoadError::View {
            which: "the guest view",
            error,
        },
    )?;
    log!(
        "EPT view 0 (guest): root {} ({} 2 MiB pages split)",
        guest.root(),
        guest.split_count()
    );
    let Some(layout) = inbox else {
        return Ok(Views {
            guest,
            monitor: None,
        });
    };
    let monitor = views::build_monitor_view(frames, memory, layout, features.ept_execute_only)
        .map_err(|error| LoadError::View {
            which: "the monitor view",
            error,
        })?;
    log!(
        "EPT view 1 (monitor): root {} ({} 2 MiB pages split)",
        monitor.root(),
        monitor.split_count()
    );
    let (guest_eptp, monitor_eptp) = (guest.eptp(), monitor.eptp());
    let list = frames.page(|list: &mut EptpList| {
        list.set(GUEST_VIEW, guest_eptp);
        list.set(MONITOR_VIEW, monitor_eptp);
    })?;
    Ok(Views {
        guest,
        monitor: Some((monitor_eptp, list)),
    })
}
