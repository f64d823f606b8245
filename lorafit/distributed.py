"""More than one process: who this process is, the few collectives lorafit needs, and the launcher.

accelerate owns distribution: the process group, the DDP wrapper and its gradient all-reduce. lorafit only
needs its rank (to take its share of the batch stream and to write files once) and to sum a few numbers
across processes (trained tokens, losses, eval sums), so that N processes compute what one process would
with the same global batch. Every function here is a no-op in a single process.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lorafit.errors import LorafitError

# Environment variables by which launchers (torchrun, accelerate, MPI) announce how many processes there are.
_WORLD_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def process_state(device: torch.device):
    """accelerate's view of this process (initialising the process group when launched as several): NCCL on
    ``device`` when it is a GPU, else gloo on the CPU. Refuses processes that would train alone."""
    from accelerate import PartialState

    state = PartialState(cpu=device.type == "cpu")
    refuse_lonely_processes(str(state.distributed_type), os.environ)
    return state


def end_process_group() -> None:
    """Destroy the process group, if this process has one (a no-op in a single process). A process that
    exits with the group alive tears gloo's threads down at interpreter exit, which can abort it ("terminate
    called without an active exception") after a run that succeeded."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def refuse_lonely_processes(distributed_type: str, env: Mapping[str, str]) -> None:
    """Several processes launched, but accelerate runs each one alone (distributed type NO): each would train
    on all the data and write over the others' files. Refused, with the launch that works."""
    declared = max(int(env.get(name, "1") or 1) for name in _WORLD_VARIABLES)
    if declared > 1 and distributed_type.rsplit(".", 1)[-1] == "NO":
        raise LorafitError(f"{declared} processes were launched but accelerate sees no distributed setup "
                           "(distributed type NO), so each would train on all the data and overwrite the others' "
                           "files. Launch with: lorafit train RECIPE --nproc N, torchrun --nproc-per-node N -m "
                           "lorafit train RECIPE, or accelerate launch --multi_gpu --num_processes N -m lorafit "
                           "train RECIPE")


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_across(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all processes (fp64, so token counts stay exact)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def any_across(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true in any process (e.g. one of them got Ctrl-C): all then act together."""
    return sum_across([float(flag)], device)[0] > 0


def from_main(value: Any) -> Any:
    """The main process's ``value``, on every process (a small picklable object)."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def main_first(work: Callable[[], Any]) -> Any:
    """``work()`` in the main process first (it builds a cache), then in the others (they find it built). A
    user error in the main process reaches every process as the same error, instead of leaving the others
    waiting for it."""
    if world_size() == 1:
        return work()
    main = torch.distributed.get_rank() == 0
    result, problem = None, None
    if main:
        try:
            result = work()
        except LorafitError as err:
            problem = str(err)
    problem = from_main(problem)
    if problem is not None:
        raise LorafitError(problem)
    return result if main else work()


def gather_all(value: Any) -> list[Any]:
    """``value`` from every process, in rank order, on every process (small picklable objects)."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def shard(objective: torch.nn.Module, model: torch.nn.Module, device: torch.device,
          compute_dtype: torch.dtype | None) -> None:
    """FSDP2 (PyTorch's ``fully_shard``, which accelerate's FSDP2 plugin also calls): each decoder layer its own
    shard group, the rest (embeddings, norm, head) in the root ``objective``; modules are changed in place and
    their parameters become DTensors, so the optimizer must be built afterwards. lorafit calls it itself
    because accelerate falls back to DDP on CPU.

    ``compute_dtype``: the dtype layers run in when the base weights are 16-bit; fp32 adapter weights are then
    gathered in that dtype (what a layer casts them to anyway) and gradients reduced in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise LorafitError(f"train.fsdp: {type(model).__name__} names no decoder layer class "
                           "(_no_split_modules), so lorafit cannot tell what to shard; set train.fsdp: false")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(objective, mesh=mesh, mp_policy=policy)


def is_sharded(module: torch.nn.Module | None) -> bool:
    """True for a module FSDP sharded (``shard``); False for any other, or None."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(objective: torch.nn.Module, accelerator, enabled: bool):
    """Inside: backward all-reduces (DDP) / reduce-scatters (FSDP) gradients only if ``enabled``; micro-batches
    before a step's last accumulate locally."""
    if is_sharded(objective):
        objective.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            objective.set_requires_gradient_sync(True)
    elif enabled:
        yield
    else:
        with accelerator.no_sync(objective):
            yield


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every process must call it), else ``tensor``."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def launch(nproc: int, train_args: list[str]) -> int:
    """Run ``lorafit train *train_args`` as ``nproc`` processes on this machine through accelerate's launcher
    (its torchrun-based multi-process launcher: NCCL on CUDA, gloo on CPU). Returns 0, or 2 when a process
    failed: each process has printed its own message, so the launcher's traceback is not shown."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    from lorafit.device import compute_device

    if compute_device().type == "cuda" and nproc > torch.cuda.device_count():
        raise LorafitError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                           "use at most one process per GPU (or LORAFIT_DEVICE=cpu for CPU processes)")
    args = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "0", "--module", "lorafit", "train", *train_args])
    # torchrun's standalone rendezvous: its store binds port 0 itself and the processes join that store, so no
    # port is chosen, released and then taken by someone else in between (a free-port probe's race).
    args.standalone = True
    try:
        launch_command(args)
    except Exception as err:  # torch's ChildFailedError (or the launcher's own): a process exited non-zero
        print(f"lorafit: {nproc} processes launched; at least one failed ({type(err).__name__}), see above",
              file=sys.stderr)
        return 2
    return 0
