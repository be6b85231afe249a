//! The seam between the Hyper-V backend and a Windows host: [`HyperVHost`], what the backend
//! asks of Hyper-V (recovery checkpoints, reference points, Resilient Change Tracking, virtual
//! disks) in plain Rust types, and [`HostError`] with the class every failure belongs to.
//!
//! ```text
//!  HyperVHypervisor / HyperVView ──HyperVHost──> WmiHost (wmi.rs: classes, methods, jobs)
//!        (mod.rs, view.rs)                          └── Wmi + VirtualDisks ──> sys.rs (Windows)
//!                              └─ tests: FakeHyperVHost (fake.rs), a test double
//! ```
//!
//! Every method blocks (WMI jobs are polled); the backend calls them on tokio's blocking pool.

use std::fmt;
use std::ops::Range;

/// Which kind of recovery checkpoint to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Through VSS in the guest (Msvm_VirtualSystemSnapshotSettingData.ConsistencyLevel 1).
    Application,
    /// As if the VM lost power (ConsistencyLevel 2).
    Crash,
}

impl Consistency {
    /// The `ConsistencyLevel` value of WMI.
    pub fn level(self) -> u8 {
        match self {
            Consistency::Application => 1,
            Consistency::Crash => 2,
        }
    }

    /// From a `ConsistencyLevel` value.
    pub fn from_level(level: u16) -> Option<Consistency> {
        match level {
            1 => Some(Consistency::Application),
            2 => Some(Consistency::Crash),
            _ => None,
        }
    }
}

/// A VM on the host (`Msvm_ComputerSystem`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmRef {
    /// Its name (`ElementName`).
    pub name: String,
    /// Its id (`Name`, a GUID).
    pub id: String,
    /// Its WMI object path.
    pub path: String,
}

/// A checkpoint (`Msvm_VirtualSystemSettingData` of a snapshot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRef {
    /// `InstanceID`.
    pub instance_id: String,
    /// Its WMI object path.
    pub path: String,
}

/// A checkpoint as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Which.
    pub checkpoint: CheckpointRef,
    /// `ElementName`.
    pub name: String,
    /// A recovery checkpoint (`VirtualSystemType` `Microsoft:Hyper-V:Snapshot:Recovery`), the
    /// kind backups and replication take.
    pub recovery: bool,
    /// `CreationTime`, in milliseconds since the Unix epoch.
    pub created_unix_ms: Option<u64>,
}

/// A reference point (`Msvm_VirtualSystemReferencePoint`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferencePointRef {
    /// `InstanceID`.
    pub instance_id: String,
    /// Its WMI object path.
    pub path: String,
}

/// A reference point as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferencePoint {
    /// Which.
    pub reference_point: ReferencePointRef,
    /// Based on Resilient Change Tracking (`ReferencePointType` 2), not on a replica log.
    pub rct_based: bool,
    /// Its consistency.
    pub consistency: Option<Consistency>,
    /// `VirtualDiskIdentifiers[i]` with `ResilientChangeTrackingIdentifiers[i]`.
    pub disks: Vec<RctDisk>,
}

/// One disk of a reference point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RctDisk {
    /// The virtual disk's identifier.
    pub virtual_disk_id: String,
    /// Its RCT id as of the reference point.
    pub rct_id: String,
}

/// Resilient Change Tracking of one image (`GET_VIRTUAL_DISK_INFO_CHANGE_TRACKING_STATE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeTracking {
    /// RCT is on for the image.
    pub enabled: bool,
    /// There are changes newer than `most_recent_id`.
    pub newer_changes: bool,
    /// The RCT id of the image's current state.
    pub most_recent_id: String,
}

/// What the virtual disk API says of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualDiskInfo {
    /// The virtual size.
    pub virtual_size_bytes: u64,
    /// The logical sector size: reads of the attached disk are aligned to it.
    pub logical_sector_bytes: u32,
    /// `GET_VIRTUAL_DISK_INFO_VIRTUAL_DISK_ID`.
    pub virtual_disk_id: String,
    /// Its change tracking; `None` for formats without (VHD).
    pub change_tracking: Option<ChangeTracking>,
    /// The parent of a differencing disk, as resolved by the API.
    pub parent_path: Option<String>,
}

/// A disk attached read-only for reading.
pub trait DiskReader: Send + Sync + fmt::Debug {
    /// The disk's size.
    fn size_bytes(&self) -> u64;
    /// The sector size offsets and lengths must be multiples of.
    fn sector_bytes(&self) -> u32;
    /// Fill `buf` from `offset` (both aligned to [`DiskReader::sector_bytes`]).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostError>;
}

/// What the backend asks of a Hyper-V host.
///
/// # Guarantees every implementation gives
/// - Methods that run a WMI job return when the job ended; a failed job is an error carrying
///   its `ErrorCode` and `ErrorDescription`.
/// - `destroy_*` of something already gone is [`HostError::NotFound`], so that a sweep can
///   tolerate it.
pub trait HyperVHost: Send + Sync + fmt::Debug {
    /// The VM named `name` (its `ElementName`, or its GUID).
    fn find_vm(&self, name: &str) -> Result<VmRef, HostError>;
    /// The image paths of the VM's virtual hard disks now (the leaves the VM writes to).
    fn vm_disks(&self, vm: &VmRef) -> Result<Vec<String>, HostError>;
    /// Take a recovery checkpoint of every disk of the VM at one instant.
    fn create_recovery_checkpoint(
        &self,
        vm: &VmRef,
        consistency: Consistency,
    ) -> Result<CheckpointRef, HostError>;
    /// The image paths of a checkpoint's disks: frozen while the checkpoint exists.
    fn checkpoint_disks(&self, checkpoint: &CheckpointRef) -> Result<Vec<String>, HostError>;
    /// The VM's checkpoints.
    fn checkpoints(&self, vm: &VmRef) -> Result<Vec<Checkpoint>, HostError>;
    /// Delete a checkpoint (its differencing disks merge back).
    fn destroy_checkpoint(&self, checkpoint: &CheckpointRef) -> Result<(), HostError>;
    /// Turn a recovery checkpoint into a reference point (the checkpoint is deleted).
    fn convert_to_reference_point(
        &self,
        checkpoint: &CheckpointRef,
    ) -> Result<ReferencePoint, HostError>;
    /// The VM's reference points.
    fn reference_points(&self, vm: &VmRef) -> Result<Vec<ReferencePoint>, HostError>;
    /// Delete a reference point.
    fn destroy_reference_point(&self, reference_point: &ReferencePointRef)
    -> Result<(), HostError>;
    /// What the virtual disk API says of an image (opened for information only).
    fn disk_info(&self, path: &str) -> Result<VirtualDiskInfo, HostError>;
    /// The ranges within `range` changed since the state `rct_id` names
    /// (`QueryChangesVirtualDisk`), sorted.
    fn query_changes(
        &self,
        path: &str,
        rct_id: &str,
        range: Range<u64>,
    ) -> Result<Vec<Range<u64>>, HostError>;
    /// Raw bytes of an image file (not of its virtual disk), shared for reading; fewer than
    /// `len` only at the end of the file.
    fn read_file_at(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, HostError>;
    /// Attach an image (and its parents) read-only, without a drive letter, for reading.
    /// Dropping the reader detaches it.
    fn open_for_read(&self, path: &str) -> Result<Box<dyn DiskReader>, HostError>;
    /// Stop the VM for a planned failover: ask the guest to shut down (the shutdown
    /// integration service), wait up to `grace` for the VM to be off, else pause it. True when
    /// the guest shut down. A VM already off or paused is left so.
    fn stop_vm(&self, vm: &VmRef, grace: std::time::Duration) -> Result<bool, HostError>;
}

/// What kind of failure a [`HostError`] is: how the backend reports it and whether a retry
/// can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The VM does not exist (any more). Non-recoverable.
    VmNotFound,
    /// An image is missing. Non-recoverable.
    DiskNotFound,
    /// A checkpoint or reference point is gone.
    Gone,
    /// A differencing chain is broken or an image is corrupt. Non-recoverable.
    BrokenChain,
    /// The agent's account may not do this. Non-recoverable.
    AccessDenied,
    /// Not supported here (an old host or VM version, a pass-through disk). Non-recoverable.
    Unsupported,
    /// A bad request (a bug, or an unexpected answer). Non-recoverable.
    Invalid,
    /// An RCT id is no longer valid, or RCT is off: the disk needs a resync.
    TrackingLost,
    /// Busy, in a transitional state, timed out, the service restarting. Recoverable.
    Busy,
    /// Out of memory or disk space. Recoverable.
    OutOfResources,
    /// Failed without saying why. Recoverable: retrying is how ASR treats it.
    Failed,
}

impl ErrorClass {
    /// Whether retrying later can help.
    pub fn is_recoverable(self) -> bool {
        matches!(
            self,
            ErrorClass::Busy | ErrorClass::OutOfResources | ErrorClass::Failed
        )
    }
}

/// Why a host call failed, with what was being done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// A WMI call failed (`IWbemServices`): an HRESULT.
    #[error("{action}: WMI error {hresult:#010x} ({}){}", hresult_meaning(*hresult), colon(message))]
    Wmi {
        /// What was being done (class, method, object).
        action: String,
        /// The HRESULT.
        hresult: u32,
        /// The system's message.
        message: String,
    },
    /// A method returned an error value without starting a job.
    #[error("{class}.{method} on {target} returned {code} ({})", return_meaning(*code))]
    Method {
        /// The class of the service.
        class: &'static str,
        /// The method.
        method: &'static str,
        /// What it was called for.
        target: String,
        /// `ReturnValue`.
        code: u32,
    },
    /// A method's job failed.
    #[error("{0}")]
    Job(Box<JobFailure>),
    /// A job did not end in time.
    #[error("{class}.{method} on {target}: job {job} still running after {waited_secs} s")]
    JobTimeout {
        /// The class of the service.
        class: &'static str,
        /// The method.
        method: &'static str,
        /// What it was called for.
        target: String,
        /// The job's `InstanceID`.
        job: String,
        /// How long it was waited for.
        waited_secs: u64,
    },
    /// A virtual disk API call failed: a Win32 error.
    #[error("{action} {path}: Win32 error {code} ({}){}", win32_meaning(*code), colon(message))]
    VirtualDisk {
        /// The call.
        action: &'static str,
        /// The image.
        path: String,
        /// The Win32 error code.
        code: u32,
        /// The system's message.
        message: String,
    },
    /// A VM, checkpoint, reference point or image is not there.
    #[error("{what} not found: {detail}")]
    NotFound {
        /// Which kind of thing.
        kind: Missing,
        /// Which one.
        what: String,
        /// Where it was looked for.
        detail: String,
    },
    /// WMI answered something the backend does not understand.
    #[error("{action}: unexpected answer: {detail}")]
    Unexpected {
        /// What was being done.
        action: String,
        /// What was wrong.
        detail: String,
    },
}

/// A failed WMI job, as [`HostError::Job`] carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFailure {
    /// The class of the service.
    pub class: &'static str,
    /// The method.
    pub method: &'static str,
    /// What it was called for.
    pub target: String,
    /// The job's `InstanceID`.
    pub job: String,
    /// `JobState`.
    pub state: u16,
    /// `ErrorCode`.
    pub error_code: u16,
    /// `ErrorDescription`.
    pub description: String,
    /// `ErrorSummaryDescription`.
    pub summary: String,
}

impl fmt::Display for JobFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{} on {}: job {} ended in state {}: ErrorCode {} ({}): {}{}",
            self.class,
            self.method,
            self.target,
            self.job,
            self.state,
            self.error_code,
            return_meaning(u32::from(self.error_code)),
            self.description,
            summary_suffix(&self.summary, &self.description)
        )
    }
}

/// What [`HostError::NotFound`] did not find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// A VM.
    Vm,
    /// An image file.
    Disk,
    /// A checkpoint.
    Checkpoint,
    /// A reference point.
    ReferencePoint,
}

fn colon(message: &str) -> String {
    let m = message.trim();
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

fn summary_suffix(summary: &str, description: &str) -> String {
    let s = summary.trim();
    if s.is_empty() || s == description.trim() {
        String::new()
    } else {
        format!(" ({s})")
    }
}

impl HostError {
    /// The class of the failure.
    pub fn class(&self) -> ErrorClass {
        match self {
            HostError::Wmi { hresult, .. } => classify_hresult(*hresult),
            HostError::Method { code, .. } => classify_return(*code),
            HostError::Job(job) => classify_return(u32::from(job.error_code)),
            HostError::JobTimeout { .. } => ErrorClass::Busy,
            HostError::VirtualDisk { code, .. } => classify_win32(*code),
            HostError::NotFound { kind, .. } => match kind {
                Missing::Vm => ErrorClass::VmNotFound,
                Missing::Disk => ErrorClass::DiskNotFound,
                Missing::Checkpoint | Missing::ReferencePoint => ErrorClass::Gone,
            },
            HostError::Unexpected { .. } => ErrorClass::Invalid,
        }
    }
}

/// Win32 and HRESULT codes the backend tells apart (winerror.h, wbemcli.h).
pub mod codes {
    /// ERROR_FILE_NOT_FOUND.
    pub const ERROR_FILE_NOT_FOUND: u32 = 2;
    /// ERROR_PATH_NOT_FOUND.
    pub const ERROR_PATH_NOT_FOUND: u32 = 3;
    /// ERROR_ACCESS_DENIED.
    pub const ERROR_ACCESS_DENIED: u32 = 5;
    /// ERROR_NOT_ENOUGH_MEMORY.
    pub const ERROR_NOT_ENOUGH_MEMORY: u32 = 8;
    /// ERROR_OUTOFMEMORY.
    pub const ERROR_OUTOFMEMORY: u32 = 14;
    /// ERROR_SHARING_VIOLATION.
    pub const ERROR_SHARING_VIOLATION: u32 = 32;
    /// ERROR_LOCK_VIOLATION.
    pub const ERROR_LOCK_VIOLATION: u32 = 33;
    /// ERROR_HANDLE_DISK_FULL.
    pub const ERROR_HANDLE_DISK_FULL: u32 = 39;
    /// ERROR_NOT_SUPPORTED.
    pub const ERROR_NOT_SUPPORTED: u32 = 50;
    /// ERROR_INVALID_PARAMETER.
    pub const ERROR_INVALID_PARAMETER: u32 = 87;
    /// ERROR_DISK_FULL.
    pub const ERROR_DISK_FULL: u32 = 112;
    /// ERROR_BUSY.
    pub const ERROR_BUSY: u32 = 170;
    /// ERROR_NO_SYSTEM_RESOURCES.
    pub const ERROR_NO_SYSTEM_RESOURCES: u32 = 1450;
    /// ERROR_PRIVILEGE_NOT_HELD (attaching needs SeManageVolumePrivilege).
    pub const ERROR_PRIVILEGE_NOT_HELD: u32 = 1314;
    /// ERROR_VHD_DRIVE_FOOTER_MISSING: the first of the corrupt-image codes.
    pub const ERROR_VHD_DRIVE_FOOTER_MISSING: u32 = 0xC03A_0001;
    /// ERROR_VHD_FORMAT_UNKNOWN.
    pub const ERROR_VHD_FORMAT_UNKNOWN: u32 = 0xC03A_0004;
    /// ERROR_VHD_PARENT_VHD_NOT_FOUND.
    pub const ERROR_VHD_PARENT_VHD_NOT_FOUND: u32 = 0xC03A_000D;
    /// ERROR_VHD_CHILD_PARENT_ID_MISMATCH.
    pub const ERROR_VHD_CHILD_PARENT_ID_MISMATCH: u32 = 0xC03A_000E;
    /// ERROR_VHD_CHILD_PARENT_TIMESTAMP_MISMATCH.
    pub const ERROR_VHD_CHILD_PARENT_TIMESTAMP_MISMATCH: u32 = 0xC03A_000F;
    /// ERROR_VHD_PARENT_VHD_ACCESS_DENIED.
    pub const ERROR_VHD_PARENT_VHD_ACCESS_DENIED: u32 = 0xC03A_0016;
    /// ERROR_VHD_CHILD_PARENT_SIZE_MISMATCH.
    pub const ERROR_VHD_CHILD_PARENT_SIZE_MISMATCH: u32 = 0xC03A_0017;
    /// ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED.
    pub const ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED: u32 = 0xC03A_0018;
    /// ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT.
    pub const ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT: u32 = 0xC03A_0019;
    /// ERROR_VHD_INVALID_CHANGE_TRACKING_ID.
    pub const ERROR_VHD_INVALID_CHANGE_TRACKING_ID: u32 = 0xC03A_0029;
    /// ERROR_VHD_CHANGE_TRACKING_DISABLED.
    pub const ERROR_VHD_CHANGE_TRACKING_DISABLED: u32 = 0xC03A_002A;
    /// ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION.
    pub const ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION: u32 = 0xC03A_0030;

    /// E_ACCESSDENIED.
    pub const E_ACCESSDENIED: u32 = 0x8007_0005;
    /// E_OUTOFMEMORY.
    pub const E_OUTOFMEMORY: u32 = 0x8007_000E;
    /// RPC_E_DISCONNECTED.
    pub const RPC_E_DISCONNECTED: u32 = 0x8001_0108;
    /// RPC_S_SERVER_UNAVAILABLE as an HRESULT.
    pub const RPC_S_SERVER_UNAVAILABLE: u32 = 0x8007_06BA;
    /// WBEM_E_FAILED.
    pub const WBEM_E_FAILED: u32 = 0x8004_1001;
    /// WBEM_E_NOT_FOUND.
    pub const WBEM_E_NOT_FOUND: u32 = 0x8004_1002;
    /// WBEM_E_ACCESS_DENIED.
    pub const WBEM_E_ACCESS_DENIED: u32 = 0x8004_1003;
    /// WBEM_E_PROVIDER_FAILURE.
    pub const WBEM_E_PROVIDER_FAILURE: u32 = 0x8004_1004;
    /// WBEM_E_OUT_OF_MEMORY.
    pub const WBEM_E_OUT_OF_MEMORY: u32 = 0x8004_1006;
    /// WBEM_E_INVALID_PARAMETER.
    pub const WBEM_E_INVALID_PARAMETER: u32 = 0x8004_1008;
    /// WBEM_E_NOT_SUPPORTED.
    pub const WBEM_E_NOT_SUPPORTED: u32 = 0x8004_100C;
    /// WBEM_E_INVALID_NAMESPACE: root\virtualization\v2 is missing (no Hyper-V role).
    pub const WBEM_E_INVALID_NAMESPACE: u32 = 0x8004_100E;
    /// WBEM_E_INVALID_CLASS: a class is missing (a host older than Windows Server 2016).
    pub const WBEM_E_INVALID_CLASS: u32 = 0x8004_1010;
    /// WBEM_E_PROVIDER_LOAD_FAILURE.
    pub const WBEM_E_PROVIDER_LOAD_FAILURE: u32 = 0x8004_1013;
    /// WBEM_E_TRANSPORT_FAILURE.
    pub const WBEM_E_TRANSPORT_FAILURE: u32 = 0x8004_1015;
    /// WBEM_E_INVALID_QUERY.
    pub const WBEM_E_INVALID_QUERY: u32 = 0x8004_1017;
    /// WBEM_E_CALL_CANCELLED.
    pub const WBEM_E_CALL_CANCELLED: u32 = 0x8004_1032;
    /// WBEM_E_SHUTTING_DOWN.
    pub const WBEM_E_SHUTTING_DOWN: u32 = 0x8004_1033;
    /// WBEM_E_INVALID_METHOD.
    pub const WBEM_E_INVALID_METHOD: u32 = 0x8004_1055;
    /// WBEM_E_QUOTA_VIOLATION.
    pub const WBEM_E_QUOTA_VIOLATION: u32 = 0x8004_106C;
    /// WBEM_E_TIMED_OUT.
    pub const WBEM_E_TIMED_OUT: u32 = 0x8004_3001;

    /// The method's job started (`ReturnValue` 4096).
    pub const JOB_STARTED: u32 = 4096;
    /// JobState: completed.
    pub const JOB_COMPLETED: u16 = 7;
    /// `Msvm_ComputerSystem.EnabledState`: off.
    pub const VM_OFF: u16 = 3;
    /// `EnabledState` and `RequestStateChange`: paused (`Quiesce`).
    pub const VM_PAUSED: u16 = 32768 + 8;
}

use codes::*;

/// The class of a Win32 error code (virtual disk API, file access).
pub fn classify_win32(code: u32) -> ErrorClass {
    match code {
        ERROR_FILE_NOT_FOUND | ERROR_PATH_NOT_FOUND => ErrorClass::DiskNotFound,
        ERROR_ACCESS_DENIED | ERROR_PRIVILEGE_NOT_HELD | ERROR_VHD_PARENT_VHD_ACCESS_DENIED => {
            ErrorClass::AccessDenied
        }
        ERROR_NOT_ENOUGH_MEMORY
        | ERROR_OUTOFMEMORY
        | ERROR_NO_SYSTEM_RESOURCES
        | ERROR_DISK_FULL
        | ERROR_HANDLE_DISK_FULL => ErrorClass::OutOfResources,
        ERROR_SHARING_VIOLATION | ERROR_LOCK_VIOLATION | ERROR_BUSY => ErrorClass::Busy,
        ERROR_NOT_SUPPORTED => ErrorClass::Unsupported,
        ERROR_INVALID_PARAMETER => ErrorClass::Invalid,
        ERROR_VHD_INVALID_CHANGE_TRACKING_ID
        | ERROR_VHD_CHANGE_TRACKING_DISABLED
        | ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION => ErrorClass::TrackingLost,
        ERROR_VHD_PARENT_VHD_NOT_FOUND
        | ERROR_VHD_CHILD_PARENT_ID_MISMATCH
        | ERROR_VHD_CHILD_PARENT_TIMESTAMP_MISMATCH
        | ERROR_VHD_CHILD_PARENT_SIZE_MISMATCH
        | ERROR_VHD_DIFFERENCING_CHAIN_CYCLE_DETECTED
        | ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT => ErrorClass::BrokenChain,
        // NB: the other VHD codes up to 0xC03A0019 say the image is corrupt (footer, header,
        // BAT, metadata, bitmap): a broken chain as far as replication is concerned.
        ERROR_VHD_DRIVE_FOOTER_MISSING..=ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT => {
            ErrorClass::BrokenChain
        }
        0xC03A_0000..=0xC03A_FFFF => ErrorClass::Invalid,
        _ => ErrorClass::Failed,
    }
}

/// The class of an HRESULT from WMI or COM.
pub fn classify_hresult(hresult: u32) -> ErrorClass {
    match hresult {
        WBEM_E_NOT_FOUND => ErrorClass::Gone,
        WBEM_E_ACCESS_DENIED | E_ACCESSDENIED => ErrorClass::AccessDenied,
        WBEM_E_INVALID_NAMESPACE
        | WBEM_E_INVALID_CLASS
        | WBEM_E_INVALID_METHOD
        | WBEM_E_NOT_SUPPORTED => ErrorClass::Unsupported,
        WBEM_E_INVALID_PARAMETER | WBEM_E_INVALID_QUERY => ErrorClass::Invalid,
        WBEM_E_OUT_OF_MEMORY | WBEM_E_QUOTA_VIOLATION | E_OUTOFMEMORY => ErrorClass::OutOfResources,
        WBEM_E_PROVIDER_FAILURE
        | WBEM_E_PROVIDER_LOAD_FAILURE
        | WBEM_E_TRANSPORT_FAILURE
        | WBEM_E_CALL_CANCELLED
        | WBEM_E_SHUTTING_DOWN
        | WBEM_E_TIMED_OUT
        | RPC_E_DISCONNECTED
        | RPC_S_SERVER_UNAVAILABLE => ErrorClass::Busy,
        // NB: a Win32 error wrapped as an HRESULT (FACILITY_WIN32).
        h if h & 0xFFFF_0000 == 0x8007_0000 => classify_win32(h & 0xFFFF),
        _ => ErrorClass::Failed,
    }
}

/// The class of a method's `ReturnValue`, or of a job's `ErrorCode` (the same values).
pub fn classify_return(code: u32) -> ErrorClass {
    match code {
        32769 => ErrorClass::AccessDenied,
        1 | 32770 => ErrorClass::Unsupported,
        4 | 6 | 32773 | 32776 => ErrorClass::Invalid,
        // Timeout, in use, invalid state (another operation under way), not available.
        3 | 5 | 32772 | 32774 | 32775 | 32777 | 32780 => ErrorClass::Busy,
        32778 => ErrorClass::OutOfResources,
        32779 => ErrorClass::DiskNotFound,
        _ => ErrorClass::Failed,
    }
}

/// What a `ReturnValue` or job `ErrorCode` means (DMTF and Hyper-V values).
pub fn return_meaning(code: u32) -> &'static str {
    match code {
        0 => "completed with no error",
        1 => "not supported",
        2 => "failed",
        3 => "timeout",
        4 => "invalid parameter",
        5 => "invalid state",
        6 => "invalid type",
        4096 => "job started",
        32768 => "failed",
        32769 => "access denied",
        32770 => "not supported",
        32771 => "status is unknown",
        32772 => "timeout",
        32773 => "invalid parameter",
        32774 => "system is in use",
        32775 => "invalid state for this operation",
        32776 => "incorrect data type",
        32777 => "system is not available",
        32778 => "out of memory",
        32779 => "file not found",
        32780 => "the system is not ready",
        _ => "unknown code",
    }
}

/// What an HRESULT means, for the ones the backend tells apart.
pub fn hresult_meaning(hresult: u32) -> &'static str {
    match hresult {
        WBEM_E_FAILED => "WBEM_E_FAILED",
        WBEM_E_NOT_FOUND => "WBEM_E_NOT_FOUND",
        WBEM_E_ACCESS_DENIED => {
            "WBEM_E_ACCESS_DENIED: the account may not use root\\virtualization\\v2"
        }
        WBEM_E_INVALID_NAMESPACE => {
            "WBEM_E_INVALID_NAMESPACE: no root\\virtualization\\v2, is the Hyper-V role installed?"
        }
        WBEM_E_INVALID_CLASS => {
            "WBEM_E_INVALID_CLASS: the class is missing, the host needs Windows Server 2016 or later"
        }
        WBEM_E_INVALID_METHOD => "WBEM_E_INVALID_METHOD",
        WBEM_E_OUT_OF_MEMORY => "WBEM_E_OUT_OF_MEMORY",
        WBEM_E_PROVIDER_FAILURE => "WBEM_E_PROVIDER_FAILURE",
        WBEM_E_SHUTTING_DOWN => "WBEM_E_SHUTTING_DOWN",
        WBEM_E_TIMED_OUT => "WBEM_E_TIMED_OUT",
        E_ACCESSDENIED => "E_ACCESSDENIED",
        RPC_E_DISCONNECTED | RPC_S_SERVER_UNAVAILABLE => "the WMI service is not reachable",
        _ => "HRESULT",
    }
}

/// What a Win32 error means, for the ones the backend tells apart.
pub fn win32_meaning(code: u32) -> &'static str {
    match code {
        ERROR_FILE_NOT_FOUND => "ERROR_FILE_NOT_FOUND",
        ERROR_PATH_NOT_FOUND => "ERROR_PATH_NOT_FOUND",
        ERROR_ACCESS_DENIED => "ERROR_ACCESS_DENIED",
        ERROR_SHARING_VIOLATION => "ERROR_SHARING_VIOLATION",
        ERROR_PRIVILEGE_NOT_HELD => {
            "ERROR_PRIVILEGE_NOT_HELD: attaching needs SeManageVolumePrivilege (Administrators)"
        }
        ERROR_VHD_INVALID_CHANGE_TRACKING_ID => "ERROR_VHD_INVALID_CHANGE_TRACKING_ID",
        ERROR_VHD_CHANGE_TRACKING_DISABLED => "ERROR_VHD_CHANGE_TRACKING_DISABLED",
        ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION => {
            "ERROR_VHD_MISSING_CHANGE_TRACKING_INFORMATION"
        }
        ERROR_VHD_PARENT_VHD_NOT_FOUND => "ERROR_VHD_PARENT_VHD_NOT_FOUND",
        ERROR_VHD_DRIVE_FOOTER_MISSING..=ERROR_VHD_DIFFERENCING_CHAIN_ERROR_IN_PARENT => {
            "a virtual disk is corrupt or its chain is broken"
        }
        _ => "Win32 error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_fall_into_asr_classes() {
        let vd = |code| HostError::VirtualDisk {
            action: "QueryChangesVirtualDisk",
            path: "C:\\vm\\d.vhdx".into(),
            code,
            message: String::new(),
        };
        assert_eq!(vd(ERROR_FILE_NOT_FOUND).class(), ErrorClass::DiskNotFound);
        assert_eq!(vd(ERROR_ACCESS_DENIED).class(), ErrorClass::AccessDenied);
        assert_eq!(vd(ERROR_SHARING_VIOLATION).class(), ErrorClass::Busy);
        assert_eq!(vd(ERROR_DISK_FULL).class(), ErrorClass::OutOfResources);
        assert_eq!(
            vd(ERROR_VHD_PARENT_VHD_NOT_FOUND).class(),
            ErrorClass::BrokenChain
        );
        assert_eq!(vd(0xC03A_000A).class(), ErrorClass::BrokenChain); // BAT corrupt
        assert_eq!(
            vd(ERROR_VHD_INVALID_CHANGE_TRACKING_ID).class(),
            ErrorClass::TrackingLost
        );
        assert_eq!(
            vd(ERROR_VHD_CHANGE_TRACKING_DISABLED).class(),
            ErrorClass::TrackingLost
        );
        let wmi = |hresult| HostError::Wmi {
            action: "ExecQuery".into(),
            hresult,
            message: String::new(),
        };
        assert_eq!(wmi(WBEM_E_ACCESS_DENIED).class(), ErrorClass::AccessDenied);
        assert_eq!(
            wmi(WBEM_E_INVALID_NAMESPACE).class(),
            ErrorClass::Unsupported
        );
        assert_eq!(wmi(WBEM_E_SHUTTING_DOWN).class(), ErrorClass::Busy);
        assert_eq!(wmi(0x8007_0020).class(), ErrorClass::Busy); // sharing violation
        assert_eq!(
            wmi(WBEM_E_OUT_OF_MEMORY).class(),
            ErrorClass::OutOfResources
        );
        let job = |error_code| {
            HostError::Job(Box::new(JobFailure {
                class: "Msvm_VirtualSystemSnapshotService",
                method: "CreateSnapshot",
                target: "VM web1".into(),
                job: "J".into(),
                state: 10,
                error_code,
                description: "d".into(),
                summary: String::new(),
            }))
        };
        assert_eq!(job(32769).class(), ErrorClass::AccessDenied);
        assert_eq!(job(32775).class(), ErrorClass::Busy);
        assert_eq!(job(32778).class(), ErrorClass::OutOfResources);
        assert_eq!(job(32768).class(), ErrorClass::Failed);
        assert!(job(32768).class().is_recoverable());
        assert!(!job(32769).class().is_recoverable());
    }

    #[test]
    fn messages_name_the_call_the_code_and_its_meaning() {
        let e = HostError::Job(Box::new(JobFailure {
            class: "Msvm_VirtualSystemSnapshotService",
            method: "CreateSnapshot",
            target: "VM web1".into(),
            job: "5D1F".into(),
            state: 10,
            error_code: 32768,
            description: "Could not initiate a checkpoint operation".into(),
            summary: "Checkpoint failed".into(),
        }));
        assert_eq!(
            e.to_string(),
            "Msvm_VirtualSystemSnapshotService.CreateSnapshot on VM web1: job 5D1F ended in state \
             10: ErrorCode 32768 (failed): Could not initiate a checkpoint operation (Checkpoint failed)"
        );
        let e = HostError::VirtualDisk {
            action: "QueryChangesVirtualDisk",
            path: "D:\\vm\\d.vhdx".into(),
            code: ERROR_VHD_INVALID_CHANGE_TRACKING_ID,
            message: "The specified change tracking identifier is not valid.".into(),
        };
        assert_eq!(
            e.to_string(),
            "QueryChangesVirtualDisk D:\\vm\\d.vhdx: Win32 error 3225026601 \
             (ERROR_VHD_INVALID_CHANGE_TRACKING_ID): The specified change tracking identifier is not valid."
        );
    }
}
