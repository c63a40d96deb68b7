//! cgroup v2: translation of OCI `LinuxResources` to interface files, the per-container
//! cgroup (create, limits, procs, freeze, kill, remove) and its statistics.
//!
//! Layout: `<cgroup_root>/<sandbox_id>/<container_id>`. The container cgroup is a leaf;
//! its ancestors below the root only delegate controllers (`cgroup.subtree_control`).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;

/// What went wrong with a cgroup operation.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A resource value that cannot be expressed in cgroup v2.
    #[error("{field}: {problem}")]
    InvalidValue { field: String, problem: String },
    /// The spec asks for a controller the kernel (or the parent cgroup) does not offer.
    #[error("linux.resources: controller {controller:?} is not available in {}", path.display())]
    ControllerUnavailable { controller: String, path: PathBuf },
    /// The container was created without cgroup support.
    #[error("the container has no cgroup (cgroup support is off)")]
    NoCgroup,
    /// Reading or writing a cgroup file failed.
    #[error("{op} {}", path.display())]
    Io {
        op: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Processes were still in the cgroup after the deadline.
    #[error("cgroup {} still has processes after {timeout:?}", path.display())]
    Busy { path: PathBuf, timeout: Duration },
}

impl CgroupError {
    /// The error comes from the request (a bad value, an unavailable controller), not the system.
    pub fn is_invalid_spec(&self) -> bool {
        matches!(
            self,
            CgroupError::InvalidValue { .. } | CgroupError::ControllerUnavailable { .. }
        )
    }
}

fn invalid(field: &str, problem: impl Into<String>) -> CgroupError {
    CgroupError::InvalidValue {
        field: format!("linux.resources.{field}"),
        problem: problem.into(),
    }
}

/// The cgroup v2 interface files (name, value) that implement `res`, in the order to write
/// them. A file may appear more than once (e.g. `io.max` per device). `unified` entries come
/// last so they override the translated ones.
pub fn resources_to_files(res: &LinuxResources) -> Result<Vec<(String, String)>, CgroupError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut push = |k: &str, v: String| out.push((k.to_string(), v));

    if let Some(m) = res.memory() {
        let limit = m.limit();
        if let Some(l) = limit {
            if let Some(v) = memory_value("memory.limit", l)? {
                push("memory.max", v);
            }
        }
        if let Some(r) = m.reservation() {
            if let Some(v) = memory_value("memory.reservation", r)? {
                push("memory.low", v);
            }
        }
        if let Some(swap) = m.swap() {
            if let Some(v) = swap_value(swap, limit.unwrap_or(0))? {
                push("memory.swap.max", v);
            }
        } else if limit == Some(-1) {
            // Unlimited memory without a swap setting means unlimited swap too (as cgroup v1).
            push("memory.swap.max", "max".into());
        }
        if m.swappiness().is_some() {
            tracing::debug!(
                "linux.resources.memory.swappiness has no cgroup v2 equivalent; ignored"
            );
        }
    }

    if let Some(c) = res.cpu() {
        if let Some(shares) = c.shares() {
            if shares != 0 {
                push("cpu.weight", shares_to_weight(shares).to_string());
            }
        }
        let period = c.period().filter(|p| *p != 0);
        match (c.quota(), period) {
            (None | Some(0), None) => {}
            (quota, period) => {
                let period = period.unwrap_or(100_000);
                if !(1000..=1_000_000).contains(&period) {
                    return Err(invalid(
                        "cpu.period",
                        format!("{period} is outside 1000..=1000000 microseconds"),
                    ));
                }
                let q = match quota {
                    Some(q) if q > 0 => {
                        if q < 1000 {
                            return Err(invalid(
                                "cpu.quota",
                                format!("{q} is below the minimum of 1000 microseconds"),
                            ));
                        }
                        q.to_string()
                    }
                    _ => "max".to_string(),
                };
                push("cpu.max", format!("{q} {period}"));
            }
        }
        if let Some(b) = c.burst() {
            push("cpu.max.burst", b.to_string());
        }
        if let Some(idle) = c.idle() {
            if idle != 0 && idle != 1 {
                return Err(invalid("cpu.idle", format!("{idle} must be 0 or 1")));
            }
            push("cpu.idle", idle.to_string());
        }
        if c.realtime_runtime().is_some_and(|r| r != 0)
            || c.realtime_period().is_some_and(|p| p != 0)
        {
            return Err(invalid(
                "cpu.realtimeRuntime",
                "real-time scheduling limits are not supported by cgroup v2",
            ));
        }
        if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
            check_list("cpu.cpus", cpus)?;
            push("cpuset.cpus", cpus.to_string());
        }
        if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
            check_list("cpu.mems", mems)?;
            push("cpuset.mems", mems.to_string());
        }
    }

    if let Some(p) = res.pids() {
        match p.limit() {
            0 => {}
            l if l > 0 => push("pids.max", l.to_string()),
            _ => push("pids.max", "max".into()),
        }
    }

    if let Some(b) = res.block_io() {
        if let Some(w) = b.weight() {
            if w != 0 {
                push(
                    "io.weight",
                    format!("default {}", blkio_to_io_weight("blockIO.weight", w)?),
                );
            }
        }
        for (i, d) in b.weight_device().iter().flatten().enumerate() {
            if let Some(w) = d.weight() {
                let field = format!("blockIO.weightDevice[{i}].weight");
                push(
                    "io.weight",
                    format!(
                        "{}:{} {}",
                        d.major(),
                        d.minor(),
                        blkio_to_io_weight(&field, w)?
                    ),
                );
            }
        }
        let throttles = [
            ("rbps", b.throttle_read_bps_device()),
            ("wbps", b.throttle_write_bps_device()),
            ("riops", b.throttle_read_iops_device()),
            ("wiops", b.throttle_write_iops_device()),
        ];
        for (key, list) in throttles {
            for d in list.iter().flatten() {
                let rate = if d.rate() == 0 {
                    "max".to_string()
                } else {
                    d.rate().to_string()
                };
                push(
                    "io.max",
                    format!("{}:{} {key}={rate}", d.major(), d.minor()),
                );
            }
        }
    }

    for (i, h) in res.hugepage_limits().iter().flatten().enumerate() {
        let size = h.page_size();
        if size.is_empty() || !size.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(invalid(
                &format!("hugepageLimits[{i}].pageSize"),
                format!("{size:?} is not a page size like 2MB"),
            ));
        }
        let v = if h.limit() < 0 {
            "max".to_string()
        } else {
            h.limit().to_string()
        };
        push(&format!("hugetlb.{size}.max"), v);
    }

    if let Some(rdma) = res.rdma() {
        let mut devs: Vec<_> = rdma.iter().collect();
        devs.sort_by(|a, b| a.0.cmp(b.0));
        for (dev, l) in devs {
            let mut parts = vec![dev.clone()];
            if let Some(h) = l.hca_handles() {
                parts.push(format!("hca_handle={h}"));
            }
            if let Some(o) = l.hca_objects() {
                parts.push(format!("hca_object={o}"));
            }
            if parts.len() > 1 {
                push("rdma.max", parts.join(" "));
            }
        }
    }

    if res.network().is_some() {
        tracing::debug!("linux.resources.network has no cgroup v2 equivalent; ignored");
    }
    if res.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        tracing::debug!("linux.resources.devices (device cgroup) is not enforced; ignored");
    }

    if let Some(unified) = res.unified() {
        let mut keys: Vec<_> = unified.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        for (k, v) in keys {
            if k.is_empty()
                || k.contains('/')
                || k.starts_with('.')
                || !k.contains('.')
                || k.starts_with("cgroup.")
            {
                return Err(invalid(
                    &format!("unified[{k:?}]"),
                    "not a cgroup v2 interface file name like memory.high",
                ));
            }
            push(k, v.clone());
        }
    }
    Ok(out)
}

/// A memory byte value: positive = bytes, -1 = unlimited, 0 = unset.
fn memory_value(field: &str, v: i64) -> Result<Option<String>, CgroupError> {
    match v {
        0 => Ok(None),
        -1 => Ok(Some("max".into())),
        v if v > 0 => Ok(Some(v.to_string())),
        v => Err(invalid(
            field,
            format!("{v} is negative (use -1 for unlimited)"),
        )),
    }
}

/// OCI swap is memory+swap; cgroup v2 wants swap alone.
fn swap_value(swap: i64, limit: i64) -> Result<Option<String>, CgroupError> {
    if limit == -1 && swap == 0 {
        return Ok(Some("max".into()));
    }
    match swap {
        0 => return Ok(None),
        -1 => return Ok(Some("max".into())),
        s if s < 0 => {
            return Err(invalid(
                "memory.swap",
                format!("{s} is negative (use -1 for unlimited)"),
            ))
        }
        _ => {}
    }
    if limit == 0 || limit == -1 {
        return Err(invalid(
            "memory.swap",
            "a swap limit needs a memory limit (memory.limit)",
        ));
    }
    if swap < limit {
        return Err(invalid(
            "memory.swap",
            format!("{swap} (memory+swap) is below memory.limit {limit}"),
        ));
    }
    Ok(Some((swap - limit).to_string()))
}

/// cgroup v1 cpu.shares (2..=262144) to cgroup v2 cpu.weight (1..=10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

/// blkio weight (10..=1000) to io.weight (1..=10000).
fn blkio_to_io_weight(field: &str, w: u16) -> Result<u64, CgroupError> {
    if !(10..=1000).contains(&w) {
        return Err(invalid(field, format!("{w} is outside 10..=1000")));
    }
    Ok(1 + (u64::from(w) - 10) * 9999 / 990)
}

fn check_list(field: &str, s: &str) -> Result<(), CgroupError> {
    if s.chars()
        .all(|c| c.is_ascii_digit() || c == ',' || c == '-')
    {
        Ok(())
    } else {
        Err(invalid(field, format!("{s:?} is not a list like 0-2,4")))
    }
}

/// The controller that owns an interface file (`memory.swap.max` -> `memory`), None for core files.
pub fn controller_of(file: &str) -> Option<&str> {
    let c = file.split('.').next()?;
    (c != "cgroup" && !c.is_empty() && file.contains('.')).then_some(c)
}

/// Controllers enabled for every container when available, for statistics and OOM events.
const STATS_CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "io"];

fn io_err(op: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    let op = op.into();
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(io_err("reading", path))
}

/// Writes one value with a single write(2), as cgroup files want.
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(format!("opening for {value:?}:"), path))?;
    f.write_all(value.as_bytes())
        .map_err(io_err(format!("writing {value:?} to"), path))
}

/// The cgroup of one container.
#[derive(Debug, Clone)]
pub struct Cgroup {
    root: PathBuf,
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<root>/<sandbox>/<id>`, enables the controllers that `files` need (an error
    /// names one that is not available) plus the statistics controllers when available, and
    /// writes `files`. On error, the container's directory is removed again.
    pub fn create(
        root: &Path,
        sandbox: &str,
        id: &str,
        files: &[(String, String)],
    ) -> Result<Cgroup, CgroupError> {
        fs::create_dir_all(root.join(sandbox)).map_err(io_err("creating", &root.join(sandbox)))?;
        let path = root.join(sandbox).join(id);
        if let Err(e) = fs::create_dir(&path) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(io_err("creating", &path)(e));
            }
            // A leftover of an earlier run: take it over only if it is empty.
            fs::remove_dir(&path).map_err(io_err("removing the stale cgroup", &path))?;
            fs::create_dir(&path).map_err(io_err("creating", &path))?;
        }
        let cg = Cgroup {
            root: root.to_path_buf(),
            path,
        };
        if let Err(e) = cg.apply(files) {
            let _ = fs::remove_dir(&cg.path);
            return Err(e);
        }
        if let Err(e) = cg.enable(&STATS_CONTROLLERS, false) {
            tracing::debug!("enabling statistics controllers: {e}");
        }
        Ok(cg)
    }

    /// The container's cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ancestors that must delegate controllers: the root and the sandbox directory.
    fn delegating_ancestors(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self
            .path
            .ancestors()
            .skip(1)
            .take_while(|p| p.starts_with(&self.root))
            .map(Path::to_path_buf)
            .collect();
        v.reverse();
        v
    }

    /// Enables `controllers` in the subtree_control of every ancestor. With `required`, a
    /// controller missing from `cgroup.controllers` is an error; otherwise it is skipped.
    fn enable(&self, controllers: &[&str], required: bool) -> Result<(), CgroupError> {
        for dir in self.delegating_ancestors() {
            let available = read(&dir.join("cgroup.controllers"))?;
            let enabled = read(&dir.join("cgroup.subtree_control"))?;
            for c in controllers {
                if enabled.split_whitespace().any(|e| e == *c) {
                    continue;
                }
                if !available.split_whitespace().any(|a| a == *c) {
                    if required {
                        return Err(CgroupError::ControllerUnavailable {
                            controller: c.to_string(),
                            path: dir,
                        });
                    }
                    continue;
                }
                let r = write(&dir.join("cgroup.subtree_control"), &format!("+{c}"));
                if required {
                    r?;
                }
            }
        }
        Ok(())
    }

    /// Enables the controllers `files` need and writes them.
    pub fn apply(&self, files: &[(String, String)]) -> Result<(), CgroupError> {
        let mut needed: Vec<&str> = files.iter().filter_map(|(f, _)| controller_of(f)).collect();
        needed.sort_unstable();
        needed.dedup();
        self.enable(&needed, true)?;
        for (f, v) in files {
            write(&self.path.join(f), v)?;
        }
        Ok(())
    }

    /// Moves a process into the cgroup.
    pub fn add_process(&self, pid: Pid) -> Result<(), CgroupError> {
        write(&self.path.join("cgroup.procs"), &pid.as_raw().to_string())
    }

    /// The processes of the cgroup and its descendants.
    pub fn procs(&self) -> Result<Vec<Pid>, CgroupError> {
        let mut out = Vec::new();
        collect_procs(&self.path, &mut out)?;
        Ok(out)
    }

    /// SIGKILLs every process of the cgroup (cgroup.kill, or one by one on older kernels).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if !self.path.exists() {
            return Ok(());
        }
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            return write(&kill, "1");
        }
        for pid in self.procs()? {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        Ok(())
    }

    /// Freezes (true) or thaws the cgroup, waiting (bounded) until the kernel says it is done.
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        write(
            &self.path.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let events = self.path.join("cgroup.events");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match fs::read_to_string(&events) {
                Ok(s) if s.lines().any(|l| l.trim() == want) => return Ok(()),
                Ok(_) => std::thread::sleep(Duration::from_millis(5)),
                // An old kernel without the field: trust the write.
                Err(_) => return Ok(()),
            }
        }
        tracing::warn!(path = %self.path.display(), "cgroup did not reach {want:?} in time");
        Ok(())
    }

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

    /// Removes the cgroup directory (and any the container made below it), waiting up to
    /// `timeout` for its processes to be gone. Missing is fine.
    pub fn remove(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        loop {
            match remove_tree(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(CgroupError::Busy {
                        path: self.path.clone(),
                        timeout,
                    })
                }
                Err(e) => return Err(io_err("removing", &self.path)(e)),
            }
        }
    }
}

fn collect_procs(dir: &Path, out: &mut Vec<Pid>) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let text = match fs::read_to_string(&procs) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("reading", &procs)(e)),
    };
    out.extend(
        text.lines()
            .filter_map(|l| l.trim().parse().ok())
            .map(Pid::from_raw),
    );
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            collect_procs(&e.path(), out)?;
        }
    }
    Ok(())
}

/// rmdir of a cgroup and its child cgroups, deepest first (cgroup dirs hold only files that
/// go away with rmdir).
fn remove_tree(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn files(v: serde_json::Value) -> Vec<(String, String)> {
        let res: LinuxResources = serde_json::from_value(v).unwrap();
        resources_to_files(&res).unwrap()
    }

    fn err(v: serde_json::Value) -> String {
        let res: LinuxResources = serde_json::from_value(v).unwrap();
        resources_to_files(&res).unwrap_err().to_string()
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn empty_resources_write_nothing() {
        assert!(files(json!({})).is_empty());
        assert!(files(json!({"devices": [{"allow": false, "access": "rwm"}]})).is_empty());
    }

    #[test]
    fn memory_limit_and_reservation() {
        assert_eq!(
            files(json!({"memory": {"limit": 104857600, "reservation": 52428800}})),
            kv(&[("memory.max", "104857600"), ("memory.low", "52428800")])
        );
        assert_eq!(
            files(json!({"memory": {"limit": -1}})),
            kv(&[("memory.max", "max"), ("memory.swap.max", "max")])
        );
        assert!(files(json!({"memory": {"limit": 0}})).is_empty());
        assert_eq!(
            err(json!({"memory": {"limit": -5}})),
            "linux.resources.memory.limit: -5 is negative (use -1 for unlimited)"
        );
    }

    #[test]
    fn swap_is_memory_plus_swap() {
        assert_eq!(
            files(json!({"memory": {"limit": 100, "swap": 300}})),
            kv(&[("memory.max", "100"), ("memory.swap.max", "200")])
        );
        assert_eq!(
            files(json!({"memory": {"limit": 100, "swap": 100}})),
            kv(&[("memory.max", "100"), ("memory.swap.max", "0")])
        );
        assert_eq!(
            files(json!({"memory": {"limit": 100, "swap": -1}})),
            kv(&[("memory.max", "100"), ("memory.swap.max", "max")])
        );
        assert_eq!(
            files(json!({"memory": {"limit": 100, "swap": 0}})),
            kv(&[("memory.max", "100")])
        );
        assert!(err(json!({"memory": {"limit": 100, "swap": 50}}))
            .starts_with("linux.resources.memory.swap: 50 (memory+swap) is below"));
        assert!(err(json!({"memory": {"swap": 50}}))
            .starts_with("linux.resources.memory.swap: a swap limit needs a memory limit"));
    }

    #[test]
    fn cpu_quota_period() {
        assert_eq!(
            files(json!({"cpu": {"quota": 50000, "period": 100000}})),
            kv(&[("cpu.max", "50000 100000")])
        );
        assert_eq!(
            files(json!({"cpu": {"quota": 20000}})),
            kv(&[("cpu.max", "20000 100000")])
        );
        assert_eq!(
            files(json!({"cpu": {"quota": -1, "period": 50000}})),
            kv(&[("cpu.max", "max 50000")])
        );
        assert_eq!(
            files(json!({"cpu": {"period": 50000}})),
            kv(&[("cpu.max", "max 50000")])
        );
        assert!(files(json!({"cpu": {"quota": 0}})).is_empty());
        assert!(err(json!({"cpu": {"quota": 10}})).starts_with("linux.resources.cpu.quota:"));
        assert!(err(json!({"cpu": {"quota": 5000, "period": 10}}))
            .starts_with("linux.resources.cpu.period:"));
    }

    #[test]
    fn cpu_shares_to_weight() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(1 << 30), 10_000);
        assert_eq!(
            files(json!({"cpu": {"shares": 512}})),
            kv(&[("cpu.weight", "20")])
        );
        assert!(files(json!({"cpu": {"shares": 0}})).is_empty());
    }

    #[test]
    fn cpuset_and_idle_and_burst() {
        assert_eq!(
            files(json!({"cpu": {"cpus": "0-1,3", "mems": "0", "idle": 1, "burst": 1000}})),
            kv(&[
                ("cpu.max.burst", "1000"),
                ("cpu.idle", "1"),
                ("cpuset.cpus", "0-1,3"),
                ("cpuset.mems", "0")
            ])
        );
        assert!(err(json!({"cpu": {"cpus": "0;rm"}})).starts_with("linux.resources.cpu.cpus:"));
        assert!(err(json!({"cpu": {"realtimeRuntime": 5}}))
            .starts_with("linux.resources.cpu.realtimeRuntime:"));
    }

    #[test]
    fn pids() {
        assert_eq!(
            files(json!({"pids": {"limit": 64}})),
            kv(&[("pids.max", "64")])
        );
        assert_eq!(
            files(json!({"pids": {"limit": -1}})),
            kv(&[("pids.max", "max")])
        );
        assert!(files(json!({"pids": {"limit": 0}})).is_empty());
    }

    #[test]
    fn block_io() {
        assert_eq!(
            files(json!({"blockIO": {
                "weight": 500,
                "weightDevice": [{"major": 8, "minor": 0, "weight": 10}],
                "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}],
                "throttleWriteIOPSDevice": [{"major": 8, "minor": 16, "rate": 100}]
            }})),
            kv(&[
                ("io.weight", "default 4950"),
                ("io.weight", "8:0 1"),
                ("io.max", "8:0 rbps=1048576"),
                ("io.max", "8:16 wiops=100"),
            ])
        );
        assert!(err(json!({"blockIO": {"weight": 5}}))
            .starts_with("linux.resources.blockIO.weight: 5 is outside"));
    }

    #[test]
    fn hugepages_and_rdma() {
        assert_eq!(
            files(
                json!({"hugepageLimits": [{"pageSize": "2MB", "limit": 4194304}],
                         "rdma": {"mlx5_1": {"hcaHandles": 3, "hcaObjects": 100}}})
            ),
            kv(&[
                ("hugetlb.2MB.max", "4194304"),
                ("rdma.max", "mlx5_1 hca_handle=3 hca_object=100")
            ])
        );
        assert!(
            err(json!({"hugepageLimits": [{"pageSize": "../x", "limit": 1}]}))
                .starts_with("linux.resources.hugepageLimits[0].pageSize:")
        );
    }

    #[test]
    fn unified_passthrough_comes_last() {
        assert_eq!(
            files(json!({"memory": {"limit": 100},
                         "unified": {"memory.high": "80", "memory.max": "90"}})),
            kv(&[
                ("memory.max", "100"),
                ("memory.high", "80"),
                ("memory.max", "90")
            ])
        );
        assert!(err(json!({"unified": {"../../etc/passwd": "x"}}))
            .starts_with("linux.resources.unified[\"../../etc/passwd\"]:"));
        assert!(err(json!({"unified": {"cgroup.procs": "1"}})).contains("unified"));
    }

    #[test]
    fn controllers_of_files() {
        assert_eq!(controller_of("memory.swap.max"), Some("memory"));
        assert_eq!(controller_of("cpu.max"), Some("cpu"));
        assert_eq!(controller_of("hugetlb.2MB.max"), Some("hugetlb"));
        assert_eq!(controller_of("cgroup.freeze"), None);
        assert_eq!(controller_of("weird"), None);
    }

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
