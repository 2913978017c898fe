"""Pack a dataset once as the paper's 256x256 images, so that training input never decodes.

    python -m alexnet_jax.commands.pack --data_dir=ROOT --out=DIR [--encoding=raw|jpeg] [--size=256]
    python -m alexnet_jax.commands.pack --dataset=imagenet2012 --data_dir=TFDS_DIR --out=DIR
    python -m alexnet_jax.commands.pack --check --data_dir=DIR     # recompute every checksum and count

The command line of alexnet_jax.data.pack, where the work is done.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from alexnet_jax import paths
from alexnet_jax.data.pack import DEFAULT_SHARD_MB, check_packed, write_packed
from alexnet_jax.errors import UserError


def _exit_on_sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess
    sys.exit(128 + signum)  # SystemExit unwinds through write_packed, which removes the staging directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet_jax.commands.pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="image folder root, TFDS data_dir, or (--check) DIR")
    parser.add_argument("--out", default="", help="where the pack goes (must not exist)")
    parser.add_argument("--encoding", default="raw", help="raw (uint8 records, no decode) or jpeg (quality 95)")
    parser.add_argument("--size", type=int, default=256, help="side of the stored images (the paper's 256)")
    parser.add_argument("--dataset", default="image_folder", help="image_folder or a prepared TFDS dataset")
    parser.add_argument("--train_split", default="train", help="TFDS split stored as 'train'")
    parser.add_argument("--eval_split", default="validation", help="TFDS split stored as 'validation'")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes; 0 = one per core")
    parser.add_argument("--skip_bad_images", action="store_true", help="leave unreadable images out of the pack")
    parser.add_argument("--shard_images", type=int, default=0, help="images per shard at most (0: no limit)")
    parser.add_argument("--shard_mb", type=float, default=DEFAULT_SHARD_MB, help="megabytes per shard at most")
    parser.add_argument("--check", action="store_true", help="verify the pack at --data_dir: counts and checksums")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check_packed(args.data_dir)
            for problem in problems:
                print(problem)
            print(f"{len(problems)} problem(s) in {args.data_dir}" if problems else f"{args.data_dir}: ok")
            return 1 if problems else 0
        if not args.out:
            raise UserError("pass --out=DIR, a new directory for the pack")
        paths.writable_directory(os.path.dirname(os.path.abspath(args.out)), flag="--out's directory")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        manifest = write_packed(
            args.data_dir,
            args.out,
            encoding=args.encoding,
            size=args.size,
            dataset=args.dataset,
            train_split=args.train_split,
            eval_split=args.eval_split,
            workers=args.workers or None,
            skip_bad_images=args.skip_bad_images,
            shard_images=args.shard_images,
            shard_mb=args.shard_mb,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split['count']:,} {name}" for name, split in manifest["splits"].items())
    skipped = sum(len(names) for names in manifest["skipped"].values())
    print(
        f"packed {counts} images ({args.encoding}, {args.size}px) to {args.out} in {manifest['seconds']} s"
        f" ({skipped} skipped)"
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", force=True)
    sys.exit(main())
