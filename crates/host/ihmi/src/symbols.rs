//! Kernel symbols from the guest's own `System.map`: never hand-typed addresses. A failure report turns
//! every guest `rip=0x…` into `symbol+offset`, and the monitors ask for the symbols they hook by name.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A parsed System.map: (address, name) of every text symbol, sorted by address.
#[derive(Debug, Clone)]
pub struct SystemMap {
    path: PathBuf,
    text: Vec<(u64, String)>,
    all: Vec<(u64, String)>,
}

/// `name+0xoff` for an address inside a known function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<'a> {
    pub name: &'a str,
    pub offset: u64,
}

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}", self.name, self.offset)
    }
}

impl SystemMap {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let mut all = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let mut f = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
                bail!(
                    "{}:{}: not a System.map line: {line}",
                    path.display(),
                    i + 1
                );
            };
            let addr = u64::from_str_radix(addr, 16)
                .with_context(|| format!("{}:{}: bad address {addr}", path.display(), i + 1))?;
            all.push((addr, kind.to_string(), name.to_string()));
        }
        all.sort_by_key(|(a, _, _)| *a);
        let text = all
            .iter()
            .filter(|(_, k, _)| matches!(k.as_str(), "T" | "t" | "W" | "w"))
            .map(|(a, _, n)| (*a, n.clone()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            text,
            all: all.into_iter().map(|(a, _, n)| (a, n)).collect(),
        })
    }

    /// The address of `name`, if the kernel has it.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.all.iter().find(|(_, n)| n == name).map(|(a, _)| *a)
    }

    /// The address of `name`, or an error that names the symbol and the kernel.
    pub fn require(&self, name: &str) -> Result<u64> {
        match self.all.iter().find(|(_, n)| n == name) {
            Some((a, _)) => Ok(*a),
            None => bail!(
                "guest kernel symbol `{name}` not found in {}: is this the System.map of the kernel that boots?",
                self.path.display()
            ),
        }
    }

    /// The text symbol `addr` falls in, if any.
    pub fn locate(&self, addr: u64) -> Option<Located<'_>> {
        let i = self.text.partition_point(|(a, _)| *a <= addr);
        let (start, name) = self.text.get(i.checked_sub(1)?)?;
        Some(Located {
            name,
            offset: addr - start,
        })
    }
}

/// Every `rip=0x…` in `text` that falls in the kernel, with its symbol.
pub fn annotate(map: &SystemMap, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in text.split(|c: char| c.is_whitespace() || c == ',') {
        let Some(hex) = word.strip_prefix("rip=0x") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(hex, 16) else {
            continue;
        };
        if let Some(at) = map.locate(addr) {
            let line = format!("guest rip {addr:#x} is {at}");
            if !out.contains(&line) {
                out.push(line);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81051197 T wake_up_new_task
ffffffff810512a0 t finish_task_switch
ffffffff81600000 D some_data
ffffffff81200080 T entry_SYSCALL_64
";

    fn map() -> SystemMap {
        SystemMap::parse(Path::new("System.map"), MAP).unwrap()
    }

    #[test]
    fn symbols_by_name_and_by_address() {
        let m = map();
        assert_eq!(
            m.require("entry_SYSCALL_64").unwrap(),
            0xffff_ffff_8120_0080
        );
        assert_eq!(m.require("some_data").unwrap(), 0xffff_ffff_8160_0000);
        let err = m.require("no_such_symbol").unwrap_err().to_string();
        assert!(
            err.contains("`no_such_symbol`") && err.contains("System.map"),
            "{err}"
        );
        assert_eq!(
            m.locate(0xffff_ffff_8105_11a0).unwrap().to_string(),
            "wake_up_new_task+0x9"
        );
        assert_eq!(m.locate(0xffff_ffff_8000_0000), None, "below the kernel");
        assert!(SystemMap::parse(Path::new("x"), "zz T a\n").is_err());
    }

    #[test]
    fn failure_lines_get_symbols() {
        let lines = annotate(
            &map(),
            "guest ended: EPT violation: gpa=0x1000 access=write rip=0xffffffff810511a0 gva=0x1000\nrip=0x1234",
        );
        assert_eq!(
            lines,
            ["guest rip 0xffffffff810511a0 is wake_up_new_task+0x9"]
        );
    }
}
