"""Block-wise Adam with Block-wise Moment Approximation (BMA), on torch.optim.Adam state.

One visit of client i to block k (see ../shared/DECA.md; tensors shaped like the block):

    step():   torch.optim.Adam updates theta -> half, leaving m', v' in its state
              (bias correction uses Adam's own step count r+1: moments restart per visit)
    -- gossip elsewhere: mixed = sum_j W[i,j] * half_j --
    fold(mixed):
              h = (theta - mixed) / lr                         discrepancy="scaled" (default)
                = mixed - theta                                discrepancy="raw"
                = (theta - mixed) / ||theta - mixed||          discrepancy="normalized"
              bma="full":    m = b1*m' + (1-b1)*h,  v = b2*v' + (1-b2)*h*h
              bma="none":    m = m',                v = v'
              bma="trivial": m = b1*m  + (1-b1)*h,  v = b2*v  + (1-b2)*h*h   (pre-step m, v)
              theta = mixed

theta is the block BEFORE the local step, so the optimizer keeps a copy of it (one extra block
of fp32, the "discrepancy buffer"). A new BlockAdam is built per visit: fresh moments.

    exercised by: pytest tests/test_optimizer.py
"""

from __future__ import annotations

import torch

BMA_MODES = ("full", "none", "trivial")
DISCREPANCIES = ("scaled", "raw", "normalized")


class BlockAdam:
    """Adam over the fp32 master tensors of the active block, plus the BMA fold."""

    def __init__(
        self,
        masters: list[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        bma: str = "full",
        bma_betas: tuple[float, float] = (0.9, 0.999),
        discrepancy: str = "scaled",
    ) -> None:
        if bma not in BMA_MODES:
            raise ValueError(f"bma must be one of {BMA_MODES}, got '{bma}'")
        if discrepancy not in DISCREPANCIES:
            raise ValueError(f"discrepancy must be one of {DISCREPANCIES}, got '{discrepancy}'")
        if discrepancy == "scaled" and lr == 0 and bma != "none":
            raise ValueError("discrepancy='scaled' divides by lr: lr=0 needs bma='none'")
        self.masters = masters
        self.lr = lr
        self.bma = bma
        self.bma_betas = bma_betas
        self.discrepancy = discrepancy
        # foreach=None: torch's multi-tensor kernel on CUDA; on CPU the per-tensor loop measured ~2x faster
        # (bench/fast_paths.py)
        self.adam = torch.optim.Adam(masters, lr=lr, betas=betas, eps=eps, foreach=None)
        self._theta_before: list[torch.Tensor] = []
        self._moments_before: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def steps_taken(self) -> int:
        state = self.adam.state.get(self.masters[0])
        return int(state["step"]) if state else 0

    @torch.no_grad()
    def step(self) -> None:
        """theta -> half with Adam; remembers theta (and, for trivial BMA, the old moments)."""
        if self.bma != "none":
            self._theta_before = [m.detach().clone() for m in self.masters]
        if self.bma == "trivial":
            self._moments_before = [self._moments(m) for m in self.masters]
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)

    @torch.no_grad()
    def fold(self, mixed: list[torch.Tensor]) -> None:
        """Set theta = mixed and fold the consensus signal into Adam's moments (per `bma`)."""
        if len(mixed) != len(self.masters):
            raise ValueError(f"fold got {len(mixed)} tensors for a block of {len(self.masters)}")
        if self.bma != "none" and self._theta_before:
            b1, b2 = self.bma_betas
            signals = self._signals(mixed)
            for i, (master, h) in enumerate(zip(self.masters, signals)):
                state = self.adam.state[master]
                if self.bma == "full":
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                else:  # trivial: start from the moments before the gradient step
                    m, v = self._moments_before[i]
                state["exp_avg"] = m.mul_(b1).add_(h, alpha=1 - b1)  # in place: no new block-sized tensors
                state["exp_avg_sq"] = v.mul_(b2).addcmul_(h, h, value=1 - b2)
        for master, value in zip(self.masters, mixed):
            master.copy_(value)
        self._theta_before = []
        self._moments_before = []

    def _signals(self, mixed: list[torch.Tensor]) -> list[torch.Tensor]:
        """h per tensor, computed in the theta copies (fold drops them afterwards)."""
        diffs = [before.sub_(mix.to(before.dtype)) for before, mix in zip(self._theta_before, mixed)]
        if self.discrepancy == "scaled":
            return [d.div_(self.lr) for d in diffs]
        if self.discrepancy == "raw":
            return [d.neg_() for d in diffs]
        norm = torch.sqrt(sum(d.pow(2).sum() for d in diffs)).clamp_min(1e-30)
        return [d.div_(norm) for d in diffs]

    def _moments(self, master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.adam.state.get(master)
        if not state:
            return torch.zeros_like(master), torch.zeros_like(master)
        return state["exp_avg"].clone(), state["exp_avg_sq"].clone()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume mid-visit: moments, step count, pending theta copies."""
        out: dict[str, torch.Tensor] = {"step": torch.tensor(self.steps_taken)}
        for i, master in enumerate(self.masters):
            state = self.adam.state.get(master)
            if state:
                out[f"m.{i}"], out[f"v.{i}"] = state["exp_avg"], state["exp_avg_sq"]
        for i, theta in enumerate(self._theta_before):
            out[f"theta.{i}"] = theta
        for i, (m, v) in enumerate(self._moments_before):
            out[f"m_before.{i}"], out[f"v_before.{i}"] = m, v
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of state_tensors (a node restoring from disk in another process)."""
        step = int(tensors["step"])
        n = len(self.masters)
        if step:
            for i, master in enumerate(self.masters):
                self.adam.state[master] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": tensors[f"m.{i}"].to(master.device).clone(),
                    "exp_avg_sq": tensors[f"v.{i}"].to(master.device).clone(),
                }
        if "theta.0" in tensors:
            self._theta_before = [tensors[f"theta.{i}"].to(self.masters[i].device) for i in range(n)]
        if "m_before.0" in tensors:
            self._moments_before = [(tensors[f"m_before.{i}"], tensors[f"v_before.{i}"]) for i in range(n)]

    def optimizer_bytes(self) -> int:
        """Bytes held for this block: Adam moments, grads and the theta copy (not the weights)."""
        total = 0
        for master in self.masters:
            state = self.adam.state.get(master, {})
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim())
            if master.grad is not None:
                total += master.grad.numel() * master.grad.element_size()
        total += sum(t.numel() * t.element_size() for t in self._theta_before)
        return total
