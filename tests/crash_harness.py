"""Crash harness: SIGKILL the store-only server while clients ingest labels, restart it on the
same DuckDB file, and check what the file holds.

Each round proves, cumulatively over every round so far on one store file:

- durability: every label acknowledged INSERTED is stored (an ack means its COMMIT returned);
- idempotency: no label_id is stored twice;
- nothing invented: every stored label was either acked or sent in a call whose outcome the
  client could not know (it failed, or was in flight when the server died), and its stored
  payload hash is the one of the label that was sent;
- atomicity: every stored label has exactly its 2 rankings, its conversation and its
  completions, and no ranking exists without its label (no half-written transaction);
- recovery: the server starts on the file after each kill and reaches SERVING (each round's
  server is the recovery from the previous round's kill), and after the last kill a recovered
  server exits 0 on SIGTERM.

The file is checked right after each kill, as the crash left it (read-only, with its write-ahead
log), and once more after the final recovery. Run `python tests/crash_harness.py --rounds 50`;
tests/test_durability.py runs 5 rounds.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import grpc

from rm_service.api.v1 import common_pb2, preference_pb2, preference_pb2_grpc
from rm_service.client import start_server_process
from rm_service.errors import RMError
from rm_service.server.convert import label as label_in

RPC_DEADLINE_S = 5.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CLIENT_LIMIT_S = 60.0  # a client that has not seen the server die by then is a harness failure


class ServerProcess:
    """`rm-service serve --no-model --port 0` as a subprocess on the given store file, started
    by the one start-and-wait helper (rm_service.client.start_server_process)."""

    def __init__(self, store: Path, log: Path, extra_env: dict[str, str] | None = None):
        self.log = log
        self.env = {
            **os.environ,
            "RM_HOME": str(store.parent / "home"),
            "RM_STORE_PATH": str(store),
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None
        self.address = ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> str:
        """Start it and wait for grpc.health.v1 SERVING; returns the address."""
        try:
            self.proc, self.address = start_server_process(
                self.env, self.log.parent, timeout, args=["--no-model"], log_name=self.log.name
            )
        except RMError as exc:
            raise RuntimeError(f"{exc}:\n{self.log_tail()}") from exc
        return self.address

    def sigkill(self) -> None:
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT_S)

    def sigterm(self) -> int:
        """SIGTERM, then wait for the drain; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(STOP_TIMEOUT_S)

    def ensure_dead(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def make_label(label_id: str, rng: random.Random) -> preference_pb2.Label:
    """A valid pairwise label; multi-turn for some ids, and some responses shared with other labels."""
    turns = [
        common_pb2.Message(
            role="user", content=f"Question for {label_id}: how do I {rng.choice(['bake', 'fix', 'plan'])} it?"
        )
    ]
    if rng.random() < 0.5:
        turns += [
            common_pb2.Message(role="assistant", content="Can you say more?"),
            common_pb2.Message(role="user", content=f"More detail {rng.randint(0, 10**6)}."),
        ]
    return preference_pb2.Label(
        label_id=label_id,
        prompt=turns,
        responses=[f"Answer A to {label_id}.", rng.choice(["I don't know.", "Ask someone else."])],
        ranks=[0, 1],
        source=preference_pb2.HUMAN,
        annotator="crash-harness",
    )


@dataclass
class ClientLog:
    """What one client learned: ids acked INSERTED, ids whose fate it cannot know, anything odd."""

    acked: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)
    hashes: dict[str, str] = field(default_factory=dict)  # payload hash of every label sent
    odd: list[str] = field(default_factory=list)
    error: str = ""


def run_client(address: str, round_: int, client: int, rng: random.Random, log: ClientLog) -> None:
    """Send IngestLabels of 1-8 new labels until the first RPC error (the server died)."""
    channel = grpc.insecure_channel(address)
    stub = preference_pb2_grpc.PreferenceServiceStub(channel)
    n, deadline = 0, time.monotonic() + CLIENT_LIMIT_S
    try:
        while time.monotonic() < deadline:
            labels = [make_label(f"r{round_}-c{client}-{n + i}", rng) for i in range(rng.randint(1, 8))]
            n += len(labels)
            ids = [pb.label_id for pb in labels]
            log.hashes.update((pb.label_id, label_in(pb).payload_hash()) for pb in labels)
            try:
                response = stub.IngestLabels(preference_pb2.IngestLabelsRequest(labels=labels), timeout=RPC_DEADLINE_S)
            except grpc.RpcError as exc:
                log.unknown.update(ids)
                log.error = exc.code().name
                return
            if [r.label_id for r in response.results] != ids:
                log.odd.append(f"results {[r.label_id for r in response.results]} do not match the request {ids}")
            for r in response.results:
                if r.status == preference_pb2.INSERTED:
                    log.acked.add(r.label_id)
                else:
                    log.odd.append(f"{r.label_id}: {preference_pb2.IngestStatus.Name(r.status)} {r.reason}")
        log.odd.append(f"client {client} never saw the server die within {CLIENT_LIMIT_S:.0f}s")
    finally:
        channel.close()


def check_store(store: Path, acked: set[str], unknown: set[str], hashes: dict[str, str]) -> tuple[list[str], set[str]]:
    """The invariants over the whole file; returns (violations, stored ids)."""
    v: list[str] = []
    con = duckdb.connect(str(store), read_only=True)
    try:
        q = lambda sql: con.execute(sql).fetchall()
        stored = dict(q("SELECT label_id, payload_hash FROM labels"))
        twice = q("SELECT label_id, count(*) FROM labels GROUP BY label_id HAVING count(*) > 1")
        bad_rankings = q("""SELECT l.label_id, count(r.label_id)
                            FROM labels l LEFT JOIN label_rankings r USING (label_id) GROUP BY l.label_id
                            HAVING count(r.label_id) <> 2 OR list_sort(list(r.position)) <> [0, 1]""")
        orphan_rankings = q(
            "SELECT DISTINCT label_id FROM label_rankings WHERE label_id NOT IN (SELECT label_id FROM labels)"
        )
        no_conversation = q("SELECT label_id FROM labels WHERE conversation_id NOT IN (SELECT id FROM conversations)")
        no_completion = q("""SELECT r.label_id, r.completion_id FROM label_rankings r
                             WHERE r.completion_id NOT IN (SELECT id FROM completions)""")
    finally:
        con.close()
    ids = set(stored)

    def add(what: str, items) -> None:
        items = sorted(items)
        if items:
            v.append(f"{what} ({len(items)}): {items[:10]}")

    add("acked but not stored", acked - ids)
    add("stored more than once", twice)
    add("stored but never acked nor in an unknown call", ids - acked - unknown)
    add("stored payload differs from the one sent", [i for i, h in stored.items() if i in hashes and hashes[i] != h])
    add("labels without exactly rankings 0 and 1", bad_rankings)
    add("rankings without a label", orphan_rankings)
    add("labels without their conversation", no_conversation)
    add("rankings without their completion", no_completion)
    return v, ids


def run_round(
    round_: int,
    store: Path,
    workdir: Path,
    clients: int,
    seed: int,
    acked: set[str],
    unknown: set[str],
    hashes: dict[str, str],
) -> dict:
    """One round: start the server on the file (after round 0, that start is the recovery from
    the previous round's SIGKILL), ingest, SIGKILL, then check the file as the kill left it
    (read-only: DuckDB reads the write-ahead log without replaying it into the file, so the
    next round's server recovers the same crashed file)."""
    rng = random.Random(seed + round_)
    delay = rng.uniform(0.3, 2.0)
    violations: list[str] = []
    server = ServerProcess(store, workdir / f"server-r{round_:03d}.log")
    try:
        try:
            address = server.start()
        except RuntimeError as exc:
            after = f" after round {round_ - 1}'s SIGKILL" if round_ else ""
            raise AssertionError(f"round {round_}: the server did not reach SERVING on the file{after}: {exc}") from exc
        logs = [ClientLog() for _ in range(clients)]
        threads = [
            threading.Thread(
                target=run_client,
                args=(address, round_, c, random.Random(f"{seed}-{round_}-{c}"), logs[c]),
                name=f"client-{c}",
                daemon=True,
            )
            for c in range(clients)
        ]
        for t in threads:
            t.start()
        time.sleep(delay)  # the random kill point: the only sleep that is not polling
        server.sigkill()
        for t in threads:
            t.join(CLIENT_LIMIT_S + RPC_DEADLINE_S)
            if t.is_alive():
                violations.append(f"{t.name} did not stop after the server died")
    finally:
        server.ensure_dead()
    round_acked = set().union(*(log.acked for log in logs))
    round_unknown = set().union(*(log.unknown for log in logs))
    for log in logs:
        acked |= log.acked
        unknown |= log.unknown
        hashes.update(log.hashes)
        violations += log.odd
    if not round_acked:
        violations.append("no label was acknowledged before the kill: the round proved nothing")

    found, stored = check_store(store, acked, unknown, hashes)
    violations += found
    if violations:
        raise AssertionError(
            f"round {round_} (kill after {delay:.2f}s) violated durability:\n  " + "\n  ".join(violations)
        )
    return {
        "round": round_,
        "kill_after_s": round(delay, 2),
        "acked": len(round_acked),
        "unknown": len(round_unknown),
        "unknown_stored": len(round_unknown & stored),
        "stored_total": len(stored),
        "errors": sorted({log.error for log in logs if log.error}),
    }


def recover_and_stop(store: Path, workdir: Path, after_round: int) -> None:
    """The last recovery: a server on the killed file reaches SERVING and exits 0 on SIGTERM."""
    restarted = ServerProcess(store, workdir / "server-final.log")
    try:
        try:
            restarted.start()
        except RuntimeError as exc:
            raise AssertionError(
                f"the server did not reach SERVING after round {after_round}'s SIGKILL: {exc}"
            ) from exc
        code = restarted.sigterm()
        if code != 0:
            raise AssertionError(f"the recovered server exited with {code} on SIGTERM:\n{restarted.log_tail()}")
    finally:
        restarted.ensure_dead()


def run_crash_rounds(rounds: int, workdir: Path, clients: int = 8, seed: int = 0) -> dict:
    """Run `rounds` crash rounds on one store file under `workdir` (which must not hold one yet),
    then recover the file once more and stop that server with SIGTERM.

    Returns {rounds, acked, unknown, unknown_stored, stored, violations, per_round, seconds};
    raises AssertionError with the details on the first round that breaks an invariant.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "rm.duckdb"
    if store.exists():
        raise FileExistsError(f"{store} already exists; the checks need a fresh store")
    acked: set[str] = set()
    unknown: set[str] = set()
    hashes: dict[str, str] = {}
    started = time.monotonic()
    per_round = [run_round(r, store, workdir, clients, seed, acked, unknown, hashes) for r in range(rounds)]
    recover_and_stop(store, workdir, rounds - 1)
    violations, stored = check_store(store, acked, unknown, hashes)  # after the recovery's checkpoint
    if violations:
        raise AssertionError("after the final recovery:\n  " + "\n  ".join(violations))
    return {
        "rounds": rounds,
        "acked": len(acked),
        "unknown": len(unknown),
        "unknown_stored": len(unknown & stored),
        "stored": len(stored),
        "violations": [],
        "per_round": per_round,
        "seconds": round(time.monotonic() - started, 1),
    }


def format_summary(result: dict) -> str:
    rows = [
        "| round | kill after s | acked | unknown | unknown stored | stored (total) | client errors |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["per_round"]:
        rows.append(
            f"| {r['round']} | {r['kill_after_s']:.2f} | {r['acked']} | {r['unknown']} | {r['unknown_stored']} "
            f"| {r['stored_total']} | {', '.join(r['errors'])} |"
        )
    rows.append(
        f"| **all {result['rounds']}** | | **{result['acked']}** | **{result['unknown']}** | "
        f"**{result['unknown_stored']}** | **{result['stored']}** | |"
    )
    rows.append("")
    rows.append(
        f"violations: {len(result['violations'])}; {result['seconds']:.1f} s; every acked label stored, none twice, "
        "none invented, no half-writes"
    )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="directory for the store and server logs (default: a temp dir)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="rm-crash-") as tmp:
        workdir = args.workdir or Path(tmp)
        try:
            result = run_crash_rounds(args.rounds, workdir, args.clients, args.seed)
        except AssertionError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
