"""The throw-away model store a benchmark registers its models in.

Every benchmark registers random-weight models, and must never do so in the user's store.
BentoML reads BENTOML_HOME once, when it is first imported, so the store has to be chosen
before anything imports bentoml: each benchmark's `main()` calls `use_temporary_store()`
first thing. (It used to happen as a side effect of importing bench.predict, which
silently repointed the store of whoever imported it, `make soak`'s server included.)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path


def use_temporary_store(prefix: str = "lantern-bench-") -> Path:
    """Point BENTOML_HOME at `<new temporary directory>/bentoml` for this process and the
    servers it starts, turn BentoML's usage tracking off, and return the directory (for
    the run's other files too; the caller removes it, or keeps it for its logs).

    Refuses once bentoml is imported: from then on the process keeps the store it had,
    and the run would register its models there while its servers looked elsewhere.
    """
    if "bentoml" in sys.modules:
        raise RuntimeError(
            "bentoml is already imported, so it keeps its model store: call "
            "use_temporary_store() before anything imports bentoml"
        )
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["BENTOML_HOME"] = str(root / "bentoml")
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    return root
