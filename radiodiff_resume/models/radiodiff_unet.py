"""RadioDiff's conditional U-Net (upstream ``mask_cond_unet.Unet`` with ``cond_net: swin``).

A Swin-B encoder turns the condition maps into four feature scales; cross-attention ``RelationNet`` layers
inject them into a U-Net with two decoders, one for the drift ``C`` and one for the noise, and the output
skips of RadioDiff's constant SDE are applied inside ``forward``:

    C_pred     = (1 - t) x + t / sqrt(t^2 + 1) * decoder1
    noise_pred = sqrt(t) x + sqrt(1 - t) / sqrt(t^2 + 1) * decoder2

``t`` is the continuous time in (0, 1]; the network embeds ``log(t) / 4`` itself. Parameter names, order
and shapes equal upstream's, so upstream checkpoints load strictly (strip the ``model.`` prefix).

Two variants: ``"head"`` (upstream's newest code) adds an FFT branch (``decouple1/2``) to the bottleneck of
each decoder and carries ``init_conv_carK``; ``"v1"`` (the paper release, cfd0069) has the same
``decouple`` weights but skips them, and has no ``init_conv_carK``.
"""

from __future__ import annotations

import math
import typing as tp
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from radiodiff_resume.models.swin import SwinEncoder, load_condition_weights

VARIANTS = ("head", "v1")
COND_NETS = ("swin",)
_SWIN_WIDTH = 128  # channels of the first Swin-B stage (upstream's f_condnet)


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel (works with GroupNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = torch.var(self.weight, dim=(1, 2, 3), unbiased=False, keepdim=True)
        weight = (self.weight - mean) * (var + eps).rsqrt()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map, gain only (parameter ``g``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = ChannelLayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class GaussianFourierProjection(nn.Module):
    """Fixed random Fourier features of the (log) time; ``W`` is a frozen parameter, as upstream."""

    def __init__(self, embedding_size: int, scale: float) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = x[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int) -> None:
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor,
                scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two conv blocks; the time embedding scales and shifts the first."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        emb = self.mlp(time_emb)[:, :, None, None]
        h = self.block2(self.block1(x, scale_shift=emb.chunk(2, dim=1)))
        return h + self.res_conv(x)


class LinearAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), ChannelLayerNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / (h * w)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (t.reshape(b, self.heads, -1, h * w) for t in self.to_qkv(x).chunk(3, dim=1))
        sim = torch.einsum("bhdi,bhdj->bhij", q * self.scale, k)
        out = torch.einsum("bhij,bhdj->bhid", sim.softmax(dim=-1), v)
        return self.to_out(out.permute(0, 1, 3, 2).reshape(b, -1, h, w))


class BlockFFT(nn.Module):
    """A learned filter on the 2-D real FFT of the bottleneck: the weight fixes the map size."""

    def __init__(self, dim: int, h: int, w: int) -> None:
        super().__init__()
        self.complex_weight = nn.Parameter(torch.randn(dim, h - 2, w // 2, 2) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = torch.fft.rfft2(x, dim=(2, 3), norm="ortho") * torch.view_as_complex(self.complex_weight)
        return torch.fft.irfft2(x, s=(h, w), dim=(2, 3), norm="ortho").reshape(b, c, h, w)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, kernel_size=1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, dim, kernel_size=1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def sine_position_embedding(x: torch.Tensor, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's sine embedding of an (B, H, W, D) grid: D/2 channels for y, then D/2 for x."""
    b, h, w, d = x.shape
    half = d // 2
    not_mask = torch.ones(b, h, w, dtype=torch.bool, device=x.device)
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    dim_t = torch.arange(half, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * (dim_t // 2) / half)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).contiguous()


class CrossAttentionLayer(nn.Module):
    """Upstream's ``BasicAttetnionLayer``: window-pooled condition features (queries) attend to
    window-pooled U-Net features (keys, values). ``softmax(q k^T)`` has no 1/sqrt(d) scaling, as upstream."""

    def __init__(self, embed_dim: int, nhead: int, ffn_dim: int, window_size1: tp.Sequence[int],
                 window_size2: tp.Sequence[int], dropout: float = 0.1) -> None:
        super().__init__()
        self.window_size1 = tuple(window_size1)
        self.window_size2 = tuple(window_size2)
        self.avgpool_q = nn.AvgPool2d(kernel_size=self.window_size1)
        self.avgpool_k = nn.AvgPool2d(kernel_size=self.window_size2)
        self.nhead = nhead
        self.q_lin = nn.Linear(embed_dim, embed_dim)
        self.k_lin = nn.Linear(embed_dim, embed_dim)
        self.v_lin = nn.Linear(embed_dim, embed_dim)
        self.mlp = Mlp(embed_dim, ffn_dim, dropout)
        self.concat_conv = nn.Conv2d(2 * embed_dim, embed_dim, 1)
        self.gn = nn.GroupNorm(8, embed_dim)
        self.out_conv = nn.Conv2d(embed_dim, embed_dim, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _pad_to(x: torch.Tensor, window: tuple[int, ...]) -> torch.Tensor:
        h, w = x.shape[-2:]
        return F.pad(x, (0, (window[1] - w % window[1]) % window[1],
                         0, (window[0] - h % window[0]) % window[0]))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.nhead, c // self.nhead).permute(0, 2, 1, 3).contiguous()

    def forward(self, cond: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        b, c, h2, w2 = feat.shape
        shortcut = feat + self.concat_conv(torch.cat(
            [F.interpolate(cond, size=(h2, w2), mode="bilinear", align_corners=True), feat], dim=1))
        shortcut = self.gn(shortcut)
        cond = self._pad_to(cond, self.window_size1)
        h1p, w1p = cond.shape[-2:]
        feat = self._pad_to(feat, self.window_size2)

        pooled = self.avgpool_q(cond)
        q = pooled.permute(0, 2, 3, 1).contiguous()
        q = (q + sine_position_embedding(q)).view(b, -1, c)
        kv = self.avgpool_k(feat).permute(0, 2, 3, 1).contiguous()
        kv = (kv + sine_position_embedding(kv)).view(b, -1, c)
        num_q = q.shape[1]
        q = self._heads(self.q_lin(q))
        k = self._heads(self.k_lin(kv))
        v = self._heads(self.v_lin(kv))
        attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, num_q, c)
        out = out.transpose(1, 2).reshape(b, c, h1p // self.window_size1[0], w1p // self.window_size1[1])
        pooled = pooled + out
        pooled = pooled + self.mlp(pooled)
        pooled = F.interpolate(pooled, size=(h2, w2), mode="bilinear", align_corners=True)
        return shortcut + self.out_conv(pooled)


class RelationNet(nn.Module):
    """Projects condition and U-Net features to one width, then cross-attends (upstream: one layer)."""

    def __init__(self, in_channel1: int, in_channel2: int, embed_dim: int, ffn_dim: int,
                 window_size1: tp.Sequence[int], window_size2: tp.Sequence[int], nhead: int = 8,
                 layers: int = 1) -> None:
        super().__init__()
        self.input_conv1 = nn.Sequential(nn.Conv2d(in_channel1, embed_dim, 1),
                                         nn.BatchNorm2d(embed_dim, momentum=0.03, eps=0.001))
        self.input_conv2 = nn.Sequential(nn.Conv2d(in_channel2, embed_dim, 1),
                                         nn.BatchNorm2d(embed_dim, momentum=0.03, eps=0.001))
        self.attentions = nn.ModuleList(
            CrossAttentionLayer(embed_dim, nhead, ffn_dim, window_size1, window_size2) for _ in range(layers))

    def forward(self, cond: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        cond = self.input_conv1(cond)
        feat = self.input_conv2(feat)
        for attention in self.attentions:
            feat = attention(cond, feat)
        return feat


def _upsample(dim: int, dim_out: int) -> nn.Module:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))


class RadioDiffUNet(nn.Module):
    """RadioDiff's denoiser: ``forward(x, time, cond) -> (C_pred, noise_pred)``.

    The keyword arguments are the names of radio_train.yaml's ``model.unet`` section (defaults are that
    file's values), so the section passes through as ``RadioDiffUNet(**section)``. ``cond_dim``,
    ``cond_dim_mults`` and ``cond_in_dim`` are accepted and, as upstream, unused by the Swin path;
    ``num_pos_feats`` and ``cond_feature_size`` only matter with ``cond_pe``, which is refused (upstream
    builds that embedding but never uses it).

    ``input_size`` sizes the bottleneck FFT weight exactly as upstream (``input_size // 8 - 2`` by
    ``input_size // 16``), which fits one latent size only: ``[80, 80]`` means 64x64 latents (256x256
    maps). The ``head`` variant refuses other sizes; ``v1`` never runs the FFT and takes any latent size
    divisible by the U-Net's total downsampling.

    ``cond_weights``: "none" (random Swin init; upstream starts from ImageNet), "imagenet" (torchvision's
    swin_b weights, from the torch hub cache or torchvision), or a path to a torchvision swin_b
    state_dict (``.pth`` or ``.safetensors``), loaded by :meth:`initialise` on a fresh start.
    ``without_pretrain: true`` is upstream's switch for "none".
    """

    takes_condition = True

    def __init__(
        self,
        dim: int = 128,
        channels: int = 3,
        dim_mults: tp.Sequence[int] = (1, 2, 4, 4),
        cond_net: str = "swin",
        fix_bb: bool = False,
        out_mul: int = 1,
        cond_in_dim: int = 3,
        cond_dim: int = 128,
        cond_dim_mults: tp.Sequence[int] = (2, 4),
        window_sizes1: tp.Sequence[tp.Sequence[int]] = ((8, 8), (4, 4), (2, 2), (1, 1)),
        window_sizes2: tp.Sequence[tp.Sequence[int]] = ((8, 8), (4, 4), (2, 2), (1, 1)),
        fourier_scale: float = 16.0,
        cond_pe: bool = False,
        num_pos_feats: int = 128,
        cond_feature_size: tp.Sequence[int] = (80, 80),
        input_size: tp.Sequence[int] = (80, 80),
        DPMCARK: bool = False,  # noqa: N803 - the yaml key
        without_pretrain: bool = False,
        resnet_block_groups: int = 8,
        variant: str = "head",
        cond_weights: str | Path = "none",
    ) -> None:
        super().__init__()
        if cond_net not in COND_NETS:
            raise ValueError(f"cond_net {cond_net!r} is not supported; supported: {', '.join(COND_NETS)}")
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r} is not supported; supported: {', '.join(VARIANTS)}")
        if cond_pe:
            raise ValueError("cond_pe=True is not supported: upstream builds an embedding it never uses")
        if out_mul != 1:
            raise ValueError(f"out_mul={out_mul} is not supported: upstream's output skips need out_mul 1")
        if DPMCARK and variant == "v1":
            raise ValueError("DPMCARK needs variant 'head': the paper release (v1) has no init_conv_carK")
        if len(dim_mults) != 4:
            raise ValueError(f"dim_mults needs 4 entries, one per Swin feature scale, got {list(dim_mults)}")
        if len(window_sizes1) != 4 or len(window_sizes2) != 4:
            raise ValueError("window_sizes1/2 need one [h, w] per dim_mults entry (4)")
        if without_pretrain and str(cond_weights) != "none":
            raise ValueError(f"without_pretrain=True contradicts cond_weights={str(cond_weights)!r}")
        fft_h, fft_w = input_size[0] // 8, input_size[1] // 8
        if fft_h - 2 < 1 or fft_w // 2 < 2:
            raise ValueError(f"input_size {list(input_size)} is too small for the bottleneck FFT weight")

        self.variant = variant
        self.channels = channels
        self.carsDPM = bool(DPMCARK)
        self.downsampling = 2 ** (len(dim_mults) - 1)
        # the FFT weight (h-2, w//2) is the rfft2 of an (h-2) x 2(w//2 - 1) bottleneck
        self.latent_size = (self.downsampling * (fft_h - 2), self.downsampling * 2 * (fft_w // 2 - 1))
        self.input_size = tuple(input_size)

        self.init_conv_mask = SwinEncoder("swin_b")
        self.init_conv = nn.Sequential(
            nn.Conv2d(channels + _SWIN_WIDTH, dim, 7, padding=3),
            nn.GroupNorm(num_groups=min(dim // 4, 8), num_channels=dim),
        )
        if variant == "head":
            self.init_conv_carK = nn.Conv2d(in_channels=5, out_channels=3, kernel_size=1)

        dims = [dim, *(dim * m for m in dim_mults)]
        dims_rev = dims[::-1]
        in_out = list(zip(dims[:-1], dims[1:], strict=True))
        self.projects = nn.ModuleList(
            nn.Conv2d(_SWIN_WIDTH * 2**i, dims[i], 1) for i in range(len(dim_mults)))

        time_dim = dim * 4
        self.time_mlp = nn.Sequential(
            GaussianFourierProjection(dim // 2, scale=fourier_scale),
            nn.Linear(dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )

        def resnet(d_in: int, d_out: int) -> ResnetBlock:
            return ResnetBlock(d_in, d_out, time_dim, resnet_block_groups)

        def relation(c1: int, c2: int, ws1: tp.Sequence[int], ws2: tp.Sequence[int]) -> RelationNet:
            return RelationNet(c1, c2, embed_dim=c2, ffn_dim=c2 * 2, window_size1=ws1, window_size2=ws2)

        def up_level(d_in: int, d_out: int, last: bool) -> nn.ModuleList:
            return nn.ModuleList([
                resnet(d_out + d_in, d_out),
                resnet(d_out + d_in, d_out),
                Residual(PreNorm(d_out, LinearAttention(d_out))),
                nn.Conv2d(d_out, d_in, 3, padding=1) if last else _upsample(d_out, d_in),
            ])

        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.relation_layers_down = nn.ModuleList()
        self.relation_layers_up = nn.ModuleList()
        self.ups2 = nn.ModuleList()
        self.relation_layers_up2 = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                resnet(d_in, d_in),
                resnet(d_in, d_in),
                Residual(PreNorm(d_in, LinearAttention(d_in))),
                nn.Conv2d(d_in, d_out, 3, padding=1) if last else nn.Conv2d(d_in, d_out, 4, 2, 1),
            ]))
            self.relation_layers_down.append(relation(dims[i], dims[i], window_sizes1[i], window_sizes2[i]))

        mid = dims[-1]
        self.mid_block1 = resnet(mid, mid)
        self.mid_attn = Residual(PreNorm(mid, Attention(mid)))
        self.mid_block2 = resnet(mid, mid)
        self.decouple1 = self._decouple(mid, fft_h, fft_w)
        self.decouple2 = self._decouple(mid, fft_h, fft_w)

        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            ws1, ws2 = window_sizes1[::-1][i], window_sizes2[::-1][i]
            self.ups.append(up_level(d_in, d_out, last))
            self.relation_layers_up.append(relation(dims_rev[i + 1], dims_rev[i], ws1, ws2))
            self.ups2.append(up_level(d_in, d_out, last))
            self.relation_layers_up2.append(relation(dims_rev[i + 1], dims_rev[i], ws1, ws2))

        self.final_res_block = resnet(dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, channels, 1)
        self.final_res_block2 = resnet(dim * 2, dim)
        self.final_conv2 = nn.Conv2d(dim, channels, 1)

        self.cond_weights = str(cond_weights)
        if fix_bb:
            self.init_conv_mask.requires_grad_(False)

    @staticmethod
    def _decouple(dim: int, fft_h: int, fft_w: int) -> nn.Sequential:
        return nn.Sequential(
            nn.GroupNorm(num_groups=min(dim // 4, 8), num_channels=dim),
            nn.Conv2d(dim, dim, 3, padding=1),
            BlockFFT(dim, fft_h, fft_w),
        )

    def initialise(self) -> None:
        """Load ``cond_weights`` into the condition encoder: an initialisation, so the trainer calls it on a
        fresh start only (a resume takes every weight from its checkpoint and needs no ImageNet file)."""
        load_condition_weights(self.init_conv_mask, self.cond_weights)

    def unused_parameters(self) -> list[str]:
        """Parameters no forward reaches: the Swin's classification ``norm`` and ``head`` (upstream keeps
        them from torchvision) and, without ``DPMCARK``, ``init_conv_carK``. Upstream lists them in its
        optimizer, where they never get a gradient."""
        unused = ("init_conv_mask.norm.", "init_conv_mask.head.")
        if not self.carsDPM:
            unused += ("init_conv_carK.",)
        return [name for name, _ in self.named_parameters() if name.startswith(unused)]

    def check_latent_size(self, height: int, width: int) -> None:
        """Refuse a latent size the network cannot run, naming the size it can."""
        if self.variant == "head" and (height, width) != self.latent_size:
            eh, ew = self.latent_size
            hint = ""
            if height % self.downsampling == 0 and width % (2 * self.downsampling) == 0:
                fit = (8 * (height // self.downsampling + 2), 16 * (width // self.downsampling // 2 + 1))
                hint = f"; input_size {list(fit)} would fit {height}x{width}"
            raise ValueError(
                f"RadioDiffUNet built with input_size {list(self.input_size)} runs on {eh}x{ew} latents "
                f"({4 * eh}x{4 * ew} maps with RadioDiff's 4x first stage) only, got {height}x{width}: its "
                f"bottleneck FFT weight fits a {eh // self.downsampling}x{ew // self.downsampling} map{hint}")
        if height % self.downsampling or width % self.downsampling:
            raise ValueError(f"RadioDiffUNet needs latent sides divisible by {self.downsampling}, "
                             f"got {height}x{width}")

    def forward(self, x: torch.Tensor, time: torch.Tensor,
                cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_latent_size(*x.shape[-2:])
        sigma = time.reshape(-1, 1, 1, 1)
        c_skip1 = 1 - sigma
        c_skip2 = torch.sqrt(sigma)
        c_out1 = sigma / torch.sqrt(sigma**2 + 1)
        c_out2 = torch.sqrt(1 - sigma) / torch.sqrt(sigma**2 + 1)
        x_in = x

        hm = self.init_conv_mask(self.init_conv_carK(cond) if self.carsDPM else cond)
        x = self.init_conv(torch.cat([x, F.interpolate(hm[0], size=x.shape[-2:], mode="bilinear")], dim=1))
        r = x.clone()
        t = self.time_mlp(torch.log(time) / 4)
        hm = [project(feat) for project, feat in zip(self.projects, hm, strict=True)]

        skips = []
        for i, ((block1, block2, attn, downsample), relation) in enumerate(
                zip(self.downs, self.relation_layers_down, strict=True)):
            x = block1(x, t)
            skips.append(x)
            x = relation(hm[i], x)
            x = attn(block2(x, t))
            skips.append(x)
            x = downsample(x)

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        if self.variant == "head":
            x1, x2 = x + self.decouple1(x), x + self.decouple2(x)
        else:
            x1 = x2 = x
        out1 = self._decode(x1, skips, hm, r, t, self.ups, self.relation_layers_up,
                            self.final_res_block, self.final_conv)
        out2 = self._decode(x2, skips, hm, r, t, self.ups2, self.relation_layers_up2,
                            self.final_res_block2, self.final_conv2)
        return c_skip1 * x_in + c_out1 * out1, c_skip2 * x_in + c_out2 * out2

    @staticmethod
    def _decode(x: torch.Tensor, skips: list[torch.Tensor], hm: list[torch.Tensor], r: torch.Tensor,
                t: torch.Tensor, ups: nn.ModuleList, relations: nn.ModuleList, final_block: ResnetBlock,
                final_conv: nn.Conv2d) -> torch.Tensor:
        """One decoder: skips and condition scales are taken deepest first."""
        skips, hm = list(skips), list(hm)
        for (block1, block2, attn, upsample), relation in zip(ups, relations, strict=True):
            x = block1(torch.cat((x, skips.pop()), dim=1), t)
            x = relation(hm.pop(), x)
            x = block2(torch.cat((x, skips.pop()), dim=1), t)
            x = upsample(attn(x))
        return final_conv(final_block(torch.cat((x, r), dim=1), t))
