"""RadioDiff's Swin Transformer condition encoder (``cond_net: swin``).

Upstream (UNIC-Lab/RadioDiff ``swin_transformer.py``) is torchvision's ``SwinTransformer`` with three
changes that this module reproduces:

* the patch embedding ``features.0`` moved to ``first_coonv`` (sic), so the stages are ``features.0..6``
  instead of torchvision's ``features.1..7``; :func:`torchvision_key_to_upstream` maps the names, which
  is what upstream's positional weight copy amounts to;
* ``forward`` returns the four stage outputs (NCHW, strides 4, 8, 16, 32) instead of logits, so the final
  ``norm`` and ``head`` stay in the state_dict (and the optimizer) without ever being used;
* attention and projection dropout are gone (both were 0.0 in swin_t/s/b anyway).

Stochastic depth ("row" mode, probability rising linearly to the variant's maximum) draws from the global
torch RNG exactly like torchvision's, so seeded train-mode runs consume the same random numbers.
"""

from __future__ import annotations

import logging
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from radiodiff_resume.errors import UserError

logger = logging.getLogger(__name__)

IMAGENET_URL = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class SwinSpec:
    """Widths and depths of one torchvision Swin variant and its ImageNet weight file."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    stochastic_depth_prob: float
    imagenet_file: str


SWIN_SPECS: dict[str, SwinSpec] = {
    "swin_t": SwinSpec(96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2, "swin_t-704ceda3.pth"),
    "swin_s": SwinSpec(96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3, "swin_s-5e29d889.pth"),
    "swin_b": SwinSpec(128, (2, 2, 18, 2), (4, 8, 16, 32), 0.5, "swin_b-68c6b09e.pth"),
}


class StochasticDepth(nn.Module):
    """torchvision's ``StochasticDepth(p, "row")``: one Bernoulli(1-p) per sample, rescaled by 1/(1-p).

    The draw is ``torch.empty([B, 1, ..]).bernoulli_(1 - p)`` on the global RNG and nothing is drawn when
    ``p == 0`` or in eval mode, as upstream does."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"stochastic depth probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
        noise = noise.bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode=row"


class _ToChannelsLast(nn.Module):
    """NCHW -> NHWC, the layout the Swin blocks work in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def _relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """Index into the (2Wh-1)(2Ww-1) bias table for every pair of tokens in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += window[0] - 1
    rel[:, :, 1] += window[1] - 1
    rel[:, :, 0] *= 2 * window[1] - 1
    return rel.sum(-1).flatten()


def _shift_mask(pad_h: int, pad_w: int, window: tuple[int, int], shift: tuple[int, int],
                like: torch.Tensor) -> torch.Tensor:
    """Shifted-window attention mask (0 inside a region, -100 across regions), per window."""
    mask = like.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    region = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0]:h[1], w[0]:w[1]] = region
            region += 1
    num_windows = (pad_h // window[0]) * (pad_w // window[1])
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class ShiftedWindowAttention(nn.Module):
    """Window multi-head self-attention with a relative position bias, optionally shifted."""

    def __init__(self, dim: int, window: tuple[int, int], shift: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1), num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(window))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wh, ww = self.window
        n = wh * ww
        bias = self.relative_position_bias_table[self.relative_position_index]
        bias = bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)

        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        _, pad_h, pad_w, _ = x.shape
        # upstream zeroes the shift (in its module's own list, for good) when one window covers the map;
        # here it is decided per call, which is the same at every size where the shift was not yet zeroed
        shift = (0 if wh >= pad_h else self.shift[0], 0 if ww >= pad_w else self.shift[1])
        shifted = sum(shift) > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))

        num_windows = (pad_h // wh) * (pad_w // ww)
        x = x.view(b, pad_h // wh, wh, pad_w // ww, ww, c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * num_windows, n, c)

        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(x.size(0), n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * (c // self.num_heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1)) + bias
        if shifted:
            mask = _shift_mask(pad_h, pad_w, self.window, shift, x)
            attn = attn.view(x.size(0) // num_windows, num_windows, self.num_heads, n, n)
            attn = attn + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = F.softmax(attn, dim=-1)

        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), n, c)
        x = F.linear(x, self.proj.weight, self.proj.bias)
        x = x.view(b, pad_h // wh, pad_w // ww, wh, ww, c)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
        if shifted:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()


class SwinBlock(nn.Module):
    """Pre-norm attention and MLP, each a stochastic-depth residual."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], shift: tuple[int, int],
                 stochastic_depth_prob: float, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = ShiftedWindowAttention(dim, window, shift, num_heads)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        # torchvision's MLP(dim, [hidden, dim], GELU, dropout=0.0): the Identity slots stand for its two
        # p=0 Dropouts, which keep the Linear layers at indices 0 and 3 of the state_dict
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Identity(),
                                 nn.Linear(int(dim * mlp_ratio), dim), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halves H and W by stacking 2x2 neighbours into channels (4C -> 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-3:-1]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :],
                       x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class SwinEncoder(nn.Module):
    """Multi-scale Swin features of the condition maps, state_dict-compatible with upstream's ``swin_b``.

    ``forward(cond)`` returns ``[stage1, .., stage4]`` as NCHW tensors with ``embed_dim * 2**i`` channels
    at 1/4, 1/8, 1/16 and 1/32 of the input size.
    """

    def __init__(self, variant: str = "swin_b", patch_size: int = 4, window_size: int = 7) -> None:
        super().__init__()
        if variant not in SWIN_SPECS:
            raise ValueError(f"unknown Swin variant {variant!r}; supported: {', '.join(SWIN_SPECS)}")
        spec = SWIN_SPECS[variant]
        self.variant = variant
        window = (window_size, window_size)
        self.first_coonv = nn.Sequential(
            nn.Conv2d(3, spec.embed_dim, kernel_size=patch_size, stride=patch_size),
            _ToChannelsLast(),
            nn.LayerNorm(spec.embed_dim, eps=1e-5),
        )
        total = sum(spec.depths)
        block_id = 0
        layers: list[nn.Module] = []
        for stage, (depth, heads) in enumerate(zip(spec.depths, spec.num_heads, strict=True)):
            dim = spec.embed_dim * 2**stage
            blocks = []
            for i in range(depth):
                p = spec.stochastic_depth_prob * float(block_id) / (total - 1)
                shift = (0, 0) if i % 2 == 0 else (window[0] // 2, window[1] // 2)
                blocks.append(SwinBlock(dim, heads, window, shift, p))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
            if stage < len(spec.depths) - 1:
                layers.append(PatchMerging(dim))
        self.features = nn.ModuleList(layers)
        num_features = spec.embed_dim * 2 ** (len(spec.depths) - 1)
        # unused by forward; kept because upstream's state_dict and optimizer carry them
        self.norm = nn.LayerNorm(num_features, eps=1e-5)
        self.head = nn.Linear(num_features, 1000)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = self.first_coonv(x)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 2 == 0:
                feats.append(x.permute(0, 3, 1, 2).contiguous())
        return feats

    def load_torchvision_state_dict(self, state: tp.Mapping[str, torch.Tensor], source: str) -> None:
        """Load a torchvision ``SwinTransformer`` state_dict of the same variant (strict, renamed)."""
        mapped = {torchvision_key_to_upstream(k): v for k, v in state.items()}
        own = self.state_dict()
        missing = [k for k in own if k not in mapped]
        unexpected = [k for k in mapped if k not in own]
        wrong = [f"{k} {tuple(mapped[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                 if k in mapped and tuple(mapped[k].shape) != tuple(v.shape)]
        if missing or unexpected or wrong:
            raise UserError(
                f"{source} is not a torchvision {self.variant} state_dict: {len(missing)} missing "
                f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} with another "
                f"shape {wrong[:3]}")
        self.load_state_dict(mapped, strict=True)


def torchvision_key_to_upstream(key: str) -> str:
    """torchvision Swin key -> upstream key: ``features.0.{0,2}`` -> ``first_coonv.{0,2}``, stage
    ``features.{i}`` -> ``features.{i-1}``; ``norm``/``head`` unchanged."""
    parts = key.split(".")
    if parts[0] != "features" or len(parts) < 2 or not parts[1].isdigit():
        return key
    index = int(parts[1])
    if index == 0:
        return ".".join(["first_coonv", *parts[2:]])
    return ".".join(["features", str(index - 1), *parts[2:]])


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a ``.pth`` state_dict (``weights_only`` unpickling, refused
    on a torch with known bypasses, as every foreign pickle is)."""
    if not path.is_file():
        raise UserError(f"condition-encoder weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from radiodiff_resume.compat.torch_files import load_pickled  # the one reader of foreign pickles

    state = load_pickled(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a plain state_dict (a dict of tensors)")
    return state


def imagenet_state_dict(variant: str) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's ImageNet weights of ``variant`` and where they came from.

    The torch hub cache (where torchvision keeps its downloads) is read first, so no network and no
    torchvision are needed once the file is there; otherwise torchvision's weights API may download it.
    """
    name = SWIN_SPECS[variant].imagenet_file
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file():
        return read_state_dict(cached), str(cached)
    try:
        from torchvision import models
    except Exception as exc:  # absent, or a CUDA wheel next to a CPU torch (fails inside its import)
        raise UserError(
            f"cond_weights='imagenet' needs torchvision ({type(exc).__name__}: {exc}); download "
            f"{IMAGENET_URL}{name} to {cached} or pass its path as cond_weights") from exc
    enum = getattr(models, f"Swin_{variant[-1].upper()}_Weights")
    return enum.IMAGENET1K_V1.get_state_dict(progress=True), f"torchvision {enum.__name__}.IMAGENET1K_V1"


def load_condition_weights(encoder: SwinEncoder, cond_weights: str | Path) -> None:
    """Initialise ``encoder`` from ``cond_weights``: "none" (keep the random init), "imagenet", or a path
    to a torchvision state_dict of the same variant (``.pth`` or ``.safetensors``)."""
    if str(cond_weights) == "none":
        logger.warning("condition encoder %s starts from random weights; upstream RadioDiff starts it from "
                       "torchvision's ImageNet weights (cond_weights='imagenet' or a path)", encoder.variant)
        return
    if str(cond_weights) == "imagenet":
        state, source = imagenet_state_dict(encoder.variant)
    else:
        source = str(cond_weights)
        state = read_state_dict(Path(cond_weights))
    encoder.load_torchvision_state_dict(state, source)
    logger.info("condition encoder %s loaded from %s", encoder.variant, source)
