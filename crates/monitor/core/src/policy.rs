//! The process-creation policy, two allow-lists, each allowing everything while empty (monitoring
//! without enforcement):
//! - process names, as the seed paper's process-creation monitor enforced, for the test guest, whose
//!   processes are not files;
//! - program identities, for Linux: the SHA-256 of the file the kernel is about to run
//!   ([`crate::identity`]). A name is not an identity (a copy of a refused program under an allowed
//!   name would pass), so Linux programs are judged by content only, and a program whose content the
//!   monitor cannot read is refused while the list enforces.

use ihmi_abi::guest_os::COMM_LEN;
use ihmi_abi::monitor::Verdict;

use crate::event::comm_bytes;
use crate::identity::{IdentityError, Sha256Digest};

/// Most names an allow-list holds, and most identities.
pub const MAX_NAMES: usize = ihmi_abi::monitor::MAX_ALLOWED;

/// Why a name could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyError {
    /// The list already holds [`MAX_NAMES`].
    Full,
    /// Empty, longer than [`COMM_LEN`], or containing a NUL.
    BadName,
}

/// The allow-lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    names: [[u8; COMM_LEN]; MAX_NAMES],
    count: usize,
    digests: [Sha256Digest; MAX_NAMES],
    digest_count: usize,
}

impl Policy {
    /// No list: every creation is allowed.
    #[must_use]
    pub const fn allow_all() -> Self {
        Self {
            names: [[0; COMM_LEN]; MAX_NAMES],
            count: 0,
            digests: [[0; 32]; MAX_NAMES],
            digest_count: 0,
        }
    }

    /// Adds a program identity; from then on only listed programs may run.
    pub fn allow_digest(&mut self, digest: Sha256Digest) -> Result<(), PolicyError> {
        let slot = self
            .digests
            .get_mut(self.digest_count)
            .ok_or(PolicyError::Full)?;
        *slot = digest;
        self.digest_count += 1;
        Ok(())
    }

    /// The verdict on running the program whose content has `digest` (or could not be hashed, for
    /// the reason given: refused while the list enforces).
    #[must_use]
    pub fn check_identity(&self, digest: Result<&Sha256Digest, IdentityError>) -> Verdict {
        if self.digest_count == 0 {
            return Verdict::Allow;
        }
        match digest {
            Ok(d) if self.digests[..self.digest_count].contains(d) => Verdict::Allow,
            _ => Verdict::Deny,
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

    /// Whether the name list enforces.
    #[must_use]
    pub const fn is_enforcing(&self) -> bool {
        self.count > 0
    }

    /// The verdict on creating a process named `comm` (compared up to its first NUL).
    #[must_use]
    pub fn check_create(&self, comm: &[u8; COMM_LEN]) -> Verdict {
        self.check_name(comm_bytes(comm))
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
    fn programs_are_judged_by_identity_and_an_unhashed_one_is_refused() {
        let mut p = Policy::allow_all();
        assert_eq!(p.check_identity(Ok(&[7; 32])), Verdict::Allow);
        assert_eq!(
            p.check_identity(Err(IdentityError::NotResident)),
            Verdict::Allow,
            "no list: nothing enforced"
        );
        p.allow_digest([1; 32]).unwrap();
        p.allow_digest([2; 32]).unwrap();
        assert_eq!(p.check_identity(Ok(&[1; 32])), Verdict::Allow);
        assert_eq!(p.check_identity(Ok(&[2; 32])), Verdict::Allow);
        let mut near = [1u8; 32];
        near[31] = 0;
        assert_eq!(p.check_identity(Ok(&near)), Verdict::Deny);
        assert_eq!(
            p.check_identity(Err(IdentityError::NotResident)),
            Verdict::Deny
        );
        // Names do not enter into it, and the lists fill separately.
        p.allow(b"intruder").unwrap();
        assert_eq!(p.check_identity(Ok(&[9; 32])), Verdict::Deny);
        for i in 2..MAX_NAMES {
            p.allow_digest([i as u8 + 10; 32]).unwrap();
        }
        assert_eq!(p.allow_digest([0; 32]), Err(PolicyError::Full));
    }
}
