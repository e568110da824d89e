//! Deployment artefacts, linted without a Docker engine or a cluster: every manifest parses, the
//! Kubernetes objects reference each other consistently, probes hit the routes the server has,
//! every LABELFOOL_* variable they set is a valid configuration key, and the Dockerfile builds
//! with the same setup script as CI.

mod common;

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn docs(rel: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{rel} does not parse: {e}"))
}

fn k8s_objects() -> Vec<(String, Yaml)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo("docker/k8s")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let rel = path.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap().to_string_lossy().into_owned();
            for d in docs(&rel) {
                for key in ["apiVersion", "kind"] {
                    assert!(d[key].as_str().is_some(), "{rel}: missing {key}");
                }
                assert!(d["metadata"]["name"].as_str().is_some(), "{rel}: missing metadata.name");
                out.push((rel.clone(), d));
            }
        }
    }
    out
}

fn labels(y: &Yaml) -> Vec<(String, String)> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.as_str().unwrap_or("").to_string(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The LABELFOOL_* variables a container sets (literal values only).
fn env_of(container: &Yaml) -> Vec<(String, String)> {
    container["env"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
        .filter(|(k, _)| k.starts_with("LABELFOOL_"))
        .collect()
}

fn assert_valid_config_env(what: &str, env: &[(String, String)]) {
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.arg("config").arg("--config").arg(repo("config/default.toml"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: the environment {env:?} is not a valid configuration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let objects = k8s_objects();
    let deployments: Vec<&(String, Yaml)> =
        objects.iter().filter(|(_, d)| d["kind"].as_str() == Some("Deployment")).collect();
    assert!(deployments.len() >= 2, "a CPU and a CUDA deployment");
    let mut gpu = false;
    for (file, d) in &deployments {
        let spec = &d["spec"];
        let selector = labels(&spec["selector"]["matchLabels"]);
        let pod_labels = labels(&spec["template"]["metadata"]["labels"]);
        assert!(
            !selector.is_empty() && selector.iter().all(|l| pod_labels.contains(l)),
            "{file}: selector does not match the pod labels"
        );
        let c = &spec["template"]["spec"]["containers"][0];
        assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/ready"), "{file}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/health"), "{file}");
        let port = c["ports"][0]["containerPort"].as_i64().unwrap();
        let env = env_of(c);
        let bind = env.iter().find(|(k, _)| k == "LABELFOOL_BIND").map(|(_, v)| v.clone()).unwrap_or_default();
        assert!(
            bind.ends_with(&format!(":{port}")),
            "{file}: LABELFOOL_BIND={bind} does not listen on containerPort {port}"
        );
        // The probes go to a declared port that a listener of the server binds (the probe
        // listener, `server.probe_bind`, or the main one).
        for probe in ["readinessProbe", "livenessProbe"] {
            let name = c[probe]["httpGet"]["port"].as_str().unwrap_or_else(|| panic!("{file}: {probe} port"));
            let number = c["ports"]
                .as_vec()
                .unwrap()
                .iter()
                .find(|p| p["name"].as_str() == Some(name))
                .and_then(|p| p["containerPort"].as_i64())
                .unwrap_or_else(|| panic!("{file}: {probe} uses port {name}, which the container does not declare"));
            assert!(
                env.iter().any(|(k, v)| (k == "LABELFOOL_BIND" || k == "LABELFOOL_SERVER__PROBE_BIND")
                    && v.ends_with(&format!(":{number}"))),
                "{file}: nothing listens on the {probe}'s port {number}"
            );
        }
        let grace = spec["template"]["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
        let delay_ms: i64 =
            env.iter().find(|(k, _)| k.ends_with("SHUTDOWN_DELAY_MS")).map(|(_, v)| v.parse().unwrap()).unwrap_or(0);
        let drain: i64 =
            env.iter().find(|(k, _)| k.ends_with("SHUTDOWN_GRACE_SECS")).map(|(_, v)| v.parse().unwrap()).unwrap_or(30);
        assert!(
            delay_ms / 1000 + drain <= grace,
            "{file}: shutdown delay + grace ({}s) exceed terminationGracePeriodSeconds ({grace}s)",
            delay_ms / 1000 + drain
        );
        if !c["resources"]["limits"]["nvidia.com/gpu"].is_badvalue() {
            gpu = true;
            assert!(
                env.iter().any(|(k, v)| k == "LABELFOOL_DEVICE" && v.starts_with("cuda")),
                "{file}: a GPU pod must run on cuda"
            );
        }
        assert_valid_config_env(file, &env);
    }
    assert!(gpu, "one deployment must request a GPU");

    for (file, svc) in objects.iter().filter(|(_, d)| d["kind"].as_str() == Some("Service")) {
        let selector = labels(&svc["spec"]["selector"]);
        let matches = deployments.iter().any(|(_, d)| {
            let pod = labels(&d["spec"]["template"]["metadata"]["labels"]);
            selector.iter().all(|l| pod.contains(l))
        });
        assert!(matches, "{file}: the Service selects no Deployment's pods");
        let target = svc["spec"]["ports"][0]["targetPort"].as_str().unwrap();
        assert!(
            deployments
                .iter()
                .all(|(_, d)| d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"].as_str()
                    == Some(target))
        );
    }
    let names: Vec<&str> = deployments.iter().map(|(_, d)| d["metadata"]["name"].as_str().unwrap()).collect();
    let hpas: Vec<_> = objects.iter().filter(|(_, d)| d["kind"].as_str() == Some("HorizontalPodAutoscaler")).collect();
    assert!(!hpas.is_empty());
    for (file, h) in hpas {
        let target = h["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
        assert!(names.contains(&target), "{file}: scales {target}, which is not a Deployment here");
        assert!(h["spec"]["minReplicas"].as_i64().unwrap() <= h["spec"]["maxReplicas"].as_i64().unwrap());
    }
}

#[test]
fn matrix_shards_run_as_an_indexed_job() {
    let objects = k8s_objects();
    let jobs: Vec<&Yaml> = objects.iter().filter(|(_, d)| d["kind"].as_str() == Some("Job")).map(|(_, d)| d).collect();
    let shards = jobs
        .iter()
        .find(|j| j["spec"]["completionMode"].as_str() == Some("Indexed"))
        .expect("an Indexed Job for the shards");
    let n = shards["spec"]["completions"].as_i64().unwrap();
    let c = &shards["spec"]["template"]["spec"]["containers"][0];
    let cmd: String = c["args"].as_vec().unwrap().iter().filter_map(|a| a.as_str()).collect::<Vec<_>>().join(" ");
    assert!(
        cmd.contains(&format!("--shard \"${{JOB_COMPLETION_INDEX}}/{n}\"")),
        "each pod extracts shard index/{n}: {cmd}"
    );
    let cache = cmd.split("--cache ").nth(1).unwrap().split_whitespace().next().unwrap();
    let reduce =
        jobs.iter().find(|j| j["metadata"]["name"].as_str().unwrap().contains("reduce")).expect("a reduce Job");
    let rc = &reduce["spec"]["template"]["spec"]["containers"][0];
    let rargs: Vec<&str> = rc["args"].as_vec().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert_eq!(&rargs[..2], ["matrix", "reduce"]);
    assert!(rargs.windows(2).any(|w| w == ["--cache", cache]), "reduce reads the cache the shards write");
    for j in jobs {
        assert_valid_config_env(
            "docker/k8s/matrix-build-job.yaml",
            &env_of(&j["spec"]["template"]["spec"]["containers"][0]),
        );
    }
}

#[test]
fn compose_runs_labelfool_next_to_triton() {
    let d = &docs("docker/compose.yaml")[0];
    let services = &d["services"];
    let lf = &services["labelfool"];
    let context = repo("docker").join(lf["build"]["context"].as_str().unwrap());
    assert!(
        context.join(lf["build"]["dockerfile"].as_str().unwrap()).is_file(),
        "compose builds from a Dockerfile that exists"
    );
    assert!(services["triton"]["image"].as_str().unwrap().contains("tritonserver"));
    let env: Vec<(String, String)> = lf["environment"]
        .as_hash()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (k.as_str().unwrap().to_string(), v.as_str().map(str::to_string).unwrap_or_else(|| format!("{v:?}")))
        })
        .collect();
    assert_valid_config_env("docker/compose.yaml", &env);
}

#[test]
fn dockerfile_builds_with_the_ci_setup_script() {
    let text = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    assert!(text.contains("scripts/setup"), "the image must be built by the same script as CI");
    assert!(text.contains("ARG VARIANT"), "a build argument selects the CUDA variant");
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage build");
    // The prebuilt stage copies from the context scripts/container assembles, not from the checkout.
    let from_checkout =
        text.split("AS build-prebuilt").next().unwrap().to_string() + text.split("AS runtime").nth(1).unwrap_or("");
    for line in from_checkout.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        let src = line.split_whitespace().nth(1).unwrap();
        assert!(src == "." || repo(src).exists(), "Dockerfile copies {src}, which does not exist");
    }
    assert!(repo(".ci/run").is_file() && std::fs::read_to_string(repo(".ci/run")).unwrap().contains("scripts/test"));
}

/// The runtime stage's `ENV` settings, as the image sets them.
fn dockerfile_env() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let runtime = text.split("AS runtime").nth(1).expect("a stage named runtime");
    let joined = runtime.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// Runs `labelfool serve` with `env` (paths inside the image replaced by this checkout's) and no
/// key; it must exit at once, saying why.
fn assert_refuses_without_key(what: &str, env: &[(String, String)]) {
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.arg("serve").env_remove("LABELFOOL_API_KEY").env_remove("LABELFOOL_BIND");
    for (k, v) in env {
        if !matches!(k.as_str(), "LABELFOOL_CACHE" | "LABELFOOL_CONFIG" | "LABELFOOL_API_KEY")
            && !k.starts_with("LABELFOOL_JOBS__")
        {
            cmd.env(k, v);
        }
    }
    let jobs = tempfile::tempdir().unwrap();
    cmd.env("LABELFOOL_CONFIG", repo("config/default.toml"))
        .env("LABELFOOL_JOBS__DATABASE", jobs.path().join("jobs.sqlite3"))
        .env("LABELFOOL_JOBS__DIR", jobs.path().join("jobs"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            panic!("{what}: the server started serving without a key ({env:?})");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{what}: exited 0 without a key");
    assert!(stderr.contains("without an API key"), "{what}: {stderr}");
}

#[test]
fn deployments_require_a_key_and_the_server_refuses_to_serve_without_one() {
    // The image's default command.
    let image = dockerfile_env();
    assert!(image.iter().any(|(k, v)| k == "LABELFOOL_BIND" && v.starts_with("0.0.0.0")), "{image:?}");
    assert_refuses_without_key("Dockerfile", &image);
    // Compose: the key is a required variable (`${VAR:?message}`).
    let d = &docs("docker/compose.yaml")[0];
    let env = d["services"]["labelfool"]["environment"].as_hash().unwrap();
    let key = env.get(&Yaml::String("LABELFOOL_API_KEY".into())).and_then(Yaml::as_str).unwrap_or("");
    assert!(key.starts_with("${LABELFOOL_API_KEY:?"), "compose must require the key, not default it: {key:?}");
    let literal: Vec<(String, String)> =
        env.iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string()))).collect();
    assert_refuses_without_key("docker/compose.yaml", &literal);
    // Kubernetes: every Deployment takes the key from a secret that is not optional.
    let mut deployments = 0;
    for (rel, obj) in k8s_objects() {
        if obj["kind"].as_str() != Some("Deployment") {
            continue;
        }
        deployments += 1;
        for c in obj["spec"]["template"]["spec"]["containers"].as_vec().unwrap() {
            let from = c["env"]
                .as_vec()
                .unwrap()
                .iter()
                .find(|e| e["name"].as_str() == Some("LABELFOOL_API_KEY"))
                .unwrap_or_else(|| panic!("{rel}: no LABELFOOL_API_KEY"));
            let secret = &from["valueFrom"]["secretKeyRef"];
            assert!(secret["name"].as_str().is_some(), "{rel}: the key must come from a secret");
            assert_ne!(secret["optional"].as_bool(), Some(true), "{rel}: the key's secret must be required");
            assert_refuses_without_key(&rel, &env_of(c));
        }
    }
    assert!(deployments >= 2, "the CPU and CUDA deployments");
}

/// The replicas share one PostgreSQL: every Deployment reads `LABELFOOL_JOBS__DATABASE` from the
/// secret that `docker/k8s/postgres/` defines, whose DSN names that folder's Service, which
/// selects the StatefulSet's pods on its port; and they mount one ReadWriteMany jobs volume.
#[test]
fn replicas_share_the_postgres_of_docker_k8s_postgres() {
    let pg: Vec<Yaml> = ["statefulset", "service", "secret"]
        .iter()
        .flat_map(|f| docs(&format!("docker/k8s/postgres/{f}.yaml")))
        .collect();
    let of = |kind: &str| pg.iter().find(|d| d["kind"].as_str() == Some(kind)).unwrap_or_else(|| panic!("no {kind}"));
    let (sts, svc, secret) = (of("StatefulSet"), of("Service"), of("Secret"));
    let pods = labels(&sts["spec"]["template"]["metadata"]["labels"]);
    assert!(labels(&svc["spec"]["selector"]).iter().all(|l| pods.contains(l)), "the Service selects no database pod");
    let port = svc["spec"]["ports"][0]["port"].as_i64().unwrap();
    let dsn = secret["stringData"]["dsn"].as_str().unwrap();
    let host = format!("@{}:{port}/", svc["metadata"]["name"].as_str().unwrap());
    assert!(dsn.starts_with("postgres://") && dsn.contains(&host), "{dsn} does not name the Service ({host})");
    let secret_name = secret["metadata"]["name"].as_str().unwrap();
    let claims: Vec<String> = k8s_objects()
        .into_iter()
        .filter(|(_, d)| d["kind"].as_str() == Some("PersistentVolumeClaim"))
        .inspect(|(f, d)| {
            let modes = d["spec"]["accessModes"].as_vec().unwrap();
            assert!(modes.iter().any(|m| m.as_str() == Some("ReadWriteMany")), "{f}: the jobs volume must be RWX");
        })
        .map(|(_, d)| d["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    for (file, d) in k8s_objects().iter().filter(|(_, d)| d["kind"].as_str() == Some("Deployment")) {
        let pod = &d["spec"]["template"]["spec"];
        let env = pod["containers"][0]["env"].as_vec().unwrap();
        let db = env.iter().find(|e| e["name"].as_str() == Some("LABELFOOL_JOBS__DATABASE"));
        let key = db.map(|e| &e["valueFrom"]["secretKeyRef"]).unwrap_or_else(|| panic!("{file}: no jobs database"));
        assert_eq!((key["name"].as_str(), key["key"].as_str()), (Some(secret_name), Some("dsn")), "{file}");
        let claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"].as_str().unwrap_or_default();
        assert!(claims.iter().any(|c| c == claim), "{file}: mounts {claim:?}, which no claim here defines");
        let mount = &pod["containers"][0]["volumeMounts"][0];
        assert_eq!(mount["mountPath"].as_str(), Some("/var/lib/labelfool/jobs"), "{file}: the image's jobs.dir");
    }
}

/// The manifests against Kubernetes' own schemas (kubernetes-validate, strict: unknown fields
/// fail too), and a broken manifest to show the check can fail.
#[ignore = "partner tier (kubernetes-validate): scripts/test runs it"]
#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let venv = std::env::var("LABELFOOL_VENV").expect("scripts/env.sh sets LABELFOOL_VENV");
    let tool = Path::new(&venv).join("bin/kubernetes-validate");
    let manifests: Vec<PathBuf> = ["docker/k8s", "docker/k8s/postgres"]
        .into_iter()
        .flat_map(|d| std::fs::read_dir(repo(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(manifests.len() >= 4);
    let out = std::process::Command::new(&tool).arg("--strict").args(&manifests).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let text =
        std::fs::read_to_string(repo("docker/k8s/deployment.yaml")).unwrap().replace("replicas: 2", "replicas: two");
    std::fs::write(&broken, text).unwrap();
    let out = std::process::Command::new(&tool).arg("--strict").arg(&broken).output().unwrap();
    assert!(!out.status.success(), "a Deployment with `replicas: two` passed");
}
