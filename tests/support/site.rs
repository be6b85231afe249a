//! One site on the test API server: the real operator and the real cluster agent of one node,
//! both watching one namespace, as the cluster end-to-end tests run them.

use std::path::Path;
use std::time::Duration;

use kube::Client;
use kube::api::{Api, PostParams};
use lifeboat_agent::cluster::{Agent, AgentOptions, Timing};
use lifeboat_operator::{Config, Operator};
use serde_json::json;

/// The namespace of the Leases (leader election, agent heartbeats).
pub const LEASES: &str = "lifeboat-system";

/// The operator and the agent, running until dropped.
#[derive(Debug)]
pub struct Site {
    operator: tokio::task::JoinHandle<()>,
    agent: tokio::task::JoinHandle<()>,
}

impl Drop for Site {
    fn drop(&mut self) {
        self.operator.abort();
        self.agent.abort();
    }
}

impl Site {
    /// Start the operator and the agent of `node` on `namespace`, the agent's state and
    /// failover disks under `work` (`state/`, `failover/`), ticking every 100 ms.
    ///
    /// # Panics
    ///
    /// The agent cannot be made.
    pub fn start(client: &Client, namespace: &str, node: &str, work: &Path) -> Site {
        let operator = Operator::new(
            client.clone(),
            Config {
                namespace: Some(namespace.into()),
                lease_namespace: LEASES.into(),
                ..Config::default()
            },
        );
        let operator = tokio::spawn(async move {
            let _ = operator.run(futures::future::pending()).await;
        });
        let mut options = AgentOptions::new(node);
        options.namespace = Some(namespace.into());
        options.lease_namespace = LEASES.into();
        options.state_dir = work.join("state");
        options.failover_dir = work.join("failover");
        options.health_addr = None;
        options.timing = Timing {
            tick: Duration::from_millis(100),
            ..Timing::default()
        };
        let agent = Agent::new(client.clone(), options).unwrap_or_else(|e| panic!("agent: {e}"));
        let agent = tokio::spawn(async move {
            let _ = agent.run(futures::future::pending()).await;
        });
        Site { operator, agent }
    }
}

/// Create the ReplicationPolicy `name` in `namespace`: every 30 s into the shared local
/// folder `replicas`.
///
/// # Panics
///
/// The API server refuses it.
pub async fn local_policy(client: &Client, namespace: &str, name: &str, replicas: &Path) {
    let policies: Api<lifeboat_api::ReplicationPolicy> = Api::namespaced(client.clone(), namespace);
    let policy = json!({
        "apiVersion": "lifeboat.io/v1alpha1", "kind": "ReplicationPolicy",
        "metadata": {"name": name},
        "spec": {"copyFrequency": "30s",
                 "target": {"local": {"path": replicas.display().to_string(), "shared": true}}}
    });
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(policy).unwrap_or_else(|e| panic!("{e}")),
        )
        .await
        .unwrap_or_else(|e| panic!("create ReplicationPolicy {namespace}/{name}: {e}"));
}
