//! The structural checks an API server applies to a custom resource before it stores it, done
//! offline against the CRD's `openAPIV3Schema`: types, required fields, enums, ranges, lengths,
//! patterns, unknown fields and list-map keys.
//!
//! CEL rules (`x-kubernetes-validations`) are evaluated separately by kube's client-side CEL
//! engine (see [`crate::manifest`]); defaults are applied by it too. This module covers the
//! rest of what `kubectl apply` (with its default strict field validation) would reject, with
//! messages in the API server's words, each naming the field:
//!
//! ```text
//! spec.copyFrequency: Unsupported value: "10m": supported values: "30s", "5m", "15m"
//! spec.uploadConcurrency: Invalid value: 64: must be less than or equal to 32
//! spec.disks: Required value
//! spec.disk: Unknown field
//! ```
//!
//! # Caveats
//!
//! It knows the subset of OpenAPI v3 that structural CRD schemas use; `allOf`/`anyOf`/`oneOf`
//! (which Lifeboat's schemas do not use) are not evaluated.

use regex::Regex;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::fmt;

/// What is wrong with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldErrorKind {
    /// A required field is missing.
    Required,
    /// A field the schema does not know.
    Unknown,
    /// A value outside an enum.
    Unsupported,
    /// The wrong JSON type.
    WrongType,
    /// A value that breaks a bound, a length, a pattern or a format.
    Invalid,
    /// Two list items with the same key in a list-map.
    Duplicate,
}

/// One problem with one field of a resource, as the API server would report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field, e.g. `spec.disks[0].name`.
    pub path: String,
    /// What kind of problem.
    pub kind: FieldErrorKind,
    /// The API server's wording of the problem.
    pub detail: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.detail)
    }
}

/// Check `value` against an `openAPIV3Schema` node; `path` names `value` (e.g. `spec`).
///
/// Returns every problem found, in document order; an empty list means the value is
/// structurally valid.
pub fn check(schema: &Value, value: &Value, path: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    Walker {
        errors: &mut errors,
    }
    .walk(schema, value, path);
    errors
}

struct Walker<'a> {
    errors: &'a mut Vec<FieldError>,
}

/// A short rendering of a value for a message: JSON, cut to a readable length.
fn show(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 80 {
        let cut: String = text.chars().take(77).collect();
        format!("{cut}...")
    } else {
        text
    }
}

/// A schema bound for a message: `32`, not the `32.0` that schema generators write.
fn show_bound(bound: &Value) -> String {
    match bound.as_f64() {
        Some(n) if n.fract() == 0.0 && n.abs() < 1e15 => format!("{}", n as i64),
        _ => show(bound),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

impl Walker<'_> {
    fn push(&mut self, path: &str, kind: FieldErrorKind, detail: String) {
        self.errors.push(FieldError {
            path: path.to_owned(),
            kind,
            detail,
        });
    }

    fn walk(&mut self, schema: &Value, value: &Value, path: &str) {
        let Some(schema) = schema.as_object() else {
            return;
        };
        if value.is_null() {
            if !flag(schema, "nullable") && schema.contains_key("type") {
                self.push(
                    path,
                    FieldErrorKind::WrongType,
                    "Invalid value: null: must not be null".into(),
                );
            }
            return;
        }
        if flag(schema, "x-kubernetes-int-or-string") {
            if !(value.is_string() || json_type(value) == "integer") {
                self.push(
                    path,
                    FieldErrorKind::WrongType,
                    format!(
                        "Invalid value: {}: must be an integer or a string",
                        show(value)
                    ),
                );
            }
            return;
        }
        if let Some(expected) = schema.get("type").and_then(Value::as_str) {
            let actual = json_type(value);
            let fits = actual == expected || (expected == "number" && actual == "integer");
            if !fits {
                self.push(
                    path,
                    FieldErrorKind::WrongType,
                    format!("Invalid value: {}: must be of type {expected}", show(value)),
                );
                return;
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
            && !allowed.contains(value)
        {
            let list = allowed.iter().map(show).collect::<Vec<_>>().join(", ");
            self.push(
                path,
                FieldErrorKind::Unsupported,
                format!(
                    "Unsupported value: {}: supported values: {list}",
                    show(value)
                ),
            );
            return;
        }
        match value {
            Value::Object(map) => self.walk_object(schema, map, path),
            Value::Array(items) => self.walk_array(schema, items, path),
            Value::String(s) => self.check_string(schema, s, value, path),
            Value::Number(_) => self.check_number(schema, value, path),
            Value::Bool(_) | Value::Null => {}
        }
    }

    fn walk_object(&mut self, schema: &Map<String, Value>, map: &Map<String, Value>, path: &str) {
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for field in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(field) {
                    self.push(
                        &join(path, field),
                        FieldErrorKind::Required,
                        "Required value".into(),
                    );
                }
            }
        }
        for (key, item) in map {
            let field_path = join(path, key);
            match (properties.and_then(|p| p.get(key)), additional) {
                (Some(sub), _) => self.walk(sub, item, &field_path),
                (None, Some(sub)) if sub.is_object() => self.walk(sub, item, &field_path),
                (None, Some(Value::Bool(true))) => {}
                // NB: an object schema with neither properties nor additionalProperties is
                // free-form only when it says so; `metadata` is checked elsewhere.
                (None, _) if preserve || (properties.is_none() && additional.is_none()) => {}
                (None, _) => {
                    self.push(&field_path, FieldErrorKind::Unknown, "Unknown field".into())
                }
            }
        }
        if let Some(min) = schema.get("minProperties").and_then(Value::as_u64)
            && (map.len() as u64) < min
        {
            self.push(
                path,
                FieldErrorKind::Invalid,
                format!("Invalid value: must have at least {min} properties"),
            );
        }
    }

    fn walk_array(&mut self, schema: &Map<String, Value>, items: &[Value], path: &str) {
        let len = items.len() as u64;
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && len < min
        {
            let detail = if len == 0 {
                "Required value".to_owned()
            } else {
                format!("Invalid value: {len}: must have at least {min} items")
            };
            let kind = if len == 0 {
                FieldErrorKind::Required
            } else {
                FieldErrorKind::Invalid
            };
            self.push(path, kind, detail);
        }
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && len > max
        {
            self.push(
                path,
                FieldErrorKind::Invalid,
                format!("Too many: {len}: must have at most {max} items"),
            );
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                self.walk(item_schema, item, &format!("{path}[{i}]"));
            }
        }
        let list_type = schema.get("x-kubernetes-list-type").and_then(Value::as_str);
        match list_type {
            Some("map") => {
                let keys: Vec<&str> = schema
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|k| k.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let mut seen = HashSet::new();
                for (i, item) in items.iter().enumerate() {
                    let key: Vec<String> = keys
                        .iter()
                        .map(|k| item.get(*k).map(show).unwrap_or_default())
                        .collect();
                    if !seen.insert(key.clone()) {
                        let shown = keys
                            .iter()
                            .zip(&key)
                            .map(|(k, v)| format!("\"{k}\":{v}"))
                            .collect::<Vec<_>>()
                            .join(",");
                        self.push(
                            &format!("{path}[{i}]"),
                            FieldErrorKind::Duplicate,
                            format!("Duplicate value: {{{shown}}}"),
                        );
                    }
                }
            }
            Some("set") => {
                let mut seen = HashSet::new();
                for (i, item) in items.iter().enumerate() {
                    if !seen.insert(item.to_string()) {
                        self.push(
                            &format!("{path}[{i}]"),
                            FieldErrorKind::Duplicate,
                            format!("Duplicate value: {}", show(item)),
                        );
                    }
                }
            }
            _ => {}
        }
    }

    fn check_string(&mut self, schema: &Map<String, Value>, s: &str, value: &Value, path: &str) {
        let len = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            let detail = if len == 0 {
                "Required value".to_owned()
            } else {
                format!(
                    "Invalid value: {}: must be at least {min} chars long",
                    show(value)
                )
            };
            let kind = if len == 0 {
                FieldErrorKind::Required
            } else {
                FieldErrorKind::Invalid
            };
            self.push(path, kind, detail);
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            self.push(
                path,
                FieldErrorKind::Invalid,
                format!("Too long: may not be more than {max} chars"),
            );
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            match Regex::new(pattern) {
                Ok(re) if re.is_match(s) => {}
                Ok(_) => self.push(
                    path,
                    FieldErrorKind::Invalid,
                    format!("Invalid value: {}: should match '{pattern}'", show(value)),
                ),
                Err(_) => self.push(
                    path,
                    FieldErrorKind::Invalid,
                    format!("the schema's pattern '{pattern}' does not compile"),
                ),
            }
        }
        if schema.get("format").and_then(Value::as_str) == Some("date-time") && !is_rfc3339(s) {
            self.push(
                path,
                FieldErrorKind::Invalid,
                format!(
                    "Invalid value: {}: must be an RFC 3339 date-time, e.g. 2026-01-02T03:04:05Z",
                    show(value)
                ),
            );
        }
    }

    fn check_number(&mut self, schema: &Map<String, Value>, value: &Value, path: &str) {
        let Some(n) = value.as_f64() else { return };
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            self.push(
                path,
                FieldErrorKind::Invalid,
                format!(
                    "Invalid value: {}: must be greater than or equal to {}",
                    show(value),
                    show_bound(&schema["minimum"])
                ),
            );
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            self.push(
                path,
                FieldErrorKind::Invalid,
                format!(
                    "Invalid value: {}: must be less than or equal to {}",
                    show(value),
                    show_bound(&schema["maximum"])
                ),
            );
        }
        if let Some(step) = schema.get("multipleOf").and_then(Value::as_f64)
            && step > 0.0
            && (n / step).fract() != 0.0
        {
            self.push(
                path,
                FieldErrorKind::Invalid,
                format!(
                    "Invalid value: {}: must be a multiple of {}",
                    show(value),
                    show_bound(&schema["multipleOf"])
                ),
            );
        }
    }
}

fn flag(schema: &Map<String, Value>, key: &str) -> bool {
    schema.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn is_rfc3339(s: &str) -> bool {
    static PATTERN: std::sync::OnceLock<Option<Regex>> = std::sync::OnceLock::new();
    PATTERN
        .get_or_init(|| {
            Regex::new(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
                .ok()
        })
        .as_ref()
        .is_some_and(|re| re.is_match(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["mode", "items"],
            "properties": {
                "mode": {"type": "string", "enum": ["A", "B"]},
                "count": {"type": "integer", "minimum": 1, "maximum": 32},
                "size": {"type": "integer", "multipleOf": 4096},
                "name": {"type": "string", "minLength": 3, "maxLength": 5, "pattern": "^[a-z]+$"},
                "when": {"type": "string", "format": "date-time", "nullable": true},
                "items": {
                    "type": "array", "minItems": 1, "maxItems": 2,
                    "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                    "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
                },
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}}
            }
        })
    }

    fn errors(value: Value) -> Vec<String> {
        check(&schema(), &value, "spec")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_valid_value_has_no_errors() {
        let ok = json!({"mode": "A", "count": 4, "size": 8192, "name": "abc", "when": "2026-01-02T03:04:05Z",
                        "items": [{"name": "x"}, {"name": "y"}], "free": {"anything": [1]}, "labels": {"a": "b"}});
        assert_eq!(errors(ok), Vec::<String>::new());
        assert_eq!(
            errors(json!({"mode": "B", "items": [{"name": "x"}], "when": null})),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_problem_names_its_field() {
        assert_eq!(
            errors(json!({"items": [{"name": "x"}]})),
            ["spec.mode: Required value"]
        );
        assert_eq!(
            errors(json!({"mode": "C", "items": [{"name": "x"}]})),
            [r#"spec.mode: Unsupported value: "C": supported values: "A", "B""#]
        );
        assert_eq!(
            errors(json!({"mode": "A", "count": 64, "items": [{"name": "x"}]})),
            ["spec.count: Invalid value: 64: must be less than or equal to 32"]
        );
        assert_eq!(
            errors(json!({"mode": "A", "count": 0, "items": [{"name": "x"}]})),
            ["spec.count: Invalid value: 0: must be greater than or equal to 1"]
        );
        assert_eq!(
            errors(json!({"mode": "A", "count": "4", "items": [{"name": "x"}]})),
            [r#"spec.count: Invalid value: "4": must be of type integer"#]
        );
        assert_eq!(
            errors(json!({"mode": "A", "count": 4.5, "items": [{"name": "x"}]})),
            ["spec.count: Invalid value: 4.5: must be of type integer"]
        );
        assert_eq!(
            errors(json!({"mode": "A", "size": 1000, "items": [{"name": "x"}]})),
            ["spec.size: Invalid value: 1000: must be a multiple of 4096"]
        );
        assert_eq!(
            errors(json!({"mode": "A", "items": [{"name": "x"}], "colour": 1})),
            ["spec.colour: Unknown field"]
        );
        assert_eq!(
            errors(json!({"mode": "A", "items": [{"name": "x", "nmae": "y"}]})),
            ["spec.items[0].nmae: Unknown field"]
        );
        assert_eq!(
            errors(json!({"mode": "A", "items": []})),
            ["spec.items: Required value"]
        );
        assert_eq!(
            errors(json!({"mode": "A", "items": [{"name": "x"}, {"name": "y"}, {"name": "z"}]})),
            ["spec.items: Too many: 3: must have at most 2 items"]
        );
        assert_eq!(
            errors(json!({"mode": "A", "items": [{"name": "x"}, {"name": "x"}]})),
            [r#"spec.items[1]: Duplicate value: {"name":"x"}"#]
        );
        assert_eq!(
            errors(json!({"mode": "A", "items": [{"name": "x"}], "name": "ab"})),
            [r#"spec.name: Invalid value: "ab": must be at least 3 chars long"#]
        );
        assert_eq!(
            errors(json!({"mode": "A", "items": [{"name": "x"}], "name": "abcdef"})),
            ["spec.name: Too long: may not be more than 5 chars"]
        );
        assert_eq!(
            errors(json!({"mode": "A", "items": [{"name": "x"}], "name": "AB1"})),
            [r#"spec.name: Invalid value: "AB1": should match '^[a-z]+$'"#]
        );
        assert_eq!(
            errors(json!({"mode": "A", "items": [{"name": "x"}], "when": "tomorrow"})),
            [
                r#"spec.when: Invalid value: "tomorrow": must be an RFC 3339 date-time, e.g. 2026-01-02T03:04:05Z"#
            ]
        );
        assert_eq!(
            errors(json!({"mode": "A", "items": [{"name": "x"}], "labels": {"a": 1}})),
            ["spec.labels.a: Invalid value: 1: must be of type string"]
        );
        assert_eq!(
            errors(json!({"mode": null, "items": [{"name": "x"}]})),
            ["spec.mode: Invalid value: null: must not be null"]
        );
    }

    #[test]
    fn every_problem_is_reported_not_only_the_first() {
        let found = errors(json!({"mode": "C", "count": 99, "extra": true}));
        assert_eq!(found.len(), 4, "{found:?}");
    }
}
