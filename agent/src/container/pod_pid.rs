//! The pod's shared PID namespace (a pod with `shareProcessNamespace`, CRI's NamespaceMode
//! POD for PID): one PID namespace in the guest for the containers that ask for it, whose
//! PID 1 is the pod's pause process, as the pause container is under runc. The pause process
//! is the agent re-executed ([`VERB`]); it forks PID 1 of a new PID namespace, which reaps
//! orphans until it is killed with the pod.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
};

use nix::{
    sched::CloneFlags,
    sys::signal::{self, SigHandler, Signal},
    unistd::{ForkResult, Pid},
};

/// The agent's re-exec verb of the pause process.
pub const VERB: &str = "__pod-pause";

/// The pod's PID namespace, started on first use.
#[derive(Debug, Default)]
pub struct PodPidNamespace {
    pause: Mutex<Option<Pid>>,
}

impl PodPidNamespace {
    /// `/proc/<pause>/ns/pid`, starting the pause process (with `agent_exe`) the first time.
    pub fn path(&self, agent_exe: &Path) -> std::io::Result<PathBuf> {
        let mut pause = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = *pause {
            if signal::kill(pid, None).is_ok() {
                return Ok(PathBuf::from(format!("/proc/{pid}/ns/pid")));
            }
        }
        let mut child = Command::new(agent_exe)
            .arg0("pause")
            .arg(VERB)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        // The forking parent exits once it has said who PID 1 is; the agent reaps it.
        let _ = child.wait();
        let pid: i32 = line
            .trim()
            .parse()
            .map_err(|_| std::io::Error::other(format!("the pause process said {line:?}")))?;
        *pause = Some(Pid::from_raw(pid));
        Ok(PathBuf::from(format!("/proc/{pid}/ns/pid")))
    }

    /// Kills the pause process (and with it anything left in the namespace).
    pub fn stop(&self) {
        if let Some(pid) = self.pause.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = signal::kill(pid, Signal::SIGKILL);
        }
    }
}

extern "C" fn on_child(_: libc::c_int) {}

/// The pause verb: a new PID namespace whose PID 1 reaps orphans and waits to be killed. The
/// parent prints PID 1's pid (in the caller's namespace) and exits.
pub fn run() -> ! {
    let fail = |what: &str, e: nix::Error| -> ! {
        eprintln!("husk-agent pod pause: {what}: {e}");
        std::process::exit(1)
    };
    if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWPID) {
        fail("creating the PID namespace", e)
    }
    // SAFETY: this process has one thread (just exec'd), so fork is safe.
    match unsafe { nix::unistd::fork() } {
        Err(e) => fail("forking PID 1", e),
        Ok(ForkResult::Parent { child }) => {
            println!("{child}");
            std::process::exit(0)
        }
        Ok(ForkResult::Child) => {
            let _ = nix::unistd::setsid();
            // Its name in ps, as the pause container's under runc.
            let _ = nix::sys::prctl::set_name(c"pause");
            // SAFETY: a handler that does nothing, so pause() returns on SIGCHLD.
            let _ = unsafe { signal::signal(Signal::SIGCHLD, SigHandler::Handler(on_child)) };
            loop {
                // Reap every orphan; with none left, sleep until the next SIGCHLD.
                if let Err(nix::errno::Errno::ECHILD) = nix::sys::wait::waitpid(None::<Pid>, None) {
                    nix::unistd::pause();
                }
            }
        }
    }
}
