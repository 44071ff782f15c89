"""How the routes reach the running service: FastAPI's dependency mechanism, no globals.

`Lantern.__init__` (service.service) puts itself on the app as `app.state.lantern`; a route
declares `lantern: CurrentService` and FastAPI hands it the service from the request. So
the routes depend on what they use (`PredictionService`), not on the BentoML class, and
service.service and the route modules do not import each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Protocol

from fastapi import Depends, Request

from lantern.core.settings import Settings

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from lantern.core.bundle import Bundle
    from service.explanations import Explanations
    from service.uploads import Upload


class PredictionService(Protocol):
    """What the routes need of the service."""

    settings: Settings
    class_names: list[str]
    bundle: Bundle
    provider: str
    session: Any
    explanations: Explanations
    explain_probe: Any  # service.status_api.ExplainProbe (which imports this module)

    async def predict_uploads(self, uploads: list[Upload], k: int) -> list[dict[str, Any]]: ...

    def decode(self, upload: Upload) -> Image.Image: ...

    def probabilities(self, batch: np.ndarray) -> np.ndarray: ...


async def current_service(request: Request) -> PredictionService:
    # `async def`, though it awaits nothing: FastAPI runs a plain `def` dependency in its
    # thread pool, a thread hand-off and back on every request for one attribute read
    # (~7 % of the event loop's CPU under /predict load; BENCHMARKS.md, "A cheaper model").
    service: PredictionService | None = getattr(request.app.state, "lantern", None)
    if service is None:
        raise RuntimeError("the Lantern service has not started (app.state.lantern is unset)")
    return service


CurrentService = Annotated[PredictionService, Depends(current_service)]
