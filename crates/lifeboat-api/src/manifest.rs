//! Reading Lifeboat manifests (YAML, one or more documents) the way the API server would take
//! them from `kubectl apply`: the structural schema check, schema defaults, the CEL rules, then
//! the typed resource. Standalone mode reads its folder with this, `lifeboat validate` checks
//! files with it, and the tests hold the examples and the broken manifests to it.
//!
//! ```text
//!  YAML text --parse--> JSON value --metadata + structural check--> --defaults + CEL--> typed
//!                                     (schema_check)                  (kube's cel engine)
//! ```
//!
//! Every error names the source (a file), the document, the resource and the field.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::core::cel::Validator;
use regex::Regex;
use serde_json::Value;
use std::fmt;

use crate::schema_check::{self, FieldError, FieldErrorKind};
use crate::{ProtectedVM, RecoveryPlan, ReplicationJob, ReplicationPolicy};

/// A Lifeboat resource read from a manifest.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Resource {
    /// A `ReplicationPolicy`.
    Policy(ReplicationPolicy),
    /// A `ProtectedVM`.
    Vm(ProtectedVM),
    /// A `ReplicationJob`.
    Job(ReplicationJob),
    /// A `RecoveryPlan`.
    Plan(RecoveryPlan),
}

impl Resource {
    /// The resource's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Policy(_) => "ReplicationPolicy",
            Self::Vm(_) => "ProtectedVM",
            Self::Job(_) => "ReplicationJob",
            Self::Plan(_) => "RecoveryPlan",
        }
    }

    /// The resource's name.
    pub fn name(&self) -> &str {
        let meta = match self {
            Self::Policy(r) => &r.metadata,
            Self::Vm(r) => &r.metadata,
            Self::Job(r) => &r.metadata,
            Self::Plan(r) => &r.metadata,
        };
        meta.name.as_deref().unwrap_or_default()
    }
}

/// Why a manifest was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ManifestError {
    /// The text is not YAML.
    #[error("{source_name}: not valid YAML: {message}")]
    ParseYaml {
        /// The file (or other source) the text came from.
        source_name: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A document is not a Lifeboat resource.
    #[error("{source_name} (document {document}): {message}")]
    NotLifeboat {
        /// The file (or other source) the text came from.
        source_name: String,
        /// The document's number in the file, from 1.
        document: usize,
        /// What is wrong.
        message: String,
    },
    /// A document is a Lifeboat resource that the API server would reject.
    #[error("{source_name} (document {document}): {kind} \"{name}\" is invalid: {}", Problems(.problems))]
    Invalid {
        /// The file (or other source) the text came from.
        source_name: String,
        /// The document's number in the file, from 1.
        document: usize,
        /// The resource's kind.
        kind: String,
        /// The resource's name (empty when missing).
        name: String,
        /// One line per problem, each naming its field (`spec.disks: Required value`).
        problems: Vec<String>,
    },
}

impl ManifestError {
    /// The problems, one per field, when the document was a Lifeboat resource.
    pub fn problems(&self) -> &[String] {
        match self {
            Self::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

struct Problems<'a>(&'a [String]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [one] => write!(f, "{one}"),
            many => many.iter().try_for_each(|p| write!(f, "\n  - {p}")),
        }
    }
}

/// The Lifeboat kind of a document, with its CRD.
fn crd_for(kind: &str) -> Option<CustomResourceDefinition> {
    match kind {
        "ReplicationPolicy" => Some(ReplicationPolicy::crd()),
        "ProtectedVM" => Some(ProtectedVM::crd()),
        "ReplicationJob" => Some(ReplicationJob::crd()),
        "RecoveryPlan" => Some(RecoveryPlan::crd()),
        _ => None,
    }
}

fn open_api_schema(crd: &CustomResourceDefinition) -> Value {
    crd.spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null)
}

/// Read every document of `text` (from `source_name`, used in messages) as a Lifeboat
/// resource, checking each as the API server would on create.
///
/// # Errors
///
/// The first document that does not parse or does not pass, with every problem it has.
pub fn parse(source_name: &str, text: &str) -> Result<Vec<Resource>, ManifestError> {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ManifestError::ParseYaml {
            source_name: source_name.to_owned(),
            message: e.to_string(),
        })?;
    documents
        .into_iter()
        .enumerate()
        .filter(|(_, doc)| !doc.is_null())
        .map(|(i, doc)| parse_value(source_name, i + 1, &doc, None))
        .collect()
}

/// Check an update: `new` (document `document` of `source_name`) replacing `old`, with the
/// transition rules (`self == oldSelf`, ...) the API server applies on update as well.
///
/// # Errors
///
/// As [`parse`], plus the transition rules that `new` breaks.
pub fn check_update(
    source_name: &str,
    document: usize,
    old: &Value,
    new: &Value,
) -> Result<Resource, ManifestError> {
    parse_value(source_name, document, new, Some(old))
}

fn parse_value(
    source_name: &str,
    document: usize,
    doc: &Value,
    old: Option<&Value>,
) -> Result<Resource, ManifestError> {
    let not_lifeboat = |message: String| ManifestError::NotLifeboat {
        source_name: source_name.to_owned(),
        document,
        message,
    };
    let Some(object) = doc.as_object() else {
        return Err(not_lifeboat(
            "a manifest must be a mapping with apiVersion, kind and metadata".into(),
        ));
    };
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(crd) = crd_for(kind) else {
        return Err(not_lifeboat(format!(
            "kind {kind:?} is not a Lifeboat resource (ReplicationPolicy, ProtectedVM, ReplicationJob, RecoveryPlan)"
        )));
    };
    let expected_version = format!("{}/{}", crate::GROUP, crate::VERSION);
    if api_version != expected_version {
        return Err(not_lifeboat(format!(
            "apiVersion {api_version:?} is not served for {kind}: use {expected_version:?}"
        )));
    }
    let name = object
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let invalid = |problems: Vec<String>| ManifestError::Invalid {
        source_name: source_name.to_owned(),
        document,
        kind: kind.to_owned(),
        name: name.clone(),
        problems,
    };

    // NB: status is the controllers' to write: the API server ignores it on create (the status
    // subresource is enabled), so it is neither checked nor kept here.
    let mut doc = doc.clone();
    if let Some(object) = doc.as_object_mut() {
        object.remove("status");
    }
    let schema = open_api_schema(&crd);
    let mut problems: Vec<FieldError> = check_metadata(doc.get("metadata"));
    // NB: the root schema describes spec (and status); apiVersion, kind and metadata are the
    // API server's own and were checked above.
    let mut body = doc.clone();
    if let Some(object) = body.as_object_mut() {
        for key in ["apiVersion", "kind", "metadata"] {
            object.remove(key);
        }
    }
    problems.extend(schema_check::check(&schema, &body, ""));
    if !problems.is_empty() {
        return Err(invalid(problems.iter().map(ToString::to_string).collect()));
    }

    let old = old.map(|o| {
        let mut o = o.clone();
        if let Some(object) = o.as_object_mut() {
            object.remove("status");
        }
        o
    });
    if let Err(errors) = Validator::new().validate(&schema, &doc, old.as_ref()) {
        return Err(invalid(errors.iter().map(ToString::to_string).collect()));
    }
    let defaulted = kube::core::cel::apply_defaults(&schema, &doc);
    let typed = match kind {
        "ReplicationPolicy" => serde_json::from_value(defaulted).map(Resource::Policy),
        "ProtectedVM" => serde_json::from_value(defaulted).map(Resource::Vm),
        "RecoveryPlan" => serde_json::from_value(defaulted).map(Resource::Plan),
        _ => serde_json::from_value(defaulted).map(Resource::Job),
    };
    let typed = typed.map_err(|e| invalid(vec![e.to_string()]))?;
    // NB: beyond what a schema can say: a recovery template must parse (the API server cannot
    // check it; the operator reports a bad one at failover).
    if let Resource::Vm(vm) = &typed
        && let Some(template) = vm
            .spec
            .recovered_vm
            .as_ref()
            .and_then(|r| r.template.as_deref())
    {
        crate::recovered::check(template).map_err(|problem| invalid(vec![problem]))?;
    }
    Ok(typed)
}

/// The fields of `metadata` a manifest may carry.
const METADATA_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "finalizers",
    "ownerReferences",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

fn check_metadata(metadata: Option<&Value>) -> Vec<FieldError> {
    let error = |path: &str, kind, detail: &str| FieldError {
        path: path.into(),
        kind,
        detail: detail.into(),
    };
    let Some(metadata) = metadata.and_then(Value::as_object) else {
        return vec![error(
            "metadata.name",
            FieldErrorKind::Required,
            "Required value: name or generateName is required",
        )];
    };
    let mut errors = Vec::new();
    for key in metadata
        .keys()
        .filter(|k| !METADATA_FIELDS.contains(&k.as_str()))
    {
        errors.push(error(
            &format!("metadata.{key}"),
            FieldErrorKind::Unknown,
            "Unknown field",
        ));
    }
    let subdomain =
        Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$").ok();
    match metadata.get("name").and_then(Value::as_str) {
        None if metadata.contains_key("generateName") => {}
        None => errors.push(error("metadata.name", FieldErrorKind::Required, "Required value: name or generateName is required")),
        Some(name) if name.len() > 253 || !subdomain.as_ref().is_some_and(|re| re.is_match(name)) => errors.push(error(
            "metadata.name",
            FieldErrorKind::Invalid,
            &format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
        )),
        Some(_) => {}
    }
    if let Some(namespace) = metadata.get("namespace").and_then(Value::as_str) {
        let label = Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").ok();
        if namespace.len() > 63 || !label.as_ref().is_some_and(|re| re.is_match(namespace)) {
            errors.push(error("metadata.namespace", FieldErrorKind::Invalid, &format!("Invalid value: {namespace:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'")));
        }
    }
    errors
}
