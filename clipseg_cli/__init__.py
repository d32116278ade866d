"""clipseg: segment image collections from text or image prompts with CLIPSeg."""

from __future__ import annotations

from clipseg_cli.version import __version__

__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str):
    # Lazy: `clipseg --help` and light imports should not pay for importing torch.
    if name == "Segmenter":
        from clipseg_cli.segmenter import Segmenter

        return Segmenter
    raise AttributeError(name)
