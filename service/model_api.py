"""GET /model: the model version the API serves, and what it can explain; GET /models:
every version in the model store, which /explain's `model=` can name.

    GET /model   {"tag", "version", "architecture", "class_names", "input_size",
                  "explainable_layers": [{"name", "shape": [C, H, W]}] or null, "accuracy",
                  "demo": "DEMO: knows only ..." or null}
    GET /models  {"served": "<tag>", "versions": [{"tag", "version", "architecture",
                  "classes", "accuracy", "created_at", "int8", "demo", "aliases"}]},
                  newest first

`explainable_layers` are the layers /explain accepts for `layer` and `activation_layer`
(recorded at export, models.export); null for an older bundle that does not record them.
The version list is `lantern models list --json`'s (lantern.core.bundle.describe_versions)
for the served model's name, read from the store on each request, so a version registered
while the service runs shows up at once.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter
from pydantic import BaseModel, Field

from lantern.core.bundle import describe_versions
from lantern.core.jobs import LAYER_METHODS
from service.dependencies import CurrentService
from service.openapi import MODEL_RESPONSES, MODELS_RESPONSES, method_titles

router = APIRouter()


class ExplainableLayer(BaseModel):
    name: str = Field(description="Module path, e.g. 'layer4' or 'layer3.1.conv2'.")
    shape: list[int] = Field(description="[C, H, W] of its output at the input size.")


class ModelInfo(BaseModel):
    tag: str = Field(description="The model version served, 'name:version'.")
    version: str = Field(description="The version part of the tag.")
    architecture: str = Field(description="The network, e.g. 'resnet50'.")
    class_names: list[str] = Field(description="Class names, by class index.")
    input_size: list[int] = Field(description="[H, W] of the model input, in pixels.")
    explainable_layers: list[ExplainableLayer] | None = Field(
        description=f"Layers {method_titles(LAYER_METHODS)} can explain (`layer`, "
        "`activation_layer`), in forward order; null when the bundle does not record them "
        "(any layer name is then accepted)."
    )
    accuracy: float | None = Field(description="Validation accuracy recorded at training.")
    demo: str | None = Field(
        default=None,
        description="Set when the served model is Lantern's offline demo: one line saying "
        "what it knows (it recognises only its generated classes); null for a real model.",
    )


@router.get(
    "/model",
    response_model=ModelInfo,
    responses=MODEL_RESPONSES,
    summary="The model served, its classes and its explainable layers",
)
async def model(lantern: CurrentService) -> dict[str, Any]:
    bundle = lantern.bundle
    layers = bundle.explainable_layers
    return {
        "tag": bundle.tag,
        "version": bundle.version,
        "architecture": bundle.architecture,
        "class_names": bundle.class_names,
        "input_size": bundle.input_size,
        "explainable_layers": None
        if layers is None
        else [{"name": name, "shape": shape} for name, shape in layers.items()],
        "accuracy": bundle.accuracy,
        "demo": bundle.demo,
    }


class ModelVersion(BaseModel):
    tag: str = Field(description="'name:version'.")
    version: str = Field(description="The version part of the tag: what `model=` takes.")
    architecture: str = Field(description="The network, e.g. 'resnet50'.")
    classes: int = Field(description="How many classes it tells apart.")
    accuracy: float | None = Field(description="Validation accuracy recorded at training.")
    created_at: str | None = Field(description="When it was exported (ISO 8601, UTC).")
    int8: dict[str, Any] | None = Field(
        description="The INT8 record of its export: `status` (passed, refused, skipped) and "
        "the figures or the reason; null for a version exported without one."
    )
    demo: str | None = Field(
        description="Set for Lantern's offline demo model: one line saying what it knows."
    )
    aliases: list[str] = Field(description="Aliases pointing at it, e.g. ['production'].")


class ModelVersions(BaseModel):
    served: str = Field(description="The tag of the version the service serves (GET /model).")
    versions: list[ModelVersion] = Field(
        description="Every version of the served model's name in the model store, newest first."
    )


@router.get(
    "/models",
    response_model=ModelVersions,
    responses=MODELS_RESPONSES,
    summary="Every model version in the store, to explain with (model=)",
)
async def models(lantern: CurrentService) -> dict[str, Any]:
    served = lantern.bundle.tag
    name = served.split(":", 1)[0]
    # Reads the store's directories and meta files: off the event loop.
    versions = await anyio.to_thread.run_sync(describe_versions, name)
    return {"served": served, "versions": versions}
