//! Requests as the Kubernetes authorizer sees them: who asked, with which verb, for which
//! resource and subresource, in which namespace, on which name. The test API server records
//! one for every request it receives ([`crate::apiserver::TestApiServer::requests`]), so that
//! `tests/deploy.rs` can hold the chart's RBAC against the calls the code really makes.
//!
//! ```text
//!  GET    /apis/lifeboat.io/v1alpha1/protectedvms?watch=true          -> watch protectedvms (all namespaces)
//!  PATCH  /apis/lifeboat.io/v1alpha1/namespaces/ns/replicationjobs/j/status -> patch replicationjobs/status in ns, name j
//!  GET    /api/v1/namespaces/ns/secrets/s                              -> get secrets in ns, name s
//! ```

use std::collections::HashMap;

use http::{HeaderMap, Method, Uri};

/// One request in the authorizer's terms.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApiRequest {
    /// The user: the `Impersonate-User` header (how a test client acts as a ServiceAccount),
    /// else the `User-Agent`.
    pub user: String,
    /// get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// The API group (empty for the core group).
    pub group: String,
    /// The resource's plural.
    pub resource: String,
    /// `status`, or empty.
    pub subresource: String,
    /// Empty for a cluster-wide request.
    pub namespace: String,
    /// Empty for a collection.
    pub name: String,
}

impl ApiRequest {
    /// `resource` or `resource/subresource`, as RBAC rules name it.
    pub fn rbac_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// An API group as people write it: the core group (`""`) as `core`.
pub fn group_label(group: &str) -> &str {
    if group.is_empty() { "core" } else { group }
}

impl std::fmt::Display for ApiRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = group_label(&self.group);
        write!(
            f,
            "{} {} {group}/{}",
            self.user,
            self.verb,
            self.rbac_resource()
        )?;
        match (self.namespace.as_str(), self.name.as_str()) {
            ("", "") => write!(f, " (all namespaces)"),
            ("", name) => write!(f, " {name}"),
            (ns, "") => write!(f, " in {ns}"),
            (ns, name) => write!(f, " {ns}/{name}"),
        }
    }
}

/// The request of `method` on `uri` with `headers`; `None` for a path that is not a resource
/// (discovery, /version).
pub fn api_request(method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<ApiRequest> {
    let parts: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (*ns, rest),
        rest => ("", rest),
    };
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, "", ""),
        [resource, name] => (*resource, *name, ""),
        [resource, name, sub] => (*resource, *name, *sub),
        _ => return None,
    };
    let watch = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .collect::<HashMap<_, _>>()
        .get("watch")
        .is_some_and(|w| *w == "true" || *w == "1");
    let verb = match (method.as_str(), name.is_empty()) {
        ("GET", true) if watch => "watch",
        ("GET", true) => "list",
        ("GET", false) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "deletecollection",
        ("DELETE", false) => "delete",
        (other, _) => other,
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Some(ApiRequest {
        user: header("impersonate-user")
            .or_else(|| header("user-agent"))
            .unwrap_or_default(),
        verb: verb.to_ascii_lowercase(),
        group: group.to_owned(),
        resource: resource.to_owned(),
        subresource: subresource.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, uri: &str) -> Option<ApiRequest> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "impersonate-user",
            http::HeaderValue::from_static("system:serviceaccount:ns:sa"),
        );
        api_request(&method, &uri.parse().unwrap_or_default(), &headers)
    }

    #[test]
    fn paths_become_verbs_and_resources() {
        let watch = request(
            Method::GET,
            "/apis/lifeboat.io/v1alpha1/protectedvms?watch=true&fieldSelector=spec.nodeName%3Dn",
        );
        assert_eq!(
            watch.map(|r| r.to_string()),
            Some(
                "system:serviceaccount:ns:sa watch lifeboat.io/protectedvms (all namespaces)"
                    .into()
            )
        );
        let claim = request(
            Method::PATCH,
            "/apis/lifeboat.io/v1alpha1/namespaces/vms/replicationjobs/j/status",
        );
        assert_eq!(
            claim.map(|r| (r.rbac_resource(), r.verb, r.namespace, r.name)),
            Some((
                "replicationjobs/status".into(),
                "patch".into(),
                "vms".into(),
                "j".into()
            ))
        );
        let secret = request(Method::GET, "/api/v1/namespaces/vms/secrets/s");
        assert_eq!(
            secret.map(|r| (r.verb, r.group, r.resource)),
            Some(("get".into(), String::new(), "secrets".into()))
        );
        let namespace = request(Method::DELETE, "/api/v1/namespaces/vms");
        assert_eq!(
            namespace.map(|r| (r.verb, r.resource, r.name)),
            Some(("delete".into(), "namespaces".into(), "vms".into()))
        );
        assert_eq!(
            request(
                Method::GET,
                "/apis/coordination.k8s.io/v1/namespaces/l/leases"
            )
            .map(|r| r.verb),
            Some("list".into())
        );
        assert!(request(Method::GET, "/version").is_none());
    }
}
