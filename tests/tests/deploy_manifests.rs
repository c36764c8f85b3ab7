//! The Kubernetes manifests in deploy/ stay valid YAML with the fields
//! Kubernetes requires, the gateway config they carry is a valid flashgate
//! config, and the numbers that depend on each other still agree (probe
//! ports and the admin listener, grace period and drain times, ALB
//! timeouts and listener timeouts).

use std::time::Duration;

use flashgate_tests::{repo_root, Config};
use serde::Deserialize;
use serde_yaml::Value;

fn documents() -> Vec<(String, Value)> {
    let dir = repo_root().join("deploy");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("deploy/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "deploy/ holds the manifests: {files:?}");
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", f.display()));
            if v.is_null() {
                continue;
            }
            docs.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
        }
    }
    docs
}

fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn int(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not an integer: {v:?}"))
}

#[test]
fn every_manifest_has_the_required_fields() {
    let docs = documents();
    for (file, v) in &docs {
        for key in ["apiVersion", "kind"] {
            assert!(
                v[key].as_str().is_some_and(|s| !s.is_empty()),
                "{file}: {key} in {v:?}"
            );
        }
        assert!(
            v["metadata"]["name"].as_str().is_some(),
            "{file}: metadata.name"
        );
        if v["kind"] != "Namespace" {
            assert_eq!(
                v["metadata"]["namespace"], "shop",
                "{file}: {:?}",
                v["metadata"]
            );
        }
    }
    let kinds: Vec<&str> = docs
        .iter()
        .filter_map(|(_, v)| v["kind"].as_str())
        .collect();
    for k in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "CronHorizontalPodAutoscaler",
        "NetworkPolicy",
        "Ingress",
        "Secret",
    ] {
        assert!(kinds.contains(&k), "a {k} in deploy/: {kinds:?}");
    }
}

#[test]
fn the_numbers_agree_with_the_gateway_config() {
    let docs = documents();
    let secret = find(&docs, "Secret", "flashgate-config");
    let toml = secret["stringData"]["flashgate.toml"].as_str().unwrap();
    let config = Config::parse(toml).unwrap_or_else(|e| panic!("deploy config: {e}"));

    let deploy = find(&docs, "Deployment", "flashgate");
    let pod = &deploy["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let port = |name: &str| {
        c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| int(&p["containerPort"]) as u16)
            .unwrap()
    };
    assert_eq!(port("admin"), config.admin.listen.port());
    assert_eq!(port("http"), config.listeners[0].listen.port());
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert!(
        c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|a| a == "/etc/flashgate/flashgate.toml"),
        "runs the mounted config"
    );

    // Liveness gives a busy process a minute; readiness drops it in seconds.
    let window = |p: &Value| int(&p["periodSeconds"]) * int(&p["failureThreshold"]);
    assert!(window(&c["livenessProbe"]) >= 30);
    let pre_stop = Duration::from_secs(int(&c["lifecycle"]["preStop"]["sleep"]["seconds"]));
    let shutdown = &config.shutdown;
    assert!(
        Duration::from_secs(window(&c["readinessProbe"])) < pre_stop + shutdown.drain_delay.0,
        "readiness notices the drain before the listener stops"
    );
    // The grace period covers the whole drain.
    let grace = Duration::from_secs(int(&pod["terminationGracePeriodSeconds"]));
    assert!(grace > pre_stop + shutdown.drain_delay.0 + shutdown.drain_timeout.0);

    // The autoscalers and the budget point at this Deployment.
    let hpa = find(&docs, "HorizontalPodAutoscaler", "flashgate");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "flashgate");
    let cron = find(&docs, "CronHorizontalPodAutoscaler", "flashgate-sale");
    assert_eq!(cron["spec"]["scaleTargetRef"]["name"], "flashgate");
    assert!(int(&hpa["spec"]["minReplicas"]) >= 2);
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    let pdb = find(&docs, "PodDisruptionBudget", "flashgate");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"]["app"], labels["app"]);
    assert_eq!(
        deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );

    // The ALB: health checks on the admin port's /readyz, idle timeout
    // below the listener's, deregistration within the serving window.
    let ing = find(&docs, "Ingress", "flashgate");
    let ann = &ing["metadata"]["annotations"];
    assert_eq!(
        ann["alb.ingress.kubernetes.io/healthcheck-port"]
            .as_str()
            .unwrap(),
        config.admin.listen.port().to_string()
    );
    assert_eq!(ann["alb.ingress.kubernetes.io/healthcheck-path"], "/readyz");
    let attr = |key: &str, name: &str| -> u64 {
        ann[key]
            .as_str()
            .unwrap()
            .split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in {key}"))
            .parse()
            .unwrap()
    };
    let idle = attr(
        "alb.ingress.kubernetes.io/load-balancer-attributes",
        "idle_timeout.timeout_seconds",
    );
    assert!(Duration::from_secs(idle) < config.listeners[0].idle_timeout.0);
    let dereg = attr(
        "alb.ingress.kubernetes.io/target-group-attributes",
        "deregistration_delay.timeout_seconds",
    );
    assert!(Duration::from_secs(dereg) <= pre_stop + shutdown.drain_delay.0);
    let backend = &ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"];
    let svc = find(&docs, "Service", backend["name"].as_str().unwrap());
    assert!(svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["name"] == backend["port"]["name"]));

    // Only the gateway reaches the order core, on the port the gateway uses.
    let np = find(&docs, "NetworkPolicy", "order-core-only-from-gateway");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["app"],
        "order-core"
    );
    let rule = &np["spec"]["ingress"][0];
    assert_eq!(rule["from"].as_sequence().unwrap().len(), 1);
    assert_eq!(
        rule["from"][0]["podSelector"]["matchLabels"]["app"],
        labels["app"]
    );
    let order_core = config
        .upstreams
        .iter()
        .find(|u| u.name == "order-core")
        .unwrap();
    let port = order_core.endpoints[0]
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert_eq!(int(&rule["ports"][0]["port"]), port);
}
