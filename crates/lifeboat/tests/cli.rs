//! The `lifeboat` tools as a platform team runs them after `helm install`: the binary as a
//! separate process against the test API server (a kubeconfig file pointing at it, in a
//! temporary HOME), with this test playing the operator where a request needs an answer.
//! Mode selection, the context's namespace, `-A`, every `-o`, exit codes, confirmation,
//! completion, `version`, the kubectl plugin name, and the progress bar in a real terminal
//! (tmux) and its silence when piped.

// A failed unwrap is the test failure report.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use lifeboat_api::{ProtectedVM, ReplicationJob};
use lifeboat_tests::apiserver::TestApiServer;
use lifeboat_tests::eventually;
use serde_json::{Value, json};

const LIFEBOAT: &str = env!("CARGO_BIN_EXE_lifeboat");

/// A temporary HOME (no ~/.kube/config unless asked) and a kubeconfig file for the server,
/// whose context's namespace is `team-a`.
struct Setup {
    dir: tempfile::TempDir,
    server: TestApiServer,
}

impl Setup {
    async fn start() -> Setup {
        let server = TestApiServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        std::fs::write(dir.path().join("kubeconfig"), kubeconfig(&server.url())).unwrap();
        let setup = Setup { dir, server };
        for (ns, name) in [
            ("team-a", "web-01"),
            ("team-a", "web-02"),
            ("team-b", "db-01"),
        ] {
            setup.vm(ns, name).await;
        }
        setup
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn client(&self) -> Client {
        self.server.client("team-a")
    }

    async fn vm(&self, ns: &str, name: &str) {
        let vm: ProtectedVM = serde_json::from_value(json!({
            "apiVersion": "lifeboat.io/v1alpha1",
            "kind": "ProtectedVM",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "vmName": name,
                "nodeName": "kvm-node-3",
                "hypervisor": {"qemu": {"qmpSocket": "/run/qmp.sock"}},
                "disks": [{"name": "root", "path": "/images/root.qcow2"}],
                "policyRef": {"name": "fast"}
            }
        }))
        .unwrap();
        Api::<ProtectedVM>::namespaced(self.client(), ns)
            .create(&PostParams::default(), &vm)
            .await
            .unwrap();
        self.vm_status(
            ns,
            name,
            json!({"phase": "Protected", "health": "Normal", "rpo": "41s",
                   "healthReason": "AllGood", "recoveryPoints": {"count": 3}}),
        )
        .await;
    }

    async fn vm_status(&self, ns: &str, name: &str, status: Value) {
        Api::<ProtectedVM>::namespaced(self.client(), ns)
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await
            .unwrap();
    }

    /// A job for `vm`, of the request `token`, with `status`.
    async fn job(&self, ns: &str, name: &str, vm: &str, token: &str, status: Value) {
        let job: ReplicationJob = serde_json::from_value(json!({
            "apiVersion": "lifeboat.io/v1alpha1",
            "kind": "ReplicationJob",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "vmRef": {"name": vm},
                "nodeName": "kvm-node-3",
                "type": "Resynchronize",
                "parameters": {"requestToken": token}
            }
        }))
        .unwrap();
        let api = Api::<ReplicationJob>::namespaced(self.client(), ns);
        if api.get_opt(name).await.unwrap().is_none() {
            api.create(&PostParams::default(), &job).await.unwrap();
        }
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "status": status })),
        )
        .await
        .unwrap();
    }

    /// The resync token the tool wrote into the VM's spec, once it is there (and is not
    /// `previous`).
    async fn resync_token(&self, ns: &str, name: &str, previous: Option<&str>) -> String {
        let api = Api::<ProtectedVM>::namespaced(self.client(), ns);
        eventually(30, "the tool's resync request", || {
            let api = api.clone();
            async move {
                api.get(name)
                    .await
                    .ok()
                    .and_then(|vm| vm.spec.requests.and_then(|r| r.resync))
                    .filter(|t| Some(t.as_str()) != previous)
            }
        })
        .await
    }

    /// `lifeboat ARGS` with HOME and, if `kubeconfig`, KUBECONFIG; standard input closed.
    fn command(&self, kubeconfig: bool, args: &[&str]) -> tokio::process::Command {
        self.command_as(Path::new(LIFEBOAT), kubeconfig, args)
    }

    /// Like [`Setup::command`], the binary run as `program` (a link to it, say).
    fn command_as(
        &self,
        program: &Path,
        kubeconfig: bool,
        args: &[&str],
    ) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env("HOME", self.home())
            .env_remove("KUBECONFIG")
            .env_remove("LIFEBOAT_STATE_DIR")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if kubeconfig {
            command.env("KUBECONFIG", self.kubeconfig());
        }
        command
    }

    /// `lifeboat ARGS` run to its end, with KUBECONFIG if `kubeconfig`.
    async fn output(&self, kubeconfig: bool, args: &[&str]) -> Output {
        self.command(kubeconfig, args).output().await.unwrap()
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.output(true, args).await
    }

    /// Standard output of a run that must succeed.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(out.status.success(), "lifeboat {args:?}: {}", show(&out));
        String::from_utf8(out.stdout).unwrap()
    }
}

fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n\
         contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: team-a\n\
         - name: other\n  context:\n    cluster: test\n    user: test\n    namespace: team-b\n\
         current-context: test\nusers:\n- name: test\n  user: {{}}\n"
    )
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn names(text: &str) -> Vec<&str> {
    text.lines().collect()
}

/// How many lines a run printed on standard output.
fn lines(out: &Output) -> usize {
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mode_follows_the_kubeconfig_and_the_state_folder() {
    let s = Setup::start().await;
    // KUBECONFIG and no state folder: the cluster, in the context's namespace.
    let out = s.ok(&["status", "-o", "name"]).await;
    assert_eq!(
        names(&out),
        [
            "protectedvm.lifeboat.io/web-01",
            "protectedvm.lifeboat.io/web-02"
        ]
    );
    // Another context, another namespace; -n wins over both.
    let out = s.ok(&["status", "-o", "name", "--context", "other"]).await;
    assert_eq!(names(&out), ["protectedvm.lifeboat.io/db-01"]);
    let out = s.ok(&["status", "-o", "name", "-n", "team-b"]).await;
    assert_eq!(names(&out), ["protectedvm.lifeboat.io/db-01"]);
    // ~/.kube/config is found as well, and --kubeconfig names a file.
    std::fs::create_dir_all(s.home().join(".kube")).unwrap();
    std::fs::copy(s.kubeconfig(), s.home().join(".kube/config")).unwrap();
    let out = s.output(false, &["status", "-o", "name"]).await;
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(lines(&out), 2, "{}", show(&out));
    std::fs::remove_file(s.home().join(".kube/config")).unwrap();
    let kubeconfig = s.kubeconfig();
    let out = s
        .output(
            false,
            &[
                "status",
                "-o",
                "name",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
            ],
        )
        .await;
    assert_eq!(lines(&out), 2, "{}", show(&out));

    // A state folder: standalone, although a kubeconfig is there (the folder is empty).
    let state = s.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let state = state.to_str().unwrap();
    let out = s.ok(&["status", "-o", "json", "--state-dir", state]).await;
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["items"], json!([]), "{out}");
    let out = s
        .command(true, &["status", "-o", "json"])
        .env("LIFEBOAT_STATE_DIR", state)
        .output()
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["items"],
        json!([])
    );
    // --cluster overrides the folder; --standalone the kubeconfig.
    let out = s
        .ok(&["status", "-o", "name", "--state-dir", state, "--cluster"])
        .await;
    assert_eq!(names(&out).len(), 2);
    let out = s
        .command(true, &["status", "--standalone"])
        .env("LIFEBOAT_STATE_DIR", state)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No ProtectedVM in namespace default of"),
        "{}",
        show(&out)
    );
    // Neither a kubeconfig nor a state folder: a clear error (where the default folder,
    // /var/lib/lifeboat, does not exist).
    if !Path::new("/var/lib/lifeboat").exists() {
        let out = s.output(false, &["status"]).await;
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no kubeconfig found"),
            "{}",
            show(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_output_format_and_all_namespaces() {
    let s = Setup::start().await;
    s.job(
        "team-a",
        "web-01-resync-1",
        "web-01",
        "t1",
        json!({"phase": "Succeeded", "progress": {"percent": 100, "bytesDone": 10, "bytesTotal": 10}}),
    )
    .await;
    s.job(
        "team-b",
        "db-01-resync-1",
        "db-01",
        "t2",
        json!({"phase": "Running", "progress": {"percent": 40, "bytesDone": 4, "bytesTotal": 10}}),
    )
    .await;

    // Tables: the namespace column only with -A; wide adds columns.
    let table = s.ok(&["status"]).await;
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("NAME ") && header.contains("PHASE"),
        "{table}"
    );
    assert!(
        table.contains("Protected") && !table.contains("db-01"),
        "{table}"
    );
    let all = s.ok(&["status", "-A"]).await;
    assert!(
        all.starts_with("NAMESPACE") && all.contains("db-01") && all.contains("team-b"),
        "{all}"
    );
    let wide = s.ok(&["status", "-o", "wide"]).await;
    assert!(
        wide.contains("REASON") && wide.contains("AllGood") && wide.contains("kvm-node-3"),
        "{wide}"
    );

    // JSON and YAML are lists kubectl would print; --json is the former plain array.
    let list: Value = serde_json::from_str(&s.ok(&["status", "-A", "-o", "json"]).await).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    assert_eq!(list["items"][0]["kind"], "ProtectedVM");
    let yaml = s.ok(&["status", "-o", "yaml"]).await;
    let list: Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 2, "{yaml}");
    assert_eq!(list["items"][0]["metadata"]["name"], "web-01");
    let legacy: Value = serde_json::from_str(&s.ok(&["status", "--json"]).await).unwrap();
    assert_eq!(legacy.as_array().unwrap().len(), 2);

    // Jobs.
    let jobs = s.ok(&["jobs"]).await;
    let header: Vec<&str> = jobs.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "VM", "TYPE", "PHASE", "PROGRESS", "STARTED", "DURATION"
        ],
        "{jobs}"
    );
    assert!(
        jobs.contains("web-01-resync-1") && jobs.contains("Resynchronize") && jobs.contains("100%"),
        "{jobs}"
    );
    assert!(!jobs.contains("db-01"), "{jobs}");
    let all = s.ok(&["jobs", "-A", "-o", "name"]).await;
    assert_eq!(
        names(&all),
        [
            "replicationjob.lifeboat.io/web-01-resync-1",
            "replicationjob.lifeboat.io/db-01-resync-1"
        ]
    );
    let list: Value = serde_json::from_str(&s.ok(&["jobs", "-A", "-o", "json"]).await).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let list: Value =
        serde_saphyr::from_str(&s.ok(&["jobs", "-o", "yaml", "-n", "team-b"]).await).unwrap();
    assert_eq!(list["items"][0]["spec"]["vmRef"]["name"], "db-01");
    let wide = s.ok(&["jobs", "-A", "-o", "wide"]).await;
    assert!(
        wide.contains("NODE") && wide.contains("kvm-node-3"),
        "{wide}"
    );

    // Points, a VM's summary.
    let points: Value =
        serde_json::from_str(&s.ok(&["points", "web-01", "-o", "json"]).await).unwrap();
    assert_eq!(points["count"], 3);
    let points = s.ok(&["points", "web-01", "-o", "yaml"]).await;
    let _: Value = serde_saphyr::from_str(&points).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_confirmation() {
    let s = Setup::start().await;
    let vms = Api::<ProtectedVM>::namespaced(s.client(), "team-a");
    let code = |out: &Output| out.status.code();

    // Usage.
    let out = s.run(&["status", "--no-such-option"]).await;
    assert_eq!(code(&out), Some(2), "{}", show(&out));

    // Destructive requests without a terminal and without --yes: refused, nothing requested.
    for args in [
        &["commit", "web-01"][..],
        &["failover", "web-01", "--unplanned"][..],
    ] {
        let out = s.run(args).await;
        assert_eq!(code(&out), Some(6), "{args:?}: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--yes"),
            "{}",
            show(&out)
        );
    }
    assert!(vms.get("web-01").await.unwrap().spec.requests.is_none());
    // With --yes it is asked.
    let out = s.ok(&["commit", "web-01", "--yes", "--no-wait"]).await;
    assert!(
        out.starts_with("requested the failover commit of team-a/web-01"),
        "{out}"
    );
    assert!(
        vms.get("web-01")
            .await
            .unwrap()
            .spec
            .requests
            .unwrap()
            .commit
            .is_some()
    );

    // Timeout: nobody handles the request.
    let out = s.run(&["resync", "web-02", "--timeout-seconds", "1"]).await;
    assert_eq!(code(&out), Some(4), "{}", show(&out));

    // The job fails.
    let failing = s.command(true, &["resync", "web-01"]).spawn().unwrap();
    let token = s.resync_token("team-a", "web-01", None).await;
    s.job(
        "team-a",
        "web-01-resync-9",
        "web-01",
        &token,
        json!({"phase": "Failed", "error": {"class": "NonRecoverable", "reason": "DiskGone", "message": "the disk vanished"}}),
    )
    .await;
    s.vm_status(
        "team-a",
        "web-01",
        json!({"currentJob": {"name": "web-01-resync-9", "type": "Resynchronize"}}),
    )
    .await;
    let out = tokio::time::timeout(Duration::from_secs(30), failing.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code(&out), Some(3), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("DiskGone"),
        "{}",
        show(&out)
    );

    // The API server cannot be reached; a VM it does not have.
    let unreachable = s.dir.path().join("unreachable");
    std::fs::write(&unreachable, kubeconfig("http://127.0.0.1:9")).unwrap();
    let out = s
        .run(&["status", "--kubeconfig", unreachable.to_str().unwrap()])
        .await;
    assert_eq!(code(&out), Some(5), "{}", show(&out));
    let out = s.run(&["resync", "nope"]).await;
    assert_eq!(code(&out), Some(5), "{}", show(&out));

    // The codes are documented.
    let help = s.ok(&["--help"]).await;
    assert!(
        help.contains("Exit status:") && help.contains("6  not confirmed"),
        "{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_version_and_the_kubectl_plugin_name() {
    let s = Setup::start().await;
    let bash = s.ok(&["completion", "bash"]).await;
    for word in [
        "status",
        "jobs",
        "points",
        "failover",
        "commit",
        "completion",
        "--all-namespaces",
    ] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    for shell in ["zsh", "fish"] {
        assert!(s.ok(&["completion", shell]).await.contains("jobs"));
    }

    // The test API server serves no Deployments: the operator's version is unknown, with why.
    for args in [&["version"][..], &["--version"][..]] {
        let out = s.ok(args).await;
        assert!(
            out.starts_with(&format!("client: lifeboat {}\n", env!("CARGO_PKG_VERSION")))
                && out.contains("operator: unknown ("),
            "{out}"
        );
    }

    // As kubectl-lifeboat: cluster mode by default (no kubeconfig here: an API error, 5),
    // where `lifeboat` falls back to standalone (no state folder: an error, 1).
    let plugin = s.dir.path().join("kubectl-lifeboat");
    std::os::unix::fs::symlink(LIFEBOAT, &plugin).unwrap();
    let out = s
        .command_as(&plugin, false, &["status"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", show(&out));
    let out = s
        .command_as(&plugin, true, &["status", "-o", "name"])
        .output()
        .await
        .unwrap();
    assert_eq!(lines(&out), 2, "{}", show(&out));
    let help = tokio::process::Command::new(&plugin)
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("kubectl lifeboat"));
}

fn tmux(socket: &Path, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("tmux")
        .arg("-S")
        .arg(socket)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The tmux pane's text once it shows `what` (or as it is after 10 s).
async fn screen_showing(socket: &Path, what: &str) -> String {
    let mut screen = String::new();
    for _ in 0..100 {
        screen = tmux(socket, &["capture-pane", "-p"]).unwrap_or_default();
        if screen.contains(what) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    screen
}

/// Plays the operator for a resync of team-a/web-01: a running job half done, started 20 s
/// ago (`finish_resync` then ends it).
async fn half_done_resync(s: &Setup, job: &str, previous: Option<&str>) -> String {
    let token = s.resync_token("team-a", "web-01", previous).await;
    let started =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(20);
    s.job(
        "team-a",
        job,
        "web-01",
        &token,
        json!({"phase": "Running", "startTime": started.to_string(),
               "progress": {"percent": 50, "bytesDone": 50u64 << 20, "bytesTotal": 100u64 << 20}}),
    )
    .await;
    s.vm_status(
        "team-a",
        "web-01",
        json!({"currentJob": {"name": job, "type": "Resynchronize"}}),
    )
    .await;
    token
}

async fn finish_resync(s: &Setup, job: &str, token: &str) {
    s.job(
        "team-a",
        job,
        "web-01",
        token,
        json!({"phase": "Succeeded", "progress": {"percent": 100, "bytesDone": 100u64 << 20}}),
    )
    .await;
    s.vm_status(
        "team-a",
        "web-01",
        json!({"handledRequests": {"resync": token}, "currentJob": null}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_on_a_terminal_and_quiet_when_piped() {
    let s = Setup::start().await;

    // Piped: no progress, the done-line only.
    let piped = s.command(true, &["resync", "web-01"]).spawn().unwrap();
    let first = half_done_resync(&s, "web-01-resync-1", None).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    finish_resync(&s, "web-01-resync-1", &first).await;
    let out = tokio::time::timeout(Duration::from_secs(30), piped.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ETA") && !stderr.contains("MiB"),
        "{}",
        show(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "the resynchronization of team-a/web-01 is done (phase Protected, direction Forward, health Normal)\n"
    );

    // In a terminal: tmux, 100 columns.
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("skipped the terminal half: tmux is not installed (apt-get install -y tmux)");
        return;
    }
    let socket = s.dir.path().join("tmux.sock");
    let script = format!(
        "env HOME='{}' KUBECONFIG='{}' TERM=xterm '{LIFEBOAT}' resync web-01; echo exit=$?; sleep 60",
        s.home().display(),
        s.kubeconfig().display()
    );
    tmux(
        &socket,
        &["new-session", "-d", "-x", "100", "-y", "12", &script],
    )
    .expect("start tmux");
    let token = half_done_resync(&s, "web-01-resync-2", Some(&first)).await;
    let screen = screen_showing(&socket, "ETA").await;
    let bar = screen
        .lines()
        .find(|l| l.contains("ETA"))
        .unwrap_or_default()
        .to_owned();
    // 50 of 100 MiB in 20 s: 2.5 MiB/s, 20 s to go; the bar fills the terminal's width.
    let ok = bar.contains("Resynchronize Running")
        && bar.contains("50.00 MiB/100.00 MiB")
        && bar.contains("50%")
        && bar.contains("2.5 MiB/s")
        && (bar.contains("ETA 20s") || bar.contains("ETA 19s") || bar.contains("ETA 21s"))
        && bar.trim_end().chars().count() > 90
        && bar.chars().count() <= 100;
    eprintln!("the bar in tmux: {bar}");
    finish_resync(&s, "web-01-resync-2", &token).await;
    let after = screen_showing(&socket, "exit=").await;
    tmux(&socket, &["kill-server"]);
    assert!(ok, "the progress bar:\n{bar}\nscreen:\n{screen}");
    assert!(
        after.contains("the resynchronization of team-a/web-01 is done")
            && after.contains("exit=0"),
        "{after}"
    );
    assert!(
        !after.contains("ETA"),
        "the bar is cleared when done:\n{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprotect_and_failback_on_a_cluster_ask_when_they_apply_and_say_why_not() {
    let s = Setup::start().await;
    let vms = Api::<ProtectedVM>::namespaced(s.client(), "team-a");
    // web-01 replicates forward: no failback, no re-protect; nothing is requested.
    for (args, says) in [
        (
            &["failback", "web-01", "--no-wait"][..],
            "replicates forward",
        ),
        (
            &["reprotect", "web-01", "--no-wait"][..],
            "only a VM that failed over or failed back",
        ),
    ] {
        let out = s.run(args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(says) && stderr.contains("team-a/web-01"),
            "{}",
            show(&out)
        );
    }
    assert!(vms.get("web-01").await.unwrap().spec.requests.is_none());

    // Failed over without a recovery site: re-protect says what is missing.
    s.vm_status("team-a", "web-01", json!({"phase": "FailedOver"}))
        .await;
    let out = s.run(&["reprotect", "web-01", "--no-wait"]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.recoverySite"),
        "{}",
        show(&out)
    );
    vms.patch(
        "web-01",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"recoverySite": {
            "nodeName": "kvm-node-7",
            "hypervisor": {"qemu": {"qmpSocket": "/run/recovered.sock"}},
            "disks": [{"name": "root", "path": "/failover/web-01-failover-root.img"}]
        }}})),
    )
    .await
    .unwrap();
    let out = s.ok(&["reprotect", "web-01", "--no-wait"]).await;
    assert!(
        out.starts_with("requested the re-protect of team-a/web-01"),
        "{out}"
    );
    let requests = vms.get("web-01").await.unwrap().spec.requests.unwrap();
    assert!(requests.reprotect.is_some());

    // Protected in reverse: a failback is a planned failover request.
    s.vm_status(
        "team-a",
        "web-01",
        json!({"phase": "Protected", "direction": "Reverse"}),
    )
    .await;
    let wide = s.ok(&["status", "-o", "wide"]).await;
    let row = wide.lines().find(|l| l.starts_with("web-01")).unwrap();
    assert!(
        row.contains("Reverse") && row.contains("kvm-node-7"),
        "{wide}"
    );
    s.ok(&["failback", "web-01", "--no-wait"]).await;
    let requested = || async {
        let vm = vms.get("web-01").await.unwrap();
        vm.spec.requests.unwrap().failover.unwrap().failover_type
    };
    assert_eq!(
        requested().await,
        lifeboat_api::protected_vm::FailoverType::Planned
    );

    // The recovered VM's node lost while that failback waits for it: an unplanned one
    // replaces it, from a point of the replica (after a confirmation).
    s.vm_status(
        "team-a",
        "web-01",
        json!({"phase": "FailingBack", "direction": "Reverse"}),
    )
    .await;
    let out = s.run(&["failback", "web-01", "--no-wait"]).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs it protected in reverse"),
        "a planned one is refused while one runs: {}",
        show(&out)
    );
    let out = s
        .ok(&[
            "failback",
            "web-01",
            "--unplanned",
            "--point",
            "latest",
            "--yes",
            "--no-wait",
        ])
        .await;
    assert!(
        out.starts_with("requested the unplanned failback to the latest point of team-a/web-01"),
        "{out}"
    );
    assert_eq!(
        requested().await,
        lifeboat_api::protected_vm::FailoverType::Unplanned
    );
    let out = s.run(&["failback", "web-01", "--point", "latest"]).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "--point needs --unplanned: {}",
        show(&out)
    );
}
