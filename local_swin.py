"""Local learning on a Swin Transformer via feature reconstruction, in one file.

Reference implementation of Pathak, Zhang and Samaras, "Local Learning on Transformers via
Feature Reconstruction" (arXiv 2212.14215, 2022), on top of the Swin Transformer of Liu et
al. (arXiv 2103.14030). The network is cut into K gradient-isolated modules; module i < K
learns from its own auxiliary block (a supervised contrastive loss plus a decoder that
reconstructs the module's *input features*), module K from the usual cross-entropy. No
gradient crosses a module boundary, so a module's graph is freed as soon as its loss has
been backpropagated: peak training memory is that of the largest module, not of the net.

The file follows the paper: 3.1 Swin, 3.2-3.3 modules and split, 3.4 the auxiliary block,
3.5 the losses, then the greedy training loop and the command line. "design note n" in a
comment points at the README's design notes, which decide every point the paper leaves open.

    python local_swin.py --dataset cifar10 --k 4
"""
import argparse
import contextlib
import gc
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
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets
from torchvision.ops import StochasticDepth
from torchvision.transforms import v2


class ConfigError(Exception):
    """Bad input from the user: the command line prints it as one line and exits non-zero."""


# ---- Paper 3.1: the Swin Transformer backbone ------------------------------------------------

# (embed_dim C, blocks per stage, heads per stage, stochastic depth rate); design note 2.
ARCHS = {
    "swin-t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2),
    "swin-s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3),
    "swin-b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 0.5),
    "swin-l": (192, (2, 2, 18, 2), (6, 12, 24, 48), 0.2),
}


def relative_position_index(window):
    """(M*M, M*M) index into the (2M-1)^2-row bias table for every pair of tokens in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = rearrange(coords, "two h w -> (h w) two")
    delta = coords[:, None, :] - coords[None, :, :] + (window - 1)  # each offset now in [0, 2M-2]
    return delta[..., 0] * (2 * window - 1) + delta[..., 1]


def shifted_window_mask(resolution, window, shift):
    """(num_windows, M*M, M*M) additive mask for SW-MSA: -100 where two tokens share a window
    only because the cyclic shift wrapped one of them around the border, else 0.

    The shifted grid falls into 3 x 3 regions (rows/columns [0, R-M), [R-M, R-s), [R-s, R));
    tokens of different regions were never neighbours. -100 (not -inf) as in the Swin code,
    which keeps the softmax finite and our logits equal to torchvision's.
    """
    region = torch.zeros(resolution, resolution)
    bounds = ((0, resolution - window), (resolution - window, resolution - shift), (resolution - shift, resolution))
    for i, (h0, h1) in enumerate(bounds):
        for j, (w0, w1) in enumerate(bounds):
            region[h0:h1, w0:w1] = 3 * i + j
    region = rearrange(region, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=window, ww=window)
    return (region[:, :, None] != region[:, None, :]).float() * -100.0


class WindowAttention(nn.Module):
    """W-MSA (shift 0) or SW-MSA (shift M/2) with a learned relative-position bias.

    Input and output are (B, H, W, C). The bias and the shift mask are added inside
    F.scaled_dot_product_attention as attn_mask, so a GPU can use a kernel that never stores
    the full attention matrix.
    """

    def __init__(self, *, dim, heads, resolution, window, shift):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Derived from the shapes alone, so not saved in checkpoints.
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        num_windows = (resolution // window) ** 2
        mask = shifted_window_mask(resolution, window, shift) if shift else torch.zeros(num_windows, window**2, window**2)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        side = x.shape[1]
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = rearrange(x, "b (nh wh) (nw ww) c -> b (nh nw) (wh ww) c", wh=self.window, ww=self.window)
        # Windows and heads share one batch axis so that SDPA sees 4-D tensors (fused kernels need them).
        # chunk, not a "three" axis unbound: its backward is one cat, measurably faster on a CPU.
        q, k, v = (rearrange(t, "b w n (h d) -> b (w h) n d", h=self.heads) for t in self.qkv(windows).chunk(3, dim=-1))
        bias = rearrange(self.relative_position_bias_table[self.relative_position_index], "n m h -> h n m")
        attn_mask = rearrange(self.mask[:, None] + bias[None], "w h n m -> 1 (w h) n m")  # broadcast over b
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))  # scale 1/sqrt(d)
        out = self.proj(rearrange(out, "b (w h) n d -> b w n (h d)", h=self.heads))
        x = rearrange(out, "b (nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=side // self.window, wh=self.window)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x


class SwinBlock(nn.Module):
    """x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x))); MLP ratio 4, GELU."""

    def __init__(self, *, dim, heads, resolution, window, shift, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, heads=heads, resolution=resolution, window=window, shift=shift)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = StochasticDepth(drop_path, "row")  # drops the whole residual branch per sample

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
            raise ValueError(f"expected images of shape (B, 3, {self.img_size}, {self.img_size}), got {tuple(images.shape)}")
        return self.norm(rearrange(self.proj(images), "b c h w -> b h w c"))


class PatchMerging(nn.Module):
    """Concatenate each 2 x 2 neighbourhood (4C), LayerNorm, Linear 4C -> 2C without bias."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        # Channel order (dw dh c) is the one of the Swin and torchvision code, so weights carry over.
        return self.reduction(self.norm(rearrange(x, "b (h dh) (w dw) c -> b h w (dw dh c)", dh=2, dw=2)))


class ClassifierHead(nn.Module):
    """H: LayerNorm, global average pool, Linear to the classes. (B, h, w, C) -> (B, classes)."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(self.norm(x).mean(dim=(1, 2)))


class SwinTransformer(nn.Module):
    """Patch embedding, stages of (W-MSA, SW-MSA) block pairs with patch merging between, head."""

    def __init__(self, *, num_classes, img_size, patch_size, window_size, embed_dim, depths, heads, drop_path):
        super().__init__()
        if len(depths) != len(heads):
            raise ConfigError(f"--depths has {len(depths)} stages but --heads has {len(heads)}")
        if img_size % patch_size:
            raise ConfigError(f"--img-size {img_size} is not a multiple of --patch-size {patch_size}")
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, dim=embed_dim)
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()  # stochastic depth rises linearly
        self.stages, self.merges = nn.ModuleList(), nn.ModuleList()
        self.dims, self.resolutions = [], []  # per stage; the split (3.3) reads them
        dim, res = embed_dim, img_size // patch_size
        for s, (depth, h) in enumerate(zip(depths, heads)):
            if dim % h:
                raise ConfigError(f"stage {s + 1}: {dim} channels do not split into {h} heads")
            window, shift = window_size, window_size // 2
            if res <= window:  # clip the window to the stage, and then nothing is left to shift
                window, shift = res, 0
            elif res % window:
                raise ConfigError(
                    f"stage {s + 1} has a {res} x {res} token grid, larger than the {window} x {window} "
                    f"window but not a multiple of it; choose --img-size/--patch-size/--window-size so it is")
            blocks = [SwinBlock(dim=dim, heads=h, resolution=res, window=window, shift=0 if j % 2 == 0 else shift,
                                drop_path=rates.pop(0)) for j in range(depth)]
            self.stages.append(nn.Sequential(*blocks))
            self.dims.append(dim)
            self.resolutions.append(res)
            if s < len(depths) - 1:
                if res % 2:
                    raise ConfigError(f"stage {s + 1} has an odd {res} x {res} token grid: patch merging needs it even")
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


def build_model(arch, num_classes, img_size=224, **overrides):
    """Our SwinTransformer for `arch` (a key of ARCHS); overrides: patch_size, window_size,
    embed_dim, depths, heads, drop_path. The window is 7, or 12 at 384 px (design note 2)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    embed_dim, depths, heads, drop_path = ARCHS[arch]
    config = dict(patch_size=4, window_size=12 if img_size == 384 else 7,
                  embed_dim=embed_dim, depths=depths, heads=heads, drop_path=drop_path)
    config.update({key: value for key, value in overrides.items() if value is not None})
    return SwinTransformer(num_classes=num_classes, img_size=img_size, **config)


def torchvision_key(key):
    """The name torchvision's swin_t/s/b gives the tensor our state_dict calls `key`."""
    key = re.sub(r"^stages\.(\d+)\.", lambda m: f"features.{2 * int(m[1]) + 1}.", key)
    key = re.sub(r"^merges\.(\d+)\.", lambda m: f"features.{2 * int(m[1]) + 2}.", key)
    key = key.replace(".mlp.2.", ".mlp.3.")  # torchvision's MLP has a Dropout after the GELU
    for ours, theirs in (("patch_embed.proj.", "features.0.0."), ("patch_embed.norm.", "features.0.2."),
                         ("head.norm.", "norm."), ("head.fc.", "head.")):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def load_torchvision_weights(model, state_dict, with_head=True):
    """Copy the weights of torchvision's swin_t/swin_s/swin_b into our model (as nanoGPT's
    from_pretrained does): every key mapped, counts and shapes checked, copied without grad.
    with_head=False leaves our classifier (sized for another data set's classes) as it is."""
    ours = {k: v for k, v in model.state_dict().items() if with_head or not k.startswith("head.fc.")}
    theirs = {k: v for k, v in state_dict.items()
              if not k.endswith("relative_position_index") and (with_head or not k.startswith("head."))}
    if len(ours) != len(theirs):
        raise ConfigError(f"our model has {len(ours)} tensors, the torchvision state_dict {len(theirs)}: "
                          "not the same architecture")
    with torch.no_grad():
        for key, tensor in ours.items():
            source = theirs.get(torchvision_key(key))
            if source is None or source.shape != tensor.shape:
                found = "missing" if source is None else tuple(source.shape)
                raise ConfigError(f"{key}: expected {tuple(tensor.shape)} at {torchvision_key(key)}, found {found}")
            tensor.copy_(source)
    # We recompute the relative-position index; it must be the one torchvision stored.
    for name, buffer in model.named_buffers():
        if name.endswith("relative_position_index") and torchvision_key(name) in state_dict:
            assert torch.equal(buffer.flatten(), state_dict[torchvision_key(name)].flatten().to(buffer.device))
    return model


TORCHVISION_WEIGHTS = {"swin-t": "Swin_T_Weights", "swin-s": "Swin_S_Weights", "swin-b": "Swin_B_Weights"}


def pretrained_state_dict(arch):
    """torchvision's ImageNet-1k weights for `arch`, fetched once through its weights API."""
    if arch not in TORCHVISION_WEIGHTS:
        raise ConfigError(f"--pretrained: torchvision has ImageNet weights for {', '.join(TORCHVISION_WEIGHTS)} only")
    from torchvision.models import get_weight
    weights = get_weight(f"{TORCHVISION_WEIGHTS[arch]}.IMAGENET1K_V1")
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), or a damaged download
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise ConfigError(f"--pretrained: could not fetch {weights.url} ({getattr(e, 'reason', e)}); torchvision "
                          f"caches weights in {cache}: put {os.path.basename(weights.url)} there to use them offline")


# ---- Paper 3.2-3.3: gradient-isolated modules and where to cut -------------------------------

def resolve_split(split, k, depths):
    """Module ends as block counts: module i holds blocks ends[i-1]+1 .. ends[i] (numbered
    1..N), the last module the rest. `split` is "paper" or a list such as "3,5,11"."""
    n = sum(depths)
    if split != "paper":
        try:
            ends = tuple(int(b) for b in split.split(","))
        except ValueError:
            raise ConfigError(f"--split {split!r} is not 'paper', 'balanced' or a comma-separated list of block numbers")
        if any(b <= a for a, b in zip(ends, ends[1:])) or ends[0] < 1 or ends[-1] >= n:
            raise ConfigError(f"--split {split}: module ends must increase strictly within 1..{n - 1} "
                              f"(the model has {n} blocks; the last module ends at block {n})")
        if k is not None and k != len(ends) + 1:
            raise ConfigError(f"--split {split} makes {len(ends) + 1} modules but --k is {k}")
        return ends
    k = 4 if k is None else k
    if not 1 <= k <= n:
        raise ConfigError(f"--k {k}: must be between 1 and the number of blocks, {n}")
    if tuple(depths) == (2, 2, 6, 2) and k in (2, 4):
        # design note 3: the paper's Swin-T splits, by stage: K=4 one stage per module, K=2 stage 1 | 2-4.
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
                units.append(([block, model.merges[s]], 2 * model.dims[s], model.resolutions[s] // 2))
            else:
                units.append(([block], model.dims[s], model.resolutions[s]))
    return units


class Checkpointed(nn.Sequential):
    """--checkpoint (design note 8): a unit of block_units whose activations are recomputed in the
    backward pass instead of kept; only its input stays alive. Non-reentrant checkpointing
    restores the random state, so drop-path drops the same paths when it recomputes."""

    def forward(self, x):  # (nothing to recompute without grad, in evaluation)
        run = super().forward
        return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False) if torch.is_grad_enabled() else run(x)


def split_backbone(model, ends, checkpoint=False):
    """Cut the backbone after the given block counts. A patch merging goes with the block that
    ends its stage; module 1 starts after the patch embedding (its LocalStep runs that first, so
    that x_0 is the embedding) and module K ends with the classifier head."""
    units = block_units(model)
    bounds = [0, *ends, len(units)]
    shapes = [(model.dims[0], model.resolutions[0])] + [(dim, res) for _, dim, res in units]
    specs = []
    for a, b in zip(bounds, bounds[1:]):
        layers = [layer for unit, _, _ in units[a:b] for layer in ([Checkpointed(*unit)] if checkpoint else unit)]
        layers += [model.head] if b == len(units) else []
        specs.append(ModuleSpec(nn.Sequential(*layers), *shapes[a], *shapes[b]))
    return specs


# ---- Paper 3.4: the auxiliary block f_i ------------------------------------------------------

DECODERS = ("interp", "deconv", "deconv4")


def make_decoder(kind, in_ch, out_ch, upscale, width=16):
    """Reconstruction head: (B, in_ch, h, w) -> logits (B, out_ch, h*upscale, w*upscale).

    The exact layers are our choice (design note 4). `width` is kept narrow (InfoPro uses 12-32)
    because the decoder runs at the target's resolution, where every channel is costly.
    """
    if kind == "interp":
        # InfoPro's structure. The 1x1 reduction first is the same linear map as after the
        # bilinear upsampling (both are linear), but runs at the low resolution: cheaper.
        return nn.Sequential(
            nn.Conv2d(in_ch, width, 1, bias=False),
            nn.Upsample(scale_factor=upscale, mode="bilinear", align_corners=False) if upscale > 1 else nn.Identity(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out_ch, 3, padding=1))
    if kind in ("deconv", "deconv4"):
        steps = int(math.log2(upscale))
        if 2**steps != upscale:
            raise ConfigError(f"--decoder {kind} upsamples by 2 per layer; it cannot reach a factor of {upscale}")
        kernel, padding = (2, 0) if kind == "deconv" else (4, 1)
        layers, ch = [], in_ch
        for _ in range(steps):
            layers += [nn.ConvTranspose2d(ch, width, kernel, stride=2, padding=padding, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            ch = width
        return nn.Sequential(*layers, nn.Conv2d(ch, out_ch, 1))
    raise ConfigError(f"unknown --decoder {kind!r}; choose one of {', '.join(DECODERS)}")


class AuxBlock(nn.Module):
    """f_i: LayerNorm, a conv block reducing the channels (our choice: 3x3 conv to 128,
    BatchNorm, ReLU), then a contrastive head (pool, 2-layer MLP, L2-normalised) and, if
    `target_dim`, a decoder reconstructing a (target_dim, h*upscale, w*upscale) map."""

    def __init__(self, *, in_dim, target_dim=None, upscale=1, decoder="interp", width=128, proj_dim=128):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.conv = nn.Sequential(nn.Conv2d(in_dim, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, proj_dim))
        self.decoder = make_decoder(decoder, width, target_dim, upscale) if target_dim else None

    def forward(self, x):
        """x_i (B, h, w, c) -> (z (B, proj_dim) unit vectors, reconstruction logits or None)."""
        h = self.conv(rearrange(self.norm(x), "b h w c -> b c h w"))
        z = F.normalize(self.projector(h.mean(dim=(2, 3))), dim=1)
        return z, (self.decoder(h) if self.decoder is not None else None)


# ---- Paper 3.5: the losses (eq. 1-3) ---------------------------------------------------------

def supervised_nt_xent(z, labels, temperature=0.07):
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
    """Weights of eq. 2 for modules 1..K-1 (design note 5): linear from (3.0, 1.0) at module 1 to
    (0.0, 4.0) at module K-1; a single auxiliary module gets (3.0, 1.0)."""
    steps = [i / (num_aux - 1) if num_aux > 1 else 0.0 for i in range(num_aux)]
    lambdas = [3.0 - 3.0 * t for t in steps] if lambdas is None else list(lambdas)
    mus = [1.0 + 3.0 * t for t in steps] if mus is None else list(mus)
    for name, values in (("--lambdas", lambdas), ("--mus", mus)):
        if len(values) != num_aux:
            raise ConfigError(f"{name} has {len(values)} values; K={num_aux + 1} modules need {num_aux} (one per module 1..K-1)")
    return lambdas, mus


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
METHODS = ("ours", "infopro", "greedy-ce", "greedy-contrast")


class LocalSwin(nn.Module):
    """The backbone cut into K modules, with an auxiliary head for each module but the last.

    `method` (design note 5): ours (reconstruct x_{i-1} + contrast), infopro (reconstruct the
    image + contrast), greedy-ce (pool + linear classifier), greedy-contrast (contrast only).
    """

    def __init__(self, backbone, ends, *, method="ours", decoder="interp", lambdas=None, mus=None,
                 temperature=0.07, label_smoothing=0.1, checkpoint=False):
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
        if decoder not in DECODERS:  # checked here too: with K = 1 no decoder is ever built
            raise ConfigError(f"unknown --decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
        self.backbone, self.ends, self.method = backbone, tuple(ends), method
        self.specs = split_backbone(backbone, self.ends, checkpoint)  # views: the parameters live in backbone
        self.lambdas, self.mus = lambda_mu_schedule(len(self.specs) - 1, lambdas, mus)
        if method == "greedy-contrast":
            self.lambdas = [0.0] * len(self.lambdas)
        self.temperature, self.label_smoothing = temperature, label_smoothing
        self.aux = nn.ModuleList()
        img_size = backbone.patch_embed.img_size
        for spec, lam in zip(self.specs, self.lambdas):  # modules 1..K-1; module K has the classifier head
            if method == "greedy-ce":
                head = ClassifierHead(spec.out_dim, backbone.head.fc.out_features)
            elif lam == 0:  # nothing to reconstruct (greedy-contrast, or lambda_i = 0): no decoder to pay for
                head = AuxBlock(in_dim=spec.out_dim)
            elif method == "infopro":  # the whole image, from x_i, upsampled to the image size
                head = AuxBlock(in_dim=spec.out_dim, target_dim=3, upscale=img_size // spec.out_res, decoder=decoder)
            else:
                head = AuxBlock(in_dim=spec.out_dim, target_dim=spec.in_dim, upscale=spec.in_res // spec.out_res,
                                decoder=decoder)
            self.aux.append(head)
        # InfoPro's target is the image de-normalised to [0, 1]; kept here, not rebuilt every step.
        self.register_buffer("image_mean_std", torch.tensor([IMAGENET_MEAN, IMAGENET_STD]).view(2, 1, 3, 1, 1),
                             persistent=False)
        self.devices = [torch.device("cpu")] * len(self.specs)  # where each module lives: see place()
        self.steps = [LocalStep(self, i) for i in range(len(self.specs))]  # a list: no second registration

    def place(self, devices):
        """Put module i, with its auxiliary block and optimizer state to come, on devices[i]
        (module 1 also gets the patch embedding). Call before making the optimizers."""
        if len(devices) != len(self.specs):
            raise ConfigError(f"--devices names {len(devices)} devices for {len(self.specs)} modules: give one per module")
        self.devices = [torch.device(d) for d in devices]
        for step, device in zip(self.steps, self.devices):
            step.to(device)
        self.image_mean_std = self.image_mean_std.to(self.devices[0])
        return self

    def forward(self, images):
        """At test time the modules simply run in sequence (the same function as backbone(images))."""
        x = self.backbone.patch_embed(images.to(self.devices[0]))
        for spec, device in zip(self.specs, self.devices):
            x = spec.layers(x.to(device, non_blocking=True))
        return x

    def module_parameters(self, i):
        """What optimizer i updates: module i's layers (and the patch embedding for module 1)
        together with its auxiliary block."""
        return list(self.steps[i].parameters())

    def local_loss(self, i, x_in, x_out, images, labels):
        """Module i's loss. x_in = x_{i-1}, x_out = g_i(x_{i-1}) (logits for the last module)."""
        labels = labels.to(x_out.device, non_blocking=True)
        if i == len(self.specs) - 1:  # eq. 3: L_K = CE(H(g_K(x_{K-1})), y)
            return F.cross_entropy(x_out, labels, label_smoothing=self.label_smoothing)
        if self.method == "greedy-ce":
            return F.cross_entropy(self.aux[i](x_out), labels, label_smoothing=self.label_smoothing)
        z, recon = self.aux[i](x_out)  # eq. 1: L_i = f_i(x_i, x_{i-1}, y)
        l_con = supervised_nt_xent(z, labels, self.temperature)
        if recon is None:
            return self.mus[i] * l_con
        if self.method == "infopro":
            mean, std = self.image_mean_std.to(x_out.device, non_blocking=True)  # a no-op on one device
            target = (images.to(x_out.device) * std + mean).clamp(0, 1)
        else:
            # Our choice: features are not in [0, 1], so BCE scores the logits against sigmoid(x_{i-1}).
            target = torch.sigmoid(rearrange(x_in.detach(), "b h w c -> b c h w"))
        l_rec = reconstruction_bce(recon, target.to(recon.dtype))
        return self.lambdas[i] * l_rec + self.mus[i] * l_con  # eq. 2


# ---- Greedy training (paper 3.2-3.3): one module at a time -----------------------------------

class LocalStep(nn.Module):
    """Module g_i with its local loss as one nn.Module: forward(x_{i-1}, images, labels) returns
    (x_i, L_i). It owns exactly module i's parameters (with the patch embedding for i = 0 and
    its auxiliary block), so that DistributedDataParallel can wrap each module on its own and
    each wrapper sees one backward per step."""

    def __init__(self, net, i):
        super().__init__()
        self.i, self.net = i, [net]  # in a list, so that net's parameters are not registered twice
        self.stem = net.backbone.patch_embed if i == 0 else None
        self.layers = net.specs[i].layers
        self.aux = net.aux[i] if i < len(net.aux) else None

    def forward(self, x, images, labels):
        if self.stem is not None:
            x = self.stem(x)  # x_0 is the patch embedding, inside module 1's graph
        out = self.layers(x)
        return out, self.net[0].local_loss(self.i, x, out, images, labels)


def train_step(net, optimizers, images, labels, *, clip_grad=5.0, amp_dtype=None, scaler=None):
    """One training step (design note 1). Module i runs on the detached x_{i-1}, its local loss is
    backpropagated and its optimizer steps before module i+1 starts, so only one module's
    graph is ever alive. (Summing the K losses into one backward would give the same
    gradients but keep every graph alive: none of the memory saving.) Returns the K losses."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    losses, x = [], images
    for step, optimizer, device in zip(net.steps, optimizers, net.devices):
        # To the module's device without a host sync: module i-1's backward can still be running there.
        x = x.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out, loss = step(x, images, labels)  # x_i = g_i(x_{i-1}) and L_i (eq. 1-3)
        scaler.scale(loss).backward()  # frees module i's graph
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip_grad)
        scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)  # gradients need not outlive the step
        losses.append(loss.detach())
        x = out.detach()  # no gradient crosses a module boundary
    scaler.update()
    return losses


def make_optimizers(net, *, lr, weight_decay, total_steps, warmup_steps):
    """One AdamW per module (with its auxiliary block), Swin's recipe: no weight decay on
    biases, norms and relative-position tables; linear warm-up then cosine decay, per step."""
    no_decay = {id(p) for name, p in net.named_parameters() if p.ndim <= 1 or name.endswith("bias_table")}
    optimizers, schedulers = [], []
    for i in range(len(net.specs)):
        params = net.module_parameters(i)
        optimizer = torch.optim.AdamW([
            {"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}], lr=lr)
        phases = [torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup_steps)] if warmup_steps else []
        phases.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1), eta_min=lr / 100))
        optimizers.append(optimizer)
        schedulers.append(torch.optim.lr_scheduler.SequentialLR(optimizer, phases, milestones=[warmup_steps][:len(phases) - 1]))
    return optimizers, schedulers


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


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


def distribute(net, device):
    """Data parallelism: wrap each module, with its auxiliary block, in its own
    DistributedDataParallel. Local learning runs one backward per module per step, which one
    wrapper around the whole network cannot follow; one per module sees one backward each.
    The contrastive loss and BatchNorm see each process's own part of the batch (our choice)."""
    device_ids = [device] if device.type == "cuda" else None
    # A 1x1 conv's gradient can come back channels-last: the same memory order as its weight for
    # a 1x1 kernel, but DDP compares strides and warns on every step.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    net.steps = [nn.parallel.DistributedDataParallel(step, device_ids=device_ids) for step in net.steps]


@torch.no_grad()
def ranks_identical(net):
    """Under DDP: does every process hold exactly rank 0's parameters? (Checked once, at the end.)"""
    same = torch.ones((), device=next(net.parameters()).device)
    for p in net.parameters():
        reference = p.detach().clone()
        torch.distributed.broadcast(reference, src=0)
        same *= torch.equal(reference, p)
    torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN)
    return bool(same.item())


@torch.no_grad()
def evaluate(net, data, device, batch_size, amp_dtype=None, name=None):
    """Loss (plain cross-entropy) and top-1 accuracy (%) of the whole network on an ImageSet. With a
    name, a progress line every 30 s (a test set at 224 px takes minutes on a CPU)."""
    net.eval()
    loss_sum, correct, shown = torch.zeros((), device=device), torch.zeros((), device=device), time.perf_counter()
    for start in range(0, len(data), batch_size):
        if name and time.perf_counter() - shown > 30:
            print(f"  evaluating {name}: {start}/{len(data)} images", flush=True)
            shown = time.perf_counter()
        images = prepare_batch(data.images[start:start + batch_size].to(device), net.backbone.patch_embed.img_size)
        labels = data.labels[start:start + batch_size].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(images).float().to(device)  # with --devices, the last module's device
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
    net.train()
    return loss_sum.item() / len(data), 100.0 * correct.item() / len(data)


# ---- Memory: the paper's headline claim, measured the same way on every device ---------------

class LiveTensorMeter(TorchDispatchMode):
    """The CPU's stand-in for torch.cuda.max_memory_allocated: the peak number of bytes held by
    tensor storages that operators allocated while the meter was active and that are still
    alive (activations kept for backward, gradients, optimizer state, temporaries). A storage
    counts from the operator that returned it until it is freed; scratch space that a kernel
    allocates and frees inside itself is not seen."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes = {}  # id(storage) -> bytes, for the storages counted and still alive

    def _free(self, key):
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()  # torch keeps one Python object per storage while it lives
            key = id(storage)
            if key in inputs or key in self._sizes:  # a view or an in-place result: nothing new
                continue
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out


class PeakMemory:
    """Peak training memory in bytes. CUDA: max_memory_allocated since this object was made
    (the largest over the devices, with a module per device). CPU: `baseline` (bytes live
    before: parameters, and the optimizer state of a resumed run) plus the LiveTensorMeter peak
    over the regions entered with `region()`. Other devices: None."""

    def __init__(self, devices, baseline=0):
        self.devices, self.baseline = sorted(set(devices), key=str), baseline
        self.meter = LiveTensorMeter() if self.devices[0].type == "cpu" else None
        for device in [d for d in self.devices if d.type == "cuda"]:
            torch.cuda.reset_peak_memory_stats(device)

    def region(self):
        return self.meter if self.meter is not None else contextlib.nullcontext()

    def live_bytes(self):
        if self.devices[0].type == "cuda":
            return sum(torch.cuda.memory_allocated(device) for device in self.devices)
        return self.baseline + self.meter.live if self.meter is not None else None

    def peak_bytes(self):
        if self.devices[0].type == "cuda":
            return max(torch.cuda.max_memory_allocated(device) for device in self.devices)
        return self.baseline + self.meter.peak if self.meter is not None else None


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(net, optimizers):  # what training keeps between steps: parameters, buffers, AdamW state
    return tensor_bytes([*net.parameters(), *net.buffers()]) + tensor_bytes(
        v for opt in optimizers for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def measure_memory(net, optimizers, *, batch_size, num_classes, device, steps=3, **step_kwargs):
    """--measure-memory: training steps on random tensors of the configured shape. Returns the
    peak training memory, the part of it above parameters and optimizer state (activations,
    gradients, temporaries), the step time (measured apart from the meters' overhead) and the
    step's FLOPs (forward and backward, auxiliary blocks included: the cost of local learning)."""
    size = net.backbone.patch_embed.img_size
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(num_classes, (batch_size,), device=device)
    net.train()
    train_step(net, optimizers, images, labels, **step_kwargs)  # warm-up: creates the optimizer state
    cuda = {d for d in net.devices if d.type == "cuda"}  # CUDA runs asynchronously: sync before reading the clock
    sync = lambda: [torch.cuda.synchronize(d) for d in cuda]
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(net, optimizers, images, labels, **step_kwargs)
    sync()
    step_time = (time.perf_counter() - start) / steps
    state = state_bytes(net, optimizers)
    memory = PeakMemory(net.devices, baseline=state + tensor_bytes([images, labels]))
    with memory.region():
        train_step(net, optimizers, images, labels, **step_kwargs)
    peak = memory.peak_bytes()
    with FlopCounterMode(display=False) as flops:
        train_step(net, optimizers, images, labels, **step_kwargs)
    mib = 2**20
    return {"peak_memory_mib": peak and peak / mib, "state_memory_mib": state / mib,
            "activation_memory_mib": peak and (peak - state) / mib, "step_gflop": flops.get_total_flops() / 1e9,
            "step_time_s": step_time, "images_per_second": batch_size / step_time}


def balanced_split(backbone, k, lambdas, *, batch_size, device, checkpoint=False, **net_options):
    """--split balanced: the cut points that make the largest module, with its auxiliary block, as
    small as possible at this batch and image size (README, Scaling). Each block runs once on its own
    detached input, so the search holds one block's graph at a time, and measures the bytes the
    block keeps for backward; one local step of each kind of auxiliary block measures its peak. A
    dynamic program over the cut points minimises the largest module. Returns the ends and each
    module's cost as a share of E2E's (without checkpointing)."""
    units = [layers for layers, _, _ in block_units(backbone)]
    units[-1] = units[-1] + [backbone.head]
    n, size = len(units), backbone.patch_embed.img_size
    images = torch.randn(batch_size, 3, size, size, device=device)
    labels = torch.randint(backbone.head.fc.out_features, (batch_size,), device=device)
    backbone.train()
    memory = PeakMemory([device])

    def kept(layers, x):  # the bytes `layers` keep for backward (output included), and the output
        with memory.region():
            before = memory.live_bytes()
            out = layers(x)
            return memory.live_bytes() - before, out.detach()  # the graph dies with `out`, on return

    embedding, x0 = kept(backbone.patch_embed, images)
    full, held, xs = [embedding], [embedding], [x0]  # xs[j] = x_j, detached: the next block's input
    for layers in units:
        plain, out = kept(nn.Sequential(*layers), xs[-1].requires_grad_())
        full.append(plain)
        held.append(kept(Checkpointed(*layers), xs[-1])[0] if checkpoint else plain)
        xs.append(out)

    aux_peaks = {}

    def aux_peak(a, b, reconstructs):  # the auxiliary block reading x_b, for a module that reads x_a
        key = (xs[a].shape, xs[b].shape, reconstructs)
        if key not in aux_peaks:
            ends = (b,) if a == 0 else (a, b)
            probe = LocalSwin(backbone, ends, lambdas=[float(reconstructs)] * len(ends), mus=[1.0] * len(ends),
                              **net_options).place([device] * (len(ends) + 1))
            peak = PeakMemory([device])
            before = peak.live_bytes()
            with peak.region():
                probe.local_loss(len(ends) - 1, xs[a].detach(), xs[b].detach().requires_grad_(), images, labels).backward()
            aux_peaks[key] = peak.peak_bytes() - before
        return aux_peaks[key]

    def module_cost(i, a, b):  # module i + 1: its input, blocks a+1 .. b (one recomputed at a time) and aux
        cost = sum(held[a + 1:b + 1]) + (max(full[a + 1:b + 1]) if checkpoint else 0)
        return cost + (held[0] if a == 0 else tensor_bytes([xs[a]])) + (aux_peak(a, b, lambdas[i] > 0) if b < n else 0)

    best = {(0, 0): (0, ())}  # (modules placed, blocks covered) -> (largest module cost, ends)
    for i in range(k):
        for b in [n] if i == k - 1 else range(i + 1, n - (k - 1 - i) + 1):  # leave a block for each later module
            best[i + 1, b] = min((max(best[i, a][0], module_cost(i, a, b)), best[i, a][1] + (b,))
                                 for a in range(i, b) if (i, a) in best)
    ends = best[k, n][1]
    shares = [module_cost(i, a, b) / sum(full) for i, (a, b) in enumerate(zip((0,) + ends, ends))]
    return ends[:-1], shares


# ---- Data (design note 6): whole data sets in memory, augmented a batch at a time ------------

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
    patterns = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=gen), size=size, mode="bilinear")
    gen.manual_seed(1 if train else 2)
    labels = torch.randint(num_classes, (1024 if train else 256,), generator=gen)
    noisy = patterns[labels] + 0.15 * torch.randn(len(labels), 3, size, size, generator=gen)
    return ImageSet((noisy.clamp(0, 1) * 255).to(torch.uint8), labels)


TORCHVISION_SETS = {  # name: (class, train kwargs, test kwargs, classes)
    "cifar10": (datasets.CIFAR10, {"train": True}, {"train": False}, 10),
    "cifar100": (datasets.CIFAR100, {"train": True}, {"train": False}, 100),
    "stl10": (datasets.STL10, {"split": "train"}, {"split": "test"}, 10),  # the unlabelled split is unused
    "svhn": (datasets.SVHN, {"split": "train"}, {"split": "test"}, 10),
    "mnist": (datasets.MNIST, {"train": True}, {"train": False}, 10),
    "fashion-mnist": (datasets.FashionMNIST, {"train": True}, {"train": False}, 10),
}
DATASETS = (*TORCHVISION_SETS, "imagefolder", "synthetic")


def as_image_set(dataset):
    """The uint8 array a torchvision data set already holds, as (N, C, H, W), with its labels."""
    images = torch.as_tensor(dataset.data)
    if images.ndim == 3:  # MNIST-like: (N, H, W), grayscale
        images = images[:, None]
    elif images.shape[-1] == 3:  # CIFAR: (N, H, W, 3)
        images = rearrange(images, "n h w c -> n c h w")
    labels = dataset.targets if hasattr(dataset, "targets") else dataset.labels  # SVHN and STL-10 say labels
    return ImageSet(images.contiguous(), torch.as_tensor(labels, dtype=torch.long))


def imagefolder_dirs(root):
    test = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(os.path.join(root, "train")) or test is None:
        raise ConfigError(f"--dataset imagefolder needs {os.path.join(root, 'train')}/<class>/* and "
                          f"{os.path.join(root, 'val')} (or test)/<class>/*; not found")
    return os.path.join(root, "train"), test


def read_image(path):
    """ImageFolder's loader (PIL, converted to RGB), naming the file it cannot read."""
    try:
        return datasets.folder.default_loader(path)
    except OSError as e:
        raise OSError(f"cannot read the image {path} ({e})") from None


def decode_folder(folder, img_size, workers):
    """An ImageFolder decoded once, in `workers` processes, resized to img_size (our choice: a
    folder of large images would not fit in memory at full size) and converted to RGB."""
    try:
        dataset = datasets.ImageFolder(folder, v2.Compose([v2.ToImage(), v2.Resize((img_size, img_size), antialias=True)]),
                                       loader=read_image)
        print(f"decoding {len(dataset)} images in {folder} once, at {img_size} x {img_size}", flush=True)
        parts = list(torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers))
    except (OSError, RuntimeError) as e:  # an empty class folder or split; an unreadable image (from a worker, too)
        raise ConfigError(f"--dataset imagefolder: {str(e).strip().splitlines()[-1]}")
    return ImageSet(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])), dataset.classes


def count_classes(name, root):
    """The number of classes, without loading the data (--measure-memory needs no data)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "synthetic":
        return 10
    if name == "imagefolder":
        train_dir = imagefolder_dirs(root)[0]
        return sum(os.path.isdir(os.path.join(train_dir, d)) for d in os.listdir(train_dir))
    return TORCHVISION_SETS[name][3]


def make_datasets(name, root, img_size, download=True, workers=0):
    """(train, test) ImageSets. torchvision's classes download a data set (or find it in `root`)."""
    if name == "synthetic":
        return synthetic_images(train=True), synthetic_images(train=False)
    if name == "imagefolder":
        (train, classes), (test, test_classes) = (decode_folder(d, img_size, workers) for d in imagefolder_dirs(root))
        if classes != test_classes:
            raise ConfigError(f"{' and '.join(imagefolder_dirs(root))} hold different class folders")
        return train, test
    cls, train_kw, test_kw, _ = TORCHVISION_SETS[name]
    where = os.path.abspath(root)
    try:
        return tuple(as_image_set(cls(root, download=download, **kw)) for kw in (train_kw, test_kw))
    except ImportError as e:  # SVHN's .mat files need scipy
        raise ConfigError(f"--dataset {name} needs a package torchvision lacks here ({e}); pip install scipy")
    except (RuntimeError, OSError) as e:  # not found (--no-download), or no network (URLError is an OSError)
        how = "run without --no-download to fetch it" if not download else f"the download failed ({e})"
        files = [os.path.splitext(os.path.basename(url))[0] for url, _ in getattr(cls, "resources", [])]
        put = (f"put {', '.join(files)} (gunzipped) in {os.path.join(where, cls.__name__, 'raw')}" if files
               else f"put torchvision's extracted copy of {cls.__name__} there (--data-dir)")
        raise ConfigError(f"--dataset {name}: not found in {where}; {how}, or {put}")


def validation_split(train, fraction, seed=0):
    """(train, val): a fixed random `fraction` (in [0, 1)) of the training set held out for choosing
    settings (design note 7). It depends on `seed` alone, not on --seed: every run is judged on the same images."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_val = round(fraction * len(train))
    return train.subset(order[n_val:]), (train.subset(order[:n_val]) if n_val else None)


def random_resized_crop(images, size, min_scale, generator):
    """Training augmentation for a whole batch (our choice, lighter than Swin's RandAugment,
    Mixup and CutMix): per image, a crop of a random fraction in [min_scale, 1] of the area
    with aspect ratio in [3/4, 4/3], resized to size x size, flipped left-right half the time.
    One affine grid_sample does it all on the batch's device. (B, C, H, W) -> (B, C, size, size)."""
    u = torch.rand(len(images), 5, generator=generator).to(images.device)
    area = min_scale + (1 - min_scale) * u[:, 0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u[:, 1])  # log-uniform, as torchvision draws it
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # crop sides / image sides
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(w)
    # grid_sample coordinates run from -1 to 1: the crop's centre may lie up to 1 - w from the middle.
    theta = torch.stack([torch.stack([w * flip, zero, (1 - w) * (2 * u[:, 2] - 1)], dim=1),
                         torch.stack([zero, h, (1 - h) * (2 * u[:, 3] - 1)], dim=1)], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [len(images), images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def prepare_batch(images, img_size, generator=None, min_scale=0.35):
    """uint8 (B, 1 or 3, H, W) -> the network's input (B, 3, S, S), ImageNet-normalised, grayscale
    repeated to 3 channels. Training (a generator): random resized crop and flip; testing: resize."""
    x = images.float().div(255).expand(-1, 3, -1, -1)
    if generator is not None:
        x = random_resized_crop(x, img_size, min_scale, generator)
    elif x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
    return v2.functional.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


# ---- The training run: progress, log, checkpoint, results ------------------------------------

def atomic_write(path, write):
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_json(path, record):
    atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(record, indent=2)))


def format_duration(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"


# Flags that do not change what is computed: a resumed run may change them. (--split is
# checked through the module ends it resolves to: "balanced" and the list it chose are the same.)
RUN_ONLY_FLAGS = {"resume", "max_steps", "workers", "device", "devices", "data_dir", "no_download", "log_every", "out",
                  "split", "overwrite", "checkpoint"}
RUN_FILES = ("log.jsonl", "results.json", "last.pt")  # what a run writes into --out


def train(args, net, optimizers, schedulers, scaler, data, device, amp_dtype):
    """The greedy training run over `data` = (train, val or None, test) ImageSets: progress lines,
    log.jsonl (one record per epoch), last.pt at the end of each epoch, results.json at the end."""
    out, K, (train_set, val_set, test_set) = args.out, len(net.specs), data
    world, rank = world_size(), torch.distributed.get_rank() if torch.distributed.is_initialized() else 0  # rank 0 writes files
    img_size, batch = net.backbone.patch_embed.img_size, args.batch_size
    steps_per_epoch = len(train_set) // (batch * world)
    checkpoint_path = os.path.join(out, "last.pt")
    start_epoch, step, history = 0, 0, []
    if args.resume:
        ckpt = load_checkpoint(checkpoint_path, args, net.ends)
        net.load_state_dict(ckpt["net"])
        for obj, state in zip(optimizers + schedulers, ckpt["optimizers"] + ckpt["schedulers"]):
            obj.load_state_dict(state)
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda" and ckpt["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        start_epoch, step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        if start_epoch >= args.epochs:
            print(f"{out}: this run has finished its {args.epochs} epochs; nothing to do")
            return None
        print(f"resumed from {checkpoint_path} after epoch {start_epoch} (step {step})")
    print(f"training {args.epochs} x {steps_per_epoch} steps; into {out}/: log.jsonl and last.pt after each epoch, results.json at the end")
    log_path = os.path.join(out, "log.jsonl")
    if rank == 0:  # exactly the epochs the checkpoint has seen
        pathlib.Path(log_path).write_text("".join(json.dumps(record) + "\n" for record in history))

    memory = PeakMemory(net.devices, baseline=state_bytes(net, optimizers))  # a resumed run's AdamW state is loaded already
    train_images, train_time, run_start = 0, 0.0, time.perf_counter()
    epoch = start_epoch
    while epoch < args.epochs and not (args.max_steps and step >= args.max_steps):
        net.train()
        # Epoch e's order and augmentations depend on (seed, e) alone, so a resumed run repeats them.
        generator = torch.Generator().manual_seed(1000 * args.seed + epoch)
        order = torch.randperm(len(train_set), generator=generator)
        epoch_losses, window = torch.zeros(K, device=device), []  # window: the (K,) losses since the last log line
        epoch_start = window_start = time.perf_counter()
        for done in range(1, steps_per_epoch + 1):
            part = order[((done - 1) * world + rank) * batch:][:batch]  # each process its own part of the global batch
            images = prepare_batch(train_set.images[part].to(device, non_blocking=True), img_size, generator, args.crop_scale)
            labels = train_set.labels[part].to(device, non_blocking=True)
            # The meter (a Python hook on every operator) reads each epoch's first two steps: the second holds the optimizer state.
            with memory.region() if done <= 2 else contextlib.nullcontext():
                losses = train_step(net, optimizers, images, labels, clip_grad=args.clip_grad, amp_dtype=amp_dtype, scaler=scaler)
            window.append(torch.stack([loss.float().to(device) for loss in losses]))  # on the device: no host sync
            for scheduler in schedulers:
                scheduler.step()
            step += 1
            # From step 1 on, so that the ETA (an epoch's estimate, then the run's) shows at once.
            if done % args.log_every == 0 or done in (1, steps_per_epoch) or step == args.max_steps:
                losses = torch.stack(window)
                if world > 1:  # the mean over processes: every rank logs the same losses and stops together on a NaN
                    torch.distributed.all_reduce(losses)
                    losses /= world
                bad = (~torch.isfinite(losses)).nonzero()  # checked here, not every step, to name the first bad one
                if len(bad):
                    row, i = bad[0].tolist()
                    raise FloatingPointError(f"loss of module {i + 1} became {losses[row, i].item()} at step "
                                             f"{step - len(window) + 1 + row} (epoch {epoch + 1})")
                epoch_losses += losses.sum(0)
                train_time += time.perf_counter() - window_start
                train_images += len(window) * batch * world
                rate = train_images / train_time
                eta = (min(args.epochs * steps_per_epoch, args.max_steps or math.inf) - step) * batch * world / rate
                print(f"epoch {epoch + 1}/{args.epochs} step {done}/{steps_per_epoch} | loss "
                      + " ".join(f"{v:.4f}" for v in losses.mean(0).tolist())
                      + f" | lr {schedulers[0].get_last_lr()[0]:.2e} | {rate:.0f} img/s | ETA {format_duration(eta)}", flush=True)
                window, window_start = [], time.perf_counter()
            if args.max_steps and step >= args.max_steps:
                break
        epoch += 1
        record = {"epoch": epoch, "steps": done, "train_loss": (epoch_losses / done).tolist(),
                  "lr": schedulers[0].get_last_lr()[0], "train_time_s": time.perf_counter() - epoch_start}
        for name, split in (("val", val_set), ("test", test_set)):  # test is reported, never used to choose
            if split is not None and done < steps_per_epoch:  # cut by --max-steps: a trial, evaluated on as many images
                split = split.subset(slice(0, done * batch * world))  # as it trained on, not a whole 224-px test set
                record[f"{name}_images"] = len(split)
            if split is not None:
                record[f"{name}_loss"], record[f"{name}_acc"] = evaluate(net, split, device, batch, amp_dtype, name)
        history.append(record)
        print(f"epoch {epoch}/{args.epochs} | " + " | ".join(f"{name} loss {record[f'{name}_loss']:.4f} acc {record[f'{name}_acc']:.2f}%"
                                                               + (f" (first {record[f'{name}_images']} images)" if f"{name}_images" in record else "")
                                                               for name in ("val", "test") if f"{name}_acc" in record)
              + f" | {record['train_time_s']:.0f} s", flush=True)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if rank == 0 and done == steps_per_epoch:  # a checkpoint marks a finished epoch; a run cut short resumes from the last one
            ckpt = {"epoch": epoch, "step": step, "history": history, "config": vars(args), "ends": net.ends,
                    "net": net.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                    "schedulers": [s.state_dict() for s in schedulers], "scaler": scaler.state_dict(),
                    "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            atomic_write(checkpoint_path, lambda tmp: torch.save(ckpt, tmp))
    peak = memory.peak_bytes()
    results = {"ranks_identical": ranks_identical(net)} if world > 1 else {}
    last = history[-1] if history else {}
    best_val = max(history, key=lambda r: r["val_acc"]) if val_set is not None and history else {}
    results |= {"test_acc": last.get("test_acc"), "val_acc": last.get("val_acc"), "best_val_acc": best_val.get("val_acc"),
                "best_val_epoch": best_val.get("epoch"), "peak_memory_mib": peak and peak / 2**20,
                "images_per_second": train_images / max(train_time, 1e-9), "epochs": epoch, "steps": step,
                "wall_time_s": time.perf_counter() - run_start, **run_info(args, net, device, optimizers)}
    if rank == 0:
        write_json(os.path.join(out, "results.json"), results)
    print(f"done: test acc {results['test_acc']:.2f}%" + (f", val acc {results['val_acc']:.2f}%" if val_set is not None else "")
          + f" | peak memory {results['peak_memory_mib'] or float('nan'):.0f} MiB | {results['images_per_second']:.0f} img/s"
          f" | {out}/results.json")
    return results


def load_checkpoint(path, args, ends):
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: no checkpoint at {path} (a run writes it at the end of each epoch)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt["config"]
    except Exception as e:  # torch.load raises many kinds of error on a damaged file
        raise ConfigError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:120]})")
    changed = [k for k, v in vars(args).items() if k not in RUN_ONLY_FLAGS and saved.get(k) != v]
    if changed:
        raise ConfigError(f"--resume: {path} was written with different settings: "
                          + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {getattr(args, k)})" for k in changed))
    if tuple(ckpt["ends"]) != tuple(ends):  # --split balanced measures again, and may cut elsewhere
        raise ConfigError(f"--resume: {path} has modules ending after blocks {tuple(ckpt['ends'])}, this run chose "
                          f"{tuple(ends)}; resume with --split {','.join(map(str, ckpt['ends']))}")
    return ckpt


def run_info(args, net, device, optimizers):
    """What a results.json needs to be read later: the full config and what it resolved to."""
    world = world_size()
    return {"config": vars(args), "k": len(net.specs), "split": list(net.ends), "lambdas": net.lambdas, "mus": net.mus,
            "lr": optimizers[0].param_groups[0]["initial_lr"], "global_batch": args.batch_size * world, "world_size": world,
            "parameters": sum(p.numel() for p in net.backbone.parameters()), "aux_parameters": sum(p.numel() for p in net.aux.parameters()),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "devices": [str(d) for d in net.devices], "torch": torch.__version__}


# ---- Command line ----------------------------------------------------------------------------

def int_list(text):
    return tuple(map(int, text.split(",")))


def float_list(text):
    return tuple(map(float, text.split(",")))


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its whole usage first
        raise ConfigError(f"{message} (see --help)")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--dataset", default="cifar10", help=f"one of {', '.join(DATASETS)} (default %(default)s)")
    a("--data-dir", default="./data", help="where data sets are (downloaded); for imagefolder: DIR/train, DIR/val or DIR/test (default %(default)s)")
    a("--no-download", action="store_true", help="never download; fail if the data set is not in --data-dir")
    a("--arch", default="swin-t", help=f"one of {', '.join(ARCHS)} (default %(default)s)")
    a("--img-size", type=int, default=224, help="images are resized to this, as in the paper (default %(default)s)")
    a("--patch-size", type=int, help="patch embedding stride p (default 4)")
    a("--window-size", type=int, help="attention window M (default 7, or 12 at 384 px)")
    a("--embed-dim", type=int, help="channels C of stage 1 (default: the arch's)")
    a("--depths", type=int_list, help="blocks per stage, e.g. 2,2,6,2 (default: the arch's)")
    a("--heads", type=int_list, help="attention heads per stage, e.g. 3,6,12,24 (default: the arch's)")
    a("--pretrained", action="store_true", help="start from torchvision's ImageNet weights (swin-t/s/b at 224 px), classifier new")
    a("--drop-path", type=float, help="stochastic depth rate of the last block (default: the arch's)")
    a("--k", type=int, help="number of gradient-isolated modules K (default 4; 1 is end-to-end training)")
    a("--split", default="paper", help="'paper' (design note 3), 'balanced' (measured: the largest module as small as possible) or the blocks "
      "(numbered from 1) after which modules 1..K-1 end, e.g. 2,4,10 (default %(default)s)")
    a("--method", default="ours", help=f"one of {', '.join(METHODS)} (default %(default)s)")
    a("--decoder", default="interp", help="reconstruction decoder: interp, deconv or deconv4 (default %(default)s)")
    a("--lambdas", type=float_list, help="reconstruction weights of modules 1..K-1 (default: 3.0 falling linearly to 0.0)")
    a("--mus", type=float_list, help="contrastive weights of modules 1..K-1 (default: 1.0 rising linearly to 4.0)")
    a("--temperature", type=float, default=0.07, help="NT-Xent temperature (default %(default)s)")
    a("--epochs", type=int, default=300, help="training epochs (default %(default)s)")
    a("--warmup-epochs", type=int, help="linear warm-up epochs before the cosine decay (default: epochs / 15, so 20 of 300)")
    a("--batch-size", type=int, default=128, help="images per step (default %(default)s)")
    a("--lr", type=float, help="peak learning rate (default 5e-4 * batch-size / 512)")
    a("--weight-decay", type=float, default=0.05, help="AdamW weight decay (none on biases, norms, position tables) (default %(default)s)")
    a("--label-smoothing", type=float, default=0.1, help="label smoothing of the cross-entropy losses (default %(default)s)")
    a("--clip-grad", type=float, default=5.0, help="gradient norm clipping, per module (default %(default)s)")
    a("--val-split", type=float, default=0.0, help="fraction of the training set held out to choose settings on (default %(default)s)")
    a("--crop-scale", type=float, default=0.35, help="smallest area fraction a random resized crop keeps (default %(default)s)")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes that decode an imagefolder, once (default %(default)s)")
    a("--checkpoint", action="store_true", help="recompute each block's activations in the backward pass (less memory, more compute)")
    a("--amp", default="none", choices=("none", "bf16", "fp16"), help="mixed precision (fp16 on CUDA only) (default %(default)s)")
    a("--device", help="cuda, cuda:1, cpu, ... (default: cuda when present)")
    a("--devices", help="one device per module, e.g. cuda:0,cuda:1,cuda:2,cuda:3: module i runs on the i-th (overrides --device)")
    a("--seed", type=int, default=0, help="random seed: the same seed gives the same run (default %(default)s)")
    a("--out", help="output folder (default runs/DATASET-ARCH-kK-METHOD, or runs/memory-ARCH-kK-METHOD-bBATCH)")
    a("--resume", action="store_true", help="continue the run in --out from its last.pt")
    a("--overwrite", action="store_true", help="replace the run in --out (without it, a folder that holds a run is refused)")
    a("--max-steps", type=int, help="stop after this many training steps in all (with --measure-memory: steps timed, default 3)")
    a("--log-every", type=int, default=50, help="print a progress line every this many steps (default %(default)s)")
    a("--measure-memory", action="store_true", help="measure peak training memory and step time on random tensors, then exit")
    return p.parse_args(argv)


def main(argv=None):
    # SIGTERM (what a scheduler sends before it preempts a job) stops a run as Ctrl-C does; SIGINT is
    # set too, because a shell starts background jobs with it ignored.
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        print("error: interrupted; last.pt in the output folder holds the last finished epoch (--resume continues)", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message
        return 2
    except FloatingPointError as e:
        print(f"error: {e}; stopping", file=sys.stderr)
        return 3
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if torch.distributed.is_initialized():
            # The DDP wrappers sit in a reference cycle with the network; left to the interpreter's exit, their
            # gloo threads are destroyed after Python and abort the process (SIGABRT, about one run in 15 here).
            gc.collect()
            torch.distributed.destroy_process_group()


def run(args):
    # --- check the flags and pick the devices; a bad value is one line, before anything is read or written
    def check(flags, ok, must):
        for flag in flags:
            value = getattr(args, flag)
            if value is not None and not all(ok(v) for v in (value if isinstance(value, tuple) else (value,))):
                raise ConfigError(f"--{flag.replace('_', '-')} {value}: must be {must}")
    check(("batch_size", "epochs", "log_every", "img_size", "max_steps", "patch_size", "window_size", "embed_dim", "depths",
           "heads"), lambda v: v >= 1, "at least 1")
    check(("lr", "temperature", "clip_grad"), lambda v: 0 < v < math.inf, "positive and finite")
    check(("weight_decay", "warmup_epochs", "workers", "lambdas", "mus"), lambda v: 0 <= v < math.inf, "non-negative and finite")
    check(("drop_path", "label_smoothing", "val_split"), lambda v: 0 <= v < 1, "in [0, 1)")
    check(("crop_scale",), lambda v: 0 < v <= 1, "in (0, 1]")
    args.warmup_epochs = round(args.epochs / 15) if args.warmup_epochs is None else args.warmup_epochs
    if args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup-epochs {args.warmup_epochs} is more than --epochs {args.epochs}: the peak lr would never be reached")
    if args.resume and (args.measure_memory or args.overwrite):
        raise ConfigError(f"--resume and --{'measure-memory' if args.measure_memory else 'overwrite'} do not go together")
    try:
        devices = [torch.device(d) for d in args.devices.split(",")] if args.devices else None
        device = devices[0] if devices else torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ConfigError(f"--device(s): {e}")
    for d in devices or [device]:
        if d.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"--device(s): {d.type} is not supported here; use cpu, cuda or mps")
        if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"--device(s): {d} is not available here ({torch.cuda.device_count()} CUDA devices)")
    rank, world, device = init_distributed(device)
    if world > 1 and devices:
        raise ConfigError("--devices (a module per device) does not combine with torchrun (data parallel) yet")
    if rank:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints progress
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if amp_dtype is torch.float16 and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA; use --amp bf16 on the CPU")

    # --- the model, the data and the output folder: every check before anything is written
    torch.manual_seed(args.seed)
    num_classes = count_classes(args.dataset, args.data_dir)
    backbone = build_model(args.arch, num_classes, args.img_size, patch_size=args.patch_size, window_size=args.window_size,
                           embed_dim=args.embed_dim, depths=args.depths, heads=args.heads, drop_path=args.drop_path)
    ends = resolve_split("paper" if args.split == "balanced" else args.split, args.k, [len(s) for s in backbone.stages])
    lambdas = lambda_mu_schedule(len(ends), args.lambdas, args.mus)[0]
    if args.pretrained:  # before the data set: a refused --pretrained must not start a download; the classifier stays new
        shape = dict(zip(("embed_dim", "depths", "heads"), ARCHS[args.arch][:3]), patch_size=4, window_size=7, img_size=224)
        if any(getattr(args, key) not in (None, value) for key, value in shape.items()):
            raise ConfigError(f"--pretrained: torchvision's weights are for {args.arch} as published, at 224 px; "
                              "drop --img-size, --patch-size, --window-size, --embed-dim, --depths and --heads")
        load_torchvision_weights(backbone, pretrained_state_dict(args.arch), with_head=False)
    if not args.measure_memory:
        train_set, test_set = make_datasets(args.dataset, args.data_dir, args.img_size, not args.no_download, args.workers)
        train_set, val_set = validation_split(train_set, args.val_split)
        if len(train_set) < args.batch_size * world:
            raise ConfigError(f"--batch-size {args.batch_size} x {world} processes is more than the {len(train_set)} training images")
    name = f"{args.arch}-k{len(ends) + 1}-{args.method}"
    args.out = args.out or os.path.join("runs", f"memory-{name}-b{args.batch_size}" if args.measure_memory else f"{args.dataset}-{name}")
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out, f))]
    if held and not (args.resume or args.overwrite):  # a user's results are never replaced unasked
        raise ConfigError(f"--out {args.out} holds a run ({', '.join(held)}): --resume continues it, --overwrite replaces it")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write there ({e.strerror or e})")
    for f in held if args.overwrite else []:  # asked for explicitly; every check has passed
        os.remove(os.path.join(args.out, f))

    # --- cut it into modules, place them, wrap them
    net_options = dict(method=args.method, decoder=args.decoder, temperature=args.temperature, label_smoothing=args.label_smoothing,
                       checkpoint=args.checkpoint)
    if args.split == "balanced":  # the same K, cut where the largest module is smallest
        ends, shares = balanced_split(backbone.to(device), len(ends) + 1, lambdas, batch_size=args.batch_size,
                                      device=device, **net_options)
        print(f"balanced split at batch {args.batch_size}: modules 1..K-1 end after blocks {','.join(map(str, ends))}; "
              f"each module's memory as a share of E2E's (measured): {' '.join(f'{s:.2f}' for s in shares)}")
    net = LocalSwin(backbone, ends, lambdas=args.lambdas, mus=args.mus, **net_options)
    net.place(devices or [device] * len(net.specs))
    if world > 1:
        distribute(net, device)
    lr = args.lr if args.lr is not None else 5e-4 * args.batch_size * world / 512  # linear scaling from 5e-4 at 512
    describe(net, lr, device)
    if device.type == "cpu" and args.img_size > 64 and not args.measure_memory:
        print(f"on a CPU, {args.img_size}-px training is slow; the README's small setting (Fashion-MNIST at 32 px) learns in minutes")
    if world > 1:
        print(f"data parallel: {world} processes x batch {args.batch_size} = global batch {args.batch_size * world}, "
              f"lr {lr:.2e}; the contrastive loss and BatchNorm see each process's own batch")

    # --- optimizers; then measure, or train
    steps_per_epoch = 10 if args.measure_memory else len(train_set) // (args.batch_size * world)
    optimizers, schedulers = make_optimizers(net, lr=lr, weight_decay=args.weight_decay,
                                             total_steps=args.epochs * steps_per_epoch, warmup_steps=args.warmup_epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    if not args.measure_memory:
        train(args, net, optimizers, schedulers, scaler, (train_set, val_set, test_set), device, amp_dtype)
        return 0
    figures = measure_memory(net, optimizers, batch_size=args.batch_size, num_classes=num_classes, device=device,
                             steps=args.max_steps or 3, clip_grad=args.clip_grad, amp_dtype=amp_dtype, scaler=scaler)
    figures.update(run_info(args, net, device, optimizers))
    if rank == 0:
        write_json(os.path.join(args.out, "results.json"), figures)
    print(f"peak training memory {figures['peak_memory_mib']:.0f} MiB (activations etc. above parameters and "
          f"optimizer state: {figures['activation_memory_mib']:.0f} MiB) | {figures['step_gflop']:.1f} GFLOP, "
          f"{figures['step_time_s']:.3f} s per step ({figures['images_per_second']:.1f} img/s) | {args.out}/results.json")
    return 0


def describe(net, lr, device):
    """What is about to be trained, in a few lines: the split and each module's shapes."""
    millions = [sum(p.numel() for p in part.parameters()) / 1e6 for part in (net.backbone, net.aux)]
    print(f"Swin: {millions[0]:.2f} M parameters, auxiliary blocks {millions[1]:.2f} M | "
          f"K={len(net.specs)} {'end-to-end' if len(net.specs) == 1 else 'method ' + net.method} | lr {lr:.2e} | device {device}")
    bounds = (0, *net.ends, sum(len(stage) for stage in net.backbone.stages))  # module i: blocks bounds[i]+1 .. bounds[i+1]
    for i, spec in enumerate(net.specs):
        loss = "cross-entropy (eq. 3)" if i == len(net.specs) - 1 else (
            "cross-entropy" if net.method == "greedy-ce" else f"lambda {net.lambdas[i]:.2f}, mu {net.mus[i]:.2f} (eq. 2)")
        print(f"  module {i + 1}: blocks {bounds[i] + 1}-{bounds[i + 1]} | {spec.in_res}x{spec.in_res}x{spec.in_dim} -> "
              f"{spec.out_res}x{spec.out_res}x{spec.out_dim} | {loss}")


if __name__ == "__main__":
    sys.exit(main())
