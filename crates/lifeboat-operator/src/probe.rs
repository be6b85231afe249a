//! Whether a policy's remote target answers: a TCP connection to the account's endpoint.
//! (A local target is a folder on the nodes; the agents check it where it lives.)
//!
//! NB: a connection, not a request: the operator holds no storage credential (least
//! privilege), and a refused or timed-out connection is what `TargetUnreachable` is for.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;

/// Checks that an account URL answers.
pub trait TargetProbe: fmt::Debug + Send + Sync {
    /// `Ok` when a connection to the URL's host and port succeeds, else why not.
    fn probe<'a>(&'a self, account_url: &'a str) -> BoxFuture<'a, Result<(), String>>;
}

/// The production probe: a TCP connection with a timeout.
#[derive(Clone, Copy, Debug)]
pub struct TcpProbe {
    /// How long a connection may take.
    pub timeout: Duration,
}

impl Default for TcpProbe {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
        }
    }
}

/// The `host:port` of an `http(s)://host[:port]/...` URL.
pub fn host_port(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    if authority.is_empty() {
        return None;
    }
    let port = if authority.starts_with('[') {
        authority.rsplit_once("]:").map(|(_, port)| port)
    } else {
        authority.rsplit_once(':').map(|(_, port)| port)
    };
    let has_port = port.is_some_and(|p| p.parse::<u16>().is_ok());
    if has_port {
        Some(authority.to_owned())
    } else {
        let port = if scheme == "http" { 80 } else { 443 };
        Some(format!("{authority}:{port}"))
    }
}

impl TargetProbe for TcpProbe {
    fn probe<'a>(&'a self, account_url: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let Some(address) = host_port(account_url) else {
                return Err(format!("{account_url}: no host in the URL"));
            };
            match tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(&address)).await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("connect to {address}: {e}")),
                Err(_) => Err(format!(
                    "connect to {address}: no answer in {}s",
                    self.timeout.as_secs()
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_of_account_urls() {
        assert_eq!(
            host_port("https://acct.blob.core.windows.net").as_deref(),
            Some("acct.blob.core.windows.net:443")
        );
        assert_eq!(
            host_port("http://127.0.0.1:10000/devstoreaccount1").as_deref(),
            Some("127.0.0.1:10000")
        );
        assert_eq!(
            host_port("http://[::1]:10000/x").as_deref(),
            Some("[::1]:10000")
        );
        assert_eq!(host_port("https://[::1]/x").as_deref(), Some("[::1]:443"));
        assert_eq!(host_port("nonsense"), None);
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_and_an_open_one_answers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let probe = TcpProbe::default();
        assert_eq!(
            probe.probe(&format!("http://127.0.0.1:{port}/a")).await,
            Ok(())
        );
        drop(listener);
        let refused = probe.probe(&format!("http://127.0.0.1:{port}/a")).await;
        assert!(refused.is_err_and(|e| e.contains(&format!("127.0.0.1:{port}"))));
    }
}
