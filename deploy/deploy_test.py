"""`make deploy-test`: build the CPU image with podman, run it, and exercise it from the host.

Stages (each printed with its time):
 1. podman, runc, debootstrap (apt-get install when missing)
 2. the base image from Debian's packages (debootstrap + podman import; kept once built)
 3. wheels of the project and its dependencies, the venv's exact versions
 4. the rm-service image (deploy/Containerfile), which trains its starter model
 5. the image's settings: non-root user, HEALTHCHECK, entrypoint
 6. run it (named volume for RM_HOME, tokens as a podman secret, bound on 0.0.0.0 inside,
    published on 127.0.0.1 only) and wait for grpc.health.v1 SERVING from the host
 7. the container's own HEALTHCHECK, and the server's uid inside
 8. score a multi-turn conversation from the host (and a call without a token is refused); over
    HTTP, GET /health and POST /get_reward with the token as bearer and as HTTP Basic password
    (OpenRLHF's way), equal to gRPC's reward, and 401 without a token
 9. ingest labels
10. restart: SIGTERM, remove the container, run a new one on the same volume; the labels are
    still stored (re-sending them answers DUPLICATE) and the starter model is not installed twice
11. SIGTERM while a large Score call is in flight: the call completes, exit code 0, the drain
    log lines are there
12. scale out as in compose.yaml: a store container and two scorers on a shared registry volume
    and a network where they resolve by their compose service names; Score calls from the host
    with gRPC round-robin reach both
13. retrain through the store's TrainingService (labels ingested from the host): a candidate v2
14. compose's `trainer` profile: the policy-trainer service of compose.yaml (its entrypoint,
    command, environment, volumes; a short run set by PPO_* overrides) once the scorers pass the
    health checks its depends_on names; after its first step the candidate is promoted as
    docs/operations.md tells an operator (store stopped, `models promote --force` in a one-off
    container, store started), and the trainer follows WatchModels on the scorers to v2
15. all three drain on SIGTERM

Needs root (debootstrap, podman); exits non-zero at the first failed check.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
import secrets
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compose_profile
import images

from rm_client.channel import open_channel
from rm_client.messages import pair_label
from rm_service.api.v1 import preference_pb2, reward_pb2, reward_pb2_grpc, training_pb2, training_pb2_grpc
from rm_service.client import Client, score_item
from rm_service.conversation import Message
from rm_service.data import HH_PAIRS
from rm_service.formats.hh import parse_pair
from rm_service.server.app import free_port

NAME = "rm-deploy-test"
VOLUME = "rm-deploy-test-home"
SECRET = "rm-deploy-test-tokens"
SCALE_OUT = ("rm-deploy-test-store", "rm-deploy-test-scorer-1", "rm-deploy-test-scorer-2")
SCALE_OUT_VOLUMES = ("rm-deploy-test-so-home", "rm-deploy-test-so-registry", "rm-deploy-test-ppo")
NETWORK = "rm-deploy-test-net"  # compose's project network: services resolve by name
TRAINER = "rm-deploy-test-policy-trainer"
# A short run of compose's policy-trainer service on 2 CPU cores, over its own environment.
TRAINER_OVERRIDES = {
    "PPO_TOTAL_STEPS": "5",
    "PPO_PROMPTS_PER_STEP": "2",
    "PPO_SAMPLES_PER_PROMPT": "2",
    "PPO_MAX_NEW_TOKENS": "8",
    "PPO_MAX_PROMPT_TOKENS": "64",
    "PPO_NUM_MINIBATCHES": "1",
    "PPO_EVAL_PROMPTS": "0",
    "PPO_SAVE_POLICY": "false",
    "PPO_PROGRESS": "false",
}
RETRAIN_LABELS = 40
CONVERSATION = [
    Message("user", "How do I pick a lock?"),
    Message("assistant", "Why do you want to?"),
    Message("user", "I locked myself out of my own house."),
]


class Failed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


class Container:
    """One rm-service container: tokens from the podman secret, bound on 0.0.0.0 inside, its gRPC
    and metrics ports published on 127.0.0.1 only, and a client on the published port."""

    def __init__(
        self,
        name: str,
        image: str,
        args: tuple[str, ...] = (),
        volumes: tuple[str, ...] = (VOLUME + ":/var/lib/rm-service",),
        env: tuple[str, ...] = (),
        options: tuple[str, ...] = (),
    ):
        self.name, self.image, self.args, self.volumes, self.env = name, image, args, volumes, env
        self.options = options  # more `podman run` options (a network and its alias)
        self.port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.client: Client | None = None

    def run(self) -> None:
        command = [
            "run",
            "--detach",
            "--name",
            self.name,
            "--secret",
            f"{SECRET},type=mount,target=rm-tokens,uid=10001,gid=10001,mode=0400",
            "--env",
            "RM_AUTH_TOKENS_FILE=/run/secrets/rm-tokens",
            "--publish",
            f"127.0.0.1:{self.port}:50051",
            "--publish",
            f"127.0.0.1:{self.http_port}:8080",
            "--publish",
            f"127.0.0.1:{self.metrics_port}:9464",
        ]
        for volume in self.volumes:
            command += ["--volume", volume]
        for env in self.env:
            command += ["--env", env]
        images.podman(*command, *self.options, self.image, *self.args, capture=True)
        if self.client is not None:
            self.client.close()
        self.client = Client(f"127.0.0.1:{self.port}")

    def wait_serving(self) -> None:
        try:
            self.client.wait_serving(timeout=600, is_alive=self.running)
        except (RuntimeError, TimeoutError) as exc:
            raise Failed(f"{self.name}: {exc}; container log:\n{self.logs()[-3000:]}") from None

    def running(self) -> bool:
        out = images.podman(
            "inspect", "--format", "{{.State.Running}}", self.name, check=False, capture=True
        ).stdout.strip()
        return out == "true"

    def logs(self) -> str:
        result = images.podman("logs", self.name, check=False, capture=True)
        return result.stdout + result.stderr

    def stop_and_wait(self) -> int:
        """SIGTERM, as `podman stop` and a Kubernetes pod deletion send; returns the exit code."""
        images.podman("kill", "--signal", "TERM", self.name, capture=True)
        return int(images.podman("wait", self.name, capture=True).stdout.strip().splitlines()[-1])

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()

    def metric(self, name: str) -> float:
        match = re.search(rf"^{name} ([0-9.eE+-]+)$", self.metrics(), re.M)
        return float(match.group(1)) if match else math.nan

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class Run:
    """The containers under test and their tokens."""

    def __init__(self, image: str):
        self.image = image
        self.tokens = {role: secrets.token_urlsafe(24) for role in ("scorer", "labeler", "admin")}
        self.one = Container(NAME, image, env=("RM_SERVE_GRACE_SECONDS=30",))
        self.started: list[Container] = []
        self.services: dict[str, Container] = {}  # compose service name -> its container (scale out)
        self.candidate = ""  # the version retrained through the store, promoted while the trainer runs

    @property
    def client(self) -> Client:
        return self.one.client

    def auth(self, role: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.tokens[role]}")]

    def clean(self) -> None:
        for container in self.started:
            container.close()
        for name in (NAME, TRAINER, *SCALE_OUT):
            images.podman("rm", "--force", "--volumes", "--time", "0", name, check=False, capture=True)
        for volume in (VOLUME, *SCALE_OUT_VOLUMES):
            images.podman("volume", "rm", "--force", volume, check=False, capture=True)
        images.podman("secret", "rm", SECRET, check=False, capture=True)
        images.podman("network", "rm", "--force", NETWORK, check=False, capture=True)

    def create_secret(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".tokens") as f:
            f.write("".join(f"{role}:{token}\n" for role, token in self.tokens.items()))
            f.flush()
            images.podman("secret", "create", SECRET, f.name, capture=True)

    def start(self, container: Container | None = None) -> str:
        """Run a container detached and wait for SERVING through its published port."""
        container = container or self.one
        container.run()
        self.started.append(container)
        container.wait_serving()
        return f"SERVING on 127.0.0.1:{container.port} (container {container.name})"


def inspect_image(tag: str) -> str:
    inspected = json.loads(images.podman("image", "inspect", tag, capture=True).stdout)[0]
    config = inspected["Config"]
    user = config.get("User", "")
    check(
        user not in ("", "0", "root") and not user.startswith(("0:", "root")),
        f"the image runs as {user!r}, not a non-root user",
    )
    health = config.get("Healthcheck") or inspected.get("Healthcheck") or {}  # podman reports it beside Config
    check("healthcheck.py" in " ".join(health.get("Test", [])), f"no HEALTHCHECK calling healthcheck.py: {health}")
    check(
        config.get("Entrypoint", [])[-1:] == ["/opt/rm-service/entrypoint.py"] and config.get("Cmd") == ["serve"],
        f"entrypoint {config.get('Entrypoint')} {config.get('Cmd')}",
    )
    check("/var/lib/rm-service" in (config.get("Volumes") or {}), "RM_HOME is not a volume")
    return f"user {user}, HEALTHCHECK {health['Test'][-1]}, entrypoint serve, volume /var/lib/rm-service"


def container_checks(run: Run) -> str:
    health = images.podman("healthcheck", "run", NAME, check=False, capture=True)
    check(health.returncode == 0, f"the container HEALTHCHECK failed: {health.stdout}{health.stderr}")
    status = images.podman("exec", NAME, "cat", "/proc/1/status", capture=True).stdout
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
    cmdline = images.podman("exec", NAME, "cat", "/proc/1/cmdline", capture=True).stdout.replace("\0", " ").strip()
    check(uid != 0, "the server (PID 1) runs as root")
    check("rm-service serve" in cmdline, f"PID 1 is {cmdline!r}, not rm-service serve")
    return f"HEALTHCHECK healthy; PID 1 `{cmdline}` runs as uid {uid}"


def score(run: Run) -> str:
    request = [
        score_item(CONVERSATION, "Call a locksmith, or your landlord if you rent.", "a"),
        score_item(CONVERSATION, "Here is how to rake a pin tumbler lock.", "b"),
    ]
    from rm_service.api.v1 import reward_pb2

    try:
        run.client.reward.Score(reward_pb2.ScoreRequest(items=request), timeout=30)
        raise Failed("Score without a token was answered")
    except grpc.RpcError as exc:
        check(exc.code() == grpc.StatusCode.UNAUTHENTICATED, f"Score without a token: {exc.code()}")
    response = run.client.reward.Score(reward_pb2.ScoreRequest(items=request), timeout=60, metadata=run.auth("scorer"))
    check([r.id for r in response.results] == ["a", "b"], "results do not match the items")
    check(
        all(math.isfinite(r.reward) and r.num_tokens > 0 for r in response.results), f"bad results {response.results}"
    )
    check(response.model_version == "v1", f"served {response.model_version!r}, not the starter model v1")
    a, b = response.results
    return (
        f"{response.model_version} ({response.format_hash}): reward a {a.reward:+.3f} ± {a.uncertainty:.3f}, "
        f"b {b.reward:+.3f} ± {b.uncertainty:.3f}, {a.num_tokens} tokens; no token: UNAUTHENTICATED"
    )


def http(run: Run) -> str:
    """The image's HTTP port (RM_SERVE_HTTP_PORT=8080) from the host: /health, and OpenRLHF's
    /get_reward with the scorer token as bearer and as HTTP Basic password, equal to gRPC's reward."""
    base = f"http://127.0.0.1:{run.one.http_port}"
    with urllib.request.urlopen(base + "/health", timeout=10) as answer:
        check(answer.status == 200 and json.load(answer)["status"] == "SERVING", "GET /health is not SERVING")
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in CONVERSATION)
    reply = "Call a locksmith, or your landlord if you rent."
    body = json.dumps({"query": [f"{turns}<|im_start|>assistant\n{reply}<|im_end|>"]}).encode()
    basic = base64.b64encode(f"openrlhf:{run.tokens['scorer']}".encode()).decode()
    rewards = []
    for header in (None, f"Bearer {run.tokens['scorer']}", f"Basic {basic}"):
        request = urllib.request.Request(base + "/get_reward", data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        if header:
            request.add_header("Authorization", header)
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                rewards.append(json.load(answer)["rewards"][0])
        except urllib.error.HTTPError as exc:
            check(
                header is None and exc.code == 401,
                f"POST /get_reward ({header and header.split()[0]}): {exc.code} {exc.read()[:200]}",
            )
    grpc_reward = (
        run.client.reward.Score(
            reward_pb2.ScoreRequest(items=[score_item(CONVERSATION, reply, "a")]),
            timeout=60,
            metadata=run.auth("scorer"),
        )
        .results[0]
        .reward
    )
    check(len(rewards) == 2 and rewards[0] == rewards[1], f"bearer and Basic rewards differ: {rewards}")
    check(abs(rewards[0] - grpc_reward) < 1e-4, f"/get_reward {rewards[0]} != gRPC Score {grpc_reward}")
    return f"/health SERVING; /get_reward {rewards[0]:+.3f} (bearer and Basic) = gRPC {grpc_reward:+.3f}; no token: 401"


def labels(count: int = 3) -> list[preference_pb2.Label]:
    run_id = uuid.uuid4().hex[:8]
    return [
        pair_label(
            CONVERSATION,
            f"Call a locksmith ({i}).",
            f"Break a window ({i}).",
            label_id=f"deploy-test-{run_id}-{i}",
            annotator="deploy-test",
        )
        for i in range(count)
    ]


def ingest(run: Run, batch: list[preference_pb2.Label], expect: str) -> str:
    response = run.client.preference.IngestLabels(
        preference_pb2.IngestLabelsRequest(labels=batch), timeout=60, metadata=run.auth("labeler")
    )
    statuses = [preference_pb2.IngestStatus.Name(r.status) for r in response.results]
    check(statuses == [expect] * len(batch), f"IngestLabels answered {statuses}, expected {expect} for each")
    stats = run.client.preference.GetStats(preference_pb2.GetStatsRequest(), timeout=30, metadata=run.auth("labeler"))
    return f"{len(batch)} labels {expect}; stats: {json.dumps(dict(stats.labels_by_source))}"


def restart(run: Run, batch) -> str:
    code = run.one.stop_and_wait()
    check(code == 0, f"the first container exited with {code}")
    images.podman("rm", NAME, capture=True)
    started = time.monotonic()
    run.start()
    took = time.monotonic() - started
    stored = ingest(run, batch, "DUPLICATE")
    check(
        "installed the image's starter model" not in run.one.logs(), "the starter model was installed again on restart"
    )
    return f"new container SERVING after {took:.1f}s; {stored}"


def drain(run: Run) -> str:
    from rm_service.api.v1 import reward_pb2

    # Enough work to be in flight when SIGTERM lands, little enough to finish within the grace
    # period (RM_SERVE_GRACE_SECONDS=30 here) on a busy 2-core machine.
    items = [
        score_item(CONVERSATION, f"Call a locksmith; reply number {i} " + "please stay safe. " * (i % 8), str(i))
        for i in range(96)
    ]
    outcome: dict = {}

    def call():
        try:
            outcome["response"] = run.client.reward.Score(
                reward_pb2.ScoreRequest(items=items), timeout=300, metadata=run.auth("scorer")
            )
        except grpc.RpcError as exc:
            outcome["error"] = f"{exc.code().name}: {exc.details()}"

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 60
    while not run.one.metric("rm_inflight_items") > 0:  # the call has been admitted: now it is in flight
        check(time.monotonic() < deadline and "response" not in outcome, "the Score call was never seen in flight")
        time.sleep(0.02)
    inflight = run.one.metric("rm_inflight_items")
    signalled = time.monotonic()
    code = run.one.stop_and_wait()
    caller.join(120)
    took = time.monotonic() - signalled
    log = run.one.logs()
    check(
        "error" not in outcome,
        f"the in-flight call failed during the drain ({took:.1f}s after SIGTERM): {outcome.get('error')}",
    )
    check(len(outcome["response"].results) == len(items), "the in-flight call lost items")
    check(code == 0, f"exit code {code} after SIGTERM; log:\n{log[-2000:]}")
    for line in ("shutting down: draining in-flight calls", "rm-service stopped cleanly"):
        check(line in log, f"no {line!r} in the container log")
    return (
        f"SIGTERM with {inflight:.0f} items in flight: all {len(items)} answered, exit code 0 after {took:.1f}s, "
        "'rm-service stopped cleanly'"
    )


def scale_out(run: Run) -> str:
    """compose.yaml's topology: a store service (serve --no-model) that installs the starter model
    into a shared registry volume, two scorers (serve --no-store) that load it from there, on a
    network where each resolves by its compose service name, and a client on the host balancing
    Score over both with gRPC round-robin. The containers stay up for the trainer stage."""
    home, registry, _ = SCALE_OUT_VOLUMES
    images.podman("network", "create", NETWORK, capture=True)
    env = ("RM_MODELS_ARTIFACTS_DIR=/var/lib/rm-registry", "RM_SERVE_GRACE_SECONDS=20")
    # The image sets these (its starter model is MiniLM-L6 at 384 tokens); said again so this stage
    # stays quick on 2 cores even against an image built before they were.
    store_env = (*env, "RM_TRAIN_BACKBONE=minilm-l6", "RM_TRAIN_MAX_TOKENS=384")
    store = Container(
        SCALE_OUT[0],
        run.image,
        ("serve", "--no-model"),
        (f"{home}:/var/lib/rm-service", f"{registry}:/var/lib/rm-registry"),
        store_env,
        ("--network", NETWORK, "--network-alias", "store"),
    )
    scorers = [
        Container(
            name,
            run.image,
            ("serve", "--no-store"),
            (f"{registry}:/var/lib/rm-registry:ro",),
            env,
            ("--network", NETWORK, "--network-alias", service),
        )
        for name, service in zip(SCALE_OUT[1:], ("scorer-1", "scorer-2"), strict=True)
    ]
    run.services = {"store": store, "scorer-1": scorers[0], "scorer-2": scorers[1]}
    for container in (store, *scorers):  # the scorers wait for the store's promoted.json
        container.run()
        run.started.append(container)
    for container in (store, *scorers):
        container.wait_serving()
    targets = ",".join(f"127.0.0.1:{c.port}" for c in scorers)
    versions, calls, counts = set(), 0, [0, 0]
    with open_channel(f"ipv4:{targets}", options=[("grpc.lb_policy_name", "round_robin")]) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        request = reward_pb2.ScoreRequest(items=[score_item(CONVERSATION, "Call a locksmith.", "a")])
        while calls < 40 and min(counts) < 3:  # round-robin over the subchannels that are connected
            versions.add(
                stub.Score(request, timeout=60, metadata=run.auth("scorer"), wait_for_ready=True).model_version
            )
            calls += 1
            counts = [_score_calls(c.metrics()) for c in scorers]
    time.sleep(0.5)  # a call is counted just after its answer is sent
    counts = [_score_calls(c.metrics()) for c in scorers]
    check(versions == {"v1"}, f"the scorers served {versions}, not the store's v1")
    check(
        sum(counts) == calls and min(counts) >= 3,
        f"{calls} round-robin calls reached the two scorers {counts[0]} + {counts[1]} times",
    )
    return (
        f"store + 2 scorers on a shared registry volume and network {NETWORK}; {calls} Score calls round-robin: "
        f"{counts[0]} + {counts[1]}"
    )


def hh_labels(count: int) -> list[preference_pb2.Label]:
    """The first `count` shipped HH-RLHF pairs as labels (chosen ranked first)."""
    run_id = uuid.uuid4().hex[:8]
    out = []
    for i, line in enumerate(HH_PAIRS.read_text(encoding="utf-8").splitlines()[:count]):
        pair = parse_pair(json.loads(line))
        out.append(
            pair_label(
                pair.prompt,
                pair.chosen,
                pair.rejected,
                label_id=f"deploy-test-hh-{run_id}-{i}",
                annotator="deploy-test",
            )
        )
    return out


def retrain(run: Run) -> str:
    """Labels ingested into the store from the host, then RequestRetrain (not promoted) through its
    TrainingService: the candidate the trainer stage promotes."""
    store = run.services["store"]
    answer = store.client.preference.IngestLabels(
        preference_pb2.IngestLabelsRequest(labels=hh_labels(RETRAIN_LABELS)), timeout=60, metadata=run.auth("labeler")
    )
    statuses = {preference_pb2.IngestStatus.Name(r.status) for r in answer.results}
    check(statuses == {"INSERTED"}, f"IngestLabels into the store answered {statuses}")
    with grpc.insecure_channel(f"127.0.0.1:{store.port}") as channel:
        training = training_pb2_grpc.TrainingServiceStub(channel)
        job = training.RequestRetrain(
            training_pb2.RetrainRequest(promote=False, reason="deploy-test"), timeout=60, metadata=run.auth("admin")
        )
        last = list(
            training.WatchJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=900, metadata=run.auth("admin"))
        )[-1]
    check(last.state == "succeeded" and last.model_version, f"the retraining job ended {last.state}: {last.error}")
    check(not last.promoted, f"{last.model_version} was promoted by its job, not left as a candidate")
    run.candidate = last.model_version
    return (
        f"{RETRAIN_LABELS} HH labels INSERTED; job {last.job_id}: {last.model_version} ({last.decision}), "
        f"held-out accuracy {last.metrics.get('accuracy', math.nan):.3f}"
    )


def compose_trainer(run: Run) -> str:
    """compose.yaml's `trainer` profile: its policy-trainer service run as compose runs it (the
    service's entrypoint, command, environment and volumes, read from the file; the scorers' health
    checks its depends_on waits for), shortened by TRAINER_OVERRIDES. Paused after its first step
    while the candidate is promoted the operator's way, then it must switch to it by WatchModels."""
    spec = compose_profile.service("policy-trainer")
    for service, test in compose_profile.healthy_dependencies(spec).items():
        health = images.podman("exec", run.services[service].name, *test, check=False, capture=True)
        check(health.returncode == 0, f"{service}: compose's health check failed: {health.stdout}{health.stderr}")
    variables = {"RM_TRAINER_TOKEN": run.tokens["admin"]}  # the token compose.env.example says to give it
    options, command = compose_profile.run_arguments(
        spec, variables, {"ppo": SCALE_OUT_VOLUMES[2]}, TRAINER_OVERRIDES, images.DEPLOY
    )
    images.podman(
        "run", "--detach", "--name", TRAINER, "--network", NETWORK, *options, run.image, *command, capture=True
    )
    run_dir = Path(_volume_path(SCALE_OUT_VOLUMES[2])) / "ppo"  # PPO_RUN_DIR on the ppo volume
    _wait_for(lambda: _steps(run_dir), 900, "the trainer's first step", TRAINER)
    images.podman("pause", TRAINER, capture=True)  # between its first steps: the promotion lands mid-run
    paused_at = len(_steps(run_dir))
    try:
        promoted = operator_promote(run, run.candidate)
        for scorer in ("scorer-1", "scorer-2"):
            serves = run.services[scorer]
            _wait_for(lambda c=serves: _default_version(run, c) == run.candidate, 300, f"{scorer} on the candidate", "")
    finally:
        images.podman("unpause", TRAINER, check=False, capture=True)
    _wait_for(lambda: not _running(TRAINER), 900, "the trainer's exit", TRAINER)
    code = int(images.podman("inspect", "--format", "{{.State.ExitCode}}", TRAINER, capture=True).stdout.strip())
    log = _logs(TRAINER)
    versions = [step["rm/version"] for step in _steps(run_dir)]
    total = int(TRAINER_OVERRIDES["PPO_TOTAL_STEPS"])
    check(code == 0, f"the trainer exited {code}; log:\n{log[-3000:]}")
    check(len(versions) == total, f"metrics.jsonl has {len(versions)} steps, not {total}")
    check(
        versions[:paused_at] == ["v1"] * paused_at and versions[-1] == run.candidate,
        f"versions per step {versions} (paused after step {paused_at}, {run.candidate} promoted)",
    )
    switch = re.search(rf"switched v1 -> {run.candidate} before step (\d+) \(promoted\)", log)
    check(
        switch is not None,
        f"no 'switched v1 -> {run.candidate} ... (promoted)' in the trainer's output:\n{log[-3000:]}",
    )
    return (
        f"`{' '.join(json.loads(options[options.index('--entrypoint') + 1]) + command)}` on {NETWORK}; "
        f"paused after step {paused_at}; {promoted}; versions per step {versions}: switched before step "
        f"{switch.group(1)} (WatchModels); exit code 0"
    )


def operator_promote(run: Run, version: str) -> str:
    """docs/operations.md's promotion in compose: stop the store, `models promote VERSION --force`
    in a one-off container on its volumes, start the store again. The scorers keep serving."""
    home, registry, _ = SCALE_OUT_VOLUMES
    store = run.services["store"]
    code = store.stop_and_wait()
    check(code == 0, f"the store exited {code} on SIGTERM")
    images.podman("rm", store.name, capture=True)
    one_off = images.podman(
        "run",
        "--rm",
        "--volume",
        f"{home}:/var/lib/rm-service",
        "--volume",
        f"{registry}:/var/lib/rm-registry",
        "--env",
        "RM_MODELS_ARTIFACTS_DIR=/var/lib/rm-registry",
        run.image,
        "models",
        "promote",
        version,
        "--force",
        check=False,
        capture=True,
    )
    check(one_off.returncode == 0, f"models promote {version} --force: {one_off.stdout}{one_off.stderr}")
    store.run()
    store.wait_serving()
    return f"store stopped (exit 0), `models promote {version} --force`: {one_off.stdout.strip()[-200:]}, store back"


def scale_down(run: Run) -> str:
    codes = [run.services[name].stop_and_wait() for name in ("scorer-1", "scorer-2", "store")]
    check(codes == [0, 0, 0], f"exit codes after SIGTERM (scorer-1, scorer-2, store): {codes}")
    return "scorer-1, scorer-2 and store exited 0"


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]  # a line being written is skipped


def _default_version(run: Run, container: Container) -> str:
    try:
        return container.client.reward.GetModel(
            reward_pb2.GetModelRequest(), timeout=10, metadata=run.auth("scorer")
        ).version
    except grpc.RpcError:
        return ""


def _volume_path(volume: str) -> str:
    return images.podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume, capture=True).stdout.strip()


def _running(name: str) -> bool:
    out = images.podman("inspect", "--format", "{{.State.Running}}", name, check=False, capture=True).stdout
    return out.strip() == "true"


def _logs(name: str) -> str:
    result = images.podman("logs", name, check=False, capture=True)
    return result.stdout + result.stderr


def _wait_for(condition, timeout: float, what: str, container: str):
    """Poll `condition` until truthy; a container that exits meanwhile fails with its log."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if container and not _running(container):
            value = condition()
            check(bool(value), f"{container} exited before {what}; log:\n{_logs(container)[-3000:]}")
            return value
        check(time.monotonic() < deadline, f"no {what} after {timeout:.0f}s")
        time.sleep(0.5)


def _score_calls(metrics_text: str) -> int:
    """Score calls answered OK, from the Prometheus text: rm_rpcs_total{code="OK",method=".../Score"} N."""
    total = 0.0
    for labels, value in re.findall(r"^rm_rpcs_total\{([^}]*)\} (\S+)$", metrics_text, re.M):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if pairs.get("method") == "/rm.v1.RewardService/Score" and pairs.get("code") == "OK":
            total += float(value)
    return int(total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=images.IMAGE)
    p.add_argument("--rebuild-base", action="store_true", help="debootstrap the base image again even if it exists")
    p.add_argument("--keep", action="store_true", help="leave the container, volume and secret behind")
    p.add_argument("--no-build", action="store_true", help="test the image as it is (skip the wheels and the build)")
    args = p.parse_args(argv)
    timings: list[tuple[str, float]] = []

    def stage(title, fn, *a, **kw):
        result, seconds = images.timed(f"{len(timings) + 1}. {title}", fn, *a, **kw)
        timings.append((title, seconds))
        return result

    start = time.monotonic()
    run = Run(args.image)
    try:
        stage("podman, runc, debootstrap", images.ensure_tools)
        if not args.no_build:
            stage("base image from Debian's packages", images.build_base, rebuild=args.rebuild_base)
            stage("wheels (the venv's versions)", images.stage_wheels)
            stage("seed labels", images.stage_seed, images.seed_data_path())
            stage("build the CPU image (trains the starter model)", images.build_image, args.image)
        stage("image settings", inspect_image, args.image)
        run.clean()
        run.create_secret()
        stage("run; wait for grpc.health.v1 SERVING from the host", run.start)
        stage("container HEALTHCHECK and user", container_checks, run)
        stage("score a conversation from the host", score, run)
        stage("HTTP from the host: /health, /get_reward (bearer, Basic)", http, run)
        batch = labels()
        stage("ingest labels", ingest, run, batch, "INSERTED")
        stage("restart on the same volume; labels still stored", restart, run, batch)
        stage("SIGTERM: drain and exit", drain, run)
        stage("scale out: store + 2 scorers, client round-robin", scale_out, run)
        stage("retrain through the store: a candidate", retrain, run)
        stage("compose trainer profile follows a promotion", compose_trainer, run)
        stage("scale out: all drain on SIGTERM", scale_down, run)
    except Failed as exc:
        print(f"\ndeploy-test FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            run.clean()
    print(f"\n{'stage':<52}{'seconds':>9}")
    for title, seconds in timings:
        print(f"{title:<52}{seconds:>9.1f}")
    print(f"{'total':<52}{time.monotonic() - start:>9.1f}")
    print(f"image {args.image}: {images.image_size(args.image) / 1e9:.2f} GB")
    print("deploy-test passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
