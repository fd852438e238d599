"""The labeling page's JSON API (role `labeler`; admin passes too).

    GET  /api/me                       who the token is: annotator id, role, lease length
    POST /api/next                     lease the next task of either kind (store.tasks.lease,
                                       highest priority first; a task this person still holds
                                       comes back first) with the suggestions shown for it, and
                                       progress
    POST /api/tasks/{task_id}/renew    extend the lease while the page is open (409 once lost)
    POST /api/tasks/{task_id}/skip     release the task; this person is not offered it again
    POST /api/tasks/{task_id}/label    the person's answer. A ranking task: ranks (0 = best, ties
                                       equal), strength, rationale, thumbs per assistant turn. A
                                       session task (a conversation a policy played): thumbs per
                                       assistant turn, the session's outcome (1 success, 0
                                       failure, or between), rationale
    GET  /api/progress                 labeled today by this person, tasks left for them

An answer goes through the same ingestion as IngestLabels (Store.prepare, then the
group-commit writer): source HUMAN, annotator from the token, label_id `<task_id>/<annotator>`,
so a double submit stores one label (the second is DUPLICATE; a different second answer is
409). Thumbs on the chat's assistant turns are also stored as a first-class feedback label
(store.feedback, label_id `<task_id>/<annotator>/thumbs`), committed with the ranking.
Suggestions (store.suggestions) are shown and recorded apart; the label's metadata names them,
and they never become a label. A session task's answer is one feedback label (label_id
`<task_id>/<annotator>`, the task's conversation) that closes the task (store.session_tasks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rm_service.conversation import completion_id, conversation_id, scored_turns
from rm_service.errors import AlreadyExists, InvalidArgument, RMError
from rm_service.server.admission import Ticket
from rm_service.server.http.app import Caller, HttpContext, caller, context
from rm_service.server.http.guard import field_name, read_json
from rm_service.store import suggestions, tasks
from rm_service.store.feedback import FeedbackIn, TurnThumb
from rm_service.store.labels import LabelIn
from rm_service.store.suggestions import Suggestion

log = logging.getLogger(__name__)

LABELER = "labeler"
SUGGESTION_DEADLINE_S = 30.0
THUMBS = ("up", "down")
ANSWER_FIELDS = {"ranks", "strength", "rationale", "turn_feedback"}
SESSION_FIELDS = {"turn_feedback", "outcome", "rationale"}


def routes() -> list[Route]:
    return [
        Route("/api/me", me, methods=["GET"]),
        Route("/api/next", next_task, methods=["POST"]),
        Route("/api/tasks/{task_id}/renew", renew, methods=["POST"]),
        Route("/api/tasks/{task_id}/skip", skip, methods=["POST"]),
        Route("/api/tasks/{task_id}/label", label, methods=["POST"]),
        Route("/api/progress", progress, methods=["GET"]),
    ]


async def me(request: Request) -> JSONResponse:
    who = caller(request, LABELER)
    ctx = context(request)
    return JSONResponse(
        {
            "annotator": who.annotator,
            "role": who.role,
            "auth": bool(ctx.tokens),
            "lease_seconds": ctx.settings.labeling_lease_s,
        }
    )


async def progress(request: Request) -> JSONResponse:
    who = caller(request, LABELER)
    return JSONResponse(await _progress(context(request), who))


async def next_task(request: Request) -> JSONResponse:
    who = caller(request, LABELER)
    ctx = context(request)
    leased = await asyncio.to_thread(
        tasks.lease, ctx.need_store(), who.annotator, 1, ctx.settings.labeling_lease_s, True, tasks.KINDS
    )
    task = None
    if leased:
        t = leased[0]
        session = t.kind == "session"
        shown = [] if session else await _suggest(ctx, t)
        task = {
            "task_id": t.task_id,
            "kind": t.kind,
            "prompt": [] if session else [m.as_dict() for m in t.prompt],
            "conversation": [m.as_dict() for m in t.prompt] if session else [],
            "scored_turns": scored_turns(t.prompt) if session else [],
            "completions": t.completions,
            "policy_version": t.policy_version,
            "lease_expires_unix_ms": t.lease_expires_unix_ms,
            "suggestions": [s.as_dict() for s in shown],
        }
    return JSONResponse({"task": task, "progress": await _progress(ctx, who)})


async def renew(request: Request) -> JSONResponse:
    who = caller(request, LABELER)
    ctx = context(request)
    expires = await asyncio.to_thread(
        tasks.renew, ctx.need_store(), request.path_params["task_id"], who.annotator, ctx.settings.labeling_lease_s
    )
    return JSONResponse({"lease_expires_unix_ms": expires})


async def skip(request: Request) -> JSONResponse:
    who = caller(request, LABELER)
    ctx = context(request)
    await asyncio.to_thread(tasks.release, ctx.need_store(), request.path_params["task_id"], who.annotator, True)
    return JSONResponse({"skipped": request.path_params["task_id"], "progress": await _progress(ctx, who)})


async def label(request: Request) -> JSONResponse:
    who = caller(request, LABELER)
    ctx = context(request)
    body = await read_json(request)
    task_id = request.path_params["task_id"]
    task = await asyncio.to_thread(tasks.get, ctx.need_store(), task_id)
    label_id = f"{task_id}/{who.annotator}"
    await asyncio.to_thread(tasks.check_held, ctx.need_store(), task_id, who.annotator, label_id)
    if task.kind == "session":
        answers: list[LabelIn | FeedbackIn] = [_session_answer(body, task, who, label_id)]
    else:
        shown = await asyncio.to_thread(suggestions.shown, ctx.need_store(), task_id)
        answer = _answer(body, task, who, label_id, shown)
        answers = [answer, *_thumbs_label(answer, task)]
    [outcome, *_] = await ctx.need_writer().ingest(answers, origin="human")  # one group commit: all or none
    if outcome.status == "REJECTED":
        field, _, message = outcome.reason.partition(": ")
        raise InvalidArgument(field.replace("labels[0].", "", 1).replace("feedback[0].", "", 1), message)
    if outcome.status == "CONFLICT":
        raise AlreadyExists(f"task {task_id} was already answered by {who.annotator} with another answer; it is kept")
    return JSONResponse({"label_id": label_id, "status": outcome.status, "progress": await _progress(ctx, who)})


def _answer(body: dict, task: tasks.Task, who: Caller, label_id: str, shown: list[Suggestion]) -> LabelIn:
    """The person's answer as a label; the store validates ranks (dense, one per completion)
    and strength. Here: the body's shape and the thumbs, which only this page sends."""
    unknown = sorted(set(body) - ANSWER_FIELDS)
    if unknown:
        raise InvalidArgument(
            field_name((unknown[0],)), f"unknown field; an answer has {', '.join(sorted(ANSWER_FIELDS))}"
        )
    ranks = body.get("ranks")
    if not isinstance(ranks, list):
        raise InvalidArgument(
            "ranks",
            f"must be a list of {len(task.completions)} ranks (0 = best, ties equal), got {type(ranks).__name__}",
        )
    strength = body.get("strength")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))):
        raise InvalidArgument("strength", f"must be a number or null, got {type(strength).__name__}")
    rationale = body.get("rationale") or ""
    if not isinstance(rationale, str):
        raise InvalidArgument("rationale", f"must be a string, got {type(rationale).__name__}")
    metadata = {"interface": "labeling-page"}
    thumbs = _turn_feedback(body.get("turn_feedback") or {}, task)
    if thumbs:
        metadata["turn_feedback"] = json.dumps(thumbs, sort_keys=True)
    if shown:
        metadata["suggestions_shown"] = ",".join(f"{s.kind}:{s.origin}" for s in shown)
    return LabelIn(
        label_id=label_id,
        prompt=task.prompt,
        responses=task.completions,
        ranks=ranks,
        source="HUMAN",
        annotator=who.annotator,
        strength=float(strength) if strength is not None else None,
        rationale=rationale.strip(),
        metadata=metadata,
        task_id=task.task_id,
    )


def _session_answer(body: dict, task: tasks.Task, who: Caller, label_id: str) -> FeedbackIn:
    """A person's thumbs and outcome on a played session, as one feedback label on its conversation."""
    unknown = sorted(set(body) - SESSION_FIELDS)
    if unknown:
        raise InvalidArgument(
            field_name((unknown[0],)), f"unknown field; a session's answer has {', '.join(sorted(SESSION_FIELDS))}"
        )
    outcome = body.get("outcome")
    if outcome is not None and (isinstance(outcome, bool) or not isinstance(outcome, (int, float))):
        raise InvalidArgument(
            "outcome", f"must be a number in [0, 1] (1 = success) or null, got {type(outcome).__name__}"
        )
    rationale = body.get("rationale") or ""
    if not isinstance(rationale, str):
        raise InvalidArgument("rationale", f"must be a string, got {type(rationale).__name__}")
    chosen = _turn_feedback(body.get("turn_feedback") or {}, task)
    scored = set(scored_turns(task.prompt))
    for index in chosen:
        if int(index) not in scored:
            raise InvalidArgument(
                f"turn_feedback[{index!r}]", "is an assistant turn before any user turn; it answers nothing"
            )
    if not chosen and outcome is None:
        raise InvalidArgument("turn_feedback", "give a thumb on at least one turn or the session's outcome (or both)")
    return FeedbackIn(
        label_id=label_id,
        conversation=task.prompt,
        thumbs=[TurnThumb(int(i), v == "up") for i, v in sorted(chosen.items(), key=lambda kv: int(kv[0]))],
        outcome=float(outcome) if outcome is not None else None,
        source="HUMAN",
        annotator=who.annotator,
        rationale=rationale.strip(),
        metadata={"interface": "labeling-page"},
        task_id=task.task_id,
    )


def _thumbs_label(answer: LabelIn, task: tasks.Task) -> list[FeedbackIn]:
    """The answer's thumbs as a feedback label on the chat (docs/feedback.md): those on turns a
    reward model scores (an assistant greeting before any user turn stays in metadata only)."""
    chosen = json.loads(answer.metadata.get("turn_feedback", "{}"))
    scored = set(scored_turns(task.prompt))
    thumbs = [
        TurnThumb(int(i), v == "up") for i, v in sorted(chosen.items(), key=lambda kv: int(kv[0])) if int(i) in scored
    ]
    if not thumbs:
        return []
    return [
        FeedbackIn(
            label_id=f"{answer.label_id}/thumbs",
            conversation=task.prompt,
            thumbs=thumbs,
            source="HUMAN",
            annotator=answer.annotator,
            metadata={"interface": "labeling-page", "ranking": answer.label_id},
            task_id=task.task_id,
        )
    ]


def _turn_feedback(value, task: tasks.Task) -> dict[str, str]:
    """{message index: "up" | "down"} for assistant turns of the prompt."""
    if not isinstance(value, dict):
        raise InvalidArgument("turn_feedback", f"must map message indexes to up or down, got {type(value).__name__}")
    out = {}
    for key, thumb in value.items():
        index = int(key) if key.isascii() and key.isdecimal() and len(key) <= 6 else -1  # not '²', not 5,000 digits
        if not 0 <= index < len(task.prompt) or task.prompt[index].role != "assistant":
            raise InvalidArgument(
                f"turn_feedback[{str(key)[:20]!r}]", "is not the index of an assistant turn of the prompt"
            )
        if thumb not in THUMBS:
            raise InvalidArgument(
                f"turn_feedback[{str(key)[:20]!r}]", f"must be one of {', '.join(THUMBS)}, got {str(thumb)[:20]!r}"
            )
        out[str(index)] = thumb
    return out


async def _suggest(ctx: HttpContext, task: tasks.Task) -> list[Suggestion]:
    """Record the served model's scores (once per version) and judges' rankings of the same
    completions for this task; return every suggestion recorded for it."""
    conv = conversation_id(task.prompt)
    found = await asyncio.to_thread(
        suggestions.judge_suggestions, ctx.need_store(), [completion_id(conv, c) for c in task.completions]
    )
    recorded = await asyncio.to_thread(suggestions.shown, ctx.need_store(), task.task_id)
    reward = ctx.reward  # None in a process that serves no model
    served = reward.served.default if reward is not None else None  # None until the model is loaded
    if (
        reward is not None
        and served is not None
        and not any(s.kind == "model" and s.origin == served for s in recorded)
    ):
        try:
            scored = await reward.score(
                [(task.prompt, c) for c in task.completions], "", Ticket(time.monotonic() + SUGGESTION_DEADLINE_S)
            )
            rewards = [float(r) for r in scored.reward]
            found.append(
                Suggestion("model", scored.version, scored.version, suggestions.ranks_from_scores(rewards), rewards)
            )
        except RMError as exc:  # overloaded, swapping: the page works without the model's suggestion
            log.warning("no model suggestion for %s: %s", task.task_id, exc)
    if found:
        await asyncio.to_thread(suggestions.record, ctx.need_store(), task.task_id, found)
        recorded = await asyncio.to_thread(suggestions.shown, ctx.need_store(), task.task_id)
    return recorded


async def _progress(ctx: HttpContext, who: Caller) -> dict[str, int]:
    return await asyncio.to_thread(tasks.progress, ctx.need_store(), who.annotator)
