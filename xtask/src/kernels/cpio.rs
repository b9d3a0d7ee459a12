//! A newc ("070701") cpio writer: the archive format the kernel unpacks as an
//! initramfs. Written here rather than by the `cpio` tool so the archive is
//! built in memory from a list, with no staging directory to clean up, and its
//! layout is unit-tested.

/// One archive member. Paths are relative to the archive root (no leading `/`);
/// parents must come before their children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir { path: String },
    File { path: String, mode: u32, data: Vec<u8> },
    Symlink { path: String, target: String },
    CharDev { path: String, mode: u32, major: u32, minor: u32 },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const TRAILER: &str = "TRAILER!!!";

/// The archive, trailer included. Owners are root, times zero: the archive is
/// the same bytes for the same entries.
pub fn archive(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        let (path, mode, nlink, data, rdev): (&str, u32, u32, &[u8], (u32, u32)) = match entry {
            Entry::Dir { path } => (path, S_IFDIR | 0o755, 2, &[], (0, 0)),
            Entry::File { path, mode, data } => (path, S_IFREG | (mode & 0o7777), 1, data, (0, 0)),
            Entry::Symlink { path, target } => (path, S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
            Entry::CharDev { path, mode, major, minor } => (path, S_IFCHR | (mode & 0o7777), 1, &[], (*major, *minor)),
        };
        member(&mut out, ino, mode, nlink, path, data, rdev);
    }
    member(&mut out, 0, 0, 1, TRAILER, &[], (0, 0));
    out
}

fn member(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, name: &str, data: &[u8], rdev: (u32, u32)) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1, // with the NUL
        0,                     // check (unused by newc)
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, rdev, data) of a member.
    type Member = (String, u32, (u32, u32), Vec<u8>);

    /// Every member, read back as the kernel does.
    fn read_back(mut a: &[u8]) -> Vec<Member> {
        let total = a.len();
        let mut out = Vec::new();
        loop {
            assert_eq!(&a[..6], b"070701");
            let field =
                |i: usize| u32::from_str_radix(std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap();
            let (mode, size, rdev, namesize) = (field(1), field(6) as usize, (field(9), field(10)), field(11) as usize);
            let name = std::str::from_utf8(&a[110..110 + namesize - 1]).unwrap().to_owned();
            assert_eq!(a[110 + namesize - 1], 0, "name is NUL-terminated");
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = a[data_at..data_at + size].to_vec();
            let consumed = (data_at + size).next_multiple_of(4);
            assert_eq!((total - a.len() + consumed) % 4, 0);
            a = &a[consumed..];
            if name == TRAILER {
                assert!(a.is_empty(), "nothing after the trailer");
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn members_read_back_with_types_modes_and_data() {
        let entries = [
            Entry::Dir { path: "bin".into() },
            Entry::File { path: "bin/busybox".into(), mode: 0o755, data: b"\x7fELF12345".to_vec() },
            Entry::Symlink { path: "bin/sh".into(), target: "busybox".into() },
            Entry::CharDev { path: "console".into(), mode: 0o600, major: 5, minor: 1 },
            Entry::File { path: "init".into(), mode: 0o755, data: Vec::new() },
        ];
        let a = archive(&entries);
        assert_eq!(a.len() % 4, 0);
        let got = read_back(&a);
        assert_eq!(
            got,
            [
                ("bin".to_owned(), 0o040755, (0, 0), vec![]),
                ("bin/busybox".to_owned(), 0o100755, (0, 0), b"\x7fELF12345".to_vec()),
                ("bin/sh".to_owned(), 0o120777, (0, 0), b"busybox".to_vec()),
                ("console".to_owned(), 0o020600, (5, 1), vec![]),
                ("init".to_owned(), 0o100755, (0, 0), vec![]),
            ]
        );
    }

    #[test]
    fn header_layout_is_newc() {
        let a = archive(&[Entry::File { path: "a".into(), mode: 0o644, data: b"xy".to_vec() }]);
        let header = std::str::from_utf8(&a[..110]).unwrap();
        // magic, ino 1, mode 100644, uid, gid, nlink 1, mtime, size 2, dev, rdev, namesize 2, check
        let fields = [
            "00000001", "000081a4", "00000000", "00000000", "00000001", "00000000", "00000002", "00000000", "00000000",
            "00000000", "00000000", "00000002", "00000000",
        ];
        assert_eq!(header, format!("070701{}", fields.concat()));
        // Name "a\0" at 110..112, padded to 112; data at 112..114, padded to 116.
        assert_eq!(&a[110..116], b"a\0xy\0\0");
        assert_eq!(&a[116..122], b"070701", "the trailer follows");
    }

    #[test]
    fn same_entries_same_bytes() {
        let e = [Entry::Dir { path: "proc".into() }];
        assert_eq!(archive(&e), archive(&e));
    }
}
