"""Peak memory of one train step at gradient accumulation N = 1, 2, 4 (config.grad_accum_steps), one process per N.

    python bench/grad_accum.py [--model=torchvision] [--batch_size=64] [--image_size=224] [--accum=1,2,4]

The step is training's (schemes.make_steps) at one global batch; with N > 1 it runs
N micro-batches of batch_size / N in turn and applies one update, so the
activations held at once shrink with N while the batch, the update and its
learning rate stay those of the full batch. Each N runs in a fresh child process
(compile, then --steps steps) so that its peak RSS is its own: peak_rss_mb is the
child's ru_maxrss; peak_device_mb is the allocator's peak where the backend
reports one (GPUs; null on the CPU); compiled_temp_mb is XLA's own count of the
step's scratch buffers (memory_analysis), which every backend gives. The per-step
seconds are noisy on a shared machine: a cost, not a race. No TensorFlow, no
ml_collections (runs on the GPU machines). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(BENCH), "src"))
sys.path.insert(0, BENCH)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("torchvision", "paper"), default="torchvision")
    parser.add_argument("--batch_size", type=int, default=64, help="global batch (over all local devices)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--accum", default="1,2,4", help="the N to measure, comma-separated")
    parser.add_argument("--steps", type=int, default=2, help="steps after the compiling one")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # a child: measure this N
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, accum: int) -> dict:
    """In this process: build training's step at grad_accum_steps=accum, run it, and report its memory."""
    import jax
    import numpy as np
    import train_step as step_bench  # bench/train_step.py: its synthetic config and memory probes

    from alexnet_jax.model import build
    from alexnet_jax.parallel import distributed, schemes
    from alexnet_jax.step import optim, steps

    config = step_bench.bench_config(
        step_bench.parse_args([f"--model={args.model}", f"--batch_size={args.batch_size}", f"--dtype={args.dtype}"])
    )
    devices = jax.local_device_count()
    per_device = args.batch_size // devices
    model = build.create_model(config, 1000)
    schedule = optim.make_schedule(config, steps_per_epoch=1000, total_steps=100_000)
    tx = optim.make_optimizer(config, schedule)
    init_rng, dropout_rng = jax.random.split(jax.random.key(0))
    state = steps.init_state(model, tx, init_rng, args.image_size)
    p_train, _ = schemes.make_steps(model, tx, schedule, grad_accum_steps=accum)
    rng = np.random.default_rng(0)
    shape = (devices, per_device, args.image_size, args.image_size, 3)
    batch = distributed.shard_to_devices(
        {
            "images": rng.integers(0, 256, shape, dtype=np.uint8),
            "labels": rng.integers(0, 1000, (devices, per_device), dtype=np.int32),
            "color": rng.normal(0, 0.01, (devices, per_device, 3)).astype(np.float32),
        }
    )
    start = time.perf_counter()
    compiled = p_train.lower(state, batch, dropout_rng).compile()
    analysis = compiled.memory_analysis()  # None where the backend keeps no count
    compiled_temp_mb = None if analysis is None else round(analysis.temp_size_in_bytes / 2**20, 1)
    state, metrics = compiled(state, batch, dropout_rng)
    first_loss = float(metrics["loss"])  # from the same initial state at every N: equal to float32 rounding
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch, dropout_rng)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / max(args.steps, 1)
    device_mb = step_bench.peak_device_mb(jax)
    return {
        "grad_accum_steps": accum,
        "micro_batch_per_device": per_device // accum,
        "peak_rss_mb": round(step_bench.peak_rss_mb(), 1),
        "peak_device_mb": None if device_mb is None else round(device_mb, 1),
        "compiled_temp_mb": compiled_temp_mb,
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 3),
        "first_step_loss": first_loss,
        "backend": jax.default_backend(),
        "devices": devices,
    }


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(measure(args, args.worker)), flush=True)
        return
    rows = []
    for accum in (int(value) for value in args.accum.split(",")):
        argv = [arg for arg in sys.argv[1:] if not arg.startswith("--worker")]
        child = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, f"--worker={accum}"], capture_output=True, text=True
        )
        if child.returncode != 0:
            raise SystemExit(f"N={accum} failed:\n{child.stderr[-3000:]}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    import jax

    result = {
        "bench": "grad_accum",
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "rows": rows,
        "peak_rss_mb": {str(row["grad_accum_steps"]): row["peak_rss_mb"] for row in rows},
        "peak_device_mb": {str(row["grad_accum_steps"]): row["peak_device_mb"] for row in rows},
        "compiled_temp_mb": {str(row["grad_accum_steps"]): row["compiled_temp_mb"] for row in rows},
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
