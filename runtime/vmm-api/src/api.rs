//! The control socket's protocol: one JSON request line in, one JSON answer line out.
//!
//! ```text
//! {"status":{}}                                       -> {"state":"running","ready_ms":..,"vcpus":[..],"devices":[..]}
//! {"stop":{}}                                         -> {"ok":true}
//! {"snapshot":{}} + a file                            -> {"ok":true}   (then the VMM exits 0)
//! {"update_drive":{"id":"slot1"}} + a file            -> {"ok":true}
//! {"update_drive":{"id":"slot1","path":"/x"}}         -> {"ok":true}   (path "" empties the slot)
//! {"add_layer":{"drive":"layers"}} + a file           -> {"start":1048576,"length":8192}
//! {"add_layer":{"drive":"layers","path":"/l.erofs"}}  -> {"start":1048576,"length":8192}
//! {"remove_layer":{"drive":"layers","start":1048576}} -> {"ok":true}
//! anything else                                       -> {"error":"..."}
//! ```
//!
//! A file for `update_drive` or `add_layer` comes either as a path, which the VMM opens
//! (from its root: a jailed VMM sees nothing but its sockets), or passed with the request
//! line (`SCM_RIGHTS` on the line's bytes; exactly one file, and no path). A writable drive's
//! file must be open for reading and writing.
//!
//! `add_layer` and `remove_layer` work on a layered drive (`--drive id=ID,layered`): one
//! read-only disk on which each image layer file sits at its own byte range, the rest reading
//! zeros. A layer starts on a 1 MiB boundary past every range given before in the VM's life
//! (a removed layer's range is never given again) and is its file's length rounded up to
//! 4096 bytes (the bytes past the file's end read zeros).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A request to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// State, guest readiness, vCPU exits and registers, each device's driver status.
    Status {},
    /// The same without the register sample, which kicks each vCPU out of the guest: what a
    /// metrics scrape asks for.
    Metrics {},
    /// Stop the VM (the VMM exits 0).
    Stop {},
    /// Give drive `id` a new backing file: `path`, or the file passed with the request when
    /// there is no path; none when `path` is empty (the guest sees a media change).
    UpdateDrive {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
    },
    /// Put the image file `path` (or the file passed with the request when there is no
    /// path) on layered drive `drive`, read-only, at a new range (the answer is a
    /// [`Layer`]).
    AddLayer {
        drive: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
    },
    /// Take the layer that starts at byte `start` off layered drive `drive` (its range reads
    /// zeros from then on).
    RemoveLayer { drive: String, start: u64 },
    /// Pause the VM and write it, at rest, to the file passed with the request (a VM
    /// template: its guest memory from byte 0, then its vCPUs', VM's and devices' state);
    /// the VMM then exits 0. The vsock device tells the guest its connections are gone
    /// first (they belong to this VMM's process). A VM that cannot be snapshotted (a
    /// virtio-fs device, whose queues virtiofsd serves) is refused and runs on.
    Snapshot {},
}

/// Why a request line is not a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error(
        "unknown request (status, metrics, stop, update_drive, add_layer, remove_layer, snapshot)"
    )]
    Unknown,
    #[error("update_drive needs id, and path or a file passed with the request")]
    UpdateDriveArgs,
    #[error("add_layer needs drive, and path or a file passed with the request")]
    AddLayerArgs,
    #[error("remove_layer needs drive and start (a byte offset)")]
    RemoveLayerArgs,
}

impl Request {
    /// The request that empties drive slot `id`.
    pub fn eject(id: impl Into<String>) -> Self {
        Request::UpdateDrive {
            id: id.into(),
            path: Some(PathBuf::new()),
        }
    }

    /// Parses one request line, telling a line that is not JSON from an unknown request and
    /// from a known one with wrong arguments.
    pub fn parse(line: &str) -> Result<Request, RequestError> {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| RequestError::NotJson(e.to_string()))?;
        let serde_json::Value::Object(map) = &v else {
            return Err(RequestError::Unknown);
        };
        if map.contains_key("status") {
            Ok(Request::Status {})
        } else if map.contains_key("metrics") {
            Ok(Request::Metrics {})
        } else if map.contains_key("stop") {
            Ok(Request::Stop {})
        } else if map.contains_key("snapshot") {
            Ok(Request::Snapshot {})
        } else if let Some(args) = map.get("update_drive") {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Args {
                id: String,
                #[serde(default)]
                path: Option<PathBuf>,
            }
            let a = Args::deserialize(args).map_err(|_| RequestError::UpdateDriveArgs)?;
            Ok(Request::UpdateDrive {
                id: a.id,
                path: a.path,
            })
        } else if let Some(args) = map.get("add_layer") {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Args {
                drive: String,
                #[serde(default)]
                path: Option<PathBuf>,
            }
            let a = Args::deserialize(args).map_err(|_| RequestError::AddLayerArgs)?;
            Ok(Request::AddLayer {
                drive: a.drive,
                path: a.path,
            })
        } else if let Some(args) = map.get("remove_layer") {
            #[derive(Deserialize)]
            struct Args {
                drive: String,
                start: u64,
            }
            let a = Args::deserialize(args).map_err(|_| RequestError::RemoveLayerArgs)?;
            Ok(Request::RemoveLayer {
                drive: a.drive,
                start: a.start,
            })
        } else {
            Err(RequestError::Unknown)
        }
    }
}

/// The VMM's answer to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    /// The request failed; why.
    Error { error: String },
    /// The request was done.
    Ok { ok: bool },
    /// The answer to [`Request::Status`].
    Status(VmStatus),
    /// The answer to [`Request::AddLayer`].
    Layer(Layer),
}

impl Answer {
    pub fn ok() -> Self {
        Answer::Ok { ok: true }
    }

    pub fn error(e: impl std::fmt::Display) -> Self {
        Answer::Error {
            error: e.to_string(),
        }
    }
}

/// Where a layer sits on its layered drive, in bytes: `start` is a multiple of
/// [`LAYER_ALIGN`](crate::drives::LAYER_ALIGN), `length` of
/// [`LAYER_LENGTH_ALIGN`](crate::drives::LAYER_LENGTH_ALIGN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub start: u64,
    /// The layer file's length rounded up to 4096.
    pub length: u64,
}

/// What the VM is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// `running` (a VMM that has ended does not answer).
    pub state: String,
    /// Milliseconds from the VMM's start to the guest's "ready" signal, once it came.
    pub ready_ms: Option<u64>,
    pub vcpus: Vec<VcpuStatus>,
    pub devices: Vec<DeviceStatus>,
}

/// What one vCPU has been doing: a guest that never gets ready shows whether it still exits
/// to the VMM (and where) or sits inside KVM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuStatus {
    pub exits: u64,
    pub io_exits: u64,
    pub mmio_exits: u64,
    /// The last port or MMIO address the vCPU exited on: `port 0x3f8`, `mmio 0xd0000070`,
    /// or `none`.
    pub last_io: String,
    /// A sample of its registers, when the vCPU thread answered in time.
    pub regs: Option<VcpuRegs>,
}

/// A register sample of one vCPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuRegs {
    pub rip: String,
    pub cr0: String,
    pub cr3: String,
    pub cr4: String,
    /// KVM's multiprocessing state: runnable, halted, ...
    pub mp_state: String,
    pub tsc: u64,
    /// How far the armed LAPIC timer deadline is ahead of the TSC (negative: overdue); none
    /// when no deadline is armed.
    pub tsc_deadline_in: Option<i64>,
}

/// How far the guest's driver got with one device (the virtio status register).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub id: String,
    pub driver_status: u32,
    /// Payload bytes the device moved to the guest (block: read; net: received; vsock:
    /// packets in), since the VM started; none where data does not pass through the VMM
    /// (virtio-fs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_guest_bytes: Option<u64>,
    /// Payload bytes from the guest (block: written; net: sent; vsock: packets out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_guest_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_their_wire_form() {
        let cases = [
            (Request::Status {}, r#"{"status":{}}"#),
            (Request::Metrics {}, r#"{"metrics":{}}"#),
            (Request::Stop {}, r#"{"stop":{}}"#),
            (Request::Snapshot {}, r#"{"snapshot":{}}"#),
            (
                Request::UpdateDrive {
                    id: "slot1".into(),
                    path: Some("/d.img".into()),
                },
                r#"{"update_drive":{"id":"slot1","path":"/d.img"}}"#,
            ),
            (
                Request::UpdateDrive {
                    id: "slot1".into(),
                    path: None,
                },
                r#"{"update_drive":{"id":"slot1"}}"#,
            ),
            (
                Request::eject("slot2"),
                r#"{"update_drive":{"id":"slot2","path":""}}"#,
            ),
            (
                Request::AddLayer {
                    drive: "layers".into(),
                    path: Some("/l/0.erofs".into()),
                },
                r#"{"add_layer":{"drive":"layers","path":"/l/0.erofs"}}"#,
            ),
            (
                Request::AddLayer {
                    drive: "layers".into(),
                    path: None,
                },
                r#"{"add_layer":{"drive":"layers"}}"#,
            ),
            (
                Request::RemoveLayer {
                    drive: "layers".into(),
                    start: 1 << 20,
                },
                r#"{"remove_layer":{"drive":"layers","start":1048576}}"#,
            ),
        ];
        for (req, wire) in cases {
            assert_eq!(serde_json::to_string(&req).unwrap(), wire);
            assert_eq!(Request::parse(wire).unwrap(), req);
        }
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        for bad in [r#"{"status""#, "", "status", "{\"stop\":}"] {
            assert!(matches!(Request::parse(bad), Err(RequestError::NotJson(_))));
        }
        for unknown in [r#"{"frobnicate":{}}"#, "{}", "[1, 2]", "7"] {
            assert_eq!(Request::parse(unknown), Err(RequestError::Unknown));
        }
        for bad in [
            r#"{"update_drive":{}}"#,
            r#"{"update_drive":{"path":"/x"}}"#,
            r#"{"update_drive":{"id":"slot1","file":"/x"}}"#,
            r#"{"update_drive":{"id":1,"path":"/x"}}"#,
            r#"{"update_drive":"slot1"}"#,
        ] {
            assert_eq!(Request::parse(bad), Err(RequestError::UpdateDriveArgs));
        }
        for bad in [
            r#"{"add_layer":{}}"#,
            r#"{"add_layer":{"drive":"layers","file":1}}"#,
            r#"{"add_layer":{"path":"/l.erofs"}}"#,
            r#"{"add_layer":{"id":"layers","path":"/l.erofs"}}"#,
            r#"{"add_layer":{"drive":7,"path":"/l.erofs"}}"#,
            r#"{"add_layer":"/l.erofs"}"#,
        ] {
            assert_eq!(
                Request::parse(bad),
                Err(RequestError::AddLayerArgs),
                "{bad}"
            );
        }
        for bad in [
            r#"{"remove_layer":{}}"#,
            r#"{"remove_layer":{"drive":"layers"}}"#,
            r#"{"remove_layer":{"start":0}}"#,
            r#"{"remove_layer":{"drive":"layers","start":-1}}"#,
            r#"{"remove_layer":{"drive":"layers","start":1.5}}"#,
            r#"{"remove_layer":{"drive":"layers","start":"1048576"}}"#,
            r#"{"remove_layer":{"drive":"layers","start":18446744073709551616}}"#,
            r#"{"remove_layer":[]}"#,
        ] {
            assert_eq!(
                Request::parse(bad),
                Err(RequestError::RemoveLayerArgs),
                "{bad}"
            );
        }
        let unknown = RequestError::Unknown.to_string();
        assert!(unknown.contains("add_layer, remove_layer"), "{unknown}");
    }

    #[test]
    fn answers_round_trip() {
        let status = Answer::Status(VmStatus {
            state: "running".into(),
            ready_ms: None,
            vcpus: vec![VcpuStatus {
                exits: 3,
                io_exits: 2,
                mmio_exits: 1,
                last_io: "port 0x3f8".into(),
                regs: Some(VcpuRegs {
                    rip: "0xffffffff81000000".into(),
                    cr0: "0x80050033".into(),
                    cr3: "0x1000".into(),
                    cr4: "0x20".into(),
                    mp_state: "halted".into(),
                    tsc: 10,
                    tsc_deadline_in: Some(-5),
                }),
            }],
            devices: vec![
                DeviceStatus {
                    id: "vsock".into(),
                    driver_status: 15,
                    to_guest_bytes: Some(1024),
                    from_guest_bytes: Some(0),
                },
                DeviceStatus {
                    id: "fs-husk-shared".into(),
                    driver_status: 15,
                    to_guest_bytes: None,
                    from_guest_bytes: None,
                },
            ],
        });
        let layer = Answer::Layer(Layer {
            start: 1 << 20,
            length: 8192,
        });
        for a in [Answer::ok(), Answer::error("no drive \"x\""), status, layer] {
            let wire = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<Answer>(&wire).unwrap(), a, "{wire}");
        }
        assert_eq!(
            serde_json::to_string(&Answer::ok()).unwrap(),
            r#"{"ok":true}"#
        );
        assert_eq!(
            serde_json::to_string(&Answer::Layer(Layer {
                start: 3 << 20,
                length: 4096
            }))
            .unwrap(),
            r#"{"start":3145728,"length":4096}"#
        );
    }
}
