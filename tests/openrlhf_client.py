"""OpenRLHF's own remote reward client in a process of its own: the HTTP path of openrlhf 0.11.2's
SingleTurnAgentExecutor, what `train_ppo_ray --remote_rm_url URL` calls after each rollout.

    python tests/openrlhf_client.py URL < request.json   # {"query": [...], "prompts": [...], "labels": [...]}

prints OpenRLHF's answers (one per server shard) as JSON. A process of its own because aiohttp
builds its TLS context once, at import, from SSL_CERT_FILE: the test's CA is set there first.
The package comes from .venv/peers/openrlhf (`make install`), last on the path."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.append(str(Path(sys.prefix) / "peers" / "openrlhf"))

from openrlhf.utils.agent import SingleTurnAgentExecutor


def main() -> None:
    request = json.load(sys.stdin)
    executor = SingleTurnAgentExecutor(remote_rm_url=sys.argv[1])
    answers = asyncio.run(executor._fetch_rewards_via_http(request["query"], request["prompts"], request["labels"]))
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
