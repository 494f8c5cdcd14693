#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]

use core::fmt;

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_LEN: usize = 12;

/// BTF kinds used here (btf.h, BTF_KIND_*).
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;
const KIND_MAX: u32 = 19;

/// How deep anonymous structs and unions may nest inside one another (a Linux 6.1 `task_struct`
/// nests three); BTF that nests deeper, or puts a struct inside itself, is refused.
const MAX_ANONYMOUS_DEPTH: u32 = 16;

/// Why BTF could not be read, or a member not found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BtfError {
    /// Too short for what its header or a record says.
    Truncated,
    /// Not BTF (magic), or a version this reader does not know.
    BadHeader,
    /// A type record of an unknown kind, at this type id.
    UnknownKind(u32),
    /// A name offset outside the string section.
    BadString,
    /// No struct of that name.
    NoStruct,
    /// The struct has no member of that name.
    NoMember,
    /// The member is a bitfield, which has no byte offset.
    Bitfield,
    /// Anonymous members, or a type's typedefs and arrays, nest deeper than any kernel's (or contain
    /// themselves), or a size does not fit 64 bits.
    TooDeep,
}

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("BTF data is truncated"),
            Self::BadHeader => f.write_str("not BTF (bad magic or version)"),
            Self::UnknownKind(id) => write!(f, "BTF type {id} has an unknown kind"),
            Self::BadString => f.write_str("BTF name offset outside the string section"),
            Self::NoStruct => f.write_str("no such struct in BTF"),
            Self::NoMember => f.write_str("no such member in the struct"),
            Self::Bitfield => f.write_str("the member is a bitfield"),
            Self::TooDeep => {
                f.write_str("types nest too deep (or contain themselves), or a size overflows")
            }
        }
    }
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, BtfError> {
    let s = b.get(off..off + 2).ok_or(BtfError::Truncated)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    let s = b.get(off..off + 4).ok_or(BtfError::Truncated)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// A member found in a struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Byte offset from the start of the struct (through any anonymous members).
    pub offset: u64,
    /// Size in bytes of the member's type.
    pub size: u64,
}

/// Parsed BTF: the type and string sections, and where each type record starts.
#[derive(Debug)]
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    count: u32,
}

impl<'a> Btf<'a> {
    /// Checks the header and walks every type record once.
    pub fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        if u16_at(data, 0)? != MAGIC || data.get(2) != Some(&1) {
            return Err(BtfError::BadHeader);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        if hdr_len < HEADER_LEN {
            return Err(BtfError::BadHeader);
        }
        let section = |off: usize, len: usize| -> Result<&'a [u8], BtfError> {
            let start = hdr_len
                .checked_add(u32_at(data, off)? as usize)
                .ok_or(BtfError::Truncated)?;
            let len = u32_at(data, len)? as usize;
            data.get(start..start.checked_add(len).ok_or(BtfError::Truncated)?)
                .ok_or(BtfError::Truncated)
        };
        let types = section(8, 12)?;
        let strings = section(16, 20)?;
        let mut btf = Self {
            types,
            strings,
            count: 0,
        };
        let mut at = 0;
        while at < types.len() {
            at = btf.next_record(at, btf.count + 1)?;
            btf.count += 1;
        }
        Ok(btf)
    }

    /// Where the record after the one at `at` (type `id`) starts.
    fn next_record(&self, at: usize, id: u32) -> Result<usize, BtfError> {
        let info = u32_at(self.types, at + 4)?;
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let extra = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC => vlen * 12,
            KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
            KIND_ENUM64 => vlen * 12,
            k if k <= KIND_MAX => 0,
            _ => return Err(BtfError::UnknownKind(id)),
        };
        let next = at + TYPE_LEN + extra;
        if next > self.types.len() {
            return Err(BtfError::Truncated);
        }
        Ok(next)
    }

    /// Number of types (ids 1..=count; 0 is void).
    #[must_use]
    pub const fn count(&self) -> u32 {
        self.count
    }

    fn name(&self, off: u32) -> Result<&'a [u8], BtfError> {
        let rest = self
            .strings
            .get(off as usize..)
            .ok_or(BtfError::BadString)?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(BtfError::BadString)?;
        Ok(&rest[..end])
    }

    /// The record of type `id`: (byte position, kind, vlen, kind_flag, size_or_type, name_off).
    fn record(&self, id: u32) -> Result<(usize, u32, usize, bool, u32, u32), BtfError> {
        if id == 0 || id > self.count {
            return Err(BtfError::Truncated);
        }
        let mut at = 0;
        for i in 1..id {
            at = self.next_record(at, i)?;
        }
        let info = u32_at(self.types, at + 4)?;
        Ok((
            at,
            (info >> 24) & 0x1f,
            (info & 0xffff) as usize,
            info >> 31 == 1,
            u32_at(self.types, at + 8)?,
            u32_at(self.types, at)?,
        ))
    }

    /// The size in bytes of type `id`, through typedefs, qualifiers and (nested) arrays; a chain
    /// longer than any real type's, or one that loops, is refused.
    fn size_of(&self, id: u32) -> Result<u64, BtfError> {
        let mut id = id;
        let mut count: u64 = 1;
        for _ in 0..32 {
            let (at, kind, _, _, size_or_type, _) = self.record(id)?;
            let size = match kind {
                KIND_PTR => 8,
                KIND_ARRAY => {
                    let n = u32_at(self.types, at + TYPE_LEN + 8)?;
                    count = count.checked_mul(u64::from(n)).ok_or(BtfError::TooDeep)?;
                    id = u32_at(self.types, at + TYPE_LEN)?;
                    continue;
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = size_or_type;
                    continue;
                }
                _ => u64::from(size_or_type),
            };
            return count.checked_mul(size).ok_or(BtfError::TooDeep);
        }
        Err(BtfError::TooDeep)
    }

    /// The struct (not union) named `name`, with members.
    fn find_struct(&self, name: &str) -> Result<u32, BtfError> {
        let mut at = 0;
        for id in 1..=self.count {
            let info = u32_at(self.types, at + 4)?;
            let kind = (info >> 24) & 0x1f;
            if kind == KIND_STRUCT && self.name(u32_at(self.types, at)?)? == name.as_bytes() {
                return Ok(id);
            }
            at = self.next_record(at, id)?;
        }
        Err(BtfError::NoStruct)
    }

    /// The size of struct `name` in bytes.
    pub fn struct_size(&self, name: &str) -> Result<u64, BtfError> {
        self.size_of(self.find_struct(name)?)
    }

    /// `member` of struct `name`: its byte offset and size, found through anonymous members.
    pub fn member(&self, name: &str, member: &str) -> Result<Member, BtfError> {
        let id = self.find_struct(name)?;
        self.member_in(id, member.as_bytes(), 0, 0)?
            .ok_or(BtfError::NoMember)
    }

    /// `member` in struct or union `id` at `base_bits`, through anonymous members `depth` levels down
    /// so far.
    fn member_in(
        &self,
        id: u32,
        member: &[u8],
        base_bits: u64,
        depth: u32,
    ) -> Result<Option<Member>, BtfError> {
        if depth > MAX_ANONYMOUS_DEPTH {
            return Err(BtfError::TooDeep);
        }
        let (at, _, vlen, kflag, _, _) = self.record(id)?;
        for i in 0..vlen {
            let m = at + TYPE_LEN + i * 12;
            let name = self.name(u32_at(self.types, m)?)?;
            let ty = u32_at(self.types, m + 4)?;
            let raw = u32_at(self.types, m + 8)?;
            let (bits, bitfield) = if kflag {
                (u64::from(raw & 0x00ff_ffff), raw >> 24 != 0)
            } else {
                (u64::from(raw), false)
            };
            let at_bits = base_bits.checked_add(bits).ok_or(BtfError::TooDeep)?;
            if name == member {
                if bitfield || !at_bits.is_multiple_of(8) {
                    return Err(BtfError::Bitfield);
                }
                return Ok(Some(Member {
                    offset: at_bits / 8,
                    size: self.size_of(ty)?,
                }));
            }
            if name.is_empty() {
                let inner = self.resolve(ty)?;
                let (_, kind, ..) = self.record(inner)?;
                if matches!(kind, KIND_STRUCT | KIND_UNION) {
                    if let Some(found) = self.member_in(inner, member, at_bits, depth + 1)? {
                        return Ok(Some(found));
                    }
                }
            }
        }
        Ok(None)
    }

    /// `id` through typedefs and qualifiers.
    fn resolve(&self, id: u32) -> Result<u32, BtfError> {
        let mut id = id;
        for _ in 0..32 {
            let (_, kind, _, _, size_or_type, _) = self.record(id)?;
            match kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = size_or_type;
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::Truncated)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// Builds BTF by hand: strings, then types as (name, info, size_or_type, extra words).
    struct Builder {
        strings: Vec<u8>,
        types: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                strings: std::vec![0],
                types: Vec::new(),
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn t(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, st: u32, extra: &[u32]) {
            let n = self.s(name);
            let info = (kind << 24) | vlen | (u32::from(kflag) << 31);
            for w in [n, info, st].iter().chain(extra) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }
        fn finish(self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            let words = [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ];
            for w in words {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// 1 int (4 bytes), 2 char (1), 3 char[16], 4 task_struct, 5 pointer to 4, 6 anonymous struct,
    /// 7 typedef pid_t = int.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        b.t("int", KIND_INT, 0, false, 4, &[32]);
        b.t("char", KIND_INT, 0, false, 1, &[8]);
        b.t("", KIND_ARRAY, 0, false, 0, &[2, 1, 16]);
        // task_struct: state at 0, an anonymous struct at 64 bytes holding pid (+0) and tgid (+4),
        // comm at 96, real_parent at 128, a bitfield `flags` at bit 1056.
        let state = b.s("state");
        let pid = b.s("pid");
        let tgid = b.s("tgid");
        let comm = b.s("comm");
        let parent = b.s("real_parent");
        let flags = b.s("flags");
        b.t(
            "task_struct",
            KIND_STRUCT,
            5,
            true,
            200,
            &[
                state,
                1,
                0,
                0,
                6,
                64 * 8,
                comm,
                3,
                96 * 8,
                parent,
                5,
                128 * 8,
                flags,
                1,
                (1 << 24) | 1056,
            ],
        );
        b.t("", KIND_PTR, 0, false, 4, &[]);
        b.t("", KIND_STRUCT, 2, false, 8, &[pid, 7, 0, tgid, 7, 32]);
        b.t("pid_t", KIND_TYPEDEF, 0, false, 1, &[]);
        b.finish()
    }

    #[test]
    fn members_through_anonymous_structs_and_typedefs() {
        let data = sample();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.count(), 7);
        assert_eq!(
            btf.member("task_struct", "state").unwrap(),
            Member { offset: 0, size: 4 }
        );
        assert_eq!(
            btf.member("task_struct", "pid").unwrap(),
            Member {
                offset: 64,
                size: 4
            }
        );
        assert_eq!(
            btf.member("task_struct", "tgid").unwrap(),
            Member {
                offset: 68,
                size: 4
            }
        );
        assert_eq!(
            btf.member("task_struct", "comm").unwrap(),
            Member {
                offset: 96,
                size: 16
            }
        );
        assert_eq!(
            btf.member("task_struct", "real_parent").unwrap(),
            Member {
                offset: 128,
                size: 8
            }
        );
        assert_eq!(btf.member("task_struct", "flags"), Err(BtfError::Bitfield));
        assert_eq!(btf.member("task_struct", "nope"), Err(BtfError::NoMember));
        assert_eq!(btf.member("mm_struct", "pgd"), Err(BtfError::NoStruct));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let data = sample();
        assert_eq!(Btf::parse(&data[..10]).unwrap_err(), BtfError::Truncated);
        let mut bad = data.clone();
        bad[0] = 0;
        assert_eq!(Btf::parse(&bad).unwrap_err(), BtfError::BadHeader);
        let mut cut = data.clone();
        cut.truncate(data.len() - 30);
        assert!(Btf::parse(&cut).is_err());
        // An unknown kind in the first record.
        let mut odd = data;
        odd[24 + 7] = 30;
        assert_eq!(Btf::parse(&odd).unwrap_err(), BtfError::UnknownKind(1));
    }

    #[test]
    fn a_struct_inside_itself_is_refused_not_followed_forever() {
        // Found by the btf_parse fuzz target: an anonymous member whose type is the struct it is in.
        let mut b = Builder::new();
        b.t("int", KIND_INT, 0, false, 4, &[32]);
        // 2: struct loop { int x; struct loop /* anonymous */; }
        b.t("loop", KIND_STRUCT, 2, false, 8, &[]);
        let x = b.s("x");
        for w in [x, 1, 0, 0, 2, 32] {
            b.types.extend_from_slice(&w.to_le_bytes());
        }
        // 3: an array of itself, and 4: a struct with a member of that type.
        b.t("", KIND_ARRAY, 0, false, 0, &[3, 1, 2]);
        b.t("arr", KIND_STRUCT, 1, false, 8, &[]);
        let a = b.s("a");
        for w in [a, 3, 0] {
            b.types.extend_from_slice(&w.to_le_bytes());
        }
        let data = b.finish();
        let btf = Btf::parse(&data).unwrap();
        assert_eq!(btf.member("loop", "x").unwrap().offset, 0);
        assert_eq!(btf.member("loop", "y"), Err(BtfError::TooDeep));
        assert_eq!(
            btf.member("arr", "a"),
            Err(BtfError::TooDeep),
            "an array of itself"
        );
    }
}
