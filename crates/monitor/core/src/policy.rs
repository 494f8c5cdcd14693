//! The process-creation policy: an allow-list of process names, as the seed paper's process-creation
//! monitor enforced. An empty list allows everything (monitoring without enforcement).
//!
//! For Linux the name is the program's: the last component of the path `execve` was given, the name
//! the kernel gives the process once it runs it. A name is not an identity: a copy of a refused
//! program under an allowed name passes. The list keeps honest programs honest and makes an unlisted
//! one visible and refused; it is not a code-signing policy.

use ihmi_abi::guest_os::COMM_LEN;
use ihmi_abi::monitor::Verdict;

use crate::event::comm_bytes;

/// Most names an allow-list holds.
pub const MAX_NAMES: usize = ihmi_abi::monitor::MAX_ALLOWED;

/// Why a name could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyError {
    /// The list already holds [`MAX_NAMES`].
    Full,
    /// Empty, longer than [`COMM_LEN`], or containing a NUL.
    BadName,
}

/// The allow-list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    names: [[u8; COMM_LEN]; MAX_NAMES],
    count: usize,
}

impl Policy {
    /// No list: every creation is allowed.
    #[must_use]
    pub const fn allow_all() -> Self {
        Self {
            names: [[0; COMM_LEN]; MAX_NAMES],
            count: 0,
        }
    }

    /// Adds `name` to the list; from then on only listed names may be created.
    pub fn allow(&mut self, name: &[u8]) -> Result<(), PolicyError> {
        if name.is_empty() || name.len() > COMM_LEN || name.contains(&0) {
            return Err(PolicyError::BadName);
        }
        let slot = self.names.get_mut(self.count).ok_or(PolicyError::Full)?;
        slot.fill(0);
        slot[..name.len()].copy_from_slice(name);
        self.count += 1;
        Ok(())
    }

    /// Whether the policy enforces a list.
    #[must_use]
    pub const fn is_enforcing(&self) -> bool {
        self.count > 0
    }

    /// The verdict on creating a process named `comm` (compared up to its first NUL).
    #[must_use]
    pub fn check_create(&self, comm: &[u8; COMM_LEN]) -> Verdict {
        self.check_name(comm_bytes(comm))
    }

    /// The verdict on running the program at `path`: its last component is the name checked, whole
    /// (a name longer than any listed one is never allowed).
    #[must_use]
    pub fn check_program(&self, path: &[u8]) -> Verdict {
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
        self.check_name(name)
    }

    fn check_name(&self, name: &[u8]) -> Verdict {
        if !self.is_enforcing() {
            return Verdict::Allow;
        }
        if self.names[..self.count]
            .iter()
            .any(|n| comm_bytes(n) == name)
        {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm(s: &[u8]) -> [u8; COMM_LEN] {
        let mut c = [0u8; COMM_LEN];
        c[..s.len()].copy_from_slice(s);
        c
    }

    #[test]
    fn allow_list_matches_whole_names_only() {
        let mut p = Policy::allow_all();
        assert_eq!(p.check_create(&comm(b"anything")), Verdict::Allow);
        p.allow(b"init").unwrap();
        p.allow(b"worker").unwrap();
        assert_eq!(p.check_create(&comm(b"init")), Verdict::Allow);
        assert_eq!(p.check_create(&comm(b"worker")), Verdict::Allow);
        assert_eq!(p.check_create(&comm(b"intruder")), Verdict::Deny);
        assert_eq!(p.check_create(&comm(b"ini")), Verdict::Deny, "prefix");
        assert_eq!(p.check_create(&comm(b"init2")), Verdict::Deny, "longer");
        assert_eq!(p.check_create(&comm(b"")), Verdict::Deny, "empty name");
    }

    #[test]
    fn bad_names_and_a_full_list_are_refused() {
        let mut p = Policy::allow_all();
        assert_eq!(p.allow(b""), Err(PolicyError::BadName));
        assert_eq!(p.allow(b"a\0b"), Err(PolicyError::BadName));
        assert_eq!(p.allow(&[b'x'; COMM_LEN + 1]), Err(PolicyError::BadName));
        for i in 0..MAX_NAMES {
            p.allow(&[b'a' + i as u8]).unwrap();
        }
        assert_eq!(p.allow(b"z"), Err(PolicyError::Full));
    }

    #[test]
    fn programs_are_judged_by_their_last_path_component() {
        let mut p = Policy::allow_all();
        assert_eq!(p.check_program(b"/tmp/anything"), Verdict::Allow);
        p.allow(b"ls").unwrap();
        p.allow(b"ihmi-workload").unwrap();
        assert_eq!(p.check_program(b"/bin/ls"), Verdict::Allow);
        assert_eq!(p.check_program(b"ls"), Verdict::Allow);
        assert_eq!(p.check_program(b"./ls"), Verdict::Allow);
        assert_eq!(p.check_program(b"/bin/ihmi-workload"), Verdict::Allow);
        assert_eq!(
            p.check_program(b"/bin/ls/"),
            Verdict::Deny,
            "empty last part"
        );
        assert_eq!(p.check_program(b"/ls/intruder"), Verdict::Deny);
        assert_eq!(p.check_program(b"/bin/lsx"), Verdict::Deny);
        // Longer than a process name: compared whole, never cut to fit.
        assert_eq!(
            p.check_program(b"/bin/ihmi-workload-but-longer"),
            Verdict::Deny
        );
    }
}
