"""Weight palettization: n-bit look-up tables (`constexpr_lut_to_dense` in the program)."""

from __future__ import annotations

import shutil
from pathlib import Path


def palettize(package: Path, nbits: int) -> Path:
    """Palettize `package`'s weights in place to `nbits`-bit tables.

    Uses the "uniform" mode of coremltools.optimize.coreml: a linear table per tensor,
    which needs no clustering dependency (Apple's converter uses k-means, which needs
    scikit-learn). Embedding tables (`gather`) stay in float, as Apple keeps them.
    """
    from .components import _quiet, import_coremltools

    ct = import_coremltools()
    import coremltools.optimize.coreml as cto

    with _quiet():
        model = ct.models.MLModel(str(package), skip_model_load=True)
        config = cto.OptimizationConfig(
            global_config=cto.OpPalettizerConfig(mode="uniform", nbits=nbits, weight_threshold=2048),
            op_type_configs={"gather": None},
        )
        compressed = cto.palettize_weights(model, config=config)
        tmp = package.with_name(f".partial-{package.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        compressed.save(str(tmp))
    del model, compressed
    shutil.rmtree(package)
    tmp.rename(package)
    return package
