//! The Helm chart (`charts/palisade`) with the real `helm`: lint, golden renders of three
//! value sets, the security properties of what it renders, and values the schema refuses.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use palisade_deploy_tests::manifests::{self, all, find, strings};
use palisade_deploy_tests::{chart_dir, golden, tools};
use serde_yaml::Value;

const KUBE_VERSION: &str = "v1.37.2";
const HELM_HINT: &str = "scripts/tools.sh builds it";

fn helm(test: &str) -> Option<PathBuf> {
    tools::require(test, "helm", HELM_HINT)
}

/// One way to render the chart.
struct Render<'a> {
    release: &'a str,
    namespace: &'a str,
    values: Option<&'a str>,
    sets: &'a [&'a str],
    api_versions: &'a [&'a str],
}

impl Render<'_> {
    const DEFAULT: Render<'static> = Render {
        release: "palisade",
        namespace: "palisade-system",
        values: None,
        sets: &[],
        api_versions: &[],
    };

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "template",
            self.release,
            "charts/palisade",
            "--namespace",
            self.namespace,
            "--kube-version",
            KUBE_VERSION,
        ]
        .map(String::from)
        .into();
        if let Some(v) = self.values {
            args.extend(["--values".into(), format!("charts/palisade/ci/{v}")]);
        }
        for s in self.sets {
            args.extend(["--set".into(), s.to_string()]);
        }
        for a in self.api_versions {
            args.extend(["--api-versions".into(), a.to_string()]);
        }
        args
    }

    fn run(&self, helm: &Path) -> String {
        let args = self.args();
        tools::run_ok(helm, &args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

#[test]
fn lint_strict_passes_for_every_value_set() {
    let Some(helm) = helm("lint_strict_passes_for_every_value_set") else {
        return;
    };
    let mut sets = vec![None];
    for entry in std::fs::read_dir(chart_dir().join("ci")).expect("charts/palisade/ci") {
        let name = entry.expect("ci entry").file_name();
        sets.push(Some(format!(
            "charts/palisade/ci/{}",
            name.to_string_lossy()
        )));
    }
    assert!(
        sets.len() >= 3,
        "expected the ci/ value sets, found {sets:?}"
    );
    for values in sets {
        let mut args = vec![
            "lint",
            "--strict",
            "charts/palisade",
            "--kube-version",
            KUBE_VERSION,
        ];
        if let Some(v) = &values {
            args.extend(["--values", v]);
        }
        let out = tools::run_ok(&helm, &args);
        assert!(out.contains("0 chart(s) failed"), "{values:?}: {out}");
    }
}

/// Replaces generated key material (random on every render) by placeholders, after
/// checking that it is consistent and valid.
fn mask_generated_tls(case: &str, text: &str, dns_names: &[&str]) -> String {
    check_generated_tls(case, text, dns_names);
    let mut out = String::new();
    let mut in_pem = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if trimmed == "-----BEGIN CERTIFICATE-----" {
            in_pem = true;
            out.push_str(&format!("{indent}<generated PEM>\n"));
            continue;
        }
        if in_pem {
            in_pem = trimmed != "-----END CERTIFICATE-----";
            continue;
        }
        let masked = ["ca.crt: ", "tls.crt: ", "tls.key: ", "checksum/tls: "]
            .iter()
            .find(|k| trimmed.starts_with(*k) && !trimmed.ends_with('|'));
        match masked {
            Some(key) => out.push_str(&format!("{indent}{key}<generated>\n")),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The generated CA and certificate: one per render (the Secret, the agents' CA ConfigMap
/// and both pods' checksums agree), the certificate signed by the CA for the Service's
/// names, and the key the certificate's.
fn check_generated_tls(case: &str, text: &str, dns_names: &[&str]) {
    let objects = manifests::parse(text);
    let secret = all(&objects, "Secret")
        .next()
        .expect("a generated TLS Secret");
    let data = |k: &str| {
        let b64 = secret["data"][k]
            .as_str()
            .unwrap_or_else(|| panic!("Secret has no {k}"));
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_else(|e| panic!("{k} is not base64: {e}")),
        )
        .expect("PEM is text")
    };
    let (ca, crt, key) = (data("ca.crt"), data("tls.crt"), data("tls.key"));
    let ca_map = all(&objects, "ConfigMap")
        .find(|c| manifests::name(c).ends_with("-ca"))
        .expect("the agents' CA ConfigMap");
    assert_eq!(
        ca_map["data"]["ca.crt"].as_str(),
        Some(ca.as_str()),
        "ConfigMap CA differs from the Secret's"
    );
    let checksums: Vec<&str> = ["Deployment", "DaemonSet"]
        .iter()
        .flat_map(|k| all(&objects, k))
        .map(|o| {
            o["spec"]["template"]["metadata"]["annotations"]["checksum/tls"]
                .as_str()
                .expect("pods carry the certificate checksum")
        })
        .collect();
    assert_eq!(checksums.len(), 2);
    assert_eq!(
        checksums[0], checksums[1],
        "controller and agents roll on different certificates"
    );

    let Some(openssl) = tools::require("check_generated_tls", "openssl", "apt-get install openssl")
    else {
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tls-{case}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = |name: &str, content: &str| {
        let p = dir.join(name);
        std::fs::write(&p, content).expect("write PEM");
        p.to_string_lossy().into_owned()
    };
    let (ca_f, crt_f, key_f) = (
        file("ca.pem", &ca),
        file("crt.pem", &crt),
        file("key.pem", &key),
    );
    let verified = tools::run_ok(&openssl, &["verify", "-CAfile", &ca_f, &crt_f]);
    assert!(verified.contains(": OK"), "{verified}");
    let sans = tools::run_ok(
        &openssl,
        &["x509", "-in", &crt_f, "-noout", "-ext", "subjectAltName"],
    );
    for name in dns_names {
        assert!(
            sans.contains(&format!("DNS:{name}")),
            "certificate lacks {name}: {sans}"
        );
    }
    let cert_pub = tools::run_ok(&openssl, &["x509", "-in", &crt_f, "-noout", "-pubkey"]);
    let key_pub = tools::run_ok(&openssl, &["pkey", "-in", &key_f, "-pubout"]);
    assert_eq!(cert_pub, key_pub, "tls.key is not the certificate's key");
    let _ = std::fs::remove_dir_all(&dir);
}

fn golden_path(name: &str) -> PathBuf {
    chart_dir()
        .join("tests/golden")
        .join(format!("{name}.yaml"))
}

#[test]
fn golden_default_values() {
    let Some(helm) = helm("golden_default_values") else {
        return;
    };
    let out = Render::DEFAULT.run(&helm);
    let masked = mask_generated_tls(
        "default",
        &out,
        &[
            "palisade-controller",
            "palisade-controller.palisade-system.svc",
            "palisade-controller.palisade-system.svc.cluster.local",
        ],
    );
    golden::check(&golden_path("default"), &masked);
}

#[test]
fn golden_user_tls_and_monitoring() {
    let Some(helm) = helm("golden_user_tls_and_monitoring") else {
        return;
    };
    let out = Render {
        values: Some("user-tls-monitoring-values.yaml"),
        api_versions: &["monitoring.coreos.com/v1"],
        ..Render::DEFAULT
    }
    .run(&helm);
    // A user's Secret: nothing generated, so nothing random to mask.
    assert!(
        !out.contains("BEGIN CERTIFICATE") && !out.contains("checksum/tls"),
        "{out}"
    );
    golden::check(&golden_path("user-tls-monitoring"), &out);
}

#[test]
fn golden_custom_release_namespace_and_resources() {
    let Some(helm) = helm("golden_custom_release_namespace_and_resources") else {
        return;
    };
    let out = Render {
        release: "edge",
        namespace: "netsec",
        values: Some("custom-values.yaml"),
        ..Render::DEFAULT
    }
    .run(&helm);
    let masked = mask_generated_tls(
        "custom",
        &out,
        &[
            "edge-palisade-controller.netsec.svc",
            "edge-palisade-controller.netsec.svc.corp.example",
        ],
    );
    golden::check(&golden_path("custom"), &masked);
}

fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

/// The rules of the ClusterRoles bound to ServiceAccount `sa`, as `group/resource:verb`.
fn cluster_grants(objects: &[Value], sa: &str) -> Vec<String> {
    let mut grants = Vec::new();
    for binding in all(objects, "RoleBinding").chain(all(objects, "ClusterRoleBinding")) {
        let subjects = binding["subjects"].as_sequence().into_iter().flatten();
        if !subjects.into_iter().any(|s| s["name"].as_str() == Some(sa)) {
            continue;
        }
        assert_eq!(
            binding["kind"].as_str(),
            Some("ClusterRoleBinding"),
            "{}",
            manifests::name(binding)
        );
        let role = find(
            objects,
            "ClusterRole",
            binding["roleRef"]["name"].as_str().unwrap(),
        );
        for rule in role["rules"].as_sequence().expect("rules") {
            assert!(rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null());
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        grants.push(format!("{group}/{resource}:{verb}"));
                    }
                }
            }
        }
    }
    grants.sort();
    grants
}

#[test]
fn agent_runs_with_net_admin_only_and_no_api_access_but_metrics_reviews() {
    let Some(helm) = helm("agent_runs_with_net_admin_only_and_no_api_access_but_metrics_reviews")
    else {
        return;
    };
    let objects = manifests::parse(&Render::DEFAULT.run(&helm));
    let ds = find(&objects, "DaemonSet", "palisade-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], Value::Bool(true));
    // Secure metrics by default: an apiserver token for the reviews, and nothing more.
    assert_eq!(pod["automountServiceAccountToken"], Value::Bool(true));
    assert_eq!(
        pod["priorityClassName"].as_str(),
        Some("system-node-critical")
    );
    let tolerations = pod["tolerations"].as_sequence().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null()),
        "the agent must tolerate every taint: {tolerations:?}"
    );
    let c = container(ds);
    assert_eq!(c["image"].as_str(), Some("palisade/palisade-agent:0.1.0"));
    assert_eq!(c["imagePullPolicy"].as_str(), Some("IfNotPresent"));
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], Value::Bool(false));
    assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false));
    assert_eq!(sc["readOnlyRootFilesystem"], Value::Bool(true));
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(strings(&sc["capabilities"]["add"]), ["NET_ADMIN"]);

    let args = strings(&c["args"]);
    for want in [
        "--controller=https://palisade-controller.palisade-system.svc:9470",
        "--token-file=/var/run/palisade/token",
        "--ca-file=/var/run/palisade/ca.crt",
        "--node=$(NODE_NAME)",
        "--metrics-addr=$(HOST_IP):9469",
        "--metrics-mode=secure",
    ] {
        assert!(args.contains(&want), "agent args lack {want}: {args:?}");
    }
    let env = c["env"].as_sequence().expect("env");
    let node = env
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );

    // The stream's credential: a token for the audience "palisade", and the CA.
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    assert_eq!(volumes[0]["projected"]["defaultMode"].as_u64(), Some(0o400));
    let sources = volumes[0]["projected"]["sources"]
        .as_sequence()
        .expect("projected");
    let token = sources
        .iter()
        .find_map(|s| s.get("serviceAccountToken"))
        .expect("a projected token");
    assert_eq!(token["audience"].as_str(), Some("palisade"));
    assert_eq!(token["path"].as_str(), Some("token"));
    assert!(
        sources.iter().all(|s| s.get("secret").is_none()),
        "a generated CA reaches agents without the Secret"
    );

    // What system:auth-delegator grants, and nothing else.
    assert_eq!(
        cluster_grants(&objects, "palisade-agent"),
        [
            "authentication.k8s.io/tokenreviews:create",
            "authorization.k8s.io/subjectaccessreviews:create",
        ]
    );
    let sa = find(&objects, "ServiceAccount", "palisade-agent");
    assert_eq!(sa["automountServiceAccountToken"], Value::Bool(false));

    // Loopback metrics: no apiserver token and no role at all.
    let objects = manifests::parse(
        &Render {
            sets: &["agent.metrics.bind=loopback"],
            ..Render::DEFAULT
        }
        .run(&helm),
    );
    let pod = &find(&objects, "DaemonSet", "palisade-agent")["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], Value::Bool(false));
    assert!(cluster_grants(&objects, "palisade-agent").is_empty());
}

#[test]
fn agent_probes_reach_the_metrics_listener_for_each_bind() {
    let Some(helm) = helm("agent_probes_reach_the_metrics_listener_for_each_bind") else {
        return;
    };
    for (bind, secure, addr, probe_host, mode) in [
        (
            "loopback",
            "true",
            "127.0.0.1:9469",
            Some("127.0.0.1"),
            "loopback",
        ),
        ("hostIP", "true", "$(HOST_IP):9469", None, "secure"),
        ("hostIP", "false", "$(HOST_IP):9469", None, "insecure"),
        ("all", "true", "0.0.0.0:9469", None, "secure"),
        ("all", "false", "0.0.0.0:9469", None, "insecure"),
    ] {
        let set = [
            format!("agent.metrics.bind={bind}"),
            format!("agent.metrics.secure={secure}"),
        ];
        let sets: Vec<&str> = set.iter().map(String::as_str).collect();
        let out = Render {
            sets: &sets,
            api_versions: &["monitoring.coreos.com/v1"],
            ..Render::DEFAULT
        }
        .run(&helm);
        let objects = manifests::parse(&out);
        let c = container(find(&objects, "DaemonSet", "palisade-agent"));
        let args = strings(&c["args"]);
        for want in [
            format!("--metrics-addr={addr}"),
            format!("--metrics-mode={mode}"),
        ] {
            assert!(args.contains(&want.as_str()), "{bind}: {args:?}");
        }
        let scheme = (mode == "secure").then_some("HTTPS");
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{bind} {probe}");
            assert_eq!(get["port"].as_u64(), Some(9469), "{bind} {probe}");
            assert_eq!(get["host"].as_str(), probe_host, "{bind} {probe}");
            assert_eq!(get["scheme"].as_str(), scheme, "{bind} {secure} {probe}");
        }
        // Prometheus cannot scrape a loopback listener: no PodMonitor then.
        let pod_monitors: Vec<&Value> = all(&objects, "PodMonitor").collect();
        assert_eq!(
            pod_monitors.len(),
            usize::from(bind != "loopback"),
            "{bind}"
        );
        if let Some(monitor) = pod_monitors.first() {
            let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
            let want = if mode == "secure" {
                Some("https")
            } else {
                None
            };
            assert_eq!(endpoint["scheme"].as_str(), want, "{bind} {secure}");
            if mode == "secure" {
                assert_eq!(
                    endpoint["authorization"]["credentials"]["name"].as_str(),
                    Some("palisade-metrics-reader-token")
                );
            }
        }
        let host_ip = c["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .any(|e| e["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP");
        assert_eq!(host_ip, bind == "hostIP", "{bind}");
    }
}

#[test]
fn secure_metrics_scrapers_get_only_the_metrics_url() {
    let Some(helm) = helm("secure_metrics_scrapers_get_only_the_metrics_url") else {
        return;
    };
    let objects = manifests::parse(
        &Render {
            api_versions: &["monitoring.coreos.com/v1"],
            ..Render::DEFAULT
        }
        .run(&helm),
    );
    let reader = find(&objects, "ClusterRole", "palisade-metrics-reader");
    assert_eq!(
        serde_yaml::to_string(&reader["rules"]).unwrap(),
        "- nonResourceURLs:\n  - /metrics\n  verbs:\n  - get\n"
    );
    let binding = find(&objects, "ClusterRoleBinding", "palisade-metrics-reader");
    assert_eq!(
        binding["roleRef"]["name"].as_str(),
        Some("palisade-metrics-reader")
    );
    assert_eq!(
        binding["subjects"][0]["name"].as_str(),
        Some("palisade-metrics-reader")
    );
    let secret = find(&objects, "Secret", "palisade-metrics-reader-token");
    assert_eq!(
        secret["type"].as_str(),
        Some("kubernetes.io/service-account-token")
    );
    let sm = find(&objects, "ServiceMonitor", "palisade-controller");
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["scheme"].as_str(), Some("https"));
    assert_eq!(
        endpoint["tlsConfig"]["serverName"].as_str(),
        Some("palisade-controller.palisade-system.svc")
    );
    assert_eq!(
        endpoint["tlsConfig"]["ca"]["configMap"]["name"].as_str(),
        Some("palisade-ca")
    );
    let controller = container(find(&objects, "Deployment", "palisade-controller"));
    assert!(strings(&controller["args"]).contains(&"--metrics-mode=secure"));
    assert_eq!(
        controller["readinessProbe"]["httpGet"]["scheme"].as_str(),
        Some("HTTPS")
    );
}

/// Verbs that only read.
const READ: [&str; 3] = ["get", "list", "watch"];

#[test]
fn controller_rbac_reads_and_writes_only_status_events_and_its_lease() {
    let Some(helm) = helm("controller_rbac_reads_and_writes_only_status_events_and_its_lease")
    else {
        return;
    };
    let objects = manifests::parse(&Render::DEFAULT.run(&helm));
    let mut writes = Vec::new();
    let controllers = all(&objects, "ClusterRole")
        .chain(all(&objects, "Role"))
        .filter(|r| manifests::name(r).starts_with("palisade-controller"));
    for role in controllers {
        for rule in role["rules"].as_sequence().expect("rules") {
            let groups = strings(&rule["apiGroups"]);
            let resources = strings(&rule["resources"]);
            let verbs = strings(&rule["verbs"]);
            for field in [&groups, &resources, &verbs] {
                assert!(
                    !field.contains(&"*"),
                    "wildcard in {}: {rule:?}",
                    manifests::name(role)
                );
            }
            assert!(
                !resources.contains(&"secrets"),
                "the controller reads no Secret: {rule:?}"
            );
            for verb in verbs.iter().filter(|v| !READ.contains(v)) {
                for resource in &resources {
                    writes.push(format!(
                        "{}/{resource}:{verb}{}",
                        groups.join(","),
                        if rule["resourceNames"].is_null() {
                            ""
                        } else {
                            "(named)"
                        }
                    ));
                }
            }
        }
    }
    writes.sort();
    assert_eq!(
        writes,
        [
            // The status summary (created once, then patched by name).
            "/configmaps:create",
            "/configmaps:patch(named)",
            "authentication.k8s.io/tokenreviews:create",
            "authorization.k8s.io/subjectaccessreviews:create",
            "coordination.k8s.io/leases:create",
            // The replicas' reports: named after pods, so not by name.
            "coordination.k8s.io/leases:delete",
            "coordination.k8s.io/leases:patch",
            "coordination.k8s.io/leases:update(named)",
            "events.k8s.io/events:create",
            "events.k8s.io/events:patch",
            "policy.networking.k8s.io/adminnetworkpolicies/status:patch",
            "policy.networking.k8s.io/adminnetworkpolicies/status:update",
            "policy.networking.k8s.io/baselineadminnetworkpolicies/status:patch",
            "policy.networking.k8s.io/baselineadminnetworkpolicies/status:update",
            "policy.networking.k8s.io/clusternetworkpolicies/status:patch",
            "policy.networking.k8s.io/clusternetworkpolicies/status:update",
        ],
        "every write the controller may do"
    );
    let lease_role = find(&objects, "Role", "palisade-controller-lease");
    assert_eq!(
        lease_role["metadata"]["namespace"].as_str(),
        Some("palisade-system")
    );

    let deploy = find(&objects, "Deployment", "palisade-controller");
    assert_eq!(deploy["spec"]["replicas"].as_u64(), Some(2));
    assert!(!deploy["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"].is_null());
    let c = container(deploy);
    assert_eq!(
        c["image"].as_str(),
        Some("palisade/palisade-controller:0.1.0")
    );
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"],
        Value::Bool(true)
    );
    assert_eq!(
        strings(&c["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    assert!(c["securityContext"]["capabilities"]["add"].is_null());
    let pdb = find(&objects, "PodDisruptionBudget", "palisade-controller");
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1));
    let svc = find(&objects, "Service", "palisade-controller");
    let ports: Vec<u64> = svc["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p["port"].as_u64())
        .collect();
    assert_eq!(ports, [9470, 9471]);
    // The chart bundles none of the network-policy-api CRDs.
    assert_eq!(all(&objects, "CustomResourceDefinition").count(), 0);
    assert!(!chart_dir().join("crds").exists());
}

#[test]
fn invalid_values_are_refused_with_the_schema_message() {
    let Some(helm) = helm("invalid_values_are_refused_with_the_schema_message") else {
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    for (name, values, wants) in [
        (
            "replicas-string",
            "controller:\n  replicas: two\n",
            &["'/controller/replicas': got string, want integer"][..],
        ),
        (
            "bind-enum",
            "agent:\n  metrics:\n    bind: everywhere\n",
            &["'/agent/metrics/bind': value must be one of 'loopback'"],
        ),
        (
            "misspelt-key",
            "agent:\n  toleration: []\n",
            &["'/agent': additional properties 'toleration' not allowed"],
        ),
        (
            "short-token",
            "agent:\n  tokenExpirationSeconds: 60\n",
            &["'/agent/tokenExpirationSeconds': minimum: got 60, want 600"],
        ),
        (
            "secret-name",
            "tls:\n  existingSecret: My_Cert\n",
            &["'/tls/existingSecret': 'My_Cert' does not match pattern"],
        ),
        (
            "port-range",
            "controller:\n  grpcPort: 70000\n",
            &["'/controller/grpcPort': maximum"],
        ),
    ] {
        let file = dir.join(format!("invalid-{name}.yaml"));
        std::fs::write(&file, values).expect("write values");
        let file = file.to_string_lossy().into_owned();
        for command in [
            vec!["template", "palisade", "charts/palisade", "--values", &file],
            vec!["lint", "--strict", "charts/palisade", "--values", &file],
        ] {
            let out = tools::run(&helm, &command);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !out.status.success(),
                "{name}: helm {} accepted {values:?}",
                command[0]
            );
            assert!(
                text.contains("values don't meet the specifications of the schema"),
                "{name}: {text}"
            );
            for want in wants {
                assert!(
                    text.contains(want),
                    "{name}: helm {} message lacks {want:?}:\n{text}",
                    command[0]
                );
            }
        }
    }
}
