"""Which platform a run trains on, and a refusal to train on the CPU by accident.

JAX falls back to the CPU with no more than a log warning when its GPU or TPU plugin is missing, so
a machine with eight GPUs would train for weeks on its CPU cores. launch.py therefore selects the
platform the config asks for before any JAX backend starts (`select_platform`), and once the
devices are known it stops in one line if the machine has an accelerator that JAX did not start
(`check_devices`): before any data is read, naming the install that fixes it.

A run on the CPU of such a machine is deliberate when config.platform='cpu', or when JAX's own
switch (JAX_PLATFORMS, or jax.config's jax_platforms) names the platforms: JAX then fails loudly
itself if a named platform cannot start, so CPU devices there mean the list allowed only the CPU.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping

import jax

from alexnet_jax.errors import UserError

PLATFORMS = ("auto", "cpu", "gpu", "tpu")  # config.platform; auto = what JAX starts, refused if that is the CPU
INSTALLS = {"gpu": "requirements-gpu.txt", "tpu": "requirements-tpu.txt"}
_NAMES = {"gpu": "an NVIDIA GPU", "tpu": "a TPU"}
_PLUGINS = {"gpu": ("jax-cuda13-plugin", "jax-cuda12-plugin"), "tpu": ("libtpu",)}

# Google's PCI vendor id and the device ids of its TPU chips (v3 .. 8t), as JAX 0.11.2 lists them
# (jax/_src/hardware_utils.py); Google's other PCI devices (gVNIC, NVMe disks) are not TPUs.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076", "0x0083", "0x007c"}


@dataclasses.dataclass(frozen=True)
class Sighting:
    """An accelerator seen on this machine, whatever JAX made of it."""

    kind: str  # "gpu" or "tpu"
    evidence: str  # what showed it, for the message: a device file, nvidia-smi's line, a variable


def select_platform(platform: str) -> None:
    """Point JAX at config.platform; call before any JAX backend starts (before jax.distributed).

    'cpu' makes JAX start the CPU alone, even where a GPU or TPU plugin is installed. 'gpu', 'tpu'
    and 'auto' leave JAX's own choice be (on a TPU VM JAX itself sets jax_platforms='tpu,cpu');
    check_devices refuses a run that did not get the platform it asked for.
    """
    if platform not in PLATFORMS:
        listed = " or ".join(repr(name) for name in PLATFORMS)
        raise UserError(f"config.platform={platform!r} is unknown; use {listed}")
    if platform == "cpu":
        jax.config.update("jax_platforms", "cpu")


def check_devices(platform: str, found: str | None = None, sighting: Sighting | None = None) -> None:
    """Refuse, in one line, a run whose devices are not what config.platform asks for.

    found: the platform of JAX's devices ('cpu', 'gpu', 'tpu'; default: jax.devices()'s).
    sighting: the accelerator on this machine (default: find_accelerator(), looked for only when
    JAX found the CPU alone and neither the config nor JAX_PLATFORMS chose it).
    """
    found = found or jax.devices()[0].platform
    if platform in INSTALLS and found != platform:
        chosen = jax.config.jax_platforms
        remedy = f"JAX_PLATFORMS={chosen!r} rules it out: unset it" if chosen else _remedy(platform)
        raise UserError(
            f"config.platform={platform!r} but JAX found only {found.upper()} devices: {remedy}, "
            "or use --config.platform=auto to train on what JAX finds"
        )
    if platform != "auto" or found != "cpu" or jax.config.jax_platforms:
        return
    sighting = sighting or find_accelerator()
    if sighting is not None:
        raise UserError(
            f"this machine has {_NAMES[sighting.kind]} ({sighting.evidence}) but JAX found only CPU devices, so "
            f"training would run on the CPU: {_remedy(sighting.kind)}, or train on the CPU on purpose with "
            "--config.platform=cpu"
        )


def _remedy(kind: str) -> str:
    """What makes JAX start `kind`: the install (in a Python 3.12+ environment), or a look at why it did not."""
    plugin = installed_plugin(kind)
    if plugin is not None:
        return f"JAX's plugin ({plugin}) is installed but started no device; JAX's warning above says why"
    if sys.version_info < (3, 12):
        return f"make a Python 3.12+ environment (jax 0.11 needs it) and pip install -r {INSTALLS[kind]} there"
    return f"pip install -r {INSTALLS[kind]}"


def installed_plugin(kind: str) -> str | None:
    """'NAME VERSION' of JAX's plugin for `kind` ('gpu', 'tpu') where one is installed, else None."""
    for name in _PLUGINS[kind]:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def find_accelerator(
    environ: Mapping[str, str] | None = None, dev: str = "/dev", pci: str = "/sys/bus/pci/devices"
) -> Sighting | None:
    """An NVIDIA GPU or a TPU on this machine: device files, nvidia-smi, PCI ids, the Cloud TPU environment.

    Read without JAX, so it sees what JAX could not start. environ, dev and pci stand in for the
    machine's in tests.
    """
    environ = os.environ if environ is None else environ
    return _nvidia_gpu(environ, dev) or _tpu(environ, dev, pci)


def _nvidia_gpu(environ: Mapping[str, str], dev: str) -> Sighting | None:
    files = sorted(glob.glob(os.path.join(dev, "nvidia[0-9]*")))
    if files:
        return Sighting("gpu", files[0])
    smi = shutil.which("nvidia-smi", path=environ.get("PATH", os.defpath))
    if smi is None:
        return None
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, env=dict(environ)).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # a driver that does not answer shows no GPU that JAX could use either
    gpus = [line.strip() for line in listing.splitlines() if line.startswith("GPU ")]
    return Sighting("gpu", f"nvidia-smi -L: {gpus[0].split(' (UUID')[0]}") if gpus else None


def _tpu(environ: Mapping[str, str], dev: str, pci: str) -> Sighting | None:
    files = sorted(glob.glob(os.path.join(dev, "accel[0-9]*")))  # TPU v2-v5e; not Linux's /dev/accel/ folder
    if files:
        return Sighting("tpu", files[0])
    for vendor_file in sorted(glob.glob(os.path.join(pci, "*", "vendor"))):  # v5p, v6e and later (vfio)
        device_file = os.path.join(os.path.dirname(vendor_file), "device")
        if _read(vendor_file) == _GOOGLE_PCI_VENDOR and _read(device_file) in _TPU_PCI_DEVICES:
            return Sighting("tpu", f"PCI device {os.path.basename(os.path.dirname(vendor_file))}")
    if environ.get("TPU_ACCELERATOR_TYPE"):  # set on GKE TPU nodes and by queued resources
        return Sighting("tpu", f"TPU_ACCELERATOR_TYPE={environ['TPU_ACCELERATOR_TYPE']}")
    return None


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return ""
