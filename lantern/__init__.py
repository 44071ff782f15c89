"""Lantern: image classification that shows its reasoning.

`lantern.core` is the torch-free bottom layer that the service, the workers and the model
code share. The rest of this package is the top layer: the `lantern` command line
(`cli`, `commands/`), the `lantern up` supervisor (`stack`, `redis_server`) and the HTTP
client (`client`, `batch`).
"""

__version__ = "0.1.0"
