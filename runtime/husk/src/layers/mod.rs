//! The layer cache: one read-only filesystem image per image layer on this node, shared by
//! every container and pod that stacks the layer.
//!
//! containerd's overlay snapshotter hands the shim a container's rootfs as an overlay whose
//! lowerdirs are committed snapshots: immutable directories, one per image layer. The first
//! container that stacks a snapshot converts it into an image file here; every later one (in
//! any pod) finds the image and only attaches it to its VM, so a container's create no longer
//! costs time or disk in proportion to its image. `husk run` puts the layers of an OCI image
//! layout here too, keyed by their digests.
//!
//! An entry is `<key>.img` (the image) and `<key>.json` (its [`Record`]). Entries are made
//! aside and renamed into place after an fsync, so a crash never leaves a half image under a
//! key; the record holds the image's inode, size and ctime, so an image that was truncated,
//! overwritten or replaced since is noticed without reading it, and rebuilt. Creators of one
//! key take its lock (`<key>.lock`) and convert once; [`LayerCache::gc`] takes the cache's
//! lock exclusively and removes the entries whose source is gone.
//!
//! The key of a snapshot is its path with the directory's device, inode and ctime (to the
//! nanosecond): containerd numbers snapshots from a counter that starts again with a fresh
//! metadata store, and a directory made again under a reused number is a different inode made
//! at a different time, so it never finds an older image. A blob's key is its digest.
//!
//! The images are ext4 (read-only, no journal). erofs would be smaller, but Debian 12's
//! erofs-utils (1.5) cannot convert a tree holding a 255-byte file name (it fails with
//! ENOENT), and image layers are allowed such names.

mod convert;
#[cfg(test)]
mod tests;

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Instant,
};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use convert::make_layer_image;

/// The default cache directory.
pub const DEFAULT_DIR: &str = "/var/lib/husk/layers";

/// The version of the image format and key derivation; a change makes new keys.
const FORMAT: &str = "husk-layer-v1";

/// Why a layer could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("the layer cache {dir}: {what}")]
    Cache {
        dir: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the layer {source_path} cannot be read")]
    Source {
        source_path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("converting the layer {source_path} into {image}: {why}")]
    Convert {
        source_path: PathBuf,
        image: PathBuf,
        why: String,
    },
}

/// A layer's image in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The cache key (hex).
    pub key: String,
    /// The image file (read-only ext4).
    pub image: PathBuf,
    /// Whether this call made it (false: it was there).
    pub converted: bool,
}

/// What a source was when its image was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

impl Identity {
    fn of(md: &fs::Metadata) -> Self {
        Identity {
            dev: md.dev(),
            ino: md.ino(),
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
        }
    }
}

/// The record kept beside an image: what it was made from and what the image was then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub format: String,
    /// The snapshot directory or blob it was made from.
    pub source: PathBuf,
    pub source_id: Identity,
    /// The image file right after it was renamed into place.
    pub image_id: Identity,
    pub image_size: u64,
    /// How long the conversion took.
    pub convert_ms: u64,
}

/// What [`LayerCache::gc`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub kept: usize,
    pub removed: usize,
    pub bytes_freed: u64,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct LayerCache {
    dir: PathBuf,
}

impl LayerCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LayerCache { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image of the committed snapshot directory `source`, converted on first use.
    pub fn snapshot(&self, source: &Path) -> Result<Layer, LayerError> {
        let src_err = |e| LayerError::Source {
            source_path: source.to_path_buf(),
            source: e,
        };
        let canonical = fs::canonicalize(source).map_err(src_err)?;
        let md = fs::metadata(&canonical).map_err(src_err)?;
        if !md.is_dir() {
            return Err(src_err(std::io::Error::other("not a directory")));
        }
        let id = Identity::of(&md);
        let key = key_of(&format!(
            "snapshot\0{}\0{}:{}:{}.{}",
            canonical.display(),
            id.dev,
            id.ino,
            id.ctime,
            id.ctime_nsec
        ));
        self.get_or_make(&key, &canonical, id, |image| {
            make_layer_image(&canonical, image)
        })
    }

    /// The image of the content-addressed blob `digest` (an OCI layer; `source` is its file,
    /// whose presence keeps the entry), made on first use by `fill`, which unpacks the
    /// layer into the empty directory it is given.
    pub fn blob(
        &self,
        digest: &str,
        source: &Path,
        fill: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<Layer, LayerError> {
        let md = fs::metadata(source).map_err(|e| LayerError::Source {
            source_path: source.to_path_buf(),
            source: e,
        })?;
        let key = key_of(&format!("blob\0{digest}"));
        self.get_or_make(&key, source, Identity::of(&md), |image| {
            let parent = image.parent().expect("an image path has a parent");
            let tree = tempfile::Builder::new()
                .prefix(".unpack-")
                .tempdir_in(parent)
                .map_err(|e| format!("making a directory to unpack into: {e}"))?;
            fill(tree.path())?;
            make_layer_image(tree.path(), image)
        })
    }

    fn cache_err(&self, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LayerError {
        let (dir, what) = (self.dir.clone(), what.into());
        move |source| LayerError::Cache { dir, what, source }
    }

    /// Opens (creating) and locks `name` in the cache directory.
    fn lock(&self, name: &str, exclusive: bool) -> Result<Flock<File>, LayerError> {
        let path = self.dir.join(name);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(self.cache_err(format!("opening {}", path.display())))?;
        let arg = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        Flock::lock(f, arg).map_err(|(_, e)| self.cache_err(format!("locking {name}"))(e.into()))
    }

    fn get_or_make(
        &self,
        key: &str,
        source: &Path,
        source_id: Identity,
        make: impl FnOnce(&Path) -> Result<(), String>,
    ) -> Result<Layer, LayerError> {
        fs::create_dir_all(&self.dir).map_err(self.cache_err("creating it"))?;
        // Shared: gc (exclusive) waits while anyone is between lookup and use.
        let _cache = self.lock(".lock", false)?;
        let _key = self.lock(&format!("{key}.lock"), true)?;
        let image = self.dir.join(format!("{key}.img"));
        let record = self.dir.join(format!("{key}.json"));
        match check(&image, &record) {
            Ok(()) => {
                return Ok(Layer {
                    key: key.to_string(),
                    image,
                    converted: false,
                })
            }
            Err(Damage::Missing) => {}
            Err(Damage::Bad(why)) => {
                tracing::warn!("layer cache: {} {why}; rebuilding it", image.display());
            }
        }
        let _ = fs::remove_file(&record);
        let _ = fs::remove_file(&image);
        // Only a converter of this key (holding its lock) writes these: any left are from one
        // that died.
        self.remove_aside(key);
        let t0 = Instant::now();
        let aside = self.dir.join(format!(".{key}.img.{}", std::process::id()));
        let made = make(&aside).and_then(|()| {
            sync_file(&aside).map_err(|e| format!("syncing: {e}"))?;
            fs::rename(&aside, &image).map_err(|e| format!("renaming into place: {e}"))?;
            sync_dir(&self.dir).map_err(|e| format!("syncing the cache directory: {e}"))
        });
        if let Err(why) = made {
            let _ = fs::remove_file(&aside);
            let _ = fs::remove_file(&image);
            return Err(LayerError::Convert {
                source_path: source.to_path_buf(),
                image,
                why,
            });
        }
        let md = fs::metadata(&image).map_err(self.cache_err("reading a new image"))?;
        let rec = Record {
            format: FORMAT.into(),
            source: source.to_path_buf(),
            source_id,
            image_id: Identity::of(&md),
            image_size: md.len(),
            convert_ms: t0.elapsed().as_millis() as u64,
        };
        let written = write_atomically(
            &record,
            &serde_json::to_vec_pretty(&rec).expect("a record serializes"),
        );
        if let Err(e) = written {
            let _ = fs::remove_file(&image);
            return Err(self.cache_err(format!("writing {}", record.display()))(e));
        }
        tracing::info!(
            "layer cache: {} converted into {} ({} bytes) in {} ms",
            source.display(),
            image.display(),
            rec.image_size,
            rec.convert_ms
        );
        Ok(Layer {
            key: key.to_string(),
            image,
            converted: true,
        })
    }

    /// Removes the files a converter of `key` left aside.
    fn remove_aside(&self, key: &str) {
        let prefix = format!(".{key}.");
        for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(e.path());
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Removes the entries whose source is gone or changed (all entries with `all`), and
    /// whatever a dead converter left. A running VM that attached a removed image keeps
    /// reading it (its file descriptor holds the inode).
    pub fn gc(&self, all: bool) -> Result<GcReport, LayerError> {
        let mut report = GcReport::default();
        if !self.dir.exists() {
            return Ok(report);
        }
        let _cache = self.lock(".lock", true)?;
        let entries: Vec<_> = fs::read_dir(&self.dir)
            .map_err(self.cache_err("listing it"))?
            .flatten()
            .collect();
        for e in &entries {
            let name = e.file_name().to_string_lossy().to_string();
            let path = e.path();
            if name == ".lock" {
                continue;
            }
            // Left aside by a converter that died (live ones hold the cache's lock shared,
            // so there are none now).
            if name.starts_with('.') {
                report.bytes_freed += size_of(&path);
                let _ = fs::remove_file(&path).or_else(|_| fs::remove_dir_all(&path));
                continue;
            }
            let Some(key) = name.strip_suffix(".img") else {
                continue;
            };
            let record = self.dir.join(format!("{key}.json"));
            let keep = !all && check(&path, &record).is_ok() && source_unchanged(&record);
            if keep {
                report.kept += 1;
                continue;
            }
            report.removed += 1;
            report.bytes_freed += size_of(&path);
            let _ = fs::remove_file(&path);
            let _ = fs::remove_file(&record);
            let _ = fs::remove_file(self.dir.join(format!("{key}.lock")));
        }
        // Records and locks without an image.
        for e in &entries {
            let name = e.file_name().to_string_lossy().to_string();
            let key = name
                .strip_suffix(".json")
                .or_else(|| name.strip_suffix(".lock"));
            if let Some(key) = key.filter(|k| !k.is_empty()) {
                if !self.dir.join(format!("{key}.img")).exists() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(report)
    }

    /// Removes the whole cache (`husk uninstall`).
    pub fn remove_all(&self) -> std::io::Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

fn key_of(what: &str) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT.as_bytes());
    h.update(b"\0");
    h.update(what.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn size_of(p: &Path) -> u64 {
    fs::symlink_metadata(p)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

enum Damage {
    Missing,
    Bad(String),
}

/// Whether the entry is whole and untouched since it was made, without reading the image: the
/// record parses, the image is the same inode with the same size and ctime (any write,
/// truncation or replacement changes the ctime, and no one can set it back), and it starts as
/// an ext4 image.
fn check(image: &Path, record: &Path) -> Result<(), Damage> {
    let md = match fs::metadata(image) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Damage::Missing),
        Err(e) => return Err(Damage::Bad(format!("cannot be read ({e})"))),
    };
    let rec: Record = fs::read(record)
        .map_err(|e| Damage::Bad(format!("has no readable record ({e})")))
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| Damage::Bad(format!("has a bad record ({e})")))
        })?;
    if rec.format != FORMAT {
        return Err(Damage::Bad(format!("is of format {}", rec.format)));
    }
    if rec.image_id != Identity::of(&md) || rec.image_size != md.len() {
        return Err(Damage::Bad(format!(
            "changed since it was made (size {} then, {} now; or written or replaced)",
            rec.image_size,
            md.len()
        )));
    }
    let mut magic = [0u8; 2];
    File::open(image)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(1024 + 0x38))?;
            f.read_exact(&mut magic)
        })
        .map_err(|e| Damage::Bad(format!("cannot be read ({e})")))?;
    if u16::from_le_bytes(magic) != 0xEF53 {
        return Err(Damage::Bad("has no ext4 superblock".into()));
    }
    Ok(())
}

/// Whether the entry's source is still there and the same directory or file.
fn source_unchanged(record: &Path) -> bool {
    let Ok(rec) = fs::read(record).map(|b| serde_json::from_slice::<Record>(&b)) else {
        return false;
    };
    let Ok(rec) = rec else { return false };
    fs::metadata(&rec.source).is_ok_and(|md| {
        let id = Identity::of(&md);
        // A blob's file may be touched (its ctime): its digest is the key.
        (id.dev, id.ino) == (rec.source_id.dev, rec.source_id.ino)
            && (md.is_file() || id == rec.source_id)
    })
}

fn sync_file(p: &Path) -> std::io::Result<()> {
    File::open(p)?.sync_all()
}

fn sync_dir(p: &Path) -> std::io::Result<()> {
    File::open(p)?.sync_all()
}

/// Writes `bytes` to `path` through a file aside, fsynced and renamed.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("a cache path has a parent");
    let mut tmp = tempfile::Builder::new()
        .prefix(".record-")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}
