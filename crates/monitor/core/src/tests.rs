//! The checkpoint and the introspection against a guest whose memory and page tables live in a map.

extern crate std;
use std::boxed::Box;
use std::collections::HashMap;
use std::vec::Vec;

use ihmi_abi::guest_os::{process_layout, COMM_LEN};
use ihmi_abi::monitor::{RequestCode, Verdict};
use ihmi_addr::{Gpa, Gva, PAGE_SIZE};
use ihmi_paging::{
    Cr3, GuestPhysRead, MapFlags, PageTable, PageTableBuilder, PhysReadError, TableAlloc,
};

use super::*;

/// Guest-physical memory: page tables and data pages, nothing else readable.
#[derive(Default)]
struct Guest {
    tables: HashMap<u64, Box<PageTable>>,
    data: HashMap<u64, Box<[u8; 4096]>>,
    next_table: u64,
}

impl TableAlloc for Guest {
    fn alloc_zeroed(&mut self) -> Option<Gpa> {
        let gpa = 0x80_0000 + self.next_table;
        self.next_table += PAGE_SIZE;
        self.tables.insert(gpa, Box::new(PageTable::new()));
        Some(Gpa::new(gpa))
    }
    fn table_mut(&mut self, gpa: Gpa) -> Option<&mut PageTable> {
        self.tables.get_mut(&gpa.raw()).map(|t| &mut **t)
    }
}

impl GuestPhysRead for Guest {
    fn read_bytes(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), PhysReadError> {
        for (i, b) in buf.iter_mut().enumerate() {
            let addr = gpa.raw() + i as u64;
            let (page, off) = (addr & !0xfff, (addr & 0xfff) as usize);
            *b = if let Some(t) = self.tables.get(&page) {
                t.entries[off / 8].raw().to_le_bytes()[off % 8]
            } else if let Some(d) = self.data.get(&page) {
                d[off]
            } else {
                return Err(PhysReadError {
                    gpa: Gpa::new(addr),
                });
            };
        }
        Ok(())
    }
}

/// Kernel data at this GVA, backed by guest-physical `DATA_GPA`.
const KERNEL: u64 = 0xffff_8000_0010_0000;
const DATA_GPA: u64 = 0x10_0000;
const CURRENT: u64 = KERNEL;
const PARENT_RECORD: u64 = KERNEL + 0x1000;
const NEW_RECORD: u64 = KERNEL + 0x1040;
/// A record that straddles the end of the mapping: its name is unreadable.
const EDGE_RECORD: u64 = KERNEL + 0x4000 - 16;

impl Guest {
    fn write(&mut self, gva: u64, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let gpa = gva - KERNEL + DATA_GPA + i as u64;
            self.data
                .entry(gpa & !0xfff)
                .or_insert_with(|| Box::new([0; 4096]))[(gpa & 0xfff) as usize] = b;
        }
    }

    fn record(&mut self, at: u64, pid: u32, ppid: u32, name: &[u8]) {
        let mut comm = [0u8; COMM_LEN];
        comm[..name.len()].copy_from_slice(name);
        self.write(at + process_layout::PID, &pid.to_le_bytes());
        self.write(at + process_layout::PPID, &ppid.to_le_bytes());
        self.write(at + process_layout::COMM, &comm);
    }
}

fn setup() -> (Guest, Cr3, Monitor) {
    let mut g = Guest::default();
    for page in 0..4 {
        g.data
            .insert(DATA_GPA + page * PAGE_SIZE, Box::new([0; 4096]));
    }
    let mut pt = PageTableBuilder::new(&mut g).unwrap();
    pt.map(
        &mut g,
        Gva::new(KERNEL),
        Gpa::new(DATA_GPA),
        4 * PAGE_SIZE,
        MapFlags::WRITABLE,
    )
    .unwrap();
    let cr3 = pt.cr3();
    g.record(PARENT_RECORD, 1, 0, b"init");
    g.write(CURRENT, &PARENT_RECORD.to_le_bytes());
    let mut policy = Policy::allow_all();
    policy.allow(b"init").unwrap();
    policy.allow(b"worker").unwrap();
    let monitor = Monitor::new(OsProfile::testguest(Gva::new(CURRENT)), policy);
    (g, cr3, monitor)
}

fn events(ring: &mut EventRing) -> Vec<Event> {
    let mut v = Vec::new();
    ring.drain(|e| v.push(*e));
    v
}

fn call(
    m: &mut Monitor,
    g: &Guest,
    cr3: Cr3,
    ring: &mut EventRing,
    code: u64,
    args: [u64; 4],
) -> Verdict {
    m.handle(
        code,
        args,
        &CallContext {
            cr3,
            tsc: 42,
            percpu_base: 0,
            // What the real gates record: the system-call gates their requests, the call gate the rest.
            entry: match RequestCode::from_raw(code) {
                Some(
                    RequestCode::Syscall | RequestCode::SyscallInt80 | RequestCode::SyscallSysenter,
                ) => Entry::SyscallGate,
                _ => Entry::CallGate,
            },
            caller_rsp: 0,
        },
        g,
        ring,
    )
}

#[test]
fn null_request_records_nothing() {
    let (g, cr3, mut m) = setup();
    let mut ring = EventRing::new();
    assert_eq!(
        call(&mut m, &g, cr3, &mut ring, RequestCode::Null as u64, [0; 4]),
        Verdict::Allow
    );
    assert!(events(&mut ring).is_empty());
    assert_eq!(m.stats().invocations, 1);
}

#[test]
fn syscall_event_names_the_running_process_from_guest_memory() {
    let (g, cr3, mut m) = setup();
    let mut ring = EventRing::new();
    let v = call(
        &mut m,
        &g,
        cr3,
        &mut ring,
        RequestCode::Syscall as u64,
        [39, 7, 8, 9],
    );
    assert_eq!(v, Verdict::Allow);
    let e = events(&mut ring);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].kind(), Some(EventKind::Syscall));
    assert_eq!((e[0].pid, e[0].nr, e[0].args), (1, 39, [7, 8, 9, 0]));
    assert_eq!(event::comm_bytes(&e[0].comm), b"init");
    assert_eq!(e[0].tsc, 42);
}

#[test]
fn process_creation_follows_the_allow_list() {
    let (mut g, cr3, mut m) = setup();
    let mut ring = EventRing::new();
    g.record(NEW_RECORD, 2, 1, b"worker");
    let create = RequestCode::ProcessCreate as u64;
    assert_eq!(
        call(&mut m, &g, cr3, &mut ring, create, [NEW_RECORD, 1, 0, 0]),
        Verdict::Allow
    );
    g.record(NEW_RECORD, 3, 1, b"intruder");
    assert_eq!(
        call(&mut m, &g, cr3, &mut ring, create, [NEW_RECORD, 2, 0, 0]),
        Verdict::Deny
    );
    let e = events(&mut ring);
    let seen: Vec<_> = e
        .iter()
        .map(|e| {
            (
                e.pid,
                e.ppid,
                event::comm_bytes(&e.comm).to_vec(),
                e.verdict,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (2, 1, b"worker".to_vec(), Verdict::Allow as i32),
            (3, 1, b"intruder".to_vec(), Verdict::Deny as i32)
        ]
    );
    assert_eq!(m.stats().denied, 1);
}

/// Forged requests, as a jump into the middle of a gate would make them: each is refused, recorded,
/// and leaves the monitor answering the next good request.
#[test]
fn checkpoint_rejects_forged_requests() {
    let (mut g, cr3, mut m) = setup();
    let mut ring = EventRing::new();
    g.record(NEW_RECORD, 2, 7, b"worker"); // wrong parent
    g.record(EDGE_RECORD, 2, 1, b"worker");
    let create = RequestCode::ProcessCreate as u64;
    let cases: [(u64, [u64; 4], RejectReason); 9] = [
        (0xdead_beef, [0; 4], RejectReason::UnknownRequest),
        (u64::MAX, [0; 4], RejectReason::UnknownRequest),
        (
            RequestCode::Null as u64,
            [1, 0, 0, 0],
            RejectReason::BadArgument,
        ),
        (create, [NEW_RECORD, 1, 0, 0], RejectReason::BadArgument),
        (create, [NEW_RECORD + 4, 1, 0, 0], RejectReason::BadArgument),
        (create, [0, 1, 0, 0], RejectReason::BadArgument),
        (
            create,
            [0x0000_8000_0000_0000, 1, 0, 0],
            RejectReason::BadArgument,
        ),
        (
            create,
            [KERNEL + 0x10_0000, 1, 0, 0],
            RejectReason::GuestMemory,
        ),
        (create, [PARENT_RECORD, 1, 5, 0], RejectReason::BadArgument),
    ];
    for (code, args, _) in cases {
        assert_eq!(
            call(&mut m, &g, cr3, &mut ring, code, args),
            Verdict::Rejected,
            "code {code:#x} args {args:x?}"
        );
    }
    // The edge record's name runs off the mapping: a bad translation, not a fault.
    assert_eq!(
        call(&mut m, &g, cr3, &mut ring, create, [EDGE_RECORD, 1, 0, 0]),
        Verdict::Rejected
    );
    let e = events(&mut ring);
    assert_eq!(e.len(), cases.len() + 1);
    for (ev, (code, args, reason)) in e.iter().zip(cases) {
        assert_eq!(ev.kind(), Some(EventKind::Rejected));
        assert_eq!(RejectReason::from_raw(ev.detail), Some(reason), "{code:#x}");
        assert_eq!((ev.nr, ev.args), (code, args));
    }
    assert_eq!(
        RejectReason::from_raw(e[cases.len()].detail),
        Some(RejectReason::GuestMemory)
    );
    assert_eq!(m.stats().rejected, cases.len() as u64 + 1);
    // Still serving.
    assert_eq!(
        call(
            &mut m,
            &g,
            cr3,
            &mut ring,
            RequestCode::Syscall as u64,
            [1, 0, 0, 0]
        ),
        Verdict::Allow
    );
}

#[test]
fn syscall_without_a_running_process_is_rejected() {
    let (mut g, cr3, mut m) = setup();
    g.write(CURRENT, &0u64.to_le_bytes());
    let mut ring = EventRing::new();
    assert_eq!(
        call(
            &mut m,
            &g,
            cr3,
            &mut ring,
            RequestCode::Syscall as u64,
            [1, 0, 0, 0]
        ),
        Verdict::Rejected
    );
    assert_eq!(
        RejectReason::from_raw(events(&mut ring)[0].detail),
        Some(RejectReason::NoCurrentProcess)
    );
    // A dangling current pointer is a bad translation, not a fault.
    g.write(CURRENT, &(KERNEL + 0x40_0000).to_le_bytes());
    assert_eq!(
        call(
            &mut m,
            &g,
            cr3,
            &mut ring,
            RequestCode::Syscall as u64,
            [1, 0, 0, 0]
        ),
        Verdict::Rejected
    );
    assert_eq!(
        RejectReason::from_raw(events(&mut ring)[0].detail),
        Some(RejectReason::GuestMemory)
    );
}

#[test]
fn corrupt_ring_is_refused_before_acting() {
    let (g, cr3, mut m) = setup();
    let mut ring = EventRing::new();
    ring.corrupt_for_test();
    assert!(!ring.is_consistent());
    assert_eq!(
        call(
            &mut m,
            &g,
            cr3,
            &mut ring,
            RequestCode::Syscall as u64,
            [1, 0, 0, 0]
        ),
        Verdict::Rejected
    );
    assert_eq!(m.stats().rejected, 1);
    assert_eq!(ring.produced(), 0, "nothing written into a corrupt ring");
}

#[test]
fn oversized_reads_are_refused() {
    let (g, cr3, _) = setup();
    let intro = Introspector::new(&g, cr3);
    let mut big = [0u8; introspect::MAX_READ + 1];
    assert_eq!(
        intro.read_gva(Gva::new(KERNEL), &mut big),
        Err(IntrospectError::TooLong(introspect::MAX_READ + 1))
    );
    let mut ok = [0u8; 8];
    intro.read_gva(Gva::new(CURRENT), &mut ok).unwrap();
    assert_eq!(u64::from_le_bytes(ok), PARENT_RECORD);
    assert_eq!(
        intro.translate(Gva::new(KERNEL + 0x1234)),
        Ok(Gpa::new(DATA_GPA + 0x1234))
    );
}

/// A Linux-like guest: `current_task` points at a task whose process id is `tgid`, whose parent is a
/// pointer, read through the kernel half of a page-table-isolation CR3 pair.
#[test]
fn linux_profile_reads_tgid_parent_pointer_and_uses_the_kernel_pgd() {
    let (mut g, cr3, _) = setup();
    const TASK: u64 = KERNEL + 0x2000;
    const PARENT: u64 = KERNEL + 0x2400;
    const TGID: u64 = 0x14;
    const REAL_PARENT: u64 = 0x18;
    const COMM: u64 = 0x40;
    g.write(CURRENT, &TASK.to_le_bytes());
    g.write(TASK + TGID, &26u32.to_le_bytes());
    g.write(TASK + REAL_PARENT, &PARENT.to_le_bytes());
    g.write(TASK + COMM, b"ihmi-workload\0");
    g.write(PARENT + TGID, &1u32.to_le_bytes());
    let os = OsProfile::linux(Gva::new(CURRENT), TGID, REAL_PARENT, COMM, true, 0x60);
    let mut m = Monitor::new(os, Policy::allow_all());
    let mut ring = EventRing::new();
    // The user half of the pair (bit 12) with a PCID: the monitor must read through the kernel half.
    let user_cr3 = Cr3::new(cr3.raw() | 0x1000 | 0x802);
    let v = m.handle(
        RequestCode::Syscall as u64,
        [110, 0, 0, 0],
        &CallContext {
            cr3: user_cr3,
            tsc: 1,
            percpu_base: 0,
            entry: Entry::SyscallGate,
            caller_rsp: 0,
        },
        &g,
        &mut ring,
    );
    assert_eq!(v, Verdict::Allow);
    let e = events(&mut ring);
    assert_eq!((e[0].pid, e[0].ppid, e[0].nr), (26, 1, 110));
    assert_eq!(event::comm_bytes(&e[0].comm), b"ihmi-workload");
    assert_eq!(m.os().syscall_name(110), Some("getppid"));
    // The kernel pages it read are remembered: a second call walks no page table and sees the same.
    let (_, misses) = m.translation_stats();
    assert!(misses > 0);
    m.handle(
        RequestCode::Syscall as u64,
        [102, 0, 0, 0],
        &CallContext {
            cr3: user_cr3,
            tsc: 2,
            percpu_base: 0,
            entry: Entry::SyscallGate,
            caller_rsp: 0,
        },
        &g,
        &mut ring,
    );
    assert_eq!(m.translation_stats().1, misses, "no new miss");
    assert!(m.translation_stats().0 >= misses);
    let e = events(&mut ring);
    assert_eq!((e[0].pid, e[0].ppid, e[0].nr), (26, 1, 102));
    // Data still comes from guest memory, not the cache: a renamed task shows its new name.
    g.write(TASK + COMM, b"renamed\0\0\0\0\0\0\0");
    m.handle(
        RequestCode::Syscall as u64,
        [39, 0, 0, 0],
        &CallContext {
            cr3: user_cr3,
            tsc: 3,
            percpu_base: 0,
            entry: Entry::SyscallGate,
            caller_rsp: 0,
        },
        &g,
        &mut ring,
    );
    assert_eq!(event::comm_bytes(&events(&mut ring)[0].comm), b"renamed");

    // A 32-bit call: the event says which entry it came through and names it from the i386 table.
    let ctx = CallContext {
        cr3: user_cr3,
        tsc: 4,
        percpu_base: 0,
        entry: Entry::SyscallGate,
        caller_rsp: 0,
    };
    for (code, entry) in [
        (RequestCode::SyscallInt80, "int80"),
        (RequestCode::SyscallSysenter, "sysenter"),
    ] {
        let v = m.handle(code as u64, [20, 1, 2, 3], &ctx, &g, &mut ring);
        assert_eq!(v, Verdict::Allow);
        let e = events(&mut ring);
        let line = std::format!("{}", e[0].json("inbox", m.os()));
        assert!(
            line.contains(&std::format!(
                "\"entry\":\"{entry}\",\"nr\":20,\"name\":\"getpid\""
            )),
            "{line}"
        );
    }
    // 32-bit registers hold no more than 32 bits: anything else did not come from the gate.
    let v = m.handle(
        RequestCode::SyscallInt80 as u64,
        [20, 1 << 32, 0, 0],
        &ctx,
        &g,
        &mut ring,
    );
    assert_eq!(v, Verdict::Rejected);
}

/// Where the page-cache test keeps its kernel objects (all in the 4 mapped pages) and its files' frames.
const FILE_LAYOUT: FileLayout = FileLayout {
    binprm_file: 0x30,
    file_mapping: 0x10,
    mapping_host: 0x00,
    mapping_pages: 0x18,
    inode_ino: 0x40,
    inode_size: 0x48,
    inode_ctime: 0x50,
    inode_mtime: 0x60,
    node_shift: 0,
    node_slots: 0x28,
    // Four slots a node, so that a few pages make a tree of two levels.
    chunk_shift: 2,
    page_struct_size: 64,
    vmemmap_base: Gva::new(KERNEL + 0x8),
};
const VMEMMAP: u64 = 0xffff_ea00_0000_0000;
const FILE_FRAMES: u64 = 0x20_0000;

/// One program file in the mock kernel: its `file`, `address_space` and `inode` records at `at`
/// (0x100 bytes), its pages in fresh frames `FILE_FRAMES + first_frame..`, its XArray nodes at
/// `at + 0x100..`.
struct MockFile {
    at: u64,
    pages: u64,
    first_frame: u64,
}

impl MockFile {
    fn new(g: &mut Guest, at: u64, first_frame: u64, content: &[u8]) -> Self {
        let pages = (content.len() as u64).div_ceil(PAGE_SIZE);
        for (i, chunk) in content.chunks(4096).enumerate() {
            let mut page = Box::new([0u8; 4096]);
            page[..chunk.len()].copy_from_slice(chunk);
            g.data
                .insert(FILE_FRAMES + (first_frame + i as u64) * PAGE_SIZE, page);
        }
        let f = Self {
            at,
            pages,
            first_frame,
        };
        let (file, mapping, inode) = (at, at + 0x20, at + 0x80);
        g.write(file + FILE_LAYOUT.file_mapping, &mapping.to_le_bytes());
        g.write(mapping + FILE_LAYOUT.mapping_host, &inode.to_le_bytes());
        g.write(inode + FILE_LAYOUT.inode_ino, &(at >> 4).to_le_bytes());
        g.write(
            inode + FILE_LAYOUT.inode_size,
            &(content.len() as u64).to_le_bytes(),
        );
        g.write(inode + FILE_LAYOUT.inode_mtime, &1u64.to_le_bytes());
        f.build_tree(g);
        f
    }

    fn page(&self, i: u64) -> u64 {
        VMEMMAP + ((FILE_FRAMES >> 12) + self.first_frame + i) * 64
    }

    fn set_head(&self, g: &mut Guest, entry: u64) {
        g.write(
            self.at + 0x20 + FILE_LAYOUT.mapping_pages,
            &entry.to_le_bytes(),
        );
    }

    /// The XArray Linux builds for one page per slot: the head alone for one page, else nodes of
    /// four slots, levels enough for the last index.
    fn build_tree(&self, g: &mut Guest) {
        if self.pages <= 1 {
            self.set_head(g, self.page(0));
            return;
        }
        let mut shift = 0;
        while (self.pages - 1) >> shift >= 4 {
            shift += 2;
        }
        let mut next = self.at + 0x100;
        let head = self.node(g, &mut next, shift, 0);
        self.set_head(g, head);
    }

    fn node(&self, g: &mut Guest, next: &mut u64, shift: u64, base: u64) -> u64 {
        let at = *next;
        *next += 0x50;
        g.write(at + FILE_LAYOUT.node_shift, &[shift as u8]);
        for slot in 0..4u64 {
            let first = base + (slot << shift);
            let entry = if first >= self.pages {
                0
            } else if shift == 0 {
                self.page(first)
            } else {
                self.node(g, next, shift - 2, first)
            };
            g.write(at + FILE_LAYOUT.node_slots + 8 * slot, &entry.to_le_bytes());
        }
        at | 2
    }
}

fn sha256(bytes: &[u8]) -> identity::Sha256Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// A Linux guest about to run a program: the event names the process as it is, the path it was given
/// and the SHA-256 of the file the kernel runs, read from the page cache; the allow-list judges that
/// identity, so a copy is what it is whatever its name. Forged records are rejected.
#[test]
fn linux_exec_is_judged_by_the_identity_of_the_file_it_runs() {
    let (mut g, cr3, _) = setup();
    const TASK: u64 = KERNEL + 0x2000;
    const PARENT: u64 = KERNEL + 0x2400;
    const BPRM: u64 = KERNEL + 0x2800;
    const PATH: u64 = KERNEL + 0x2900;
    const FILENAME: u64 = 0x60;
    g.write(CURRENT, &TASK.to_le_bytes());
    g.write(TASK + 0x14, &30u32.to_le_bytes());
    g.write(TASK + 0x18, &PARENT.to_le_bytes());
    g.write(TASK + 0x40, b"sh\0");
    g.write(PARENT + 0x14, &1u32.to_le_bytes());
    g.write(BPRM + FILENAME, &PATH.to_le_bytes());
    g.write(KERNEL + 0x8, &VMEMMAP.to_le_bytes());
    // An allowed program of 6 pages and a bit, an intruder of one page, a copy of the allowed one.
    let allowed: Vec<u8> = (0..6 * 4096 + 100).map(|i| (i * 7 % 251) as u8).collect();
    let intruder = b"\x7fELF an intruder".repeat(40);
    let good = MockFile::new(&mut g, KERNEL + 0x1100, 0, &allowed);
    let bad = MockFile::new(&mut g, KERNEL + 0x3000, 10, &intruder);
    let copy = MockFile::new(&mut g, KERNEL + 0x3400, 20, &allowed);
    let os = OsProfile::linux(Gva::new(CURRENT), 0x14, 0x18, 0x40, false, FILENAME)
        .with_files(FILE_LAYOUT);
    let mut policy = Policy::allow_all();
    policy.allow_digest(sha256(&allowed)).unwrap();
    let mut m = Monitor::new(os, policy);
    let mut ring = EventRing::new();
    let exec = |m: &mut Monitor, g: &mut Guest, ring: &mut EventRing, file: &MockFile| {
        g.write(BPRM + FILE_LAYOUT.binprm_file, &file.at.to_le_bytes());
        call(m, g, cr3, ring, RequestCode::Exec as u64, [BPRM, 0, 0, 0])
    };

    g.write(PATH, b"/bin/ls\0");
    assert_eq!(exec(&mut m, &mut g, &mut ring, &good), Verdict::Allow);
    assert_eq!(m.identity_stats(), (1, 0));
    // The intruder under the allowed name, and the allowed program under another name.
    assert_eq!(exec(&mut m, &mut g, &mut ring, &bad), Verdict::Deny);
    g.write(PATH, b"/tmp/renamed\0");
    assert_eq!(exec(&mut m, &mut g, &mut ring, &copy), Verdict::Allow);
    let e = events(&mut ring);
    assert_eq!(e.len(), 3);
    assert_eq!(e[1].kind(), Some(EventKind::Exec));
    assert_eq!((e[1].pid, e[1].ppid), (30, 1));
    assert_eq!(event::comm_bytes(&e[1].comm), b"sh");
    assert_eq!(event::nul_padded(&e[1].path), b"/bin/ls");
    assert_eq!(e[1].args, event::digest_words(&sha256(&intruder)));
    let hex: std::string::String = sha256(&intruder)
        .iter()
        .map(|b| std::format!("{b:02x}"))
        .collect();
    let json = std::format!("{}", e[1].json("inbox", m.os()));
    assert!(
        json.contains(&std::format!(r#""mode":"inbox","pid":30,"ppid":1,"comm":"sh","filename":"/bin/ls","sha256":"{hex}","verdict":"deny""#)),
        "{json}"
    );
    assert_eq!(m.stats().denied, 1);

    // Once hashed, a version is answered from the cache; a write through the kernel changes the
    // inode's times, so the next exec hashes again and sees the change. A write straight into the
    // frame leaves them alone: the cached digest stands (the stated limit).
    assert_eq!(exec(&mut m, &mut g, &mut ring, &good), Verdict::Allow);
    assert_eq!(m.identity_stats(), (3, 1));
    g.data.get_mut(&(FILE_FRAMES + 5 * PAGE_SIZE)).unwrap()[9] ^= 1;
    assert_eq!(exec(&mut m, &mut g, &mut ring, &good), Verdict::Allow);
    g.write(
        good.at + 0x80 + FILE_LAYOUT.inode_mtime,
        &2u64.to_le_bytes(),
    );
    assert_eq!(exec(&mut m, &mut g, &mut ring, &good), Verdict::Deny);
    assert_eq!(m.identity_stats(), (4, 2));
    g.data.get_mut(&(FILE_FRAMES + 5 * PAGE_SIZE)).unwrap()[9] ^= 1;
    g.write(
        good.at + 0x80 + FILE_LAYOUT.inode_ctime,
        &3u64.to_le_bytes(),
    );
    assert_eq!(exec(&mut m, &mut g, &mut ring, &good), Verdict::Allow);

    // A multi-page folio: pages 4 and 5 one folio (its struct pages consecutive), slot 5 a sibling
    // entry naming slot 4 in the second leaf.
    let leaf = good.at + 0x100 + 2 * 0x50;
    g.write(leaf + FILE_LAYOUT.node_slots + 8, &2u64.to_le_bytes());
    g.write(
        good.at + 0x80 + FILE_LAYOUT.inode_ctime,
        &4u64.to_le_bytes(),
    );
    assert_eq!(exec(&mut m, &mut g, &mut ring, &good), Verdict::Allow);

    // A page not in memory (a value entry: evicted), a node of the wrong height: no digest, and
    // refused while the list enforces.
    g.write(leaf + FILE_LAYOUT.node_slots, &0x1234_5001u64.to_le_bytes());
    g.write(
        good.at + 0x80 + FILE_LAYOUT.inode_ctime,
        &5u64.to_le_bytes(),
    );
    assert_eq!(exec(&mut m, &mut g, &mut ring, &good), Verdict::Deny);
    g.write(leaf + FILE_LAYOUT.node_slots, &good.page(4).to_le_bytes());
    g.write(leaf + FILE_LAYOUT.node_shift, &[2]);
    assert_eq!(exec(&mut m, &mut g, &mut ring, &good), Verdict::Deny);
    let e = events(&mut ring);
    let unhashed: Vec<_> = e
        .iter()
        .map(|e| IdentityError::from_raw(e.detail >> event::EXEC_IDENTITY_SHIFT))
        .collect();
    assert_eq!(
        unhashed[unhashed.len() - 2..],
        [
            Some(IdentityError::NotResident),
            Some(IdentityError::Malformed)
        ]
    );
    let json = std::format!("{}", e[e.len() - 2].json("inbox", m.os()));
    assert!(
        json.contains(r#""sha256":null,"unhashed":"not-resident","verdict":"deny""#),
        "{json}"
    );

    // A path longer than an event keeps: kept cut, and flagged.
    let long = [b"/very".repeat(20).as_slice(), b"/ls\0"].concat();
    g.write(PATH, &long);
    assert_eq!(exec(&mut m, &mut g, &mut ring, &copy), Verdict::Allow);
    let e = events(&mut ring);
    assert_eq!(e[0].detail, 1);
    assert_eq!(&e[0].path[..], &long[..ihmi_abi::monitor::PATH_LEN]);

    // Forgeries: a user-half or misaligned record, extra arguments, a path running off the mapping.
    for (bprm, extra) in [(0x7fff_0000_0000, 0), (BPRM + 1, 0), (BPRM, 5)] {
        let v = call(
            &mut m,
            &g,
            cr3,
            &mut ring,
            RequestCode::Exec as u64,
            [bprm, extra, 0, 0],
        );
        assert_eq!(v, Verdict::Rejected);
    }
    let end = KERNEL + 4 * PAGE_SIZE;
    g.write(end - 8, b"/noend!!");
    g.write(BPRM + FILENAME, &(end - 8).to_le_bytes());
    assert_eq!(exec(&mut m, &mut g, &mut ring, &copy), Verdict::Rejected);
    let e = events(&mut ring);
    let reasons: Vec<_> = e.iter().map(|e| RejectReason::from_raw(e.detail)).collect();
    assert_eq!(
        reasons,
        [
            Some(RejectReason::BadArgument),
            Some(RejectReason::BadArgument),
            Some(RejectReason::BadArgument),
            Some(RejectReason::GuestMemory),
        ]
    );
}

/// One page: the XArray's head is the page itself. Without a list the program runs, its digest
/// recorded.
#[test]
fn a_one_page_program_is_hashed_from_the_head_entry() {
    let (mut g, cr3, _) = setup();
    const TASK: u64 = KERNEL + 0x2000;
    const BPRM: u64 = KERNEL + 0x2800;
    const PATH: u64 = KERNEL + 0x2900;
    g.write(CURRENT, &TASK.to_le_bytes());
    g.write(TASK + 0x14, &30u32.to_le_bytes());
    g.write(TASK + 0x18, &TASK.to_le_bytes());
    g.write(TASK + 0x40, b"sh\0");
    g.write(BPRM + 0x60, &PATH.to_le_bytes());
    g.write(PATH, b"/bin/true\0");
    g.write(KERNEL + 0x8, &VMEMMAP.to_le_bytes());
    let small = b"#!/bin/sh\nexit 0\n";
    let f = MockFile::new(&mut g, KERNEL + 0x3000, 3, small);
    g.write(BPRM + FILE_LAYOUT.binprm_file, &f.at.to_le_bytes());
    let os =
        OsProfile::linux(Gva::new(CURRENT), 0x14, 0x18, 0x40, false, 0x60).with_files(FILE_LAYOUT);
    let mut m = Monitor::new(os, Policy::allow_all());
    let mut ring = EventRing::new();
    let v = call(
        &mut m,
        &g,
        cr3,
        &mut ring,
        RequestCode::Exec as u64,
        [BPRM, 0, 0, 0],
    );
    assert_eq!(v, Verdict::Allow);
    let e = events(&mut ring);
    assert_eq!(e[0].args, event::digest_words(&sha256(small)));
    // Page 1 of a one-page head does not exist: a file that claims more is not resident.
    g.write(f.at + 0x80 + FILE_LAYOUT.inode_size, &5000u64.to_le_bytes());
    let mut policy = Policy::allow_all();
    policy.allow_digest(sha256(small)).unwrap();
    let os =
        OsProfile::linux(Gva::new(CURRENT), 0x14, 0x18, 0x40, false, 0x60).with_files(FILE_LAYOUT);
    let mut m = Monitor::new(os, policy);
    let v = call(
        &mut m,
        &g,
        cr3,
        &mut ring,
        RequestCode::Exec as u64,
        [BPRM, 0, 0, 0],
    );
    assert_eq!(v, Verdict::Deny);
    let e = events(&mut ring);
    assert_eq!(
        IdentityError::from_raw(e[0].detail >> event::EXEC_IDENTITY_SHIFT),
        Some(IdentityError::NotResident)
    );
}

/// The test guest has no `execve`: the request is refused there.
#[test]
fn exec_is_refused_for_the_test_guest() {
    let (g, cr3, mut m) = setup();
    let mut ring = EventRing::new();
    let v = call(
        &mut m,
        &g,
        cr3,
        &mut ring,
        RequestCode::Exec as u64,
        [KERNEL, 0, 0, 0],
    );
    assert_eq!(v, Verdict::Rejected);
}

/// An SMP Linux keeps `current_task` per CPU: the profile's address is an offset from the caller's
/// per-CPU base (its GS base), which the gate hands the monitor.
#[test]
fn per_cpu_current_task_is_read_from_the_callers_per_cpu_area() {
    let (mut g, cr3, _) = setup();
    const PERCPU: u64 = KERNEL + 0x3000;
    const OFFSET: u64 = 0x28;
    const TASK: u64 = KERNEL + 0x2000;
    const PARENT: u64 = KERNEL + 0x2400;
    g.write(PERCPU + OFFSET, &TASK.to_le_bytes());
    g.write(TASK + 0x14, &41u32.to_le_bytes());
    g.write(TASK + 0x18, &PARENT.to_le_bytes());
    g.write(TASK + 0x40, b"smp\0");
    g.write(PARENT + 0x14, &1u32.to_le_bytes());
    let os = OsProfile::linux(Gva::new(OFFSET), 0x14, 0x18, 0x40, false, 0x60);
    let mut m = Monitor::new(os, Policy::allow_all());
    let mut ring = EventRing::new();
    let ctx = CallContext {
        cr3,
        tsc: 1,
        percpu_base: PERCPU,
        entry: Entry::SyscallGate,
        caller_rsp: 0,
    };
    assert_eq!(
        m.handle(
            RequestCode::Syscall as u64,
            [39, 0, 0, 0],
            &ctx,
            &g,
            &mut ring
        ),
        Verdict::Allow
    );
    let e = events(&mut ring);
    assert_eq!((e[0].pid, e[0].ppid), (41, 1));
    assert_eq!(event::comm_bytes(&e[0].comm), b"smp");
    // Without the base the offset is no kernel address: the request is rejected, not misread.
    let no_base = CallContext {
        percpu_base: 0,
        ..ctx
    };
    assert_eq!(
        m.handle(
            RequestCode::Syscall as u64,
            [39, 0, 0, 0],
            &no_base,
            &g,
            &mut ring
        ),
        Verdict::Rejected
    );
}

/// On Linux each entry makes its own requests only, and an exec request needs the hook's frame on
/// the calling kernel stack: ring-0 code calling the gate itself is rejected, with the reason.
#[test]
fn linux_requests_need_their_own_entry_and_an_exec_needs_the_hook_s_frame() {
    let (mut g, cr3, _) = setup();
    const TASK: u64 = KERNEL + 0x2000;
    const PARENT: u64 = KERNEL + 0x2400;
    const BPRM: u64 = KERNEL + 0x2800;
    const PATH: u64 = KERNEL + 0x2900;
    const STACK: u64 = KERNEL + 0x3000;
    const HOOK_RETURN: u64 = 0xffff_ffff_8200_0123;
    const SITE_RETURN: u64 = 0xffff_ffff_8112_6cfe;
    g.write(CURRENT, &TASK.to_le_bytes());
    g.write(TASK + 0x14, &30u32.to_le_bytes());
    g.write(TASK + 0x18, &PARENT.to_le_bytes());
    g.write(TASK + 0x40, b"sh\0");
    g.write(PARENT + 0x14, &1u32.to_le_bytes());
    g.write(BPRM + 0x60, &PATH.to_le_bytes());
    g.write(PATH, b"/bin/ls\0");
    let os = OsProfile::linux(Gva::new(CURRENT), 0x14, 0x18, 0x40, false, 0x60)
        .with_exec_returns(HOOK_RETURN, SITE_RETURN);
    let mut m = Monitor::new(os, Policy::allow_all());
    let mut ring = EventRing::new();
    // The frame a real exec leaves: saved RFLAGS, the return into the trampoline, its nine pushes
    // (RDI, the binprm, fifth from the bottom), the return into the hooked function.
    let mut frame = [0u64; 12];
    frame[1] = HOOK_RETURN;
    frame[6] = BPRM;
    frame[11] = SITE_RETURN;
    let write_frame = |g: &mut Guest, frame: &[u64; 12]| {
        for (i, w) in frame.iter().enumerate() {
            g.write(STACK + 8 * i as u64, &w.to_le_bytes());
        }
    };
    write_frame(&mut g, &frame);
    let mut req = |g: &Guest, code: RequestCode, entry: Entry, rsp: u64, bprm: u64| {
        let ctx = CallContext {
            cr3,
            tsc: 7,
            percpu_base: 0,
            entry,
            caller_rsp: rsp,
        };
        let v = m.handle(code as u64, [bprm, 0, 0, 0], &ctx, g, &mut ring);
        let e = events(&mut ring);
        (v, e[0].kind(), RejectReason::from_raw(e[0].detail))
    };
    let exec = RequestCode::Exec;
    assert_eq!(
        req(&g, exec, Entry::CallGate, STACK, BPRM),
        (Verdict::Allow, Some(EventKind::Exec), None)
    );
    let rejected = |why| (Verdict::Rejected, Some(EventKind::Rejected), Some(why));
    // Through the wrong entry: an exec request from a system-call gate or from an unverified
    // VMCALL, a system call through the call gate.
    for (code, entry) in [
        (exec, Entry::SyscallGate),
        (exec, Entry::Unverified),
        (RequestCode::Syscall, Entry::CallGate),
        (RequestCode::Null, Entry::CallGate),
    ] {
        assert_eq!(
            req(&g, code, entry, STACK, BPRM),
            rejected(RejectReason::WrongEntry)
        );
    }
    // Through the call gate from elsewhere: another stack, another binprm than the trampoline
    // pushed, a return that is not the trampoline's or not the hooked site's, a stack off guest RAM.
    assert_eq!(
        req(&g, exec, Entry::CallGate, STACK + 8, BPRM),
        rejected(RejectReason::NotFromHook)
    );
    assert_eq!(
        req(&g, exec, Entry::CallGate, STACK, BPRM + 0x100),
        rejected(RejectReason::NotFromHook)
    );
    // After an ENDBR64 the call is 4 bytes further, and so is its return.
    let mut f = frame;
    f[11] = SITE_RETURN + 4;
    write_frame(&mut g, &f);
    assert_eq!(
        req(&g, exec, Entry::CallGate, STACK, BPRM),
        (Verdict::Allow, Some(EventKind::Exec), None)
    );
    for (i, wrong) in [
        (1, HOOK_RETURN + 1),
        (11, SITE_RETURN - 5),
        (11, SITE_RETURN + 8),
    ] {
        let mut f = frame;
        f[i] = wrong;
        write_frame(&mut g, &f);
        assert_eq!(
            req(&g, exec, Entry::CallGate, STACK, BPRM),
            rejected(RejectReason::NotFromHook)
        );
    }
    assert_eq!(
        req(&g, exec, Entry::CallGate, 0xffff_ffff_ffff_fff0, BPRM),
        rejected(RejectReason::NotFromHook)
    );
}

/// KVM's exit hook alone, as L0 arms it in front of `vmx_handle_exit`, over an empty exit-handler
/// table (the returns are those `hooked_call` is given by the tests that use it).
fn exit_hook_only() -> KvmHook {
    KvmHook {
        returns: [0xffff_ffff_8200_02c3, 0xffff_ffff_8106_ca56],
        exit_reason: 0x1a0,
        handlers: KERNEL + 0x1ff0,
        handler_count: 0,
        expected: [0; ihmi_abi::monitor::KVM_EXIT_HANDLERS_MAX],
        map: None,
        vm: None,
        ops: None,
    }
}

/// A Linux kernel in `setup`'s memory in the middle of a hooked call: the running task (`pid`,
/// `comm`, its parent pid 1), the trampoline's frame on the kernel stack with `arg` in RDI and the
/// two returns, and the call's context through the call gate. Returns the profile and the context.
fn hooked_call(
    g: &mut Guest,
    cr3: Cr3,
    pid: u32,
    comm: &[u8],
    arg: u64,
    [hook_return, site_return]: [u64; 2],
) -> (OsProfile, CallContext) {
    const TASK: u64 = KERNEL + 0x2000;
    const PARENT: u64 = KERNEL + 0x2400;
    const STACK: u64 = KERNEL + 0x3000;
    g.write(CURRENT, &TASK.to_le_bytes());
    g.write(TASK + 0x14, &pid.to_le_bytes());
    g.write(TASK + 0x18, &PARENT.to_le_bytes());
    let mut name = [0u8; COMM_LEN];
    name[..comm.len()].copy_from_slice(comm);
    g.write(TASK + 0x40, &name);
    g.write(PARENT + 0x14, &1u32.to_le_bytes());
    let mut frame = [0u64; 12];
    frame[1] = hook_return;
    frame[6] = arg;
    frame[11] = site_return;
    for (i, w) in frame.iter().enumerate() {
        g.write(STACK + 8 * i as u64, &w.to_le_bytes());
    }
    let linux = OsProfile::linux(Gva::new(CURRENT), 0x14, 0x18, 0x40, false, 0x60);
    let ctx = CallContext {
        cr3,
        tsc: 9,
        percpu_base: 0,
        entry: Entry::CallGate,
        caller_rsp: STACK,
    };
    (linux, ctx)
}

/// A kernel profile without the hook a request needs refuses the request as unknown.
fn refused_without_the_hook(
    linux: OsProfile,
    code: u64,
    args: [u64; 4],
    ctx: &CallContext,
    g: &Guest,
) {
    let mut ring = EventRing::new();
    let mut without = Monitor::new(linux, Policy::allow_all());
    assert_eq!(
        without.handle(code, args, ctx, g, &mut ring),
        Verdict::Rejected
    );
    assert_eq!(
        RejectReason::from_raw(events(&mut ring)[0].detail),
        Some(RejectReason::UnknownRequest)
    );
}

/// An io_uring operation from the hook in `io_issue_sqe`: named from the `io_kiocb`'s opcode, with
/// the hook's frame checked as for exec; a kernel without the hook configured refuses the request.
#[test]
fn linux_io_uring_names_the_operation_from_the_kernel_s_request() {
    let (mut g, cr3, _) = setup();
    const REQ: u64 = KERNEL + 0x2800;
    const HOOK_RETURN: u64 = 0xffff_ffff_8200_0283;
    const SITE_RETURN: u64 = 0xffff_ffff_8116_0f25;
    g.write(REQ + 0x8, &[18]); // IORING_OP_OPENAT
    let (linux, ctx) = hooked_call(
        &mut g,
        cr3,
        31,
        b"iou-wrk-31",
        REQ,
        [HOOK_RETURN, SITE_RETURN],
    );
    let mut ring = EventRing::new();
    let args = [REQ, 0, 0, 0];
    let code = RequestCode::IoUring as u64;
    refused_without_the_hook(linux, code, args, &ctx, &g);
    let hook = IoUringHook {
        returns: [HOOK_RETURN, SITE_RETURN],
        opcode: 0x8,
    };
    let mut m = Monitor::new(linux.with_io_uring(hook), Policy::allow_all());
    assert_eq!(m.handle(code, args, &ctx, &g, &mut ring), Verdict::Allow);
    let e = events(&mut ring);
    assert_eq!(
        (e[0].kind(), e[0].nr, e[0].pid),
        (Some(EventKind::IoUring), 18, 31)
    );
    let json = std::format!("{}", e[0].json("inbox", m.os()));
    assert!(
        json.contains(r#""event":"io_uring","#) && json.contains(r#""opcode":18,"op":"openat""#),
        "{json}"
    );
    // Not from the hook: another request than the trampoline pushed.
    assert_eq!(
        m.handle(code, [REQ + 0x100, 0, 0, 0], &ctx, &g, &mut ring),
        Verdict::Rejected
    );
    assert_eq!(
        RejectReason::from_raw(events(&mut ring)[0].detail),
        Some(RejectReason::NotFromHook)
    );
}

/// KVM's exit hook (`vmx_handle_exit`): each exit is an event with the reason read from the vCPU and
/// the VMM thread it runs in; the exit-handler table is checked whole at each one, a changed entry is
/// one `integrity` event per new value (not one per exit), and putting the entry back is quiet.
#[test]
fn kvm_exits_are_named_from_the_vcpu_and_the_exit_handler_table_is_held_to_the_image() {
    let (mut g, cr3, _) = setup();
    const VCPU: u64 = KERNEL + 0x1800;
    const REASON_OFFSET: u64 = 0x1a0;
    // Three entries, the last one on the next page: the table is read in one go across it.
    const TABLE: u64 = KERNEL + 0x1ff0;
    const HOOK_RETURN: u64 = 0xffff_ffff_8200_02c3;
    const SITE_RETURN: u64 = 0xffff_ffff_8106_ca56;
    let image = [0xffff_ffff_8106_1000u64, 0, 0xffff_ffff_8106_2000];
    g.write(VCPU + REASON_OFFSET, &10u32.to_le_bytes()); // CPUID
    for (i, v) in image.iter().enumerate() {
        g.write(TABLE + 8 * i as u64, &v.to_le_bytes());
    }
    let (linux, ctx) = hooked_call(
        &mut g,
        cr3,
        77,
        b"ihmi-l1-vmm",
        VCPU,
        [HOOK_RETURN, SITE_RETURN],
    );
    let mut ring = EventRing::new();
    let args = [VCPU, 0, 0, 0];
    let code = RequestCode::KvmExit as u64;
    refused_without_the_hook(linux, code, args, &ctx, &g);
    let mut expected = [0; ihmi_abi::monitor::KVM_EXIT_HANDLERS_MAX];
    expected[..3].copy_from_slice(&image);
    let hook = KvmHook {
        returns: [HOOK_RETURN, SITE_RETURN],
        exit_reason: REASON_OFFSET,
        handlers: TABLE,
        handler_count: 3,
        expected,
        map: None,
        vm: None,
        ops: None,
    };
    let mut m = Monitor::new(linux.with_kvm(hook), Policy::allow_all());
    assert_eq!(m.handle(code, args, &ctx, &g, &mut ring), Verdict::Allow);
    let e = events(&mut ring);
    assert_eq!(e.len(), 1);
    assert_eq!(
        (e[0].kind(), e[0].nr, e[0].pid, e[0].args),
        (Some(EventKind::KvmExit), 10, 77, [VCPU, 3, 0, 0])
    );
    let json = std::format!("{}", e[0].json("inbox", m.os()));
    assert!(
        json.contains(r#""event":"kvm_exit","#)
            && json.contains(r#""comm":"ihmi-l1-vmm""#)
            && json.contains(r#""reason":10,"handlers_checked":3,"handlers_changed":0"#),
        "{json}"
    );
    // A root attacker points entry 2 at code of its own: reported once, with where and what, before
    // the exit's own event; the next exits say the entry still differs but report nothing new.
    const EVIL: u64 = 0xffff_ffff_c000_0000;
    g.write(TABLE + 16, &EVIL.to_le_bytes());
    for round in 0..3 {
        assert_eq!(m.handle(code, args, &ctx, &g, &mut ring), Verdict::Allow);
        let e = events(&mut ring);
        let exit = e.last().unwrap();
        assert_eq!((exit.kind(), exit.args[2]), (Some(EventKind::KvmExit), 1));
        if round == 0 {
            assert_eq!(e.len(), 2);
            assert_eq!(
                (e[0].kind(), e[0].detail, e[0].nr, e[0].args),
                (
                    Some(EventKind::Integrity),
                    IntegrityProperty::KvmExitHandlers as u16,
                    2,
                    [TABLE + 16, image[2], EVIL, 0]
                )
            );
            let json = std::format!("{}", e[0].json("inbox", m.os()));
            assert!(
                json.contains(r#""event":"integrity","#)
                    && json.contains(r#""property":"kvm_exit_handlers","index":2"#),
                "{json}"
            );
        } else {
            assert_eq!(e.len(), 1, "reported once per new value");
        }
    }
    // Another value is news again; the image's value back is quiet, and a later change is news.
    g.write(TABLE + 16, &(EVIL + 8).to_le_bytes());
    m.handle(code, args, &ctx, &g, &mut ring);
    assert_eq!(events(&mut ring).len(), 2);
    g.write(TABLE + 16, &image[2].to_le_bytes());
    m.handle(code, args, &ctx, &g, &mut ring);
    let e = events(&mut ring);
    assert_eq!((e.len(), e[0].args[2]), (1, 0));
    g.write(TABLE + 16, &EVIL.to_le_bytes());
    m.handle(code, args, &ctx, &g, &mut ring);
    assert_eq!(events(&mut ring).len(), 2);
    // Not from the hook (another vCPU than the trampoline pushed), or a vCPU pointer that is no
    // kernel address: refused.
    for bad in [VCPU + 0x100, 0x1000] {
        assert_eq!(
            m.handle(code, [bad, 0, 0, 0], &ctx, &g, &mut ring),
            Verdict::Rejected
        );
        assert_eq!(
            RejectReason::from_raw(events(&mut ring)[0].detail),
            Some(RejectReason::NotFromHook)
        );
    }
    // Through a system-call gate: a forgery.
    let sys = CallContext {
        entry: Entry::SyscallGate,
        ..ctx
    };
    assert_eq!(m.handle(code, args, &sys, &g, &mut ring), Verdict::Rejected);
    assert_eq!(
        RejectReason::from_raw(events(&mut ring)[0].detail),
        Some(RejectReason::WrongEntry)
    );
}

/// KVM's `kvm_x86_ops` (P2) is held to the words L0 copied at boot, a chunk of them at each exit:
/// a changed word is found within one pass and is one `integrity` event per new value, before the
/// exit's own event; the exit's event is unchanged; the old value back is quiet.
#[test]
fn kvm_x86_ops_is_held_to_its_boot_time_words_a_chunk_at_each_exit() {
    use crate::KVM_X86_OPS_CHUNK;
    let (mut g, cr3, _) = setup();
    const VCPU: u64 = KERNEL + 0x1800;
    const OPS: u64 = KERNEL + 0x2800;
    const WORDS: usize = KVM_X86_OPS_CHUNK + 4;
    let mut expected = [0; ihmi_abi::monitor::KVM_X86_OPS_MAX];
    for (i, v) in expected[..WORDS].iter_mut().enumerate() {
        *v = 0xffff_ffff_8106_0000 + 0x40 * i as u64;
        g.write(OPS + 8 * i as u64, &v.to_le_bytes());
    }
    let (linux, ctx) = hooked_call(
        &mut g,
        cr3,
        77,
        b"ihmi-l1-vmm",
        VCPU,
        [0xffff_ffff_8200_02c3, 0xffff_ffff_8106_ca56],
    );
    let hook = KvmHook {
        ops: Some(KvmOps {
            at: OPS,
            words: WORDS,
            expected,
        }),
        ..exit_hook_only()
    };
    let mut m = Monitor::new(linux.with_kvm(hook), Policy::allow_all());
    let code = RequestCode::KvmExit as u64;
    let args = [VCPU, 0, 0, 0];
    let mut ring = EventRing::new();
    let exit = |m: &mut Monitor, g: &Guest, ring: &mut EventRing| {
        assert_eq!(m.handle(code, args, &ctx, g, ring), Verdict::Allow);
        let e = events(ring);
        assert_eq!(e.last().unwrap().kind(), Some(EventKind::KvmExit));
        e[..e.len() - 1].to_vec()
    };
    // Untouched: two exits make a pass, and nothing is said.
    for _ in 0..4 {
        assert!(exit(&mut m, &g, &mut ring).is_empty());
    }
    // A root attacker points `nested_ops` (here word 18, in the second chunk) at a table of its own.
    const EVIL: u64 = 0xffff_8880_0bad_0000;
    g.write(OPS + 8 * 18, &EVIL.to_le_bytes());
    let mut said = std::vec::Vec::new();
    for _ in 0..6 {
        said.extend(exit(&mut m, &g, &mut ring));
    }
    assert_eq!(said.len(), 1, "once per new value");
    assert_eq!(
        (said[0].kind(), said[0].detail, said[0].nr, said[0].args),
        (
            Some(EventKind::Integrity),
            IntegrityProperty::KvmX86Ops as u16,
            18,
            [OPS + 8 * 18, expected[18], EVIL, 0]
        )
    );
    let json = std::format!("{}", said[0].json("inbox", m.os()));
    assert!(
        json.contains(r#""property":"kvm_x86_ops","index":18"#),
        "{json}"
    );
    // Put back: quiet; changed again: news again.
    g.write(OPS + 8 * 18, &expected[18].to_le_bytes());
    for _ in 0..2 {
        assert!(exit(&mut m, &g, &mut ring).is_empty());
    }
    g.write(OPS + 8 * 18, &EVIL.to_le_bytes());
    let n: usize = (0..2).map(|_| exit(&mut m, &g, &mut ring).len()).sum();
    assert_eq!(n, 1);
}

/// KVM's mapping hook (`make_spte`): every mapping is an event with its guest frame, host frame, the
/// VMM's address of the page and the level read from the shadow page; a frame in the kernel's image,
/// one that is not RAM (here: not in the test guest's memory), a large mapping that reaches into the
/// image, and a guest frame outside its memslot are each an `l2_memory` integrity event first. The
/// registers the trampoline saved must be the arguments.
#[test]
fn kvm_mappings_are_held_to_the_vm_s_own_memory() {
    let (mut g, cr3, _) = setup();
    const VCPU: u64 = KERNEL + 0x1800;
    const SLOT: u64 = KERNEL + 0x1900;
    const SP: u64 = KERNEL + 0x1a00;
    const STACK: u64 = KERNEL + 0x3000;
    const HOOK_RETURN: u64 = 0xffff_ffff_8200_0313;
    const SITE_RETURN: u64 = 0xffff_ffff_8104_2b65;
    const BASE_GFN: u64 = 0x100;
    const USERSPACE: u64 = 0x7f00_0000_0000;
    g.write(SLOT + 0x60, &BASE_GFN.to_le_bytes());
    const NPAGES: u64 = 0x400;
    g.write(SLOT + 0x68, &NPAGES.to_le_bytes());
    g.write(SLOT + 0x98, &USERSPACE.to_le_bytes());
    let (linux, ctx) = hooked_call(
        &mut g,
        cr3,
        77,
        b"ihmi-l1-vmm",
        VCPU,
        [HOOK_RETURN, SITE_RETURN],
    );
    let code = RequestCode::L2Map as u64;
    let ram = DATA_GPA >> 12;
    let image_frame = ram + 1;
    // The trampoline's saved R9, R8, RSI, RDX (the rest of its frame is `hooked_call`'s).
    let frame_of = |g: &mut Guest, gfn: u64, pfn: u64, slot: u64| {
        for (i, w) in [(4, pfn), (5, gfn), (7, SP), (8, slot)] {
            g.write(STACK + 8 * i, &w.to_le_bytes());
        }
        [VCPU, slot, gfn, pfn]
    };
    let exit_only = exit_hook_only();
    let args = frame_of(&mut g, 0x180, ram, SLOT);
    refused_without_the_hook(linux.with_kvm(exit_only), code, args, &ctx, &g);
    let hook = KvmHook {
        map: Some(KvmMapHook {
            returns: [HOOK_RETURN, SITE_RETURN],
            slot_base_gfn: 0x60,
            slot_npages: 0x68,
            slot_userspace_addr: 0x98,
            role: 0x2c,
            image: [
                [image_frame << 12, (image_frame << 12) + 0x800],
                [0; 2],
                [0; 2],
                [0; 2],
            ],
        }),
        ..exit_only
    };
    let mut m = Monitor::new(linux.with_kvm(hook), Policy::allow_all());
    let mut ring = EventRing::new();
    for (gfn, pfn, level, class) in [
        (0x180, ram, 1, L2Memory::Ok),
        (0x181, image_frame, 1, L2Memory::KernelImage),
        (0x182, 0x9_0000, 1, L2Memory::NotRam),
        (0x50, ram, 1, L2Memory::OutsideSlot),
        (0x200, ram & !0x1ff, 2, L2Memory::KernelImage),
        // 2 MiB from near the slot's end: it would run past it.
        (0x4ff, 0x20_0000, 2, L2Memory::OutsideSlot),
    ] {
        g.write(SP + 0x2c, &(0x100u32 | level as u32).to_le_bytes());
        let args = frame_of(&mut g, gfn, pfn, SLOT);
        assert_eq!(m.handle(code, args, &ctx, &g, &mut ring), Verdict::Allow);
        let e = events(&mut ring);
        let span = 1 << (9 * (level - 1));
        let in_slot = gfn >= BASE_GFN && gfn - BASE_GFN + span <= NPAGES;
        let hva = if in_slot {
            USERSPACE + ((gfn - BASE_GFN) << 12)
        } else {
            0
        };
        let map = e.last().unwrap();
        assert_eq!(
            (map.kind(), map.detail, map.nr, map.pid, map.args),
            (
                Some(EventKind::L2Map),
                class as u16,
                gfn,
                77,
                [VCPU, pfn, hva, level]
            ),
            "{gfn:#x}"
        );
        if class == L2Memory::Ok {
            assert_eq!(e.len(), 1);
            let json = std::format!("{}", map.json("inbox", m.os()));
            assert!(
                json.contains(r#""event":"l2_map","#)
                    && json.contains(r#""memory":"vm","verdict":"allow""#),
                "{json}"
            );
        } else {
            assert_eq!(e.len(), 2, "{gfn:#x}");
            assert_eq!(
                (e[0].kind(), e[0].detail, e[0].nr, e[0].args),
                (
                    Some(EventKind::Integrity),
                    IntegrityProperty::L2Memory as u16,
                    gfn,
                    [gfn << 12, hva, pfn << 12, class as u64]
                )
            );
            let json = std::format!("{}", e[0].json("inbox", m.os()));
            assert!(
                json.contains(r#""property":"l2_memory","#)
                    && json.contains(&std::format!(r#""what":"{}""#, class.name())),
                "{json}"
            );
        }
    }
    // A saved register that is not the argument (R8, the guest frame): not the hook's call.
    let mut args = frame_of(&mut g, 0x180, ram, SLOT);
    args[2] += 1;
    assert_eq!(m.handle(code, args, &ctx, &g, &mut ring), Verdict::Rejected);
    assert_eq!(
        RejectReason::from_raw(events(&mut ring)[0].detail),
        Some(RejectReason::NotFromHook)
    );
    // A level no leaf has: refused, not guessed.
    for level in [0u32, 4] {
        g.write(SP + 0x2c, &level.to_le_bytes());
        let args = frame_of(&mut g, 0x180, ram, SLOT);
        assert_eq!(m.handle(code, args, &ctx, &g, &mut ring), Verdict::Rejected);
        assert_eq!(
            RejectReason::from_raw(events(&mut ring)[0].detail),
            Some(RejectReason::BadArgument)
        );
    }
}

/// KVM's memslot and vCPU hooks: a committed change is an event with the slot as it now is (the old
/// one for a deletion), a created vCPU one with its id and VM; the trampoline's saved registers must
/// be the arguments, the change one KVM has.
#[test]
fn kvm_memslot_changes_and_vcpu_creations_are_events() {
    let (mut g, cr3, _) = setup();
    const KVM: u64 = KERNEL + 0x1200;
    const OLD: u64 = KERNEL + 0x1800;
    const NEW: u64 = KERNEL + 0x1900;
    const VCPU: u64 = KERNEL + 0x1a00;
    const STACK: u64 = KERNEL + 0x3000;
    const RETURNS: [u64; 2] = [0xffff_ffff_8200_0363, 0xffff_ffff_8103_5967];
    const VCPU_RETURNS: [u64; 2] = [0xffff_ffff_8200_03b3, 0xffff_ffff_8103_78c4];
    const DESTROY_RETURNS: [u64; 2] = [0xffff_ffff_8200_0403, 0xffff_ffff_8103_3920];
    let slot = |g: &mut Guest, at: u64, base: u64, npages: u64, id: u16| {
        g.write(at + 0x60, &base.to_le_bytes());
        g.write(at + 0x68, &npages.to_le_bytes());
        g.write(at + 0x98, &0x7f00_0000_0000u64.to_le_bytes());
        g.write(at + 0xa0, &1u32.to_le_bytes()); // KVM_MEM_LOG_DIRTY_PAGES
        g.write(at + 0xa4, &id.to_le_bytes());
        g.write(at + 0xa6, &0u16.to_le_bytes());
    };
    slot(&mut g, OLD, 0x100, 0x10, 3);
    slot(&mut g, NEW, 0x200, 0x20, 3);
    g.write(VCPU, &KVM.to_le_bytes());
    g.write(VCPU + 0x30, &2u32.to_le_bytes());
    let (linux, ctx) = hooked_call(&mut g, cr3, 77, b"ihmi-l1-vmm", KVM, RETURNS);
    let set_frame = |g: &mut Guest, [_, old, new, change]: [u64; 4]| {
        for (i, w) in [(7, old), (8, new), (9, change)] {
            g.write(STACK + 8 * i, &w.to_le_bytes());
        }
    };
    let code = RequestCode::Memslot as u64;
    refused_without_the_hook(linux, code, [KVM, 0, NEW, 0], &ctx, &g);
    let vm = KvmVmHooks {
        memslot_returns: RETURNS,
        vcpu_returns: VCPU_RETURNS,
        vcpu_destroy_returns: DESTROY_RETURNS,
        slot_base_gfn: 0x60,
        slot_npages: 0x68,
        slot_userspace_addr: 0x98,
        slot_id: 0xa4,
        slot_as_id: 0xa6,
        slot_flags: 0xa0,
        vcpu_kvm: 0,
        vcpu_id: 0x30,
        vcpu_vmcs01: 0x80,
        vcpu_loaded_vmcs: 0xd0,
    };
    // The vCPU's VMCS, as KVM leaves it after creation: vmcs01 points at the region, loaded_vmcs
    // at vmcs01.
    const VMCS: u64 = KERNEL + 0x2000;
    g.write(VCPU + 0x80, &VMCS.to_le_bytes());
    g.write(VCPU + 0xd0, &(VCPU + 0x80).to_le_bytes());
    let hook = KvmHook {
        vm: Some(vm),
        ..exit_hook_only()
    };
    let mut m = Monitor::new(linux.with_kvm(hook), Policy::allow_all());
    let mut ring = EventRing::new();
    // Created (no old slot), moved, deleted (no new slot): the slot named is the live one. The
    // enum's upper 32 bits of RCX are not KVM's.
    for (args, base, npages, change) in [
        ([KVM, 0, NEW, 0], 0x200, 0x20, "create"),
        ([KVM, OLD, NEW, 0xdead_0000_0002], 0x200, 0x20, "move"),
        ([KVM, OLD, 0, 1], 0x100, 0x10, "delete"),
    ] {
        set_frame(&mut g, args);
        assert_eq!(m.handle(code, args, &ctx, &g, &mut ring), Verdict::Allow);
        let e = events(&mut ring);
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].kind(), e[0].nr, e[0].pid, e[0].args[..3].to_vec()),
            (
                Some(EventKind::Memslot),
                base,
                77,
                std::vec![KVM, npages, 0x7f00_0000_0000]
            )
        );
        let json = std::format!("{}", e[0].json("inbox", m.os()));
        assert!(
            json.contains(&std::format!(r#""change":"{change}","slot":3,"as_id":0,"#))
                && json.contains(r#""flags":1,"verdict":"allow""#),
            "{json}"
        );
    }
    // A saved register that is not the argument, or a change KVM has not: refused.
    let args = [KVM, 0, NEW, 0];
    set_frame(&mut g, [KVM, 0, NEW + 8, 0]);
    assert_eq!(m.handle(code, args, &ctx, &g, &mut ring), Verdict::Rejected);
    assert_eq!(
        RejectReason::from_raw(events(&mut ring)[0].detail),
        Some(RejectReason::NotFromHook)
    );
    let args = [KVM, 0, NEW, 7];
    set_frame(&mut g, args);
    assert_eq!(m.handle(code, args, &ctx, &g, &mut ring), Verdict::Rejected);
    assert_eq!(
        RejectReason::from_raw(events(&mut ring)[0].detail),
        Some(RejectReason::BadArgument)
    );
    // The vCPU: its id, VM and VMCS region read from it, and the vCPU kept for the registry, once.
    let (_, vctx) = hooked_call(&mut g, cr3, 77, b"ihmi-l1-vmm", VCPU, VCPU_RETURNS);
    let code = RequestCode::VcpuCreate as u64;
    assert_eq!(m.take_created_vcpu(), None);
    assert_eq!(
        m.handle(code, [VCPU, 0, 0, 0], &vctx, &g, &mut ring),
        Verdict::Allow
    );
    let region = VMCS - KERNEL + DATA_GPA;
    let e = events(&mut ring);
    assert_eq!(
        (e[0].kind(), e[0].nr, e[0].args),
        (Some(EventKind::VcpuCreate), 2, [VCPU, KVM, region, 0])
    );
    assert_eq!(m.take_created_vcpu(), Some([VCPU, region]));
    assert_eq!(m.take_created_vcpu(), None);
    let json = std::format!("{}", e[0].json("inbox", m.os()));
    assert!(
        json.contains(r#""event":"vcpu_create","#)
            && json.contains(&std::format!(r#""vmcs":{region},"#)),
        "{json}"
    );
    assert_eq!(
        m.handle(code, [VCPU, 1, 0, 0], &vctx, &g, &mut ring),
        Verdict::Rejected
    );
    // Destroyed: an event with its VMCS region, from the destroy hook's frame only (the creation
    // hook's returns are not its).
    let _ = events(&mut ring);
    let (_, dctx) = hooked_call(&mut g, cr3, 77, b"ihmi-l1-vmm", VCPU, DESTROY_RETURNS);
    let destroy = RequestCode::VcpuDestroy as u64;
    assert_eq!(
        m.handle(destroy, [VCPU, 0, 0, 0], &dctx, &g, &mut ring),
        Verdict::Allow
    );
    let e = events(&mut ring);
    assert_eq!(
        (e[0].kind(), e[0].nr, e[0].args),
        (Some(EventKind::VcpuDestroy), 2, [VCPU, KVM, region, 0])
    );
    let json = std::format!("{}", e[0].json("inbox", m.os()));
    assert!(json.contains(r#""event":"vcpu_destroy","#), "{json}");
    // The stack as the creation hook leaves it again.
    let (_, vctx) = hooked_call(&mut g, cr3, 77, b"ihmi-l1-vmm", VCPU, VCPU_RETURNS);
    assert_eq!(
        m.handle(destroy, [VCPU, 0, 0, 0], &vctx, &g, &mut ring),
        Verdict::Rejected
    );
    assert_eq!(
        RejectReason::from_raw(events(&mut ring)[0].detail),
        Some(RejectReason::NotFromHook)
    );
    // Not as KVM leaves a new vCPU (loaded_vmcs elsewhere, or a region not page-aligned):
    // refused, and nothing to register.
    for (at, value) in [(0xd0, VCPU + 0x90), (0x80, VMCS + 8)] {
        let saved = [(0x80, VMCS), (0xd0, VCPU + 0x80)];
        g.write(VCPU + at, &value.to_le_bytes());
        assert_eq!(
            m.handle(code, [VCPU, 0, 0, 0], &vctx, &g, &mut ring),
            Verdict::Rejected
        );
        assert_eq!(
            RejectReason::from_raw(events(&mut ring)[0].detail),
            Some(RejectReason::BadArgument)
        );
        assert_eq!(m.take_created_vcpu(), None);
        for (at, v) in saved {
            g.write(VCPU + at, &v.to_le_bytes());
        }
    }
}

/// A loader inside an allowed program brings code in without an exec: the calls that make memory
/// executable are flagged on their events (i386 numbers through the 32-bit entries).
#[test]
fn linux_calls_that_map_memory_executable_are_flagged() {
    let (mut g, cr3, _) = setup();
    const TASK: u64 = KERNEL + 0x2000;
    g.write(CURRENT, &TASK.to_le_bytes());
    g.write(TASK + 0x14, &30u32.to_le_bytes());
    g.write(TASK + 0x18, &TASK.to_le_bytes());
    g.write(TASK + 0x40, b"loader\0");
    let os = OsProfile::linux(Gva::new(CURRENT), 0x14, 0x18, 0x40, false, 0x60);
    let mut m = Monitor::new(os, Policy::allow_all());
    let mut ring = EventRing::new();
    let (x64, i386) = (RequestCode::Syscall, RequestCode::SyscallInt80);
    for (code, nr, prot, flagged) in [
        (x64, 10, 5, true),   // mprotect(PROT_READ | PROT_EXEC)
        (x64, 9, 7, true),    // mmap(RWX)
        (x64, 329, 4, true),  // pkey_mprotect
        (x64, 10, 3, false),  // mprotect(RW)
        (x64, 1, 4, false),   // write
        (i386, 125, 4, true), // mprotect
        (i386, 192, 5, true), // mmap2
        (i386, 10, 4, false), // unlink
    ] {
        let v = call(
            &mut m,
            &g,
            cr3,
            &mut ring,
            code as u64,
            [nr, 0x1000, 0x1000, prot],
        );
        assert_eq!(v, Verdict::Allow);
        let e = events(&mut ring);
        assert_eq!(
            e[0].detail & event::SYSCALL_EXEC_MAPPING != 0,
            flagged,
            "{code:?} {nr}"
        );
        assert!(e[0].syscall_entry().is_some());
        let json = std::format!("{}", e[0].json("inbox", m.os()));
        assert_eq!(json.contains(r#""exec_mapping":true"#), flagged, "{json}");
    }
}

/// A Linux kernel's two linear mappings in a 4 MiB guest: its image at `IMAGE` (frames from
/// `IMAGE_GPA`, with `page_offset_base` and `current_task` in it) and its direct map at `DIRECT`.
const IMAGE: u64 = 0xffff_ffff_8100_0000;
const IMAGE_GPA: u64 = 0x10_0000;
const IMAGE_LEN: u64 = 4 * PAGE_SIZE;
const DIRECT: u64 = 0xffff_8880_0000_0000;
const RAM_TOP: u64 = 0x40_0000;
const POB: u64 = IMAGE + 0x800;
const TASK_GPA: u64 = 0x20_0000;

fn linear_guest(direct_gpa: u64) -> (Guest, Cr3, LinearHints) {
    let mut g = Guest::default();
    for page in 0..RAM_TOP / PAGE_SIZE {
        g.data.insert(page * PAGE_SIZE, Box::new([0; 4096]));
    }
    let mut pt = PageTableBuilder::new(&mut g).unwrap();
    let f = MapFlags::WRITABLE;
    pt.map(&mut g, Gva::new(IMAGE), Gpa::new(IMAGE_GPA), IMAGE_LEN, f)
        .unwrap();
    // Past the image, the tables map another frame: a read across its end must walk.
    pt.map(
        &mut g,
        Gva::new(IMAGE + IMAGE_LEN),
        Gpa::new(0x30_0000),
        PAGE_SIZE,
        f,
    )
    .unwrap();
    pt.map(&mut g, Gva::new(DIRECT), Gpa::new(direct_gpa), RAM_TOP, f)
        .unwrap();
    let cr3 = pt.cr3();
    let put = |g: &mut Guest, gpa: u64, bytes: &[u8]| {
        for (i, &b) in bytes.iter().enumerate() {
            let a = gpa + i as u64;
            g.data.get_mut(&(a & !0xfff)).unwrap()[(a & 0xfff) as usize] = b;
        }
    };
    put(&mut g, IMAGE_GPA + 0x800, &DIRECT.to_le_bytes());
    put(&mut g, IMAGE_GPA, &(DIRECT + TASK_GPA).to_le_bytes());
    put(&mut g, TASK_GPA + 0x14, &77u32.to_le_bytes());
    put(&mut g, TASK_GPA + 0x40, b"linear\0");
    put(
        &mut g,
        TASK_GPA + 0x18,
        &(DIRECT + TASK_GPA + 0x400).to_le_bytes(),
    );
    put(&mut g, TASK_GPA + 0x400 + 0x14, &1u32.to_le_bytes());
    put(&mut g, IMAGE_GPA + IMAGE_LEN - 4, &[1, 2, 3, 4]);
    put(&mut g, 0x30_0000, &[5, 6, 7, 8]);
    let hints = LinearHints {
        page_offset_base: Gva::new(POB),
        image: [IMAGE, IMAGE + IMAGE_LEN],
        ram_top: RAM_TOP,
    };
    (g, cr3, hints)
}

#[test]
fn linear_windows_are_read_without_a_walk_once_the_guest_s_tables_confirm_them() {
    let (mut g, cr3, hints) = linear_guest(0);
    let os = OsProfile::linux(Gva::new(IMAGE), 0x14, 0x18, 0x40, false, 0x60).with_linear(hints);
    let mut m = Monitor::new(os, Policy::allow_all());
    let mut ring = EventRing::new();
    assert!(!m.linear_windows().checked);
    let ctx = CallContext {
        cr3,
        tsc: 1,
        percpu_base: 0,
        entry: Entry::SyscallGate,
        caller_rsp: 0,
    };
    let syscall = |m: &mut Monitor, g: &Guest, ring: &mut EventRing| {
        let v = m.handle(RequestCode::Syscall as u64, [39, 0, 0, 0], &ctx, g, ring);
        assert_eq!(v, Verdict::Allow);
        events(ring)[0]
    };
    let e = syscall(&mut m, &g, &mut ring);
    assert_eq!(e.pid, 77);
    assert_eq!(event::comm_bytes(&e.comm), b"linear");
    let w = *m.linear_windows();
    assert!(w.checked);
    assert_eq!(w.held(), [true, true]);
    assert_eq!(
        w.windows,
        [
            LinearWindow {
                start: DIRECT,
                len: RAM_TOP,
                gpa: 0
            },
            LinearWindow {
                start: IMAGE,
                len: IMAGE_LEN,
                gpa: IMAGE_GPA
            }
        ]
    );

    g.data.remove(&0x8000);
    // The kernel remaps the task's 2 MiB of its direct map to frame 0 after the check: the monitor
    // still reads the frame the direct map names, where the allocator put the task.
    let leaf = g
        .tables
        .values_mut()
        .flat_map(|t| t.entries.iter_mut())
        .find(|e| e.is_present() && e.is_huge() && e.addr().raw() == TASK_GPA)
        .unwrap();
    *leaf = ihmi_paging::PageTableEntry::new(Gpa::new(0), leaf.flags());
    let intro = Introspector::new(&g, cr3).with_linear(&w);
    let walked = Introspector::new(&g, cr3);
    let task_tgid = Gva::new(DIRECT + TASK_GPA + 0x14);
    assert_eq!(intro.read_u32(task_tgid), Ok(77));
    assert_eq!(walked.read_u32(task_tgid), Ok(0));
    // Across the image window's end: the part past it comes through the walk, as without windows.
    let at = Gva::new(IMAGE + IMAGE_LEN - 4);
    assert_eq!(intro.read_u64(at), walked.read_u64(at));
    assert_eq!(intro.read_u64(at), Ok(0x0807_0605_0403_0201));
    // Outside guest RAM the direct map reads nothing, as the walk would not.
    let hole = Gva::new(DIRECT + 0x8000);
    assert!(intro.read_u64(hole).is_err());
    assert!(walked.read_u64(hole).is_err());
    // Past RAM's top no window holds, and the walk finds nothing mapped there.
    assert!(intro.read_u64(Gva::new(DIRECT + RAM_TOP)).is_err());

    // A direct map the tables do not confirm (here shifted by a page) is not used; the image's is.
    let (g, cr3, hints) = linear_guest(PAGE_SIZE);
    let w = LinearWindows::check(&Introspector::new(&g, cr3), &hints);
    assert_eq!(w.held(), [false, true]);
    let intro = Introspector::new(&g, cr3).with_linear(&w);
    let at = Gva::new(DIRECT + TASK_GPA - PAGE_SIZE + 0x14);
    assert_eq!(intro.read_u32(at), Ok(77), "read where the tables say");
    // An image whose start is not a page is refused.
    let bad = LinearHints {
        image: [IMAGE + 1, IMAGE + IMAGE_LEN],
        ..hints
    };
    assert_eq!(
        LinearWindows::check(&Introspector::new(&g, cr3), &bad).held(),
        [false, false]
    );
    // Without hints (out of the box) nothing is checked and every read walks.
    let os = OsProfile::linux(Gva::new(IMAGE), 0x14, 0x18, 0x40, false, 0x60);
    let mut m = Monitor::new(os, Policy::allow_all());
    m.handle(
        RequestCode::Syscall as u64,
        [39, 0, 0, 0],
        &ctx,
        &g,
        &mut ring,
    );
    assert_eq!(*m.linear_windows(), LinearWindows::NONE);
}

#[test]
fn ram_granules_hold_only_reads_inside_one_granule_that_is_all_ram() {
    use crate::RamGranules;
    const G: u64 = 64 << 10;
    // The tiny Linux guest's RAM under L0 (256 MiB, the monitor's frames at 0xf800000 carved out).
    let ram = [
        (0, 0x9f000),
        (0x10_0000, 0x42_9000),
        (0xb9_f000, 0x400_0000),
        (0x40c_b000, 0xf80_0000),
    ];
    let mut g = RamGranules::EMPTY;
    assert!(
        !g.holds(Gpa::new(0x100_0000), 8),
        "an empty bitmap holds nothing"
    );
    g.fill(ram.iter().copied());
    // Whole granules inside one range.
    assert!(g.holds(Gpa::new(0x100_0000), 8));
    assert!(
        g.holds(Gpa::new(0xf7f_fff8), 8),
        "the last bytes before the monitor"
    );
    assert!(g.holds(Gpa::new(0x100_0000), G), "a whole granule");
    assert!(g.holds(Gpa::new(0), 8), "the first granule is RAM whole");
    assert!(
        g.holds(Gpa::new(0x40d_0000), 8),
        "the first whole granule of a range"
    );
    // Granules RAM fills in part: the hole at 0x9f000, the first pages of a range that starts
    // inside one, the monitor's frames and what is not RAM at all.
    for gpa in [
        0x9_0000, 0x9f_000, 0x42_8000, 0x40c_b000, 0x40c_f000, 0xf80_0000, 0xf80_1000, 0x400_0000,
    ] {
        assert!(!g.holds(Gpa::new(gpa), 8), "{gpa:#x}");
    }
    // A read that crosses into the next granule, even RAM to RAM, is not held.
    assert!(!g.holds(Gpa::new(0x100_fffc), 8));
    assert!(!g.holds(Gpa::new(0x100_0000), G + 1));
    // No bytes, a length that wraps, an address past what the bitmap covers.
    assert!(!g.holds(Gpa::new(0x100_0000), 0));
    assert!(!g.holds(Gpa::new(0x100_0000), u64::MAX));
    let mut all = RamGranules::EMPTY;
    all.fill([(0, u64::MAX)].into_iter());
    assert!(all.holds(Gpa::new(RamGranules::COVERS - 8), 8));
    assert!(!all.holds(Gpa::new(RamGranules::COVERS), 8));
    assert!(!all.holds(Gpa::new(u64::MAX - 3), 8));
}

#[test]
fn each_u64_hands_on_the_same_words_in_a_window_and_through_the_walk_and_none_if_any_is_unreadable()
{
    use crate::introspect::EACH_U64_MAX;
    let (mut g, cr3, hints) = linear_guest(0);
    // A hole in RAM at 0x8000.
    g.data.remove(&0x8000);
    let w = LinearWindows::check(&Introspector::new(&g, cr3), &hints);
    assert_eq!(w.held(), [true, true]);
    let intro = Introspector::new(&g, cr3).with_linear(&w);
    let walked = Introspector::new(&g, cr3);
    let words = |i: &Introspector<'_, Guest>, at: u64, n: usize| {
        let mut seen = Vec::new();
        i.each_u64(Gva::new(at), n, |k, v| seen.push((k, v)))
            .map(|()| seen)
    };
    // The task's first words, through the direct map and through the walk.
    let at = DIRECT + TASK_GPA + 0x10;
    let direct = words(&intro, at, 8).unwrap();
    assert_eq!(direct, words(&walked, at, 8).unwrap());
    assert_eq!(direct.len(), 8);
    assert_eq!(direct[0], (0, 77 << 32), "tgid at +0x14");
    assert_eq!(
        direct[1],
        (1, DIRECT + TASK_GPA + 0x400),
        "the parent at +0x18"
    );
    assert_eq!(
        direct[6],
        (6, u64::from_le_bytes(*b"linear\0\0")),
        "the name at +0x40"
    );
    // Across the image window's end the walk reads the part past it.
    let at = IMAGE + IMAGE_LEN - 8;
    assert_eq!(
        words(&intro, at, 2).unwrap(),
        std::vec![(0, 0x0403_0201 << 32), (1, 0x0807_0605)]
    );
    assert_eq!(words(&intro, at, 2), words(&walked, at, 2));
    // A range that reaches a hole in RAM: an error, and no word handed on first.
    let mut called = false;
    let hole = DIRECT + 0x8000 - 16;
    assert!(intro
        .each_u64(Gva::new(hole), 4, |_, _| called = true)
        .is_err());
    assert!(walked
        .each_u64(Gva::new(hole), 4, |_, _| called = true)
        .is_err());
    assert!(!called);
    // More words than the monitor ever holds at once.
    assert_eq!(
        intro.each_u64(Gva::new(DIRECT + TASK_GPA), EACH_U64_MAX + 1, |_, _| {}),
        Err(IntrospectError::TooLong((EACH_U64_MAX + 1) * 8))
    );
    assert_eq!(words(&intro, DIRECT + TASK_GPA, 0), Ok(Vec::new()));
}
