//! virtio-blk, one request queue. A drive is one of:
//!
//! - A file, read-only or read-write: the disk is the file's whole sectors.
//! - An empty slot (size 0, I/O fails) that gets its backing file later (drive update), so
//!   containers created later in a pod get a rootfs without hotplug; a slot can be emptied
//!   and filled again.
//! - A layered drive (`--drive id=ID,layered`): a read-only disk of a fixed 1 PiB on which
//!   container image layers (one file each) are added and removed at run time, each at its
//!   own byte range, so one device carries all of a pod's layers and the guest carves a
//!   partition over each range (BLKPG). What no layer covers reads zeros: the guest's
//!   partition probe at boot finds nothing and logs no I/O error. A layer starts on a 1 MiB
//!   boundary past the highest range given so far (the first MiB is never a layer's, and a
//!   removed layer's range is never given again, so a stale guest partition cannot alias a
//!   new layer); its length is its file's rounded up to 4096 bytes, the tail past the file's
//!   end reading zeros. The capacity never changes, so adding and removing layers tells the
//!   guest nothing: the caller tells the guest's agent where each layer is. One guest read
//!   may span several layers and the holes between them (the guest merges requests across
//!   partitions); it is split at their edges. Writes fail with an I/O error; a flush is a
//!   no-op.
//!
//! Every request runs on the thread that notifies (a vCPU), under the device's lock, which
//! the control API takes too: a layer is never closed under a read in progress.
//!
//! The parts: `device` (the virtio device and its requests), `layers` (a layered drive's
//! table of layers: placement, removal, reads), `copy` (bounded copies between files and
//! guest memory).

mod copy;
mod device;
mod layers;

pub use device::{Block, BlockError};
pub use layers::LayerError;
