//! Drive slots: the VMM declares its drives on the command line, in order, and the guest
//! kernel names them `/dev/vda`, `/dev/vdb`, ... in that order (virtio-mmio devices are
//! probed in the order of their `virtio_mmio.device=` arguments, drives first). A pod VM
//! declares empty slots up front and fills them through the control API; its image layers
//! share one layered drive, each at its own range.

/// A layered drive's size in bytes (`--drive id=ID,layered`): 1 PiB from boot on, whatever
/// layers it carries.
pub const LAYERED_CAPACITY: u64 = 1 << 50;
/// Layers start on multiples of this, past the first one (which is never a layer's).
pub const LAYER_ALIGN: u64 = 1 << 20;
/// A layer's length is its file's rounded up to a multiple of this.
pub const LAYER_LENGTH_ALIGN: u64 = 4096;

/// The most drives a VM can have: the guest names stop at `/dev/vdz`.
pub const MAX_DRIVES: usize = 26;

/// The id of pod drive slot `n` (`slot0`, `slot1`, ...).
pub fn slot_id(n: usize) -> String {
    format!("slot{n}")
}

/// The guest block device of the drive at `index` on the VMM's command line.
///
/// # Panics
/// If `index` is [`MAX_DRIVES`] or more.
pub fn guest_device(index: usize) -> String {
    assert!(
        index < MAX_DRIVES,
        "drive index {index} has no /dev/vdX name"
    );
    format!("/dev/vd{}", (b'a' + index as u8) as char)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_devices() {
        assert_eq!(slot_id(3), "slot3");
        assert_eq!(guest_device(0), "/dev/vda");
        assert_eq!(guest_device(7), "/dev/vdh");
        assert_eq!(guest_device(25), "/dev/vdz");
    }

    #[test]
    #[should_panic(expected = "no /dev/vdX name")]
    fn too_many_drives() {
        guest_device(MAX_DRIVES);
    }
}
