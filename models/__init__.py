"""Everything about the network: building, data, training, export and the model bundle.

Only `models.preprocess` and `models.bundle` are torch-free; the service imports those two
and nothing else from here.
"""
