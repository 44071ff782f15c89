"""Print pyproject.toml's dependencies (plus the extras named) one per line, for pip -r.

The Dockerfile installs them before the source is copied in, so a change of code does not
reinstall PyTorch; constraints.txt pins the versions. `python3 deploy/requirements.py torch`
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    return wanted


if __name__ == "__main__":
    here = Path(__file__).resolve().parent.parent
    print("\n".join(requirements(here / "pyproject.toml", sys.argv[1:])))
