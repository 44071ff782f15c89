"""Write a compose override with one explanation worker per GPU, each pinned to its own device.

    python3 deploy/gpu_workers.py 4 > docker-compose.gpus.yml
    export COMPOSE_FILE=docker-compose.yml:docker-compose.gpu.yml:docker-compose.gpus.yml
    docker compose up -d

`worker` (docker-compose.gpu.yml) keeps GPU 0 (LANTERN_WORKER_GPU); this adds worker-gpu1 ...
worker-gpu<N-1>, each the same service as `worker` (compose `extends`: image, command, volumes,
health check, restarts) with `device_ids: ["<i>"]`. `--scale worker=N` cannot do this: every
replica of one service gets the same device request, so all of them land on one GPU.
Standard library only, so it runs on a GPU host with nothing but Python.
"""

from __future__ import annotations

import sys


def override(gpus: int, first: int = 1) -> str:
    lines = [
        f"# One explanation worker per GPU, GPUs {first}..{gpus - 1}"
        f" (deploy/gpu_workers.py {gpus});",
        "# `worker` keeps GPU 0. Use with docker-compose.yml and docker-compose.gpu.yml.",
        "services:",
    ]
    for gpu in range(first, gpus):
        lines += [
            f"  worker-gpu{gpu}:",
            "    extends: {file: docker-compose.yml, service: worker}",
            "    environment:",
            "      LANTERN_DEVICE: cuda",
            "    deploy:",
            "      resources:",
            "        reservations:",
            "          devices:",
            f'            - {{driver: nvidia, device_ids: ["{gpu}"], capabilities: [gpu]}}',
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit() or int(argv[0]) < 2:
        print("usage: gpu_workers.py N   (N >= 2: the number of GPUs on the host)", file=sys.stderr)
        return 2
    sys.stdout.write(override(int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
