"""Every deploy file passes its own tool (skipped, with the reason, where the tool is not installed:
`make deploy-tools` installs them all), plus the contracts between the files that no tool checks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.processes import require
from tests.server_process import REPO

DEPLOY = REPO / "deploy"
DOCKERFILES = [REPO / "Dockerfile", DEPLOY / "router" / "Dockerfile"]
MANIFESTS = sorted((DEPLOY / "k8s").rglob("*.yaml"))
VARIANTS = [DEPLOY / "k8s" / "cpu" / "deployment.yaml", DEPLOY / "k8s" / "gpu" / "deployment.yaml"]
COMPOSE = [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]]
PROMETHEUS = DEPLOY / "prometheus"


def run(*argv: str, cwd: Path = REPO) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# -- the tools ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint(dockerfile: Path) -> None:
    run(require("hadolint"), str(dockerfile))


@pytest.mark.parametrize("files", COMPOSE, ids="+".join)
def test_docker_compose_config(files: list[str]) -> None:
    run(require("docker-compose"), *(a for f in files for a in ("-f", f)), "config", "-q")


def test_compose_spec_schema() -> None:
    run(require("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *COMPOSE[1])


def test_kubernetes_validate_strict() -> None:
    out = run(require("kubernetes-validate"), "--strict", *map(str, MANIFESTS))
    assert out.count("passed") >= len(MANIFESTS), out


def test_promtool_compose_config_and_rules() -> None:
    promtool = require("promtool")
    run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    run(promtool, "check", "rules", str(PROMETHEUS / "rules.yml"))
    run(promtool, "test", "rules", "rules_test.yml", cwd=PROMETHEUS)


def test_promtool_kubernetes_config(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes service discovery; there the SD blocks become
    static targets and the rest (relabelling, rule files) is still checked."""
    promtool = require("promtool")
    config = PROMETHEUS / "kubernetes.yml"
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    if "kubernetes_sd_configs not found" in result.stdout + result.stderr:
        data = yaml.safe_load(config.read_text())
        for job in data["scrape_configs"]:
            job.pop("kubernetes_sd_configs")
            job["static_configs"] = [{"targets": ["pod:8000"]}]
        (tmp_path / "rules.yml").write_text((PROMETHEUS / "rules.yml").read_text())
        config = tmp_path / "kubernetes.yml"
        config.write_text(yaml.safe_dump(data))
        run(promtool, "check", "config", str(config))
    else:
        assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint() -> None:
    files = [str(p) for p in sorted(DEPLOY.rglob("*.y*ml"))] + COMPOSE[1]
    run(require("yamllint"), "--strict", "-c", str(DEPLOY / "yamllint.yml"), *files)


# -- contracts between the files ---------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_targets_user_healthcheck_entrypoint() -> None:
    instructions = dockerfile_instructions()
    stages = [args.split()[-1] for op, args in instructions if op == "FROM"]
    assert {"cpu", "cuda"} <= set(stages) and stages[-1] == "cpu", "cpu must be the default (last) target"
    users = [args for op, args in instructions if op == "USER"]
    assert users and all(u not in ("root", "0") for u in users)
    (health,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert re.search(r'CMD \["', health) and "/health" in health, "HEALTHCHECK must be exec form on /health"
    assert ("ENTRYPOINT", '["canvas-serve", "serve"]') in instructions
    assert ("COPY", "models models") in instructions, "the embedded model goes into the image"
    froms = [args.split()[0] for op, args in instructions if op == "FROM"]
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    for image in (args.get(f.strip("${}"), f) for f in froms if f.startswith("${")):
        assert re.search(r":\d+\.\d+\.\d+", image), f"base image {image} is not pinned to a version"


@pytest.mark.parametrize("path", VARIANTS, ids=lambda p: p.parent.name)
def test_deployment_probes_and_drain(path: Path) -> None:
    (deployment,) = documents(path)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain_s = float(env["CANVAS_SERVE_DRAIN_TIMEOUT_S"])
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    sleep_s = sum(float(s) for s in re.findall(r"\bsleep (\d+)", pre_stop)[:1])
    assert "kill -TERM 1" in pre_stop, "the preStop hook starts the drain"
    assert pod["terminationGracePeriodSeconds"] > sleep_s + drain_s
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_variants_differ_in_resources_only_where_they_should() -> None:
    cpu, gpu = (documents(p)[0] for p in VARIANTS)
    assert cpu["metadata"] == gpu["metadata"], "both variants are the Deployment that hpa.yaml scales"
    gpu_resources = gpu["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu_resources["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in str(cpu["spec"]["template"]["spec"]["containers"][0]["resources"])
    volumes = gpu["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "model", "mountPath": "/model", "readOnly": True} in volumes


def test_service_pdb_hpa_and_router_select_the_server_pods() -> None:
    (deployment,) = documents(VARIANTS[0])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    k8s = DEPLOY / "k8s"
    (service,) = documents(k8s / "service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = next(d for d in documents(k8s / "pdb.yaml") if d["metadata"]["name"] == "canvas-serve")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (hpa,) = documents(k8s / "hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    router = next(d for d in documents(k8s / "router.yaml") if d["kind"] == "Deployment")
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    selector = args[args.index("--selector") + 1 : args.index("--selector") + 3]
    assert dict(s.split("=") for s in selector).items() <= labels.items()


def test_the_api_key_comes_from_a_secret_and_is_never_written_into_a_deploy_file() -> None:
    for path in VARIANTS:
        (deployment,) = documents(path)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        keys = [e for e in container["env"] if "API_KEY" in e["name"]]
        assert [e["name"] for e in keys] == ["CANVAS_SERVE_API_KEY"], path
        assert "value" not in keys[0], f"{path}: the key must come from a Secret"
        assert keys[0]["valueFrom"]["secretKeyRef"] == {"name": "canvas-serve-api-key", "key": "api-key"}
    assert not [d for p in MANIFESTS for d in documents(p) if d.get("kind") == "Secret"], "no Secret in git"

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    server = compose["services"]["canvas-serve"]
    assert server["secrets"] == ["canvas_serve_api_key"]
    named = {n: v for n, v in server["environment"].items() if "API_KEY" in n}
    assert named == {"CANVAS_SERVE_API_KEY_FILE": "/run/secrets/canvas_serve_api_key"}, "a file, not a key"
    secret_file = compose["secrets"]["canvas_serve_api_key"]["file"]
    ignored = subprocess.run(["git", "check-ignore", "-q", secret_file], cwd=REPO, check=False)
    assert ignored.returncode == 0, f"{secret_file} must be git-ignored"

    dockerfile = [args for op, args in dockerfile_instructions() if op in ("ENV", "ARG")]
    assert not [args for args in dockerfile if "API_KEY" in args], "no key in the image"
