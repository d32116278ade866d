"""``clipseg tune``: measure again which CPU backend and precision run a model fastest here.

Runs do this on their own the first time a model meets a machine and remember the choice
(:mod:`clipseg_cli.backends.tuning`); ``tune`` redoes it on demand (after a runtime upgrade
that keeps its version, with the machine idle for cleaner timings, or to see the table).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from clipseg_cli.commands import options as o
from clipseg_cli.commands.console import exit_on_error
from clipseg_cli.specs import DEFAULT_MODEL

COLUMNS = ("candidate", "s/image", "IoU vs fp32", "logit error", "agrees", "chosen")


def _identity(model: str, clip_weights):
    """(weights record, architecture): remembered from an earlier run, else loaded once."""
    from clipseg_cli.weights import load_weights
    from clipseg_cli.weights.locate import identify

    known = identify(model, clip_weights)
    if known is not None:
        return known
    loaded, info = load_weights(model, clip_weights=clip_weights, components={"decoder"})
    return info, loaded.arch


def tune(
    model: o.ModelOpt = DEFAULT_MODEL,
    clip_weights: o.ClipWeightsOpt = None,
    backend: o.BackendOpt = "auto",
    precision: o.PrecisionOpt = "auto",
) -> None:
    """Time every CPU backend and precision for MODEL on this machine, check their masks
    against fp32, and remember the fastest that agrees (what ``--backend auto --precision
    auto`` runs). Prints the table of candidates; tab-separated when not on a terminal."""
    from clipseg_cli.run.backend import ModelOpener, choose_backend
    from clipseg_cli.run.config import SegmentConfig

    def say(message: str) -> None:
        typer.echo(f"clipseg: {message}", err=True)

    with exit_on_error():
        if backend == "torch":
            raise ValueError("--backend torch is not measured: tune chooses among CPU runtimes")
        # Only the model, device, backend and precision of a run's config matter here; the
        # inputs and prompt are placeholders its checks ask for.
        config = SegmentConfig(
            inputs=("-",),
            out_dir=Path(),
            prompts=("tune",),
            model=model,
            clip_weights=clip_weights,
            device="cpu",
            backend=backend,
            precision=precision,
        )
        choice = choose_backend(config)
        if choice.name == "torch":
            raise ValueError(
                f"--precision {precision} runs on torch on this CPU: there is nothing to measure"
            )
        info, arch = _identity(model, clip_weights)
        opener = ModelOpener(config, info.sha256, arch, info.model_id, choice, None, say)
        settled = opener.settle(choice, force=True)
    tuning = settled.tuning or {}
    rows = []
    for row in tuning.get("candidates", []):
        label = f"{row['runtime']} {row['precision']}"
        seconds = row["seconds_per_image"]
        rows.append(
            (
                label,
                f"{seconds:.4f}" if seconds is not None else f"failed: {row['error']}",
                "-" if row["iou"] is None else f"{row['iou']:.4f}",
                "-" if row["logit_error"] is None else f"{row['logit_error']:.4f}",
                "yes" if row["agrees"] else "no",
                "<-" if label == tuning.get("choice") else "",
            )
        )
    if not sys.stdout.isatty():
        for row in (COLUMNS, *rows):
            typer.echo("\t".join(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{info.model_id} on {tuning.get('cpu', 'this CPU')}")
    for column in COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
