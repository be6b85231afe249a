//! Token credentials, tested without Entra ID: workload identity's token request through a
//! transport that records it, and the store's bearer-token path end to end against an
//! Azurite that serves https and checks tokens (`--oauth basic`: issuer, audience and
//! lifetime, not the signature), with tokens from a test double.
//!
//! Both need settings that are read from the environment when a client is built (the
//! `AZURE_*` variables of workload identity, `SSL_CERT_FILE` for the test certificate), so
//! each runs its body in a child process of the test binary ([`rerun_in_child`]).

use super::*;
use crate::At;
use crate::testing::{Azurite, DEV_ACCOUNT, is_child_for, rerun_in_child, test_options};
use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::http::headers::Headers;
use azure_core::http::{AsyncRawResponse, Body, HttpClient, Request, StatusCode, Transport};
use base64::Engine as _;
use std::collections::BTreeMap;
use std::ffi::OsStr;

const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";
const TENANT: &str = "0b3c6a5e-9c1f-4d7a-8e2b-5f4a3c2d1e0f";
const ACCOUNT_URL_VAR: &str = "LIFEBOAT_TEST_ACCOUNT_URL";

// ---- workload identity ----

/// A test double of Entra ID's token endpoint: an HTTP transport that records each request's
/// URL and form fields and answers every one with the token `token-from-the-test-double`.
#[derive(Debug, Default)]
struct RecordingTokenEndpoint {
    requests: Mutex<Vec<(Url, BTreeMap<String, String>)>>,
}

#[async_trait]
impl HttpClient for RecordingTokenEndpoint {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let Body::Bytes(body) = request.body() else {
            panic!("the token request has a streamed body");
        };
        let mut form = Url::parse("http://form.invalid/").expect("url");
        form.set_query(Some(std::str::from_utf8(body).expect("a text form")));
        let fields = form.query_pairs().into_owned().collect();
        self.requests
            .lock()
            .expect("lock")
            .push((request.url().clone(), fields));
        let answer = r#"{"token_type":"Bearer","expires_in":3600,"ext_expires_in":3600,"access_token":"token-from-the-test-double"}"#;
        Ok(AsyncRawResponse::from_bytes(
            StatusCode::Ok,
            Headers::default(),
            answer,
        ))
    }
}

/// The token request of workload identity names the policy's client id when the policy has
/// one, over the webhook's `AZURE_CLIENT_ID`, and the environment's otherwise; the tenant and
/// the service account token come from the environment either way.
#[tokio::test]
async fn workload_identity_asks_for_the_policys_client_id_over_the_environments() {
    const TEST: &str = concat!(
        module_path!(),
        "::workload_identity_asks_for_the_policys_client_id_over_the_environments"
    );
    if !is_child_for(TEST) {
        let dir = tempfile::tempdir().expect("tempdir");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "service-account-token").expect("write the token file");
        rerun_in_child(
            TEST,
            &[
                ("AZURE_TENANT_ID", OsStr::new(TENANT)),
                ("AZURE_CLIENT_ID", OsStr::new("client-of-the-environment")),
                ("AZURE_FEDERATED_TOKEN_FILE", token_file.as_os_str()),
                (
                    "AZURE_AUTHORITY_HOST",
                    OsStr::new("https://login.test.invalid"),
                ),
            ],
        );
        return;
    }
    // The public constructor builds from this environment (its token request would leave
    // the machine, so it is not sent).
    Credentials::workload_identity(Some("client-of-the-policy".into()))
        .expect("workload identity from the environment");

    for (policy, expected) in [
        (Some("client-of-the-policy"), "client-of-the-policy"),
        (None, "client-of-the-environment"),
    ] {
        let endpoint = Arc::new(RecordingTokenEndpoint::default());
        let options = ClientOptions {
            transport: Some(Transport::new(endpoint.clone())),
            ..Default::default()
        };
        let Credentials::TokenCredential(credential) =
            Credentials::workload_identity_with(policy.map(str::to_owned), options)
                .expect("workload identity")
        else {
            panic!("workload identity is a token credential");
        };
        let token = credential
            .get_token(&[STORAGE_SCOPE], None)
            .await
            .expect("a token");
        assert_eq!(token.token.secret(), "token-from-the-test-double");

        let requests = endpoint.requests.lock().expect("lock");
        let [(url, form)] = requests.as_slice() else {
            panic!("one token request, not {requests:?}");
        };
        assert_eq!(
            url.as_str(),
            format!("https://login.test.invalid/{TENANT}/oauth2/v2.0/token")
        );
        assert_eq!(form.get("client_id").map(String::as_str), Some(expected));
        assert_eq!(
            form.get("client_assertion").map(String::as_str),
            Some("service-account-token")
        );
        assert_eq!(form.get("scope").map(String::as_str), Some(STORAGE_SCOPE));
    }
}

// ---- bearer tokens against Azurite ----

/// A test double of an Entra ID credential: it hands out an unsigned JWT (`alg: none`) with
/// the claims Azurite's `--oauth basic` checks (an Entra issuer, an audience, a lifetime), and
/// records the scopes it is asked for. The token always claims to be valid for an hour, so
/// the SDK keeps using it and only the service judges it.
#[derive(Debug)]
struct UnsignedJwtCredential {
    audience: &'static str,
    /// When the token stops being valid, in seconds from now (negative: already expired).
    expires_in_secs: i64,
    scopes: Mutex<Vec<String>>,
}

impl UnsignedJwtCredential {
    fn new(audience: &'static str, expires_in_secs: i64) -> Arc<UnsignedJwtCredential> {
        Arc::new(UnsignedJwtCredential {
            audience,
            expires_in_secs,
            scopes: Mutex::new(Vec::new()),
        })
    }

    fn jwt(&self) -> String {
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_secs(),
        )
        .expect("time");
        let exp = now + self.expires_in_secs;
        let claims = serde_json::json!({
            "aud": self.audience,
            "iss": format!("https://sts.windows.net/{TENANT}/"),
            "iat": exp.min(now) - 60,
            "nbf": exp.min(now) - 60,
            "exp": exp,
        });
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let header = serde_json::json!({"alg": "none", "typ": "JWT"});
        format!("{}.{}.", b64(&header), b64(&claims))
    }
}

#[async_trait]
impl TokenCredential for UnsignedJwtCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        self.scopes
            .lock()
            .expect("lock")
            .extend(scopes.iter().map(|s| (*s).to_owned()));
        Ok(AccessToken::new(
            self.jwt(),
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

fn token_store(account_url: &str, credential: Arc<UnsignedJwtCredential>) -> AzureStore {
    AzureStore::new(
        account_url,
        "tokens",
        Credentials::TokenCredential(credential),
        test_options(2),
    )
    .expect("store")
}

/// The bearer-token path end to end over https: a round trip (container, disk, write,
/// flush, recovery point, reads back, live and at the point) with a token the service
/// accepts; an expired token and one for another audience are refused as AccessDenied naming
/// the store. Without the test certificate among the trusted roots, the same store cannot
/// connect at all (so the https is real).
#[tokio::test]
async fn a_token_credential_replicates_over_https_and_a_bad_token_is_access_denied() {
    const TEST: &str = concat!(
        module_path!(),
        "::a_token_credential_replicates_over_https_and_a_bad_token_is_access_denied"
    );
    if !is_child_for(TEST) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (azurite, cert) = Azurite::start_https_oauth(dir.path());
        let account_url = azurite.account_url();
        assert!(account_url.starts_with("https://"), "{account_url}");
        rerun_in_child(
            TEST,
            &[
                ("SSL_CERT_FILE", cert.as_os_str()),
                (ACCOUNT_URL_VAR, OsStr::new(&account_url)),
            ],
        );
        let untrusted = token_store(
            &account_url,
            UnsignedJwtCredential::new("https://storage.azure.com", 3600),
        );
        let err = untrusted
            .ensure_container()
            .await
            .expect_err("the test certificate is not trusted here");
        assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
        return;
    }
    let account_url = std::env::var(ACCOUNT_URL_VAR).expect("the account URL");
    let credential = UnsignedJwtCredential::new("https://storage.azure.com", 3600);
    let store = token_store(&account_url, credential.clone());
    assert!(format!("{store:?}").contains("token"), "{store:?}");
    store
        .ensure_container()
        .await
        .expect("create the container");
    store.check_writable().await.expect("writable");
    let vm = VmKey::new("tests", "token").expect("vm key");
    let size = 2 * 1024 * 1024;
    store.create_disk(&vm, "root", size).await.expect("create");
    let first = Bytes::from(crate::conformance::pattern(1, 64 * 1024));
    store
        .write(&vm, "root", 4096, first.clone())
        .await
        .expect("write");
    store.flush(&vm).await.expect("flush");
    let point = store
        .cut_point(
            &vm,
            crate::NewPoint {
                time_unix_ms: 1_000,
                cycle: 1,
                consistency: crate::Consistency::CrashConsistent,
                digests: [(
                    "root".to_owned(),
                    crate::conformance::digest_of(&[0u8; 512]),
                )]
                .into(),
                written_by: String::new(),
            },
        )
        .await
        .expect("cut a point");
    store
        .write(
            &vm,
            "root",
            4096,
            Bytes::from(crate::conformance::pattern(2, 64 * 1024)),
        )
        .await
        .expect("overwrite");
    let at_point = store
        .read(&vm, "root", &At::Point(point.id.clone()), 4096, 64 * 1024)
        .await
        .expect("read at the point");
    assert_eq!(at_point, first);
    let live = store
        .read(&vm, "root", &At::Live, 4096, 64 * 1024)
        .await
        .expect("read live");
    assert_eq!(live, Bytes::from(crate::conformance::pattern(2, 64 * 1024)));
    assert!(
        credential
            .scopes
            .lock()
            .expect("lock")
            .iter()
            .all(|s| s == STORAGE_SCOPE),
        "the store asks for storage tokens only"
    );

    for (audience, expires_in_secs, why) in [
        ("https://storage.azure.com", -600, "an expired token"),
        (
            "https://vault.azure.net",
            3600,
            "a token for another audience",
        ),
    ] {
        let bad = UnsignedJwtCredential::new(audience, expires_in_secs);
        let token = bad.jwt();
        let store = token_store(&account_url, bad);
        for err in [
            store
                .read(&vm, "root", &At::Live, 0, 512)
                .await
                .expect_err(why),
            store
                .create_disk(
                    &VmKey::new("tests", "refused").expect("vm key"),
                    "root",
                    size,
                )
                .await
                .expect_err(why),
        ] {
            assert!(
                matches!(&err, StoreError::AccessDenied { store, detail, .. }
                    if store.contains(DEV_ACCOUNT)
                        && store.contains("tokens")
                        && detail.contains("AuthenticationFailed")),
                "{why}: {err:?}"
            );
            assert!(!err.is_recoverable());
            assert!(!format!("{err:?}").contains(&token), "{err:?}");
        }
    }
}
