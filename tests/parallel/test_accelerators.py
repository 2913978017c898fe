"""No training on the CPU by accident: the accelerator seen on the machine, config.platform, launch.py's refusal."""

import importlib.util
import os
import subprocess

import jax
import pytest
from conftest import NARROW_FC, child_env, launch_command

from alexnet_jax.errors import UserError
from alexnet_jax.parallel import accelerators
from alexnet_jax.parallel.accelerators import Sighting

H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5a3c9e1f-0000-0000-0000-000000000000)"


def fake_nvidia_smi(folder, listing=H100):
    """A folder holding an `nvidia-smi` that lists `listing` for -L, as the real one on a GPU machine."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f'#!/bin/sh\n[ "$1" = -L ] && echo "{listing}"\n')
    script.chmod(0o755)
    return str(folder)


@pytest.fixture
def jax_platforms_unset():
    """jax_platforms as a user's shell leaves it (no JAX_PLATFORMS); restored after the test."""
    saved = jax.config.jax_platforms
    jax.config.update("jax_platforms", None)
    yield
    jax.config.update("jax_platforms", saved)


def test_an_nvidia_device_file_or_nvidia_smi_shows_a_gpu(tmp_path):
    dev, bare = tmp_path / "dev", {"PATH": str(tmp_path / "empty")}
    dev.mkdir()
    (dev / "nvidiactl").touch()  # the driver's control file alone is no GPU
    assert accelerators.find_accelerator(bare, dev=str(dev), pci=str(tmp_path)) is None
    (dev / "nvidia3").touch()
    assert accelerators.find_accelerator(bare, dev=str(dev), pci=str(tmp_path)) == Sighting("gpu", str(dev / "nvidia3"))
    found = accelerators.find_accelerator({"PATH": fake_nvidia_smi(tmp_path / "bin")}, dev=str(tmp_path), pci="")
    assert found == Sighting("gpu", "nvidia-smi -L: GPU 0: NVIDIA H100 80GB HBM3")
    failing = fake_nvidia_smi(tmp_path / "broken", listing="NVIDIA-SMI has failed: no driver")
    assert accelerators.find_accelerator({"PATH": failing}, dev=str(tmp_path), pci="") is None


def test_tpu_device_files_pci_ids_or_the_gke_environment_show_a_tpu(tmp_path):
    dev, pci, bare = tmp_path / "dev", tmp_path / "pci", {"PATH": ""}
    (dev / "accel").mkdir(parents=True)  # Linux's compute-accelerator folder (an NPU, say) is no TPU
    for address, vendor, device in [("0000:00:04.0", "0x1ae0", "0x0042"), ("0000:00:05.0", "0x8086", "0x0062")]:
        (pci / address).mkdir(parents=True)  # Google's gVNIC, and another vendor's device with a TPU's id
        (pci / address / "vendor").write_text(vendor + "\n")
        (pci / address / "device").write_text(device + "\n")
    assert accelerators.find_accelerator(bare, dev=str(dev), pci=str(pci)) is None
    assert accelerators.find_accelerator({"TPU_ACCELERATOR_TYPE": "v5p-8"}, dev=str(dev), pci=str(pci)) == Sighting(
        "tpu", "TPU_ACCELERATOR_TYPE=v5p-8"
    )
    (pci / "0000:00:06.0").mkdir()
    (pci / "0000:00:06.0" / "vendor").write_text("0x1ae0\n")
    (pci / "0000:00:06.0" / "device").write_text("0x006f\n")  # a TPU v6e behind vfio
    assert accelerators.find_accelerator(bare, dev=str(dev), pci=str(pci)) == Sighting("tpu", "PCI device 0000:00:06.0")
    (dev / "accel0").touch()
    assert accelerators.find_accelerator(bare, dev=str(dev), pci=str(pci)) == Sighting("tpu", str(dev / "accel0"))


@pytest.mark.usefixtures("jax_platforms_unset")
def test_a_cpu_run_on_an_accelerator_machine_is_refused_unless_chosen():
    gpu = Sighting("gpu", "nvidia-smi -L: GPU 0: NVIDIA H100 80GB HBM3")
    if accelerators.installed_plugin("gpu") is None:  # what a CPU install on a GPU machine hears
        with pytest.raises(UserError, match=r"has an NVIDIA GPU \(nvidia-smi -L: GPU 0: .*requirements-gpu\.txt"):
            accelerators.check_devices("auto", found="cpu", sighting=gpu)
    with pytest.raises(UserError, match=r"a TPU \(/dev/accel0\).*--config\.platform=cpu"):
        accelerators.check_devices("auto", found="cpu", sighting=Sighting("tpu", "/dev/accel0"))
    accelerators.check_devices("cpu", found="cpu", sighting=gpu)  # on purpose
    accelerators.check_devices("auto", found="gpu", sighting=gpu)
    accelerators.check_devices("auto", found="cpu", sighting=None)  # a CPU machine: nothing else to train on
    with pytest.raises(UserError, match=r"config.platform='tpu' but JAX found only CPU devices"):
        accelerators.check_devices("tpu", found="cpu")
    accelerators.check_devices("gpu", found="gpu")
    jax.config.update("jax_platforms", "cpu")  # JAX_PLATFORMS=cpu, as the suite's child processes set it
    accelerators.check_devices("auto", found="cpu", sighting=gpu)
    with pytest.raises(UserError, match=r"config.platform='gpu' .*JAX_PLATFORMS='cpu' rules it out: unset it"):
        accelerators.check_devices("gpu", found="cpu")


def test_select_platform_points_jax_at_the_config_and_refuses_unknown_names():
    saved = jax.config.jax_platforms
    try:
        accelerators.select_platform("cpu")
        assert jax.config.jax_platforms == "cpu"
        jax.config.update("jax_platforms", "tpu,cpu")  # as JAX sets it on a TPU VM
        accelerators.select_platform("tpu")
        assert jax.config.jax_platforms == "tpu,cpu"
        with pytest.raises(UserError, match="config.platform='cuda' is unknown; use 'auto' or 'cpu'"):
            accelerators.select_platform("cuda")
    finally:
        jax.config.update("jax_platforms", saved)


ACCELERATOR_PLUGIN = any(importlib.util.find_spec(name) for name in ("jax_plugins", "libtpu"))


@pytest.mark.skipif(ACCELERATOR_PLUGIN, reason="a GPU or TPU plugin is installed: JAX would start the real device")
def test_launch_on_a_gpu_machine_with_a_cpu_jax_stops_in_one_line_before_any_data(tmp_path):
    # A user's shell: no JAX_PLATFORMS; nvidia-smi on the PATH lists a GPU.
    env = child_env(8, PATH=f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    env.pop("JAX_PLATFORMS")
    runs = {
        "auto": ([], "has an NVIDIA GPU (nvidia-smi -L: GPU 0: NVIDIA H100 80GB HBM3) but JAX found only CPU"),
        "gpu": (["--config.platform=gpu"], "config.platform='gpu' but JAX found only CPU devices"),
    }
    no_data = ["--config.dataset=image_folder", f"--config.data_dir={tmp_path / 'no_data'}"]  # refused, if read
    children = {
        name: subprocess.Popen(
            launch_command(tmp_path / name, *no_data, *overrides),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, (overrides, _) in runs.items()
    }
    try:
        for name, child in children.items():
            _, stderr = child.communicate(timeout=300)
            lines = stderr.decode().strip().splitlines()
            assert child.returncode == 2 and len(lines) == 1, (name, lines)
            assert runs[name][1] in lines[0] and "pip install -r requirements-gpu.txt" in lines[0], lines
            assert not (tmp_path / name).exists()  # stopped before the workdir, the data and TensorFlow
    finally:
        for child in children.values():
            child.kill()


@pytest.mark.slow  # about 40 CPU seconds (compiling for 8 devices): kept out of the quick lane
def test_a_deliberate_cpu_run_on_a_gpu_machine_trains_on_every_local_device(tmp_path, image_folder):
    # JAX_PLATFORMS=tpu stands in for the accelerator JAX would start: unless config.platform=cpu reaches
    # JAX before its first backend starts, JAX fails to start a TPU here.
    env = child_env(8, PATH=f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    env["JAX_PLATFORMS"] = "tpu"
    overrides = [
        "--config.platform=cpu",
        "--config.parallelism=data",  # one host: a mesh over all its devices, as pmap (the default) takes them
        "--config.dataset=image_folder",
        f"--config.data_dir={image_folder}",
        "--config.image_size=64",
        NARROW_FC,
        "--config.batch_size=8",
        "--config.num_train_steps=1",
        "--config.log_every_steps=1",
        "--config.num_classes=-1",
    ]
    result = subprocess.run(
        launch_command(tmp_path / "run", *overrides), env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 1; 8 local / 8 total devices (cpu)" in result.stdout
    assert "step 1/1" in result.stdout and "global batch 8" in result.stdout
