"""Model configuration shared by every tl_mamba model family.

One dataclass serves Mamba-1 (and Falcon-Mamba) and Mamba-2; ``family`` says which.
Field names follow TransformerLens (``n_layers``, ``d_model``, ``d_vocab``...) so that
TransformerLens utilities which read ``model.cfg`` work unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Tuple

import torch

from tl_mamba.ops.ssd.chunked import DEFAULT_CHUNK as SSD_DEFAULT_CHUNK

Family = Literal["mamba1", "mamba2"]


#: the dtypes a model may be built or loaded in, by the names ``dtype=`` accepts
DTYPE_NAMES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "double": torch.float64,
}


def resolve_dtype(dtype: Any, auto: Optional[torch.dtype] = None) -> torch.dtype:
    """The ``torch.dtype`` a ``dtype=`` argument asks for.

    A floating-point ``torch.dtype``, a name (``"float32"``, ``"float16"``, ``"bfloat16"``,
    ``"float64"``, with or without ``"torch."``; also ``"fp16"``, ``"bf16"`` ...), ``None``
    (float32), or ``"auto"``: ``auto``, the checkpoint's own dtype
    (:func:`tl_mamba.loading.checkpoint.checkpoint_dtype`),
    float32 when it is None. Anything else, integer dtypes included, is a ``ValueError`` /
    ``TypeError`` that lists what is accepted.
    """
    accepted = "a floating-point torch dtype, 'auto', or one of 'float32', 'float16', 'bfloat16', 'float64'"
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return auto if auto is not None else torch.float32
        if name not in DTYPE_NAMES:
            raise ValueError(f"dtype={dtype!r} is not a dtype a tl_mamba model can run in; give {accepted}")
        return DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be {accepted}, got {type(dtype).__name__} {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} is not a floating-point dtype; give {accepted}")
    return dtype


@dataclass
class HookedMambaConfig:
    """Hyper-parameters of a hooked Mamba model.

    Shapes used throughout the package: b batch, p position, d ``d_model``,
    e ``d_inner``, n ``d_state``, r ``dt_rank``, h ``n_heads``, hd ``d_head``,
    g ``n_groups``, v ``d_vocab``, k ``d_conv``.
    """

    n_layers: int
    d_model: int
    d_vocab: int
    family: Family = "mamba1"
    d_inner: Optional[int] = None  # default: expand * d_model
    expand: int = 2
    d_state: int = 16
    d_conv: int = 4
    dt_rank: Optional[int] = None  # Mamba-1 only; default ceil(d_model / 16)
    # Mamba-2 only
    d_head: Optional[int] = None
    n_heads: Optional[int] = None
    n_groups: int = 1
    # Chunk length of the "torch" backend's chunked scan: speed and memory only, results do
    # not depend on it. The default (tl_mamba.ops.ssd.chunked.DEFAULT_CHUNK) is the fastest
    # measured on a CPU; the checkpoints' 256 took 1.6-1.7x its time. The Triton kernels choose
    # their own.
    chunk_size: int = SSD_DEFAULT_CHUNK
    # The chunk_size a loaded checkpoint's config names (mamba_ssm's kernels run at it),
    # written back when the model is saved; None: chunk_size.
    checkpoint_chunk_size: Optional[int] = None
    dt_limit: Tuple[float, float] = (0.0, float("inf"))
    # biases
    conv_bias: bool = True
    proj_bias: bool = False  # in_proj / out_proj bias
    # norms
    eps: float = 1e-5  # block and final RMSNorm epsilon
    bcdt_rms_eps: Optional[float] = None  # Falcon-Mamba: weightless RMS on dt_low, B and C
    norm_before_gate: bool = False  # Mamba-2 gated RMSNorm
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    # initialisation of a random model (matches mamba_ssm / transformers defaults)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    initializer_range: float = 0.02
    seed: Optional[int] = None
    # tokens
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 0
    pad_token_id: Optional[int] = 0
    default_prepend_bos: bool = True
    default_padding_side: Literal["left", "right"] = "right"
    # bookkeeping, mirrors TransformerLens' HookedTransformerConfig
    model_name: str = "custom"
    architecture: str = "Mamba"
    device: Optional[str] = None
    dtype: torch.dtype = torch.float32
    normalization_type: str = "RMS"
    final_rms: bool = True
    attn_only: bool = True  # one residual write per block (the mixer), no MLP
    positional_embedding_type: str = "none"
    n_ctx: int = 1_000_000  # recurrent: no context limit; kept for TL utilities
    d_vocab_out: Optional[int] = None
    d_mlp: Optional[int] = None
    act_fn: str = "silu"
    use_attn_result: bool = False
    n_key_value_heads: Optional[int] = None  # no attention; read by some TransformerLens helpers
    original_architecture: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in ("mamba1", "mamba2"):
            raise ValueError(f"family must be 'mamba1' or 'mamba2', got {self.family!r}")
        for name in ("n_layers", "d_model", "d_vocab", "d_state", "d_conv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_inner is None:
            self.d_inner = self.expand * self.d_model
        if self.d_vocab_out is None:
            self.d_vocab_out = self.d_vocab
        self.dtype = resolve_dtype(self.dtype)  # a floating-point dtype ("auto" here: float32)
        if self.norm_before_gate:  # the field records the checkpoint option; the model has one form
            raise ValueError("norm_before_gate=True is not supported: HookedMamba2 gates before its RMSNorm "
                             "(norm_before_gate=False, as every released Mamba-2 checkpoint and transformers' Mamba2)")
        if self.family == "mamba1":
            if self.dt_rank is None:
                self.dt_rank = math.ceil(self.d_model / 16)
            if isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int) or self.dt_rank <= 0:
                raise ValueError(f"dt_rank must be a positive int (None: ceil(d_model / 16)), got {self.dt_rank!r}")
            # Mamba-1 has one SSM per channel and no heads: n_heads is 1 by the contract. A
            # different value was a Mamba-2 setting given to the wrong family, not a head count.
            if self.n_heads not in (None, 1) or self.n_groups != 1:
                raise ValueError(f"n_heads={self.n_heads}, n_groups={self.n_groups}: Mamba-1 has no heads or groups "
                                 "(n_heads is 1); for a Mamba-2 model pass family='mamba2'")
            self.n_heads = 1
            self.d_head = self.d_inner
            self.n_groups = 1
        else:
            given = [name for name in ("n_heads", "d_head") if getattr(self, name) is not None]
            if not given:
                self.d_head = 64
            if self.n_heads is None:
                self.n_heads = self.d_inner // self.d_head
            if self.d_head is None:
                self.d_head = self.d_inner // self.n_heads
            if self.n_heads * self.d_head != self.d_inner:
                if len(given) < 2:  # one was derived: say which width must divide which
                    split = given[0] if given else "d_head"
                    raise ValueError(f"d_inner = {self.d_inner} (expand * d_model) must be a multiple of {split} = "
                                     f"{getattr(self, split)}" + ("" if given else " (the default head size)"))
                raise ValueError(
                    f"n_heads * d_head must equal d_inner: {self.n_heads} * {self.d_head} != {self.d_inner}"
                )
            if self.n_heads % self.n_groups != 0:
                raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_groups ({self.n_groups})")
            self.dt_limit = tuple(float(v) for v in self.dt_limit)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dtype"] = str(self.dtype).replace("torch.", "")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HookedMambaConfig":
        return cls(**data)
