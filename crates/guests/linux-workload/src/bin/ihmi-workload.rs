//! The Linux guest's known program: three system calls in a fixed order (getppid, getuid, getgid), so
//! the monitor's events can be checked against what it did (`ihmi_judge::scenario::LINUX_WORKLOAD`).

fn main() {
    // SAFETY: getppid takes no arguments, touches no memory and cannot fail.
    let ppid = unsafe { libc::getppid() };
    // SAFETY: as getppid.
    let uid = unsafe { libc::getuid() };
    // SAFETY: as getppid.
    let gid = unsafe { libc::getgid() };
    println!("ihmi-workload: parent {ppid}, uid {uid}, gid {gid}");
}
