//! Container root filesystems for `husk run`: a directory, or an OCI image layout (directory or
//! tarball) unpacked layer by layer; then packed into an ext4 disk image for the VM.

use std::{
    fs,
    io::{Read, Seek},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;

/// Why a rootfs could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid {what}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the OCI layout {0} has no image manifest")]
    NoManifest(PathBuf),
    #[error("layer {0}: unsupported media type {1}")]
    MediaType(String, String),
    #[error("a layer entry escapes the rootfs: {0}")]
    Escape(PathBuf),
    #[error("mkfs.ext4 failed ({status}): {stderr}")]
    Mkfs { status: String, stderr: String },
    #[error("running mkfs.ext4 (install e2fsprogs)")]
    MkfsSpawn(#[source] std::io::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the image says to run, when the command line does not.
#[derive(Debug, Default, Clone)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
}

/// A rootfs ready to pack.
#[derive(Debug)]
pub struct Rootfs {
    pub dir: PathBuf,
    pub config: ImageConfig,
}

/// Turns `src` into a rootfs directory: `src` itself if it is a plain directory, or the
/// unpacked image if it is an OCI image layout (directory, or tarball unpacked under `work`).
pub fn prepare(src: &Path, work: &Path) -> Result<Rootfs, ImageError> {
    if !src.exists() {
        return Err(ImageError::Missing(src.to_path_buf()));
    }
    let layout = if src.is_file() {
        let dir = work.join("layout");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mut f = fs::File::open(src).map_err(io(src))?;
        let mut magic = [0u8; 2];
        let gzip = f.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
        f.rewind().map_err(io(src))?;
        let reader: Box<dyn Read> = if gzip {
            Box::new(flate2::read::GzDecoder::new(f))
        } else {
            Box::new(f)
        };
        tar::Archive::new(reader).unpack(&dir).map_err(io(src))?;
        dir
    } else if src.join("oci-layout").exists() {
        src.to_path_buf()
    } else {
        return Ok(Rootfs {
            dir: src.to_path_buf(),
            config: ImageConfig::default(),
        });
    };
    let dir = work.join("rootfs");
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let config = unpack_layout(&layout, &dir)?;
    Ok(Rootfs { dir, config })
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ConfigInner>,
}

#[derive(Deserialize, Default)]
struct ConfigInner {
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
    layout.join("blobs").join(alg).join(hex)
}

fn read_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
    what: &'static str,
) -> Result<T, ImageError> {
    let bytes = fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&bytes).map_err(|source| ImageError::Json {
        path: path.to_path_buf(),
        what,
        source,
    })
}

fn unpack_layout(layout: &Path, dest: &Path) -> Result<ImageConfig, ImageError> {
    let index: Index = read_json(&layout.join("index.json"), "OCI index")?;
    let desc = index
        .manifests
        .first()
        .ok_or_else(|| ImageError::NoManifest(layout.to_path_buf()))?;
    let mut manifest_path = blob(layout, &desc.digest);
    // An index may point at another index (multi-platform): take its first manifest.
    if desc.media_type.ends_with("image.index.v1+json") {
        let inner: Index = read_json(&manifest_path, "OCI index")?;
        let d = inner
            .manifests
            .first()
            .ok_or_else(|| ImageError::NoManifest(layout.to_path_buf()))?;
        manifest_path = blob(layout, &d.digest);
    }
    let manifest: Manifest = read_json(&manifest_path, "OCI manifest")?;
    for layer in &manifest.layers {
        let path = blob(layout, &layer.digest);
        let f = fs::File::open(&path).map_err(io(&path))?;
        let reader: Box<dyn Read> = if layer.media_type.ends_with("+gzip")
            || layer.media_type.ends_with(".gzip")
        {
            Box::new(flate2::read::GzDecoder::new(f))
        } else if layer.media_type.ends_with(".tar") || layer.media_type.ends_with("layer.v1.tar") {
            Box::new(f)
        } else {
            return Err(ImageError::MediaType(
                layer.digest.clone(),
                layer.media_type.clone(),
            ));
        };
        apply_layer(reader, dest).map_err(io(&path))?;
    }
    let cfg: ConfigFile = read_json(&blob(layout, &manifest.config.digest), "OCI image config")?;
    let c = cfg.config.unwrap_or_default();
    Ok(ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.filter(|w| !w.is_empty()),
    })
}

/// Applies one layer tarball onto `dest`, honouring whiteouts (`.wh.NAME` removes NAME,
/// `.wh..wh..opq` empties the directory of what lower layers put there).
fn apply_layer(reader: impl Read, dest: &Path) -> std::io::Result<()> {
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let parent = path.parent().unwrap_or(Path::new(""));
        if safe_join(dest, parent).is_none() {
            return Err(std::io::Error::other(ImageError::Escape(path)));
        }
        match name.as_deref() {
            Some(".wh..wh..opq") => {
                // A directory reached through a symlink is not the layer's to empty.
                if let Some(dir) = real_dir_in(dest, parent) {
                    if let Ok(rd) = fs::read_dir(&dir) {
                        for e in rd.flatten() {
                            remove_any(&e.path())?;
                        }
                    }
                }
            }
            Some(n) if n.starts_with(".wh.") => {
                let target = &n[4..];
                if target.is_empty() || target == "." || target == ".." {
                    return Err(std::io::Error::other(ImageError::Escape(path)));
                }
                if let Some(dir) = real_dir_in(dest, parent) {
                    let victim = dir.join(target);
                    if victim.symlink_metadata().is_ok() {
                        remove_any(&victim)?;
                    }
                }
            }
            _ => {
                entry.unpack_in(dest)?;
            }
        }
    }
    Ok(())
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    if p.symlink_metadata()?.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    }
}

/// `base/rel` if every component of `rel` is a plain name and none of the directories on the
/// way (under `base`) is a symlink: whiteouts must never reach outside the rootfs through a
/// link a lower layer planted. None also when the path does not exist (nothing to remove).
fn real_dir_in(base: &Path, rel: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let mut cur = base.to_path_buf();
    for c in rel.components() {
        match c {
            Component::CurDir => continue,
            Component::Normal(n) => cur.push(n),
            _ => return None,
        }
        if !cur.symlink_metadata().ok()?.is_dir() {
            return None;
        }
    }
    Some(cur)
}

/// `base/rel` if `rel` has no `..` or root component.
fn safe_join(base: &Path, rel: &Path) -> Option<PathBuf> {
    use std::path::Component;
    rel.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then(|| base.join(rel))
}

/// Bytes used by the files under `dir` (apparent sizes, rounded up to 4 KiB blocks).
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            total += m.len().div_ceil(4096) * 4096 + 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// Packs `dir` into a fresh ext4 image at `img` with room to spare, with `mkfs.ext4 -d`.
pub fn make_ext4(dir: &Path, img: &Path, extra_mib: u64) -> Result<u64, ImageError> {
    let size = du(dir) * 5 / 4 + (16 + extra_mib) * 1024 * 1024;
    let size_kib = size.div_ceil(1024);
    let out = Command::new("mkfs.ext4")
        // Out of the terminal's process group: a Ctrl-C is for husk, which cleans up.
        .process_group(0)
        .args([
            "-q",
            "-F",
            "-E",
            "root_owner=0:0",
            "-O",
            "^has_journal",
            "-L",
            "husk-rootfs",
            "-d",
        ])
        .arg(dir)
        .arg(img)
        .arg(format!("{size_kib}k"))
        .output()
        .map_err(ImageError::MkfsSpawn)?;
    if !out.status.success() {
        return Err(ImageError::Mkfs {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(size_kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path();
        apply_layer(
            &tar_of(&[("a/keep", b"1"), ("a/gone", b"2"), ("b/old", b"3")])[..],
            dest,
        )
        .unwrap();
        apply_layer(
            &tar_of(&[
                ("a/.wh.gone", b""),
                ("b/.wh..wh..opq", b""),
                ("b/new", b"4"),
            ])[..],
            dest,
        )
        .unwrap();
        assert!(dest.join("a/keep").exists());
        assert!(!dest.join("a/gone").exists());
        assert!(!dest.join("b/old").exists());
        assert_eq!(fs::read(dest.join("b/new")).unwrap(), b"4");
    }

    fn tar_with_link(link: &str, target: &Path) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_link(&mut h, link, target).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_never_reach_through_a_symlink_or_up() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir_all(outside.join("dir")).unwrap();
        fs::write(outside.join("precious"), b"x").unwrap();
        fs::write(outside.join("dir/file"), b"y").unwrap();
        let dest = d.path().join("rootfs");
        fs::create_dir_all(&dest).unwrap();
        apply_layer(&tar_with_link("a", &outside)[..], &dest).unwrap();
        // A whiteout under the link and an opaque marker under it leave the outside alone;
        // the link itself may be whited out.
        apply_layer(
            &tar_of(&[("a/.wh.precious", b""), ("a/dir/.wh..wh..opq", b"")])[..],
            &dest,
        )
        .unwrap();
        assert!(outside.join("precious").exists());
        assert!(outside.join("dir/file").exists());
        apply_layer(&tar_of(&[(".wh.a", b"")])[..], &dest).unwrap();
        assert!(dest.join("a").symlink_metadata().is_err());
        assert!(outside.join("precious").exists());
        // `.wh..` would name the rootfs's parent. (tar refuses to build a `..` path, so
        // the header is written by hand.)
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..6].copy_from_slice(b".wh...");
        h.set_size(0);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(&[0; 1024]);
        let e = apply_layer(&raw[..], &dest).unwrap_err();
        assert!(e.to_string().contains("escapes"), "{e}");
        assert!(dest.exists() && outside.join("precious").exists());
    }

    #[test]
    fn a_plain_directory_is_used_as_is_and_a_missing_one_is_named() {
        let d = tempfile::tempdir().unwrap();
        let r = prepare(d.path(), d.path()).unwrap();
        assert_eq!(r.dir, d.path());
        let e = prepare(&d.path().join("nope"), d.path()).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn oci_layout_is_unpacked_with_its_config() {
        use sha2_free::digest;
        let d = tempfile::tempdir().unwrap();
        let layout = d.path().join("img");
        fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        let put = |bytes: &[u8]| {
            let h = digest(bytes);
            fs::write(layout.join("blobs/sha256").join(&h), bytes).unwrap();
            format!("sha256:{h}")
        };
        let layer = put(&tar_of(&[("bin/hello", b"hi")]));
        let config = put(br#"{"config":{"Cmd":["/bin/hello"],"Env":["A=1"],"WorkingDir":"/w"}}"#);
        let manifest = put(format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}"}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}"}}]}}"#
        ).as_bytes());
        fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        fs::write(
            layout.join("index.json"),
            format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest}"}}]}}"#),
        )
        .unwrap();
        let check = |r: Rootfs| {
            assert_eq!(fs::read(r.dir.join("bin/hello")).unwrap(), b"hi");
            assert_eq!(r.config.cmd, vec!["/bin/hello"]);
            assert_eq!(r.config.env, vec!["A=1"]);
            assert_eq!(r.config.working_dir.as_deref(), Some("/w"));
        };
        check(prepare(&layout, &d.path().join("work")).unwrap());
        // The same layout as a tarball (`skopeo copy oci-archive:`), plain and gzipped.
        let mut b = tar::Builder::new(Vec::new());
        b.append_dir_all(".", &layout).unwrap();
        let tarball = b.into_inner().unwrap();
        fs::write(d.path().join("img.tar"), &tarball).unwrap();
        check(prepare(&d.path().join("img.tar"), &d.path().join("work-tar")).unwrap());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tarball).unwrap();
        fs::write(d.path().join("img.tar.gz"), gz.finish().unwrap()).unwrap();
        check(prepare(&d.path().join("img.tar.gz"), &d.path().join("work-gz")).unwrap());
    }

    /// Blob names only need to be unique and stable in the test; the layout code never
    /// verifies digests.
    mod sha2_free {
        pub fn digest(b: &[u8]) -> String {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            b.hash(&mut h);
            format!("{:016x}{:048x}", h.finish(), b.len())
        }
    }
}
