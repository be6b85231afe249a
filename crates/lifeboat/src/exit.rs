//! The exit status of the `lifeboat` command: what scripts can tell apart.

use std::process::ExitCode;

/// An error (a bad manifest, an unknown VM, a state folder that cannot be read).
pub const ERROR: u8 = 1;
/// A usage error: clap's own (an unknown option, a missing argument).
#[allow(dead_code, reason = "clap exits with it by itself")]
pub const USAGE: u8 = 2;
/// The job that handles a request failed.
pub const JOB_FAILED: u8 = 3;
/// The request was not handled within `--timeout-seconds`.
pub const TIMEOUT: u8 = 4;
/// The API server could not be reached, or refused or failed a call (cluster mode).
pub const API: u8 = 5;
/// A destructive request was not confirmed (no `y` on the terminal, or no terminal and no
/// `--yes`): nothing was requested.
pub const NOT_CONFIRMED: u8 = 6;

/// The exit codes as `--help` and the README list them.
pub const HELP: &str = "\
Exit status:
  0  success
  1  error (a bad manifest, an unknown VM, a state folder that cannot be read)
  2  usage error (an unknown option, a missing argument)
  3  the job that handles the request failed
  4  timed out waiting for the request (--timeout-seconds)
  5  API server or connection error (cluster mode)
  6  not confirmed: commit and unplanned failover ask y/N on a terminal; elsewhere they need --yes

Mode: cluster when a kubeconfig is found (--kubeconfig, KUBECONFIG, ~/.kube/config, or
in-cluster) and no state folder is given (--state-dir, LIFEBOAT_STATE_DIR); standalone
otherwise. --cluster or --standalone decide. As `kubectl lifeboat`, cluster by default.";

/// An error with its exit code.
#[derive(Debug)]
pub struct Exit {
    /// The process's exit code.
    pub code: u8,
    /// What to print after `error: `.
    pub message: String,
}

impl Exit {
    /// An API or connection error.
    pub fn api(message: impl Into<String>) -> anyhow::Error {
        Exit::with(API, message)
    }

    /// An error with `code`.
    pub fn with(code: u8, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Exit {
            code,
            message: message.into(),
        })
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// The exit code of an error: its [`Exit`] code, [`API`] for a Kubernetes client error
/// anywhere in its chain, else [`ERROR`].
pub fn code(error: &anyhow::Error) -> ExitCode {
    let code = error
        .chain()
        .find_map(|e| e.downcast_ref::<Exit>().map(|e| e.code))
        .or_else(|| {
            error
                .chain()
                .any(|e| e.downcast_ref::<kube::Error>().is_some())
                .then_some(API)
        })
        .unwrap_or(ERROR);
    ExitCode::from(code)
}
