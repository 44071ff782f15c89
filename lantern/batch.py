"""The batch client's engine: explain many images through a running Lantern service.

`explain_images(client, images, options)` (what `lantern explain` runs) sends the images
in jobs of `options.batch_size`, keeps `options.parallel` jobs in flight, and for the
image `cats/tom.jpg` writes `<out>/cats/tom/` holding every artifact of its job, under
the very names the API gives them (`tom.gradcam.heatmap.png`, `tom.gradcam.npy`, ...:
the name the user sent, lantern.core.jobs.image_names) and, last, `result.json`: the
prediction, the explained class and where the files came from (with compare_top, also each
compared class and its files: `compare`). That file is the "done"
marker: a re-run skips every image whose result.json matches the image's bytes and the
requested methods and layers, so an interrupted run resumes without sending finished
images again. `<out>/predictions.csv` lists every image with its prediction or the reason
it was rejected or failed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from lantern.core.store import is_valid_file_name

RESULT_FILE = "result.json"
CSV_FILE = "predictions.csv"
CSV_FIELDS = (
    "path",
    "output",
    "label",
    "class_index",
    "probability",
    "target_label",
    "target_index",
    "model_version",
    "job_id",
    "status",
    "error",
)


@dataclass(frozen=True)
class BatchOptions:
    """What to explain and how: the command's options, checked by the caller."""

    out: Path
    methods: list[str]
    layer: str
    activation_layer: str | None = None
    batch_size: int = 16
    parallel: int = 2
    job_timeout: float = 1800.0
    progress: bool = True
    faithfulness: bool = False
    compare_top: int | None = None  # the maps of each image's k most probable classes


@dataclass
class Outcome:
    """What became of one image in this run (or a previous one)."""

    status: str  # ok, rejected, failed, pending
    result: dict[str, Any] | None = None
    error: str = ""


@dataclass
class Submitted:
    job_id: str
    chunk: list[Any]  # list[InputImage]
    started: float  # time.monotonic() at submission
    shown: int = 0  # images of this job already counted on the progress bar
    status: dict[str, Any] = field(default_factory=dict)  # an answer not yet acted on


def explain_images(client: Any, images: list[Any], options: BatchOptions) -> int:
    """Explain `images` (lantern.client.InputImage) with `client`; the exit status."""
    request: dict[str, Any] = {
        "methods": sorted(options.methods),
        "layer": options.layer,
        "activation_layer": options.activation_layer or options.layer,
    }
    if options.faithfulness:  # only then: results of runs without it still match and resume
        request["faithfulness"] = True
    if options.compare_top is not None:  # likewise
        request["compare_top"] = options.compare_top
    outcomes: dict[str, Outcome] = {}
    todo = []
    for image in images:
        previous = _finished_result(options.out / image.key, image.path, request)
        if previous is not None:
            outcomes[image.key] = Outcome("ok", previous)
        else:
            todo.append(image)
    already = len(images) - len(todo)
    try:
        _Run(client, options, options.methods, request, outcomes).explain(
            todo, len(images), already
        )
    finally:
        _write_csv(options.out / CSV_FILE, images, outcomes)
    return _report(images, outcomes, already, options.out)


class _Run:
    """One run: submits batches as jobs, polls them, saves what they made."""

    def __init__(
        self,
        client: Any,
        options: BatchOptions,
        methods: list[str],
        request: dict[str, Any],
        outcomes: dict[str, Outcome],
    ):
        self.client = client
        self.options = options
        self.methods = methods
        self.request = request
        self.outcomes = outcomes
        self.bar: Any = None

    def explain(self, todo: list[Any], total: int, already: int) -> None:
        from tqdm import tqdm

        from lantern.client import Batches

        batches = Batches(todo, self.options.batch_size)
        in_flight: list[Submitted] = []
        self.bar = tqdm(
            total=total,
            initial=already,
            unit="img",
            desc="explaining",
            disable=not self.options.progress or not sys.stderr.isatty(),
        )
        try:
            while batches or in_flight:
                while batches and len(in_flight) < self.options.parallel:
                    submitted = self.submit(batches)
                    if submitted is not None:
                        in_flight.append(submitted)
                for job in list(in_flight):
                    if self.poll(job):
                        in_flight.remove(job)
                if in_flight:
                    time.sleep(0.3)
        finally:
            self.bar.close()

    def submit(self, batches: Any) -> Submitted | None:
        from lantern.client import RequestRejected

        chunk = batches.next()
        try:
            answer = self.client.explain(
                [(image.name, image.read()) for image in chunk],
                methods=self.methods,
                layer=self.options.layer,
                activation_layer=self.options.activation_layer,
                faithfulness=self.options.faithfulness,
                compare_top=self.options.compare_top,
            )
        except RequestRejected as e:
            if not batches.rejected(chunk, e):
                self.outcomes[chunk[0].key] = Outcome("rejected", error=e.message)
                self.bar.update(1)
            return None
        job = Submitted(answer["job_id"], chunk, started=time.monotonic())
        if answer.get("cached") and answer.get("status") in ("finished", "failed"):
            job.status = answer  # known already: no need to ask again
        return job

    def fetch(self, job: Submitted, url: str, folder: Path) -> str:
        """Download one artifact into `folder` under the API's own file name; that name."""
        name = PurePosixPath(url).name
        if not is_valid_file_name(name):
            raise _protocol_error(job.job_id, f"names a file {name!r}")
        self.client.download(url, folder / name)
        return name

    def poll(self, job: Submitted) -> bool:
        """Advance the job; True once it is settled (downloaded, or failed)."""
        from lantern.core.errors import JobError

        status = job.status or self.client.job(job.job_id)
        job.status = {}
        done = min(int(status.get("progress", {}).get("done", 0)), len(job.chunk))
        if status["status"] == "finished":
            self.harvest(job, status["manifest"])
            return True
        if status["status"] == "failed":
            error = status.get("error") or "no reason given"
            for image in job.chunk:
                self.outcomes[image.key] = Outcome(
                    "failed", error=f"job {job.job_id} failed: {error}"
                )
            self.bar.update(len(job.chunk) - job.shown)
            return True
        if done > job.shown:  # a running job's progress
            self.bar.update(done - job.shown)
            job.shown = done
        if time.monotonic() - job.started > self.options.job_timeout:
            raise JobError(
                f"explanation job {job.job_id} is still {status['status']} after "
                f"{self.options.job_timeout:.0f} s; is a `lantern worker` running? "
                "Run the same command again to resume."
            )
        return False

    def harvest(self, job: Submitted, manifest: dict[str, Any]) -> None:
        from lantern.client import RequestRejected

        entries = manifest.get("images", [])
        if len(entries) != len(job.chunk):
            raise _protocol_error(job.job_id, "has a manifest that does not match its images")
        for image, entry in zip(job.chunk, entries, strict=True):
            folder = self.options.out / image.key
            files: dict[str, str] = {}
            compared = []
            try:
                fetched: dict[str, str] = {}  # url: name, so each file is fetched once
                for key, url in sorted(entry.get("urls", {}).items()):
                    files[key] = fetched[url] = self.fetch(job, url, folder)
                for item in entry.get("compare", []):  # rank 1's files are the image's own
                    item_files = {
                        key: fetched.get(url) or self.fetch(job, url, folder)
                        for key, url in sorted(item.get("urls", {}).items())
                    }
                    compared.append(
                        {k: item.get(k) for k in ("rank", "label", "index", "probability")}
                        | {"files": item_files}
                    )
            except RequestRejected as e:  # e.g. expired between the status and the download
                self.outcomes[image.key] = Outcome("failed", error=f"download failed: {e}")
                continue
            result = {
                "source": str(image.path),
                "sha256": _sha256(image.path),
                "request": self.request,
                "job_id": job.job_id,
                "model": manifest.get("model"),
                "architecture": manifest.get("architecture"),
                "input_size": manifest.get("input_size"),
                "prediction": entry.get("prediction"),
                "target": entry.get("target"),
                "original_size": entry.get("original_size"),
                "crop_box": entry.get("crop_box"),
                "channel_index": {
                    m: f["channel_index"]
                    for m, f in entry.get("files", {}).items()
                    if "channel_index" in f
                },
                "files": files,
            }
            if "depth" in entry.get("files", {}):
                result["depth"] = entry["files"]["depth"].get("stages")
            if self.options.faithfulness:
                result["faithfulness"] = entry.get("faithfulness")
            if compared:
                result["compare"] = compared
            _write_json_atomically(folder / RESULT_FILE, result)  # last: the "done" marker
            self.outcomes[image.key] = Outcome("ok", result)
        self.bar.update(len(job.chunk) - job.shown)
        job.shown = len(job.chunk)


def _all_files(result: dict[str, Any]) -> list[str]:
    """Every file a result.json names: its own, and those of each compared class."""
    names = list(result.get("files", {}).values())
    for item in result.get("compare", []):
        names.extend(item.get("files", {}).values())
    return names


def _finished_result(folder: Path, source: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The image's result.json from an earlier run, if it answers this very request."""
    try:
        result = json.loads((folder / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("request") != request:
        return None
    if result.get("sha256") != _sha256(source):
        return None
    if not all((folder / name).is_file() for name in _all_files(result)):
        return None
    return result


_hashes: dict[Path, str] = {}


def _sha256(path: Path) -> str:
    from lantern.client import file_sha256

    if path not in _hashes:
        _hashes[path] = file_sha256(path)
    return _hashes[path]


def _write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    partial.replace(path)


def _protocol_error(job_id: str, what: str) -> Exception:
    from lantern.client import ServiceError

    return ServiceError(f"explanation job {job_id} {what}; is the service up to date?")


def _write_csv(path: Path, images: list[Any], outcomes: dict[str, Outcome]) -> None:
    from lantern.client import write_csv_atomically

    rows = []
    for image in images:
        outcome = outcomes.get(image.key, Outcome("pending", error="not done yet; run again"))
        row: dict[str, Any] = {
            "path": str(image.path),
            "status": outcome.status,
            "error": outcome.error,
        }
        result = outcome.result
        if result is not None:
            prediction = result.get("prediction") or {}
            target = result.get("target") or {}
            row.update(
                output=image.key,
                label=prediction.get("label"),
                class_index=prediction.get("index"),
                probability=_fmt(prediction.get("probability")),
                target_label=target.get("label"),
                target_index=target.get("index"),
                model_version=str(result.get("model") or "").rpartition(":")[2],
                job_id=result.get("job_id"),
            )
        rows.append(row)
    write_csv_atomically(path, CSV_FIELDS, rows)


def _fmt(p: object) -> str:
    return f"{p:.6f}" if isinstance(p, float) else ""


def _report(images: list[Any], outcomes: dict[str, Outcome], already: int, out: Path) -> int:
    ok = [i for i in images if outcomes.get(i.key, Outcome("pending")).status == "ok"]
    bad = [i for i in images if outcomes.get(i.key, Outcome("pending")).status != "ok"]
    print(
        f"explained {len(ok)} of {len(images)} image(s) ({already} from an earlier run); "
        f"results in {out}, summary in {out / CSV_FILE}"
    )
    for image in bad:
        outcome = outcomes.get(image.key, Outcome("pending"))
        print(f"{outcome.status}: {image.path}: {outcome.error}", file=sys.stderr)
    if bad:
        print(
            f"{len(bad)} image(s) were not explained; fix or remove them and run again "
            "(finished images are not sent again)",
            file=sys.stderr,
        )
    return 1 if bad else 0
