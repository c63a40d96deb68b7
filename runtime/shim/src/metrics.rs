//! Container statistics for containerd: the agent's cgroup v2 numbers as the cgroups v2
//! `Metrics` message that containerd's CRI plugin decodes (working set, CPU, pids, I/O).

use containerd_shim::protos::{
    cgroups_v2::metrics as cg2,
    protobuf::{well_known_types::any::Any, Message},
};
use husk_client::pb;

pub use cg2::Metrics;

/// The type URL containerd's CRI plugin decodes cgroup v2 metrics by (no
/// `type.googleapis.com/` prefix: containerd's typeurl registry has the bare name).
pub const METRICS_V2_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

/// `m` packed for a StatsResponse.
pub fn to_any(m: &Metrics) -> Result<Any, containerd_shim::protos::protobuf::Error> {
    let mut any = Any::new();
    any.type_url = METRICS_V2_TYPE.to_string();
    any.value = m.write_to_bytes()?;
    Ok(any)
}

/// The agent's cgroup v2 statistics as containerd's cgroups v2 Metrics.
pub fn from_agent(s: &pb::ContainerStatsResponse) -> Metrics {
    let mut m = Metrics::new();
    let mut cpu = cg2::CPUStat::new();
    cpu.usage_usec = s.cpu_usage_usec;
    cpu.user_usec = s.cpu_user_usec;
    cpu.system_usec = s.cpu_system_usec;
    cpu.nr_periods = s.cpu_nr_periods;
    cpu.nr_throttled = s.cpu_nr_throttled;
    cpu.throttled_usec = s.cpu_throttled_usec;
    m.cpu = Some(cpu).into();
    let stat = |k: &str| s.memory_stat.get(k).copied().unwrap_or_default();
    let mut mem = cg2::MemoryStat::new();
    mem.usage = s.memory_current;
    mem.usage_limit = if s.memory_max == 0 {
        u64::MAX
    } else {
        s.memory_max
    };
    mem.swap_usage = s.memory_swap_current;
    mem.anon = stat("anon");
    mem.file = stat("file");
    mem.kernel_stack = stat("kernel_stack");
    mem.slab = stat("slab");
    mem.sock = stat("sock");
    mem.shmem = stat("shmem");
    mem.file_mapped = stat("file_mapped");
    mem.file_dirty = stat("file_dirty");
    mem.file_writeback = stat("file_writeback");
    mem.inactive_anon = stat("inactive_anon");
    mem.active_anon = stat("active_anon");
    mem.inactive_file = stat("inactive_file");
    mem.active_file = stat("active_file");
    mem.unevictable = stat("unevictable");
    mem.pgfault = stat("pgfault");
    mem.pgmajfault = stat("pgmajfault");
    m.memory = Some(mem).into();
    let event = |k: &str| s.memory_events.get(k).copied().unwrap_or_default();
    let mut ev = cg2::MemoryEvents::new();
    ev.low = event("low");
    ev.high = event("high");
    ev.max = event("max");
    ev.oom = event("oom");
    ev.oom_kill = event("oom_kill");
    m.memory_events = Some(ev).into();
    let mut pids = cg2::PidsStat::new();
    pids.current = s.pids_current;
    pids.limit = s.pids_max;
    m.pids = Some(pids).into();
    let mut io = cg2::IOStat::new();
    let mut entry = cg2::IOEntry::new();
    entry.rbytes = s.io_read_bytes;
    entry.wbytes = s.io_write_bytes;
    entry.rios = s.io_read_ios;
    entry.wios = s.io_write_ios;
    io.usage.push(entry);
    m.io = Some(io).into();
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_stats_become_cgroup_v2_metrics() {
        let mut s = pb::ContainerStatsResponse::new();
        s.cpu_usage_usec = 1500;
        s.memory_current = 4 << 20;
        s.memory_max = 0;
        s.memory_stat.insert("inactive_file".into(), 4096);
        s.memory_events.insert("oom_kill".into(), 2);
        s.pids_current = 3;
        s.io_read_bytes = 512;
        let m = from_agent(&s);
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.memory.usage, 4 << 20);
        assert_eq!(m.memory.usage_limit, u64::MAX);
        assert_eq!(m.memory.inactive_file, 4096);
        assert_eq!(m.memory_events.oom_kill, 2);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.io.usage[0].rbytes, 512);
        // What containerd decodes: the v2 type name and a message that parses back.
        let any = to_any(&m).unwrap();
        assert_eq!(any.type_url, METRICS_V2_TYPE);
        let back = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            <Metrics as containerd_shim::protos::protobuf::MessageFull>::descriptor().full_name(),
            METRICS_V2_TYPE
        );
    }
}
