//! OCI `LinuxResources` to cgroup v2 interface files, and applying them to a cgroup.

use oci_spec::runtime::LinuxResources;

use super::{write, Cgroup, CgroupError};

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

impl Cgroup {
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
}
