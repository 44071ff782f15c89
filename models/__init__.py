"""Everything about the network: building it, data, training, the torchvision transforms
and ONNX export. Middle layer: imports the core (`lantern.core`) and torch; the service
never imports it (the model bundle and the preprocessing spec it needs live in the core).
"""
