//! The VMM's jail (`--jail ROOT --uid U --gid G`), entered once the VM is built and before
//! any thread starts: what a guest that breaks a device model finds around it.
//!
//! - new mount, IPC, UTS and network namespaces (the PID namespace and the cgroup are the
//!   caller's to give at the VMM's birth); the mount namespace's root is `ROOT`, bound
//!   read-only, nosuid, nodev, noexec, after `pivot_root`, the host's tree detached: the
//!   VMM's sockets are all it can name;
//! - no capabilities (effective, permitted, inheritable, ambient, bounding), user `U`, group
//!   `G`, no supplementary groups, not dumpable;
//! - rlimits: open files bounded by what the vsock device may hold, file size by the largest
//!   file the VMM writes.
//!
//! Everything the VMM needs later is already open when it enters: /dev/kvm and the VM, the
//! drives, the tap, the serial log, /proc/self/smaps; files for new drives and layers reach
//! it over the control socket (`SCM_RIGHTS`).

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use crate::config::VmConfig;

/// Why the VMM could not enter its jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("entering the jail {root}: {step}")]
    Step {
        root: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the {what} {path} is not inside the jail {root}: a jailed VMM reaches only what is in its root")]
    Outside {
        what: &'static str,
        path: String,
        root: String,
    },
    #[error("the VMM's parent is gone (its lifeline, stdin, is closed)")]
    ParentGone,
}

/// Where and as whom the VMM runs once jailed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// The limits the jailed VMM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `RLIMIT_NOFILE`.
    pub open_files: u64,
    /// `RLIMIT_FSIZE`: no write reaches past this byte of any file (a drive's included, so
    /// it is at least the largest writable drive's size).
    pub file_size: u64,
}

/// The file size limit the VMM runs under (`u64::MAX` until it is jailed): a writable drive
/// file bigger than this is refused (writes past it would fail).
static FILE_SIZE_LIMIT: AtomicU64 = AtomicU64::new(u64::MAX);

/// See [`FILE_SIZE_LIMIT`].
pub fn file_size_limit() -> u64 {
    FILE_SIZE_LIMIT.load(Ordering::Relaxed)
}

/// Whether the VMM is jailed: then it can open no path (its root holds only sockets), and a
/// request that names a path is told to pass the file instead.
pub fn jailed() -> bool {
    file_size_limit() != u64::MAX
}

impl Jail {
    /// The jail `cfg` asks for, if any.
    pub fn of(cfg: &VmConfig) -> Option<Jail> {
        match (&cfg.jail, cfg.uid, cfg.gid) {
            (Some(root), Some(uid), Some(gid)) => Some(Jail {
                root: root.clone(),
                uid,
                gid,
            }),
            _ => None,
        }
    }

    /// The path inside the jail of `path`, a path under its root (`ROOT/api.sock` is
    /// `/api.sock`); `what` names it in the error.
    pub fn inside(&self, what: &'static str, path: &Path) -> Result<PathBuf, JailError> {
        match path.strip_prefix(&self.root) {
            Ok(rel) if !rel.as_os_str().is_empty() => Ok(Path::new("/").join(rel)),
            _ => Err(JailError::Outside {
                what,
                path: path.display().to_string(),
                root: self.root.display().to_string(),
            }),
        }
    }

    /// Enters the jail. The calling thread should be the process's only one: the mount
    /// namespace, the root and the bounding set are a thread's, and other threads would
    /// keep theirs (the VMM checks before it calls this).
    pub fn enter(&self, limits: Limits) -> Result<(), JailError> {
        let step = |step: &'static str| {
            let root = self.root.display().to_string();
            move |source: io::Error| JailError::Step { root, step, source }
        };
        let root = CString::new(self.root.as_os_str().as_bytes())
            .map_err(|_| step("the root's path")(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: plain syscalls on NUL-terminated strings that outlive them and on integers.
        unsafe {
            sys(libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET,
            ))
            .map_err(step("unshare"))?;
            // Nothing the VMM mounts or unmounts reaches the host, nor the reverse.
            sys(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))
            .map_err(step("making its mounts private"))?;
            sys(libc::mount(
                root.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))
            .map_err(step("binding the root"))?;
            sys(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ))
            .map_err(step("making the root read-only"))?;
            sys(libc::chdir(root.as_ptr())).map_err(step("chdir to the root"))?;
            // The old root ends up stacked on the new one, and is detached at once.
            sys(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as i32)
                .map_err(step("pivot_root"))?;
            sys(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))
                .map_err(step("detaching the host's tree"))?;
            sys(libc::chdir(c"/".as_ptr())).map_err(step("chdir to /"))?;

            // The bounding set while CAP_SETPCAP is still ours; then the user, which clears
            // the effective, permitted and ambient sets.
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                    && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                {
                    return Err(step("dropping the bounding set")(io::Error::last_os_error()));
                }
            }
            // A new, empty session keyring: none of the caller's keys stay possessed.
            if libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_JOIN_SESSION_KEYRING as libc::c_ulong,
                0 as libc::c_ulong,
            ) < 0
                && io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
            {
                return Err(step("a new session keyring")(io::Error::last_os_error()));
            }
            sys(libc::setgroups(0, std::ptr::null())).map_err(step("setgroups"))?;
            sys(libc::setresgid(self.gid, self.gid, self.gid)).map_err(step("setresgid"))?;
            sys(libc::setresuid(self.uid, self.uid, self.uid)).map_err(step("setresuid"))?;
            clear_capabilities().map_err(step("clearing the capability sets"))?;
            // A change of user resets both: the parent-death signal to none, dumpable to the
            // suid_dumpable sysctl.
            sys(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))
                .map_err(step("PR_SET_PDEATHSIG"))?;
            sys(libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)).map_err(step("PR_SET_DUMPABLE"))?;
            // The seccomp filters set it too; a jail without them (--seccomp off) keeps it.
            sys(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
                .map_err(step("PR_SET_NO_NEW_PRIVS"))?;
        }
        // The parent may have died while there was no death signal to tell.
        if lifeline_cut() {
            return Err(JailError::ParentGone);
        }
        set_limits(limits).map_err(step("setting its rlimits"))?;
        FILE_SIZE_LIMIT.store(limits.file_size, Ordering::Relaxed);
        Ok(())
    }
}

fn sys(r: libc::c_int) -> io::Result<()> {
    match r {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// Empties the effective, permitted and inheritable capability sets.
fn clear_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a version-3 header and its two data structs.
    sys(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as i32 })
}

/// Whether stdin is a pipe whose writers are all gone.
fn lifeline_cut() -> bool {
    let mut pfd = libc::pollfd {
        fd: 0,
        events: 0,
        revents: 0,
    };
    // SAFETY: poll on one pollfd that lives across the call, without waiting.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLHUP != 0
}

/// The rlimits of [`Limits`]; a write past the file size limit fails with EFBIG instead of
/// killing the VMM with SIGXFSZ.
fn set_limits(limits: Limits) -> io::Result<()> {
    let set = |resource, n: u64| {
        let l = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: setrlimit reads the struct.
        sys(unsafe { libc::setrlimit(resource, &l) })
    };
    // SAFETY: SIG_IGN for a signal with no handler of ours.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    set(libc::RLIMIT_FSIZE, limits.file_size)?;
    set(libc::RLIMIT_NOFILE, limits.open_files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{os::unix::process::CommandExt, process::Command};

    #[test]
    fn paths_inside_the_jail() {
        let j = Jail {
            root: "/run/vm/jail".into(),
            uid: 7,
            gid: 7,
        };
        let inside = |p: &str| j.inside("socket", Path::new(p));
        assert_eq!(
            inside("/run/vm/jail/api.sock").unwrap(),
            Path::new("/api.sock")
        );
        assert_eq!(inside("/run/vm/jail/a/b").unwrap(), Path::new("/a/b"));
        for outside in ["/run/vm/api.sock", "/run/vm/jailbreak/x", "/run/vm/jail"] {
            let e = inside(outside).unwrap_err().to_string();
            assert!(e.contains("is not inside the jail /run/vm/jail"), "{e}");
        }
    }

    /// The child side of `a_jailed_process_sees_only_its_root_and_holds_nothing`: run in
    /// its own process (the test binary again), where it enters the jail and reports what
    /// it finds, one `key value` line each.
    #[test]
    fn jailed_child() {
        let Some(root) = std::env::var_os("HUSK_JAIL_TEST_ROOT") else {
            return;
        };
        let j = Jail {
            root: root.into(),
            uid: 4_000_000_001,
            gid: 4_000_000_002,
        };
        // Opened before: still usable after.
        // (The harness runs this on a thread of its own: capabilities are a thread's.)
        let status = std::fs::File::open("/proc/thread-self/status").unwrap();
        j.enter(Limits {
            open_files: 100,
            file_size: 1 << 20,
        })
        .unwrap();
        let mut names: Vec<String> = std::fs::read_dir("/")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        // (On a line of its own: the harness's "test ... " has no newline.)
        println!("\nroot {}", names.join(","));
        // The root is writable by anyone on the host side (the test made it so): only the
        // read-only bind refuses this.
        println!(
            "create {}",
            match std::fs::File::create("/new") {
                Ok(_) => "ok".to_string(),
                Err(e) if e.raw_os_error() == Some(libc::EROFS) => "EROFS".to_string(),
                Err(e) => e.to_string(),
            }
        );
        println!("host-etc {}", Path::new("/etc/passwd").exists());
        let text = std::io::read_to_string(&status).unwrap();
        for key in [
            "Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:",
        ] {
            let line = text.lines().find(|l| l.starts_with(key)).unwrap();
            println!(
                "{} {}",
                key.trim_end_matches(':'),
                line[key.len()..]
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) };
        println!("nofile {} {}", l.rlim_cur, l.rlim_max);
        // SAFETY: as above.
        unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut l) };
        println!("fsize {} {}", l.rlim_cur, l.rlim_max);
        // SAFETY: plain prctl queries.
        unsafe {
            println!(
                "dumpable {}",
                libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0)
            );
            println!(
                "no_new_privs {}",
                libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
            );
            let mut sig = 0i32;
            libc::prctl(libc::PR_GET_PDEATHSIG, &mut sig as *mut i32, 0, 0, 0);
            println!("pdeathsig {sig}");
        }
    }

    fn jailed_child_report(root: &Path, stdin: std::process::Stdio) -> std::process::Output {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "jail::tests::jailed_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HUSK_JAIL_TEST_ROOT", root)
            .stdin(stdin)
            .process_group(0)
            .output()
            .unwrap()
    }

    fn require_root() {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "this test needs root: it makes mount namespaces and changes users"
        );
    }

    #[test]
    fn a_jailed_process_sees_only_its_root_and_holds_nothing() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("jail");
        std::fs::create_dir(&root).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::write(root.join("api.sock"), "").unwrap();
        std::fs::write(root.join("vsock.sock"), "").unwrap();
        // A live lifeline: a pipe whose writer this process holds until the child is done.
        let (r, w) = std::io::pipe().unwrap();
        let out = jailed_child_report(&root, r.into());
        drop(w);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: std::collections::HashMap<&str, &str> =
            stdout.lines().filter_map(|l| l.split_once(' ')).collect();
        let expect = [
            ("root", "api.sock,vsock.sock"),
            ("create", "EROFS"),
            ("host-etc", "false"),
            ("Uid", "4000000001 4000000001 4000000001 4000000001"),
            ("Gid", "4000000002 4000000002 4000000002 4000000002"),
            ("Groups", ""),
            ("CapInh", "0000000000000000"),
            ("CapPrm", "0000000000000000"),
            ("CapEff", "0000000000000000"),
            ("CapBnd", "0000000000000000"),
            ("CapAmb", "0000000000000000"),
            ("nofile", "100 100"),
            ("fsize", "1048576 1048576"),
            ("dumpable", "0"),
            ("no_new_privs", "1"),
            ("pdeathsig", "9"),
        ];
        for (k, v) in expect {
            assert_eq!(report.get(k).copied(), Some(v), "{k}\n{stdout}");
        }
        // The host's side: the root is untouched, nothing is left mounted on it.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(root.to_str().unwrap()), "{mounts}");
        assert!(!root.join("new").exists());
    }

    #[test]
    fn a_jail_whose_lifeline_is_cut_is_refused() {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        // A pipe whose only writer is closed before the child runs.
        let (r, w) = std::io::pipe().unwrap();
        drop(w);
        let out = jailed_child_report(dir.path(), r.into());
        assert!(!out.status.success());
        let output = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(output.contains("ParentGone"), "{output}");
    }
}
