//! The attributes of a merged object, independent of FUSE's types.

use nix::sys::stat::{FileStat, SFlag};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Directory,
    Regular,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    pub fn from_mode(mode: u32) -> FileKind {
        match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFDIR => FileKind::Directory,
            SFlag::S_IFLNK => FileKind::Symlink,
            SFlag::S_IFIFO => FileKind::Fifo,
            SFlag::S_IFSOCK => FileKind::Socket,
            SFlag::S_IFCHR => FileKind::CharDevice,
            SFlag::S_IFBLK => FileKind::BlockDevice,
            _ => FileKind::Regular,
        }
    }

    pub fn from_dir_type(t: nix::dir::Type) -> FileKind {
        use nix::dir::Type;
        match t {
            Type::Directory => FileKind::Directory,
            Type::Symlink => FileKind::Symlink,
            Type::Fifo => FileKind::Fifo,
            Type::Socket => FileKind::Socket,
            Type::CharacterDevice => FileKind::CharDevice,
            Type::BlockDevice => FileKind::BlockDevice,
            Type::File => FileKind::Regular,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: i64,
}

/// What `stat` returns for a merged object. `ino` is the merged inode number
/// (also its FUSE node id), not necessarily the backing file's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub dev: u64,
    pub backing_ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub blksize: u32,
}

impl Attr {
    pub fn from_stat(st: &FileStat) -> Attr {
        Attr {
            ino: st.st_ino,
            dev: st.st_dev,
            backing_ino: st.st_ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: Timespec {
                sec: st.st_atime,
                nsec: st.st_atime_nsec,
            },
            mtime: Timespec {
                sec: st.st_mtime,
                nsec: st.st_mtime_nsec,
            },
            ctime: Timespec {
                sec: st.st_ctime,
                nsec: st.st_ctime_nsec,
            },
            mode: st.st_mode,
            nlink: st.st_nlink,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            blksize: st.st_blksize as u32,
        }
    }

    pub fn kind(&self) -> FileKind {
        FileKind::from_mode(self.mode)
    }

    pub fn is_dir(&self) -> bool {
        self.kind() == FileKind::Directory
    }

    pub fn perm(&self) -> u16 {
        (self.mode & 0o7777) as u16
    }
}
