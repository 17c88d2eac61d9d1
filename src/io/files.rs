//! Reading files from disk safely (std::fs; on wasm every call fails, as std::fs does): only regular files are read, so that a FIFO,
//! socket or device named like a model or data file is refused instead of blocking forever or
//! reading without end; a folder in place of a file, a missing file and an unreadable file get
//! different messages, each naming the path. Files are written with [`write_atomic`] (a
//! temporary, synced, renamed into place), so a crash never leaves a half-written file.

use std::path::Path;

use crate::{Error, Result};

/// Ok when `path` is a regular file; else an error naming it and saying what it is. Checked
/// before the file is opened: opening a FIFO for reading blocks until a writer appears.
pub fn check_regular(path: &Path) -> Result<()> {
    let label = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::format(&label, "cannot read: no such file"),
        std::io::ErrorKind::PermissionDenied => Error::format(&label, format!("cannot read (permission denied): {e}")),
        _ => Error::format(&label, format!("cannot read: {e}")),
    })?;
    if meta.is_dir() {
        return Err(Error::format(&label, "is a folder, not a file"));
    }
    if !meta.is_file() {
        return Err(Error::format(&label, "not a regular file (a FIFO, socket or device): refused"));
    }
    Ok(())
}

/// The bytes of the regular file `path` (see [`check_regular`]); errors name the path and say
/// whether it is missing, a folder, not a regular file or unreadable.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    check_regular(path)?;
    std::fs::read(path).map_err(|e| {
        let label = path.display().to_string();
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => Error::format(label, format!("cannot read (permission denied): {e}")),
            _ => Error::format(label, format!("cannot read: {e}")),
        }
    })
}

/// Writes `bytes` to `path` so that a crash never leaves a half-written file there: the bytes go
/// to `path.tmp` (synced to disk), which is then renamed over `path` (atomic on POSIX and on
/// NTFS within one directory).
#[cfg(not(target_arch = "wasm32"))]
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io = |what: &str, e: std::io::Error| Error::format(path.display().to_string(), format!("{what}: {e}"));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("create temporary file", e))?;
        f.write_all(bytes).map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("sync", e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io("rename into place", e))
}
