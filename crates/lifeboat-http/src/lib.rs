//! What every long-running Lifeboat process (the operator, the node agent) sets up the same
//! way: the HTTP endpoint for Prometheus and the kubelet's probes, the process's one rustls
//! crypto provider, and the stop signal.
//!
//! ```text
//!  GET /metrics ──> MetricsText::encode     GET /healthz ──> ok     GET /readyz ──> ready flag
//! ```
//!
//! A crate of its own so that the deployed agent does not link the operator to get them.

pub mod endpoint;

pub use endpoint::{MetricsText, serve};

use futures::FutureExt;

/// Install the process's rustls crypto provider (aws-lc-rs, the one the Azure SDK uses too).
///
/// NB: with more than one provider compiled in, rustls cannot choose and panics at the first
/// TLS connection; installing one explicitly makes the choice, whatever the build pulls in.
pub fn install_crypto_provider() {
    // An Err only says one is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Resolves at the first SIGTERM (the kubelet's stop) or Ctrl+C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c().map(|_| ());
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                futures::future::select(ctrl_c.boxed(), Box::pin(async move { term.recv().await }))
                    .await;
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}
