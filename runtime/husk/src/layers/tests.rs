//! The cache on real files and real `mkfs.ext4`; the images are read back with `debugfs`.
//! Tests that make device nodes or mount a tmpfs need root and fail (never skip) without it.

use std::{
    os::unix::fs::{FileTypeExt, MetadataExt},
    process::Command,
    sync::{Arc, Barrier},
};

use super::*;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: device nodes, trusted.* xattrs, a tmpfs"
    );
}

/// `debugfs -R CMD image`'s output.
fn debugfs(image: &Path, cmd: &str) -> String {
    let o = Command::new("debugfs")
        .args(["-R", cmd])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn tree(dir: &Path) {
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/os-release"), "ID=husk-test\n").unwrap();
}

#[test]
fn a_snapshot_converts_once_and_is_found_after() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("snapshots/1/fs");
    tree(&src);
    let cache = LayerCache::new(d.path().join("cache"));
    let first = cache.snapshot(&src).unwrap();
    assert!(first.converted);
    assert!(debugfs(&first.image, "cat /etc/os-release").contains("ID=husk-test\n"));
    let again = cache.snapshot(&src).unwrap();
    assert_eq!(
        (again.key.as_str(), again.converted),
        (first.key.as_str(), false)
    );
    // The same directory through another path is the same layer.
    let other_path = d.path().join("snapshots/1/../1/fs");
    assert_eq!(cache.snapshot(&other_path).unwrap().key, first.key);
}

#[test]
fn a_directory_made_again_under_the_same_path_is_a_new_key() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("snapshots/7/fs");
    tree(&src);
    let cache = LayerCache::new(d.path().join("cache"));
    let old = cache.snapshot(&src).unwrap();
    // containerd's store made afresh: snapshot 7 again, with other content.
    fs::remove_dir_all(d.path().join("snapshots")).unwrap();
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("new"), "other content").unwrap();
    let new = cache.snapshot(&src).unwrap();
    assert_ne!(new.key, old.key);
    assert!(new.converted);
    assert!(debugfs(&new.image, "ls /").contains("new"));
}

#[test]
fn racing_creators_convert_once() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("fs");
    tree(&src);
    let cache = LayerCache::new(d.path().join("cache"));
    let barrier = Arc::new(Barrier::new(6));
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let (cache, src, barrier) = (cache.clone(), src.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                cache.snapshot(&src).unwrap()
            })
        })
        .collect();
    let layers: Vec<Layer> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(layers.iter().filter(|l| l.converted).count(), 1);
    assert!(layers.iter().all(|l| l.key == layers[0].key));
}

#[test]
fn a_damaged_image_is_rebuilt_never_used() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("fs");
    tree(&src);
    let cache = LayerCache::new(d.path().join("cache"));
    let l = cache.snapshot(&src).unwrap();
    let len = fs::metadata(&l.image).unwrap().len();

    // Truncated.
    OpenOptions::new()
        .write(true)
        .open(&l.image)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let r = cache.snapshot(&src).unwrap();
    assert!(r.converted, "a truncated image was used");
    assert_eq!(fs::metadata(&r.image).unwrap().len(), len);

    // Overwritten in place with the same size (a flipped block).
    let mut f = OpenOptions::new().write(true).open(&r.image).unwrap();
    f.seek(SeekFrom::Start(8192)).unwrap();
    f.write_all(&[0xff; 4096]).unwrap();
    drop(f);
    assert!(
        cache.snapshot(&src).unwrap().converted,
        "a written image was used"
    );

    // Replaced by a copy (another inode).
    let copy = d.path().join("copy");
    fs::copy(&r.image, &copy).unwrap();
    fs::rename(&copy, &r.image).unwrap();
    assert!(
        cache.snapshot(&src).unwrap().converted,
        "a replaced image was used"
    );

    // The record lost.
    fs::remove_file(cache.dir().join(format!("{}.json", r.key))).unwrap();
    assert!(cache.snapshot(&src).unwrap().converted);
    assert!(!cache.snapshot(&src).unwrap().converted);
}

#[test]
fn what_a_dead_converter_left_is_never_used_and_is_collected() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("fs");
    tree(&src);
    let cache = LayerCache::new(d.path().join("cache"));
    let key = cache.snapshot(&src).unwrap().key;
    gc_all(&cache);
    // A converter killed mid-way: its image aside, no record, no image in place.
    let aside = cache.dir().join(format!(".{key}.img.999999"));
    fs::write(&aside, b"half an image").unwrap();
    let l = cache.snapshot(&src).unwrap();
    assert!(l.converted);
    assert!(!aside.exists(), "the half image is still there");
    // And one of another key: gc takes it.
    let other = cache.dir().join(".0123.img.999999");
    fs::write(&other, b"half").unwrap();
    cache.gc(false).unwrap();
    assert!(!other.exists());
}

fn gc_all(cache: &LayerCache) {
    cache.gc(true).unwrap();
    let left: Vec<_> = fs::read_dir(cache.dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert!(left.is_empty(), "gc --all left {left:?}");
}

#[test]
fn gc_removes_entries_whose_source_is_gone_and_keeps_the_others() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a/fs"), d.path().join("b/fs"));
    tree(&a);
    tree(&b);
    fs::write(b.join("b"), "b").unwrap();
    let cache = LayerCache::new(d.path().join("cache"));
    let la = cache.snapshot(&a).unwrap();
    let lb = cache.snapshot(&b).unwrap();
    fs::remove_dir_all(d.path().join("a")).unwrap();
    let r = cache.gc(false).unwrap();
    assert_eq!((r.kept, r.removed), (1, 1), "{r:?}");
    assert!(r.bytes_freed > 0);
    assert!(!la.image.exists() && lb.image.exists());
    assert!(!cache.dir().join(format!("{}.json", la.key)).exists());
    assert!(!cache.dir().join(format!("{}.lock", la.key)).exists());
    gc_all(&cache);
    cache.remove_all().unwrap();
    assert!(!cache.dir().exists());
    cache.remove_all().unwrap();
}

#[test]
fn blobs_are_keyed_by_digest_and_unpacked_once() {
    let d = tempfile::tempdir().unwrap();
    let blob = d.path().join("blob");
    fs::write(&blob, b"the layer tarball").unwrap();
    let cache = LayerCache::new(d.path().join("cache"));
    let mut calls = 0;
    let mut fill = |dir: &Path| {
        calls += 1;
        fs::write(dir.join("from-blob"), "x").map_err(|e| e.to_string())
    };
    let l = cache.blob("sha256:abc", &blob, &mut fill).unwrap();
    assert!(debugfs(&l.image, "ls /").contains("from-blob"));
    let again = cache.blob("sha256:abc", &blob, &mut fill).unwrap();
    assert_eq!((again.key, again.converted, calls), (l.key, false, 1));
    // A failing unpack leaves nothing.
    let e = cache
        .blob("sha256:def", &blob, |_| {
            Err("the tarball is cut short".into())
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the tarball is cut short") && e.contains("blob"),
        "{e}"
    );
    let names: Vec<_> = fs::read_dir(cache.dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn special_files_long_names_xattrs_and_hard_links_convert() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("fs");
    fs::create_dir_all(src.join("opaque")).unwrap();
    nix::sys::stat::mknod(
        &src.join("whiteout"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o000),
        0,
    )
    .unwrap();
    nix::sys::stat::mknod(
        &src.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    let long = "n".repeat(255);
    fs::write(src.join(&long), "long name").unwrap();
    fs::hard_link(src.join(&long), src.join("link")).unwrap();
    std::os::unix::fs::symlink("/etc/os-release", src.join("sym")).unwrap();
    crate::image::lsetxattr(&src.join("opaque"), c"trusted.overlay.opaque", b"y").unwrap();
    std::os::unix::fs::chown(src.join("null"), Some(1000), Some(1001)).unwrap();

    let cache = LayerCache::new(d.path().join("cache"));
    let l = cache.snapshot(&src).unwrap();
    let ls = debugfs(&l.image, "ls -l /");
    assert!(ls.contains(&long), "{ls}");
    let stat = |p: &str| debugfs(&l.image, &format!("stat /{p}"));
    assert!(
        stat("whiteout").contains("Type: character special"),
        "{}",
        stat("whiteout")
    );
    assert!(stat("whiteout").contains("Device major/minor number: 00:00"));
    let null = stat("null");
    assert!(null.contains("major/minor number: 01:03"), "{null}");
    assert!(
        null.contains("User:  1000") && null.contains("Group:  1001"),
        "{null}"
    );
    assert!(stat("fifo").contains("Type: FIFO"));
    assert!(stat("sock").contains("Type: socket"), "{}", stat("sock"));
    assert!(stat("sym").contains("Type: symlink"));
    assert!(stat("link").contains("Links: 2"), "{}", stat("link"));
    let opaque = debugfs(&l.image, "ea_get /opaque trusted.overlay.opaque");
    assert!(
        opaque.contains("trusted.overlay.opaque (1) = \"y\""),
        "{opaque}"
    );
    assert!(src.join("sock").metadata().unwrap().file_type().is_socket());
}

#[test]
fn a_full_disk_names_the_layer_and_leaves_nothing() {
    require_root();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("fs");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big"), vec![7u8; 12 << 20]).unwrap();
    let small = d.path().join("small");
    fs::create_dir_all(&small).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=4m"),
    )
    .unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _guard = Unmount(small.clone());
    let cache = LayerCache::new(small.join("cache"));
    let e = cache.snapshot(&src).unwrap_err().to_string();
    assert!(e.contains(&src.display().to_string()), "{e}");
    let left: Vec<_> = fs::read_dir(cache.dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left after a failed conversion: {left:?}");
    let used = nix::sys::statvfs::statvfs(&small).unwrap();
    assert!(
        used.blocks_free() * used.fragment_size() > 3 << 20,
        "the failed image still takes space"
    );
    assert!(src.join("big").metadata().unwrap().size() == 12 << 20);
}
