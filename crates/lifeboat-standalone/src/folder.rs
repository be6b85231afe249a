//! The manifests folder: every `*.yaml`/`*.yml` file in it, read the way `kubectl apply -f DIR`
//! would take them (ReplicationPolicy, ProtectedVM, RecoveryPlan, and Secret for storage
//! credentials), and read again when a file changes. A file that does not pass keeps its last
//! good content and its error, naming the file and the field, is reported until it is fixed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lifeboat_api::manifest::{self, Resource};
use lifeboat_api::{ProtectedVM, RecoveryPlan, ReplicationPolicy};
use serde_json::Value;

/// A Secret from the folder: its string data by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SecretData {
    /// Key -> value.
    pub data: BTreeMap<String, String>,
}

/// What one file held when it last parsed.
#[derive(Clone, Debug, Default)]
struct FileContent {
    text: String,
    policies: Vec<ReplicationPolicy>,
    vms: Vec<ProtectedVM>,
    plans: Vec<RecoveryPlan>,
    secrets: Vec<(String, String, SecretData)>,
    error: Option<String>,
}

/// The folder's resources, by namespace and name.
#[derive(Debug, Default)]
pub struct Folder {
    dir: PathBuf,
    default_namespace: String,
    files: BTreeMap<PathBuf, FileContent>,
}

/// One resource's key.
pub type Key = (String, String);

fn namespaced<T: kube::Resource>(mut resource: T, default_namespace: &str) -> T {
    let meta = resource.meta_mut();
    if meta.namespace.is_none() {
        meta.namespace = Some(default_namespace.to_owned());
    }
    resource
}

/// Split a file's YAML documents into Secrets and the rest (Secrets are not Lifeboat
/// resources, but standalone reads storage credentials from them).
fn secrets_of(
    text: &str,
    default_namespace: &str,
) -> Result<Vec<(String, String, SecretData)>, String> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for doc in documents
        .iter()
        .filter(|d| d.get("kind").and_then(Value::as_str) == Some("Secret"))
    {
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let namespace = doc
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(default_namespace)
            .to_owned();
        let mut data = SecretData::default();
        if let Some(map) = doc.get("stringData").and_then(Value::as_object) {
            for (k, v) in map {
                data.data
                    .insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
            }
        }
        if let Some(map) = doc.get("data").and_then(Value::as_object) {
            for (k, v) in map {
                let decoded = decode_base64(v.as_str().unwrap_or_default())
                    .ok_or_else(|| format!("Secret {namespace}/{name}: data.{k} is not base64"))?;
                data.data.insert(k.clone(), decoded);
            }
        }
        out.push((namespace, name, data));
    }
    Ok(out)
}

/// Standard base64 (what `data` of a Secret holds), to UTF-8 text.
fn decode_base64(text: &str) -> Option<String> {
    use base64::Engine as _;
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .ok()?;
    String::from_utf8(bytes).ok()
}

impl Folder {
    /// The folder at `dir`; resources without a namespace get `default_namespace`.
    pub fn new(dir: impl Into<PathBuf>, default_namespace: &str) -> Folder {
        Folder {
            dir: dir.into(),
            default_namespace: default_namespace.to_owned(),
            files: BTreeMap::new(),
        }
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Read the files that changed since the last call. Returns whether anything changed.
    ///
    /// # Errors
    ///
    /// The folder itself cannot be read.
    pub fn refresh(&mut self) -> Result<bool, std::io::Error> {
        let mut seen = Vec::new();
        let mut changed = false;
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        entries.sort();
        for path in entries {
            seen.push(path.clone());
            // NB: manifests are small: comparing contents is cheaper to get right than mtimes.
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    self.files.entry(path.clone()).or_default().error =
                        Some(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            if self.files.get(&path).is_some_and(|f| f.text == text) {
                continue;
            }
            changed = true;
            let name = path.display().to_string();
            let parsed = secrets_of(&text, &self.default_namespace)
                .map_err(|e| format!("{name}: {e}"))
                .and_then(|secrets| {
                    // Secrets are taken out before the Lifeboat resources are checked.
                    let rest: Vec<&str> = split_documents(&text)
                        .into_iter()
                        .filter(|d| !is_secret(d))
                        .collect();
                    manifest::parse(&name, &rest.join("\n---\n"))
                        .map(|r| (r, secrets))
                        .map_err(|e| e.to_string())
                });
            let entry = self.files.entry(path.clone()).or_default();
            entry.text = text;
            match parsed {
                Ok((resources, secrets)) => {
                    entry.policies.clear();
                    entry.vms.clear();
                    entry.plans.clear();
                    for resource in resources {
                        match resource {
                            Resource::Policy(p) => {
                                entry.policies.push(namespaced(p, &self.default_namespace))
                            }
                            Resource::Vm(v) => {
                                entry.vms.push(namespaced(v, &self.default_namespace))
                            }
                            Resource::Plan(p) => {
                                entry.plans.push(namespaced(p, &self.default_namespace))
                            }
                            Resource::Job(_) => {}
                        }
                    }
                    entry.secrets = secrets;
                    entry.error = None;
                }
                Err(error) => {
                    tracing::error!("{error}");
                    entry.error = Some(error);
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|path, _| seen.contains(path));
        Ok(changed || self.files.len() != before)
    }

    /// The errors of the files that do not pass, one per file.
    pub fn errors(&self) -> Vec<String> {
        self.files
            .values()
            .filter_map(|f| f.error.clone())
            .collect()
    }

    /// The resources of one kind (`of` picks them from a file's content), by key.
    fn keyed<T: kube::Resource + Clone>(
        &self,
        of: impl Fn(&FileContent) -> &[T],
    ) -> BTreeMap<Key, T> {
        self.files
            .values()
            .flat_map(|f| of(f).iter())
            .map(|r| (key_of(r), r.clone()))
            .collect()
    }

    /// The policies, by key.
    pub fn policies(&self) -> BTreeMap<Key, ReplicationPolicy> {
        self.keyed(|f| &f.policies)
    }

    /// The VMs, by key.
    pub fn vms(&self) -> BTreeMap<Key, ProtectedVM> {
        self.keyed(|f| &f.vms)
    }

    /// The recovery plans, by key.
    pub fn plans(&self) -> BTreeMap<Key, RecoveryPlan> {
        self.keyed(|f| &f.plans)
    }

    /// A Secret's value.
    pub fn secret(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        self.files
            .values()
            .flat_map(|f| f.secrets.iter())
            .find(|(ns, n, _)| ns == namespace && n == name)
            .and_then(|(_, _, data)| data.data.get(key).cloned())
    }
}

/// A resource's namespace and name.
pub fn key_of<T: kube::Resource>(resource: &T) -> Key {
    let meta = resource.meta();
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The YAML documents of a text, split on `---` lines.
fn split_documents(text: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            docs.push(&text[start..offset]);
            start = offset + line.len();
        }
        offset += line.len();
    }
    docs.push(&text[start..]);
    docs
}

fn is_secret(document: &str) -> bool {
    document.lines().any(|l| l.trim() == "kind: Secret")
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: lifeboat.io/v1alpha1\nkind: ReplicationPolicy\nmetadata: {name: p}\nspec:\n  target: {local: {path: /r}}\n";

    #[test]
    fn reads_resources_and_secrets_and_keeps_the_last_good_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("p.yaml");
        let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {accountKey: k1}\ndata: {other: aGVsbG8=}\n";
        std::fs::write(&file, format!("{POLICY}---\n{secret}")).unwrap_or_else(|e| panic!("{e}"));
        let mut folder = Folder::new(dir.path(), "lifeboat");
        assert!(folder.refresh().unwrap_or(false));
        assert_eq!(
            folder.policies().keys().collect::<Vec<_>>(),
            [&("lifeboat".to_owned(), "p".to_owned())]
        );
        assert_eq!(
            folder.secret("lifeboat", "s", "accountKey").as_deref(),
            Some("k1")
        );
        assert_eq!(
            folder.secret("lifeboat", "s", "other").as_deref(),
            Some("hello")
        );
        assert!(!folder.refresh().unwrap_or(true), "nothing changed");

        // A typo: the error names file and field; the last good policy stays.
        std::fs::write(&file, POLICY.replace("target:", "targt:"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(folder.refresh().unwrap_or(false));
        let errors = folder.errors();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("p.yaml") && errors[0].contains("spec.targt: Unknown field"),
            "{errors:?}"
        );
        assert_eq!(folder.policies().len(), 1);

        std::fs::remove_file(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(folder.refresh().unwrap_or(false));
        assert!(folder.policies().is_empty());
    }
}
