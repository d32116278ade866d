"""The colours clipseg draws with: the overlay tint (writers and the review page's thumbnails
must look alike) and the label palette. Standard library only."""

from __future__ import annotations

import colorsys

#: ``overlay`` outputs: masked pixels move this far towards this colour, and the outline is drawn
#: in it.
OVERLAY_COLOUR = (255, 0, 80)
OVERLAY_OPACITY = 0.45


def label_palette(n: int) -> list[tuple[int, int, int]]:
    """Black for background plus ``n`` distinct, deterministic colours (``n + 1`` entries).

    Hues advance by the golden ratio so neighbouring labels contrast; saturation and value
    alternate to separate hues that come close. ``n`` may be at most 255 (8-bit labels).
    """
    if not 0 <= n <= 255:
        raise ValueError(f"n must be in [0, 255], got {n}")
    palette: list[tuple[int, int, int]] = [(0, 0, 0)]
    seen = set(palette)
    i = 0
    while len(palette) < n + 1:
        hue = (i * 0.618033988749895) % 1.0
        sat = (0.85, 0.55)[i % 2]
        val = (1.0, 0.8, 0.6)[(i // 2) % 3]
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colour = (round(r * 255), round(g * 255), round(b * 255))
        if colour not in seen:  # rounding can merge two hues; skip rather than repeat a colour
            seen.add(colour)
            palette.append(colour)
        i += 1
    return palette
