"""Offline validation of the deployment manifests (`make lint-deploy`).

- deploy/sandbox-template.yaml: the SandboxTemplate's own fields are checked
  against the agent-sandbox v1alpha1 shape, and its spec.podTemplate is
  validated as a Pod with kubernetes-validate (schemas bundled, no cluster),
  plus the pod conventions the runner relies on.
- deploy/networkpolicy.yaml: every document, validated as it is.

Usage: python deploy/validate.py [--k8s-version 1.33.0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
TEMPLATE = DEPLOY / "sandbox-template.yaml"
NETWORK_POLICY = DEPLOY / "networkpolicy.yaml"

# extensions.agents.x-k8s.io/v1alpha1 SandboxTemplateSpec and PodTemplate.
TEMPLATE_SPEC_FIELDS = {
    "podTemplate",
    "volumeClaimTemplates",
    "networkPolicy",
    "networkPolicyManagement",
    "envVarsInjectionPolicy",
    "service",
}
POD_TEMPLATE_FIELDS = {"metadata", "spec"}
POD_METADATA_FIELDS = {"labels", "annotations"}


class Problems(list[str]):
    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)


def k8s_validate(doc: dict[str, Any], version: str, where: str, problems: Problems) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        problems.append(f"{where}: {path or '(top)'}: {exc.message}")
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
        problems.append(f"{where}: {exc}")


def pod_from_template(template: dict[str, Any], problems: Problems) -> dict[str, Any] | None:
    where = TEMPLATE.name
    problems.check(
        template.get("apiVersion") == "extensions.agents.x-k8s.io/v1alpha1",
        f"{where}: apiVersion must be extensions.agents.x-k8s.io/v1alpha1",
    )
    problems.check(
        template.get("kind") == "SandboxTemplate", f"{where}: kind must be SandboxTemplate"
    )
    spec = template.get("spec") or {}
    unknown = set(spec) - TEMPLATE_SPEC_FIELDS
    problems.check(not unknown, f"{where}: unknown spec fields {sorted(unknown)}")
    pod_template = spec.get("podTemplate")
    if not isinstance(pod_template, dict) or not isinstance(pod_template.get("spec"), dict):
        problems.append(f"{where}: spec.podTemplate.spec (a PodSpec) is required")
        return None
    unknown = set(pod_template) - POD_TEMPLATE_FIELDS
    problems.check(not unknown, f"{where}: unknown spec.podTemplate fields {sorted(unknown)}")
    metadata = pod_template.get("metadata") or {}
    unknown = set(metadata) - POD_METADATA_FIELDS
    problems.check(not unknown, f"{where}: podTemplate.metadata takes only labels/annotations")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "shepherd-runner-validate", **metadata},
        "spec": pod_template["spec"],
    }


def check_conventions(pod: dict[str, Any], problems: Problems) -> None:
    """What the runner and the operator rely on (contract section 1)."""
    where = f"{TEMPLATE.name}: podTemplate"
    spec = pod["spec"]
    containers = spec.get("containers") or [{}]
    runner = containers[0]
    pod_sc = spec.get("securityContext") or {}
    ctr_sc = runner.get("securityContext") or {}
    problems.check(spec.get("restartPolicy") == "Never", f"{where}: restartPolicy must be Never")
    problems.check(pod_sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot must be true")
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        problems.check(pod_sc.get(key) == 1000, f"{where}: securityContext.{key} must be 1000")
    problems.check(
        (pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
        f"{where}: seccompProfile must be RuntimeDefault",
    )
    problems.check(
        ctr_sc.get("allowPrivilegeEscalation") is False,
        f"{where}: allowPrivilegeEscalation must be false",
    )
    problems.check(
        (ctr_sc.get("capabilities") or {}).get("drop") == ["ALL"],
        f"{where}: capabilities must drop ALL",
    )
    ports = [p.get("containerPort") for p in runner.get("ports") or []]
    problems.check(8888 in ports, f"{where}: containerPort 8888 missing")
    probe = (runner.get("readinessProbe") or {}).get("httpGet") or {}
    problems.check(
        probe.get("path") == "/healthz" and probe.get("port") == 8888,
        f"{where}: readinessProbe must be GET /healthz on 8888",
    )
    env = {e.get("name"): e for e in runner.get("env") or []}
    problems.check(
        "secretKeyRef" in ((env.get("ANTHROPIC_API_KEY") or {}).get("valueFrom") or {}),
        f"{where}: ANTHROPIC_API_KEY must come from a Secret",
    )
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounts = {m.get("mountPath"): m.get("name") for m in runner.get("volumeMounts") or []}
    for path in ("/home/shepherd", "/workspace"):
        volume = volumes.get(mounts.get(path)) or {}
        problems.check("emptyDir" in volume, f"{where}: {path} must be an emptyDir volume")
    resources = runner.get("resources") or {}
    problems.check(
        resources.get("requests") == {"memory": "2Gi", "cpu": "500m"}
        and resources.get("limits") == {"memory": "4Gi", "cpu": "2"},
        f"{where}: resources must be requests 2Gi/500m, limits 4Gi/2",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--k8s-version",
        default=kubernetes_validate.latest_version(),
        help="Kubernetes schema version (default: the newest bundled)",
    )
    args = parser.parse_args(argv)
    problems = Problems()

    docs = [d for d in yaml.safe_load_all(TEMPLATE.read_text()) if d]
    problems.check(len(docs) == 1, f"{TEMPLATE.name}: expected one document, found {len(docs)}")
    pod = pod_from_template(docs[0], problems) if docs else None
    if pod is not None:
        k8s_validate(pod, args.k8s_version, f"{TEMPLATE.name} (podTemplate as a Pod)", problems)
        check_conventions(pod, problems)

    policies = [d for d in yaml.safe_load_all(NETWORK_POLICY.read_text()) if d]
    problems.check(bool(policies), f"{NETWORK_POLICY.name}: no documents")
    for doc in policies:
        name = (doc.get("metadata") or {}).get("name", "?")
        problems.check(doc.get("kind") == "NetworkPolicy", f"{NETWORK_POLICY.name}: {name}: kind")
        k8s_validate(doc, args.k8s_version, f"{NETWORK_POLICY.name} ({name})", problems)

    for problem in problems:
        print(f"invalid: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(
        f"valid (Kubernetes {args.k8s_version} schemas): {TEMPLATE.name} pod template, "
        f"{len(policies)} NetworkPolicies in {NETWORK_POLICY.name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
