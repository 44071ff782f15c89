"""The explanation workers: the engine (one forward, one backward), the methods, rendering,
and the RQ worker process that loads the model once and keeps it."""
