//! A layered drive's layers: image files opened read-only, each at its own byte range of a
//! fixed-size disk, found by start in a `BTreeMap`; what no layer covers reads zeros.

use crate::devices::virtio::FileArg;
use std::{collections::BTreeMap, fs::File, ops::Range};

use husk_vmm_api::drives::{LAYERED_CAPACITY, LAYER_ALIGN, LAYER_LENGTH_ALIGN};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::copy::{file_to_guest, zeros_to_guest};

/// Why a layer cannot be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("drive {0:?} is not layered")]
    NotLayered(String),
    #[error("opening the layer file {0}")]
    Open(String, #[source] std::io::Error),
    #[error("the layer file {0} is empty")]
    Empty(String),
    #[error(
        "the layer file {name} ({len} bytes) does not fit: the drive's {LAYERED_CAPACITY} bytes are given out up to byte {used}"
    )]
    Full { name: String, len: u64, used: u64 },
    #[error("no layer starts at byte {0}")]
    NoLayer(u64),
}

/// The layers of one layered drive.
#[derive(Debug)]
pub(super) struct Layers {
    /// By start byte; no two overlap.
    by_start: BTreeMap<u64, Layer>,
    /// The end of the highest range given so far (at first, the first MiB, which is never
    /// a layer's): the next layer starts past it, so no range is given twice.
    high: u64,
}

/// One layer.
#[derive(Debug)]
struct Layer {
    file: File,
    /// The file's length when it was added: what the range holds before its zero tail.
    file_len: u64,
    /// The range's length: `file_len` rounded up to [`LAYER_LENGTH_ALIGN`].
    length: u64,
}

impl Layers {
    /// No layers: the whole disk reads zeros.
    pub(super) fn new() -> Self {
        Layers {
            by_start: BTreeMap::new(),
            high: LAYER_ALIGN,
        }
    }

    /// Opens `file` read-only and places it after every range given so far; returns its
    /// range.
    pub(super) fn add(&mut self, file: FileArg) -> Result<Range<u64>, LayerError> {
        let name = file.name();
        let file = file
            .open(false)
            .map_err(|e| LayerError::Open(name.clone(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| LayerError::Open(name.clone(), e))?;
        let file_len = meta.len();
        if file_len == 0 {
            return Err(LayerError::Empty(name));
        }
        let range = self
            .high
            .checked_next_multiple_of(LAYER_ALIGN)
            .and_then(|start| {
                let length = file_len.checked_next_multiple_of(LAYER_LENGTH_ALIGN)?;
                let end = start.checked_add(length)?;
                (end <= LAYERED_CAPACITY).then_some(start..end)
            });
        let Some(range) = range else {
            return Err(LayerError::Full {
                name,
                len: file_len,
                used: self.high,
            });
        };
        let layer = Layer {
            file,
            file_len,
            length: range.end - range.start,
        };
        self.by_start.insert(range.start, layer);
        self.high = range.end;
        Ok(range)
    }

    /// Closes the layer that starts at byte `start`; its range reads zeros from now on.
    pub(super) fn remove(&mut self, start: u64) -> Result<(), LayerError> {
        match self.by_start.remove(&start) {
            Some(_) => Ok(()),
            None => Err(LayerError::NoLayer(start)),
        }
    }

    /// Reads the disk's bytes `offset..offset + len` into guest memory at `addr`: each
    /// layer's where it lies, zeros in between. False if a file or guest memory fails, or
    /// the range ends past the address space (the caller bounds it by the capacity).
    pub(super) fn read(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        addr: GuestAddress,
        len: u64,
    ) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        let mut pos = offset;
        while pos < end {
            let Some(to) = addr.0.checked_add(pos - offset).map(GuestAddress) else {
                return false;
            };
            let covering = self
                .by_start
                .range(..=pos)
                .next_back()
                .filter(|(&start, l)| pos - start < l.length);
            // Each step moves on by at least one byte: a covering layer ends past `pos`, and
            // with none, the next layer starts past `pos`.
            let n = match covering {
                Some((&start, l)) => {
                    let n = (start + l.length).min(end) - pos;
                    if !l.read(mem, pos - start, to, n) {
                        return false;
                    }
                    n
                }
                None => {
                    let next = self.by_start.range(pos..).next().map_or(end, |(&s, _)| s);
                    let n = next.min(end) - pos;
                    if !zeros_to_guest(mem, to, n) {
                        return false;
                    }
                    n
                }
            };
            pos += n;
        }
        true
    }
}

impl Layer {
    /// Reads `len` bytes of the layer at `off` (both within its length) into guest memory
    /// at `addr`: the file's bytes, then zeros past its end.
    fn read(&self, mem: &GuestMemoryMmap, off: u64, addr: GuestAddress, len: u64) -> bool {
        let from_file = self.file_len.saturating_sub(off).min(len);
        if from_file > 0 && !file_to_guest(mem, &self.file, off, addr, from_file) {
            return false;
        }
        if from_file == len {
            return true;
        }
        match addr.0.checked_add(from_file) {
            Some(a) => zeros_to_guest(mem, GuestAddress(a), len - from_file),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use vm_memory::Bytes;

    impl Layers {
        fn add_path(&mut self, p: &Path) -> Result<Range<u64>, LayerError> {
            self.add(FileArg::Path(p.to_path_buf()))
        }
    }

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A file of `len` bytes, each `fill`, in `dir`.
    fn image(dir: &Path, name: &str, len: usize, fill: u8) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![fill; len]).unwrap();
        p
    }

    fn guest() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap()
    }

    /// Reads `len` bytes of the disk at `offset` through guest memory (poisoned first, so
    /// every byte checked was written).
    fn read(l: &Layers, mem: &GuestMemoryMmap, offset: u64, len: usize) -> Option<Vec<u8>> {
        mem.write_slice(&vec![0xee; len], GuestAddress(0)).unwrap();
        if !l.read(mem, offset, GuestAddress(0), len as u64) {
            return None;
        }
        let mut out = vec![0u8; len];
        mem.read_slice(&mut out, GuestAddress(0)).unwrap();
        Some(out)
    }

    #[test]
    fn placement_is_aligned_rounded_and_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Layers::new();
        let a = l.add_path(&image(dir.path(), "a", 5000, 1)).unwrap();
        assert_eq!(a, MIB..MIB + 8192, "past the first MiB, rounded up to 4096");
        let b = l
            .add_path(&image(dir.path(), "b", 3 * MIB as usize, 2))
            .unwrap();
        assert_eq!(b, 2 * MIB..5 * MIB);
        let c = l.add_path(&image(dir.path(), "c", 4096, 3)).unwrap();
        assert_eq!(
            c,
            5 * MIB..5 * MIB + 4096,
            "an end on a boundary is the next start"
        );
        // Removing the highest layer, or all of them, gives no range back.
        l.remove(c.start).unwrap();
        l.remove(a.start).unwrap();
        let d = l.add_path(&image(dir.path(), "d", 1, 4)).unwrap();
        assert_eq!(d, 6 * MIB..6 * MIB + 4096);
        l.remove(b.start).unwrap();
        l.remove(d.start).unwrap();
        let e = l.add_path(&dir.path().join("a")).unwrap();
        assert_eq!(e.start, 7 * MIB);
        // The same file twice is two layers.
        let f = l.add_path(&dir.path().join("a")).unwrap();
        assert_eq!(f.start, 8 * MIB);
        assert_eq!(l.by_start.len(), 2);
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Layers::new();
        let missing = dir.path().join("missing.erofs");
        let e = l.add_path(&missing).unwrap_err();
        assert!(matches!(e, LayerError::Open(..)), "{e}");
        assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");
        let e = l.add_path(&image(dir.path(), "empty", 0, 0)).unwrap_err();
        assert!(matches!(e, LayerError::Empty(..)), "{e}");
        let e = l.add_path(dir.path()).unwrap_err();
        assert!(matches!(e, LayerError::Open(..)), "{e}");
        assert!(
            std::error::Error::source(&e).unwrap().to_string() == "not a regular file",
            "{}",
            e
        );
        assert!(matches!(l.remove(MIB), Err(LayerError::NoLayer(MIB))));
        // Nothing refused took a range.
        assert_eq!(
            l.add_path(&image(dir.path(), "a", 1, 1)).unwrap().start,
            MIB
        );
        assert!(matches!(l.remove(0), Err(LayerError::NoLayer(0))));
        assert!(matches!(l.remove(MIB + 1), Err(LayerError::NoLayer(_))));
        l.remove(MIB).unwrap();
        assert!(matches!(l.remove(MIB), Err(LayerError::NoLayer(MIB))));
    }

    #[test]
    fn running_past_capacity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = image(dir.path(), "a", 10, 1);
        let mut l = Layers::new();
        // The last MiB left: a layer of one MiB fits, anything after does not.
        l.high = LAYERED_CAPACITY - MIB - 1;
        let sparse = dir.path().join("sparse");
        File::create(&sparse).unwrap().set_len(MIB).unwrap();
        assert_eq!(
            l.add_path(&sparse).unwrap(),
            LAYERED_CAPACITY - MIB..LAYERED_CAPACITY
        );
        let e = l.add_path(&a).unwrap_err();
        assert!(matches!(e, LayerError::Full { len: 10, .. }), "{e}");
        // A range that would overflow u64 is refused the same way.
        l.high = u64::MAX - 3;
        assert!(matches!(l.add_path(&a), Err(LayerError::Full { .. })));
        // Two MiB left: a file one byte longer does not fit, and takes nothing.
        let mut l = Layers::new();
        l.high = LAYERED_CAPACITY - 2 * MIB;
        let big = dir.path().join("big");
        File::create(&big).unwrap().set_len(2 * MIB + 1).unwrap();
        assert!(matches!(l.add_path(&big), Err(LayerError::Full { .. })));
        assert!(l.by_start.is_empty());
        assert_eq!(l.high, LAYERED_CAPACITY - 2 * MIB);
    }

    #[test]
    fn reads_split_across_layers_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let mem = guest();
        let mut l = Layers::new();
        // A: 5000 bytes (range 8192), B: 4096 bytes, each byte saying which.
        let a = l.add_path(&image(dir.path(), "a", 5000, 0xaa)).unwrap();
        let b = l.add_path(&image(dir.path(), "b", 4096, 0xbb)).unwrap();
        // Hole, all of A with its zero tail, the hole up to B, all of B, the hole after.
        let offset = a.start - 512;
        let len = (b.end + 1024 - offset) as usize;
        let got = read(&l, &mem, offset, len).unwrap();
        let at = |x: u64| (x - offset) as usize;
        assert!(got[..at(a.start)].iter().all(|&x| x == 0));
        assert!(got[at(a.start)..at(a.start + 5000)]
            .iter()
            .all(|&x| x == 0xaa));
        assert!(got[at(a.start + 5000)..at(b.start)].iter().all(|&x| x == 0));
        assert!(got[at(b.start)..at(b.end)].iter().all(|&x| x == 0xbb));
        assert!(got[at(b.end)..].iter().all(|&x| x == 0));
        // Inside one layer, the unaligned tail alone, holes alone.
        assert_eq!(read(&l, &mem, a.start + 100, 50).unwrap(), [0xaa; 50]);
        assert_eq!(
            read(&l, &mem, a.start + 4990, 20).unwrap()[..10],
            [0xaa; 10]
        );
        assert_eq!(read(&l, &mem, a.start + 5000, 3192).unwrap(), [0; 3192]);
        assert_eq!(read(&l, &mem, 0, 4096).unwrap(), [0; 4096]);
        assert_eq!(
            read(&l, &mem, LAYERED_CAPACITY - 512, 512).unwrap(),
            [0; 512]
        );
        // Nothing to read is fine.
        assert!(read(&l, &mem, a.start, 0).unwrap().is_empty());
        // Once removed, A's range reads zeros and B is unchanged.
        l.remove(a.start).unwrap();
        let got = read(&l, &mem, offset, len).unwrap();
        assert!(got[..at(b.start)].iter().all(|&x| x == 0));
        assert!(got[at(b.start)..at(b.end)].iter().all(|&x| x == 0xbb));
    }

    #[test]
    fn failing_reads_are_false() {
        let dir = tempfile::tempdir().unwrap();
        let mem = guest();
        let mut l = Layers::new();
        let p = image(dir.path(), "a", 8192, 1);
        let a = l.add_path(&p).unwrap();
        // Past the address space, or guest memory, in a layer and in a hole.
        assert!(!l.read(&mem, u64::MAX - 10, GuestAddress(0), 20));
        assert!(!l.read(&mem, a.start, GuestAddress(u64::MAX - 10), 20));
        assert!(!l.read(&mem, a.start, GuestAddress(16 * MIB - 10), 20));
        assert!(!l.read(&mem, 0, GuestAddress(16 * MIB - 10), 20));
        // A file that shrank under its layer: an error, not zeros.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(100)
            .unwrap();
        assert!(!l.read(&mem, a.start, GuestAddress(0), 4096));
        assert!(l.read(&mem, a.start, GuestAddress(0), 100));
    }
}
