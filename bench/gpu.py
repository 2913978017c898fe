"""The accelerator benchmark: the whole grid, the GPU levers and a profile, in one command.

    OUT=results bash bench/gpu.sh            # on a GPU host (bench/gpu.sh runs this file)
    REHEARSE=1 OUT=/tmp/r bash bench/gpu.sh  # the same run on the CPU at tiny sizes (CI does this)
    python bench/gpu.py --estimate           # the planned run's time on an H200, from the priors below

The grid: both variants x float32/bfloat16 compute (float32 parameters) x per-device
batch 128/256/512 x two inputs (host_crop: uint8 224x224 crops and colour offsets, as
the host pipeline ships them; device_crop: uint8 256x256 packed images that the step
crops, flips and colours itself), for the project's pmap'ed train step; PyTorch eager
and torch.compile (channels_last, bf16 autocast for bfloat16) at each variant, dtype
and batch; the levers (model.GROUP_CONVS, steps.PRNG_IMPLS, model.LRN_PRECISIONS and
the hand-written backward) against their baseline; a jax.profiler trace of the best
configuration with a text summary of its top ops.

Each stage runs in a process of its own (bench/gpu_worker.py), one after another, so
JAX and PyTorch never share a process or run at the same time. This process starts
no JAX backend: it imports the model module only for its FLOP count, after the last
worker has ended. Nothing here imports TensorFlow or ml_collections.

Settings, from the environment (bench/gpu.sh passes them through):
  OUT            where the files go (required)
  REHEARSE=1     the whole run on the CPU at tiny sizes: image 67, packed 77, per-device
                 batch 2 for every grid cell, 1 step x 2 rounds and no warm-up, torch.compile with the
                 aot_eager backend (no C++ code generation on a 2-core machine)
  BUDGET_S       seconds the stages may take (default 460: with the final merge, within 8 minutes)
  STEPS, ROUNDS, WARMUP, IMAGE_SIZE, PROFILE_STEPS   (20, 3, 2, 224, 5)
  STAGES         a comma list of stage names to run (default: all; see STAGE_ORDER)
  TORCH_COMPILE_BACKEND   (inductor; aot_eager when rehearsing)

Budget: stages run in STAGE_ORDER, which is also the priority order; a stage starts
only if its start-up and its first cell fit in the time left, and inside a stage a
cell starts only if it fits (gpu_worker.py). Each cell runs at least one timed round;
further rounds run only while every remaining cell of the run still has time for its
first. So when time is short, rounds go first, then whole cells from the end of the
order: torch.compile float32, PyTorch eager float32, torchvision float32, paper
float32, the profile, the levers, torch.compile bfloat16, ... the paper variant in
bfloat16 last.

Files under OUT (at most 8, all at the top): gpu.jsonl (one line per cell, enriched:
what this prints), cells.jsonl (the workers' raw lines as they finish: survives a
killed run), gpu.log (every worker's stderr), gpu_summary.md (tables),
profile_summary.txt and profile_trace.json.gz.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)

GRID_BATCHES = (128, 256, 512)
INPUTS = ("host_crop", "device_crop")
VARIANTS = ("paper", "torchvision")
LEVER_CELL = ("paper", "bfloat16", 256)  # where the levers are timed: the paper's grouped convolutions and LRN
LEVERS = (
    ("group_conv", "split"),
    ("prng_impl", "rbg"),
    ("prng_impl", "unsafe_rbg"),
    ("lrn_precision", "high"),
    ("lrn_precision", "default"),
    ("backward_impl", "fast"),
)
# The settings of every grid cell. backward_impl is pinned to "lax", what "auto" resolves to on a
# GPU, so that the CPU rehearsal compiles the very programs the GPU will (and faster than "fast").
BASELINE = {"backward_impl": "lax", "group_conv": "grouped", "lrn_precision": "highest", "prng_impl": "threefry"}
# Run order = priority order (the last stages are dropped first when time is short).
STAGE_ORDER = (
    "jax-paper-bfloat16",
    "jax-torchvision-bfloat16",
    "torch-eager-bfloat16",
    "torch-compile-bfloat16",
    "jax-levers",
    "jax-profile",
    "jax-paper-float32",
    "jax-torchvision-float32",
    "torch-eager-float32",
    "torch-compile-float32",
)
# The fields every line carries (issue 20, item 2); null where a figure does not exist, with a *_note.
REQUIRED_FIELDS = (
    "cell",
    "status",
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
# Dense (not sparse) bfloat16 tensor-core peaks, TFLOP/s, by a substring of the device kind that
# JAX or PyTorch reports; the first match wins (so "H100 PCIe" before "H100"). Vendor datasheets.
DENSE_BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
# Priors for planning, on an H200 (seconds). Measured figures replace them inside a stage as
# soon as its first cell has run (gpu_worker.Estimates); `--estimate` adds them up.
PRIORS = {
    "start_s": {"jax": 6.0, "torch": 8.0},  # python, imports, backend/CUDA start
    "cell_setup_s": 0.5,  # copy the initial state (made once per process) and the batch onto the device
    "jax_compile_new_s": 8.0,  # an XLA:GPU train-step compile whose convolutions are new (autotuned)
    "jax_compile_seen_s": 4.0,  # one whose convolution shapes an earlier cell autotuned (device_crop, most levers)
    "jax_compile_cached_s": 2.0,  # a persistent compilation-cache hit (the levers' baseline, the profile)
    "torch_first_step_s": 2.0,  # cudnn.benchmark's search at a new batch size
    "torch_compile_s": 25.0,  # torch.compile (inductor) of one variant and dtype, batch dimension dynamic
    "profile_trace_s": 10.0,  # tracing, writing and summarising the trace
    "driver_s": 5.0,  # this process: versions, merging, files
    "mfu_assumed": 0.4,  # step time prior: the FLOP count at this share of the peak
    "peak_tflops": {"bfloat16": 989.0, "float32": 494.5},  # H200 dense bf16; TF32 (XLA's default f32) half that
}
MAX_FILE_BYTES = 15 * 2**20  # a device run returns files of at most 16 MiB
KILL_GRACE_S = 30  # a worker still running this long past the deadline is killed (a cell outran its estimate)


@dataclasses.dataclass
class Settings:
    out: str
    rehearse: bool
    budget_s: float
    steps: int
    rounds: int
    warmup: int
    image_size: int
    packed_side: int
    profile_steps: int
    stages: tuple[str, ...]
    torch_compile_backend: str
    python: str
    num_classes: int = 1000

    @classmethod
    def from_env(cls, env=None) -> Settings:
        env = os.environ if env is None else env
        rehearse = env.get("REHEARSE", "0") not in ("", "0")
        image_size = int(env.get("IMAGE_SIZE", 67 if rehearse else 224))
        stages = tuple(s for s in env.get("STAGES", "").split(",") if s) or STAGE_ORDER
        unknown = [s for s in stages if s not in STAGE_ORDER]
        if unknown:
            raise SystemExit(f"STAGES names unknown stages {unknown}; use some of {','.join(STAGE_ORDER)}")
        return cls(
            out=env.get("OUT", ""),
            rehearse=rehearse,
            budget_s=float(env.get("BUDGET_S", 1500 if rehearse else 460)),
            steps=int(env.get("STEPS", 1 if rehearse else 20)),
            rounds=int(env.get("ROUNDS", 2 if rehearse else 3)),
            warmup=int(env.get("WARMUP", 0 if rehearse else 2)),
            image_size=image_size,
            packed_side=int(round(image_size * 256 / 224)),
            profile_steps=int(env.get("PROFILE_STEPS", 2 if rehearse else 5)),
            stages=stages,
            torch_compile_backend=env.get("TORCH_COMPILE_BACKEND", "aot_eager" if rehearse else "inductor"),
            python=env.get("PYTHON") or sys.executable,
        )

    def per_device_batch(self, grid_batch: int) -> int:
        return 2 if self.rehearse else grid_batch

    def worker_settings(self) -> dict:
        return {
            "rehearse": self.rehearse,
            "steps": self.steps,
            "rounds": self.rounds,
            "warmup": self.warmup,
            "image_size": self.image_size,
            "packed_side": self.packed_side,
            "profile_steps": self.profile_steps,
            "num_classes": self.num_classes,
            "torch_compile_backend": self.torch_compile_backend,
            "max_file_bytes": MAX_FILE_BYTES,
        }


@dataclasses.dataclass
class Stage:
    name: str
    kind: str  # gpu_worker.RUNNERS: jax | levers | profile | torch
    framework: str
    cells: list[dict]
    impl: str = ""


def _cell(settings: Settings, framework: str, impl: str, model: str, dtype: str, grid_batch: int, input_: str, **extra):
    lever = extra.pop("lever", None)
    name = f"{framework if framework == 'jax' else 'torch-' + impl}/{model}/{dtype}/b{grid_batch}/{input_}"
    cell = {
        "cell": name + (f"/lever={lever}" if lever else ""),
        "framework": framework,
        "impl": impl,
        "model": model,
        "dtype": dtype,
        "param_dtype": "float32",
        "grid_per_device_batch": grid_batch,
        "per_device_batch": settings.per_device_batch(grid_batch),
        "input": input_,
        "packed_side": settings.packed_side if input_ == "device_crop" else None,
        "lever": lever,
    }
    if framework == "jax":
        cell.update(BASELINE, **extra)
    return cell


def plan(settings: Settings) -> list[Stage]:
    """The stages in STAGE_ORDER, each with its cells in the order it runs them."""
    stages = {}
    for dtype in ("bfloat16", "float32"):
        for model in VARIANTS:
            cells = [
                _cell(settings, "jax", "pmap", model, dtype, batch, input_)
                for batch in GRID_BATCHES  # ascending batch: the process's peak memory is each cell's own
                for input_ in INPUTS
            ]
            stages[f"jax-{model}-{dtype}"] = Stage(f"jax-{model}-{dtype}", "jax", "jax", cells)
        for impl in ("eager", "compile"):
            cells = [
                _cell(settings, "torch", impl, model, dtype, batch, "host_crop")
                for model in VARIANTS
                for batch in GRID_BATCHES
            ]
            stages[f"torch-{impl}-{dtype}"] = Stage(f"torch-{impl}-{dtype}", "torch", "torch", cells, impl)
    model, dtype, batch = LEVER_CELL
    levers = [_cell(settings, "jax", "pmap", model, dtype, batch, "host_crop", lever="baseline")]
    levers += [
        _cell(settings, "jax", "pmap", model, dtype, batch, "host_crop", lever=f"{key}={value}", **{key: value})
        for key, value in LEVERS
    ]
    stages["jax-levers"] = Stage("jax-levers", "levers", "jax", levers)
    stages["jax-profile"] = Stage("jax-profile", "profile", "jax", [])  # its cell is the run's best
    return [stages[name] for name in STAGE_ORDER]


# --- time ---------------------------------------------------------------------------------------


def _flops_per_image(model: str, image_size: int, num_classes: int) -> float:
    from alexnet_jax.model import alexnet as model_lib

    return model_lib.train_flops_per_image(model, image_size, num_classes)


def step_prior_s_per_image(cell: dict, settings: Settings) -> float:
    peak = PRIORS["peak_tflops"][cell["dtype"]] * 1e12 * PRIORS["mfu_assumed"]
    return _flops_per_image(cell["model"], settings.image_size, settings.num_classes) / peak


def cell_compile_prior_s(stage: Stage, cell: dict) -> float:
    if stage.framework == "torch":
        return PRIORS["torch_first_step_s"]
    if cell["lever"] == "baseline" or stage.kind == "profile":
        return PRIORS["jax_compile_cached_s"]
    new_shapes = cell["input"] == "host_crop" and cell["lever"] in (None, "group_conv=split", "backward_impl=fast")
    return PRIORS["jax_compile_new_s"] if new_shapes else PRIORS["jax_compile_seen_s"]


def cell_prior_s(stage: Stage, cell: dict, settings: Settings, rounds: int) -> float:
    """Setup + compile (+ a torch.compile when the variant or dtype changes) + warm-up and `rounds` rounds."""
    steps = settings.warmup + rounds * settings.steps
    steps_s = steps * cell["per_device_batch"] * step_prior_s_per_image(cell, settings)
    return PRIORS["cell_setup_s"] + cell_compile_prior_s(stage, cell) + steps_s


def _planned_cells(stage: Stage, settings: Settings) -> list[dict]:
    """The stage's cells; for the profile, the configuration expected to be best (torchvision, bf16, 512)."""
    if stage.cells:
        return stage.cells
    return [_cell(settings, "jax", "pmap", "torchvision", "bfloat16", 512, "host_crop")]


def stage_first_cell_s(stage: Stage, settings: Settings) -> float:
    """The least a stage needs: its start-up and its first cell with one round."""
    cell = _planned_cells(stage, settings)[0]
    needed = PRIORS["start_s"][stage.framework] + cell_prior_s(stage, cell, settings, 1)
    if stage.impl == "compile":
        needed += PRIORS["torch_compile_s"]
    if stage.kind == "profile":
        needed += PRIORS["profile_trace_s"]
    return needed


def stage_prior_s(stage: Stage, settings: Settings, rounds: int) -> dict:
    start = PRIORS["start_s"][stage.framework]
    cells = _planned_cells(stage, settings)
    compiles = sum(cell_compile_prior_s(stage, c) for c in cells)
    if stage.impl == "compile":
        compiles += PRIORS["torch_compile_s"] * len({(c["model"], c["dtype"]) for c in cells})
    steps_s = sum(cell_prior_s(stage, c, settings, rounds) - cell_compile_prior_s(stage, c) for c in cells)
    if stage.kind == "levers":  # each lever's rounds alternate with as many of the baseline's
        steps_s += sum(
            cell_prior_s(stage, cells[0], settings, rounds) - cell_compile_prior_s(stage, cells[0]) for _ in cells[1:]
        )
    if stage.kind == "profile":
        steps_s += PRIORS["profile_trace_s"]
    return {"start_s": start, "compile_s": compiles, "steps_s": steps_s, "total_s": start + compiles + steps_s}


def estimate_text(settings: Settings) -> str:
    """The planned run's time by the priors, stage by stage (docs/performance.md's estimate)."""
    stages = [s for s in plan(settings) if s.name in settings.stages]
    rows = [f"{'stage':<26} {'cells':>5} {'start':>6} {'compile':>8} {'steps':>7} {'total':>7}"]
    total = PRIORS["driver_s"]
    for stage in stages:
        figures = stage_prior_s(stage, settings, settings.rounds)
        total += figures["total_s"]
        rows.append(
            f"{stage.name:<26} {len(stage.cells) or 1:>5} {figures['start_s']:6.0f} {figures['compile_s']:8.0f} "
            f"{figures['steps_s']:7.1f} {figures['total_s']:7.0f}"
        )
    rows.append(f"{'this process':<26} {'':>5} {'':>6} {'':>8} {'':>7} {PRIORS['driver_s']:7.0f}")
    rows.append(f"total {total:.0f} s = {total / 60:.1f} min (BUDGET_S={settings.budget_s:.0f})")
    return "\n".join(rows) + "\n"


# --- running ------------------------------------------------------------------------------------


def _pump(stream, log_handle, tail: list[str]) -> None:
    for line in iter(stream.readline, ""):
        sys.stderr.write(line)
        sys.stderr.flush()
        log_handle.write(line)
        log_handle.flush()
        tail.append(line)
        del tail[:-20]


def run_stage(stage: Stage, spec: dict, settings: Settings, work_dir: str, log_handle) -> tuple[int | None, list[str]]:
    """The stage's worker, to its end or the deadline (plus a grace period); returns its exit code and stderr tail."""
    spec_path = os.path.join(work_dir, f"{stage.name}.json")
    with open(spec_path, "w") as handle:
        json.dump(spec, handle)
    command = [settings.python, os.path.join(BENCH, "gpu_worker.py"), spec_path]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_handle.write(f"[gpu] stage {stage.name}: {len(spec['cells'])} cells\n")
    child = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    tail: list[str] = []
    pump = threading.Thread(target=_pump, args=(child.stderr, log_handle, tail), daemon=True)
    pump.start()
    try:
        code = child.wait(timeout=max(spec["deadline_unix"] - time.time(), 0) + KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the worker's own session: it and what it started
        child.wait()
        code = None
    pump.join(timeout=10)
    return code, tail


def read_lines(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _append(path: str, line: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(line) + "\n")


def _not_run(cell: dict, stage: Stage, status: str, note: str, settings: Settings) -> dict:
    return {**cell, "status": status, "status_note": note, "stage": stage.name, "rehearsal": settings.rehearse}


def best_jax_cell(lines: list[dict]) -> dict | None:
    """The JAX grid cell with the most images per second per device (levers aside)."""
    done = [line for line in lines if line["framework"] == "jax" and line["status"] == "ok" and not line.get("lever")]
    if not done:
        return None
    best = max(done, key=lambda line: line["img_per_s_per_device"])
    keys = ("cell", "framework", "impl", "model", "dtype", "param_dtype", "grid_per_device_batch")
    keys += ("per_device_batch", "input", "packed_side", "lever", "img_per_s", *BASELINE)
    return {key: best[key] for key in keys}


def run(settings: Settings) -> list[dict]:
    """Every stage, in order, within the budget; returns the enriched lines (also written to OUT)."""
    start = time.time()
    deadline = start + settings.budget_s
    os.makedirs(settings.out, exist_ok=True)
    cells_path = os.path.join(settings.out, "cells.jsonl")
    for name in ("cells.jsonl", "gpu.jsonl", "profile_summary.txt", "profile_trace.json.gz"):
        if os.path.exists(os.path.join(settings.out, name)):
            os.remove(os.path.join(settings.out, name))
    stages = plan(settings)
    selected = [s for s in stages if s.name in settings.stages]
    timings = []
    work_dir = tempfile.mkdtemp(prefix="alexnet_gpu_bench_")
    try:
        with open(os.path.join(settings.out, "gpu.log"), "w") as log_handle:
            for stage in stages:
                stage_start = time.time()
                later = selected[selected.index(stage) + 1 :] if stage in selected else []
                reserve = sum(stage_first_cell_s(s, settings) for s in later)
                if stage not in selected:
                    for cell in stage.cells:
                        _append(cells_path, _not_run(cell, stage, "skipped", "not selected (STAGES)", settings))
                    continue
                if stage.kind == "profile":
                    best = best_jax_cell(read_lines(cells_path))
                    if best is None:
                        _write(settings.out, "profile_summary.txt", "no profile: no JAX grid cell ran in this run\n")
                        continue
                    stage.cells = [best]
                first = stage_first_cell_s(stage, settings)
                if deadline - time.time() < first:
                    note = f"budget: {deadline - time.time():.0f} s left, the stage's first cell needs ~{first:.0f}"
                    if stage.kind == "profile":
                        _write(settings.out, "profile_summary.txt", f"no profile: {note}\n")
                    for cell in stage.cells if stage.kind != "profile" else []:
                        _append(cells_path, _not_run(cell, stage, "skipped", note, settings))
                    continue
                priors = {
                    "cell_setup_s": PRIORS["cell_setup_s"],
                    "compile_s": cell_compile_prior_s(stage, stage.cells[0]),
                    "step_s_per_image": step_prior_s_per_image(stage.cells[0], settings),
                    "model_compile_s": PRIORS["torch_compile_s"] if stage.impl == "compile" else 0.0,
                }
                spec = {
                    "stage": stage.name,
                    "kind": stage.kind,
                    "impl": stage.impl,
                    "cells": stage.cells,
                    "settings": settings.worker_settings(),
                    "priors": priors,
                    "deadline_unix": deadline,
                    "reserve_s": reserve,
                    "lines_path": cells_path,
                    "out_dir": settings.out,
                    "trace_dir": os.path.join(work_dir, "trace"),
                }
                code, tail = run_stage(stage, spec, settings, work_dir, log_handle)
                seen = {line["cell"] for line in read_lines(cells_path)}
                for cell in stage.cells if stage.kind != "profile" else []:
                    if cell["cell"] not in seen:
                        why = "killed at the deadline" if code is None else f"exited with {code}"
                        note = f"the worker {why}: " + " | ".join(t.strip() for t in tail[-3:])
                        _append(cells_path, _not_run(cell, stage, "failed", note[:800], settings))
                if stage.kind == "profile" and code != 0:
                    _write(settings.out, "profile_summary.txt", "no profile: the worker failed:\n" + "".join(tail))
                timings.append({"stage": stage.name, "seconds": round(time.time() - stage_start, 1), "exit": code})
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    lines = enrich(read_lines(cells_path), settings)
    with open(os.path.join(settings.out, "gpu.jsonl"), "w") as handle:
        for line in lines:
            handle.write(json.dumps(line) + "\n")
    _write(settings.out, "gpu_summary.md", summary_markdown(lines, timings, settings, time.time() - start))
    return lines


def _write(directory: str, name: str, text: str) -> None:
    with open(os.path.join(directory, name), "w") as handle:
        handle.write(text)


# --- the figures of every line ------------------------------------------------------------------


def package_versions() -> dict:
    """Installed versions (importlib.metadata: nothing is imported), and the NVIDIA driver's."""
    versions, notes = {}, []
    for field, names in (
        ("jax_version", ("jax",)),
        ("jaxlib_version", ("jaxlib",)),
        ("flax_version", ("flax",)),
        ("optax_version", ("optax",)),
        ("torch_version", ("torch",)),
        ("torchvision_version", ("torchvision",)),
        ("jax_cuda_plugin_version", ("jax-cuda13-plugin", "jax-cuda12-plugin")),
    ):
        versions[field] = None
        for name in names:
            try:
                versions[field] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        if versions[field] is None and field != "jax_cuda_plugin_version":
            notes.append(f"{field}: {names[0]} is not installed")
    versions["driver_version"], note = nvidia_driver_version()
    if note:
        notes.append(note)
    versions["version_notes"] = notes
    return versions


def nvidia_driver_version() -> tuple[str | None, str]:
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"driver_version: no NVIDIA driver here (nvidia-smi: {type(error).__name__})"
    if result.returncode != 0 or not result.stdout.strip():
        return None, f"driver_version: nvidia-smi failed ({result.stderr.strip()[:200]})"
    return result.stdout.strip().splitlines()[0].strip(), ""


def dense_bf16_peak_tflops(device_kind: str | None) -> float | None:
    for pattern, peak in DENSE_BF16_PEAK_TFLOPS:
        if device_kind and pattern.lower() in device_kind.lower():
            return peak
    return None


def _framework_environment(lines: list[dict]) -> dict:
    """What each framework's first finished cell reported of its environment, for its skipped cells."""
    keys = ("device_kind", "backend", "devices", "cuda_version", "cudnn_version", "framework_version")
    found = {}
    for line in lines:
        if line["status"] == "ok" and line["framework"] not in found:
            found[line["framework"]] = {key: line.get(key) for key in keys}
    return found


def _comparable(line: dict) -> tuple:
    """What a JAX line is compared with PyTorch at: the variant, the dtype, and the batch (grid cell and run)."""
    return line["model"], line["dtype"], line["grid_per_device_batch"], line["per_device_batch"]


def _torch_best(lines: list[dict]) -> dict:
    best = {}
    for line in lines:
        if line["framework"] == "torch" and line["status"] == "ok":
            key = _comparable(line)
            if key not in best or line["img_per_s_per_device"] > best[key]["img_per_s_per_device"]:
                best[key] = line
    return best


def _torch_missing_note(lines: list[dict]) -> str:
    if any(line.get("status") == "unavailable" for line in lines if line["framework"] == "torch"):
        return "torch is not importable here: no PyTorch figure to compare with"
    return "no PyTorch line ran at this variant, dtype and batch"


def enrich(lines: list[dict], settings: Settings) -> list[dict]:
    """Add what needs the whole run: versions, FLOP rates, MFU, the ratio to PyTorch's best; fill every field."""
    versions = package_versions()
    environments = _framework_environment(lines)
    torch_best = _torch_best(lines)
    flops = {}
    for line in lines:
        for key, value in versions.items():
            if key == "version_notes":
                line["version_notes"] = list(value) + line.pop("environment_notes", [])
            elif line.get(key) is None:
                line[key] = value
        if line["status"] != "ok":
            for key, value in environments.get(line["framework"], {}).items():
                line.setdefault(key, value)
        line.setdefault("device_kind", None)
        if line["device_kind"] is None:
            line["version_notes"].append(f"device_kind: no {line['framework']} cell ran in this run")
        if line.get("cuda_version") is None and not any(n.startswith("cuda_version") for n in line["version_notes"]):
            line["version_notes"].append("cuda_version: not reported (no cell of this framework ran on CUDA)")
        key = (line["model"], settings.image_size)
        if key not in flops:
            flops[key] = _flops_per_image(line["model"], settings.image_size, settings.num_classes)
        line["train_gflop_per_image"] = round(flops[key] / 1e9, 4)
        _rates(line, flops[key])
        _ratio(line, torch_best, lines)
        for field in REQUIRED_FIELDS:
            line.setdefault(field, None)
        line.setdefault("peak_device_mb_note", "" if line["peak_device_mb"] is not None else "the cell did not run")
        line["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    return lines


def _rates(line: dict, flops: float) -> None:
    peak = dense_bf16_peak_tflops(line.get("device_kind"))
    line["dense_bf16_peak_tflop_per_s"] = peak
    if line["status"] != "ok":
        line.update(tflop_per_s=None, mfu=None, mfu_note="the cell did not run")
        return
    line["tflop_per_s"] = round(line["img_per_s"] * flops / 1e12, 4)
    if peak is None:
        line["mfu"] = None
        line["mfu_note"] = f"no dense bf16 peak known for device_kind {line.get('device_kind')!r} (gpu.py's table)"
    else:
        line["mfu"] = round(line["tflop_per_s"] / (peak * line.get("devices", 1)), 4)
        line["mfu_note"] = f"vs the dense bf16 peak, {peak:g} TFLOP/s per device" + (
            "; float32 compute is held to the bf16 peak too" if line["dtype"] == "float32" else ""
        )


def _ratio(line: dict, torch_best: dict, lines: list[dict]) -> None:
    best = torch_best.get(_comparable(line))
    if line["status"] != "ok" or best is None:
        line["ratio_vs_torch"] = None
        line["ratio_vs_torch_note"] = "the cell did not run" if line["status"] != "ok" else _torch_missing_note(lines)
        return
    line["ratio_vs_torch"] = round(line["img_per_s_per_device"] / best["img_per_s_per_device"], 4)
    line["torch_best_impl"] = best["impl"]
    what = "its own lines: 1.0 is the better of eager and compile" if line["framework"] == "torch" else "per device"
    line["ratio_vs_torch_note"] = f"vs PyTorch {best['impl']} ({best['img_per_s_per_device']} img/s), {what}"
    if line["framework"] == "jax" and line["input"] == "device_crop":
        line["ratio_vs_torch_note"] += "; PyTorch is fed host crops"


def _fmt(value, digits=1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def summary_markdown(lines: list[dict], timings: list[dict], settings: Settings, elapsed_s: float) -> str:
    ran = [line for line in lines if line["status"] == "ok"]
    out = [
        f"# bench/gpu.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"{'rehearsal on the CPU' if settings.rehearse else 'run'}: {len(ran)} of {len(lines)} cells ran in "
        f"{elapsed_s:.0f} s (BUDGET_S={settings.budget_s:.0f}); image {settings.image_size}, "
        f"{settings.steps} step(s) x {settings.rounds} rounds",
        "",
        "| cell | status | img/s | step ms | TFLOP/s | MFU | peak MB | vs torch | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for line in lines:
        status = line["status"] + (f" ({line['status_note']})" if line["status"] != "ok" else "")
        out.append(
            f"| {line['cell']} | {status[:80]} | {_fmt(line['img_per_s'])} | {_fmt(line['step_ms'], 2)} | "
            f"{_fmt(line['tflop_per_s'], 2)} | {_fmt(line['mfu'], 3)} | {_fmt(line['peak_device_mb'], 0)} | "
            f"{_fmt(line['ratio_vs_torch'], 3)} | {_fmt(line.get('compile_s'), 1)} |"
        )
    levers = [line for line in ran if line.get("speedup_vs_baseline") is not None]
    if levers:
        out += ["", "| lever | step ms (rounds) | x baseline (per round) |", "|---|---|---|"]
        for line in levers:
            out.append(
                f"| {line['lever']} | {line['step_ms']} ({line['step_ms_rounds']}) | "
                f"{line['speedup_vs_baseline']} ({line['speedup_vs_baseline_rounds']}) |"
            )
    compiles = [line["compile_s"] for line in ran if line["framework"] == "jax" and line.get("compile_s")]
    if compiles:
        out += ["", f"JAX compile s per cell: median {statistics.median(compiles):.1f}, max {max(compiles):.1f}"]
    out += ["", "| stage | seconds | exit |", "|---|---|---|"]
    out += [f"| {t['stage']} | {t['seconds']} | {t['exit']} |" for t in timings]
    planned = settings
    if settings.rehearse:  # the priors are a GPU's: show the GPU run's plan, not the rehearsal's
        planned = Settings.from_env({"OUT": settings.out, "BUDGET_S": "460"})
    out += ["", "A GPU run's plan by the priors (python bench/gpu.py --estimate):", "", "```"]
    out += [estimate_text(planned), "```"]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimate", action="store_true", help="print the run's time by the priors; run nothing")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if args.estimate:
        print(estimate_text(settings), end="")
        return
    if not settings.out:
        raise SystemExit("set OUT=DIR: where the JSON lines, the log, the summaries and the trace go")
    for line in run(settings):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
