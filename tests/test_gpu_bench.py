"""bench/gpu.sh rehearsed on the CPU, where TensorFlow, tensorflow_datasets and ml_collections cannot be imported.

The GPU host has none of the three. The rehearsal runs the whole script at tiny sizes
(REHEARSE=1: image 67, per-device batch 2, 1 step x 2 rounds) through its real workers;
the checks are on the JSON lines and files it leaves under OUT.
"""

import gzip
import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import REPO, env_without, optional

# issue 20, item 2: what every line carries (this list is the test's own, not the bench's)
FIELDS = (
    "model",
    "dtype",
    "per_device_batch",
    "grid_per_device_batch",
    "input",
    "framework",
    "impl",
    "img_per_s",
    "step_ms",
    "step_ms_rounds",
    "tflop_per_s",
    "mfu",
    "peak_device_mb",
    "ratio_vs_torch",
    "jax_version",
    "jaxlib_version",
    "flax_version",
    "optax_version",
    "torch_version",
    "cuda_version",
    "driver_version",
    "device_kind",
)
GPU_HOST_LACKS = ("tensorflow", "tensorflow_datasets", "ml_collections")


def _env(tmp_path, blocked, **settings):
    env = env_without(tmp_path, blocked, **{key: str(value) for key, value in settings.items()})
    env.pop("XLA_FLAGS", None)  # XLA's own flags, as on the GPU host; one CPU device, as it has one GPU
    env["PYTHON"] = sys.executable
    env["REHEARSE"] = "1"
    env["OUT"] = str(tmp_path / "out")
    return env


def _rehearse(tmp_path, blocked, timeout=900, **settings):
    env = _env(tmp_path, blocked, **settings)
    probe = "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(n) for n in sys.argv[1:]))"
    assert subprocess.run([sys.executable, "-c", probe, *blocked], env=env).returncode == 0  # not found there
    for name in blocked:
        imported = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert f"ModuleNotFoundError: No module named '{name}'" in imported.stderr
    result = subprocess.run(
        ["bash", os.path.join(REPO, "bench", "gpu.sh")], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    with open(tmp_path / "out" / "gpu.jsonl") as handle:
        written = [json.loads(line) for line in handle]
    assert printed == written and printed
    for line in printed:
        missing = [field for field in FIELDS if field not in line]
        assert not missing, (line["cell"], missing)
    return printed, tmp_path / "out", result


def _grid(lines, framework):
    cells = {}
    for line in lines:
        if line["framework"] == framework and not line.get("lever"):
            key = (line["impl"], line["model"], line["dtype"], line["input"])
            cells.setdefault(key, set()).add(line["grid_per_device_batch"])
    return cells


@pytest.mark.slow
def test_the_whole_rehearsal_runs_without_tensorflow_and_every_line_is_complete(tmp_path):
    lines, out, _ = _rehearse(tmp_path, GPU_HOST_LACKS)
    _check_the_whole_rehearsal(lines, out)


def _check_the_whole_rehearsal(lines, out):
    assert {line["status"] for line in lines} == {"ok"}, [(x["cell"], x["status_note"]) for x in lines]
    # the grid: both variants x both dtypes x both inputs for JAX, eager and compile for PyTorch,
    # each at the three grid batches, run at per-device batch 2
    jax_grid, torch_grid = _grid(lines, "jax"), _grid(lines, "torch")
    assert set(jax_grid) == {
        ("pmap", model, dtype, input_)
        for model in ("paper", "torchvision")
        for dtype in ("float32", "bfloat16")
        for input_ in ("host_crop", "device_crop")
    }
    assert set(torch_grid) == {
        (impl, model, dtype, "host_crop")
        for impl in ("eager", "compile")
        for model in ("paper", "torchvision")
        for dtype in ("float32", "bfloat16")
    }
    assert all(batches == {128, 256, 512} for batches in [*jax_grid.values(), *torch_grid.values()])
    assert {line["per_device_batch"] for line in lines} == {2}
    for line in lines:
        assert line["img_per_s"] > 0 and line["step_ms"] > 0, line["cell"]
        assert len(line["step_ms_rounds"]) == line["rounds_run"] >= 1
        expected = line["img_per_s"] * line["train_gflop_per_image"] / 1000
        assert abs(line["tflop_per_s"] - expected) <= 1e-3 * expected + 1e-4
        # the CPU: no bf16 peak, no device memory statistics, no CUDA, no NVIDIA driver; each says why
        assert line["device_kind"] == "cpu" and line["mfu"] is None and "no dense bf16 peak" in line["mfu_note"]
        assert line["peak_device_mb"] is None and line["peak_device_mb_note"]
        assert line["cuda_version"] is None and line["driver_version"] is None
        assert any(n.startswith("cuda_version") for n in line["version_notes"])
        assert any(n.startswith("driver_version") for n in line["version_notes"])
        assert line["torch_version"] and line["jax_version"] and line["flax_version"] and line["optax_version"]
        assert line["ratio_vs_torch"] is not None and line["ratio_vs_torch"] > 0, line["cell"]
    jax_lines = [line for line in lines if line["framework"] == "jax"]
    assert all(line["compiled_mb"] > 0 and line["backend_compiles"] >= 1 for line in jax_lines)
    torch_lines = [line for line in lines if line["framework"] == "torch"]
    assert all(line["torch_importable"] for line in torch_lines)
    assert {line["torch_compile_backend"] for line in torch_lines} == {None, "aot_eager"}
    best = {}  # PyTorch's best of eager and compile at each variant, dtype and batch is its 1.0
    for line in torch_lines:
        key = (line["model"], line["dtype"], line["grid_per_device_batch"])
        best[key] = max(best.get(key, 0), line["ratio_vs_torch"])
    assert set(best.values()) == {1.0}
    levers = {line["lever"]: line for line in lines if line.get("lever")}
    assert set(levers) == {
        "baseline",
        "group_conv=split",
        "prng_impl=rbg",
        "prng_impl=unsafe_rbg",
        "lrn_precision=high",
        "lrn_precision=default",
        "backward_impl=fast",
    }
    assert all(line["speedup_vs_baseline"] > 0 for line in levers.values())
    assert levers["group_conv=split"]["group_conv"] == "split"
    assert levers["backward_impl=fast"]["backward_impl_resolved"] == "fast"
    # the profile: a summary of ops the script wrote itself, and a trace small enough to come back
    summary = (out / "profile_summary.txt").read_text()
    assert "profile of jax/" in summary and "top 25 ops by summed device time" in summary
    op_rows = [row for row in summary.splitlines() if row[:4].strip().isdigit()]
    assert len(op_rows) >= 10
    with gzip.open(out / "profile_trace.json.gz", "rt") as handle:
        assert json.load(handle)["traceEvents"]
    # what a device run returns: at most 8 files, all at the top of OUT
    assert len(os.listdir(out)) <= 8 and all((out / name).is_file() for name in os.listdir(out))
    assert "| jax/paper/bfloat16/b256/host_crop |" in (out / "gpu_summary.md").read_text()


def test_without_torch_the_lines_say_so(tmp_path):
    """torch blocked too; only the PyTorch eager stage selected (the others are named as not selected)."""
    lines, _, _ = _rehearse(tmp_path, (*GPU_HOST_LACKS, "torch"), STAGES="torch-eager-bfloat16")
    eager = [line for line in lines if line["stage"] == "torch-eager-bfloat16"]
    assert len(eager) == 6
    assert all(line["status"] == "unavailable" and "torch is not importable" in line["status_note"] for line in eager)
    assert all(line["torch_importable"] is False for line in eager)
    others = [line for line in lines if line["stage"] != "torch-eager-bfloat16"]
    assert others and all(line["status"] == "skipped" and "not selected" in line["status_note"] for line in others)


def test_a_budget_too_short_for_anything_skips_every_cell_and_says_why(tmp_path):
    lines, out, _ = _rehearse(tmp_path, GPU_HOST_LACKS, BUDGET_S=0)
    assert lines and all(line["status"] == "skipped" and line["status_note"].startswith("budget") for line in lines)
    # the driver's own check: no worker was started
    assert all("the stage's first cell needs" in line["status_note"] for line in lines)
    assert (out / "gpu.log").read_text() == ""
    assert all(line["img_per_s"] is None and line["ratio_vs_torch"] is None for line in lines)
    assert (out / "profile_summary.txt").read_text() == "no profile: no JAX grid cell ran in this run\n"


@pytest.mark.parametrize("stage", ["jax-paper-bfloat16", "torch-eager-bfloat16"])
def test_a_worker_whose_time_is_up_starts_no_cell(tmp_path, stage):
    """The worker's own check (the driver's is above): each cell is skipped with the time it would need."""
    if stage.startswith("torch"):
        optional("torch")  # without torch the worker reports its cells unavailable before any budget check
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import gpu

    settings = gpu.Settings.from_env({"REHEARSE": "1", "OUT": str(tmp_path)})
    planned = next(s for s in gpu.plan(settings) if s.name == stage)
    spec = {
        "stage": stage,
        "kind": planned.kind,
        "impl": planned.impl,
        "cells": planned.cells,
        "settings": settings.worker_settings(),
        "priors": {"cell_setup_s": 0.5, "compile_s": 8.0, "step_s_per_image": 1e-5, "model_compile_s": 0.0},
        "deadline_unix": time.time() - 1,  # just past
        "reserve_s": 0.0,
        "lines_path": str(tmp_path / "lines.jsonl"),
        "out_dir": str(tmp_path),
        "trace_dir": str(tmp_path / "trace"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = _env(tmp_path, GPU_HOST_LACKS)
    worker = [sys.executable, os.path.join(REPO, "bench", "gpu_worker.py"), str(tmp_path / "spec.json")]
    subprocess.run(worker, env=env, check=True, capture_output=True, timeout=300)
    lines = [json.loads(line) for line in (tmp_path / "lines.jsonl").read_text().splitlines()]
    assert [line["cell"] for line in lines] == [cell["cell"] for cell in planned.cells]
    for line in lines:
        needs = re.fullmatch(r"budget: -\d+ s left, the cell needs ~(\d+)", line["status_note"])
        assert line["status"] == "skipped" and needs and int(needs[1]) >= 8, line["status_note"]  # the 8 s prior


def test_the_summary_counts_device_op_lanes_once_and_falls_back_to_cpu_thunks():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import trace_summary

    def meta(pid, name, tid=None, thread=None):
        events = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}]
        if tid is not None:
            events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": thread}})
        return events

    ops_lane = [{"ph": "X", "pid": 1, "tid": 2, "dur": d, "name": n} for n, d in (("fusion.1", 30), ("conv.4", 50))]
    stream = [{"ph": "X", "pid": 1, "tid": 3, "dur": 40, "name": "sm90_kernel", "args": {"hlo_op": "conv.4"}}]
    host = [{"ph": "X", "pid": 9, "tid": 1, "dur": 500, "name": "fusion.1", "args": {"hlo_op": "fusion.1"}}]
    gpu = {
        "traceEvents": meta(1, "/device:GPU:0", 2, "XLA Ops")
        + meta(1, "/device:GPU:0", 3, "Stream #7(Compute)")
        + meta(9, "/host:CPU", 1, "python")
        + ops_lane
        + stream
        + host
    }
    events, lanes = trace_summary.op_events(gpu)
    assert lanes == "device XLA Ops lanes" and sorted(e["dur"] for e in events) == [30, 50]
    text = trace_summary.summarize(gpu, steps=2)
    assert "0.080 ms summed, 0.040 ms per step" in text and "conv.4" in text.splitlines()[4]
    without_ops_lane = {"traceEvents": meta(1, "/device:GPU:0", 3, "Stream #7") + stream + host}
    events, lanes = trace_summary.op_events(without_ops_lane)
    assert lanes.startswith("device stream lanes") and [e["dur"] for e in events] == [40]
    untagged = {"ph": "X", "pid": 9, "dur": 7, "name": "ThreadpoolListener::Record"}
    cpu = {"traceEvents": meta(9, "/host:CPU", 1, "tf_XLAEigen") + host + [untagged]}
    events, lanes = trace_summary.op_events(cpu)
    assert lanes.startswith("host lanes") and [e["dur"] for e in events] == [500]


def test_the_benchs_pytorch_paper_network_is_the_papers(tmp_path):
    """torchvision has no paper variant: the bench's own (LRN, groups=2) computes the JAX model's logits."""
    import jax
    import numpy as np

    torch = optional("torch")
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import train_step

    from alexnet_jax.model.alexnet import AlexNet

    net = AlexNet(variant="paper", num_classes=10, dropout_rate=0.0, init_scheme="modern", input_scale="raw")
    pixels = np.random.default_rng(0).uniform(-120, 130, (2, 67, 67, 3)).astype(np.float32)  # centred raw input
    params = jax.jit(lambda: net.init(jax.random.key(0), pixels, train=False))()["params"]
    logits = np.asarray(jax.jit(lambda p, x: net.apply({"params": p}, x, train=False))(params, pixels))
    network = train_step.torch_alexnet(torch.nn, "paper", 10).eval()
    layers = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert [getattr(m, "groups", 1) for m in layers[:5]] == [1, 2, 1, 2, 2]
    assert sum(p.numel() for p in network.parameters()) == 60_965_224 - 990 * 4097  # the paper's, 10 classes
    with torch.no_grad():
        for layer, name in zip(layers, ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]):
            kernel = np.asarray(params[name]["kernel"])
            weight = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
            layer.weight.copy_(torch.from_numpy(np.array(weight)))
            layer.bias.copy_(torch.from_numpy(np.array(params[name]["bias"])))
        expected = network(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()
    spread = expected.std(axis=0).mean()
    assert spread > 0
    np.testing.assert_allclose(logits, expected, rtol=2e-4, atol=2e-4 * spread)


def test_mfu_and_the_ratio_to_pytorch_from_the_lines_of_a_gpu_run():
    """enrich() on lines as an H200 run would write them: MFU by the chip's peak, PyTorch's best as 1.0."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import gpu

    settings = gpu.Settings.from_env({"OUT": "unused"})
    assert gpu.dense_bf16_peak_tflops("NVIDIA H200") == 989.0
    assert gpu.dense_bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.dense_bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.dense_bf16_peak_tflops("Some Future Chip") is None

    def line(framework, impl, img_per_s, device_kind="NVIDIA H200", dtype="bfloat16", status="ok"):
        return {
            "cell": f"{framework}/{impl}/{img_per_s}",
            "framework": framework,
            "impl": impl,
            "model": "torchvision",
            "dtype": dtype,
            "per_device_batch": 256,
            "grid_per_device_batch": 256,
            "input": "host_crop",
            "status": status,
            "devices": 1,
            "device_kind": device_kind,
            "img_per_s": img_per_s if status == "ok" else None,
            "img_per_s_per_device": img_per_s if status == "ok" else None,
        }

    lines = gpu.enrich(
        [
            line("jax", "pmap", 30_000.0),
            line("torch", "eager", 20_000.0),
            line("torch", "compile", 25_000.0),
            line("jax", "pmap", 1_000.0, device_kind="Some Future Chip"),
            line("jax", "pmap", None, dtype="float32", status="skipped"),
        ],
        settings,
    )
    jax_line, eager, compiled, unknown, skipped = lines
    flops = jax_line["train_gflop_per_image"] * 1e9
    assert abs(jax_line["tflop_per_s"] - 30_000 * flops / 1e12) < 1e-3
    assert abs(jax_line["mfu"] - jax_line["tflop_per_s"] / 989.0) < 1e-4
    assert jax_line["ratio_vs_torch"] == 1.2 and jax_line["torch_best_impl"] == "compile"
    assert (eager["ratio_vs_torch"], compiled["ratio_vs_torch"]) == (0.8, 1.0)
    assert unknown["mfu"] is None and "no dense bf16 peak known" in unknown["mfu_note"]
    assert skipped["ratio_vs_torch"] is None and skipped["tflop_per_s"] is None and skipped["mfu"] is None
    assert "no PyTorch line ran" not in skipped["ratio_vs_torch_note"]  # it did not run itself
    for enriched in lines:
        assert all(field in enriched for field in FIELDS)
