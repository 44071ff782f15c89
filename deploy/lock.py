"""Write constraints.txt: the exact versions of everything Lantern installs, as pip resolved them.

    make lock                       # resolve the newest releases pyproject.toml allows
    python deploy/lock.py report.json > constraints.txt

`make install`/`make test` and both Docker images install with `-c constraints.txt`, so the
images run what the tests ran. The input is pip's installation report
(`pip install --dry-run --ignore-installed --report report.json ".[dev,bench]"`).
"""

from __future__ import annotations

import json
import sys


def main(report_path: str) -> int:
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    pins = sorted(
        (item["metadata"]["name"].lower(), item["metadata"]["version"])
        for item in report["install"]
        # The project itself is what the constraints are for, not one of them.
        if item["metadata"]["name"].lower() != "lantern"
    )
    print("# What Lantern's tests ran and its images install. Regenerate with `make lock`.")
    print("# Platform: Linux x86_64, CPython 3.11 (the images' Debian bookworm python3).")
    for name, version in pins:
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
