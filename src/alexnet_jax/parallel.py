"""Devices and processes: distributed start-up and host -> device placement of batches."""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "batch"  # the pmap axis name the steps reduce over

log = logging.getLogger(__name__)


def local_mesh() -> Mesh:
    return Mesh(np.array(jax.local_devices()), (AXIS,))


def shard_to_devices(batch: dict[str, np.ndarray], mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """Put [local_devices, per_device, ...] host arrays one slice per local device.

    The placement matches what the pmap'ed step expects, so no copy happens at call time.
    """
    sharding = NamedSharding(mesh or local_mesh(), PartitionSpec(AXIS))
    return {key: jax.device_put(value, sharding) for key, value in batch.items()}


def prefetch_to_device(batches: Iterable[dict[str, np.ndarray]], size: int = 2) -> Iterator[dict[str, jax.Array]]:
    """Keep `size` batches in flight to the devices while the step runs (transfers are async)."""
    mesh = local_mesh()
    queue: collections.deque = collections.deque()
    iterator = iter(batches)
    for batch in itertools.islice(iterator, size):
        queue.append(shard_to_devices(batch, mesh))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(iterator, 1):
            queue.append(shard_to_devices(batch, mesh))


def describe() -> str:
    return (
        f"process {jax.process_index()} of {jax.process_count()}; "
        f"{jax.local_device_count()} local / {jax.device_count()} total devices "
        f"({jax.devices()[0].platform})"
    )
