"""deploy/: Kubernetes manifests against the Kubernetes schemas, the compose file, the Containerfile,
and the two scripts the image runs (entrypoint and health probe) against real servers.

The image itself is built and run by `make deploy-test` (podman), not here.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import REPO, ServerThread, store_with_hh

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
RENDERINGS = ["base", "overlays/cpu", "overlays/gpu"]
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]  # gRPC probes are GA since 1.27


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, DEPLOY / "container" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _render(path: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed; the raw base files are still validated")
    out = subprocess.run([kubectl, "kustomize", str(K8S / path)], check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=RENDERINGS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, _render(request.param)


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _workloads(docs):
    return _by_kind(docs, "Deployment") + _by_kind(docs, "StatefulSet")


def _settings(docs: list[dict]) -> dict[str, str]:
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rm-service-config")]
    return config["data"]


# -- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate_against_the_kubernetes_schemas(rendered, version):
    _, docs = rendered
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_raw_base_files_validate_without_kustomize():
    """The resources under base/ are plain manifests: validated here even where kustomize is missing."""
    files = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]
    for name in files:
        for doc in yaml.safe_load_all((K8S / "base" / name).read_text()):
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    for doc in yaml.safe_load_all((K8S / "tokens-secret.example.yaml").read_text()):  # the example operators copy
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_a_broken_manifest_is_refused():
    """The validator is strict: a misspelt probe field fails."""
    deployment = yaml.safe_load((K8S / "base" / "scorer.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["servce"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_probes_call_health_on_the_served_ports_grpc_and_http(rendered):
    """Startup and liveness are native gRPC probes of grpc.health.v1; readiness is HTTP GET
    /health on the HTTP port the pod serves (200 exactly while the named gRPC service is SERVING)."""
    from rm_service.api.v1 import preference_pb2, reward_pb2

    _, docs = rendered
    settings = _settings(docs)
    port, http_port = int(settings["RM_SERVE_PORT"]), int(settings["RM_SERVE_HTTP_PORT"])
    wanted = {
        "rm-scorer": reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name,
        "rm-store": preference_pb2.DESCRIPTOR.services_by_name["PreferenceService"].full_name,
    }
    for workload in _workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": port, "http": http_port, "metrics": int(settings["RM_SERVE_METRICS_PORT"])}
        for kind, wanted_kind in (("startupProbe", "grpc"), ("readinessProbe", "httpGet"), ("livenessProbe", "grpc")):
            probe = container[kind]
            assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {wanted_kind}, kind
        assert container["startupProbe"]["grpc"]["port"] == container["livenessProbe"]["grpc"]["port"] == port
        assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert container["startupProbe"]["grpc"]["service"] == wanted[workload["metadata"]["name"]]
        # Draining fits the grace period: preStop sleep, then RM_SERVE_GRACE_SECONDS for in-flight calls.
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + float(settings["RM_SERVE_GRACE_SECONDS"])


def test_pods_run_as_the_images_non_root_user_with_tokens_from_the_secret(rendered):
    _, docs = rendered
    uid = int(re.search(r"^ARG UID=(\d+)$", (DEPLOY / "Containerfile").read_text(), re.M).group(1))
    settings = _settings(docs)
    assert not _by_kind(
        docs, "Secret"
    )  # created by the operator outside the kustomization: `apply -k` never overwrites it
    assert (
        "create secret generic rm-service-tokens --from-file=tokens=" in (REPO / "docs" / "operations.md").read_text()
    )
    secret = yaml.safe_load((K8S / "tokens-secret.example.yaml").read_text())
    for workload in _workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid != 0
        (container,) = pod["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        tokens_dir, tokens_key = settings["RM_AUTH_TOKENS_FILE"].rsplit("/", 1)
        assert mounts["tokens"]["mountPath"] == tokens_dir and mounts["tokens"]["readOnly"]
        assert (
            volumes["tokens"]["secret"]["secretName"] == secret["metadata"]["name"]
            and tokens_key in secret["stringData"]
        )
        assert settings["RM_HOME"] in {m["mountPath"] for m in mounts.values()}
        assert settings["RM_MODELS_ARTIFACTS_DIR"] == mounts["registry"]["mountPath"]
        assert container["envFrom"][0]["configMapRef"]["name"] == _settings_name(docs)


def _settings_name(docs) -> str:
    return next(
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rm-service-config")
    )


def test_scorers_are_stateless_and_the_store_is_one_writer_with_a_volume(rendered):
    _, docs = rendered
    scorer = _one(docs, "Deployment", "rm-scorer")
    store = _one(docs, "StatefulSet", "rm-store")
    assert scorer["spec"]["replicas"] >= 2
    assert scorer["spec"]["template"]["spec"]["containers"][0]["args"] == ["serve", "--no-store"]
    assert store["spec"]["replicas"] == 1 and store["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "serve",
        "--no-model",
    ]
    (claim,) = store["spec"]["volumeClaimTemplates"]
    home = next(
        m
        for m in store["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        if m["name"] == claim["metadata"]["name"]
    )
    assert home["mountPath"] == _settings(docs)["RM_HOME"]
    registry = _one(docs, "PersistentVolumeClaim", "rm-registry")
    assert registry["spec"]["accessModes"] == ["ReadWriteMany"]  # written by the store pod, read by every scorer


def test_services_select_the_pods_and_the_headless_one_lists_every_scorer(rendered):
    _, docs = rendered
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in _workloads(docs)}
    for service in _by_kind(docs, "Service"):
        target = "rm-scorer" if service["metadata"]["name"].startswith("rm-scorer") else "rm-store"
        assert service["spec"]["selector"].items() <= pods[target].items(), service["metadata"]["name"]
        assert [p for p in service["spec"]["ports"] if p["name"] == "grpc"][0]["targetPort"] == "grpc"
    for name in ("rm-scorer", "rm-store"):  # HTTP (reward routes, labeling page) behind the ClusterIP services
        ports = {p["name"]: p for p in _one(docs, "Service", name)["spec"]["ports"]}
        assert ports["http"]["targetPort"] == "http" and ports["http"]["port"] == 8080
    assert _one(docs, "Service", "rm-scorer-headless")["spec"]["clusterIP"] == "None"
    assert _one(docs, "StatefulSet", "rm-store")["spec"]["serviceName"] == "rm-store-headless"
    assert _one(docs, "Service", "rm-store-headless")["spec"]["clusterIP"] == "None"
    hpa = _one(docs, "HorizontalPodAutoscaler", "rm-scorer")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rm-scorer"}
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = _one(docs, "PodDisruptionBudget", "rm-scorer")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pods["rm-scorer"].items()


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_image():
    docs = _render("overlays/gpu")
    (container,) = _one(docs, "Deployment", "rm-scorer")["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "RM_SERVE_DEVICE", "value": "cuda"} in container["env"]
    assert container["image"].endswith(":cuda")
    assert _one(docs, "Deployment", "rm-scorer")["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "serve",
        "--no-store",
    ]
    (metric,) = _one(docs, "HorizontalPodAutoscaler", "rm-scorer")["spec"]["metrics"]  # the queue, not the CPU
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "rm_queue_fill"
    rules = yaml.safe_load((REPO / "deploy/k8s/overlays/gpu/prometheus-adapter-rules.yaml").read_text())
    (rule,) = rules["rules"]["custom"]
    assert rule["name"]["as"] == "rm_queue_fill"
    assert "rm_queued_tokens" in rule["metricsQuery"] and "rm_admission_token_limit" in rule["metricsQuery"]


@pytest.mark.parametrize("path", RENDERINGS)
def test_a_node_drain_can_evict_a_scorer_at_the_hpa_minimum(path):
    """The PDB allows an eviction when the HPA has scaled the scorers down to its minimum (the gpu
    overlay's is 1), and takes them one at a time above it."""
    docs = _render(path)
    minimum = _one(docs, "HorizontalPodAutoscaler", "rm-scorer")["spec"]["minReplicas"]
    spec = _one(docs, "PodDisruptionBudget", "rm-scorer")["spec"]
    if "maxUnavailable" in spec:
        assert spec["maxUnavailable"] == 1
    else:
        assert spec["minAvailable"] < minimum
    assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow"  # an unready scorer never blocks a drain
    if path == "overlays/gpu":
        assert minimum == 1


def _known_settings() -> set[str]:
    from rm_service import settings as s

    names = {"RM_HOME"}
    for cls in (s.StoreSettings, s.ModelSettings, s.ServeSettings, s.SecuritySettings, s.TrainSettings):
        prefix = cls.model_config["env_prefix"]
        names |= {f"{prefix}{field}".upper() for field in cls.model_fields}
    entrypoint = (DEPLOY / "container" / "entrypoint.py").read_text()
    names |= set(re.findall(r"\b(RM_(?:SEED|WAIT)_[A-Z_]+)\b", entrypoint))
    return names


def test_every_setting_in_the_configmap_and_compose_is_a_real_setting(rendered):
    _, docs = rendered
    known = _known_settings()
    assert set(_settings(docs)) <= known, set(_settings(docs)) - known
    for workload in _workloads(docs):
        for env in workload["spec"]["template"]["spec"]["containers"][0].get("env", []):
            assert env["name"] in known, env["name"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        unknown = {k for k in service["environment"] if k.startswith("RM_")} - known
        assert not unknown, f"{name}: {unknown}"


# -- compose ---------------------------------------------------------------------------------


def test_compose_file_names_the_store_two_scorers_and_a_policy_trainer():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"store", "scorer-1", "scorer-2", "policy-trainer"}
    assert services["store"]["command"] == ["serve", "--no-model"]
    published = set()
    for name in ("scorer-1", "scorer-2"):
        scorer = services[name]
        assert scorer["command"] == ["serve", "--no-store"]
        assert scorer["depends_on"]["store"]["condition"] == "service_healthy"
        assert "registry:/var/lib/rm-registry:ro" in scorer["volumes"]
        assert "rm.v1.RewardService" in scorer["healthcheck"]["test"]
        published |= {p.rsplit(":", 1)[0] for p in scorer["ports"]}
        assert {p.rsplit(":", 1)[1] for p in scorer["ports"]} == {"50051", "8080"}  # gRPC and HTTP
    assert len(published) == 4  # two host ports (gRPC, HTTP) per replica
    assert "127.0.0.1:8080:8080" in services["store"]["ports"]  # the labeling page
    assert "registry:/var/lib/rm-registry" in services["store"]["volumes"]
    assert {"home", "registry"} <= set(compose["volumes"])
    for name in ("store", "scorer-1", "scorer-2"):
        assert services[name]["environment"]["RM_MODELS_ARTIFACTS_DIR"] == "/var/lib/rm-registry"
        assert services[name]["environment"]["RM_SERVE_HTTP_PORT"] == "8080"
        assert services[name]["healthcheck"]["test"][:3] == [
            "CMD",
            "/opt/rm-service/venv/bin/python",
            "/opt/rm-service/healthcheck.py",
        ]
    trainer = services["policy-trainer"]
    assert trainer["entrypoint"] == ["/opt/rm-service/venv/bin/policy-trainer"] and trainer["command"] == ["ppo"]
    addresses = trainer["environment"]["PPO_REWARD_ADDRESSES"].split(",")
    assert addresses == ["scorer-1:50051", "scorer-2:50051"]
    assert "RM_AUTH_TOKENS" not in trainer["environment"]  # the trainer gets its own token only


def test_compose_env_keys_are_policy_trainer_settings():
    from policy_trainer.settings import PPOSettings

    trainer = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["policy-trainer"]
    fields = {f"PPO_{f}".upper() for f in PPOSettings.model_fields}
    assert {k for k in trainer["environment"] if k.startswith("PPO_")} <= fields


# -- Containerfile ---------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Containerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def test_containerfile_takes_a_base_image_argument():
    steps = _instructions()
    assert steps[0] == ("ARG", "BASE_IMAGE=localhost/rm-service-base:bookworm")
    assert [arg for op, arg in steps if op == "FROM"][0].startswith("${BASE_IMAGE}")
    assert _final_stage()[0] == ("FROM", "${BASE_IMAGE}")


def test_containerfile_runs_non_root_health_checked_serve():
    final = _final_stage()
    ops = dict(final)
    user = ops["USER"].replace(
        "${UID}", re.search(r"^ARG UID=(\d+)$", (DEPLOY / "Containerfile").read_text(), re.M).group(1)
    )
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    assert [op for op, _ in final].index("USER") < [op for op, _ in final].index("ENTRYPOINT")
    assert json.loads(ops["HEALTHCHECK"].split("CMD", 1)[1]) == [
        "/opt/rm-service/venv/bin/python",
        "/opt/rm-service/healthcheck.py",
    ]
    assert json.loads(ops["ENTRYPOINT"]) == ["/opt/rm-service/venv/bin/python", "/opt/rm-service/entrypoint.py"]
    assert json.loads(ops["CMD"]) == ["serve"]
    assert ops["VOLUME"] == "/var/lib/rm-service" and "RM_HOME=/var/lib/rm-service" in ops["ENV"]
    assert "RM_SERVE_HOST=0.0.0.0" in ops["ENV"] and "RM_SERVE_PORT=50051" in ops["ENV"]
    assert "RM_SERVE_HTTP_PORT=8080" in ops["ENV"]
    assert set(ops["EXPOSE"].split()) == {"50051", "8080", "9464"}
    assert "HF_HUB_OFFLINE=1" in ops["ENV"]  # the image never reaches for a hub
    for op, arg in _instructions():
        assert not (op == "RUN" and re.search(r"\b(curl|wget)\b|pip install(?!.*--no-index)", arg)), (
            f"network in the build: {arg}"
        )


# -- the scripts the image runs, against real servers ------------------------------------------


def test_health_probe_is_zero_only_while_serving(home, capsys, monkeypatch):
    from rm_service.settings import ServeSettings

    probe = _module("healthcheck")
    srv = ServerThread(ServeSettings(port=0, with_model=False, metrics_port=-1))
    monkeypatch.setenv("RM_SERVE_PORT", str(srv.port))
    try:
        assert probe.main([]) == 0
        assert probe.main(["rm.v1.PreferenceService"]) == 0
        assert "SERVING" in capsys.readouterr().out
        assert probe.main(["rm.v1.NoSuchService"]) == 1  # health answers NOT_FOUND
    finally:
        srv.stop()
    assert probe.main([]) == 1  # nothing listens: unhealthy, not a crash
    assert "unhealthy" in capsys.readouterr().out


@pytest.mark.slow
def test_entrypoint_installs_the_starter_model_once_and_scorers_wait_for_it(
    home, tiny_backbone_dir, tmp_path, monkeypatch, capsys
):
    """A version trained like the image's seed stage is copied into an empty registry,
    registered and promoted; the server then serves it; a second start changes nothing."""
    from rm_service import registry
    from rm_service.server.models import load_for_serving
    from rm_service.settings import ModelSettings, ServeSettings, StoreSettings, TrainSettings
    from rm_service.train.run import train

    entrypoint = _module("entrypoint")
    store = store_with_hh(tmp_path, 40)  # the build's seed home
    train(
        store,
        TrainSettings(
            backbone=str(tiny_backbone_dir),
            max_minutes=1,
            ensemble_size=2,
            max_tokens=128,
            heldout_fraction=0.2,
            export_onnx="off",
        ),
        ModelSettings(),
        show_progress=False,
    )
    seed = Path(registry.get_model(store, "v1").artifact_path)
    store.close()

    live = tmp_path / "volume"
    monkeypatch.setenv("RM_HOME", str(live))
    with pytest.raises(SystemExit, match="no promoted model"):  # a scorer before the store has published one
        entrypoint.wait_for_promotion(live / "registry", timeout=0.2)
    for _ in range(2):
        entrypoint.seed_registry(StoreSettings(), ModelSettings(), seed)
    assert capsys.readouterr().out.count("installed the image's starter model as v1") == 1
    assert json.loads((live / "registry" / "promoted.json").read_text())["version"] == "v1"
    entrypoint.wait_for_promotion(live / "registry", timeout=0.2)  # returns at once now

    from rm_service.store.db import Store

    store = Store(StoreSettings())
    try:
        (rec,) = registry.list_models(store)
        assert rec.status == "promoted" and rec.artifact_path == str(live / "registry" / "v1")
        served = load_for_serving(ServeSettings(), store, ModelSettings())  # loads and checks the golden pairs
        assert served.record.version == "v1"
    finally:
        store.close()


def _compose_profile():
    spec = importlib.util.spec_from_file_location("compose_profile", DEPLOY / "compose_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_image_test_runs_compose_s_trainer_service_as_the_file_says():
    """deploy_test.py starts the policy trainer from compose.yaml itself: entrypoint, command, the
    service's environment with the token interpolated, the prompts file and ppo volume, and the
    health checks of the scorers it depends on."""
    profile = _compose_profile()
    spec = profile.service("policy-trainer")
    options, command = profile.run_arguments(spec, {"RM_TRAINER_TOKEN": "t0k"}, {"ppo": "test-ppo"}, {}, DEPLOY)
    assert command == ["ppo"]
    assert options[options.index("--entrypoint") + 1] == '["/opt/rm-service/venv/bin/policy-trainer"]'
    env = dict(options[i + 1].split("=", 1) for i, o in enumerate(options) if o == "--env")
    assert env["PPO_AUTH_TOKEN"] == "t0k" and env["PPO_REWARD_ADDRESSES"] == "scorer-1:50051,scorer-2:50051"
    mounts = [options[i + 1] for i, o in enumerate(options) if o == "--volume"]
    assert mounts[0] == "test-ppo:/var/lib/rm-service"
    prompts, target = mounts[1].split(":", 1)
    assert (
        Path(prompts) == REPO / "rm_service" / "data" / "hh_harmless_pairs.jsonl" and target == "/data/prompts.jsonl:ro"
    )
    checks = profile.healthy_dependencies(spec)
    assert set(checks) == {"scorer-1", "scorer-2"} and checks["scorer-1"][-1] == "rm.v1.RewardService"
    with pytest.raises(profile.ComposeError, match="RM_TRAINER_TOKEN"):
        profile.run_arguments(spec, {}, {"ppo": "test-ppo"}, {}, DEPLOY)  # compose's ${VAR:?...} refuses too


def test_the_image_test_s_short_trainer_run_sets_real_settings():
    from policy_trainer.settings import PPOSettings

    text = (DEPLOY / "deploy_test.py").read_text()
    block = re.search(r"TRAINER_OVERRIDES = \{(.*?)\n\}", text, re.S).group(1)
    keys = set(re.findall(r'"(PPO_\w+)"', block))
    assert keys and keys <= {f"PPO_{f}".upper() for f in PPOSettings.model_fields}
