"""Time the project's real pmap'ed train step (and optionally PyTorch's) on synthetic data.

    python bench/train_step.py --model=torchvision --batch_size=32 --image_size=224 --steps=10 --compare_torch

The step is the one training uses: alexnet_jax.parallel.schemes.make_steps over all local
devices, with the optimizer from alexnet_jax.step.optim, after compilation. The JAX
and PyTorch timings alternate in rounds inside one process, so both see the same
machine load; the medians are reported. The last line printed is one JSON object.

--input=demo instead feeds the step from the real input pipeline on the bundled
demo digits (tf.data + prefetch_to_device, as training.loop.train_and_evaluate does) and
reports the loop's step time next to the synthetic-input step time; that mode
imports TensorFlow, the default mode never does (GPU machines have none), nor
ml_collections (alexnet_jax.config is not imported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

WEIGHT_DECAY = {"paper": 5e-4, "torchvision": 1e-4}
# Measured alternatives for XLA:CPU (docs/performance.md); none gave a gain so far, so
# training sets no flags. XLA reads XLA_FLAGS once, when the first backend starts.
XLA_CPU_PRESETS: dict[str, tuple[str, ...]] = {
    "none": (),
    "onednn": ("--xla_cpu_use_onednn=true",),
    "xnnpack": ("--xla_cpu_use_xnnpack=true",),
    "xnn_fusion": ("--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",),
    "ynn_conv": ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot",),
}


def configure_xla(preset: str) -> str:
    """Prepend the preset's flags to XLA_FLAGS (user flags come last and win); returns XLA_FLAGS."""
    user = os.environ.get("XLA_FLAGS", "").split()
    combined = " ".join([flag for flag in XLA_CPU_PRESETS[preset] if flag not in user] + user)
    if combined:
        os.environ["XLA_FLAGS"] = combined
    return combined


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("torchvision", "paper"), default="torchvision")
    parser.add_argument("--batch_size", type=int, default=32, help="global batch (over all local devices)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (JAX and PyTorch alternate)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument(
        "--backward_impl",
        default="auto",
        help="auto, fast or lax (config.backward_impl); a comma list (fast,lax) times each, the first is reported",
    )
    parser.add_argument(
        "--input_scale", default="auto", help="auto, raw or standardized (config.input_scale); auto = the variant's"
    )
    parser.add_argument("--group_conv", choices=("grouped", "split"), default="grouped", help="config.group_conv")
    parser.add_argument(
        "--lrn_precision", choices=("highest", "high", "default"), default="highest", help="config.lrn_precision"
    )
    parser.add_argument(
        "--prng_impl", choices=("threefry", "rbg", "unsafe_rbg"), default="threefry", help="config.prng_impl"
    )
    parser.add_argument("--input", choices=("synthetic", "demo"), default="synthetic")
    parser.add_argument(
        "--device_augment",
        type=int,
        default=0,
        help="also time the step on whole packed images of this side (e.g. 256), cropped on the device",
    )
    parser.add_argument("--compare_torch", action="store_true", help="also time PyTorch in the same run")
    parser.add_argument(
        "--torch_process",
        action="store_true",
        help="with --compare_torch: PyTorch in a process of its own (rounds still alternate), so neither "
        "framework's threads or allocator disturb the other",
    )
    parser.add_argument("--torch_worker", action="store_true", help=argparse.SUPPRESS)  # the child of --torch_process
    parser.add_argument("--torch_batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--torch_channels_last", action="store_true")
    parser.add_argument("--torch_compile", action="store_true")
    parser.add_argument(
        "--xla_cpu_flags",
        choices=tuple(XLA_CPU_PRESETS),
        default="none",
        help="XLA:CPU flag preset; 'none' adds nothing",
    )
    parser.add_argument("--label", default="", help="free text copied into the JSON line")
    return parser.parse_args(argv)


def bench_config(args: argparse.Namespace) -> types.SimpleNamespace:
    """The keys optim.make_schedule/make_optimizer and build.create_model read (no ml_collections)."""
    return types.SimpleNamespace(
        model=args.model,
        init="modern",
        dropout_rate=0.5,
        dtype=args.dtype,
        input_scale=args.input_scale,
        backward_impl=args.backward_impl.split(",")[0],
        group_conv=args.group_conv,
        lrn_precision=args.lrn_precision,
        prng_impl=args.prng_impl,
        optimizer="sgd",
        batch_size=args.batch_size,
        learning_rate=0.01,
        lr_scaling="none",
        lr_base_batch_size=256,
        momentum=0.9,
        nesterov=False,
        weight_decay=WEIGHT_DECAY[args.model],
        schedule="constant",
        lr_drop_epochs=(),
        lr_drop_factor=0.1,
        warmup_epochs=0.0,
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


def peak_device_mb(jax) -> float | None:
    peaks = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001  (backends without allocator stats raise or return None)
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"] / 2**20)
    return max(peaks) if peaks else None


class JaxBench:
    """The train step as training builds it, on one fixed synthetic batch."""

    def __init__(self, args, backward_impl: str = "auto", packed_side: int = 0):
        """packed_side > 0: the batch is whole packed images of that side plus example ids, and the
        step crops, flips and colours them itself (steps.DeviceAugment), as for --config.dataset=packed."""
        import jax
        import numpy as np

        from alexnet_jax.model import build
        from alexnet_jax.parallel import distributed, schemes
        from alexnet_jax.step import optim, steps

        self.jax, self.args = jax, args
        config = bench_config(args)
        config.backward_impl = backward_impl
        devices = jax.local_device_count()
        if args.batch_size % devices:
            raise SystemExit(f"--batch_size={args.batch_size} must divide by the {devices} local devices")
        self.devices, self.per_device = devices, args.batch_size // devices
        model = build.create_model(config, args.num_classes)
        schedule = optim.make_schedule(config, steps_per_epoch=1000, total_steps=100_000)
        tx = optim.make_optimizer(config, schedule)
        init_rng = jax.random.split(jax.random.key(0))[0]
        self.dropout_rng = steps.dropout_root_key(0, config.prng_impl)
        self.state = steps.init_state(model, tx, init_rng, args.image_size)
        augment = steps.DeviceAugment(seed=0, image_size=args.image_size) if packed_side else None
        self.p_train, _ = schemes.make_steps(model, tx, schedule, augment=augment)
        rng = np.random.default_rng(0)
        side = packed_side or args.image_size
        shape = (devices, self.per_device, side, side, 3)
        host = {  # what the input pipeline ships: uint8 pixels and a PCA colour offset per image
            "images": rng.integers(0, 256, shape, dtype=np.uint8),
            "labels": rng.integers(0, args.num_classes, (devices, self.per_device), dtype=np.int32),
        }
        if packed_side:  # packed data: the step draws each example's crop, flip and colour from its id
            host["example_ids"] = np.arange(args.batch_size, dtype=np.int32).reshape((devices, self.per_device))
        else:
            host["color"] = rng.normal(0, 0.01, (devices, self.per_device, 3)).astype(np.float32)
        self.batch = distributed.shard_to_devices(host)
        self.input_scale = model.input_scale
        start = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - start
        self.run(args.warmup)

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps; one host sync at the end, as the training loop does."""
        start = time.perf_counter()
        metrics = None
        for _ in range(steps):
            self.state, metrics = self.p_train(self.state, self.batch, self.dropout_rng)
        self.jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start

    def run_loop(self, batches, steps: int) -> float:
        start = time.perf_counter()
        metrics = None
        for _ in range(steps):
            self.state, metrics = self.p_train(self.state, next(batches), self.dropout_rng)
        self.jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


class TorchBench:
    """The same network, per-device batch and SGD update (momentum 0.9, weight decay) in PyTorch.

    PyTorch runs on one device (the first GPU, else the CPU) at JAX's per-device batch.
    """

    def __init__(self, args, batch_size: int, *, channels_last: bool, compile_model: bool, autocast_bf16: bool):
        import torch
        from torch import nn

        self.torch, self.args = torch, args
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.autocast_bf16 = autocast_bf16
        model = torch_alexnet(nn, args.model, args.num_classes).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=self.memory_format)
        self.model = model
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=0.01, momentum=0.9, weight_decay=WEIGHT_DECAY[args.model]
        )
        self.forward = torch.compile(model) if compile_model else model
        generator = torch.Generator().manual_seed(0)
        self.batch_size = batch_size
        shape = (batch_size, 3, args.image_size, args.image_size)
        self.images = torch.randn(shape, generator=generator).to(device, memory_format=self.memory_format)
        self.labels = torch.randint(0, args.num_classes, (batch_size,), generator=generator).to(device)
        self.loss_fn = nn.CrossEntropyLoss()
        start = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - start
        self.run(args.warmup)

    def step(self):
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            loss = self.loss_fn(self.forward(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        return loss

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        loss.item()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return time.perf_counter() - start


class TorchProcess:
    """TorchBench in a child process: each round, the parent asks for N steps and reads back the seconds."""

    def __init__(self, argv: list[str], per_device: int):
        import subprocess

        command = [sys.executable, os.path.abspath(__file__), *argv, "--torch_worker", f"--torch_batch={per_device}"]
        self.child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(self._line())
        self.batch_size, self.device, self.compile_s = ready["batch_size"], ready["device"], ready["compile_s"]
        self.info = ready["info"]

    def _line(self) -> str:
        line = self.child.stdout.readline()
        if not line:
            raise SystemExit("the PyTorch worker process died; run it with --compare_torch alone to see why")
        return line

    def run(self, steps: int) -> float:
        self.child.stdin.write(f"{steps}\n")
        self.child.stdin.flush()
        return float(self._line())

    def close(self) -> None:
        self.child.stdin.close()
        self.child.wait(timeout=60)


def torch_worker(args) -> None:
    """The child of --torch_process: build PyTorch's step, say so, then time N steps per line read."""
    import torch

    bench = TorchBench(
        args,
        args.torch_batch,
        channels_last=args.torch_channels_last,
        compile_model=args.torch_compile,
        autocast_bf16=args.dtype == "bfloat16",
    )
    info = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}
    ready = {"batch_size": bench.batch_size, "device": bench.device, "compile_s": bench.compile_s, "info": info}
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        print(bench.run(int(line)), flush=True)


def torch_alexnet(nn, variant: str, num_classes: int):
    """torchvision's AlexNet layer for layer (or the paper's widths, groups and LRN)."""
    import torch

    widths = {"paper": (96, 256, 384, 384, 256), "torchvision": (64, 192, 384, 256, 256)}[variant]
    groups = {"paper": (1, 2, 1, 2, 2), "torchvision": (1, 1, 1, 1, 1)}[variant]

    class TowerLRN(nn.Module):
        """The paper's LRN, each tower (channel half) normalising its own maps, as each GPU did
        (model.local_response_norm with groups=2). torch divides alpha by n; the paper does not."""

        def __init__(self):
            super().__init__()
            self.norm = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)

        def forward(self, x):
            return torch.cat([self.norm(half) for half in x.chunk(2, dim=1)], dim=1)

    def lrn():
        return [TowerLRN()] if variant == "paper" else []

    c1, c2, c3, c4, c5 = widths
    features = nn.Sequential(
        nn.Conv2d(3, c1, 11, stride=4, padding=2, groups=groups[0]),
        nn.ReLU(inplace=True),
        *lrn(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(c1, c2, 5, padding=2, groups=groups[1]),
        nn.ReLU(inplace=True),
        *lrn(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(c2, c3, 3, padding=1, groups=groups[2]),
        nn.ReLU(inplace=True),
        nn.Conv2d(c3, c4, 3, padding=1, groups=groups[3]),
        nn.ReLU(inplace=True),
        nn.Conv2d(c4, c5, 3, padding=1, groups=groups[4]),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2),
    )
    if variant == "paper":  # fc -> ReLU -> dropout, as the paper (same cost as the inverted kind)
        classifier = [nn.Linear(c5 * 36, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5)]
        classifier += [nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5)]
    else:  # torchvision: dropout -> fc -> ReLU
        classifier = [nn.Dropout(0.5), nn.Linear(c5 * 36, 4096), nn.ReLU(inplace=True)]
        classifier += [nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True)]
    return nn.Sequential(
        features, nn.AdaptiveAvgPool2d((6, 6)), nn.Flatten(), *classifier, nn.Linear(4096, num_classes)
    )


def demo_batches(args, devices: int):
    """Real input, as training.loop.train_and_evaluate builds it: demo digits -> tf.data -> prefetch_to_device."""
    from alexnet_jax.data import pipeline, registry
    from alexnet_jax.parallel import distributed

    source = registry.open_source("demo_digits")
    aug = pipeline.Augmentation(
        image_size=args.image_size,
        resize_size=int(round(args.image_size * 256 / 224)),
        flip=False,
        pca_noise_std=0.1,
    )
    dataset = pipeline.train_dataset(source.train, aug, per_process_batch=args.batch_size, seed=0)
    return distributed.prefetch_to_device(pipeline.device_batches(dataset, devices), 2)


def device_augment_figures(args, host_bench: JaxBench) -> dict:
    """The step on packed images cropped on the device, against the same step fed host crops, in alternating rounds."""
    packed = JaxBench(args, host_bench_impl(args), packed_side=args.device_augment)
    packed_times, host_times = [], []
    for _ in range(args.rounds):
        packed_times.append(packed.run(args.steps) / args.steps)
        host_times.append(host_bench.run(args.steps) / args.steps)
    packed_step, host_step = statistics.median(packed_times), statistics.median(host_times)
    return {
        "device_augment_side": args.device_augment,
        "device_augment_step_ms": round(1000 * packed_step, 2),
        "device_augment_step_ms_all": [round(1000 * t, 2) for t in packed_times],
        "host_crop_step_ms": round(1000 * host_step, 2),
        "device_augment_img_per_s": round(args.batch_size / packed_step, 2),
        # Rounds ran back to back: the per-round ratio is the least noisy figure of the augmentation's cost.
        "device_augment_overhead_per_round": [round(p / h, 3) for p, h in zip(packed_times, host_times)],
        "device_augment_overhead": round(statistics.median(p / h for p, h in zip(packed_times, host_times)), 3),
    }


def host_bench_impl(args) -> str:
    return args.backward_impl.split(",")[0]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.torch_worker:
        torch_worker(args)
        return {}
    applied = configure_xla(args.xla_cpu_flags)
    import jax

    from alexnet_jax.model import alexnet as model_lib
    from alexnet_jax.model import build

    impls = args.backward_impl.split(",")
    for impl in impls:
        if impl not in build.BACKWARD_IMPL_CHOICES:
            raise SystemExit(f"--backward_impl={impl} is unknown; use {build.BACKWARD_IMPL_CHOICES}")
    jax_benches = {impl: JaxBench(args, impl) for impl in impls}
    jax_bench = jax_benches[impls[0]]
    result = {
        "bench": "train_step",
        "model": args.model,
        "batch_size": args.batch_size,
        "per_device_batch": jax_bench.per_device,
        "image_size": args.image_size,
        "dtype": args.dtype,
        "param_dtype": "float32",
        "input": args.input,
        "backend": jax.default_backend(),
        "devices": jax.local_device_count(),
        "device_kind": jax.local_devices()[0].device_kind,
        "jax_version": jax.__version__,
        "xla_flags": applied,
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "steps": args.steps,
        "rounds": args.rounds,
        "compile_s": round(jax_bench.compile_s, 2),
        "backward_impl": args.backward_impl,
        "backward_impl_resolved": build.resolve_backward_impl(impls[0]),
        "input_scale": jax_bench.input_scale,
        "group_conv": args.group_conv,
        "lrn_precision": args.lrn_precision,
        "prng_impl": args.prng_impl,
        "label": args.label,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    torch_bench = None
    if args.compare_torch:
        try:
            import torch
        except ImportError:
            print("torch is not installed: skipping --compare_torch", file=sys.stderr)
        else:
            if args.torch_process:
                torch_bench = TorchProcess(sys.argv[1:] if argv is None else list(argv), jax_bench.per_device)
                result.update(torch_bench.info, torch_process="separate")
            else:
                torch_bench = TorchBench(
                    args,
                    jax_bench.per_device,
                    channels_last=args.torch_channels_last,
                    compile_model=args.torch_compile,
                    autocast_bf16=args.dtype == "bfloat16",
                )
                result.update(
                    torch_version=torch.__version__, torch_threads=torch.get_num_threads(), torch_process="same"
                )
            result.update(
                torch_device=torch_bench.device,
                torch_channels_last=args.torch_channels_last,
                torch_compile=args.torch_compile,
            )

    impl_times = {impl: [] for impl in impls}
    jax_times, torch_times = impl_times[impls[0]], []
    for round_index in range(args.rounds):
        line = f"round {round_index}:"
        for impl, bench in jax_benches.items():
            impl_times[impl].append(bench.run(args.steps) / args.steps)
            line += f" jax[{impl}] {args.batch_size / impl_times[impl][-1]:.1f} img/s"
        if torch_bench is not None:
            torch_times.append(torch_bench.run(args.steps) / args.steps)
        if torch_times:
            line += f" torch {torch_bench.batch_size / torch_times[-1]:.1f} img/s"
        print(line, file=sys.stderr, flush=True)

    step_s = statistics.median(jax_times)
    flops = model_lib.train_flops_per_image(args.model, args.image_size, args.num_classes)
    result.update(
        step_ms=round(1000 * step_s, 2),
        step_ms_all=[round(1000 * t, 2) for t in jax_times],
        img_per_s=round(args.batch_size / step_s, 2),
        train_gflop_per_image=round(flops / 1e9, 4),
        tflop_per_s=round(args.batch_size * flops / step_s / 1e12, 4),
    )
    for impl in impls[1:]:
        other = statistics.median(impl_times[impl])
        result[f"img_per_s[{impl}]"] = round(args.batch_size / other, 2)
        result[f"step_ms_all[{impl}]"] = [round(1000 * t, 2) for t in impl_times[impl]]
    if torch_times:
        torch_step = statistics.median(torch_times)
        result.update(
            torch_step_ms=round(1000 * torch_step, 2),
            torch_step_ms_all=[round(1000 * t, 2) for t in torch_times],
            torch_batch_size=torch_bench.batch_size,
            torch_img_per_s=round(torch_bench.batch_size / torch_step, 2),
            # Per device: JAX's images/s over all its devices, divided by the device count.
            ratio_vs_torch=round(
                (args.batch_size / step_s / jax_bench.devices) / (torch_bench.batch_size / torch_step), 3
            ),
        )
        # Each round's JAX and PyTorch timings ran back to back: their ratio is the least noisy figure.
        per_round = [
            (args.batch_size / j / jax_bench.devices) / (torch_bench.batch_size / t)
            for j, t in zip(jax_times, torch_times)
        ]
        result["ratio_per_round"] = [round(r, 3) for r in per_round]
        result["ratio_median_of_rounds"] = round(statistics.median(per_round), 3)
    if args.device_augment:
        result.update(device_augment_figures(args, jax_bench))
    if args.input == "demo":
        batches = demo_batches(args, jax_bench.devices)
        jax_bench.run_loop(batches, args.warmup + 1)  # fill tf.data's and the device prefetch buffers
        loop_times, synth_times = [], []
        for _ in range(args.rounds):
            loop_times.append(jax_bench.run_loop(batches, args.steps) / args.steps)
            synth_times.append(jax_bench.run(args.steps) / args.steps)
        loop_step, synth_step = statistics.median(loop_times), statistics.median(synth_times)
        result.update(
            loop_step_ms=round(1000 * loop_step, 2),
            loop_step_ms_all=[round(1000 * t, 2) for t in loop_times],
            synthetic_step_ms=round(1000 * synth_step, 2),
            synthetic_step_ms_all=[round(1000 * t, 2) for t in synth_times],
            loop_img_per_s=round(args.batch_size / loop_step, 2),
            loop_vs_synthetic=round(loop_step / synth_step, 3),
            # Loop and synthetic timings of a round ran back to back: the least noisy figure.
            loop_vs_synthetic_per_round=[round(lt / st, 3) for lt, st in zip(loop_times, synth_times)],
            loop_vs_synthetic_median_of_rounds=round(
                statistics.median(lt / st for lt, st in zip(loop_times, synth_times)), 3
            ),
        )
    if isinstance(torch_bench, TorchProcess):
        torch_bench.close()
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["peak_device_mb"] = peak_device_mb(jax)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
