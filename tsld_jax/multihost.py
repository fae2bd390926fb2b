"""Joining a multi-process run (`jax.distributed`), one process per host (or per GPU).

Launchers differ in what they tell a process. SLURM and Open MPI set variables that
`jax.distributed.initialize()` reads by itself (cluster auto-detection); a plain list of hosts
has no launcher, so the coordinator address, the number of processes and this process's id are
given explicitly: as arguments (train.py's --coordinator_address, --num_processes,
--process_id) or as the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID. Whatever is left unset is auto-detected.
"""

from __future__ import annotations

import os

import jax

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


class MultihostError(ValueError):
    """A multi-process run that cannot be joined as configured: one line, exit 2."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise MultihostError(f"--multihost: {name}={value!r} is not an integer") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins the run: `jax.distributed.initialize` with the given (or environment) settings.

    Args:
      coordinator_address: "host:port" of process 0, which every process can reach (process 0
        listens on that port); None: JAX_COORDINATOR_ADDRESS or auto-detected.
      num_processes: processes in the run; None: JAX_NUM_PROCESSES or auto-detected.
      process_id: this process's id, 0 .. num_processes - 1; None: JAX_PROCESS_ID or
        auto-detected.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_COUNT)
    process_id = process_id if process_id is not None else _env_int(ENV_ID)
    if num_processes is not None and num_processes < 1:
        raise MultihostError(f"--multihost: the number of processes {num_processes} is not >= 1")
    if process_id is not None and process_id < 0:
        raise MultihostError(f"--multihost: the process id {process_id} is negative")
    if num_processes is not None and process_id is not None:
        if not 0 <= process_id < num_processes:
            raise MultihostError(
                f"--multihost: the process id {process_id} is not in 0 .. {num_processes - 1} "
                f"({num_processes} processes)"
            )
    # CPU collectives across processes need an implementation (gloo, built into jaxlib): the
    # default on jax 0.10-0.12, set here for any version where it is not. GPUs use NCCL and
    # ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    except ValueError as error:
        # jax's own checks of the settings (no coordinator found, and so on); a coordinator
        # that does not answer is jax's RuntimeError after its timeout, left as it is.
        first = str(error).strip().splitlines()[0] if str(error).strip() else "ValueError"
        raise MultihostError(
            f"--multihost: {first} Pass --coordinator_address HOST:PORT, --num_processes and "
            f"--process_id (or {ENV_ADDRESS}, {ENV_COUNT}, {ENV_ID}), or start under SLURM or "
            "Open MPI"
        ) from None
