"""One log format for every Lantern process: the CLI, `lantern serve`, `lantern worker`.

BentoML, RQ and Python logging each bring their own format (BentoML's traced lines on
stdout, RQ's `HH:MM:SS message`, logging's default). `configure_logging()` replaces them
with one handler on the root logger, on stderr, and points BentoML's, uvicorn's, circus's
and RQ's loggers at it:

    text (default)  2026-01-02T03:04:05.678+00:00 INFO lantern.service: message
                    [request_id=... job_id=...]   (the ids at the end, when known)
    json            {"time": "...", "level": "INFO", "logger": "...", "message": "...",
                    "process": 123, "request_id": "...", "job_id": "..."}  (one a line)

`LANTERN_LOG_FORMAT` (lantern.core.settings) chooses. Who calls it: `lantern.cli.main`
for every command (so `lantern worker`, whose RQ adds no handler of its own once the root
has one, and `lantern up`'s children, which inherit the environment), and
`service.service` inside BentoML's server processes, after BentoML has applied its own
logging config there (`_bentoml_impl.worker.service` configures logging, then imports the
service).

The request id and job id of the work a line belongs to come from context variables set
with `log_context()` (the API's request-id middleware, the worker around a job), or from
`extra={"request_id": ..., "job_id": ...}` on the call.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

REQUEST_ID_HEADER = "X-Request-ID"
# An incoming id is kept only if it is short and made of safe characters (it goes into
# logs, job metadata and a response header); anything else is replaced by a new one.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

# Loggers that frameworks give handlers (and formats) of their own; after
# configure_logging() they have none and hand their records to the root's.
FRAMEWORK_LOGGERS = (
    "bentoml",
    "bentoml.access",
    "bentoml.serve",
    "uvicorn",
    "uvicorn.error",
    "uvicorn.access",
    "circus",
    "rq",
    "rq.worker",
    "rq.job",
)
# Ours, and the frameworks' whose INFO lines matter (BentoML's access log, RQ's job lines).
INFO_LOGGERS = ("lantern", "service", "workers", "models", "bentoml", "rq")
QUIET_LOGGERS = {"circus": logging.WARNING, "uvicorn.error": logging.WARNING}

_request_id: ContextVar[str | None] = ContextVar("lantern_request_id", default=None)
_job_id: ContextVar[str | None] = ContextVar("lantern_job_id", default=None)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # RQ colours its messages on a terminal


def valid_request_id(value: str | None) -> str | None:
    """`value` if it is an acceptable request id, else None."""
    if value is None:
        return None
    value = value.strip()
    return value if REQUEST_ID_RE.fullmatch(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(header: str | None) -> str:
    """The id a request goes by: its valid X-Request-ID, or a newly generated one."""
    return valid_request_id(header) or new_request_id()


def current_request_id() -> str | None:
    return _request_id.get()


def current_job_id() -> str | None:
    return _job_id.get()


@contextmanager
def log_context(request_id: str | None = None, job_id: str | None = None) -> Iterator[None]:
    """Tag every log line inside the block with this request id and/or job id."""
    tokens = []
    if request_id is not None:
        tokens.append((_request_id, _request_id.set(request_id)))
    if job_id is not None:
        tokens.append((_job_id, _job_id.set(job_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Puts the current request id / job id on a record (unless `extra` already did)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = _job_id.get()
        return True


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


def _ids(record: logging.LogRecord) -> dict[str, str]:
    ids = {}
    for name in ("request_id", "job_id"):
        value = getattr(record, name, None)
        # BentoML puts its own (integer) request id on its records; ours is a string.
        if isinstance(value, str) and value:
            ids[name] = value
    return ids


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <message> [request_id=... job_id=...]`, then a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        message = _ANSI.sub("", record.getMessage())
        ids = _ids(record)
        line = f"{_time(record)} {record.levelname} {record.name}: {message}"
        if ids:
            line += " [" + " ".join(f"{k}={v}" for k, v in ids.items()) + "]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


_TRACEBACK = "\nTraceback (most recent call last):"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process, and the ids."""

    def format(self, record: logging.LogRecord) -> str:
        message = _ANSI.sub("", record.getMessage())
        entry: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            "process": record.process,
            **_ids(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        else:
            # RQ writes a failed job's traceback into its message, not as exc_info: it
            # goes where a log search looks for tracebacks, the message keeps one line.
            head, marker, tail = message.partition(_TRACEBACK)
            if marker:
                entry["message"], entry["exception"] = head, marker.lstrip("\n") + tail
        return json.dumps(entry, ensure_ascii=False, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (tests swap it)."""

    _lantern = True

    def __init__(self, stream: TextIO | None = None):
        super().__init__()
        self._fixed = stream

    @property
    def stream(self) -> TextIO:
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass


def log_format_setting() -> LogFormat:
    """LANTERN_LOG_FORMAT as the settings read it. A bad value raises the settings'
    ValidationError (the CLI prints it as one line); a bad *other* setting is left to
    the command that reads it, so logging still starts."""
    from pydantic import ValidationError

    from lantern.core.settings import get_settings

    try:
        return get_settings().log_format
    except ValidationError as e:
        if any(tuple(err["loc"]) == ("log_format",) for err in e.errors()):
            raise
        value = os.environ.get("LANTERN_LOG_FORMAT", "text").strip().lower()
        return "json" if value == "json" else "text"


def configure_logging(
    fmt: LogFormat | None = None,
    level: int = logging.INFO,
    root_level: int | None = None,
    stream: TextIO | None = None,
) -> None:
    """Install the one handler (replacing any earlier one of ours and the frameworks').

    `fmt`: text or json (None: LANTERN_LOG_FORMAT). `level`: for Lantern's, BentoML's and
    RQ's loggers; `root_level` (default `level`) for everything else.
    """
    chosen: LogFormat = fmt or log_format_setting()
    handler = _StderrHandler(stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(ContextFilter())

    root = logging.getLogger()
    for old in list(root.handlers):
        # Ours from an earlier call, and plain stream handlers (logging.basicConfig's,
        # BentoML's); subclasses such as pytest's capture handlers stay.
        if getattr(old, "_lantern", False) or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if root_level is None else root_level)

    for name in FRAMEWORK_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
    for name in INFO_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for name, quiet in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(quiet, level))
    # A dictConfig (BentoML's) disables the loggers that existed before it ran: ours.
    for name, existing in list(logging.root.manager.loggerDict.items()):
        if isinstance(existing, logging.Logger) and name.split(".", 1)[0] in INFO_LOGGERS:
            existing.disabled = False


def configured() -> bool:
    """Whether configure_logging() has installed its handler in this process."""
    return any(getattr(h, "_lantern", False) for h in logging.getLogger().handlers)
