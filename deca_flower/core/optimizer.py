"""Block-wise Adam with Block-wise Moment Approximation (BMA), on torch.optim.Adam state.

One visit of client i to block k (tensors shaped like the block; t = Adam's step count in this
visit, so the moments restart at every visit):

    step():  torch.optim.Adam takes theta -> half and leaves m', v' in its state
             u = theta - half = lr_t * m' / D        lr_t = lr / (1 - a1^t)
                                                     D    = sqrt(v' / (1 - a2^t)) + eps
    -- gossip elsewhere: mixed = sum_j W[i,j] * half_j --
    fold(mixed):
             c = half - mixed                        what gossip moved the node by
             d = u + s * c                           s = `strength` (1: theta - mixed itself)
             h = d / lr                              discrepancy="scaled"
               = -d                                  discrepancy="raw"        (mixed - theta at s=1)
               = d / ||d||                           discrepancy="normalized" (global over the block)
               = d * D / lr_t = m' + s * c * D / lr_t  discrepancy="gradient"
             bma="full":    m = b1*m' + (1-b1)*h,  v = b2*v' + (1-b2)*h*h
             bma="none":    m = m',                v = v'
             bma="trivial": m = b1*m  + (1-b1)*h,  v = b2*v  + (1-b2)*h*h   (m, v before the step)
             theta = mixed

Units. m' holds gradients; 'scaled' h is in the units of Adam's normalised update (~1 per element),
hundreds of times the gradient, so after one fold the moments follow h, not the data. 'raw' is
lr-sized, 'normalized' ~1/sqrt(block size): both are tiny beside m'. 'gradient' is the gradient
that would have moved Adam from theta to mixed: where the nodes agree (c = 0) it is exactly m', and
the fold leaves m unchanged (v moves by (1-b2)(m'^2 - v'), a change of order 1-b2). Its consensus
part enters m as (1-b1)*s*c*D/lr_t, which the next Adam step turns back into about (1-b1)*s*c: the
strength s says how hard a node leans on its neighbours, as the share (1-b1)*s of the last gossip
correction that the next local step repeats (s = 0: no consensus signal; s = 10 with b1 = 0.9: the
whole correction once more). Adam's normalisation bounds the step at large s, since v grows with
h*h; but D then holds h*h too, so once s * |c| / lr_t exceeds about 1/sqrt(1-b2), h grows
geometrically within a visit and the node follows its neighbours, ignoring its gradient (what
'scaled' does from the first fold). An overflow of the moments is an error, not a NaN model.

No copy of theta is kept: u is recomputed from the moments (the same expression as
torch.optim.Adam's), so the block's optimizer state is grads + m + v only: 12 bytes per parameter
at the step (16 with the fp32 master of a bf16 model). The recomputed theta is off by up to half an
ulp of theta per element (Adam applied u rounded). 'gradient' needs no u at all: it adds the
consensus part to m' directly, so it is exactly neutral at consensus. fold works FOLD_SLICE elements
at a time and allocates no block-sized buffer.

    the rule and its conventions in words: docs/algorithm.md
    exercised by: pytest tests/test_optimizer.py; measured by: python bench/bma_signal.py
"""

from __future__ import annotations

import math

import torch

from deca_flower.core.conventions import BMA_MODES, DISCREPANCIES, DIVIDES_BY_LR

FOLD_SLICE = 1 << 20  # elements per pass in fold(): bounds its temporaries to a few MiB


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
        discrepancy: str = "gradient",
        strength: float = 10.0,
    ) -> None:
        if bma not in BMA_MODES:
            raise ValueError(f"bma must be one of {BMA_MODES}, got '{bma}'")
        if discrepancy not in DISCREPANCIES:
            raise ValueError(f"discrepancy must be one of {DISCREPANCIES}, got '{discrepancy}'")
        if discrepancy in DIVIDES_BY_LR and lr == 0 and bma != "none":
            raise ValueError(f"discrepancy='{discrepancy}' divides by lr: lr=0 needs bma='none'")
        if not (math.isfinite(strength) and strength >= 0):
            raise ValueError(f"strength must be a finite number >= 0, got {strength}")
        self.masters = masters
        self.lr = lr
        self.bma = bma
        self.bma_betas = bma_betas
        self.discrepancy = discrepancy
        self.strength = strength
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
            factors = self._step_factors()
            scale = self._signal_scale(mixed, factors)
            for i, master in enumerate(self.masters):
                state = self.adam.state.get(master)
                if not state:
                    continue  # never had a gradient: no moments to fold into
                m, v = (state["exp_avg"], state["exp_avg_sq"]) if self.bma == "full" else self._moments_before[i]
                flat_m, flat_v = m.view(-1), v.view(-1)
                adds_to_own = self.bma == "full" and self.discrepancy == "gradient" and self._stepped[i]
                for part in self._slices(master):
                    if adds_to_own:  # m = b1*m' + (1-b1)*(m' + g_c) = m' + (1-b1)*g_c: m' stays exact at consensus
                        consensus = self._signal(i, mixed[i], part, factors[i], with_own=False)
                        h = consensus + flat_m[part]
                        flat_m[part].add_(consensus, alpha=1 - b1)
                    else:
                        h = self._signal(i, mixed[i], part, factors[i]).mul_(scale)
                        flat_m[part].mul_(b1).add_(h, alpha=1 - b1)  # in place: no block-sized tensors
                    flat_v[part].mul_(b2).addcmul_(h, h, value=1 - b2)
                if not torch.isfinite(v.sum()):  # v >= 0: one reduction finds an overflow anywhere in the tensor
                    raise FloatingPointError(
                        f"BMA's consensus signal overflowed (discrepancy='{self.discrepancy}', strength={self.strength}): "
                        "with discrepancy='gradient' it grows within a visit when strength * |half - mixed| / lr_t "
                        "exceeds about 1/sqrt(1 - bma-beta2); lower bma-strength")
                state["exp_avg"], state["exp_avg_sq"] = m, v
        for master, value in zip(self.masters, mixed):
            master.copy_(value)
        self._stepped = []
        self._moments_before = []

    @torch.no_grad()
    def consensus_signal(self, mixed: list[torch.Tensor]) -> list[torch.Tensor]:
        """h per master, as fold() would fold it (whole tensors: for measurement, not for training).
        Call between step() and fold()."""
        factors = self._step_factors()
        scale = self._signal_scale(mixed, factors)
        return [self._signal(i, mixed[i], slice(None), factors[i]).mul_(scale).view_as(master)
                for i, master in enumerate(self.masters)]

    def _signal_scale(self, mixed: list[torch.Tensor], factors: list[tuple[float, float, float] | None]) -> float:
        """h = scale * _signal(...) for the configured discrepancy."""
        if self.discrepancy == "scaled":
            return 1 / self.lr
        if self.discrepancy == "raw":
            return -1.0
        if self.discrepancy == "gradient":
            return 1.0
        squares = sum(float(self._signal(i, mixed[i], part, factors[i]).pow_(2).sum())
                      for i, master in enumerate(self.masters) for part in self._slices(master))
        return 1 / max(squares ** 0.5, 1e-30)

    def _signal(self, i: int, mixed: torch.Tensor, part: slice, factors: tuple[float, float, float] | None, *,
                with_own: bool = True) -> torch.Tensor:
        """One slice of master i's signal before its global scale: d = u + s * c, or for 'gradient'
        m' + s * c * D / lr_t (module docstring; with_own=False: without m'). `factors`: master i's
        (lr_t, sqrt(1 - a2^t), eps)."""
        master = self.masters[i]
        signal = master.view(-1)[part] - mixed.reshape(-1)[part].to(master.dtype)  # c = half - mixed
        if self.strength != 1.0:
            signal.mul_(self.strength)
        if factors is None:
            return signal  # no Adam state: theta = half
        step_size, bias_correction2_sqrt, eps = factors
        state = self.adam.state[master]
        # D as torch.optim.Adam computes it (weight_decay=0, amsgrad off)
        denom = state["exp_avg_sq"].view(-1)[part].sqrt().div_(bias_correction2_sqrt).add_(eps)
        moved = self._stepped[i]  # u = 0 for a master that had no gradient this step
        if self.discrepancy == "gradient":
            signal.mul_(denom).div_(step_size)
            return signal.add_(state["exp_avg"].view(-1)[part]) if moved and with_own else signal
        return signal.addcdiv_(state["exp_avg"].view(-1)[part], denom, value=step_size) if moved else signal

    def _step_factors(self) -> list[tuple[float, float, float] | None]:
        """Per master: (lr_t, sqrt of the second bias correction, eps) of its last Adam step, None
        without Adam state. The step count is read once per tensor: on CUDA it is a device tensor."""
        group = self.adam.param_groups[0]
        (beta1, beta2), eps = group["betas"], group["eps"]
        out: list[tuple[float, float, float] | None] = []
        for master in self.masters:
            state = self.adam.state.get(master)
            step = float(state["step"]) if state else 0.0
            out.append((group["lr"] / (1 - beta1**step), (1 - beta2**step) ** 0.5, eps) if state else None)
        return out

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
