//! Running one scenario under Bochs: render the config, start Bochs, stream COM1 to the terminal,
//! collect the E9 stream and the log, stop Bochs, judge.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cpu::CpuModel;
use crate::deps::{BIOS_IMAGE, VGA_BIOS_IMAGE};
use crate::images::Layout;
use crate::template::{self, TemplateError};
use crate::verdict::{self, Exit, Observed, Verdict};

/// File names inside the run directory, which is Bochs's working directory.
pub const BOCHSRC: &str = "bochsrc";
pub const DEBUGGER_RC: &str = "continue.rc";
pub const SERIAL: &str = "serial.txt";
pub const LOG: &str = "bochs.log";
pub const OUTPUT: &str = "bochs.out";

/// How long Bochs may take to exit by itself after L0 printed a marker.
const GRACE: Duration = Duration::from_secs(5);
/// How often the serial file and the process are polled.
const POLL: Duration = Duration::from_millis(50);

/// Settings for one run.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub cpu: &'static CpuModel,
    pub megs: u32,
    pub timeout: Duration,
    /// Do not stream COM1 to the terminal.
    pub quiet: bool,
}

/// What one run produced.
#[derive(Debug)]
pub struct RunReport {
    pub verdict: Verdict,
    pub elapsed: Duration,
    pub e9: String,
    /// When each piece of `e9` arrived (Bochs writes port 0xE9 to its standard output).
    pub e9_arrivals: Arrivals,
    pub log: String,
    pub run_dir: PathBuf,
}

/// The ISO as the rendered bochsrc names it, relative to the run directory (`Layout::iso`).
fn iso_from_run_dir(scenario: &str) -> String {
    format!("../ihmi-{scenario}.iso")
}

/// Renders the checked-in template for one run. Every path is relative to the run directory or a
/// fixed system path, so nothing needs quoting for Bochs's config parser.
pub fn render_bochsrc(
    template_text: &str,
    scenario: &str,
    cpu: &CpuModel,
    megs: u32,
) -> Result<String, TemplateError> {
    let megs = megs.to_string();
    let iso = iso_from_run_dir(scenario);
    template::render(
        template_text,
        &[
            ("MEGS", &megs),
            ("CPU", cpu.name),
            ("ROMIMAGE", BIOS_IMAGE),
            ("VGAROMIMAGE", VGA_BIOS_IMAGE),
            ("ISO", &iso),
            ("SERIAL", SERIAL),
            ("LOG", LOG),
        ],
    )
}

/// The process group of the Bochs that is running now (0: none), for the Ctrl-C handler.
static RUNNING_GROUP: AtomicU32 = AtomicU32::new(0);

/// Bochs runs in its own process group (so a kill reaches anything it starts), which also means the
/// terminal's Ctrl-C no longer reaches it: this handler passes the interrupt on, then exits.
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        let group = RUNNING_GROUP.load(Ordering::SeqCst);
        if group != 0 {
            kill_group(group);
        }
        eprintln!("\n[ihmi] interrupted");
        std::process::exit(130);
    })
    .context("cannot install the Ctrl-C handler")
}

/// SIGKILL to a whole process group, through kill(1): this crate has no libc dependency.
fn kill_group(group: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn stop(child: &mut Child) {
    kill_group(child.id());
    let _ = child.kill();
    let _ = child.wait();
}

/// Copies everything a pipe yields into `keep` and `also`, until EOF.
/// When each piece of a stream arrived: (bytes received so far, time since the run started).
pub type Arrivals = Vec<(usize, Duration)>;

fn drain(
    mut pipe: impl Read + Send + 'static,
    keep: Arc<Mutex<Vec<u8>>>,
    also: Arc<Mutex<File>>,
    arrivals: Option<(Arc<Mutex<Arrivals>>, Instant)>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut kept = keep.lock().unwrap();
                    kept.extend_from_slice(&buf[..n]);
                    if let Some((log, started)) = &arrivals {
                        log.lock().unwrap().push((kept.len(), started.elapsed()));
                    }
                    drop(kept);
                    let _ = also.lock().unwrap().write_all(&buf[..n]);
                }
            }
        }
    })
}

/// When the byte at `offset` of a stream arrived, from its arrival log.
pub fn arrival_of(arrivals: &[(usize, Duration)], offset: usize) -> Option<Duration> {
    arrivals
        .iter()
        .find(|(received, _)| *received > offset)
        .map(|(_, t)| *t)
}

/// Follows a file another process appends to, like `tail -f`.
#[derive(Debug)]
struct FileTail {
    path: PathBuf,
    offset: u64,
    ends_with_newline: bool,
}

impl FileTail {
    fn new(path: PathBuf) -> Self {
        FileTail {
            path,
            offset: 0,
            ends_with_newline: true,
        }
    }

    /// Writes the bytes appended since the last call to `out`.
    fn pump(&mut self, out: &mut impl Write) -> io::Result<()> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        if let Some(last) = buf.last() {
            self.offset += buf.len() as u64;
            self.ends_with_newline = *last == b'\n';
            out.write_all(&buf)?;
            out.flush()?;
        }
        Ok(())
    }
}

/// Whether the complete lines of `e9` after byte `from` hold a marker; returns the new scan point.
fn scan_for_marker(e9: &[u8], from: usize) -> (bool, usize) {
    let Some(last_newline) = e9[from..].iter().rposition(|b| *b == b'\n') else {
        return (false, from);
    };
    let end = from + last_newline + 1;
    let text = String::from_utf8_lossy(&e9[from..end]);
    let found = verdict::markers(&text).next().is_some();
    (found, end)
}

/// Boots the ISO for `scenario` (made by `images::make_iso`) under Bochs and judges the run.
pub fn run(layout: &Layout, scenario: &str, opts: &RunOptions) -> Result<RunReport> {
    let dir = layout.run_dir(scenario);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let template_path = layout.bochsrc_template();
    let template_text = fs::read_to_string(&template_path)
        .with_context(|| format!("cannot read {}", template_path.display()))?;
    let rc = render_bochsrc(&template_text, scenario, opts.cpu, opts.megs)
        .with_context(|| format!("bad Bochs template {}", template_path.display()))?;
    fs::write(dir.join(BOCHSRC), rc).context("cannot write bochsrc")?;
    // Bochs's built-in debugger is compiled in: without this it stops at the first instruction.
    fs::write(dir.join(DEBUGGER_RC), "continue\n").context("cannot write the debugger rc")?;
    let out_file = Arc::new(Mutex::new(
        File::create(dir.join(OUTPUT)).context("cannot create bochs.out")?,
    ));

    let started = Instant::now();
    let mut child = Command::new("bochs")
        .args(["-q", "-f", BOCHSRC, "-rc", DEBUGGER_RC])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("cannot start bochs: install bochs bochsbios vgabios")?;
    RUNNING_GROUP.store(child.id(), Ordering::SeqCst);

    let e9 = Arc::new(Mutex::new(Vec::new()));
    let e9_arrivals = Arc::new(Mutex::new(Arrivals::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        drain(
            child.stdout.take().expect("stdout is piped"),
            Arc::clone(&e9),
            Arc::clone(&out_file),
            Some((Arc::clone(&e9_arrivals), started)),
        ),
        drain(
            child.stderr.take().expect("stderr is piped"),
            Arc::clone(&stderr),
            Arc::clone(&out_file),
            None,
        ),
    ];

    let mut serial = FileTail::new(dir.join(SERIAL));
    let mut terminal = io::stdout();
    let mut scanned = 0;
    let mut grace_until = None;
    let exit = loop {
        if !opts.quiet {
            // A terminal that went away must not stop the run.
            let _ = serial.pump(&mut terminal);
        }
        if grace_until.is_none() {
            let (found, next) = scan_for_marker(&e9.lock().unwrap(), scanned);
            scanned = next;
            if found {
                grace_until = Some(Instant::now() + GRACE);
            }
        }
        if let Some(status) = child.try_wait().context("cannot wait for bochs")? {
            break Exit::Exited(status.code());
        }
        if grace_until.is_some_and(|t| Instant::now() >= t) {
            stop(&mut child);
            break Exit::KilledAfterMarker;
        }
        if started.elapsed() >= opts.timeout {
            stop(&mut child);
            break Exit::TimedOut(opts.timeout);
        }
        thread::sleep(POLL);
    };
    let elapsed = started.elapsed();
    RUNNING_GROUP.store(0, Ordering::SeqCst);
    for reader in readers {
        let _ = reader.join();
    }
    if !opts.quiet {
        let _ = serial.pump(&mut terminal);
        if !serial.ends_with_newline {
            println!();
        }
    }

    let e9 = String::from_utf8_lossy(&e9.lock().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    let log = read_lossy(&dir.join(LOG));
    let verdict = verdict::judge(&Observed {
        scenario,
        e9: &e9,
        log: &log,
        stderr: &stderr,
        exit,
    });
    let e9_arrivals = std::mem::take(&mut *e9_arrivals.lock().unwrap());
    Ok(RunReport {
        verdict,
        elapsed,
        e9,
        e9_arrivals,
        log,
        run_dir: dir,
    })
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu;

    const TEMPLATE: &str = include_str!("../../../../bochs/bochsrc.template");

    fn rendered() -> String {
        let model = cpu::lookup("tigerlake").unwrap();
        render_bochsrc(TEMPLATE, "ept-guard", model, 512).unwrap()
    }

    #[test]
    fn checked_in_template_renders_completely() {
        let rc = rendered();
        assert!(!rc.contains("{{") && !rc.contains("}}"), "{rc}");
        let lines: Vec<&str> = rc
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .collect();
        for expected in [
            "megs: 512",
            "cpu: model=tigerlake, count=1, ips=50000000, reset_on_triple_fault=0",
            "clock: sync=none, time0=local",
            "romimage: file=/usr/share/bochs/BIOS-bochs-latest",
            "vgaromimage: file=/usr/share/vgabios/vgabios.bin",
            "ata0-master: type=cdrom, path=../ihmi-ept-guard.iso, status=inserted",
            "boot: cdrom",
            "display_library: rfb, options=\"timeout=0\"",
            "com1: enabled=1, mode=file, dev=serial.txt",
            "port_e9_hack: enabled=1",
            "log: bochs.log",
            "panic: action=fatal",
        ] {
            assert!(lines.contains(&expected), "missing `{expected}` in\n{rc}");
        }
    }

    #[test]
    fn iso_path_matches_layout() {
        let l = Layout {
            root: PathBuf::from("/w"),
        };
        let from_run_dir = l.run_dir("boot").join(iso_from_run_dir("boot"));
        let normalized: PathBuf =
            from_run_dir
                .components()
                .fold(PathBuf::new(), |mut p, c| match c {
                    std::path::Component::ParentDir => {
                        p.pop();
                        p
                    }
                    other => {
                        p.push(other);
                        p
                    }
                });
        assert_eq!(normalized, l.iso("boot"));
    }

    #[test]
    fn marker_scan_waits_for_whole_lines() {
        let (found, next) = scan_for_marker(b"hello\nIHMI-PA", 0);
        assert!(!found);
        assert_eq!(next, 6);
        let (found, _) = scan_for_marker(b"hello\nIHMI-PASS boot\n", next);
        assert!(found);
        assert_eq!(scan_for_marker(b"", 0), (false, 0));
    }

    #[test]
    fn file_tail_streams_appended_bytes() {
        let dir = std::env::temp_dir().join(format!("ihmi-tail-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.txt");
        let mut tail = FileTail::new(path.clone());
        let mut out = Vec::new();
        tail.pump(&mut out).unwrap();
        assert!(out.is_empty());
        fs::write(&path, "abc").unwrap();
        tail.pump(&mut out).unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"def\n")
            .unwrap();
        tail.pump(&mut out).unwrap();
        assert_eq!(out, b"abcdef\n");
        assert!(tail.ends_with_newline);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Boots a kernel-less GRUB ISO whose grub.cfg writes `e9_text` to port 0xE9 with `outb`, then
    /// optionally writes "Shutdown" to port 0x8900: the whole Bochs pipeline without L0.
    fn boot_grub_script(name: &str, e9_text: &str, shutdown: bool, timeout: Duration) -> RunReport {
        let root = std::env::temp_dir().join(format!("ihmi-smoke-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let layout = Layout { root: root.clone() };
        fs::create_dir_all(root.join("bochs")).unwrap();
        fs::write(layout.bochsrc_template(), TEMPLATE).unwrap();
        let grub = layout.iso_tree().join("boot/grub");
        fs::create_dir_all(&grub).unwrap();
        let mut cfg = String::from("set timeout=0\ninsmod iorw\n");
        for b in e9_text.bytes() {
            cfg.push_str(&format!("outb 0xe9 0x{b:02x}\n"));
        }
        if shutdown {
            for b in "Shutdown".bytes() {
                cfg.push_str(&format!("outb 0x8900 0x{b:02x}\n"));
            }
        } else {
            cfg.push_str("sleep 100000\n");
        }
        fs::write(grub.join("grub.cfg"), cfg).unwrap();
        let out = Command::new("grub-mkrescue")
            .arg("-o")
            .arg(layout.iso(name))
            .arg(layout.iso_tree())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let opts = RunOptions {
            cpu: cpu::lookup(cpu::DEFAULT_MODEL).unwrap(),
            megs: 64,
            timeout,
            quiet: true,
        };
        let report = run(&layout, name, &opts).unwrap();
        fs::remove_dir_all(&root).unwrap();
        report
    }

    #[test]
    #[ignore = "boots Bochs: `ihmi test` runs it once bochs and grub-mkrescue are installed"]
    fn bochs_pass_marker_then_shutdown_passes() {
        let r = boot_grub_script(
            "smoke",
            "hello\nIHMI-PASS smoke\nIHMI-END\n",
            true,
            Duration::from_secs(60),
        );
        assert_eq!(r.verdict, Verdict::Pass, "{r:#?}");
        assert!(
            r.log.contains("Shutdown port: shutdown requested"),
            "{}",
            r.log
        );
    }

    #[test]
    #[ignore = "boots Bochs: `ihmi test` runs it once bochs and grub-mkrescue are installed"]
    fn bochs_fail_marker_fails() {
        let r = boot_grub_script(
            "smoke-fail",
            "IHMI-FAIL smoke-fail: on purpose\n",
            true,
            Duration::from_secs(60),
        );
        let Verdict::Fail(reason) = &r.verdict else {
            panic!("{r:#?}")
        };
        assert!(reason.contains("on purpose"), "{reason}");
    }

    #[test]
    #[ignore = "boots Bochs: `ihmi test` runs it once bochs and grub-mkrescue are installed"]
    fn bochs_shutdown_without_marker_fails() {
        let r = boot_grub_script("smoke-none", "", true, Duration::from_secs(60));
        let Verdict::Fail(reason) = &r.verdict else {
            panic!("{r:#?}")
        };
        assert!(reason.contains("Shutdown port"), "{reason}");
    }

    #[test]
    #[ignore = "boots Bochs: `ihmi test` runs it once bochs and grub-mkrescue are installed"]
    fn bochs_hang_times_out() {
        let r = boot_grub_script("smoke-hang", "", false, Duration::from_secs(3));
        let Verdict::Fail(reason) = &r.verdict else {
            panic!("{r:#?}")
        };
        assert!(reason.contains("timed out after 3 s"), "{reason}");
        assert!(r.elapsed < Duration::from_secs(10));
    }
}
