//! The control API server: one request per connection on the control socket, a JSON line
//! in and a JSON line out, typed by `husk_vmm_api`.

use std::{
    fs::File,
    io::Write,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use husk_vmm_api::{fdpass, Answer, DeviceStatus, Layer, Request, VmStatus};

use crate::{
    device_manager::{lock, Transports},
    devices::{
        legacy::LegacyBus,
        virtio::{mmio::MmioTransport, FileArg},
    },
    vmm::Event,
    vstate::{
        pause::Pause,
        snapshot::{Snapshot, VcpuState, VmState},
        vcpu_stats::VcpuStats,
        vm::Vm,
    },
};

/// How long the vCPUs have to pause for a snapshot (a vCPU thread kicked out of KVM_RUN
/// pauses in microseconds; the nested testbed's are slower).
const PAUSE_WAIT: Duration = Duration::from_secs(5);

/// Errors setting up the control API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the control socket.
    #[error("the control socket {0}")]
    Bind(std::path::PathBuf, #[source] std::io::Error),
}

/// Listens on the control socket `path` (replacing a stale one).
pub(crate) fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| ApiError::Bind(path.to_path_buf(), e))
}

/// What the control API reads and acts on.
#[derive(Clone)]
pub(crate) struct ApiContext {
    pub(crate) transports: Transports,
    pub(crate) legacy: Arc<Mutex<LegacyBus>>,
    /// Where `stop` goes.
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) stats: Arc<Vec<VcpuStats>>,
    /// What a snapshot pauses and reads (None: the VM cannot be snapshotted).
    pub(crate) snapshot: Option<SnapshotSource>,
}

/// The VM and its vCPUs' pause, for the snapshot request.
#[derive(Clone)]
pub(crate) struct SnapshotSource {
    pub(crate) vm: Arc<Vm>,
    pub(crate) pause: Arc<Pause>,
    /// The MSRs each vCPU saves, listed when the VM started (the I/O thread's seccomp
    /// filter keeps /dev/kvm's ioctls from it), or why they could not be.
    pub(crate) msrs: Result<Vec<u32>, String>,
}

/// Serves one request of the control API: a JSON line in (and the file passed with it, if
/// any), a JSON line out.
pub(crate) fn serve(l: &UnixListener, ctx: &ApiContext) {
    let Ok((s, _)) = l.accept() else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let answer = match fdpass::recv_line_with_files(&s) {
        Ok((line, files)) => answer(&line, files, ctx),
        Err(e) => Answer::error(format!("reading the request: {e}")),
    };
    let answer = serde_json::to_string(&answer).expect("answers always serialize");
    let mut w = &s;
    let _ = writeln!(w, "{answer}");
}

/// The answer to one request line, and the files passed with it.
fn answer(line: &str, mut files: Vec<File>, ctx: &ApiContext) -> Answer {
    #[cfg(feature = "seccomp-trigger")]
    match crate::seccomp::trigger::parse(line) {
        Some("io") => crate::seccomp::trigger::forbidden_syscall(),
        Some(_) => {
            crate::seccomp::trigger::ask_vcpu();
            if let Some(s) = ctx.stats.first() {
                s.kick();
            }
            return Answer::Ok { ok: true };
        }
        None => {}
    }
    let req = match Request::parse(line) {
        Ok(r) => r,
        Err(e) => return Answer::error(e),
    };
    if files.len() > 1 {
        return Answer::error(format!(
            "{} files passed with one request: at most one",
            files.len()
        ));
    }
    let mut passed = files.pop();
    let takes_file = matches!(
        req,
        Request::UpdateDrive { path: None, .. }
            | Request::AddLayer { path: None, .. }
            | Request::Snapshot {}
    );
    match (&passed, takes_file) {
        (Some(_), false) => {
            return Answer::error("a file was passed with a request that takes none (a request with a path takes no file)")
        }
        (None, true) => {
            return Answer::error("no path, and no file passed with the request: one of them is needed")
        }
        _ => {}
    }
    if crate::jail::jailed()
        && matches!(
            &req,
            Request::UpdateDrive { path: Some(p), .. } | Request::AddLayer { path: Some(p), .. }
                if !p.as_os_str().is_empty()
        )
    {
        return Answer::error(
            "the VMM is jailed and can open no path: pass the file with the request (SCM_RIGHTS)",
        );
    }
    if let (Request::Snapshot {}, Some(file)) = (&req, passed.as_mut()) {
        return snapshot(ctx, file);
    }
    // The file the request names: passed, or a path (empty: none).
    let file_arg = |path: Option<PathBuf>| match path {
        None => passed.map(FileArg::Passed),
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(FileArg::Path(p)),
    };
    match req {
        Request::Status {} => Answer::Status(status(ctx, VcpuStats::status)),
        Request::Metrics {} => Answer::Status(status(ctx, VcpuStats::counts)),
        Request::Stop {} => {
            let _ = ctx.events.send(Event::Stop);
            Answer::ok()
        }
        // Taken above, with the file.
        Request::Snapshot {} => unreachable!("the snapshot request is answered above"),
        Request::UpdateDrive { id, path } => {
            let t = match drive(ctx, &id) {
                Ok(t) => t,
                Err(a) => return a,
            };
            let mut t = lock(t);
            match t.device_mut().update_backing(file_arg(path)) {
                Ok(()) => {
                    t.config_changed();
                    Answer::ok()
                }
                Err(e) => Answer::error(e),
            }
        }
        // The capacity does not change: the guest is not told.
        Request::AddLayer { drive: id, path } => {
            let t = match drive(ctx, &id) {
                Ok(t) => t,
                Err(a) => return a,
            };
            let Some(file) = file_arg(path) else {
                return Answer::error("add_layer: an empty path");
            };
            let name = file.name();
            let placed = lock(t).device_mut().add_layer(file);
            match placed {
                Ok(r) => {
                    tracing::info!(drive = %id, file = %name, "layer at {r:?}");
                    Answer::Layer(Layer {
                        start: r.start,
                        length: r.end - r.start,
                    })
                }
                Err(e) => Answer::error(e),
            }
        }
        Request::RemoveLayer { drive: id, start } => {
            let t = match drive(ctx, &id) {
                Ok(t) => t,
                Err(a) => return a,
            };
            let removed = lock(t).device_mut().remove_layer(start);
            match removed {
                Ok(()) => {
                    tracing::info!(drive = %id, "layer at {start} removed");
                    Answer::ok()
                }
                Err(e) => Answer::error(e),
            }
        }
    }
}

/// Pauses the VM and writes its template to `file`, then stops the VMM; a VM that cannot be
/// snapshotted is refused before it is paused, and one whose snapshot fails once paused is
/// resumed (its vsock connections gone: the guest was told before the failure).
fn snapshot(ctx: &ApiContext, file: &mut File) -> Answer {
    let Some(src) = &ctx.snapshot else {
        return Answer::error("snapshot: this VM cannot be paused");
    };
    for (id, t) in ctx.transports.iter() {
        if let Some(why) = lock(t).device_mut().snapshot_refusal() {
            return Answer::error(format!("snapshot refused: device {id}: {why}"));
        }
    }
    let msrs = match &src.msrs {
        Ok(m) => m.clone(),
        Err(e) => return Answer::error(format!("snapshot: {e}")),
    };
    let started = std::time::Instant::now();
    let vcpus = match src.pause.pause(&ctx.stats, msrs, PAUSE_WAIT) {
        Ok(v) => v,
        Err(e) => return Answer::error(format!("snapshot: pausing the VM: {e}")),
    };
    let paused = started.elapsed();
    match write_template(ctx, &src.vm, vcpus, file) {
        Ok(bytes) => {
            crate::log_line!(
                "snapshot: paused in {} us, {} MiB of guest memory and the state written in {} ms; stopping",
                paused.as_micros(),
                bytes >> 20,
                started.elapsed().as_millis()
            );
            let _ = ctx.events.send(Event::Stop);
            Answer::ok()
        }
        Err(e) => {
            src.pause.resume();
            Answer::error(format!("snapshot: {e} (the VM was resumed)"))
        }
    }
}

/// Writes the template of the paused VM `vm`, whose vCPUs saved `vcpus`: each device readied
/// and its transport's state, the VM's state, guest memory. Returns guest memory's size.
fn write_template(
    ctx: &ApiContext,
    vm: &Vm,
    vcpus: Vec<VcpuState>,
    file: &mut File,
) -> Result<u64, crate::vstate::snapshot::SnapshotError> {
    let devices = ctx
        .transports
        .iter()
        .map(|(id, t)| {
            let mut t = lock(t);
            t.device_mut().before_snapshot();
            (id.clone(), t.state())
        })
        .collect();
    let state = VmState::save(&vm.fd)?;
    let memory_bytes = vm.memory_len();
    Snapshot::new(memory_bytes, vcpus, state, devices).write(vm, file)?;
    Ok(memory_bytes)
}

/// The VM's status, each vCPU's from `vcpu`.
fn status(ctx: &ApiContext, vcpu: fn(&VcpuStats) -> husk_vmm_api::api::VcpuStatus) -> VmStatus {
    VmStatus {
        state: "running".into(),
        ready_ms: lock(&ctx.legacy)
            .ready_after()
            .map(|d| d.as_millis() as u64),
        vcpus: ctx.stats.iter().map(vcpu).collect(),
        devices: ctx
            .transports
            .iter()
            .map(|(id, t)| {
                let t = lock(t);
                let io = t.io_counters();
                DeviceStatus {
                    id: id.clone(),
                    driver_status: t.driver_status(),
                    to_guest_bytes: io.map(|c| c.to_guest),
                    from_guest_bytes: io.map(|c| c.from_guest),
                }
            })
            .collect(),
    }
}

/// The device with id `id`, or the answer that there is none.
fn drive<'a>(ctx: &'a ApiContext, id: &str) -> Result<&'a Arc<Mutex<MmioTransport>>, Answer> {
    match ctx.transports.iter().find(|(i, _)| i == id) {
        Some((_, t)) => Ok(t),
        None => Err(Answer::error(format!("no drive {id:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Instant};

    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::{
        arch::layout,
        devices::virtio::{block::Block, mmio::MmioTransport, vsock::Vsock, IrqLine, VirtioDevice},
        vstate::vcpu_stats::ExitKind,
    };

    /// The control API's inputs: a block drive, an empty drive slot, a vsock device, a
    /// layered drive.
    struct Api {
        _dir: tempfile::TempDir,
        disk: PathBuf,
        ctx: ApiContext,
        events_rx: mpsc::Receiver<Event>,
    }

    impl Api {
        fn new() -> Api {
            let dir = tempfile::tempdir().unwrap();
            let disk = dir.path().join("disk.img");
            std::fs::write(&disk, vec![0u8; 8192]).unwrap();
            let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)])
                .unwrap();
            let devices: Vec<(String, Box<dyn VirtioDevice>)> = vec![
                (
                    "rootfs".into(),
                    Box::new(Block::new("rootfs", Some(&disk), true).unwrap()),
                ),
                (
                    "slot1".into(),
                    Box::new(Block::new("slot1", None, true).unwrap()),
                ),
                (
                    "vsock".into(),
                    Box::new(Vsock::new(3, &dir.path().join("v.sock")).unwrap()),
                ),
                ("layers".into(), Box::new(Block::layered("layers"))),
            ];
            let transports = devices
                .into_iter()
                .map(|(id, d)| {
                    let irq = IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
                    (
                        id,
                        Arc::new(Mutex::new(MmioTransport::new(d, mem.clone(), irq))),
                    )
                })
                .collect();
            let (exit_tx, _) = mpsc::channel();
            let legacy = LegacyBus::new(
                EventFd::new(0).unwrap(),
                Box::new(std::io::sink()),
                exit_tx,
                Instant::now(),
            );
            let (events, events_rx) = mpsc::channel();
            Api {
                _dir: dir,
                disk,
                ctx: ApiContext {
                    transports: Arc::new(transports),
                    legacy: Arc::new(Mutex::new(legacy)),
                    events,
                    stats: Arc::new((0..2).map(|_| VcpuStats::default()).collect()),
                    snapshot: None,
                },
                events_rx,
            }
        }

        fn ask(&self, line: &str) -> serde_json::Value {
            self.ask_with(line, Vec::new())
        }

        /// Asks `line` with `files` passed along.
        fn ask_with(&self, line: &str, files: Vec<File>) -> serde_json::Value {
            serde_json::to_value(answer(line, files, &self.ctx)).unwrap()
        }

        fn error(&self, line: &str) -> String {
            let a = self.ask(line);
            a["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{line} answered {a} without an error"))
                .to_string()
        }

        /// A register of device `i`'s mmio window.
        fn reg(&self, i: usize, off: u64) -> u32 {
            let mut d = [0u8; 4];
            lock(&self.ctx.transports[i].1).read(off, &mut d);
            u32::from_le_bytes(d)
        }
    }

    #[test]
    fn api_refuses_unknown_and_malformed_requests() {
        let api = Api::new();
        assert!(api
            .error(r#"{"frobnicate":{}}"#)
            .contains("unknown request"));
        assert!(api.error("{}").contains("unknown request"));
        assert!(api.error("[1, 2]").contains("unknown request"));
        for bad in [r#"{"status""#, "", "status", "{\"stop\":}"] {
            assert!(api.error(bad).starts_with("not JSON"), "{bad:?}");
        }
        assert!(api.events_rx.try_recv().is_err(), "nothing was stopped");
    }

    #[test]
    fn api_update_drive() {
        let api = Api::new();
        let disk = api.disk.display().to_string();
        // Missing or mistyped fields.
        for bad in [
            r#"{"update_drive":{}}"#.to_string(),
            format!(r#"{{"update_drive":{{"path":"{disk}"}}}}"#),
            format!(r#"{{"update_drive":{{"id":1,"path":"{disk}"}}}}"#),
            r#"{"update_drive":"slot1"}"#.to_string(),
        ] {
            assert_eq!(
                api.error(&bad),
                "update_drive needs id, and path or a file passed with the request",
                "{bad}"
            );
        }
        // A file: a path or one passed, never both, never neither, never two.
        let open = || File::open(&api.disk).unwrap();
        let e = api.error(r#"{"update_drive":{"id":"slot1"}}"#);
        assert!(e.starts_with("no path, and no file passed"), "{e}");
        let with_path = format!(r#"{{"update_drive":{{"id":"slot1","path":"{disk}"}}}}"#);
        let e = api.ask_with(&with_path, vec![open()]);
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .starts_with("a file was passed with a request that takes none"),
            "{e}"
        );
        let e = api.ask_with(r#"{"update_drive":{"id":"slot1"}}"#, vec![open(), open()]);
        assert_eq!(e["error"], "2 files passed with one request: at most one");
        let e = api.ask_with(r#"{"status":{}}"#, vec![open()]);
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .starts_with("a file was passed"),
            "{e}"
        );
        // An unknown drive, a device that is not a drive, a file that does not open.
        let e = api.error(&format!(
            r#"{{"update_drive":{{"id":"nope","path":"{disk}"}}}}"#
        ));
        assert_eq!(e, r#"no drive "nope""#);
        let e = api.error(&format!(
            r#"{{"update_drive":{{"id":"vsock","path":"{disk}"}}}}"#
        ));
        assert_eq!(e, "not a block device");
        let e = api.error(r#"{"update_drive":{"id":"slot1","path":"/nonexistent/disk.img"}}"#);
        assert!(
            e.contains("opening the drive file /nonexistent/disk.img"),
            "{e}"
        );
        // None of that changed a device's configuration.
        for i in 0..3 {
            assert_eq!(api.reg(i, 0xfc), 0, "config generation of device {i}");
        }
        // Filling the slot: the capacity and config generation move, the driver is told.
        let a = api.ask(&format!(
            r#"{{"update_drive":{{"id":"slot1","path":"{disk}"}}}}"#
        ));
        assert_eq!(a, serde_json::json!({"ok": true}));
        assert_eq!(api.reg(1, 0x100), 16, "8 KiB in sectors");
        assert_eq!(api.reg(1, 0xfc), 1);
        assert_eq!(api.reg(1, 0x60) & 2, 2, "a configuration-change interrupt");
        // Emptying it again.
        let a = api.ask(r#"{"update_drive":{"id":"slot1","path":""}}"#);
        assert_eq!(a, serde_json::json!({"ok": true}));
        assert_eq!(api.reg(1, 0x100), 0);
        // And filling it with a file passed with the request (the VMM opens nothing).
        let a = api.ask_with(r#"{"update_drive":{"id":"slot1"}}"#, vec![open()]);
        assert_eq!(a, serde_json::json!({"ok": true}));
        assert_eq!(api.reg(1, 0x100), 16);
        assert_eq!(api.reg(1, 0xfc), 3);
    }

    #[test]
    fn api_add_and_remove_layers() {
        let api = Api::new();
        let disk = api.disk.display().to_string();
        let add = |drive: &str, path: &str| {
            format!(r#"{{"add_layer":{{"drive":"{drive}","path":"{path}"}}}}"#)
        };
        let remove = |drive: &str, start: u64| {
            format!(r#"{{"remove_layer":{{"drive":"{drive}","start":{start}}}}}"#)
        };
        // Missing or mistyped fields.
        for bad in [
            r#"{"add_layer":{}}"#.to_string(),
            format!(r#"{{"add_layer":{{"path":"{disk}"}}}}"#),
        ] {
            assert_eq!(
                api.error(&bad),
                "add_layer needs drive, and path or a file passed with the request",
                "{bad}"
            );
        }
        let e = api.error(r#"{"add_layer":{"drive":"layers"}}"#);
        assert!(e.starts_with("no path, and no file passed"), "{e}");
        for bad in [
            r#"{"remove_layer":{"drive":"layers"}}"#,
            r#"{"remove_layer":{"drive":"layers","start":-1}}"#,
        ] {
            assert_eq!(
                api.error(bad),
                "remove_layer needs drive and start (a byte offset)",
                "{bad}"
            );
        }
        // An unknown drive, a drive that is not layered, a device that is not a drive, a
        // file that does not open, an empty file.
        assert_eq!(api.error(&add("nope", &disk)), r#"no drive "nope""#);
        assert_eq!(api.error(&remove("nope", 0)), r#"no drive "nope""#);
        assert_eq!(
            api.error(&add("rootfs", &disk)),
            r#"drive "rootfs" is not layered"#
        );
        assert_eq!(
            api.error(&remove("slot1", 1 << 20)),
            r#"drive "slot1" is not layered"#
        );
        assert_eq!(api.error(&add("vsock", &disk)), "not a block device");
        let e = api.error(&add("layers", "/nonexistent/l.erofs"));
        assert!(
            e.starts_with("opening the layer file /nonexistent/l.erofs: "),
            "{e}"
        );
        let empty = api.disk.with_file_name("empty.erofs");
        std::fs::write(&empty, b"").unwrap();
        let e = api.error(&add("layers", &empty.display().to_string()));
        assert!(e.ends_with("empty.erofs is empty"), "{e}");
        // Layers go at 1 MiB boundaries past each other, as long as the file rounded up.
        let a = api.ask(&add("layers", &disk));
        assert_eq!(a, serde_json::json!({"start": 1 << 20, "length": 8192}));
        let a = api.ask(&add("layers", &disk));
        assert_eq!(a, serde_json::json!({"start": 2 << 20, "length": 8192}));
        // Removal, once.
        assert_eq!(
            api.ask(&remove("layers", 2 << 20)),
            serde_json::json!({"ok": true})
        );
        assert_eq!(
            api.error(&remove("layers", 2 << 20)),
            "no layer starts at byte 2097152"
        );
        assert_eq!(
            api.error(&remove("layers", 12345)),
            "no layer starts at byte 12345"
        );
        // A removed range is not given again.
        let a = api.ask(&add("layers", &disk));
        assert_eq!(a["start"], 3 << 20);
        // A layer passed with the request.
        let a = api.ask_with(
            r#"{"add_layer":{"drive":"layers"}}"#,
            vec![File::open(&api.disk).unwrap()],
        );
        assert_eq!(a, serde_json::json!({"start": 4 << 20, "length": 8192}));
        // The capacity never moved, and the guest was told nothing.
        let sectors = (1u64 << 50) / 512;
        assert_eq!(api.reg(3, 0x100), sectors as u32);
        assert_eq!(api.reg(3, 0x104), (sectors >> 32) as u32);
        assert_eq!(api.reg(3, 0xfc), 0, "config generation");
        assert_eq!(api.reg(3, 0x60), 0, "no interrupt");
        // A layered drive has no backing file to update.
        let e = api.error(&format!(
            r#"{{"update_drive":{{"id":"layers","path":"{disk}"}}}}"#
        ));
        assert!(e.starts_with(r#"drive "layers" is layered"#), "{e}");
        assert!(api.events_rx.try_recv().is_err());
    }

    #[test]
    fn api_status_and_stop() {
        let api = Api::new();
        api.ctx.stats[0].record(ExitKind::Port, 0x3f8);
        api.ctx.stats[1].record(ExitKind::Mmio, layout::MMIO_BASE + 0x70);
        let st = api.ask(r#"{"status":{}}"#);
        assert_eq!(st["state"], "running");
        assert!(st["ready_ms"].is_null(), "not ready yet: {st}");
        let vcpus = st["vcpus"].as_array().expect("vcpus");
        assert_eq!(vcpus.len(), 2);
        for v in vcpus {
            for k in ["exits", "io_exits", "mmio_exits", "last_io", "regs"] {
                assert!(v.get(k).is_some(), "vcpu field {k} missing: {v}");
            }
            assert!(v["regs"].is_null(), "no vCPU thread to sample");
        }
        assert_eq!(vcpus[0]["io_exits"], 1);
        assert_eq!(vcpus[0]["last_io"], "port 0x3f8");
        assert_eq!(vcpus[1]["mmio_exits"], 1);
        assert_eq!(vcpus[1]["last_io"], "mmio 0xd0000070");
        let devices = st["devices"].as_array().expect("devices");
        let ids: Vec<_> = devices.iter().map(|d| d["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["rootfs", "slot1", "vsock", "layers"]);
        assert!(devices.iter().all(|d| d["driver_status"] == 0));
        // The guest signals ready and acknowledges a device.
        lock(&api.ctx.legacy).write(crate::devices::legacy::BOOT_TIMER_PORT, &[1]);
        lock(&api.ctx.transports[2].1).write(0x70, &1u32.to_le_bytes());
        let st = api.ask(r#"{"status":{}}"#);
        assert!(st["ready_ms"].is_u64(), "{st}");
        assert_eq!(st["devices"][2]["driver_status"], 1);
        assert!(api.events_rx.try_recv().is_err());
        // Stop.
        assert_eq!(api.ask(r#"{"stop":{}}"#), serde_json::json!({"ok": true}));
        assert!(matches!(api.events_rx.try_recv(), Ok(Event::Stop)));
    }
}
