//! The deployment files (`deploy/`), checked as far as this machine allows: the systemd unit
//! with `systemd-analyze verify`, YAML and JSON parsed, the embedded configurations validated by
//! writebehind itself, the dashboard's metrics exported by the service. (No Docker engine runs
//! here: the image and the compose file are not built.)

use std::path::{Path, PathBuf};

use writebehind::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

fn env(name: &str) -> Option<String> {
    match name {
        "DB_PASSWORD" => Some("secret".to_string()),
        "WRITEBEHIND_ADMIN_TOKEN" => Some("an-admin-token-of-32-characters".to_string()),
        _ => None,
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let dir = tempfile::tempdir().expect("dir");
    // systemd-analyze checks that the executables exist: point them at the built binary.
    let unit = read("systemd/writebehind.service").replace(
        "/usr/local/bin/writebehind",
        env!("CARGO_BIN_EXE_writebehind"),
    );
    let path = dir.path().join("writebehind.service");
    std::fs::write(&path, unit).expect("unit");
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (systemd)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let problems: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("writebehind.service"))
        .collect();
    assert!(output.status.success() && problems.is_empty(), "{stderr}");
}

fn yaml_documents(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

#[test]
fn kubernetes_manifests_parse_and_their_configurations_validate() {
    for path in ["kubernetes/statefulset.yaml", "kubernetes/sidecar.yaml"] {
        let docs = yaml_documents(path);
        assert!(docs.len() >= 2, "{path}");
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        assert!(
            kinds.contains(&"StatefulSet") && kinds.contains(&"ConfigMap"),
            "{path}: {kinds:?}"
        );
        for doc in &docs {
            if doc["kind"].as_str() == Some("ConfigMap") {
                let toml = doc["data"]["writebehind.toml"]
                    .as_str()
                    .expect("writebehind.toml in the ConfigMap");
                Config::parse(toml, &env).unwrap_or_else(|e| panic!("{path}: {e}"));
            }
            if doc["kind"].as_str() == Some("StatefulSet") {
                let claims = &doc["spec"]["volumeClaimTemplates"];
                assert!(
                    claims.as_vec().is_some_and(|c| !c.is_empty()),
                    "{path}: the buffer needs a persistent volume"
                );
            }
        }
    }
}

#[test]
fn the_compose_example_parses_and_its_configuration_validates() {
    let docs = yaml_documents("compose/docker-compose.yml");
    let services = &docs[0]["services"];
    for name in [
        "redis-primary",
        "redis-replica",
        "sentinel",
        "mariadb",
        "writebehind",
    ] {
        assert!(!services[name].is_badvalue(), "service {name} missing");
    }
    Config::parse(&read("compose/writebehind.toml"), &env).expect("compose/writebehind.toml");
    assert!(!services["postgres"].is_badvalue() && !services["writebehind-postgres"].is_badvalue());
    let postgres = Config::parse(&read("compose/writebehind-postgres.toml"), &env)
        .expect("compose/writebehind-postgres.toml");
    assert!(postgres.backends["pg"].url.starts_with("postgres://"));
    let cluster = yaml_documents("compose/docker-compose-cluster.yml");
    let services = &cluster[0]["services"];
    for name in [
        "redis-1",
        "redis-6",
        "cluster-init",
        "mariadb",
        "writebehind",
    ] {
        assert!(
            !services[name].is_badvalue(),
            "cluster service {name} missing"
        );
    }
    let config = Config::parse(&read("compose/writebehind-cluster.toml"), &env)
        .expect("compose/writebehind-cluster.toml");
    assert_eq!(config.source.cluster.as_ref().map(Vec::len), Some(6));
    assert!(
        read("Dockerfile")
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count()
            == 2
    );
}

#[test]
fn the_dashboard_uses_only_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/writebehind-dashboard.json")).expect("JSON");
    // Every metric the service records appears as a string literal in src/.
    let mut exported = String::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("src")
            .map(|e| e.expect("entry").path())
        {
            if entry.is_dir() {
                dirs.push(entry);
            } else if entry.extension().is_some_and(|e| e == "rs") {
                exported.push_str(&std::fs::read_to_string(&entry).expect("source"));
            }
        }
    }
    let mut used = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("writebehind_"))
            {
                let name = word.trim_start_matches("writebehind_");
                let base = name
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count");
                assert!(
                    exported.contains(&format!("\"writebehind_{base}\"")),
                    "{word} is not a metric the service exports"
                );
                used += 1;
            }
        }
    }
    assert!(used >= 10);
}
