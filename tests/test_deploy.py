"""Fleet deployment files: the DaemonSet against the Kubernetes schemas (offline), the
container recipe and the Prometheus configuration, each checked against hugepaged itself."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from hugepaged.cli import build_parser
from hugepaged.config import DEFAULT_PATH, DEFAULT_SOCKET, parse_config
from hugepaged.metrics import parse_listen
from hugepaged.targets import cgroup_under

from .marks import require_tool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFEST = DEPLOY / "kubernetes" / "daemonset.yaml"
PORT = 9633
# The oldest release still in use at large and the newest the bundled schemas know.
VERSIONS = ("1.27", latest_version())


def docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}


@pytest.mark.parametrize("version", VERSIONS)
def test_manifest_validates_against_the_kubernetes_schemas(version):
    kinds = docs()
    assert set(kinds) == {"Namespace", "ConfigMap", "DaemonSet"}
    for doc in kinds.values():
        # strict: an unknown or misspelt field is an error too
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_a_misspelt_field():
    ds = docs()["DaemonSet"]
    ds["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="hostPid"):
        kubernetes_validate.validate(ds, latest_version(), strict=True)


def container() -> dict:
    (c,) = docs()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return c


def test_daemonset_has_what_hugepaged_needs():
    ds = docs()["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True  # the host's processes
    assert pod["hostNetwork"] is True  # the process connector lives in the host's netns
    c = container()
    assert c["securityContext"]["privileged"] is True
    assert {"name": "metrics", "containerPort": PORT, "protocol": "TCP"} in c["ports"]
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(PORT) and ann["prometheus.io/scrape"] == "true"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/hugepaged"]]["configMap"]["name"] == "hugepaged"
    assert volumes[mounts["/run/hugepaged"]]["hostPath"]["path"] == "/run/hugepaged"
    assert Path(DEFAULT_SOCKET).parent == Path("/run/hugepaged")
    assert c["readinessProbe"]["exec"]["command"][:2] == ["hugepaged", "status"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}


def test_daemonset_arguments_are_hugepaged_arguments():
    c = container()
    env = {e["name"]: "10.0.0.7" for e in c["env"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]
    ns = build_parser().parse_args(args)
    assert ns.command == "run" and ns.config == DEFAULT_PATH
    assert parse_listen(ns.metrics) == ("10.0.0.7", PORT)
    probe = build_parser().parse_args(c["readinessProbe"]["exec"]["command"][1:])
    assert probe.command == "status" and probe.socket == DEFAULT_SOCKET


def test_configmap_is_a_valid_hugepaged_toml():
    text = docs()["ConfigMap"]["data"]["hugepaged.toml"]
    cfg = parse_config(text, "configmap")
    assert cfg.tunables["enabled"] == "madvise"
    assert cfg.options.log_format == "json" and cfg.options.metrics_top_processes == 20
    pod, jvm = cfg.targets
    # The pod's target takes every container of the pod (cgroup v2, systemd driver) and
    # nothing of a neighbouring pod.
    pod_cgroup = pod.cgroup + "/cri-containerd-3f1e9a.scope"
    other = pod.cgroup.replace("5a3c9d1e", "5a3c9d1f") + "/cri-containerd-77aa01.scope"
    assert pod.enabled == "always" and pod.priority == 10 and pod.max_bloat_mb == 256
    assert cgroup_under(pod_cgroup, pod.cgroup) and not cgroup_under(other, pod.cgroup)
    assert jvm.exe.endswith("/bin/java") and jvm.max_ptes_none == 0


def test_daemon_sees_cgroups_from_the_hosts_cgroup_namespace():
    c = container()
    assert c["command"][:4] == ["nsenter", "--target", "1", "--cgroup"]
    assert c["command"][-1] == "hugepaged"


def containerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_containerfile():
    steps = containerfile()
    assert steps[0][0] == "FROM" and re.fullmatch(r"python:3\.1[1-9]+-slim", steps[0][1])
    ins = dict(steps)
    assert "pip install /build" in ins["RUN"]
    assert "nsenter --version" in ins["RUN"]  # util-linux: the DaemonSet's command needs it
    assert ins["EXPOSE"] == str(PORT)
    entry, cmd = json.loads(ins["ENTRYPOINT"]), json.loads(ins["CMD"])
    assert entry == ["hugepaged"]
    ns = build_parser().parse_args(cmd)
    assert ns.command == "run" and parse_listen(ns.metrics) == ("0.0.0.0", PORT)
    # what it copies is what `pip install` needs
    copied = " ".join(rest for word, rest in steps if word == "COPY")
    assert "pyproject.toml" in copied and "src" in copied


def test_prometheus_config_and_rules():
    promtool = require_tool("promtool", "apt-get install prometheus")
    r = subprocess.run([promtool, "check", "config", "prometheus.yml"],
                       cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 4 rules found" in r.stdout + r.stderr


def test_kubernetes_scrape_job_shape():
    doc = yaml.safe_load((DEPLOY / "prometheus" / "kubernetes-scrape.yml").read_text())
    (job,) = doc["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod",
                                             "namespaces": {"names": ["hugepaged"]}}]
    ns = docs()["Namespace"]["metadata"]["name"]
    assert ns == "hugepaged"
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"]
            if r.get("action") == "keep"}
    labels = docs()["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    assert keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == \
        labels["app.kubernetes.io/name"]
    assert keep["__meta_kubernetes_pod_container_port_name"] == container()["ports"][0]["name"]


def test_alert_rules_use_metrics_that_exist():
    """Every hugepaged_* name in the rules is in the daemon's exposition."""
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from hugepaged.config import DaemonOptions
    from hugepaged.daemon.counters import Counters
    from hugepaged.daemon.registry import Registry
    from hugepaged.daemon.targets import TargetStates
    from hugepaged.kernel import Kernel
    from hugepaged.metrics import build_registry
    from hugepaged.tunables import Tunables

    members = SimpleNamespace(targets=[], target_states=TargetStates())
    held = SimpleNamespace(splits=SimpleNamespace(held_counts=lambda slots: {}))
    svc = SimpleNamespace(core=SimpleNamespace(counters=Counters(), registry=Registry(),
                                               membership=members, collapser=held),
                          kernel=Kernel(), tunables=Tunables(), options=DaemonOptions(),
                          state=lambda: "idle")
    exposed = set(re.findall(r"^# TYPE (\S+) (\S+)", generate_latest(build_registry(svc))
                             .decode(), re.M))
    names = set()
    for name, kind in exposed:
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}_{s}" for s in ("bucket", "count", "sum"))
    rules = yaml.safe_load((DEPLOY / "prometheus" / "hugepaged-rules.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    used = set(re.findall(r"\bhugepaged_[a-z_]+", exprs))
    assert used and used <= names, used - names
