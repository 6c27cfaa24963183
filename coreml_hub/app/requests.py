"""What a client may ask for, checked before anything is queued: every error names the field.

Generation requests carry every `coreml-hub run` option (the web form and `POST /api/jobs`),
or the OpenAI image fields plus the same options as extras (`POST /v1/images/generations`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from ..pipeline.schedulers import DEFAULT_SCHEDULER, PREDICTION_TYPES, SCHEDULERS  # stdlib only

BACKENDS = ("auto", "torch", "coreml")
DEVICES = ("auto", "cpu", "cuda", "mps")
COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_ONLY", "CPU_AND_NE")
MAX_IMAGES = 8
MAX_STEPS = 500
MAX_PROMPT = 10_000
MAX_SEED = 2**63 - 1
RESPONSE_FORMATS = ("b64_json", "url")
# OpenAI fields that have no meaning here; accepted so that existing clients work unchanged
OPENAI_IGNORED = ("quality", "style", "user", "background", "moderation", "output_compression")


class RequestError(ValueError):
    """A request that cannot be run as it is; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class GenerateRequest:
    model: str
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int | None = None
    scheduler: str = DEFAULT_SCHEDULER
    prediction_type: str | None = None
    num_images: int = 1
    init_image: str | None = None  # an upload id (POST /api/uploads)
    strength: float | None = None  # None: 0.75, or 1 with a mask (as `run`)
    mask: str | None = None  # an upload id: inpainting (white or transparent = repaint)
    # (name, control image upload id or None, scale) per ControlNet, in order
    controlnets: tuple[tuple[str, str | None, float], ...] = ()
    backend: str = "auto"
    device: str = "auto"
    compute_unit: str = "ALL"
    disable_safety: bool = False
    save_every: int | None = None
    preview_every: int | None = None  # None: the app's default; 0: no previews
    size: str | None = None  # "WxH" the client expects; checked against the model once it is loaded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(data: dict[str, Any], name: str, *, required: bool = False, default: str = "",
          limit: int = MAX_PROMPT) -> str:
    value = data.get(name)
    if value is None:
        if required:
            raise RequestError(f"`{name}` is required.", name)
        return default
    if not isinstance(value, str):
        raise RequestError(f"`{name}` must be a string.", name)
    if required and not value.strip():
        raise RequestError(f"`{name}` must not be empty.", name)
    if len(value) > limit:
        raise RequestError(f"`{name}` is longer than {limit} characters.", name)
    return value


def _int(data: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise RequestError(f"`{name}` must be a whole number.", name)
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"-?\d+", value):
            raise RequestError(f"`{name}` must be a whole number, got {value!r}.", name)
        value = int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise RequestError(f"`{name}` must be a whole number, got {value}.", name)
        value = int(value)
    if not isinstance(value, int):
        raise RequestError(f"`{name}` must be a whole number.", name)
    if not low <= value <= high:
        raise RequestError(f"`{name}` must be between {low} and {high}, got {value}.", name)
    return value


def _float(data: dict[str, Any], name: str, default: float, low: float, high: float, *,
           low_open: bool = False) -> float:
    value = data.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise RequestError(f"`{name}` must be a number.", name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"`{name}` must be a number, got {value!r}.", name) from None
    if number != number or (number <= low if low_open else number < low) or number > high:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise RequestError(f"`{name}` must be in {bound}, got {value}.", name)
    return number


def _choice(data: dict[str, Any], name: str, choices: tuple[str, ...], default: str | None, *,
            upper: bool = False) -> str | None:
    value = data.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str) or (value.upper() if upper else value) not in choices:
        raise RequestError(f"`{name}` must be one of {', '.join(choices)}, got {value!r}.", name)
    return value.upper() if upper else value


def _bool(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if isinstance(value, bool):
        return value
    if value in (None, "", 0, "0", "false", "off"):
        return False
    if value in (1, "1", "true", "on"):
        return True
    raise RequestError(f"`{name}` must be true or false.", name)


def _size(data: dict[str, Any]) -> str | None:
    value = data.get("size")
    if value is None or value == "auto":
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[1-9]\d{0,4}x[1-9]\d{0,4}", value):
        raise RequestError(f"`size` must look like 512x512 (or be auto), got {value!r}.", "size")
    return value


RUN_FIELDS = ("model", "prompt", "negative_prompt", "steps", "guidance_scale", "seed", "scheduler",
              "prediction_type", "num_images", "init_image", "strength", "mask", "controlnets", "backend", "device",
              "compute_unit", "disable_safety", "save_every", "preview_every", "size")
MAX_CONTROLNETS = 4


def _upload_id(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{32}", value):
        raise RequestError(f"`{name}` must be the id of an image uploaded to /api/uploads.", name)
    return value


def _controlnets(data: dict[str, Any]) -> tuple[tuple[str, str | None, float], ...]:
    """`[{"name": "Canny", "image": UPLOAD_ID, "scale": 0.8}, ...]`, as `run --controlnet/--control-image/
    --control-scale`; an entry without an image takes the masked init image (inpaint ControlNets)."""
    value = data.get("controlnets")
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_CONTROLNETS:
        raise RequestError(f"`controlnets` must be a list of at most {MAX_CONTROLNETS} objects.", "controlnets")
    units = []
    for i, unit in enumerate(value):
        where = f"controlnets[{i}]"
        if not isinstance(unit, dict) or set(unit) - {"name", "image", "scale"}:
            raise RequestError(f"`{where}` must be an object with `name`, `image` and `scale`.", "controlnets")
        name = _text(unit, "name", required=True, limit=500).strip()
        if name.startswith((".", "/", "~", "\\")) or name.endswith((".mlmodelc", ".mlpackage")) or "\\" in name:
            raise RequestError(f"`{where}.name` must name a ControlNet of the model (NAME or REPO:NAME), "
                               f"not a path: {name!r}.", "controlnets")
        try:
            scale = _float(unit, "scale", 1.0, 0.0, 10.0)
        except RequestError as exc:
            raise RequestError(f"`{where}.{exc.message[1:]}", "controlnets") from None
        units.append((name, _upload_id(unit.get("image"), "controlnets"), scale))
    return tuple(units)


def parse_generate(data: Any, *, openai: bool = False) -> GenerateRequest:
    """A generation request from a JSON object: the app's fields, or OpenAI's (`n` for `num_images`)."""
    if not isinstance(data, dict):
        raise RequestError("The request body must be a JSON object.")
    allowed = set(RUN_FIELDS)
    if openai:
        allowed |= {"n", "response_format", "output_format", *OPENAI_IGNORED}
        allowed -= {"num_images", "init_image", "strength", "mask", "controlnets"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RequestError(f"Unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}.", unknown[0])
    if openai and data.get("output_format") not in (None, "png"):
        raise RequestError("Only `output_format` png is available.", "output_format")
    count_field = "n" if openai else "num_images"
    init = _upload_id(data.get("init_image"), "init_image")
    mask = _upload_id(data.get("mask"), "mask")
    if mask is not None and init is None:
        raise RequestError("`mask` needs `init_image`: the image whose masked part is repainted.", "mask")
    controlnets = _controlnets(data)
    if any(image is None for _, image, _ in controlnets) and mask is None:
        raise RequestError("Each of `controlnets` needs an `image` (only an inpaint ControlNet with a `mask` "
                           "goes without).", "controlnets")
    return GenerateRequest(
        model=_text(data, "model", required=True, limit=500),
        prompt=_text(data, "prompt", required=True),
        negative_prompt=_text(data, "negative_prompt"),
        steps=_int(data, "steps", 25, 1, MAX_STEPS),  # type: ignore[arg-type]
        guidance_scale=_float(data, "guidance_scale", 7.5, 0.0, 100.0),
        seed=_int(data, "seed", None, 0, MAX_SEED),
        scheduler=_choice(data, "scheduler", tuple(SCHEDULERS), DEFAULT_SCHEDULER),  # type: ignore[arg-type]
        prediction_type=_choice(data, "prediction_type", PREDICTION_TYPES, None),
        num_images=_int(data, count_field, 1, 1, MAX_IMAGES),  # type: ignore[arg-type]
        init_image=init,
        strength=_float(data, "strength", None, 0.0, 1.0, low_open=True),  # type: ignore[arg-type]
        mask=mask,
        controlnets=controlnets,
        backend=_choice(data, "backend", BACKENDS, "auto"),  # type: ignore[arg-type]
        device=_choice(data, "device", DEVICES, "auto"),  # type: ignore[arg-type]
        compute_unit=_choice(data, "compute_unit", COMPUTE_UNITS, "ALL", upper=True),  # type: ignore[arg-type]
        disable_safety=_bool(data, "disable_safety"),
        save_every=_int(data, "save_every", None, 1, MAX_STEPS),
        preview_every=_int(data, "preview_every", None, 0, MAX_STEPS),
        size=_size(data),
    )


def response_format(data: dict[str, Any]) -> str:
    return _choice(data, "response_format", RESPONSE_FORMATS, "b64_json")  # type: ignore[return-value]


def parse_pull(data: Any) -> tuple[str, str | None]:
    """`{"model": "ORG/NAME[@REV]", "variant": ID or null}` for a pull job."""
    if not isinstance(data, dict):
        raise RequestError("The request body must be a JSON object.")
    unknown = sorted(set(data) - {"model", "variant"})
    if unknown:
        raise RequestError(f"Unknown field: {unknown[0]}.", unknown[0])
    model = _text(data, "model", required=True, limit=500).strip()
    variant = _text(data, "variant", limit=500).strip() or None
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+(@[\w.\-/]+)?(:.+)?", model):
        raise RequestError(f"`model` must be a repo id like org/name, got {model!r}.", "model")
    return model, variant
