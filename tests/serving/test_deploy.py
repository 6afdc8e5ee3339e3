"""deploy/: the Kubernetes manifests against the Kubernetes schemas (kubernetes-validate,
offline), their wiring (labels, ports, probes, the read-only root filesystem), the probes and
environment of the Deployment against a real gunicorn, the training Job's TF_CONFIG, and the
single-host compose file (parsed: there is no container engine here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from services import free_port, service
from shipped import config_text, shipped

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
COMPOSE = REPO / "deploy" / "compose"
KUBERNETES_VERSION = "1.33.0"  # the oldest minor the managed clouds still run as of late 2026

MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def resource(kind: str, name: str) -> dict:
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] == kind and doc["metadata"]["name"] == name:
                return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def container(deployment: dict, name: str) -> dict:
    (found,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name
    ]
    return found


def predictor(deployment: dict) -> dict:
    return container(deployment, "predictor")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    import kubernetes_validate

    for doc in documents(path):
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")


def test_kustomization_applies_every_serving_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    (image,) = kustomization["images"]
    assert image["name"] == predictor(resource("Deployment", "chestct"))["image"]


def test_deployment_probes_resources_and_read_only_root() -> None:
    deployment = resource("Deployment", "chestct")
    pod = deployment["spec"]["template"]["spec"]
    container = predictor(deployment)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000}
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert set(requests) == {"cpu", "memory"}
    assert _mib(limits["memory"]) > _mib(requests["memory"]) >= 208  # measured: 208 MB
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    # The only writable place is an emptyDir at /tmp (gunicorn's metrics folder).
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == {"/tmp"} and "emptyDir" in volumes[mounts["/tmp"]]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_service_autoscaler_and_budget_point_at_the_predictor() -> None:
    deployment = resource("Deployment", "chestct")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = resource("Service", "chestct")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "proxy"  # the nginx sidecar (docs/serving-hardening.md)
    pdb = resource("PodDisruptionBudget", "chestct")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = resource("HorizontalPodAutoscaler", "chestct")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "chestct",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"  # what the HPA scales on has a request
    assert "cpu" in predictor(deployment)["resources"]["requests"]


def test_the_deployment_environment_and_probes_on_a_real_gunicorn(
    tmp_path: Path,
    model_dir: Path,
) -> None:
    """gunicorn with the Deployment's environment (bound to 127.0.0.1 here) answers both
    probes with 200, with its metrics folder in TMPDIR."""
    container = predictor(resource("Deployment", "chestct"))
    root = tmp_path / "root"
    (root / "config").mkdir(parents=True)
    (root / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    config = {"model_dir": str(model_dir)}
    (root / "config" / "config.yaml").write_text(config_text(config), encoding="utf-8")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env |= {e["name"]: e["value"] for e in container["env"]}
    env |= {"CHESTCT_ROOT": str(root), "TMPDIR": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}
    env["CHESTCT_BIND"] = f"127.0.0.1:{port}"
    base = f"http://127.0.0.1:{port}"
    gunicorn = [str(Path(os.sys.executable).with_name("gunicorn")), "-c"]
    cmd = [*gunicorn, "config/gunicorn.conf.py", "app:app"]
    with service(cmd, tmp_path / "gunicorn.log", f"{base}/health", env=env, cwd=REPO):
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            path = container[probe]["httpGet"]["path"]
            assert _get_until_200(f"{base}{path}"), f"{probe} {path} never answered 200"
        # The metrics folder is in TMPDIR: on Kubernetes, the emptyDir mounted at /tmp.
        assert [p.name.startswith("chestct-metrics-") for p in scratch.iterdir()] == [True]


def _get_until_200(url: str, tries: int = 120) -> bool:
    import time

    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _mib(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, quantity
    return int(match[1]) * (1024 if match[2] == "Gi" else 1)


# --------------------------------------------------------------------------- training Job


def _tf_config(job: dict, index: int) -> str:
    """Run the Job's shell up to `export TF_CONFIG` with its environment; TF_CONFIG."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = container["args"][0]
    head = script[: script.index("export TF_CONFIG")] + 'printf %s "$TF_CONFIG"\n'
    env = {e["name"]: e["value"] for e in container["env"]}
    env |= {"JOB_COMPLETION_INDEX": str(index), "PATH": os.environ["PATH"]}
    proc = subprocess.run(
        ["sh", "-ec", head], env=env, capture_output=True, text=True, check=True, timeout=30
    )
    return proc.stdout


def test_training_job_builds_one_cluster_from_the_completion_index() -> None:
    from chestct.model.distributed import worker_role

    job = resource("Job", "chestct-train")
    spec = job["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    workers = int(next(e["value"] for e in container["env"] if e["name"] == "WORKERS"))
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == workers
    service = resource("Service", "chestct-train")
    assert service["spec"]["clusterIP"] == "None"
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    configs = [json.loads(_tf_config(job, i)) for i in range(workers)]
    hosts = [f"chestct-train-{i}.chestct-train:12345" for i in range(workers)]
    for index, config in enumerate(configs):
        assert config == {
            "cluster": {"worker": hosts},
            "task": {"type": "worker", "index": index},
        }
        role = worker_role("multi_worker", json.dumps(config))
        assert role.workers == workers and role.chief == (index == 0)
    script = container["args"][0]
    assert "dvc repro train" in script and "python -m chestct.stages.train" in script


# --------------------------------------------------------------------------- compose


def test_compose_serves_with_prometheus_and_grafana_on_localhost() -> None:
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert set(services) == {"serve", "proxy", "prometheus", "grafana"}
    serve = services["serve"]
    assert serve["build"]["target"] == "serve"
    assert (COMPOSE / serve["build"]["context"]).resolve() == REPO
    assert serve["read_only"] is True and serve["tmpfs"] == ["/tmp:size=64m"]
    for name, svc in services.items():
        for mapping in svc.get("ports", []):
            assert mapping.startswith("127.0.0.1:"), f"{name} publishes {mapping} beyond localhost"
        image = svc.get("image", "")
        if name != "serve":
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: unpinned {image}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"serve:{serve['expose'][0]}"]
    datasources = COMPOSE / "grafana/provisioning/datasources/prometheus.yaml"
    (source,) = yaml.safe_load(datasources.read_text(encoding="utf-8"))["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"


def _mounts(service: dict) -> dict[str, Path]:
    """A compose service's bind mounts: container path -> file or folder on this side."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (COMPOSE / source).resolve()
    return out


def test_compose_mounts_the_alert_rules_and_provisions_the_dashboard(tmp_path: Path) -> None:
    """Every file compose mounts exists; Prometheus loads the rules the tests check, and
    promtool accepts the config and the rules as mounted; Grafana's provider points at the
    mounted dashboard."""
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is absent: `apt-get install prometheus` (.ci/run does)")
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    for name, svc in services.items():
        for target, source in _mounts(svc).items():
            assert source.exists(), f"{name} mounts missing {source} at {target}"
    prom_mounts = _mounts(services["prometheus"])
    config = yaml.safe_load(prom_mounts["/etc/prometheus/prometheus.yml"].read_text())
    rule_files = config.get("rule_files") or []
    assert rule_files, "prometheus.yml loads no alert rules"
    rules = [prom_mounts[path] for path in rule_files]  # KeyError: a rule file not mounted
    assert (REPO / "config" / "monitoring" / "alerts.yml").resolve() in rules
    # promtool on the config as the container reads it, with the rule paths on this side.
    local = {**config, "rule_files": [str(path) for path in rules]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(local), encoding="utf-8")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", *map(str, rules)]):
        done = subprocess.run(
            [promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
    graf_mounts = _mounts(services["grafana"])
    provisioning = graf_mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "chestct.yaml").read_text(encoding="utf-8")
    )["providers"]
    folder = provider["options"]["path"]
    dashboards = [s for t, s in graf_mounts.items() if t.startswith(folder.rstrip("/") + "/")]
    assert dashboards, f"nothing is mounted under the provider's path {folder}"
    uids = {json.loads(path.read_text(encoding="utf-8"))["uid"] for path in dashboards}
    assert "chestct-monitoring" in uids


# --------------------------------------------------------------------------- the proxy


def test_the_nginx_sidecar_and_compose_proxy_front_gunicorn() -> None:
    """Both run deploy/k8s/proxy/chestct.conf.template with the serving body limit and
    gunicorn's port; nothing publishes gunicorn itself."""
    from chestct.serving import proxy
    from chestct.settings import ServingConfig

    deployment = resource("Deployment", "chestct")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = container(deployment, "proxy")
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    bind = {e["name"]: e["value"] for e in predictor(deployment)["env"]}["CHESTCT_BIND"]
    assert env["CHESTCT_UPSTREAM"].split(":")[-1] == bind.split(":")[-1]
    assert env["CHESTCT_MAX_BODY"] == proxy.max_body(shipped(ServingConfig).max_upload_mb)
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {
        "proxy": int(env["CHESTCT_PROXY_LISTEN"])
    }
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/nginx/templates"]]["configMap"]["name"] == "chestct-proxy"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    (generated,) = kustomization["configMapGenerator"]
    (entry,) = generated["files"]
    key, source = entry.split("=")
    assert generated["name"] == "chestct-proxy" and key == "chestct.conf.template"
    assert (K8S / source).resolve() == (REPO / proxy.TEMPLATE).resolve()

    services = yaml.safe_load((COMPOSE / "compose.yaml").read_text(encoding="utf-8"))["services"]
    front = services["proxy"]
    assert front["environment"]["CHESTCT_MAX_BODY"] == env["CHESTCT_MAX_BODY"]
    assert front["environment"]["CHESTCT_UPSTREAM"] == f"serve:{services['serve']['expose'][0]}"
    (volume,) = front["volumes"]
    assert (COMPOSE / volume.split(":")[0]).resolve() == (REPO / proxy.TEMPLATE).resolve()
    assert "ports" not in services["serve"]
