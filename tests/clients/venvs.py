"""The clients' own virtual environments: .venv-clients/<name>/ (git-ignored), each installed from its
pinned requirements file, tests/clients/requirements/<name>.txt, and made anew when that file or the
Python running the tests changes (a stamp in the venv holds their hash).

Clients that cannot share the main venv (tritonclient 2.73 and the KServe SDK need protobuf < 7; the
server needs 7) live there. The venv is made without pip (fast) and filled by the main venv's pip
through `pip --python`, without compiling every module up front (kserve brings kubernetes' thousands:
that halves the install; Python compiles what it imports on first use).

usage: python tests/clients/venvs.py [NAME ...]   (make them now; all when no name is given)
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENVS = ROOT / ".venv-clients"
REQUIREMENTS = HERE / "requirements"
STAMP = ".requirements-sha256"
#: A clean machine downloads the packages: generous, but bounded.
INSTALL_TIMEOUT = 900


class ClientInstallError(RuntimeError):
    """A client's venv could not be made: the message says why (pip's own words)."""


def _key(requirements: Path) -> str:
    digest = hashlib.sha256(requirements.read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def client_venv(name: str) -> Path:
    """The venv for `name`, made first if missing or out of date; raises ClientInstallError."""
    requirements = REQUIREMENTS / f"{name}.txt"
    if not requirements.is_file():
        raise ClientInstallError(f"no requirements file {requirements}")
    venv = VENVS / name
    key = _key(requirements)
    VENVS.mkdir(exist_ok=True)
    with open(VENVS / f".{name}.lock", "w") as lock:  # two test runs at once make it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = venv / STAMP
        if stamp.is_file() and stamp.read_text() == key and (venv / "bin" / "python").exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        started = time.monotonic()
        steps = [
            [sys.executable, "-m", "venv", "--without-pip", str(venv)],
            [
                sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                "install", "--quiet", "--disable-pip-version-check", "--no-compile", "-r", str(requirements),
            ],
        ]  # fmt: skip
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise ClientInstallError(
                    f"{name}: `{' '.join(step)}` took over {INSTALL_TIMEOUT} s"
                ) from None
            if done.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                output = (done.stdout + done.stderr).strip()[-4000:]
                raise ClientInstallError(
                    f"cannot install the {name} client from {requirements.relative_to(ROOT)} "
                    f"(`{' '.join(step[2:4])}` exited {done.returncode}):\n{output}"
                )
        stamp.write_text(key)
        print(f"made {venv.relative_to(ROOT)} in {time.monotonic() - started:.0f} s", file=sys.stderr)
        return venv


if __name__ == "__main__":
    names = sys.argv[1:] or sorted(path.stem for path in REQUIREMENTS.glob("*.txt"))
    for each in names:
        print(client_venv(each))
