"""One stage of bench/gpu.py, in a process of its own: JAX grid cells, JAX levers, the JAX profile, or PyTorch.

    python bench/gpu_worker.py SPEC.json

bench/gpu.py writes SPEC.json (the stage's cells, the settings, the deadline) and
reads back the JSON lines this process appends to spec["lines_path"], one per cell,
as each cell ends. A JAX worker never imports torch and a PyTorch worker never
imports jax, so the two frameworks never share a process (nor run at the same time:
gpu.py starts one worker after another). Neither imports TensorFlow or ml_collections.

Time: a cell starts only if the estimated cost of building it, compiling it, its
warm-up and one timed round fits before the deadline; each further round runs only
if it leaves time for one round of every remaining cell of the run (this stage's
and, through spec["reserve_s"], the later stages'). So a short budget drops whole
cells from the end of the run first, and rounds before cells.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(BENCH), "src"))
sys.path.insert(0, BENCH)

import train_step  # noqa: E402  (bench/train_step.py: the optimizer config and the PyTorch network)


def log(message: str) -> None:
    print(f"[gpu_worker] {message}", file=sys.stderr, flush=True)


class Clock:
    """The stage's deadline (wall clock, shared with the parent) and the time later stages need."""

    def __init__(self, deadline_unix: float, reserve_s: float):
        self.deadline, self.reserve_s = deadline_unix, reserve_s

    def left(self) -> float:
        return self.deadline - time.time()


class Estimates:
    """What the next cell will cost, from this stage's measurements (else the spec's priors)."""

    def __init__(self, spec: dict):
        self.setup_s = spec["priors"]["cell_setup_s"]
        self.compile_s = spec["priors"]["compile_s"]
        self.step_s_per_image = spec["priors"].get("step_s_per_image", 0.0)
        self.settings = spec["settings"]

    def record(self, *, setup_s: float, compile_s: float, step_s: float, batch: int) -> None:
        self.setup_s, self.compile_s = setup_s, compile_s
        self.step_s_per_image = step_s / batch

    def round_s(self, batch: int) -> float:
        return self.settings["steps"] * self.step_s_per_image * batch

    def cell_s(self, batch: int) -> float:
        """Build + compile + warm-up + one timed round."""
        warmup = self.settings["warmup"] * self.step_s_per_image * batch
        return self.setup_s + self.compile_s + warmup + self.round_s(batch)


def emit(spec: dict, line: dict) -> None:
    with open(spec["lines_path"], "a") as handle:
        handle.write(json.dumps(line) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def base_line(cell: dict, spec: dict) -> dict:
    """The cell as planned; the figures are filled in (or left None) by the runner."""
    return {
        **cell,
        "status": "ok",
        "status_note": "",
        "stage": spec["stage"],
        "image_size": spec["settings"]["image_size"],
        "rehearsal": spec["settings"]["rehearse"],
        "steps_per_round": spec["settings"]["steps"],
        "warmup_steps": spec["settings"]["warmup"],
        "rounds_planned": spec["settings"]["rounds"],
    }


# --- JAX ----------------------------------------------------------------------------------------


class CompileCounter:
    """Backend compilations and persistent-cache hits, from jax.monitoring's events."""

    def __init__(self):
        from jax import monitoring

        self.compiles, self.compile_s, self.cache_hits = 0, 0.0, 0

        def on_duration(event, duration, **_):
            if event == "/jax/core/compile/backend_compile_duration":
                self.compiles += 1
                self.compile_s += duration

        def on_event(event, **_):
            if event == "/jax/compilation_cache/cache_hits":
                self.cache_hits += 1

        monitoring.register_event_duration_secs_listener(on_duration)
        monitoring.register_event_listener(on_event)

    def snapshot(self) -> tuple[int, float, int]:
        return self.compiles, self.compile_s, self.cache_hits


def jax_environment() -> dict:
    import flax
    import jax
    import jaxlib
    import optax

    device = jax.local_devices()[0]
    info = {
        "framework_version": jax.__version__,
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jaxlib, "__version__", None),
        "flax_version": flax.__version__,
        "optax_version": optax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.local_device_count(),
        "device_kind": device.device_kind,
        "platform_version": getattr(device.client, "platform_version", None),
        "cuda_version": None,
        "cudnn_version": None,
    }
    notes = []
    try:
        from jax._src.lib import cuda_versions  # the CUDA plugin's own report; None without one
    except ImportError:
        cuda_versions = None
    if cuda_versions is not None and info["backend"] == "gpu":
        try:
            runtime = int(cuda_versions.cuda_runtime_get_version())
            info["cuda_version"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
            cudnn = int(cuda_versions.cudnn_get_version())
            info["cudnn_version"] = f"{cudnn // 10000}.{cudnn % 10000 // 100}.{cudnn % 100}"
        except Exception as error:  # noqa: BLE001  (a plugin without these functions: say so, go on)
            notes.append(f"jax's CUDA plugin did not report its versions ({error})")
    else:
        notes.append(f"cuda_version: the {info['backend']} backend runs no CUDA")
    info["environment_notes"] = notes
    return info


def peak_device_mb(jax) -> tuple[float | None, str]:
    peaks = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001  (backends without allocator statistics)
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"] / 2**20)
    if not peaks:
        return None, f"the {jax.default_backend()} backend reports no memory_stats()"
    return round(max(peaks), 1), "peak_bytes_in_use of the process so far; its cells run in ascending memory order"


class InitialStates:
    """Each variant's initial TrainState, made once per process and copied onto the device per cell.

    The parameters do not depend on the compute dtype, the input or the levers (float32
    parameters, same initialisers), and initialising 61M of them costs seconds on a CPU.
    """

    def __init__(self):
        self._host = {}

    def get(self, model, tx, image_size: int):
        import jax

        from alexnet_jax.step import steps

        key = (model.variant, model.num_classes, image_size)
        if key not in self._host:
            state = steps.init_state(model, tx, jax.random.split(jax.random.key(0))[0], image_size)
            self._host[key] = jax.device_get(state)
        return jax.device_put(self._host[key])  # fresh buffers: the step donates them


class JaxCell:
    """One grid cell's train step: schemes.make_steps as training builds it, on one synthetic batch.

    cell["input"]: "host_crop" (uint8 [B, S, S, 3] crops and a colour offset per image, as the
    host pipeline ships them) or "device_crop" (uint8 [B, P, P, 3] packed images and example
    ids: the step crops, flips and colours them itself, steps.DeviceAugment).
    """

    def __init__(self, cell: dict, settings: dict, states: InitialStates):
        import jax
        import numpy as np

        from alexnet_jax.model import build
        from alexnet_jax.parallel import distributed, schemes
        from alexnet_jax.step import optim, steps

        start = time.perf_counter()
        self.jax, self.cell = jax, cell
        devices = jax.local_device_count()
        self.global_batch = cell["per_device_batch"] * devices
        args = train_step.parse_args(
            [
                f"--model={cell['model']}",
                f"--dtype={cell['dtype']}",
                f"--batch_size={self.global_batch}",
                f"--image_size={settings['image_size']}",
                f"--backward_impl={cell['backward_impl']}",
                f"--group_conv={cell['group_conv']}",
                f"--lrn_precision={cell['lrn_precision']}",
                f"--prng_impl={cell['prng_impl']}",
                f"--num_classes={settings['num_classes']}",
            ]
        )
        config = train_step.bench_config(args)
        model = build.create_model(config, args.num_classes)
        self.backward_impl_resolved = model.backward_impl
        schedule = optim.make_schedule(config, steps_per_epoch=1000, total_steps=100_000)
        tx = optim.make_optimizer(config, schedule)
        self.state = states.get(model, tx, args.image_size)
        self.rng = steps.dropout_root_key(0, config.prng_impl)
        packed = cell["input"] == "device_crop"
        augment = steps.DeviceAugment(seed=0, image_size=args.image_size) if packed else None
        p_train, _ = schemes.make_steps(model, tx, schedule, augment=augment)
        side = settings["packed_side"] if packed else args.image_size
        generator = np.random.default_rng(0)
        per_device = cell["per_device_batch"]
        host = {
            "images": generator.integers(0, 256, (devices, per_device, side, side, 3), dtype=np.uint8),
            "labels": generator.integers(0, args.num_classes, (devices, per_device), dtype=np.int32),
        }
        if packed:
            host["example_ids"] = np.arange(self.global_batch, dtype=np.int32).reshape((devices, per_device))
        else:
            host["color"] = generator.normal(0, 0.01, (devices, per_device, 3)).astype(np.float32)
        self.batch = distributed.shard_to_devices(host)
        jax.block_until_ready((self.state, self.batch))
        self.setup_s = time.perf_counter() - start
        start = time.perf_counter()
        self.step = p_train.lower(self.state, self.batch, self.rng).compile()
        self.compile_s = time.perf_counter() - start
        memory = self.step.memory_analysis()
        self.compiled_mb = None
        if memory is not None:
            total = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            self.compiled_mb = round((total - memory.alias_size_in_bytes) / 2**20, 1)

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps, one host sync at the end (as the training loop)."""
        start = time.perf_counter()
        metrics = None
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch, self.rng)
        self.jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / max(steps, 1)

    def close(self) -> None:
        del self.state, self.batch, self.step
        gc.collect()


def jax_cell_settings(cell: dict) -> dict:
    return {
        "backward_impl": cell["backward_impl"],
        "group_conv": cell["group_conv"],
        "lrn_precision": cell["lrn_precision"],
        "prng_impl": cell["prng_impl"],
    }


def _figures(line: dict, times: list[float], global_batch: int, per_device_batch: int) -> None:
    step_s = statistics.median(times)
    line.update(
        step_ms=round(1000 * step_s, 3),
        step_ms_rounds=[round(1000 * t, 3) for t in times],
        rounds_run=len(times),
        img_per_s=round(global_batch / step_s, 2),
        img_per_s_per_device=round(per_device_batch / step_s, 2),
    )


def _fits(clock: Clock, needed_s: float) -> bool:
    return clock.left() >= needed_s


def _skip(line: dict, note: str, status: str = "skipped") -> dict:
    line.update(status=status, status_note=note)
    return line


def _rest_s(estimates: Estimates, cells: list[dict]) -> float:
    return sum(estimates.cell_s(c["per_device_batch"]) for c in cells)


def _compiled_fields(bench: JaxCell, counter: CompileCounter, before: tuple) -> dict:
    """A JAX line's setup and compile figures: the cell's own, and the backend's since `before`."""
    compiles, compile_total, hits = (now - then for now, then in zip(counter.snapshot(), before))
    return dict(
        global_batch=bench.global_batch,
        compile_s=round(bench.compile_s, 2),
        setup_s=round(bench.setup_s, 2),
        backend_compiles=compiles,
        backend_compile_s=round(compile_total, 2),
        compilation_cache_hits=hits,
        compiled_mb=bench.compiled_mb,
        backward_impl_resolved=bench.backward_impl_resolved,
    )


def run_jax_grid(spec: dict, clock: Clock) -> None:
    import jax

    counter, states = CompileCounter(), InitialStates()
    environment = jax_environment()
    estimates = Estimates(spec)
    cells = spec["cells"]
    for index, cell in enumerate(cells):
        line = {**base_line(cell, spec), **environment}
        batch = cell["per_device_batch"] * environment["devices"]
        if not _fits(clock, estimates.cell_s(batch)):
            emit(spec, _skip(line, f"budget: {clock.left():.0f} s left, the cell needs ~{estimates.cell_s(batch):.0f}"))
            continue
        before = counter.snapshot()
        try:
            bench = JaxCell(cell, spec["settings"], states)
            bench.run(spec["settings"]["warmup"])
            times = [bench.run(spec["settings"]["steps"])]
            rest = _rest_s(estimates, cells[index + 1 :]) + clock.reserve_s
            while (
                len(times) < spec["settings"]["rounds"] and clock.left() - times[0] * spec["settings"]["steps"] >= rest
            ):
                times.append(bench.run(spec["settings"]["steps"]))
        except Exception as error:  # noqa: BLE001  (one broken cell must not lose the others)
            log(traceback.format_exc())
            emit(spec, _skip(line, f"{type(error).__name__}: {error}"[:500], status="failed"))
            continue
        _figures(line, times, bench.global_batch, cell["per_device_batch"])
        peak, peak_note = peak_device_mb(jax)
        line.update(_compiled_fields(bench, counter, before), peak_device_mb=peak, peak_device_mb_note=peak_note)
        if len(times) < spec["settings"]["rounds"]:
            line["status_note"] = f"budget: {len(times)} of {spec['settings']['rounds']} rounds"
        estimates.record(
            setup_s=bench.setup_s, compile_s=bench.compile_s, step_s=statistics.median(times), batch=bench.global_batch
        )
        bench.close()
        jax.clear_caches()
        emit(spec, line)
        log(f"{cell['cell']}: {line['img_per_s']} img/s, compile {line['compile_s']} s, {line['rounds_run']} rounds")


def run_levers(spec: dict, clock: Clock) -> None:
    """The baseline, then each lever's setting beside it, timed in alternating rounds (two steps alive at a time).

    Each lever's rounds pair with baseline rounds run just before them, so the per-round
    ratio compares back-to-back timings; the baseline line reports its first pairing's rounds.
    """
    counter, states = CompileCounter(), InitialStates()
    environment = jax_environment()
    estimates = Estimates(spec)
    settings = spec["settings"]
    cells = spec["cells"]

    def build(cell):
        line = {**base_line(cell, spec), **environment}
        before = counter.snapshot()
        bench = JaxCell(cell, settings, states)
        bench.run(settings["warmup"])
        line.update(
            _compiled_fields(bench, counter, before),
            peak_device_mb=None,
            peak_device_mb_note=(
                "a lever runs beside its baseline in one process, so no one peak is its alone; "
                "compiled_mb is this step's own footprint (see the grid cell for the measured peak)"
            ),
        )
        estimates.record(setup_s=bench.setup_s, compile_s=bench.compile_s, step_s=0.0, batch=bench.global_batch)
        return line, bench

    baseline_cell, levers = cells[0], cells[1:]
    batch = baseline_cell["per_device_batch"] * environment["devices"]
    if not _fits(clock, estimates.cell_s(batch)):
        for cell in cells:
            emit(spec, _skip({**base_line(cell, spec), **environment}, f"budget: {clock.left():.0f} s left"))
        return
    try:
        baseline_line, baseline = build(baseline_cell)
    except Exception as error:  # noqa: BLE001
        log(traceback.format_exc())
        for cell in cells:
            line = {**base_line(cell, spec), **environment}
            emit(spec, _skip(line, f"the baseline failed: {type(error).__name__}: {error}"[:500], status="failed"))
        return
    steps = settings["steps"]
    first_pairing = None
    for index, cell in enumerate(levers):
        if not _fits(clock, estimates.cell_s(batch)):
            emit(spec, _skip({**base_line(cell, spec), **environment}, f"budget: {clock.left():.0f} s left"))
            continue
        try:
            line, bench = build(cell)
            base_times, times = [], []
            while len(times) < settings["rounds"]:
                rest = _rest_s(estimates, levers[index + 1 :]) + clock.reserve_s
                if times and clock.left() - (base_times[-1] + times[-1]) * steps < rest:
                    break
                base_times.append(baseline.run(steps))
                times.append(bench.run(steps))
        except Exception as error:  # noqa: BLE001
            log(traceback.format_exc())
            failed = {**base_line(cell, spec), **environment}
            emit(spec, _skip(failed, f"{type(error).__name__}: {error}"[:500], "failed"))
            continue
        first_pairing = first_pairing or base_times
        _figures(line, times, bench.global_batch, cell["per_device_batch"])
        per_round = [b / t for b, t in zip(base_times, times)]
        line.update(
            speedup_vs_baseline=round(statistics.median(per_round), 4),
            speedup_vs_baseline_rounds=[round(r, 4) for r in per_round],
            baseline_step_ms_rounds=[round(1000 * t, 3) for t in base_times],
        )
        if len(times) < settings["rounds"]:
            line["status_note"] = f"budget: {len(times)} of {settings['rounds']} rounds"
        bench.close()
        emit(spec, line)
        log(f"{line['cell']}: {line['img_per_s']} img/s, x{line['speedup_vs_baseline']} the baseline")
    times = first_pairing or [baseline.run(steps)]
    _figures(baseline_line, times, baseline.global_batch, baseline_cell["per_device_batch"])
    baseline_line.update(speedup_vs_baseline=1.0, speedup_vs_baseline_rounds=[1.0] * len(times))
    baseline.close()
    emit(spec, baseline_line)


def _trace_files(trace_dir: str) -> list[str]:
    found = []
    for root, _, files in os.walk(trace_dir):
        found += [
            os.path.join(root, name)
            for name in files
            if name.endswith(".trace.json.gz") or name == "perfetto_trace.json.gz"
        ]
    # the Perfetto trace first: the one create_perfetto_trace asks for
    return sorted(found, key=lambda path: (os.path.basename(path) != "perfetto_trace.json.gz", path))


def run_profile(spec: dict, clock: Clock) -> None:
    """jax.profiler.trace of a few steps of the best configuration, and its text summary, into spec['out_dir']."""
    import gzip

    import jax
    import trace_summary

    cell = spec["cells"][0]
    out_dir, steps = spec["out_dir"], spec["settings"]["profile_steps"]
    summary_path = os.path.join(out_dir, "profile_summary.txt")
    header = [
        f"profile of {cell['cell']} (the best JAX configuration of this run: {cell.get('img_per_s')} img/s)",
        f"jax {jax.__version__}, backend {jax.default_backend()}, device_kind {jax.local_devices()[0].device_kind}",
        f"{steps} steps traced with jax.profiler.trace after compilation and {spec['settings']['warmup']} warm-up",
        "summary: durations of the trace's XLA-op events summed by op name (bench/trace_summary.py says which lanes)",
    ]
    bench = JaxCell(cell, spec["settings"], InitialStates())
    bench.run(spec["settings"]["warmup"])
    trace_dir = spec["trace_dir"]
    shutil.rmtree(trace_dir, ignore_errors=True)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for step in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                bench.run(1)
    bench.close()
    files = _trace_files(trace_dir)
    if not files:
        with open(summary_path, "w") as handle:
            handle.write("\n".join(header + [f"the profiler wrote no trace file under {trace_dir}"]) + "\n")
        return
    trace = trace_summary.load_trace(files[0])
    text = trace_summary.summarize(trace, steps=steps)
    kept = os.path.join(out_dir, "profile_trace.json.gz")
    limit = spec["settings"]["max_file_bytes"]
    if os.path.getsize(files[0]) <= limit:
        shutil.copyfile(files[0], kept)
        note = f"trace: profile_trace.json.gz (a copy of {os.path.basename(files[0])}; open it in ui.perfetto.dev)"
    else:
        with gzip.open(kept, "wt") as handle:
            json.dump(trace_summary.trimmed(trace), handle)
        note = "trace: profile_trace.json.gz, trimmed to the op events counted here (the whole trace was too large)"
        if os.path.getsize(kept) > limit:
            os.remove(kept)
            note = f"trace: not kept ({os.path.getsize(files[0])} bytes, over the {limit}-byte limit even trimmed)"
    with open(summary_path, "w") as handle:
        handle.write("\n".join(header + [note, f"read from {files[0]}", ""]) + "\n" + text)
    log(f"profile summary written to {summary_path}")


# --- PyTorch ------------------------------------------------------------------------------------


def torch_environment(torch) -> dict:
    cuda = torch.cuda.is_available()
    info = {
        "framework_version": torch.__version__,
        "torch_version": torch.__version__,
        "backend": "cuda" if cuda else "cpu",
        "devices": 1,
        "device_kind": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda_version": torch.version.cuda if cuda else None,
        "cudnn_version": None,
        "torch_threads": torch.get_num_threads(),
        "environment_notes": [] if cuda else ["cuda_version: PyTorch runs on the CPU here"],
    }
    if cuda and torch.backends.cudnn.is_available():
        version = int(torch.backends.cudnn.version())
        info["cudnn_version"] = f"{version // 10000}.{version % 10000 // 100}.{version % 100}"
    return info


class TorchModel:
    """One variant and dtype in PyTorch: the same layers (bench/train_step.torch_alexnet), SGD with
    momentum and weight decay, channels_last, bf16 autocast for bfloat16, optionally torch.compile'd.

    The batch arrives as uint8 pixels and is scaled inside the (compiled) model, as JAX's step does.
    torch.compile marks the batch dimension dynamic, so one compilation serves every batch size.
    """

    def __init__(self, torch, cell: dict, settings: dict, *, compile_backend: str | None):
        from torch import nn

        from alexnet_jax.model import preprocess

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.autocast = cell["dtype"] == "bfloat16"
        network = train_step.torch_alexnet(nn, cell["model"], settings["num_classes"])
        mean = torch.tensor(preprocess.MEAN_RGB).view(1, 3, 1, 1)
        std = torch.tensor(preprocess.STDDEV_RGB).view(1, 3, 1, 1)
        if preprocess.default_input_scale(cell["model"]) == "raw":
            scale, shift = torch.ones(1, 3, 1, 1), -255.0 * mean
        else:
            scale, shift = 1.0 / (255.0 * std), -mean / std

        class Pixels(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("scale", scale)
                self.register_buffer("shift", shift)

            def forward(self, images):
                return images.float() * self.scale + self.shift

        model = nn.Sequential(Pixels(), network).to(self.device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=0.01, momentum=0.9, weight_decay=train_step.WEIGHT_DECAY[cell["model"]]
        )
        self.forward = torch.compile(model, backend=compile_backend) if compile_backend else model
        self.compiled = compile_backend is not None
        self.loss_fn = nn.CrossEntropyLoss()
        self.num_classes = settings["num_classes"]

    def set_batch(self, per_device_batch: int, image_size: int) -> None:
        torch = self.torch
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (per_device_batch, 3, image_size, image_size), generator=generator)
        self.images = images.to(torch.uint8).to(self.device, memory_format=torch.channels_last)
        self.labels = torch.randint(0, self.num_classes, (per_device_batch,), generator=generator).to(self.device)
        if self.compiled:
            torch._dynamo.mark_dynamic(self.images, 0)
            torch._dynamo.mark_dynamic(self.labels, 0)

    def run(self, steps: int) -> float:
        torch = self.torch
        start = time.perf_counter()
        loss = None
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.loss_fn(self.forward(self.images), self.labels)
            loss.backward()
            self.optimizer.step()
        if loss is not None:
            loss.item()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / max(steps, 1)


def run_torch(spec: dict, clock: Clock) -> None:
    cells = spec["cells"]
    try:
        import torch
    except Exception as error:  # noqa: BLE001  (ImportError, or a broken install: the lines say which)
        for cell in cells:
            line = {**base_line(cell, spec), "torch_importable": False}
            emit(spec, _skip(line, f"torch is not importable here ({type(error).__name__}: {error})", "unavailable"))
        log(f"torch is not importable: {error}")
        return
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm per shape, as any tuned run does
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs, like XLA's default float32 precision
    environment = {**torch_environment(torch), "torch_importable": True}
    backend = spec["settings"]["torch_compile_backend"] if spec["impl"] == "compile" else None
    estimates = Estimates(spec)
    model, model_key = None, None
    for index, cell in enumerate(cells):
        line = {**base_line(cell, spec), **environment, "global_batch": cell["per_device_batch"]}
        line.update(
            torch_channels_last=True,
            torch_autocast_bf16=cell["dtype"] == "bfloat16",
            torch_compile_backend=backend,
            torch_compile_dynamic_batch=backend is not None,
            torch_float32_matmul_precision="high",
        )
        batch = cell["per_device_batch"]
        key = (cell["model"], cell["dtype"])
        new_model = key != model_key
        needed = estimates.cell_s(batch) + (spec["priors"].get("model_compile_s", 0.0) if new_model else 0.0)
        if not _fits(clock, needed):
            emit(spec, _skip(line, f"budget: {clock.left():.0f} s left, the cell needs ~{needed:.0f}"))
            continue
        try:
            start = time.perf_counter()
            if new_model:
                model = None
                gc.collect()
                if backend is not None:
                    torch._dynamo.reset()  # a fresh compilation for each variant and dtype
                model, model_key = TorchModel(torch, cell, spec["settings"], compile_backend=backend), key
            model.set_batch(batch, spec["settings"]["image_size"])
            if model.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            setup_s = time.perf_counter() - start
            first_s = model.run(1)  # torch.compile compiles here (the first batch of a variant); cuDNN tunes
            model.run(spec["settings"]["warmup"])
            times = [model.run(spec["settings"]["steps"])]
            rest = _rest_s(estimates, cells[index + 1 :]) + clock.reserve_s
            while (
                len(times) < spec["settings"]["rounds"] and clock.left() - times[0] * spec["settings"]["steps"] >= rest
            ):
                times.append(model.run(spec["settings"]["steps"]))
        except Exception as error:  # noqa: BLE001
            log(traceback.format_exc())
            emit(spec, _skip(line, f"{type(error).__name__}: {error}"[:500], status="failed"))
            model, model_key = None, None
            continue
        _figures(line, times, batch, batch)
        if model.device == "cuda":
            line.update(peak_device_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1), peak_device_mb_note="")
            line["peak_device_mb_note"] = "torch.cuda.max_memory_allocated over this cell (reset before it)"
        else:
            line.update(peak_device_mb=None, peak_device_mb_note="PyTorch on the CPU reports no device memory")
        line.update(compile_s=round(first_s, 2), setup_s=round(setup_s, 2))
        if len(times) < spec["settings"]["rounds"]:
            line["status_note"] = f"budget: {len(times)} of {spec['settings']['rounds']} rounds"
        # the next cell's first step: this one's, unless this one also built (and compiled) the model
        first_step_s = spec["priors"]["compile_s"] if new_model else first_s
        estimates.record(setup_s=setup_s, compile_s=first_step_s, step_s=statistics.median(times), batch=batch)
        emit(spec, line)
        log(f"{cell['cell']}: {line['img_per_s']} img/s, first step {line['compile_s']} s")


RUNNERS = {"jax": run_jax_grid, "levers": run_levers, "profile": run_profile, "torch": run_torch}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as handle:
        spec = json.load(handle)
    RUNNERS[spec["kind"]](spec, Clock(spec["deadline_unix"], spec["reserve_s"]))


if __name__ == "__main__":
    main()
