//! The few `*at` system calls restore needs, behind safe wrappers.
//!
//! Everything restore creates is addressed as (open directory, one name): a directory is
//! opened with `O_NOFOLLOW | O_DIRECTORY` before anything is made inside it, so a symlink
//! that exists (or appears) in the target can never redirect a write outside `--to`.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A name as the kernel wants it. Tree names never hold NUL (decoding refuses them), so
/// this fails only for names restore made up itself, which never do either.
pub fn cname(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `timespec` pair for `utimensat`/`futimens`: atime left alone, mtime to the nanosecond.
fn times(mtime_ns: i64) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000) as libc::time_t,
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
        },
    ]
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// One open file descriptor per directory on the path being restored: deep trees need
/// many. Raising the soft limit to the hard one is always allowed.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max
    {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid pointer to an rlimit. Failure leaves the old limit, which is fine.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// Changes owner, mode and mtime of an open file or directory, in the order that keeps
/// them all: chown first (it clears setuid/setgid), then mode, then time.
pub fn fchown(f: &File, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid descriptor.
    cvt(unsafe { libc::fchown(f.as_raw_fd(), uid, gid) }).map(drop)
}

pub fn fchmod(f: &File, mode: u32) -> io::Result<()> {
    // SAFETY: valid descriptor.
    cvt(unsafe { libc::fchmod(f.as_raw_fd(), mode as libc::mode_t) }).map(drop)
}

pub fn futimens(f: &File, mtime_ns: i64) -> io::Result<()> {
    let ts = times(mtime_ns);
    // SAFETY: valid descriptor and two timespecs.
    cvt(unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) }).map(drop)
}

/// An open directory that restore creates entries in.
#[derive(Debug)]
pub struct Dir(File);

/// What an `lstat` says about an existing name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    Dir,
    Other,
}

impl Dir {
    /// Opens the restore target itself (a path the user gave; following it is intended).
    pub fn open_path(path: &Path) -> io::Result<Dir> {
        let c = cname(path.as_os_str().as_bytes())?;
        // SAFETY: valid NUL-terminated path.
        let fd = cvt(unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: fd was just opened and is owned by nobody else.
        Ok(Dir(unsafe { File::from_raw_fd(fd) }))
    }

    /// Opens a child directory without following a symlink in its place.
    pub fn open_child(&self, name: &CStr) -> io::Result<Dir> {
        // SAFETY: valid descriptor and NUL-terminated name.
        let fd = cvt(unsafe {
            libc::openat(
                self.fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: fd was just opened and is owned by nobody else.
        Ok(Dir(unsafe { File::from_raw_fd(fd) }))
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub fn file(&self) -> &File {
        &self.0
    }

    pub fn mkdir(&self, name: &CStr, mode: u32) -> io::Result<()> {
        // SAFETY: valid descriptor and NUL-terminated name.
        cvt(unsafe { libc::mkdirat(self.fd(), name.as_ptr(), mode as libc::mode_t) }).map(drop)
    }

    /// Creates a new regular file for writing; fails if the name exists in any form,
    /// symlinks included.
    pub fn create_file(&self, name: &CStr, mode: u32) -> io::Result<File> {
        // SAFETY: valid descriptor and NUL-terminated name.
        let fd = cvt(unsafe {
            libc::openat(
                self.fd(),
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        })?;
        // SAFETY: fd was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    pub fn symlink(&self, target: &CStr, name: &CStr) -> io::Result<()> {
        // SAFETY: valid descriptor and NUL-terminated strings.
        cvt(unsafe { libc::symlinkat(target.as_ptr(), self.fd(), name.as_ptr()) }).map(drop)
    }

    /// `mode` includes the file type bits (`S_IFIFO`, `S_IFCHR`, …).
    pub fn mknod(&self, name: &CStr, mode: u32, dev: u64) -> io::Result<()> {
        // SAFETY: valid descriptor and NUL-terminated name.
        cvt(unsafe {
            libc::mknodat(
                self.fd(),
                name.as_ptr(),
                mode as libc::mode_t,
                dev as libc::dev_t,
            )
        })
        .map(drop)
    }

    /// A hard link `self/name` to `from/from_name`; never follows a symlink (flags 0).
    pub fn link(&self, from: &Dir, from_name: &CStr, name: &CStr) -> io::Result<()> {
        // SAFETY: valid descriptors and NUL-terminated names.
        cvt(unsafe { libc::linkat(from.fd(), from_name.as_ptr(), self.fd(), name.as_ptr(), 0) })
            .map(drop)
    }

    pub fn rename(&self, from: &CStr, to: &CStr) -> io::Result<()> {
        // SAFETY: valid descriptor and NUL-terminated names.
        cvt(unsafe { libc::renameat(self.fd(), from.as_ptr(), self.fd(), to.as_ptr()) }).map(drop)
    }

    pub fn unlink(&self, name: &CStr) -> io::Result<()> {
        // SAFETY: valid descriptor and NUL-terminated name.
        cvt(unsafe { libc::unlinkat(self.fd(), name.as_ptr(), 0) }).map(drop)
    }

    /// What is at `name`, without following a symlink; `None` if nothing is.
    pub fn existing(&self, name: &CStr) -> io::Result<Option<Existing>> {
        // SAFETY: an all-zero stat is a valid out-buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, name and out-buffer.
        let rc =
            unsafe { libc::fstatat(self.fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            Existing::Dir
        } else {
            Existing::Other
        }))
    }

    /// Removes whatever is at `name`: a directory with everything below it, or a single
    /// non-directory (a symlink is removed, never followed).
    pub fn remove_any(&self, name: &CStr) -> io::Result<()> {
        match self.existing(name)? {
            None => Ok(()),
            Some(Existing::Other) => self.unlink(name),
            // std's remove_dir_all opens every level with O_NOFOLLOW and removes with
            // unlinkat (the CVE-2022-21658 fix), so a symlink inside is removed, not
            // followed. It takes a path: name the directory through our descriptor.
            Some(Existing::Dir) => std::fs::remove_dir_all(self.proc_path(name)),
        }
    }

    /// `/proc/self/fd/N/name`: a path for APIs without an `*at` form. The kernel resolves
    /// `N` to this very directory, so only `name` is looked up, and callers use the
    /// non-following variants for it.
    pub fn proc_path(&self, name: &CStr) -> PathBuf {
        let mut p = PathBuf::from(format!("/proc/self/fd/{}", self.fd()));
        p.push(OsStr::from_bytes(name.to_bytes()));
        p
    }

    /// Owner of `name` itself, never of what a symlink points to.
    pub fn lchown(&self, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: valid descriptor and NUL-terminated name.
        cvt(unsafe {
            libc::fchownat(
                self.fd(),
                name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }

    /// Mode of a node restore just made that is not a symlink (Linux has no
    /// `AT_SYMLINK_NOFOLLOW` for chmod before fchmodat2, and symlinks have no mode).
    pub fn chmod(&self, name: &CStr, mode: u32) -> io::Result<()> {
        // SAFETY: valid descriptor and NUL-terminated name.
        cvt(unsafe { libc::fchmodat(self.fd(), name.as_ptr(), mode as libc::mode_t, 0) }).map(drop)
    }

    /// Mtime of `name` itself, to the nanosecond.
    pub fn set_mtime(&self, name: &CStr, mtime_ns: i64) -> io::Result<()> {
        let ts = times(mtime_ns);
        // SAFETY: valid descriptor, name and two timespecs.
        cvt(unsafe {
            libc::utimensat(
                self.fd(),
                name.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_follows_a_symlink_in_the_target() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let target = tmp.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&outside, target.join("evil")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), target.join("evilfile")).unwrap();
        let d = Dir::open_path(&target).unwrap();
        let evil = cname(b"evil").unwrap();
        assert!(
            d.open_child(&evil).is_err(),
            "opened a directory through a symlink"
        );
        let evilfile = cname(b"evilfile").unwrap();
        assert!(d.create_file(&evilfile, 0o644).is_err());
        assert_eq!(d.existing(&evil).unwrap(), Some(Existing::Other));
        d.remove_any(&evil).unwrap();
        assert!(outside.exists(), "removal followed the symlink");
        assert_eq!(d.existing(&evil).unwrap(), None);
    }

    #[test]
    fn remove_any_removes_a_tree_but_not_through_links() {
        let tmp = tempfile::tempdir().unwrap();
        let keep = tmp.path().join("keep");
        std::fs::create_dir(&keep).unwrap();
        std::fs::write(keep.join("precious"), b"x").unwrap();
        let t = tmp.path().join("t");
        std::fs::create_dir_all(t.join("d/e")).unwrap();
        std::fs::write(t.join("d/e/f"), b"y").unwrap();
        std::os::unix::fs::symlink(&keep, t.join("d/link")).unwrap();
        let d = Dir::open_path(&t).unwrap();
        d.remove_any(&cname(b"d").unwrap()).unwrap();
        assert!(!t.join("d").exists());
        assert!(keep.join("precious").exists());
    }

    #[test]
    fn negative_mtimes_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let d = Dir::open_path(tmp.path()).unwrap();
        let n = cname(b"f").unwrap();
        drop(d.create_file(&n, 0o644).unwrap());
        d.set_mtime(&n, -1_234_567_891).unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(tmp.path().join("f")).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (-2, 765_432_109));
    }
}
