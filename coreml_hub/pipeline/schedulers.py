"""Noise schedulers: diffusers' implementations, configured from the model's scheduler config.

diffusers is imported lazily, and only the module of the scheduler in use (not the package's
exports, which load every scheduler and pipeline placeholder). The LMS scheduler's coefficients
are integrals of Lagrange polynomials; they are computed exactly with numpy here, so scipy is
not needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError

# CLI name -> diffusers class name
SCHEDULERS: dict[str, str] = {
    "pndm": "PNDMScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "lms": "LMSDiscreteScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",  # SD3: Euler over the flow-matching sigmas, with a shift
}
# CLI name -> the diffusers module that defines it (under diffusers.schedulers)
SCHEDULER_MODULES: dict[str, str] = {
    "pndm": "scheduling_pndm",
    "dpmpp": "scheduling_dpmsolver_multistep",
    "euler": "scheduling_euler_discrete",
    "euler_a": "scheduling_euler_ancestral_discrete",
    "ddim": "scheduling_ddim",
    "lms": "scheduling_lms_discrete",
    "flow_euler": "scheduling_flow_match_euler_discrete",
}
DEFAULT_SCHEDULER = "pndm"
# Which schedulers fit which denoiser: the discrete-time ones predict noise (or v) at a timestep,
# SD3's transformer predicts the flow's velocity.
FLOW_SCHEDULERS = ("flow_euler",)
DEFAULT_FLOW_SCHEDULER = "flow_euler"
# What the Unet predicts; SD 2.x 768-px models use v_prediction, everything else epsilon.
PREDICTION_TYPES = ("epsilon", "v_prediction")

# A1111 "Sampler" names for the PNG `parameters` text.
SAMPLER_NAMES = {
    "pndm": "PNDM",
    "dpmpp": "DPM++ 2M",
    "euler": "Euler",
    "euler_a": "Euler a",
    "ddim": "DDIM",
    "lms": "LMS",
    "flow_euler": "Euler",
}

# The training schedule shared by SD 1.x, 2.x and SDXL.
DEFAULT_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "clip_sample": False,
    "timestep_spacing": "leading",
}

# SD3's schedule when the model ships no config (Apple's compiled repos): Apple's Swift pipeline uses shift 3.
FLOW_DEFAULT_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

CONFIG_PLACES = ("scheduler/scheduler_config.json", "scheduler_config.json")


def find_scheduler_config(variant_dir: Path, also: tuple[Path, ...] = ()) -> Path | None:
    """The scheduler config pulled (or converted) with the model, if any."""
    from .tokenizer import model_roots

    for root in dict.fromkeys(r for base in (*also, variant_dir) for r in model_roots(base)):
        for rel in CONFIG_PLACES:
            path = root / rel
            if path.is_file():
                return path
    return None


def scheduler_config(variant_dir: Path | None = None, *, prediction_type: str | None = None,
                     also: tuple[Path, ...] = (), defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's scheduler config (or `defaults`, SD's by default), with `prediction_type` forced when given."""
    config = dict(DEFAULT_CONFIG if defaults is None else defaults)
    path = find_scheduler_config(variant_dir, also) if variant_dir is not None else None
    if path is not None:
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            loaded = {}
        config.update({k: v for k, v in loaded.items() if not k.startswith("_")})
    if prediction_type:
        config["prediction_type"] = prediction_type
    return config


def make_scheduler(name: str, config: dict[str, Any] | None = None) -> Any:
    """A fresh diffusers scheduler `name` built from `config` (keys it does not know are ignored)."""
    if name not in SCHEDULERS:
        raise UsageError(f"Unknown scheduler {name!r}.", hint=f"Choose one of: {', '.join(SCHEDULERS)}.")
    config = dict(DEFAULT_CONFIG if config is None else config)
    if name == "lms":
        cls = _exact_lms_class()
    else:
        # an import statement's machinery (not importlib.import_module), so `python -X importtime` shows it
        module = __import__(f"diffusers.schedulers.{SCHEDULER_MODULES[name]}", fromlist=[SCHEDULERS[name]])
        cls = getattr(module, SCHEDULERS[name])
    if name == "pndm":
        config["skip_prk_steps"] = True  # PRK warm-up steps are not used by any SD pipeline
    return cls.from_config(config)


_LMS: Any = None


def _exact_lms_class() -> Any:
    global _LMS
    if _LMS is not None:
        return _LMS
    import numpy as np
    # The module itself, not the package export: diffusers exports a placeholder without scipy.
    from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

    class ExactLMSDiscreteScheduler(LMSDiscreteScheduler):
        """LMS whose multistep coefficients are exact polynomial integrals."""

        def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
            sigmas = [float(self.sigmas[t - k]) for k in range(order)]
            poly = np.polynomial.Polynomial([1.0])
            for k in range(order):
                if k == current_order:
                    continue
                poly *= np.polynomial.Polynomial([-sigmas[k], 1.0]) / (sigmas[current_order] - sigmas[k])
            integral = poly.integ()
            return float(integral(float(self.sigmas[t + 1])) - integral(float(self.sigmas[t])))

    _LMS = ExactLMSDiscreteScheduler
    return _LMS
