//! Free space on the file system of a folder: the one platform call of the change-log space
//! check.

use std::path::Path;

/// The bytes an unprivileged writer may still use on the file system of `dir`.
#[cfg(unix)]
pub fn free_space_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The bytes the caller may still use on the volume of `dir` (`GetDiskFreeSpaceExW`).
#[cfg(windows)]
#[allow(unsafe_code)] // NB: one Win32 call, no safe wrapper in the windows crate.
pub fn free_space_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::windows::ffi::OsStrExt;
    use windows::Win32::Storage::FileSystem::GetDiskFreeSpaceExW;
    use windows::core::PCWSTR;

    let wide: Vec<u16> = dir.as_os_str().encode_wide().chain(Some(0)).collect();
    let mut available = 0u64;
    // SAFETY: `wide` is NUL-terminated and outlives the call; `available` is a valid u64 the
    // call writes; the other outputs are optional and not asked for.
    unsafe { GetDiskFreeSpaceExW(PCWSTR(wide.as_ptr()), Some(&mut available), None, None) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.code().0 & 0xFFFF))?;
    Ok(available)
}
