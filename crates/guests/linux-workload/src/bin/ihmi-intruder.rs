//! A program the Linux guest's allow-list does not name: the process-creation monitor must refuse it
//! before it runs. If it ever runs, it says so on the debug port, where L0 and the scenario see it.

use ihmi_linux_workload::debug_line;

fn main() {
    let line = "ihmi-intruder: RUNNING, the process-creation monitor let it through";
    println!("{line}");
    let _ = debug_line(line);
}
