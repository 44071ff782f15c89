"""Reading image uploads out of an HTTP request, with every limit enforced while reading.

A request carries images either as `multipart/form-data` (one or more file fields) or, for
single-image endpoints, as a raw body with an `image/*` or `application/octet-stream`
content type. The body is read in chunks and refused as soon as it passes its byte limit,
so an oversized upload never sits in memory whole.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from lantern.core.errors import InputError, PayloadTooLarge, UnsupportedMediaType

RAW_TYPES = ("application/octet-stream",)
# Non-file form fields are tiny (none is used today); anything bigger is a mistake.
MAX_FIELD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Upload:
    name: str  # what error messages call it: the file name, or the field name
    data: bytes
    filename: str | None = None  # as the client sent it, if it sent one


async def read_uploads(
    request: Request,
    *,
    field: str,
    max_files: int,
    max_file_bytes: int,
    max_body_bytes: int,
    allow_raw: bool = False,
    fields: dict[str, str] | None = None,
) -> list[Upload]:
    """The image files sent in `field` (in order), or the raw body when `allow_raw`.

    When `fields` is given, the form's text fields are copied into it.

    Raises InputError (400), PayloadTooLarge (413) or UnsupportedMediaType (415).
    """
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise _body_too_large(max_body_bytes)
    if media_type == "multipart/form-data":
        uploads = await _read_multipart(
            request, field, max_files, max_file_bytes, max_body_bytes, fields
        )
    elif allow_raw and (media_type.startswith("image/") or media_type in RAW_TYPES):
        body = b"".join([chunk async for chunk in _limited_body(request, max_body_bytes)])
        if not body:
            raise InputError("the request body is empty; send the image bytes")
        uploads = [Upload(name="the request body", data=body)]
    elif not media_type:
        body = b"".join([chunk async for chunk in _limited_body(request, max_body_bytes)])
        raise InputError(
            "the request body is empty; " + _how_to_send(field, allow_raw)
            if not body
            else "the request has no Content-Type; " + _how_to_send(field, allow_raw)
        )
    else:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {media_type!r}; " + _how_to_send(field, allow_raw)
        )
    for upload in uploads:
        if len(upload.data) > max_file_bytes:
            raise PayloadTooLarge(
                f"{upload.name} is {len(upload.data):,} bytes; the limit is "
                f"{max_file_bytes:,} bytes per image"
            )
    return uploads


async def _read_multipart(
    request: Request,
    field: str,
    max_files: int,
    max_file_bytes: int,
    max_body_bytes: int,
    fields: dict[str, str] | None = None,
) -> list[Upload]:
    parser = MultiPartParser(
        request.headers,
        _limited_body(request, max_body_bytes),
        max_files=max_files,
        max_fields=16,
        max_part_size=MAX_FIELD_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "Too many files" in str(e) and max_files == 1:
            raise InputError(
                f"send one image in field {field!r}; use /predict_batch for several"
            ) from None
        if "Too many files" in str(e):
            raise PayloadTooLarge(
                f"too many files in one request; the limit is {max_files}"
            ) from None
        raise InputError(f"malformed multipart/form-data body: {e}") from None
    try:
        if fields is not None:
            texts = [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
            names = [k for k, _ in texts]
            repeated = sorted({k for k in names if names.count(k) > 1})
            if repeated:
                # Which one would count is a guess; refuse instead of taking the last.
                raise InputError(
                    "form field(s) "
                    + ", ".join(repr(k) for k in repeated)
                    + " sent more than once; send each option once"
                )
            fields.update(texts)
        values = form.getlist(field)
        if not values:
            sent = sorted(set(form.keys()))
            raise InputError(
                f"missing form field {field!r}"
                + (f" (the request has {', '.join(map(repr, sent))})" if sent else "")
                + "; "
                + _how_to_send(field, allow_raw=False)
            )
        uploads = []
        for i, value in enumerate(values):
            if not isinstance(value, UploadFile):
                raise InputError(
                    f"form field {field!r} must be a file upload, not a text value "
                    f"(with curl: -F {field}=@photo.jpg)"
                )
            label = f"{field}[{i}]" if len(values) > 1 else field
            name = f"{label} ({value.filename})" if value.filename else label
            data = await value.read(max_file_bytes + 1)
            uploads.append(Upload(name=name, data=data, filename=value.filename))
        return uploads
    finally:
        await form.close()


async def _limited_body(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _body_too_large(limit)
            yield chunk
    except ClientDisconnect:
        raise InputError("the client disconnected before the upload was complete") from None


def _body_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than the limit of {limit:,} bytes")


def _how_to_send(field: str, allow_raw: bool) -> str:
    how = f"send multipart/form-data with the image in file field {field!r}"
    if allow_raw:
        how += " or the raw image bytes with an image/* Content-Type"
    return how


async def read_json_object(request: Request, *, max_body_bytes: int) -> dict[str, object]:
    """The request's JSON object body (application/json), read within `max_body_bytes`.

    Raises InputError (400) for a body that is not a JSON object, PayloadTooLarge (413),
    UnsupportedMediaType (415) for another Content-Type.
    """
    import json

    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in ("application/json", ""):
        raise UnsupportedMediaType(
            f"unsupported Content-Type {media_type!r}; send a JSON object (application/json)"
        )
    body = b"".join([chunk async for chunk in _limited_body(request, max_body_bytes)])
    try:
        value = json.loads(body)
    except ValueError:
        raise InputError("the request body is not JSON; send a JSON object") from None
    if not isinstance(value, dict):
        raise InputError(f"the request body must be a JSON object, not {type(value).__name__}")
    return value
