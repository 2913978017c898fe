"""XLA flags, set in one place before JAX initialises its backend.

XLA reads XLA_FLAGS once, when the first backend starts, so `configure` must run
before anything touches a device (launch.py and bench/train_step.py call it
first). It appends to XLA_FLAGS, so flags a user sets there win: XLA keeps the
last value it sees for a flag, and user flags are moved after ours.

The CPU presets are measured alternatives for XLA:CPU (see the README's
Performance section); they name only CPU flags, which the GPU and TPU backends ignore.
"""

from __future__ import annotations

import os

# Measured candidates for XLA:CPU. "default" is what launch.py and the bench use.
CPU_PRESET_FLAGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "default": (),
    "onednn": ("--xla_cpu_use_onednn=true",),
    "xnnpack": ("--xla_cpu_use_xnnpack=true",),
    "xnn_fusion": ("--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",),
    "ynn_conv": ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot",),
}
CPU_PRESETS = tuple(CPU_PRESET_FLAGS)


def configure(cpu_preset: str = "default") -> str:
    """Add the preset's flags to XLA_FLAGS (before any user flags); returns the resulting XLA_FLAGS."""
    if cpu_preset not in CPU_PRESET_FLAGS:
        raise ValueError(f"unknown XLA:CPU preset {cpu_preset!r}; expected one of {CPU_PRESETS}")
    ours = list(CPU_PRESET_FLAGS[cpu_preset])
    user = os.environ.get("XLA_FLAGS", "").split()
    ours = [flag for flag in ours if flag not in user]
    combined = " ".join(ours + user)
    if combined:
        os.environ["XLA_FLAGS"] = combined
    return combined
