"""What the app's jobs do: the same library calls as `coreml-hub run` and `coreml-hub pull`,
with progress, previews and cancel reported to the job instead of a terminal."""

from __future__ import annotations

import base64
import io
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import CoremlHubError, InvalidImage, ModelNotPulled, UsageError, translate
from .jobs import Failure, Job, Reporter
from .requests import GenerateRequest, RequestError
from .warm import LoadOptions, WarmPipelines

DEFAULT_PREVIEW_EVERY = 5
PREVIEW_MAX_SIDE = 512
MAX_UPLOAD_PIXELS = 4096 * 4096
KEEP_UPLOADS = 50

NOT_FOUND_ERRORS = ("ModelNotPulled", "RepoNotFound", "RevisionNotFound", "VariantNotFound", "EntryNotFound")


def classify(exc: BaseException) -> Failure:
    """A job's exception as the page and the API show it: user errors are 4xx, the rest 500."""
    if isinstance(exc, RequestError):
        return Failure(exc.message, None, exc.kind, exc.status, exc.param)
    from ..hub import endpoint

    known = translate(exc, endpoint=endpoint())
    if known is not None:
        name = type(known).__name__
        if name in NOT_FOUND_ERRORS:
            return Failure(known.message, known.hint, "not_found_error", 404)
        if isinstance(known, (UsageError, InvalidImage)) or name in ("UnsupportedSize", "InvalidBundle",
                                                                      "BackendUnavailable", "OfflineError"):
            return Failure(known.message, known.hint, "invalid_request_error", 400)
        if name in ("EndpointUnreachable", "DownloadError", "GatedRepo", "NotEnoughDiskSpace"):
            return Failure(known.message, known.hint, "server_error", 502 if name != "NotEnoughDiskSpace" else 507)
        return Failure(known.message, known.hint, "server_error", 500)
    return Failure(f"Internal error while running the job ({type(exc).__name__}); the server log has the details.",
                   "This is a bug in coreml-hub; report it with the log.", "server_error", 500)


# ---- uploads -------------------------------------------------------------------------------------

class Uploads:
    """Init images sent by clients, kept as PNG files in a private temporary folder under random ids."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="coreml-hub-app-uploads-"))
        self._lock = threading.Lock()
        self._order: list[str] = []

    def add(self, data: bytes) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > MAX_UPLOAD_PIXELS:
                    raise RequestError(f"The image is {width}x{height}; at most {MAX_UPLOAD_PIXELS} pixels are "
                                       "taken.", "image", status=413)
                img.load()
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise RequestError(f"The upload is not an image this app can read ({type(exc).__name__}).",
                               "image") from None
        upload_id = secrets.token_hex(16)
        path = self.folder / f"{upload_id}.png"
        rgb.save(path, format="PNG")
        with self._lock:
            self._order.append(upload_id)
            old, self._order = self._order[:-KEEP_UPLOADS], self._order[-KEEP_UPLOADS:]
        for stale in old:
            (self.folder / f"{stale}.png").unlink(missing_ok=True)
        return {"id": upload_id, "width": width, "height": height}

    def path(self, upload_id: str, param: str = "init_image") -> Path:
        path = self.folder / f"{upload_id}.png"
        if not path.is_file():
            what = {"mask": "mask", "controlnets": "control image"}.get(param, "init image")
            raise RequestError(f"The {what} is no longer on the server; upload it again.", param,
                               status=404, kind="not_found_error")
        return path

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ---- models --------------------------------------------------------------------------------------

def pulled_model(text: str) -> Any:
    """The pulled variant MODEL names (REPO, REPO:VARIANT, REPO@REV[:VARIANT]) as run resolves it.

    Folders are never taken from a request: a client names store entries only.
    """
    from .. import store
    from ..pipeline.resolve import ResolvedModel

    if text.startswith((".", "/", "~", "\\")) or text.split(":", 1)[0].count("/") != 1:
        raise RequestError(f"`model` must name a pulled model (org/name[:variant]), got {text!r}.", "model")
    try:
        ref = store.parse_ref(text)
        pulled = store.find_pulled(ref, require_ok=True)
    except ModelNotPulled as exc:
        raise RequestError(f"{exc.message} Pull it on the Library page or with `coreml-hub pull {text}`.", "model",
                           status=404, kind="not_found_error") from None
    except UsageError as exc:
        raise RequestError(exc.message, "model") from None
    return ResolvedModel(path=Path(pulled.path), name=pulled.repo, repo=pulled.repo, variant=pulled.variant,
                         revision=pulled.commit)


def list_models() -> list[dict[str, Any]]:
    """Pulled variants for the Library page and `/v1/models`."""
    from .. import store

    out = []
    for pulled in store.list_pulled():
        record = pulled.to_dict()
        try:
            record["components"] = list((pulled.manifest().get("variant") or {}).get("components") or [])
        except (OSError, ValueError):
            record["components"] = []
        record["id"] = pulled.ref()
        out.append(record)
    return out


# ---- generation ----------------------------------------------------------------------------------

def preview_data_url(image: Any) -> str:
    picture = image.copy()
    picture.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


class Generator:
    """Runs generation jobs on the warm pipelines; one instance per app."""

    def __init__(self, pool: WarmPipelines, uploads: Uploads, outputs: Path, *,
                 preview_every: int = DEFAULT_PREVIEW_EVERY, file_url: Callable[[str], str] = lambda n: n) -> None:
        self.pool = pool
        self.uploads = uploads
        self.outputs = outputs
        self.preview_every = preview_every
        self.file_url = file_url

    def __call__(self, job: Job, report: Reporter) -> dict[str, Any]:
        from ..pipeline.generate import StepProgress, generate

        req: GenerateRequest = job.payload
        model = pulled_model(req.model)
        init = self.uploads.path(req.init_image) if req.init_image else None
        mask = self.uploads.path(req.mask, "mask") if req.mask else None
        names = [name for name, _, _ in req.controlnets]
        images = [self.uploads.path(image, "controlnets") if image else None for _, image, _ in req.controlnets]
        scales = [scale for _, _, scale in req.controlnets]
        nets = ()
        if names:  # found (pulled) before anything loads; the warm pipeline is the one with these ControlNets
            from ..pipeline.controlnet import pair_requests
            from ..pipeline.generate import resolve_controlnets

            nets = tuple(str(p) for p in resolve_controlnets(model, pair_requests(names, (), ()), pull=True))
        options = LoadOptions(req.backend, req.device, req.compute_unit, req.prediction_type, nets)
        warm = self.pool.is_warm(model.path)
        report.phase("Using the warm model" if warm else f"Loading {model.name}")
        loaded, warm = self.pool.get(model, options, on_message=lambda text: report.phase(text))
        size = loaded.pipeline.geometry.size
        if req.size is not None and req.size != size:
            raise RequestError(f"{model.name} makes {size} images only (its size is fixed when it is converted); "
                               f"`size` {req.size} cannot be made.", "size")
        every = self.preview_every if req.preview_every is None else req.preview_every
        messages: list[str] = []

        def on_step(p: StepProgress) -> None:
            report.check_cancelled()
            report.progress(step=p.step, total=p.total, image=p.image_index + 1, images=p.num_images, seed=p.seed)
            if every and p.step % every == 0 and p.step < p.total:
                report.preview(preview_data_url(p.preview()), p.step)

        report.phase("Generating", step=0, total=req.steps, image=1, images=req.num_images)
        result = generate(
            model, req.prompt, negative_prompt=req.negative_prompt, steps=req.steps,
            guidance_scale=req.guidance_scale, seed=req.seed, scheduler=req.scheduler, image=init,
            strength=req.strength, num_images=req.num_images, output_dir=self.outputs,
            disable_safety=req.disable_safety, save_every=req.save_every, on_message=messages.append,
            prediction_type=req.prediction_type, loaded=loaded, on_step=on_step, mask=mask, controlnets=names,
            control_images=images, control_scales=scales)
        images = []
        for saved in result.images:
            name = saved.path.name
            images.append({"name": name, "url": self.file_url(name), "seed": saved.seed,
                           "nsfw_flagged": saved.flagged, "parameters": saved.metadata.to_dict(),
                           "intermediates": [self.file_url(p.name) for p in saved.intermediates]})
        return {"images": images, "warm": warm, "load_seconds": round(loaded.load_seconds if not warm else 0.0, 3),
                "generate_seconds": round(result.generate_seconds, 3),
                "steps_per_second": round(result.unet_steps_per_second, 3), "size": size,
                "backend": result.backend, "device": result.device,
                "warnings": [m.removeprefix("Warning: ") for m in messages if m.startswith("Warning: ")]}


# ---- pulls ---------------------------------------------------------------------------------------

class Puller:
    """Runs pull jobs with byte progress; cancel stops the download (what arrived stays, to resume)."""

    def __call__(self, job: Job, report: Reporter) -> dict[str, Any]:
        from ..pulling import describe_choice, plan_pull

        report.phase("Asking the Hub for the file list")
        plan = plan_pull(job.params["model"], variant=job.params.get("variant"))
        choice = describe_choice(plan)
        total = plan.download_bytes if plan.needs_download else 0
        report.phase(f"Downloading {plan.variant.id}" if plan.needs_download else "Already pulled",
                     done=0, total=total, variant=plan.variant.id, note=choice)
        last = [0.0]

        def on_bytes(done: int, total_bytes: int) -> None:
            report.check_cancelled()
            now = time.monotonic()
            if now - last[0] >= 0.1 or done >= total_bytes:
                last[0] = now
                report.progress(done=done, total=total_bytes, variant=plan.variant.id, note=choice)

        def on_phase(text: str) -> None:
            report.phase(text, done=total, total=total, variant=plan.variant.id, note=choice)

        result = plan.execute(progress=False, on_phase=on_phase, on_bytes=on_bytes)
        return {**result.to_dict(), "ref": f"{result.repo}:{result.variant}", "note": choice}


def remove_model(ref: str, pool: WarmPipelines) -> dict[str, Any]:
    """Remove a pulled variant (exactly as `coreml-hub rm REF -y`), releasing its pipeline first."""
    from .. import store

    if ":" not in ref:
        raise RequestError("Name the variant to remove as org/name:variant.", "model")
    try:
        matches = store.plan_remove(ref)
    except CoremlHubError as exc:
        raise RequestError(exc.message, "model", status=404 if isinstance(exc, ModelNotPulled) else 400,
                           kind="not_found_error" if isinstance(exc, ModelNotPulled) else "invalid_request_error"
                           ) from None
    for pulled in matches:
        pool.release_under(Path(pulled.path))
    return store.remove(ref).to_dict()
