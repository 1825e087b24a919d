#!/usr/bin/env python3
"""Checks the Kubernetes manifests and the container image's runtime contract, offline, in two parts.

1. The rendered manifests. Every overlay in deploy/k8s/overlays is rendered with `kubectl kustomize`.
   Built-in kinds are validated with `kubernetes-validate --strict`. The CRDs (cert-manager, Prometheus
   Operator, Istio) are schema-checked by hand on their required fields, since no registry here ships
   their schemas. The PrometheusRule must carry exactly deploy/observability/alerts.yaml, and promtool
   checks it. The invariants a platform review asks for are asserted on the rendered objects: non-root,
   read-only root, no privilege escalation, no capabilities, seccomp, limits everywhere, a pinned image,
   selectors that select, and ports and probes that match the configuration. The manifests write NAME,
   API and NAMESPACE where the service's names go, and kustomize replacements fill them in from
   deploy/k8s/base/service-name.yaml: none may be left in what an overlay renders.

2. A pod run as Kubernetes would run it. There is no container engine here, so bubblewrap builds what the
   distroless image holds: the binary given on the command line, at the image's path for it (the
   Dockerfile's ENTRYPOINT, /usr/local/bin/service, whatever the service's name), its glibc libraries
   and /app/config/default.toml, plus only the volumes and environment the rendered Deployment gives
   it. The root is read-only and the process runs under the numeric user of the securityContext. Then,
   as the kubelet would:
   - refuse to start while settings the cluster's owner must fill in are empty (JWT issuer and
     audience), then run with them filled in;
   - run the migration Job, if the overlay has one;
   - start the server and poll the startupProbe;
   - run the liveness and readiness probes (grpc probes from outside, exec probes in the sandbox);
   - make a probe for a service the binary does not serve, which must fail (probes are bounded by
     their timeoutSeconds, as the kubelet bounds them);
   - run the Dockerfile's HEALTHCHECK;
   - make API calls as an in-cluster client would: mTLS and a JWT where the overlay asks for them;
   - send SIGTERM, after which the process must exit 0 within terminationGracePeriodSeconds.
   And once as a plain `docker run IMAGE`: the image's defaults alone (SQLite in /app), its HEALTHCHECK,
   and a clean exit on `docker stop`.
   Inside the sandbox the process has the manifest's uid and gid, in a user namespace: file access
   on the host is the invoking user's, so fsGroup and Secret file modes are not exercised.
   The effective configuration (`print-config` inside the sandbox) is what the timing and port
   invariants are checked against.

Secrets are test fixtures:
- the cert-manager Secret is played by a CA and a certificate for the Certificate's dnsNames, plus
  127.0.0.1 for the test's own calls;
- any other Secret gets the files the overlay's configuration names under its mount path: a fresh
  PostgreSQL database's URL, or a JWT public key.

Usage: deploy/check.py BINARY [--overlay NAME ...] [--static-only] [--max-binary-mb N]
Needs kubectl, kubernetes-validate, bwrap, openssl, promtool (optional), buf (on PATH or in
node_modules/.bin), and
for an overlay on PostgreSQL, TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

from urllib.parse import urlsplit

import yaml

REPO = Path(__file__).resolve().parent.parent
OVERLAYS = REPO / "deploy" / "k8s" / "overlays"
CRD_KINDS = {"Certificate", "ServiceMonitor", "PrometheusRule", "DestinationRule"}
# What the manifests write for the service's names (deploy/k8s/base/service-name.yaml), as a word or a
# part of one between -, ., / and the like: NAME-headless, /etc/NAME/tls, NAME.NAMESPACE.svc.
PLACEHOLDER = re.compile(r"(?<![A-Za-z0-9_])(NAME|API|NAMESPACE)(?![A-Za-z0-9_])")
failures: list[str] = []


def fail(message: str) -> None:
    failures.append(message)
    print(f"  FAIL {message}", file=sys.stderr)


def say(message: str) -> None:
    print(f"  ok   {message}")


def check(condition: bool, message: str) -> bool:
    if not condition:
        fail(message)
    return condition


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, text=True, capture_output=True, **kwargs)
    except subprocess.TimeoutExpired as expired:
        return subprocess.CompletedProcess(argv, 124, "", f"timed out after {expired.timeout}s")


def render(path: Path) -> list[dict]:
    result = run("kubectl", "kustomize", str(path))
    if result.returncode != 0:
        raise SystemExit(f"kubectl kustomize {path} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict], kind: str) -> dict | None:
    matches = [doc for doc in docs if doc["kind"] == kind]
    return matches[0] if len(matches) == 1 else None


@functools.cache
def image_contract() -> dict:
    """What the Dockerfile promises: working directory, entrypoint, user, HEALTHCHECK command, and the
    binary's path in the image (the ENTRYPOINT's program), where the sandbox puts the binary it is given."""
    text = (REPO / "Dockerfile").read_text()
    runtime = text.split("\nFROM ")[-1]  # the last stage is the image
    joined = re.sub(r"\\\n\s*", " ", runtime)
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", joined, re.M)
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])", runtime, re.M).group(1))
    return {
        "workdir": re.search(r"^WORKDIR (\S+)", runtime, re.M).group(1),
        "entrypoint": entrypoint,
        "binary": entrypoint[0],
        "copied": re.findall(r"^COPY --from=builder (?:--\S+ )*(\S+) (\S+)$", runtime, re.M),
        "cmd": json.loads(re.search(r"^CMD (\[.*\])", runtime, re.M).group(1)),
        "user": re.search(r"^USER (\S+)", runtime, re.M).group(1),
        "healthcheck": json.loads(healthcheck.group(1)) if healthcheck else None,
        "config_files": re.findall(r"^COPY (config/\S+) (\S+)", runtime, re.M),
    }


def check_image() -> None:
    """The Dockerfile's runtime stage: its ENTRYPOINT runs the binary the builder stage copied in, and
    so does its HEALTHCHECK. The binary's path names no service, so the manifests can spell it."""
    image = image_contract()
    binary = image["binary"]
    copied = check(any(target == binary for _, target in image["copied"]),
                   f"Dockerfile: ENTRYPOINT runs {binary}, which no COPY --from=builder puts in the image")
    checked = check(image["healthcheck"] is not None and image["healthcheck"][0] == binary,
                    f"Dockerfile: HEALTHCHECK runs {(image['healthcheck'] or [None])[0]}, not the ENTRYPOINT's {binary}")
    if copied and checked:
        say(f"Dockerfile: ENTRYPOINT and HEALTHCHECK run {binary}, copied from the builder stage")


# --- Part 1: what the manifests say ----------------------------------------------------------------


def validate_schemas(name: str, docs: list[dict]) -> None:
    builtin = [doc for doc in docs if doc["kind"] not in CRD_KINDS]
    result = run("kubernetes-validate", "--strict", "--quiet", "-", input=yaml.safe_dump_all(builtin))
    check(result.returncode == 0, f"{name}: kubernetes-validate --strict:\n{result.stdout}{result.stderr}")
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            check_crd(name, doc)


def require(name: str, doc: dict, *paths: str) -> None:
    for path in paths:
        value = doc
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        check(value not in (None, "", [], {}), f"{name}: {doc['kind']} {doc['metadata']['name']}: {path} missing")


def check_crd(name: str, doc: dict) -> None:
    """The fields each CRD's published schema requires, and the ones the operators need to act."""
    kind, api = doc["kind"], doc["apiVersion"]
    expected_api = {
        "Certificate": "cert-manager.io/v1",
        "ServiceMonitor": "monitoring.coreos.com/v1",
        "PrometheusRule": "monitoring.coreos.com/v1",
        "DestinationRule": "networking.istio.io/v1",
    }[kind]
    check(api == expected_api, f"{name}: {kind} apiVersion {api}, expected {expected_api}")
    require(name, doc, "metadata.name", "spec")
    spec = doc.get("spec", {})
    if kind == "Certificate":
        require(name, doc, "spec.secretName", "spec.issuerRef.name", "spec.dnsNames")
        check("client auth" in spec.get("usages", []) and "server auth" in spec.get("usages", []),
              f"{name}: Certificate needs server auth and client auth usages (mutual TLS, exec probes)")
    elif kind == "ServiceMonitor":
        require(name, doc, "spec.selector", "spec.endpoints")
        for endpoint in spec.get("endpoints", []):
            check("port" in endpoint, f"{name}: ServiceMonitor endpoint without a port name")
    elif kind == "PrometheusRule":
        require(name, doc, "spec.groups")
        for group in spec.get("groups", []):
            check(bool(group.get("name")) and bool(group.get("rules")), f"{name}: rule group without name/rules")
            for rule in group.get("rules", []):
                check(("alert" in rule) != ("record" in rule) and "expr" in rule,
                      f"{name}: rule {rule.get('alert') or rule.get('record')} needs alert|record and expr")
    elif kind == "DestinationRule":
        require(name, doc, "spec.host")


def check_placeholders(name: str, docs: list[dict]) -> None:
    """Every NAME, API and NAMESPACE the manifests write is replaced: in keys (a label's) and values
    alike. Not in a ConfigMap's data or a PrometheusRule's groups, copies of files that may say API in
    prose."""

    def walk(node, path: str):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(key, f"{path}.{key}")
                yield from walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from walk(value, f"{path}.{index}")
        elif isinstance(node, str) and PLACEHOLDER.search(node):
            yield path, node

    for doc in docs:
        copied = {"ConfigMap": "data", "PrometheusRule": "spec"}.get(doc["kind"])
        content = {key: value for key, value in doc.items() if key != copied}
        for path, value in walk(content, ""):
            check(False, f"{name}: {doc['kind']} {doc['metadata']['name']}: {path.lstrip('.')} keeps "
                  f"the placeholder in {value!r} (a replacement for it is missing)")


def check_image_repository(overlay: str) -> None:
    """The replacements write service-name.yaml's repository over whatever name the overlay's `images:`
    entry for NAME gives: a newName there would be overwritten without a word."""
    kustomization = yaml.safe_load((OVERLAYS / overlay / "kustomization.yaml").read_text())
    for image in kustomization.get("images", []):
        check(not (image.get("name") == "NAME" and "newName" in image),
              f"{overlay}: images: NAME has a newName; the repository is deploy/k8s/base/service-name.yaml's image")


def check_rules(name: str, docs: list[dict]) -> None:
    rule = one(docs, "PrometheusRule")
    if rule is None:
        return
    shipped = yaml.safe_load((REPO / "deploy/observability/alerts.yaml").read_text())
    check(rule["spec"]["groups"] == shipped["groups"],
          f"{name}: the PrometheusRule differs from deploy/observability/alerts.yaml (copy its groups)")
    if shutil.which("promtool"):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as rules:
            yaml.safe_dump({"groups": rule["spec"]["groups"]}, rules)
            rules.flush()
            result = run("promtool", "check", "rules", rules.name)
            check(result.returncode == 0, f"{name}: promtool check rules:\n{result.stdout}{result.stderr}")


def pod_workloads(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{doc['kind']} {doc['metadata']['name']}", doc["spec"]["template"])
            for doc in docs if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")]


def check_security(name: str, docs: list[dict]) -> None:
    for what, template in pod_workloads(docs):
        pod = template["spec"]
        pod_security = pod.get("securityContext", {})
        check(pod.get("automountServiceAccountToken") is False, f"{name}: {what}: service account token mounted")
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            where = f"{name}: {what}/{container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            check(security.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true")
            user = security.get("runAsUser")
            check(isinstance(user, int) and user > 0, f"{where}: runAsUser {user!r} is not a numeric non-root uid")
            check(security.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem is writable")
            check(security.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed")
            check("ALL" in security.get("capabilities", {}).get("drop", []), f"{where}: capabilities not dropped")
            check(security.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: no RuntimeDefault seccomp")
            limits = container.get("resources", {}).get("limits", {})
            requests = container.get("resources", {}).get("requests", {})
            check({"cpu", "memory"} <= limits.keys(), f"{where}: cpu and memory limits missing")
            check({"cpu", "memory"} <= requests.keys(), f"{where}: cpu and memory requests missing")
            image = container.get("image", "")
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            check("@sha256:" in image or (tag and tag != "latest"), f"{where}: image {image!r} is not pinned")


def check_binary_path(name: str, docs: list[dict]) -> None:
    """What the containers run in the image is the image's binary: exec probes and a `command` name its
    path (the Dockerfile's ENTRYPOINT), not a path of their own."""
    binary = image_contract()["binary"]
    for what, template in pod_workloads(docs):
        for container in template["spec"].get("containers", []) + template["spec"].get("initContainers", []):
            where = f"{name}: {what}/{container['name']}"
            if container.get("command"):
                check(container["command"][0] == binary,
                      f"{where}: command runs {container['command'][0]}, the image's binary is {binary}")
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                command = container.get(kind, {}).get("exec", {}).get("command")
                if command:
                    check(command[0] == binary, f"{where}: {kind} runs {command[0]}, the image's binary is {binary}")


def labels_match(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(key) == value for key, value in match.items())


def check_wiring(name: str, docs: list[dict]) -> None:
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    check(labels_match(deployment["spec"]["selector"], pod_labels), f"{name}: Deployment selector misses its pods")
    for service in (doc for doc in docs if doc["kind"] == "Service"):
        where = f"{name}: Service {service['metadata']['name']}"
        check(labels_match(service["spec"]["selector"], pod_labels), f"{where}: selects no server pod")
        for port in service["spec"]["ports"]:
            check(port.get("targetPort") in port_names, f"{where}: targetPort {port.get('targetPort')} not a named pod port")
            if port.get("name") == "grpc":
                check(port.get("appProtocol") == "grpc", f"{where}: grpc port without appProtocol grpc")
    for job in (doc for doc in docs if doc["kind"] == "Job"):
        job_labels = job["spec"]["template"]["metadata"].get("labels", {})
        for service in (doc for doc in docs if doc["kind"] == "Service"):
            check(not labels_match(service["spec"]["selector"], job_labels),
                  f"{name}: Job {job['metadata']['name']} pods would join Service {service['metadata']['name']}")
    headless = [s for s in docs if s["kind"] == "Service" and s["spec"].get("clusterIP") == "None"]
    check(len(headless) == 1, f"{name}: no headless Service for client-side load balancing")
    pdb = one(docs, "PodDisruptionBudget")
    if check(pdb is not None, f"{name}: no PodDisruptionBudget"):
        check(labels_match(pdb["spec"]["selector"], pod_labels), f"{name}: PodDisruptionBudget selects no server pod")
    policy = one(docs, "NetworkPolicy")
    if check(policy is not None, f"{name}: no NetworkPolicy"):
        check(labels_match(policy["spec"]["podSelector"], pod_labels), f"{name}: NetworkPolicy misses the pods")
        check(set(policy["spec"].get("policyTypes", [])) == {"Ingress", "Egress"},
              f"{name}: NetworkPolicy must deny by default in both directions")
        allowed = {port.get("port") for rule in policy["spec"].get("ingress", []) for port in rule.get("ports", [])}
        check({"grpc", "metrics"} <= allowed or set(port_names.values()) <= allowed,
              f"{name}: NetworkPolicy ingress does not open the grpc and metrics ports")
    hpa = one(docs, "HorizontalPodAutoscaler")
    if hpa is not None:
        check(hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"], f"{name}: HPA scales something else")
        check(hpa["spec"].get("minReplicas", 1) >= 3, f"{name}: HPA allows fewer than 3 replicas")
        check("replicas" not in deployment["spec"], f"{name}: replicas set beside an HPA (every apply resets it)")
    monitor = one(docs, "ServiceMonitor")
    if monitor is not None:
        for endpoint in monitor["spec"]["endpoints"]:
            scraped = [s for s in docs if s["kind"] == "Service"
                       and labels_match(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
                       and any(p.get("name") == endpoint["port"] for p in s["spec"]["ports"])]
            check(len(scraped) == 1, f"{name}: ServiceMonitor port {endpoint['port']!r} must be on exactly one selected Service, found {len(scraped)}")
            check(port_names.get(endpoint["port"]) is not None or any(
                p.get("targetPort") in port_names for s in scraped for p in s["spec"]["ports"] if p.get("name") == endpoint["port"]),
                f"{name}: ServiceMonitor port {endpoint['port']!r} reaches no container port")


def probe_service(probe: dict) -> str | None:
    """The health service a probe asks for: grpc.service, or the exec command's --service."""
    if "grpc" in probe:
        return probe["grpc"].get("service", "")
    command = probe.get("exec", {}).get("command", [])
    if command[:2] == [image_contract()["binary"], "healthcheck"] and "--service" in command:
        return command[command.index("--service") + 1]
    return None


def check_against_config(name: str, docs: list[dict], config: dict) -> None:
    """The Deployment's ports, probes and grace period, against the pod's effective configuration."""
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    grpc_port = int(config["server"]["grpc_addr"].rsplit(":", 1)[1])
    metrics_port = int(config["server"]["metrics_addr"].rsplit(":", 1)[1])
    check(ports.get("grpc") == grpc_port, f"{name}: container port grpc {ports.get('grpc')} != server.grpc_addr {grpc_port}")
    check(ports.get("metrics") == metrics_port, f"{name}: container port metrics {ports.get('metrics')} != server.metrics_addr {metrics_port}")
    drain = parse_duration(config["shutdown"]["drain_delay"]) + parse_duration(config["shutdown"]["drain_timeout"])
    needed = drain + parse_duration(config["telemetry"]["flush_timeout"])
    grace = pod.get("terminationGracePeriodSeconds", 30)
    check(grace >= needed, f"{name}: terminationGracePeriodSeconds {grace} < drain_delay + drain_timeout + flush_timeout = {needed}")
    readiness = container.get("readinessProbe", {})
    check(readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3) <= parse_duration(config["shutdown"]["drain_delay"]),
          f"{name}: readiness notices NOT_SERVING only after the drain delay ends")
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        if not check(probe is not None, f"{name}: no {kind}"):
            continue
        if "grpc" in probe:
            check(probe["grpc"]["port"] == grpc_port, f"{name}: {kind} probes port {probe['grpc']['port']}, not {grpc_port}")
            check(not config["tls"].get("cert_file"), f"{name}: {kind} is a native grpc probe (plaintext) but the port speaks TLS")
        else:
            check(probe_service(probe) is not None, f"{name}: {kind} is neither grpc nor `healthcheck --service`")
    policy = one(docs, "NetworkPolicy")
    if policy is not None:
        egress = [(port.get("protocol", "TCP"), port.get("port")) for rule in policy["spec"].get("egress", [])
                  for port in rule.get("ports", [])]
        check(("UDP", 53) in egress and ("TCP", 53) in egress, f"{name}: NetworkPolicy egress lacks DNS (UDP and TCP 53)")
        database = urlsplit(config["database"]["url"])
        if database.scheme.startswith("postgres"):
            check(("TCP", database.port or 5432) in egress, f"{name}: NetworkPolicy egress lacks the database port")
        if config["telemetry"].get("otlp_endpoint"):
            check(("TCP", urlsplit(config["telemetry"]["otlp_endpoint"]).port or 4317) in egress,
                  f"{name}: NetworkPolicy egress lacks the OTLP collector's port")
    migrates = config["database"]["migrate"]
    jobs = [job for job in docs if job["kind"] == "Job" and job["spec"]["template"]["spec"]["containers"][0].get("args") == ["migrate"]]
    check(migrates or len(jobs) == 1, f"{name}: database.migrate is off and no migration Job runs `migrate`")
    check(not (migrates and jobs), f"{name}: both the pods and a Job migrate")
    if config["database"]["url"].startswith("sqlite:"):
        check(deployment["spec"].get("replicas") == 1 and one(docs, "HorizontalPodAutoscaler") is None,
              f"{name}: SQLite is per pod: exactly one replica and no autoscaler")


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text):
        total += float(number) * units[unit]
    return total


# --- Part 2: the pod, run as the kubelet would run it ----------------------------------------------


class Pod:
    """One container of a rendered pod template, in a bubblewrap sandbox shaped like the image."""

    def __init__(self, name: str, docs: list[dict], workload: dict, binary: Path, work: Path, fixtures: "Fixtures"):
        self.name, self.binary, self.work = name, binary, work
        template = workload["spec"]["template"]
        self.namespace = workload["metadata"].get("namespace", "default")
        self.spec = template["spec"]
        self.container = self.spec["containers"][0]
        self.image = image_contract()
        self.config_maps = {doc["metadata"]["name"]: doc["data"] for doc in docs if doc["kind"] == "ConfigMap"}
        self.mounts = self._volumes(fixtures)
        security = {**self.spec.get("securityContext", {}), **self.container.get("securityContext", {})}
        self.uid = security["runAsUser"]
        self.gid = security.get("runAsGroup", self.uid)
        self.env = self._environment()

    def _volumes(self, fixtures: "Fixtures") -> list[tuple[str, Path, bool]]:
        volumes = {volume["name"]: volume for volume in self.spec.get("volumes", [])}
        mounts = []
        for mount in self.container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            source = self.work / "volumes" / mount["name"]
            if "configMap" in volume:
                source.mkdir(parents=True, exist_ok=True)
                for key, value in self.config_maps[volume["configMap"]["name"]].items():
                    (source / key).write_text(value)
            elif "secret" in volume:
                source = fixtures.secret(volume["secret"]["secretName"], mount["mountPath"])
            elif "emptyDir" in volume:
                source.mkdir(parents=True, exist_ok=True)
                os.chmod(source, 0o777)  # fsGroup makes it the pod's; here, anyone's
            else:
                raise SystemExit(f"{self.name}: volume kind of {mount['name']} not emulated")
            mounts.append((mount["mountPath"], source, mount.get("readOnly", False)))
        return mounts

    def _environment(self) -> dict[str, str]:
        known = {"metadata.name": f"{self.name}-0", "metadata.namespace": self.namespace,
                 "spec.nodeName": "node-1"}
        env: dict[str, str] = {}
        for item in self.container.get("env", []):
            if "valueFrom" in item:
                env[item["name"]] = known[item["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item.get("value", ""))
        return env

    def sandbox(self, argv: list[str]) -> list[str]:
        return sandbox(self.binary, self.image, self.uid, self.gid, self.mounts, self.env, argv)

    def command(self, *args: str) -> list[str]:
        return self.sandbox(self.image["entrypoint"] + list(args))

    def container_command(self) -> list[str]:
        argv = self.container.get("command") or self.image["entrypoint"]
        return self.sandbox(argv + self.container.get("args", []))


@functools.cache
def shared_libraries(binary: Path) -> list[str]:
    """What the binary loads, which the image's base (distroless cc) provides: glibc, libgcc_s, libm."""
    return re.findall(r"(/\S+\.so[.\d]*)", run("ldd", str(binary)).stdout)


def sandbox(binary: Path, image: dict, uid: int, gid: int, mounts: list[tuple[str, Path, bool]],
            env: dict[str, str], argv: list[str]) -> list[str]:
    """bwrap running argv in what the image holds, plus mounts, on a read-only root."""
    command = ["bwrap", "--unshare-all", "--share-net", "--die-with-parent", "--clearenv",
               "--uid", str(uid), "--gid", str(gid), "--proc", "/proc", "--dev", "/dev"]
    for library in shared_libraries(binary):
        command += ["--ro-bind", os.path.realpath(library), library]
    # What the container runtime mounts into every container.
    for path in ("/etc/hosts", "/etc/resolv.conf"):
        if Path(path).exists():
            command += ["--ro-bind", path, path]
    # The binary given on the command line, wherever it was built, at the image's path for it.
    command += ["--ro-bind", str(binary), image["binary"]]
    for source, target in image["config_files"]:
        command += ["--ro-bind", str(REPO / source), target]
    for target, source, read_only in mounts:
        command += ["--ro-bind" if read_only else "--bind", str(source), target]
    command += ["--remount-ro", "/", "--chdir", image["workdir"]]
    for key, value in env.items():
        command += ["--setenv", key, value]
    return command + ["--"] + argv


def run_image(binary: Path, work: Path) -> None:
    """`docker run IMAGE` with nothing else: the image's user, working directory and CMD, SQLite's
    default file in /app (the service user's, writable), then the HEALTHCHECK, then `docker stop`."""
    image = image_contract()
    uid, _, gid = image["user"].partition(":")
    app = work / "app"
    app.mkdir()
    os.chmod(app, 0o777)  # the image's /app belongs to the service user
    # /app is writable in `docker run` (the image's layer), so it is a bind here, config files included.
    mounts = [(image["workdir"], app, False)]
    for source, target in image["config_files"]:
        (app / Path(target).relative_to(image["workdir"])).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / source, app / Path(target).relative_to(image["workdir"]))
    image = {**image, "config_files": []}
    log = open(work / "image.log", "w")
    process = subprocess.Popen(sandbox(binary, image, int(uid), int(gid or uid), mounts, {}, image["entrypoint"] + image["cmd"]),
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        healthy = None
        for _ in range(30):  # the HEALTHCHECK's start period
            if process.poll() is not None:
                break
            healthy = run(*sandbox(binary, image, int(uid), int(gid or uid), mounts, {}, image["healthcheck"]), timeout=3)
            if healthy.returncode == 0:
                break
            time.sleep(1)
        if check(healthy is not None and healthy.returncode == 0,
                 f"docker run: the HEALTHCHECK never passed:\n{(work / 'image.log').read_text()[-3000:]}"):
            check((app / "orders.db").exists(), "docker run: no SQLite database in /app")
            say("docker run: the image's defaults serve on SQLite in /app, and its HEALTHCHECK passes")
        terminate(process)
        check(process.wait(timeout=30) == 0, "docker run: no clean exit on SIGTERM")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class Fixtures:
    """Stand-ins for the Secrets a cluster would hold."""

    def __init__(self, docs: list[dict], config_layer: dict, work: Path, certificates: "Certificates", database: "Database"):
        self.work, self.certificates, self.database, self.layer = work, certificates, database, config_layer
        self.issued = {doc["spec"]["secretName"]: doc for doc in docs if doc["kind"] == "Certificate"}

    def secret(self, name: str, mount_path: str) -> Path:
        directory = self.work / "secrets" / name
        if directory.exists():  # the Job and the Deployment mount the same Secret
            return directory
        directory.mkdir(parents=True)
        if name in self.issued:
            self.certificates.issue(directory, self.issued[name]["spec"]["dnsNames"])
            return directory
        referenced = [(key, value) for key, value in flatten(self.layer) if isinstance(value, str) and value.startswith(mount_path + "/")]
        if not referenced:
            fail(f"Secret {name} at {mount_path} is mounted but no configuration key reads from it")
        for key, path in referenced:
            file = directory / path[len(mount_path) + 1:]
            if key == "database.url_file":
                file.write_text(self.database.create() + "\n")
            elif key == "auth.jwt_public_key_file":
                shutil.copy(self.certificates.jwt_public_key, file)
            elif key == "auth.jwt_secret_file":
                file.write_text("a-test-secret-of-at-least-32-bytes-long\n")
            else:
                raise SystemExit(f"no fixture for {key} (Secret {name})")
            os.chmod(file, 0o444)
        return directory


def flatten(table: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in table.items():
        if isinstance(value, dict):
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


class Certificates:
    """A CA, certificates it signs (server and client auth, as the Certificate asks) and a JWT key."""

    def __init__(self, work: Path):
        self.dir = work / "pki"
        self.dir.mkdir()
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                      "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test internal CA")
        self._openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "jwt.key")
        self._openssl("pkey", "-in", "jwt.key", "-pubout", "-out", "jwt.pub")
        self.jwt_private_key, self.jwt_public_key = self.dir / "jwt.key", self.dir / "jwt.pub"
        self.client = self.dir / "client"
        self.client.mkdir()
        self.issue(self.client, ["test-client"])

    def _openssl(self, *args: str) -> None:
        result = run("openssl", *args, cwd=self.dir)
        if result.returncode != 0:
            raise SystemExit(f"openssl {' '.join(args)}:\n{result.stderr}")

    def issue(self, directory: Path, dns_names: list[str]) -> None:
        """Writes tls.crt, tls.key and ca.crt as cert-manager does, for exactly the names asked: the
        exec probes and the test's calls dial 127.0.0.1 and must name one of them, as in a cluster."""
        sans = ",".join(f"DNS:{name}" for name in dns_names)
        key, csr = directory / "tls.key", directory / "tls.csr"
        self._openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                      "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={dns_names[0]}")
        self._openssl("x509", "-req", "-in", str(csr), "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                      "-out", str(directory / "tls.crt"), "-days", "1",
                      "-extfile", self._extensions(sans))
        csr.unlink()
        shutil.copy(self.dir / "ca.crt", directory / "ca.crt")
        for file in directory.iterdir():
            os.chmod(file, 0o444)

    def _extensions(self, sans: str) -> str:
        path = self.dir / f"ext-{uuid.uuid4().hex}.cnf"
        path.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n"
                        "keyUsage=digitalSignature\nbasicConstraints=CA:FALSE\n")
        return str(path)


class Database:
    """A fresh PostgreSQL database per overlay that asks for one; dropped at the end."""

    def __init__(self):
        self.base = os.environ.get("TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
        self.created: list[str] = []

    def create(self) -> str:
        name = f"deploy_check_{uuid.uuid4().hex[:12]}"
        result = run("psql", self.base, "-v", "ON_ERROR_STOP=1", "-qc", f"CREATE DATABASE {name}")
        if result.returncode != 0:
            raise SystemExit(f"cannot create a PostgreSQL database at {self.base}:\n{result.stderr}")
        self.created.append(name)
        return self.base.rsplit("/", 1)[0] + "/" + name

    def drop(self) -> None:
        for name in self.created:
            run("psql", self.base, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As the server binds (tokio sets SO_REUSEADDR): the last pod's TIME_WAIT connections don't count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def terminate(sandboxed: subprocess.Popen) -> bool:
    """SIGTERM to the service inside a bubblewrap sandbox, as a container runtime signals the
    container's process rather than bubblewrap. The process is known by the name it runs under in the
    image, not the name of the file it was given (the kernel truncates comm to 15 characters).
    False when there is no such process."""
    name = Path(image_contract()["binary"]).name[:15]
    serving = [pid for pid in descendants(sandboxed.pid)
               if Path(f"/proc/{pid}/comm").read_text().strip() == name]
    for pid in serving[-1:]:
        os.kill(pid, signal.SIGTERM)
    return bool(serving)


def run_pod(name: str, docs: list[dict], binary: Path, token_tool: Path, work: Path) -> None:
    certificates = Certificates(work)
    database = Database()
    config_map = next(doc for doc in docs if doc["kind"] == "ConfigMap")
    key, text = next(iter(config_map["data"].items()))
    fixtures = Fixtures(docs, tomllib.loads(text), work, certificates, database)
    deployment = one(docs, "Deployment")
    server_process = None
    try:
        auth = fixtures.layer.get("auth", {})
        unset = [field for field in ("issuer", "audience") if auth.get("mode") == "jwt" and not auth.get(field)]
        if unset:
            # Shipped empty so that start-up refuses until the cluster's owner sets them: prove it refuses,
            # then fill them in as the owner would.
            refused = run(*Pod(name, docs, deployment, binary, work / "unset", fixtures).command("print-config"))
            check(refused.returncode != 0 and "auth.issuer" in refused.stderr,
                  f"{name}: with auth.issuer/audience empty the service must refuse to start: {refused.stderr}")
            say(f"{name}: with {', '.join('auth.' + field for field in unset)} unset the service refuses to start")
            for field in unset:
                text = re.sub(rf'^{field} = ""', f'{field} = "https://{field}.test/"', text, flags=re.M)
            config_map["data"][key] = text
        pod = Pod(name, docs, deployment, binary, work / "server", fixtures)
        printed = run(*pod.command("print-config"))
        if not check(printed.returncode == 0, f"{name}: print-config in the pod failed: {printed.stderr}"):
            return
        config = tomllib.loads(printed.stdout)
        check_against_config(name, docs, config)
        grpc_port = int(config["server"]["grpc_addr"].rsplit(":", 1)[1])
        metrics_port = int(config["server"]["metrics_addr"].rsplit(":", 1)[1])
        for port in (grpc_port, metrics_port):
            if not port_free(port):
                raise SystemExit(f"{name}: port {port} is taken on this machine; the pod needs it")

        for job in (doc for doc in docs if doc["kind"] == "Job"):
            migrate = Pod(name, docs, job, binary, work / job["metadata"]["name"], fixtures)
            result = run(*migrate.container_command(), timeout=job["spec"].get("activeDeadlineSeconds", 600))
            if check(result.returncode == 0, f"{name}: Job {job['metadata']['name']} failed:\n{result.stderr[-3000:]}"):
                say(f"{name}: Job {job['metadata']['name']} ({' '.join(migrate.container.get('args', []))}) completed")

        log = open(work / "server.log", "w")
        server_process = subprocess.Popen(pod.container_command(), stdout=log, stderr=subprocess.STDOUT)
        container = pod.container

        def probe(definition: dict, service: str | None = None) -> subprocess.CompletedProcess:
            timeout = definition.get("timeoutSeconds", 1)
            if "grpc" in definition:
                # The kubelet's native probe: plaintext, from outside the pod.
                asked = definition["grpc"].get("service", "") if service is None else service
                empty = work / "kubelet"
                empty.mkdir(exist_ok=True)
                return run(str(binary), "healthcheck", "--addr", f"127.0.0.1:{definition['grpc']['port']}",
                           "--service", asked, "--timeout", f"{timeout}s", cwd=empty,
                           env={"PATH": os.environ["PATH"]}, timeout=timeout + 0.5)
            command = definition["exec"]["command"]
            if service is not None:
                command = [*command]
                command[command.index("--service") + 1] = service
            # The kubelet's timeoutSeconds bounds the whole exec: process start, config, handshake, call.
            return run(*pod.sandbox(command), timeout=timeout)

        startup = container["startupProbe"]
        for _ in range(startup.get("failureThreshold", 3)):
            if server_process.poll() is not None:
                break
            if probe(startup).returncode == 0:
                break
            time.sleep(startup.get("periodSeconds", 10))
        else:
            fail(f"{name}: the startupProbe never passed")
        check(server_process.poll() is None, f"{name}: the server exited:\n{(work / 'server.log').read_text()[-3000:]}")
        # Readiness follows the database check, a few seconds after start-up.
        readiness = container["readinessProbe"]
        for _ in range(30):
            ready = probe(readiness)
            if ready.returncode == 0:
                break
            time.sleep(readiness.get("periodSeconds", 10))
        if check(ready.returncode == 0, f"{name}: readinessProbe fails: {ready.stdout}{ready.stderr}"):
            say(f"{name}: startup and readiness probes pass ({probe_service(readiness)!r})")
        live = probe(container["livenessProbe"])
        check(live.returncode == 0, f"{name}: livenessProbe fails: {live.stdout}{live.stderr}")
        unknown = probe(readiness, service="no.such.v1.Service")
        if check(unknown.returncode != 0, f"{name}: a probe for a service the binary does not serve passed") and live.returncode == 0:
            say(f"{name}: liveness passes; a probe for an unknown service fails: {(unknown.stdout + unknown.stderr).strip()}")
        healthcheck = pod.image["healthcheck"]
        if healthcheck:
            result = run(*pod.sandbox(healthcheck), timeout=10)
            if check(result.returncode == 0, f"{name}: the Dockerfile's HEALTHCHECK fails: {result.stdout}{result.stderr}"):
                say(f"{name}: the Dockerfile's HEALTHCHECK passes")

        # A client in the cluster dials the Service's name, which the Certificate carries.
        service_name = next(doc["metadata"]["name"] for doc in docs if doc["kind"] == "Service")
        api = call_api(name, config, grpc_port, service_name, certificates, token_tool)
        if api is not None:
            check(probe_service(readiness) == api, f"{name}: readiness asks for {probe_service(readiness)!r}, the binary serves {api!r}")
            check(probe_service(container["livenessProbe"]) == "", f"{name}: liveness must ask for the whole server (\"\")")
            check(probe_service(startup) == "", f"{name}: startup must ask for the whole server (\"\")")

        grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        check(terminate(server_process), f"{name}: no server process to stop")
        stopping = time.monotonic()
        try:
            code = server_process.wait(timeout=grace)
            say(f"{name}: SIGTERM: exit {code} after {time.monotonic() - stopping:.1f}s (grace {grace}s)")
            check(code == 0, f"{name}: exit code {code} after SIGTERM:\n{(work / 'server.log').read_text()[-3000:]}")
        except subprocess.TimeoutExpired:
            fail(f"{name}: still running {grace}s after SIGTERM: the kubelet would SIGKILL it")
    finally:
        if server_process is not None and server_process.poll() is None:
            server_process.kill()
            server_process.wait()
        database.drop()


def call_api(name: str, config: dict, port: int, server_name: str, certificates: Certificates, token_tool: Path) -> str | None:
    """Lists the services through reflection, then creates and reads an order, as a client in the
    cluster would: with a client certificate under mutual TLS and a token under JWT."""
    buf = shutil.which("buf") or str(REPO / "node_modules/.bin/buf")
    tls = bool(config["tls"].get("cert_file"))
    base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    options = ["--protocol", "grpc"]
    if tls:
        client = certificates.client
        options += ["--cacert", str(client / "ca.crt"), "--cert", str(client / "tls.crt"), "--key", str(client / "tls.key"),
                    "--servername", server_name]
    else:
        options += ["--http2-prior-knowledge"]
    if config["auth"]["mode"] == "jwt":
        if not check(bool(config["auth"].get("jwt_public_key_file")), f"{name}: only JWT public keys are emulated"):
            return None
        token = run(str(token_tool), "--private-key-file", str(certificates.jwt_private_key), "--issuer", config["auth"]["issuer"], "--audience", config["auth"]["audience"],
                    "--scope", "orders.read orders.write", "--subject", "deploy-check")
        if not check(token.returncode == 0, f"{name}: minting a token: {token.stderr}"):
            return None
        options += ["-H", f"authorization: Bearer {token.stdout.strip()}"]
    services = run(buf, "curl", *options, "--list-services", base)
    if not check(services.returncode == 0, f"{name}: listing services: {services.stderr}"):
        return None
    apis = [line for line in services.stdout.split() if not line.startswith("grpc.")]
    if not check(len(apis) == 1, f"{name}: expected one API service, got {services.stdout}"):
        return None
    api = apis[0]
    created = run(buf, "curl", *options, "-d", '{"order": {"items": ["widget"], "price_cents": 1250, "destination": "Oslo"}}',
                  f"{base}/{api}/CreateOrder")
    if check(created.returncode == 0, f"{name}: CreateOrder: {created.stderr}"):
        order_id = json.loads(created.stdout)["order"]["id"]
        fetched = run(buf, "curl", *options, "-d", json.dumps({"id": order_id}), f"{base}/{api}/GetOrder")
        if check(fetched.returncode == 0 and order_id in fetched.stdout, f"{name}: GetOrder: {fetched.stderr}"):
            say(f"{name}: {api}: CreateOrder and GetOrder over {'mutual TLS' if tls else 'plaintext'}"
                f"{' with a JWT' if config['auth']['mode'] == 'jwt' else ''}")
    return api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", type=Path, help="the service binary the image would hold")
    parser.add_argument("--overlay", action="append", help="only these overlays (default: all)")
    parser.add_argument("--static-only", action="store_true",
                        help="check the manifests alone, run no pod (the checks against the configuration need the pod)")
    parser.add_argument("--max-binary-mb", type=float,
                        help="fail when the binary is larger (the image's size budget less its base image's)")
    args = parser.parse_args()
    binary = args.binary.resolve()
    if args.max_binary_mb is not None:
        size = binary.stat().st_size / 1e6
        check(size <= args.max_binary_mb, f"the binary is {size:.1f} MB, over its {args.max_binary_mb} MB budget")
    token_tool = binary.parent / "examples" / "dev-token"
    overlays = args.overlay or sorted(path.name for path in OVERLAYS.iterdir() if path.is_dir())
    check_image()
    for overlay in overlays:
        docs = render(OVERLAYS / overlay)
        print(f"deploy/check: {overlay}: {len(docs)} objects")
        validate_schemas(overlay, docs)
        check_rules(overlay, docs)
        check_security(overlay, docs)
        check_wiring(overlay, docs)
        check_binary_path(overlay, docs)
        check_placeholders(overlay, docs)
        check_image_repository(overlay)
        if not args.static_only:
            with tempfile.TemporaryDirectory(prefix=f"deploy-check-{overlay}-") as work:
                run_pod(overlay, docs, binary, token_tool, Path(work))
    if not args.static_only:
        with tempfile.TemporaryDirectory(prefix="deploy-check-image-") as work:
            run_image(binary, Path(work))
    # Every optional component renders on top of every overlay.
    for component in sorted((REPO / "deploy/k8s/components").iterdir()):
        for overlay in overlays:
            with tempfile.TemporaryDirectory() as scratch:
                kustomization = Path(scratch) / "kustomization.yaml"
                kustomization.write_text(yaml.safe_dump({
                    "resources": [os.path.relpath(OVERLAYS / overlay, scratch)],
                    "components": [os.path.relpath(component, scratch)],
                }))
                rendered = run("kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", scratch)
                if check(rendered.returncode == 0, f"{overlay} + {component.name}: {rendered.stderr}"):
                    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
                    for doc in docs:
                        if doc["kind"] in CRD_KINDS:
                            check_crd(f"{overlay} + {component.name}", doc)
                    check_placeholders(f"{overlay} + {component.name}", docs)
    if failures:
        raise SystemExit(f"deploy/check: {len(failures)} failure(s)")
    print(f"deploy/check: OK ({', '.join(overlays)})")


if __name__ == "__main__":
    main()
