"""A real OpenAI-compatible chat-completions server for the judge's tests.

It serves an HF causal LM (in the tests, conftest's `tiny_lm_dir`: a tiny Llama built from a
config with the tiny HH tokenizer) through transformers `generate`: POST /v1/chat/completions renders the chat
with the model's chat template, generates (greedy at temperature 0, sampled otherwise) and
answers in the OpenAI shape, with `logprobs` / `top_logprobs` of the generated tokens when
asked. GET /v1/models lists the model. A bearer key, when set, is required.

Test knobs make the failures a client must survive: `fail_next(n, status)` answers the next
n requests with that status (and Retry-After, if given); `stall_next(n, seconds)` holds the
next n requests before answering, to provoke client timeouts. Every request is recorded
(start, end, status) and the most requests in flight at once is kept, so tests can check
retries, backoff and the client's concurrency limit.

    python tests/openai_server.py --model DIR [--port 8000]     # serve a model by hand
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch


def build_tiny_lm(path: Path, tokenizer, seed: int) -> Path:
    """Another tiny random LlamaForCausalLM like conftest's `tiny_lm_dir` (a second judge of a panel)."""
    from conftest import _llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = _llama_config(
        len(tokenizer), tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class ChatModel:
    """An HF causal LM answering chat completions."""

    def __init__(self, model_dir: Path, name: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.lock = threading.Lock()

    def complete(self, messages: list[dict], max_tokens: int, temperature: float, top_logprobs: int | None) -> dict:
        from transformers import GenerationConfig

        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])  # [1, T]
        config = GenerationConfig(
            max_new_tokens=max_tokens,
            do_sample=temperature > 0,
            temperature=temperature or None,
            top_k=None,
            top_p=None,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        with self.lock, torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        new = out.sequences[0, ids.shape[1] :].tolist()  # [N]
        finished = bool(new) and new[-1] == self.tokenizer.eos_token_id
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": self.tokenizer.decode(new, skip_special_tokens=True)},
            "finish_reason": "stop" if finished else "length",
            "logprobs": None,
        }
        if top_logprobs is not None:
            choice["logprobs"] = {
                "content": [
                    self._token_logprobs(token, logits[0], top_logprobs)
                    for token, logits in zip(new, out.logits, strict=True)
                ]
            }
        return {
            "choice": choice,
            "usage": {
                "prompt_tokens": ids.shape[1],
                "completion_tokens": len(new),
                "total_tokens": ids.shape[1] + len(new),
            },
        }

    def _token_logprobs(self, token: int, logits: torch.Tensor, top: int) -> dict:
        logp = torch.log_softmax(logits.float(), dim=-1)  # [V]
        values, indices = logp.topk(min(top, logp.shape[0]))
        return {
            "token": self.tokenizer.decode([token]),
            "logprob": float(logp[token]),
            "top_logprobs": [
                {"token": self.tokenizer.decode([i]), "logprob": float(v)}
                for v, i in zip(values.tolist(), indices.tolist(), strict=True)
            ],
        }


@dataclass
class Call:
    start: float
    end: float
    status: int
    body: dict


class OpenAIServer:
    """The server on 127.0.0.1, port 0, in a background thread."""

    def __init__(self, model_dir: Path, name: str = "tiny-judge", api_key: str | None = None, port: int = 0):
        self.model = ChatModel(model_dir, name)
        self.api_key = api_key
        self.calls: list[Call] = []
        self.inflight = 0
        self.max_inflight = 0
        self._failures: list[tuple[int, float | None]] = []
        self._stalls: list[float] = []
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def fail_next(self, n: int, status: int = 503, retry_after: float | None = None) -> None:
        with self._lock:
            self._failures += [(status, retry_after)] * n

    def stall_next(self, n: int, seconds: float) -> None:
        with self._lock:
            self._stalls += [seconds] * n

    def statuses(self) -> list[int]:
        with self._lock:
            return [c.status for c in self.calls]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- request handling ------------------------------------------------------------------

    def handle(self, body: dict, authorization: str | None) -> tuple[int, dict, dict]:
        """(status, JSON body, extra headers) for one chat-completions request."""
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}}, {}
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
            stall = self._stalls.pop(0) if self._stalls else 0.0
        if failure is not None:
            status, retry_after = failure
            return (
                status,
                {"error": {"message": "injected failure", "type": "server_error"}},
                {"Retry-After": str(retry_after)} if retry_after else {},
            )
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)
        ):
            return (
                400,
                {
                    "error": {
                        "message": "messages must be a non-empty list of {role, content}",
                        "type": "invalid_request_error",
                    }
                },
                {},
            )
        if body.get("model") != self.model.name:
            return (
                404,
                {"error": {"message": f"model {body.get('model')!r} not found", "type": "invalid_request_error"}},
                {},
            )
        time.sleep(stall)
        top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else None
        result = self.model.complete(
            messages, int(body.get("max_tokens") or 16), float(body.get("temperature") or 0.0), top
        )
        return (
            200,
            {
                "id": f"chatcmpl-{len(self.calls)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model.name,
                "choices": [result["choice"]],
                "usage": result["usage"],
            },
            {},
        )


def _handler(server: OpenAIServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(
                    200, {"object": "list", "data": [{"id": server.model.name, "object": "model", "owned_by": "tests"}]}
                )
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            start = time.monotonic()
            with server._lock:
                server.inflight += 1
                server.max_inflight = max(server.max_inflight, server.inflight)
            status, body = 500, {}
            try:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    status, payload, headers = 404, {"error": {"message": "not found"}}, {}
                else:
                    try:
                        body = json.loads(raw)
                    except json.JSONDecodeError:
                        status, payload, headers = 400, {"error": {"message": "body is not JSON"}}, {}
                    else:
                        status, payload, headers = server.handle(body, self.headers.get("authorization"))
                self._send(status, payload, headers)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout); nothing to answer
            finally:
                with server._lock:
                    server.inflight -= 1
                    server.calls.append(Call(start, time.monotonic(), status, body))

        def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve an HF causal LM as an OpenAI-compatible chat-completions endpoint.")
    ap.add_argument("--model", required=True, type=Path, help="HF model directory with a chat template")
    ap.add_argument("--name", default="tiny-judge", help="model name clients must send")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    server = OpenAIServer(args.model, args.name, port=args.port)
    print(f"serving {args.model} as {args.name!r} on {server.url}", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
