"""Per-turn thumbs and session outcomes end to end: IngestFeedback on a real server, the stored
rows, the feedback file format, the objective on synthetic features, head-mode training on the
tiny backbone, and ScoreTurns' session value from the served version."""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest
from conftest import ServerThread
from feedback_data import hh_feedback

from rm_service import registry
from rm_service.api.v1 import common_pb2, preference_pb2, preference_pb2_grpc, reward_pb2, reward_pb2_grpc
from rm_service.conversation import Message
from rm_service.formats import export_file, import_file
from rm_service.models.version import read_meta
from rm_service.settings import ModelSettings, ServeSettings, StoreSettings, TrainSettings
from rm_service.store.db import Store
from rm_service.train.feedback import FeedbackData, auc, feedback_metrics
from rm_service.train.heads import PairData, fit_heads
from rm_service.train.run import train

CHAT = [
    ("user", "My order has not arrived."),
    ("assistant", "Sorry! What is the order number?"),
    ("user", "It is 4417."),
    ("assistant", "It ships tomorrow; I added express delivery for free."),
    ("user", "Thanks, that works."),
]


def conversation(turns=CHAT) -> list[common_pb2.Message]:
    return [common_pb2.Message(role=r, content=c) for r, c in turns]


def thumb(index: int, up: bool = True) -> preference_pb2.TurnThumb:
    return preference_pb2.TurnThumb(
        message_index=index, thumb=preference_pb2.THUMB_UP if up else preference_pb2.THUMB_DOWN
    )


def feedback(label_id: str, thumbs=(), outcome=None, turns=CHAT, **kw) -> preference_pb2.Feedback:
    fb = preference_pb2.Feedback(
        label_id=label_id,
        conversation=conversation(turns),
        thumbs=list(thumbs),
        source=kw.pop("source", preference_pb2.HUMAN),
        annotator=kw.pop("annotator", "alice"),
        **kw,
    )
    if outcome is not None:
        fb.outcome = outcome
    return fb


@pytest.fixture
def preference(server):
    channel = grpc.insecure_channel(server.address)
    yield preference_pb2_grpc.PreferenceServiceStub(channel)
    channel.close()


# -- ingestion on a real server ------------------------------------------------------------


def test_ingest_feedback_is_idempotent_and_keeps_provenance(server, preference):
    good = feedback("fb-1", [thumb(1), thumb(3, up=False)], outcome=1.0, rationale="solved it", metadata={"shop": "eu"})
    only_outcome = feedback("fb-2", outcome=0.25, source=preference_pb2.JUDGE, annotator="judge@v2")
    first = preference.IngestFeedback(preference_pb2.IngestFeedbackRequest(feedback=[good, only_outcome]), timeout=30)
    assert [r.status for r in first.results] == [preference_pb2.INSERTED, preference_pb2.INSERTED]
    changed = feedback("fb-1", [thumb(1)], outcome=1.0, rationale="solved it", metadata={"shop": "eu"})
    again = preference.IngestFeedback(preference_pb2.IngestFeedbackRequest(feedback=[good, changed, good]), timeout=30)
    assert [r.status for r in again.results] == [
        preference_pb2.DUPLICATE,
        preference_pb2.CONFLICT,
        preference_pb2.DUPLICATE,
    ]
    # A ranking label may not reuse a feedback's id: one key space.
    label = preference_pb2.Label(
        label_id="fb-1",
        prompt=conversation(CHAT[:1]),
        responses=["a", "b"],
        ranks=[0, 1],
        source=preference_pb2.HUMAN,
        annotator="alice",
    )
    clash = preference.IngestLabels(preference_pb2.IngestLabelsRequest(labels=[label]), timeout=30)
    assert clash.results[0].status == preference_pb2.CONFLICT

    con = server.server.store.con
    assert con.execute(
        "SELECT label_id, source, annotator, rationale, metadata::VARCHAR FROM labels ORDER BY seq"
    ).fetchall() == [("fb-1", "HUMAN", "alice", "solved it", '{"shop": "eu"}'), ("fb-2", "JUDGE", "judge@v2", "", "{}")]
    assert con.execute(
        "SELECT label_id, kind, message_index, value FROM label_feedback ORDER BY label_id, kind, message_index"
    ).fetchall() == [
        ("fb-1", "outcome", -1, 1.0),
        ("fb-1", "thumb", 1, 1.0),
        ("fb-1", "thumb", 3, 0.0),
        ("fb-2", "outcome", -1, 0.25),
    ]
    assert con.execute("SELECT num_turns FROM conversations").fetchall() == [
        (5,)
    ]  # the whole conversation, stored once
    stats = preference.GetStats(preference_pb2.GetStatsRequest(), timeout=30)
    assert stats.labels_total == 2 and stats.pairs == 0 and stats.labels_by_source["JUDGE"] == 1
    assert (stats.feedback_labels, stats.thumbs, stats.outcomes) == (2, 2, 2)


BAD = [  # (feedback, the field its reason must name)
    (feedback("bad-range", [thumb(7)]), "feedback[1].thumbs[0].message_index: is 7; out of range"),
    (feedback("bad-user", [thumb(2)]), "feedback[2].thumbs[0].message_index: is 2, a user turn"),
    (feedback("bad-nan", outcome=float("nan")), "feedback[3].outcome: must be finite"),
    (feedback("bad-inf", [thumb(1)], outcome=float("-inf")), "feedback[4].outcome: must be finite"),
    (feedback("bad-big", outcome=2.0), "feedback[5].outcome: must be <= 1.0"),
    (feedback("bad-empty"), "feedback[6]: holds neither thumbs nor an outcome"),
    (
        feedback("bad-unset", [preference_pb2.TurnThumb(message_index=1)]),
        "feedback[7].thumbs[0].thumb: must be THUMB_UP or THUMB_DOWN",
    ),
    (
        feedback("bad-twice", [thumb(1), thumb(1, up=False)]),
        "feedback[8].thumbs[1].message_index: turn 1 already has a thumb",
    ),
    (feedback("bad-neg", [thumb(-(2**31))]), "feedback[9].thumbs[0].message_index: is -2147483648; out of range"),
    (
        feedback("bad-first", [thumb(0)], turns=[("assistant", "Hi! How can I help?"), ("user", "Hello.")]),
        "feedback[10].thumbs[0].message_index: is 0, an assistant turn before any user turn",
    ),
    (feedback("bad-source", [thumb(1)], source=0), "feedback[11].source: unknown source 'LABEL_SOURCE_UNSPECIFIED'"),
    (feedback("bad-who", [thumb(1)], annotator=" "), "feedback[12].annotator: is required"),
    (feedback("", [thumb(1)]), "feedback[13].label_id: is required"),
    (
        feedback("bad-role", [thumb(1)], turns=[("user", "Hi"), ("robot", "beep")]),
        "feedback[14].conversation[1].role: unknown role",
    ),
]


def test_each_hostile_feedback_fails_alone_naming_its_field(server, preference):
    items = [feedback("ok-1", [thumb(3)])] + [fb for fb, _ in BAD] + [feedback("ok-2", outcome=0.0)]
    response = preference.IngestFeedback(preference_pb2.IngestFeedbackRequest(feedback=items), timeout=30)
    statuses = [r.status for r in response.results]
    assert statuses == [preference_pb2.INSERTED] + [preference_pb2.REJECTED] * len(BAD) + [preference_pb2.INSERTED]
    for result, (_, reason) in zip(response.results[1:-1], BAD, strict=True):
        assert result.reason.startswith(reason), result.reason
    con = server.server.store.con
    assert [r[0] for r in con.execute("SELECT label_id FROM labels ORDER BY seq").fetchall()] == ["ok-1", "ok-2"]
    assert con.execute("SELECT count(*) FROM label_feedback").fetchone()[0] == 2


def test_empty_feedback_request_is_invalid_argument(preference):
    with pytest.raises(grpc.RpcError) as err:
        preference.IngestFeedback(preference_pb2.IngestFeedbackRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("feedback:")


# -- the feedback file format --------------------------------------------------------------


def record(label_id: str, **extra) -> dict:
    """A canonical feedback line (every key, in export order)."""
    base = {
        "label_id": label_id,
        "conversation": [{"role": r, "content": c} for r, c in CHAT],
        "thumbs": [{"message_index": 1, "up": True}, {"message_index": 3, "up": False}],
        "outcome": 1.0,
        "source": "HUMAN",
        "annotator": "alice",
        "rationale": "",
        "metadata": {},
        "task_id": "",
    }
    return base | extra


def test_feedback_file_imports_exports_exactly_and_rejects_bad_lines_alone(home, tmp_path):
    good = [
        record("a"),
        record("b", thumbs=[], outcome=0.5, metadata={"z": "1", "a": "2"}, rationale="meh"),
        record("c", outcome=None, source="JUDGE", annotator="judge@v1"),
    ]
    lines = [json.dumps(r) for r in good[:2]]
    lines += [
        # message_index out of range
        '{"conversation": [{"role": "user", "content": "x"}], "thumbs": [{"message_index": 5, "up": true}]}',
        json.dumps(record("d", thumbs=[{"message_index": 1, "up": "yes"}])),  # not a bool
        json.dumps(record("e", outcome=1e309 * 0)),  # NaN
        json.dumps(record("f", colour="blue")),  # unknown key
        "not json",
        json.dumps(good[2]),
    ]
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    store = Store(StoreSettings())
    counts, reasons = import_file(store, path, "feedback", annotator="people")
    assert counts["INSERTED"] == 3 and counts["REJECTED"] == 5
    assert [r.split(":")[0] for r in reasons] == ["line 3", "line 4", "line 5", "line 6", "line 7"]
    assert (
        "thumbs[0].message_index: is 5; out of range" in reasons[0]
        and "thumbs[0].up must be true or false" in reasons[1]
    )
    assert "outcome: must be finite" in reasons[2] and "unknown keys ['colour']" in reasons[3]
    out = tmp_path / "out.jsonl"
    written, snapshot = export_file(store, out, "feedback")
    exported = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert written == 3 and exported == [good[0], good[1] | {"metadata": {"a": "2", "z": "1"}}, good[2]]
    again, _ = import_file(store, out, "feedback")
    assert again["DUPLICATE"] == 3 and again["INSERTED"] == 0
    assert export_file(store, tmp_path / "same.jsonl", "feedback", snapshot)[0] == 3
    assert (tmp_path / "same.jsonl").read_text(encoding="utf-8") == out.read_text(encoding="utf-8")
    store.close()


def test_cli_imports_and_exports_feedback(home, tmp_path):
    import os
    import subprocess
    import sys

    def cli(*args):
        env = {**os.environ, "RM_HOME": str(home)}
        return subprocess.run(
            [sys.executable, "-m", "rm_service.cli", *args], capture_output=True, text=True, env=env, timeout=300
        )

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(record("a")) + "\n" + json.dumps(record("b", outcome=7.5)) + "\n", encoding="utf-8")
    imported = cli("import", "--format", "feedback", str(path))
    assert imported.returncode == 0, imported.stderr
    assert (
        "inserted 1" in imported.stdout
        and "rejected 1" in imported.stdout
        and "line 2: b: outcome: must be <= 1.0" in imported.stdout + imported.stderr
    )
    out = tmp_path / "out.jsonl"
    exported = cli("export", "--format", "feedback", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [record("a")]
    missing = cli("import", "--format", "feedback", str(tmp_path / "nothing.jsonl"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


# -- the objective, on synthetic features --------------------------------------------------


def _no_pairs(width: int) -> PairData:
    return PairData(np.zeros((0, width)), np.zeros((0, width)), np.zeros(0), None, [])


def test_thumbs_alone_recover_the_turn_reward_and_its_offset():
    rng = np.random.default_rng(0)
    w = np.array([1.5, -1.0, 0.0, 0.5])
    x = rng.normal(size=(3000, 4))  # [T, F]
    y = (rng.random(3000) < 1 / (1 + np.exp(-(x @ w - 0.7)))).astype(float)  # P(up) = sigmoid(r - 0.7)
    data = FeedbackData(
        x, y, np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0), [str(i) for i in range(3000)], []
    )
    fit = fit_heads(_no_pairs(4), 1, 1e-4, feedback=data)
    r = x @ fit.weight[0] + fit.bias[0]
    assert np.allclose(fit.weight[0], w, atol=0.15)
    assert abs((r - fit.offsets["thumb_offset"]) - (x @ w - 0.7)).mean() < 0.15  # the logit, whatever the centring
    assert set(fit.offsets) == {"thumb_offset"}


def test_an_outcome_on_the_sum_gives_credit_to_every_turn_not_just_the_last():
    """Sessions of 2-4 turns whose success depends on the sum of per-turn rewards: trained on
    outcomes alone, the model ranks single turns (first turns included) by their true reward."""
    rng = np.random.default_rng(1)
    w = np.array([1.0, -0.8, 0.0])
    lengths = rng.integers(2, 5, size=4000)
    session = np.repeat(np.arange(4000), lengths)  # [U]
    x = rng.normal(size=(len(session), 3))  # [U, F]
    value = np.bincount(session, weights=x @ w)  # [S]
    y = (rng.random(4000) < 1 / (1 + np.exp(-(value + 0.5)))).astype(float)
    data = FeedbackData(np.zeros((0, 3)), np.zeros(0), x, session, y, [], [str(i) for i in range(4000)])
    fit = fit_heads(_no_pairs(3), 2, 1e-4, feedback=data)
    first = np.r_[0, np.cumsum(lengths)[:-1]]  # index of each session's first turn
    r = x @ fit.weight.mean(0) + fit.bias.mean()
    assert auc(r[first], (x[first] @ w > 0).astype(float)) > 0.9
    assert np.corrcoef(r, x @ w)[0, 1] > 0.95
    m = feedback_metrics(data, fit.weight, fit.bias, fit.offsets, "")
    assert m["outcomes"] == 4000 and m["outcome_auc"] > 0.75 and set(fit.offsets) == {"outcome_offset"}


def test_feedback_terms_leave_a_pairs_only_fit_unchanged():
    rng = np.random.default_rng(2)
    x_w, x_l = rng.normal(size=(200, 5)) + 0.3, rng.normal(size=(200, 5))
    pairs = PairData(x_w, x_l, np.ones(200), None, [str(i) for i in range(200)])
    empty = FeedbackData(
        np.zeros((0, 5)), np.zeros(0), np.zeros((0, 5)), np.zeros(0, dtype=np.int64), np.zeros(0), [], []
    )
    a, b = fit_heads(pairs, 2, 0.3), fit_heads(pairs, 2, 0.3, feedback=empty, term_weights=(5.0, 1.0, 1.0))
    assert np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias) and b.offsets == {}


def _sessions(n: int, seed: int) -> FeedbackData:
    """Sessions of 2-4 turns where the turns people upvote are not the turns that lead to success:
    P(up | turn) = sigmoid(w_thumb . x - 0.3), P(success) = sigmoid(sum of w_success . x + 0.5),
    w_thumb and w_success nearly orthogonal (and opposed on one feature). Every turn has a thumb."""
    rng = np.random.default_rng(seed)
    w_thumb, w_success = np.array([1.5, 0.0, 0.5, 0.0, 0.0]), np.array([0.0, 1.5, -0.5, 0.0, 0.0])
    lengths = rng.integers(2, 5, size=n)
    session = np.repeat(np.arange(n), lengths)  # [U]
    x = rng.normal(size=(len(session), 5))  # [U, F]
    up = (rng.random(len(session)) < 1 / (1 + np.exp(-(x @ w_thumb - 0.3)))).astype(float)  # [U]
    y = (rng.random(n) < 1 / (1 + np.exp(-(np.bincount(session, weights=x @ w_success) + 0.5)))).astype(float)  # [S]
    groups = [f"{i}" for i in range(n)]
    return FeedbackData(x, up, x, session, y, [groups[i] for i in session], groups)


def test_separate_heads_fit_thumbs_and_outcomes_as_well_as_single_objective_fits():
    """The probe of issue #28: one reward explaining both thumbs and outcomes serves a P(up)
    that carries little when they disagree; a separate session head fits each as well as a fit
    on that kind alone (held-out AUC within 0.03)."""
    data = _sessions(3000, 3)
    train, test = data.rows(lambda g: int(g) % 4 != 0), data.rows(lambda g: int(g) % 4 == 0)  # 750 held-out sessions

    def heldout(feedback, **kw):
        fit = fit_heads(_no_pairs(5), 1, 1e-3, feedback=feedback, **kw)
        return feedback_metrics(test, fit.weight, fit.bias, fit.offsets, "", fit.session)

    thumbs_only, outcomes_only = heldout(train.without_outcomes()), heldout(train.outcomes_only())
    shared, separate = heldout(train), heldout(train, separate_session=True)
    print(
        f"held-out thumb AUC / outcome AUC: thumbs only {thumbs_only['thumb_auc']:.3f}, outcomes only "
        f"{outcomes_only['outcome_auc']:.3f}, shared {shared['thumb_auc']:.3f} / {shared['outcome_auc']:.3f}, "
        f"separate {separate['thumb_auc']:.3f} / {separate['outcome_auc']:.3f}"
    )
    assert thumbs_only["thumb_auc"] > 0.75 and outcomes_only["outcome_auc"] > 0.85  # each kind is learnable alone
    assert shared["thumb_auc"] < thumbs_only["thumb_auc"] - 0.1  # the defect: the outcomes pull the one reward away
    assert abs(separate["thumb_auc"] - thumbs_only["thumb_auc"]) <= 0.03
    assert abs(separate["outcome_auc"] - outcomes_only["outcome_auc"]) <= 0.03


def test_separate_session_head_needs_something_else_for_the_turn_reward():
    """Outcomes alone: one head (the turn reward is the outcome head) whatever the setting."""
    data = _sessions(300, 4)
    alone = fit_heads(_no_pairs(5), 1, 1e-3, feedback=data.outcomes_only(), separate_session=True)
    assert alone.session is None and set(alone.offsets) == {"outcome_offset"}
    both = fit_heads(_no_pairs(5), 2, 1e-3, feedback=data, separate_session=True)
    assert both.session[0].shape == (2, 5) and set(both.offsets) == {"thumb_offset", "outcome_offset"}


# -- training on the tiny backbone and serving the version ----------------------------------


@pytest.fixture
def feedback_version(home, tiny_backbone_dir):
    """A head-mode version trained on HH feedback only (thumbs and outcomes), on the tiny backbone."""
    store = Store(StoreSettings())
    labels = hh_feedback(60, thumbs=True, outcomes=True)
    assert {o.status for o in store.ingest(labels)} == {"INSERTED"}
    settings = TrainSettings(
        backbone=str(tiny_backbone_dir),
        max_minutes=2,
        ensemble_size=2,
        max_tokens=256,
        heldout_fraction=0.2,
        precision="fp32",
        export_onnx="off",
    )
    result = train(store, settings, ModelSettings(), show_progress=False)
    rec = registry.get_model(store, result.version)
    store.close()
    return result, rec


def test_feedback_only_training_registers_a_version_with_its_offsets(feedback_version):
    result, rec = feedback_version
    assert result.promoted and math.isnan(rec.metrics["accuracy"])  # no pairs: no pair accuracy, first version promoted
    m = rec.metrics
    assert m["thumbs"] + m["train_thumbs"] == 120 and m["outcomes"] + m["train_outcomes"] == 120
    assert 0 <= m["thumb_auc"] <= 1 and 0 <= m["outcome_auc"] <= 1 and m["train_thumb_loss"] < math.log(2) + 0.05
    meta = read_meta(rec.artifact_path)
    assert meta.info["feedback"]["session_value"] == "sum" and len(meta.golden) == 4
    assert set(meta.info["feedback"]) == {"session_value", "session_head", "thumb_offset", "outcome_offset"}
    assert meta.info["feedback"]["session_head"] == "separate"  # thumbs train the turn reward, outcomes their own head
    assert math.isfinite(meta.reward_mean) and meta.reward_std > 0


def test_score_turns_returns_the_session_value_the_model_was_trained_for(home, feedback_version):
    _, rec = feedback_version
    srv = ServerThread(
        ServeSettings(port=0, model=rec.artifact_path, precision="fp32", with_store=False, metrics_port=-1)
    )
    channel = grpc.insecure_channel(srv.address)
    try:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        response = stub.ScoreTurns(reward_pb2.ScoreTurnsRequest(conversation=conversation()), timeout=60)
        offsets = read_meta(rec.artifact_path).info["feedback"]
        raw = [t.raw_score for t in response.turns]
        credit = [t.session_credit for t in response.turns]  # the session head's, one per turn
        assert [t.message_index for t in response.turns] == [1, 3]
        assert all(t.HasField("session_credit") for t in response.turns) and credit != pytest.approx(raw)
        assert response.session_value == pytest.approx(sum(credit), rel=1e-5, abs=1e-5)
        assert response.HasField("session_success")
        assert response.session_success == pytest.approx(
            1 / (1 + math.exp(-(sum(credit) - offsets["outcome_offset"]))), rel=1e-4
        )
        long_chat = [(r, c * 40) for r, c in CHAT]  # past the model's max tokens: each turn scored alone
        cut = stub.ScoreTurns(reward_pb2.ScoreTurnsRequest(conversation=conversation(long_chat)), timeout=60)
        assert cut.session_value == pytest.approx(sum(t.session_credit for t in cut.turns), rel=1e-5, abs=1e-5)
        assert cut.turns[1].raw_score != pytest.approx(raw[1], abs=1e-3)
        for t in response.turns:
            assert t.HasField("thumb_up") and t.thumb_up == pytest.approx(
                1 / (1 + math.exp(-(t.raw_score - offsets["thumb_offset"]))), rel=1e-4
            )
        single = stub.Score(
            reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=conversation(CHAT[:3]), completion=CHAT[3][1])]),
            timeout=60,
        )
        assert single.results[0].raw_score == pytest.approx(
            raw[1], abs=1e-4
        )  # a turn's reward is the pair reward of that turn
        with pytest.raises(grpc.RpcError) as err:
            stub.ScoreTurns(reward_pb2.ScoreTurnsRequest(conversation=conversation(CHAT[:1])), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("conversation:")
    finally:
        channel.close()
        srv.stop()


def test_score_turns_of_a_pairs_only_model_has_a_value_but_no_probabilities(server):
    channel = grpc.insecure_channel(server.address)
    try:
        response = reward_pb2_grpc.RewardServiceStub(channel).ScoreTurns(
            reward_pb2.ScoreTurnsRequest(conversation=conversation()), timeout=60
        )
    finally:
        channel.close()
    assert response.session_value == pytest.approx(sum(t.raw_score for t in response.turns), rel=1e-5, abs=1e-5)
    assert not response.HasField("session_success") and not any(t.HasField("thumb_up") for t in response.turns)
    assert not any(t.HasField("session_credit") for t in response.turns)  # no session head: the value sums raw scores


def test_full_mode_refuses_a_store_of_feedback_only(home):
    from rm_service.errors import FailedPrecondition

    store = Store(StoreSettings())
    store.ingest(hh_feedback(3))
    with pytest.raises(FailedPrecondition, match="no preference pairs"):
        train(store, TrainSettings(mode="full", backbone="unused"), ModelSettings(), show_progress=False)
    store.close()


def test_scored_turns_are_the_assistant_turns_after_the_first_user_turn():
    from rm_service.conversation import scored_turns

    assert scored_turns(
        [
            Message("system", "s"),
            Message("assistant", "a"),
            Message("user", "u"),
            Message("assistant", "b"),
            Message("user", "v"),
            Message("assistant", "c"),
        ]
    ) == [3, 5]
