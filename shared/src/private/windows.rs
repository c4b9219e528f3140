//! Private files on Windows: a protected DACL with one ACE, for the current user.
//!
//! Unsafe code is confined to the Win32 calls here, each wrapped so that every pointer it
//! hands out lives in a buffer this module owns.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::fs::OpenOptionsExt;
use std::os::windows::io::{AsRawHandle, BorrowedHandle};
use std::path::Path;

use windows_sys::Win32::Foundation::{CloseHandle, ERROR_SUCCESS, HANDLE, LocalFree};
#[cfg(test)]
use windows_sys::Win32::Security::Authorization::ConvertStringSidToSidW;
use windows_sys::Win32::Security::Authorization::{
    ConvertSidToStringSidW, GetSecurityInfo, SE_FILE_OBJECT, SetNamedSecurityInfoW,
};
use windows_sys::Win32::Security::{
    ACCESS_ALLOWED_ACE, ACE_HEADER, ACL, ACL_REVISION, AddAccessAllowedAceEx,
    CONTAINER_INHERIT_ACE, DACL_SECURITY_INFORMATION, EqualSid, GetAce, GetLengthSid,
    GetTokenInformation, InitializeAcl, IsWellKnownSid, OBJECT_INHERIT_ACE,
    OWNER_SECURITY_INFORMATION, PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR, PSID,
    TOKEN_QUERY, TOKEN_USER, TokenUser, WinBuiltinAdministratorsSid, WinLocalSystemSid,
};
use windows_sys::Win32::Storage::FileSystem::{
    FILE_ALL_ACCESS, FILE_FLAG_BACKUP_SEMANTICS, READ_CONTROL,
};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

use super::Exposure;
use super::acl::{self, Ace, Trustee};

/// The SID of a process's user, in a buffer of its own.
#[derive(Debug)]
pub struct UserSid {
    // TOKEN_USER followed by the SID it points into; u64 for alignment.
    buf: Vec<u64>,
}

impl UserSid {
    /// The user this process runs as.
    pub fn current() -> io::Result<UserSid> {
        // SAFETY: GetCurrentProcess returns a pseudo-handle that needs no closing.
        Self::of_process_handle(unsafe { GetCurrentProcess() })
    }

    /// The user of the process behind `process` (a handle with
    /// `PROCESS_QUERY_LIMITED_INFORMATION`).
    pub fn of_process(process: BorrowedHandle<'_>) -> io::Result<UserSid> {
        Self::of_process_handle(process.as_raw_handle())
    }

    fn of_process_handle(process: HANDLE) -> io::Result<UserSid> {
        let mut token: HANDLE = std::ptr::null_mut();
        // SAFETY: `process` is a live handle; `token` is a valid out pointer, closed below.
        if unsafe { OpenProcessToken(process, TOKEN_QUERY, &mut token) } == 0 {
            return Err(io::Error::last_os_error());
        }
        let result = Self::of_token(token);
        // SAFETY: `token` came from OpenProcessToken and is closed once.
        unsafe { CloseHandle(token) };
        result
    }

    fn of_token(token: HANDLE) -> io::Result<UserSid> {
        let mut len = 0u32;
        // SAFETY: a size query: no buffer, `len` receives the size needed.
        unsafe { GetTokenInformation(token, TokenUser, std::ptr::null_mut(), 0, &mut len) };
        if len == 0 || len > 64 * 1024 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u64; (len as usize).div_ceil(8)];
        // SAFETY: `buf` holds at least `len` bytes.
        let ok = unsafe {
            GetTokenInformation(token, TokenUser, buf.as_mut_ptr().cast(), len, &mut len)
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(UserSid { buf })
    }

    /// The SID, valid while `self` lives.
    pub fn as_psid(&self) -> PSID {
        // SAFETY: `buf` starts with the TOKEN_USER GetTokenInformation wrote.
        unsafe { (*self.buf.as_ptr().cast::<TOKEN_USER>()).User.Sid }
    }

    /// Whether `other` is the same user.
    pub fn same_as(&self, other: &UserSid) -> bool {
        self.is(other.as_psid())
    }

    /// Whether `other` (a valid SID or null) is this SID.
    fn is(&self, other: PSID) -> bool {
        // SAFETY: both are valid SIDs for the duration of the call.
        !other.is_null() && unsafe { EqualSid(self.as_psid(), other) } != 0
    }

    /// The SID as a string (`S-1-5-21-…`).
    pub fn to_sid_string(&self) -> String {
        sid_string(self.as_psid())
    }
}

/// A SID (valid, or null) as a string (`S-1-5-…`), or `<unknown SID>`.
fn sid_string(sid: PSID) -> String {
    let mut out: *mut u16 = std::ptr::null_mut();
    // SAFETY: `out` receives a LocalAlloc'ed string, freed below.
    if unsafe { ConvertSidToStringSidW(sid, &mut out) } == 0 || out.is_null() {
        return "<unknown SID>".into();
    }
    // SAFETY: the string is NUL-terminated.
    let len = (0..).take_while(|&i| unsafe { *out.add(i) } != 0).count();
    // SAFETY: `len` u16s were just read.
    let text = String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(out, len) });
    // SAFETY: allocated by ConvertSidToStringSidW.
    unsafe { LocalFree(out.cast()) };
    text
}

/// A DACL with one ACE: full access for one SID.
#[derive(Debug)]
pub struct OwnerOnlyAcl {
    buf: Vec<u64>,
}

impl OwnerOnlyAcl {
    /// Full access for `user` only; `inherit` makes the ACE apply to what a directory holds.
    pub fn new(user: &UserSid, inherit: bool) -> io::Result<OwnerOnlyAcl> {
        // SAFETY: `user` holds a valid SID.
        let sid_len = unsafe { GetLengthSid(user.as_psid()) } as usize;
        let size = size_of::<ACL>() + size_of::<ACCESS_ALLOWED_ACE>() + sid_len;
        let mut buf = vec![0u64; size.div_ceil(8)];
        let acl = buf.as_mut_ptr().cast::<ACL>();
        let size = u32::try_from(size).map_err(io::Error::other)?;
        // SAFETY: `acl` points at `size` zeroed bytes we own.
        if unsafe { InitializeAcl(acl, size, ACL_REVISION) } == 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if inherit { OBJECT_INHERIT_ACE | CONTAINER_INHERIT_ACE } else { 0 };
        // SAFETY: the ACL was sized for this ACE.
        if unsafe {
            AddAccessAllowedAceEx(acl, ACL_REVISION, flags, FILE_ALL_ACCESS, user.as_psid())
        } == 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnerOnlyAcl { buf })
    }

    /// The ACL, valid while `self` lives.
    pub fn as_ptr(&self) -> *const ACL {
        self.buf.as_ptr().cast()
    }
}

fn wide(path: &Path) -> Vec<u16> {
    path.as_os_str().encode_wide().chain(std::iter::once(0)).collect()
}

/// Replaces the DACL of `path` with one ACE for the current user, cutting inheritance.
fn make_private(path: &Path, dir: bool) -> io::Result<()> {
    let user = UserSid::current()?;
    let acl = OwnerOnlyAcl::new(&user, dir)?;
    let name = wide(path);
    // SAFETY: `name` is NUL-terminated; `acl` lives across the call.
    let rc = unsafe {
        SetNamedSecurityInfoW(
            name.as_ptr(),
            SE_FILE_OBJECT,
            DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            acl.as_ptr(),
            std::ptr::null(),
        )
    };
    if rc != ERROR_SUCCESS {
        return Err(io::Error::from_raw_os_error(rc as i32));
    }
    Ok(())
}

/// The owner and DACL of an open file, classified.
fn read_dacl(file: &File) -> io::Result<(Trustee, Option<Vec<Ace>>)> {
    let me = UserSid::current()?;
    let mut owner: PSID = std::ptr::null_mut();
    let mut dacl: *mut ACL = std::ptr::null_mut();
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: out pointers are valid; `sd` owns what `owner` and `dacl` point into and is
    // freed below, after the last use of both.
    let rc = unsafe {
        GetSecurityInfo(
            file.as_raw_handle(),
            SE_FILE_OBJECT,
            OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION,
            &mut owner,
            std::ptr::null_mut(),
            &mut dacl,
            std::ptr::null_mut(),
            &mut sd,
        )
    };
    if rc != ERROR_SUCCESS {
        return Err(io::Error::from_raw_os_error(rc as i32));
    }
    let classify = |sid: PSID| -> Trustee {
        // SAFETY: `sid` points into `sd`, alive here.
        let machine = unsafe {
            IsWellKnownSid(sid, WinLocalSystemSid) != 0
                || IsWellKnownSid(sid, WinBuiltinAdministratorsSid) != 0
        };
        if me.is(sid) {
            Trustee::Me
        } else if machine {
            Trustee::Machine
        } else {
            Trustee::Other(sid_string(sid))
        }
    };
    let owner_kind =
        if owner.is_null() { Trustee::Other("<no owner>".into()) } else { classify(owner) };
    // SAFETY: a DACL from GetSecurityInfo, alive until `sd` is freed below.
    let aces = (!dacl.is_null()).then(|| unsafe { aces_of(dacl, &classify) });
    // SAFETY: allocated by GetSecurityInfo; nothing points into it past here.
    unsafe { LocalFree(sd) };
    Ok((owner_kind, aces))
}

/// The ACEs of `dacl`, with their trustees classified.
///
/// # Safety
/// `dacl` must point at a valid ACL that outlives the call.
unsafe fn aces_of(dacl: *const ACL, classify: &dyn Fn(PSID) -> Trustee) -> Vec<Ace> {
    // SAFETY: the caller guarantees a valid ACL; every index below AceCount is an ACE.
    let count = unsafe { (*dacl).AceCount };
    (0..u32::from(count))
        .filter_map(|i| {
            let mut ace: *mut c_void = std::ptr::null_mut();
            // SAFETY: `i` < AceCount.
            if unsafe { GetAce(dacl, i, &mut ace) } == 0 || ace.is_null() {
                return None;
            }
            // SAFETY: every ACE starts with an ACE_HEADER.
            let kind = unsafe { (*ace.cast::<ACE_HEADER>()).AceType };
            if kind != acl::ACCESS_ALLOWED && kind != acl::ACCESS_DENIED {
                return Some(Ace { kind, trustee: Trustee::Other(String::new()), mask: 0 });
            }
            // SAFETY: allowed and denied ACEs share ACCESS_ALLOWED_ACE's layout, the SID
            // starting at SidStart.
            let (mask, sid) = unsafe {
                let a = ace.cast::<ACCESS_ALLOWED_ACE>();
                ((*a).Mask, std::ptr::addr_of!((*a).SidStart) as PSID)
            };
            Some(Ace { kind, trustee: classify(sid), mask })
        })
        .collect()
}

pub(super) fn exposure(file: &File, _path: &Path) -> io::Result<Option<Exposure>> {
    let (owner, aces) = read_dacl(file)?;
    if let Trustee::Other(sid) = owner {
        return Ok(Some(Exposure(format!("it is owned by {sid}, not by this user"))));
    }
    Ok(acl::exposure(aces.as_deref()))
}

pub(super) fn open_for_inspection(path: &Path) -> io::Result<File> {
    // READ_CONTROL reads the security descriptor; BACKUP_SEMANTICS opens directories too.
    OpenOptions::new().access_mode(READ_CONTROL).custom_flags(FILE_FLAG_BACKUP_SEMANTICS).open(path)
}

pub(super) fn create_new(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    // Private before anything is written to it.
    if let Err(e) = make_private(path, false) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(file)
}

pub(super) fn create_or_truncate(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
    make_private(path, false)?;
    Ok(file)
}

pub(super) fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    make_private(dir, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dacl_written_is_one_full_access_ace_for_this_user() {
        let me = UserSid::current().unwrap();
        assert!(me.to_sid_string().starts_with("S-1-"), "{}", me.to_sid_string());
        for inherit in [false, true] {
            let acl = OwnerOnlyAcl::new(&me, inherit).unwrap();
            let classify = |sid: PSID| {
                if me.is(sid) { Trustee::Me } else { Trustee::Other(sid_string(sid)) }
            };
            // SAFETY: `acl` lives across the call.
            let aces = unsafe { aces_of(acl.as_ptr(), &classify) };
            assert_eq!(
                aces,
                vec![Ace {
                    kind: acl::ACCESS_ALLOWED,
                    trustee: Trustee::Me,
                    mask: FILE_ALL_ACCESS
                }]
            );
            assert_eq!(acl::exposure(Some(&aces)), None);
        }
    }

    #[test]
    fn a_file_everyone_may_read_is_exposed() {
        let path = std::env::temp_dir().join(format!("finch-acl-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, b"x").unwrap();
        // Grant Everyone (S-1-1-0) read on top of whatever the file inherited.
        let mut world: PSID = std::ptr::null_mut();
        let text: Vec<u16> = "S-1-1-0".encode_utf16().chain(std::iter::once(0)).collect();
        // SAFETY: NUL-terminated input; `world` is LocalFree'd below.
        assert_ne!(unsafe { ConvertStringSidToSidW(text.as_ptr(), &mut world) }, 0);
        let size = size_of::<ACL>() + size_of::<ACCESS_ALLOWED_ACE>() + 64;
        let mut buf = vec![0u64; size.div_ceil(8)];
        let acl = buf.as_mut_ptr().cast::<ACL>();
        // SAFETY: `buf` holds `size` bytes; `world` is a valid SID.
        unsafe {
            assert_ne!(InitializeAcl(acl, size as u32, ACL_REVISION), 0);
            assert_ne!(AddAccessAllowedAceEx(acl, ACL_REVISION, 0, 0x8000_0000, world), 0);
        }
        let name = wide(&path);
        // SAFETY: valid name and ACL.
        let rc = unsafe {
            SetNamedSecurityInfoW(
                name.as_ptr(),
                SE_FILE_OBJECT,
                DACL_SECURITY_INFORMATION,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                acl,
                std::ptr::null(),
            )
        };
        // SAFETY: allocated by ConvertStringSidToSidW.
        unsafe { LocalFree(world) };
        assert_eq!(rc, ERROR_SUCCESS);
        let e = super::super::path_exposure(&path).unwrap().expect("exposed");
        assert!(e.0.contains("S-1-1-0"), "{e}");
        std::fs::remove_file(&path).unwrap();
    }
}
