"""Every error Lantern raises on purpose, in one place.

    LanternError                  a problem a person can fix; str() says what and how
    ├── UsageError                bad command-line arguments or settings
    ├── DataError                 a dataset that is missing, empty or malformed
    ├── ModelError                a model that cannot be built, loaded or found
    │   └── ExportParityError     ONNX and PyTorch disagree beyond tolerance
    ├── InputError                a request the service must refuse (carries an HTTP status)
    │   ├── PayloadTooLarge       413: upload over the size or pixel limit
    │   ├── UnknownModel          404: a model version the model store does not have
    │   └── UnsupportedMediaType  415: not an image type Lantern can read
    ├── JobError                  an explanation job that cannot be run
    │   ├── JobNotFound           404: no such job (never existed, or expired)
    │   └── InvalidAddress        a job id or artifact name outside the store's patterns
    └── QueueUnavailable          Redis cannot be reached (503)

The HTTP client's own errors (unreachable service, a rejected request, a failed job) live
with it in `lantern.client`, under LanternError too. Only the service turns these into
HTTP responses, and only the CLI turns them into exit codes.
"""

from __future__ import annotations


class LanternError(Exception):
    """A failure with a message meant for a person: what went wrong and what to do."""


class UsageError(LanternError):
    pass


class DataError(LanternError):
    pass


class ModelError(LanternError):
    pass


class ExportParityError(ModelError):
    pass


class InputError(LanternError):
    status_code = 400


class UnprocessableInput(InputError):
    status_code = 422


class PayloadTooLarge(InputError):
    status_code = 413


class UnsupportedMediaType(InputError):
    status_code = 415


class UnknownModel(InputError):
    """A request named a model version the model store does not have."""

    status_code = 404


class JobError(LanternError):
    pass


class JobNotFound(JobError):
    """No job with this id (it never existed, or it expired)."""


class InvalidAddress(JobError):
    """A job id or artifact file name that does not match the store's patterns."""


class QueueUnavailable(LanternError):
    pass
