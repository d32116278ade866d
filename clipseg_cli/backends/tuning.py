"""Which CPU runtime and precision run a model on this machine: measured once, remembered.

The machines under this project (and our users') differ in what is fast: on a Zen 3 (AVX2) ONNX
Runtime's fp32 is the best there is; on Zen 5 (AVX512_BF16) and on Xeons with AMX, OpenVINO's
bf16 is several times faster than any fp32. So ``--backend auto --precision auto`` on a CPU does
not assume: the first run of a model on a machine times each candidate (runtime x precision,
:func:`candidates`) on the model's own cached graph, checks each one's logits against ONNX
Runtime fp32 on a fixed calibration input (:func:`calibration_input`), and picks the fastest
that agrees (:meth:`Measurement.agrees`; an exact fp32 one unless a reduced precision is at least
:data:`REDUCED_GAIN` times faster). The choice is stored (:func:`write_record`) under a key
of everything that could change it (:func:`tuning_key`: the CPU's model and matrix flags, the
cores, the runtimes' versions, the weights' sha256, what was asked), so later runs read it in a
millisecond.

Agreement: masks IoU >= :data:`MIN_IOU` (0.99, what the issue asks) at the decision threshold
(probability 0.5; see :func:`agreement` for weights whose masks there are trivial), and the
99th percentile of the logits' absolute difference within :data:`MAX_LOGIT_ERROR` (5%)
of the reference's spread (its 1st to 99th percentile). Why 5%: a pixel's mask changes only
where its logit is within the error of the threshold, and with sigmoid probabilities a 5% move
of the logit range is what moves a soft matte by at most ~1/20 of its range, under the step the
guided filter smooths anyway; fp32 runtimes differ by ~1e-5 of it, bf16 by ~1%.

Records are JSON with their own sha256 inside: a corrupt or truncated record is measured again
(and said), a read-only cache measures in memory with one warning, and concurrent first runs
measure once (an exclusive ``flock`` per key; the second reads the first's record).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from clipseg_cli.backends.cache import ort_version
from clipseg_cli.backends.machine import (
    available_cores,
    cpu_model,
    matrix_flags,
    native_bf16,
    runtime_available,
)
from clipseg_cli.errors import BackendError, first_line
from clipseg_cli.io.cache import cache_dir
from clipseg_cli.io.files import write_json_atomic
from clipseg_cli.specs import ArchitectureSpec

#: Bumped when what is measured or how the choice is made changes (old records are ignored).
TUNING_FORMAT = 2
#: Masks of a candidate agree with fp32's when their IoU is at least this (the issue's bar).
MIN_IOU = 0.99
#: ... and the 99th percentile of |logit - fp32 logit| is within this share of fp32's spread.
MAX_LOGIT_ERROR = 0.05
#: A reduced precision named by the user (``--precision bf16`` / ``int8``) is refused only when
#: its masks are far off (below this IoU): the user asked for it, knowing it is not exact.
MIN_NAMED_IOU = 0.9
#: Under ``--precision auto`` a reduced precision is chosen over the fastest exact (fp32)
#: candidate only when it is at least this many times faster.
REDUCED_GAIN = 1.2
#: Within one precision, the first candidate (ONNX Runtime: the reference) is kept unless another
#: runtime is at least this many times faster: runtimes within noise of each other would
#: otherwise be chosen by the noise of a few calls, differently on each measurement (a pixel on
#: the threshold can fall either way between them), and the default stays within 10% of the
#: fastest.
RUNTIME_GAIN = 1.1
#: Timed calls per candidate (after one untimed warm-up call): the median is its speed.
TIMED_CALLS = 3
#: The CPU runtimes that run the cached graphs.
CPU_RUNTIMES = ("onnx", "openvino")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Candidate:
    """One way to run the image graph on the CPU."""

    runtime: str  # onnx or openvino
    precision: str  # fp32, bf16 or int8

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.precision}"


#: What every candidate is checked against: ONNX Runtime's fp32 (equal to torch's to 1e-4).
REFERENCE = Candidate("onnx", "fp32")


def candidates(precision: str = "auto", runtime: str = "auto") -> list[Candidate]:
    """The candidates a run with ``--precision precision --backend runtime`` chooses from.

    ``auto`` precision: fp32 on each runtime, and bf16 on OpenVINO where the CPU computes bf16
    natively (emulated bf16 is slower than fp32); int8 is never chosen unless asked for, its
    masks being further from fp32's. A named precision: that precision on each runtime that has
    it. The reference (ONNX Runtime fp32) comes first whenever it is a candidate.
    """
    runtimes = [
        name
        for name in CPU_RUNTIMES
        if (runtime in ("auto", name)) and (name == "onnx" or runtime_available(name))
    ]
    wanted = ("fp32", "bf16") if precision == "auto" else (precision,)
    found = []
    for name in runtimes:
        for kind in wanted:
            if kind == "bf16" and (name != "openvino" or not native_bf16()):
                continue
            found.append(Candidate(name, kind))
    return found


def precision_class(precision: str) -> str:
    """``exact`` (fp32: equal to torch's fp32 to 1e-4) or ``reduced`` (bf16, fp16, int8):
    what a run folder records, so a folder finished in one is not continued in the other."""
    return "exact" if precision == "fp32" else "reduced"


@dataclass
class Measurement:
    """One candidate, measured."""

    runtime: str
    precision: str
    seconds_per_image: float | None  # None: it could not be opened or run
    iou: float | None = None  # of its masks against the reference's (:func:`agreement`)
    logit_error: float | None = None  # p99 |diff| / the reference's p1-p99 spread
    error: str | None = None  # why it could not run

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.runtime, self.precision)

    @property
    def agrees(self) -> bool:
        """Masks equal the reference's for practical purposes (see the module's docstring)."""
        return (
            self.seconds_per_image is not None
            and self.iou is not None
            and self.logit_error is not None
            and self.iou >= MIN_IOU
            and self.logit_error <= MAX_LOGIT_ERROR
        )

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "agrees": self.agrees}


def calibration_input(input_size: int, embed_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed input every candidate is checked on: three generated scenes of shapes on
    textured backgrounds at the model's input size, and three fixed conditional vectors (unit
    directions at norm 10, the scale of CLIP ViT-B's projected text features)."""
    from clipseg_cli.ops.shapes import make_scene

    pixels = np.stack([make_scene(seed, input_size).image for seed in (0, 1, 2)])
    rng = np.random.default_rng(20221)
    vectors = rng.standard_normal((3, embed_dim))
    vectors *= 10.0 / np.linalg.norm(vectors, axis=1, keepdims=True)
    return pixels.astype(np.uint8), vectors.astype(np.float32)


def agreement(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(IoU, logit error) of ``logits`` against ``reference`` (see :class:`Measurement`).

    The masks compared are those at the decision threshold, probability 0.5 (logit 0); where
    the reference's mask there is nearly empty or full (under 5% or over 95% of the pixels, as
    untrained weights can give), at the reference's median logit instead, so that the IoU is
    never trivially 1."""
    threshold = 0.0
    if not 0.05 <= float((reference > 0).mean()) <= 0.95:
        threshold = float(np.median(reference))
    mine, theirs = logits > threshold, reference > threshold
    union = np.logical_or(mine, theirs).sum()
    iou = 1.0 if union == 0 else float(np.logical_and(mine, theirs).sum() / union)
    low, high = np.percentile(reference, [1, 99])
    spread = max(float(high - low), 1e-6)
    error = float(np.percentile(np.abs(logits - reference), 99)) / spread
    return iou, error


def measure(
    opens: Callable[[Candidate], Any],
    chosen_from: list[Candidate],
    input_size: int,
    embed_dim: int,
    on_progress: Progress | None = None,
) -> list[Measurement]:
    """Time each candidate and check its logits against the reference's.

    ``opens(candidate)`` returns an image backend (``logits(pixels, conditionals)``); one is
    open at a time, so measuring never holds two compiled models. Timing: one untimed call, then
    :data:`TIMED_CALLS` calls of one image with one conditional; the median is the speed.
    """
    say = on_progress or (lambda _: None)
    pixels, conditionals = calibration_input(input_size, embed_dim)
    order = [REFERENCE] + [c for c in chosen_from if c != REFERENCE]
    reference: np.ndarray | None = None
    results = []
    for candidate in order:
        try:
            backend = opens(candidate)
            logits = np.concatenate(
                [backend.logits(pixels[i : i + 1], conditionals) for i in range(len(pixels))]
            )
            times = []
            for _ in range(TIMED_CALLS):
                start = time.perf_counter()
                backend.logits(pixels[:1], conditionals[:1])
                times.append(time.perf_counter() - start)
        except (BackendError, RuntimeError, ValueError, OSError) as error:
            # A runtime that cannot open or run this graph here (OpenVINO raises RuntimeError)
            # is one candidate less, said in the table.
            results.append(
                Measurement(candidate.runtime, candidate.precision, None, error=first_line(error))
            )
            continue
        finally:
            backend = None
            gc.collect()
        seconds = float(np.median(times))
        if candidate == REFERENCE:
            reference = logits
        if reference is None:  # the reference could not run: nothing to check against
            results.append(Measurement(candidate.runtime, candidate.precision, seconds))
            continue
        iou, error = agreement(logits, reference)
        results.append(
            Measurement(
                candidate.runtime, candidate.precision, seconds, round(iou, 5), round(error, 6)
            )
        )
        say(f"  {candidate.label}: {seconds:.3f} s per image, IoU {iou:.4f} against fp32")
    return [m for m in results if m.candidate in chosen_from]


def choose(measurements: list[Measurement], precision: str) -> Measurement | None:
    """The fastest candidate that may be used: under ``auto`` or ``fp32`` one whose masks
    agree with the reference's (of a precision's candidates, the first unless another is
    :data:`RUNTIME_GAIN` times faster), and an exact (fp32) one unless a reduced precision is at
    least :data:`REDUCED_GAIN` times faster (exact masks are worth a little speed, and timings of a
    few calls are noisy); under a named reduced precision one not far off
    (:data:`MIN_NAMED_IOU`). None when none qualifies."""

    def usable(m: Measurement) -> bool:
        if m.seconds_per_image is None:
            return False
        if precision in ("auto", "fp32"):
            return m.agrees
        return m.iou is not None and m.iou >= MIN_NAMED_IOU

    def speed(m: Measurement) -> float:
        return m.seconds_per_image or 0.0

    def preferred(ones: list[Measurement]) -> Measurement | None:
        # The first (in candidate order) unless another is RUNTIME_GAIN times faster.
        if not ones:
            return None
        fastest = min(ones, key=speed)
        return ones[0] if speed(ones[0]) < RUNTIME_GAIN * speed(fastest) else fastest

    usable_ones = [m for m in measurements if usable(m)]
    by_precision: dict[str, list[Measurement]] = {}
    for m in usable_ones:
        by_precision.setdefault(m.precision, []).append(m)
    best = [preferred(ones) for ones in by_precision.values()]  # lists are never empty
    fastest = min(best, key=speed, default=None)
    exact = preferred(by_precision.get("fp32", []))
    worth_it = fastest is None or exact is None or speed(exact) >= REDUCED_GAIN * speed(fastest)
    return fastest if precision != "auto" or worth_it else exact


def runtime_versions() -> dict[str, str]:
    """The runtimes' versions (package metadata; nothing is imported)."""
    versions = {"onnxruntime": ort_version()}
    try:
        versions["openvino"] = metadata.version("openvino")
    except metadata.PackageNotFoundError:
        versions["openvino"] = "none"
    return versions


def machine_fields() -> dict[str, Any]:
    """What about this machine decides which candidate is fastest."""
    return {
        "cpu": cpu_model(),
        "flags": list(matrix_flags()),
        "cores": available_cores(),
    }


def tuning_key(
    weights_sha256: str, arch: ArchitectureSpec, precision: str, runtime: str
) -> tuple[str, dict[str, Any]]:
    """(the key, the fields it hashes): the machine, the runtimes' versions, the weights and
    architecture, what was asked, and :data:`TUNING_FORMAT`."""
    from clipseg_cli.specs import architecture_to_dict

    fields = {
        "format": TUNING_FORMAT,
        "machine": machine_fields(),
        "versions": runtime_versions(),
        "weights_sha256": weights_sha256,
        "arch": architecture_to_dict(arch),
        "precision": precision,
        "runtime": runtime,
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return digest[:32], fields


def tuning_dir() -> Path:
    return cache_dir() / "tuning"


@dataclass
class TuningRecord:
    """A measured choice: the candidates' measurements and the one chosen (None: none
    qualified)."""

    key: str
    fields: dict[str, Any]
    measurements: list[Measurement]
    chosen: Candidate | None
    measured_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    seconds: float = 0.0  # what measuring took

    def body(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "fields": self.fields,
            "measurements": [m.row() for m in self.measurements],
            "chosen": asdict(self.chosen) if self.chosen else None,
            "measured_at": self.measured_at,
            "seconds": round(self.seconds, 2),
        }

    def summary(self, source: str) -> dict[str, Any]:
        """What the run summary and ``clipseg models`` show: the choice, where it came from
        (``measured`` now or read from the ``cache``), and the timings that decided it."""
        return {
            "choice": self.chosen.label if self.chosen else None,
            "source": source,
            "measured_at": self.measured_at,
            "cpu": self.fields["machine"]["cpu"],
            "candidates": [m.row() for m in self.measurements],
        }

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> TuningRecord:
        measurements = [
            Measurement(
                row["runtime"],
                row["precision"],
                row["seconds_per_image"],
                row.get("iou"),
                row.get("logit_error"),
                row.get("error"),
            )
            for row in body["measurements"]
        ]
        chosen = Candidate(**body["chosen"]) if body["chosen"] else None
        return cls(
            body["key"],
            body["fields"],
            measurements,
            chosen,
            body["measured_at"],
            body.get("seconds", 0.0),
        )


def _record_path(key: str) -> Path:
    return tuning_dir() / f"{key}.json"


def read_record(key: str) -> tuple[TuningRecord | None, str | None]:
    """(the record, None), (None, None) when there is none, or (None, why it is unusable)."""
    path = _record_path(key)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except OSError as error:
        return None, f"unreadable ({first_line(error)})"
    try:
        stored = json.loads(text)
        body, digest = stored["body"], stored["sha256"]
    except (ValueError, KeyError, TypeError):
        return None, "not a complete record (truncated or overwritten)"
    if hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() != digest:
        return None, "its checksum does not match its contents"
    try:
        record = TuningRecord.from_body(body)
    except (KeyError, TypeError, ValueError):
        return None, "not a record of this version"
    if record.key != key:
        return None, "it is another key's record"
    return record, None


def write_record(record: TuningRecord) -> str | None:
    """Store ``record`` atomically; None, or the one-line warning when the cache cannot be
    written (the choice then holds for this run only)."""
    body = record.body()
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    try:
        tuning_dir().mkdir(parents=True, exist_ok=True)
        write_json_atomic(_record_path(record.key), {"body": body, "sha256": digest})
    except OSError as error:
        return (
            f"the tuning cache {tuning_dir()} is not writable ({first_line(error)}): the "
            "backend measured now holds for this run only (set CLIPSEG_CACHE to a writable "
            "folder)"
        )
    return None


@contextlib.contextmanager
def tuning_lock(key: str) -> Iterator[None]:
    """An exclusive ``flock`` on the key while it is measured (none where it cannot be had:
    Windows, a read-only cache)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        tuning_dir().mkdir(parents=True, exist_ok=True)
        fd = os.open(tuning_dir() / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class Tuned:
    """What :func:`tuned` found: the record, whether it was ``measured`` now or read from the
    ``cache``, and one-line messages for the user."""

    record: TuningRecord
    source: str
    messages: list[str] = field(default_factory=list)


def cached_choice(
    weights_sha256: str, arch: ArchitectureSpec, precision: str = "auto", runtime: str = "auto"
) -> TuningRecord | None:
    """The stored record for this model and request on this machine, if there is an intact
    one (``clipseg models`` shows it)."""
    key, _ = tuning_key(weights_sha256, arch, precision, runtime)
    return read_record(key)[0]


def tuned(
    weights_sha256: str,
    arch: ArchitectureSpec,
    opens: Callable[[Candidate], Any],
    *,
    precision: str = "auto",
    runtime: str = "auto",
    label: str = "the model",
    force: bool = False,
    on_progress: Progress | None = None,
) -> Tuned:
    """The choice for this model on this machine: the cached record, else measured now (under
    the key's lock, so concurrent runs measure once) and stored.

    Args:
        opens: returns the image backend of a candidate (see :func:`measure`).
        precision, runtime: what was asked (``auto`` or a name); they narrow the candidates.
        force: measure even when a record is cached (``clipseg tune``).
        on_progress: one-line messages (measuring, each candidate's time, a damaged record).
    """
    say = on_progress or (lambda _: None)
    key, fields = tuning_key(weights_sha256, arch, precision, runtime)
    messages: list[str] = []
    if not force:
        record, _ = read_record(key)
        if record is not None:
            return Tuned(record, "cache")
    with tuning_lock(key):
        if not force:
            record, problem = read_record(key)
            if record is not None:  # measured by a concurrent run while this one waited
                return Tuned(record, "cache")
            if problem is not None:
                message = f"the tuning record of {label} is damaged ({problem}); measuring again"
                messages.append(message)
                say(message)
        chosen_from = candidates(precision, runtime)
        say(
            f"measuring which CPU backend runs {label} fastest on this machine (once): "
            + ", ".join(c.label for c in chosen_from)
        )
        start = time.perf_counter()
        measurements = measure(opens, chosen_from, arch.input_size, arch.embed_dim, say)
        best = choose(measurements, precision)
        record = TuningRecord(
            key,
            fields,
            measurements,
            best.candidate if best else None,
            seconds=time.perf_counter() - start,
        )
        if best is not None:
            say(f"chose {best.candidate.label} in {record.seconds:.1f} s (remembered)")
        warning = write_record(record)
        if warning is not None:
            messages.append(warning)
            say(warning)
    return Tuned(record, "measured", messages)
