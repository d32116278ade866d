"""``clipseg models``: the known models and whether their weights are here."""

from __future__ import annotations

import sys

import typer

from clipseg_cli.specs import DEFAULT_MODEL, MODEL_SPECS

COLUMNS = (
    "name",
    "hub id",
    "cached",
    "onnx graph",
    "cpu backend",
    "original file",
    "description",
)


def _graphs(files: tuple) -> str:
    """Which ONNX graphs of these weight files are cached (``fp32, int8``), ``no``, or
    ``not yet known`` before the weights have been loaded once."""
    from clipseg_cli.backends import GRAPH_VARIANTS
    from clipseg_cli.backends.cache import cached_graph
    from clipseg_cli.weights.identity import recall

    identity = recall(files)
    if identity is None:
        return "not yet known (no run yet)"
    found = [v for v in GRAPH_VARIANTS if cached_graph(identity.sha256, identity.arch, v)]
    return ", ".join(found) if found else "no"


def _cpu_backend(files: tuple) -> str:
    """The CPU backend ``--backend auto --precision auto`` runs this model with here, as
    measured (``openvino bf16 (0.087 s/img)``), or ``not measured yet``."""
    from clipseg_cli.backends.tuning import cached_choice
    from clipseg_cli.weights.identity import recall

    identity = recall(files)
    record = cached_choice(identity.sha256, identity.arch) if identity is not None else None
    if record is None:
        return "not measured yet"
    if record.chosen is None:
        return "none agreed with fp32"
    speed = {m.candidate: m.seconds_per_image for m in record.measurements}[record.chosen]
    return f"{record.chosen.label} ({speed:.3f} s/img)"


def _rows() -> list[tuple[str, ...]]:
    from clipseg_cli.errors import WeightsError
    from clipseg_cli.weights import bundled_model_dir
    from clipseg_cli.weights.locate import cached_hub_paths, transformers_files

    rows = []
    for spec in MODEL_SPECS.values():
        default = " (default)" if spec.hub_id == DEFAULT_MODEL else ""
        files = None
        if spec.hub_id is None:
            source = "(bundled with clipseg)"
            try:
                files = transformers_files(bundled_model_dir(spec.name))
                cached = "yes"
            except WeightsError:
                cached = "missing from this install"
        else:
            source, files = spec.hub_id, cached_hub_paths(spec.hub_id)
            cached = "yes" if files is not None else "no"
        graphs = _graphs(files) if files is not None else "-"
        cpu = _cpu_backend(files) if files is not None else "-"
        original = spec.original_filename or "-"
        rows.append((spec.name, source, cached, graphs, cpu, original, spec.description + default))
    return rows


def models() -> None:
    """List the known CLIPSeg models and whether their weights are in the local cache.

    On a terminal a table; otherwise tab-separated lines for scripts, a header line first
    (name, hub id, cached, onnx graph, cpu backend, original file, description). ``onnx
    graph``: the graphs exported for the CPU runtimes (in ``$CLIPSEG_CACHE``); ``cpu backend``:
    the runtime and precision measured fastest on this machine (``clipseg tune``).
    """
    rows = _rows()
    if not sys.stdout.isatty():
        for row in (COLUMNS, *rows):
            typer.echo("\t".join(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CLIPSeg models")
    for column in COLUMNS:
        table.add_column(column, no_wrap=column != "description")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
