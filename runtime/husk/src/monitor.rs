//! `husk monitor`: per-pod metrics in Prometheus's text format, on `GET /metrics` (as
//! kata-monitor serves Kata's). Each scrape finds the pods from their shims' `pod.json`
//! ([`husk::podinfo`]) and asks, for each:
//! - /proc: the memory (RSS, PSS) and CPU time of the pod's processes on the host (the shim,
//!   the VMM, virtiofsd), and each vCPU thread's CPU time;
//! - the VMM's control socket (`metrics`, which does not disturb the vCPUs): VM exits by
//!   kind, the bytes each device moved, when the guest became ready;
//! - the agent, over the VMM's hybrid vsock: a health check, timed (its latency), and the
//!   cgroup statistics of each container (what CRI's ContainerStats returns).
//!
//! Every series has the labels `sandbox_id`, `pod` and `namespace` (the Kubernetes pod, from
//! CRI's annotations); container series add `container`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use husk::podinfo::PodInfo;
use husk_client::{pb, AgentAddr, AgentClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, clap::Args)]
pub struct MonitorArgs {
    /// Where to serve GET /metrics (HTTP).
    #[arg(long, default_value = "127.0.0.1:9449")]
    listen: String,
    /// Where the shims keep their pods' run directories.
    #[arg(long, default_value = husk::podinfo::SHIM_RUN_DIR)]
    run_dir: PathBuf,
    /// Print one scrape on stdout and exit, serving nothing.
    #[arg(long)]
    once: bool,
}

/// How long a scrape waits for one pod's VMM or agent.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn monitor(a: MonitorArgs) -> Result<i32> {
    if a.once {
        print!("{}", scrape(&a.run_dir).await);
        return Ok(0);
    }
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    eprintln!(
        "husk monitor: serving http://{}/metrics for the pods under {}",
        listener.local_addr()?,
        a.run_dir.display()
    );
    loop {
        let (mut conn, _) = listener.accept().await.context("accepting a connection")?;
        let run_dir = a.run_dir.clone();
        tokio::spawn(async move {
            let _ = serve(&mut conn, &run_dir).await;
        });
    }
}

/// One HTTP/1.1 request on `conn`, answered and closed.
async fn serve(conn: &mut tokio::net::TcpStream, run_dir: &Path) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    // The request head; a client that sends more than 16 KiB of it, or nothing for 10 s, is
    // not a scraper.
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 << 10 {
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&buf);
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            scrape(run_dir).await,
        ),
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "husk monitor: per-pod metrics at /metrics\n".to_string(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(reply.as_bytes()).await?;
    conn.shutdown().await
}

/// The metrics, grouped by name (one HELP and TYPE line each, as the format wants).
#[derive(Default)]
struct Metrics {
    families: BTreeMap<&'static str, (&'static str, &'static str, Vec<String>)>,
}

impl Metrics {
    fn add(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: &str,
        value: f64,
    ) {
        self.families
            .entry(name)
            .or_insert((kind, help, Vec::new()))
            .2
            .push(if labels.is_empty() {
                format!("{name} {value}")
            } else {
                format!("{name}{{{labels}}} {value}")
            });
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (name, (kind, help, samples)) in &self.families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for s in samples {
                let _ = writeln!(out, "{s}");
            }
        }
        out
    }
}

/// A label value, escaped as the text format wants.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn scrape(run_dir: &Path) -> String {
    let mut m = Metrics::default();
    let pods = PodInfo::all(run_dir);
    m.add(
        "husk_pods",
        "gauge",
        "Pods whose shim this monitor found.",
        "",
        pods.len() as f64,
    );
    for p in &pods {
        pod_metrics(&mut m, p).await;
    }
    m.render()
}

/// CPU seconds of a /proc/PID(/task/TID)/stat line: utime + stime.
fn cpu_seconds(stat: &str) -> Option<f64> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// RSS and PSS of process `pid`, in bytes.
fn memory(pid: u32) -> Option<(u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib << 10)
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// `pid` and every process under it, each with its command name.
fn tree(pid: u32) -> Vec<(u32, String)> {
    let mut all: Vec<(u32, u32, String)> = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let (Some((head, rest)), Some(open)) = (stat.rsplit_once(')'), stat.find('(')) else {
            continue;
        };
        let comm = head[open + 1..].to_string();
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|v| v.parse().ok()) {
            all.push((p, ppid, comm));
        }
    }
    let mut out: Vec<(u32, String)> = all
        .iter()
        .filter(|(p, _, _)| *p == pid)
        .map(|(p, _, c)| (*p, c.clone()))
        .collect();
    let mut i = 0;
    while i < out.len() {
        let parent = out[i].0;
        for (p, pp, c) in &all {
            if *pp == parent {
                out.push((*p, c.clone()));
            }
        }
        i += 1;
    }
    out
}

async fn pod_metrics(m: &mut Metrics, p: &PodInfo) {
    let pod = format!(
        r#"sandbox_id="{}",pod="{}",namespace="{}""#,
        esc(&p.sandbox_id),
        esc(&p.name),
        esc(&p.namespace)
    );
    m.add(
        "husk_pod_info",
        "gauge",
        "A husk pod: its VM's size (vcpus, memory_mib) as labels; always 1.",
        &format!(r#"{pod},vcpus="{}",memory_mib="{}""#, p.vcpus, p.memory_mib),
        1.0,
    );
    m.add(
        "husk_pod_guest_memory_bytes",
        "gauge",
        "The guest memory the pod's VM was given.",
        &pod,
        (u64::from(p.memory_mib) << 20) as f64,
    );
    m.add(
        "husk_pod_boot_seconds",
        "gauge",
        "From the shim's sandbox create to the guest's agent answering.",
        &pod,
        p.boot_ms as f64 / 1000.0,
    );

    // The pod's processes on the host.
    for (pid, comm) in tree(p.shim_pid) {
        let process = match comm.as_str() {
            "husk-vmm" => "vmm",
            "virtiofsd" => "virtiofsd",
            c if c.starts_with("containerd-shim") => "shim",
            _ => "other",
        };
        let labels = format!(r#"{pod},process="{process}",pid="{pid}""#);
        if let Some((rss, pss)) = memory(pid) {
            m.add(
                "husk_pod_process_memory_rss_bytes",
                "gauge",
                "Resident memory of one of the pod's processes on the host (the VMM's includes the guest memory the guest touched).",
                &labels,
                rss as f64,
            );
            m.add(
                "husk_pod_process_memory_pss_bytes",
                "gauge",
                "Proportional set size of one of the pod's processes (pages shared, e.g. the guest memory the VMM and virtiofsd both map, split between them).",
                &labels,
                pss as f64,
            );
        }
        if let Some(s) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| cpu_seconds(&s))
        {
            m.add(
                "husk_pod_process_cpu_seconds_total",
                "counter",
                "CPU time (user and system) of one of the pod's processes on the host.",
                &labels,
                s,
            );
        }
    }
    // Each vCPU thread of the VMM.
    for t in fs::read_dir(format!("/proc/{}/task", p.vmm_pid))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let Some(n) = comm.trim().strip_prefix("vcpu") else {
            continue;
        };
        if let Some(s) = fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| cpu_seconds(&s))
        {
            m.add(
                "husk_pod_vcpu_seconds_total",
                "counter",
                "CPU time of one vCPU thread (guest time included).",
                &format!(r#"{pod},vcpu="{n}""#),
                s,
            );
        }
    }

    // The VMM's counters.
    let api = p.api_socket.clone();
    let status =
        tokio::task::spawn_blocking(move || husk_vmm_api::Client::new(api, ASK_TIMEOUT).metrics())
            .await;
    if let Ok(Ok(s)) = status {
        if let Some(ms) = s.ready_ms {
            m.add(
                "husk_pod_guest_ready_seconds",
                "gauge",
                "From the VMM's start to the guest's agent signalling ready.",
                &pod,
                ms as f64 / 1000.0,
            );
        }
        for (i, v) in s.vcpus.iter().enumerate() {
            let other = v.exits.saturating_sub(v.io_exits + v.mmio_exits);
            for (kind, n) in [("io", v.io_exits), ("mmio", v.mmio_exits), ("other", other)] {
                m.add(
                    "husk_pod_vm_exits_total",
                    "counter",
                    "VM exits to the VMM, by vCPU and kind (port I/O, MMIO, other).",
                    &format!(r#"{pod},vcpu="{i}",kind="{kind}""#),
                    n as f64,
                );
            }
        }
        for d in &s.devices {
            for (dir, n) in [
                ("to_guest", d.to_guest_bytes),
                ("from_guest", d.from_guest_bytes),
            ] {
                if let Some(n) = n {
                    m.add(
                        "husk_pod_device_bytes_total",
                        "counter",
                        "Payload bytes a virtio device moved (block: read/written; net: frames; vsock: packets).",
                        &format!(r#"{pod},device="{}",direction="{dir}""#, esc(&d.id)),
                        n as f64,
                    );
                }
            }
        }
    }

    // The agent: a timed health check, then each container's statistics.
    let addr = AgentAddr::HybridVsock(p.vsock_socket.clone());
    let t = Instant::now();
    let agent = tokio::time::timeout(ASK_TIMEOUT, async {
        let c = AgentClient::connect(&addr, ASK_TIMEOUT)
            .await?
            .with_deadline(ASK_TIMEOUT);
        c.check().await?;
        Ok::<_, husk_client::ClientError>(c)
    })
    .await;
    let up = matches!(agent, Ok(Ok(_)));
    m.add(
        "husk_pod_agent_up",
        "gauge",
        "Whether the pod's agent answered a health check.",
        &pod,
        if up { 1.0 } else { 0.0 },
    );
    let Ok(Ok(agent)) = agent else { return };
    m.add(
        "husk_pod_agent_rpc_latency_seconds",
        "gauge",
        "How long the agent took to answer a health check (connection included).",
        &pod,
        t.elapsed().as_secs_f64(),
    );
    for c in &p.containers {
        let mut r = pb::ContainerStatsRequest::new();
        r.container_id = c.clone();
        let Ok(Ok(s)) = tokio::time::timeout(ASK_TIMEOUT, agent.container_stats(r)).await else {
            continue;
        };
        let labels = format!(r#"{pod},container="{}""#, esc(c));
        let inactive = s.memory_stat.get("inactive_file").copied().unwrap_or(0);
        for (name, kind, help, v) in [
            (
                "husk_container_cpu_usage_seconds_total",
                "counter",
                "CPU time of the container's cgroup in the guest.",
                s.cpu_usage_usec as f64 / 1e6,
            ),
            (
                "husk_container_memory_usage_bytes",
                "gauge",
                "memory.current of the container's cgroup in the guest.",
                s.memory_current as f64,
            ),
            (
                "husk_container_memory_working_set_bytes",
                "gauge",
                "Memory usage less inactive file pages (what CRI reports as the working set).",
                s.memory_current.saturating_sub(inactive) as f64,
            ),
            (
                "husk_container_pids",
                "gauge",
                "Processes in the container's cgroup.",
                s.pids_current as f64,
            ),
        ] {
            m.add(name, kind, help, &labels, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_one_help_and_type_and_labels_are_escaped() {
        let mut m = Metrics::default();
        m.add("a_total", "counter", "A.", r#"x="1""#, 1.0);
        m.add("a_total", "counter", "A.", r#"x="2""#, 2.5);
        m.add(
            "b",
            "gauge",
            "B.",
            &format!(r#"p="{}""#, esc("q\"\\\n")),
            0.0,
        );
        assert_eq!(
            m.render(),
            "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 1\na_total{x=\"2\"} 2.5\n\
             # HELP b B.\n# TYPE b gauge\nb{p=\"q\\\"\\\\\\n\"} 0\n"
        );
    }

    #[test]
    fn cpu_time_of_a_stat_line() {
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let line = "42 (vcpu 0) S 1 42 42 0 -1 4194560 0 0 0 0 250 50 0 0 20 0 1 0 100 0 0";
        assert_eq!(cpu_seconds(line), Some(300.0 / hz));
        assert_eq!(cpu_seconds("garbage"), None);
    }

    #[test]
    fn this_process_is_its_own_tree() {
        let me = std::process::id();
        let t = tree(me);
        assert_eq!(t.first().map(|(p, _)| *p), Some(me));
        assert!(memory(me).is_some_and(|(rss, pss)| rss > 0 && pss > 0));
    }
}
