"""GET /model: the model version the API serves, and what it can explain.

    GET /model   {"tag", "version", "architecture", "class_names", "input_size",
                  "explainable_layers": [{"name", "shape": [C, H, W]}] or null, "accuracy",
                  "demo": "DEMO: knows only ..." or null}

`explainable_layers` are the layers /explain accepts for `layer` and `activation_layer`
(recorded at export, models.export); null for an older bundle that does not record them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.dependencies import CurrentService
from service.openapi import MODEL_RESPONSES

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
        description="Layers Grad-CAM, Grad-CAM++ and activations can explain, in forward "
        "order; null when the bundle does not record them (any layer name is then accepted)."
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
