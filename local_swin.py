"""Local learning on a Swin Transformer via feature reconstruction, in one file.

Reference implementation of Pathak, Zhang and Samaras, "Local Learning on Transformers via
Feature Reconstruction" (arXiv 2212.14215, 2022), on top of the Swin Transformer of Liu et al.
(arXiv 2103.14030). The network is cut into K gradient-isolated modules; module i < K learns
from its own auxiliary block (a supervised contrastive loss plus a decoder that reconstructs
the module's *input features*), module K from the usual cross-entropy. No gradient crosses a
module boundary, so a module's graph is freed as soon as its loss has been backpropagated.

The method comes first, in the paper's order: 3.1 Swin, 3.2-3.3 the modules and the split,
3.4 the auxiliary block, 3.5 the losses, then the greedy step and the optimizers. A reader of
the paper can stop at the divider after them; the infrastructure follows (weight import,
memory, balanced split, data, the run, parallelism, the command line). "design note n" in a
comment points at the README's design notes, which decide every point the paper leaves open.

    python local_swin.py --dataset cifar10 --k 4
"""
import argparse
import collections
import contextlib
import copy
import dataclasses
import fcntl
import json
import math
import os
import pathlib
import re
import signal
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets
from torchvision.ops import StochasticDepth
from torchvision.transforms import v2


class ConfigError(Exception):
    """Bad input from the user: the command line prints it as one line and exits with 2."""


@dataclass(frozen=True)
class SwinShape:
    """One of the Swin paper's architectures (design note 2)."""
    embed_dim: int  # channels C of stage 1; they double at each patch merging
    depths: tuple  # Swin blocks per stage
    heads: tuple  # attention heads per stage
    drop_path: float  # stochastic depth rate of the last block (ImageNet scale)


ARCHS = {
    "swin-t": SwinShape(96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2),
    "swin-s": SwinShape(96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3),
    "swin-b": SwinShape(128, (2, 2, 18, 2), (4, 8, 16, 32), 0.5),
    "swin-l": SwinShape(192, (2, 2, 18, 2), (6, 12, 24, 48), 0.2),
}


@dataclass(frozen=True)
class Defaults:
    """Every default a reader needs, in one place: the paper's, or ours where it is silent."""
    img_size: int = 224  # section 4: images resized to 224 px for Swin-T
    patch_size: int = 4  # 3.1
    window_size: int = 7  # 3.1; 12 at 384 px
    aux_channels: int = 128  # 3.4, our choice: the conv block of each auxiliary block
    projection_dim: int = 128  # 3.4: the contrastive head's output
    decoder_channels: int = 16  # 3.4, our choice: narrow, as InfoPro's (design note 4)
    lambdas: tuple = (3.0, 0.0)  # 3.5: lambda_i falls linearly from module 1 to K-1
    mus: tuple = (1.0, 4.0)  # 3.5: mu_i rises linearly from module 1 to K-1
    temperature: float = 0.07  # NT-Xent, InfoPro's value
    k: int = 4  # modules
    epochs: int = 300  # section 4: Swin's recipe (design note 6)
    warmup_share: float = 1 / 15  # 20 of 300 epochs
    batch_size: int = 128
    lr_per_512: float = 5e-4  # the peak learning rate, scaled linearly with the batch
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    clip_grad: float = 5.0
    crop_scale: float = 0.35  # our choice: the smallest area a random resized crop keeps


PAPER = Defaults()


# ---- Paper 3.1: the Swin Transformer backbone ----------------------------------------------

def relative_position_index(window):
    """(M*M, M*M): the row of the (2M-1)^2-row bias table for every pair of tokens in a window."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (M*M, 2)
    delta = coords[:, None, :] - coords[None, :, :] + (window - 1)  # each offset in [0, 2M-2]
    return delta[..., 0] * (2 * window - 1) + delta[..., 1]


def shifted_window_mask(resolution, window, shift):
    """(num_windows, M*M, M*M) additive mask for SW-MSA: -100 where two tokens share a window
    only because the cyclic shift wrapped one of them around the border, else 0.

    The shifted grid falls into 3 x 3 regions (rows/columns [0, R-M), [R-M, R-s), [R-s, R));
    tokens of different regions were never neighbours. -100 (not -inf) as in the Swin code,
    which keeps the softmax finite and our logits equal to torchvision's.
    """
    r, m, s = resolution, window, shift
    bounds = ((0, r - m), (r - m, r - s), (r - s, r))
    region = torch.zeros(r, r)
    for i, (h0, h1) in enumerate(bounds):
        for j, (w0, w1) in enumerate(bounds):
            region[h0:h1, w0:w1] = 3 * i + j
    region = rearrange(region, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=m, ww=m)
    return (region[:, :, None] != region[:, None, :]).float() * -100.0


class WindowAttention(nn.Module):
    """W-MSA (shift 0) or SW-MSA (shift M/2) with a learned relative-position bias.

    Input and output are (B, H, W, C). The bias and the shift mask go into
    F.scaled_dot_product_attention as attn_mask, so a GPU can use a kernel that never stores
    the full attention matrix.
    """

    def __init__(self, *, dim, heads, resolution, window, shift):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        table = torch.zeros((2 * window - 1) ** 2, heads)
        self.relative_position_bias_table = nn.Parameter(table)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Both derive from the shapes alone, so they are not saved in checkpoints.
        index = relative_position_index(window)
        self.register_buffer("relative_position_index", index, persistent=False)
        if shift:
            mask = shifted_window_mask(resolution, window, shift)
        else:
            mask = torch.zeros((resolution // window) ** 2, window**2, window**2)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        side, m = x.shape[1], self.window
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = rearrange(x, "b (nh wh) (nw ww) c -> b (nh nw) (wh ww) c", wh=m, ww=m)
        # chunk, not a "three" axis unbound: its backward is one cat, measurably faster on a CPU.
        q, k, v = self.qkv(windows).chunk(3, dim=-1)
        # Windows and heads share one batch axis: SDPA's fused kernels take 4-D tensors.
        q = rearrange(q, "b w n (h d) -> b (w h) n d", h=self.heads)
        k = rearrange(k, "b w n (h d) -> b (w h) n d", h=self.heads)
        v = rearrange(v, "b w n (h d) -> b (w h) n d", h=self.heads)
        bias = self.relative_position_bias_table[self.relative_position_index]  # (n, m, heads)
        bias = rearrange(bias, "n m h -> h n m")
        attn_mask = self.mask[:, None] + bias[None]  # (windows, heads, n, m)
        attn_mask = rearrange(attn_mask, "w h n m -> 1 (w h) n m")  # broadcast over the batch
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
        out = rearrange(out, "b (w h) n d -> b w n (h d)", h=self.heads)
        out = self.proj(out)
        x = rearrange(out, "b (nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=side // m, wh=m)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x


class SwinBlock(nn.Module):
    """x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))); MLP ratio 4, GELU."""

    def __init__(self, *, dim, heads, resolution, window, shift, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, heads=heads, resolution=resolution, window=window,
                                    shift=shift)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = StochasticDepth(drop_path, "row")  # drops a sample's whole branch

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """p x p convolution with stride p, then LayerNorm: (B, 3, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, *, img_size, patch_size, dim):
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images):
        if images.shape[-3:] != (3, self.img_size, self.img_size):
            # The shift masks are built for one resolution; a wrong size would fail deep inside.
            raise ValueError(f"expected images of shape (B, 3, {self.img_size}, {self.img_size}), "
                             f"got {tuple(images.shape)}")
        x = rearrange(self.proj(images), "b c h w -> b h w c")
        return self.norm(x)


class PatchMerging(nn.Module):
    """Concatenate each 2 x 2 neighbourhood (4C), LayerNorm, Linear 4C -> 2C without bias."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        # Channel order (dw dh c) is the Swin and torchvision code's, so weights carry over.
        x = rearrange(x, "b (h dh) (w dw) c -> b h w (dw dh c)", dh=2, dw=2)
        return self.reduction(self.norm(x))


class ClassifierHead(nn.Module):
    """H: LayerNorm, global average pool, Linear to the classes. (B, h, w, C) -> (B, classes)."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(self.norm(x).mean(dim=(1, 2)))


def stage_window(stage, resolution, window):
    """(window, shift) of a stage: the window clipped to a grid no larger than it, and then no
    shift (design note 2); a grid larger than the window must be a multiple of it."""
    if resolution <= window:
        return resolution, 0
    if resolution % window:
        raise ConfigError(f"stage {stage} has a {resolution} x {resolution} token grid, larger "
                          f"than the {window} x {window} window but not a multiple of it; choose "
                          "--img-size/--patch-size/--window-size so it is")
    return window, window // 2


class SwinTransformer(nn.Module):
    """Patch embedding, stages of (W-MSA, SW-MSA) block pairs with patch merging between, head."""

    def __init__(self, *, num_classes, img_size, patch_size, window_size, embed_dim, depths,
                 heads, drop_path):
        super().__init__()
        if len(depths) != len(heads):
            raise ConfigError(f"--depths has {len(depths)} stages but --heads has {len(heads)}")
        if img_size % patch_size:
            raise ConfigError(f"--img-size {img_size} is not a multiple of --patch-size "
                              f"{patch_size}")
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, dim=embed_dim)
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()  # rising linearly
        self.stages, self.merges = nn.ModuleList(), nn.ModuleList()
        self.dims, self.resolutions = [], []  # per stage; the split (3.3) reads them
        dim, res = embed_dim, img_size // patch_size
        for s, (depth, h) in enumerate(zip(depths, heads), start=1):
            if dim % h:
                raise ConfigError(f"stage {s}: {dim} channels do not split into {h} heads")
            window, shift = stage_window(s, res, window_size)
            blocks = [SwinBlock(dim=dim, heads=h, resolution=res, window=window,
                                shift=shift if j % 2 else 0, drop_path=rates.pop(0))
                      for j in range(depth)]
            self.stages.append(nn.Sequential(*blocks))
            self.dims.append(dim)
            self.resolutions.append(res)
            if s < len(depths):
                if res % 2:
                    raise ConfigError(f"stage {s} has an odd {res} x {res} token grid: "
                                      "patch merging needs it even")
                self.merges.append(PatchMerging(dim))
                dim, res = 2 * dim, res // 2
        self.head = ClassifierHead(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, images):
        x = self.patch_embed(images)
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if s < len(self.merges):
                x = self.merges[s](x)
        return self.head(x)


def build_model(arch, num_classes, img_size=PAPER.img_size, **overrides):
    """Our SwinTransformer for `arch` (a key of ARCHS); overrides: patch_size, window_size,
    embed_dim, depths, heads, drop_path (None keeps the default)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    config = dict(patch_size=PAPER.patch_size, **dataclasses.asdict(ARCHS[arch]),
                  window_size=12 if img_size == 384 else PAPER.window_size)
    config.update({key: value for key, value in overrides.items() if value is not None})
    return SwinTransformer(num_classes=num_classes, img_size=img_size, **config)


# ---- Paper 3.2-3.3: gradient-isolated modules and where to cut -----------------------------

def resolve_split(split, k, depths):
    """Module ends as block counts: module i holds blocks ends[i-1]+1 .. ends[i] (numbered
    1..N), the last module the rest. `split` is "paper" or a list such as "3,5,11"."""
    n = sum(depths)
    if split != "paper":
        try:
            ends = tuple(int(b) for b in split.split(","))
        except ValueError:
            raise ConfigError(f"--split {split!r} is not 'paper', 'balanced', 'time' or a "
                              "comma-separated list of block numbers")
        if any(b <= a for a, b in zip(ends, ends[1:])) or ends[0] < 1 or ends[-1] >= n:
            raise ConfigError(f"--split {split}: module ends must increase strictly within "
                              f"1..{n - 1} (the model has {n} blocks; the last module ends at "
                              f"block {n})")
        if k is not None and k != len(ends) + 1:
            raise ConfigError(f"--split {split} makes {len(ends) + 1} modules but --k is {k}")
        return ends
    k = PAPER.k if k is None else k
    if not 1 <= k <= n:
        raise ConfigError(f"--k {k}: must be between 1 and the number of blocks, {n}")
    if tuple(depths) == (2, 2, 6, 2) and k in (2, 4):
        # design note 3, the paper's Swin-T splits by stage: K=4 a stage per module, K=2 1 | 2-4.
        return (2, 4, 10) if k == 4 else (2,)
    sizes = [n // k + (i < n % k) for i in range(k)]  # K contiguous runs of nearly equal length
    return tuple(sum(sizes[:i + 1]) for i in range(k - 1))


@dataclass
class ModuleSpec:
    """One module g_i: its backbone layers, and the shapes (channels, token-grid side) of its
    input x_{i-1} and output x_i, which size its auxiliary block."""
    layers: nn.Sequential
    in_dim: int
    in_res: int
    out_dim: int
    out_res: int


def block_units(model):
    """The blocks in order, each as the layers a split cannot separate (a block, and the patch
    merging after it if it ends a stage), with the (channels, grid side) of its output."""
    units = []
    for s, stage in enumerate(model.stages):
        for block in stage:
            if block is stage[-1] and s < len(model.merges):
                units.append(([block, model.merges[s]], 2 * model.dims[s],
                              model.resolutions[s] // 2))
            else:
                units.append(([block], model.dims[s], model.resolutions[s]))
    return units


class Checkpointed(nn.Sequential):
    """--checkpoint (design note 8): layers whose activations are recomputed in the backward
    pass instead of kept; only their input stays alive. Non-reentrant checkpointing restores
    the random state, so drop-path drops the same paths when it recomputes."""

    def forward(self, x):
        if not torch.is_grad_enabled():  # nothing to recompute in evaluation
            return super().forward(x)
        return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False)


def split_backbone(model, ends, checkpoint=False):
    """Cut the backbone after the given block counts. A patch merging goes with the block that
    ends its stage; module 1's input is the patch embedding (its LocalModule runs that first)
    and module K ends with the classifier head."""
    units = block_units(model)
    bounds = [0, *ends, len(units)]
    shapes = [(model.dims[0], model.resolutions[0])] + [(dim, res) for _, dim, res in units]
    specs = []
    for a, b in zip(bounds, bounds[1:]):
        layers = []
        for unit, _, _ in units[a:b]:
            layers += [Checkpointed(*unit)] if checkpoint else unit
        if b == len(units):
            layers.append(model.head)
        specs.append(ModuleSpec(nn.Sequential(*layers), *shapes[a], *shapes[b]))
    return specs


# ---- Paper 3.4: the auxiliary block f_i ----------------------------------------------------

DECODERS = ("interp", "deconv", "deconv4")


def make_decoder(kind, in_ch, out_ch, upscale, channels=PAPER.decoder_channels):
    """Reconstruction head: (B, in_ch, h, w) -> logits (B, out_ch, h*upscale, w*upscale).

    The exact layers are our choice (design note 4). `channels` is narrow (InfoPro uses 12-32)
    because the decoder runs at the target's resolution, where every channel is costly.
    """
    if kind == "interp":
        # InfoPro's structure. The 1x1 reduction first is the same linear map as after the
        # bilinear upsampling (both are linear), but runs at the low resolution: cheaper.
        upsample = nn.Identity()
        if upscale > 1:
            upsample = nn.Upsample(scale_factor=upscale, mode="bilinear", align_corners=False)
        return nn.Sequential(
            nn.Conv2d(in_ch, channels, 1, bias=False), upsample,
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True), nn.Conv2d(channels, out_ch, 3, padding=1))
    if kind not in DECODERS:
        raise ConfigError(f"unknown --decoder {kind!r}; choose one of {', '.join(DECODERS)}")
    steps = int(math.log2(upscale))
    if 2**steps != upscale:
        raise ConfigError(f"--decoder {kind} upsamples by 2 per layer; it cannot reach a factor "
                          f"of {upscale}")
    kernel, padding = (2, 0) if kind == "deconv" else (4, 1)
    layers, ch = [], in_ch
    for _ in range(steps):
        layers += [nn.ConvTranspose2d(ch, channels, kernel, stride=2, padding=padding, bias=False),
                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        ch = channels
    return nn.Sequential(*layers, nn.Conv2d(ch, out_ch, 1))


class AuxBlock(nn.Module):
    """f_i's network: LayerNorm, a conv block reducing the channels (our choice: 3x3 conv,
    BatchNorm, ReLU), then a contrastive head (pool, 2-layer MLP, L2-normalised) and, if
    `target_dim`, a decoder reconstructing a (target_dim, h*upscale, w*upscale) map."""

    def __init__(self, *, in_dim, target_dim=None, upscale=1, decoder="interp",
                 channels=PAPER.aux_channels, projection_dim=PAPER.projection_dim):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.conv = nn.Sequential(nn.Conv2d(in_dim, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.projector = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True),
                                       nn.Linear(channels, projection_dim))
        self.decoder = None
        if target_dim:
            self.decoder = make_decoder(decoder, channels, target_dim, upscale)

    def forward(self, x):
        """x_i (B, h, w, c) -> (z: (B, projection_dim) unit vectors, reconstruction or None)."""
        h = self.conv(rearrange(self.norm(x), "b h w c -> b c h w"))
        z = F.normalize(self.projector(h.mean(dim=(2, 3))), dim=1)
        return z, (self.decoder(h) if self.decoder is not None else None)


# ---- Paper 3.5: the losses (eq. 1-3) and the local module that owns its loss ---------------

def supervised_nt_xent(z, labels, temperature=PAPER.temperature):
    """L^xy: NT-Xent in its supervised form (Chen et al. 2020; Khosla et al. 2020, as in
    InfoPro). z: (B, d) unit vectors, one view per sample. For each anchor, every other sample
    of its class is a positive and all other samples are the denominator; the anchor itself is
    excluded. Mean over anchors that have a positive (0 if none has)."""
    sim = z @ z.T / temperature
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim.masked_fill(self_pair, float("-inf")).log_softmax(dim=1)
    positive = (labels[:, None] == labels[None, :]) & ~self_pair
    num_pos = positive.sum(dim=1)
    per_anchor = -torch.where(positive, log_prob, 0.0).sum(dim=1) / num_pos.clamp(min=1)
    has_pos = num_pos > 0
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp(min=1)


def reconstruction_bce(logits, target):
    """L^xx: binary cross-entropy between the decoder's logits and a target in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits, target)


def lambda_mu_schedule(num_aux, lambdas=None, mus=None):
    """Weights of eq. 2 for modules 1..K-1 (design note 5): linear from (3.0, 1.0) at module 1
    to (0.0, 4.0) at module K-1; a single auxiliary module gets (3.0, 1.0)."""
    steps = [i / (num_aux - 1) if num_aux > 1 else 0.0 for i in range(num_aux)]
    (l0, l1), (m0, m1) = PAPER.lambdas, PAPER.mus
    lambdas = [l0 + (l1 - l0) * t for t in steps] if lambdas is None else list(lambdas)
    mus = [m0 + (m1 - m0) * t for t in steps] if mus is None else list(mus)
    for name, values in (("--lambdas", lambdas), ("--mus", mus)):
        if len(values) != num_aux:
            raise ConfigError(f"{name} has {len(values)} values; K={num_aux + 1} modules need "
                              f"{num_aux} (one per module 1..K-1)")
    return lambdas, mus


class InputTarget(nn.Module):
    """Ours: module i reconstructs its input x_{i-1}, detached. Features are not in [0, 1], so
    BCE scores the decoder's logits against sigmoid(x_{i-1}) (design note 5)."""

    def forward(self, x_in, images):
        return torch.sigmoid(rearrange(x_in.detach(), "b h w c -> b c h w"))


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageTarget(nn.Module):
    """InfoPro: every module reconstructs the input image, de-normalised to [0, 1]."""

    def __init__(self):
        super().__init__()
        mean_std = torch.tensor([IMAGENET_MEAN, IMAGENET_STD]).view(2, 1, 3, 1, 1)
        self.register_buffer("mean_std", mean_std, persistent=False)  # moves with the module

    def forward(self, x_in, images):
        mean, std = self.mean_std
        return (images * std + mean).clamp(0, 1)


class ReconstructContrastLoss(nn.Module):
    """f_i for i < K: L_i = f_i(x_i, x_{i-1}, y) = lambda_i L^xx + mu_i L^xy (eq. 1-2). `head`
    is the AuxBlock; `target` the map its decoder reconstructs (none when lambda_i = 0)."""

    def __init__(self, head, *, lam, mu, target=None, temperature=PAPER.temperature):
        super().__init__()
        self.head, self.target = head, target
        self.lam, self.mu, self.temperature = lam, mu, temperature

    def forward(self, x_out, x_in, images, labels):
        z, recon = self.head(x_out)
        l_con = supervised_nt_xent(z, labels, self.temperature)
        l_rec = 0.0
        if recon is not None:
            l_rec = reconstruction_bce(recon, self.target(x_in, images).to(recon.dtype))
        return self.lam * l_rec + self.mu * l_con  # eq. 2


class ClassifierLoss(nn.Module):
    """Cross-entropy with label smoothing: eq. 3 for module K, L_K = CE(H(g_K(x_{K-1})), y),
    whose layers end with H (head None); greedy-CE's local loss with `head` a ClassifierHead."""

    def __init__(self, head=None, label_smoothing=PAPER.label_smoothing):
        super().__init__()
        self.head, self.label_smoothing = head, label_smoothing

    def forward(self, x_out, x_in, images, labels):
        logits = x_out if self.head is None else self.head(x_out)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


METHODS = ("ours", "infopro", "greedy-ce", "greedy-contrast")


def auxiliary_loss(method, spec, *, lam, mu, num_classes, img_size, decoder="interp",
                   temperature=PAPER.temperature, label_smoothing=PAPER.label_smoothing):
    """Module i's local loss for i < K. The method picks it once, here (design note 5): ours
    (reconstruct x_{i-1} + contrast), infopro (reconstruct the image + contrast), greedy-ce
    (pool + linear classifier), greedy-contrast (contrast only: lambda_i = 0)."""
    if method == "greedy-ce":
        return ClassifierLoss(ClassifierHead(spec.out_dim, num_classes), label_smoothing)
    weights = dict(lam=lam, mu=mu, temperature=temperature)
    if lam == 0:  # nothing to reconstruct: no decoder to pay for
        return ReconstructContrastLoss(AuxBlock(in_dim=spec.out_dim), **weights)
    if method == "infopro":  # the whole image, from x_i, upsampled to the image size
        head = AuxBlock(in_dim=spec.out_dim, target_dim=3, upscale=img_size // spec.out_res,
                        decoder=decoder)
        return ReconstructContrastLoss(head, target=ImageTarget(), **weights)
    head = AuxBlock(in_dim=spec.out_dim, target_dim=spec.in_dim,
                    upscale=spec.in_res // spec.out_res, decoder=decoder)
    return ReconstructContrastLoss(head, target=InputTarget(), **weights)


class LocalModule(nn.Module):
    """Module g_i with its local loss: forward(x_{i-1}, images, labels) -> (x_i, L_i). It owns
    exactly what optimizer i updates (the patch embedding for i = 1, module i's layers, its
    auxiliary block), so DistributedDataParallel can wrap each module on its own."""

    def __init__(self, layers, loss, stem=None):
        super().__init__()
        self.stem, self.layers, self.loss = stem, layers, loss

    def features(self, x):
        """x_{i-1} (images for module 1) -> x_i, without the loss."""
        return self.layers(x if self.stem is None else self.stem(x))

    def forward(self, x, images, labels):
        x_in = x if self.stem is None else self.stem(x)  # x_0 is the patch embedding
        x_out = self.layers(x_in)
        return x_out, self.loss(x_out, x_in, images, labels)


def device_of(module):
    return next(module.parameters()).device


class LocalSwin(nn.Module):
    """The backbone cut into K LocalModules (`local_modules`, in order). Called on images, they
    run in sequence: the same function as backbone(images). The parameters are registered
    once, in `backbone` and `aux` (the auxiliary losses of modules 1..K-1)."""

    def __init__(self, backbone, ends, *, method="ours", decoder="interp", lambdas=None,
                 mus=None, temperature=PAPER.temperature,
                 label_smoothing=PAPER.label_smoothing, checkpoint=False):
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
        if decoder not in DECODERS:  # checked here too: with K = 1 no decoder is ever built
            raise ConfigError(f"unknown --decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
        self.backbone, self.ends, self.method = backbone, tuple(ends), method
        self.specs = split_backbone(backbone, self.ends, checkpoint)
        self.lambdas, self.mus = lambda_mu_schedule(len(self.specs) - 1, lambdas, mus)
        if method == "greedy-contrast":
            self.lambdas = [0.0] * len(self.lambdas)
        num_classes, img_size = backbone.head.fc.out_features, backbone.patch_embed.img_size
        self.aux = nn.ModuleList(
            auxiliary_loss(method, spec, lam=lam, mu=mu, num_classes=num_classes,
                           img_size=img_size, decoder=decoder, temperature=temperature,
                           label_smoothing=label_smoothing)
            for spec, lam, mu in zip(self.specs, self.lambdas, self.mus))
        losses = [*self.aux, ClassifierLoss(label_smoothing=label_smoothing)]
        stems = [backbone.patch_embed] + [None] * (len(self.specs) - 1)
        self.local_modules = [LocalModule(spec.layers, loss, stem)  # a list: not registered twice
                              for spec, loss, stem in zip(self.specs, losses, stems)]

    def forward(self, images):
        x = images
        for module in self.local_modules:
            x = module.features(x)
        return x


# ---- Greedy training (paper 3.2-3.3): one module at a time ---------------------------------

def autocast(device, dtype):
    """Mixed precision where asked for (torch.autocast takes no "meta" device, even when off)."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def local_step(module, optimizer, x, images, labels, *, clip_grad=PAPER.clip_grad,
               amp_dtype=None, scaler=None, seed=None):
    """Module i's part of a training step: x_i = g_i(x_{i-1}) and L_i, L_i backpropagated
    into module i alone, optimizer i's step. Returns (x_i detached, L_i). `seed` makes module
    i's random draws (drop-path) its own, whichever process runs the other modules."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    if seed is not None:
        torch.manual_seed(seed)
    with autocast(device_of(module), amp_dtype):
        out, loss = module(x, images, labels)
    scaler.scale(loss).backward()  # frees module i's graph
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # gradients need not outlive the step
    return out.detach().float(), loss.detach()  # no gradient crosses a module boundary


def train_step(modules, optimizers, images, labels, *, scalers=None, seed=None, **step_options):
    """One training step (design note 1) over the K LocalModules, with one optimizer (and
    loss scale) each. Module i runs on the detached x_{i-1}, its local loss is backpropagated
    and its optimizer steps before module i+1 starts, so only one module's graph is ever
    alive. (Summing the K losses into one backward would give the same gradients but keep
    every graph alive: none of the memory saving.) Returns the K losses."""
    losses, x = [], images
    for i, (module, optimizer) in enumerate(zip(modules, optimizers)):
        x, loss = local_step(module, optimizer, x, images, labels, **step_options,
                             scaler=scalers[i] if scalers else None,
                             seed=None if seed is None else seed + i)
        losses.append(loss)
    return losses


def make_optimizers(modules, *, lr, weight_decay, total_steps, warmup_steps):
    """One AdamW per module (with its auxiliary block), Swin's recipe: no weight decay on
    biases, norms and relative-position tables; linear warm-up then cosine decay, per step."""
    optimizers, schedulers = [], []
    for module in modules:
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            (no_decay if p.ndim <= 1 or name.endswith("bias_table") else decay).append(p)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        phases, milestones = [], []
        if warmup_steps:
            phases.append(torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3,
                                                            total_iters=warmup_steps))
            milestones.append(warmup_steps)
        phases.append(torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(total_steps - warmup_steps, 1), eta_min=lr / 100))
        optimizers.append(optimizer)
        schedulers.append(torch.optim.lr_scheduler.SequentialLR(optimizer, phases, milestones))
    return optimizers, schedulers


# =============================================================================================
# The method ends here. What follows is infrastructure: importing torchvision's weights,
# measuring memory, the balanced splits, data, the training run, parallelism and the command
# line. None of it changes what the method computes.
# =============================================================================================

# ---- Importing torchvision's weights: the parity check, and --pretrained --------------------

def torchvision_key(key):
    """The name torchvision's swin_t/s/b gives the tensor our state_dict calls `key`."""
    key = re.sub(r"^stages\.(\d+)\.", lambda m: f"features.{2 * int(m[1]) + 1}.", key)
    key = re.sub(r"^merges\.(\d+)\.", lambda m: f"features.{2 * int(m[1]) + 2}.", key)
    key = key.replace(".mlp.2.", ".mlp.3.")  # torchvision's MLP has a Dropout after the GELU
    renames = (("patch_embed.proj.", "features.0.0."), ("patch_embed.norm.", "features.0.2."),
               ("head.norm.", "norm."), ("head.fc.", "head."))
    for ours, theirs in renames:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def load_torchvision_weights(model, state_dict, with_head=True):
    """Copy the weights of torchvision's swin_t/swin_s/swin_b into our model (as nanoGPT's
    from_pretrained does): every key mapped, counts and shapes checked, copied without grad.
    with_head=False leaves our classifier (sized for another data set's classes) as it is."""
    ours = {k: v for k, v in model.state_dict().items()
            if with_head or not k.startswith("head.fc.")}
    theirs = {k: v for k, v in state_dict.items()
              if not k.endswith("relative_position_index")
              and (with_head or not k.startswith("head."))}
    if len(ours) != len(theirs):
        raise ConfigError(f"our model has {len(ours)} tensors, the torchvision state_dict "
                          f"{len(theirs)}: not the same architecture")
    with torch.no_grad():
        for key, tensor in ours.items():
            source = theirs.get(torchvision_key(key))
            if source is None or source.shape != tensor.shape:
                found = "missing" if source is None else tuple(source.shape)
                raise ConfigError(f"{key}: expected {tuple(tensor.shape)} at "
                                  f"{torchvision_key(key)}, found {found}")
            tensor.copy_(source)
    # We recompute the relative-position index; it must be the one torchvision stored.
    for name, buffer in model.named_buffers():
        stored = state_dict.get(torchvision_key(name))
        if name.endswith("relative_position_index") and stored is not None:
            assert torch.equal(buffer.flatten(), stored.flatten().to(buffer.device))
    return model


TORCHVISION_WEIGHTS = {"swin-t": "Swin_T_Weights", "swin-s": "Swin_S_Weights",
                       "swin-b": "Swin_B_Weights"}


def pretrained_state_dict(arch):
    """torchvision's ImageNet-1k weights for `arch`, fetched once through its weights API."""
    if arch not in TORCHVISION_WEIGHTS:
        raise ConfigError("--pretrained: torchvision has ImageNet weights for "
                          f"{', '.join(TORCHVISION_WEIGHTS)} only")
    from torchvision.models import get_weight
    weights = get_weight(f"{TORCHVISION_WEIGHTS[arch]}.IMAGENET1K_V1")
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), a damaged file
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise ConfigError(f"--pretrained: could not fetch {weights.url} "
                          f"({getattr(e, 'reason', e)}); torchvision caches weights in {cache}: "
                          f"put {os.path.basename(weights.url)} there to use them offline")


# ---- Memory: the paper's headline claim, measured the same way on every device -------------

class LiveTensorMeter(TorchDispatchMode):
    """The CPU's torch.cuda.max_memory_allocated: the peak bytes of the storages that operators
    returned while the meter was active and that are alive (a kernel's scratch space is not)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes = {}  # id(storage) -> bytes, for the storages counted and still alive

    def _free(self, key):
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        if func is torch.ops.aten.lift_fresh.default:  # torch.tensor(...): new, though an input
            inputs = set()
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()  # torch keeps one Python object per live storage
            key = id(storage)
            if key in inputs or key in self._sizes:  # a view or an in-place result: nothing new
                continue
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


class PeakMemory:
    """Peak training memory in bytes on one device. CUDA: max_memory_allocated since this object
    was made. CPU: `baseline` (bytes live before) plus the meter's peak in `region()`s. Other
    devices: None."""

    def __init__(self, device, baseline=0):
        self.device, self.baseline, self.cuda = device, baseline, device.type == "cuda"
        self.meter = LiveTensorMeter() if device.type == "cpu" else None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def region(self):
        return self.meter if self.meter is not None else contextlib.nullcontext()

    def live_bytes(self):
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return self.baseline + self.meter.live if self.meter is not None else None

    def peak_bytes(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return self.baseline + self.meter.peak if self.meter is not None else None


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(net, optimizers):
    """What training keeps between steps: parameters, buffers and AdamW state."""
    state = [v for opt in optimizers for s in opt.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)]
    return tensor_bytes([*net.parameters(), *net.buffers(), *state])


def count_flops(net, images, labels, **step_kwargs):
    """FLOPs of one training step (recomputation and auxiliary blocks included), counted on a
    copy of the network on the meta device: shapes only, no memory."""
    meta = copy.deepcopy(net).to("meta")
    optimizers = [torch.optim.AdamW(module.parameters()) for module in meta.local_modules]
    step_kwargs = {**step_kwargs, "amp_dtype": None, "scalers": None}  # the same count
    with FlopCounterMode(display=False) as flops:
        train_step(meta.local_modules, optimizers, images.to("meta"), labels.to("meta"),
                   **step_kwargs)
    return flops.get_total_flops()


def seconds(fn, device, repeats=3):
    """The median time of fn() over `repeats` calls, after one that warms up."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":  # CUDA runs asynchronously
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def measure_memory(net, optimizers, *, batch_size, num_classes, device, steps=3, modules=None,
                   **step_kwargs):
    """--measure-memory, on random tensors: the peak training memory, its part above parameters
    and optimizer state (activations, gradients, temporaries), the step time, FLOPs."""
    modules = net.local_modules if modules is None else modules
    size = net.backbone.patch_embed.img_size
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(num_classes, (batch_size,), device=device)
    step = lambda: train_step(modules, optimizers, images, labels, **step_kwargs)  # noqa: E731
    net.train()
    scalers = step_kwargs.get("scalers") or []
    for _ in range(10):  # warm up until every optimizer holds its state (fp16's scaler skips
        scales = [scaler.get_scale() for scaler in scalers]  # a step that overflows)
        step()
        if all(scaler.get_scale() >= scale for scaler, scale in zip(scalers, scales)):
            break
    step_time = seconds(step, device, repeats=steps)
    state = state_bytes(net, optimizers)
    memory = PeakMemory(device, baseline=state + tensor_bytes([images, labels]))
    with memory.region():
        step()
    peak, mib = memory.peak_bytes(), 2**20
    above = peak and peak - state
    return {"peak_memory_mib": peak and peak / mib, "state_memory_mib": state / mib,
            "activation_memory_mib": above and above / mib,
            "step_gflop": count_flops(net, images, labels, **step_kwargs) / 1e9,
            "step_time_s": step_time, "images_per_second": batch_size / step_time}


# ---- Balanced splits: by memory (--split balanced) and by time (--split time) --------------

def min_max_split(n, k, cost):
    """The ends b_1 < ... < b_{K-1} of K modules over n blocks that minimise the largest
    cost(i, a, b) (module i + 1 holding blocks a+1 .. b): a dynamic program over (modules
    placed, blocks covered), each later module left at least a block."""
    best = {(0, 0): (0, ())}  # (modules placed, blocks covered) -> (largest cost, ends)
    for i in range(k):
        covers = [n] if i == k - 1 else range(i + 1, n - (k - 1 - i) + 1)
        for b in covers:
            options = [(max(best[i, a][0], cost(i, a, b)), best[i, a][1] + (b,))
                       for a in range(i, b) if (i, a) in best]
            best[i + 1, b] = min(options)
    return best[k, n][1]


def bytes_kept(memory, layers, x):
    """The bytes `layers` keep for backward on input x (their output included), and the output,
    detached: the graph dies on return, so a search holds one block's graph at a time."""
    with memory.region():
        before = memory.live_bytes()
        out = layers(x)
        return memory.live_bytes() - before, out.detach()


def balanced_split(backbone, k, lambdas, *, batch_size, device, by="memory", checkpoint=False,
                   method="ours", decoder="interp", **loss_options):
    """Cuts that make the largest module (with its auxiliary block) smallest by "memory" (bytes
    kept for backward) or "time" (forward and backward: a pipeline runs at its slowest module's
    pace), each block and each kind of local loss measured on its own detached input. Returns
    the ends and each module's share of E2E's memory, or of the step's time."""
    units = [layers for layers, _, _ in block_units(backbone)]
    units[-1] = units[-1] + [backbone.head]
    n, size = len(units), backbone.patch_embed.img_size
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(backbone.head.fc.out_features, (batch_size,), device=device)
    backbone.train()
    memory = PeakMemory(device)

    def measure(layers, x):  # (bytes kept or seconds, the output detached)
        if by == "memory":
            return bytes_kept(memory, layers, x)
        return seconds(lambda: layers(x).float().sum().backward(), device), layers(x).detach()

    embedding, x0 = measure(backbone.patch_embed, images)
    full, held, xs = [embedding], [embedding], [x0]  # xs[j] = x_j, the next block's input
    for layers in units:
        plain, out = measure(nn.Sequential(*layers), xs[-1].requires_grad_())
        full.append(plain)
        held.append(measure(Checkpointed(*layers), xs[-1])[0] if checkpoint else plain)
        xs.append(out)
    aux_costs = {}

    def aux_cost(a, b, reconstructs):  # the auxiliary loss on x_b of a module that reads x_a
        key = (xs[a].shape, xs[b].shape, reconstructs)
        if key not in aux_costs:
            spec = ModuleSpec(None, xs[a].shape[-1], xs[a].shape[1], xs[b].shape[-1],
                              xs[b].shape[1])
            lam = float(reconstructs and method != "greedy-contrast")
            loss = auxiliary_loss(method, spec, lam=lam, mu=1.0, img_size=size, decoder=decoder,
                                  num_classes=backbone.head.fc.out_features,
                                  **loss_options).to(device)
            step = lambda: loss(xs[b].detach().requires_grad_(), xs[a].detach(),  # noqa: E731
                                images, labels).backward()
            if by == "time":
                aux_costs[key] = seconds(step, device)
            else:
                peak = PeakMemory(device)
                before = peak.live_bytes()
                with peak.region():
                    step()
                aux_costs[key] = peak.peak_bytes() - before
        return aux_costs[key]

    def module_cost(i, a, b):  # module i + 1: its input, its blocks, and its auxiliary block
        cost = sum(held[a + 1:b + 1]) + (held[0] if a == 0 else 0)
        if by == "memory":
            cost += max(full[a + 1:b + 1]) if checkpoint else 0
            cost += 0 if a == 0 else tensor_bytes([xs[a]])
        return cost + (aux_cost(a, b, lambdas[i] > 0) if b < n else 0)

    ends = min_max_split(n, k, module_cost)
    backbone.zero_grad(set_to_none=True)  # what the timed backward passes left
    costs = [module_cost(i, a, b) for i, (a, b) in enumerate(zip((0,) + ends, ends))]
    return ends[:-1], [c / (sum(full) if by == "memory" else sum(costs)) for c in costs]

# ---- Data (design note 6): whole data sets in memory, augmented a batch at a time ----------

@dataclass
class ImageSet:
    """A data set held in memory: uint8 images (N, C, H, W), C = 1 (grayscale) or 3, and labels.
    Small data sets (MNIST to STL-10) fit easily, and nothing is decoded twice."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)

    def subset(self, index):
        return ImageSet(self.images[index], self.labels[index])


def synthetic_images(train, num_classes=10, size=32):
    """A small data set a model can learn, for smoke tests: each class is a fixed random
    smooth colour pattern, each sample that pattern plus noise."""
    gen = torch.Generator().manual_seed(0)  # the same class patterns in both splits
    patterns = torch.rand(num_classes, 3, 4, 4, generator=gen)
    patterns = F.interpolate(patterns, size=size, mode="bilinear")
    gen.manual_seed(1 if train else 2)
    labels = torch.randint(num_classes, (1024 if train else 256,), generator=gen)
    noisy = patterns[labels] + 0.15 * torch.randn(len(labels), 3, size, size, generator=gen)
    return ImageSet((noisy.clamp(0, 1) * 255).to(torch.uint8), labels)


TORCHVISION_SETS = {  # name: (class, train kwargs, test kwargs, classes)
    "cifar10": (datasets.CIFAR10, {"train": True}, {"train": False}, 10),
    "cifar100": (datasets.CIFAR100, {"train": True}, {"train": False}, 100),
    "stl10": (datasets.STL10, {"split": "train"}, {"split": "test"}, 10),  # no unlabelled split
    "svhn": (datasets.SVHN, {"split": "train"}, {"split": "test"}, 10),
    "mnist": (datasets.MNIST, {"train": True}, {"train": False}, 10),
    "fashion-mnist": (datasets.FashionMNIST, {"train": True}, {"train": False}, 10),
}
DATASETS = (*TORCHVISION_SETS, "imagefolder", "synthetic")


def as_image_set(dataset):
    """The uint8 array a torchvision data set holds, as (N, C, H, W), with its labels."""
    images = torch.as_tensor(dataset.data)
    if images.ndim == 3:  # MNIST-like: (N, H, W), grayscale
        images = images[:, None]
    elif images.shape[-1] == 3:  # CIFAR: (N, H, W, 3)
        images = rearrange(images, "n h w c -> n c h w")
    labels = dataset.labels if hasattr(dataset, "labels") else dataset.targets  # SVHN, STL-10
    return ImageSet(images.contiguous(), torch.as_tensor(labels, dtype=torch.long))


def imagefolder_dirs(root):
    test = next((d for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), "val")
    dirs = [os.path.join(root, d) for d in ("train", test)]
    if not all(os.path.isdir(d) for d in dirs):
        raise ConfigError(f"--dataset imagefolder needs {dirs[0]}/<class>/* and {dirs[1]} (or "
                          "test)/<class>/*; not found")
    return dirs


def read_image(path):
    """A file as an RGB PIL image, naming the file it cannot read (or that is larger than PIL's
    decompression-bomb limit). 16-bit grayscale is scaled to 8 bits, not clipped to white."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # I;16 and I: integer grayscale beyond 8 bits
                return image.convert("I").point(lambda v: v / 257).convert("RGB")
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read the image {path} ({e})") from None


def image_files(folder, img_size):
    """torchvision's ImageFolder over folder/<class>/..., each image read, resized to img_size
    (our choice: large images would not fit in memory) and converted to RGB. A file reached
    twice (a symlink loop, a second way in) counts once; files that are not images are counted."""
    seen, skipped = set(), collections.Counter()

    def wanted(path):
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(path):  # a symlink loop ends in what is no file
            return False
        seen.add(real)
        extension = os.path.splitext(path)[1].lower() or "no extension"
        if extension not in datasets.folder.IMG_EXTENSIONS:
            skipped[extension] += 1
        return extension in datasets.folder.IMG_EXTENSIONS

    resize = v2.Compose([v2.ToImage(), v2.Resize((img_size, img_size), antialias=True)])
    files = datasets.ImageFolder(folder, resize, loader=read_image, is_valid_file=wanted)
    if skipped:
        counts = ", ".join(f"{n} {ext}" for ext, n in sorted(skipped.items()))
        print(f"{folder}: skipped {skipped.total()} files that are not images of a known "
              f"extension ({counts})", flush=True)
    return files


def decode_folder(folder, img_size, workers):
    """An image folder decoded once, in `workers` processes: (ImageSet, class names)."""
    try:
        files = image_files(folder, img_size)
        print(f"decoding {len(files)} images in {folder} once, at {img_size} px", flush=True)
        parts = list(torch.utils.data.DataLoader(files, batch_size=256, num_workers=workers))
    except OSError as e:  # an unreadable image or an empty class, here or in a worker
        raise ConfigError(f"--dataset imagefolder: {str(e).strip().splitlines()[-1]}")
    except RuntimeError as e:  # a worker killed by the system (out of memory): not bad input
        raise RunError(f"decoding {folder}: {str(e).strip().splitlines()[0]}")
    images, labels = zip(*parts)
    return ImageSet(torch.cat(images), torch.cat(labels)), files.classes


def count_classes(name, root):
    """The number of classes, without loading the data (--measure-memory needs no data)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "imagefolder":
        return sum(entry.is_dir() for entry in os.scandir(imagefolder_dirs(root)[0]))
    return 10 if name == "synthetic" else TORCHVISION_SETS[name][3]


def make_datasets(name, root, img_size, download=True, workers=0):
    """(train, test) ImageSets. torchvision's classes download a data set (or find it in root)."""
    if name == "synthetic":
        return synthetic_images(train=True), synthetic_images(train=False)
    if name == "imagefolder":
        (train, classes), (test, test_classes) = (decode_folder(d, img_size, workers)
                                                  for d in imagefolder_dirs(root))
        if classes != test_classes:
            raise ConfigError(f"--dataset imagefolder: {root}'s splits hold different classes")
        return train, test
    cls, train_kw, test_kw, _ = TORCHVISION_SETS[name]
    try:
        return tuple(as_image_set(cls(root, download=download, **kw)) for kw in (train_kw, test_kw))
    except ImportError as e:  # SVHN's .mat files need scipy
        raise ConfigError(f"--dataset {name} needs a package torchvision lacks here ({e}); "
                          "pip install scipy")
    except (RuntimeError, OSError) as e:  # not found (--no-download), no network (URLError)
        how = f"the download failed ({e})" if download else "run without --no-download"
        urls = [url for url, _ in getattr(cls, "resources", [])]  # MNIST-like: the idx files
        put = "torchvision's copy of it there"
        if urls:
            files = ", ".join(os.path.basename(url).removesuffix(".gz") for url in urls)
            put = f"{files} (gunzipped) in {os.path.join(root, cls.__name__, 'raw')}"
        raise ConfigError(f"--dataset {name}: not found in {os.path.abspath(root)}; {how}, or "
                          f"put {put}")


def validation_split(train, fraction, seed=0):
    """(train, val): a fixed random `fraction` of the training set held out for choosing settings
    (design note 7), the same whatever --seed: every run is judged on the same images."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_val = round(fraction * len(train))
    return train.subset(order[n_val:]), (train.subset(order[:n_val]) if n_val else None)


def random_resized_crop(images, size, min_scale, generator):
    """Training augmentation for a whole batch (our choice, lighter than Swin's RandAugment,
    Mixup and CutMix): per image, a crop of a random fraction in [min_scale, 1] of the area
    with aspect ratio in [3/4, 4/3], resized to size x size, flipped left-right half the time.
    One affine grid_sample does it all on the batch's device. (B, C, H, W) -> (B, C, size, size)."""
    # Drawn on the CPU, so that epoch e's draws are a function of (seed, e) on every device;
    # copied without blocking (no stream sync per step on a GPU).
    u = torch.rand(len(images), 5, generator=generator).to(images.device, non_blocking=True)
    area = min_scale + (1 - min_scale) * u[:, 0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u[:, 1])  # log-uniform, as torchvision
    w = (area * ratio).sqrt().clamp(max=1)  # the crop's sides, as shares of the image's
    h = (area / ratio).sqrt().clamp(max=1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(w)
    # grid_sample's coordinates run from -1 to 1: the crop's centre lies within 1 - w of 0.
    row_x = torch.stack([w * flip, zero, (1 - w) * (2 * u[:, 2] - 1)], dim=1)
    row_y = torch.stack([zero, h, (1 - h) * (2 * u[:, 3] - 1)], dim=1)
    theta = torch.stack([row_x, row_y], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [len(images), images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def prepare_batch(images, img_size, generator=None, min_scale=PAPER.crop_scale):
    """uint8 (B, 1 or 3, H, W) -> the network's input (B, 3, S, S), ImageNet-normalised, grayscale
    repeated to 3 channels. Training (a generator): random resized crop and flip; test: resize."""
    x = images.float().div(255).expand(-1, 3, -1, -1)
    if generator is not None:
        x = random_resized_crop(x, img_size, min_scale, generator)
    elif x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True,
                          align_corners=False)
    return v2.functional.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


@torch.no_grad()
def evaluate(net, data, device, batch_size, amp_dtype=None, name=None):
    """Loss (plain cross-entropy) and top-1 accuracy (%) of the whole network on an ImageSet.
    With a name, a progress line every 30 s (a test set at 224 px takes minutes on a CPU)."""
    net.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    shown = time.perf_counter()
    for start in range(0, len(data), batch_size):
        if name and time.perf_counter() - shown > 30:
            print(f"  evaluating {name}: {start}/{len(data)} images", flush=True)
            shown = time.perf_counter()
        images = data.images[start:start + batch_size].to(device)
        images = prepare_batch(images, net.backbone.patch_embed.img_size)
        labels = data.labels[start:start + batch_size].to(device)
        with autocast(device, amp_dtype):
            logits = net(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
    net.train()
    return loss_sum.item() / len(data), 100.0 * correct.item() / len(data)


# ---- The run's files: output folder, lock, checkpoint, log, results ------------------------

class RunError(Exception):
    """The run cannot go on through no fault of its flags (a full disk, a killed worker): one
    line, exit code 1, every file a resume needs left whole."""


RUN_FILES = ("log.jsonl", "results.json", "last.pt")  # what a run writes into --out
# Flags that do not change what is computed, so a resumed run may change them. (--split is
# checked through the module ends it resolves to.)
RUN_ONLY_FLAGS = {"resume", "max_steps", "workers", "device", "data_dir", "no_download",
                  "log_every", "out", "split", "overwrite", "checkpoint", "module_parallel"}


def atomic_write(path, write):
    """write(tmp), then rename tmp to path: a crash, a kill or a full disk never leaves half a
    file. On a failure the temporary file is removed and the previous file stays as it was."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save raises RuntimeError on ENOSPC
            reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1][:120]
            raise RunError(f"could not write {path} ({reason}); the folder's other files, and "
                           "any earlier version of this one, are intact") from None
        raise


def write_text(path, text):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def check_folder(args):
    """Refuse a folder that holds a run (a finished epoch or results: a log alone holds nothing to
    continue) unless --resume or --overwrite; --resume needs last.pt."""
    held = [f for f in ("last.pt", "results.json") if os.path.exists(os.path.join(args.out, f))]
    if held and not (args.resume or args.overwrite):  # a user's results are never replaced unasked
        raise ConfigError(f"--out {args.out} holds a run ({', '.join(held)}): --resume continues "
                          "it, --overwrite replaces it")
    if args.resume and "last.pt" not in held:
        raise ConfigError(f"--resume: no checkpoint at {os.path.join(args.out, 'last.pt')} (a run "
                          "writes it at the end of each epoch)")


def lock_folder(out):
    """Hold `out` for this process: an exclusive lock on out/.lock, which the system releases
    when the process ends, however it ends (so a crash leaves no stale lock)."""
    handle = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"--out {out} is in use by a run in progress ({holder}): wait for it to "
                          "end, or choose another --out")
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle  # the lock lasts while this file stays open


def take_folder(args):
    """Rank 0 takes --out, once every check has passed: creates it, locks it, refuses it if it
    holds a run (unless --resume or --overwrite), and on --overwrite removes the old run."""
    try:
        os.makedirs(args.out, exist_ok=True)
        lock = lock_folder(args.out)
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write there ({e.strerror or e})")
    try:
        check_folder(args)  # again, now that no other process can start a run into it
        for name in RUN_FILES if args.overwrite else ():  # asked for explicitly
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(args.out, name))
    except BaseException:
        lock.close()
        raise
    return lock


@dataclass
class Run:
    """A training run, built and checked before any file is written, and its progress (the
    fields of PROGRESS, which last.pt keeps so that a resumed run continues exactly)."""
    args: argparse.Namespace
    net: LocalSwin
    modules: list  # what train_step runs: net.local_modules, or their DDP wrappers
    optimizers: list
    schedulers: list
    scalers: list  # fp16's loss scale, one per module
    device: torch.device
    amp_dtype: object
    data: tuple  # (train, val or None, test) ImageSets
    rank: int = 0
    world: int = 1  # processes
    stage: int = None  # --module-parallel: the module this process trains (0-based)
    epoch: int = 0  # epochs finished
    step: int = 0
    history: list = field(default_factory=list)  # log.jsonl's records
    train_images, train_time, wall_time, peak_bytes = 0, 0.0, 0.0, 0  # for results.json

    @property
    def replicas(self):  # data parallel: processes that each train on a part of the batch
        return self.world if self.stage is None else 1

    @property
    def steps_per_epoch(self):
        return len(self.data[0]) // (self.args.batch_size * self.replicas)

    def path(self, name):
        return os.path.join(self.args.out, name)


PROGRESS = ("epoch", "step", "history", "train_images", "train_time", "wall_time", "peak_bytes")


def save_checkpoint(run, states):
    """last.pt, by rank 0: everything a resume needs, replaced atomically after each epoch."""
    if run.rank:
        return
    ckpt = {name: getattr(run, name) for name in PROGRESS}
    ckpt |= {"config": vars(run.args), "ends": run.net.ends, "replicas": run.replicas,
             "train_size": len(run.data[0]), "net": run.net.state_dict(),
             "optimizers": [optimizer for optimizer, _ in states],
             "schedulers": [s.state_dict() for s in run.schedulers],
             "scalers": [scaler for _, scaler in states]}
    atomic_write(run.path("last.pt"), lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(run):
    """last.pt, checked against this run: the same settings (run-only flags aside), module
    ends, number of processes and training set, and a --max-steps it has not reached yet."""
    path, args = run.path("last.pt"), run.args
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved, ends = ckpt["config"], tuple(ckpt["ends"])
        replicas, size, step = ckpt["replicas"], ckpt["train_size"], ckpt["step"]
    except Exception as e:  # torch.load raises many kinds of error on a damaged file
        raise ConfigError(f"--resume: {path} is not a readable checkpoint of this program "
                          f"({type(e).__name__}: {str(e)[:120]})")
    changed = [k for k, v in vars(args).items() if k not in RUN_ONLY_FLAGS and saved.get(k) != v]
    if changed:
        settings = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {getattr(args, k)})"
                             for k in changed)
        raise ConfigError(f"--resume: {path} was written with different settings: {settings}")
    if ends != run.net.ends:  # --split balanced measures again, and may cut elsewhere
        raise ConfigError(f"--resume: {path} has modules ending after blocks {ends}, this run "
                          f"chose {run.net.ends}; resume with --split {','.join(map(str, ends))}")
    if (replicas, size) != (run.replicas, len(run.data[0])):  # the schedule fits its steps
        raise ConfigError(f"--resume: {path} was trained by {replicas} data-parallel processes "
                          f"on {size} images, this run has {run.replicas} on {len(run.data[0])}: "
                          "the learning-rate schedule would not fit; resume it as it was started")
    if args.max_steps is not None and args.max_steps <= step:
        raise ConfigError(f"--resume --max-steps {args.max_steps}: {path} has done {step} "
                          "steps already; give more, or leave --max-steps out")
    return ckpt


def resume(run):
    """--resume: weights, optimizers, schedulers and loss scales, and the progress. (No random
    state: each step's draws are seeded by the step, train_epoch.)"""
    ckpt = load_checkpoint(run)
    try:
        run.net.load_state_dict(ckpt["net"])
        parts = zip(run.optimizers, run.schedulers, run.scalers, ckpt["optimizers"],
                    ckpt["schedulers"], ckpt["scalers"], strict=True)
        for j, (optimizer, scheduler, scaler, *states) in enumerate(parts):
            scheduler.load_state_dict(states[1])
            if run.stage in (None, j):  # module parallel: process i holds module i's state
                optimizer.load_state_dict(states[0])
                scaler.load_state_dict(states[2])
        for name in PROGRESS:
            kind = type(getattr(run, name))
            if not isinstance(ckpt[name], (int, float) if kind is float else kind):
                raise TypeError(f"{name} is {type(ckpt[name]).__name__}, not {kind.__name__}")
            setattr(run, name, ckpt[name])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ConfigError(f"--resume: {run.path('last.pt')} lacks or mistypes a field "
                          f"({type(e).__name__}: {str(e).strip()[:120]})")


def write_log(run):
    """log.jsonl, by rank 0: one record per epoch, rewritten whole (and atomically) after each."""
    if run.rank == 0:
        write_text(run.path("log.jsonl"), "".join(json.dumps(r) + "\n" for r in run.history))


def run_info(args, net, device, optimizers, world):
    """What a results.json needs to be read later: the full config and what it resolved to."""
    return {"config": vars(args), "k": len(net.specs), "split": list(net.ends),
            "lambdas": net.lambdas, "mus": net.mus,
            "lr": optimizers[0].param_groups[0]["initial_lr"],
            "global_batch": args.batch_size * (1 if args.module_parallel else world),
            "world_size": world,
            "parameters": sum(p.numel() for p in net.backbone.parameters()),
            "aux_parameters": sum(p.numel() for p in net.aux.parameters()),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "torch": torch.__version__}


# ---- The training run: epochs, progress, evaluation, results --------------------------------

def train(run):
    """The greedy training run: progress lines; at the end of each epoch last.pt, then
    log.jsonl (never ahead of what a resume can continue); results.json at the end."""
    args = run.args
    if args.resume:
        resume(run)
        if run.epoch >= args.epochs:
            if os.path.exists(run.path("results.json")):
                print(f"{args.out}: this run has finished its {args.epochs} epochs; nothing to do")
                return None
            print(f"{args.out}: every epoch is done; writing the missing results.json")
            return finish(run)
        print(f"resumed from {run.path('last.pt')} after epoch {run.epoch} (step {run.step})")
    print(f"training {args.epochs} x {run.steps_per_epoch} steps; into {args.out}/: last.pt and "
          "log.jsonl after each epoch, results.json at the end")
    write_log(run)  # exactly the epochs the checkpoint has seen
    # A resumed run's AdamW state is loaded already, so it counts in the baseline.
    memory = PeakMemory(run.device, baseline=state_bytes(run.net, run.optimizers))
    mark = time.perf_counter()
    while run.epoch < args.epochs and not (args.max_steps and run.step >= args.max_steps):
        start = time.perf_counter()
        done, loss_sums = train_epoch(run, memory)
        if run.stage is not None:  # --module-parallel: every process gets the whole network
            share_weights(run)
        run.epoch += 1
        record = {"epoch": run.epoch, "steps": done, "train_loss": (loss_sums / done).tolist(),
                  "lr": run.schedulers[0].get_last_lr()[0],
                  "train_time_s": time.perf_counter() - start}
        record |= evaluate_epoch(run, done)
        run.history.append(record)
        print_epoch(run, record)
        run.peak_bytes = max(run.peak_bytes, memory.peak_bytes() or 0)
        run.wall_time += time.perf_counter() - mark
        mark = time.perf_counter()
        if done == run.steps_per_epoch:  # a checkpoint marks a finished epoch
            save_checkpoint(run, module_states(run))
        write_log(run)
    return finish(run)


def train_epoch(run, memory):
    """One epoch, or what --max-steps leaves of it: (steps done, each module's summed loss)."""
    args, train_set = run.args, run.data[0]
    batch, img_size = args.batch_size, run.net.backbone.patch_embed.img_size
    run.net.train()
    # Epoch e's order and augmentations depend on (seed, e) alone: a resumed run repeats them.
    generator = torch.Generator().manual_seed(1000 * args.seed + run.epoch)
    order = torch.randperm(len(train_set), generator=generator)
    loss_sums, window = torch.zeros(len(run.modules), device=run.device), []
    handoff = None if run.stage is None else Handoff(run.rank, run.net.specs, batch, run.device)
    window_start = time.perf_counter()
    for done in range(1, run.steps_per_epoch + 1):
        replica = run.rank if run.stage is None else 0  # data parallel: its part of the batch
        start = ((done - 1) * run.replicas + replica) * batch
        part = order[start:start + batch]
        images = train_set.images[part].to(run.device, non_blocking=True)
        images = prepare_batch(images, img_size, generator, args.crop_scale)
        labels = train_set.labels[part].to(run.device, non_blocking=True)
        # The meter (a Python hook on every operator) reads each epoch's first two steps; the
        # second holds the optimizer state.
        options = dict(clip_grad=args.clip_grad, amp_dtype=run.amp_dtype,
                       seed=2**40 * args.seed + 2**10 * run.step)  # module i's: seed + i
        with memory.region() if done <= 2 else contextlib.nullcontext():
            if handoff is None:
                losses = train_step(run.modules, run.optimizers, images, labels,
                                    scalers=run.scalers, **options)
            else:
                losses = pipeline_step(run, handoff, images, labels, **options)
        window.append(torch.stack([loss.float().to(run.device) for loss in losses]))  # no sync
        for scheduler in run.schedulers:
            scheduler.step()
        run.step += 1
        stop = args.max_steps is not None and run.step >= args.max_steps
        # From step 1 on, so that the ETA (an epoch's estimate, then the run's) shows at once.
        if done % args.log_every == 0 or done in (1, run.steps_per_epoch) or stop:
            loss_sums += report_progress(run, done, window, time.perf_counter() - window_start)
            window, window_start = [], time.perf_counter()
        if stop:
            break
    if handoff is not None:
        handoff.wait()
    return done, loss_sums


def report_progress(run, done, window, elapsed):
    """The progress line over the steps since the last one (each module's mean loss, lr,
    images/s, ETA); stops the run at a loss that is not finite, naming the first bad step and
    module. Returns the window's (K,) summed losses."""
    losses = torch.stack(window)
    if run.world > 1:  # every process logs the same, and stops together
        torch.distributed.all_reduce(losses)  # module parallel: each adds its module's losses
        losses /= run.replicas  # data parallel: the mean over processes
    bad = (~torch.isfinite(losses)).nonzero()  # checked here, not each step: no host sync
    if len(bad):
        row, i = bad[0].tolist()
        raise FloatingPointError(f"loss of module {i + 1} became {losses[row, i].item()} at step "
                                 f"{run.step - len(window) + 1 + row} (epoch {run.epoch + 1})")
    args, images_per_step = run.args, run.args.batch_size * run.replicas
    run.train_time += elapsed
    run.train_images += len(window) * images_per_step
    rate = run.train_images / run.train_time
    total = min(args.epochs * run.steps_per_epoch, args.max_steps or math.inf)
    eta = (total - run.step) * images_per_step / rate
    eta = f"{eta / 86400:.1f} days" if eta >= 86400 else time.strftime("%H:%M:%S", time.gmtime(eta))
    module_losses = " ".join(f"{v:.4f}" for v in losses.mean(0).tolist())
    lr = run.schedulers[0].get_last_lr()[0]
    print(f"epoch {run.epoch + 1}/{args.epochs} step {done}/{run.steps_per_epoch} | loss "
          f"{module_losses} | lr {lr:.2e} | {rate:.0f} img/s | ETA {eta}", flush=True)
    return losses.sum(0)


def evaluate_epoch(run, done):
    """Validation and test loss and accuracy. Test is reported, never used to choose. An epoch
    cut by --max-steps (a trial) is evaluated on a fixed random subset of as many images as it
    trained on (not a whole 224-px test set after a few steps; not the first, one-class ones)."""
    record, batch = {}, run.args.batch_size
    for name, split in (("val", run.data[1]), ("test", run.data[2])):
        if split is None or (run.stage is not None and run.rank > 0):  # rank 0 does it for all
            continue
        if done < run.steps_per_epoch:
            pick = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
            split = split.subset(pick[:done * batch * run.replicas])
            record[f"{name}_images"] = len(split)
        loss, acc = evaluate(run.net, split, run.device, batch, run.amp_dtype, name)
        record[f"{name}_loss"], record[f"{name}_acc"] = loss, acc
    if run.stage is not None:
        record = broadcast_object(record)
    return record


def print_epoch(run, record):
    parts = [f"epoch {record['epoch']}/{run.args.epochs}"]
    for name in ("val", "test"):
        if f"{name}_acc" in record:
            part = f"{name} loss {record[name + '_loss']:.4f} acc {record[name + '_acc']:.2f}%"
            subset = record.get(f"{name}_images")
            parts.append(part + (f" (on {subset} of its images)" if subset else ""))
    print(" | ".join(parts + [f"{record['train_time_s']:.0f} s"]), flush=True)


def finish(run):
    """results.json, once: the last epoch's accuracies, the best validation epoch, peak memory,
    images/s, the full config."""
    results, peaks = {}, [run.peak_bytes]
    if run.world > 1:  # every process's peak; the largest is the run's
        if run.stage is None:
            results["ranks_identical"] = ranks_identical(run.net)
        peaks = [None] * run.world
        torch.distributed.all_gather_object(peaks, run.peak_bytes)
        results["peak_memory_per_process_mib"] = [p and p / 2**20 for p in peaks]
    last = run.history[-1] if run.history else {}
    with_val = [r for r in run.history if "val_acc" in r]
    best = max(with_val, key=lambda r: r["val_acc"]) if with_val else {}
    peak = max(peaks) / 2**20 if all(peaks) else None
    results |= {"test_acc": last.get("test_acc"), "val_acc": last.get("val_acc"),
                "best_val_acc": best.get("val_acc"), "best_val_epoch": best.get("epoch"),
                "peak_memory_mib": peak, "epochs": run.epoch, "steps": run.step,
                "images_per_second": run.train_images / max(run.train_time, 1e-9),
                "wall_time_s": run.wall_time,
                **run_info(run.args, run.net, run.device, run.optimizers, run.world)}
    if run.rank == 0:
        write_text(run.path("results.json"), json.dumps(results, indent=2))
    val = "" if results["val_acc"] is None else f", val acc {results['val_acc']:.2f}%"
    print(f"done: test acc {results['test_acc']:.2f}%{val} | peak memory {peak or math.nan:.0f} "
          f"MiB | {results['images_per_second']:.0f} img/s | {run.path('results.json')}")
    return results


# ---- Parallelism under torchrun: data parallel, or a process per module --------------------

def init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on CUDA and gloo on the
    CPU, and take this process's GPU. Returns (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def on_rank0_first(fn, rank, world, others=True):
    """fn() on rank 0 first (a download, the output folder), then, if `others`, on every other
    process. A ConfigError on rank 0 is raised on every process, so that none waits for it."""
    result, verdict = None, [None]
    if rank == 0:
        try:
            result = fn()
        except ConfigError as e:
            verdict = [str(e)]
    if world > 1:
        torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise ConfigError(verdict[0])
    return fn() if rank and others else result


def distribute(modules, device):
    """Data parallelism: each module, with its auxiliary block, in its own
    DistributedDataParallel. Local learning runs one backward per module per step, which one
    wrapper around the whole network cannot follow; one per module sees one backward each.
    The contrastive loss and BatchNorm see each process's own part of the batch (our choice)."""
    device_ids = [device] if device.type == "cuda" else None
    # A 1x1 conv's gradient can come back channels-last: the same memory order as its weight
    # for a 1x1 kernel, but DDP compares strides and warns on every step.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return [nn.parallel.DistributedDataParallel(m, device_ids=device_ids) for m in modules]


@torch.no_grad()
def ranks_identical(net):
    """Under DDP: does every process hold exactly rank 0's parameters? (Checked at the end.)"""
    same = torch.ones((), device=next(net.parameters()).device)
    for p in net.parameters():
        reference = p.detach().clone()
        torch.distributed.broadcast(reference, src=0)
        same *= torch.equal(reference, p)
    torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
    return bool(same.item())


def broadcast_object(obj):
    """Process 0's obj (a record, a split: no tensors), on every process."""
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


class Handoff:
    """--module-parallel: x_i from process i to process i + 1 with torch.distributed's
    point-to-point operations (gloo on the CPU, NCCL on GPUs). A send returns at once, and the
    next one waits for it: process i runs at most a step ahead of process i + 1."""

    def __init__(self, rank, specs, batch_size, device):
        spec = specs[rank]  # x_{i-1}'s shape, as module i reads it: (B, H, W, C)
        self.rank, self.device, self.sending = rank, device, None
        self.shape = (batch_size, spec.in_res, spec.in_res, spec.in_dim)

    def send(self, x):
        self.wait()
        x = x.contiguous()  # kept alive in self.sending until it has been sent
        self.sending = x, torch.distributed.isend(x, self.rank + 1)

    def receive(self):
        x = torch.empty(self.shape, device=self.device)
        torch.distributed.recv(x, self.rank - 1)
        return x

    def wait(self):
        if self.sending is not None:
            self.sending[1].wait()
            self.sending = None


def pipeline_step(run, handoff, images, labels, *, seed, **step_options):
    """--module-parallel, process i's training step: module i on x_{i-1} from process i - 1
    (module 1 on the images, which every process draws itself), x_i on to process i + 1
    without waiting. The same computation as module i's part of train_step. Returns the K
    losses: zero but module i's (report_progress adds them up over the processes)."""
    i, k = run.stage, len(run.modules)
    x = images if i == 0 else handoff.receive()
    x, loss = local_step(run.modules[i], run.optimizers[i], x, images, labels, seed=seed + i,
                         scaler=run.scalers[i], **step_options)
    if i + 1 < k:
        handoff.send(x)
    return [loss if j == i else torch.zeros((), device=run.device) for j in range(k)]


def share_weights(run):
    """--module-parallel, after each epoch: every process receives each module's weights from
    the process that trains it, so that evaluation and last.pt see the whole network."""
    for j, module in enumerate(run.net.local_modules):
        for tensor in module.state_dict().values():  # in place: the weights themselves
            torch.distributed.broadcast(tensor, src=j)


def module_states(run):
    """Each module's (optimizer, loss scale) state, for last.pt. Module parallel: gathered on
    process 0 from the process that trains the module (no process holds another's state)."""
    states = [(o.state_dict(), s.state_dict()) for o, s in zip(run.optimizers, run.scalers)]
    if run.stage is None:
        return states
    gathered = [None] * run.world if run.rank == 0 else None
    on_cpu = tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v, states[run.stage])
    torch.distributed.gather_object(on_cpu, gathered, dst=0)
    return gathered


# ---- Command line ---------------------------------------------------------------------------

def int_list(text):
    return tuple(map(int, text.split(",")))


def float_list(text):
    return tuple(map(float, text.split(",")))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its whole usage first
        raise ConfigError(f"{message} (see --help)")


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: ...)" where the default is a value
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelp)
    a, d = p.add_argument, PAPER
    a("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)}")
    a("--data-dir", default="./data", help="where the data sets are (downloaded to); "
      "imagefolder: DIR/train and DIR/val (or DIR/test)")
    a("--no-download", action="store_true", help="never download; fail if the data is not there")
    a("--arch", default="swin-t", help=f"one of {', '.join(ARCHS)}")
    a("--img-size", type=int, default=d.img_size, help="images are resized to this")
    a("--patch-size", type=int, help=f"patch embedding stride p (default {d.patch_size})")
    a("--window-size", type=int, help=f"attention window M (default {d.window_size}, 12 at 384 px)")
    a("--embed-dim", type=int, help="channels C of stage 1 (default: the arch's)")
    a("--depths", type=int_list, help="blocks per stage, e.g. 2,2,6,2 (default: the arch's)")
    a("--heads", type=int_list, help="heads per stage, e.g. 3,6,12,24 (default: the arch's)")
    a("--drop-path", type=float, help="stochastic depth rate of the last block (default: arch's)")
    a("--pretrained", action="store_true", help="start from torchvision's ImageNet weights")
    a("--k", type=int, help=f"gradient-isolated modules K (default {d.k}; 1 is end-to-end)")
    a("--split", default="paper", help="paper (design note 3), balanced (the largest module as "
      "small as possible, measured), time (the slowest module as fast as possible, measured: "
      "for --module-parallel) or the blocks after which modules 1..K-1 end, e.g. 2,4,10")
    a("--method", default="ours", help=f"one of {', '.join(METHODS)}")
    a("--decoder", default="interp", help=f"one of {', '.join(DECODERS)}")
    a("--lambdas", type=float_list, help=f"lambda_i of eq. 2, i < K (default: {d.lambdas}, linear)")
    a("--mus", type=float_list, help=f"mu_i of eq. 2, i < K (default: {d.mus}, linear)")
    a("--temperature", type=float, default=d.temperature, help="NT-Xent temperature")
    a("--epochs", type=int, default=d.epochs, help="training epochs")
    a("--warmup-epochs", type=int, help="linear warm-up before the cosine (default: epochs / 15)")
    a("--batch-size", type=int, default=d.batch_size, help="images per step and process")
    a("--lr", type=float, help=f"peak learning rate (default {d.lr_per_512} x global batch / 512)")
    a("--weight-decay", type=float, default=d.weight_decay, help="AdamW's (not on biases, "
      "norms, position tables)")
    a("--label-smoothing", type=float, default=d.label_smoothing, help="of every cross-entropy")
    a("--clip-grad", type=float, default=d.clip_grad, help="gradient norm clipping, per module")
    a("--val-split", type=float, default=0.0, help="share of the training set held out")
    a("--crop-scale", type=float, default=d.crop_scale, help="smallest area a random crop keeps")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1), help="imagefolder decoders")
    a("--checkpoint", action="store_true", help="recompute each block in the backward pass")
    a("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast (fp16: CUDA only)")
    a("--device", help="cuda, cuda:1, cpu, mps ... (default: cuda when present)")
    a("--module-parallel", action="store_true", help="under torchrun with K processes: process "
      "i trains module i, passing x_i on (default: data parallel)")
    a("--seed", type=int, default=0, help="the same seed gives the same run")
    a("--out", help="output folder (default runs/DATASET-ARCH-kK-METHOD, or "
      "runs/memory-ARCH-kK-METHOD-bBATCH)")
    a("--resume", action="store_true", help="continue the run in --out from its last.pt")
    a("--overwrite", action="store_true", help="replace the run in --out")
    a("--max-steps", type=int, help="stop after this many steps in all (--measure-memory: "
      "steps timed, default 3)")
    a("--log-every", type=int, default=50, help="a progress line every this many steps")
    a("--measure-memory", action="store_true", help="peak memory and step time, then exit")
    return p.parse_args(argv)


RANGES = [  # (flags, test, what a value must be): every flag with a range, checked up front
    (("batch_size", "epochs", "log_every", "img_size", "max_steps", "patch_size", "window_size",
      "embed_dim", "depths", "heads"), lambda v: v >= 1, "at least 1"),
    (("lr", "temperature", "clip_grad"), lambda v: 0 < v < math.inf, "positive and finite"),
    (("weight_decay", "warmup_epochs", "workers", "lambdas", "mus"), lambda v: 0 <= v < math.inf,
     "non-negative and finite"),
    (("drop_path", "label_smoothing", "val_split"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("crop_scale",), lambda v: 0 < v <= 1, "in (0, 1]"),
]


def check_flags(args):
    """A bad value is one line, before anything is read or written."""
    for flags, ok, must in RANGES:
        for flag in flags:
            value = getattr(args, flag)
            values = value if isinstance(value, tuple) else (value,)
            if value is not None and not all(ok(v) for v in values):
                raise ConfigError(f"--{flag.replace('_', '-')} {value}: must be {must}")
    if args.warmup_epochs is None:
        args.warmup_epochs = round(args.epochs * PAPER.warmup_share)
    if args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup-epochs {args.warmup_epochs} is more than --epochs "
                          f"{args.epochs}: the peak lr would never be reached")
    if args.resume and (args.measure_memory or args.overwrite):
        other = "measure-memory" if args.measure_memory else "overwrite"
        raise ConfigError(f"--resume and --{other} do not go together")
    if args.module_parallel and args.measure_memory:
        raise ConfigError("--measure-memory measures one process's step; drop --module-parallel "
                          "(a module-parallel run reports each process's peak in results.json)")


def pick_device(args):
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ConfigError(f"--device: {e}")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device: {device.type} is not supported here; use cpu, cuda or mps")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device: {device} is not available here "
                          f"({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device: mps is not available here")
    return device


def interrupted(signum, frame):
    """SIGINT or SIGTERM (a scheduler's notice): stop as Ctrl-C does, and swallow any further
    signal, so that one message is printed however many arrive (SIG_IGN would not do: a signal
    already on its way then raises "ignored due to race condition")."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    raise KeyboardInterrupt


EXIT_CODES = {ConfigError: 2, RunError: 1, FloatingPointError: 3, KeyboardInterrupt: 130}


def main(argv=None):
    # SIGINT is set too: a shell starts background jobs with it ignored.
    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    args = None
    try:
        args = parse_args(argv)
        return run(args)
    except (ConfigError, RunError, FloatingPointError, KeyboardInterrupt) as e:
        code, message = EXIT_CODES[type(e)], " ".join(str(e).split()) or "interrupted"
    except RuntimeError as e:  # gloo's errors ("Connection closed by peer") are plain ones
        if not (isinstance(e, torch.distributed.DistError) or "/gloo/" in str(e)):
            raise
        code, message = 1, "another process of this run has ended, so this one ends too"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    out = getattr(args, "out", None)
    if code in (1, 130) and out and os.path.exists(os.path.join(out, "last.pt")):
        message += f"; {out}/last.pt holds the last finished epoch (--resume continues)"
    print(f"error: {message}", file=sys.stderr)  # one line, whatever it says
    return code


def run(args):
    check_flags(args)
    rank, world, device = init_distributed(pick_device(args))
    if rank:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints progress
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if amp_dtype is torch.float16 and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA; use --amp bf16 on the CPU")
    replicas = 1 if args.module_parallel else world  # data parallel: its processes
    # Two warnings about a schedule that is right: module parallel steps every module's schedule
    # (last.pt keeps them all) but only its own optimizer; torch 2.8's SequentialLR warns about
    # its own step(0) at the end of the warm-up.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`"
                            r"|The epoch parameter in `scheduler\.step\(\)`")
    net, data, num_classes = build(args, device, rank, world)
    lock = on_rank0_first(lambda: take_folder(args), rank, world, others=False)
    try:
        data_parallel = world > 1 and not args.module_parallel
        modules = distribute(net.local_modules, device) if data_parallel else net.local_modules
        lr = args.lr or PAPER.lr_per_512 * args.batch_size * replicas / 512
        describe(net, lr, device, args, world)
        per_epoch = 10 if args.measure_memory else len(data[0]) // (args.batch_size * replicas)
        optimizers, schedulers = make_optimizers(
            modules, lr=lr, weight_decay=args.weight_decay, total_steps=args.epochs * per_epoch,
            warmup_steps=args.warmup_epochs * per_epoch)
        scalers = [torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
                   for _ in modules]
        if args.measure_memory:
            return measure(args, net, modules, optimizers, scalers, device, amp_dtype, world,
                           num_classes)
        train(Run(args, net, modules, optimizers, schedulers, scalers, device, amp_dtype, data,
                  rank, world, stage=rank if args.module_parallel else None))
        return 0
    finally:
        if lock is not None:
            lock.close()


def build(args, device, rank, world):
    """The model, its split and the data, every check included: nothing is written yet."""
    torch.manual_seed(args.seed)
    num_classes = count_classes(args.dataset, args.data_dir)
    backbone = build_model(args.arch, num_classes, args.img_size, patch_size=args.patch_size,
                           window_size=args.window_size, embed_dim=args.embed_dim,
                           depths=args.depths, heads=args.heads, drop_path=args.drop_path)
    depths = [len(stage) for stage in backbone.stages]
    search = args.split in ("balanced", "time")
    ends = resolve_split("paper" if search else args.split, args.k, depths)
    lambdas = lambda_mu_schedule(len(ends), args.lambdas, args.mus)[0]
    if args.module_parallel and (world != len(ends) + 1 or world == 1):
        raise ConfigError(f"--module-parallel trains module i in process i: K = {len(ends) + 1} "
                          f"needs torchrun --nproc_per_node {len(ends) + 1} (and K > 1), not "
                          f"{world} process{'es' * (world > 1)}")
    if args.pretrained:  # before the data: a refused --pretrained must not start a download
        check_pretrained(args)
        load_torchvision_weights(backbone, pretrained_state_dict(args.arch), with_head=False)
    data = None
    if not args.measure_memory:  # one process downloads, the others then read
        replicas = 1 if args.module_parallel else world
        data = on_rank0_first(lambda: load_data(args, replicas), rank, world)
    name = f"{args.arch}-k{len(ends) + 1}-{args.method}"
    default = f"{args.dataset}-{name}"
    if args.measure_memory:
        default = f"memory-{name}-b{args.batch_size}"
    args.out = args.out or os.path.join("runs", default)
    check_folder(args)  # early, before a long balanced-split search
    options = dict(method=args.method, decoder=args.decoder, temperature=args.temperature,
                   label_smoothing=args.label_smoothing, checkpoint=args.checkpoint)
    if search:  # the same K, cut where the largest (or slowest) module is smallest
        by = "memory" if args.split == "balanced" else "time"
        # Rank 0 searches; the forked random state leaves every process's the same for the
        # auxiliary blocks built next (module parallel: each process builds them all).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            found = None if rank else balanced_split(backbone.to(device), len(ends) + 1,
                                                     lambdas, by=by, batch_size=args.batch_size,
                                                     device=device, **options)
        ends, shares = broadcast_object(found) if world > 1 else found
        whose = "memory as a share of E2E's" if by == "memory" else "share of the step's time"
        print(f"{args.split} split at batch {args.batch_size}: modules 1..K-1 end after blocks "
              f"{','.join(map(str, ends))}; each module's {whose} (measured): "
              f"{' '.join(f'{s:.2f}' for s in shares)}")
    net = LocalSwin(backbone, ends, lambdas=args.lambdas, mus=args.mus, **options)
    return net.to(device), data, num_classes


def check_pretrained(args):
    shape = dict(embed_dim=ARCHS[args.arch].embed_dim, depths=ARCHS[args.arch].depths,
                 heads=ARCHS[args.arch].heads, patch_size=PAPER.patch_size,
                 window_size=PAPER.window_size, img_size=PAPER.img_size)
    if any(getattr(args, key) not in (None, value) for key, value in shape.items()):
        raise ConfigError(f"--pretrained: torchvision's weights are for {args.arch} as published, "
                          "at 224 px; drop --img-size, --patch-size, --window-size, --embed-dim, "
                          "--depths and --heads")


def load_data(args, world):
    """(train, val or None, test) ImageSets, the validation split held out of the training set."""
    train_set, test_set = make_datasets(args.dataset, args.data_dir, args.img_size,
                                        not args.no_download, args.workers)
    train_set, val_set = validation_split(train_set, args.val_split)
    if len(train_set) < args.batch_size * world:
        raise ConfigError(f"--batch-size {args.batch_size} x {world} processes is more than the "
                          f"{len(train_set)} training images")
    return train_set, val_set, test_set


def describe(net, lr, device, args, world):
    """What is about to be trained, in a few lines: the split and each module's shapes."""
    millions = [sum(p.numel() for p in part.parameters()) / 1e6 for part in (net.backbone, net.aux)]
    kind = "end-to-end" if len(net.specs) == 1 else f"method {net.method}"
    print(f"Swin: {millions[0]:.2f} M parameters, auxiliary blocks {millions[1]:.2f} M | "
          f"K={len(net.specs)} {kind} | lr {lr:.2e} | device {device}")
    bounds = (0, *net.ends, sum(len(stage) for stage in net.backbone.stages))
    for i, (spec, loss) in enumerate(zip(net.specs, [*net.aux, None])):  # blocks bounds[i]+1 ..
        what = "cross-entropy (eq. 3)" if loss is None else "cross-entropy"
        if isinstance(loss, ReconstructContrastLoss):
            what = f"lambda {loss.lam:.2f}, mu {loss.mu:.2f} (eq. 2)"
        shapes = f"{spec.in_res}x{spec.in_res}x{spec.in_dim} -> {spec.out_res}x{spec.out_res}x"
        print(f"  module {i + 1}: blocks {bounds[i] + 1}-{bounds[i + 1]} | {shapes}{spec.out_dim} "
              f"| {what}")
    if device.type == "cpu" and args.img_size > 64 and not args.measure_memory:
        print(f"on a CPU, {args.img_size}-px training is slow; the README's small setting "
              "(Fashion-MNIST at 32 px) learns in minutes")
    if args.module_parallel:
        print(f"module parallel: {world} processes, process i trains module i on x_(i-1) from "
              "process i-1 and passes x_i on; process 0 evaluates")
    elif world > 1:
        print(f"data parallel: {world} processes x batch {args.batch_size} = global batch "
              f"{args.batch_size * world}; the contrastive loss and BatchNorm see each "
              "process's part")


def measure(args, net, modules, optimizers, scalers, device, amp_dtype, world, num_classes):
    """--measure-memory: the figures, printed and written to results.json (by rank 0)."""
    figures = measure_memory(net, optimizers, modules=modules, batch_size=args.batch_size,
                             num_classes=num_classes, device=device, steps=args.max_steps or 3,
                             clip_grad=args.clip_grad, amp_dtype=amp_dtype, scalers=scalers)
    figures.update(run_info(args, net, device, optimizers, world))
    if torch.distributed.is_initialized() and torch.distributed.get_rank():
        return 0
    write_text(os.path.join(args.out, "results.json"), json.dumps(figures, indent=2))
    print(f"peak training memory {figures['peak_memory_mib']:.0f} MiB (activations etc. above "
          f"parameters and optimizer state: {figures['activation_memory_mib']:.0f} MiB) | "
          f"{figures['step_gflop']:.1f} GFLOP, {figures['step_time_s']:.3f} s per step "
          f"({figures['images_per_second']:.1f} img/s) | {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
