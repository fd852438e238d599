"""The reward routes that RLHF trainers already call (role `scorer`; admin passes too).

    POST /get_reward           OpenRLHF's remote reward protocol (`--remote_rm_url`):
                               {"query": [str], "prompts": [str], "labels": [...]} ->
                               {"rewards": [float], "scores": [float], "extra_logs": {...}}
    POST /classify, /v1/classify   vLLM's classify API, as verl's reward loop calls it:
                               {"input": str | [str]} or {"messages": [...]} ->
                               {"data": [{"index", "label", "probs": [p], "num_classes": 1}], ...}
    POST /pooling, /v1/pooling     vLLM's pooling API: the same inputs -> {"data": [{"index", "data": [r]}], ...}
    GET /v1/models, /version       vLLM's model list and version (GET /ping, vLLM's health, is app.health)

Every route is an adapter of the scoring core (server.scoring), as gRPC Score is: the same
admission control, asked before the body is read (429 with Retry-After when overloaded), batcher,
model version and formatting contract, so a conversation gets the same reward over HTTP as over
gRPC. Text inputs (`query`, `input`) are rendered conversations (ChatML, Llama 3, Gemma, Mistral)
parsed back into messages (server.http.rendered documents the contract); a vLLM `input` may also
be token ids of the reward model's tokenizer, decoded first; `messages` is one conversation, the
last message the reply to score. With `http_chat_template` "raw" texts and token ids are not
parsed: each is scored as it is (models.formatting.format_raw), as OpenRLHF's serve_rm and vLLM
score a text. The reward is gRPC's `reward` (normalised with the version's served statistics);
`/classify` and `/pooling` pass it through a sigmoid unless the request says `"use_activation":
false` (vLLM's flag and its default for a classification model, on both routes; verl sends the
older `"activation": false`). `/pooling` takes vLLM's `encoding_format` (float or base64) and
refuses a `task` other than classify (per-token outputs are not served). `GET /v1/models` lists
the loaded versions, `GET /version` the server's. Fields the peers send that rm-service has no use
for (`labels`, `prompts` beyond their shape, `model` unless it names a loaded version,
`add_special_tokens`, `truncate_prompt_tokens`...) are accepted and ignored: the served version's
formatting contract decides tokenization and truncation.

Bad input is 400 naming the field; a request larger than `max_message_bytes` (gRPC's message
limit) or with more than `max_items_per_request` conversations is 400 as well. A caller that
disconnects has its queued items dropped before they reach the model, as a cancelled gRPC call.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rm_service import __version__
from rm_service.conversation import Message, validate_messages, validate_text
from rm_service.errors import InvalidArgument
from rm_service.server.http.app import HTTP_TICKET, HttpContext, caller, context, counted, until_disconnect
from rm_service.server.http.guard import read_json
from rm_service.server.http.rendered import parse_rendered
from rm_service.server.scoring import Pairs, sigmoid

SCORER = "scorer"
ACTIVATION_KEYS = ("use_activation", "activation", "softmax")  # vLLM's flag, then its deprecated names
TASKS = (None, "classify")  # vLLM's /pooling `task`: one score per conversation
ENCODINGS = ("float", "base64")
RAW = "raw"  # http_chat_template: texts scored as they are, not parsed


@dataclass(frozen=True)
class Work:
    """What one request scores: (prompt, completion) pairs under the version's formatting contract,
    or, in raw mode, texts and token-id lists as they are."""

    pairs: Pairs | None = None
    raw: Sequence[str | list[int]] | None = None


def routes() -> list[Route]:
    out = [Route("/get_reward", counted("/get_reward")(get_reward), methods=["POST"])]
    for path in ("/classify", "/v1/classify"):
        out.append(Route(path, counted(path)(classify), methods=["POST"]))
    for path in ("/pooling", "/v1/pooling"):
        out.append(Route(path, counted(path)(pooling), methods=["POST"]))
    out += [Route("/v1/models", models, methods=["GET"]), Route("/version", server_version, methods=["GET"])]
    return out


async def models(request: Request) -> JSONResponse:
    """vLLM's (OpenAI's) model list: the loaded versions, the served one first."""
    caller(request, SCORER)
    served = context(request).need_reward().served
    names = sorted(served.versions, key=lambda v: v != served.default)
    data = [
        {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "rm-service",
            "root": name,
            "parent": None,
            "max_model_len": served.versions[name].runtime.spec.max_tokens,
        }
        for name in names
    ]
    return JSONResponse({"object": "list", "data": data})


async def server_version(request: Request) -> JSONResponse:
    return JSONResponse({"version": __version__})


async def get_reward(request: Request) -> JSONResponse:
    caller(request, SCORER)
    ctx = context(request)
    await ctx.need_reward().check_room(HTTP_TICKET)  # before the body is read: a refusal costs the request alone
    body = await read_json(request, ctx.settings.max_message_bytes)
    queries = _texts(body.get("query"), "query", ctx)
    for name in ("prompts", "labels"):  # OpenRLHF sends both; only their shape is checked
        value = body.get(name)
        if value is not None and (not isinstance(value, list) or len(value) != len(queries)):
            raise InvalidArgument(
                name,
                f"must be a list of {len(queries)} entries, one per query, got "
                f"{len(value) if isinstance(value, list) else type(value).__name__}",
            )
    prompts = body.get("prompts")
    if prompts is not None and not all(isinstance(p, str) for p in prompts):
        i = next(i for i, p in enumerate(prompts) if not isinstance(p, str))
        raise InvalidArgument(f"prompts[{i}]", f"must be a string, got {type(prompts[i]).__name__}")
    version = _version(ctx, None)
    scored, reward = await _score(request, ctx, _read(ctx, version, queries, "query"), version)
    rewards = [float(r) for r in reward]
    return JSONResponse(
        {
            "rewards": rewards,
            "scores": rewards,
            "extra_logs": {
                "raw_score": [float(x) for x in scored.raw],
                "uncertainty": [float(x) for x in scored.std],
                "truncated": [float(f.truncated) for f in scored.formatted],
            },
            "model_version": scored.version,
        }
    )


async def classify(request: Request) -> JSONResponse:
    ctx, body, work, version = await _vllm_request(request)
    scored, reward = await _score(request, ctx, work, version)
    activate = _activation(body, default=True)
    data = [
        {"index": i, "label": "reward", "probs": [sigmoid(r) if activate else float(r)], "num_classes": 1}
        for i, r in enumerate(reward)
    ]
    return JSONResponse(
        {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": scored.version,
            "data": data,
            "usage": _usage(scored),
        }
    )


async def pooling(request: Request) -> JSONResponse:
    ctx, body, work, version = await _vllm_request(request)
    if body.get("task") not in TASKS:
        raise InvalidArgument(
            "task",
            f"{body.get('task')!r} is not served: rm-service scores whole conversations, one reward each "
            "(task classify, or none); per-token outputs (token_classify, token_embed) and embeddings are not",
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise InvalidArgument("encoding_format", f"must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    scored, reward = await _score(request, ctx, work, version)
    activate = _activation(body, default=True)  # vLLM applies a classification model's activation here too
    values = [sigmoid(r) if activate else float(r) for r in reward]
    data = [{"index": i, "object": "pooling", "data": _encoded([v], encoding)} for i, v in enumerate(values)]
    return JSONResponse(
        {
            "id": f"pool-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": scored.version,
            "data": data,
            "usage": _usage(scored),
        }
    )


def _encoded(values: list[float], encoding: str) -> list[float] | str:
    """As vLLM encodes pooled data: a list of floats, or base64 of their float32 little-endian bytes."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
    return values


async def _vllm_request(request: Request):
    """(context, body, Work, version) of a vLLM-shaped request."""
    caller(request, SCORER)
    ctx = context(request)
    await ctx.need_reward().check_room(HTTP_TICKET)  # before the body is read
    body = await read_json(request, ctx.settings.max_message_bytes)
    version = _version(ctx, body.get("model"))
    given = [k for k in ("input", "messages") if body.get(k) is not None]
    if len(given) != 1:
        raise InvalidArgument(
            "input",
            "send either input (a ChatML-rendered conversation, or a list of them) or messages (one "
            "conversation ending with the assistant's reply)" + (", not both" if given else ""),
        )
    if given == ["messages"]:
        return ctx, body, Work(pairs=[_conversation(body["messages"], "messages", ctx)]), version
    value = body["input"]
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = [value]  # one conversation as token ids
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        ids = _checked_ids(ctx, version, value)
        if ctx.settings.http_chat_template == RAW:
            return ctx, body, Work(raw=ids), version  # scored as sent, as vLLM scores token ids
        tokenizer = ctx.need_reward().served.get(version).runtime.tokenizer
        value = [tokenizer.decode(seq, skip_special_tokens=False) for seq in ids]
    texts = [value] if isinstance(value, str) else _texts(value, "input", ctx)
    return ctx, body, _read(ctx, version, texts, "input"), version


def _checked_ids(ctx: HttpContext, version: str, ids: list[list], field: str = "input") -> list[list[int]]:
    """Token ids of the reward model's tokenizer (what a vLLM client sends after tokenizing with
    the served model's tokenizer), each in its vocabulary, to be decoded with their special tokens
    and read as rendered text, or scored as they are in raw mode."""
    _texts([""] * len(ids), field, ctx)  # the count within max_items_per_request before any decoding
    tokenizer = ctx.need_reward().served.get(version).runtime.tokenizer
    vocab = len(tokenizer)
    for i, seq in enumerate(ids):
        bad = next(
            (j for j, t in enumerate(seq) if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None
        )
        if not seq or bad is not None:
            got = "an empty list" if bad is None else f"{seq[bad]!r} at [{bad}]"
            raise InvalidArgument(f"{field}[{i}]", f"token ids must be integers in [0, {vocab}), got {got}")
    return ids


def _texts(value, field: str, ctx: HttpContext) -> list[str]:
    """A non-empty list of strings, at most max_items_per_request long."""
    if not isinstance(value, list):
        raise InvalidArgument(
            field, f"must be a list of strings, got {'nothing' if value is None else type(value).__name__}"
        )
    if not value:
        raise InvalidArgument(field, "must hold at least one conversation")
    limit = ctx.settings.max_items_per_request
    if len(value) > limit:
        raise InvalidArgument(
            field, f"holds {len(value)} conversations; the limit per request is {limit} (max_items_per_request)"
        )
    for i, v in enumerate(value):
        if not isinstance(v, str):
            hint = (
                "; token ids are taken on /classify and /pooling only, as lists of integers"
                if isinstance(v, (int, list))
                else ""
            )
            raise InvalidArgument(f"{field}[{i}]", f"must be a string, got {type(v).__name__}{hint}")
    return value


def _version(ctx: HttpContext, model) -> str:
    """The version that scores: `model` when it names a loaded version, else the served default.
    Resolved here (Unavailable while the model loads) so that parsing and scoring use one version."""
    served = ctx.need_reward().served
    name = model if isinstance(model, str) and model in served.versions else ""
    return served.get(name).record.version


def _read(ctx: HttpContext, version: str, texts: list[str], field: str) -> Work:
    """Rendered texts parsed into (prompt, completion) pairs; in raw mode, the texts as they are."""
    if ctx.settings.http_chat_template != RAW:
        return Work(pairs=_parsed(ctx, version, texts, field))
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidArgument(f"{field}[{i}]", "is empty: there is no text to score")
    return Work(raw=texts)


def _parsed(ctx: HttpContext, version: str, texts: list[str], field: str) -> list[tuple[list[Message], str]]:
    tokenizer = ctx.need_reward().served.get(version).runtime.tokenizer
    ignorable = getattr(tokenizer, "all_special_tokens", [])
    pairs = []
    for i, text in enumerate(texts):
        prompt, completion = parse_rendered(text, f"{field}[{i}]", ignorable, ctx.settings.http_chat_template)
        pairs.append(_validated(ctx, prompt, completion, f"{field}[{i}].prompt", f"{field}[{i}].completion"))
    return pairs


def _validated(ctx: HttpContext, prompt: list[Message], completion: str, prompt_field: str, completion_field: str):
    """Score's own checks (convert.score_items): a prompt of valid turns ending with a user or
    system turn, a non-empty completion, texts within the store's max_text_chars."""
    max_chars = ctx.need_reward().max_chars
    validate_messages(prompt, prompt_field, max_chars)
    validate_text(completion, completion_field, max_chars)
    return prompt, completion


def _conversation(value, field: str, ctx: HttpContext) -> tuple[list[Message], str]:
    """OpenAI-style messages (content a string or a list of text parts) -> (prompt, completion)."""
    if not isinstance(value, list) or not value:
        raise InvalidArgument(
            field,
            f"must be a non-empty list of messages, got {type(value).__name__ if value != [] else 'an empty list'}",
        )
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidArgument(f"{field}[{i}]", f"must be an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str):
            raise InvalidArgument(f"{field}[{i}].role", f"must be a string, got {type(role).__name__}")
        messages.append(Message(role, _content(m.get("content"), f"{field}[{i}].content")))
    if messages[-1].role != "assistant":
        raise InvalidArgument(
            f"{field}[{len(messages) - 1}].role",
            "the last message must be the assistant's reply, the response to score",
        )
    return _validated(ctx, messages[:-1], messages[-1].content, field, f"{field}[{len(messages) - 1}].content")


def _content(value, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument(f"{field}[{j}]", 'only text parts ({"type": "text", "text": ...}) can be scored')
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidArgument(
        field, f"must be a string or a list of text parts, got {'nothing' if value is None else type(value).__name__}"
    )


def _activation(body: dict, default: bool) -> bool:
    for key in ACTIVATION_KEYS:
        value = body.get(key)
        if value is not None:
            if not isinstance(value, bool):
                raise InvalidArgument(key, f"must be true, false or null, got {type(value).__name__}")
            return value
    return default


async def _score(request: Request, ctx: HttpContext, work: Work, version: str):
    """The core's score, cancelled when the caller disconnects: its permit is released and its
    queued items are dropped before they reach the model, as for a cancelled gRPC call."""
    reward = ctx.need_reward()
    if work.raw is not None:
        job = reward.score_raw(work.raw, version, HTTP_TICKET)
    else:
        job = reward.score(work.pairs or [], version, HTTP_TICKET)
    scored = await until_disconnect(request, job)
    return scored, scored.reward


def _usage(scored) -> dict:
    tokens = sum(len(f) for f in scored.formatted)
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None}
