"""Fixtures: tiny models built from configs, stores in temp dirs, real servers on port 0."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "clients" / "python"
# This checkout's code comes first, its rm_service and its light client (rm_client): in this
# process and in every server, CLI, tool and bench script the tests start (a script's own
# folder, tools/ or bench/, is what Python puts first otherwise), whatever the environment
# has installed.
sys.path.insert(0, str(CLIENT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(CLIENT), os.environ.get("PYTHONPATH")]))
from rm_service.data import HH_PAIRS as HH_FILE  # noqa: E402  (after this checkout is put first on the path)

# The servers the tests start batch within a fixed token budget (the default, 0, measures one at start:
# server.budget), so which items share a batch does not depend on the machine's speed; tests/test_budget.py
# runs the measurement.
os.environ.setdefault("RM_SERVE_MAX_BATCH_TOKENS", "2048")

pytest_plugins = ["timing"]  # the suite's time budget (tests/timing.py)

# pytest-xdist workers (make test-fast) share the cores: each worker's torch, and every server, trainer and
# subprocess it starts, gets its share of them (cores // workers, at least one) instead of all of them each,
# which made two workers' threads wait on one another. Measured under the CPU lock on this 2-core machine, six
# of the heaviest default-tier modules in 2 workers: 75 s wall with 2 threads each, 62.5 s with 1.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    for var in ("OMP_NUM_THREADS", "RM_SERVE_TORCH_THREADS", "PPO_TORCH_THREADS"):
        os.environ.setdefault(var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))
    import torch  # here and in the fixtures, not at the top: xdist's controller starts its workers 1.3 s sooner

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# socketserver's serve_forever notices shutdown() only at its next poll, every 0.5 s by default, and
# prometheus_client serves /metrics (on in most test servers) and tests/openai_server.py its API with
# it: every server stop in the suite waited ~0.5 s for that poll. Polled every 50 ms in this process.
socketserver.BaseServer.serve_forever.__defaults__ = (0.05,)

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def hh_lines(n: int | None = None) -> list[str]:
    lines = [line for line in HH_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:n] if n else lines


def store_with_hh(tmp_path: Path, n: int):
    """A Store (under RM_HOME) holding the first n lines of the shared HH file as labels."""
    from rm_service.formats import import_file
    from rm_service.settings import StoreSettings
    from rm_service.store.db import Store

    small = tmp_path / f"hh{n}.jsonl"
    small.write_text("".join(HH_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    store = Store(StoreSettings())
    import_file(store, small, "hh")
    return store


def _tiny_tokenizer():
    """A real byte-level BPE tokenizer trained on HH text, with a chat template and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [json.loads(line)["chosen"] for line in hh_lines(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama_config(vocab_size: int, pad_id: int, **kw):
    from transformers import LlamaConfig

    sizes = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    }
    return LlamaConfig(vocab_size=vocab_size, pad_token_id=pad_id, **{**sizes, **kw})


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A TRL-style reward checkpoint: LlamaForSequenceClassification, num_labels=1."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-rm")
    model = LlamaForSequenceClassification(
        _llama_config(len(tiny_tokenizer), tiny_tokenizer.pad_token_id, num_labels=1)
    )
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A plain causal backbone (LlamaModel) for head-mode training."""
    import torch
    from transformers import LlamaModel

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-backbone")
    model = LlamaModel(_llama_config(len(tiny_tokenizer), tiny_tokenizer.pad_token_id))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny causal LM (LlamaForCausalLM) with the chat-template tokenizer: policy or judge."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("tiny-lm")
    config = _llama_config(
        len(tiny_tokenizer),
        tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A tiny BERT cross-encoder with the bundled MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rm_service.models.resolver import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("minilm-l6"))
    import torch

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("tiny-encoder")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def preferred_tokens(tokenizer) -> list[int]:
    return sorted(i for text, i in tokenizer.get_vocab().items() if text.startswith("Ġt"))


def build_property_rm(tokenizer, path: Path, sign: float = 1.0) -> Path:
    """A TRL-style reward checkpoint whose score is sign x an increasing function of the
    share of tokens that are words starting with "t" (see tests/test_ppo_e2e.py)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tiny_tokenizer = tokenizer

    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=tiny_tokenizer.pad_token_id,
        num_labels=1,
    )
    model = LlamaForSequenceClassification(config)
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, 1:] = 1.0
        model.model.embed_tokens.weight[preferred_tokens(tiny_tokenizer), 0] = 1.0
        layer = model.model.layers[0]
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        layer.self_attn.v_proj.weight[0, 0] = 1.0
        layer.self_attn.o_proj.weight[0, 0] = 10.0
        model.score.weight[0, 0] = sign
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def property_rm_dir(tmp_path_factory, tiny_tokenizer):
    """Prefers replies with many words starting with "t"."""
    return build_property_rm(tiny_tokenizer, tmp_path_factory.mktemp("property-rm"))


@pytest.fixture(scope="session")
def antiproperty_rm_dir(tmp_path_factory, tiny_tokenizer):
    """The opposite preference: a gold model the property model disagrees with."""
    return build_property_rm(tiny_tokenizer, tmp_path_factory.mktemp("antiproperty-rm"), sign=-1.0)


TOPICS = ["river", "bread", "music", "garden", "winter", "ocean", "chess", "coffee", "moon", "paper", "horse", "city"]
QUESTIONS = ["Say something about {}.", "Describe {}.", "Why {}?"]


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [json.dumps({"prompt": [{"role": "user", "content": q.format(t)}]}) for t in TOPICS for q in QUESTIONS]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_settings(tiny_lm_dir, prompts_file, address, run_dir, **kw):
    """PPOSettings of a short CPU run of the tiny policy against `address`."""
    from policy_trainer import PPOSettings

    base = dict(
        policy=str(tiny_lm_dir),
        prompts_file=prompts_file,
        reward_addresses=[address],
        run_dir=run_dir,
        total_steps=12,
        prompts_per_step=8,
        samples_per_prompt=4,
        max_new_tokens=12,
        learning_rate=1e-2,
        kl_coef=0.2,
        update_epochs=2,
        num_minibatches=2,
        eval_prompts=6,
        progress=False,
        follow_models=False,
        seed=0,
        device="cpu",
    )
    return PPOSettings(**{**base, **kw})


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory) -> Iterator[Path]:
    """What every test runs in, `home` or not: an RM_HOME of this session (of this pytest-xdist worker
    under `-n`), never the checkout's ./var that other sessions and workers share (stores, precision
    cache, models cache); and servers' /metrics on a free port (RM_SERVE_METRICS_PORT=0) instead of
    9464, which only one of the servers running at once could have. Subprocesses inherit both."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("session-home")
        mp.setenv("RM_HOME", str(path))
        mp.setenv("RM_SERVE_METRICS_PORT", "0")
        yield path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh RM_HOME: store, registry and caches under a temp dir."""
    monkeypatch.setenv("RM_HOME", str(tmp_path / "home"))
    for var in ("RM_STORE_PATH", "RM_MODELS_ARTIFACTS_DIR", "RM_MODELS_CACHE_DIR", "RM_SERVE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def run_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `rm-service ARGS`, run in this process through
    `rm_service.cli.main` (what the console script calls): a CLI case pays no interpreter start.
    A case that needs what only a process shows (its exit status to a shell, every line on its
    stderr, logs included) starts `python -m rm_service.cli` instead, as test_cli does once."""
    from rm_service.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    out = capsys.readouterr()
    return code, out.out, out.err


def lapse_leases(srv) -> int:
    """The lease clock moved on instead of slept through: every leased task of the server's store
    gets a lease that expired a second ago (the store compares lease_expires_at with now()).
    Returns how many leases lapsed."""
    with srv.server.store._lock:  # the server's connection: take its lock, as the server does
        return srv.server.store.con.execute(
            "UPDATE tasks SET lease_expires_at = now() - INTERVAL 1 SECOND WHERE state = 'leased'"
        ).fetchall()[0][0]


def wait_until(condition, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


class Stall:
    """Wraps a real backend: every batch waits until `release()` (at once when made with
    stalled=False) and is recorded, so tests count what reached the model."""

    def __init__(self, backend, stalled: bool = True):
        self.backend, self.pad_id = backend, backend.pad_id
        self.gate = threading.Event()
        if not stalled:
            self.gate.set()
        self.batches: list[int] = []  # rows of each batch that reached the model
        self.shapes: list[tuple[int, int]] = []  # (rows, width) of each batch
        self.lengths: list[list[int]] = []  # tokens of each row of each batch

    def run_collated(self, batch):
        rows, width = batch["input_ids"].shape
        self.batches.append(int(rows))
        self.shapes.append((int(rows), int(width)))
        self.lengths.append(batch["attention_mask"].sum(dim=1).tolist())
        self.gate.wait(30)
        return self.backend.run_collated(batch)

    def release(self):
        self.gate.set()


class ServerThread:
    """A real RewardServer on port 0, run on an event loop in a background thread."""

    def __init__(self, serve_settings, store_settings=None, models=None, train=None, security=None):
        from rm_service.server.app import RewardServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = RewardServer(serve_settings, store_settings, models, security=security, train=train)
        self.port = self._call(self.server.start(), timeout=300)
        self.address = f"127.0.0.1:{self.port}"

    def _call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self._call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def stalled_server(home, tiny_rm_dir):
    """stalled_server(stalled=True, **settings) -> (server, stub, stall, runtime): a real server
    with the tiny model behind a Stall (store off, metrics off); all stopped after the test."""
    import grpc

    from rm_service.api.v1 import reward_pb2_grpc
    from rm_service.settings import ServeSettings

    made = []

    def make(stalled: bool = True, **settings):
        srv = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), with_store=False, metrics_port=-1, **settings))
        served = srv.server.served.get()
        stall = served.backend = Stall(served.backend, stalled)
        channel = grpc.insecure_channel(srv.address)
        made.append((srv, channel, stall))
        return srv, reward_pb2_grpc.RewardServiceStub(channel), stall, served.runtime

    yield make
    for srv, channel, stall in made:
        stall.release()
        channel.close()
        srv.stop()


@pytest.fixture
def preference(home):
    """A store server without a model on port 0: (PreferenceService stub, the ServerThread)."""
    import grpc

    from rm_service.api.v1 import preference_pb2_grpc
    from rm_service.settings import ServeSettings

    srv = ServerThread(ServeSettings(port=0, with_model=False))
    channel = grpc.insecure_channel(srv.address)
    yield preference_pb2_grpc.PreferenceServiceStub(channel), srv
    channel.close()
    srv.stop()


@pytest.fixture
def server(home, tiny_rm_dir):
    """The server with the tiny TRL-style checkpoint and a store in the temp home."""
    from rm_service.settings import ServeSettings

    srv = ServerThread(ServeSettings(port=0, model=str(tiny_rm_dir), precision="fp32"))
    yield srv
    srv.stop()


# --- fixtures shared by several test modules -----------------------------------------------------


@pytest.fixture
def llm(tiny_lm_dir):
    """The OpenAI-compatible server (tests/openai_server.py) serving the tiny LM as "tiny-judge"."""
    from openai_server import OpenAIServer

    server = OpenAIServer(tiny_lm_dir)
    yield server
    server.stop()


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA and a server (127.0.0.1, localhost) and client certificate signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        d,
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=rm-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    exts = {
        "server": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, ext in exts.items():
        (d / f"{name}.ext").write_text(ext + "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n")
        _openssl(d, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=rm-test-{name}")
        _openssl(
            d,
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
        )
    return d


def peer(name: str, module: str):
    """A peer's own released package (`make install` puts it with pip --target into .venv/peers/NAME,
    without its heavy dependencies), imported: its folder goes last on sys.path, so the venv's own
    packages win and the folder adds only what the venv lacks. Skips, naming the fix, when absent."""
    folder = peer_folder(name)
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    fix = "make peers-verl" if name == "verl-0.9" else "make install"  # verl 0.9 pulls ray: not in install
    return pytest.importorskip(module, reason=f"{name} is not installed in {folder}: run `{fix}`")


def peer_folder(name: str) -> Path:
    return Path(sys.prefix) / "peers" / name


def store_at_version(path: Path, version: int):
    """An open DuckDB connection to a store written at schema `version` (migrations 1..version
    applied and recorded), for tests that an older file migrates on open."""
    import duckdb

    from rm_service.store import schema

    con = duckdb.connect(str(path))
    schema.current_version(con)
    for number, sql in enumerate(schema.MIGRATIONS[:version], start=1):
        con.execute(sql)
        con.execute("INSERT INTO schema_version (version) VALUES (?)", [number])
    return con
