//! The Windows calls of the agent, and the only `unsafe` code in the workspace: COM/WMI in
//! `root\virtualization\v2` and the virtual disk API (virtdisk.dll), behind the plain traits
//! [`Wmi`] and [`VirtualDisks`]; plus the free space of a volume for the engine.
//!
//! ```text
//!  WmiHost (wmi.rs, tested on Linux) ──Wmi──────────> SysWmi: IWbemLocator ─> IWbemServices
//!                                    │                  ExecQuery / GetObject / ExecMethod,
//!                                    │                  IWbemObjectTextSrc (embedded instances)
//!                                    └──VirtualDisks──> SysVirtualDisks: OpenVirtualDisk,
//!                                                       GetVirtualDiskInformation,
//!                                                       QueryChangesVirtualDisk,
//!                                                       AttachVirtualDisk (read-only) + ReadFile
//! ```
//!
//! Every call opens what it needs and closes it before returning (a WMI connection per call,
//! a virtual disk handle per call), so nothing COM-bound crosses threads; COM is initialised
//! multithreaded on each calling thread. This module is compiled and linked for
//! `x86_64-pc-windows-gnu` in CI; it is run only on a Hyper-V host (docs/hyper-v.md).
#![allow(unsafe_code)]

use std::fs::File;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::fs::FileExt;

use windows::Win32::Foundation::{
    CloseHandle, ERROR_VHD_CHANGE_TRACKING_DISABLED, ERROR_VHD_INVALID_CHANGE_TRACKING_ID,
    ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION, ERROR_VHD_PARENT_VHD_NOT_FOUND, HANDLE,
    WIN32_ERROR,
};
use windows::Win32::Storage::Vhd::{
    ATTACH_VIRTUAL_DISK_FLAG_NO_DRIVE_LETTER, ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY,
    ATTACH_VIRTUAL_DISK_PARAMETERS, ATTACH_VIRTUAL_DISK_VERSION_1, AttachVirtualDisk,
    DETACH_VIRTUAL_DISK_FLAG_NONE, DetachVirtualDisk, GET_VIRTUAL_DISK_INFO,
    GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE, GET_VIRTUAL_DISK_INFO_PARENT_LOCATION,
    GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK, GET_VIRTUAL_DISK_INFO_SIZE, GET_VIRTUAL_DISK_INFO_VERSION,
    GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID, GetVirtualDiskInformation, GetVirtualDiskPhysicalPath,
    OPEN_VIRTUAL_DISK_FLAG_NONE, OPEN_VIRTUAL_DISK_PARAMETERS, OPEN_VIRTUAL_DISK_VERSION_2,
    OpenVirtualDisk, QUERY_CHANGES_VIRTUAL_DISK_FLAG_NONE, QUERY_CHANGES_VIRTUAL_DISK_RANGE,
    QueryChangesVirtualDisk, VIRTUAL_DISK_ACCESS_NONE, VIRTUAL_STORAGE_TYPE,
    VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN, VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT,
};
use windows::Win32::System::Com::{
    CLSCTX_INPROC_SERVER, COINIT_MULTITHREADED, CoCreateInstance, CoInitializeEx,
    CoSetProxyBlanket, EOAC_NONE, RPC_C_AUTHN_LEVEL_CALL, RPC_C_IMP_LEVEL_IMPERSONATE, SAFEARRAY,
};
use windows::Win32::System::Ole::{SafeArrayGetElement, SafeArrayGetLBound, SafeArrayGetUBound};
use windows::Win32::System::Rpc::{RPC_C_AUTHN_WINNT, RPC_C_AUTHZ_NONE};
use windows::Win32::System::Variant::{
    VARENUM, VARIANT, VT_ARRAY, VT_BOOL, VT_BSTR, VT_EMPTY, VT_I2, VT_I4, VT_NULL, VT_UI1, VT_UI2,
    VT_UI4,
};
use windows::Win32::System::Wmi::{
    IEnumWbemClassObject, IWbemClassObject, IWbemLocator, IWbemObjectTextSrc, IWbemServices,
    WBEM_FLAG_FORWARD_ONLY, WBEM_FLAG_RETURN_IMMEDIATELY, WBEM_FLAG_RETURN_WBEM_COMPLETE,
    WBEM_INFINITE, WMI_OBJ_TEXT_CIM_DTD_2_0, WbemLocator, WbemObjectTextSrc,
};
use windows::core::{BSTR, GUID, HRESULT, PCWSTR, PWSTR};

use super::host::{ChangeTracking, DiskReader, HostError, VirtualDiskInfo, codes};
use super::wmi::{
    ChangesPage, NAMESPACE, VirtualDisks, Win32CallError, Wmi, WmiCallError, WmiHost,
    WmiHostOptions, WmiObject, WmiValue,
};

// The codes the pure side tells apart are the ones Windows uses.
const _: () =
    assert!(codes::ERROR_VHD_INVALID_CHANGE_TRACKING_ID == ERROR_VHD_INVALID_CHANGE_TRACKING_ID.0);
const _: () =
    assert!(codes::ERROR_VHD_CHANGE_TRACKING_DISABLED == ERROR_VHD_CHANGE_TRACKING_DISABLED.0);
const _: () = assert!(
    codes::ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION
        == ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION.0
);
const _: () = assert!(codes::ERROR_VHD_PARENT_VHD_NOT_FOUND == ERROR_VHD_PARENT_VHD_NOT_FOUND.0);

/// The Hyper-V host this process runs on.
pub fn host(options: WmiHostOptions) -> WmiHost<SysWmi, SysVirtualDisks> {
    WmiHost::new(SysWmi, SysVirtualDisks, options)
}

fn wide(s: &str) -> Vec<u16> {
    std::ffi::OsStr::new(s)
        .encode_wide()
        .chain(std::iter::once(0))
        .collect()
}

fn wmi_error(e: windows::core::Error) -> WmiCallError {
    WmiCallError {
        hresult: e.code().0 as u32,
        message: e.message(),
    }
}

fn win32_error(code: WIN32_ERROR) -> Win32CallError {
    Win32CallError {
        code: code.0,
        message: windows::core::Error::from_hresult(HRESULT::from_win32(code.0)).message(),
    }
}

fn check(code: WIN32_ERROR) -> Result<(), Win32CallError> {
    if code.0 == 0 {
        Ok(())
    } else {
        Err(win32_error(code))
    }
}

/// Initialise COM (multithreaded) on this thread; a thread already initialised is fine.
fn com() -> Result<(), WmiCallError> {
    // SAFETY: no reserved pointer; COM may be initialised any number of times per thread.
    let hr = unsafe { CoInitializeEx(None, COINIT_MULTITHREADED) };
    // NB: RPC_E_CHANGED_MODE (0x80010106): the thread is single-threaded already; WMI works
    // from it too.
    if hr.is_ok() || hr.0 as u32 == 0x8001_0106 {
        Ok(())
    } else {
        Err(wmi_error(windows::core::Error::from_hresult(hr)))
    }
}

/// A connection to `root\virtualization\v2`.
fn connect() -> Result<IWbemServices, WmiCallError> {
    com()?;
    // SAFETY: COM is initialised on this thread; the CLSID and interface match.
    let locator: IWbemLocator =
        unsafe { CoCreateInstance(&WbemLocator, None, CLSCTX_INPROC_SERVER) }.map_err(wmi_error)?;
    let empty = BSTR::new();
    // SAFETY: every BSTR outlives the call; no context object.
    let services = unsafe {
        locator.ConnectServer(
            &BSTR::from(NAMESPACE),
            &empty,
            &empty,
            &empty,
            0,
            &empty,
            None,
        )
    }
    .map_err(wmi_error)?;
    // SAFETY: `services` is a live proxy; the constants are the documented ones for WMI.
    unsafe {
        CoSetProxyBlanket(
            &services,
            RPC_C_AUTHN_WINNT,
            RPC_C_AUTHZ_NONE,
            PCWSTR::null(),
            RPC_C_AUTHN_LEVEL_CALL,
            RPC_C_IMP_LEVEL_IMPERSONATE,
            None,
            EOAC_NONE,
        )
    }
    .map_err(wmi_error)?;
    Ok(services)
}

/// The string array in a SAFEARRAY of BSTRs, or of 32-bit integers.
///
/// # Safety
/// `array` is a valid one-dimensional SAFEARRAY of `vt` elements.
unsafe fn read_array(array: *const SAFEARRAY, vt: VARENUM) -> Option<WmiValue> {
    // SAFETY: the caller vouches for `array`; bounds come from the array itself.
    let (lower, upper) = unsafe {
        (
            SafeArrayGetLBound(array, 1).ok()?,
            SafeArrayGetUBound(array, 1).ok()?,
        )
    };
    if vt == VT_BSTR {
        let mut out = Vec::new();
        for i in lower..=upper {
            let mut value = BSTR::new();
            // SAFETY: `i` is within the bounds; the element is a BSTR, copied into `value`,
            // which frees it.
            unsafe { SafeArrayGetElement(array, &i, (&mut value as *mut BSTR).cast()) }.ok()?;
            out.push(value.to_string());
        }
        Some(WmiValue::StrArray(out))
    } else if vt == VT_I4 {
        let mut out = Vec::new();
        for i in lower..=upper {
            let mut value = 0i32;
            // SAFETY: `i` is within the bounds; the element is an i32.
            unsafe { SafeArrayGetElement(array, &i, (&mut value as *mut i32).cast()) }.ok()?;
            out.push(value);
        }
        Some(WmiValue::I32Array(out))
    } else {
        None
    }
}

/// A VARIANT as a plain value (`Null` for the types the backend does not read).
fn from_variant(v: &VARIANT) -> WmiValue {
    let vt = v.vt();
    if vt == VT_EMPTY || vt == VT_NULL {
        return WmiValue::Null;
    }
    if vt == VT_BSTR {
        return BSTR::try_from(v).map_or(WmiValue::Null, |b| WmiValue::Str(b.to_string()));
    }
    if vt == VT_BOOL {
        return bool::try_from(v).map_or(WmiValue::Null, WmiValue::Bool);
    }
    if vt == VT_UI1 {
        // SAFETY: the tag says the union holds a byte.
        return WmiValue::U8(unsafe { v.Anonymous.Anonymous.Anonymous.bVal });
    }
    if vt == VT_I4 || vt == VT_I2 || vt == VT_UI2 || vt == VT_UI4 {
        return i32::try_from(v)
            .or_else(|_| u32::try_from(v).map(|u| u as i32))
            .map_or(WmiValue::Null, WmiValue::I32);
    }
    if vt.0 & VT_ARRAY.0 != 0 {
        let element = VARENUM(vt.0 & !VT_ARRAY.0);
        // SAFETY: the tag says the union holds a SAFEARRAY of `element`s, owned by `v`.
        let array = unsafe { v.Anonymous.Anonymous.Anonymous.parray };
        if !array.is_null() {
            // SAFETY: as above; WMI's arrays are one-dimensional.
            if let Some(value) = unsafe { read_array(array, element) } {
                return value;
            }
        }
    }
    WmiValue::Null
}

/// A plain value as a VARIANT of the type WMI expects for it.
fn to_variant(value: &WmiValue) -> Result<VARIANT, WmiCallError> {
    Ok(match value {
        WmiValue::Null => VARIANT::default(),
        WmiValue::Bool(b) => VARIANT::from(*b),
        WmiValue::I32(i) => VARIANT::from(*i),
        WmiValue::Str(s) => VARIANT::from(s.as_str()),
        WmiValue::U8(b) => {
            let mut v = VARIANT::default();
            // SAFETY: an empty VARIANT owns nothing; setting the tag and the byte together
            // makes a valid VT_UI1.
            unsafe {
                (*v.Anonymous.Anonymous).vt = VT_UI1;
                (*v.Anonymous.Anonymous).Anonymous.bVal = *b;
            }
            v
        }
        WmiValue::StrArray(_) | WmiValue::I32Array(_) => {
            return Err(WmiCallError {
                hresult: codes::WBEM_E_INVALID_PARAMETER,
                message: "array arguments are not supported".to_owned(),
            });
        }
    })
}

/// An object's properties as plain values.
fn to_object(o: &IWbemClassObject) -> Result<WmiObject, WmiCallError> {
    let mut out = WmiObject::default();
    // SAFETY: `o` is a live object; enumeration is bracketed by Begin/EndEnumeration on this
    // thread; every out-pointer is a valid local the call writes.
    unsafe {
        o.BeginEnumeration(0).map_err(wmi_error)?;
        loop {
            let mut name = BSTR::new();
            let mut value = VARIANT::default();
            o.Next(
                0,
                &mut name,
                &mut value,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
            .map_err(wmi_error)?;
            // NB: WBEM_S_NO_MORE_DATA is a success code: the end shows as an empty name.
            if name.is_empty() {
                break;
            }
            let name = name.to_string();
            let value = from_variant(&value);
            match (name.as_str(), &value) {
                ("__CLASS", WmiValue::Str(s)) => out.class = s.clone(),
                ("__PATH", WmiValue::Str(s)) => out.path = s.clone(),
                _ => {
                    out.properties.insert(name, value);
                }
            }
        }
        o.EndEnumeration().map_err(wmi_error)?;
    }
    Ok(out)
}

fn get_object(services: &IWbemServices, path: &str) -> Result<IWbemClassObject, WmiCallError> {
    let mut object: Option<IWbemClassObject> = None;
    // SAFETY: `object` is a valid out-slot; the path BSTR outlives the call.
    unsafe {
        services.GetObject(
            &BSTR::from(path),
            WBEM_FLAG_RETURN_WBEM_COMPLETE,
            None,
            Some(&mut object),
            None,
        )
    }
    .map_err(wmi_error)?;
    object.ok_or_else(|| WmiCallError {
        hresult: codes::WBEM_E_NOT_FOUND,
        message: format!("GetObject({path}) returned nothing"),
    })
}

/// An instance of `class` with `properties` set.
fn spawn(
    services: &IWbemServices,
    class: &IWbemClassObject,
    properties: &[(&str, WmiValue)],
) -> Result<IWbemClassObject, WmiCallError> {
    let _ = services;
    // SAFETY: `class` is a live class object.
    let instance = unsafe { class.SpawnInstance(0) }.map_err(wmi_error)?;
    for (name, value) in properties {
        if *value == WmiValue::Null {
            continue;
        }
        let v = to_variant(value)?;
        let name = wide(name);
        // SAFETY: `name` is NUL-terminated and `v` a valid VARIANT, both outliving the call;
        // type 0 lets WMI take the property's own CIM type.
        unsafe { instance.Put(PCWSTR(name.as_ptr()), 0, &v, 0) }.map_err(wmi_error)?;
    }
    Ok(instance)
}

/// [`Wmi`] over COM on this machine.
#[derive(Debug, Clone, Copy)]
pub struct SysWmi;

impl Wmi for SysWmi {
    fn query(&self, wql: &str) -> Result<Vec<WmiObject>, WmiCallError> {
        let services = connect()?;
        // SAFETY: the BSTRs outlive the call; no context object.
        let found: IEnumWbemClassObject = unsafe {
            services.ExecQuery(
                &BSTR::from("WQL"),
                &BSTR::from(wql),
                WBEM_FLAG_FORWARD_ONLY | WBEM_FLAG_RETURN_IMMEDIATELY,
                None,
            )
        }
        .map_err(wmi_error)?;
        let mut out = Vec::new();
        loop {
            let mut slot = [None];
            let mut returned = 0u32;
            // SAFETY: one slot and a valid count to write.
            let hr = unsafe { found.Next(WBEM_INFINITE, &mut slot, &mut returned) };
            hr.ok().map_err(wmi_error)?;
            match (returned, slot[0].take()) {
                (0, _) | (_, None) => break,
                (_, Some(object)) => out.push(to_object(&object)?),
            }
        }
        Ok(out)
    }

    fn get(&self, path: &str) -> Result<WmiObject, WmiCallError> {
        let services = connect()?;
        to_object(&get_object(&services, path)?)
    }

    fn call(
        &self,
        path: &str,
        class: &str,
        method: &str,
        args: &[(&str, WmiValue)],
    ) -> Result<WmiObject, WmiCallError> {
        let services = connect()?;
        let definition = get_object(&services, class)?;
        let method_name = wide(method);
        let mut in_signature: Option<IWbemClassObject> = None;
        // SAFETY: `method_name` is NUL-terminated; the out-slot is valid; the out-signature is
        // not asked for.
        unsafe {
            definition.GetMethod(
                PCWSTR(method_name.as_ptr()),
                0,
                &mut in_signature,
                std::ptr::null_mut(),
            )
        }
        .map_err(wmi_error)?;
        let input = match &in_signature {
            Some(signature) => Some(spawn(&services, signature, args)?),
            None => None,
        };
        let mut output: Option<IWbemClassObject> = None;
        // SAFETY: the BSTRs and the in-parameters outlive the call; the out-slot is valid.
        unsafe {
            services.ExecMethod(
                &BSTR::from(path),
                &BSTR::from(method),
                WBEM_FLAG_RETURN_WBEM_COMPLETE,
                None,
                input.as_ref(),
                Some(&mut output),
                None,
            )
        }
        .map_err(wmi_error)?;
        match output {
            Some(o) => to_object(&o),
            None => Ok(WmiObject::default()),
        }
    }

    fn embedded_instance(
        &self,
        class: &str,
        properties: &[(&str, WmiValue)],
    ) -> Result<String, WmiCallError> {
        let services = connect()?;
        let definition = get_object(&services, class)?;
        let instance = spawn(&services, &definition, properties)?;
        // SAFETY: COM is initialised (connect); CLSID and interface match.
        let text: IWbemObjectTextSrc =
            unsafe { CoCreateInstance(&WbemObjectTextSrc, None, CLSCTX_INPROC_SERVER) }
                .map_err(wmi_error)?;
        // SAFETY: `instance` is live; DTD 2.0 is the CIM-XML form Hyper-V methods take.
        let xml = unsafe { text.GetText(0, &instance, WMI_OBJ_TEXT_CIM_DTD_2_0.0 as u32, None) }
            .map_err(wmi_error)?;
        Ok(xml.to_string())
    }
}

/// A virtual disk handle, closed on drop.
#[derive(Debug)]
struct VirtualDisk(HANDLE);

// SAFETY: a virtual disk handle is a kernel handle, usable from any thread.
unsafe impl Send for VirtualDisk {}
// SAFETY: as above; the calls made through it do not rely on thread affinity.
unsafe impl Sync for VirtualDisk {}

impl Drop for VirtualDisk {
    fn drop(&mut self) {
        // SAFETY: the handle came from OpenVirtualDisk and is closed once, here.
        let _ = unsafe { CloseHandle(self.0) };
    }
}

impl VirtualDisk {
    /// Open an image: for information only, or read-only (to attach).
    fn open(path: &str, info_only: bool) -> Result<VirtualDisk, Win32CallError> {
        let storage = VIRTUAL_STORAGE_TYPE {
            DeviceId: VIRTUAL_STORAGE_TYPE_DEVICE_UNKNOWN,
            VendorId: VIRTUAL_STORAGE_TYPE_VENDOR_MICROSOFT,
        };
        let mut parameters = OPEN_VIRTUAL_DISK_PARAMETERS {
            Version: OPEN_VIRTUAL_DISK_VERSION_2,
            ..Default::default()
        };
        parameters.Anonymous.Version2.GetInfoOnly = info_only.into();
        parameters.Anonymous.Version2.ReadOnly = (!info_only).into();
        let path = wide(path);
        let mut handle = HANDLE::default();
        // SAFETY: every pointer is to a live local; version 2 takes VIRTUAL_DISK_ACCESS_NONE.
        let code = unsafe {
            OpenVirtualDisk(
                &storage,
                PCWSTR(path.as_ptr()),
                VIRTUAL_DISK_ACCESS_NONE,
                OPEN_VIRTUAL_DISK_FLAG_NONE,
                Some(&parameters),
                &mut handle,
            )
        };
        check(code)?;
        Ok(VirtualDisk(handle))
    }

    /// `GetVirtualDiskInformation` of one version into an 8-byte-aligned buffer.
    fn info(&self, version: GET_VIRTUAL_DISK_INFO_VERSION) -> Result<Vec<u64>, Win32CallError> {
        let mut buffer = vec![0u64; 1024];
        let mut size = (buffer.len() * 8) as u32;
        let info = buffer.as_mut_ptr().cast::<GET_VIRTUAL_DISK_INFO>();
        // SAFETY: the buffer is large and aligned enough for the structure and its trailing
        // string; `size` tells the call how large it is.
        let code = unsafe {
            (*info).Version = version;
            GetVirtualDiskInformation(self.0, &mut size, info, None)
        };
        check(code)?;
        Ok(buffer)
    }
}

/// A NUL-terminated wide string at `offset` bytes into `buffer`.
fn wide_string_at(buffer: &[u64], offset: usize) -> String {
    let bytes: Vec<u8> = buffer.iter().flat_map(|w| w.to_le_bytes()).collect();
    let units: Vec<u16> = bytes[offset.min(bytes.len())..]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|u| *u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// [`VirtualDisks`] over virtdisk.dll on this machine.
#[derive(Debug, Clone, Copy)]
pub struct SysVirtualDisks;

impl VirtualDisks for SysVirtualDisks {
    fn info(&self, path: &str) -> Result<VirtualDiskInfo, Win32CallError> {
        let disk = VirtualDisk::open(path, true)?;
        let size = disk.info(GET_VIRTUAL_DISK_INFO_SIZE)?;
        let id = disk.info(GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID)?;
        let physical = disk.info(GET_VIRTUAL_DISK_INFO_PHYSICAL_DISK).ok();
        let tracking = disk.info(GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE).ok();
        let parent = disk.info(GET_VIRTUAL_DISK_INFO_PARENT_LOCATION).ok();
        let at = |b: &Vec<u64>| b.as_ptr().cast::<GET_VIRTUAL_DISK_INFO>();
        // SAFETY: each buffer holds the structure of the version asked for, written by the
        // call; the union fields read are the ones of that version.
        let (virtual_size_bytes, sector, virtual_disk_id) = unsafe {
            let s = (*at(&size)).Anonymous.Size;
            let sector = physical
                .as_ref()
                .map(|p| (*at(p)).Anonymous.PhysicalDisk.LogicalSectorSize)
                .unwrap_or(s.SectorSize);
            (s.VirtualSize, sector, (*at(&id)).Anonymous.VirtualDiskId)
        };
        // NB: the strings trail their structures: MostRecentId after two BOOLs, the parent's
        // location after one, both following the 4-byte Version and its padding to 8.
        let change_tracking = tracking.map(|t| {
            // SAFETY: as above, for CHANGE_TRACKING_STATE.
            let state = unsafe { (*at(&t)).Anonymous.ChangeTrackingState };
            ChangeTracking {
                enabled: state.Enabled.as_bool(),
                newer_changes: state.NewerChanges.as_bool(),
                most_recent_id: wide_string_at(&t, 8 + 4 + 4),
            }
        });
        let parent_path = parent.and_then(|p| {
            // SAFETY: as above, for PARENT_LOCATION.
            let resolved = unsafe { (*at(&p)).Anonymous.ParentLocation.ParentResolved };
            let location = wide_string_at(&p, 8 + 4);
            (resolved.as_bool() && !location.is_empty()).then_some(location)
        });
        Ok(VirtualDiskInfo {
            virtual_size_bytes,
            logical_sector_bytes: sector,
            virtual_disk_id: guid_string(&virtual_disk_id),
            change_tracking,
            parent_path,
        })
    }

    fn query_changes_page(
        &self,
        path: &str,
        rct_id: &str,
        offset: u64,
        len: u64,
    ) -> Result<ChangesPage, Win32CallError> {
        let disk = VirtualDisk::open(path, true)?;
        let id = wide(rct_id);
        let mut ranges = vec![QUERY_CHANGES_VIRTUAL_DISK_RANGE::default(); 4096];
        let mut count = ranges.len() as u32;
        let mut processed = 0u64;
        // SAFETY: `ranges` holds `count` entries; `id` is NUL-terminated; all outlive the call.
        let code = unsafe {
            QueryChangesVirtualDisk(
                disk.0,
                PCWSTR(id.as_ptr()),
                offset,
                len,
                QUERY_CHANGES_VIRTUAL_DISK_FLAG_NONE,
                ranges.as_mut_ptr(),
                &mut count,
                &mut processed,
            )
        };
        check(code)?;
        Ok(ChangesPage {
            ranges: ranges[..(count as usize).min(ranges.len())]
                .iter()
                .map(|r| r.ByteOffset..r.ByteOffset + r.ByteLength)
                .collect(),
            processed_bytes: processed,
        })
    }

    fn read_file_at(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, Win32CallError> {
        let io = |e: std::io::Error| Win32CallError {
            code: e.raw_os_error().unwrap_or(0) as u32,
            message: e.to_string(),
        };
        // NB: std opens with FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE.
        let file = File::open(path).map_err(io)?;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match file.seek_read(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn open_for_read(&self, path: &str) -> Result<Box<dyn DiskReader>, Win32CallError> {
        let disk = VirtualDisk::open(path, false)?;
        let info = self.info(path)?;
        let parameters = ATTACH_VIRTUAL_DISK_PARAMETERS {
            Version: ATTACH_VIRTUAL_DISK_VERSION_1,
            ..Default::default()
        };
        // SAFETY: the handle is open; the parameters outlive the call; no security descriptor
        // and no overlapped I/O (the call completes before it returns).
        let code = unsafe {
            AttachVirtualDisk(
                disk.0,
                None,
                ATTACH_VIRTUAL_DISK_FLAG_READ_ONLY | ATTACH_VIRTUAL_DISK_FLAG_NO_DRIVE_LETTER,
                0,
                Some(&parameters),
                None,
            )
        };
        check(code)?;
        let attached = Attached { disk };
        let mut name = vec![0u16; 1024];
        let mut bytes = (name.len() * 2) as u32;
        // SAFETY: `name` holds `bytes` bytes for the path the call writes.
        let code = unsafe {
            GetVirtualDiskPhysicalPath(attached.disk.0, &mut bytes, PWSTR(name.as_mut_ptr()))
        };
        check(code)?;
        let device: String = String::from_utf16_lossy(
            &name
                .iter()
                .copied()
                .take_while(|u| *u != 0)
                .collect::<Vec<_>>(),
        );
        let file = File::open(&device).map_err(|e| Win32CallError {
            code: e.raw_os_error().unwrap_or(0) as u32,
            message: format!("{device}: {e}"),
        })?;
        Ok(Box::new(AttachedReader {
            file,
            device,
            size_bytes: info.virtual_size_bytes,
            sector_bytes: info.logical_sector_bytes.max(512),
            _attached: attached,
        }))
    }
}

fn guid_string(g: &GUID) -> String {
    format!("{{{g:?}}}")
}

/// A virtual disk attached read-only: detached when dropped.
#[derive(Debug)]
struct Attached {
    disk: VirtualDisk,
}

impl Drop for Attached {
    fn drop(&mut self) {
        // SAFETY: the handle is open and attached; detaching twice (closing the handle
        // detaches a non-permanent attach too) only returns an error, ignored here.
        let _ = unsafe { DetachVirtualDisk(self.disk.0, DETACH_VIRTUAL_DISK_FLAG_NONE, 0) };
    }
}

/// Reads of an attached disk through its device (`\\.\PhysicalDriveN`).
#[derive(Debug)]
struct AttachedReader {
    // NB: fields drop in declaration order: the device closes before the disk detaches.
    file: File,
    device: String,
    size_bytes: u64,
    sector_bytes: u32,
    _attached: Attached,
}

impl DiskReader for AttachedReader {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn sector_bytes(&self) -> u32 {
        self.sector_bytes
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostError> {
        // NB: device reads go around the cache: the buffer is aligned to a page.
        const ALIGN: usize = 4096;
        let mut raw = vec![0u8; buf.len() + ALIGN];
        let skip = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        let aligned = &mut raw[skip..skip + buf.len()];
        let mut done = 0;
        while done < aligned.len() {
            match self
                .file
                .seek_read(&mut aligned[done..], offset + done as u64)
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(HostError::VirtualDisk {
                        action: "ReadFile",
                        path: self.device.clone(),
                        code: e.raw_os_error().unwrap_or(0) as u32,
                        message: e.to_string(),
                    });
                }
            }
        }
        buf[..done].copy_from_slice(&aligned[..done]);
        buf[done..].fill(0);
        Ok(())
    }
}
