//! File system access that stays inside its root. Everything below a root the
//! agent reads or writes on a tenant's behalf is hostile: a container's root, an
//! emptyDir, a rootfs built from the tenant's image, an archive from the bucket. So
//! paths are resolved from a directory fd with `openat2` (`RESOLVE_IN_ROOT` where a
//! path means what it means to the container, `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`
//! everywhere else), and every archive goes through the one [`unpack`] here.
//!
//! The handler runs as host root: a write or delete that followed a symlink of the
//! image (`x -> /`) would land on the host.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags};
use rustix::io::Errno;

use crate::capture::OPAQUE_MARKER;

/// The pax key prefix under which tar archives carry extended attributes.
pub const PAX_XATTR: &str = "SCHILY.xattr.";

/// The largest xattr name list and value Linux allows (`XATTR_LIST_MAX`, `XATTR_SIZE_MAX`).
const XATTR_MAX: usize = 65536;

/// Removals stop this deep: an image may hold a tree deep enough to exhaust the stack.
const MAX_DEPTH: usize = 1024;

/// Extended attributes carried through a checkpoint: what the tenant set and what
/// its programs need (file capabilities, ACLs). Never overlayfs' own (`trusted.overlay.*`,
/// `user.overlay.*`): written into a rootfs they would rewire its layers.
pub fn carried_xattr(name: &[u8]) -> bool {
    matches!(
        name,
        b"security.capability" | b"system.posix_acl_access" | b"system.posix_acl_default"
    ) || (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// `openat2` fails with EAGAIN when a rename raced the lookup; a few retries settle it.
fn openat2_retrying(
    dir: BorrowedFd<'_>,
    path: &Path,
    flags: OFlags,
    resolve: ResolveFlags,
) -> std::io::Result<OwnedFd> {
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, path, flags, Mode::empty(), resolve) {
            Err(Errno::AGAIN) if tries < 8 => tries += 1,
            result => return result.map_err(Into::into),
        }
    }
}

/// Opens a directory whose path the host controls (a kubelet volume, a bundle's rootfs):
/// the anchor every walk below starts from.
pub fn open_root(path: &Path) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens directory `path` as the container whose root is `root` sees it: symlinks and
/// `..` resolve inside `root` (as runc resolves mount destinations), magic links are
/// refused.
pub fn open_dir_in_root(root: BorrowedFd<'_>, path: &Path) -> std::io::Result<OwnedFd> {
    openat2_retrying(
        root,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Opens regular file `rel` below `root` for reading, refusing any symlink on the way
/// or at the end (ELOOP) and anything that leaves `root` (EXDEV).
pub fn open_file_beneath(root: BorrowedFd<'_>, rel: &Path) -> std::io::Result<OwnedFd> {
    let fd = openat2_retrying(
        root,
        rel,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    let kind = rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
    if kind != rustix::fs::FileType::RegularFile {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", rel.display()),
        ));
    }
    Ok(fd)
}

/// [`open_file_beneath`] the directory at `root`.
pub fn open_file_in(root: &Path, rel: &Path) -> std::io::Result<OwnedFd> {
    open_file_beneath(open_root(root)?.as_fd(), rel)
}

/// Opens directory `rel` below `root`, refusing any symlink on the way (ELOOP) and
/// anything that leaves `root` (EXDEV). An empty `rel` is `root` itself.
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> std::io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    // No O_NOFOLLOW: with it a trailing symlink fails as ENOTDIR; without, as ELOOP
    // like every other symlink on the way.
    openat2_retrying(
        root,
        rel,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

/// The names in a directory, sorted, without `.` and `..`.
pub fn list_dir(dir: BorrowedFd<'_>) -> std::io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(&name).to_os_string());
        }
    }
    names.sort();
    Ok(names)
}

/// The [`carried_xattr`]s of an open file or directory. A file system without
/// xattrs has none.
pub fn read_xattrs(fd: BorrowedFd<'_>) -> std::io::Result<Vec<(OsString, Vec<u8>)>> {
    let mut list = vec![0u8; XATTR_MAX];
    let len = match rustix::fs::flistxattr(fd, &mut list[..]) {
        Ok(len) => len,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut value = vec![0u8; XATTR_MAX];
    let mut found = Vec::new();
    for name in list[..len]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty() && carried_xattr(n))
    {
        let name = OsStr::from_bytes(name);
        match rustix::fs::fgetxattr(fd, name, &mut value[..]) {
            Ok(n) => found.push((name.to_os_string(), value[..n].to_vec())),
            // Removed since it was listed.
            Err(Errno::NODATA) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(found)
}

/// Why an archive entry was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// An absolute path.
    Absolute,
    /// A `..` component.
    ParentDir,
    /// A symlink (from the archive or already on disk) on the way to the entry.
    SymlinkOnPath,
    /// A non-directory on the way to the entry.
    NotADirectoryOnPath,
    /// The path resolves outside the target.
    Escapes,
    /// A hardlink whose target is not a plain relative path to a non-directory inside.
    HardlinkTarget { target: PathBuf },
    /// A device node other than the overlay whiteout (0:0).
    Device { major: u32, minor: u32 },
    /// A kind of entry this unpack does not take.
    EntryType { kind: String },
    /// A whiteout that names no file (`.wh.`, `.wh..`, `.wh...`).
    Whiteout,
    /// An owner that does not fit a uid/gid.
    Owner,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Absolute => write!(f, "it is an absolute path"),
            Self::ParentDir => write!(f, "it climbs out with `..`"),
            Self::SymlinkOnPath => write!(f, "a symlink is on its path"),
            Self::NotADirectoryOnPath => write!(f, "a non-directory is on its path"),
            Self::Escapes => write!(f, "it resolves outside the target"),
            Self::HardlinkTarget { target } => {
                write!(
                    f,
                    "its hardlink target {} is not a file inside the target",
                    target.display()
                )
            }
            Self::Device { major, minor } => write!(f, "device nodes ({major}:{minor}) are not restored"),
            Self::EntryType { kind } => write!(f, "{kind} entries are not allowed here"),
            Self::Whiteout => write!(f, "the whiteout names no file"),
            Self::Owner => write!(f, "its owner is not a valid uid/gid"),
        }
    }
}

/// Unpacking an archive failed; what was written before stays (the caller discards
/// its target on failure).
#[derive(Debug)]
pub enum UnpackError {
    /// The target directory cannot be opened.
    Target { path: PathBuf, source: std::io::Error },
    /// The archive cannot be read.
    Read { source: std::io::Error },
    /// An entry was refused.
    Refused { entry: PathBuf, reason: Refusal },
    /// Writing an entry failed.
    Write { entry: PathBuf, source: std::io::Error },
}

impl std::fmt::Display for UnpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Target { path, .. } => write!(f, "cannot open the unpack target {}", path.display()),
            Self::Read { .. } => write!(f, "cannot read the archive"),
            Self::Refused { entry, reason } => write!(f, "archive entry {} refused: {reason}", entry.display()),
            Self::Write { entry, source } => write!(f, "cannot write archive entry {}: {source}", entry.display()),
        }
    }
}

impl std::error::Error for UnpackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Target { source, .. } | Self::Read { source } | Self::Write { source, .. } => Some(source),
            Self::Refused { .. } => None,
        }
    }
}

/// What an unpack restores besides plain files and directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Owners from the headers, and setuid/setgid bits with them. Without, both are dropped.
    pub owners: bool,
    /// The [`carried_xattr`]s from pax headers.
    pub xattrs: bool,
    /// OCI whiteouts and opaque markers delete.
    pub whiteouts: bool,
    /// Symlinks and hardlinks.
    pub links: bool,
    /// Fifos and the 0:0 character device.
    pub specials: bool,
}

impl UnpackOptions {
    /// A pod's files (an emptyDir, `/dev/shm`): everything they hold, as they were.
    pub const TREE: Self = Self {
        owners: true,
        xattrs: true,
        whiteouts: false,
        links: true,
        specials: true,
    };
    /// A container's rootfs changes: a tree whose whiteouts delete.
    pub const ROOTFS_DIFF: Self = Self {
        whiteouts: true,
        ..Self::TREE
    };
    /// The agent's own files from the bucket: regular files and directories only, so
    /// no later open of a prepared path can be redirected.
    pub const FILES: Self = Self {
        owners: false,
        xattrs: false,
        whiteouts: false,
        links: false,
        specials: false,
    };
}

/// `path` as plain relative components (`.` dropped), or why it is not one.
pub fn plain_relative(path: &Path) -> Result<PathBuf, Refusal> {
    let mut plain = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => plain.push(name),
            Component::CurDir => {}
            Component::ParentDir => return Err(Refusal::ParentDir),
            Component::RootDir | Component::Prefix(_) => return Err(Refusal::Absolute),
        }
    }
    Ok(plain)
}

/// Header fields applied to an unpacked entry.
struct Meta {
    /// uid and gid, when restored.
    owner: Option<(u32, u32)>,
    mode: u32,
    mtime: i64,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

/// Unpacks a tar stream into `target`. No entry leaves it: absolute paths, `..`,
/// symlinks on an entry's path (whether the archive made them or they were on disk),
/// hardlinks to anything but a file inside, and device nodes are refused, naming the
/// entry. An entry replaces what was at its name (it is never written through), and a
/// whiteout deletes only below `target`.
pub fn unpack<R: Read>(reader: R, target: &Path, options: UnpackOptions) -> Result<(), UnpackError> {
    let root = open_root(target).map_err(|source| UnpackError::Target {
        path: target.to_path_buf(),
        source,
    })?;
    let mut archive = tar::Archive::new(reader);
    // Directory times are set last: unpacking their contents changes them.
    let mut dir_times = Vec::new();
    for entry in archive.entries().map_err(|source| UnpackError::Read { source })? {
        let mut entry = entry.map_err(|source| UnpackError::Read { source })?;
        let shown = entry
            .path()
            .map_err(|source| UnpackError::Read { source })?
            .into_owned();
        if let Some(dir) = unpack_entry(&mut entry, &shown, root.as_fd(), options)? {
            dir_times.push(dir);
        }
    }
    for (rel, mtime) in dir_times.iter().rev() {
        // Best effort: a directory removed by a later whiteout has no time to set.
        if let Ok(dir) = open_dir_beneath(root.as_fd(), rel) {
            let _ = rustix::fs::futimens(&dir, &times(*mtime));
        }
    }
    Ok(())
}

fn times(mtime: i64) -> Timestamps {
    let at = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: at,
        last_modification: at,
    }
}

/// Unpacks one entry; returns a directory whose time is to be set at the end.
fn unpack_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    shown: &Path,
    root: BorrowedFd<'_>,
    options: UnpackOptions,
) -> Result<Option<(PathBuf, i64)>, UnpackError> {
    let refused = |reason| UnpackError::Refused {
        entry: shown.to_path_buf(),
        reason,
    };
    let write = |source: std::io::Error| UnpackError::Write {
        entry: shown.to_path_buf(),
        source,
    };
    let rel = plain_relative(shown).map_err(refused)?;
    // The target itself: its owner and mode are the host's.
    let Some(name) = rel.file_name().map(OsStr::to_os_string) else {
        return Ok(None);
    };
    let parent = rel.parent().unwrap_or(Path::new(""));

    if options.whiteouts {
        if name == OPAQUE_MARKER {
            if let Some(dir) = resolve_dir(root, parent, false, shown)? {
                clear_dir(dir.as_fd(), 0).map_err(write)?;
            }
            return Ok(None);
        }
        if let Some(deleted) = name.as_bytes().strip_prefix(b".wh.") {
            if matches!(deleted, b"" | b"." | b"..") {
                return Err(refused(Refusal::Whiteout));
            }
            if let Some(dir) = resolve_dir(root, parent, false, shown)? {
                remove_at(dir.as_fd(), OsStr::from_bytes(deleted), 0).map_err(write)?;
            }
            return Ok(None);
        }
    }

    let meta = meta(entry, options).map_err(|e| match e {
        Ok(reason) => refused(reason),
        Err(source) => UnpackError::Read { source },
    })?;
    let kind = entry.header().entry_type();
    let not_allowed = || {
        refused(Refusal::EntryType {
            kind: format!("{kind:?}"),
        })
    };
    if kind.is_pax_global_extensions() {
        return Ok(None);
    }
    let dir = resolve_dir(root, parent, true, shown)?.ok_or_else(|| write(std::io::ErrorKind::NotFound.into()))?;
    let dir = dir.as_fd();
    match kind {
        tar::EntryType::Directory => {
            match rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                Ok(_) => {
                    remove_at(dir, &name, 0).map_err(write)?;
                    mkdir(dir, &name).map_err(write)?;
                }
                Err(Errno::NOENT) => mkdir(dir, &name).map_err(write)?,
                Err(e) => return Err(write(e.into())),
            }
            let fd = rustix::fs::openat(dir, &name, dir_flags(), Mode::empty()).map_err(|e| write(e.into()))?;
            apply_to_fd(fd.as_fd(), &meta).map_err(write)?;
            return Ok(Some((rel, meta.mtime)));
        }
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            remove_at(dir, &name, 0).map_err(write)?;
            let fd = rustix::fs::openat(
                dir,
                &name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| write(e.into()))?;
            let mut file = std::fs::File::from(fd);
            std::io::copy(entry, &mut file).map_err(write)?;
            apply_to_fd(file.as_fd(), &meta).map_err(write)?;
            rustix::fs::futimens(&file, &times(meta.mtime)).map_err(|e| write(e.into()))?;
        }
        tar::EntryType::Symlink if options.links => {
            let Some(link) = entry.link_name_bytes() else {
                return Err(not_allowed());
            };
            remove_at(dir, &name, 0).map_err(write)?;
            rustix::fs::symlinkat(OsStr::from_bytes(&link), dir, &name).map_err(|e| write(e.into()))?;
            apply_to_node(dir, &name, &meta, false).map_err(write)?;
        }
        tar::EntryType::Link if options.links => {
            let target = entry
                .link_name()
                .map_err(|source| UnpackError::Read { source })?
                .map(|t| t.into_owned())
                .unwrap_or_default();
            let bad_target = || refused(Refusal::HardlinkTarget { target: target.clone() });
            let plain = plain_relative(&target).map_err(|_| bad_target())?;
            let Some(source_name) = plain.file_name() else {
                return Err(bad_target());
            };
            // The target's own path may not go through a symlink either.
            let source_dir = resolve_dir(root, plain.parent().unwrap_or(Path::new("")), false, shown)
                .ok()
                .flatten()
                .ok_or_else(bad_target)?;
            let source =
                rustix::fs::statat(&source_dir, source_name, AtFlags::SYMLINK_NOFOLLOW).map_err(|_| bad_target())?;
            if FileType::from_raw_mode(source.st_mode) == FileType::Directory {
                return Err(bad_target());
            }
            // A link to itself is already in place (removing it would lose the file).
            if let Ok(existing) = rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)
                && (existing.st_dev, existing.st_ino) == (source.st_dev, source.st_ino)
            {
                return Ok(None);
            }
            remove_at(dir, &name, 0).map_err(write)?;
            // Without AT_SYMLINK_FOLLOW a symlink is linked as itself, never followed.
            rustix::fs::linkat(&source_dir, source_name, dir, &name, AtFlags::empty()).map_err(|e| write(e.into()))?;
        }
        tar::EntryType::Fifo if options.specials => {
            remove_at(dir, &name, 0).map_err(write)?;
            rustix::fs::mknodat(dir, &name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                .map_err(|e| write(e.into()))?;
            apply_to_node(dir, &name, &meta, true).map_err(write)?;
        }
        tar::EntryType::Char | tar::EntryType::Block => {
            let header = entry.header();
            let major = header.device_major().ok().flatten().unwrap_or(u32::MAX);
            let minor = header.device_minor().ok().flatten().unwrap_or(u32::MAX);
            if !(options.specials && kind == tar::EntryType::Char && (major, minor) == (0, 0)) {
                return Err(refused(Refusal::Device { major, minor }));
            }
            remove_at(dir, &name, 0).map_err(write)?;
            rustix::fs::mknodat(dir, &name, FileType::CharacterDevice, Mode::from_raw_mode(0o600), 0)
                .map_err(|e| write(e.into()))?;
            apply_to_node(dir, &name, &meta, true).map_err(write)?;
        }
        _ => return Err(not_allowed()),
    }
    Ok(None)
}

/// The header's owner, mode, time and carried xattrs. `Err(Ok(_))` refuses the entry.
fn meta<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    options: UnpackOptions,
) -> Result<Meta, Result<Refusal, std::io::Error>> {
    let mut xattrs = Vec::new();
    if options.xattrs
        && let Some(extensions) = entry.pax_extensions().map_err(Err)?
    {
        for extension in extensions {
            let extension = extension.map_err(Err)?;
            if let Some(name) = extension.key_bytes().strip_prefix(PAX_XATTR.as_bytes())
                && carried_xattr(name)
            {
                xattrs.push((OsStr::from_bytes(name).to_os_string(), extension.value_bytes().to_vec()));
            }
        }
    }
    let header = entry.header();
    // An owner that cannot be read leaves the file to the unpacking user, and then
    // setuid/setgid go with it: they were set for someone else.
    let owner = match (header.uid(), header.gid()) {
        (Ok(uid), Ok(gid)) if options.owners => Some((
            u32::try_from(uid).map_err(|_| Ok(Refusal::Owner))?,
            u32::try_from(gid).map_err(|_| Ok(Refusal::Owner))?,
        )),
        _ => None,
    };
    let mask = if owner.is_some() { 0o7777 } else { 0o1777 };
    Ok(Meta {
        owner,
        mode: header.mode().map_err(Err)? & mask,
        mtime: header.mtime().ok().and_then(|t| i64::try_from(t).ok()).unwrap_or(0),
        xattrs,
    })
}

/// Owner, then mode (a chown clears setuid), then xattrs (a chown clears file capabilities).
fn apply_to_fd(fd: BorrowedFd<'_>, meta: &Meta) -> std::io::Result<()> {
    if let Some((uid, gid)) = meta.owner {
        rustix::fs::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))?;
    for (name, value) in &meta.xattrs {
        rustix::fs::fsetxattr(fd, name.as_os_str(), value, XattrFlags::empty())?;
    }
    Ok(())
}

/// Owner, mode and time of a node that cannot be opened for writing (a symlink, a
/// fifo, a device), never following a symlink at `name`.
fn apply_to_node(dir: BorrowedFd<'_>, name: &OsStr, meta: &Meta, mode: bool) -> std::io::Result<()> {
    if let Some((uid, gid)) = meta.owner {
        rustix::fs::chownat(
            dir,
            name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    if mode {
        // chmod has no "do not follow": it goes through an O_PATH fd of the node just
        // made, which `/proc/self/fd` resolves to that node itself.
        let node = rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&node)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            return Err(std::io::Error::other("replaced by a symlink while unpacking"));
        }
        rustix::fs::chmod(
            format!("/proc/self/fd/{}", node.as_raw_fd()).as_str(),
            Mode::from_raw_mode(meta.mode),
        )?;
    }
    rustix::fs::utimensat(dir, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

fn mkdir(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<()> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Opens directory `rel` below `root` for entry `shown`, refusing symlinks on the way.
/// A missing directory is made with `create`, and is `None` without.
fn resolve_dir(root: BorrowedFd<'_>, rel: &Path, create: bool, shown: &Path) -> Result<Option<OwnedFd>, UnpackError> {
    let fail = |e: std::io::Error| {
        let reason = match e.raw_os_error().map(Errno::from_raw_os_error) {
            Some(Errno::LOOP) => Refusal::SymlinkOnPath,
            Some(Errno::NOTDIR) => Refusal::NotADirectoryOnPath,
            Some(Errno::XDEV) => Refusal::Escapes,
            _ => {
                return UnpackError::Write {
                    entry: shown.to_path_buf(),
                    source: e,
                };
            }
        };
        UnpackError::Refused {
            entry: shown.to_path_buf(),
            reason,
        }
    };
    match open_dir_beneath(root, rel) {
        Ok(dir) => return Ok(Some(dir)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    // Made one component at a time, each opened without following a symlink.
    let mut dir = open_dir_beneath(root, Path::new("")).map_err(fail)?;
    for component in rel.components() {
        let component = Path::new(component.as_os_str());
        let next = match open_dir_beneath(dir.as_fd(), component) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                mkdir(dir.as_fd(), component.as_os_str()).map_err(fail)?;
                open_dir_beneath(dir.as_fd(), component)
            }
            other => other,
        };
        dir = next.map_err(fail)?;
    }
    Ok(Some(dir))
}

/// Removes `name` in `dir` whatever it is, a directory with its contents; a symlink
/// is removed, never followed. Missing is fine.
pub fn remove_at(dir: BorrowedFd<'_>, name: &OsStr, depth: usize) -> std::io::Result<()> {
    let result = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            let child = rustix::fs::openat(dir, name, dir_flags(), Mode::empty())?;
            clear_dir(child.as_fd(), depth + 1)?;
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
        }
        Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty()),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes everything in `dir`, never following a symlink.
pub fn clear_dir(dir: BorrowedFd<'_>, depth: usize) -> std::io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(std::io::Error::other(format!(
            "the tree to remove is deeper than {MAX_DEPTH} directories"
        )));
    }
    for name in list_dir(dir)? {
        remove_at(dir, &name, depth)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    /// Builds a tar in memory; `add` takes (path, type, link target, body).
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }
        fn entry(mut self, path: &str, kind: tar::EntryType, link: Option<&str>, body: &[u8]) -> Self {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(body.len() as u64);
            h.set_mode(if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            // Set raw so that `..` and absolute names reach the unpack as an attacker
            // would write them (the builder refuses them).
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(link) = link {
                h.set_link_name_literal(link).unwrap();
            }
            h.set_cksum();
            self.0.append(&h, body).unwrap();
            self
        }
        fn file(self, path: &str, body: &[u8]) -> Self {
            self.entry(path, tar::EntryType::Regular, None, body)
        }
        fn dir(self, path: &str) -> Self {
            self.entry(path, tar::EntryType::Directory, None, b"")
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    /// A target and a sentinel beside it that no unpack may touch.
    struct Scene {
        _dir: tempfile::TempDir,
        target: PathBuf,
        outside: PathBuf,
    }

    fn scene() -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("sentinel"), b"host").unwrap();
        Scene {
            _dir: dir,
            target,
            outside,
        }
    }

    impl Scene {
        fn untouched(&self) {
            assert_eq!(std::fs::read(self.outside.join("sentinel")).unwrap(), b"host");
            assert_eq!(list(&self.outside), ["sentinel"]);
        }
    }

    fn list(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn refusal(err: UnpackError) -> (String, Refusal) {
        match err {
            UnpackError::Refused { entry, reason } => (entry.display().to_string(), reason),
            other => panic!("not a refusal: {other}"),
        }
    }

    #[test]
    fn unpacks_trees_with_links_and_fifos() {
        let s = scene();
        let tar = Tar::new()
            .dir("sub")
            .file("sub/file", b"data")
            .entry("link", tar::EntryType::Symlink, Some("sub/file"), b"")
            .entry("hard", tar::EntryType::Link, Some("sub/file"), b"")
            .entry("pipe", tar::EntryType::Fifo, None, b"")
            .bytes();
        unpack(tar.as_slice(), &s.target, UnpackOptions::TREE).unwrap();
        assert_eq!(std::fs::read(s.target.join("sub/file")).unwrap(), b"data");
        assert_eq!(
            std::fs::read_link(s.target.join("link")).unwrap(),
            Path::new("sub/file")
        );
        assert_eq!(
            std::fs::metadata(s.target.join("hard")).unwrap().ino(),
            std::fs::metadata(s.target.join("sub/file")).unwrap().ino()
        );
        use std::os::unix::fs::FileTypeExt;
        assert!(
            std::fs::symlink_metadata(s.target.join("pipe"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        s.untouched();
    }

    #[test]
    fn refuses_parent_and_absolute_paths() {
        let s = scene();
        let err = unpack(
            Tar::new().file("../outside/sentinel", b"pwned").bytes().as_slice(),
            &s.target,
            UnpackOptions::TREE,
        )
        .unwrap_err();
        assert_eq!(refusal(err), ("../outside/sentinel".into(), Refusal::ParentDir));
        let abs = format!("{}/sentinel", s.outside.display());
        let err = unpack(
            Tar::new().file(&abs, b"pwned").bytes().as_slice(),
            &s.target,
            UnpackOptions::TREE,
        )
        .unwrap_err();
        assert_eq!(refusal(err), (abs, Refusal::Absolute));
        s.untouched();
    }

    #[test]
    fn refuses_entries_under_a_symlink_of_the_archive() {
        let s = scene();
        let tar = Tar::new()
            .entry("x", tar::EntryType::Symlink, Some(s.outside.to_str().unwrap()), b"")
            .file("x/sentinel", b"pwned")
            .bytes();
        let err = unpack(tar.as_slice(), &s.target, UnpackOptions::TREE).unwrap_err();
        assert_eq!(refusal(err), ("x/sentinel".into(), Refusal::SymlinkOnPath));
        s.untouched();
    }

    #[test]
    fn refuses_entries_under_a_symlink_already_on_disk() {
        let s = scene();
        // The tenant's image: `x -> /`-like, pointing out of the rootfs.
        std::os::unix::fs::symlink(&s.outside, s.target.join("x")).unwrap();
        let tar = Tar::new().file("x/sentinel", b"pwned").bytes();
        let err = unpack(tar.as_slice(), &s.target, UnpackOptions::ROOTFS_DIFF).unwrap_err();
        assert_eq!(refusal(err), ("x/sentinel".into(), Refusal::SymlinkOnPath));
        let tar = Tar::new().file("x/new", b"pwned").bytes();
        assert!(unpack(tar.as_slice(), &s.target, UnpackOptions::ROOTFS_DIFF).is_err());
        s.untouched();
    }

    #[test]
    fn replaces_a_symlink_at_the_entry_instead_of_writing_through_it() {
        let s = scene();
        std::os::unix::fs::symlink(s.outside.join("sentinel"), s.target.join("f")).unwrap();
        std::os::unix::fs::symlink(&s.outside, s.target.join("d")).unwrap();
        let tar = Tar::new().file("f", b"mine").dir("d").file("d/g", b"mine").bytes();
        unpack(tar.as_slice(), &s.target, UnpackOptions::ROOTFS_DIFF).unwrap();
        assert_eq!(std::fs::read(s.target.join("f")).unwrap(), b"mine");
        assert!(std::fs::symlink_metadata(s.target.join("d")).unwrap().is_dir());
        assert_eq!(std::fs::read(s.target.join("d/g")).unwrap(), b"mine");
        s.untouched();
    }

    #[test]
    fn refuses_hardlinks_out_or_through_symlinks() {
        let s = scene();
        std::os::unix::fs::symlink(&s.outside, s.target.join("x")).unwrap();
        let absolute = s.outside.join("sentinel").display().to_string();
        for target in ["../outside/sentinel", "x/sentinel", absolute.as_str()] {
            let tar = Tar::new().entry("h", tar::EntryType::Link, Some(target), b"").bytes();
            let err = unpack(tar.as_slice(), &s.target, UnpackOptions::TREE).unwrap_err();
            let (entry, reason) = refusal(err);
            assert_eq!(entry, "h");
            assert!(matches!(reason, Refusal::HardlinkTarget { .. }), "{target}: {reason:?}");
        }
        assert_eq!(std::fs::metadata(s.outside.join("sentinel")).unwrap().nlink(), 1);
        s.untouched();
    }

    #[test]
    fn whiteouts_never_delete_through_a_symlinked_parent() {
        let s = scene();
        std::os::unix::fs::symlink(&s.outside, s.target.join("x")).unwrap();
        for entry in ["x/.wh.sentinel", "x/.wh..wh..opq"] {
            let tar = Tar::new().file(entry, b"").bytes();
            let err = unpack(tar.as_slice(), &s.target, UnpackOptions::ROOTFS_DIFF).unwrap_err();
            assert_eq!(refusal(err), (entry.to_owned(), Refusal::SymlinkOnPath));
        }
        for entry in [".wh..", ".wh..."] {
            let tar = Tar::new().file(entry, b"").bytes();
            let err = unpack(tar.as_slice(), &s.target, UnpackOptions::ROOTFS_DIFF).unwrap_err();
            assert_eq!(refusal(err).1, Refusal::Whiteout);
        }
        // A whiteout of the symlink itself removes the link, not what it points at.
        let tar = Tar::new().file(".wh.x", b"").bytes();
        unpack(tar.as_slice(), &s.target, UnpackOptions::ROOTFS_DIFF).unwrap();
        assert!(std::fs::symlink_metadata(s.target.join("x")).is_err());
        s.untouched();
    }

    #[test]
    fn refuses_device_nodes_but_the_whiteout() {
        let s = scene();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_size(0);
        h.set_mode(0o666);
        h.set_device_major(1).unwrap();
        h.set_device_minor(1).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut h, "mem", std::io::empty()).unwrap();
        h.set_device_major(0).unwrap();
        h.set_device_minor(0).unwrap();
        b.append_data(&mut h, "gone", std::io::empty()).unwrap();
        let tar = b.into_inner().unwrap();
        let err = unpack(tar.as_slice(), &s.target, UnpackOptions::TREE).unwrap_err();
        assert_eq!(refusal(err), ("mem".into(), Refusal::Device { major: 1, minor: 1 }));
        assert!(!s.target.join("mem").exists());
        // Without the first entry the 0:0 node goes in.
        let tar: Vec<u8> = {
            let mut b = tar::Builder::new(Vec::new());
            b.append_data(&mut h, "gone", std::io::empty()).unwrap();
            b.into_inner().unwrap()
        };
        unpack(tar.as_slice(), &s.target, UnpackOptions::TREE).unwrap();
        assert_eq!(std::fs::symlink_metadata(s.target.join("gone")).unwrap().rdev(), 0);
    }

    #[test]
    fn files_only_takes_plain_files_and_drops_setuid() {
        let s = scene();
        let tar = Tar::new()
            .entry("rootfs-diff.tar", tar::EntryType::Symlink, Some("/etc/shadow"), b"")
            .bytes();
        let err = unpack(tar.as_slice(), &s.target, UnpackOptions::FILES).unwrap_err();
        assert!(matches!(refusal(err).1, Refusal::EntryType { .. }));
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o4755);
        h.set_uid(1000);
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut h, "suid", &b"x"[..]).unwrap();
        unpack(b.into_inner().unwrap().as_slice(), &s.target, UnpackOptions::FILES).unwrap();
        let meta = std::fs::metadata(s.target.join("suid")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        assert_eq!(meta.uid(), std::fs::metadata(&s.target).unwrap().uid());
    }

    #[test]
    fn owners_setuid_and_xattrs_come_back() {
        let s = scene();
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("SCHILY.xattr.user.note", &b"kept"[..]),
            ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
        ])
        .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o4755);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, "suid", &b"x"[..]).unwrap();
        unpack(b.into_inner().unwrap().as_slice(), &s.target, UnpackOptions::TREE).unwrap();
        let path = s.target.join("suid");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
        assert_eq!(meta.permissions().mode() & 0o7777, 0o4755);
        assert_eq!(meta.mtime(), 1_700_000_000);
        let mut value = [0u8; 16];
        let n = rustix::fs::getxattr(path.as_path(), "user.note", &mut value[..]).unwrap();
        assert_eq!(&value[..n], b"kept");
        assert!(rustix::fs::getxattr(path.as_path(), "trusted.overlay.opaque", &mut value[..]).is_err());
    }

    #[test]
    fn opaque_markers_and_whiteouts_delete_inside() {
        let s = scene();
        std::fs::create_dir_all(s.target.join("etc/app/deep")).unwrap();
        std::fs::write(s.target.join("etc/app/deep/old"), b"old").unwrap();
        std::os::unix::fs::symlink(&s.outside, s.target.join("etc/app/out")).unwrap();
        std::fs::write(s.target.join("etc/gone"), b"").unwrap();
        let tar = Tar::new()
            .file("etc/.wh.gone", b"")
            .file("etc/app/.wh..wh..opq", b"")
            .file("etc/app/new", b"new")
            .bytes();
        unpack(tar.as_slice(), &s.target, UnpackOptions::ROOTFS_DIFF).unwrap();
        assert_eq!(list(&s.target.join("etc")), ["app"]);
        assert_eq!(list(&s.target.join("etc/app")), ["new"]);
        s.untouched();
    }

    #[test]
    fn a_link_of_the_image_replaced_by_a_directory_stays_inside() {
        // The image links `escape -> /`; the tenant made it an (opaque) directory
        // with a file in it. Unpacked as root, the file lands in the new directory,
        // never through the image's link.
        let s = scene();
        std::os::unix::fs::symlink(&s.outside, s.target.join("escape")).unwrap();
        let tar = Tar::new()
            .dir("escape")
            .file("escape/.wh..wh..opq", b"")
            .dir("escape/tmp")
            .file("escape/tmp/canary", b"pwned")
            .bytes();
        unpack(tar.as_slice(), &s.target, UnpackOptions::ROOTFS_DIFF).unwrap();
        assert!(std::fs::symlink_metadata(s.target.join("escape")).unwrap().is_dir());
        assert_eq!(std::fs::read(s.target.join("escape/tmp/canary")).unwrap(), b"pwned");
        s.untouched();
    }
}
