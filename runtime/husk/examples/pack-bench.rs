//! What a layer's first use on a node costs: the time to convert trees of growing size into a
//! layer-cache image (read-only ext4, as the shim does once per image layer and node) beside a
//! plain `cp -a` of the same tree, and the disk the image takes.
//!
//!   cargo run --release --example pack-bench -- ROOTFS_DIR [EXTRA_MIB...]
//!
//! ROOTFS_DIR is a base tree (e.g. from scripts/busybox-rootfs.sh); each EXTRA_MIB adds that
//! much data in 1 MiB files on top of it (default: 0 16 64 256).

use std::{
    io::Write,
    os::unix::fs::MetadataExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .expect("usage: pack-bench ROOTFS_DIR [EXTRA_MIB...]");
    let mut extras: Vec<u64> = args.map(|a| a.parse().expect("EXTRA_MIB")).collect();
    if extras.is_empty() {
        extras = vec![0, 16, 64, 256];
    }
    let work = tempfile::tempdir().expect("a temporary directory");
    println!("extra MiB | tree MiB | pack ms | cp -a ms | pack/cp | image MiB (apparent) | image MiB (on disk)");
    for extra in extras {
        let tree = work.path().join("tree");
        let _ = std::fs::remove_dir_all(&tree);
        let ok = Command::new("cp")
            .arg("-a")
            .arg(&base)
            .arg(&tree)
            .status()
            .expect("cp")
            .success();
        assert!(ok, "copying {base}");
        let data = tree.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut block = vec![0u8; 1 << 20];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for i in 0..extra {
            for b in block.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            std::fs::File::create(data.join(format!("f{i}")))
                .and_then(|mut f| f.write_all(&block))
                .unwrap();
        }
        let tree_mib = du_mib(&tree);
        // The tree was just written: both read it from the page cache.
        let img = work.path().join("layer.img");
        let copy = work.path().join("copy");
        let cp = timed(|| {
            let ok = Command::new("cp")
                .arg("-a")
                .arg(&tree)
                .arg(&copy)
                .status()
                .expect("cp")
                .success();
            assert!(ok);
        });
        let pack = timed(|| {
            husk::layers::make_layer_image(&tree, &img).expect("make_layer_image");
        });
        let md = std::fs::metadata(&img).unwrap();
        println!(
            "{extra:9} | {tree_mib:8.1} | {:7.0} | {:8.0} | {:7.2} | {:20.1} | {:19.1}",
            pack.as_secs_f64() * 1000.0,
            cp.as_secs_f64() * 1000.0,
            pack.as_secs_f64() / cp.as_secs_f64(),
            md.len() as f64 / 1048576.0,
            (md.blocks() * 512) as f64 / 1048576.0,
        );
        std::fs::remove_dir_all(&copy).unwrap();
        std::fs::remove_file(&img).unwrap();
    }
}

fn du_mib(p: &Path) -> f64 {
    let out = Command::new("du")
        .args(["-sk", "--apparent-size"])
        .arg(p)
        .output()
        .expect("du");
    let kib: f64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}
