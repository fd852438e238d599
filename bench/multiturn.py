"""Bandit, static-context and interactive PPO on whole conversations, over paired seeds (#28).

Three arms, the same policy, reward, compute and seeds:

    bandit       today's single-turn PPO: one reply to each recorded context (the HH prompt up to
                 its last user turn), `prompts_per_step x max_turns` prompts per step, so that it
                 samples as many replies per step as a session arm at most;
    static       multi-turn PPO (policy-trainer sessions) with the recorded user turns replayed
                 whatever the policy said (training on logs);
    interactive  multi-turn PPO against the served user model u_a (SimulateUser).

Every arm's final policy and the reference then play the same held-out openings (`eval_prompts`
x `samples_per_prompt` sessions of up to `max_turns` assistant turns, one fixed random stream)
(a) against u_a, the training simulator, and (b) against u_b, a user model fit on the other half
of the training conversations and never trained against. The table gives, mean over seeds with
its 95% t-interval: the session value and the reward per assistant turn against u_b, the same
against u_a, their difference (what the training simulator flatters), sqrt(KL to the reference)
per session; and the paired differences between arms, with the claims the intervals support.

Models: tiny ones, built here from configs, so that 3 arms x 3 seeds fit a shared 2-core CPU:
a byte-level BPE tokenizer (600 tokens) trained on HH text; the policy, a 2-layer Llama (hidden
32, random init); the user models u_a and u_b, 2-layer Llamas fine-tuned (full) by `rm-service
user-model train` on halves a and b of the HH conversations (RM_USER_FIT_HALF); the reward, a
known function served by `rm-service serve` (the share of words starting with "t" in the whole
conversation, tests/test_ppo_e2e.py's property model): it is the gold, there is no proxy gap
here; what differs between arms is how the policy is trained and which users it met. Every
finished (arm, seed) is saved at once (resumable with the same --home).

    .venv/bin/python bench/multiturn.py --seeds 0,1,2,3,4   # var/bench-multiturn; rerun to resume
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overoptimisation import claim, fmt, interval

REPO = Path(__file__).resolve().parent.parent
ARMS = ("bandit", "static", "interactive")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# -- the tiny world ------------------------------------------------------------------------------


def tokenizer(hh: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [json.loads(line)["chosen"] for line in hh.read_text(encoding="utf-8").splitlines()[:300]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(tok, **kw):
    from transformers import LlamaConfig

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    return LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **{**sizes, **kw})


def causal_lm(tok, path: Path, seed: int) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = llama_config(tok, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def property_rm(tok, path: Path) -> Path:
    """A reward checkpoint whose score grows with the share of words starting with "t"."""
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification(
        llama_config(tok, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                     num_key_value_heads=1, num_labels=1)
    )  # fmt: skip
    preferred = sorted(i for text, i in tok.get_vocab().items() if text.startswith("Ġt"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, 1:] = 1.0
        model.model.embed_tokens.weight[preferred, 0] = 1.0
        layer = model.model.layers[0]
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        layer.self_attn.v_proj.weight[0, 0] = 1.0
        layer.self_attn.o_proj.weight[0, 0] = 10.0
        model.score.weight[0, 0] = 1.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_world(home: Path, args) -> dict:
    """Tokenizer, policy, reward and the two user models (u_a, u_b), built once per --home."""
    done = home / "world.json"
    if done.exists():
        return json.loads(done.read_text())
    from rm_service.data import HH_PAIRS
    from rm_service.formats import import_file
    from rm_service.settings import ModelSettings, StoreSettings
    from rm_service.store.db import Store
    from rm_service.usermodel.run import train_user_model
    from rm_service.usermodel.settings import UserModelSettings
    from rm_service.usermodel.version import versions_dir

    tok = tokenizer(HH_PAIRS)
    world = {
        "policy": str(causal_lm(tok, home / "policy", 3)),
        "reward": str(property_rm(tok, home / "reward")),
        "user_backbone": str(causal_lm(tok, home / "user-backbone", 5)),
    }
    os.environ["RM_HOME"] = str(home / "rm")
    store = Store(StoreSettings())
    try:
        import_file(store, HH_PAIRS, "hh")
        for half in ("a", "b"):
            settings = UserModelSettings(
                backbone=world["user_backbone"], method="full", max_minutes=args.user_minutes, epochs=3,
                device="cpu", precision="fp32", learning_rate=2e-3, eval_every=20, fit_half=half, promote=False,
            )  # fmt: skip
            result = train_user_model(store, settings, show_progress=False)
            m = result.metrics
            print(f"user model {result.version} (half {half}): {int(m['fit_conversations'])} conversations, held-out "
                  f"NLL {m['nll']:.3f} (base {m['base_nll']:.3f}); {result.details}", flush=True)  # fmt: skip
            world[f"u_{half}"] = str(versions_dir(ModelSettings()) / result.version)
            world[f"u_{half}_version"] = result.version
            world[f"u_{half}_metrics"] = {k: m[k] for k in ("nll", "base_nll", "fit_conversations", "heldout_tokens")}
    finally:
        store.close()
    done.write_text(json.dumps(world, indent=1))
    return world


def serve(home: Path, world: dict, user: str, name: str):
    from rm_service.client import start_server_process

    env = {**os.environ, "RM_HOME": str(home / "rm"), "RM_SERVE_WITH_STORE": "false", "RM_SERVE_METRICS_PORT": "-1",
           "RM_SERVE_DEVICE": "cpu"}  # fmt: skip
    return start_server_process(
        env, home, 300, ["--model", world["reward"], "--user-model", world[user]], log_name=f"{name}.log"
    )


# -- the arms ------------------------------------------------------------------------------------


def settings(arm: str, seed: int, world: dict, addresses: dict, run_dir: Path, args, **kw):
    from policy_trainer.session_settings import SessionSettings
    from policy_trainer.settings import PPOSettings
    from rm_service.data import HH_PAIRS

    base = dict(
        policy=world["policy"], prompts_file=HH_PAIRS, reward_addresses=[addresses["a"]], run_dir=run_dir,
        total_steps=args.steps, prompts_per_step=args.prompts_per_step, samples_per_prompt=2,
        max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens, learning_rate=1e-2,
        kl_coef=0.2, update_epochs=2, num_minibatches=2, eval_prompts=args.eval_prompts, eval_every=0,
        progress=False, follow_models=False, seed=seed, device="cpu", plots=False, tensorboard=False,
        save_policy=False, torch_threads=2,
    )  # fmt: skip
    if arm == "bandit":
        return PPOSettings(**{**base, "prompts_per_step": args.prompts_per_step * args.max_turns, **kw})
    users = "served" if arm in ("interactive", "eval") else "replay"
    return SessionSettings(
        **base, advantage_estimator="turn_gae", max_turns=args.max_turns, user_simulator=users,
        user_max_new_tokens=args.max_new_tokens, **kw,
    )  # fmt: skip


def train_arm(arm: str, seed: int, world: dict, addresses: dict, home: Path, args) -> tuple[dict, Path, float]:
    from policy_trainer.multiturn import train_sessions
    from policy_trainer.trainer import train_ppo

    run_dir = home / "runs" / f"{arm}-s{seed}"
    s = settings(arm, seed, world, addresses, run_dir, args)
    start = time.monotonic()
    seen: list[dict] = []
    (train_ppo if arm == "bandit" else train_sessions)(s, on_step=seen.append)
    rows = [m.get("session/turns_mean", 1.0) * (s.prompts_per_step * s.samples_per_prompt) for m in seen]
    return {"policy_turns_per_step": float(np.mean(rows))}, run_dir, time.monotonic() - start


def evaluate(arm: str, seed: int, run_dir: Path, world: dict, addresses: dict, args) -> tuple[dict, dict]:
    """(reference, policy): the held-out openings against u_a and u_b, one evaluator for every arm."""
    from policy_trainer import checkpoint
    from policy_trainer.multiturn import SessionTrainer

    s = settings("eval", seed, world, addresses, run_dir / "eval", args, eval_user_addresses=[addresses["b"]])
    evaluator = SessionTrainer(s)
    try:
        reference = evaluator.evaluate(lm=evaluator.m.ref)
        state = checkpoint.load(checkpoint.latest(run_dir))
        evaluator.m.policy.load_state_dict(state["policy"])
        evaluator.step = state["step"]
        return reference, evaluator.evaluate()
    finally:
        evaluator.close()


# -- the table -----------------------------------------------------------------------------------

COLUMNS = [
    ("heldout_users_session_value_mean", "session value vs u_b"),
    ("heldout_users_reward_mean", "reward/turn vs u_b"),
    ("session_value_mean", "session value vs u_a"),
    ("reward_mean", "reward/turn vs u_a"),
    ("simulator_gap_reward_mean", "u_a minus u_b, reward/turn"),
    ("heldout_users_turns_mean", "turns vs u_b"),
]


def sqrt_kl(e: dict) -> float:
    return math.sqrt(max(e["heldout_users_kl_seq"], 0.0))


def table(results: list[dict], world: dict, hardware: str, args) -> str:
    seeds = sorted({r["seed"] for r in results})
    complete = [s for s in seeds if {r["arm"] for r in results if r["seed"] == s} == set(ARMS)]
    results = [r for r in results if r["seed"] in complete]
    get = {(r["arm"], r["seed"]): r for r in results}
    wall = sum(r["seconds"] for r in results)
    ua, ub = world["u_a_metrics"], world["u_b_metrics"]
    lines = [
        f"Hardware: {hardware}. Tiny models (see bench/multiturn.py): policy and user models 2-layer Llamas "
        f"(hidden 32) on a 600-token BPE, the reward a known function of the conversation (no proxy gap). "
        f"User models fit on disjoint halves of HH's training conversations: u_a ({ua['fit_conversations']:.0f} "
        f"conversations, held-out NLL {ua['nll']:.3f}, base {ua['base_nll']:.3f}) and u_b "
        f"({ub['fit_conversations']:.0f}, {ub['nll']:.3f}). "
        f"Paired seeds {', '.join(map(str, complete))} (the same seed gives each arm the same initial policy, prompt "
        f"order and sampling stream); {args.steps} PPO steps of {args.prompts_per_step} openings x 2 sessions x <= "
        f"{args.max_turns} turns (bandit: {args.prompts_per_step * args.max_turns} prompts x 2 replies), "
        f"{args.max_new_tokens} new tokens per turn. Evaluation: {args.eval_prompts} held-out openings x 2 sessions, "
        f"one random stream, against each user model. Mean over seeds [95% t-interval]. Wall time "
        f"{wall / 60:.1f} min for the {len(results)} (arm, seed) runs with their evaluations "
        f"({wall / max(len(results), 1):.0f} s each; the user models' training not included).",
        "",
        "| arm | " + " | ".join(label for _, label in COLUMNS) + " | sqrt(KL)/session | policy turns/step |",
        "|---|" + "---:|" * (len(COLUMNS) + 2),
    ]
    ref = [get[(ARMS[0], s)]["reference"] for s in complete]
    lines.append("| reference (before) | " + " | ".join(fmt(interval([e[k] for e in ref])) for k, _ in COLUMNS)
                 + " | 0 | |")  # fmt: skip
    for arm in ARMS:
        runs = [get[(arm, s)] for s in complete]
        cells = [fmt(interval([r["policy"][k] for r in runs])) for k, _ in COLUMNS]
        kl = fmt(interval([sqrt_kl(r["policy"]) for r in runs])).replace("+", "")
        turns = np.mean([r["policy_turns_per_step"] for r in runs])
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {kl} | {turns:.1f} |")
    key = "heldout_users_session_value_mean"
    lines += ["", "**Paired differences** (per seed, arm minus arm; session value against the held-out u_b)", "",
              "| comparison | per seed | mean [95% interval] |", "|---|---|---:|"]  # fmt: skip
    claims = []
    for a, b in (("static", "bandit"), ("interactive", "bandit"), ("interactive", "static")):
        diffs = [get[(a, s)]["policy"][key] - get[(b, s)]["policy"][key] for s in complete]
        m = interval(diffs)
        lines.append(f"| {a} - {b} | {', '.join(f'{d:+.3f}' for d in diffs)} | {fmt(m)} |")
        claims.append(claim(f"{a} PPO ends with a higher held-out session value than {b}", m, len(diffs)))
    for arm in ARMS:
        gaps = [get[(arm, s)]["policy"]["simulator_gap_reward_mean"] - get[(arm, s)]["reference"][
            "simulator_gap_reward_mean"] for s in complete]  # fmt: skip
        claims.append(
            claim(f"{arm} PPO widens the reward/turn gap between u_a and u_b (exploits u_a) beyond the reference's",
                  interval(gaps), len(gaps))
        )  # fmt: skip
    lines += ["", "**What these runs support**", "", *claims]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ref = [r["reference"]["heldout_users_session_value_mean"] for r in results if r["arm"] == ARMS[0]]
    m = interval(ref)
    ax.errorbar([0.0], [m[0]], yerr=[[m[0] - m[1]], [m[2] - m[0]]] if m[1] == m[1] else None, fmt="ks",
                capsize=4, label="reference")  # fmt: skip
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        x, y = interval([sqrt_kl(r["policy"]) for r in runs]), interval(
            [r["policy"]["heldout_users_session_value_mean"] for r in runs])  # fmt: skip
        bounds = lambda v: [[v[0] - v[1]], [v[2] - v[0]]] if v[1] == v[1] else None
        ax.errorbar([x[0]], [y[0]], xerr=bounds(x), yerr=bounds(y), fmt="o", capsize=4, label=f"{arm} ({len(runs)})")
    ax.set_xlabel("sqrt(KL to the reference) per session, held-out openings")
    ax.set_ylabel("session value vs the held-out user model")
    ax.set_title("multi-turn PPO arms (mean, 95% interval over paired seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def hardware() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores, no GPU, fp32, torch threads 2"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--user-minutes", type=float, default=1.5, help="training budget of each user model")
    p.add_argument("--max-runs", type=int, default=0, help="stop after this many (arm, seed) runs (0: all)")
    p.add_argument("--home", type=Path, default=REPO / "var" / "bench-multiturn")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    args = p.parse_args()
    args.home.mkdir(parents=True, exist_ok=True)
    world = build_world(args.home, args)
    done_file = args.home / "results.json"
    results = json.loads(done_file.read_text()) if done_file.exists() else []
    todo = [(a, int(s)) for s in args.seeds.split(",") for a in args.arms.split(",")
            if not any(r["arm"] == a and r["seed"] == int(s) for r in results)]  # fmt: skip
    if args.max_runs:
        todo = todo[: args.max_runs]
    if todo:
        (proc_a, address_a), (proc_b, address_b) = serve(args.home, world, "u_a", "serve-a"), serve(
            args.home, world, "u_b", "serve-b")  # fmt: skip
        addresses = {"a": address_a, "b": address_b}
        try:
            for arm, seed in todo:
                info, run_dir, seconds = train_arm(arm, seed, world, addresses, args.home, args)
                start = time.monotonic()
                reference, policy = evaluate(arm, seed, run_dir, world, addresses, args)
                results.append({"arm": arm, "seed": seed, "reference": reference, "policy": policy, **info,
                                "train_seconds": seconds, "seconds": seconds + time.monotonic() - start})  # fmt: skip
                done_file.write_text(json.dumps(results, indent=1))
                e = policy
                print(f"{arm} seed {seed}: session value vs u_b {e['heldout_users_session_value_mean']:+.3f} (ref "
                      f"{reference['heldout_users_session_value_mean']:+.3f}), vs u_a {e['session_value_mean']:+.3f}, "
                      f"sqrt KL {sqrt_kl(e):.2f}, {results[-1]['seconds']:.0f}s", flush=True)  # fmt: skip
        finally:
            for proc in (proc_a, proc_b):
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    text = table(results, world, hardware(), args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multiturn.md").write_text(text + "\n")
    (args.out / "multiturn.json").write_text(json.dumps({"world": world, "results": results}, indent=1))
    plot([r for r in results], args.out / "multiturn.png")
    print("\n" + text + f"\n\nwrote {args.out / 'multiturn.md'} and {args.out / 'multiturn.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
