"""`rm-service serve` start-up errors through the CLI: one line on stderr, exit 2, no
traceback. A mismatched TLS key used to end in a traceback and "Failed to bind to address";
a port in use by another gRPC server was silently shared (SO_REUSEPORT)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _self_signed(directory: Path, name: str) -> None:
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.crt",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
        ],
        cwd=directory,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def broken(tmp_path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """case -> (serve flags, environment, what the one line must say)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make test certificates")
    for name in ("a", "b"):
        _self_signed(tmp_path, name)
    (tmp_path / "tokens-latin1").write_bytes(b"admin:caf\xe9-caf\xe9-caf\xe9-caf\xe9\n")
    (tmp_path / "tokens-dir").mkdir()
    arts = tmp_path / "registry"
    (arts / "v3").mkdir(parents=True)
    (arts / "v3" / "version.json").write_text("{not json")
    (arts / "promoted.json").write_text('["not", "a", "pointer"]')
    store_only = ["--no-model", "--port", "0"]
    return {
        "tls key of another certificate": (
            store_only + ["--tls-cert", str(tmp_path / "a.crt"), "--tls-key", str(tmp_path / "b.key")],
            {},
            "b.key is not the private key of the certificate",
        ),
        "tokens file not UTF-8": (
            store_only + ["--tokens-file", str(tmp_path / "tokens-latin1")],
            {},
            "is not UTF-8 text",
        ),
        "tokens file a directory": (store_only + ["--tokens-file", str(tmp_path / "tokens-dir")], {}, "cannot read"),
        "port in use": (["--no-model", "--port", "PORT"], {}, "the port is in use"),
        "promoted.json unreadable": (
            ["--no-store", "--port", "0"],
            {"RM_MODELS_ARTIFACTS_DIR": str(arts)},
            "cannot read the registry's",
        ),
        "version.json unreadable": (
            ["--no-store", "--model", "v3", "--port", "0"],
            {"RM_MODELS_ARTIFACTS_DIR": str(arts)},
            "v3/version.json is not a valid version record: file: Invalid JSON",
        ),
    }


# The two failures these tests were written for run as real processes (the shell's view: exit status
# and every line of stderr, logs included); the others through `rm_service.cli.main` in this process
# (tests/conftest.py run_cli), while those two start: no interpreter and no torch import of their own.
IN_A_PROCESS = ("tls key of another certificate", "port in use")


def test_start_up_errors_are_one_line_and_exit_2(tmp_path, broken, monkeypatch, capsys):
    from conftest import run_cli

    busy = socket.socket()  # a listener holding a port, as another server would
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    procs, results = {}, {}
    try:
        for n, (case, (flags, env, _)) in enumerate(broken.items()):  # concurrently: each pays the imports once
            if case not in IN_A_PROCESS:
                continue
            home = tmp_path / f"home{n}"
            procs[case] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "rm_service.cli",
                    "serve",
                    "--metrics-port",
                    "-1",
                    *[port if f == "PORT" else f for f in flags],
                ],
                env={**os.environ, "RM_HOME": str(home), **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        # serve sets these process-wide: kept to this test
        monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        switch = sys.getswitchinterval()
        for n, (case, (flags, env, _)) in enumerate(broken.items()):
            if case in IN_A_PROCESS:
                continue
            with monkeypatch.context() as m:
                m.setenv("RM_HOME", str(tmp_path / f"home{n}"))
                for name, value in env.items():
                    m.setenv(name, value)
                code, _, err = run_cli("serve", "--metrics-port", "-1", *flags, capsys=capsys)
            sys.setswitchinterval(switch)
            results[case] = (code, err)
        results.update({case: (p.wait(timeout=120), p.stderr.read()) for case, p in procs.items()})
    finally:
        busy.close()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.stdout.close()
            p.stderr.close()
    assert set(results) == set(broken) and set(procs) == set(IN_A_PROCESS)
    for case, (code, err) in results.items():
        said = broken[case][2]
        assert code == 2 and err.count("\n") == 1 and err.startswith("rm-service serve: ") and said in err, (
            case,
            code,
            err,
        )
        assert "Traceback" not in err
