"""Seconds per GB to verify a checkpoint against its manifest (sha256 of every file), page cache warm and cold.

    python bench/checkpoint_verify.py [--workdir=/tmp/verify_bench] [--megabytes=250]

Saves a state of float32 noise through the project's Checkpointer (which writes
MANIFEST.json), then times manifest.verify_step twice with the files in the
page cache and twice after dropping it (`echo 3 > /proc/sys/vm/drop_caches`,
root only; skipped otherwise). Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/verify_bench")
    parser.add_argument("--megabytes", type=int, default=250)
    args = parser.parse_args()
    import jax.numpy as jnp
    import numpy as np

    from alexnet_jax.checkpointing import checkpoint, manifest, storage

    shutil.rmtree(args.workdir, ignore_errors=True)
    rng = np.random.default_rng(0)
    per_leaf = args.megabytes * (1 << 20) // 4 // 10
    state = {f"w{i}": jnp.asarray(rng.standard_normal(per_leaf).astype(np.float32)) for i in range(10)}
    saver = checkpoint.Checkpointer(args.workdir)
    start = time.perf_counter()
    saver.save(1, state, {"model": "bench"})
    saver.wait()
    result = {"bench": "checkpoint_verify", "save_with_manifest_s": round(time.perf_counter() - start, 3)}
    saver.close()
    step_dir = os.path.join(saver.directory, "1")
    size = storage.directory_bytes(step_dir)
    result["bytes"] = size
    can_drop = os.geteuid() == 0
    for label in ("warm", "warm2", "cold", "cold2"):
        if label.startswith("cold"):
            if not can_drop:
                continue
            subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)
        start = time.perf_counter()
        verdict = manifest.verify_step(step_dir)
        elapsed = time.perf_counter() - start
        assert verdict.problem is None and verdict.manifest
        result[f"verify_{label}_s_per_GB"] = round(elapsed / (size / 1e9), 3)
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    shutil.rmtree(args.workdir)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
