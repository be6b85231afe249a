//! [`HyperVHost`] over WMI's `root\virtualization\v2` and the virtual disk API: which classes,
//! methods and associations, how a job is waited for, how answers are read. Plain Rust over
//! two small traits, [`Wmi`] and [`VirtualDisks`], which `sys.rs` implements on Windows and
//! the tests implement with recorded answers.
//!
//! ```text
//!  create_recovery_checkpoint  Msvm_VirtualSystemSnapshotService.CreateSnapshot(
//!                                AffectedSystem, SnapshotSettings = <Msvm_VirtualSystemSnapshot-
//!                                SettingData ConsistencyLevel=1|2 IgnoreNonSnapshottableDisks>,
//!                                SnapshotType = 32768 (recovery)) ─> job ─> the snapshot
//!  convert_to_reference_point  Msvm_VirtualSystemSnapshotService.ConvertToReferencePoint(
//!                                AffectedSnapshot) ─> job ─> Msvm_VirtualSystemReferencePoint
//!  destroy_*                   DestroySnapshot(AffectedSnapshot) /
//!                                Msvm_VirtualSystemReferencePointService.DestroyReferencePoint(
//!                                AffectedReferencePoint)
//!  jobs                        ReturnValue 0: done; 4096: poll Msvm_ConcreteJob until JobState
//!                                is final; 7 is success, anything else an error with ErrorCode,
//!                                ErrorDescription and ErrorSummaryDescription
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::time::{Duration, Instant};

use super::host::{
    Checkpoint, CheckpointRef, Consistency, DiskReader, HostError, HyperVHost, JobFailure, Missing,
    RctDisk, ReferencePoint, ReferencePointRef, VirtualDiskInfo, VmRef, codes,
};

/// The namespace of Hyper-V's WMI provider.
pub const NAMESPACE: &str = r"root\virtualization\v2";
/// The snapshot service class.
pub const SNAPSHOT_SERVICE: &str = "Msvm_VirtualSystemSnapshotService";
/// The reference point service class.
pub const REFERENCE_POINT_SERVICE: &str = "Msvm_VirtualSystemReferencePointService";
/// `CreateSnapshot`'s `SnapshotType` of a recovery checkpoint (vendor specific).
pub const RECOVERY_SNAPSHOT_TYPE: i32 = 32768;
/// `VirtualSystemType` of a recovery checkpoint.
pub const RECOVERY_SNAPSHOT_SYSTEM_TYPE: &str = "Microsoft:Hyper-V:Snapshot:Recovery";
/// `ResourceSubType` of a virtual hard disk's storage allocation.
pub const VIRTUAL_HARD_DISK_SUBTYPE: &str = "Microsoft:Hyper-V:Virtual Hard Disk";
/// `ReferencePointType` of an RCT-based reference point.
pub const RCT_REFERENCE_POINT_TYPE: u16 = 2;
/// Job states that are not final (New, Starting, Running, Suspended, Shutting Down).
const RUNNING_JOB_STATES: [u16; 5] = [2, 3, 4, 5, 6];

/// A property value as WMI hands it over (a VARIANT): WMI passes uint16 and uint32 as
/// 32-bit integers, uint64 and datetimes as strings, references as object paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WmiValue {
    /// NULL or empty.
    Null,
    /// VT_BOOL.
    Bool(bool),
    /// VT_UI1 (uint8).
    U8(u8),
    /// VT_I4 (sint32, uint16, uint32).
    I32(i32),
    /// VT_BSTR (string, uint64, datetime, reference).
    Str(String),
    /// VT_ARRAY | VT_BSTR.
    StrArray(Vec<String>),
    /// VT_ARRAY | VT_I4 (uint16[]).
    I32Array(Vec<i32>),
}

/// A WMI object (an instance, or a method's out-parameters) as plain values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WmiObject {
    /// `__CLASS`.
    pub class: String,
    /// `__PATH` (empty for out-parameters).
    pub path: String,
    /// The other properties.
    pub properties: BTreeMap<String, WmiValue>,
}

impl WmiObject {
    /// An object of `class` at `path` (a fixture builder too).
    pub fn new(class: &str, path: &str) -> WmiObject {
        WmiObject {
            class: class.to_owned(),
            path: path.to_owned(),
            properties: BTreeMap::new(),
        }
    }

    /// With a property set.
    pub fn with(mut self, name: &str, value: WmiValue) -> WmiObject {
        self.properties.insert(name.to_owned(), value);
        self
    }

    /// A string property.
    pub fn str(&self, name: &str) -> Option<&str> {
        match self.properties.get(name)? {
            WmiValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// An integer property (from any integer form, or a decimal string).
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.properties.get(name)? {
            WmiValue::U8(v) => Some(i64::from(*v)),
            WmiValue::I32(v) => Some(i64::from(*v)),
            WmiValue::Str(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// A uint16 property.
    pub fn u16(&self, name: &str) -> Option<u16> {
        self.int(name).and_then(|v| u16::try_from(v).ok())
    }

    /// A uint32 property (WMI passes them as sint32 bits).
    pub fn u32(&self, name: &str) -> Option<u32> {
        self.int(name).map(|v| v as u32)
    }

    /// A string array property (a single string counts as one element; NULL as none).
    pub fn strs(&self, name: &str) -> Vec<String> {
        match self.properties.get(name) {
            Some(WmiValue::StrArray(v)) => v.clone(),
            Some(WmiValue::Str(s)) => vec![s.clone()],
            _ => Vec::new(),
        }
    }
}

/// A failed WMI call: its HRESULT and the system's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WmiCallError {
    /// The HRESULT.
    pub hresult: u32,
    /// The message.
    pub message: String,
}

/// WMI in `root\virtualization\v2`, as plain values (implemented by `sys.rs` on Windows).
pub trait Wmi: Send + Sync + fmt::Debug {
    /// Run a WQL query (`SELECT`, `ASSOCIATORS OF`).
    fn query(&self, wql: &str) -> Result<Vec<WmiObject>, WmiCallError>;
    /// Get an object by path.
    fn get(&self, path: &str) -> Result<WmiObject, WmiCallError>;
    /// Call `method` of class `class` on the object at `path`; the out-parameters.
    fn call(
        &self,
        path: &str,
        class: &str,
        method: &str,
        args: &[(&str, WmiValue)],
    ) -> Result<WmiObject, WmiCallError>;
    /// An instance of `class` with `properties`, as an embedded-instance string (CIM-XML), the
    /// form methods take settings in.
    fn embedded_instance(
        &self,
        class: &str,
        properties: &[(&str, WmiValue)],
    ) -> Result<String, WmiCallError>;
}

/// A failed virtual disk API call: its Win32 error and the system's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Win32CallError {
    /// The Win32 error code.
    pub code: u32,
    /// The message.
    pub message: String,
}

/// One answer of `QueryChangesVirtualDisk`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangesPage {
    /// The changed ranges found.
    pub ranges: Vec<Range<u64>>,
    /// How much of the asked range the call covered (`ProcessedLength`).
    pub processed_bytes: u64,
}

/// The virtual disk API (virtdisk.h) and file reads (implemented by `sys.rs` on Windows).
pub trait VirtualDisks: Send + Sync + fmt::Debug {
    /// `GetVirtualDiskInformation` of an image opened for information only.
    fn info(&self, path: &str) -> Result<VirtualDiskInfo, Win32CallError>;
    /// One `QueryChangesVirtualDisk` call over `offset..offset + len`.
    fn query_changes_page(
        &self,
        path: &str,
        rct_id: &str,
        offset: u64,
        len: u64,
    ) -> Result<ChangesPage, Win32CallError>;
    /// Raw bytes of an image file, shared for reading.
    fn read_file_at(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, Win32CallError>;
    /// `AttachVirtualDisk` read-only without a drive letter, for reading through the disk.
    fn open_for_read(&self, path: &str) -> Result<Box<dyn DiskReader>, Win32CallError>;
}

/// Settings of a [`WmiHost`].
#[derive(Clone, Debug)]
pub struct WmiHostOptions {
    /// How often a running job is polled.
    pub job_poll: Duration,
    /// How long a job may run (an application-consistent checkpoint waits for VSS in the
    /// guest; a merge may copy gigabytes).
    pub job_timeout: Duration,
}

impl Default for WmiHostOptions {
    fn default() -> Self {
        WmiHostOptions {
            job_poll: Duration::from_millis(500),
            job_timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// [`HyperVHost`] over [`Wmi`] and [`VirtualDisks`].
#[derive(Debug)]
pub struct WmiHost<W, D> {
    wmi: W,
    disks: D,
    options: WmiHostOptions,
}

/// Quote a string for a WQL literal.
pub fn wql_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Whether `s` looks like a GUID (a VM's `Name`; the host's own `Msvm_ComputerSystem` is
/// named after the machine).
fn is_guid(s: &str) -> bool {
    let s = s.trim_matches(|c| c == '{' || c == '}');
    uuid::Uuid::parse_str(s).is_ok()
}

/// A CIM datetime (`yyyymmddHHMMSS.mmmmmmsUUU`, UUU the offset in minutes) in milliseconds
/// since the Unix epoch.
pub fn parse_cim_datetime(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 25 || b[14] != b'.' || !(b[21] == b'+' || b[21] == b'-') {
        return None;
    }
    let num = |r: Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (year, month, day) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hour, minute, second) = (num(8..10)?, num(10..12)?, num(12..14)?);
    let micros = num(15..21)?;
    let offset_minutes = num(22..25)? * if b[21] == b'-' { -1 } else { 1 };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // Days since 1970-01-01 (civil-from-days inverse, proleptic Gregorian).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    let ms = secs * 1000 + micros / 1000;
    u64::try_from(ms).ok()
}

/// Read a reference point from its object.
pub fn parse_reference_point(o: &WmiObject) -> Result<ReferencePoint, String> {
    let instance_id = o
        .str("InstanceID")
        .ok_or("Msvm_VirtualSystemReferencePoint without InstanceID")?
        .to_owned();
    let ids = o.strs("VirtualDiskIdentifiers");
    let rct = o.strs("ResilientChangeTrackingIdentifiers");
    if ids.len() != rct.len() {
        return Err(format!(
            "reference point {instance_id}: {} VirtualDiskIdentifiers but {} ResilientChangeTrackingIdentifiers",
            ids.len(),
            rct.len()
        ));
    }
    Ok(ReferencePoint {
        reference_point: ReferencePointRef {
            instance_id,
            path: o.path.clone(),
        },
        rct_based: o.u16("ReferencePointType") == Some(RCT_REFERENCE_POINT_TYPE),
        consistency: o.u16("ConsistencyLevel").and_then(Consistency::from_level),
        disks: ids
            .into_iter()
            .zip(rct)
            .map(|(virtual_disk_id, rct_id)| RctDisk {
                virtual_disk_id,
                rct_id,
            })
            .collect(),
    })
}

/// Read a checkpoint from its `Msvm_VirtualSystemSettingData`.
pub fn parse_checkpoint(o: &WmiObject) -> Result<Checkpoint, String> {
    Ok(Checkpoint {
        checkpoint: CheckpointRef {
            instance_id: o
                .str("InstanceID")
                .ok_or("Msvm_VirtualSystemSettingData without InstanceID")?
                .to_owned(),
            path: o.path.clone(),
        },
        name: o.str("ElementName").unwrap_or_default().to_owned(),
        recovery: o.str("VirtualSystemType") == Some(RECOVERY_SNAPSHOT_SYSTEM_TYPE),
        created_unix_ms: o.str("CreationTime").and_then(parse_cim_datetime),
    })
}

/// The image paths of a settings object's virtual hard disks, from its
/// `Msvm_StorageAllocationSettingData` (DVD images and empty drives left out).
pub fn parse_disk_paths(allocations: &[WmiObject]) -> Vec<String> {
    allocations
        .iter()
        .filter(|a| a.str("ResourceSubType") == Some(VIRTUAL_HARD_DISK_SUBTYPE))
        .filter_map(|a| a.strs("HostResource").into_iter().next())
        .filter(|p| !p.trim().is_empty())
        .collect()
}

impl<W: Wmi, D: VirtualDisks> WmiHost<W, D> {
    /// A host over `wmi` and `disks`.
    pub fn new(wmi: W, disks: D, options: WmiHostOptions) -> Self {
        WmiHost {
            wmi,
            disks,
            options,
        }
    }

    fn query(&self, action: &str, wql: &str) -> Result<Vec<WmiObject>, HostError> {
        self.wmi.query(wql).map_err(|e| HostError::Wmi {
            action: format!("{action} ({wql})"),
            hresult: e.hresult,
            message: e.message,
        })
    }

    /// The one instance of a service class.
    fn service(&self, class: &'static str) -> Result<String, HostError> {
        let found = self.query(&format!("find {class}"), &format!("SELECT * FROM {class}"))?;
        found
            .into_iter()
            .map(|o| o.path)
            .find(|p| !p.is_empty())
            .ok_or_else(|| HostError::Unexpected {
                action: format!("find {class}"),
                detail: format!("no instance in {NAMESPACE}: is the Hyper-V role installed?"),
            })
    }

    /// Call a service method and wait for its job; the out-parameters, and the job's path
    /// when it ran one.
    fn call_and_wait(
        &self,
        class: &'static str,
        method: &'static str,
        target: &str,
        args: &[(&str, WmiValue)],
    ) -> Result<(WmiObject, Option<String>), HostError> {
        let service = self.service(class)?;
        self.call_on_and_wait(&service, class, method, target, args)
    }

    /// Call a method of the object at `path` and wait for its job (as [`Self::call_and_wait`]).
    fn call_on_and_wait(
        &self,
        path: &str,
        class: &'static str,
        method: &'static str,
        target: &str,
        args: &[(&str, WmiValue)],
    ) -> Result<(WmiObject, Option<String>), HostError> {
        let out = self
            .wmi
            .call(path, class, method, args)
            .map_err(|e| HostError::Wmi {
                action: format!("{class}.{method} on {target}"),
                hresult: e.hresult,
                message: e.message,
            })?;
        let code = out
            .u32("ReturnValue")
            .ok_or_else(|| HostError::Unexpected {
                action: format!("{class}.{method} on {target}"),
                detail: "no ReturnValue".to_owned(),
            })?;
        match code {
            0 => Ok((out, None)),
            codes::JOB_STARTED => {
                let job = out
                    .str("Job")
                    .filter(|j| !j.is_empty())
                    .ok_or_else(|| HostError::Unexpected {
                        action: format!("{class}.{method} on {target}"),
                        detail: "a job started but no Job reference came back".to_owned(),
                    })?
                    .to_owned();
                self.wait_job(class, method, target, &job)?;
                Ok((out, Some(job)))
            }
            code => Err(HostError::Method {
                class,
                method,
                target: target.to_owned(),
                code,
            }),
        }
    }

    /// Poll a job until it ends; an error unless it completed.
    fn wait_job(
        &self,
        class: &'static str,
        method: &'static str,
        target: &str,
        job_path: &str,
    ) -> Result<(), HostError> {
        let started = Instant::now();
        loop {
            let job = self.wmi.get(job_path).map_err(|e| HostError::Wmi {
                action: format!("poll the job of {class}.{method} on {target}"),
                hresult: e.hresult,
                message: e.message,
            })?;
            let state = job.u16("JobState").unwrap_or(0);
            let name = job
                .str("InstanceID")
                .map_or_else(|| job_path.to_owned(), str::to_owned);
            if state == codes::JOB_COMPLETED {
                return Ok(());
            }
            if !RUNNING_JOB_STATES.contains(&state) {
                return Err(HostError::Job(Box::new(JobFailure {
                    class,
                    method,
                    target: target.to_owned(),
                    job: name,
                    state,
                    error_code: job.u16("ErrorCode").unwrap_or(0),
                    description: job.str("ErrorDescription").unwrap_or_default().to_owned(),
                    summary: job
                        .str("ErrorSummaryDescription")
                        .unwrap_or_default()
                        .to_owned(),
                })));
            }
            if started.elapsed() >= self.options.job_timeout {
                return Err(HostError::JobTimeout {
                    class,
                    method,
                    target: target.to_owned(),
                    job: name,
                    waited_secs: started.elapsed().as_secs(),
                });
            }
            std::thread::sleep(self.options.job_poll);
        }
    }

    /// The object a job created (`CIM_AffectedJobElement`), of `class`.
    fn job_result(
        &self,
        action: &str,
        job: &str,
        class: &str,
    ) -> Result<Option<WmiObject>, HostError> {
        Ok(self
            .query(
                action,
                &format!("ASSOCIATORS OF {{{job}}} WHERE ResultClass = {class}"),
            )?
            .into_iter()
            .next())
    }

    fn disk_error(action: &'static str, path: &str, e: Win32CallError) -> HostError {
        match e.code {
            codes::ERROR_FILE_NOT_FOUND | codes::ERROR_PATH_NOT_FOUND => HostError::NotFound {
                kind: Missing::Disk,
                what: format!("image {path}"),
                detail: format!("{action}: {}", e.message.trim()),
            },
            code => HostError::VirtualDisk {
                action,
                path: path.to_owned(),
                code,
                message: e.message,
            },
        }
    }

    fn allocations(&self, action: &str, settings_path: &str) -> Result<Vec<String>, HostError> {
        Ok(parse_disk_paths(&self.query(
            action,
            &format!(
                "ASSOCIATORS OF {{{settings_path}}} WHERE ResultClass = Msvm_StorageAllocationSettingData"
            ),
        )?))
    }
}

impl<W: Wmi, D: VirtualDisks> HyperVHost for WmiHost<W, D> {
    fn find_vm(&self, name: &str) -> Result<VmRef, HostError> {
        let by = if is_guid(name) { "Name" } else { "ElementName" };
        let found = self.query(
            &format!("find VM {name}"),
            &format!(
                "SELECT * FROM Msvm_ComputerSystem WHERE {by} = {}",
                wql_string(name)
            ),
        )?;
        let vms: Vec<&WmiObject> = found
            .iter()
            .filter(|o| o.str("Name").is_some_and(is_guid))
            .collect();
        match vms.as_slice() {
            [] => Err(HostError::NotFound {
                kind: Missing::Vm,
                what: format!("VM {name:?}"),
                detail: format!("no Msvm_ComputerSystem with {by} {name:?} in {NAMESPACE}"),
            }),
            [vm] => Ok(VmRef {
                name: vm.str("ElementName").unwrap_or(name).to_owned(),
                id: vm.str("Name").unwrap_or_default().to_owned(),
                path: vm.path.clone(),
            }),
            many => Err(HostError::Unexpected {
                action: format!("find VM {name}"),
                detail: format!(
                    "{} VMs are named {name:?} ({}): name the VM by its id",
                    many.len(),
                    many.iter()
                        .filter_map(|o| o.str("Name"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }

    fn vm_disks(&self, vm: &VmRef) -> Result<Vec<String>, HostError> {
        let action = format!("list the disks of VM {}", vm.name);
        let settings = self.query(
            &action,
            &format!(
                "ASSOCIATORS OF {{{}}} WHERE AssocClass = Msvm_SettingsDefineState ResultClass = Msvm_VirtualSystemSettingData",
                vm.path
            ),
        )?;
        let settings = settings.first().ok_or_else(|| HostError::NotFound {
            kind: Missing::Vm,
            what: format!("VM {}", vm.name),
            detail: "it has no current settings (Msvm_SettingsDefineState)".to_owned(),
        })?;
        self.allocations(&action, &settings.path)
    }

    fn create_recovery_checkpoint(
        &self,
        vm: &VmRef,
        consistency: Consistency,
    ) -> Result<CheckpointRef, HostError> {
        let class = "Msvm_VirtualSystemSnapshotSettingData";
        let settings = self
            .wmi
            .embedded_instance(
                class,
                &[
                    ("ConsistencyLevel", WmiValue::U8(consistency.level())),
                    ("IgnoreNonSnapshottableDisks", WmiValue::Bool(true)),
                ],
            )
            .map_err(|e| HostError::Wmi {
                action: format!("build {class}"),
                hresult: e.hresult,
                message: e.message,
            })?;
        let target = format!("VM {}", vm.name);
        let (out, job) = self.call_and_wait(
            SNAPSHOT_SERVICE,
            "CreateSnapshot",
            &target,
            &[
                ("AffectedSystem", WmiValue::Str(vm.path.clone())),
                ("SnapshotSettings", WmiValue::Str(settings)),
                ("SnapshotType", WmiValue::I32(RECOVERY_SNAPSHOT_TYPE)),
            ],
        )?;
        let action = format!("find the checkpoint CreateSnapshot made of {target}");
        let object = match (out.str("ResultingSnapshot").filter(|p| !p.is_empty()), job) {
            (Some(path), _) => self.wmi.get(path).map_err(|e| HostError::Wmi {
                action: action.clone(),
                hresult: e.hresult,
                message: e.message,
            })?,
            (None, Some(job)) => self
                .job_result(&action, &job, "Msvm_VirtualSystemSettingData")?
                .ok_or_else(|| HostError::Unexpected {
                    action: action.clone(),
                    detail: format!(
                        "job {job} is associated with no Msvm_VirtualSystemSettingData"
                    ),
                })?,
            (None, None) => {
                return Err(HostError::Unexpected {
                    action,
                    detail: "neither ResultingSnapshot nor a job came back".to_owned(),
                });
            }
        };
        parse_checkpoint(&object)
            .map(|c| c.checkpoint)
            .map_err(|detail| HostError::Unexpected { action, detail })
    }

    fn checkpoint_disks(&self, checkpoint: &CheckpointRef) -> Result<Vec<String>, HostError> {
        self.allocations(
            &format!("list the disks of checkpoint {}", checkpoint.instance_id),
            &checkpoint.path,
        )
    }

    fn checkpoints(&self, vm: &VmRef) -> Result<Vec<Checkpoint>, HostError> {
        let action = format!("list the checkpoints of VM {}", vm.name);
        self.query(
            &action,
            &format!(
                "ASSOCIATORS OF {{{}}} WHERE AssocClass = Msvm_SnapshotOfVirtualSystem ResultClass = Msvm_VirtualSystemSettingData",
                vm.path
            ),
        )?
        .iter()
        .map(|o| {
            parse_checkpoint(o).map_err(|detail| HostError::Unexpected {
                action: action.clone(),
                detail,
            })
        })
        .collect()
    }

    fn destroy_checkpoint(&self, checkpoint: &CheckpointRef) -> Result<(), HostError> {
        let target = format!("checkpoint {}", checkpoint.instance_id);
        self.call_and_wait(
            SNAPSHOT_SERVICE,
            "DestroySnapshot",
            &target,
            &[("AffectedSnapshot", WmiValue::Str(checkpoint.path.clone()))],
        )
        .map(|_| ())
        .map_err(|e| gone_as_not_found(e, Missing::Checkpoint, &target))
    }

    fn convert_to_reference_point(
        &self,
        checkpoint: &CheckpointRef,
    ) -> Result<ReferencePoint, HostError> {
        let target = format!("checkpoint {}", checkpoint.instance_id);
        let (out, job) = self
            .call_and_wait(
                SNAPSHOT_SERVICE,
                "ConvertToReferencePoint",
                &target,
                &[("AffectedSnapshot", WmiValue::Str(checkpoint.path.clone()))],
            )
            .map_err(|e| gone_as_not_found(e, Missing::Checkpoint, &target))?;
        let action = format!("find the reference point made of {target}");
        let object = match (
            out.str("ResultingReferencePoint").filter(|p| !p.is_empty()),
            job,
        ) {
            (Some(path), _) => self.wmi.get(path).map_err(|e| HostError::Wmi {
                action: action.clone(),
                hresult: e.hresult,
                message: e.message,
            })?,
            (None, Some(job)) => self
                .job_result(&action, &job, "Msvm_VirtualSystemReferencePoint")?
                .ok_or_else(|| HostError::Unexpected {
                    action: action.clone(),
                    detail: format!("job {job} is associated with no reference point"),
                })?,
            (None, None) => {
                return Err(HostError::Unexpected {
                    action,
                    detail: "neither ResultingReferencePoint nor a job came back".to_owned(),
                });
            }
        };
        parse_reference_point(&object).map_err(|detail| HostError::Unexpected { action, detail })
    }

    fn reference_points(&self, vm: &VmRef) -> Result<Vec<ReferencePoint>, HostError> {
        let action = format!("list the reference points of VM {}", vm.name);
        self.query(
            &action,
            &format!(
                "ASSOCIATORS OF {{{}}} WHERE AssocClass = Msvm_ReferencePointOfVirtualSystem ResultClass = Msvm_VirtualSystemReferencePoint",
                vm.path
            ),
        )?
        .iter()
        .map(|o| {
            parse_reference_point(o).map_err(|detail| HostError::Unexpected {
                action: action.clone(),
                detail,
            })
        })
        .collect()
    }

    fn destroy_reference_point(
        &self,
        reference_point: &ReferencePointRef,
    ) -> Result<(), HostError> {
        let target = format!("reference point {}", reference_point.instance_id);
        self.call_and_wait(
            REFERENCE_POINT_SERVICE,
            "DestroyReferencePoint",
            &target,
            &[(
                "AffectedReferencePoint",
                WmiValue::Str(reference_point.path.clone()),
            )],
        )
        .map(|_| ())
        .map_err(|e| gone_as_not_found(e, Missing::ReferencePoint, &target))
    }

    fn disk_info(&self, path: &str) -> Result<VirtualDiskInfo, HostError> {
        self.disks
            .info(path)
            .map_err(|e| Self::disk_error("GetVirtualDiskInformation", path, e))
    }

    fn query_changes(
        &self,
        path: &str,
        rct_id: &str,
        range: Range<u64>,
    ) -> Result<Vec<Range<u64>>, HostError> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut offset = range.start;
        while offset < range.end {
            let page = self
                .disks
                .query_changes_page(path, rct_id, offset, range.end - offset)
                .map_err(|e| Self::disk_error("QueryChangesVirtualDisk", path, e))?;
            for r in page.ranges {
                let r = r.start.max(range.start)..r.end.min(range.end);
                if r.is_empty() {
                    continue;
                }
                match out.last_mut() {
                    Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                    _ => out.push(r),
                }
            }
            // NB: a call that covers nothing would loop forever; the API promises progress.
            if page.processed_bytes == 0 {
                return Err(HostError::VirtualDisk {
                    action: "QueryChangesVirtualDisk",
                    path: path.to_owned(),
                    code: codes::ERROR_INVALID_PARAMETER,
                    message: format!("no progress at offset {offset} (ProcessedLength 0)"),
                });
            }
            offset = offset.saturating_add(page.processed_bytes);
        }
        Ok(out)
    }

    fn read_file_at(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, HostError> {
        self.disks
            .read_file_at(path, offset, len)
            .map_err(|e| Self::disk_error("ReadFile", path, e))
    }

    fn stop_vm(&self, vm: &VmRef, grace: Duration) -> Result<bool, HostError> {
        let target = format!("VM {}", vm.name);
        let state = |action: &str| -> Result<u16, HostError> {
            let object = self.wmi.get(&vm.path).map_err(|e| HostError::Wmi {
                action: format!("{action} of {target}"),
                hresult: e.hresult,
                message: e.message,
            })?;
            Ok(object.u16("EnabledState").unwrap_or(0))
        };
        match state("read the state")? {
            codes::VM_OFF => return Ok(true),
            codes::VM_PAUSED => return Ok(false),
            _ => {}
        }
        // NB: a guest without the shutdown integration service has no Msvm_ShutdownComponent:
        // it is paused once the grace period is over, as one that ignores the request is.
        let shutdown = self
            .query(
                &format!("find the shutdown component of {target}"),
                &format!(
                    "ASSOCIATORS OF {{{}}} WHERE ResultClass = Msvm_ShutdownComponent",
                    vm.path
                ),
            )?
            .into_iter()
            .next();
        if let Some(component) = shutdown {
            self.call_on_and_wait(
                &component.path,
                "Msvm_ShutdownComponent",
                "InitiateShutdown",
                &target,
                &[
                    ("Force", WmiValue::Bool(true)),
                    (
                        "Reason",
                        WmiValue::Str("Lifeboat: planned failover".to_owned()),
                    ),
                ],
            )?;
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if state("wait for the shutdown")? == codes::VM_OFF {
                    return Ok(true);
                }
                std::thread::sleep(self.options.job_poll);
            }
        }
        self.call_on_and_wait(
            &vm.path,
            "Msvm_ComputerSystem",
            "RequestStateChange",
            &target,
            &[("RequestedState", WmiValue::I32(i32::from(codes::VM_PAUSED)))],
        )?;
        Ok(false)
    }

    fn open_for_read(&self, path: &str) -> Result<Box<dyn DiskReader>, HostError> {
        self.disks
            .open_for_read(path)
            .map_err(|e| Self::disk_error("AttachVirtualDisk", path, e))
    }
}

/// WMI's "not found" on a destroy or convert means the object is gone.
fn gone_as_not_found(e: HostError, kind: Missing, target: &str) -> HostError {
    match &e {
        HostError::Wmi { hresult, .. } if *hresult == codes::WBEM_E_NOT_FOUND => {
            HostError::NotFound {
                kind,
                what: target.to_owned(),
                detail: e.to_string(),
            }
        }
        _ => e,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is the test failure report
mod tests {
    use super::*;
    use crate::host::ErrorClass;
    use std::sync::Mutex;

    const VM_PATH: &str = r#"\\HV1\root\virtualization\v2:Msvm_ComputerSystem.CreationClassName="Msvm_ComputerSystem",Name="6A1E0F9C-3F1B-4C8E-9B7E-2D4F0C1A5B77""#;
    const VM_ID: &str = "6A1E0F9C-3F1B-4C8E-9B7E-2D4F0C1A5B77";
    const SNAPSHOT_SERVICE_PATH: &str = r#"\\HV1\root\virtualization\v2:Msvm_VirtualSystemSnapshotService.CreationClassName="Msvm_VirtualSystemSnapshotService",Name="vssnapsvc",SystemCreationClassName="Msvm_ComputerSystem",SystemName="HV1""#;
    const JOB_PATH: &str = r#"\\HV1\root\virtualization\v2:Msvm_ConcreteJob.InstanceID="B1D0C2A4-7E55-4E1F-8F2A-3C9D1E6B0A11""#;
    const SNAPSHOT_PATH: &str = r#"\\HV1\root\virtualization\v2:Msvm_VirtualSystemSettingData.InstanceID="Microsoft:0E7D5B5C-44A4-4C2B-A1F2-5B9E8D7C6A10""#;

    /// Recorded WMI answers, matched on the query or path; calls are logged.
    #[derive(Debug, Default)]
    struct RecordedWmi {
        queries: Vec<(String, Result<Vec<WmiObject>, WmiCallError>)>,
        objects: Mutex<Vec<(String, Vec<WmiObject>)>>,
        calls: Vec<(String, WmiObject)>,
        log: Mutex<Vec<String>>,
    }

    impl RecordedWmi {
        fn answer(mut self, query_contains: &str, objects: Vec<WmiObject>) -> Self {
            self.queries.push((query_contains.to_owned(), Ok(objects)));
            self
        }
        fn fail(mut self, query_contains: &str, hresult: u32) -> Self {
            self.queries.push((
                query_contains.to_owned(),
                Err(WmiCallError {
                    hresult,
                    message: "recorded failure".into(),
                }),
            ));
            self
        }
        /// Successive answers to `get(path)`, the last one repeated.
        fn object(self, path: &str, answers: Vec<WmiObject>) -> Self {
            self.objects
                .lock()
                .unwrap()
                .push((path.to_owned(), answers));
            self
        }
        fn method(mut self, method: &str, out: WmiObject) -> Self {
            self.calls.push((method.to_owned(), out));
            self
        }
        fn log(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
    }

    impl Wmi for RecordedWmi {
        fn query(&self, wql: &str) -> Result<Vec<WmiObject>, WmiCallError> {
            self.log.lock().unwrap().push(format!("query {wql}"));
            self.queries
                .iter()
                .find(|(k, _)| wql.contains(k.as_str()))
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no recorded answer for {wql}"))
        }
        fn get(&self, path: &str) -> Result<WmiObject, WmiCallError> {
            self.log.lock().unwrap().push(format!("get {path}"));
            let mut objects = self.objects.lock().unwrap();
            let (_, answers) = objects
                .iter_mut()
                .find(|(p, _)| p == path)
                .unwrap_or_else(|| panic!("no recorded object {path}"));
            if answers.len() > 1 {
                Ok(answers.remove(0))
            } else {
                Ok(answers[0].clone())
            }
        }
        fn call(
            &self,
            path: &str,
            class: &str,
            method: &str,
            args: &[(&str, WmiValue)],
        ) -> Result<WmiObject, WmiCallError> {
            let args: Vec<String> = args.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            self.log.lock().unwrap().push(format!(
                "call {class}.{method} on {path} ({})",
                args.join(", ")
            ));
            Ok(self
                .calls
                .iter()
                .find(|(m, _)| m == method)
                .unwrap_or_else(|| panic!("no recorded answer for {method}"))
                .1
                .clone())
        }
        fn embedded_instance(
            &self,
            class: &str,
            properties: &[(&str, WmiValue)],
        ) -> Result<String, WmiCallError> {
            Ok(format!(
                "<INSTANCE CLASSNAME=\"{class}\">{properties:?}</INSTANCE>"
            ))
        }
    }

    /// Recorded virtual disk answers.
    #[derive(Debug, Default)]
    struct RecordedDisks {
        pages: Mutex<Vec<Result<ChangesPage, Win32CallError>>>,
    }

    impl VirtualDisks for RecordedDisks {
        fn info(&self, path: &str) -> Result<VirtualDiskInfo, Win32CallError> {
            Err(Win32CallError {
                code: codes::ERROR_FILE_NOT_FOUND,
                message: format!("{path}: The system cannot find the file specified."),
            })
        }
        fn query_changes_page(
            &self,
            _path: &str,
            _rct_id: &str,
            _offset: u64,
            _len: u64,
        ) -> Result<ChangesPage, Win32CallError> {
            self.pages.lock().unwrap().remove(0)
        }
        fn read_file_at(&self, _: &str, _: u64, _: usize) -> Result<Vec<u8>, Win32CallError> {
            Ok(Vec::new())
        }
        fn open_for_read(&self, _: &str) -> Result<Box<dyn DiskReader>, Win32CallError> {
            Err(Win32CallError {
                code: codes::ERROR_PRIVILEGE_NOT_HELD,
                message: "A required privilege is not held by the client.".into(),
            })
        }
    }

    fn host(wmi: RecordedWmi) -> WmiHost<RecordedWmi, RecordedDisks> {
        host_with(wmi, RecordedDisks::default())
    }

    fn host_with(wmi: RecordedWmi, disks: RecordedDisks) -> WmiHost<RecordedWmi, RecordedDisks> {
        WmiHost::new(
            wmi,
            disks,
            WmiHostOptions {
                job_poll: Duration::from_millis(1),
                job_timeout: Duration::from_secs(5),
            },
        )
    }

    /// A VM's Msvm_ComputerSystem as WMI returns it.
    fn vm(name: &str, id: &str) -> WmiObject {
        WmiObject::new("Msvm_ComputerSystem", VM_PATH)
            .with("ElementName", WmiValue::Str(name.into()))
            .with("Name", WmiValue::Str(id.into()))
            .with("EnabledState", WmiValue::I32(2))
    }

    fn job(state: i32) -> WmiObject {
        WmiObject::new("Msvm_ConcreteJob", JOB_PATH)
            .with("InstanceID", WmiValue::Str("B1D0C2A4".into()))
            .with("JobState", WmiValue::I32(state))
            .with("ErrorCode", WmiValue::I32(0))
    }

    fn failed_job(error_code: i32, description: &str) -> WmiObject {
        job(10)
            .with("ErrorCode", WmiValue::I32(error_code))
            .with("ErrorDescription", WmiValue::Str(description.into()))
            .with(
                "ErrorSummaryDescription",
                WmiValue::Str("Checkpoint operation failed.".into()),
            )
    }

    fn started(job: &str) -> WmiObject {
        WmiObject::new("__PARAMETERS", "")
            .with("ReturnValue", WmiValue::I32(4096))
            .with("Job", WmiValue::Str(job.into()))
    }

    fn snapshot() -> WmiObject {
        WmiObject::new("Msvm_VirtualSystemSettingData", SNAPSHOT_PATH)
            .with(
                "InstanceID",
                WmiValue::Str("Microsoft:0E7D5B5C-44A4-4C2B-A1F2-5B9E8D7C6A10".into()),
            )
            .with(
                "ElementName",
                WmiValue::Str("web1 - Backup - (11/28/2025)".into()),
            )
            .with(
                "VirtualSystemType",
                WmiValue::Str(RECOVERY_SNAPSHOT_SYSTEM_TYPE.into()),
            )
            .with(
                "CreationTime",
                WmiValue::Str("20251128190512.123456-000".into()),
            )
    }

    fn service() -> WmiObject {
        WmiObject::new(SNAPSHOT_SERVICE, SNAPSHOT_SERVICE_PATH)
    }

    #[test]
    fn a_vm_is_found_by_name_and_the_host_system_is_not_a_vm() {
        let wmi = RecordedWmi::default().answer(
            "FROM Msvm_ComputerSystem",
            vec![
                WmiObject::new("Msvm_ComputerSystem", r"\\HV1\...HV1")
                    .with("ElementName", WmiValue::Str("web1".into()))
                    .with("Name", WmiValue::Str("HV1".into())),
                vm("web1", VM_ID),
            ],
        );
        let h = host(wmi);
        let found = h.find_vm("web1").unwrap();
        assert_eq!(found.id, VM_ID);
        assert_eq!(found.path, VM_PATH);
        assert_eq!(
            h.wmi.log(),
            vec!["query SELECT * FROM Msvm_ComputerSystem WHERE ElementName = 'web1'"]
        );

        let h = host(RecordedWmi::default().answer("Msvm_ComputerSystem", vec![]));
        let e = h.find_vm("o'brien").unwrap_err();
        assert_eq!(e.class(), ErrorClass::VmNotFound);
        assert!(h.wmi.log()[0].ends_with(r"ElementName = 'o\'brien'"));

        let h = host(RecordedWmi::default().answer(
            "Msvm_ComputerSystem",
            vec![
                vm("web1", VM_ID),
                vm("web1", "0D5C4A2B-1111-2222-3333-444455556666"),
            ],
        ));
        let e = h.find_vm("web1").unwrap_err().to_string();
        assert!(e.contains("2 VMs are named \"web1\""), "{e}");

        let h = host(RecordedWmi::default().answer("Msvm_ComputerSystem", vec![vm("web1", VM_ID)]));
        h.find_vm(VM_ID).unwrap();
        assert!(h.wmi.log()[0].contains(&format!("WHERE Name = '{VM_ID}'")));
    }

    #[test]
    fn a_recovery_checkpoint_is_created_through_a_job_and_found_from_it() {
        let wmi = RecordedWmi::default()
            .answer("FROM Msvm_VirtualSystemSnapshotService", vec![service()])
            .answer("ASSOCIATORS OF {", vec![snapshot()])
            .method("CreateSnapshot", started(JOB_PATH))
            .object(JOB_PATH, vec![job(4), job(4), job(7)]);
        let h = host(wmi);
        let vmref = VmRef {
            name: "web1".into(),
            id: VM_ID.into(),
            path: VM_PATH.into(),
        };
        let cp = h
            .create_recovery_checkpoint(&vmref, Consistency::Application)
            .unwrap();
        assert_eq!(cp.path, SNAPSHOT_PATH);
        let log = h.wmi.log();
        assert!(log[1].starts_with(&format!(
            "call Msvm_VirtualSystemSnapshotService.CreateSnapshot on {SNAPSHOT_SERVICE_PATH} (AffectedSystem=Str({VM_PATH:?}), SnapshotSettings=Str(\"<INSTANCE CLASSNAME=\\\"Msvm_VirtualSystemSnapshotSettingData\\\">[(\\\"ConsistencyLevel\\\", U8(1)), (\\\"IgnoreNonSnapshottableDisks\\\", Bool(true))]</INSTANCE>\"), SnapshotType=I32(32768))"
        )), "{log:#?}");
        assert_eq!(log.iter().filter(|l| l.starts_with("get ")).count(), 3);
        assert_eq!(
            log.last().unwrap(),
            &format!(
                "query ASSOCIATORS OF {{{JOB_PATH}}} WHERE ResultClass = Msvm_VirtualSystemSettingData"
            )
        );
    }

    #[test]
    fn a_failed_job_reports_its_error_code_and_description() {
        let wmi = RecordedWmi::default()
            .answer("FROM Msvm_VirtualSystemSnapshotService", vec![service()])
            .method("CreateSnapshot", started(JOB_PATH))
            .object(
                JOB_PATH,
                vec![
                    job(4),
                    failed_job(
                        32768,
                        "'web1' could not initiate a checkpoint operation: The VSS writer failed.",
                    ),
                ],
            );
        let h = host(wmi);
        let vmref = VmRef {
            name: "web1".into(),
            id: VM_ID.into(),
            path: VM_PATH.into(),
        };
        let e = h
            .create_recovery_checkpoint(&vmref, Consistency::Application)
            .unwrap_err();
        assert_eq!(e.class(), ErrorClass::Failed);
        assert_eq!(
            e.to_string(),
            "Msvm_VirtualSystemSnapshotService.CreateSnapshot on VM web1: job B1D0C2A4 ended in state 10: \
             ErrorCode 32768 (failed): 'web1' could not initiate a checkpoint operation: The VSS writer \
             failed. (Checkpoint operation failed.)"
        );

        // A method refused outright.
        let wmi = RecordedWmi::default()
            .answer("FROM Msvm_VirtualSystemSnapshotService", vec![service()])
            .method(
                "CreateSnapshot",
                WmiObject::new("__PARAMETERS", "").with("ReturnValue", WmiValue::I32(32775)),
            );
        let e = host(wmi)
            .create_recovery_checkpoint(&vmref, Consistency::Crash)
            .unwrap_err();
        assert_eq!(e.class(), ErrorClass::Busy);
        assert_eq!(
            e.to_string(),
            "Msvm_VirtualSystemSnapshotService.CreateSnapshot on VM web1 returned 32775 (invalid state for this operation)"
        );
    }

    #[test]
    fn a_job_that_never_ends_times_out() {
        let wmi = RecordedWmi::default()
            .answer(
                "FROM Msvm_VirtualSystemReferencePointService",
                vec![service()],
            )
            .method("DestroyReferencePoint", started(JOB_PATH))
            .object(JOB_PATH, vec![job(4)]);
        let h = WmiHost::new(
            wmi,
            RecordedDisks::default(),
            WmiHostOptions {
                job_poll: Duration::from_millis(1),
                job_timeout: Duration::from_millis(20),
            },
        );
        let e = h
            .destroy_reference_point(&ReferencePointRef {
                instance_id: "RP1".into(),
                path: "rp1".into(),
            })
            .unwrap_err();
        assert!(matches!(e, HostError::JobTimeout { .. }), "{e}");
        assert!(e.class().is_recoverable());
    }

    #[test]
    fn destroying_what_is_gone_is_not_found() {
        let wmi = RecordedWmi::default().fail(
            "FROM Msvm_VirtualSystemSnapshotService",
            codes::WBEM_E_NOT_FOUND,
        );
        let e = host(wmi)
            .destroy_checkpoint(&CheckpointRef {
                instance_id: "CP".into(),
                path: "cp".into(),
            })
            .unwrap_err();
        assert!(
            matches!(
                e,
                HostError::NotFound {
                    kind: Missing::Checkpoint,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn reference_points_pair_disk_ids_with_rct_ids() {
        let rp = WmiObject::new("Msvm_VirtualSystemReferencePoint", "rp-path")
            .with("InstanceID", WmiValue::Str("Microsoft:RP-1".into()))
            .with("ReferencePointType", WmiValue::I32(2))
            .with("ConsistencyLevel", WmiValue::I32(1))
            .with(
                "VirtualDiskIdentifiers",
                WmiValue::StrArray(vec!["{AAA}".into(), "{BBB}".into()]),
            )
            .with(
                "ResilientChangeTrackingIdentifiers",
                WmiValue::StrArray(vec!["rct:aaa:1".into(), "rct:bbb:7".into()]),
            );
        let parsed = parse_reference_point(&rp).unwrap();
        assert!(parsed.rct_based);
        assert_eq!(parsed.consistency, Some(Consistency::Application));
        assert_eq!(parsed.disks[1].rct_id, "rct:bbb:7");
        assert_eq!(parsed.disks[1].virtual_disk_id, "{BBB}");
        let bad = rp.with(
            "ResilientChangeTrackingIdentifiers",
            WmiValue::StrArray(vec!["rct:aaa:1".into()]),
        );
        assert!(parse_reference_point(&bad).is_err());
    }

    #[test]
    fn disk_paths_come_from_hard_disk_allocations_only() {
        let alloc = |subtype: &str, host_resource: Vec<&str>| {
            WmiObject::new("Msvm_StorageAllocationSettingData", "a")
                .with("ResourceType", WmiValue::I32(31))
                .with("ResourceSubType", WmiValue::Str(subtype.into()))
                .with(
                    "HostResource",
                    WmiValue::StrArray(host_resource.into_iter().map(str::to_owned).collect()),
                )
        };
        let paths = parse_disk_paths(&[
            alloc(VIRTUAL_HARD_DISK_SUBTYPE, vec![r"D:\vm\web1\os.vhdx"]),
            alloc(
                "Microsoft:Hyper-V:Virtual CD/DVD Disk",
                vec![r"D:\iso\setup.iso"],
            ),
            alloc(
                VIRTUAL_HARD_DISK_SUBTYPE,
                vec![r"D:\vm\web1\data_6B1C3F2E-1D2A-4B5C-9E8F-7A6B5C4D3E2F.avhdx"],
            ),
            alloc(VIRTUAL_HARD_DISK_SUBTYPE, vec![]),
        ]);
        assert_eq!(
            paths,
            vec![
                r"D:\vm\web1\os.vhdx".to_owned(),
                r"D:\vm\web1\data_6B1C3F2E-1D2A-4B5C-9E8F-7A6B5C4D3E2F.avhdx".to_owned()
            ]
        );
    }

    #[test]
    fn cim_datetimes_become_unix_milliseconds() {
        assert_eq!(parse_cim_datetime("19700101000000.000000+000"), Some(0));
        assert_eq!(
            parse_cim_datetime("20251128190512.123456-000"),
            Some(1_764_356_712_123)
        );
        // 60 minutes east of UTC is an hour earlier in UTC.
        assert_eq!(
            parse_cim_datetime("20000101010000.000000+060"),
            Some(946_684_800_000)
        );
        assert_eq!(parse_cim_datetime("2025"), None);
        assert_eq!(parse_cim_datetime("20251328190512.123456-000"), None);
    }

    #[test]
    fn changes_are_queried_page_by_page_and_merged() {
        let page = |ranges: Vec<Range<u64>>, processed_bytes| {
            Ok(ChangesPage {
                ranges,
                processed_bytes,
            })
        };
        let disks = RecordedDisks {
            pages: Mutex::new(vec![
                page(vec![0..4096, 8192..16384], 16384),
                page(vec![16384..20480, 65536..70000], 100_000 - 16384),
            ]),
        };
        let h = host_with(RecordedWmi::default(), disks);
        assert_eq!(
            h.query_changes("d.vhdx", "rct:1", 0..100_000).unwrap(),
            vec![0..4096, 8192..20480, 65536..70000]
        );

        let disks = RecordedDisks {
            pages: Mutex::new(vec![Err(Win32CallError {
                code: codes::ERROR_VHD_INVALID_CHANGE_TRACKING_ID,
                message: "The specified change tracking identifier is not valid.".into(),
            })]),
        };
        let e = host_with(RecordedWmi::default(), disks)
            .query_changes("d.vhdx", "rct:1", 0..100)
            .unwrap_err();
        assert_eq!(e.class(), ErrorClass::TrackingLost);

        let disks = RecordedDisks {
            pages: Mutex::new(vec![page(vec![], 0)]),
        };
        assert!(
            host_with(RecordedWmi::default(), disks)
                .query_changes("d.vhdx", "rct:1", 0..100)
                .is_err()
        );
    }

    #[test]
    fn missing_images_and_missing_privileges_are_told_apart() {
        let h = host(RecordedWmi::default());
        let e = h.disk_info(r"D:\vm\gone.vhdx").unwrap_err();
        assert_eq!(e.class(), ErrorClass::DiskNotFound);
        let e = h.open_for_read(r"D:\vm\os.vhdx").unwrap_err();
        assert_eq!(e.class(), ErrorClass::AccessDenied);
        assert!(e.to_string().contains("SeManageVolumePrivilege"), "{e}");
    }

    #[test]
    fn a_stop_asks_the_guest_to_shut_down_then_pauses_one_that_does_not() {
        const SHUTDOWN_PATH: &str =
            r#"\\HV1\root\virtualization\v2:Msvm_ShutdownComponent.DeviceID="shutdown""#;
        let vm_ref = VmRef {
            name: "web1".into(),
            id: VM_ID.into(),
            path: VM_PATH.into(),
        };
        let off = vm("web1", VM_ID).with("EnabledState", WmiValue::I32(3));
        let done = WmiObject::new("__PARAMETERS", "").with("ReturnValue", WmiValue::I32(0));
        let component = || WmiObject::new("Msvm_ShutdownComponent", SHUTDOWN_PATH);
        let h = host(
            RecordedWmi::default()
                .object(VM_PATH, vec![vm("web1", VM_ID), vm("web1", VM_ID), off])
                .answer("Msvm_ShutdownComponent", vec![component()])
                .method("InitiateShutdown", done.clone()),
        );
        assert!(h.stop_vm(&vm_ref, Duration::from_secs(5)).unwrap());
        let log = h.wmi.log();
        assert!(
            log.iter().any(
                |l| l.starts_with("call Msvm_ShutdownComponent.InitiateShutdown on ")
                    && l.contains("Force=Bool(true)")
            ),
            "{log:#?}"
        );
        assert!(
            !log.iter().any(|l| l.contains("RequestStateChange")),
            "{log:#?}"
        );

        // A guest that ignores the request is paused once the grace is over.
        let h = host(
            RecordedWmi::default()
                .object(VM_PATH, vec![vm("web1", VM_ID)])
                .answer("Msvm_ShutdownComponent", vec![component()])
                .method("InitiateShutdown", done.clone())
                .method("RequestStateChange", done),
        );
        assert!(!h.stop_vm(&vm_ref, Duration::from_millis(20)).unwrap());
        let log = h.wmi.log();
        assert!(
            log.iter()
                .any(|l| l.contains("Msvm_ComputerSystem.RequestStateChange")
                    && l.contains("RequestedState=I32(32776)")),
            "{log:#?}"
        );
    }
}
