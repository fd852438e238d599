"""Checks recorded HTTP exchanges against vLLM 0.33.0's own pydantic protocol models; run in a
subprocess by tests/test_peers_vllm.py (importing vLLM sets environment variables and loads ~4,900
modules, which stay out of the test process).

    python tests/vllm_protocol.py PEER_FOLDER EXCHANGES_JSON

PEER_FOLDER is .venv/peers/vllm (`make peers-vllm`: vLLM's released Python sources unpacked from
its wheel, beside the light packages its protocol modules import); it goes last on sys.path, so
the venv's own packages (torch, transformers, pydantic) win. Each exchange is {"kind": "classify" |
"pooling" | "models", "request": body or null, "vllm_accepts": bool, "status": int, "answer": body}:

- a request a vLLM client would send ("vllm_accepts") must validate as vLLM's own request model
  (ClassificationRequest, PoolingRequest: the annotated unions its FastAPI routes take);
- a 200 answer must validate, strictly, as ClassificationResponse, PoolingResponse or ModelList,
  and every other answer as ErrorResponse with `code` equal to the status;
- as vLLM's models allow extra keys (OpenAIBaseModel: extra="allow"), every key an answer holds
  must also be a field the model declares, nested models included.

Prints, as JSON, the list of problems of each exchange (empty when all hold), and vLLM's version
on stderr.
"""

from __future__ import annotations

import json
import sys

sys.path.append(sys.argv[1])

import vllm
from pydantic import BaseModel, TypeAdapter, ValidationError
from vllm.entrypoints.pooling.classify.protocol import ClassificationRequest, ClassificationResponse
from vllm.entrypoints.pooling.pooling.protocol import PoolingRequest, PoolingResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelList
from vllm.exceptions import VLLMError

REQUESTS = {"classify": TypeAdapter(ClassificationRequest), "pooling": TypeAdapter(PoolingRequest)}
ANSWERS = {"classify": ClassificationResponse, "pooling": PoolingResponse, "models": ModelList}


def undeclared(model: BaseModel, path: str = "") -> list[str]:
    """The keys of a validated body that its vLLM model does not declare, nested models included."""
    out = [path + key for key in model.model_extra or {}]
    for name in type(model).model_fields:
        value = getattr(model, name)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                out += undeclared(item, f"{path}{name}[{i}]." if isinstance(value, list) else f"{path}{name}.")
    return out


def problems(exchange: dict) -> list[str]:
    kind, status, answer = exchange["kind"], exchange["status"], exchange["answer"]
    where = f"{exchange.get('path', kind)} {json.dumps(exchange['request'])[:120]}"
    out = []
    if exchange["request"] is not None and exchange["vllm_accepts"]:
        try:
            REQUESTS[kind].validate_python(exchange["request"])
        except (ValidationError, VLLMError) as exc:  # VLLMError: vLLM's own checks (removed fields and tasks)
            out.append(f"{where}: vLLM refuses the request: {exc}")
    model = ANSWERS[kind] if status == 200 else ErrorResponse
    try:
        parsed = model.model_validate_json(json.dumps(answer), strict=True)
    except ValidationError as exc:
        return [*out, f"{where}: the {status} answer is not vLLM's {model.__name__}: {exc}"]
    if extra := undeclared(parsed):
        out.append(f"{where}: {model.__name__} declares no {', '.join(extra)}")
    if status != 200 and parsed.error.code != status:
        out.append(f"{where}: error.code {parsed.error.code} is not the status {status}")
    return out


if __name__ == "__main__":
    with open(sys.argv[2]) as f:
        exchanges = json.load(f)
    print(f"vllm {vllm.__version__} from {vllm.__file__}", file=sys.stderr)
    print(json.dumps([problems(exchange) for exchange in exchanges]))
