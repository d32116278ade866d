"""Finding input images and decoding them into plain numpy arrays.

This module depends only on the standard library, numpy and Pillow. It never prints and never
exits: problems come back as data (:class:`InputListing` fields) or as :class:`ImageDecodeError`.

Path encoding
-------------
On Linux a file name is a byte string that need not be valid UTF-8. Such names are kept as
``str`` decoded with ``os.fsdecode`` (undecodable bytes become lone surrogates U+DC80..U+DCFF),
so the :class:`~pathlib.Path` objects returned here always reopen the original file. Those
strings cannot be written to UTF-8 text (JSON, logs); :func:`clipseg_cli.io.paths.display_path`
renders them safely and :func:`~clipseg_cli.io.paths.parse_display_path` inverts it.
"""

from __future__ import annotations

import glob
import io
import os
import stat
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TextIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from clipseg_cli.errors import first_line
from clipseg_cli.io.paths import display_path
from clipseg_cli.io.video import sniff_video
from clipseg_cli.specs import DEFAULT_MAX_PIXELS

try:
    from PIL import ImageCms
except ImportError:  # Pillow built without LittleCMS: fall back to Pillow's plain conversions
    ImageCms = None  # type: ignore[assignment]

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "ImageDecodeError",
    "InputItem",
    "InputListing",
    "collect_inputs",
    "configure_pillow_limits",
    "decode_image",
    "is_ignored_name",
    "keyed_items",
    "looks_like_image",
    "read_header",
]

#: Extensions that make a file in a folder walk a candidate even if its content is not an image,
#: so that a broken ``photo.jpg`` is reported as a failure instead of silently skipped.
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".bmp",
        ".avif",
        ".heic",
        ".heif",
    }
)

_SNIFF_BYTES = 16
_GLOB_CHARS = frozenset("*?[")

#: Names a folder walk (``segment``'s and ``watch``'s) never takes: hidden names (``.git``,
#: macOS ``._x.jpg`` forks, rsync's ``.x.jpg.AbC123`` and our own temporaries), files still being
#: downloaded or copied, editors' backups and the thumbnail caches of Windows and Synology.
IGNORED_PREFIXES = (".", "~")
IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload")
IGNORED_NAMES = frozenset({"Thumbs.db", "@eaDir"})


def is_ignored_name(name: str) -> bool:
    """Whether a file or folder of this name is left out of folder walks (and watching)."""
    return (
        name.startswith(IGNORED_PREFIXES)
        or name.lower().endswith(IGNORED_SUFFIXES)
        or name in IGNORED_NAMES
    )


# ---------------------------------------------------------------------------------------------
# Collecting inputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputItem:
    """One input file.

    Attributes:
        path: What to open, as the user named it (relative paths are relative to the current
            directory). May contain surrogate escapes; see :func:`display_path`.
        key: Relative path, unique within the run, used to mirror the input tree under the
            output folder (``photos/sub/dog.jpg`` under common ancestor ``photos`` ->
            ``sub/dog.jpg``).
        data: The file's bytes when they are already in memory (an upload to ``clipseg
            serve``): decoded from there, and ``path`` is then only a name, never opened.
    """

    path: Path
    key: PurePosixPath
    data: bytes | None = field(default=None, repr=False, compare=False)


@dataclass
class InputListing:
    """Result of :func:`collect_inputs`.

    Attributes:
        items: Candidate files, in the order the specs named them; a folder's files are sorted
            by their relative path components. Each file appears once.
        missing: Specs (files, globs, list entries, ``@list`` files) that matched nothing,
            already passed through :func:`display_path`.
        unreadable: ``(folder, reason)`` for folders met during a walk whose listing failed
            (e.g. permission denied); their files are not in ``items``.
    """

    items: list[InputItem]
    missing: list[str]
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


def looks_like_image(path: str | os.PathLike[str]) -> bool:
    """Whether a folder walk should treat ``path`` as a candidate image.

    True when the extension is image-like (see :data:`IMAGE_EXTENSIONS`, case-insensitive,
    whatever the content), when the first 16 bytes carry a known image signature, or when the
    file cannot be opened at all (broken symlink, permission denied): such files are candidates
    so that decoding reports them instead of skipping them silently.
    """
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return True
    return _has_image_signature(head)


def _has_image_signature(head: bytes) -> bool:
    return (
        head.startswith(b"\xff\xd8\xff")  # JPEG
        or head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith((b"GIF87a", b"GIF89a"))
        or (head.startswith(b"RIFF") and head[8:12] == b"WEBP")
        or head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"))  # TIFF, BigTIFF
        or head.startswith(b"BM")
        or (head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"))
    )


class _Collector:
    """Accumulates items across specs, deduplicating and applying exclusions."""

    def __init__(self, exclude: Sequence[Path], folders_as_items: bool = False) -> None:
        self.folders_as_items = folders_as_items
        self.files: list[Path] = []
        self.missing: list[str] = []
        self.unreadable: list[tuple[Path, str]] = []
        self._seen: set[object] = set()
        self._walked: set[str] = set()
        self._excluded = [os.path.realpath(p) for p in exclude]
        # The folders the specs name (a folder, a file's folder, a glob's fixed prefix): keys are
        # relative to their common ancestor, so they stay stable as new files appear inside.
        self.roots: list[str] = []

    def _is_excluded_real(self, real: str) -> bool:
        for root in self._excluded:
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                return True
        return False

    def add_file(self, path: Path) -> None:
        if self._excluded and self._is_excluded_real(os.path.realpath(path)):
            return
        try:
            st = path.stat()
            ident: object = (st.st_dev, st.st_ino)
        except OSError:
            # Broken symlink or unreadable parent: identify it by name; decoding will fail loudly.
            ident = ("abs", os.path.abspath(path))  # noqa: PTH100 - abspath normalises '..'
        if ident in self._seen:
            return
        self._seen.add(ident)
        self.files.append(path)

    def add_named(self, path: Path, spec_for_missing: str, root: Path | None = None) -> None:
        """A path named explicitly (argument, list entry, glob match under ``root``)."""
        if path.is_dir() and self.folders_as_items:
            # A frame folder (--sequence) is one input, keyed like a file in its parent.
            self.roots.append(os.path.abspath(root if root is not None else path.parent))  # noqa: PTH100
            self.add_file(path)
        elif path.is_dir():
            self.roots.append(os.path.abspath(root if root is not None else path))  # noqa: PTH100
            self.walk(path)
        elif path.exists() or path.is_symlink():
            self.roots.append(os.path.abspath(root if root is not None else path.parent))  # noqa: PTH100
            self.add_file(path)
        else:
            self.missing.append(display_path(spec_for_missing))

    def walk(self, top: Path) -> None:
        """Add candidate files under ``top``, sorted by relative path components.

        Symlinks to folders inside the walk are not followed (like ``find`` without ``-L``), so
        symlink loops cannot hang it; symlinks to files are followed. Hidden and temporary
        names are skipped (:func:`is_ignored_name`).
        """
        found: list[tuple[tuple[str, ...], Path]] = []
        stack: list[tuple[Path, tuple[str, ...]]] = [(top, ())]
        while stack:
            folder, rel = stack.pop()
            real = os.path.realpath(folder)
            if real in self._walked or self._is_excluded_real(real):
                continue
            self._walked.add(real)
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError as e:
                self.unreadable.append((folder, _os_reason(e)))
                continue
            for entry in entries:
                if is_ignored_name(entry.name):
                    continue
                child = folder / entry.name
                child_rel = (*rel, entry.name)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((child, child_rel))
                        continue
                    is_link = entry.is_symlink()
                    if is_link and entry.is_dir():
                        continue  # symlinked folder: not followed
                    # Broken symlinks stay candidates so that decoding reports them.
                    broken = is_link and not child.exists()
                    if not broken and not entry.is_file():
                        continue  # FIFOs, sockets, devices: opening a FIFO would block
                except OSError:
                    broken = True
                if broken or looks_like_image(child) or sniff_video(child):
                    found.append((child_rel, child))
        found.sort(key=lambda t: t[0])
        for _, path in found:
            self.add_file(path)


def _split_list(data: str) -> list[str]:
    """One entry per line (or per NUL, as from ``find -print0``); blanks and ``#`` lines dropped."""
    if "\0" in data:
        return [e for e in data.split("\0") if e]
    entries = []
    for line in data.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entries.append(line)
    return entries


def _read_stdin(stdin: TextIO | None) -> str:
    if stdin is not None:
        return stdin.read()
    # Read bytes and decode like the OS does, so non-UTF-8 names survive (sys.stdin is strict).
    return os.fsdecode(sys.stdin.buffer.read())


def collect_inputs(
    specs: Sequence[str],
    *,
    stdin: TextIO | None = None,
    exclude: Sequence[Path] = (),
    folders_as_items: bool = False,
) -> InputListing:
    """Expand input specs into a deduplicated list of candidate files with unique keys.

    Each spec is one of:

    * an existing file: always a candidate, whatever its content;
    * an existing folder: walked recursively (see ``_Collector.walk``); files are candidates
      when :func:`looks_like_image` says so;
    * a glob (contains ``*``, ``?`` or ``[`` and does not exist literally): expanded by Python,
      ``**`` matches folders recursively; matched files are candidates, matched folders walked;
    * ``-``: one path per line read from ``stdin`` (``sys.stdin`` as bytes when None);
    * ``@FILE``: one path per line read from FILE (use ``./@name`` for a file named ``@name``).

    List entries (``-`` and ``@FILE``) are literal paths (files or folders, no globs); relative
    entries are relative to the current directory, as in a shell, not to the list file. Blank
    lines and lines starting with ``#`` are ignored; if the text contains a NUL byte it is split
    on NULs instead (``find -print0``) with no comment handling.

    Files whose real path lies inside a folder of ``exclude`` are never returned. The same file
    named twice (also via symlinks or hardlinks) appears once, at its first mention.

    ``folders_as_items`` (``--sequence``): a folder named by a spec is one item (a video of
    numbered frames), not walked.

    Keys are paths relative to the deepest folder containing every folder the specs name (a
    folder spec itself, a file's folder, a glob's fixed prefix), computed on
    ``os.path.abspath`` without resolving symlinks. Distinct items have distinct keys, and a
    file's key does not change when other files appear later (resumable runs rely on this):
    ``["photos"]`` gives ``sub/dog.jpg`` even if ``sub`` is the only folder; a single file
    gives its name.
    """
    col = _Collector(exclude, folders_as_items)
    for spec in specs:
        if not spec:
            # Path("") means "." and would silently walk the current directory.
            col.missing.append(spec)
        elif spec == "-":
            for entry in _split_list(_read_stdin(stdin)):
                col.add_named(Path(entry), entry)
        elif spec.startswith("@") and len(spec) > 1:
            list_path = Path(spec[1:])
            try:
                data = os.fsdecode(list_path.read_bytes())
            except OSError:
                col.missing.append(display_path(spec))
                continue
            for entry in _split_list(data):
                col.add_named(Path(entry), entry)
        else:
            path = Path(spec)
            if (path.exists() or path.is_symlink()) or not (_GLOB_CHARS & set(spec)):
                col.add_named(path, spec)
                continue
            # Path.glob cannot take absolute patterns; glob.glob takes any shell-style one.
            matches = sorted(glob.glob(spec, recursive=True))  # noqa: PTH207
            if not matches:
                col.missing.append(display_path(spec))
            root = _glob_root(spec)
            for m in matches:
                col.add_named(Path(m), m, root)

    return InputListing(
        items=keyed_items(col.files, col.roots), missing=col.missing, unreadable=col.unreadable
    )


def _glob_root(pattern: str) -> Path:
    """The fixed folder a glob starts from: ``photos/2024/*/x.jpg`` -> ``photos/2024``."""
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path()


def keyed_items(files: Sequence[Path], roots: Sequence[str]) -> list[InputItem]:
    """``files`` as items keyed relative to the deepest folder holding every one of ``roots``
    (absolute folders) and every file's folder: the keys :func:`collect_inputs` gives, so a
    file found later under the same roots gets the key a listing would have given it."""
    if not files:
        return []
    # abspath (not resolve): normalises '..' without following symlinks, so keys mirror the
    # tree the user sees.
    absolute = [os.path.abspath(p) for p in files]  # noqa: PTH100
    parents = [os.path.dirname(a) for a in absolute]  # noqa: PTH120
    common = os.path.commonpath([*roots, *parents])
    items = []
    for path, a in zip(files, absolute, strict=True):
        rel = Path(os.path.relpath(a, common)).as_posix()
        items.append(InputItem(path=path, key=PurePosixPath(rel)))
    return items


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@dataclass
class DecodedImage:
    """A decoded image, as displayed (EXIF orientation applied, first frame).

    Attributes:
        rgb: uint8 [H, W, 3]. For images with transparency, the colour composited over white.
        alpha: uint8 [H, W] (255 = opaque) when the source has transparency, else None.
        format: Pillow's format name of the file ("JPEG", "PNG", ...).
        mode: The original Pillow mode ("RGB", "P", "I;16", "CMYK", ...).
        notes: Non-fatal oddities worth logging (e.g. unreadable EXIF orientation).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    format: str
    mode: str
    notes: tuple[str, ...] = ()


class ImageDecodeError(Exception):
    """A file could not be decoded; ``str()`` is a one-line human-readable reason."""


class _TruncationGate:
    """Serialises Pillow's process-global ``ImageFile.LOAD_TRUNCATED_IMAGES`` flag.

    Pillow reads that module global during open and load, so it cannot be set per image.
    Decodes that want the same setting run concurrently; one that wants the other setting
    waits until those finish. The flag is restored when no decode is active. This protects
    decodes made through this module only, and a run normally uses one setting throughout, so
    waiting only happens if callers mix both.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._mode = False
        self._saved = False

    @contextmanager
    def hold(self, allow_truncated: bool) -> Iterator[None]:
        with self._cond:
            while self._active and self._mode != allow_truncated:
                self._cond.wait()
            if not self._active:
                self._saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
                self._mode = allow_truncated
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    ImageFile.LOAD_TRUNCATED_IMAGES = self._saved
                    self._cond.notify_all()


_GATE = _TruncationGate()

# What Pillow's plugins raise on malformed files. Fuzzing has shown plugins raising more than
# OSError, so the usual suspects from parsing code are included; these are caught only around
# Pillow calls, never around our own logic.
_PIL_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    MemoryError,
)


def configure_pillow_limits(max_pixels: int | None) -> None:
    """Align Pillow's process-wide bomb limit with ``max_pixels``; call once at startup.

    :func:`decode_image` enforces ``max_pixels`` itself, but ``Image.open`` independently warns
    above ``Image.MAX_IMAGE_PIXELS`` and raises above twice that, which would override a
    larger user limit and print a warning. This sets the global and silences the warning.
    """
    import warnings

    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def _fmt_count(n: float) -> str:
    return f"{n:.1e}".replace("e+0", "e").replace("e+", "e")


def _os_reason(e: OSError) -> str:
    return (e.strerror or str(e)).strip().lower() if e.errno is not None else first_line(e)


def _reason(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "not enough memory to decode image"
    msg = first_line(e)
    if isinstance(e, EOFError) or "truncated" in msg.lower():
        return "truncated image file"
    if isinstance(e, OSError) and e.errno is not None:
        return _os_reason(e)
    return msg


def read_header(data: bytes, formats: Sequence[str] | None = None) -> tuple[str, int, int]:
    """``(format, width, height)`` of an image file's bytes, from its header alone (no pixels
    are decoded: a decompression bomb costs nothing here).

    Args:
        data: the file's bytes.
        formats: Pillow format names to try (``("JPEG", "PNG")``); others are not even parsed.

    Raises:
        ImageDecodeError: not an image of one of ``formats`` (or of any format Pillow reads).
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    with (
        _pillow_errors(),
        Image.open(io.BytesIO(data), formats=list(formats) if formats else None) as im,
    ):
        return im.format or "unknown", im.size[0], im.size[1]


@contextmanager
def _pillow_errors() -> Iterator[None]:
    """What Pillow raises on a bad file, as one-line :class:`ImageDecodeError` s."""
    try:
        yield
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large: {first_line(e)}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError("not an image (cannot identify image file)") from e
    except _PIL_ERRORS as e:
        raise ImageDecodeError(_reason(e)) from e


def decode_image(
    path: Path | bytes,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    allow_truncated: bool = False,
) -> DecodedImage:
    """Decode the first frame of an image file into RGB (+ alpha) as it is displayed.

    The size is checked from the header before pixels are decoded, so oversized files cost no
    memory. EXIF orientation is applied. Modes are mapped as follows: 16-bit integer modes are
    scaled by 255/65535; mode ``I`` (32-bit) by the smallest container depth holding its
    values (8, 16 or 31 bits; negative values: full signed 32-bit range); ``F`` values within
    [0, 1] are scaled by 255, others min-max normalised (NaN -> 0); CMYK uses the embedded ICC
    profile when there is one; LAB goes through an sRGB transform; everything else through
    Pillow's ``convert``. Transparent images are composited over white into ``rgb``.

    Thread-safe: called from worker threads (see ``_TruncationGate`` for ``allow_truncated``).

    Args:
        path: File to decode, or its bytes (an upload).
        max_pixels: Reject images with more than this many pixels; None disables the check.
        allow_truncated: Decode what is present of a truncated file (rest is grey) instead of
            failing.

    Returns:
        The decoded image.

    Raises:
        ImageDecodeError: Whatever went wrong, as a one-line reason.
        ValueError: ``max_pixels`` is not positive.
    """
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive or None, got {max_pixels}")
    if isinstance(path, bytes):
        if not path:
            raise ImageDecodeError("empty file (0 bytes)")
        return _decode_file(io.BytesIO(path), max_pixels, allow_truncated)
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageDecodeError("broken symbolic link") from None
        raise ImageDecodeError("file not found") from None
    except OSError as e:
        raise ImageDecodeError(_os_reason(e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError("is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError("not a regular file")
    if st.st_size == 0:
        raise ImageDecodeError("empty file (0 bytes)")

    try:
        f = path.open("rb")
    except OSError as e:
        raise ImageDecodeError(_os_reason(e)) from None
    with f:
        return _decode_file(f, max_pixels, allow_truncated)


def _decode_file(f: BinaryIO, max_pixels: int | None, allow_truncated: bool) -> DecodedImage:
    """:func:`decode_image` of an open file."""
    with _pillow_errors(), _GATE.hold(allow_truncated), Image.open(f) as im:
        width, height = im.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageDecodeError(
                f"image too large: {width}x{height} = {_fmt_count(width * height)} "
                f"pixels exceeds --max-pixels {_fmt_count(max_pixels)}"
            )
        im.load()
        fmt = im.format or "unknown"
        mode = im.mode
        notes: list[str] = []
        _apply_orientation(im, notes)
        rgb, alpha = _to_rgb_alpha(im)
    return DecodedImage(rgb=rgb, alpha=alpha, format=fmt, mode=mode, notes=tuple(notes))


def _apply_orientation(im: Image.Image, notes: list[str]) -> None:
    # in_place: a transposed copy would briefly double the memory of a large image.
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except _PIL_ERRORS as e:
        # A damaged EXIF block should not cost the whole image; the pixels are fine.
        notes.append(f"EXIF orientation ignored ({first_line(e)})")


def _to_rgb_alpha(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Map any Pillow mode to (uint8 [H,W,3] over white, uint8 [H,W] alpha or None)."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im)
        gray = _float_to_uint8(arr) if mode == "F" else _int_to_uint8(arr, mode)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        trns = im.info.get("transparency")
        if isinstance(trns, int) and mode != "F":
            # 16-bit greyscale PNG with a tRNS colour key: that exact value is transparent.
            alpha = np.where(arr == trns, 0, 255).astype(np.uint8)
            return _over_white(rgb, alpha), alpha
        return rgb, None
    if mode == "CMYK":
        im = _cmyk_to_rgb(im)
    elif mode == "LAB" and ImageCms is not None:
        # Pillow's plain LAB->RGB convert reinterprets the channels; LittleCMS does it properly.
        lab = ImageCms.createProfile("LAB")
        transform = ImageCms.buildTransform(lab, ImageCms.createProfile("sRGB"), "LAB", "RGB")
        im = ImageCms.applyTransform(im, transform)
    elif mode == "La":
        im = im.convert("LA")  # Pillow cannot go from premultiplied La straight to RGBA
    if im.has_transparency_data:
        rgba = np.asarray(im.convert("RGBA"))
        alpha = np.ascontiguousarray(rgba[:, :, 3])
        return _over_white(rgba[:, :, :3], alpha), alpha
    return np.asarray(im.convert("RGB")), None


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.uint16)[:, :, None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _int_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode.startswith("I;16"):
        a = arr.astype(np.uint32)
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    a64 = arr.astype(np.int64)
    if a64.size == 0:
        return np.zeros(arr.shape, np.uint8)
    lo, hi = int(a64.min()), int(a64.max())
    if lo < 0:
        return ((a64 + 2**31) >> 24).astype(np.uint8)
    if hi <= 255:
        return a64.astype(np.uint8)
    maxval = 65535 if hi <= 65535 else 2**31 - 1
    return ((a64 * 255 + maxval // 2) // maxval).astype(np.uint8)


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if lo < 0.0 or hi > 1.0:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    a = np.where(finite, a, 0.0)
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc and ImageCms is not None:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(
                im, src, ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # corrupt profile: Pillow's naive conversion below is still a usable image
    return im.convert("RGB")
