//! OCI blob digests: which ones husk can check, and a reader that hashes what it reads.

use std::io::{self, Read};

use sha2::{Digest, Sha256, Sha512};

use super::ImageError;

/// The algorithm and hex of a digest husk can check.
pub(super) fn parse_digest(digest: &str) -> Result<(Algorithm, &str), ImageError> {
    let bad = || ImageError::BadDigest(digest.to_string());
    let (alg, hex) = digest.split_once(':').ok_or_else(bad)?;
    let (alg, len) = match alg {
        "sha256" => (Algorithm::Sha256, 64),
        "sha512" => (Algorithm::Sha512, 128),
        _ => return Err(bad()),
    };
    if hex.len() != len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    Ok((alg, hex))
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Algorithm {
    Sha256,
    Sha512,
}

/// A reader that hashes what it reads.
pub(super) struct Hashing<R> {
    inner: R,
    hash: Hash,
}

enum Hash {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl<R: Read> Hashing<R> {
    pub(super) fn new(inner: R, alg: Algorithm) -> Self {
        let hash = match alg {
            Algorithm::Sha256 => Hash::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hash::Sha512(Sha512::new()),
        };
        Hashing { inner, hash }
    }

    /// The hash of what was read, in lower-case hex.
    pub(super) fn hex(self) -> String {
        let bytes = match self.hash {
            Hash::Sha256(h) => h.finalize().to_vec(),
            Hash::Sha512(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        match &mut self.hash {
            Hash::Sha256(h) => h.update(&buf[..n]),
            Hash::Sha512(h) => h.update(&buf[..n]),
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_and_sha512_digests_are_checked_and_nothing_else() {
        let abc256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let digest = format!("sha256:{abc256}");
        let (alg, hex) = parse_digest(&digest).unwrap();
        assert_eq!(hex, abc256);
        let mut r = Hashing::new(&b"abc"[..], alg);
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert_eq!(r.hex(), abc256);
        let abc512 = "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
                      2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f";
        let (alg, _) = parse_digest(&format!("sha512:{abc512}")).unwrap();
        let mut r = Hashing::new(&b"abc"[..], alg);
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert_eq!(r.hex(), abc512);
        for bad in [
            "",
            abc256,
            &format!("md5:{abc256}"),
            &format!("sha256:{}", abc256.to_uppercase()),
            &format!("sha256:{abc256}0"),
            "sha256:../../etc/passwd",
        ] {
            assert!(
                matches!(parse_digest(bad), Err(ImageError::BadDigest(d)) if d == bad),
                "{bad}"
            );
        }
    }
}
