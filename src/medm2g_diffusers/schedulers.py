"""The samplers a user can pick by name: a diffusers scheduler built from a checkpoint's own scheduler config.

Every checkpoint ships the DDIM scheduler it was trained with (linear betas 0.00085-0.012, its prediction type).
Any diffusers scheduler of the same noise schedule samples the same model, as in diffusers::

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

:func:`scheduler_from_name` does that for the names the CLI accepts (``--scheduler``), with the settings
diffusers recommends for guided sampling (second-order multistep solvers), and optionally another timestep
spacing. ``benchmarks/fast_sampling.py`` measures them at 20 steps against DDIM at 50 (docs/performance.md §2).
"""

from __future__ import annotations

from typing import Any

# name -> (diffusers class name, settings over the checkpoint's config). Class names, not classes, so that the
# CLI can list the choices without importing diffusers. Order 2 is what diffusers advises for guided sampling
# (order 3 is for unconditional); DPM-Solver++ (data prediction) is the variant that stays stable under guidance.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # The stochastic variant: fresh noise each step (from the call's generator), more diverse samples at few steps.
    "sde-dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
}
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def scheduler_from_name(name: str, config: dict, timestep_spacing: str | None = None):
    """A scheduler of type ``name`` on the noise schedule (betas, prediction type, steps offset) of ``config``.

    Args:
        name: one of :data:`SCHEDULERS`.
        config: a scheduler config, e.g. ``pipe.scheduler.config``.
        timestep_spacing: ``"leading"``, ``"linspace"`` or ``"trailing"``; default: the config's own.

    Returns:
        `diffusers.SchedulerMixin`: a new scheduler; ``config`` is not changed.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}; got {name!r}")
    if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {list(TIMESTEP_SPACINGS)} or None; got {timestep_spacing!r}")
    import diffusers

    class_name, settings = SCHEDULERS[name]
    # diffusers hands another class only the keys a config set explicitly (the rest are in its
    # `_use_default_values` and take the new class's defaults: DPM-Solver's spacing is "linspace", DDIM's
    # "leading"), so the spacing and offset the checkpoint samples with are passed on by name.
    overrides = {key: config[key] for key in ("timestep_spacing", "steps_offset") if key in config}
    overrides.update(settings)
    if timestep_spacing is not None:
        overrides["timestep_spacing"] = timestep_spacing
    return getattr(diffusers, class_name).from_config(config, **overrides)
