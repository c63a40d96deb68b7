//! Container root filesystems for `husk run`: a directory, or an OCI image layout (directory or
//! tarball) unpacked layer by layer; then packed into an ext4 disk image for the VM. Or the
//! layout's layers one by one, each unpacked as an overlayfs layer into the layer cache
//! ([`layout_layers`]), for the guest to stack.

mod digest;
mod overlay;

use std::{
    fs,
    io::{self, Read, Seek},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use self::digest::{parse_digest, Hashing};
use crate::layers::{Layer, LayerCache, LayerError};

pub use overlay::{lsetxattr, unpack_layer_as_overlay};

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
    #[error("{0} is not an OCI image layout (no oci-layout file)")]
    NotLayout(PathBuf),
    #[error("{0} is not a digest husk can check (sha256:<64 hex> or sha512:<128 hex>)")]
    BadDigest(String),
    #[error("the blob {path} does not match its digest {digest} (its content hashes to {actual})")]
    DigestMismatch {
        digest: String,
        path: PathBuf,
        actual: String,
    },
    #[error("layer {digest}")]
    Layer {
        digest: String,
        #[source]
        source: LayerError,
    },
    #[error("layer {0}: unsupported media type {1}")]
    MediaType(String, String),
    #[error("a layer entry escapes the rootfs: {0}")]
    Escape(PathBuf),
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

/// An image's layers in the layer cache, each an overlayfs layer.
#[derive(Debug)]
pub struct LayoutLayers {
    /// Bottom first.
    pub layers: Vec<Layer>,
    pub config: ImageConfig,
}

/// The layers of the OCI image layout `src` (a directory, or a tarball unpacked under `work`
/// as [`prepare`] does) as entries of `cache`, each unpacked on first use with
/// [`unpack_layer_as_overlay`], and the image's config.
///
/// An entry's key is its layer's digest. A blob is checked against its digest as it is
/// unpacked: the layout is user input, and a blob that does not match is an error and never
/// enters the cache. A cached layer is not read again.
///
/// An entry's source (what keeps it through [`LayerCache::gc`]) is its blob file. A tarball's
/// blobs are under `work`, which goes when the run ends: its entries stay until the next gc,
/// and until then any run of an image with one of those layers finds it and skips unpacking.
pub fn layout_layers(
    src: &Path,
    work: &Path,
    cache: &LayerCache,
) -> Result<LayoutLayers, ImageError> {
    let layout = open_layout(src, work)?.ok_or_else(|| ImageError::NotLayout(src.to_path_buf()))?;
    let manifest = image_manifest(&layout)?;
    let layers = manifest
        .layers
        .iter()
        .map(|desc| cached_layer(&layout, desc, cache))
        .collect::<Result<_, _>>()?;
    let config = image_config(&layout, &manifest)?;
    Ok(LayoutLayers { layers, config })
}

/// The OCI image layout `src` is: itself if it is a layout directory, the tarball `src`
/// unpacked under `work`, or None for another directory.
fn open_layout(src: &Path, work: &Path) -> Result<Option<PathBuf>, ImageError> {
    if !src.exists() {
        return Err(ImageError::Missing(src.to_path_buf()));
    }
    if src.is_file() {
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
        Ok(Some(dir))
    } else if src.join("oci-layout").exists() {
        Ok(Some(src.to_path_buf()))
    } else {
        Ok(None)
    }
}

/// The cache entry of the layer `desc` of `layout`, made on first use.
fn cached_layer(layout: &Path, desc: &Descriptor, cache: &LayerCache) -> Result<Layer, ImageError> {
    let (alg, hex) = parse_digest(&desc.digest)?;
    let path = blob(layout, &desc.digest);
    // Before the cache: a layer husk cannot read is refused whether or not it is cached.
    let compression = Compression::of(desc)?;
    let mut actual = None;
    let made = cache.blob(&desc.digest, &path, |dir| {
        let file = fs::File::open(&path).map_err(|e| format!("opening it: {e}"))?;
        let mut blob = Hashing::new(file, alg);
        let unpacked = unpack_layer_as_overlay(compression.reader(&mut blob), dir);
        // Every byte is hashed, also past the tar's end and after an error (a damaged blob
        // is the likelier cause, and the one to report).
        io::copy(&mut blob, &mut io::sink()).map_err(|e| format!("reading it: {e}"))?;
        let got = blob.hex();
        if got != hex {
            actual = Some(got);
            return Err("it does not match its digest".into());
        }
        unpacked.map_err(|e| format!("unpacking it: {}", error_chain(&e)))
    });
    made.map_err(|source| match actual {
        Some(actual) => ImageError::DigestMismatch {
            digest: desc.digest.clone(),
            path,
            actual,
        },
        None => ImageError::Layer {
            digest: desc.digest.clone(),
            source,
        },
    })
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

/// The image manifest of `layout`: its index's first, or the first of a nested index's.
fn image_manifest(layout: &Path) -> Result<Manifest, ImageError> {
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
    read_json(&manifest_path, "OCI manifest")
}

fn image_config(layout: &Path, manifest: &Manifest) -> Result<ImageConfig, ImageError> {
    let cfg: ConfigFile = read_json(&blob(layout, &manifest.config.digest), "OCI image config")?;
    let c = cfg.config.unwrap_or_default();
    Ok(ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.filter(|w| !w.is_empty()),
    })
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy)]
enum Compression {
    None,
    Gzip,
}

impl Compression {
    fn of(layer: &Descriptor) -> Result<Self, ImageError> {
        let t = &layer.media_type;
        if t.ends_with("+gzip") || t.ends_with(".gzip") {
            Ok(Compression::Gzip)
        } else if t.ends_with(".tar") {
            Ok(Compression::None)
        } else {
            Err(ImageError::MediaType(
                layer.digest.clone(),
                layer.media_type.clone(),
            ))
        }
    }

    /// The tar stream of the blob `r`. A gzip stream may have several members (eStargz).
    fn reader<'a>(self, r: impl Read + 'a) -> Box<dyn Read + 'a> {
        match self {
            Compression::None => Box::new(r),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        }
    }
}

/// `e` and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += ": ";
        s += &c.to_string();
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

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

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    fn sha256(bytes: &[u8]) -> String {
        let h: String = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("sha256:{h}")
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, bytes).unwrap();
        gz.finish().unwrap()
    }

    /// Writes an OCI image layout at `layout` with `layers` (media type, blob), bottom first,
    /// and the image config `config`; returns the layers' digests.
    fn layout_of(layout: &Path, layers: &[(&str, Vec<u8>)], config: &str) -> Vec<String> {
        fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
        let put = |bytes: &[u8]| {
            let digest = sha256(bytes);
            let path = blob(layout, &digest);
            fs::write(path, bytes).unwrap();
            digest
        };
        let digests: Vec<String> = layers.iter().map(|(_, b)| put(b)).collect();
        let descs: Vec<String> = layers
            .iter()
            .zip(&digests)
            .map(|((t, _), d)| format!(r#"{{"mediaType":"{t}","digest":"{d}"}}"#))
            .collect();
        let config = put(config.as_bytes());
        let manifest = put(format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}"}},"layers":[{}]}}"#,
            descs.join(",")
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
        digests
    }

    /// The layout `layout` as a tarball (`skopeo copy oci-archive:`).
    fn tarball_of(layout: &Path) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.append_dir_all(".", layout).unwrap();
        b.into_inner().unwrap()
    }

    const CONFIG: &str = r#"{"config":{"Cmd":["/bin/hello"],"Env":["A=1"],"WorkingDir":"/w"}}"#;

    #[test]
    fn oci_layouts_give_their_layers_and_config_as_directories_and_tarballs() {
        require_root();
        let d = tempfile::tempdir().unwrap();
        let layout = d.path().join("img");
        layout_of(&layout, &[(TAR, tar_of(&[("bin/hello", b"hi")]))], CONFIG);
        let cache = LayerCache::new(d.path().join("cache"));
        let check = |l: LayoutLayers| {
            assert_eq!(l.layers.len(), 1);
            assert!(debugfs(&l.layers[0].image, "cat /bin/hello").contains("hi"));
            assert_eq!(l.config.cmd, vec!["/bin/hello"]);
            assert_eq!(l.config.env, vec!["A=1"]);
            assert_eq!(l.config.working_dir.as_deref(), Some("/w"));
        };
        check(layout_layers(&layout, &d.path().join("work"), &cache).unwrap());
        // The same layout as a tarball, plain and gzipped.
        let tarball = tarball_of(&layout);
        for (name, bytes) in [("img.tar", tarball.clone()), ("img.tar.gz", gzip(&tarball))] {
            let file = d.path().join(name);
            fs::write(&file, bytes).unwrap();
            let work = d.path().join(format!("work-{name}"));
            check(layout_layers(&file, &work, &cache).unwrap());
        }
        // A plain directory is not a layout; a missing path is named.
        assert!(matches!(
            layout_layers(d.path(), &d.path().join("w"), &cache),
            Err(ImageError::NotLayout(_))
        ));
        let e = layout_layers(&d.path().join("nope"), &d.path().join("w"), &cache).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: whiteouts are device nodes, opaque directories trusted.* xattrs"
        );
    }

    /// `debugfs -R CMD image`'s output.
    fn debugfs(image: &Path, cmd: &str) -> String {
        let o = std::process::Command::new("debugfs")
            .args(["-R", cmd])
            .arg(image)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
    }

    /// The file names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn layout_layers_enter_the_cache_bottom_first_once() {
        require_root();
        let d = tempfile::tempdir().unwrap();
        let layout = d.path().join("img");
        let lower = tar_of(&[("bin/hello", b"hi"), ("etc/gone", b"g"), ("var/old", b"o")]);
        let upper = tar_of(&[
            ("etc/.wh.gone", b""),
            ("var/.wh..wh..opq", b""),
            ("var/new", b"n"),
        ]);
        layout_of(&layout, &[(TAR, lower), (TAR_GZ, gzip(&upper))], CONFIG);
        let cache = LayerCache::new(d.path().join("cache"));

        let first = layout_layers(&layout, &d.path().join("work"), &cache).unwrap();
        assert_eq!(first.config.cmd, vec!["/bin/hello"]);
        assert_eq!(first.config.working_dir.as_deref(), Some("/w"));
        let [bottom, top] = &first.layers[..] else {
            panic!("{:?}", first.layers)
        };
        assert!(bottom.converted && top.converted);
        assert_ne!(bottom.key, top.key);
        assert!(debugfs(&bottom.image, "cat /bin/hello").contains("hi"));
        let gone = debugfs(&top.image, "stat /etc/gone");
        assert!(gone.contains("Type: character special"), "{gone}");
        assert!(gone.contains("Mode:  0000"), "{gone}");
        let var = debugfs(&top.image, "ea_list /var");
        assert!(var.contains(r#"trusted.overlay.opaque (1) = "y""#), "{var}");
        assert!(debugfs(&top.image, "cat /var/new").contains('n'));

        // Again, and as a tarball: the digests find the entries.
        let again = layout_layers(&layout, &d.path().join("work2"), &cache).unwrap();
        fs::write(d.path().join("img.tar"), tarball_of(&layout)).unwrap();
        let tarball = layout_layers(&d.path().join("img.tar"), &d.path().join("work3"), &cache);
        for r in [again, tarball.unwrap()] {
            let got: Vec<_> = r.layers.iter().map(|l| (&l.key, l.converted)).collect();
            assert_eq!(got, [(&bottom.key, false), (&top.key, false)]);
        }
    }

    #[test]
    fn a_blob_that_does_not_match_its_digest_is_refused_and_never_cached() {
        require_root();
        let d = tempfile::tempdir().unwrap();
        let good = tar_of(&[("bin/hello", b"hi")]);
        // A tar that unpacks, with other content; a gzip stream that does not decompress.
        let other = tar_of(&[("bin/hello", b"ho")]);
        let mut broken = gzip(&good);
        broken[20] ^= 0xff;
        let cases = [(TAR, good.clone(), other), (TAR_GZ, gzip(&good), broken)];
        for (i, (media_type, blob_bytes, corrupted)) in cases.into_iter().enumerate() {
            let layout = d.path().join(format!("img{i}"));
            let digests = layout_of(&layout, &[(media_type, blob_bytes)], CONFIG);
            fs::write(blob(&layout, &digests[0]), corrupted).unwrap();
            let cache = LayerCache::new(d.path().join(format!("cache{i}")));
            let e = layout_layers(&layout, &d.path().join("work"), &cache).unwrap_err();
            match &e {
                ImageError::DigestMismatch { digest, .. } => assert_eq!(digest, &digests[0]),
                e => panic!("{media_type}: {e}"),
            }
            assert!(e.to_string().contains(&digests[0]), "{e}");
            let left = names(cache.dir());
            assert!(left.iter().all(|n| n.ends_with(".lock")), "{left:?}");
        }
    }

    #[test]
    fn layout_layers_refuse_what_they_cannot_check_or_read() {
        let d = tempfile::tempdir().unwrap();
        let cache = LayerCache::new(d.path().join("cache"));
        let work = d.path().join("work");
        let e = layout_layers(d.path(), &work, &cache).unwrap_err();
        assert!(matches!(e, ImageError::NotLayout(_)), "{e}");
        let zstd = "application/vnd.oci.image.layer.v1.tar+zstd";
        let layout = d.path().join("img");
        layout_of(&layout, &[(zstd, b"zstd".to_vec())], CONFIG);
        let e = layout_layers(&layout, &work, &cache).unwrap_err();
        assert!(matches!(e, ImageError::MediaType(..)), "{e}");
        // A digest that would name a path outside the layout.
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
        let manifest = blob(&layout, index["manifests"][0]["digest"].as_str().unwrap());
        let text = fs::read_to_string(&manifest).unwrap();
        let m: serde_json::Value = serde_json::from_str(&text).unwrap();
        let layer = m["layers"][0]["digest"].as_str().unwrap();
        fs::write(&manifest, text.replace(layer, "sha256:../../../etc/passwd")).unwrap();
        let e = layout_layers(&layout, &work, &cache).unwrap_err();
        assert!(matches!(e, ImageError::BadDigest(_)), "{e}");
        assert!(!cache.dir().exists() || names(cache.dir()).is_empty());
    }
}
