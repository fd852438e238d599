"""Entrypoint of the rm-service image.

`serve` (the default command) prepares the service home, then replaces itself with
`rm-service serve ARGS`, so the server is PID 1 and gets SIGTERM itself. Anything else runs
`rm-service ARGS` (`podman run IMAGE models list`, `... train --backbone minilm-l6`).

Preparing the home:
- a process that owns the store (`serve`, `serve --no-model`) whose registry is empty installs
  the image's starter model: the version directory baked in at build time (RM_SEED_DIR) is
  copied into the registry, registered as v1 and promoted. RM_SEED_MODEL=0 turns this off.
  Nothing happens once any version is registered, so a volume keeps its own models.
- a scorer without the store (`serve --no-store`) waits up to RM_WAIT_FOR_MODEL_SECONDS for the
  store process to publish `promoted.json` in the shared registry directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    args = argv or ["serve"]
    if args[0] == "serve":
        prepare(args[1:])
    os.execvp("rm-service", ["rm-service", *args])
    return 127  # not reached


def prepare(serve_args: list[str]) -> None:
    from pydantic import ValidationError

    from rm_service.cli import build_parser, serve_settings
    from rm_service.settings import ModelSettings, StoreSettings, rm_home

    try:
        serve, _ = serve_settings(build_parser().parse_args(["serve", *serve_args]))
    except ValidationError:
        return  # a bad flag or RM_* value: `rm-service serve`, exec'd next, says which in one line and exits 2
    home = rm_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        sys.exit(
            f"rm-service: the service home {home} is not writable by uid {os.getuid()} ({exc.strerror}); "
            "chown the volume to this user or set the pod's fsGroup"
        )
    models = ModelSettings()
    if serve.with_store:
        if os.environ.get("RM_SEED_MODEL", "1") != "0":
            seed_registry(StoreSettings(), models, Path(os.environ.get("RM_SEED_DIR", "/opt/rm-service/seed")))
    elif serve.with_model and serve.model is None:
        wait_for_promotion(Path(models.artifacts_dir), float(os.environ.get("RM_WAIT_FOR_MODEL_SECONDS", "300")))


def seed_registry(store_settings, models, seed: Path) -> None:
    """Register and promote the image's starter model if the registry has no version at all."""
    from rm_service import registry
    from rm_service.models.version import is_version_dir, read_meta
    from rm_service.store.db import Store

    if not is_version_dir(seed):
        return
    store = Store(store_settings)
    try:
        if registry.list_models(store):
            return
        meta = read_meta(seed)
        version, number = registry.next_version(store)
        if version != meta.version:  # version.json names its version
            raise SystemExit(f"rm-service: cannot seed {meta.version} into a registry whose next version is {version}")
        target = Path(models.artifacts_dir) / version
        staging = target.with_name(f".{version}.seeding")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(seed, staging)
        if target.exists():  # a directory without a store row: left by an earlier store file
            shutil.rmtree(target)
        staging.rename(target)
        # the first version of an empty registry: no parent and no snapshot of this store
        starter = registry.ModelRecord.of_version(meta, str(target), "candidate")
        rec = dataclasses.replace(starter, parent=None, snapshot_id=None)
        registry.register(store, rec, number)
        ok, message = registry.promote(store, version, force=True)
        accuracy = rec.metrics.get("accuracy", float("nan"))
        print(
            f"rm-service: empty registry: installed the image's starter model as {version} ({rec.backbone} "
            f"{meta.mode} mode, held-out accuracy {accuracy:.4f}); {message}. Train your own with RequestRetrain, or "
            "`rm-service train` while no server holds the store.",
            flush=True,
        )
    finally:
        store.close()


def wait_for_promotion(artifacts_dir: Path, timeout: float) -> None:
    """A scorer without the store: wait for the store process to publish a promoted version."""
    pointer = artifacts_dir / "promoted.json"
    deadline = time.monotonic() + timeout
    said = False
    while not pointer.exists():
        if time.monotonic() > deadline:
            sys.exit(
                f"rm-service: no promoted model in {artifacts_dir} after {timeout:.0f}s; start the store service "
                "(it installs the starter model) or train and promote a version"
            )
        if not said:
            print(f"rm-service: waiting for a promoted model in {artifacts_dir}", flush=True)
            said = True
        time.sleep(1.0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
