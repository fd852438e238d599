"""How well a user model predicts real people, and how its samples compare with them.

Teacher-forced, on conversations it never saw (per number of prior user turns and overall):
NLL per user-turn token (the turn's tokens and the token that closes it) and perplexity, for a
model and for its untuned base model side by side, with a 95% bootstrap interval over
conversations for each and for their paired difference; the end event's calibration (ECE over
10 bins, Brier score, mean P(end) against the real rate) at every decision after an assistant
turn. Sampled (temperature 1, top-p 1, as the simulator serves by default), after contexts
cut at assistant turns: the length distribution of sampled user turns against the real ones
that followed the same contexts (Kolmogorov-Smirnov distance, lengths in tokens, both capped
at the sampling budget), distinct-2 (distinct word bigrams over all bigrams), and the sampled
end rate against the real one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import ks_2samp
from tqdm import tqdm

from rm_service.usermodel.data import Conversation
from rm_service.usermodel.format import DECISION, USER_TOKEN
from rm_service.usermodel.generate import Sampling, simulate
from rm_service.usermodel.runtime import Scored, UserRuntime, score

BOOTSTRAP = 1000
ECE_BINS = 10


@dataclass
class Teacher:
    """Teacher-forced results of one model on a set of conversations."""

    scored: Scored
    conv: np.ndarray  # [N] conversation index of each learned position


def teacher_forced(
    runtime: UserRuntime, convs: list[Conversation], batch_tokens: int = 4096, desc: str = ""
) -> Teacher:
    seqs, owner = [], []
    for c, conv in enumerate(convs):
        for w in runtime.formatter.windows(conv.messages, ended=True):
            seqs.append(w)
            owner.append(c)
    bar = tqdm(total=len(seqs), desc=desc or "scoring", unit="seq", disable=not desc)
    scored = score(runtime, seqs, batch_tokens, progress=bar.update)
    bar.close()
    return Teacher(scored, np.asarray(owner)[scored.row.astype(int)] if len(scored.row) else np.zeros(0, dtype=int))


def bucket(turns: int) -> str:
    return f"{turns} prior" if turns < 4 else "4+ prior"


def nll_table(tuned: Teacher, base: Teacher | None, seed: int = 0) -> dict[str, dict[str, float]]:
    """{"all" | "<k> prior": {tokens, nll, ppl, nll_low, nll_high, base_*, diff, diff_low, diff_high}}."""
    rows: dict[str, dict[str, float]] = {}
    user = tuned.scored.kind == USER_TOKEN
    names = ["all"] + sorted({bucket(int(t)) for t in tuned.scored.turn[user]})
    rng = np.random.default_rng(seed)
    n_conv = int(tuned.conv.max()) + 1 if len(tuned.conv) else 0
    draws = rng.integers(0, max(n_conv, 1), size=(BOOTSTRAP, n_conv))  # the same resamples for both models
    for name in names:
        row: dict[str, float] = {}
        boots: dict[str, np.ndarray] = {}
        for prefix, t in (("", tuned), ("base_", base)):
            if t is None:
                continue
            mask = t.scored.kind == USER_TOKEN
            if name != "all":
                mask &= np.array([bucket(int(x)) == name for x in t.scored.turn])
            sums = np.bincount(t.conv[mask], weights=t.scored.nll[mask], minlength=n_conv)  # [C]
            counts = np.bincount(t.conv[mask], minlength=n_conv).astype(float)  # [C]
            nll = sums.sum() / max(counts.sum(), 1)
            drawn = counts[draws].sum(1)  # [B]; a resample without this bucket's tokens says nothing
            boots[prefix] = np.where(drawn > 0, sums[draws].sum(1) / np.maximum(drawn, 1), np.nan)  # [B]
            row.update(
                {
                    f"{prefix}tokens": float(counts.sum()),
                    f"{prefix}nll": float(nll),
                    f"{prefix}ppl": float(np.exp(nll)),
                    f"{prefix}nll_low": float(np.nanpercentile(boots[prefix], 2.5)),
                    f"{prefix}nll_high": float(np.nanpercentile(boots[prefix], 97.5)),
                }
            )
        if base is not None:
            diff = boots[""] - boots["base_"]  # paired: the same conversations in every resample
            row.update(
                diff=row["nll"] - row["base_nll"],
                diff_low=float(np.nanpercentile(diff, 2.5)),
                diff_high=float(np.nanpercentile(diff, 97.5)),
            )
        rows[name] = row
    return rows


def end_calibration(t: Teacher) -> dict[str, float]:
    """Decisions counted, the real end rate, mean P(end), ECE and Brier score of P(end)."""
    d = t.scored.kind == DECISION
    p, y = t.scored.p_end[d].astype(float), t.scored.ended[d].astype(float)
    if not len(p):
        return {"decisions": 0.0}
    bins = np.minimum((p * ECE_BINS).astype(int), ECE_BINS - 1)
    ece = sum(abs(p[bins == b].mean() - y[bins == b].mean()) * (bins == b).sum() for b in np.unique(bins)) / len(p)
    return {
        "decisions": float(len(p)),
        "end_rate": float(y.mean()),
        "mean_p_end": float(p.mean()),
        "end_ece": float(ece),
        "end_brier": float(np.mean((p - y) ** 2)),
        "end_nll": float(np.mean(t.scored.nll[d])),
    }


@dataclass
class SampleReport:
    contexts: int
    ks: float
    ks_pvalue: float
    sampled_len_mean: float
    real_len_mean: float
    distinct2: float
    real_distinct2: float
    sampled_end_rate: float
    real_end_rate: float
    examples: list[tuple[str, str]] = field(default_factory=list)  # (real, sampled)


def contexts(convs: list[Conversation], limit: int, seed: int = 0) -> list[tuple[list, str | None]]:
    """(conversation up to an assistant turn, the real next user turn or None when it ended)."""
    out = []
    for c in convs:
        m = c.messages
        for k in range(len(m)):
            if m[k].role == "assistant" and any(x.role == "user" for x in m[:k]):
                nxt = m[k + 1] if k + 1 < len(m) else None
                out.append((m[: k + 1], nxt.content if nxt is not None and nxt.role == "user" else None))
    random.Random(seed).shuffle(out)
    return out[:limit]


def sample_report(
    runtime: UserRuntime, ctx: list[tuple[list, str | None]], max_new_tokens: int, seed: int
) -> SampleReport:
    turns = simulate(runtime, [c for c, _ in ctx], Sampling(1.0, 1.0, max_new_tokens, seed))
    sampled = [t.content for t in turns if not t.ended]
    real = [r for _, r in ctx if r is not None]
    length = lambda texts: np.array(
        [min(len(runtime.formatter.content_ids(x)) + 1, max_new_tokens) for x in texts], dtype=float
    )
    ks = ks_2samp(length(sampled), length(real)) if sampled and real else None
    examples = [
        (r or "(ended)", "(ended)" if t.ended else t.content) for (_, r), t in zip(ctx[:5], turns[:5], strict=True)
    ]
    return SampleReport(
        len(ctx),
        float(ks.statistic) if ks else float("nan"),
        float(ks.pvalue) if ks else float("nan"),
        float(length(sampled).mean()) if sampled else float("nan"),
        float(length(real).mean()) if real else float("nan"),
        distinct_2(sampled),
        distinct_2(real),
        float(np.mean([t.ended for t in turns])) if turns else float("nan"),
        float(np.mean([r is None for _, r in ctx])) if ctx else float("nan"),
        examples,
    )


def distinct_2(texts: list[str]) -> float:
    """Distinct word bigrams over all word bigrams of the texts (Li et al., 2016)."""
    grams = [tuple(w[i : i + 2]) for t in texts for w in [t.lower().split()] for i in range(len(w) - 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def format_report(
    name: str, base: str, table: dict, calib: dict, base_calib: dict | None, samples: SampleReport | None
) -> str:
    lines = [
        f"NLL per user-turn token (nats), {name} vs the untuned base {base}; "
        "95% bootstrap intervals over conversations",
        "",
        f"| prior user turns | tokens | {name} NLL | ppl | base NLL | ppl | difference |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for bucket_name, r in table.items():
        base_cells = (
            f"{r['base_nll']:.3f} [{r['base_nll_low']:.3f}, {r['base_nll_high']:.3f}] | {r['base_ppl']:.1f} | "
            f"{r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]"
            if "base_nll" in r
            else "- | - | -"
        )
        lines.append(
            f"| {bucket_name} | {int(r['tokens'])} | {r['nll']:.3f} [{r['nll_low']:.3f}, {r['nll_high']:.3f}] | "
            f"{r['ppl']:.1f} | {base_cells} |"
        )
    lines += ["", "End of conversation (at every decision after an assistant turn)", ""]
    lines += ["| model | decisions | real end rate | mean P(end) | ECE | Brier |", "|---|---:|---:|---:|---:|---:|"]
    for label, c in ((name, calib), (base, base_calib)):
        if c and c.get("decisions"):
            lines.append(
                f"| {label} | {int(c['decisions'])} | {c['end_rate']:.3f} | {c['mean_p_end']:.3f} | "
                f"{c['end_ece']:.3f} | {c['end_brier']:.3f} |"
            )
    if samples is not None:
        s = samples
        lines += [
            "",
            f"Sampled user turns ({name}, temperature 1, top-p 1) after {s.contexts} contexts",
            "",
            "| | sampled | real |",
            "|---|---:|---:|",
            f"| mean length (tokens) | {s.sampled_len_mean:.1f} | {s.real_len_mean:.1f} |",
            f"| distinct-2 | {s.distinct2:.3f} | {s.real_distinct2:.3f} |",
            f"| end rate | {s.sampled_end_rate:.3f} | {s.real_end_rate:.3f} |",
            "",
            f"KS distance of the length distributions: {s.ks:.3f} (p = {s.ks_pvalue:.3g})",
        ]
        for real, sampled in s.examples:
            lines.append(f"  real: {real[:100]!r}\n  sampled: {sampled[:100]!r}")
    return "\n".join(lines)
