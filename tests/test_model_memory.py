"""Serving memory: a loaded version holds one copy of its weights in the precision served
(bytes counted on config-built models), a hot-swap releases what must go before it loads and
peaks at most at the old plus the new version, a load over the cap is refused with the
figures, and a failed load is retried with backoff and reported in /health and the metrics."""

from __future__ import annotations

import gc
import re
import shutil
import time
import weakref

import grpc
import httpx
import pytest
import torch
from conftest import ServerThread, store_with_hh, wait_until

from rm_service import registry
from rm_service.api.v1 import reward_pb2, reward_pb2_grpc
from rm_service.conversation import Message
from rm_service.models.memory import estimate_load, safetensors_parameters
from rm_service.models.reward_model import CheckpointRewardModel
from rm_service.server.models import Target, load_for_serving
from rm_service.settings import ModelSettings, ServeSettings, TrainSettings
from rm_service.train.run import train


def tensor_bytes(module: torch.nn.Module) -> int:
    """numel x element size over the module's parameters and buffers: one copy, as it is held."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_served_checkpoint_holds_one_copy_of_its_weights(home, tiny_rm_dir, precision):
    served = load_for_serving(
        ServeSettings(model=str(tiny_rm_dir), precision=precision, device="cpu", with_store=False),
        None,
        ModelSettings(),
        Target(external=str(tiny_rm_dir)),
    )
    runtime = served.runtime
    runtime.run(
        [runtime.format([Message("user", "Hi.")], "Hello there.")], 1024
    )  # inference used to make a bf16 copy beside fp32
    parameters = safetensors_parameters(tiny_rm_dir.glob("*.safetensors"))
    size = {"fp32": 4, "bf16": 2}[precision]
    model = runtime.inference_model()
    assert model is runtime.model  # no second module
    assert {p.dtype for p in model.parameters()} == {torch.float32 if precision == "fp32" else torch.bfloat16}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert served.weight_bytes == parameters * size + buffers == tensor_bytes(model)
    assert served.measure().weight_bytes == served.weight_bytes  # scoring made no copy


def test_an_external_checkpoint_loads_and_checks_parity_with_one_copy_of_its_weights(home, tiny_rm_dir):
    """A checkpoint from elsewhere, served in bf16: its load check scores the fp32 reference on the
    host, then casts and scores the served copy. At every forward of the load and of serving, the
    live checkpoint modules hold one copy of the weights (bytes of every live CheckpointRewardModel
    counted), never a bf16 copy beside the fp32 weights (~6 bytes per parameter)."""
    gc.collect()
    before = {id(m) for m in gc.get_objects() if isinstance(m, CheckpointRewardModel)}
    seen: list[tuple[torch.dtype, int, int]] = []  # (weight dtype, live modules, their bytes) at each forward

    def count(module, args):
        if isinstance(module, CheckpointRewardModel):
            live = [m for m in gc.get_objects() if isinstance(m, CheckpointRewardModel) and id(m) not in before]
            seen.append((next(module.classifier.parameters()).dtype, len(live), sum(map(tensor_bytes, live))))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        served = load_for_serving(
            ServeSettings(model=str(tiny_rm_dir), precision="bf16", device="cpu", with_store=False),
            None,
            ModelSettings(),
            Target(external=str(tiny_rm_dir)),
        )
        served.runtime.run([served.runtime.format([Message("user", "Hi.")], "Hello there.")], 1024)
    finally:
        hook.remove()
    parameters = safetensors_parameters(tiny_rm_dir.glob("*.safetensors"))
    dtypes = [dtype for dtype, _, _ in seen]
    first_bf16 = dtypes.index(torch.bfloat16)
    assert dtypes == [torch.float32] * first_bf16 + [torch.bfloat16] * (len(seen) - first_bf16)  # reference first
    assert first_bf16 == 3  # the three built-in items, one at a time, in fp32
    assert all(live == 1 for _, live, _ in seen)  # one module: no copy made for the served precision
    fp32_bytes = {b for dtype, _, b in seen if dtype == torch.float32}
    bf16_bytes = {b for dtype, _, b in seen if dtype == torch.bfloat16}
    assert len(fp32_bytes) == 1 and fp32_bytes.pop() >= parameters * 4
    assert bf16_bytes == {served.weight_bytes} and served.weight_bytes < parameters * 4  # then only bf16


@pytest.fixture
def three_versions(home, tmp_path, tiny_backbone_dir):
    """v1, v2, v3 trained (head mode) on the tiny backbone with different seeds; v1 promoted."""
    store = store_with_hh(tmp_path, 40)
    settings = TrainSettings(
        backbone=str(tiny_backbone_dir), ensemble_size=2, max_tokens=128, promote=False, export_onnx="off"
    )
    for seed in range(3):
        train(store, settings.model_copy(update={"seed": seed}), ModelSettings(), show_progress=False)
    registry.promote(store, "v1")
    records = {v: registry.get_model(store, v) for v in ("v1", "v2", "v3")}
    store.close()
    return records


def _serve(**settings) -> ServerThread:
    base = dict(port=0, with_store=False, watch_interval_s=0.05, metrics_port=0, http_port=0, precision="bf16")
    return ServerThread(ServeSettings(**{**base, **settings}))


def _metric(srv: ServerThread, name: str, labels: str = "") -> float:
    text = httpx.get(f"http://127.0.0.1:{srv.server.metrics_port}/metrics").text
    match = re.search(rf"^{name}{re.escape(labels)} ([0-9.eE+-]+)$", text, re.M)
    return float(match.group(1)) if match else float("nan")


def test_a_swap_releases_the_oldest_before_loading_and_peaks_at_old_plus_new(three_versions):
    records = three_versions
    srv = _serve(max_loaded=2)
    try:
        served = srv.server.served
        v1_bytes = served.versions["v1"].weight_bytes
        v1_weight = weakref.ref(next(served.versions["v1"].runtime.model.parameters()))
        registry.write_promoted_pointer(records["v2"])
        wait_until(lambda: served.default == "v2", 60)
        v2_bytes = served.versions["v2"].weight_bytes
        assert served.last_swap["peak_bytes"] == v1_bytes + v2_bytes  # both alive while v2 warmed: nothing else
        registry.write_promoted_pointer(records["v3"])
        wait_until(lambda: served.default == "v3", 60)
        swap = served.last_swap
        assert set(served.versions) == {"v2", "v3"}
        assert swap["before_bytes"] == v2_bytes  # v1 went before v3 loaded
        assert swap["peak_bytes"] <= v2_bytes + swap["new_bytes"] < v1_bytes + v2_bytes + swap["new_bytes"]
        assert swap["after_bytes"] == served.held_bytes() == v2_bytes + swap["new_bytes"]
        assert v1_weight() is None  # released, not merely forgotten
        with grpc.insecure_channel(srv.address) as channel:
            info = reward_pb2_grpc.RewardServiceStub(channel).GetModel(reward_pb2.GetModelRequest(), timeout=30)
        assert (info.version, info.weight_bytes, info.device) == ("v3", swap["new_bytes"], "cpu")
        assert _metric(srv, "rm_model_weight_bytes", '{version="v3"}') == swap["new_bytes"]
        assert _metric(srv, "rm_model_swap_peak_bytes") == swap["peak_bytes"]
    finally:
        srv.stop()


def test_a_load_over_the_memory_cap_is_refused_with_the_figures(three_versions, tiny_backbone_dir):
    records = three_versions
    estimate = estimate_load([tiny_backbone_dir, records["v2"].artifact_path], "bf16")
    v1_bytes = None
    srv = _serve(max_loaded=1, weight_memory_gb=1e-9)  # a cap below any model: v1 (at start) is not checked
    try:
        served = srv.server.served
        v1_bytes = served.versions["v1"].weight_bytes
        registry.write_promoted_pointer(records["v2"])
        wait_until(lambda: "v2" in served.failed, 60)
        error = served.failed["v2"].error
        assert "would not fit" in error and f"{estimate.parameters / 1e9:.2f}B parameters" in error
        assert "weight_memory_gb" in error and "v1" in error
        assert served.default == "v1" and served.held_bytes() == v1_bytes
    finally:
        srv.stop()


def test_a_failed_load_is_retried_with_backoff_and_reported(three_versions, tmp_path):
    records = three_versions
    head = f"{records['v2'].artifact_path}/head.safetensors"
    shutil.copy(head, tmp_path / "head.safetensors")
    with open(head, "wb") as f:
        f.write(b"not a safetensors file")
    srv = _serve(load_retry_s=0.2, load_retry_max_s=0.4)
    try:
        served = srv.server.served
        registry.write_promoted_pointer(records["v2"])
        wait_until(lambda: "v2" in served.failed and served.failed["v2"].attempts >= 3, 60)
        health = httpx.get(srv.server.http.url + "health").json()
        assert health["status"] == "SERVING" and health["models"]["default"] == "v1"
        failure = health["models"]["load_failures"]["v2"]
        assert failure["attempts"] >= 3 and failure["retry_in_s"] <= 0.4 and failure["error"]
        assert _metric(srv, "rm_model_load_failures_total", '{version="v2"}') >= 3
        assert _metric(srv, "rm_model_load_failing") == 1
        shutil.copy(tmp_path / "head.safetensors", head)  # the file is whole again: the next try loads it
        wait_until(lambda: served.default == "v2", 60)
        time.sleep(0.1)
        assert served.failed == {} and _metric(srv, "rm_model_load_failing") == 0
        assert httpx.get(srv.server.http.url + "health").json()["models"]["load_failures"] == {}
    finally:
        srv.stop()


def test_a_version_served_in_bf16_never_holds_fp32_weights_and_its_estimate_is_measured(
    three_versions, tiny_backbone_dir
):
    """Serving casts on the host before moving to the device and scores the golden items with
    that one copy; the estimate read from the weight files' headers matches what loading measures."""
    from rm_service.server.models import load_version_dir

    directory = three_versions["v2"].artifact_path
    served = load_version_dir(
        directory, ServeSettings(precision="bf16", device="cpu", with_store=False), ModelSettings()
    )
    model = served.runtime.model
    assert served.runtime.inference_model() is model
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}
    assert model.score.weight.dtype == torch.float32  # the heads stay fp32, as at training
    estimate = estimate_load([tiny_backbone_dir, directory], "bf16", "cuda")
    head = model.score.weight.numel() + model.score.bias.numel()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # An upper bound: the files also hold what the reward model drops (layers past its pooling
    # layer, an LM head), so a refusal is never for want of counting.
    assert estimate.parameters >= sum(p.numel() for p in model.parameters())
    assert served.weight_bytes <= estimate.served_bytes + 2 * head + buffers  # heads at 4 bytes, not 2
    assert estimate.load_peak_bytes == estimate.served_bytes  # on a GPU: only the served copy
    assert estimate_load([tiny_backbone_dir, directory], "bf16", "cpu").load_peak_bytes == 4 * estimate.parameters


def test_backend_onnx_off_a_cpu_in_fp32_is_refused(home, tiny_rm_dir):
    """ONNX Runtime here runs the fp32 export on the CPU: asked for with bf16 (or a GPU) it is
    refused at load, not served as something else."""
    from rm_service.errors import FailedPrecondition

    settings = ServeSettings(model=str(tiny_rm_dir), precision="bf16", backend="onnx", device="cpu", with_store=False)
    with pytest.raises(FailedPrecondition, match="backend onnx runs the fp32 export on the CPU; this server runs bf16"):
        load_for_serving(settings, None, ModelSettings(), Target(external=str(tiny_rm_dir)))
