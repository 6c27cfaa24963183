"""The `feature-extraction` task: CLIP-style image and text encoders (apple/coreml-mobileclip).

MobileCLIP's repo holds each encoder as a bundle of its own: `mobileclip_s0_image` takes an
`image` (256x256) and `mobileclip_s0_text` takes `text`, CLIP BPE ids int32 [1, 77] (start and
end tokens, zeros after); both give `final_emb_1`, an embedding that is not normalized. Run
either one with `--image` and `--text`: the other encoder of the pair (the same name with
`image` and `text` swapped) is found among the pulled variants, or pulled. The repo ships no
tokenizer: CLIP's BPE files come from the model's folder, `--tokenizer`, or openai/clip-vit-base-patch32.

Images are center-cropped to the image encoder's shape (`--fit pad` or `stretch` otherwise).
Prints the cosine similarity of every image with every text; the embeddings (as the encoders
give them, one row per input) are saved as `image-embeddings.npy` and `text-embeddings.npy`.
A single encoder, or a folder holding both, runs the same way.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from coreml_hub.errors import ModelNotPulled, UsageError, VariantNotFound
from coreml_hub.hookspecs import hookimpl
from coreml_hub.human import plural
from coreml_hub.tasks import (KNOWN, NAMED, SHAPED, BundleSpec, ModelInfo, Rendering, TaskRequest, image_input,
                              load_bundle)

EMBEDDING_NAMES = ("final_emb_1", "image_embeds", "text_embeds", "image_features", "text_features", "embeddings",
                   "embedding", "pooler_output")
TAGS = ("feature-extraction", "zero-shot-image-classification", "image-feature-extraction")

if TYPE_CHECKING:
    import numpy as np


def embedding_output(spec: BundleSpec) -> Any:
    """The one float output of rank 1 or 2 (an embedding), preferring the names encoders use."""
    floats = [o for o in spec.outputs if o.kind == "array" and o.dtype.startswith("fp") and o.shape is not None
              and 1 <= len(o.shape) <= 2 and o.shape[-1] > 1 and o.name != "logits"]
    named = [o for o in floats if o.name in EMBEDDING_NAMES]
    if named:
        return named[0]
    return floats[0] if len(floats) == 1 and len(spec.outputs) == 1 else None


def encoder_kind(spec: BundleSpec) -> str | None:
    """`image` or `text` for an encoder (one input: an image, or one row of token ids), else None."""
    if spec.classifier or spec.states or embedding_output(spec) is None:
        return None
    if image_input(spec) is not None:
        return "image"
    if len(spec.inputs) == 1:
        ids = spec.inputs[0]
        if ids.kind == "array" and ids.dtype.startswith("int") and ids.shape is not None and len(ids.shape) == 2 \
                and ids.shape[0] == 1:
            return "text"
    return None


def swap_kind(name: str, have: str, want: str) -> str:
    """`mobileclip_s0_image` -> `mobileclip_s0_text` (and `ImageEncoder` -> `TextEncoder`)."""
    return re.sub(have, lambda m: want.upper() if m.group().isupper() else want.title() if m.group()[0].isupper()
                  else want, name, flags=re.IGNORECASE)


@dataclass(frozen=True)
class FeatureResult:
    model: ModelInfo
    images: tuple[Path, ...]
    texts: tuple[str, ...]
    image_embeddings: Any  # np.ndarray [images, D]
    text_embeddings: Any  # np.ndarray [texts, D]
    similarities: Any  # np.ndarray [images, texts], cosine
    files: tuple[Path, ...]
    encoders: tuple[str, ...]
    tokenizer: dict[str, Any] | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        import numpy as np

        return {"task": FeatureExtraction.name, "model": self.model.to_dict(),
                "encoders": list(self.encoders), "images": [str(p) for p in self.images], "texts": list(self.texts),
                "similarities": np.round(self.similarities, 6).tolist(),
                "image_embeddings": str(self.files[0]) if self.images else None,
                "text_embeddings": str(self.files[-1]) if self.texts else None,
                "dimensions": int(self._width()), "tokenizer": self.tokenizer, "seconds": round(self.seconds, 3)}

    def _width(self) -> int:
        for e in (self.image_embeddings, self.text_embeddings):
            if e is not None and e.size:
                return e.shape[-1]
        return 0

    def render(self) -> Rendering:
        import numpy as np

        files = tuple(str(p) for p in self.files)
        if self.images and self.texts:
            rows = tuple({"image": str(path), "text": text, "similarity": f"{self.similarities[i, j]:.4f}"}
                         for i, path in enumerate(self.images)
                         for j, text in sorted(enumerate(self.texts), key=lambda jt: -self.similarities[i, jt[0]]))
            return Rendering(rows=rows, columns=(("image", "IMAGE"), ("text", "TEXT"), ("similarity", "SIMILARITY")),
                             lines=("",) + files, quiet=files)
        inputs = [(str(p), self.image_embeddings[i]) for i, p in enumerate(self.images)] + \
                 [(t, self.text_embeddings[i]) for i, t in enumerate(self.texts)]
        rows = tuple({"input": name, "dims": str(v.shape[-1]), "norm": f"{float(np.linalg.norm(v)):.4f}"}
                     for name, v in inputs)
        return Rendering(rows=rows, columns=(("input", "INPUT"), ("dims", "DIMENSIONS"), ("norm", "NORM")),
                         lines=("",) + files, quiet=files)


class FeatureExtraction:
    name = "feature-extraction"
    description = "Embeddings of images and texts with CLIP-style encoders, and their cosine similarities."
    options = ("tokenizer", "fit")

    def recognize(self, model: ModelInfo) -> float:
        if model.diffusion or not model.bundles or len(model.bundles) > 2:
            return 0.0
        specs = model.specs()
        kinds = [encoder_kind(s) for s in specs]
        if None in kinds or len(set(kinds)) != len(kinds):
            return 0.0
        named = any(embedding_output(s).name in EMBEDDING_NAMES for s in specs)
        score = NAMED if model.names_task(self.name) else KNOWN if named else SHAPED
        return score + model.tag_bonus(*TAGS)

    def run(self, model: ModelInfo, request: TaskRequest) -> FeatureResult:
        import numpy as np

        from coreml_hub.pipeline.images import open_image

        texts = tuple(request.texts)
        paths = request.files()
        if not paths and not texts:
            raise UsageError("feature-extraction takes images (IMAGE or --image) and texts (--text).",
                             hint=f'For example: coreml-hub run {model.ref} --image a.jpg --text "a dog" --text "a cat"')
        images = [open_image(p, what="Image", option="--image") for p in paths]
        encoders = {encoder_kind(s): s for s in model.specs()}
        for kind, wanted in (("image", bool(images)), ("text", bool(texts))):
            if wanted and kind not in encoders:
                encoders[kind] = self._partner(model, kind, request)
        t0 = time.perf_counter()
        image_vectors = self._embed_images(encoders["image"], images, request) if images else _empty()
        tokenizer = None
        text_vectors = _empty()
        if texts:
            text_vectors, tokenizer = self._embed_texts(encoders["text"], texts, model, request)
        sims = _unit(image_vectors) @ _unit(text_vectors).T if images and texts else np.zeros((len(images), len(texts)))
        files = tuple(_save(request, name, vectors) for name, vectors in
                      (("image-embeddings", image_vectors), ("text-embeddings", text_vectors)) if len(vectors))
        seconds = time.perf_counter() - t0
        request.say(f"Embedded {plural(len(images), 'image')} and {plural(len(texts), 'text')} in {seconds:.2f} s.")
        return FeatureResult(model, tuple(paths), texts, image_vectors, text_vectors, sims, files,
                             tuple(s.path.name for s in encoders.values() if s is not None), tokenizer, seconds)

    def _partner(self, model: ModelInfo, kind: str, request: TaskRequest) -> BundleSpec:
        """The other encoder of a pair: the variant named like this one with image/text swapped."""
        from coreml_hub import store
        from coreml_hub.tasks import describe_model, resolve

        have = "text" if kind == "image" else "image"
        hint = f"Pass a folder holding both encoders, or run the {kind} encoder's variant."
        if not (model.repo and model.variant) or not re.search(have, model.variant, re.IGNORECASE):
            article = "an" if have == "image" else "a"
            raise UsageError(f"{model.name} is {article} {have} encoder; {kind}s need the {kind} encoder of its pair.",
                             hint=hint)
        ref = f"{model.repo}:{swap_kind(model.variant, have, kind)}"
        try:
            pulled = store.find_pulled(ref, require_ok=True)
        except ModelNotPulled:
            if not request.pull:
                raise ModelNotPulled(f"{ref}, the {kind} encoder paired with {model.variant}, is not pulled.",
                                     hint=f"Pull it with `coreml-hub pull {ref}` (or drop --no-pull).") from None
            request.say(f"Pulling {ref}, the {kind} encoder paired with {model.variant}.")
            try:
                store.pull(ref, progress=request.progress)
            except VariantNotFound as exc:
                raise VariantNotFound(f"{model.repo} has no {kind} encoder named like {model.variant} ({ref}).",
                                      hint=hint) from exc
            pulled = store.find_pulled(ref, require_ok=True)
        info = describe_model(resolve(str(pulled.path)))
        found = [s for s in info.specs() if encoder_kind(s) == kind]
        if not found:
            raise UsageError(f"{ref} is not a {kind} encoder. {info.describe()}", hint=hint)
        return found[0]

    def _embed_images(self, spec: BundleSpec, images: list[Any], request: TaskRequest) -> np.ndarray:
        import numpy as np

        from coreml_hub.pipeline.images import fit_image

        feature = image_input(spec)
        assert feature is not None and feature.image is not None
        encoder = load_bundle(spec.path, request)
        out, fit = embedding_output(spec).name, request.option("fit", "crop")
        size = (feature.image.width, feature.image.height)
        return np.stack([np.asarray(encoder.predict({feature.name: fit_image(image, *size, fit)})[out],
                                    dtype=np.float32).reshape(-1) for image in images])

    def _embed_texts(self, spec: BundleSpec, texts: tuple[str, ...], model: ModelInfo,
                     request: TaskRequest) -> tuple[np.ndarray, dict[str, Any]]:
        import numpy as np

        from coreml_hub.pipeline.tokenizer import ClipTokenizer, tokenizer_files_in
        from coreml_hub.tokenizer_source import CLIP_FILES, CLIP_REPO, locate

        def present(folder: Path) -> bool:
            return tokenizer_files_in(folder) is not None

        folders = tuple(dict.fromkeys((model.folder, spec.path.parent, model.folder / "tokenizer")))
        source = locate(model.name, folders, present=present, files=CLIP_FILES,
                        wanted=request.option("tokenizer"), default=CLIP_REPO)
        length = spec.inputs[0].shape[1]
        files = tokenizer_files_in(source.folder)
        assert files is not None  # `locate` returns a folder that has them
        tokenizer = ClipTokenizer(files, length)
        ids = np.zeros((len(texts), 1, length), dtype=np.int32)
        for n, text in enumerate(texts):
            if tokenizer.truncated(text):
                request.say(f"Warning: the text {text!r} is longer than the encoder's {length} tokens; "
                            "the rest is ignored.")
            encoded = tokenizer.encode(text)
            end = encoded.index(tokenizer.eos_id) + 1  # zeros after the end token, as MobileCLIP pads
            ids[n, 0, :end] = encoded[:end]
        encoder = load_bundle(spec.path, request)
        name, out = spec.inputs[0].name, embedding_output(spec).name
        vectors = np.stack([np.asarray(encoder.predict({name: row})[out], dtype=np.float32).reshape(-1) for row in ids])
        return vectors, {**source.to_dict(), "from": source.describe()}


def _empty() -> np.ndarray:
    import numpy as np

    return np.zeros((0, 0), dtype=np.float32)


def _unit(vectors: np.ndarray) -> np.ndarray:
    import numpy as np

    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def _save(request: TaskRequest, stem: str, vectors: np.ndarray) -> Path:
    import numpy as np

    from coreml_hub.pipeline.png import save_file

    return save_file(request.folder(), stem, ".npy", lambda fh: np.save(fh, vectors, allow_pickle=False))


@hookimpl
def register_tasks(register: Any) -> None:
    register(FeatureExtraction())
