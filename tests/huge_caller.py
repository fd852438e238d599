"""A client in its own process that sends 16 MB Score calls one after another (tests/test_cost_bounds.py).

python tests/huge_caller.py ADDRESS SECONDS  ->  one JSON line: the calls' latencies, truncated, num_tokens
"""

from __future__ import annotations

import json
import sys
import time

import grpc

from rm_service.api.v1 import common_pb2, reward_pb2

TEXT = "The river runs from the lake to the sea, past towns and fields. "  # 64 characters
BIG = (TEXT * 500)[:32_000]  # one message at the store's max_text_chars


def huge_prompt(messages: int) -> list[common_pb2.Message]:
    """`messages` messages of 32,000 characters, user and assistant in turn, ending on a user turn."""
    return [
        common_pb2.Message(role="user" if i % 2 == 0 else "assistant", content=f"{i}: {BIG}"[:32_000])
        for i in range(messages)
    ]


def main() -> None:
    address, seconds, pause = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    body = reward_pb2.ScoreRequest(
        items=[reward_pb2.ScoreItem(prompt=huge_prompt(499), completion=BIG)]
    ).SerializeToString()
    assert len(body) > 16_000_000
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 32 << 20)]) as channel:
        send = channel.unary_unary(
            "/rm.v1.RewardService/Score", response_deserializer=reward_pb2.ScoreResponse.FromString
        )
        out, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.perf_counter()
            result = send(body, timeout=30).results[0]
            out.append({"s": time.perf_counter() - start, "truncated": result.truncated, "tokens": result.num_tokens})
            time.sleep(pause)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
