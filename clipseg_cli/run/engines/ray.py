"""The Ray Data engine (``--engine ray``): the local engine's stages on a Ray cluster.

Pipeline: input paths -> decode ``map`` tasks (a decode problem becomes that row's failure, not
the task's) -> an actor pool that holds the model once per actor (``map_batches``) -> write
``map`` tasks -> rows streamed back to the driver as :class:`~clipseg_cli.run.steps.Finished`
results. Every stage calls the run's :class:`~clipseg_cli.run.steps.ItemSteps`, so both engines
decode, predict and write the same way; the pipeline records the results, as for the local one.

Rows between stages carry their payload (:class:`~clipseg_cli.run.items.Prepared` / ``Failed``,
then the logits) pickled in one binary column: it keeps float32 maps exact, input names that are
not valid UTF-8 intact, and ``None`` fields (no alpha) out of Arrow's way.

Ray is imported only when a run uses this engine (:func:`require_ray`); see ``docs/ray.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from clipseg_cli.errors import DiskFullError, InputError, disk_full
from clipseg_cli.io import sources, video
from clipseg_cli.io.paths import display_path
from clipseg_cli.run import frames
from clipseg_cli.run.backend import ModelOpener
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.inputs import failure_row
from clipseg_cli.run.items import Failed, Prediction, Prepared, Work
from clipseg_cli.run.steps import IDLE, Finished, Idle, ItemSteps

if TYPE_CHECKING:
    import numpy as np

__all__ = ["RayNotInstalledError", "process", "require_ray"]

INSTALL_HINT = "pip install 'clipseg-cli[ray]'"
#: Set to 1 to see Ray Data's own progress bars and execution messages.
PROGRESS_ENV = "CLIPSEG_RAY_PROGRESS"
#: Inputs per decode task: small enough to spread over a cluster, large enough that task
#: overhead (~ms) stays small next to decoding (~10-50 ms per photo).
ROWS_PER_DECODE_TASK = 16


class RayNotInstalledError(ValueError):
    """``--engine ray`` without Ray Data installed (a usage error: the fix is an install)."""


def require_ray() -> ModuleType:
    """Import Ray with Ray Data, or raise :class:`RayNotInstalledError` saying how to get it."""
    try:
        import ray
        import ray.data  # the engine needs the Data library, not just Ray core
    except ImportError:
        raise RayNotInstalledError(
            f"--engine ray needs Ray Data, which is not installed: {INSTALL_HINT}"
        ) from None
    return ray


@dataclass(frozen=True)
class _Sizing:
    """How the actor pool is sized on the cluster it runs on."""

    actors: int
    num_gpus: float  # per actor
    num_cpus: float  # per actor; on CPU actors also the torch thread count
    batch_size: int
    device_type: str

    @property
    def memory(self) -> int:
        """Host memory an actor reserves (bytes): the model and torch (an rd64-refined CPU
        actor peaks at ~1.1 GiB with batches of 1-2) and a batch's results, with room to spare,
        so Ray never packs a node with more actors than fit."""
        return (1536 + 128 * self.batch_size) * 2**20


def _size(config: SegmentConfig, resources: dict[str, float], largest_node_cpus: float) -> _Sizing:
    """GPU actors when the cluster has GPUs (one per GPU), else CPU actors (one per 8 CPUs).

    CPU actors share the cluster with the decode and write tasks: a quarter of the CPUs (at
    least one) is left to those, the rest is split between the actors, and each actor runs
    torch with as many threads as CPUs it holds.
    """
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    num_gpus = config.num_gpus if config.num_gpus is not None else (1.0 if gpus > 0 else 0.0)
    if num_gpus > 0:
        actors = config.actors or max(1, int(gpus // num_gpus))
        num_cpus = 1.0  # feeding a GPU takes one core; the rest decode and write
    else:
        actors = config.actors or max(1, int(cpus // 8))
        reserved = max(1, int(cpus // 4))
        num_cpus = float(max(1, min(int(largest_node_cpus), int(cpus - reserved) // actors)))
    if config.device != "auto":
        device_type = config.device.split(":")[0]
    else:
        device_type = "cuda" if num_gpus > 0 else "cpu"
    return _Sizing(actors, num_gpus, num_cpus, config.batch_size_for(device_type), device_type)


# -- the stages (run in Ray workers) --------------------------------------------------------------


def _enter(cwd: str) -> None:
    """Run in the driver's working directory: relative inputs and ``--out`` then name the same
    files on every node (given a shared filesystem), and log rows name them as locally."""
    if str(Path.cwd()) != cwd:
        try:
            os.chdir(cwd)
        except OSError as error:
            raise RuntimeError(
                f"clipseg's working directory {cwd} does not exist on this Ray node "
                f"({error.strerror}); run from a folder every node mounts at the same path"
            ) from None


def _decode(row: dict[str, Any], steps: ItemSteps, cwd: str) -> dict:
    """Decode task: one input -> its pickled Prepared, or Failed with the decode error."""
    _enter(cwd)
    sources.configure_pillow_limits(steps.config.max_pixels)  # process-wide, so once per worker
    work = pickle.loads(row["work"])
    return {"i": row["i"], "item": pickle.dumps(steps.prepare(work), protocol=5)}


class _Predictor:
    """Actor: opens the model's image side once, then predicts batches."""

    def __init__(self, steps: ItemSteps, open_model: ModelOpener, sizing: _Sizing) -> None:
        # On CPU actors the backend runs on as many threads as the actor holds CPUs (Ray sets
        # OMP_NUM_THREADS from num_cpus too; said again so that the thread count, which
        # changes results in the last bits, never depends on the environment).
        threads = max(1, int(sizing.num_cpus)) if sizing.num_gpus == 0 else None
        self.steps = steps
        self.model = open_model(threads=threads)
        self.batch_size = sizing.batch_size
        self.description = json.dumps(self.model.details)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        entries = [pickle.loads(payload) for payload in batch["item"]]
        rows = self.steps.rows(self.batch_size)
        for entry in entries:
            if isinstance(entry, Prepared):
                rows.add(entry)
        results: dict[int, Prediction] = {}
        seconds: dict[int, float] = {}
        # Ray's batches follow its blocks, and failed decodes leave gaps: model batches are
        # re-formed at exactly --batch-size rows (padded, like the local engine's) so that
        # every image's numbers are the ones the local engine computes.
        while len(rows):
            taken = rows.next_rows()
            pixels = [prepared.model_inputs[index] for prepared, index in taken]
            began = time.perf_counter()
            logits = self.steps.predict(self.model.backend, pixels, self.batch_size)
            share = (time.perf_counter() - began) / len(taken)
            for prepared, _index in taken:
                seconds[id(prepared)] = seconds.get(id(prepared), 0.0) + share
            results.update((id(p), out) for p, out in rows.accept(taken, logits))
        payloads = []
        for entry in entries:
            payloads.append(pickle.dumps((entry, results.get(id(entry))), protocol=5))
        return {
            "i": list(batch["i"]),
            "item": payloads,
            "infer_s": [seconds.get(id(entry), 0.0) for entry in entries],
            "actor": [self.description] * len(entries),
        }


def _write(row: dict[str, Any], steps: ItemSteps, cwd: str) -> dict:
    """Write task: one input's outputs (or its failure) -> its JSON log row.

    A full disk is not this row's failure but the run's: it comes back as ``fatal`` for the
    driver to raise, after what finished before it.
    """
    _enter(cwd)
    entry, prediction = pickle.loads(row["item"])
    fatal, fatal_errno = "", 0
    part = None
    if isinstance(entry, Failed):
        result = steps.fail(entry)
    else:
        try:
            written = steps.write(entry, prediction)
            result, part = written.row, written.part
        except DiskFullError as error:
            result, fatal, fatal_errno = {}, error.strerror or str(error), error.errno or 0
    return {
        "i": row["i"],
        "row": json.dumps(result),
        "part": json.dumps(part),
        "infer_s": row["infer_s"],
        "actor": row["actor"],
        "fatal": fatal,
        "fatal_errno": fatal_errno,
    }


# -- videos: parts segmented apart by actors, joined by the driver -----------------------------


class _PartError(Exception):
    """A part of a video that cannot be finished: the video's one-line reason."""


class _VideoParts:
    """Actor: opens the model's image side once, then segments parts of videos, each from its
    warm-up frames on (:func:`clipseg_cli.run.frames.split`), through the same steps as the
    local engine's frames: prepare, model batches padded to ``--batch-size``, write in order."""

    def __init__(self, steps: ItemSteps, open_model: ModelOpener, sizing: _Sizing) -> None:
        threads = max(1, int(sizing.num_cpus)) if sizing.num_gpus == 0 else None
        self.steps = steps
        self.model = open_model(threads=threads)
        self.batch_size = sizing.batch_size
        self.description = json.dumps(self.model.details)

    def run(self, payload: bytes, cwd: str) -> bytes:
        """One part -> its pickled result: ``close_part``'s, or ``error`` / ``fatal``."""
        _enter(cwd)
        sources.configure_pillow_limits(self.steps.config.max_pixels)
        video_index, work, source, part = pickle.loads(payload)
        result: dict[str, Any] = {"video": video_index, "part": part.number, "infer_s": 0.0}
        result["actor"] = self.description
        job = frames.part_job(work, source, self.steps.config, part)
        try:
            result |= self._segment(job, work, source, part, result)
        except (_PartError, video.VideoError, InputError) as error:
            result["error"] = str(error)
        except DiskFullError as error:
            result["fatal"], result["fatal_errno"] = error.strerror or str(error), error.errno or 0
        finally:
            for writer in job.writers.values():
                writer.abort()  # left open only by a failure: the driver discards the video
        return pickle.dumps(result, protocol=5)

    def _segment(
        self, job: frames.VideoJob, work: Work, source: frames.VideoSource, part, result: dict
    ) -> dict:
        steps, size = self.steps, self.batch_size
        rows = steps.rows(size)

        def predict(final: bool) -> None:
            while len(rows) >= size or (final and len(rows)):
                taken = rows.next_rows()
                began = time.perf_counter()
                logits = steps.predict(
                    self.model.backend, [p.model_inputs[i] for p, i in taken], size
                )
                result["infer_s"] += time.perf_counter() - began
                for prepared, prediction in rows.accept(taken, logits):
                    written = steps.write(prepared, prediction)
                    if written.row["status"] == "failed":
                        raise _PartError(written.row["error"])

        for frame_work in frames.part_frames(work, source, job, part):
            prepared = steps.prepare(frame_work)
            if isinstance(prepared, Failed):
                raise _PartError(prepared.error)
            rows.add(prepared)
            predict(final=False)
        predict(final=True)
        return frames.close_part(job)


def _videos(
    ray: ModuleType,
    videos: list[Work],
    steps: ItemSteps,
    open_model: ModelOpener,
    sizing: _Sizing,
    details: dict,
    cwd: str,
) -> Iterator[Finished]:
    """Each video split into parts of ``--segment-frames`` frames, the parts segmented by a
    pool of actors in any order, each video joined on the driver once its parts are done."""
    from ray.util import ActorPool

    config = steps.config
    plans: dict[int, tuple[Work, frames.VideoSource, list[frames.Part]]] = {}
    for index, work in enumerate(videos):
        try:
            source, parts = frames.split(work, config)
        except video.VideoError as error:
            yield Finished(work, _failed(work, str(error)), 0.0, details)
            continue
        plans[index] = (work, source, parts)
    # A rerun after a crash: the parts an earlier run finished are not done again.
    done: dict[int, dict[int, dict]] = {}
    reused: dict[int, int] = {}
    tasks = []
    for index, (work, source, parts) in plans.items():
        done[index] = frames.recorded_parts(work, config, parts)
        reused[index] = sum(part.count for part in parts if part.number in done[index])
        todo = [part for part in parts if part.number not in done[index]]
        tasks += [pickle.dumps((index, work, source, part), protocol=5) for part in todo]
        if not todo:
            finished = done.pop(index)
            results = [finished[part.number] for part in parts]
            yield _joined(work, source, results, steps, details, reused[index])
    if not tasks:
        return
    actor = ray.remote(_VideoParts).options(
        num_cpus=sizing.num_cpus, num_gpus=sizing.num_gpus, memory=sizing.memory
    )
    workers = [
        actor.remote(steps, open_model, sizing) for _ in range(min(sizing.actors, len(tasks)))
    ]
    try:
        pool = ActorPool(workers)
        for payload in pool.map_unordered(lambda worker, task: worker.run.remote(task, cwd), tasks):
            result = pickle.loads(payload)
            if "fatal" in result:
                raise DiskFullError(int(result["fatal_errno"]), result["fatal"])
            index = result["video"]
            done[index][result["part"]] = result
            work, source, parts = plans[index]
            if "error" not in result:
                try:
                    frames.record_part(work, config, parts[result["part"]], result)
                except OSError as error:
                    stop = disk_full(error, display_path(error.filename or work.item.path))
                    if stop is not None:
                        raise stop from None
                    reason = error.strerror or str(error)
                    result["error"] = f"cannot keep the record of a finished part: {reason}"
            if len(done[index]) == len(parts):
                finished = done.pop(index)
                results = [finished[part.number] for part in parts]
                ran_on = {**details, **json.loads(result["actor"])}
                yield _joined(work, source, results, steps, ran_on, reused[index])
    finally:
        for worker in workers:
            ray.kill(worker)


def _joined(
    work: Work,
    source: frames.VideoSource,
    results: list[dict],
    steps: ItemSteps,
    details: dict,
    reused_frames: int = 0,
) -> Finished:
    """A video whose parts are done (``reused_frames`` of its frames by an earlier run):
    joined into its outputs, or failed whole."""
    job = frames.VideoJob(work, source.info, steps.config)
    job.reused_frames = reused_frames
    seconds = sum(result["infer_s"] for result in results)
    errors = [result["error"] for result in results if "error" in result]
    if errors:
        job.discard()
        return Finished(work, _failed(work, errors[0]), seconds, details)
    try:
        row, part = frames.join_parts(job, results, steps.prompts.positives)
    except (video.VideoError, OSError) as error:
        job.discard()
        reason = getattr(error, "strerror", None) or str(error)
        return Finished(
            work, _failed(work, f"cannot join the video's parts: {reason}"), seconds, details
        )
    return Finished(work, row, seconds, details, part)


def _failed(work: Work, error: str) -> dict:
    return failure_row(display_path(work.item.path), work.key, error)


# -- the driver ---------------------------------------------------------------------------------


@contextmanager
def _cluster(ray: ModuleType, address: str | None) -> Iterator[None]:
    """Use the Ray this process is already connected to, or connect to ``address``, or start a
    local single-node cluster; only a connection made here is closed here."""
    if ray.is_initialized():
        yield
        return
    quiet = os.environ.get(PROGRESS_ENV) != "1"
    ray.init(
        address=address or None,
        include_dashboard=False,
        logging_level=logging.WARNING if quiet else logging.INFO,
        configure_logging=True,
    )
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _data_context() -> Iterator[Any]:
    """Ray Data's context for this run: its progress output off unless asked for (the CLI has
    its own), restored afterwards for callers that use Ray Data themselves."""
    from ray.data import DataContext

    context = DataContext.get_current()
    fields = ("enable_progress_bars", "print_on_execution_start")
    saved = {name: getattr(context, name) for name in fields}
    loud = os.environ.get(PROGRESS_ENV) == "1"
    # Execution plans are logged at INFO; the progress module warns that bars are off (which
    # is the point). Other Ray Data warnings (e.g. too few CPUs for the pool) still show.
    levels = {"ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}
    loggers = {logging.getLogger(name): level for name, level in levels.items()}
    saved_levels = {logger: logger.level for logger in loggers}
    for name in fields:
        setattr(context, name, loud)
    if not loud:
        for logger, level in loggers.items():
            logger.setLevel(level)
    try:
        yield context
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
        for logger, level in saved_levels.items():
            logger.setLevel(level)


def _largest_node_cpus(ray: ModuleType) -> float:
    alive = [node for node in ray.nodes() if node.get("Alive")]
    return max((node["Resources"].get("CPU", 0.0) for node in alive), default=1.0)


def process(
    todo: Iterator[Work | Idle], steps: ItemSteps, open_model: ModelOpener
) -> Iterator[Finished]:
    """Process ``todo`` on Ray Data; one :class:`Finished` per input, in completion order.

    The stream is read to its end first (one Ray Data execution): a stream that never ends
    (``clipseg watch``) is not for this engine, and its :data:`IDLE` marks are dropped.

    ``open_model`` runs in each actor (it must pickle); an ONNX graph CPU actors need is
    exported here first, once, rather than by every actor. Closing the generator shuts the Ray
    Data execution down; outputs written by tasks still in flight have no ledger line then, so
    a rerun redoes them (writes are atomic and deterministic, so redoing is safe).

    Raises:
        RayNotInstalledError: Ray Data is not installed.
        DiskFullError: outputs could not be written for lack of space (resumable).
    """
    ray = require_ray()
    config = steps.config
    everything = [work for work in todo if work is not IDLE]
    videos = [work for work in everything if frames.is_video(work)]
    works = [work for work in everything if not frames.is_video(work)]
    rows = [{"i": i, "work": pickle.dumps(work, protocol=5)} for i, work in enumerate(works)]
    cwd = str(Path.cwd())
    with _cluster(ray, config.ray_address), _data_context():
        sizing = _size(config, ray.cluster_resources(), _largest_node_cpus(ray))
        open_model = open_model.on(sizing.device_type)
        open_model.prepare()
        open_model = replace(open_model, on_progress=None)  # actors report nothing
        details = {
            "batch_size": sizing.batch_size,
            "ray": {
                "address": config.ray_address,
                "actors": sizing.actors,
                "num_gpus_per_actor": sizing.num_gpus,
                "num_cpus_per_actor": sizing.num_cpus,
                "memory_per_actor": sizing.memory,
            },
        }
        if rows:
            yield from _images(ray, rows, works, steps, open_model, sizing, details, cwd)
        if videos:
            yield from _videos(ray, videos, steps, open_model, sizing, details, cwd)


def _images(
    ray: ModuleType,
    rows: list[dict],
    works: list[Work],
    steps: ItemSteps,
    open_model: ModelOpener,
    sizing: _Sizing,
    details: dict,
    cwd: str,
) -> Iterator[Finished]:
    """The images: decode tasks -> the actor pool -> write tasks, on Ray Data."""
    blocks = max(1, math.ceil(len(rows) / ROWS_PER_DECODE_TASK))
    dataset = (
        ray.data.from_items(rows, override_num_blocks=blocks)
        .map(_decode, fn_kwargs={"steps": steps, "cwd": cwd})
        .map_batches(
            _Predictor,
            fn_constructor_kwargs={
                "steps": steps,
                "open_model": open_model,
                "sizing": sizing,
            },
            batch_size=sizing.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=sizing.actors),
            num_gpus=sizing.num_gpus,
            num_cpus=sizing.num_cpus,
            # Reserving the actor's memory also keeps Ray Data from fusing the decode
            # tasks into the actors (it fuses stages whose options are equal), which would
            # decode one image at a time per actor instead of across the cluster.
            memory=sizing.memory,
        )
        .map(_write, fn_kwargs={"steps": steps, "cwd": cwd})
    )
    stream = dataset.iter_rows()
    try:
        for result in stream:
            if result["fatal"]:
                raise DiskFullError(int(result["fatal_errno"]), result["fatal"])
            # The summary names the actors' device, not the driver's (prompts only).
            row_details = {**details, **json.loads(result["actor"])}
            row, part = json.loads(result["row"]), json.loads(result["part"])
            work = works[int(result["i"])]
            yield Finished(work, row, float(result["infer_s"]), row_details, part)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
