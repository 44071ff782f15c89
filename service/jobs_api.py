"""HTTP routes for asynchronous explanations.

POST /explain              images + methods/targets/layer/model/force/faithfulness/
                           compare_top
                           -> 202 {job_id, status_url} (200 with the job's status when an
                           identical job exists and force is not set)
GET  /jobs/{id}            status, progress, readable error, manifest with artifact URLs
GET  /jobs/{id}/{file}     one artifact (PNG or .npy)

The web page and the API docs page are in service.pages; errors become HTTP responses in
service.api.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from service import handlers
from service.dependencies import CurrentService
from service.handlers import EXPLAIN_FLAGS, EXPLAIN_OPTIONS
from service.openapi import (
    ARTIFACT_RESPONSES,
    EXPLAIN_RESPONSES,
    JOB_RESPONSES,
    LAYER_HELP,
    method_list,
)

router = APIRouter()
log = logging.getLogger("lantern.service")


_OPTIONS_DOC = (
    "Parameters may also be sent as form fields. methods: comma-separated, from "
    f"{method_list()} (default `gradcam`); depth shows the strongest feature maps of the "
    "stem and layer1 to layer4 as one PNG per image, and each stage's channels. "
    "targets: one class index (or name) per image, "
    "comma-separated; an empty entry means the image's own top class. "
    f"layer: {LAYER_HELP}; activation_layer: the module whose feature maps are shown. "
    "Both must be convolutional feature maps of the model (GET /model lists them): any "
    "other name is a 422 naming valid ones, before anything is queued. "
    "model: the model version to explain with (a version such as the `version` GET /model "
    "reports or GET /models lists, `latest`, or a whole tag `lantern-classifier:<version>`; "
    "default: the model the service serves). A version the model store does not have is "
    "a 404. Targets and layers are checked against that version, and the job id includes "
    "the concrete version, so two versions explain the same images side by side as two jobs. "
    "force: true recomputes a request identical to one that already finished (or "
    "failed): the old job and its files are deleted and it is queued afresh under the "
    "same id (202); one still queued or running is returned as it is. "
    "faithfulness: true also scores every map with deletion and insertion curves "
    "(Petsiuk et al. 2018, RISE): the model's probability for the target class as the "
    "pixels the map ranks highest are removed (replaced with the image's mean colour) "
    "or revealed, in 16 steps, against the same curves for a random pixel order (seeded); "
    "the manifest gives, per image and method, `faithfulness` with deletion_auc, "
    "insertion_auc, random_deletion_auc and random_insertion_auc. A deletion AUC below "
    "random and an insertion AUC above it mean the map points at what the prediction "
    "rests on. Part of the job id. "
    "compare_top: 2 to 5, the maps of each image's k most probable classes in one job "
    '("why this class and not that one?"): one forward pass and one gradient per class; '
    "each manifest image gets `compare`, one entry per rank with the class label, index, "
    "probability and its files (and `urls`) for every method that depends on the class. "
    "Not with targets. Part of the job id."
)


@router.post(
    "/explain",
    status_code=202,
    responses=EXPLAIN_RESPONSES,
    summary="Explain images (asynchronous job)",
    description=_OPTIONS_DOC,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            },
                            # The same options as the query parameters, as text fields.
                            **{
                                name: {"type": "boolean" if name in EXPLAIN_FLAGS else "string"}
                                for name in EXPLAIN_OPTIONS
                            },
                        },
                        "required": ["images"],
                    }
                }
            },
        }
    },
)
async def explain(
    request: Request,
    lantern: CurrentService,
    methods: str | None = Query(None, description="comma-separated methods (default gradcam)"),
    targets: str | None = Query(None, description="comma-separated class per image"),
    layer: str | None = Query(None, description=LAYER_HELP),
    activation_layer: str | None = Query(None, description="layer shown by activations"),
    model: str | None = Query(None, description="model version (default: the one served)"),
    force: bool | None = Query(None, description="recompute an identical finished job"),
    faithfulness: bool | None = Query(
        None, description="score each map with deletion/insertion curves"
    ),
    compare_top: str | None = Query(
        None, description="2..5: also the maps of each image's k most probable classes"
    ),
) -> Response:
    form: dict[str, str] = {}
    uploads = await handlers.read_explain_uploads(request, lantern.settings, fields=form)
    query = {
        "methods": methods,
        "targets": targets,
        "layer": layer,
        "activation_layer": activation_layer,
        "model": model,
        "force": None if force is None else str(force).lower(),
        "faithfulness": None if faithfulness is None else str(faithfulness).lower(),
        "compare_top": compare_top,
    }
    params = {**form, **{k: v for k, v in query.items() if v is not None}}
    body, status = await handlers.submit_explanation(lantern, uploads, params)
    return JSONResponse(body, status_code=status)


@router.get(
    "/jobs/{job_id}",
    responses=JOB_RESPONSES,
    summary="Status, progress and results of an explanation job",
)
async def job(job_id: str, lantern: CurrentService) -> dict[str, Any]:
    return await handlers.job_status(lantern, job_id)


@router.get(
    "/jobs/{job_id}/{name:path}",
    responses=ARTIFACT_RESPONSES,
    response_class=Response,
    summary="One artifact of a finished job",
)
async def artifact(job_id: str, name: str, lantern: CurrentService) -> Response:
    explanations = lantern.explanations
    data, content_type = await explanations.in_thread(explanations.artifact, job_id, name)
    return Response(
        data,
        media_type=content_type,
        headers={
            "Cache-Control": "private, max-age=3600",
            "Content-Disposition": f'inline; filename="{name.rsplit("/", 1)[-1]}"',
        },
    )
