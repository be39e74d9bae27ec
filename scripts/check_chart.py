"""Checks rendered Helm output against the tessera binary: every flag the chart passes exists in that
subcommand's --help, and the ports the containers listen on are the ones their Services, probes, network
policies and ServiceMonitor use.

Usage: check_chart.py TESSERA_BINARY RENDERED.yaml...
"""

import re
import subprocess
import sys
from urllib.parse import urlparse

import yaml

SUBCOMMANDS = {"coordinator", "worker", "serve"}


def help_flags(binary, *sub):
    out = subprocess.run([binary, *sub, "--help"], check=True, capture_output=True, text=True).stdout
    return set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", out))


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def arg_value(args, flag):
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check(binary, path, errors):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    component = lambda d: d["metadata"]["labels"].get("app.kubernetes.io/component")
    containers = {}
    for kind in ("Deployment", "StatefulSet"):
        for d in by_kind.get(kind, []):
            for c in d["spec"]["template"]["spec"]["containers"]:
                containers[c["name"]] = (d, c)
    where = lambda what: f"{path}: {what}"

    # Flags.
    global_flags = help_flags(binary)
    for name in ("coordinator", "worker"):
        if name not in containers:
            errors.append(where(f"no {name} container rendered"))
            continue
        args = containers[name][1]["args"]
        sub = next((a for a in args if a in SUBCOMMANDS), None)
        if sub != name:
            errors.append(where(f"{name} container runs subcommand {sub!r}"))
            continue
        split = args.index(sub)
        known = help_flags(binary, sub)
        for i, a in enumerate(args):
            if not a.startswith("--"):
                continue
            flag = a.split("=", 1)[0]
            allowed = global_flags if i < split else known
            if flag not in allowed:
                errors.append(where(f"{name}: `tessera {sub if i > split else ''}` has no flag {flag}"))

    def ports(c):
        return {p["name"]: p["containerPort"] for p in c.get("ports", [])}

    def probe_ports(c):
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            p = c.get(probe)
            if not p:
                continue
            for kind in ("httpGet", "tcpSocket", "grpc"):
                if kind in p:
                    yield probe, p[kind]["port"]

    def check_probes(name, c):
        for probe, port in probe_ports(c):
            if port not in ports(c) and port not in ports(c).values():
                errors.append(where(f"{name}: {probe} uses port {port!r}, not a container port"))

    # The coordinator.
    if "coordinator" in containers:
        c = containers["coordinator"][1]
        cp = ports(c)
        if int(arg_value(c["args"], "--port")) != cp.get("http"):
            errors.append(where(f"coordinator --port {arg_value(c['args'], '--port')} != containerPort http {cp.get('http')}"))
        check_probes("coordinator", c)
        services = [s for s in by_kind.get("Service", []) if component(s) == "coordinator"]
        if not services:
            errors.append(where("no coordinator Service"))
        for s in services:
            for p in s["spec"]["ports"]:
                if p["targetPort"] not in cp and p["targetPort"] not in cp.values():
                    errors.append(where(f"Service {s['metadata']['name']} targets {p['targetPort']!r}, not a coordinator port"))
        for sm in by_kind.get("ServiceMonitor", []):
            names = {p["name"] for s in services for p in s["spec"]["ports"]}
            for e in sm["spec"]["endpoints"]:
                if e["port"] not in names:
                    errors.append(where(f"ServiceMonitor scrapes port {e['port']!r}, not a coordinator Service port"))
        # etcd: an in-chart endpoint names an etcd Service with that port.
        for ep in arg_value(c["args"], "--etcd").split(","):
            u = urlparse(ep)
            etcd_svcs = {s["metadata"]["name"]: s for s in by_kind.get("Service", []) if component(s) == "etcd"}
            if etcd_svcs and u.hostname not in etcd_svcs:
                errors.append(where(f"--etcd {ep}: no Service {u.hostname}"))
            if u.hostname in etcd_svcs and u.port not in [p["port"] for p in etcd_svcs[u.hostname]["spec"]["ports"]]:
                errors.append(where(f"--etcd {ep}: Service {u.hostname} has no port {u.port}"))

    # The workers.
    if "worker" in containers:
        c = containers["worker"][1]
        args, wp = c["args"], ports(c)
        for flag, name in (("--listen", "grpc"), ("--collective-listen", "collective"), ("--advertise", "grpc")):
            v = arg_value(args, flag)
            if v is None or port_of(v) != wp.get(name):
                errors.append(where(f"worker {flag} {v} does not use containerPort {name} {wp.get(name)}"))
        check_probes("worker", c)
        for s in by_kind.get("Service", []):
            if component(s) != "worker":
                continue
            if s["spec"].get("clusterIP") != "None":
                errors.append(where("the worker Service is not headless"))
            for p in s["spec"]["ports"]:
                if wp.get(p["targetPort"]) != p["port"]:
                    errors.append(where(f"worker Service port {p['name']} {p['port']} != containerPort {wp.get(p['targetPort'])}"))
        sts = containers["worker"][0]
        svc = sts["spec"]["serviceName"]
        if f".{svc}." not in arg_value(args, "--advertise"):
            errors.append(where(f"worker --advertise does not use the headless Service {svc}"))
        for np in by_kind.get("NetworkPolicy", []):
            if component(np) != "worker":
                continue
            for rule in np["spec"]["ingress"]:
                for p in rule.get("ports", []):
                    if p["port"] not in wp.values():
                        errors.append(where(f"NetworkPolicy {np['metadata']['name']} opens {p['port']}, not a worker port"))


def main():
    binary, paths = sys.argv[1], sys.argv[2:]
    errors = []
    for p in paths:
        check(binary, p, errors)
    for e in errors:
        print("MISMATCH:", e)
    if errors:
        sys.exit(1)
    print(f"flags and ports agree in {len(paths)} rendered value sets")


if __name__ == "__main__":
    main()
