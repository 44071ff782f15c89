"""Lantern's core: the torch-free bottom layer every other part stands on.

    errors        every error Lantern raises on purpose
    settings      the one settings object (environment variables LANTERN_*, REDIS_URL)
    jobs          the job contract between API and workers; `Method`, the one method registry
    safe_job      the RQ job class that runs only Lantern's explain task
    store         the artifact store (job id, file name) -> bytes
    bundle        one model version in the BentoML model store, and its metadata
    preprocess    the preprocessing spec, applied with PIL and numpy
    images        the one image decoder: bytes -> RGB picture, for /predict, /explain and
                  the workers alike
    redis_retry   Redis writes that outlast a Redis restart
    job_metrics   explanation-side metrics kept in Redis
    cpus          how many CPUs this process may use
    openvino_runtime  OpenVINO behind the calls of an ONNX Runtime session: what the
                  service runs with LANTERN_RUNTIME=openvino and what the export checks

The layers (tests/test_layers.py enforces them):

    lantern.cli, lantern.commands, lantern.stack, lantern.client, lantern.redis_server  (top)
    service/   workers/ (-> models/)   models/                                        (middle)
    lantern.core                                                                    (bottom)

The core imports nothing above it, and nothing it imports loads torch; `service/` imports
only the core; `workers/` the core and `models/`; the top may import anything.
"""
