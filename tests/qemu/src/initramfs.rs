//! The initramfs of the Linux-TD test, written here in the newc cpio format
//! Linux unpacks (Documentation/driver-api/early-userspace/buffer-format.rst),
//! so no `cpio` binary and no root are needed: a device node is only a header
//! field in the archive, and the kernel creates it when it unpacks.
//!
//! ```text
//! cpio_file    := ALGN(4) + cpio_header + filename + "\0" + ALGN(4) + data
//! cpio_trailer := ALGN(4) + cpio_header + "TRAILER!!!\0" + ALGN(4)
//! cpio_header  := "070701" + 13 fields of 8 hex digits: ino mode uid gid
//!                 nlink mtime filesize maj min rmaj rmin namesize chksum
//! ```
//!
//! `namesize` counts the NUL; the checksum is 0 in the "070701" format.

use std::fmt;
use std::path::{Path, PathBuf};

/// The newc magic ("new ASCII", no checksum).
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// The header is the magic and 13 fields of 8 hex digits.
pub const HEADER_LEN: usize = 6 + 13 * 8;
/// The name of the entry that ends an archive.
pub const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFMT: u32 = 0o170000;

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Directory,
    File(Vec<u8>),
    /// The link's target, stored as the entry's data (no NUL).
    Symlink(String),
    /// A character device node: the kernel's `mknod` at unpack time.
    CharDevice {
        major: u32,
        minor: u32,
    },
}

/// One archive member: a path relative to the root (no leading `/`), its
/// permission bits and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub permissions: u32,
    pub kind: Kind,
}

impl Entry {
    pub fn directory(name: &str, permissions: u32) -> Self {
        Self::new(name, permissions, Kind::Directory)
    }
    pub fn file(name: &str, permissions: u32, data: Vec<u8>) -> Self {
        Self::new(name, permissions, Kind::File(data))
    }
    pub fn symlink(name: &str, target: &str) -> Self {
        Self::new(name, 0o777, Kind::Symlink(target.to_string()))
    }
    pub fn char_device(name: &str, permissions: u32, major: u32, minor: u32) -> Self {
        Self::new(name, permissions, Kind::CharDevice { major, minor })
    }
    fn new(name: &str, permissions: u32, kind: Kind) -> Self {
        Self {
            name: name.to_string(),
            permissions,
            kind,
        }
    }

    fn file_type(&self) -> u32 {
        match self.kind {
            Kind::Directory => S_IFDIR,
            Kind::File(_) => S_IFREG,
            Kind::Symlink(_) => S_IFLNK,
            Kind::CharDevice { .. } => S_IFCHR,
        }
    }

    fn data(&self) -> &[u8] {
        match &self.kind {
            Kind::File(data) => data,
            Kind::Symlink(target) => target.as_bytes(),
            Kind::Directory | Kind::CharDevice { .. } => &[],
        }
    }
}

/// Why an archive could not be written, read back or built.
#[derive(Debug, PartialEq, Eq)]
pub enum InitramfsError {
    /// A name that Linux would not unpack where we mean: empty, absolute,
    /// with `..`, a NUL, or the trailer's own name.
    BadName(String),
    /// The same path twice.
    DuplicateName(String),
    /// An entry's parent directory does not come before it (the kernel does
    /// not create missing parents).
    MissingParent(String),
    /// Permission bits outside 0o7777.
    BadPermissions { name: String, permissions: u32 },
    /// A field that does not fit in 8 hex digits.
    TooLarge { name: String, field: &'static str },
    /// Reading an archive back: not newc at `offset`.
    Malformed { offset: usize, why: String },
    /// A file the archive is built from, or the archive itself.
    Io { path: PathBuf, error: String },
}

impl fmt::Display for InitramfsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadName(name) => write!(f, "initramfs: bad entry name {name:?}"),
            Self::DuplicateName(name) => write!(f, "initramfs: {name} appears twice"),
            Self::MissingParent(name) => {
                write!(f, "initramfs: {name} comes before its parent directory")
            }
            Self::BadPermissions { name, permissions } => {
                write!(f, "initramfs: {name}: bad permissions {permissions:#o}")
            }
            Self::TooLarge { name, field } => {
                write!(f, "initramfs: {name}: {field} does not fit in 32 bits")
            }
            Self::Malformed { offset, why } => {
                write!(f, "initramfs: not a newc archive at byte {offset}: {why}")
            }
            Self::Io { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for InitramfsError {}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn hex_field(value: usize, name: &str, field: &'static str) -> Result<u32, InitramfsError> {
    u32::try_from(value).map_err(|_| InitramfsError::TooLarge {
        name: name.to_string(),
        field,
    })
}

/// The 13 header fields of one member, in order.
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
    namesize: u32,
}

fn push_member(out: &mut Vec<u8>, header: &Header, name: &str, data: &[u8]) {
    // Every member starts 4-aligned (ALGN(4) before the header); the
    // previous member's padding guarantees it.
    debug_assert_eq!(out.len() % 4, 0);
    out.extend_from_slice(NEWC_MAGIC);
    let fields = [
        header.ino,
        header.mode,
        0, // uid: root
        0, // gid: root
        header.nlink,
        0, // mtime: fixed, so the archive is the same on every build
        header.filesize,
        0, // devmajor, devminor: of the (nonexistent) filesystem holding it
        0,
        header.rdevmajor,
        header.rdevminor,
        header.namesize,
        0, // chksum: 0 in the 070701 format
    ];
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn check_name(name: &str) -> Result<(), InitramfsError> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.ends_with('/')
        || name.contains('\0')
        || name == TRAILER
        || name.split('/').any(|part| part.is_empty() || part == "..");
    if bad {
        Err(InitramfsError::BadName(name.to_string()))
    } else {
        Ok(())
    }
}

/// The newc archive of `entries`, in order, with the trailer.
///
/// Each member gets its own inode number and regular files a link count of
/// 1: Linux treats members with the same inode and a link count above 1 as
/// hard links of each other.
pub fn write_newc(entries: &[Entry]) -> Result<Vec<u8>, InitramfsError> {
    let mut out = Vec::new();
    let mut seen: Vec<(&str, bool)> = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let name = entry.name.as_str();
        check_name(name)?;
        if seen.iter().any(|(n, _)| *n == name) {
            return Err(InitramfsError::DuplicateName(name.to_string()));
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            if !seen.iter().any(|(n, is_dir)| *n == parent && *is_dir) {
                return Err(InitramfsError::MissingParent(name.to_string()));
            }
        }
        if entry.permissions & !0o7777 != 0 {
            return Err(InitramfsError::BadPermissions {
                name: name.to_string(),
                permissions: entry.permissions,
            });
        }
        seen.push((name, entry.kind == Kind::Directory));
        let (rdevmajor, rdevminor) = match entry.kind {
            Kind::CharDevice { major, minor } => (major, minor),
            _ => (0, 0),
        };
        let data = entry.data();
        let header = Header {
            ino: hex_field(index + 1, name, "inode number")?,
            mode: entry.file_type() | entry.permissions,
            nlink: if entry.kind == Kind::Directory { 2 } else { 1 },
            filesize: hex_field(data.len(), name, "file size")?,
            rdevmajor,
            rdevminor,
            namesize: hex_field(name.len() + 1, name, "name size")?,
        };
        push_member(&mut out, &header, name, data);
    }
    let trailer = Header {
        ino: 0,
        mode: 0,
        nlink: 1,
        filesize: 0,
        rdevmajor: 0,
        rdevminor: 0,
        namesize: TRAILER.len() as u32 + 1,
    };
    push_member(&mut out, &trailer, TRAILER, &[]);
    Ok(out)
}

/// One member read back by [`parse_newc`], with where its parts lie.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedMember {
    pub offset: usize,
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdevmajor: u32,
    pub rdevminor: u32,
    pub checksum: u32,
    pub name: String,
    /// Byte offset of the data (4-aligned).
    pub data_offset: usize,
    pub data: Vec<u8>,
}

impl ParsedMember {
    /// The entry this member describes (`None` for the trailer or a type
    /// the writer does not produce).
    pub fn to_entry(&self) -> Option<Entry> {
        let permissions = self.mode & 0o7777;
        let kind = match self.mode & S_IFMT {
            S_IFDIR => Kind::Directory,
            S_IFREG => Kind::File(self.data.clone()),
            S_IFLNK => Kind::Symlink(String::from_utf8(self.data.clone()).ok()?),
            S_IFCHR => Kind::CharDevice {
                major: self.rdevmajor,
                minor: self.rdevminor,
            },
            _ => return None,
        };
        Some(Entry {
            name: self.name.clone(),
            permissions,
            kind,
        })
    }
}

/// Reads a newc archive back, strictly: every member 4-aligned, the
/// padding zero, the trailer last with nothing but zeros after it.
/// Returns the members without the trailer.
pub fn parse_newc(bytes: &[u8]) -> Result<Vec<ParsedMember>, InitramfsError> {
    let malformed = |offset: usize, why: String| InitramfsError::Malformed { offset, why };
    let mut members = Vec::new();
    let mut at = 0;
    loop {
        if at % 4 != 0 {
            return Err(malformed(at, "member not 4-aligned".into()));
        }
        let header = bytes
            .get(at..at + HEADER_LEN)
            .ok_or_else(|| malformed(at, "truncated header (no trailer?)".into()))?;
        if &header[..6] != NEWC_MAGIC {
            return Err(malformed(at, format!("magic {:?}", &header[..6])));
        }
        let mut fields = [0u32; 13];
        for (i, field) in fields.iter_mut().enumerate() {
            let digits = &header[6 + 8 * i..14 + 8 * i];
            let text = std::str::from_utf8(digits)
                .ok()
                .filter(|t| t.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| malformed(at, format!("field {i} is not 8 hex digits")))?;
            *field = u32::from_str_radix(text, 16).expect("8 hex digits fit in u32");
        }
        let [ino, mode, uid, gid, nlink, _mtime, filesize, _maj, _min, rdevmajor, rdevminor, namesize, checksum] =
            fields;
        let name_start = at + HEADER_LEN;
        let name_end = name_start + namesize as usize;
        let raw_name = bytes
            .get(name_start..name_end)
            .ok_or_else(|| malformed(at, "truncated name".into()))?;
        let (nul, name) = raw_name
            .split_last()
            .ok_or_else(|| malformed(at, "namesize 0".into()))?;
        if *nul != 0 || name.contains(&0) {
            return Err(malformed(at, "name not NUL-terminated".into()));
        }
        let name =
            String::from_utf8(name.to_vec()).map_err(|_| malformed(at, "name not UTF-8".into()))?;
        let data_offset = name_end.next_multiple_of(4);
        let data_end = data_offset + filesize as usize;
        let next = data_end.next_multiple_of(4);
        let (Some(name_pad), Some(data), Some(data_pad)) = (
            bytes.get(name_end..data_offset),
            bytes.get(data_offset..data_end),
            bytes.get(data_end..next),
        ) else {
            return Err(malformed(at, format!("{name}: truncated data")));
        };
        if name_pad.iter().chain(data_pad).any(|&b| b != 0) {
            return Err(malformed(at, format!("{name}: nonzero padding")));
        }
        if name == TRAILER {
            if bytes[next..].iter().any(|&b| b != 0) {
                return Err(malformed(next, "data after the trailer".into()));
            }
            return Ok(members);
        }
        members.push(ParsedMember {
            offset: at,
            ino,
            mode,
            uid,
            gid,
            nlink,
            rdevmajor,
            rdevminor,
            checksum,
            name,
            data_offset,
            data: data.to_vec(),
        });
        at = next;
    }
}

/// The members of the Linux-TD initramfs: `init` as `/init`, `busybox` as
/// `/bin/busybox` with `/bin/sh` linked to it, `/dev/console` (c 5 1: the
/// kernel opens it for init's stdin/stdout/stderr before any devtmpfs
/// exists), and the mount points `/proc` and `/sys`.
pub fn linux_td_entries(init: Vec<u8>, busybox: Vec<u8>) -> Vec<Entry> {
    vec![
        Entry::directory("bin", 0o755),
        Entry::file("bin/busybox", 0o755, busybox),
        Entry::symlink("bin/sh", "busybox"),
        Entry::directory("dev", 0o755),
        Entry::char_device("dev/console", 0o600, 5, 1),
        Entry::directory("proc", 0o555),
        Entry::directory("sys", 0o555),
        Entry::file("init", 0o755, init),
    ]
}

/// Where linux-td/init looks for issue 8's kernel module.
pub const RACE_MODULE_PATH: &str = "lib/modules-test/coco_race.ko";

/// The Linux-TD initramfs with the race module `module` (coco_race.ko) at
/// [`RACE_MODULE_PATH`]; linux-td/init loads it only when the command line
/// says `coco_race=race` or `coco_race=bench`.
pub fn linux_td_race_entries(init: Vec<u8>, busybox: Vec<u8>, module: Vec<u8>) -> Vec<Entry> {
    let mut entries = linux_td_entries(init, busybox);
    entries.push(Entry::directory("lib", 0o755));
    entries.push(Entry::directory("lib/modules-test", 0o755));
    entries.push(Entry::file(RACE_MODULE_PATH, 0o644, module));
    entries
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    std::fs::read(path).map_err(|e| InitramfsError::Io {
        path: path.to_path_buf(),
        error: e.to_string(),
    })
}

/// Builds the Linux-TD initramfs from the files `init` and `busybox` into
/// `out`, through a temporary file and a rename so a reader never sees half
/// an archive.
pub fn build_linux_td_initramfs(
    init: &Path,
    busybox: &Path,
    out: &Path,
) -> Result<(), InitramfsError> {
    let archive = write_newc(&linux_td_entries(read(init)?, read(busybox)?))?;
    write_archive(&archive, out)
}

/// [`build_linux_td_initramfs`] with the race module added
/// ([`linux_td_race_entries`]).
pub fn build_linux_td_race_initramfs(
    init: &Path,
    busybox: &Path,
    module: &Path,
    out: &Path,
) -> Result<(), InitramfsError> {
    let entries = linux_td_race_entries(read(init)?, read(busybox)?, read(module)?);
    write_archive(&write_newc(&entries)?, out)
}

fn write_archive(archive: &[u8], out: &Path) -> Result<(), InitramfsError> {
    let io = |path: &Path, e: std::io::Error| InitramfsError::Io {
        path: path.to_path_buf(),
        error: e.to_string(),
    };
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let partial = out.with_extension(format!("partial.{}", std::process::id()));
    std::fs::write(&partial, archive).map_err(|e| io(&partial, e))?;
    std::fs::rename(&partial, out).map_err(|e| io(out, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        linux_td_entries(
            b"#!/bin/sh\necho hi\n".to_vec(),
            vec![0x7f, b'E', b'L', b'F', 1],
        )
    }

    #[test]
    fn the_race_initramfs_adds_the_module_where_init_looks() {
        let module = vec![0x7f, b'E', b'L', b'F', 2];
        let entries = linux_td_race_entries(b"#!/bin/sh\n".to_vec(), vec![1], module.clone());
        assert_eq!(
            &entries[..8],
            &linux_td_entries(b"#!/bin/sh\n".to_vec(), vec![1])[..]
        );
        let members = parse_newc(&write_newc(&entries).unwrap()).unwrap();
        let ko = members.iter().find(|m| m.name == RACE_MODULE_PATH).unwrap();
        assert_eq!(ko.data, module);
        assert_eq!(ko.mode, 0o100644);
        let init = std::fs::read_to_string(crate::linux_td_init_script()).unwrap();
        assert!(
            init.contains(&format!("/{RACE_MODULE_PATH}")),
            "linux-td/init must look there"
        );
    }

    #[test]
    fn round_trips_every_kind() {
        let entries = sample();
        let archive = write_newc(&entries).unwrap();
        let members = parse_newc(&archive).unwrap();
        let back: Vec<Entry> = members.iter().map(|m| m.to_entry().unwrap()).collect();
        assert_eq!(back, entries);
        let console = members.iter().find(|m| m.name == "dev/console").unwrap();
        assert_eq!(console.mode, 0o020600);
        assert_eq!((console.rdevmajor, console.rdevminor), (5, 1));
        let sh = members.iter().find(|m| m.name == "bin/sh").unwrap();
        assert_eq!(sh.mode, 0o120777);
        assert_eq!(sh.data, b"busybox");
        let init = members.iter().find(|m| m.name == "init").unwrap();
        assert_eq!(init.mode, 0o100755);
    }

    #[test]
    fn headers_are_as_linux_expects() {
        let archive = write_newc(&sample()).unwrap();
        assert_eq!(archive.len() % 4, 0);
        let members = parse_newc(&archive).unwrap();
        let mut inodes: Vec<u32> = members.iter().map(|m| m.ino).collect();
        inodes.sort_unstable();
        inodes.dedup();
        assert_eq!(inodes.len(), members.len(), "inode numbers must be unique");
        for m in &members {
            assert_eq!(m.offset % 4, 0, "{}", m.name);
            assert_eq!(m.data_offset % 4, 0, "{}", m.name);
            assert_eq!((m.uid, m.gid, m.checksum), (0, 0, 0), "{}", m.name);
            // A regular file with nlink > 1 would be taken for a hard link.
            let want_nlink = if m.mode & S_IFMT == S_IFDIR { 2 } else { 1 };
            assert_eq!(m.nlink, want_nlink, "{}", m.name);
        }
        // The first header, field by field.
        let first = std::str::from_utf8(&archive[..HEADER_LEN]).unwrap();
        assert_eq!(
            first,
            "070701\
             00000001\
             000041ed\
             00000000\
             00000000\
             00000002\
             00000000\
             00000000\
             00000000\
             00000000\
             00000000\
             00000000\
             00000004\
             00000000"
        );
        // "bin\0" ends at 110 + 4 = 114; padded to 116, where the next
        // member starts (a directory has no data).
        assert_eq!(&archive[110..116], b"bin\0\0\0");
        assert_eq!(&archive[116..122], NEWC_MAGIC);
    }

    #[test]
    fn padding_follows_every_name_and_data_length() {
        // Names of length 1..=4 and data of length 0..=4 exercise every
        // remainder of both paddings.
        for name_len in 1..=4 {
            for data_len in 0..=4 {
                let name = "n".repeat(name_len);
                let entries = [Entry::file(&name, 0o644, vec![0xaa; data_len])];
                let archive = write_newc(&entries).unwrap();
                let members = parse_newc(&archive).unwrap();
                let m = &members[0];
                assert_eq!(
                    m.data_offset,
                    (HEADER_LEN + name_len + 1).next_multiple_of(4)
                );
                assert_eq!(m.data, vec![0xaa; data_len]);
                let trailer_at = (m.data_offset + data_len).next_multiple_of(4);
                assert_eq!(&archive[trailer_at..trailer_at + 6], NEWC_MAGIC);
            }
        }
    }

    #[test]
    fn ends_with_the_trailer() {
        let archive = write_newc(&[]).unwrap();
        // 110 + "TRAILER!!!\0" = 121, padded to 124.
        assert_eq!(archive.len(), 124);
        assert_eq!(&archive[110..121], b"TRAILER!!!\0");
        assert_eq!(&archive[94..102], b"0000000b", "namesize counts the NUL");
        assert_eq!(parse_newc(&archive).unwrap(), vec![]);
        // Zeros after the trailer are allowed (Linux skips them), and
        // anything else is not.
        let mut padded = archive.clone();
        padded.extend_from_slice(&[0; 512]);
        assert!(parse_newc(&padded).is_ok());
        padded.push(1);
        assert!(parse_newc(&padded).is_err());
        // Without the trailer, an archive is incomplete.
        let full = write_newc(&sample()).unwrap();
        assert!(parse_newc(&full[..full.len() - 124]).is_err());
    }

    #[test]
    fn refuses_names_linux_would_misplace() {
        for name in [
            "", "/init", "bin/", "a//b", "../x", "a/../b", "a\0b", TRAILER,
        ] {
            let entries = [Entry::directory(name, 0o755)];
            assert_eq!(
                write_newc(&entries),
                Err(InitramfsError::BadName(name.to_string())),
                "{name:?}"
            );
        }
        let twice = [Entry::directory("a", 0o755), Entry::directory("a", 0o755)];
        assert_eq!(
            write_newc(&twice),
            Err(InitramfsError::DuplicateName("a".into()))
        );
        let orphan = [Entry::file("bin/sh", 0o755, vec![])];
        assert_eq!(
            write_newc(&orphan),
            Err(InitramfsError::MissingParent("bin/sh".into()))
        );
        let file_as_parent = [
            Entry::file("a", 0o644, vec![]),
            Entry::file("a/b", 0o644, vec![]),
        ];
        assert!(matches!(
            write_newc(&file_as_parent),
            Err(InitramfsError::MissingParent(_))
        ));
        assert!(matches!(
            write_newc(&[Entry::file("x", 0o10000, vec![])]),
            Err(InitramfsError::BadPermissions { .. })
        ));
    }

    #[test]
    fn builds_the_archive_from_files() {
        let dir = std::env::temp_dir().join(format!("initramfs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (init, busybox, out) = (
            dir.join("init"),
            dir.join("busybox"),
            dir.join("out/a.cpio"),
        );
        std::fs::write(&init, b"#!/bin/sh\n").unwrap();
        std::fs::write(&busybox, b"\x7fELF").unwrap();
        build_linux_td_initramfs(&init, &busybox, &out).unwrap();
        let members = parse_newc(&std::fs::read(&out).unwrap()).unwrap();
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "proc",
                "sys",
                "init"
            ]
        );
        let missing = dir.join("nope");
        let error = build_linux_td_initramfs(&missing, &busybox, &out).unwrap_err();
        assert!(error.to_string().contains("nope"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
