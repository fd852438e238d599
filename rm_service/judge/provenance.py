"""A judged item as a label with its provenance: source JUDGE, the judge model id(s) as
annotator, the template version and decision mode in metadata, the rationale, and the
per-order verdicts (so position bias can be measured from the store later).

Metadata keys: judge_template, judge_decision, judge_inconsistent (the policy), judge_kway,
judge_pairs (pair judgments, each in both orders), judge_flips (those whose verdict changed
with the order) and judge_verdicts (JSON: judge, pair, outcome in each order).

The label id is a hash of the item key (the task id) and the judge's configuration, so
judging the same item again with the same judge gives the same id: a DUPLICATE, not a
second label.
"""

from __future__ import annotations

import hashlib
import json

from rm_client.messages import to_proto
from rm_service.api.v1 import preference_pb2
from rm_service.judge.items import JudgeItem
from rm_service.judge.pairwise import Judge, SwapJudgment

MAX_RATIONALE_CHARS = 4000


def annotator(judges: list[Judge]) -> str:
    return "+".join(j.model_id for j in judges)


def template_version(judges: list[Judge], k: int, kway: str) -> str:
    ranking = k > 2 and kway == "direct"
    return ",".join(sorted({(j.ranking if ranking else j.pairwise).version for j in judges}))


def label_id(item: JudgeItem, judges: list[Judge], settings) -> str:
    config = [
        item.key,
        annotator(judges),
        template_version(judges, len(item.responses), settings.kway),
        settings.decision,
        settings.inconsistent,
        settings.kway,
    ]
    return "judge-" + hashlib.sha256(json.dumps(config).encode()).hexdigest()[:32]


def judge_label(
    item: JudgeItem, ranks: list[int], judgments: list[SwapJudgment], judges: list[Judge], settings
) -> preference_pb2.Label:
    k = len(item.responses)
    metadata = {
        "judge_template": template_version(judges, k, settings.kway),
        "judge_decision": settings.decision,
        "judge_inconsistent": settings.inconsistent,
        "judge_pairs": str(len(judgments)),
        "judge_flips": str(sum(jd.flipped for jd in judgments)),
        "judge_verdicts": json.dumps(
            [[jd.judge, jd.i, jd.j, jd.order1, jd.order2] for jd in judgments], separators=(",", ":")
        ),
    }
    if k > 2:
        metadata["judge_kway"] = settings.kway
    rationale = "\n".join(dict.fromkeys(jd.rationale for jd in judgments))
    if len(rationale) > MAX_RATIONALE_CHARS:
        rationale = rationale[:MAX_RATIONALE_CHARS] + "[...]"
    return preference_pb2.Label(
        label_id=label_id(item, judges, settings),
        prompt=to_proto(item.prompt),
        responses=item.responses,
        ranks=ranks,
        source=preference_pb2.JUDGE,
        annotator=annotator(judges),
        rationale=rationale,
        metadata=metadata,
        task_id=item.task_id,
    )
