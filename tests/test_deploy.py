"""Fleet deployment files: the DaemonSet and its monitoring against the Kubernetes schemas
(offline), the container recipe, the Prometheus rules (promtool's own unit tests) and the
Grafana dashboard, each checked against hugepaged itself: its argument parser, its
configuration parser, the capabilities the real daemon needs (found by dropping each) and the
metric names a real daemon exports. The image itself is built and run in test_container.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from hugepaged.cli import build_parser
from hugepaged.config import DEFAULT_PATH, DEFAULT_SOCKET, parse_config
from hugepaged.metrics import parse_listen
from hugepaged.targets import cgroup_under
from kit.daemon_runner import Daemon
from kit.helpers import Workload, saved_thp

from .marks import kernel_test, require_tool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFEST = DEPLOY / "kubernetes" / "daemonset.yaml"
MONITORING = DEPLOY / "kubernetes" / "monitoring.yaml"
RULES = DEPLOY / "prometheus" / "hugepaged-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "hugepaged-rules-tests.yml"
DASHBOARD = DEPLOY / "grafana" / "hugepaged.json"
PORT = 9633
# The oldest release still in use at large and the newest the bundled schemas know.
VERSIONS = ("1.27", latest_version())
# What the daemon needs, each shown needed in test_container.py (test_each_capability_is_needed).
CAPABILITIES = ["SYS_ADMIN", "SYS_NICE", "SYS_PTRACE", "DAC_READ_SEARCH", "NET_ADMIN"]


def docs(path: Path = MANIFEST) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    kinds = docs()
    assert set(kinds) == {"Namespace", "ConfigMap", "DaemonSet"}
    monitoring = docs(MONITORING)
    assert set(monitoring) == {"Service", "ServiceMonitor"}
    for doc in [*kinds.values(), monitoring["Service"]]:
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


def test_daemonset_runs_unprivileged_with_only_the_capabilities_it_needs():
    ds = docs()["DaemonSet"]
    template = ds["spec"]["template"]
    pod = template["spec"]
    assert pod["hostPID"] is True  # the host's processes
    assert pod["hostNetwork"] is True  # the process connector lives in the host's netns
    c = container()
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0  # hugepaged refuses to run as anyone but root
    assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPABILITIES}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # The runtime's default AppArmor profile denies ptrace-read of other containers' and
    # the host's processes: hugepaged must run unconfined by AppArmor.
    ann = template["metadata"]["annotations"]
    assert ann == {"container.apparmor.security.beta.kubernetes.io/" + c["name"]: "unconfined"}
    assert {"name": "metrics", "containerPort": PORT, "protocol": "TCP"} in c["ports"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/hugepaged"]["name"]]["configMap"]["name"] == "hugepaged"
    assert mounts["/etc/hugepaged"]["readOnly"] is True
    assert volumes[mounts["/run/hugepaged"]["name"]]["hostPath"]["path"] == "/run/hugepaged"
    assert Path(DEFAULT_SOCKET).parent == Path("/run/hugepaged")
    # Read-write, besides /run/hugepaged: only the khugepaged knobs "quiet" writes.
    thp = mounts["/sys/kernel/mm/transparent_hugepage"]
    assert volumes[thp["name"]]["hostPath"]["path"] == "/sys/kernel/mm/transparent_hugepage"
    assert not thp.get("readOnly")
    text = docs()["ConfigMap"]["data"]["hugepaged.toml"]
    assert parse_config(text, "configmap").tunables["kernel_khugepaged"] == "quiet"
    assert set(mounts) == {"/etc/hugepaged", "/run/hugepaged",
                           "/sys/kernel/mm/transparent_hugepage"}


def test_probes_ask_the_control_socket():
    c = container()
    for probe in ("livenessProbe", "readinessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[0] == "hugepaged" and "httpGet" not in c[probe]
        ns = build_parser().parse_args(command[1:])
        assert ns.command == "status" and ns.socket == DEFAULT_SOCKET
        # the client gives up after 5 s: the probe's own timeout leaves it room to start
        assert c[probe]["timeoutSeconds"] >= 10
    assert c["livenessProbe"]["exec"]["command"] == ["hugepaged", "status"]


def millicores(q: str) -> int:
    return int(q[:-1]) if q.endswith("m") else int(float(q) * 1000)


def test_resources_match_the_daemons_own_limits():
    res = container()["resources"]
    text = docs()["ConfigMap"]["data"]["hugepaged.toml"]
    cap = parse_config(text, "configmap").tunables["max_cpu_percent"]
    # The CPU request is the daemon's cap (a percentage of one core); no CPU limit: the
    # daemon paces itself, and a CFS quota would stall its collapses and probes.
    assert millicores(res["requests"]["cpu"]) == int(cap) * 10
    assert "cpu" not in res["limits"]
    assert res["limits"]["memory"] == "256Mi" and res["requests"]["memory"] == "64Mi"


# The ServiceMonitor fields this file uses, by the names of the prometheus-operator API
# reference (monitoring.coreos.com/v1): no CRD schema ships in a Python package, so this is
# strict on names and types, not a copy of the CRD.
_STR = {"type": "string"}
_SERVICE_MONITOR = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object", "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": _STR,
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object"},
                                            "matchExpressions": {"type": "array"}}},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array",
                                                                    "items": _STR}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": _STR, "targetPort": {}, "path": _STR, "scheme": _STR,
                        "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                        "scrapeTimeout": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                        "honorLabels": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "additionalProperties": False,
                            "properties": {
                                "sourceLabels": {"type": "array", "items": _STR},
                                "separator": _STR, "targetLabel": _STR, "regex": _STR,
                                "modulus": {"type": "integer"}, "replacement": _STR,
                                "action": {"enum": ["replace", "keep", "drop", "hashmod",
                                                    "labelmap", "labeldrop", "labelkeep"]},
                            }}},
                    }}},
            }},
    },
}


def test_service_monitor_selects_the_daemonsets_pods():
    mon = docs(MONITORING)
    svc, smon = mon["Service"], mon["ServiceMonitor"]
    jsonschema.validate(smon, _SERVICE_MONITOR)
    bad = json.loads(json.dumps(smon))
    bad["spec"]["endpoints"][0]["relabelConfigs"] = []  # the scrape-config spelling
    with pytest.raises(jsonschema.ValidationError, match="relabelConfigs"):
        jsonschema.validate(bad, _SERVICE_MONITOR)
    ns = docs()["Namespace"]["metadata"]["name"]
    pod_labels = docs()["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    # ServiceMonitor -> Service (labels, namespace, port name) -> pods (selector, port)
    assert svc["metadata"]["namespace"] == smon["metadata"]["namespace"] == ns
    assert smon["spec"]["namespaceSelector"]["matchNames"] == [ns]
    assert smon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["clusterIP"] == "None"  # one endpoint per node, no virtual IP
    (port,) = svc["spec"]["ports"]
    (endpoint,) = smon["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] == "metrics" and port["port"] == PORT
    assert port["targetPort"] == container()["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    # no prometheus.io annotations left for a second, annotation-driven scrape
    ann = docs()["DaemonSet"]["spec"]["template"]["metadata"].get("annotations", {})
    assert not [k for k in ann if k.startswith("prometheus.io/")]


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
    # The base is a build argument: python:3.12-slim by default, build-image.sh's own
    # Debian base (made with mmdebstrap, nothing pulled) in the tests.
    assert steps[0] == ("ARG", "BASE=docker.io/library/python:3.12-slim")
    assert steps[1] == ("FROM", "${BASE}")
    ins = dict(steps)
    assert "python3 -m venv /opt/hugepaged" in ins["RUN"]
    assert "/opt/hugepaged/bin/pip install --quiet /build" in ins["RUN"]
    assert "nsenter --version" in ins["RUN"]  # util-linux: the DaemonSet's command needs it
    assert ins["EXPOSE"] == str(PORT)
    entry, cmd = json.loads(ins["ENTRYPOINT"]), json.loads(ins["CMD"])
    assert entry == ["hugepaged"]
    ns = build_parser().parse_args(cmd)
    assert ns.command == "run" and parse_listen(ns.metrics) == ("0.0.0.0", PORT)
    # what it copies is what `pip install` needs
    copied = " ".join(rest for word, rest in steps if word == "COPY")
    assert "pyproject.toml" in copied and "src" in copied
    script = (DEPLOY / "build-image.sh").read_text()
    assert "--build-arg \"BASE=$BASE_TAG\"" in script and "-f deploy/Containerfile" in script
    assert os.access(DEPLOY / "build-image.sh", os.X_OK)


# --------------------------------------------------------------------------------------------
# Prometheus: configuration, rules and the rules' unit tests


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = require_tool("promtool", "apt-get install prometheus")
    return subprocess.run([tool, *args], cwd=DEPLOY / "prometheus", capture_output=True,
                          text=True, timeout=60)


def test_prometheus_config_and_rules():
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 5 rules found" in r.stdout + r.stderr


def test_alert_and_recording_rules_pass_their_unit_tests():
    r = promtool("test", "rules", RULE_TESTS.name)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    tested |= set(re.findall(r"^\s+- expr: (\S+)", RULE_TESTS.read_text(), re.M))
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert tested == {r.get("alert") or r["record"] for r in rules}  # every rule has a test


@pytest.mark.parametrize("change", [
    ("> 0.5", "> 0.8"),  # HugepagedCollapsesFailing's threshold
    ("for: 1h", "for: 2h"),  # HugepagedAllocationBackoff's patience
    ("for: 10m\n", "for: 5m\n"),  # HugepagedDown's
    ("2 * hugepaged_tunable", "4 * hugepaged_tunable"),  # HugepagedOverCPUCap's factor
    ("2 * hugepaged_tunable", "1 * hugepaged_tunable"),
    ("/ sum by (instance) (hugepaged_process_anon_bytes)", "/ 2"),  # the coverage ratio
])
def test_the_rule_tests_catch_a_changed_rule(tmp_path, change):
    old, new = change
    text = RULES.read_text()
    assert text.count(old) == 1
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path)
    tool = require_tool("promtool", "apt-get install prometheus")
    r = subprocess.run([tool, "test", "rules", RULE_TESTS.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "FAILED" in r.stdout + r.stderr, r.stdout + r.stderr


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


# --------------------------------------------------------------------------------------------
# Every metric a rule or a dashboard panel names is one a real daemon exports


class Exposition:
    """What one scrape of a real daemon shows: sample names with their label names, the
    families' declared names, and every label value seen."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.labels: dict[str, set[str]] = {}
        self.values: dict[str, set[str]] = {}
        self.empty: set[str] = set()  # families with no sample in this scrape
        for fam in text_string_to_metric_families(text):
            # A family without samples (no failure yet, say) still names its series.
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                        "info": ["_info"]}.get(fam.type, [""])
            for suffix in suffixes:
                self.labels.setdefault(fam.name + suffix, set())
            if not fam.samples:
                self.empty.update(fam.name + suffix for suffix in suffixes)
            for smp in fam.samples:
                self.labels.setdefault(smp.name, set()).update(smp.labels)
                for k, v in smp.labels.items():
                    self.values.setdefault(k, set()).add(v)


@pytest.fixture(scope="module")
def exposition(tmp_path_factory):
    """A real daemon, with a target and a process it collapsed, scraped once."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a real daemon")
    cfg = tmp_path_factory.mktemp("exposition") / "hugepaged.toml"
    with saved_thp(enabled="never"), \
            Workload(regions=[{"name": "a", "windows": 2, "hugepage": True}]) as w:
        cfg.write_text(f'[[target]]\nname = "app"\npid = [{w.pid}]\nmax_bloat_mb = 64\n')
        # Per-process series are opt-in; the DaemonSet's ConfigMap asks for 20.
        with Daemon([w.pid], sets={"enabled": "madvise"}, config=str(cfg),
                    args=["--metrics", ":0", "--metrics-top-processes", "5"]) as d:
            port = d.wait_event("metrics_listen")["port"]
            d.wait_for(lambda st: st["counters"]["pages_collapsed"] >= 2, what="2 collapses")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                return Exposition(r.read().decode())


# A metric name in PromQL: not part of a longer name, not a recording rule's (level:name:op).
_METRIC = re.compile(r"(?<![\w:])hugepaged_[a-z0-9_]+(?![\w:])")
_RECORDED = re.compile(r"(?<![\w:])[a-z_]+:hugepaged_[a-z0-9_]+:[a-z0-9_]+")
_SELECTOR = re.compile(r"(?<![\w:])(hugepaged_[a-z0-9_]+)\{([^}]*)\}")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Families with a series only once something went wrong (a failure, a split window).
_ON_TROUBLE = {"hugepaged_collapse_failures_total", "hugepaged_held_windows"}
# Labels Prometheus itself adds to every scraped series.
_TARGET_LABELS = {"instance", "job", "node"}


def check_queries(exprs: list[str], exp: Exposition, recorded: set[str]) -> None:
    names = {n for e in exprs for n in _METRIC.findall(e)}
    assert names, "no hugepaged metric named"
    assert names <= set(exp.labels), names - set(exp.labels)
    assert {n for e in exprs for n in _RECORDED.findall(e)} <= recorded
    for e in exprs:
        for name, matchers in _SELECTOR.findall(e):
            for label, value in re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', matchers):
                if label in _TARGET_LABELS:
                    continue
                assert label in exp.labels[name], f"{name} has no label {label}: {e}"
                if "$" not in value and not set(value) & set(".*+|"):
                    assert value in exp.values[label], f"{label}={value!r} never exported: {e}"
        named = set(_METRIC.findall(e))
        if named & exp.empty:
            # No sample, so no label names to check against: only families whose series
            # appear once something goes wrong, which a clean run exports empty.
            assert named & exp.empty <= _ON_TROUBLE, e
            continue
        labels_of = set().union(*(exp.labels[n] for n in named)) | _TARGET_LABELS
        for group in _BY.findall(e):
            used = {x.strip() for x in group.split(",") if x.strip()} - {"le"}
            assert used <= labels_of, f"{used - labels_of} in {e}"


def recording_rules() -> set[str]:
    rules = yaml.safe_load(RULES.read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


@kernel_test
def test_alert_rules_use_metrics_that_exist(exposition):
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    check_queries([e for e in exprs if "hugepaged_" in e], exposition, recording_rules())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row keeps its panels inside
    return out


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "hugepaged" and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ps = panels(dash)
    assert len({p["id"] for p in ps}) == len(ps)  # unique ids
    grid = set()
    for p in ps:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & grid, f"{p['title']} overlaps another panel"
        grid |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"] and p["description"]
        for t in p["targets"]:
            used = set(re.findall(r"\$(\w+)", t["expr"])) - {"__rate_interval"}
            assert used <= set(variables), used
    titles = " | ".join(p["title"] for p in ps).lower()
    for subject in ("coverage per target", "coverage per process", "by result", "by errno",
                    "cpu against the cap", "back-offs", "state"):
        assert subject in titles, subject


@kernel_test
def test_dashboard_queries_use_metrics_that_exist(exposition):
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    check_queries(exprs, exposition, recording_rules())
    # the state panel names every state the daemon exports
    (state,) = [p for p in panels(dash) if p["title"] == "State"]
    named = set(re.findall(r"[a-z]+(?:-[a-z]+)?", state["description"]))
    assert exposition.values["state"] <= named, exposition.values["state"] - named
    # and the queries deploy/README.md suggests
    readme = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```promql\n(.*?)```", readme, re.S)
    lines = [ln for b in blocks for ln in b.splitlines() if ln and not ln.startswith("#")]
    assert len(lines) >= 5
    check_queries(lines, exposition, recording_rules())
    # the check itself refuses a name the daemon does not export
    with pytest.raises(AssertionError):
        check_queries(["rate(hugepaged_collapses_total[5m])"], exposition, set())
    with pytest.raises(AssertionError):
        check_queries(['hugepaged_state{state="backoff"}'], exposition, set())
