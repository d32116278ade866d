"""The model resident behind the server: opened once as a run opens it, and a request's three
steps, the same as ``clipseg segment``'s for one input (:mod:`clipseg_cli.run.items`):

- **prepare** (a worker thread): its prompts embedded
  (:func:`~clipseg_cli.run.promptset.build_prompt_set`, cached text embeddings) or a start-up
  prompt file's, its image decoded and resized
  (:func:`~clipseg_cli.run.items.prepare_item`) into a :class:`Job`;
- **predict** (the model thread): the jobs a batcher gathered, in as few model calls as the
  batch policy allows (:func:`~clipseg_cli.run.items.predict_batch`): one vision pass per image
  whatever its prompt count, and requests with different prompts in one call;
- **answer** (a worker thread): :func:`~clipseg_cli.run.items.write_item` into a
  :class:`~clipseg_cli.run.outputs.MemorySink`, so every PNG is byte for byte the file ``segment``
  writes; then the JSON answer (or one PNG).

**Batch composition and bytes.** An answer must equal ``segment``'s file whatever other requests
shared its model call. That holds only if a row's logits do not depend on the batch size, its
companions, or the other prompts of the call; kernels may round differently for other shapes,
and dynamic int8 quantisation scales activations by the whole batch. So the server measures it
when it starts (:func:`measure_batch_policy`): where rows and prompts are independent (ONNX
Runtime fp32 on the CPUs measured: ``bench/batch_identity.py``), calls gather up to
``--max-batch`` images with the union of their prompts; where they are not, every call is the
CLI's own (its batch size, padded) and holds one prompt set only.

Never writes a file, never sees a run's state (log, ledger, summary).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from clipseg_cli.errors import InputError
from clipseg_cli.io import sources, writers
from clipseg_cli.io.sources import InputItem
from clipseg_cli.ops.shapes import make_scene
from clipseg_cli.ops.transforms import resize_rgb
from clipseg_cli.run import items, memory
from clipseg_cli.run.backend import BackendChoice, ModelOpener, OpenedModel, choose_backend
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.engines.cpu_gate import gate_for
from clipseg_cli.run.inputs import Work
from clipseg_cli.run.ledger import InputSignature
from clipseg_cli.run.outputs import MemorySink
from clipseg_cli.run.promptset import PromptModel, PromptSet, build_prompt_set
from clipseg_cli.serve.limits import ServeLimits
from clipseg_cli.serve.problems import ApiError, exceeded, invalid
from clipseg_cli.serve.request import ParsedRequest, Upload

#: The prompt the base configuration carries (a config needs one) and the warm-up request uses.
WARMUP_PROMPT = "a red circle"
#: Every tower a request's prompts may need: texts, and reference images (the whole vision tower
#: and its head). Loaded once, on the first prompt that is not cached.
PROMPT_TOWERS = frozenset({"text", "vision", "image_head"})
#: Images per model call when rows are independent of their batch and ``--max-batch`` is not
#: given: enough to fill a GPU's call, and on a CPU no slower per image than one at a time.
DEFAULT_MAX_BATCH = 8


@dataclass(frozen=True)
class ServeSettings:
    """What ``clipseg serve`` starts with; picklable (Ray replicas receive it)."""

    base: SegmentConfig  # the model, device, backend, precision, and every option's default
    limits: ServeLimits = field(default_factory=ServeLimits)
    prompt_files: tuple[tuple[str, Path], ...] = ()  # (NAME, file written by --save-prompt)
    max_batch: int | None = None  # images per model call; None: DEFAULT_MAX_BATCH if allowed
    max_wait_ms: float = 20.0  # how long a call waits for requests being decoded
    workers: int = 2  # decode and answer threads
    threads: int | None = None  # the model's threads (None: every core)
    token: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError("--max-batch must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("--max-wait-ms must be 0 or more")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        names = [name for name, _path in self.prompt_files]
        if len(set(names)) != len(names):
            raise ValueError("--prompt-file: two files with the same NAME")


@dataclass(frozen=True)
class BatchPolicy:
    """How requests may share a model call, as measured on this backend."""

    rows_independent: bool  # a row's logits do not depend on its batch (size, companions)
    prompts_independent: bool  # a prompt's logits do not depend on the call's other prompts
    call_rows: int  # model rows per call (images, and tiles)
    pad: bool  # pad short calls to call_rows (the CLI's calls, where rows are not independent)

    def describe(self) -> str:
        if self.rows_independent:
            mixing = "with" if self.prompts_independent else "without"
            return (
                f"up to {self.call_rows} images per model call, {mixing} mixing prompt sets "
                "(measured: the answers do not depend on the batch)"
            )
        return (
            f"{self.call_rows} image(s) per model call, padded, as clipseg segment calls it "
            "(measured: this backend's results depend on the batch)"
        )


@dataclass
class Job:
    """One request on its way through the model: its options, prompts and decoded image."""

    config: SegmentConfig
    prompts: PromptSet
    prepared: items.Prepared
    as_png: bool = False  # answer with one PNG instead of JSON
    batch_images: int = 0  # images in the model call that served it
    model_seconds: float = 0.0  # its share of that call

    @property
    def rows(self) -> int:
        return len(self.prepared.model_inputs)


def _open_model(opener: ModelOpener, threads: int | None) -> tuple[BackendChoice, OpenedModel]:
    """The model opened on the same measured (or cached) CPU backend as ``clipseg segment``'s,
    so the masks are alike; which one it is, said once (to the opener's ``on_progress``)."""
    choice = opener.settle(opener.choice)
    if choice.tuning is not None and opener.on_progress is not None:
        source = "measured now" if choice.tuning["source"] == "measured" else "cached"
        opener.on_progress(f"backend: {choice.tuning['choice']} (the fastest here, {source})")
    return choice, dataclasses.replace(opener, choice=choice)(threads)


def _say_batching(
    policy: BatchPolicy, max_batch: int | None, notice: Callable[[str], None]
) -> None:
    """The batching policy at start-up, and why calls hold fewer images than --max-batch."""
    notice(f"batching: {policy.describe()}")
    if max_batch is not None and max_batch > policy.call_rows:
        notice(
            f"--max-batch {max_batch}: this backend's results depend on the batch, "
            f"so calls hold {policy.call_rows} image(s), as clipseg segment's do"
        )


class Service:
    """The opened model and a request's steps (see the module docstring); thread-safe.

    Args:
        settings: what the server starts with.
        on_notice: one-line messages while it opens (an ONNX graph being exported once).
        on_batch: called after every model call with (images, seconds).

    Raises:
        WeightsError: the model cannot be loaded.
        ValueError: a bad option or prompt file (one line).
    """

    def __init__(
        self,
        settings: ServeSettings,
        on_notice: Callable[[str], None] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.on_batch = on_batch or (lambda _images, _seconds: None)
        notice = on_notice or (lambda _message: None)
        config = settings.base
        sources.configure_pillow_limits(config.max_pixels)
        memory.tune_for_loading()
        self.choice = choose_backend(config)
        for note in self.choice.notes:
            notice(note)
        self._prompt_lock = threading.Lock()
        self.prompt_model = PromptModel(config, self.choice, parts=PROMPT_TOWERS, resident=True)
        info, arch = self.prompt_model.identity
        self.model_id = info.model_id
        self.input_size = (arch.input_size, arch.input_size)
        self.prompt_files = dict(settings.prompt_files)
        self.prompt_file_sets = {
            name: build_prompt_set(
                self.prompt_model,
                dataclasses.replace(config, prompts=(), negatives=(), prompt_embedding=path),
            )
            for name, path in settings.prompt_files
        }
        opener = ModelOpener(config, info.sha256, arch, info.model_id, self.choice, None, notice)
        self.choice, self.model = _open_model(opener, settings.threads)
        memory.return_freed_memory()
        memory.tune_for_streaming()
        self.gate = gate_for(self.model.device_type)
        self.pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="serve-work")
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="serve-model")
        self.seconds_per_image = 0.0  # moving average of model seconds per image
        self.incoming = 0  # requests admitted and being prepared (the event loop counts them)
        warmup = self._warmup_request()
        self.policy = measure_batch_policy(
            self.model.backend,
            warmup.prompts.vectors,
            arch.input_size,
            settings.max_batch or DEFAULT_MAX_BATCH,
            config.batch_size_for(self.model.device_type),
        )
        _say_batching(self.policy, settings.max_batch, notice)
        self.answer(warmup, self.predict([warmup])[0])
        self.ready = True

    def details(self) -> dict:
        """What /readyz (public) says: how the model runs and batches (and how a CPU backend was
        chosen: measured here or cached, with every candidate); never a path."""
        return {
            "backend": self.model.details.get("backend"),
            "device": self.model.details.get("device"),
            "dtype": self.model.details.get("dtype"),
            "precision": self.choice.precision,
            "backend_choice": self.choice.tuning,
            "batching": dataclasses.asdict(self.policy),
            "prompt_files": sorted(self.prompt_files),
        }

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Counts a request while it is prepared: a batcher may wait for it (event loop)."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    def close(self) -> None:
        self.ready = False
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.model_thread.shutdown(wait=False, cancel_futures=True)

    # -- the steps --------------------------------------------------------------------------------

    def prepare(
        self, request: ParsedRequest, name: str, as_png: bool = False, formats: bool = True
    ) -> Job:
        """Embed a request's prompts and decode its image (a worker thread). ``formats``:
        check the decoded format against ``--formats`` (as well as the header was).

        Raises:
            ApiError: 406 (one PNG asked for several prompts), 415, 422.
        """
        with self.gate.shared():
            prompts = self._prompt_set(request)
            if as_png and prompts.count != 1:
                raise ApiError(
                    406,
                    "not acceptable",
                    f"Accept: image/png answers one prompt's image; this request has "
                    f"{prompts.count} (ask for JSON)",
                )
            prepared = items.prepare_item(
                _work(request.image, name), request.config, self.input_size
            )
        if isinstance(prepared, items.Failed):
            raise invalid(f"image: {prepared.error}")
        if formats and prepared.image.format not in self.limits.format_names:
            raise exceeded("formats", f"image: {prepared.image.format} is not accepted")
        return Job(request.config, prompts, prepared, as_png)

    def predict(self, jobs: Sequence[Job]) -> list[items.Prediction]:
        """Each job's prediction, from as few model calls as the policy allows (the model
        thread)."""
        logits: dict[int, np.ndarray] = {}
        for vectors, members in shared_calls(jobs, self.policy, self.limits.max_prompts):
            rows = [(job, index) for job, _ in members for index in range(job.rows)]
            found = {
                id(job): np.empty((job.rows, len(vectors), *self.input_size), np.float32)
                for job, _ in members
            }
            for start in range(0, len(rows), self.policy.call_rows):
                chunk = rows[start : start + self.policy.call_rows]
                pixels = [job.prepared.model_inputs[index] for job, index in chunk]
                pad_to = self.policy.call_rows if self.policy.pad else None
                with self.gate.exclusive():
                    started = time.perf_counter()
                    out = items.predict_batch(self.model.backend, pixels, vectors, pad_to=pad_to)
                    seconds = time.perf_counter() - started
                images = len({id(job) for job, _ in chunk})
                self._count(chunk, images, seconds)
                for (job, index), row in zip(chunk, out, strict=True):
                    found[id(job)][index] = row
            for job, columns in members:
                logits[id(job)] = found[id(job)][:, columns]
        return [_prediction(job, logits[id(job)]) for job in jobs]

    def answer(self, job: Job, prediction: items.Prediction) -> tuple[bytes, str]:
        """The answer's body and media type: JSON, or the first output's PNG (a worker thread).

        Raises:
            ApiError: 422 when the image cannot be finished (``grow`` larger than it).
        """
        sink = MemorySink()
        with self.gate.shared():
            try:
                written = items.write_item(
                    job.prepared, prediction, job.config, job.prompts.positives, sink
                )
            except InputError as error:
                raise invalid(str(error)) from None
            if job.as_png:
                return sink.records[0]["data"], "image/png"
            return json.dumps(_answer(job, written, sink)).encode(), "application/json"

    # -- helpers ----------------------------------------------------------------------------------

    def _prompt_set(self, request: ParsedRequest) -> PromptSet:
        """The request's conditionals: a start-up prompt file's, or embedded exactly as a run
        embeds them (through the text cache, which ``segment`` reads too: not kept here, so
        both always use the same vectors)."""
        if request.prompt_file is not None:
            return self.prompt_file_sets[request.prompt_file]
        with self._prompt_lock:  # the towers load once, and are not thread-safe
            try:
                return build_prompt_set(self.prompt_model, request.config, request.references)
            except ValueError as error:
                message = str(error).replace("--ref-mask", "ref_mask").replace("--ref", "ref")
                raise invalid(message) from None

    def _count(self, chunk: list[tuple[Job, int]], images: int, seconds: float) -> None:
        for job, _index in chunk:
            job.batch_images = images
            job.model_seconds += seconds / len(chunk)
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * seconds / images
        self.on_batch(images, seconds)

    def _warmup_request(self) -> Job:
        """A request on a synthetic scene: it runs every step once before the first client."""
        config = dataclasses.replace(
            self.settings.base,
            prompts=(WARMUP_PROMPT,),
            negatives=(),
            prompt_embedding=None,
            save=("mask",),
        )
        image = Upload("warm-up.png", writers.image_png(make_scene(1).image))
        # Our own PNG, whatever --formats accepts from clients.
        return self.prepare(ParsedRequest(config, image, (), None), "warm-up", formats=False)


def shared_calls(
    jobs: Sequence[Job], policy: BatchPolicy, max_prompts: int
) -> list[tuple[np.ndarray, list[tuple[Job, list[int]]]]]:
    """Jobs that share model calls: the conditionals of those calls, and each job with its
    columns of them. Independent prompts: the union of the jobs' prompt sets (at most
    ``max_prompts`` vectors per call); else one group per distinct prompt set."""
    if not policy.prompts_independent:
        same_set: dict[bytes, list[Job]] = {}
        for job in jobs:
            same_set.setdefault(_digest(job.prompts.vectors), []).append(job)
        return [
            (
                members[0].prompts.vectors,
                [(job, list(range(job.prompts.vectors.shape[0]))) for job in members],
            )
            for members in same_set.values()
        ]
    groups: list[tuple[dict[bytes, int], list[np.ndarray], list[tuple[Job, list[int]]]]] = []
    for job in jobs:
        keys = [row.tobytes() for row in job.prompts.vectors]
        group = next(
            (g for g in groups if len(g[0].keys() | set(keys)) <= max_prompts),
            None,
        )
        if group is None:
            group = ({}, [], [])
            groups.append(group)
        index, rows, members = group
        for key, row in zip(keys, job.prompts.vectors, strict=True):
            if key not in index:
                index[key] = len(rows)
                rows.append(row)
        members.append((job, [index[key] for key in keys]))
    return [(np.stack(rows), members) for _index, rows, members in groups]


def _digest(vectors: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(vectors).tobytes()).digest() + bytes(vectors.shape)


def _work(image: Upload, name: str) -> Work:
    """A request's image as the run's unit of work: its bytes, under a name that is no file."""
    key = PurePosixPath(name)
    item = InputItem(Path(name), key, data=image.data)
    return Work(item, name, InputSignature(len(image.data), None), key)


def _prediction(job: Job, logits: np.ndarray) -> items.Prediction:
    """A job's prediction from its rows' logits ``[R, K + N, h, w]`` (whole image, then tiles)."""
    prepared = job.prepared
    tile_logits = logits[1:] if prepared.grid is not None else None
    size = prepared.image.rgb.shape[:2]
    return items.Prediction(logits[0], job.prompts.count, size, tile_logits, prepared.grid)


def _answer(job: Job, written: items.Written, sink: MemorySink) -> dict:
    row = written.row
    answer = {
        "width": row["width"],
        "height": row["height"],
        "prompts": row["prompts"],
        "outputs": [
            {
                "prompt": record["prompt"],
                "kind": record["kind"],
                "png_base64": base64.b64encode(record["data"]).decode("ascii"),
            }
            for record in sink.records
        ],
    }
    if job.config.wants_instances:
        labels = [c.label for c in job.prompts.positives]
        answer["instances"] = [
            {**instance.row(labels[instance.prompt]), "rle": instance.rle}
            for instance in written.instances
        ]
    answer["batch_size"] = job.batch_images
    answer["timings"] = {
        **row["timings"],
        "model_s": round(job.model_seconds, 4),
    }
    return answer


def measure_batch_policy(
    backend,
    conditionals: np.ndarray,
    input_size: int,
    max_batch: int,
    cli_batch: int,
) -> BatchPolicy:
    """Whether this backend's logits of one image depend on its model call: the batch size,
    the other images in it, and the other prompts (compared bit for bit on synthetic scenes).

    Rows independent: calls of up to ``max_batch`` images, not padded. Else the CLI's calls:
    ``cli_batch`` rows, padded (then only the companions may differ, and they do not on the
    backends measured).
    """
    size = (input_size, input_size)
    scenes = [resize_rgb(make_scene(seed).image, size) for seed in range(2, 2 + max(max_batch, 2))]
    noise = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    subject, companions = scenes[0], [noise, *scenes[1:]]
    one = conditionals[:1]
    alone = items.predict_batch(backend, [subject], one)[0]
    same = True
    for count in sorted({2, max_batch}):
        rows = [*companions[: count - 1], subject]
        same &= np.array_equal(items.predict_batch(backend, rows, one)[-1], alone)
        rows = [subject, *companions[::-1][: count - 1]]
        same &= np.array_equal(items.predict_batch(backend, rows, one)[0], alone)
    same &= np.array_equal(items.predict_batch(backend, [subject], one, pad_to=max_batch)[0], alone)
    rng = np.random.default_rng(1)
    scale = float(np.linalg.norm(one))
    others = rng.normal(size=(2, one.shape[1])).astype(np.float32)
    others *= scale / np.linalg.norm(others, axis=1, keepdims=True)
    among = np.concatenate([others[:1], one, others[1:]])
    prompts_independent = np.array_equal(
        items.predict_batch(backend, [subject], among)[0][1:2], alone
    )
    if same:
        return BatchPolicy(True, prompts_independent, max_batch, pad=False)
    return BatchPolicy(False, prompts_independent, cli_batch, pad=True)
