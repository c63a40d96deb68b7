//! The agent of a VM template: told before its VM is snapshotted, it refuses sandbox,
//! container and network requests until the clone restored from the snapshot is told
//! `Restored`. Every clone starts with the template's state, so it is then given what must
//! differ: the guest's RNG is reseeded from the host's entropy (two clones would otherwise
//! draw the same numbers) and its wall clock set (the template's stood still while it was a
//! file).

use std::{
    fs::OpenOptions,
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
};

use crate::error::AgentError;

/// How much entropy `Restored` takes (the kernel's input pool is 256 bits; more is mixed in
/// without being credited beyond it).
pub const ENTROPY_BYTES: std::ops::RangeInclusive<usize> = 32..=512;

/// `_IOW('R', 0x03, int[2])`: mix bytes into the input pool and credit their entropy.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Whether this VM is a template waiting to be restored.
#[derive(Debug, Default)]
pub struct TemplateGate {
    waiting: AtomicBool,
}

impl TemplateGate {
    /// The VM is about to be snapshotted: requests wait for `Restored` from now on.
    pub fn prepare(&self) {
        self.waiting.store(true, Ordering::SeqCst);
        tracing::info!(
            "this VM is a template: sandbox, container and network requests wait for Restored"
        );
    }

    /// Refuses `rpc` while the VM is a template not yet restored.
    pub fn check(&self, rpc: &str) -> Result<(), AgentError> {
        if self.waiting.load(Ordering::SeqCst) {
            return Err(AgentError::FailedPrecondition(format!(
                "{rpc}: this VM is a template: it takes requests once its clone is told Restored (its RNG reseeded, its clock set)"
            )));
        }
        Ok(())
    }

    /// The clone is restored: in a guest (`in_guest`), reseeds its RNG with `entropy` and sets
    /// its wall clock to `unix_time_ns`; as a host process (tests), leaves this machine's RNG
    /// and clock alone. Returns how far the clock was behind. Requests are taken from then on.
    pub fn restored(
        &self,
        entropy: &[u8],
        unix_time_ns: i64,
        in_guest: bool,
    ) -> Result<i64, AgentError> {
        if !self.waiting.load(Ordering::SeqCst) {
            return Err(AgentError::FailedPrecondition(
                "Restored: this VM is not a template (PrepareTemplate comes first)".into(),
            ));
        }
        if !ENTROPY_BYTES.contains(&entropy.len()) {
            return Err(AgentError::InvalidArgument(format!(
                "Restored: {} bytes of entropy, not {} to {}",
                entropy.len(),
                ENTROPY_BYTES.start(),
                ENTROPY_BYTES.end()
            )));
        }
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(AgentError::internal("reading the clock", &e));
        }
        let guest_ns = now.tv_sec * 1_000_000_000 + now.tv_nsec;
        let offset = unix_time_ns - guest_ns;
        if in_guest {
            reseed(entropy).map_err(|e| AgentError::internal("reseeding the RNG", &e))?;
            let ts = libc::timespec {
                tv_sec: unix_time_ns.div_euclid(1_000_000_000),
                tv_nsec: unix_time_ns.rem_euclid(1_000_000_000),
            };
            // SAFETY: clock_settime reads the timespec it is given.
            if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(AgentError::internal("setting the clock", &e));
            }
        }
        self.waiting.store(false, Ordering::SeqCst);
        tracing::info!(
            clock_offset_ms = offset / 1_000_000,
            reseeded = in_guest,
            "restored from a template"
        );
        Ok(offset)
    }
}

/// Mixes `entropy` into the kernel's input pool, credited, and reseeds the CRNG from it.
fn reseed(entropy: &[u8]) -> std::io::Result<()> {
    #[repr(C)]
    struct RandPoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; 512],
    }
    let mut info = RandPoolInfo {
        entropy_count: (entropy.len() * 8) as libc::c_int,
        buf_size: entropy.len() as libc::c_int,
        buf: [0; 512],
    };
    info.buf[..entropy.len()].copy_from_slice(entropy);
    let random = OpenOptions::new().write(true).open("/dev/urandom")?;
    for (req, arg) in [
        (RNDADDENTROPY, &info as *const RandPoolInfo as usize),
        (RNDRESEEDCRNG, 0),
    ] {
        // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes lie in `info`,
        // which outlives the call; RNDRESEEDCRNG takes no argument.
        if unsafe { libc::ioctl(random.as_raw_fd(), req, arg) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_wait_for_restored_and_restored_needs_a_template_and_entropy() {
        let gate = TemplateGate::default();
        assert!(gate.check("create_sandbox").is_ok());
        assert!(matches!(
            gate.restored(&[0; 32], 0, false),
            Err(AgentError::FailedPrecondition(_))
        ));
        gate.prepare();
        let e = gate.check("create_sandbox").unwrap_err();
        assert!(e.to_string().contains("this VM is a template"), "{e}");
        for bad in [0, 31, 513] {
            assert!(matches!(
                gate.restored(&vec![0; bad], 0, false),
                Err(AgentError::InvalidArgument(_))
            ));
        }
        assert!(gate.check("create_sandbox").is_err(), "still a template");
        // As a host process: nothing of this machine is touched; the offset is measured.
        let host_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        let offset = gate
            .restored(&[7; 32], host_ns + 60_000_000_000, false)
            .unwrap();
        assert!(
            (59_000_000_000..61_000_000_000).contains(&offset),
            "{offset}"
        );
        assert!(gate.check("create_sandbox").is_ok());
    }
}
