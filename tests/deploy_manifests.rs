//! The Kubernetes manifests in deploy/kustomize against the binary they run: every
//! subcommand and flag in a container's `args` and in an exec probe exists (`tollgate SUB
//! --help`), probe and scrape ports match the ports the containers listen on, the sidecar
//! started with the manifest's own flags passes the manifest's own probe commands, and every
//! file a kustomization names exists. Schema validation is `deploy/validate.sh`
//! (`kubernetes-validate --strict`), run by `.ci/run`.
//!
//! The manifests are read line by line, not with a YAML library: they are written in a plain
//! block style (one `- item` per line, probe commands as JSON-style flow lists) so that this
//! stays exact without a new dependency.
#![allow(clippy::disallowed_methods, reason = "waits on real processes and sockets use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOLLGATE: &str = env!("CARGO_BIN_EXE_tollgate");

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "yaml") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&repo_root().join("deploy/kustomize"), &mut found);
    found.sort();
    assert!(found.len() >= 8, "expected the kustomize base and overlays, found {found:?}");
    found
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn unquote(value: &str) -> String {
    value.trim().trim_matches('"').trim_matches('\'').to_string()
}

/// The items of every `args:` block: `["sidecar", "--listen=127.0.0.1:8181", ...]`.
fn args_blocks(text: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    for (line_idx, line) in lines.iter().enumerate() {
        if line.trim() != "args:" {
            continue;
        }
        let items: Vec<String> = lines[line_idx + 1..]
            .iter()
            .take_while(|item| indent(item) >= indent(line) && item.trim_start().starts_with("- "))
            .map(|item| unquote(item.trim_start().trim_start_matches("- ")))
            .collect();
        blocks.push(items);
    }
    blocks
}

/// Every exec probe or command naming the tollgate binary, as its argument list.
fn tollgate_commands(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("command:"))
        .filter(|list| list.contains("tollgate"))
        .map(|list| serde_json::from_str::<Vec<String>>(list.trim()).unwrap_or_else(|error| panic!("`{list}` is not a flow list: {error}")))
        .collect()
}

/// `key: value` pairs anywhere in the file, for keys such as `containerPort` or `path`.
fn values_of(text: &str, key: &str) -> Vec<String> {
    text.lines().filter_map(|line| line.trim().trim_start_matches("- ").strip_prefix(&format!("{key}:")).map(unquote)).collect()
}

fn help(subcommand: &str) -> Option<String> {
    let output = Command::new(TOLLGATE).args([subcommand, "--help"]).output().unwrap();
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn flag_name(arg: &str) -> &str {
    arg.split_once('=').map_or(arg, |(name, _)| name)
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').and_then(|(_, port)| port.parse().ok()).unwrap_or_else(|| panic!("`{addr}` has no port"))
}

#[test]
fn every_subcommand_and_flag_in_the_manifests_exists_in_the_binary() {
    let mut n_checked = 0;
    for path in manifests() {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.strip_prefix(repo_root()).unwrap().display().to_string();
        let invocations = args_blocks(&text).into_iter().chain(tollgate_commands(&text).into_iter().map(|command| command[1..].to_vec()));
        for invocation in invocations {
            let subcommand = &invocation[0];
            let help = help(subcommand).unwrap_or_else(|| panic!("{name}: `tollgate {subcommand}` is not a subcommand of the binary"));
            for arg in invocation[1..].iter().filter(|arg| arg.starts_with("--")) {
                let flag = flag_name(arg);
                assert!(
                    help.split(|c: char| c.is_whitespace() || c == ',').any(|word| word == flag),
                    "{name}: `tollgate {subcommand}` has no flag `{flag}`\n{help}"
                );
                n_checked += 1;
            }
        }
    }
    assert!(n_checked >= 10, "expected the sidecar's flags and probe flags to be checked, checked {n_checked}");
}

#[test]
fn probe_and_scrape_ports_match_what_the_containers_listen_on() {
    // A Service's `targetPort` names a port of a container in another file.
    let all_text: String = manifests().iter().map(|path| std::fs::read_to_string(path).unwrap()).collect::<Vec<_>>().join("\n");
    let all_port_names: Vec<String> = all_text
        .lines()
        .zip(all_text.lines().skip(1))
        .filter(|(_, next)| next.trim().starts_with("containerPort:"))
        .filter_map(|(line, _)| line.trim().strip_prefix("- name:").map(unquote))
        .collect();
    for path in manifests() {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.strip_prefix(repo_root()).unwrap().display().to_string();
        let listens: Vec<u16> = args_blocks(&text).iter().flatten().filter_map(|arg| arg.strip_prefix("--listen=")).map(port_of).collect();
        let metrics_listens: Vec<u16> =
            args_blocks(&text).iter().flatten().filter_map(|arg| arg.strip_prefix("--metrics-listen=")).map(port_of).collect();
        for command in tollgate_commands(&text) {
            let addr = command
                .iter()
                .skip_while(|arg| *arg != "--addr")
                .nth(1)
                .unwrap_or_else(|| panic!("{name}: probe {command:?} has no --addr"));
            assert!(
                listens.contains(&port_of(addr)),
                "{name}: probe {command:?} asks port {} but the containers listen on {listens:?}",
                port_of(addr)
            );
            assert!(addr.starts_with("127.0.0.1:"), "{name}: the sidecar is probed over loopback, not `{addr}`");
        }
        let container_ports: Vec<String> = values_of(&text, "containerPort");
        let port_names: Vec<String> = text
            .lines()
            .zip(text.lines().skip(1))
            .filter(|(_, next)| next.trim().starts_with("containerPort:"))
            .filter_map(|(line, _)| line.trim().strip_prefix("- name:").map(unquote))
            .collect();
        for port in values_of(&text, "port").into_iter().chain(values_of(&text, "targetPort")) {
            let known = port.parse::<u16>().map_or_else(
                |_| port_names.contains(&port) || (text.contains("kind: Service") && all_port_names.contains(&port)),
                |number| {
                    container_ports.contains(&number.to_string()) || text.contains("kind: Service") || text.contains("kind: NetworkPolicy")
                },
            );
            assert!(known, "{name}: port `{port}` is neither a container port {container_ports:?} nor a named one {port_names:?}");
        }
        for scrape_port in values_of(&text, "prometheus.io/port") {
            let scrape_port: u16 = scrape_port.parse().unwrap();
            assert!(container_ports.contains(&scrape_port.to_string()), "{name}: Prometheus scrapes {scrape_port}, not a container port");
            assert!(
                listens.contains(&scrape_port) || metrics_listens.contains(&scrape_port),
                "{name}: Prometheus scrapes {scrape_port} but the container listens on {listens:?} and {metrics_listens:?}"
            );
        }
        // Every probe and scrape path is one the binary serves (a kustomization's `path:` is
        // a JSON patch's, not HTTP).
        if path.ends_with("kustomization.yaml") {
            continue;
        }
        let binary = std::fs::read(TOLLGATE).unwrap();
        for probe_path in values_of(&text, "path").into_iter().chain(values_of(&text, "prometheus.io/path")) {
            assert!(probe_path.starts_with('/'), "{name}: `{probe_path}` is not an HTTP path");
            assert!(
                binary.windows(probe_path.len()).any(|window| window == probe_path.as_bytes()),
                "{name}: the binary never serves `{probe_path}`"
            );
        }
    }
}

#[test]
fn the_sidecar_started_with_the_manifest_flags_passes_the_manifest_probes() {
    let text = std::fs::read_to_string(repo_root().join("deploy/kustomize/base/app-deployment.yaml")).unwrap();
    let args = args_blocks(&text).into_iter().find(|args| args[0] == "sidecar").expect("the app Deployment runs `tollgate sidecar`");
    let temporary = tempfile::tempdir().unwrap();
    let keys = temporary.path().join("keys");
    assert!(Command::new(TOLLGATE).args(["keygen", "--out"]).arg(&keys).stdout(Stdio::null()).status().unwrap().success());
    let snapshot = temporary.path().join("snapshot.bin");
    let compiled = Command::new(TOLLGATE)
        .args(["compile", repo_root().join("policies").to_str().unwrap(), "--key"])
        .arg(keys.join("tollgate.key"))
        .arg("--out")
        .arg(&snapshot)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(compiled.success());

    // The manifest's flags as they are, with files and the port moved into this test's reach.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let manifest_port = args.iter().find_map(|arg| arg.strip_prefix("--listen=")).map(port_of).unwrap();
    // The manifest subscribes to a control plane that does not exist here: the sidecar must
    // start and turn ready from its cached snapshot alone, as after a restart while the
    // control plane is down.
    let data_dir = temporary.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::copy(&snapshot, data_dir.join(tollgate_sidecar::subscribe::CACHE_FILE)).unwrap();
    let api_key = temporary.path().join("sidecar.key");
    std::fs::write(&api_key, "tg_0000000000000000_unused").unwrap();
    let local: Vec<String> = args
        .iter()
        .map(|arg| match flag_name(arg) {
            "--listen" => format!("--listen=127.0.0.1:{port}"),
            "--snapshot" => format!("--snapshot={}", snapshot.display()),
            "--trust-key" => format!("--trust-key={}", keys.join("tollgate.pub").display()),
            "--data-dir" => format!("--data-dir={}", data_dir.display()),
            "--api-key-file" => format!("--api-key-file={}", api_key.display()),
            "--control-plane" => "--control-plane=http://127.0.0.1:9".to_string(),
            "--metrics-listen" => "--metrics-listen=127.0.0.1:0".to_string(),
            _ => arg.clone(),
        })
        .collect();
    let mut sidecar = Command::new(TOLLGATE).args(&local).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();

    let probes = tollgate_commands(&text);
    assert!(probes.iter().any(|probe| probe[1] == "ready") && probes.iter().any(|probe| probe[1] == "health"), "{probes:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    for probe in &probes {
        let probe: Vec<String> = probe[1..].iter().map(|arg| arg.replace(&format!(":{manifest_port}"), &format!(":{port}"))).collect();
        loop {
            let passed = Command::new(TOLLGATE).args(&probe).stderr(Stdio::null()).status().unwrap().success();
            if passed {
                break;
            }
            assert!(Instant::now() < deadline, "probe {probe:?} never passed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    // And the probes fail once the sidecar is gone.
    for probe in &probes {
        let probe: Vec<String> = probe[1..].iter().map(|arg| arg.replace(&format!(":{manifest_port}"), &format!(":{port}"))).collect();
        assert!(
            !Command::new(TOLLGATE).args(&probe).stderr(Stdio::null()).status().unwrap().success(),
            "{probe:?} passed without a sidecar"
        );
    }
}

#[test]
fn every_kustomization_names_files_that_exist_and_the_base_lists_every_file() {
    for path in manifests().into_iter().filter(|path| path.file_name().is_some_and(|name| name == "kustomization.yaml")) {
        let text = std::fs::read_to_string(&path).unwrap();
        let dir = path.parent().unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.iter().position(|line| line.trim() == "resources:").unwrap();
        let resources: Vec<String> = lines[start + 1..]
            .iter()
            .take_while(|line| line.trim_start().starts_with("- "))
            .map(|line| unquote(line.trim_start().trim_start_matches("- ")))
            .collect();
        for resource in &resources {
            assert!(dir.join(resource).exists(), "{}: names `{resource}`, which does not exist", path.display());
        }
        for file in std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned()) {
            if file.ends_with(".yaml") && file != "kustomization.yaml" {
                assert!(resources.contains(&file), "{}: `{file}` is in the directory but not in `resources`", path.display());
            }
        }
    }
}
