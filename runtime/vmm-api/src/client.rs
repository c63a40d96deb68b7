//! A blocking client for a VMM's control socket: one connection per request.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::api::{Answer, Layer, Request, VmStatus};

/// Why a request to the VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the VMM control socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("sending the request to the VMM")]
    Send(#[source] std::io::Error),
    #[error("reading the VMM's answer")]
    Receive(#[source] std::io::Error),
    #[error("the VMM's answer {0:?}")]
    Decode(String, #[source] serde_json::Error),
    #[error("the VMM refused: {0}")]
    Refused(String),
    #[error("the VMM answered {0:?} to a {1} request")]
    Unexpected(String, &'static str),
}

/// The control socket of one VMM.
#[derive(Debug, Clone)]
pub struct Client {
    sock: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for the socket at `sock` that waits at most `timeout` for each answer.
    pub fn new(sock: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            sock: sock.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// Sends one request and returns the VMM's answer as it came (an error answer included).
    pub fn request(&self, req: &Request) -> Result<Answer, ClientError> {
        self.request_with(req, None)
    }

    /// Sends one request, with `file` passed along (`SCM_RIGHTS`), and returns the VMM's
    /// answer as it came.
    pub fn request_with(&self, req: &Request, file: Option<&File>) -> Result<Answer, ClientError> {
        let s = UnixStream::connect(&self.sock)
            .map_err(|e| ClientError::Connect(self.sock.clone(), e))?;
        s.set_read_timeout(Some(self.timeout))
            .map_err(ClientError::Receive)?;
        let line = serde_json::to_string(req).expect("requests always serialize");
        let line = format!("{line}\n");
        let mut rest = line.as_bytes();
        if let Some(f) = file {
            let n = crate::fdpass::send_with_fd(&s, rest, f).map_err(ClientError::Send)?;
            rest = &rest[n..];
        }
        (&s).write_all(rest).map_err(ClientError::Send)?;
        let mut answer = String::new();
        BufReader::new(&s)
            .read_line(&mut answer)
            .map_err(ClientError::Receive)?;
        serde_json::from_str(&answer).map_err(|e| ClientError::Decode(answer, e))
    }

    /// Sends one request; an error answer is an error.
    pub fn call(&self, req: &Request) -> Result<Answer, ClientError> {
        self.call_with(req, None)
    }

    /// Sends one request with `file` passed along; an error answer is an error.
    pub fn call_with(&self, req: &Request, file: Option<&File>) -> Result<Answer, ClientError> {
        match self.request_with(req, file)? {
            Answer::Error { error } => Err(ClientError::Refused(error)),
            a => Ok(a),
        }
    }

    /// The VM's status.
    pub fn status(&self) -> Result<VmStatus, ClientError> {
        match self.call(&Request::Status {})? {
            Answer::Status(s) => Ok(s),
            other => Err(ClientError::Unexpected(format!("{other:?}"), "status")),
        }
    }

    /// The VM's counters (its status without register samples: the vCPUs are not kicked).
    pub fn metrics(&self) -> Result<VmStatus, ClientError> {
        match self.call(&Request::Metrics {})? {
            Answer::Status(s) => Ok(s),
            other => Err(ClientError::Unexpected(format!("{other:?}"), "metrics")),
        }
    }

    /// Stops the VM.
    pub fn stop(&self) -> Result<(), ClientError> {
        self.expect_ok(&Request::Stop {}, None, "stop")
    }

    /// Pauses the VM and writes it to `file` (open for writing; see [`Request::Snapshot`]);
    /// the VMM exits once it answered. The client's timeout must allow for writing the
    /// guest's memory.
    pub fn snapshot(&self, file: &File) -> Result<(), ClientError> {
        self.expect_ok(&Request::Snapshot {}, Some(file), "snapshot")
    }

    /// Gives drive `id` the backing file `file` (passed to the VMM: open for reading, and
    /// writing if the drive is writable).
    pub fn update_drive(&self, id: &str, file: &File) -> Result<(), ClientError> {
        let req = Request::UpdateDrive {
            id: id.into(),
            path: None,
        };
        self.expect_ok(&req, Some(file), "update_drive")
    }

    /// Empties drive `id`.
    pub fn eject(&self, id: &str) -> Result<(), ClientError> {
        self.expect_ok(&Request::eject(id), None, "update_drive")
    }

    /// Puts the image file `file` (passed to the VMM) on layered drive `drive`; returns
    /// where it sits.
    pub fn add_layer(&self, drive: &str, file: &File) -> Result<Layer, ClientError> {
        let req = Request::AddLayer {
            drive: drive.into(),
            path: None,
        };
        match self.call_with(&req, Some(file))? {
            Answer::Layer(l) => Ok(l),
            other => Err(ClientError::Unexpected(format!("{other:?}"), "add_layer")),
        }
    }

    /// Takes the layer that starts at byte `start` off layered drive `drive`.
    pub fn remove_layer(&self, drive: &str, start: u64) -> Result<(), ClientError> {
        let req = Request::RemoveLayer {
            drive: drive.into(),
            start,
        };
        self.expect_ok(&req, None, "remove_layer")
    }

    fn expect_ok(
        &self,
        req: &Request,
        file: Option<&File>,
        what: &'static str,
    ) -> Result<(), ClientError> {
        match self.call_with(req, file)? {
            Answer::Ok { ok: true } => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"), what)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-shot server that answers `answer` and hands back the request line it got
    /// (with a newline) and the length of each file passed with it.
    #[allow(clippy::type_complexity)]
    fn serve_files(
        answer: &'static str,
    ) -> (
        tempfile::TempDir,
        Client,
        std::thread::JoinHandle<(String, Vec<u64>)>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let (line, files) = crate::fdpass::recv_line_with_files(&s).unwrap();
            (&s).write_all(answer.as_bytes()).unwrap();
            let lens = files.iter().map(|f| f.metadata().unwrap().len()).collect();
            (format!("{line}\n"), lens)
        });
        (dir, Client::new(sock, Duration::from_secs(5)), t)
    }

    /// As [`serve_files`], for requests that pass no file.
    fn serve(answer: &'static str) -> (tempfile::TempDir, Client, std::thread::JoinHandle<String>) {
        let (d, c, t) = serve_files(answer);
        let t = std::thread::spawn(move || {
            let (line, files) = t.join().unwrap();
            assert!(files.is_empty(), "{line}: files passed");
            line
        });
        (d, c, t)
    }

    /// A file of `len` bytes.
    fn file_of(len: u64) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn typed_calls_send_their_request_and_read_the_answer() {
        let (_d, c, t) = serve_files("{\"ok\":true}\n");
        c.update_drive("slot2", &file_of(4096)).unwrap();
        assert_eq!(
            t.join().unwrap(),
            (
                "{\"update_drive\":{\"id\":\"slot2\"}}\n".to_string(),
                vec![4096]
            )
        );
        let (_d, c, t) = serve(
            "{\"state\":\"running\",\"ready_ms\":12,\"vcpus\":[],\"devices\":[{\"id\":\"vsock\",\"driver_status\":15}]}\n",
        );
        let st = c.status().unwrap();
        assert_eq!(t.join().unwrap(), "{\"status\":{}}\n");
        assert_eq!(st.ready_ms, Some(12));
        assert_eq!(st.devices[0].driver_status, 15);
        let (_d, c, t) = serve_files("{\"start\":2097152,\"length\":12288}\n");
        let l = c.add_layer("layers", &file_of(12000)).unwrap();
        assert_eq!(
            t.join().unwrap(),
            (
                "{\"add_layer\":{\"drive\":\"layers\"}}\n".to_string(),
                vec![12000]
            )
        );
        assert_eq!(
            l,
            Layer {
                start: 2 << 20,
                length: 12288
            }
        );
        let (_d, c, t) = serve("{\"ok\":true}\n");
        c.remove_layer("layers", 2 << 20).unwrap();
        assert_eq!(
            t.join().unwrap(),
            "{\"remove_layer\":{\"drive\":\"layers\",\"start\":2097152}}\n"
        );
    }

    #[test]
    fn refusals_and_garbage_are_errors() {
        let (_d, c, t) = serve("{\"error\":\"no drive \\\"x\\\"\"}\n");
        let e = c.eject("x").unwrap_err();
        t.join().unwrap();
        assert_eq!(e.to_string(), "the VMM refused: no drive \"x\"");
        let (_d, c, t) = serve("hello\n");
        assert!(matches!(c.stop(), Err(ClientError::Decode(..))));
        t.join().unwrap();
        let (_d, c, t) = serve("{\"ok\":true}\n");
        assert!(matches!(c.status(), Err(ClientError::Unexpected(..))));
        t.join().unwrap();
        let (_d, c, t) = serve_files("{\"ok\":true}\n");
        let e = c.add_layer("layers", &file_of(1)).unwrap_err();
        assert!(matches!(e, ClientError::Unexpected(_, "add_layer")), "{e}");
        t.join().unwrap();
        let (_d, c, t) = serve_files("{\"error\":\"drive \\\"slot1\\\" is not layered\"}\n");
        let e = c.add_layer("slot1", &file_of(1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the VMM refused: drive \"slot1\" is not layered"
        );
        t.join().unwrap();
        let gone = Client::new("/nonexistent/api.sock", Duration::from_secs(1));
        assert!(matches!(gone.stop(), Err(ClientError::Connect(..))));
    }
}
