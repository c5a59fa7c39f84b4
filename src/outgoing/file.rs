//! FILE transport: each message becomes one `.eml` file in the account's `FILE_PATH`.
//!
//! Writes are atomic and never overwrite: the bytes go to a temporary file in the same
//! directory, are fsynced, then hard-linked to a fresh `YYYYMMDD-HHMMSS-<random>.eml` name
//! (a link fails instead of replacing an existing file; on a collision another name is tried).
//! Readers therefore never see a partial `.eml`, and no temporary file is left behind.
//!
//! Like the state files ([`crate::perms`]), a missing `FILE_PATH` is created 02770 and each
//! message 0660, with the group of the directory they are created in: cron's user and the web
//! server's user both write there.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rand::RngCore;

use super::{BuiltMessage, CheckReport, Delivery, DeliveryStatus, Transport};
use crate::config::{Account, TransportType};
use crate::error::{Error, Result};

const MAX_NAME_ATTEMPTS: usize = 64;

/// Writes `.eml` files into one directory.
#[derive(Debug, Clone)]
pub struct FileTransport {
    account: String,
    dir: PathBuf,
}

impl FileTransport {
    pub fn new(account: &Account) -> FileTransport {
        FileTransport {
            account: account.id.to_string(),
            dir: account.file_path.clone(),
        }
    }

    /// A transport writing into `dir`, reporting errors for `account` (`master` or a RECID).
    pub fn with_dir(account: &str, dir: impl Into<PathBuf>) -> FileTransport {
        FileTransport {
            account: account.to_string(),
            dir: dir.into(),
        }
    }

    fn error(&self, what: &str, err: &io::Error) -> Error {
        let transient = matches!(
            err.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::Interrupted
        );
        Error::transport(
            &self.account,
            &self.dir.display().to_string(),
            None,
            transient,
            format!("{what}: {err}"),
        )
    }

    fn write(&self, raw: &[u8]) -> Result<PathBuf> {
        crate::perms::create_dir_all(&self.dir, crate::perms::DIR_MODE)
            .map_err(|e| self.error("cannot create the FILE_PATH directory", &e))?;
        let temp = TempFile::create(&self.dir)
            .map_err(|e| self.error("cannot create a file in FILE_PATH", &e))?;
        temp.write_all(raw)
            .map_err(|e| self.error("cannot write the message file", &e))?;
        let path = temp
            .publish(&self.dir)
            .map_err(|e| self.error("cannot store the message file", &e))?;
        // Make the new directory entry durable; a failure here does not undo the write.
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(path)
    }
}

impl Transport for FileTransport {
    fn send(&self, msg: &BuiltMessage) -> Result<Delivery> {
        let path = self.write(&msg.raw)?;
        Ok(Delivery {
            status: DeliveryStatus::Written,
            path: Some(path),
            server: self.dir.display().to_string(),
            from: None,
        })
    }

    /// The directory exists and a file can be created in it, or it does not exist yet and its
    /// nearest existing parent allows creating it. Leaves nothing behind.
    fn check(&self) -> Result<CheckReport> {
        let server = self.dir.display().to_string();
        let mut steps = Vec::new();
        let existing = self
            .dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("."));
        if existing != self.dir.as_path() {
            steps.push(format!(
                "{server} does not exist yet; it will be created inside {}",
                existing.display()
            ));
        }
        if !existing.is_dir() {
            return Err(Error::transport(
                &self.account,
                &server,
                None,
                false,
                format!("{} is not a directory", existing.display()),
            ));
        }
        let probe =
            TempFile::create(existing).map_err(|e| self.error("directory is not writable", &e))?;
        drop(probe);
        steps.push(format!("{} is writable", existing.display()));
        Ok(CheckReport {
            transport: "FILE",
            server,
            steps,
        })
    }

    fn describe(&self) -> String {
        format!("FILE {}", self.dir.display())
    }

    fn kind(&self) -> TransportType {
        TransportType::File
    }
}

/// A `.tmp-*.part` file in the target directory, removed on drop.
struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    fn create(dir: &Path) -> io::Result<TempFile> {
        for _ in 0..MAX_NAME_ATTEMPTS {
            let path = dir.join(format!(".tmp-{}.eml.part", random_hex(8)));
            match crate::perms::create_new(&path, crate::perms::FILE_MODE, false) {
                Ok(file) => return Ok(TempFile { path, file }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free temporary file name",
        ))
    }

    fn write_all(&self, raw: &[u8]) -> io::Result<()> {
        let mut file = &self.file;
        file.write_all(raw)?;
        file.sync_all()
    }

    /// Links the finished file to a new unique name, never replacing an existing file.
    fn publish(self, dir: &Path) -> io::Result<PathBuf> {
        for _ in 0..MAX_NAME_ATTEMPTS {
            let name = format!(
                "{}-{}.eml",
                chrono::Utc::now().format("%Y%m%d-%H%M%S"),
                random_hex(6)
            );
            let target = dir.join(name);
            match fs::hard_link(&self.path, &target) {
                Ok(()) => return Ok(target),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                // File systems without hard links: copy into a file created exclusively.
                Err(_) => match self.copy_exclusive(&target) {
                    Ok(()) => return Ok(target),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                },
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free file name for the message",
        ))
    }

    fn copy_exclusive(&self, target: &Path) -> io::Result<()> {
        let mut out = crate::perms::create_new(target, crate::perms::FILE_MODE, false)?;
        let result = (|| {
            let mut src = File::open(&self.path)?;
            io::copy(&mut src, &mut out)?;
            out.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(target);
        }
        result
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &str) -> BuiltMessage {
        BuiltMessage {
            raw: body.as_bytes().to_vec(),
            envelope_from: "a@x.example".into(),
            recipients: vec!["b@x.example".into()],
            message_id: "<1@x.example>".into(),
            from: "a@x.example".into(),
            subject: String::new(),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_into_a_created_directory_with_an_eml_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("email").join("out");
        let t = FileTransport::with_dir("master", &dir);
        let d = t.send(&msg("Subject: a\r\n\r\nbody\r\n")).unwrap();
        assert_eq!(d.status, DeliveryStatus::Written);
        let path = d.path.unwrap();
        assert_eq!(path.parent().unwrap(), dir);
        let name = path.file_name().unwrap().to_str().unwrap();
        let re = regex::Regex::new(r"^\d{8}-\d{6}-[0-9a-f]{12}\.eml$").unwrap();
        assert!(re.is_match(name), "{name}");
        assert_eq!(fs::read(&path).unwrap(), b"Subject: a\r\n\r\nbody\r\n");
        assert_eq!(
            names(&dir).len(),
            1,
            "no temporary file left: {:?}",
            names(&dir)
        );
    }

    #[test]
    fn existing_files_are_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let t = FileTransport::with_dir("master", tmp.path());
        let mut paths = Vec::new();
        for i in 0..50 {
            paths.push(t.send(&msg(&format!("message {i}"))).unwrap().path.unwrap());
        }
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(fs::read_to_string(p).unwrap(), format!("message {i}"));
        }
        assert_eq!(names(tmp.path()).len(), 50);
    }

    #[test]
    fn unwritable_directory_is_a_transport_error_naming_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("plain-file");
        fs::write(&file, "x").unwrap();
        let t = FileTransport::with_dir("7", file.join("sub"));
        let err = t.send(&msg("x")).unwrap_err();
        match &err {
            Error::Transport(f) => {
                assert_eq!(f.account, "7");
                assert!(f.server.ends_with("plain-file/sub"), "{}", f.server);
                assert!(!f.transient);
            }
            other => panic!("{other:?}"),
        }
        assert!(t.check().is_err());
    }

    #[test]
    fn check_reports_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let t = FileTransport::with_dir("master", tmp.path().join("new"));
        let report = t.check().unwrap();
        assert_eq!(report.transport, "FILE");
        assert!(
            !tmp.path().join("new").exists(),
            "check must not create the directory"
        );
        assert!(names(tmp.path()).is_empty());
        assert!(report.steps.iter().any(|s| s.contains("will be created")));
    }
}
