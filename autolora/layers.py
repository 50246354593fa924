"""The gated LoRA adapter around an ``nn.Linear`` or a Hugging Face ``Conv1D``.

``y = base(x) + s * B diag(g) A x`` where ``A`` is (r, in), ``B`` is (out, r), ``g`` the gates of
the layer's selector and ``s`` a fixed scale. The base layer is wrapped, never copied, and stays
frozen. The adapter declares its own parameters (``lora_A``, ``lora_B``, ``selector``) so that
optimisers, freezing and export use those declarations, never name matching.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autolora.gates import gate_values
from autolora.plan.scores import update_svd

try:  # transformers is a dependency, but keep the layer importable on its own
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

ADAPTABLE_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


def layer_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    in_f, out_f = base.weight.shape  # Conv1D stores its weight as (in, out)
    return int(in_f), int(out_f)


def is_conv1d(base: nn.Module) -> bool:
    return isinstance(Conv1D, type) and isinstance(base, Conv1D)


class GatedLoRALinear(nn.Module):
    """A Linear (or Conv1D) layer plus ``rank`` gated rank-1 components.

    Args:
        base_layer: The layer to adapt. It is wrapped in place, not copied.
        rank: Number of rank-1 components (``max_rank`` during the search).
        scale: The fixed factor s of the update.
        gate: ``"softmax"``, ``"sigmoid"`` or ``"fixed"`` (all gates 1).
        dropout: Dropout on the adapter's input.
        generator: Optional RNG for the init of ``lora_A``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        scale: float,
        gate: str = "softmax",
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_dims(base_layer)
        self.gate = gate
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        factory = {"dtype": w.dtype, "device": w.device}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        self.selector = nn.Parameter(torch.zeros(rank, **factory))  # (r,) raw logits
        self.reset_lora_A(generator)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def fan_in_fan_out(self) -> bool:
        """True for Conv1D, whose weight is stored (in, out); PEFT needs this flag."""
        return is_conv1d(self.base_layer)

    def reset_lora_A(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform init of A (as PEFT and loralib), drawn in float32 for reproducibility."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
        values = torch.rand(self.lora_A.shape, generator=generator, dtype=torch.float32)
        with torch.no_grad():
            self.lora_A.copy_((values * 2 - 1) * bound)

    def gates(self) -> torch.Tensor:
        """Gate values g, shape (r,)."""
        return gate_values(self.selector, self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        # Fold g into the rows of A, an (r, in) matrix, rather than scaling the (..., r)
        # activations: the gated copy is tiny and no B diag(g) A (out, in) is ever formed. The
        # scale s rides on the final add. A step is usually bound by kernel launches, so the
        # layer adds only the softmax and this product to what a PEFT LoRA layer launches.
        a = self.lora_A if self.gate == "fixed" else self.lora_A * self.gates().unsqueeze(-1)
        z = F.linear(self.dropout(x), a)  # (..., r)
        if torch.compiler.is_compiling():
            # inductor fuses add(y, mm, alpha=s) on 2-D inputs into an addmm that drops alpha
            # (torch 2.13 CPU); the multiply is fused into the kernel's epilogue anyway
            return y + self.scale * F.linear(z, self.lora_B)
        return torch.add(y, F.linear(z, self.lora_B), alpha=self.scale)  # (..., out)

    @torch.no_grad()
    def folded_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B') with the scale and gates folded into B': ``B' A == s * B diag(g) A``."""
        b = self.lora_B * (self.scale * self.gates()).unsqueeze(0)
        return self.lora_A.detach().clone(), b.detach()

    @torch.no_grad()
    def shrink(self, keep: torch.Tensor) -> None:
        """Keep the singular directions ``keep`` (indices into the descending spectrum of the
        gated update ``s * B diag(g) A``); gates become 1 and the scale 1.

        The update is rotated into its SVD basis first, so keeping the top k directions is the
        best rank-k approximation of the trained update (Eckart-Young), not an arbitrary subset
        of components that A and B may have spread one direction over. The kept factors are
        balanced: ``A = sqrt(S) V^T``, ``B = U sqrt(S)``.
        """
        a, b = self.folded_factors()
        u, s, vh = update_svd(a, b)  # (out, k), (k,), (k, in)
        keep = keep.to(device=a.device, dtype=torch.long)
        root = s[keep].sqrt()
        self.lora_A = nn.Parameter((root.unsqueeze(1) * vh[keep]).to(a.dtype).contiguous())
        self.lora_B = nn.Parameter((u[:, keep] * root).to(b.dtype).contiguous())
        self.selector = nn.Parameter(self.selector.detach()[: len(keep)].clone(), requires_grad=False)
        self.scale, self.gate = 1.0, "fixed"

    @torch.no_grad()
    def reinit(self, scale: float, generator: torch.Generator | None = None) -> None:
        """Start over at the current rank: A random, B zero, gates fixed at 1, selector frozen."""
        self.reset_lora_A(generator)
        self.lora_B.zero_()
        self.selector.requires_grad_(False)
        self.scale, self.gate = float(scale), "fixed"

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The update in the base weight's layout: (out, in) for Linear, (in, out) for Conv1D."""
        a, b = self.folded_factors()
        delta = b @ a  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, gate={self.gate}, scale={self.scale:g}"
        )
