"""What a request may ask, and turning its form into the run's options (a
:class:`~clipseg_cli.run.config.SegmentConfig`), so that a request is answered exactly as
``clipseg segment`` (or ``matte``) would write the same image with the same options.

The options a request may set are the config's fields that decide outputs and hold one plain
value (:data:`REQUEST_FIELDS`, derived from the config by name): a new option of ``segment``
(``--min-score``, say) becomes a request field without a change here. Fields that name a file, a
model or a place (the model, ``--ref`` paths, ``--prompt-embedding``, ``--out``, ``--export``) are
never request fields: the model and the prompt files are fixed at start-up, and images come as
uploads, never as paths. An unknown field is an error, not ignored.

Every upload's format and size are read from its header here, before anything is decoded or
queued (:mod:`.limits`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clipseg_cli.io import sources
from clipseg_cli.io.naming import COMMAND_KINDS, parse_kinds
from clipseg_cli.ops import tiles
from clipseg_cli.ops.compose import parse_colour
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.promptset import Reference
from clipseg_cli.serve.limits import ServeLimits
from clipseg_cli.serve.problems import ApiError, exceeded, invalid

#: Config fields a request never sets, though they hold one value that decides outputs: the
#: model and its number format are the server's, like its bomb guard; exports write files.
SERVER_FIXED = frozenset(
    {
        "command",
        "model",
        "precision",
        "max_pixels",
        "allow_truncated",
        "coco_segmentation",
        "yolo_copy",
        "sam_model",
    }
)
#: Fields only one command has (as on the command line), and fields a command names otherwise.
COMMAND_ONLY = {"background": "matte", "cutout_alpha": "segment"}
RENAMED = {("matte", "soft_bits"): "matte_bits"}
#: ``--save`` kinds that are not PNG images: not served.
NOT_SERVED_KINDS = frozenset({"logits"})
#: ``--refine`` methods the server does not offer: SAM is a second model per server.
NOT_SERVED_REFINE = frozenset({"sam"})
_SCALAR_TYPES = {"bool": bool, "int": int, "float": float, "str": str}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True)
class RequestField:
    """A form field that sets one option of the run."""

    name: str  # the form field (the command-line option, underscored)
    option: str  # the SegmentConfig field
    kind: str  # bool, int, float or str
    optional: bool  # "" (or "none") gives None


def request_fields(command: str, options: type = SegmentConfig) -> tuple[RequestField, ...]:
    """The fields a request of ``command`` may set: the options (a config class's fields)
    that decide outputs and hold one plain value, but for the server's own."""
    found = []
    for option in dataclasses.fields(options):
        rule = option.metadata.get("fingerprint")
        if rule not in ("value", "composite") or option.name in SERVER_FIXED:
            continue
        if COMMAND_ONLY.get(option.name, command) != command:
            continue
        kinds = [part.strip() for part in str(option.type).split("|")]
        optional = "None" in kinds
        kinds = [kind for kind in kinds if kind != "None"]
        if len(kinds) != 1 or kinds[0] not in _SCALAR_TYPES:
            continue  # tuples (prompts, save ...) have fields of their own
        name = RENAMED.get((command, option.name), option.name)
        found.append(RequestField(name, option.name, kinds[0], optional))
    return tuple(found)


#: Per command: the option fields a request may send (besides the special fields below).
REQUEST_FIELDS: dict[str, tuple[RequestField, ...]] = {
    command: request_fields(command) for command in COMMAND_KINDS
}
#: Fields with a meaning of their own: uploads, repeatable texts, a start-up prompt file's name.
UPLOADS = ("image", "ref", "ref_mask")
LISTS = ("prompt", "negative", "save")
PROMPT_FILE = "prompt_file"


@dataclass(frozen=True)
class Upload:
    """A file part of the form: the client's file name (a label only) and its bytes."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class ParsedRequest:
    """A request, checked: the options of its run, its image, its image prompts, and the
    start-up prompt file it names (None: its prompts are embedded for it)."""

    config: SegmentConfig
    image: Upload
    references: tuple[Reference, ...]
    prompt_file: str | None


def parse_request(
    items: Sequence[tuple[str, str | Upload]],
    command: str,
    base: SegmentConfig,
    limits: ServeLimits,
    prompt_files: Mapping[str, Path],
    input_size: int,
) -> ParsedRequest:
    """Check a request's form fields (in order, repeated fields kept) and make its options.

    Raises:
        ApiError: 413, 415 or 422 (the limits' table), or 422 for a bad field.
    """
    lists: dict[str, list[str]] = {name: [] for name in LISTS}
    uploads: dict[str, list[Upload]] = {name: [] for name in UPLOADS}
    options: dict[str, object] = {}
    prompt_file = None
    known = {field.name: field for field in REQUEST_FIELDS[command]}
    for raw_name, value in items:
        name = raw_name.replace("-", "_")
        if name in UPLOADS:
            if not isinstance(value, Upload):
                raise invalid(f"{name} must be a file upload")
            uploads[name].append(value)
        elif isinstance(value, Upload):
            raise invalid(f"{_shown(raw_name)} is not a file field")
        elif name in LISTS:
            lists[name].append(value)
        elif name == PROMPT_FILE:
            prompt_file = value
        elif name in known:
            if known[name].option in options:
                raise invalid(f"{name} given twice")
            options[known[name].option] = _typed(known[name], value)
        else:
            allowed = ", ".join([*UPLOADS, *LISTS, PROMPT_FILE, *known])
            raise invalid(f"unknown field {_shown(raw_name)}; the fields are {allowed}")
    _check_prompts(lists["prompt"] + lists["negative"], limits)
    if len(uploads["image"]) != 1:
        raise invalid(f"send exactly one image file (field image), not {len(uploads['image'])}")
    image = uploads["image"][0]
    size = _header(image, "image", limits)
    references = _references(uploads["ref"], uploads["ref_mask"], limits)
    if options.get("refine") in NOT_SERVED_REFINE:
        raise invalid(f"refine {options['refine']} is not served; use none or guided")
    if "background" in options and not _is_background(str(options["background"])):
        raise invalid("background: a colour (white, #00ff00, 0,255,0) or blur")
    config = _config(command, base, lists, options, references, prompt_file, prompt_files)
    _check_tiles(config.tiles, size, input_size, limits)
    return ParsedRequest(config, image, references, prompt_file or _default(config, prompt_files))


def _shown(name: str) -> str:
    """A client's field name, safe to echo in one line."""
    return repr(name[:40])


def _typed(field: RequestField, text: str) -> object:
    value = text.strip()
    if field.optional and value.lower() in ("", "none"):
        return None
    try:
        if field.kind == "bool":
            if value.lower() not in _TRUE | _FALSE:
                raise ValueError
            return value.lower() in _TRUE
        if field.kind == "float":
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        return _SCALAR_TYPES[field.kind](value)
    except ValueError:
        raise invalid(f"{field.name} {value[:40]!r}: expected {field.kind}") from None


def _check_prompts(texts: list[str], limits: ServeLimits) -> None:
    if len(texts) > limits.max_prompts:
        raise exceeded(
            "max_prompts", f"{len(texts)} prompts and negatives; at most {limits.max_prompts}"
        )
    for text in texts:
        if len(text) > limits.max_prompt_chars:
            raise exceeded(
                "max_prompt_chars",
                f"a prompt of {len(text)} characters; at most {limits.max_prompt_chars}",
            )


def _header(upload: Upload, field: str, limits: ServeLimits) -> tuple[int, int]:
    """``(height, width)`` of an upload, from its header: 415 for a format not accepted (or not
    an image), 413 for too many pixels."""
    try:
        _format, width, height = sources.read_header(upload.data, limits.format_names)
    except sources.ImageDecodeError as error:
        if str(error).startswith("image too large"):
            raise exceeded("max_pixels", f"{field}: {error}") from None
        if str(error).startswith("empty"):
            raise invalid(f"{field}: {error}") from None
        raise exceeded(
            "formats", f"{field}: {error}; accepted: {', '.join(limits.format_names)}"
        ) from None
    if width * height > limits.max_pixels:
        raise exceeded(
            "max_pixels",
            f"{field}: {width}x{height} = {width * height} pixels; at most {limits.max_pixels}",
        )
    return height, width


def _check_tiles(setting: str, size: tuple[int, int], input_size: int, limits: ServeLimits) -> None:
    """The model rows an image of ``size`` costs with ``tiles``: at most ``max_tiles``."""
    count = tiles.tiles_along_short_side(setting, size, input_size)
    if count > limits.max_tiles:
        raise exceeded("max_tiles", f"{count} tiles along the shorter side")
    rows = 1 + (len(tiles.tile_grid(size, count)) if count else 0)
    if rows > limits.max_tiles:
        raise exceeded("max_tiles", f"{rows} model rows for this image; at most {limits.max_tiles}")


def _references(
    refs: list[Upload], masks: list[Upload], limits: ServeLimits
) -> tuple[Reference, ...]:
    if len(refs) > limits.max_refs:
        raise exceeded("max_refs", f"{len(refs)} reference images; at most {limits.max_refs}")
    if len(masks) > len(refs):
        raise invalid("more ref_mask than ref: masks pair with references in order")
    for index, upload in enumerate(refs):
        _header(upload, f"ref {index + 1}", limits)
    for index, upload in enumerate(masks):
        _header(upload, f"ref_mask {index + 1}", limits)
    paired = masks + [None] * (len(refs) - len(masks))
    return tuple(
        Reference(_label_name(ref.filename, index), ref.data, mask.data if mask else None)
        for index, (ref, mask) in enumerate(zip(refs, paired, strict=True))
    )


def _label_name(filename: str, index: int) -> str:
    """A reference's name in its prompt's label: the upload's base name, as a label only."""
    name = PurePosixPath(filename.replace("\\", "/")).name
    name = re.sub(r"[^\w.+-]", "_", name)[:64]
    return name or f"upload-{index + 1}"


def _is_background(text: str) -> bool:
    return text == "blur" or parse_colour(text) is not None


def _config(
    command: str,
    base: SegmentConfig,
    lists: dict[str, list[str]],
    options: dict[str, object],
    references: tuple[Reference, ...],
    prompt_file: str | None,
    prompt_files: Mapping[str, Path],
) -> SegmentConfig:
    try:
        save = parse_kinds(lists["save"], command)
    except ValueError as error:
        raise invalid(_api_message(str(error))) from None
    for kind in save:
        if kind in NOT_SERVED_KINDS:
            raise invalid(f"save {kind} is not served (not an image); ask for soft")
    embedding = None
    if prompt_file is not None:
        if prompt_file not in prompt_files:
            names = ", ".join(prompt_files) or "none were named at start-up"
            raise invalid(f"prompt_file {_shown(prompt_file)}: unknown; the server's: {names}")
        embedding = prompt_files[prompt_file]
    elif not (lists["prompt"] or references) and prompt_files:
        embedding = next(iter(prompt_files.values()))  # the default: the first named
    # References are uploads, passed to the prompt step as they are; the config only counts
    # them (--mix needs one), under names that are no file.
    placeholders = tuple(Path(f"<upload {i + 1}>") for i in range(len(references)))
    masks = placeholders[: sum(reference.mask is not None for reference in references)]
    try:
        return dataclasses.replace(
            base,
            command=command,
            prompts=tuple(lists["prompt"]),
            negatives=tuple(lists["negative"]),
            refs=placeholders,
            ref_masks=masks,
            prompt_embedding=embedding,
            save=save,
            **options,
        )
    except ValueError as error:
        raise invalid(_api_message(str(error), command)) from None


def _default(config: SegmentConfig, prompt_files: Mapping[str, Path]) -> str | None:
    """The start-up prompt file's name when the request uses one without naming it."""
    for name, path in prompt_files.items():
        if config.prompt_embedding == path:
            return name
    return None


def _api_message(message: str, command: str = "segment") -> str:
    """A config error in the API's words: ``--fill-holes`` -> ``fill_holes``."""
    names = {option: name for (cmd, option), name in RENAMED.items() if cmd == command}

    def field(match: re.Match) -> str:
        option = match.group(1).replace("-", "_")
        return names.get(option, option).replace("prompt_embedding", PROMPT_FILE)

    return re.sub(r"--([a-z][a-z0-9-]*)", field, message)


def fields_markdown(command: str) -> str:
    """A route's option fields as ``docs/serve.md`` lists them (:data:`REQUEST_FIELDS`)."""
    defaults = {option.name: option.default for option in dataclasses.fields(SegmentConfig)}
    lines = ["| field | type | default (as `clipseg " + command + "`) |", "|---|---|---|"]
    for field in REQUEST_FIELDS[command]:
        default = defaults[field.option]
        shown = "none" if default is None else str(default).lower()
        kind = f"{field.kind} or none" if field.optional else field.kind
        lines.append(f"| `{field.name}` | {kind} | `{shown}` |")
    return "\n".join(lines) + "\n"


__all__ = [
    "REQUEST_FIELDS",
    "ApiError",
    "ParsedRequest",
    "Upload",
    "fields_markdown",
    "parse_request",
]
