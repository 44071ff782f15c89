"""A statically quantised INT8 graph per model version, calibrated on the model's own data.

    fp32 model.onnx --quant_pre_process--> --quantize_static (QDQ, per-channel weights,
    MinMax calibration on training images, the classifier head left fp32)--> model.int8.onnx

then checked against the fp32 graph on held-out images (the validation split the training
run named): top-1 agreement and accuracy drop. The graph is kept only when it passes the
gate (>= 99 % agreement, <= 1 accuracy point lost, by default); the numbers are recorded
in the bundle's metadata (`int8`) either way. A graph that passes is checked again as
OpenVINO runs it, when openvino is installed (`int8.openvino`): the service's OpenVINO
runtime serves the INT8 graph only if that check passed too.

Images go through the core's `PreprocessSpec.apply`, exactly what the service runs.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lantern.core.bundle import describe_int8
from lantern.core.errors import DataError
from lantern.core.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 256
HOLDOUT_IMAGES = 500
MIN_AGREEMENT = 99.0  # percent of held-out images with the same top-1 class as fp32
MAX_ACCURACY_DROP = 1.0  # accuracy points (percent) the INT8 graph may lose
CALIBRATION_BATCH = 16
SEED = 0
HEAD_OPS = ("Gemm", "MatMul")  # the final fully connected layer, left in fp32


@dataclass
class Images:
    """Preprocessed images (N, 3, H, W) with their labels (indices into the model's classes)."""

    arrays: np.ndarray
    labels: np.ndarray
    source: str


@dataclass
class Int8Result:
    meta: dict[str, Any]  # what goes into the bundle's metadata under "int8"
    path: Path | None  # the INT8 graph when it passed the gate, else None

    @property
    def message(self) -> str:
        return describe_int8(self.meta)


# --- data ---------------------------------------------------------------------------------


def calibration_sets(
    training: dict[str, Any],
    class_names: list[str],
    spec: PreprocessSpec,
    *,
    calibration_data: Path | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    holdout_images: int = HOLDOUT_IMAGES,
    seed: int = SEED,
) -> tuple[Images, Images]:
    """(calibration, held-out) images, each stratified by class and seeded.

    From `calibration_data` (an ImageFolder: one sub-folder per class name; `train/` and
    `val/` inside it are used as such, otherwise it is split in two) when given, else from
    the dataset the training run names (`training["dataset"]`): calibration images from its
    training split, held-out ones from its validation split. Raises DataError when none is
    available.
    """
    from models import data as datasets

    if calibration_data is not None:
        train, val = _folder_splits(calibration_data, class_names, seed)
        where = str(calibration_data)
    else:
        dataset = training.get("dataset")
        data_seed = int(training.get("seed", 0))
        if dataset in datasets.GENERATED:
            size = int(training.get("image_size") or spec.crop_size)
            n_train = int(training.get("train_images") or 2000)
            n_val = int(training.get("val_images") or max(200, n_train // 5))
            train = datasets.generated_dataset(dataset, n_train, size, data_seed)
            val = datasets.generated_dataset(dataset, n_val, size, data_seed + 10_000)
            where = f"generated {dataset} (seed {data_seed}, {size} px)"
        elif dataset == "cifar10":
            root = Path(training.get("data_dir") or "data")
            train = datasets.cifar10(root, True, False)
            val = datasets.cifar10(root, False, False)
            where = f"CIFAR-10 in {root}"
        elif dataset == "folder":
            root = Path(training.get("data_dir") or "")
            train, val = _folder_splits(root, class_names, data_seed)
            where = f"image folder {root}"
        else:
            raise DataError(
                f"the checkpoint names no dataset Lantern can read back ({dataset!r}); "
                "pass --calibration-data DIR (an ImageFolder with one sub-folder per class)"
            )
    calib = _sample(train, calibration_images, len(class_names), seed, spec, f"{where}, train")
    held = _sample(val, holdout_images, len(class_names), seed + 1, spec, f"{where}, held out")
    return calib, held


def _folder_splits(root: Path, class_names: list[str], seed: int) -> tuple[Any, Any]:
    from torch.utils.data import Subset

    from models import data as datasets
    from models.train import _split

    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = datasets.image_folder(root / "train"), datasets.image_folder(root / "val")
        classes = list(train.classes)
    else:
        plain = datasets.image_folder(root)
        train_idx, val_idx = _split(len(plain), 0.2, seed)
        train, val, classes = Subset(plain, train_idx), Subset(plain, val_idx), list(plain.classes)
    if classes != list(class_names):
        raise DataError(
            f"{root} has classes {classes}, the model {list(class_names)}; calibration data "
            "needs one sub-folder per class of the model, with the same names"
        )
    return train, val


def _labels(ds: Any) -> list[int]:
    from torch.utils.data import Subset

    from models.data import ShapesDataset

    if isinstance(ds, Subset):
        inner = _labels(ds.dataset)
        return [inner[i] for i in ds.indices]
    if isinstance(ds, ShapesDataset):
        return [i % len(ds.classes) for i in range(len(ds))]
    return [int(t) for t in ds.targets]


def _sample(
    ds: Any, n: int, num_classes: int, seed: int, spec: PreprocessSpec, source: str
) -> Images:
    """Up to `n` images of `ds`, as evenly spread over the classes as the data allows."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(_labels(ds)):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(seed)
    per_class = math.ceil(n / max(1, num_classes))
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        chosen += rng.sample(members, min(per_class, len(members)))
    rng.shuffle(chosen)
    chosen = chosen[:n]
    if not chosen:
        raise DataError(f"no images in {source}")
    arrays, labels = [], []
    for i in chosen:
        image, label = ds[i]
        arrays.append(spec.apply(image.convert("RGB")))
        labels.append(int(label))
    return Images(np.stack(arrays), np.asarray(labels), source)


# --- quantisation and the gate ------------------------------------------------------------


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over preprocessed images."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)
        )
        self._input = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input: batch}


def quantize(fp32_path: Path, calibration: np.ndarray, out_path: Path) -> Path:
    """Static INT8 (QDQ, per-channel int8 weights, uint8 activations, MinMax calibration)
    of the fp32 graph, the classifier head left in fp32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path.with_name("model.prepared.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    # The classifier head stays fp32: it is a tiny share of the compute, and quantising the
    # logits themselves is what flips near-ties (measured: 99.0 -> 99.5 % agreement).
    head = [n.name for n in _load(prepared).graph.node if n.op_type in HEAD_OPS]
    quantize_static(
        str(prepared),
        str(out_path),
        _Reader(calibration, _input_name(prepared)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        # uint8 activations with int8 weights (U8S8): ONNX Runtime's fast x86 kernels
        # (VNNI/AMX). Measured on a 2-vCPU Xeon, ResNet-50 batch 8: U8S8 101.6 images/s,
        # S8S8 25.8, fp32 32.3 (BENCHMARKS.md "INT8"). Without VNNI, U8S8 can saturate;
        # the agreement gate would then refuse the graph.
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=head,
    )
    prepared.unlink(missing_ok=True)
    return out_path


def top1(onnx_path: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Top-1 class of every image under ONNX Runtime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return _batched_top1(session, images, batch)


def _batched_top1(session: Any, images: np.ndarray, batch: int) -> np.ndarray:
    """Top-1 class of every image, `batch` at a time, from anything with ONNX Runtime's
    session calls (`get_inputs()`, `run(None, feed)`): an ORT session or an OpenVINOModel."""
    name = session.get_inputs()[0].name
    out = [
        np.asarray(session.run(None, {name: images[i : i + batch]})[0]).argmax(axis=1)
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(out)


def compare_top1(
    fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray
) -> tuple[float, float, float, float]:
    """(top-1 agreement, fp32 accuracy, INT8 accuracy, accuracy drop), in percent."""
    agreement = 100.0 * float(np.mean(fp32 == int8))
    acc32 = 100.0 * float(np.mean(fp32 == labels))
    acc8 = 100.0 * float(np.mean(int8 == labels))
    return agreement, acc32, acc8, acc32 - acc8


def openvino_top1(onnx_path: Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Top-1 class of every image under OpenVINO, compiled exactly as the service compiles
    it for LANTERN_RUNTIME=openvino (lantern.core.openvino_runtime). Raises UsageError when
    the optional openvino package is not installed."""
    from lantern.core.cpus import usable_cpus
    from lantern.core.openvino_runtime import OpenVINOModel

    return _batched_top1(OpenVINOModel(onnx_path, threads=usable_cpus()), images, batch)


def openvino_gate(
    int8_path: Path,
    holdout: Images,
    fp32_top1: np.ndarray,
    *,
    min_agreement: float,
    max_accuracy_drop: float,
) -> dict[str, Any]:
    """The same gate for the INT8 graph as OpenVINO runs it (its int8 kernels round, fuse
    and requantise differently from ONNX Runtime's, so ONNX Runtime's figures do not vouch
    for it): its top-1 agreement with ONNX Runtime fp32 and its accuracy drop on the same
    held-out images. "skipped" when openvino is not installed, and the service then serves
    fp32 under LANTERN_RUNTIME=openvino."""
    try:
        import openvino
    except ImportError:
        return {"status": "skipped", "reason": "openvino was not installed at export"}
    got = openvino_top1(int8_path, holdout.arrays)
    agreement, _, acc8, drop = compare_top1(fp32_top1, got, holdout.labels)
    passed = agreement >= min_agreement and drop <= max_accuracy_drop
    record: dict[str, Any] = {
        "status": "passed" if passed else "refused",
        "version": str(openvino.__version__),
        "agreement": round(agreement, 3),
        "int8_accuracy": round(acc8, 3),
        "accuracy_drop": round(drop, 3),
    }
    figures = (
        f"OpenVINO {openvino.__version__} INT8: top-1 agreement with fp32 {agreement:.1f}% "
        f"(needs >= {min_agreement:g}%), accuracy drop {drop:.1f} points (at most "
        f"{max_accuracy_drop:g})"
    )
    if passed:
        log.info("INT8 graph passes under OpenVINO too: %s", figures)
    else:
        record["reason"] = figures
        log.warning(
            "INT8 graph REFUSED for OpenVINO: %s. With LANTERN_RUNTIME=openvino the model "
            "is served in fp32; ONNX Runtime still serves the INT8 graph.",
            figures,
        )
    return record


def build_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: Images,
    holdout: Images,
    *,
    min_agreement: float = MIN_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
) -> Int8Result:
    """Quantise, compare with fp32 on the held-out images, and apply the gate."""
    quantize(fp32_path, calibration.arrays, out_path)
    ref, got = top1(fp32_path, holdout.arrays), top1(out_path, holdout.arrays)
    agreement, acc32, acc8, drop = compare_top1(ref, got, holdout.labels)
    passed = agreement >= min_agreement and drop <= max_accuracy_drop
    meta: dict[str, Any] = {
        "status": "passed" if passed else "refused",
        "format": "QDQ",
        "per_channel": True,
        "activations": "uint8",
        "weights": "int8",
        "calibration_method": "MinMax",
        "fp32_nodes": "classifier head (Gemm/MatMul)",
        "calibration": {"source": calibration.source, "images": len(calibration.arrays)},
        "holdout": {"source": holdout.source, "images": len(holdout.arrays)},
        "agreement": round(agreement, 3),
        "fp32_accuracy": round(acc32, 3),
        "int8_accuracy": round(acc8, 3),
        "accuracy_drop": round(drop, 3),
        "min_agreement": min_agreement,
        "max_accuracy_drop": max_accuracy_drop,
    }
    figures = (
        f"top-1 agreement with fp32 {agreement:.1f}% (needs >= {min_agreement:g}%), accuracy "
        f"{acc32:.1f}% -> {acc8:.1f}% (drop {drop:.1f} points, at most {max_accuracy_drop:g}) "
        f"on {len(holdout.arrays)} held-out images"
    )
    if passed:
        log.info("INT8 graph passes: %s", figures)
        meta["openvino"] = openvino_gate(
            out_path,
            holdout,
            ref,
            min_agreement=min_agreement,
            max_accuracy_drop=max_accuracy_drop,
        )
        return Int8Result(meta, out_path)
    meta["reason"] = figures
    log.warning(
        "INT8 graph REFUSED: %s. The fp32 model is registered without it; it will be "
        "served in fp32.",
        figures,
    )
    out_path.unlink(missing_ok=True)
    return Int8Result(meta, None)


def skipped(reason: str) -> Int8Result:
    log.warning("no INT8 graph: %s. The fp32 model is registered without one.", reason)
    return Int8Result({"status": "skipped", "reason": reason}, None)


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _input_name(path: Path) -> str:
    return str(_load(path).graph.input[0].name)
