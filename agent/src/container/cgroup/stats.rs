//! The statistics of a cgroup: cpu.stat, memory.*, pids.*, io.stat.

use std::{collections::BTreeMap, fs, io};

use super::{io_err, Cgroup, CgroupError};

/// A cgroup's statistics. Fields are 0 (or None/empty) when the file or controller is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub memory_current: u64,
    /// None = "max" (or no memory controller).
    pub memory_max: Option<u64>,
    pub memory_swap_current: u64,
    pub memory_stat: BTreeMap<String, u64>,
    pub memory_events: BTreeMap<String, u64>,
    pub pids_current: u64,
    /// None = "max" (or no pids controller).
    pub pids_max: Option<u64>,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub io_read_ios: u64,
    pub io_write_ios: u64,
}

impl Stats {
    fn apply_cpu_stat(&mut self, text: &str) {
        let m = parse_flat_keyed(text);
        let g = |k: &str| m.get(k).copied().unwrap_or(0);
        self.cpu_usage_usec = g("usage_usec");
        self.cpu_user_usec = g("user_usec");
        self.cpu_system_usec = g("system_usec");
        self.cpu_nr_periods = g("nr_periods");
        self.cpu_nr_throttled = g("nr_throttled");
        self.cpu_throttled_usec = g("throttled_usec");
    }

    /// io.stat: one line per device, `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...`; summed.
    fn apply_io_stat(&mut self, text: &str) {
        for line in text.lines() {
            for kv in line.split_whitespace().skip(1) {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let Ok(v) = v.parse::<u64>() else { continue };
                match k {
                    "rbytes" => self.io_read_bytes += v,
                    "wbytes" => self.io_write_bytes += v,
                    "rios" => self.io_read_ios += v,
                    "wios" => self.io_write_ios += v,
                    _ => {}
                }
            }
        }
    }
}

/// A single-value file: a number, or None for "max" / garbage.
fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// `key value` lines (cpu.stat, memory.stat, memory.events).
pub fn parse_flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

impl Cgroup {
    /// The memory.events `oom_kill` counter; 0 without a memory controller.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let p = self.path.join("memory.events");
        match fs::read_to_string(&p) {
            Ok(s) => Ok(parse_flat_keyed(&s).get("oom_kill").copied().unwrap_or(0)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err("reading", &p)(e)),
        }
    }

    /// Reads the statistics files that exist.
    pub fn stats(&self) -> Result<Stats, CgroupError> {
        let opt = |name: &str| -> Result<Option<String>, CgroupError> {
            let p = self.path.join(name);
            match fs::read_to_string(&p) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err("reading", &p)(e)),
            }
        };
        let mut s = Stats::default();
        if let Some(t) = opt("cpu.stat")? {
            s.apply_cpu_stat(&t);
        }
        if let Some(t) = opt("memory.current")? {
            s.memory_current = parse_u64(&t).unwrap_or(0);
        }
        if let Some(t) = opt("memory.max")? {
            s.memory_max = parse_u64(&t);
        }
        if let Some(t) = opt("memory.swap.current")? {
            s.memory_swap_current = parse_u64(&t).unwrap_or(0);
        }
        if let Some(t) = opt("memory.stat")? {
            s.memory_stat = parse_flat_keyed(&t);
        }
        if let Some(t) = opt("memory.events")? {
            s.memory_events = parse_flat_keyed(&t);
        }
        if let Some(t) = opt("pids.current")? {
            s.pids_current = parse_u64(&t).unwrap_or(0);
        }
        if let Some(t) = opt("pids.max")? {
            s.pids_max = parse_u64(&t);
        }
        if let Some(t) = opt("io.stat")? {
            s.apply_io_stat(&t);
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_parsing() {
        let mut s = Stats::default();
        s.apply_cpu_stat(
            "usage_usec 1000\nuser_usec 600\nsystem_usec 400\nnr_periods 10\nnr_throttled 2\nthrottled_usec 77\nnr_bursts 0\n",
        );
        s.apply_io_stat(
            "8:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n253:1 rbytes=5 wbytes=5 rios=1 wios=1 dbytes=0 dios=0\n",
        );
        assert_eq!(
            (s.cpu_usage_usec, s.cpu_user_usec, s.cpu_system_usec),
            (1000, 600, 400)
        );
        assert_eq!(
            (s.cpu_nr_periods, s.cpu_nr_throttled, s.cpu_throttled_usec),
            (10, 2, 77)
        );
        assert_eq!(
            (
                s.io_read_bytes,
                s.io_write_bytes,
                s.io_read_ios,
                s.io_write_ios
            ),
            (105, 205, 2, 3)
        );
        let m = parse_flat_keyed("anon 4096\nfile 8192\nbogus\n");
        assert_eq!(m.get("anon"), Some(&4096));
        assert_eq!(m.len(), 2);
        assert_eq!(parse_u64("max\n"), None);
        assert_eq!(parse_u64("123\n"), Some(123));
    }

    #[test]
    fn stats_from_a_fake_cgroup_dir() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::write(p.join("memory.current"), "4096\n").unwrap();
        fs::write(p.join("memory.max"), "max\n").unwrap();
        fs::write(
            p.join("memory.events"),
            "low 0\nhigh 0\nmax 1\noom 1\noom_kill 1\n",
        )
        .unwrap();
        fs::write(p.join("pids.current"), "3\n").unwrap();
        fs::write(p.join("pids.max"), "100\n").unwrap();
        let cg = Cgroup {
            root: p.to_path_buf(),
            path: p.to_path_buf(),
        };
        let s = cg.stats().unwrap();
        assert_eq!(s.memory_current, 4096);
        assert_eq!(s.memory_max, None);
        assert_eq!(s.pids_current, 3);
        assert_eq!(s.pids_max, Some(100));
        assert_eq!(s.memory_events.get("oom_kill"), Some(&1));
        assert_eq!(cg.oom_kills().unwrap(), 1);
        assert_eq!(s.cpu_usage_usec, 0);
    }
}
