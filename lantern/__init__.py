"""Lantern: image classification that shows its reasoning.

This package holds what the API service, the explanation workers and the command line
share, and none of it imports torch: settings, errors, the job contract, the artifact store.
"""

__version__ = "0.1.0"
