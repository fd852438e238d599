"""POST /simulate_user: SimulateUser over HTTP (role `scorer`; admin passes too).

    {"conversations": [[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}], ...],
     "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64, "seed": 7, "model": "u3"}
    -> {"results": [{"content": str, "ended": bool, "num_tokens": int, "end_probability": float,
                     "complete": bool, "truncated": bool}, ...], "model_version": "u3", "seed": 7}

The same path as gRPC's SimulateUser (server.user.UserService.simulate): the same validation
(400 naming the field), the scoring core's admission (429 with Retry-After when overloaded, asked
before the body is read), model thread, version
pinning and seed. Every field but `conversations` may be left out (temperature 1, top-p 1, the
server's max_new_tokens, a fresh seed, the served user model). A `content` is a string or a
list of text parts. A caller that disconnects has its call dropped before, or stopped during,
its turn on the model.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rm_client.messages import role_and_text
from rm_service.conversation import Message
from rm_service.errors import InvalidArgument
from rm_service.server.http.app import HTTP_TICKET, caller, context, counted, finite, until_disconnect
from rm_service.server.http.guard import read_json

SCORER = "scorer"


def routes() -> list[Route]:
    return [Route("/simulate_user", counted("/simulate_user")(simulate_user), methods=["POST"])]


async def simulate_user(request: Request) -> JSONResponse:
    caller(request, SCORER)
    ctx = context(request)
    user = ctx.need_user()
    await user.core.check_room(HTTP_TICKET)  # before the body is read: a refusal costs the request alone
    body = await read_json(request, ctx.settings.max_message_bytes)
    convs = user.conversations(_conversations(body.get("conversations")))
    sampling = user.sampling(
        _number(body, "temperature"), _number(body, "top_p"), body.get("max_new_tokens") or 0, body.get("seed")
    )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidArgument("model", f"must be a string (a loaded user-model version), got {type(model).__name__}")
    done = await until_disconnect(request, user.simulate(convs, sampling, model or "", HTTP_TICKET))
    return JSONResponse(
        {
            "results": [
                {
                    "content": t.content,
                    "ended": t.ended,
                    "num_tokens": t.num_tokens,
                    "end_probability": finite(t.p_end),
                    "complete": t.complete,
                    "truncated": t.truncated,
                }
                for t in done.turns
            ],
            "model_version": done.version,
            "seed": done.seed,
        }
    )


def _conversations(value) -> list[list[Message]]:
    if not isinstance(value, list):
        raise InvalidArgument(
            "conversations",
            "must be a list of conversations (lists of messages), got "
            + ("nothing" if value is None else type(value).__name__),
        )
    out = []
    for i, conv in enumerate(value):
        if not isinstance(conv, list):
            raise InvalidArgument(f"conversations[{i}]", f"must be a list of messages, got {type(conv).__name__}")
        messages = []
        for j, m in enumerate(conv):
            try:
                role, text = role_and_text(m, f"conversations[{i}][{j}]")
            except ValueError as exc:
                field, _, why = str(exc).partition(": ")
                raise InvalidArgument(field, why) from None
            messages.append(Message(role, text))
        out.append(messages)
    return out


def _number(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise InvalidArgument(key, f"must be a number, got {type(value).__name__}")
    return value
