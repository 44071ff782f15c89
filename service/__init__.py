"""The prediction service: BentoML in front of ONNX Runtime, never torch. Middle layer: it
imports only the core (lantern.core), where the image decoder, the model bundle, the
preprocessing spec and the job contract live.

service.py       the BentoML service: `bentoml serve service.service:Lantern`
api.py           the FastAPI app: /predict, /predict_batch; errors become JSON here
handlers.py      each operation once, for both doors: upload limits, work, error bodies
native.py        the BentoML-native door: @bentoml.api methods at /v1/... (BentoML clients)
jobs_api.py      /explain and /jobs: asynchronous explanations
status_api.py    /status, and the explanation side of /metrics
pages.py         the web page (/), the API docs page (/docs) and their static files
dependencies.py  how routes reach the running service (FastAPI dependencies)
explanations.py  explanation jobs as the API sees them: validate, enqueue, report, files
uploads.py       HTTP request -> uploaded files, with size limits
classifier.py    the model session (ONNX Runtime, provider selection; or OpenVINO,
                 lantern.core.openvino_runtime), softmax, top-k
batcher.py       micro-batching: concurrent requests share one model call
metrics.py       Lantern's own Prometheus metrics (model info, batch size, queue wait)
gateway.py       API keys, and request metrics labelled by route template
openapi.py       the OpenAPI document served at /docs.json
error_bodies.py  the framework's bare 404/405 answers, given the {"error": ...} body
"""
