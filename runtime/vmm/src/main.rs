//! `husk-vmm`: runs one microVM from command-line flags; exits when the guest ends.
//! Exit status: 0 guest reboot/poweroff or stop, 2 guest kernel panic, 3 guest crash,
//! 1 VMM error, 134 a panic of the VMM.

use clap::Parser;

fn main() {
    // virtio-queue logs an error for each malformed ring entry or notification, which a guest
    // can produce in a loop: off unless asked for (HUSK_VMM_LOG=virtio_queue=error). Our own
    // guest-triggered warnings are rate-limited instead.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,virtio_queue=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    // A panic ends the VMM with status 134 and its message in the log. (abort() would raise
    // SIGABRT, which PID 1 of a PID namespace, as the VMM is, does not get, and then call
    // syscalls its seccomp filters refuse.)
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        // SAFETY: _exit ends the process at once; nothing is left to unwind.
        unsafe { libc::_exit(134) }
    }));
    let cfg = husk_vmm::config::VmConfig::parse();
    let code = match husk_vmm::vmm::run(&cfg) {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            husk_vmm::log_err!("husk-vmm: {msg}");
            // Remove our sockets on this path too.
            for p in [cfg.vsock_uds.as_ref(), cfg.api_sock.as_ref()]
                .into_iter()
                .flatten()
            {
                let _ = std::fs::remove_file(p);
            }
            e.exit_code()
        }
    };
    // Ends every thread (vCPUs blocked in KVM_RUN included) and closes every fd.
    std::process::exit(code);
}
