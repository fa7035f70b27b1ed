"""The device mesh and how arrays are laid out on it: data parallelism over one 'data' axis.

The train state is replicated on every device; batches are split along their first axis, one
slice per device. Each process supplies the slices of its own devices (`global_batch`), so a
global batch is assembled without any process reading another's data.
"""

import collections
import itertools
import os
from collections.abc import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
    """A one-axis mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str) -> None:
    """One clear error when a global batch cannot be split evenly over the devices."""
    if batch_size % mesh.size:
        raise ValueError(f'{what} {batch_size} must be a multiple of the number of devices, '
                         f'{mesh.size}')


def global_batch(local_arrays, mesh: Mesh):
    """This process's slices of a batch (numpy) -> global arrays sharded along the data axis."""
    sharding = batch_sharded(mesh)
    return tuple(jax.make_array_from_process_local_data(sharding, array)
                 for array in local_arrays)


def prefetch_to_mesh(batches: Iterable, mesh: Mesh, size: int = 2) -> Iterator[tuple]:
    """`global_batch(batch, mesh)` of each of `batches`, with the next `size` batches already
    sent: their host-to-device copies are issued (asynchronously) before the step that runs on
    the current batch is dispatched, so on an accelerator they overlap it. The batches and
    their order are unchanged. Written here because flax.jax_utils.prefetch_to_device does this
    only for pmap's per-device stacks, not for a global batch sharded over a mesh."""
    iterator = iter(batches)
    ahead = collections.deque(global_batch(batch, mesh)
                              for batch in itertools.islice(iterator, size))
    while ahead:
        current = ahead.popleft()
        ahead.extend(global_batch(batch, mesh) for batch in itertools.islice(iterator, 1))
        yield current


def initialize_processes(coordinator_address: str | None = None,
                         num_processes: int | None = None,
                         process_id: int | None = None) -> None:
    """Joins a multi-process run: explicitly (all three arguments) or as a SLURM task.

    Under SLURM with more than one task, JAX reads the coordinator, the process count and this
    process's index from the job's environment. A single process needs no initialisation.
    Must run before JAX touches any device.
    """
    explicit = coordinator_address is not None
    in_slurm_job = int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ
    if not explicit and not in_slurm_job:
        return
    if explicit and (num_processes is None or process_id is None):
        raise ValueError('--coordinator_address needs --num_processes and --process_id too')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
