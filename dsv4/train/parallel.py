"""Data + expert parallelism applied from outside the (single-device) model: FSDP2 and an expert-parallel MoE.

    torchrun --nproc-per-node N -m dsv4.train.cli --preset tiny --out runs/dp

Layout over one process group of N ranks (NCCL on GPUs, gloo on CPU):
  data parallel     every rank takes B/N rows of each global batch (the same loader on every rank, so the
                    data order equals the one-process run); non-expert parameters are sharded with FSDP2
                    (`fully_shard` per trunk block, then the root with embedding, head and MTP block), gradients
                    averaged over ranks. The lightning indexers are replicated instead (see below).
  expert parallel   the routed experts of every MoE layer are split: rank r keeps experts
                    [r E/N, (r+1) E/N) and drops the rest (`ExpertShard`: the stacked w1/w2/w3 become DTensors
                    sharded along the expert dim). Dispatch is an all-gather of the tokens, their
                    routing weights and indices; each rank runs its own experts on every token routed to
                    them, and an all-reduce sums the partial outputs, of which each rank keeps its rows.
                    (Simple and exact; an all-to-all dispatch that moves only routed tokens is the
                    bandwidth-efficient version and is not done here.) Expert gradients are therefore
                    computed over the global batch on their owner and are not reduced again.
  replicated        every rank keeps whole lightning indexers; their gradients are all-reduced (averaged) once
                    per optimizer step, and every rank takes the same optimizer step. Why not FSDP: in the
                    indexer warm-up (report §3) the backbone is frozen and the indexer sees detached inputs, so
                    no gradient reaches a block's output and FSDP2's pre-backward all-gather of the block never
                    runs while backward reads the indexer's (resharded, freed) weights; an indexer shard group
                    of its own does not help either, because the indexer runs once per packed document (a
                    number that differs between ranks) and FSDP2 issues one all-gather per call. The cost is
                    memory on every rank: V4-Flash's indexers are 0.23 B parameters (0.08 % of the model, 3 % of
                    its non-expert part), ~2.7 GB as fp32 weights + gradients + Muon momentum.
The router's balancing bias is a buffer updated from loads summed over ranks, so it stays identical.
"""

from __future__ import annotations

import os
import types
import warnings

import torch
import torch.distributed as dist
from torch import nn

from dsv4.moe import Experts, MoE, expert_key


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class Parallel:
    def __init__(self, device_type: str = "cpu", expert_parallel: bool = True):
        if not dist.is_initialized():
            raise RuntimeError("initialise the process group first (torchrun, or Parallel.from_env())")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.device_type = device_type
        self.expert_parallel = expert_parallel
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(device_type, (self.world,))
        self._expert_params: list[nn.Parameter] = []
        self._replicated_params: list[nn.Parameter] = []

    @classmethod
    def from_env(cls, expert_parallel: bool = True) -> "Parallel":
        """The process group of a torchrun launch: NCCL when CUDA is there, else gloo."""
        cuda = torch.cuda.is_available()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return cls("cuda" if cuda else "cpu", expert_parallel)

    def close(self) -> None:
        """At the end of a run (every rank calls it): a barrier first, so no rank tears the process group down
        while another still uses it (gloo aborts the slower process then)."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------------ applying it
    def parallelize(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from dsv4.compressor import Indexer

        self._expert_params = []  # of this model (a process may build several Trainers)
        if self.expert_parallel:
            for moe in (m for m in model.modules() if isinstance(m, MoE)):
                self._shard_experts(moe)
        self._replicated_params = [p for m in model.modules() if isinstance(m, Indexer) for p in m.parameters()]
        ignored = set(self._expert_params) | set(self._replicated_params)
        for block in model.layers:
            fully_shard(block, mesh=self.mesh, ignored_params=ignored)
        fully_shard(model, mesh=self.mesh, ignored_params=ignored)
        # The MTP block stays with the root's shard group: `mtp_logits` (registered so that it gathers the
        # root's parameters like forward does) uses the block's tensors outside its own forward.
        register_fsdp_forward_method(model, "mtp_logits")
        return model

    def expert_range(self, n_experts: int) -> tuple[int, int]:
        if n_experts % self.world:
            raise ValueError(f"{n_experts} routed experts do not split evenly over {self.world} ranks")
        per = n_experts // self.world
        return self.rank * per, (self.rank + 1) * per

    def _shard_experts(self, moe: MoE) -> None:
        lo, hi = self.expert_range(moe.n_experts)
        moe.experts = ExpertShard(moe.experts, lo, hi, self.mesh)
        self._expert_params += list(moe.experts.parameters())
        moe._ep = self
        moe.routed = types.MethodType(_expert_parallel_routed, moe)

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        dist.barrier()

    @torch.no_grad()
    def finish_grads(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """After backward: expert gradients (summed over every rank's loss, each scaled by the world size)
        are divided by the world size, as FSDP does for the rest; replicated gradients are averaged over
        ranks; then global-norm clipping over all ranks. Returns the gradient norm before clipping."""
        for p in self._expert_params:
            if p.grad is not None:
                p.grad.div_(self.world)
        self._average_replicated_grads()
        replicated = {id(p) for p in self._replicated_params}
        sq = torch.zeros((), dtype=torch.float64, device=self._device())
        grads = []
        for p in model.parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            if id(p) in replicated and self.rank != 0:
                continue  # the same whole gradient on every rank: counted once
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            sq += local.double().square().sum()
        norm = self.all_reduce(sq).sqrt().float()
        if max_norm:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                (g.to_local() if hasattr(g, "to_local") else g).mul_(coef.to(g.dtype))
        return norm

    def gradient_sync(self, model: nn.Module, on: bool) -> None:
        """Whether the next backward reduce-scatters gradients (FSDP2). Off for all but the last micro-batch
        of a step: the unsharded gradients accumulate locally (memory: one unsharded gradient per shard group,
        kept until the step's last backward) and cross the network once per step."""
        model.set_requires_gradient_sync(on)

    def reshard(self, model: nn.Module) -> None:
        """Reshard every FSDP unit after a backward pass. FSDP2 does it in a callback that the first sharded
        module whose output gets a gradient queues; in the indexer warm-up none does (backbone frozen,
        replicated indexers on detached inputs), so the root, which stays gathered from forward to backward,
        would stay gathered, its parameters keeping the requires_grad of the warm-up: the next phase would
        give them no gradient. A no-op when FSDP2's callback ran."""
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def _average_replicated_grads(self) -> None:
        """One all-reduce for every trainable replicated parameter (the set is the same on every rank: it
        depends on the phase only). A rank whose rows gave a parameter no gradient (say, no finished
        compressed entry) adds zeros; one that no rank gave a gradient stays None, as in one process, so
        the optimizer leaves it and its moments alone."""
        params = [p for p in self._replicated_params if p.requires_grad]
        if not params:
            return
        like = params[0]
        flat = torch.cat([torch.tensor([p.grad is not None for p in params], dtype=like.dtype, device=like.device)]
                         + [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dist.all_reduce(flat)
        seen, offset = flat[:len(params)].tolist(), len(params)
        for p, n in zip(params, seen):
            g = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            p.grad = g.div_(self.world) if n else None

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.device_type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state dict (CPU tensors) on every rank: shards gathered, experts too."""
        sd = {}
        for name, t in model.state_dict().items():
            if self.expert_parallel and _is_routed_expert(name):
                continue  # this rank's experts only: gathered whole below
            sd[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()
        for prefix, experts in ((n, m) for n, m in model.named_modules() if isinstance(m, ExpertShard)):
            for matrix in Experts.MATRICES:
                whole = getattr(experts, matrix).full_tensor().detach().cpu()  # (E, out, in)
                sd.update({expert_key(f"{prefix}.", e, matrix): w for e, w in enumerate(whole.unbind(0))})
        return sd

    @torch.no_grad()
    def full_optimizer_state(self, model: nn.Module, optimizer) -> dict[str, dict]:
        """The optimizer's state by parameter name, whole tensors on CPU, on every rank (shards gathered, the
        experts' too), so that any number of ranks can load it (`place_like`)."""
        state = optimizer.state
        # Every rank has state for the same parameters (the experts' included: every rank's shard of them gets a
        # gradient, zero where no token came), in the same order, so the collectives of `full_tensor` line up.
        return {name: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                       if torch.is_tensor(v) else v for k, v in state[p].items()}
                for name, p in model.named_parameters() if state.get(p)}

    @torch.no_grad()
    def load_full_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        # What a checkpoint holds: parameters (this rank's experts only) and persistent buffers; the RoPE
        # frequency tables are non-persistent buffers, rebuilt from the config.
        own = model.state_dict(keep_vars=True)
        missing = [k for k in own if k not in sd]
        if missing:
            from dsv4.train.trainer import CheckpointMismatch

            raise CheckpointMismatch(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
        for name, p in own.items():
            full = place_like(sd[name].to(p.dtype), p)
            if hasattr(p, "to_local"):
                p.to_local().copy_(full.to_local())
            else:
                p.copy_(full)


def place_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` (the same whole tensor on every rank) laid out as `param`: this rank's shard of a sharded
    parameter (cut locally, no communication), else a copy on the parameter's device."""
    from dsv4.optim.muon import shard_like

    full = full.to(param.device)
    return shard_like(full, param) if hasattr(param, "device_mesh") else full


class ExpertShard(Experts):
    """Experts [lo, hi) of a layer's `Experts`, the rest dropped: w1/w2/w3 are DTensors sharded along the expert
    dim over the mesh (rank r holds rows [r E/N, (r+1) E/N), as `Parallel.expert_range` splits them). Their global
    shape is the whole layer's, so the optimizer state saved whole by name is cut back to this rank by
    `place_like` like an FSDP shard's, and Muon orthogonalises each local matrix where it lies. The state dict
    holds this rank's experts under their official keys (`Experts.local` gives the plain local rows)."""

    holds_all = False

    def __init__(self, whole: Experts, lo: int, hi: int, mesh):
        from torch.distributed.tensor import DTensor, Shard

        super().__init__(hi - lo, whole.w1.shape[2], whole.w1.shape[1], whole.limit)
        self.first = lo
        for matrix in self.MATRICES:
            rows = getattr(whole, matrix).detach()[lo:hi].clone()
            setattr(self, matrix, nn.Parameter(DTensor.from_local(rows, mesh, [Shard(0)], run_check=False)))

    def local(self, matrix: str) -> torch.Tensor:
        return getattr(self, matrix).to_local()


def _is_routed_expert(name: str) -> bool:
    return ".shared_experts." not in name and ".experts." in name


def _expert_parallel_routed(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                            fp4: bool = False) -> torch.Tensor:
    """MoE.routed over the ranks: x (N, d) local tokens -> (N, d) routed output (see the module docstring)."""
    import torch.distributed.nn.functional as dnn

    par = self._ep
    N = x.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.distributed.nn's autograd collectives
        xs = torch.cat(dnn.all_gather(x))  # (world N, d)
        ws = torch.cat(dnn.all_gather(weights))
        ids = [torch.empty_like(indices) for _ in range(par.world)]
        dist.all_gather(ids, indices.contiguous())
        ids = torch.cat(ids)
        out = self.experts(xs, ws, ids, fp4)  # this rank's experts (an ExpertShard) only
        out = dnn.all_reduce(out)
    return out[par.rank * N:(par.rank + 1) * N]
