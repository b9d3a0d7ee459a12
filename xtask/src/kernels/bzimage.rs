//! The uncompressed kernel (`vmlinux`) from a bzImage: qemu boots an ELF
//! `vmlinux` through its PVH entry without running the in-kernel decompressor,
//! which under software emulation saves seconds per boot (about 4 s for
//! Debian's xz-compressed 6.1).
//!
//! The x86 boot protocol's setup header says exactly where the compressed
//! payload is (`payload_offset`, `payload_length`, protocol 2.08+), so no
//! magic-number scanning is needed.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
}

impl Compression {
    pub fn detect(data: &[u8]) -> Option<Self> {
        if data.starts_with(&[0x1f, 0x8b]) {
            Some(Self::Gzip)
        } else if data.starts_with(b"\xfd7zXZ\0") {
            Some(Self::Xz)
        } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Self::Zstd)
        } else {
            None
        }
    }

    /// The decompressing command, reading stdin and writing stdout.
    pub fn tool(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
        }
    }
}

/// The compressed payload of a bzImage and the uncompressed size the build
/// appended to it.
#[derive(Debug, PartialEq, Eq)]
pub struct Payload<'a> {
    pub compression: Compression,
    pub data: &'a [u8],
    pub size: u32,
}

pub fn payload(image: &[u8]) -> Result<Payload<'_>> {
    ensure!(image.len() > 0x250, "too short for a bzImage");
    ensure!(&image[0x202..0x206] == b"HdrS", "no x86 boot header (HdrS) at 0x202");
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    ensure!(version >= 0x208, "boot protocol {version:#x} predates payload fields (2.08)");
    let setup_sects = match image[0x1f1] {
        0 => 4, // as the boot protocol says
        n => u32::from(n),
    };
    let le32 = |at: usize| u32::from_le_bytes(image[at..at + 4].try_into().unwrap());
    let start = ((setup_sects + 1) * 512 + le32(0x248)) as usize;
    let len = le32(0x24c) as usize;
    let Some(all) = image.get(start..start + len) else {
        bail!("payload {start}+{len} lies outside the {}-byte image", image.len());
    };
    // The kernel build appends the uncompressed size (4 bytes, little endian).
    ensure!(len > 4, "empty payload");
    let (data, size) = all.split_at(len - 4);
    let compression = Compression::detect(data)
        .with_context(|| format!("unknown payload compression (starts with {:02x?})", &data[..data.len().min(6)]))?;
    Ok(Payload { compression, data, size: u32::from_le_bytes(size.try_into().unwrap()) })
}

/// Writes the ELF kernel inside `vmlinuz` to `out`.
pub fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let image = std::fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let p = payload(&image).with_context(|| format!("{} is not a usable bzImage", vmlinuz.display()))?;
    let elf = decompress(p.compression, p.data)?;
    ensure!(elf.starts_with(b"\x7fELF"), "the payload of {} is not an ELF kernel", vmlinuz.display());
    ensure!(elf.len() == p.size as usize, "decompressed {} bytes, the image says {}", elf.len(), p.size);
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &elf).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// Decompresses `data` with the matching command-line tool (installed by
/// `host::ensure_tools`): no compression crates for a build tool that runs
/// this a few times per machine.
pub fn decompress(c: Compression, data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(c.tool())
        .args(["-d", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", c.tool()))?;
    let mut stdin = child.stdin.take().expect("piped");
    // Fed from a thread: the tool's output fills its pipe long before all input is written.
    let output = std::thread::scope(|s| {
        s.spawn(move || stdin.write_all(data).map(|()| drop(stdin)));
        child.wait_with_output()
    })?;
    if !output.status.success() {
        bail!("{} -d failed ({}): {}", c.tool(), output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal image: `setup_sects` sectors of setup after the boot sector,
    /// then 100 bytes of padding and the payload.
    fn image(setup_sects: u8, version: u16, payload: &[u8]) -> Vec<u8> {
        let sects = if setup_sects == 0 { 4 } else { setup_sects as usize };
        let mut img = vec![0u8; (sects + 1) * 512 + 100];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(b"trailing setup data");
        img
    }

    #[test]
    fn finds_the_payload_and_its_size() {
        let mut body = b"\xfd7zXZ\0compressed".to_vec();
        body.extend_from_slice(&65_906_612u32.to_le_bytes());
        for sects in [39, 0] {
            let img = image(sects, 0x20f, &body);
            let p = payload(&img).unwrap();
            assert_eq!(p.compression, Compression::Xz);
            assert_eq!(p.data, b"\xfd7zXZ\0compressed");
            assert_eq!(p.size, 65_906_612);
        }
    }

    #[test]
    fn detects_each_compression() {
        assert_eq!(Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 4]), Some(Compression::Zstd));
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Some(Compression::Gzip));
        assert_eq!(Compression::detect(b"BZh9"), None);
    }

    #[test]
    fn refuses_what_is_not_a_usable_bzimage() {
        let body = b"\x28\xb5\x2f\xfdxxxxSIZE";
        assert!(payload(&image(39, 0x206, body)).unwrap_err().to_string().contains("predates"));
        let mut img = image(39, 0x20f, body);
        img[0x202] = b'X';
        assert!(payload(&img).unwrap_err().to_string().contains("HdrS"));
        let mut img = image(39, 0x20f, body);
        img[0x24c..0x250].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(payload(&img).unwrap_err().to_string().contains("outside"));
        assert!(payload(&image(39, 0x20f, b"BZh9xxxxSIZE")).unwrap_err().to_string().contains("compression"));
    }

    #[test]
    fn decompress_round_trips_through_the_tool() {
        // gzip is on every machine this runs on (Debian's required set).
        let compressed = Command::new("sh").args(["-c", "printf 'vmlinux bytes' | gzip -c"]).output().unwrap().stdout;
        assert_eq!(decompress(Compression::Gzip, &compressed).unwrap(), b"vmlinux bytes");
        assert!(decompress(Compression::Gzip, b"not gzip").is_err());
    }
}
