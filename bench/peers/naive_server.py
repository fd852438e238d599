"""The naive peer: a FastAPI endpoint around plain transformers, one item per forward pass.

What a team writes in an afternoon: load the `*ForSequenceClassification` directory with
`AutoModelForSequenceClassification` in the transformers default precision (fp32), and for
every request tokenise each text (no special tokens added, right-truncated at the token cap)
and run one forward pass per text. The handler is `async def`, so requests run one at a time on
the event loop, as OpenRLHF's serve_rm does. Same request shape as serve_rm, so one client
drives both:

    POST /get_reward {"query": ["<chat-template text>", ...]} -> {"rewards": [float, ...]}

Runs from the peers' virtual environment (bench/peers/setup.sh), not the project's:

    /work/peers-venv/bin/python bench/peers/naive_server.py --model DIR --port 8000 --max-len 1024
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def build_app(model_dir: str, max_len: int, dtype: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    app = FastAPI()

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        body = await request.json()
        queries = body.get("query") if isinstance(body, dict) else None
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            return JSONResponse({"error": "query must be a list of strings"}, status_code=400)
        rewards = []
        with torch.inference_mode():
            for text in queries:
                ids = tokenizer(
                    text, add_special_tokens=False, truncation=True, max_length=max_len, return_tensors="pt"
                )
                rewards.append(float(model(**ids).logits[0, 0]))
        return JSONResponse({"rewards": rewards})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a *ForSequenceClassification HF directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-len", type=int, default=1024, help="token cap per item")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights' dtype (transformers' default: float32)",
    )
    args = parser.parse_args()
    uvicorn.run(build_app(args.model, args.max_len, args.dtype), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
