"""The admin view's JSON API (role `admin`).

    GET /api/admin/agreement   agreement between people (each pair of HUMAN annotators), and
                               between people and each judge (every HUMAN label against that
                               judge's JUDGE labels), plus the store's statistics

Every number comes from Store.agreement / Store.judge_agreement (store.agreement, then
store.agreement.agreement_report): shared pairs, agreement, Cohen's kappa, ties, length bias
and, for judges, the position-bias rate. Pairs of people who share no pair are left out.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from itertools import combinations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rm_service.server.auth import ADMIN
from rm_service.server.http.app import caller, context, finite
from rm_service.store.agreement import LabelSet
from rm_service.store.db import Store

MAX_PEOPLE = 50  # people compared pairwise: 1,225 pairs at most


def routes() -> list[Route]:
    return [Route("/api/admin/agreement", agreement, methods=["GET"])]


async def agreement(request: Request) -> JSONResponse:
    who = caller(request, ADMIN)
    return JSONResponse(
        {"annotator": who.annotator, **await asyncio.to_thread(_agreement, context(request).need_store())}
    )


def _report(report) -> dict:
    out = {k: finite(v) for k, v in asdict(report).items()}
    out["position_bias_rate"] = finite(report.position_bias_rate) if report.swapped_pairs else None
    return out


def _agreement(store: Store) -> dict:
    people = store.annotators("HUMAN")
    judges = store.annotators("JUDGE")
    between_people = []
    for (a, _), (b, _) in combinations(people[:MAX_PEOPLE], 2):
        report = store.agreement(LabelSet(("HUMAN",), a), LabelSet(("HUMAN",), b))
        if report.shared_pairs or report.judge_ties:
            between_people.append({"a": a, "b": b, **_report(report)})
    with_judges = [{"judge": name, **_report(store.judge_agreement(("HUMAN",), judge=name))} for name, _ in judges]
    stats = store.stats()
    return {
        "people": [{"annotator": name, "labels": n} for name, n in people],
        "judges": [{"annotator": name, "labels": n} for name, n in judges],
        "between_people": between_people,
        "people_and_judges": with_judges,
        "people_and_all_judges": _report(store.judge_agreement(("HUMAN",))),
        "stats": {k: finite(v) for k, v in stats.items()},
    }
