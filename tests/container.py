"""Podman on a machine without Docker Hub, for the container test (`tests/test_container.py`).

Three pieces, each a recipe that was run on Debian 12 (`/work/shared/docs/containers.md`):

- `base_tarball()`: a Debian base with Python 3.11, made with mmdebstrap from the machine's own
  apt sources, standing in for `python:3.11-slim` (which cannot be pulled here). It takes about
  30 s, so the tarball is cached under ~/.cache/twilio-transcribe/, keyed by everything that goes
  into it: a change to the recipe, the apt sources or the CA certificates makes a new one.
- `Podman`: podman with its storage, run state and network configuration in one folder of its
  own, and a `containers.conf` that works around this machine's defaults (runc rather than crun,
  ulimits below the machine's hard limits, no systemd). `remove()` deletes all of it.
- `isolated_network()`: a bridge network whose containers can be reached on their published
  ports and can reach nothing themselves. podman 4.3 has no such option (`--internal` networks
  publish no ports and still reach the host), so two firewall rules per IP family, on the
  network's bridge only, reject every connection a container opens: through the host
  (FORWARD) and to the host itself (INPUT). Replies on connections the host opened (the published
  port) pass. The rules carry a comment naming this test and are removed afterwards; a run that
  was killed leaves rules that the next run removes, under the same lock (`exclusive()`).

Rootful podman and the firewall need root: CI runs as root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import time
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "twilio-transcribe"
APT_SOURCES = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
EXTRA_CA_CERTIFICATES = Path("/usr/local/share/ca-certificates")
FIREWALL_TAG = "twilio-transcribe container test"

# The base: Debian's minimal variant plus Python, in a venv first on PATH, so that `python` and
# `pip` behave as in the official image. Documentation is left out except the copyright files.
# The machine's extra CA certificates go in so that pip can reach the package index through a
# TLS-intercepting proxy (this base is for building here, it is never published).
BASE_OPTIONS = [
    "--variant=minbase",
    "--include=python3,python3-venv,ca-certificates",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",  # without it, usrmerge pulls in perl
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    f"--customize-hook=cp {EXTRA_CA_CERTIFICATES}/*.crt \"$1\"/usr/local/share/ca-certificates/ 2>/dev/null || true",
    "--customize-hook=chroot \"$1\" update-ca-certificates",
    "--customize-hook=chroot \"$1\" python3 -m venv /opt/venv",
    "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
]
BASE_CHANGES = [
    "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python"]',
]

# crun fails here on setrlimit and on the hybrid cgroup layout; the machine's hard limit on open
# files is below podman's default; there is no systemd to manage cgroups or take events.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "{folder}/tmp"
[network]
network_config_dir = "{folder}/networks"
"""


def _codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise RuntimeError("/etc/os-release has no VERSION_CODENAME: not a Debian-like system")


def _apt_sources() -> Path:
    for path in APT_SOURCES:
        if path.exists():
            return path
    raise RuntimeError(f"no apt sources in {' or '.join(map(str, APT_SOURCES))}")


def base_key() -> str:
    """Hash of everything the base tarball is made from."""
    digest = hashlib.sha256()
    sources = _apt_sources()
    digest.update(json.dumps([BASE_OPTIONS, BASE_CHANGES, _codename(), platform.machine(), sources.name]).encode())
    digest.update(sources.read_bytes())
    for cert in sorted(EXTRA_CA_CERTIFICATES.glob("*.crt")):
        digest.update(cert.read_bytes())
    return digest.hexdigest()[:16]


def base_tarball() -> tuple[Path, float | None]:
    """The cached base tarball, made first if needed: (path, seconds spent making it or None)."""
    key = base_key()
    tarball = CACHE / f"debian-python-base-{key}.tar"
    if tarball.exists():
        return tarball, None
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial.tar")
    started = time.monotonic()
    run(["mmdebstrap", *BASE_OPTIONS, _codename(), str(partial), str(_apt_sources())], timeout=900)
    partial.rename(tarball)
    for old in CACHE.glob("debian-python-base-*.tar"):  # earlier recipes
        if old != tarball:
            old.unlink()
    return tarball, time.monotonic() - started


def run(argv: list[str], *, check: bool = True, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; on failure the error shows the command and its stderr."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


@contextlib.contextmanager
def exclusive():
    """One container test at a time on this machine (firewall rules and bridges are machine-wide)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "container-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Podman:
    """`podman` with all of its state in `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        for sub in ("root", "runroot", "tmp", "networks"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf = folder / "containers.conf"
        conf.write_text(CONTAINERS_CONF.format(folder=folder))
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.prefix = ["podman", "--root", str(folder / "root"), "--runroot", str(folder / "runroot")]

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return run([*self.prefix, *args], check=check, timeout=timeout, env=self.env)

    def inspect(self, name: str, template: str) -> str:
        return self("inspect", "--format", template, name).stdout.strip()

    def remove(self) -> None:
        """Every container, image and network of this folder, then the folder."""
        self("rm", "--all", "--force", "--time", "0", check=False)
        for network in self("network", "ls", "--format", "{{.Name}}", check=False).stdout.split():
            if network != "podman":
                self("network", "rm", "--force", network, check=False)
        self("rmi", "--all", "--force", check=False, timeout=300)
        self("system", "reset", "--force", check=False, timeout=300)
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Network:
    name: str
    interface: str  # the bridge on the host
    gateway: str  # the host's IPv4 address on the bridge


def _firewall_rules(interface: str) -> list[tuple[str, list[str]]]:
    """(program, rule) pairs that stop containers on `interface` from opening any connection."""
    tag = ["-m", "comment", "--comment", FIREWALL_TAG]
    rules = []
    for program, reject in (("iptables", "icmp-admin-prohibited"), ("ip6tables", "icmp6-adm-prohibited")):
        target = ["-j", "REJECT", "--reject-with", reject]
        rules.append((program, ["FORWARD", "-i", interface, *tag, *target]))
        rules.append((program, ["INPUT", "-i", interface, "-m", "conntrack", "!", "--ctstate",
                                "ESTABLISHED,RELATED", *tag, *target]))
    return rules


def remove_firewall_rules() -> None:
    """Delete every rule this test added, including those of a run that was killed."""
    for program in ("iptables", "ip6tables"):
        for line in run([f"{program}-save"]).stdout.splitlines():
            if line.startswith("-A ") and FIREWALL_TAG in line:
                run([program, "-w", "-D", *shlex.split(line)[1:]])


@contextlib.contextmanager
def isolated_network(podman: Podman, name: str):
    """A bridge network for published ports only; see the module docstring."""
    podman("network", "create", "--disable-dns", name)
    try:
        info = json.loads(podman("network", "inspect", name).stdout)[0]
        network = Network(name, info["network_interface"], info["subnets"][0]["gateway"])
        for program, rule in _firewall_rules(network.interface):
            run([program, "-w", "-I", rule[0], "1", *rule[1:]])
        yield network
    finally:
        remove_firewall_rules()
        podman("network", "rm", "--force", name, check=False)
