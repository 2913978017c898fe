"""Write a pre-resized copy of a dataset once, so that every epoch decodes smaller JPEGs.

    python -m alexnet_jax.commands.resize --data_dir=SRC --out=DST [--size=256] [--dataset=image_folder]
    python -m alexnet_jax.commands.resize --dataset=imagenet2012 --data_dir=TFDS_DIR --out=DST
    python -m alexnet_jax.commands.resize --check --data_dir=SRC     # decode every file, list the ones that fail

The command line of alexnet_jax.data.resize, where the work is done.
"""

from __future__ import annotations

import argparse
import os

from alexnet_jax import cli, paths
from alexnet_jax.data.resize import check_decodes, write_resized
from alexnet_jax.errors import UserError


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet_jax.commands.resize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="the image folder's root, or the TFDS data_dir")
    parser.add_argument("--out", default="", help="where the copy goes (must not exist)")
    parser.add_argument("--size", type=int, default=256, help="shorter side of the copy")
    parser.add_argument("--dataset", default="image_folder", help="image_folder or a prepared TFDS dataset")
    parser.add_argument("--workers", type=int, default=0, help="processes; 0 = one per core")
    parser.add_argument("--skip_bad_images", action="store_true", help="leave unreadable images out of the copy")
    parser.add_argument("--check", action="store_true", help="only decode every file and list those that fail")
    args = parser.parse_args(argv)
    if args.check:
        bad = check_decodes(args.data_dir)
        for path, error in bad:
            print(f"{path}: {error}")
        print(f"{len(bad)} file(s) fail to decode")
        return 1 if bad else 0
    if not args.out:
        raise UserError("pass --out=DST, a new directory for the resized copy")
    paths.writable_directory(os.path.dirname(os.path.abspath(args.out)), flag="--out's directory")
    record = write_resized(
        args.data_dir,
        args.out,
        size=args.size,
        dataset=args.dataset,
        workers=args.workers or None,
        skip_bad_images=args.skip_bad_images,
    )
    print(f"wrote {record['images']} images to {args.out} in {record['seconds']} s ({record['skipped']} skipped)")
    return 0


if __name__ == "__main__":
    cli.run(main)
