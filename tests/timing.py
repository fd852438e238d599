"""The suite's time, watched (a pytest plugin; tests/conftest.py loads it).

Every run writes each test's time (setup + call + teardown, in seconds), slowest first, to
`.pytest_cache/d/timing/durations.json`, and at the end prints the time of each tier (its tests'
times summed; under pytest-xdist's `-n` they overlap, so the run's wall time beside it) and every test
outside the `slow` tier that took longer than its budget, `--test-budget` seconds (default 30, some
ten times a typical server test's, so that a busy machine does not trip it). Such a test belongs in
the slow tier or should be made cheaper: the default tier is what everyone runs on each change, and
it must stay under ten minutes on a 2-core machine (a warning says when this run's was not). With
`--enforce-budget` a test over its budget fails the run; otherwise (CI included) it is a warning.

Under `-n N --dist loadfile` (make test-fast) the test files go to the workers slowest first, by the
times earlier runs measured (kept in the pytest cache, `timing/tests`, each test's latest time), so that
the run does not end with one worker idle while the other finishes a long file (a longest-first schedule);
without those times (a fresh clone) pytest-xdist's own order (files with the most tests first) is kept.

This watches the suite, it asserts nothing about the product: speed claims live in bench/.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import pytest

TIER_BUDGET_S = 600.0  # the default tier, all of it: ten minutes on a 2-core machine
_times: defaultdict[str, float] = defaultdict(float)
_slow: set[str] = set()
_started = time.monotonic()  # this process's start: the run's wall time is measured from here


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("timing", "the suite's time budget (tests/timing.py)")
    group.addoption(
        "--test-budget",
        type=float,
        default=30.0,
        help="seconds one test outside the slow tier may take (setup, call and teardown); default 30",
    )
    group.addoption(
        "--enforce-budget",
        action="store_true",
        help="fail the run when a test outside the slow tier is over its budget (CI); otherwise a warning",
    )


UNKNOWN_TEST_S = 1.0  # a test no earlier run timed (new, or renamed): about a typical server test
_KNOWN = "timing/tests"  # the pytest cache's key for each test's latest time, merged over runs


def pytest_configure(config: pytest.Config) -> None:
    """On pytest-xdist's controller under --dist loadfile: the measured times, read once here (the
    workers get this copy, so all of them order the files alike), and xdist's own reordering off."""
    cache = getattr(config, "cache", None)
    if hasattr(config, "workerinput") or cache is None or not getattr(config.option, "numprocesses", None):
        return
    if getattr(config.option, "dist", "no") == "loadfile":
        config.stash[_known_key] = cache.get(_KNOWN, {})
        if config.stash[_known_key]:
            config.option.loadscopereorder = False  # the files' order is the one the workers collect


_known_key = pytest.StashKey[dict]()


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: only called where xdist runs workers
def pytest_configure_node(node) -> None:
    node.workerinput["rm_test_times"] = node.config.stash.get(_known_key, {})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _slow.update(item.nodeid for item in items if item.get_closest_marker("slow"))
    known = getattr(config, "workerinput", {}).get("rm_test_times")
    if known:  # a worker under --dist loadfile: its files slowest first, each file's tests in their order
        per_file: defaultdict[str, float] = defaultdict(float)
        for item in items:
            per_file[item.nodeid.split("::")[0]] += known.get(item.nodeid, UNKNOWN_TEST_S)
        items.sort(key=lambda item: -per_file[item.nodeid.split("::")[0]])  # stable: keeps each file's order


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _times[report.nodeid] += report.duration
    if "slow" in report.keywords:  # under pytest-xdist the controller sees reports, not items
        _slow.add(report.nodeid)


def _over_budget(budget: float) -> list[tuple[str, float]]:
    return sorted(
        ((nodeid, t) for nodeid, t in _times.items() if t > budget and nodeid not in _slow), key=lambda x: -x[1]
    )


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _times:
        return
    budget = config.getoption("--test-budget")
    slow = sum(t for nodeid, t in _times.items() if nodeid in _slow)
    default = sum(_times.values()) - slow
    wall = time.monotonic() - _started
    workers = getattr(config.option, "numprocesses", None) or 0  # pytest-xdist's -n, on its controller
    write = terminalreporter.write_line
    write(
        f"test time: default tier {default:.0f} s in {len(_times.keys() - _slow)} tests, slow tier {slow:.0f} s in "
        f"{len(_slow & _times.keys())}; {wall:.0f} s wall"
        + (f" in {workers} pytest-xdist workers" if workers else "")
        + ("; each test's time in .pytest_cache/d/timing/durations.json" if getattr(config, "cache", None) else "")
    )
    # One process: the tier takes the sum of its tests' times; several (make test-fast): the run's wall time.
    if (wall if workers > 1 else default) > TIER_BUDGET_S:
        write(f"the default tier took over its {TIER_BUDGET_S:g} s (on a busy machine, or it has grown)", yellow=True)
    over = _over_budget(budget)
    if over:
        verdict = "fails the run (--enforce-budget)" if config.getoption("--enforce-budget") else "a warning"
        write(f"{len(over)} test(s) outside the slow tier over the {budget:g} s budget ({verdict}):", yellow=True)
        for nodeid, t in over:
            write(f"  {t:6.1f} s  {nodeid}", yellow=True)
        write("  mark each @pytest.mark.slow (and keep that tier small) or make it cheaper", yellow=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _times or hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller writes
        return
    config = session.config
    cache = getattr(config, "cache", None)  # None under -p no:cacheprovider
    if cache is not None:
        path = cache.mkdir("timing") / "durations.json"
        ordered = dict(sorted(_times.items(), key=lambda x: -x[1]))
        path.write_text(json.dumps({k: round(v, 3) for k, v in ordered.items()}, indent=1) + "\n", encoding="utf-8")
        cache.set(_KNOWN, {**cache.get(_KNOWN, {}), **{k: round(v, 3) for k, v in _times.items()}})
    if config.getoption("--enforce-budget") and _over_budget(config.getoption("--test-budget")) and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
