//! cgroup v2: the per-container cgroup (create, procs, freeze, kill, remove) here;
//! [`resources`] translates OCI `LinuxResources` to interface files and applies them;
//! [`stats`] reads the statistics.
//!
//! Layout: `<cgroup_root>/<sandbox_id>/<container_id>`. The container cgroup is a leaf;
//! its ancestors below the root only delegate controllers (`cgroup.subtree_control`).

mod resources;
mod stats;

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::unistd::Pid;

pub use resources::{controller_of, resources_to_files, shares_to_weight};
pub use stats::{parse_flat_keyed, Stats};

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
