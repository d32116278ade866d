"""A run's inputs as the pipeline plans them: what is left to do, what an earlier run already
did, and the log rows of inputs that produce no outputs (missing, unreadable, skipped).

Light (no numpy, no torch): a rerun over a finished folder plans and logs with this alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from clipseg_cli.io.naming import casefold_collisions
from clipseg_cli.io.paths import display_path
from clipseg_cli.io.sources import InputItem, InputListing
from clipseg_cli.run.ledger import InputSignature, Ledger


@dataclass(frozen=True)
class Work:
    """One input to process, with what the ledger needs to record it."""

    item: InputItem
    key: str  # display form of item.key: the ledger's and the log's key
    signature: InputSignature
    out_key: PurePosixPath  # where its outputs go under --out (item.key, or ~hash on collision)


def plan(
    listing: InputListing, ledger: Ledger, retry_failed: bool
) -> tuple[list[Work], list[Work]]:
    """Split inputs into (to do, already done and unchanged).

    Outputs of the inputs to do go to their key under ``--out``, with a ``~hash`` suffix for keys
    that collide on case-insensitive disks (:func:`~clipseg_cli.io.naming.casefold_collisions`).
    """
    todo, done = [], []
    for item in listing.items:
        key = display_path(item.key)
        work = Work(item, key, InputSignature.of(item.path), item.key)
        (done if ledger.is_done(key, work.signature, retry_failed) else todo).append(work)
    out_keys = casefold_collisions(work.item.key for work in todo)
    todo = [Work(w.item, w.key, w.signature, out_keys[w.item.key]) for w in todo]
    return todo, done


def failure_row(shown: str, key: str | None, error: str | None, status: str = "failed") -> dict:
    """The log row of an input that produced no outputs: ``failed`` (with the reason) or
    ``skipped``. ``shown`` is the input as the log shows it (:func:`display_path`); ``key`` is
    None for a missing input or an unreadable folder."""
    return {
        "input": shown,
        "key": key,
        "status": status,
        "error": error,
        "width": None,
        "height": None,
        "prompts": [],
        "outputs": [],
        "timings": {},
    }
