//! Files and directories shared by two users of one installation (SPEC §7).
//!
//! On a PCR-360 server cron and the command-line tools run as root while the web server runs as
//! `www-data`; both use the same key file and state directory. Whatever this extension
//! creates therefore:
//! - takes the group of the directory it is created in (as a setgid directory would give it:
//!   when the process is root or a member of that group; otherwise it keeps the process's);
//! - gets its mode set explicitly after creation, whatever the process's umask: state files
//!   [`FILE_MODE`] (0660), directories [`DIR_MODE`] (02770, setgid so that what others create
//!   inside inherits the group too), the key file 0640 (see `config::secrets`);
//! - is never readable by others.
//!
//! So the administrator gives the top directory the shared group once (`chgrp www-data`,
//! `chmod 2770`) and everything below follows, whoever runs first. SQLite creates its own
//! `-wal`/`-shm` files with the database file's mode (and, as root, its owner and group), so
//! they follow the database file.
//!
//! [`access_hint`] words the fix when a user cannot open something the other user created.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of the directories this extension creates: group read/write, setgid.
pub const DIR_MODE: u32 = 0o2770;
/// Mode of the state files this extension creates (database, lock files, attachments, FILE
/// transport messages, LOG_FILE): owner and group read/write.
pub const FILE_MODE: u32 = 0o660;

/// The directory a path is created in (`.` for a bare name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Gives a file or directory just created (and opened as `file`) the group of `parent` and
/// `mode`. Taking the group is best effort: a user outside the parent's group cannot, and
/// then keeps its own (the kernel refuses with EPERM, which is not an error here).
pub fn adopt(file: &File, parent: &Path, mode: u32) -> io::Result<()> {
    if let Ok(dir) = std::fs::metadata(parent) {
        let meta = file.metadata()?;
        if meta.gid() != dir.gid() {
            match std::os::unix::fs::fchown(file, None, Some(dir.gid())) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    // After the chown: changing the group clears the setgid bit.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Creates `dir` and its missing parents; each directory created here takes its parent's
/// group and `mode` (see [`adopt`]). Directories that exist already are left as they are.
pub fn create_dir_all(dir: &Path, mode: u32) -> io::Result<()> {
    let mut missing = Vec::new();
    for ancestor in dir.ancestors() {
        if ancestor.as_os_str().is_empty() {
            break;
        }
        match std::fs::metadata(ancestor) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => {
                return Err(io::Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", ancestor.display()),
                ))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => missing.push(ancestor),
            Err(e) => return Err(e),
        }
    }
    for created in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o700).create(created) {
            Ok(()) => {}
            // Another process created it meanwhile: theirs.
            Err(e) if e.kind() == ErrorKind::AlreadyExists && created.is_dir() => continue,
            Err(e) => return Err(e),
        }
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(created)?;
        adopt(&opened, &parent_of(created), mode)?;
    }
    Ok(())
}

/// Creates a new file (`create_new`) with the group of its directory and `mode`; the file is
/// open for writing (and reading when `read`).
pub fn create_new(path: &Path, mode: u32, read: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(read)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if let Err(e) = adopt(&file, &parent_of(path), mode) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

/// Opens `path` for appending or writing, creating it (with [`create_new`]'s group and mode)
/// when missing. Returns the file and whether it was created.
pub fn open_or_create(path: &Path, mode: u32, append: bool) -> io::Result<(File, bool)> {
    loop {
        match OpenOptions::new()
            .write(true)
            .append(append)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(file) => return Ok((file, false)),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match create_new(path, mode, false) {
            Ok(file) => {
                if append {
                    set_append(&file)?;
                }
                return Ok((file, true));
            }
            // Created by another process between the two opens: open theirs.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Puts an open file in append mode (O_APPEND), as `OpenOptions::append` would have: the
/// process that creates a shared log must not write at its own offset while others append.
fn set_append(file: &File) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this `File` owns; F_GETFL/F_SETFL touch only its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_APPEND) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `data` into `path`, replacing its content; a new file gets its directory's group and
/// `mode`.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let (mut file, created) = open_or_create(path, mode, false)?;
    if !created {
        file.set_len(0)?;
    }
    file.write_all(data)
}

/// Who this process is, for error messages: `user www-data (uid 33), groups www-data`.
pub fn whoami() -> String {
    // SAFETY: geteuid/getegid never fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut groups = vec![gid];
    // SAFETY: a null list with size 0 only asks for the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n > 0 {
        let mut list = vec![0 as libc::gid_t; n as usize];
        // SAFETY: `list` has room for `n` entries.
        let got = unsafe { libc::getgroups(n, list.as_mut_ptr()) };
        if got > 0 {
            for g in &list[..got as usize] {
                if !groups.contains(g) {
                    groups.push(*g);
                }
            }
        }
    }
    let groups: Vec<String> = groups.into_iter().map(group_name).collect();
    format!(
        "user {} (uid {uid}), groups {}",
        user_name(uid),
        groups.join(" ")
    )
}

fn user_name(uid: libc::uid_t) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: zeroed passwd is a valid out-parameter; buf outlives the call.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc == 0 && !result.is_null() {
        // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        return name.to_string_lossy().into_owned();
    }
    uid.to_string()
}

/// The name of group `gid` (its number when it has none).
pub fn group_name(gid: libc::gid_t) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: zeroed group is a valid out-parameter; buf outlives the call.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc == 0 && !result.is_null() {
        // SAFETY: on success gr_name points to a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(grp.gr_name) };
        return name.to_string_lossy().into_owned();
    }
    gid.to_string()
}

/// True for the errors a second user meets on the first user's files.
pub fn is_access_error(e: &io::Error) -> bool {
    e.kind() == ErrorKind::PermissionDenied
        || matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EROFS))
}

/// What to do when this process may not use the shared directory `dir`: who it runs as, and
/// the commands that let cron's user and the web server's user share it. The group proposed
/// is this process's own when it is not root (the web server's user: its group is the one to
/// share), else the group of `dir` or of its parent when not root's, else `www-data`.
pub fn access_hint(dir: &Path) -> String {
    // SAFETY: geteuid/getegid never fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let not_root = |g: &String| g != "root" && g != "0";
    let group = Some(gid)
        .filter(|_| uid != 0)
        .map(group_name)
        .filter(not_root)
        .or_else(|| {
            dir.ancestors()
                .take(2)
                .filter_map(|d| std::fs::metadata(d).ok())
                .map(|m| group_name(m.gid()))
                .find(not_root)
        })
        .unwrap_or_else(|| "www-data".to_string());
    format!(
        "this process runs as {}; cron's user and the web server's user must share {d} through \
         one group: chgrp -R {group} {d} && chmod -R g+rwX,o-rwx {d} && chmod g+s {d} \
         (see the README, \"Two users, one installation\")",
        whoami(),
        d = dir.display()
    )
}

/// True when this process (its effective ids) has `how` (`libc::R_OK | libc::W_OK`, ...) on
/// `path`, asked without opening it: W_OK|X_OK on a directory means it may create and remove
/// files there.
pub fn accessible(path: &Path, how: libc::c_int) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), how, libc::AT_EACCESS) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }
    fn gid(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().gid()
    }

    /// A directory whose group is not this process's: the one root gives away (nogroup).
    fn foreign_group_dir() -> Option<(tempfile::TempDir, u32)> {
        // SAFETY: geteuid never fails.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let other = 65534;
        std::os::unix::fs::chown(dir.path(), None, Some(other)).unwrap();
        Some((dir, other))
    }

    #[test]
    fn a_file_created_for_appending_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.log");
        let (mut first, created) = open_or_create(&path, FILE_MODE, true).unwrap();
        assert!(created);
        // Another process appends between the creation and our write.
        let (mut other, created) = open_or_create(&path, FILE_MODE, true).unwrap();
        assert!(!created);
        other.write_all(b"theirs\n").unwrap();
        first.write_all(b"ours\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "theirs\nours\n");
    }

    #[test]
    fn created_directories_and_files_take_the_parents_group_and_an_explicit_mode() {
        // The suite runs as root (scripts/test.sh): a skip here would pass without checking.
        let (dir, group) = foreign_group_dir().expect(
            "this test needs root, to give a directory another group (run scripts/test.sh as root)",
        );
        let deep = dir.path().join("a/b/c");
        create_dir_all(&deep, DIR_MODE).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            let p = dir.path().join(d);
            assert_eq!(mode(&p), 0o2770, "{d}");
            assert_eq!(gid(&p), group, "{d}");
        }
        // Existing directories are left alone.
        std::fs::set_permissions(dir.path().join("a"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        create_dir_all(&deep, DIR_MODE).unwrap();
        assert_eq!(mode(&dir.path().join("a")), 0o750);

        let file = deep.join("f");
        write_file(&file, b"one", FILE_MODE).unwrap();
        assert_eq!(mode(&file), 0o660);
        assert_eq!(gid(&file), group);
        write_file(&file, b"2", FILE_MODE).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"2");
        let key = deep.join("k");
        drop(create_new(&key, 0o640, false).unwrap());
        assert_eq!(mode(&key), 0o640);
        assert!(create_new(&key, 0o640, false).is_err());
        // Following a symlink planted in the place of a new file is refused.
        std::os::unix::fs::symlink("/etc/passwd", deep.join("link")).unwrap();
        assert!(open_or_create(&deep.join("link"), FILE_MODE, true).is_err());
    }

    #[test]
    fn modes_are_set_explicitly_and_a_file_is_no_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x/y");
        create_dir_all(&dir.path().join("x"), DIR_MODE).unwrap();
        write_file(&file, b"", FILE_MODE).unwrap();
        assert_eq!(mode(&dir.path().join("x")), 0o2770);
        assert_eq!(mode(&file), 0o660);
        assert_eq!(gid(&file), gid(dir.path()));
        let e = create_dir_all(&file, DIR_MODE).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
        assert!(create_dir_all(&file.join("z"), DIR_MODE).is_err());
    }

    #[test]
    fn the_hint_names_the_user_and_the_commands() {
        let dir = tempfile::tempdir().unwrap();
        let hint = access_hint(dir.path());
        assert!(hint.starts_with("this process runs as user "), "{hint}");
        assert!(
            hint.contains(&format!("chmod g+s {}", dir.path().display())),
            "{hint}"
        );
        assert!(accessible(dir.path(), libc::W_OK | libc::X_OK));
        assert!(!accessible(&dir.path().join("missing"), libc::R_OK));
    }
}
