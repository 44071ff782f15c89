"""A second BentoML service that calls Lantern through `bentoml.depends(url=...)`, as
another team's service would: served for real by tests/test_bentoml_client.py.

    LANTERN_URL=http://127.0.0.1:3000 bentoml serve tests.bentoml_caller:Caller --port 3001

The key for a Lantern with LANTERN_API_KEYS goes in BENTO_CLOUD_API_KEY (BentoML's client
sends it as `Authorization: Bearer`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml


@bentoml.service(name="lantern-caller", workers=1)
class Caller:
    lantern = bentoml.depends(url=os.environ.get("LANTERN_URL", "http://127.0.0.1:3000"))

    @bentoml.api
    async def classify(self, image: Path) -> dict[str, Any]:
        """The label Lantern gives `image`, and the model version that answered."""
        answer = await self.lantern.to_async.predict(image=image, top_k=1)
        return {"label": answer["label"], "model_version": answer["model_version"]}
