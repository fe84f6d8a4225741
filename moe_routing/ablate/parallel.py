"""Multi-process training of the ablation model: data parallel over every rank, FSDP2 (``fully_shard``) for the
non-expert parameters, expert parallelism (`AllToAllDispatcher`) for the experts, on a 2-D ``DeviceMesh``
(dp x ep) as torchtitan lays it out (pytorch/torchtitan, torchtitan/distributed/parallel_dims.py and
torchtitan/models/llama4/infra/parallelize.py: EP borrows its ranks from the data-parallel dimension, and the dense
parameters are sharded over all of them).

Gradients, with ``W = dp * ep`` ranks each running its own rows of the global batch:
- non-expert parameters (attention, norms, embeddings, routers, the recurrent router's GRU) are FSDP2 units over
  the flattened (dp, ep) mesh: reduce-scatter averages them over all W ranks.
- experts: rank (d, e) holds global experts ``[e*E/ep, (e+1)*E/ep)``; the all-to-all already brings every ep
  rank's contribution to the owner, so the owner's gradient is the sum over its ep group. They are all-reduced
  (summed) over the dp ranks holding the same shard and divided by W (`reduce_expert_grads`). Experts are kept
  out of FSDP (``ignored_params``), unlike torchtitan (which shards them over dp too), because the layer reads
  ``experts.w_gate`` outside the experts' forward (ERC's proxy loss): a sharded DTensor there would be wrong.
  The cost is one full copy of the local expert shard per dp rank.

Checkpoints gather everything into the single-process format (full tensors, plain expert keys), so a run can be
resumed at any world size and ep.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..control import moe_layers
from ..dispatch import AllToAllDispatcher
from ..experts import GroupedExperts
from ..settings import launcher_world_size

TIMEOUT = timedelta(minutes=10)  # a rank stuck in a collective raises after this instead of hanging forever


@dataclass(frozen=True)
class Parallel:
    """The process layout: ``world = dp * ep`` ranks, ``mesh`` the (dp, ep) DeviceMesh."""

    mesh: object
    rank: int
    world: int
    ep: int

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def flat_mesh(self):
        """The (dp, ep) mesh as one dimension of W ranks: FSDP2's mesh for the non-expert parameters."""
        return self.mesh._flatten("dp_ep") if self.world > 1 else self.mesh

    @property
    def ep_group(self):
        return self.mesh.get_group("ep")

    @property
    def expert_dp_group(self):
        """The ranks holding the same expert shard (one per dp index)."""
        return self.mesh.get_group("dp")

    def local_rows(self, global_batch: int) -> slice:
        """This rank's rows of every global batch."""
        per = global_batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def launched_by_torchrun() -> bool:
    return launcher_world_size() > 1


def init_parallel(ep: int, device: torch.device) -> Parallel:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA) and build the (dp, ep) mesh.

    ValueError (before any collective) when ``ep`` does not divide the world size."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size() if dist.is_initialized() else launcher_world_size()
    if world % ep:
        raise ValueError(f"--ep {ep} must divide the number of processes ({world})")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    mesh = init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return Parallel(mesh, dist.get_rank(), world, ep)


def check_batch(par: Parallel, global_batch: int, micro_batch: int) -> tuple[int, int]:
    """(micro-batch rows, micro-batches) of each rank: the global batch split evenly over the ranks, then into
    micro-batches of at most ``micro_batch`` rows."""
    if global_batch % par.world:
        raise ValueError(f"the global batch ({global_batch} sequences) must be divisible by the number of "
                         f"processes ({par.world})")
    per = global_batch // par.world
    micro = min(micro_batch, per)
    if per % micro:
        raise ValueError(f"each process's {per} sequences must split into micro-batches of {micro} "
                         "(--micro-batch)")
    return micro, per // micro


def expert_modules(model: nn.Module) -> list[GroupedExperts]:
    return [layer.experts for _, layer in moe_layers(model)]


def shard_experts(model: nn.Module, par: Parallel) -> None:
    """Give every MoE layer an `AllToAllDispatcher` over the ep group and keep only this rank's experts (sliced
    from the full ones, so all ranks start from the single-process initialisation). ep = 1: unchanged."""
    if par.ep == 1:
        return
    from ..losses.erc import ERCLoss

    for _, layer in moe_layers(model):
        if any(isinstance(loss, ERCLoss) for loss in layer.losses):
            raise ValueError("the ERC loss needs every expert's gate weights on every rank: router topk_erc runs "
                             "with --ep 1 only")
        full = layer.experts
        dispatcher = AllToAllDispatcher(par.ep_group)
        config = {"top_k": layer.top_k, "router": type(layer.router).__name__,
                  "capacity_factor": layer.capacity_factor, "drop_policy": layer.drop_policy}
        shard = dispatcher.build_experts(full.num_experts, full.hidden_size, full.ffn_hidden_size,
                                         full.activation, full.expert_impl, config=config,
                                         device=full.w_up.device, dtype=full.w_up.dtype)
        shard.load_state_dict(full.state_dict())  # the full plain keys: the shard slices out its range
        layer.dispatcher, layer.experts = dispatcher, shard


def parallelize(model: nn.Module, par: Parallel) -> nn.Module:
    """Shard the experts over ep (`shard_experts`), then ``fully_shard`` each block and the root over all ranks,
    experts left out. Call on the model built (and, on resume, loaded) exactly as in a single process."""
    from torch.distributed.fsdp import fully_shard

    shard_experts(model, par)
    experts = {p for m in expert_modules(model) for p in m.parameters()}
    # a parameter reachable from two blocks, or from a block and the root (the rmoe group's GRU and routers),
    # belongs to the root unit: FSDP2 gives each parameter to one unit, and the root's stays unsharded from its
    # forward to its backward, which covers every block's use of it
    owners: dict[nn.Parameter, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        owners.setdefault(p, set()).add(".".join(parts[:2]) if parts[0] == "blocks" else "root")
    shared = {p for p, where in owners.items() if len(where) > 1}
    mesh = par.flat_mesh
    for block in model.blocks:
        fully_shard(block, mesh=mesh, ignored_params=(experts | shared) & set(block.parameters()))
    in_blocks = {p for block in model.blocks for p in block.parameters()} - shared
    fully_shard(model, mesh=mesh, ignored_params=experts | in_blocks)
    return model


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, par: Parallel) -> None:
    """Expert gradients (complete over their ep group) summed over the dp ranks holding the same shard and
    divided by W: the mean over all ranks' losses, as FSDP gives the other parameters."""
    grads = [p.grad for m in expert_modules(model) for p in m.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if par.dp > 1:
        dist.all_reduce(flat, group=par.expert_dp_group)
    flat.div_(par.world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def clip_grad_norm(model: nn.Module, par: Parallel, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model: the squared norms of the FSDP shards summed over
    all ranks, those of the expert shards over the ep group (their dp replicas are equal), same clip formula."""
    from torch.distributed.tensor import DTensor

    experts = {id(p) for m in expert_modules(model) for p in m.parameters()}
    dev = next(model.parameters()).device
    sharded = torch.zeros((), dtype=torch.float32, device=dev)
    expert = torch.zeros((), dtype=torch.float32, device=dev)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        grads.append(p.grad)
        sq = g.float().square().sum()
        if id(p) in experts:
            expert += sq
        else:
            sharded += sq
    dist.all_reduce(sharded)
    if par.ep > 1:
        dist.all_reduce(expert, group=par.ep_group)
    total = (sharded + expert).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return total


def full_tensor(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_model_state(model: nn.Module, par: Parallel) -> dict[str, Tensor]:
    """The single-process state dict (full tensors, plain expert keys) on every rank (collective)."""
    from ..dispatch.sharding import _SHARD_KEY

    out, done = {}, {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in done:  # an alias (the rmoe routers): the same full tensor, so the checkpoint dedups it
            out[key] = done[id(value)]
            continue
        m = _SHARD_KEY.match(key)
        full = _gather_experts(value.detach(), par) if m is not None else full_tensor(value.detach())
        out[m["base"] if m is not None else key] = done[id(value)] = full
    return out


def _gather_experts(t: Tensor, par: Parallel) -> Tensor:
    if par.ep == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(par.ep)]
    dist.all_gather(parts, t.contiguous(), group=par.ep_group)
    return torch.cat(parts)


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, par: Parallel) -> dict:
    """``{param index: {key: full tensor}}`` in the single-process layout (collective)."""
    experts = {id(p) for m in expert_modules(model) for p in m.parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {}
    for i, p in enumerate(params):
        st = optimizer.state.get(p, {})
        row = {}
        for key, value in st.items():
            value = value if isinstance(value, Tensor) else torch.tensor(value)
            if id(p) in experts and value.dim():
                value = _gather_experts(value, par)
            row[key] = full_tensor(value)
        out[i] = row
    return out


def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[int, dict],
                          par: Parallel) -> None:
    """Load the single-process optimizer state ``{param index: {key: full tensor}}`` into this rank's shards."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    experts = {id(p) for m in expert_modules(model) for p in m.parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    local = {}
    for i, st in state.items():
        p, row = params[i], {}
        for key, v in st.items():
            if v.dim() and isinstance(p, DTensor):
                v = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            elif v.dim() and id(p) in experts and par.ep > 1:
                per = v.shape[0] // par.ep
                e = dist.get_rank(par.ep_group)
                v = v[e * per:(e + 1) * per].clone()
            row[key] = v
        local[i] = row
    sd["state"] = local
    optimizer.load_state_dict(sd)


def gather_rng_states() -> list[Tensor]:
    """Every rank's torch RNG state (its router noise stream), in rank order (collective)."""
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, torch.get_rng_state())
    return states


def all_reduce_sum(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t


def rank0_first(par: Optional[Parallel]):
    """A context manager: rank 0 runs the block first (e.g. filling a cache), the other ranks after it."""
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        if par is not None and not par.is_main:
            dist.barrier()
        yield
        if par is not None and par.is_main:
            dist.barrier()

    return ctx()
