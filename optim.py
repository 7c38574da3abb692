"""
The optimizers: AdamW over the model's parameter groups (GPT.param_groups, model.py), or Muon
for the blocks' matrices beside AdamW for the rest.

    configure_optimizers   [AdamW], or [Muon, AdamW]: train.py, align.py and bench.py step each
    Muon                   momentum, orthogonalised (newton_schulz) before it is applied

Muon (Keller Jordan, 2024; modded-nanogpt's speedrun, nanochat) replaces each 2-D weight's
update by the nearest semi-orthogonal matrix to its momentum: every direction of the matrix
moves by about the same amount, whatever the gradient's spectrum. docs/modern.md has the
measurements behind using it. Under FSDP the matrices are dealt to the ranks in turn: each is
orthogonalised on one rank, which sends the others their rows (rows_from_owner).
"""

import inspect

import torch

from configurator import native_bf16_gpu


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, muon=None, verbose=True):
    """The optimizers, as a list: [AdamW], or with muon (a dict: lr, momentum, weight_decay)
    [Muon, AdamW]. The caller steps every one of them.

    model.param_groups says which tensor goes where: AdamW decays the matrices and embeddings
    and not the biases and norm gains; with muon the blocks' matrices go to Muon instead.
    Every param group records its starting lr as base_lr: the schedule multiplies it."""
    adamw_groups, muon_groups = model.param_groups(weight_decay, muon=muon is not None)
    decay, no_decay = (g["params"] for g in adamw_groups)
    for group in adamw_groups:
        group["base_lr"] = learning_rate
    # the fused kernel updates all tensors in a few passes instead of one op per tensor and
    # step: on CUDA far fewer launches, on CPU (torch >= 2.4) half the optimizer time
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    say = print if verbose else (lambda *a: None)
    say(f"decayed tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
    say(f"non-decayed tensors: {len(no_decay)}, with {sum(p.numel() for p in no_decay):,} parameters")
    say(f"using fused AdamW: {fused}")
    adamw = torch.optim.AdamW(adamw_groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))
    if muon is None:
        return [adamw]
    for group in muon_groups:
        group["base_lr"] = muon["lr"]
    matrices = [p for g in muon_groups for p in g["params"]]
    # bf16 Newton-Schulz only where the GPU multiplies bf16 natively; emulated, it is ~50x slower than fp32
    ns_dtype = torch.bfloat16 if device_type == "cuda" and native_bf16_gpu() else torch.float32
    say(f"Muon tensors: {len(matrices)}, with {sum(p.numel() for p in matrices):,} parameters; "
        f"q, k, v apart: {muon_groups[0]['split'] != 1}; Newton-Schulz in {str(ns_dtype).replace('torch.', '')}")
    opt = Muon(muon_groups, lr=muon["lr"], momentum=muon["momentum"], weight_decay=muon["weight_decay"],
               ns_dtype=ns_dtype)
    return [opt, adamw]


def newton_schulz(G, steps=5, dtype=torch.bfloat16, eps=1e-7):
    """G (A, B) -> about the nearest semi-orthogonal matrix, U V^T of G = U S V^T: every
    singular value pushed to roughly 1 (0.7-1.2; exactly 1 is not needed) by five steps of the
    quintic X <- aX + b(XX^T)X + c(XX^T)^2 X, with Keller Jordan's coefficients (they maximise
    the slope at zero, so small singular values grow fastest). Works on the wide side (A <= B),
    so XX^T is the smaller Gram matrix. dtype: bf16 where the hardware multiplies it natively
    (Ampere and newer GPUs); fp32 elsewhere, where bf16 would be emulated and ~50x slower."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = G.size(0) > G.size(1)
    X = G.to(dtype)
    X = X.T if tall else X
    X = X / X.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: singular values <= 1
    for _ in range(steps):
        A = X @ X.T  # (A, A)
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return (X.T if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: SGD with Nesterov momentum whose update is orthogonalised
    (newton_schulz), so that every direction of the matrix moves by about the same amount,
    whatever the gradient's spectrum. An (A, B) matrix's step is scaled by sqrt(max(1, A/B)),
    as in Keller Jordan's Muon (the speedrun's learning rates assume it). A param group's
    "split" cuts each matrix into that many equal row blocks, or blocks of the listed row
    counts, orthogonalised apart (c_attn's q, k, v; a SwiGLU c_fc's gate and up). Weight decay
    is decoupled: lr * weight_decay per step. The state is one "momentum_buffer" per weight, as
    torch.optim.Muon's (with split=1 and bf16 the steps are the same as torch.optim.Muon's,
    adjust_lr_fn="original": a test checks it)."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5,
                 ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps, split=1))
        self.ns_dtype = ns_dtype  # the device's, not the checkpoint's: not in the param groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # (the Optimizer interface; train.py passes none)
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, split = group["lr"], group["momentum"], group.get("split", 1)
            n_sharded = 0  # FSDP: the sharded matrices of this group so far (which rank orthogonalises which)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)  # buf = mom * buf + (1 - mom) * grad
                update = p.grad.lerp(buf, mom) if group["nesterov"] else buf  # Nesterov: look one step ahead
                # FSDP: p, its gradient and buffer are DTensors, this rank's rows of each. Newton-
                # Schulz needs the whole matrix: gathered once, then plain tensors (DTensor would
                # give the same numbers op by op, at 2.6x the time on CPU). The matrices are dealt
                # to the ranks in turn: one rank orthogonalises a matrix and sends every rank its rows
                sharded = hasattr(update, "full_tensor")
                if sharded:
                    update = update.full_tensor()
                # each block of rows its own matrix, with its own shape's scale (relative to the
                # first block's, which goes into alpha: equal blocks multiply by exactly 1)
                blocks = update.split(split, dim=0) if isinstance(split, list) else update.chunk(split, dim=0)
                scales = [max(1, u.size(0) / u.size(1)) ** 0.5 for u in blocks]
                orthogonalise = lambda: torch.cat([newton_schulz(u, group["ns_steps"], self.ns_dtype) * (s / scales[0])
                                                   for u, s in zip(blocks, scales)])
                if sharded:
                    update = rows_from_owner(orthogonalise, update, p, owner=n_sharded % p.device_mesh.size())
                    n_sharded += 1
                else:
                    update = orthogonalise()
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * scales[0])
        return loss


def rows_from_owner(orthogonalise, full, shard, owner):
    """This rank's rows, as a DTensor like shard, of the matrix that orthogonalise() makes from
    full (an FSDP weight's whole update): computed on rank `owner` of shard's mesh alone, which
    sends each rank its rows (a scatter of torch.chunk's pieces, padded to one size: ranks past
    the last piece get none). Every rank of the mesh calls it for every sharded matrix, in order."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    mesh = shard.device_mesh
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    mine = torch.empty(-(-full.size(0) // world), full.size(1), dtype=full.dtype, device=full.device)
    pieces = None
    if rank == owner:
        pieces = [torch.zeros_like(mine) for _ in range(world)]
        for r, piece in enumerate(orthogonalise().chunk(world, dim=0)):
            pieces[r][:piece.size(0)] = piece
    dist.scatter(mine, pieces, src=dist.get_global_rank(group, owner), group=group)
    n = shard.to_local().size(0)
    if n != (full[rank * mine.size(0):(rank + 1) * mine.size(0)]).size(0):  # (FSDP's layout changed: fail loudly)
        raise RuntimeError(f"Muon under FSDP: {n} rows in this rank's shard, not torch.chunk's")
    # the global shape is given, not inferred: from_local would take it as rows x ranks, wrong
    # (and different on each rank) when the rows do not split evenly
    return DTensor.from_local(mine[:n].contiguous(), mesh, shard.placements, run_check=False,
                              shape=shard.shape, stride=shard.stride())
