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

theta is the block BEFORE the local step. No copy of it is kept: theta - half is Adam's own
update, lr_t * m' / (sqrt(v') + eps), which fold recomputes from the moments, so

    theta - mixed = (half - mixed) + lr_t * m' / (sqrt(v') + eps)

and the block's optimizer state is grads + m + v only: 12 bytes per parameter at the step (16 with
the fp32 master of a bf16 model). The price: Adam applied u rounded, so the recomputed theta is off
by up to half an ulp of theta per element (bench/RESULTS.md, "BMA without the theta copy").
fold works FOLD_SLICE elements at a time, so it allocates no block-sized buffer either.
A new BlockAdam is built per visit: fresh moments.

    exercised by: pytest tests/test_optimizer.py
"""

from __future__ import annotations

import torch

FOLD_SLICE = 1 << 20  # elements per pass in fold(): bounds its temporaries to a few MiB
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
        # CUDA: the fused kernel (no block-sized temporaries); CPU: the per-tensor loop, measured ~2x
        # faster there than the multi-tensor one (bench/fast_paths.py)
        self.fused = bool(masters) and masters[0].is_cuda
        self.adam = torch.optim.Adam(masters, lr=lr, betas=betas, eps=eps, fused=self.fused or None)
        self._stepped: list[bool] = []  # per master, since the last fold: did Adam move it?
        self._moments_before: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def steps_taken(self) -> int:
        state = self.adam.state.get(self.masters[0])
        return int(state["step"]) if state else 0

    @torch.no_grad()
    def step(self) -> None:
        """theta -> half with Adam (for trivial BMA, first keeping the old moments)."""
        self._stepped = [m.grad is not None for m in self.masters]
        if self.bma == "trivial":
            self._moments_before = [self._moments(m) for m in self.masters]
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)

    @torch.no_grad()
    def fold(self, mixed: list[torch.Tensor]) -> None:
        """Set theta = mixed and fold the consensus signal into Adam's moments (per `bma`)."""
        if len(mixed) != len(self.masters):
            raise ValueError(f"fold got {len(mixed)} tensors for a block of {len(self.masters)}")
        if self.bma != "none" and self._stepped:
            b1, b2 = self.bma_betas
            scale = self._signal_scale(mixed)
            for i, master in enumerate(self.masters):
                state = self.adam.state.get(master)
                if not state:
                    continue  # never had a gradient: no moments to fold into
                m, v = (state["exp_avg"], state["exp_avg_sq"]) if self.bma == "full" else self._moments_before[i]
                flat_m, flat_v = m.view(-1), v.view(-1)
                update = self._update_factors(i)
                for part in self._slices(master):
                    h = self._difference(i, mixed[i], part, update).mul_(scale)
                    flat_m[part].mul_(b1).add_(h, alpha=1 - b1)  # in place: no block-sized tensors
                    flat_v[part].mul_(b2).addcmul_(h, h, value=1 - b2)
                state["exp_avg"], state["exp_avg_sq"] = m, v
        for master, value in zip(self.masters, mixed):
            master.copy_(value)
        self._stepped = []
        self._moments_before = []

    def _signal_scale(self, mixed: list[torch.Tensor]) -> float:
        """h = scale * (theta - mixed) for the configured discrepancy."""
        if self.discrepancy == "scaled":
            return 1 / self.lr
        if self.discrepancy == "raw":
            return -1.0
        squares = 0.0
        for i, master in enumerate(self.masters):
            update = self._update_factors(i)
            squares += sum(float(self._difference(i, mixed[i], part, update).pow_(2).sum())
                           for part in self._slices(master))
        return 1 / max(squares ** 0.5, 1e-30)

    def _update_factors(self, i: int) -> tuple[float, float, float] | None:
        """(step size, sqrt of the second bias correction, eps) of master i's last Adam step; None if
        Adam did not move it. Read once per tensor: on CUDA the step count is a device tensor."""
        if not self._stepped[i]:
            return None
        group = self.adam.param_groups[0]
        (beta1, beta2), step = group["betas"], float(self.adam.state[self.masters[i]]["step"])
        return group["lr"] / (1 - beta1**step), (1 - beta2**step) ** 0.5, group["eps"]

    def _difference(self, i: int, mixed: torch.Tensor, part: slice,
                    update: tuple[float, float, float] | None) -> torch.Tensor:
        """theta - mixed on one slice of master i: (half - mixed) + Adam's update, recomputed."""
        master = self.masters[i]
        diff = master.view(-1)[part] - mixed.reshape(-1)[part].to(master.dtype)
        if update is not None:
            step_size, bias_correction2_sqrt, eps = update
            state = self.adam.state[master]
            # the same expression as torch.optim.Adam's (weight_decay=0, amsgrad off)
            denom = state["exp_avg_sq"].view(-1)[part].sqrt().div_(bias_correction2_sqrt).add_(eps)
            diff.addcdiv_(state["exp_avg"].view(-1)[part], denom, value=step_size)
        return diff

    @staticmethod
    def _slices(master: torch.Tensor) -> list[slice]:
        return [slice(start, start + FOLD_SLICE) for start in range(0, master.numel(), FOLD_SLICE)]

    def _moments(self, master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.adam.state.get(master)
        if not state:
            return torch.zeros_like(master), torch.zeros_like(master)
        return state["exp_avg"].clone(), state["exp_avg_sq"].clone()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume mid-visit: moments, step count, whether a fold is pending."""
        out: dict[str, torch.Tensor] = {"step": torch.tensor(self.steps_taken)}
        for i, master in enumerate(self.masters):
            state = self.adam.state.get(master)
            if state:
                out[f"m.{i}"], out[f"v.{i}"] = state["exp_avg"], state["exp_avg_sq"]
        if self._stepped:  # a fold is pending
            out["stepped"] = torch.tensor(self._stepped)
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
                    "step": torch.tensor(float(step), device=master.device if self.fused else "cpu"),
                    "exp_avg": tensors[f"m.{i}"].to(master.device).clone(),
                    "exp_avg_sq": tensors[f"v.{i}"].to(master.device).clone(),
                }
        if "stepped" in tensors:
            self._stepped = [bool(x) for x in tensors["stepped"]]
        if "m_before.0" in tensors:
            self._moments_before = [(tensors[f"m_before.{i}"].to(self.masters[i].device),
                                    tensors[f"v_before.{i}"].to(self.masters[i].device)) for i in range(n)]

    def optimizer_bytes(self) -> int:
        """Bytes held for this block: Adam moments, grads, and trivial BMA's moment copies (not the weights)."""
        total = 0
        for master in self.masters:
            state = self.adam.state.get(master, {})
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim())
            if master.grad is not None:
                total += master.grad.numel() * master.grad.element_size()
        total += sum(t.numel() * t.element_size() for pair in self._moments_before for t in pair)
        return total
