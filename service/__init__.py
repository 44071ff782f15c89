"""The prediction service: BentoML in front of ONNX Runtime, never torch.

images.py      uploaded bytes -> validated RGB image
uploads.py     HTTP request -> uploaded files, with size limits
classifier.py  ONNX Runtime session (provider selection), softmax, top-k
batcher.py     micro-batching: concurrent requests share one ONNX Runtime call
metrics.py     Lantern's own Prometheus metrics (model info, batch size, queue wait)
api.py         the HTTP routes; errors become JSON responses here and only here
service.py     the BentoML service: `bentoml serve service.service:Lantern`
"""
