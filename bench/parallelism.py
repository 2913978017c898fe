"""What each parallelism scheme costs per device: memory, communication, time (TensorFlow-free).

    python bench/parallelism.py [--batches=256,1024] [--devices=8] [--variant=paper] \
        [--time_steps=0] [--image_size=224]

Compiles the real train step (schemes.make_scheme(...).make_steps, as training does) for
each scheme and mesh on `devices` fake CPU devices and prints one JSON line per case:

  param_bytes_per_device       parameters + optimizer state on one device, from the shardings
  collective_bytes_per_device  by kind, read from the compiled HLO, as the bytes one device
                               sends with ring algorithms on a group of n: all-reduce of S
                               bytes 2(n-1)/n S; all-gather / reduce-scatter whose full array
                               is S (n-1)/n S; all-to-all of S (n-1)/n S; collective-permute
                               its operand
  analytic_collective_bytes_per_device  the formula in docs/distributed.md, per scheme
  step_ms                      the median wall time of one compiled step on these devices over
                               --time_steps rounds (each one step, after one untimed step),
                               step_ms_rounds every round; null with --time_steps=0. On fake
                               CPU devices they share the host's cores: the time is the whole
                               mesh's compute plus its in-memory collectives, not a GPU's

The figures of interest are ratios to data parallelism on the same devices, printed too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import numpy as np
import train_step  # bench/train_step.py: the step's config keys without ml_collections; puts src/ on the path

SCHEMES = (("data", 1), ("towers", 2), ("weird_trick", 2), ("weird_trick", 8))
FLOAT_BYTES = 4  # float32 parameters, gradients and (config.dtype float32) activations
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(
    r"=\s*(?P<shape>\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+(?P<kind>" + "|".join(_KINDS) + r")(?:-start)?\((?P<args>.*)"
)
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in _DTYPE_BYTES:
            continue
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * _DTYPE_BYTES[dtype]
    return total


def _group_size(line: str, devices: int) -> int:
    """How many devices one group of a collective holds, in each way XLA prints its groups."""
    named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if named:  # jax >= 0.11: replica_groups=mesh['data'=4,'model'=2] {'model'}
        sizes = {axis.strip("'"): int(size) for axis, size in (item.split("=") for item in named.group(1).split(","))}
        return int(np.prod([sizes[axis.strip().strip("'")] for axis in named.group(2).split(",") if axis.strip()]))
    groups = re.search(r"replica_groups=\{(\{[\d,]*\})", line)
    if groups:
        return len(groups.group(1).strip("{}").split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if iota:
        return int(iota.group(2))
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
    return 2 if pairs else devices


def collective_bytes(hlo_text: str, devices: int) -> dict[str, float]:
    """Bytes one device sends per step, by kind, from compiled HLO text (ring formulas above)."""
    sent = dict.fromkeys(_KINDS, 0.0)
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if not match or "-done" in line.split("=")[0]:
            continue
        kind, n = match.group("kind"), _group_size(line, devices)
        result = _shape_bytes(match.group("shape"))
        operand = _shape_bytes(match.group("args").split("), ")[0])
        if n <= 1:
            continue
        if kind == "all-reduce":
            sent[kind] += 2 * (n - 1) / n * result
        elif kind == "all-gather":
            sent[kind] += (n - 1) / n * result
        elif kind == "reduce-scatter":
            sent[kind] += (n - 1) / n * result * n
        elif kind == "all-to-all":
            sent[kind] += (n - 1) / n * result
        else:
            sent[kind] += operand or result
    return sent


def _layer_sizes(params) -> dict[str, int]:
    return {layer: sum(int(np.prod(v.shape)) for v in leaves.values()) for layer, leaves in params.items()}


def analytic_bytes(
    name: str, data: int, model: int, batch: int, sizes: dict[str, int], num_classes: int, side: int, units: int = 4096
):
    """The formula of docs/distributed.md: gradient all-reduces plus the model axis's gathers and their transposes."""

    def ring(group, count):  # all-reduce of `count` floats on a group
        return 2 * (group - 1) / group * count * FLOAT_BYTES if group > 1 else 0.0

    def join(group, count):  # all-gather forward + reduce-scatter backward of a full array of `count` floats
        return 2 * (group - 1) / group * count * FLOAT_BYTES if group > 1 else 0.0

    devices = data * model
    conv = sum(v for k, v in sizes.items() if k.startswith("conv"))
    fc67 = sizes["fc6"] + sizes["fc7"]
    examples = batch // data  # per data group: the examples the model axis shares
    if name == "data":
        return ring(devices, conv + fc67 + sizes["fc8"])
    if name == "towers":
        maps3 = examples * side * side * 256  # pool2 of both towers: conv3's input
        activations = join(model, maps3) + join(model, examples * 9216) + 2 * join(model, examples * units)
        return ring(data, (conv + fc67) / model) + ring(devices, sizes["fc8"]) + activations
    if name == "weird_trick":
        activations = join(model, examples * 9216) + 2 * join(model, examples * units)
        activations += join(model, examples * num_classes)
        return ring(devices, conv) + ring(data, (fc67 + sizes["fc8"]) / model) + activations
    raise ValueError(name)


def _pool2_side(image_size: int) -> int:
    side = (image_size + 2 * 2 - 11) // 4 + 1
    for _ in range(2):
        side = (side - 3) // 2 + 1
    return side


def _available_bytes() -> int:
    """The host memory free for a step (MemAvailable): fake CPU devices' buffers live there."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def run_case(name, model_axis, batch, args, model, tx, schedule, abstract_state, host_state):
    import jax

    from alexnet_jax.parallel import schemes

    scheme = schemes.make_scheme(name, variant=args.variant, model_axis=model_axis)
    p_train, _ = scheme.make_steps(model, tx, schedule)
    shardings = scheme.state_shardings(abstract_state)
    state_in = jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )
    images = jax.ShapeDtypeStruct(
        (batch, args.image_size, args.image_size, 3), np.uint8, sharding=scheme.batch_sharding
    )
    labels = jax.ShapeDtypeStruct((batch,), np.int32, sharding=scheme.batch_sharding)
    start = time.perf_counter()
    compiled = p_train.lower(state_in, {"images": images, "labels": labels}, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - start
    sent = collective_bytes(compiled.as_text(), args.devices)
    param_bytes = sum(
        int(np.prod(s.shard_shape(leaf.shape))) * leaf.dtype.itemsize
        for leaf, s in zip(jax.tree_util.tree_leaves(abstract_state), jax.tree_util.tree_leaves(shardings))
    )
    data_size = args.devices // model_axis
    analytic = analytic_bytes(
        name,
        data_size,
        model_axis,
        batch,
        _layer_sizes(abstract_state.params),
        args.num_classes,
        _pool2_side(args.image_size),
        args.hidden_units,
    )
    memory = compiled.memory_analysis()
    need = (
        None
        if memory is None
        else sum((memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes))
        - memory.alias_size_in_bytes
    )
    step_ms, rounds, note = None, [], None
    # per device; fake CPU devices all hold theirs in the host's memory
    host_need = None if need is None else need * (args.devices if jax.devices()[0].platform == "cpu" else 1)
    if args.time_steps > 0 and host_need is not None and host_need > 0.9 * _available_bytes():
        note = (
            f"not timed: the step needs {host_need / 2**30:.1f} GiB of host memory for its {args.devices} devices, "
            f"{_available_bytes() / 2**30:.1f} GiB available"
        )
    elif args.time_steps > 0:
        state = scheme.place_state(host_state)
        rng = np.random.default_rng(0)
        host_batch = {
            "images": rng.integers(0, 256, (batch, args.image_size, args.image_size, 3), dtype=np.uint8),
            "labels": rng.integers(0, args.num_classes, (batch,)).astype(np.int32),
        }
        device_batch = scheme.place_batch(host_batch)
        state, metrics = compiled(state, device_batch, jax.random.key(0))  # warm
        jax.block_until_ready(metrics)
        rounds = []
        for _ in range(args.time_steps):  # one step a round, each waited for
            start = time.perf_counter()
            state, metrics = compiled(state, device_batch, jax.random.key(0))
            jax.block_until_ready(metrics)
            rounds.append(1000 * (time.perf_counter() - start))
        step_ms = float(np.median(rounds))
    total = sum(sent.values())
    return {
        "scheme": name,
        "mesh": f"{args.devices}" if name == "data" else f"{data_size}x{model_axis}",
        "variant": args.variant,
        "global_batch": batch,
        "hidden_units": args.hidden_units,
        "image_size": args.image_size,
        "param_bytes_per_device": param_bytes,
        "collective_bytes_per_device": {kind: round(value) for kind, value in sent.items()},
        "collective_bytes_per_device_total": round(total),
        "analytic_collective_bytes_per_device": round(analytic),
        "measured_over_analytic": round(total / analytic, 4) if analytic else None,
        "compile_s": round(compile_s, 1),
        "step_ms": None if step_ms is None else round(step_ms, 1),
        "step_ms_rounds": [round(r, 1) for r in rounds],
        "step_ms_note": note,
        "compiled_step_mb_per_device": None if need is None else round(need / 2**20),
        "devices": f"{args.devices} x {jax.devices()[0].platform}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="256,1024", help="global batch sizes, comma-separated")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    parser.add_argument("--variant", default="paper", choices=("paper", "torchvision"))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--hidden_units", type=int, default=4096, help="fc6/fc7 units (the paper's: 4096)")
    parser.add_argument("--time_steps", type=int, default=0, help="timed steps per case (0: compile only)")
    parser.add_argument("--schemes", default="", help="e.g. data:1,weird_trick:8 (default: all four)")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    from alexnet_jax.model import build
    from alexnet_jax.step import optim, steps

    # the keys the step reads, without ml_collections (GPU hosts have neither it nor TensorFlow)
    config = train_step.bench_config(
        argparse.Namespace(
            model=args.variant,
            dtype="float32",
            input_scale="auto",
            backward_impl="auto",
            group_conv="grouped",
            lrn_precision="highest",
            prng_impl="threefry",
            batch_size=max(int(b) for b in args.batches.split(",")),
        )
    )
    config.hidden_units = args.hidden_units
    model = build.create_model(config, args.num_classes)
    schedule = optim.make_schedule(config, steps_per_epoch=100, total_steps=1000)
    tx = optim.make_optimizer(config, schedule)
    init = jax.jit(lambda rng: steps.init_state(model, tx, rng, args.image_size))
    abstract_state = jax.eval_shape(init, jax.random.key(0))
    host_state = jax.device_get(init(jax.random.key(0))) if args.time_steps > 0 else None
    cases = SCHEMES
    if args.schemes:
        cases = tuple((n, int(m)) for n, m in (item.split(":") for item in args.schemes.split(",")))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name, model_axis in cases:
            if name == "towers" and args.variant != "paper":
                continue
            row = run_case(name, model_axis, batch, args, model, tx, schedule, abstract_state, host_state)
            rows.append(row)
            base = next((r for r in rows if r["scheme"] == "data" and r["global_batch"] == batch), None)
            if base is not None:
                row["collective_ratio_to_data"] = round(
                    row["collective_bytes_per_device_total"] / base["collective_bytes_per_device_total"], 4
                )
                row["param_ratio_to_data"] = round(row["param_bytes_per_device"] / base["param_bytes_per_device"], 4)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
