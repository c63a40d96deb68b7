//! A directory tree into a read-only ext4 image, as tight as `mkfs.ext4 -d` allows: every
//! file, directory, symlink, device node, fifo and socket with its owner, mode, times and
//! extended attributes (overlayfs's whiteouts are character devices 0:0 and its opaque
//! directories carry `trusted.overlay.opaque`, so both survive).

use std::{fs, os::unix::process::CommandExt, path::Path, process::Command};

const BLOCK: u64 = 4096;
/// Bytes per inode in the inode table.
const INODE_SIZE: u64 = 256;

/// What a tree holds, to size its image.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeSize {
    /// Data and directory blocks, in bytes.
    pub bytes: u64,
    /// Inodes (every entry, the root included).
    pub inodes: u64,
}

/// Walks `dir` without following symlinks.
pub fn tree_size(dir: &Path) -> std::io::Result<TreeSize> {
    let mut t = TreeSize {
        bytes: BLOCK,
        inodes: 1,
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.path().symlink_metadata()?;
            t.inodes += 1;
            // Hard links share blocks; counting them twice only oversizes.
            t.bytes += m.len().div_ceil(BLOCK) * BLOCK;
            if m.is_dir() {
                t.bytes += BLOCK;
                stack.push(e.path());
            }
        }
    }
    Ok(t)
}

/// The image size for a tree: its blocks, an inode table with room, metadata and a margin
/// (block groups, bitmaps, extent blocks, xattr blocks), rounded up to a MiB.
pub fn image_size(t: TreeSize) -> u64 {
    let inodes = t.inodes + 64;
    let raw = t.bytes + t.bytes / 16 + inodes * (INODE_SIZE + 128) + 4 * 1024 * 1024;
    raw.div_ceil(1 << 20) << 20
}

/// Packs `dir` into the new ext4 image `image` (read-only use: no journal, no reserved
/// blocks, no room to grow). Retries with twice the room when the estimate was short.
pub fn make_layer_image(dir: &Path, image: &Path) -> Result<(), String> {
    let t = tree_size(dir).map_err(|e| format!("reading the tree: {e}"))?;
    let mut size = image_size(t);
    let mut last = String::new();
    for _ in 0..3 {
        let _ = fs::remove_file(image);
        let out = Command::new("mkfs.ext4")
            // Out of the terminal's process group: a Ctrl-C is for husk, which cleans up.
            .process_group(0)
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-m",
                "0",
                "-I",
                "256",
                "-L",
                "husk-layer",
            ])
            .args(["-O", "^has_journal,^resize_inode"])
            .args(["-E", "nodiscard"])
            .arg("-N")
            .arg((t.inodes + 64).to_string())
            .arg("-d")
            .arg(dir)
            .arg(image)
            .arg(format!("{}k", size / 1024))
            .output()
            .map_err(|e| format!("running mkfs.ext4 (install e2fsprogs): {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // The estimate was short (deep extent trees, large xattrs): more room. Anything
        // else (the cache's disk is full, an unreadable file) will not get better.
        if !last.contains("Could not allocate") && !last.contains("No free space") {
            break;
        }
        size *= 2;
    }
    let _ = fs::remove_file(image);
    Err(format!("mkfs.ext4 failed: {last}"))
}
