"""The prediction service: BentoML in front of ONNX Runtime, never torch.

images.py      uploaded bytes -> validated RGB image
uploads.py     HTTP request -> uploaded files, with size limits
classifier.py  ONNX Runtime session (provider selection), softmax, top-k
api.py         the HTTP routes; errors become JSON responses here and only here
service.py     the BentoML services: `bentoml serve service.service:Lantern`
"""
