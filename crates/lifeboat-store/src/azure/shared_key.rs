//! Shared Key authorization and SAS signing with an account key: the official
//! `azure_storage_blob` crate signs with Entra tokens only, so this module carries the
//! documented algorithms ("Authorize with Shared Key", "Create an account SAS").
//!
//! ```text
//!   request --> [SharedKeyPolicy: x-ms-date, Authorization: SharedKey account:HMAC(string-to-sign)] --> transport
//! ```
//!
//! The string-to-sign and the SAS are pure functions of their inputs, tested against vectors
//! built from the documentation and cross-checked by real requests to Azurite. The key is
//! held decoded, never formatted: [`AccountKey`]'s `Debug` names only the account.

use async_trait::async_trait;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{Context, Request, Url};
use azure_core::time::{OffsetDateTime, to_rfc7231};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// The standard headers that enter the string-to-sign, in its order (after the verb).
const SIGNED_STANDARD_HEADERS: [&str; 11] = [
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
];

/// A storage account's name and decoded key.
#[derive(Clone)]
pub struct AccountKey {
    account: String,
    key: Arc<[u8]>,
}

impl fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountKey")
            .field("account", &self.account)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl AccountKey {
    /// An account's key, as the portal shows it (base64).
    ///
    /// # Errors
    ///
    /// A message naming the account when the key is not base64 (the key itself is not quoted).
    pub fn new(account: &str, key_base64: &str) -> Result<AccountKey, String> {
        let key = BASE64
            .decode(key_base64.trim())
            .map_err(|_| format!("the key of storage account {account:?} is not valid base64"))?;
        Ok(AccountKey {
            account: account.to_owned(),
            key: key.into(),
        })
    }

    /// The account's name.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// HMAC-SHA256 of `text` with the key, base64.
    pub fn sign(&self, text: &str) -> String {
        // NB: HMAC takes keys of any length, so `new_from_slice` cannot fail here.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.key) else {
            return String::new();
        };
        mac.update(text.as_bytes());
        BASE64.encode(mac.finalize().into_bytes())
    }
}

/// The Shared Key string-to-sign of a request (service version 2009-09-19 and later).
///
/// `headers` are the request's headers (any case); `content_length` is the body's length
/// when no `content-length` header says it. The canonicalized resource is `/account` followed
/// by the URL's (encoded) path, then each query parameter as `\nname:value`, names lowercased
/// and sorted, values decoded, repeated names' values sorted and joined by commas.
pub fn string_to_sign(
    account: &str,
    method: &str,
    url: &Url,
    headers: &[(String, String)],
    content_length: Option<u64>,
) -> String {
    let header = |name: &str| -> String {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    let mut out = String::with_capacity(256);
    out.push_str(&method.to_ascii_uppercase());
    out.push('\n');
    for name in SIGNED_STANDARD_HEADERS {
        let mut value = header(name);
        if name == "content-length" {
            if value.is_empty() {
                value = content_length.map(|n| n.to_string()).unwrap_or_default();
            }
            // NB: since version 2015-02-21 a zero length is signed as an empty line.
            if value == "0" {
                value.clear();
            }
        }
        out.push_str(&value);
        out.push('\n');
    }
    // Canonicalized headers: every x-ms-*, lowercased, sorted, whitespace folded.
    let mut ms: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        if name.starts_with("x-ms-") {
            let folded = value.split_whitespace().collect::<Vec<_>>().join(" ");
            ms.insert(name, folded);
        }
    }
    for (name, value) in &ms {
        out.push_str(name);
        out.push(':');
        out.push_str(value);
        out.push('\n');
    }
    // Canonicalized resource.
    out.push('/');
    out.push_str(account);
    out.push_str(url.path());
    let mut params: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in url.query_pairs() {
        params
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(value.into_owned());
    }
    for (name, mut values) in params {
        values.sort();
        out.push('\n');
        out.push_str(&name);
        out.push(':');
        out.push_str(&values.join(","));
    }
    out
}

/// The `Authorization` header value for a string-to-sign.
pub fn authorization(key: &AccountKey, string_to_sign: &str) -> String {
    format!("SharedKey {}:{}", key.account, key.sign(string_to_sign))
}

/// An `azure_core` per-try pipeline policy that dates and signs every request with Shared
/// Key (so each retry carries a fresh date and signature).
#[derive(Debug)]
pub struct SharedKeyPolicy {
    key: AccountKey,
}

impl SharedKeyPolicy {
    /// A policy signing with `key`.
    pub fn new(key: AccountKey) -> SharedKeyPolicy {
        SharedKeyPolicy { key }
    }
}

#[async_trait]
impl Policy for SharedKeyPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        request.insert_header("x-ms-date", to_rfc7231(&OffsetDateTime::now_utc()));
        let headers: Vec<(String, String)> = request
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_str().to_owned()))
            .collect();
        let to_sign = string_to_sign(
            &self.key.account,
            request.method().as_ref(),
            request.url(),
            &headers,
            request.body().len(),
        );
        request.insert_header("authorization", authorization(&self.key, &to_sign));
        match next.split_first() {
            Some((first, rest)) => first.send(ctx, request, rest).await,
            None => Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Other,
                "shared key policy is the last in the pipeline",
            )),
        }
    }
}

/// What an account SAS grants (the `sp`, `ss`, `srt` fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountSasGrant {
    /// Permissions, in the documented order, e.g. `racwdl`.
    pub permissions: String,
    /// Services, e.g. `b` for Blob.
    pub services: String,
    /// Resource types, e.g. `sco` (service, container, object).
    pub resource_types: String,
    /// Expiry, ISO 8601 UTC to the second, e.g. `2030-01-01T00:00:00Z`.
    pub expiry: String,
    /// Service version the SAS is signed for (`sv`), 2020-12-06 or later.
    pub version: String,
}

/// The account SAS string-to-sign (version 2020-12-06 and later): account, permissions,
/// services, resource types, start, expiry, IP, protocol, version, encryption scope, each
/// followed by a newline.
pub fn account_sas_string_to_sign(account: &str, grant: &AccountSasGrant) -> String {
    format!(
        "{account}\n{}\n{}\n{}\n\n{}\n\n\n{}\n\n",
        grant.permissions, grant.services, grant.resource_types, grant.expiry, grant.version
    )
}

/// An account SAS token (the query string, without `?`) signed with `key`.
pub fn account_sas(key: &AccountKey, grant: &AccountSasGrant) -> String {
    let signature = key.sign(&account_sas_string_to_sign(&key.account, grant));
    [
        ("sv", grant.version.as_str()),
        ("ss", &grant.services),
        ("srt", &grant.resource_types),
        ("sp", &grant.permissions),
        ("se", &grant.expiry),
        ("sig", &signature),
    ]
    .iter()
    .map(|(name, value)| format!("{name}={}", percent_encode(value)))
    .collect::<Vec<_>>()
    .join("&")
}

/// The service SAS string-to-sign for a container (`sr=c`, version 2020-12-06 and later):
/// permissions, start, expiry, `/blob/ACCOUNT/CONTAINER`, identifier, IP, protocol, version,
/// resource, snapshot time, encryption scope and the five response-header overrides, joined by
/// newlines.
pub fn container_sas_string_to_sign(
    account: &str,
    container: &str,
    permissions: &str,
    expiry: &str,
    version: &str,
) -> String {
    format!(
        "{permissions}\n\n{expiry}\n/blob/{account}/{container}\n\n\n\n{version}\nc\n\n\n\n\n\n\n"
    )
}

/// A service SAS token for a whole container (the query string, without `?`), signed with
/// `key`: what an operator hands a node agent that should touch one container only.
pub fn container_sas(
    key: &AccountKey,
    container: &str,
    permissions: &str,
    expiry: &str,
    version: &str,
) -> String {
    let signature = key.sign(&container_sas_string_to_sign(
        &key.account,
        container,
        permissions,
        expiry,
        version,
    ));
    [
        ("sv", version),
        ("sr", "c"),
        ("sp", permissions),
        ("se", expiry),
        ("sig", &signature),
    ]
    .iter()
    .map(|(name, value)| format!("{name}={}", percent_encode(value)))
    .collect::<Vec<_>>()
    .join("&")
}

/// Percent-encode everything but RFC 3986's unreserved characters.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Azurite's well-known development key (public, documented).
    const DEV_KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// A Put Page, laid out by hand from the documented algorithm: the verb, eleven standard
    /// headers (a zero length signed as empty), the sorted `x-ms-` headers, and the path-style
    /// resource (account, then the path that starts with the account again) with its sorted
    /// query.
    #[test]
    fn string_to_sign_follows_the_documented_layout() {
        let url = Url::parse(
            "http://127.0.0.1:10000/devstoreaccount1/c/ns/vm/disks/root.vhd?timeout=30&comp=page",
        )
        .expect("test value");
        let headers = h(&[
            ("Content-Length", "512"),
            ("x-ms-version", "2026-02-06"),
            ("x-ms-date", "Sat, 28 Nov 2026 19:05:12 GMT"),
            ("x-ms-page-write", "update"),
            ("range", "bytes=0-511"),
            ("X-MS-Client-Request-Id", "  abc   def "),
            ("user-agent", "ignored"),
        ]);
        let expected = "PUT\n\n\n512\n\n\n\n\n\n\n\nbytes=0-511\n\
            x-ms-client-request-id:abc def\n\
            x-ms-date:Sat, 28 Nov 2026 19:05:12 GMT\n\
            x-ms-page-write:update\n\
            x-ms-version:2026-02-06\n\
            /devstoreaccount1/devstoreaccount1/c/ns/vm/disks/root.vhd\ncomp:page\ntimeout:30";
        assert_eq!(
            string_to_sign("devstoreaccount1", "put", &url, &headers, None),
            expected
        );

        // A zero length is an empty line; a body without a header signs its length.
        let get = Url::parse("http://h/devstoreaccount1/c?restype=container").expect("test value");
        let s = string_to_sign(
            "devstoreaccount1",
            "GET",
            &get,
            &h(&[("content-length", "0")]),
            None,
        );
        assert_eq!(
            s,
            "GET\n\n\n\n\n\n\n\n\n\n\n\n/devstoreaccount1/devstoreaccount1/c\nrestype:container"
        );
        let s = string_to_sign("a", "PUT", &get, &[], Some(7));
        assert!(s.starts_with("PUT\n\n\n7\n"), "{s}");
    }

    /// HMAC-SHA256 vector: RFC 4231 test case 2 ("Jefe"), so that `sign` is the primitive the
    /// service uses, keyed by the decoded (not the base64) key.
    #[test]
    fn signing_is_hmac_sha256_with_the_decoded_key() {
        let key = AccountKey::new("acct", &BASE64.encode(b"Jefe")).expect("test value");
        let mac = BASE64
            .decode(key.sign("what do ya want for nothing?"))
            .expect("test value");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let dev = AccountKey::new("devstoreaccount1", DEV_KEY).expect("test value");
        assert_eq!(
            authorization(&dev, "x"),
            format!("SharedKey devstoreaccount1:{}", dev.sign("x"))
        );
        assert!(
            AccountKey::new("acct", "not base64!")
                .expect_err("an error")
                .contains("acct")
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = AccountKey::new("devstoreaccount1", DEV_KEY).expect("test value");
        let shown = format!("{key:?} {:?}", SharedKeyPolicy::new(key.clone()));
        assert!(shown.contains("devstoreaccount1"));
        assert!(!shown.contains("Eby8vdM02"), "{shown}");
        assert!(!shown.contains("[18,"), "{shown}");
    }

    #[test]
    fn account_sas_signs_the_documented_fields() {
        let key = AccountKey::new("devstoreaccount1", DEV_KEY).expect("test value");
        let grant = AccountSasGrant {
            permissions: "racwdl".into(),
            services: "b".into(),
            resource_types: "sco".into(),
            expiry: "2030-01-01T00:00:00Z".into(),
            version: "2022-11-02".into(),
        };
        let to_sign = account_sas_string_to_sign("devstoreaccount1", &grant);
        assert_eq!(
            to_sign,
            "devstoreaccount1\nracwdl\nb\nsco\n\n2030-01-01T00:00:00Z\n\n\n2022-11-02\n\n"
        );
        let token = account_sas(&key, &grant);
        let sig = BASE64.encode(BASE64.decode(key.sign(&to_sign)).expect("test value"));
        let parsed: BTreeMap<String, String> = url_pairs(&token);
        assert_eq!(parsed["sig"], sig);
        assert_eq!(parsed["sp"], "racwdl");
        assert_eq!(parsed["se"], "2030-01-01T00:00:00Z");
        assert!(token.contains("se=2030-01-01T00%3A00%3A00Z"), "{token}");
    }

    #[test]
    fn container_sas_signs_the_documented_fields() {
        let key = AccountKey::new("devstoreaccount1", DEV_KEY).expect("test value");
        let to_sign = container_sas_string_to_sign(
            "devstoreaccount1",
            "c1",
            "racwdl",
            "2030-01-01T00:00:00Z",
            "2022-11-02",
        );
        assert_eq!(to_sign.split('\n').count(), 16);
        assert_eq!(
            to_sign,
            "racwdl\n\n2030-01-01T00:00:00Z\n/blob/devstoreaccount1/c1\n\n\n\n2022-11-02\nc\n\n\n\n\n\n\n"
        );
        let token = container_sas(&key, "c1", "racwdl", "2030-01-01T00:00:00Z", "2022-11-02");
        let parsed = url_pairs(&token);
        assert_eq!(parsed["sr"], "c");
        assert_eq!(parsed["sig"], key.sign(&to_sign));
    }

    fn url_pairs(query: &str) -> BTreeMap<String, String> {
        let url = Url::parse(&format!("http://x/?{query}")).expect("test value");
        url.query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }
}
