"""The model bundle: one BentoML model holding everything a model version is.

    <model store>/lantern-classifier/<version>/
        model.onnx         fp32 ONNX graph, dynamic batch axis ("input" -> "logits")
        model.fp16.onnx    optional fp16 variant for GPUs
        model.int8.onnx    optional statically quantised INT8 variant for CPUs, present only
                           when it passed its gate against fp32 (meta.json "int8" has the
                           figures, also when it was refused or skipped)
        weights.pt         torch state_dict, for the explanation workers
        meta.json          architecture, class names, preprocessing, training, metrics, parity,
                           explainable layers; `demo` (one line: what it knows) when the model
                           is the offline demo (models/demo.py), absent for a real model

Torch-free: the service reads bundles through this module too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lantern.core.errors import ModelError
from lantern.core.preprocess import PreprocessSpec

MODEL_NAME = "lantern-classifier"
ONNX_FILE = "model.onnx"
ONNX_FP16_FILE = "model.fp16.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
WEIGHTS_FILE = "weights.pt"
META_FILE = "meta.json"


@dataclass(frozen=True)
class Bundle:
    """A registered model version, resolved to a directory on disk."""

    tag: str  # "lantern-classifier:<version>", never "latest"
    path: Path
    meta: dict[str, Any]

    @property
    def version(self) -> str:
        return self.tag.split(":", 1)[1]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def architecture(self) -> str:
        return str(self.meta["architecture"])

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.meta["preprocessing"])

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def onnx_fp16_path(self) -> Path | None:
        p = self.path / ONNX_FP16_FILE
        return p if p.exists() else None

    @property
    def onnx_int8_path(self) -> Path | None:
        """The INT8 graph, only if it passed its gate at export (meta["int8"])."""
        p = self.path / ONNX_INT8_FILE
        passed = (self.meta.get("int8") or {}).get("status") == "passed"
        return p if passed and p.exists() else None

    @property
    def openvino_int8_path(self) -> Path | None:
        """The INT8 graph, only if it passed its gate at export as ONNX Runtime runs it and
        again as OpenVINO runs it (meta["int8"]["openvino"]): what LANTERN_RUNTIME=openvino
        may serve."""
        checked = ((self.meta.get("int8") or {}).get("openvino") or {}).get("status")
        return self.onnx_int8_path if checked == "passed" else None

    @property
    def int8(self) -> dict[str, Any] | None:
        """The INT8 record of the export: status (passed, refused, skipped) and figures."""
        record = self.meta.get("int8")
        return dict(record) if record else None

    @property
    def demo(self) -> str | None:
        """What a demo model knows, in one line ("DEMO: knows only ..."), or None for a
        real model. Set at export from the checkpoint the offline demo marked."""
        text = self.meta.get("demo")
        return str(text) if text else None

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def accuracy(self) -> float | None:
        acc = self.meta.get("metrics", {}).get("accuracy")
        return None if acc is None else float(acc)

    @property
    def explainable_layers(self) -> dict[str, list[int]] | None:
        """Layer name -> [C, H, W] of its output at the input size, for every module whose
        output is a convolutional feature map (recorded by models.export), in forward order.

        None for a bundle exported before Lantern recorded them: nothing is computed in
        its place (the service has no torch), so any syntactically valid layer name is
        accepted for such a bundle and the worker finds out whether it exists."""
        layers = self.meta.get("explainable_layers")
        if layers is None:
            return None
        return {str(layer["name"]): [int(d) for d in layer["shape"]] for layer in layers}

    def layer_problem(self, name: str) -> str | None:
        """Why `name` cannot be explained with this model, or None if it can (or if the
        bundle does not record its layers)."""
        layers = self.explainable_layers
        if layers is None or name in layers:
            return None
        others = set(self.meta.get("non_explainable_layers") or ())
        return f"{layer_not_explainable(name, layers, name in others)} ({self.tag})"

    @property
    def input_size(self) -> list[int]:
        size = self.preprocess.crop_size
        return [size, size]


def describe_int8(record: dict[str, Any] | None, missing: str = "-") -> str:
    """The INT8 record in one line: "99.6% agree", "refused: 97.1% agree",
    "skipped: <why>", or `missing` for a bundle exported without one."""
    if not record:
        return missing
    status = record.get("status")
    if status == "skipped":
        return "skipped: " + str(record.get("reason", "no calibration data"))
    text = f"{float(record['agreement']):.1f}% agree"
    return text if status == "passed" else f"refused: {text}"


def describe_openvino_int8(record: dict[str, Any] | None) -> str:
    """The INT8 graph's check under OpenVINO in one line: "99.4% agree (OpenVINO 2026.4.1)",
    "refused: <figures>", "skipped: <why>", or why there is nothing to check."""
    if not record or record.get("status") != "passed":
        return "no INT8 graph passed its gate at export"
    check = record.get("openvino")
    if not check:
        return "not checked with OpenVINO at export (exported before Lantern checked it)"
    status = check.get("status")
    if status == "passed":
        return f"{float(check['agreement']):.1f}% agree (OpenVINO {check.get('version', '?')})"
    return f"{status}: {check.get('reason', '')}"


def layer_not_explainable(name: str, layers: dict[str, list[int]], exists: bool) -> str:
    """The readable reason `name` is not one of `layers` (`exists`: it is a module of the
    model, just not a feature map), naming valid ones: the top-level stages, and an
    example of a module inside one."""
    stages = [n for n in layers if "." not in n]
    inner = next((n for n in reversed(layers) if "." in n), None)
    if exists:
        what = f"layer {name!r} is not a convolutional feature map (its output is not N, C, H, W)"
    else:
        what = f"the model has no layer {name!r}"
    hint = f", or a module inside one such as {inner!r}" if inner else ""
    return (
        f"{what}; explainable layers are the convolutional stages "
        f"{', '.join(map(repr, stages))}{hint} (GET /model lists all {len(layers)})"
    )


def save_bundle(
    onnx_path: Path,
    weights_path: Path,
    meta: dict[str, Any],
    *,
    onnx_fp16_path: Path | None = None,
    onnx_int8_path: Path | None = None,
    name: str = MODEL_NAME,
) -> Bundle:
    """Copy the files into a new version of `name` in the BentoML model store."""
    import bentoml

    for key in ("architecture", "class_names", "preprocessing"):
        if key not in meta:
            raise ModelError(f"bundle metadata is missing {key!r}")
    meta = {**meta, "created_at": meta.get("created_at") or datetime.now(UTC).isoformat()}
    labels = {"architecture": str(meta["architecture"]), "project": "lantern"}
    summary = {
        "architecture": meta["architecture"],
        "num_classes": len(meta["class_names"]),
        "accuracy": meta.get("metrics", {}).get("accuracy"),
        "demo": meta.get("demo"),  # `bentoml models get` shows it too
    }
    summary = {k: v for k, v in summary.items() if v is not None}  # BentoML refuses None
    with bentoml.models.create(name, labels=labels, metadata=summary) as model:
        target = Path(model.path)
        shutil.copyfile(onnx_path, target / ONNX_FILE)
        shutil.copyfile(weights_path, target / WEIGHTS_FILE)
        if onnx_fp16_path is not None:
            shutil.copyfile(onnx_fp16_path, target / ONNX_FP16_FILE)
        if onnx_int8_path is not None:
            shutil.copyfile(onnx_int8_path, target / ONNX_INT8_FILE)
        (target / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        tag = str(model.tag)
    return load_bundle(tag)


def load_bundle(tag: str = f"{MODEL_NAME}:latest") -> Bundle:
    """Resolve a tag ("name", "name:latest", "name:version" or "name:<alias>", e.g.
    "name:production") to a bundle on disk."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = resolve_alias(tag)
    try:
        model = bentoml.models.get(tag)
    except NotFound:
        raise ModelError(
            f"no model {tag!r} in the BentoML model store ({_store_dir()}). "
            "Train and register one with `lantern train` then `lantern export`, "
            "or run `make up`, which makes a demo model."
        ) from None
    path = Path(model.path)
    meta_file = path / META_FILE
    if not meta_file.exists():
        raise ModelError(f"model {model.tag} is not a Lantern bundle (no {META_FILE})")
    return Bundle(tag=str(model.tag), path=path, meta=json.loads(meta_file.read_text()))


def stored_models(name: str = MODEL_NAME) -> list[Any]:
    """Every version of `name` in the BentoML model store, readable bundles or not."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return list(bentoml.models.list(name))
    except NotFound:
        return []


def list_bundles(name: str = MODEL_NAME) -> list[Bundle]:
    """Every version of `name`, newest first."""
    models = sorted(stored_models(name), key=lambda m: m.info.creation_time, reverse=True)
    return [load_bundle(str(m.tag)) for m in models]


def describe_versions(name: str = MODEL_NAME) -> list[dict[str, Any]]:
    """Every version of `name`, newest first, as `lantern models list --json` and GET /models
    show them: tag, version, architecture, number of classes, accuracy, created_at,
    training, the INT8 record, the demo line (None for a real model) and the aliases
    pointing at it."""
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases(name).items()):
        by_version.setdefault(version, []).append(alias)
    return [
        {
            "tag": b.tag,
            "version": b.version,
            "architecture": b.architecture,
            "classes": len(b.class_names),
            "accuracy": b.accuracy,
            "created_at": b.meta.get("created_at"),
            "training": b.meta.get("training", {}),
            "int8": b.int8,
            "demo": b.demo,
            "aliases": by_version.get(b.version, []),
        }
        for b in list_bundles(name)
    ]


# --- aliases: the version a deployment follows -------------------------------------------
#
# BentoML's store knows versions and `latest`; Lantern adds named aliases (`production` by
# default) kept beside the versions, in $BENTOML_HOME/models/lantern-aliases.json (BentoML
# lists only directories there), so they travel with the store. `lantern models promote VERSION`
# points one at a version; the service and the workers resolve LANTERN_MODEL
# (`lantern-classifier:production` by default) when they start, so a promotion takes
# effect on the next restart and a rollback is a promotion of the previous version.
# While nothing is promoted, `production` means `latest`, so a new store just works.

DEFAULT_ALIAS = "production"
ALIASES_FILE = "lantern-aliases.json"
_ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def aliases(name: str = MODEL_NAME) -> dict[str, str]:
    """{alias: version} for model `name`."""
    path = _aliases_path()
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
    except ValueError:
        raise ModelError(f"{path} is not valid JSON; fix or delete it") from None
    return {str(k): str(v) for k, v in (table.get(name) or {}).items()}


def resolve_alias(tag: str) -> str:
    """'name:<alias>' -> 'name:<version>'; any other tag unchanged."""
    name, _, version = tag.partition(":")
    if not version or version == "latest":
        return tag
    promoted = aliases(name).get(version)
    if promoted is not None:
        return f"{name}:{promoted}"
    if version == DEFAULT_ALIAS:
        return f"{name}:latest"  # nothing promoted yet: follow the newest version
    return tag


def promote(version: str, alias: str = DEFAULT_ALIAS, name: str = MODEL_NAME) -> Bundle:
    """Point `alias` of `name` at `version` (which must be in the store); the bundle."""
    if not _ALIAS_RE.fullmatch(alias) or alias == "latest":
        raise ModelError(
            f"{alias!r} is not an alias name (lowercase letters, digits, _ and -; not 'latest')"
        )
    bundle = load_bundle(_tag(name, version))
    table = json.loads(_aliases_path().read_text()) if _aliases_path().is_file() else {}
    table.setdefault(name, {})[alias] = bundle.version
    _write_atomically(_aliases_path(), json.dumps(table, indent=2, sort_keys=True))
    return bundle


def delete_bundle(version: str, name: str = MODEL_NAME) -> str:
    """Delete a version from the store; refused while an alias points at it. Its tag."""
    import bentoml

    bundle = load_bundle(_tag(name, version))
    pinned = sorted(a for a, v in aliases(name).items() if v == bundle.version)
    if pinned:
        raise ModelError(
            f"{bundle.tag} is the {', '.join(pinned)} model; promote another version first "
            f"(`lantern models promote VERSION`), then delete this one"
        )
    bentoml.models.delete(bundle.tag)
    return bundle.tag


def _tag(name: str, version: str) -> str:
    return version if ":" in version else f"{name}:{version}"


def _aliases_path() -> Path:
    return Path(_store_dir()) / ALIASES_FILE


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _store_dir() -> str:
    """Where BentoML keeps models: $BENTOML_HOME/models (BENTOML_HOME defaults to ~/bentoml)."""
    home = os.environ.get("BENTOML_HOME") or os.path.join(os.path.expanduser("~"), "bentoml")
    return os.path.join(home, "models")
