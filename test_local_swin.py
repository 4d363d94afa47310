"""Tests for local_swin.py; CPU only, the whole file in a few minutes on two cores.

pytest -q test_local_swin.py
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision

import local_swin as L
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HERE = os.path.dirname(os.path.abspath(__file__))
# A Swin-T-shaped network (2, 2, 6, 2 blocks) small enough for a CPU test: 64 px, 32 x 32 tokens.
SMALL = dict(
    img_size=64, patch_size=2, window_size=4, embed_dim=16, heads=(1, 2, 4, 8), drop_path=0.0
)
# The command line on a tiny model and the synthetic data set.
TINY_CLI = [
    "--dataset",
    "synthetic",
    "--img-size",
    "32",
    "--patch-size",
    "2",
    "--window-size",
    "4",
    "--embed-dim",
    "16",
    "--depths",
    "2,2,2",
    "--heads",
    "1,2,4",
    "--batch-size",
    "64",
    "--workers",
    "0",
    "--warmup-epochs",
    "1",
    "--lr",
    "2e-3",
    "--log-every",
    "8",
]


def small_net(k, method="ours", decoder="interp", **kwargs):
    torch.manual_seed(0)
    backbone = L.build_model("swin-t", 10, **SMALL)
    return L.LocalSwin(
        backbone,
        L.resolve_split("paper", k, (2, 2, 6, 2)),
        method=method,
        decoder=decoder,
        **kwargs,
    )


def batch(n=16, size=64, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(classes, (n,), generator=gen)


# ---------------------------------------------------------------- 3.1 Swin


@pytest.mark.parametrize("size", [224])
def test_parity_with_torchvision_swin_t(size):
    torch.manual_seed(0)
    theirs = torchvision.models.swin_t().eval()
    ours = L.load_torchvision_weights(
        L.build_model("swin-t", 1000, size), theirs.state_dict()
    ).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        diff = (ours(images) - theirs(images)).abs().max().item()
    assert diff <= 1e-4


def test_parity_with_torchvision_small_config():
    torch.manual_seed(0)
    theirs = torchvision.models.SwinTransformer(
        patch_size=[2, 2],
        embed_dim=32,
        depths=[2, 2, 2],
        num_heads=[2, 4, 8],
        window_size=[4, 4],
        stochastic_depth_prob=0.0,
        num_classes=7,
    ).eval()
    ours = L.build_model(
        "swin-t",
        7,
        32,
        patch_size=2,
        window_size=4,
        embed_dim=32,
        depths=(2, 2, 2),
        heads=(2, 4, 8),
    )
    L.load_torchvision_weights(ours, theirs.state_dict()).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (ours(images) - theirs(images)).abs().max().item() <= 1e-4
    # A different architecture is refused with a clear message, not a silent partial copy.
    with pytest.raises(L.ConfigError, match="tensors"):
        L.load_torchvision_weights(
            L.build_model("swin-t", 7, 32, patch_size=2, window_size=4), theirs.state_dict()
        )


def test_weights_without_the_head_for_another_data_set():
    torch.manual_seed(0)
    theirs = torchvision.models.swin_t()  # 1000 ImageNet classes
    ours = L.build_model("swin-t", 10)
    head_before = ours.head.fc.weight.clone()
    L.load_torchvision_weights(ours, theirs.state_dict(), with_head=False)
    assert torch.equal(ours.head.fc.weight, head_before)
    assert torch.equal(ours.head.norm.weight, theirs.norm.weight)
    assert torch.equal(ours.stages[2][5].mlp[2].weight, theirs.features[5][5].mlp[3].weight)
    assert torch.equal(ours.patch_embed.proj.weight, theirs.features[0][0].weight)


def test_pretrained_offline_fails_with_one_line(tmp_path, capsys, monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(
        torchvision.models._api, "load_state_dict_from_url", offline
    )  # what get_state_dict calls
    code = L.main(["--pretrained", "--measure-memory", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert (
        code != 0 and err.count("\n") == 1 and "could not fetch" in err and "checkpoints" in err
    ), err
    # Refused before the data set is touched (it used to start downloading CIFAR-10 first).
    code = L.main(
        [
            "--pretrained",
            "--arch",
            "swin-l",
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        code != 0 and "ImageNet weights for swin-t" in err and not (tmp_path / "data").exists()
    ), err


@pytest.mark.parametrize("resolution,window,shift", [(8, 4, 2), (12, 4, 2), (14, 7, 3), (6, 3, 1)])
def test_shift_mask_matches_brute_force(resolution, window, shift):
    """Two tokens of a shifted window may attend to each other iff the cyclic shift did not wrap
    one of them around the border, i.e. their offset in the image equals their offset in the window.
    """
    mask = L.shifted_window_mask(resolution, window, shift)
    per_side = resolution // window
    assert mask.shape == (per_side**2, window**2, window**2)
    for w in range(per_side**2):
        wr, wc = divmod(w, per_side)
        for a in range(window**2):
            for b in range(window**2):
                (ar, ac), (br, bc) = divmod(a, window), divmod(b, window)
                rows = [wr * window + r for r in (ar, br)]  # coordinates in the shifted grid
                cols = [wc * window + c for c in (ac, bc)]
                wrapped = [
                    (x + shift) // resolution for x in rows + cols
                ]  # 1 if the shift wrapped it
                allowed = wrapped[0] == wrapped[1] and wrapped[2] == wrapped[3]
                assert mask[w, a, b].item() == (0.0 if allowed else -100.0)


def test_relative_position_index_brute_force():
    window = 5
    index = L.relative_position_index(window)
    seen = {}
    for a in range(window**2):
        for b in range(window**2):
            offset = (a // window - b // window, a % window - b % window)
            assert seen.setdefault(offset, index[a, b].item()) == index[a, b].item()
    assert len(set(seen.values())) == len(seen) == (2 * window - 1) ** 2  # one table row per offset
    assert index.min() == 0 and index.max() == (2 * window - 1) ** 2 - 1


def test_shifted_attention_equals_masked_brute_force():
    """SW-MSA against attention written from scratch on the unshifted grid: each token attends
    to the tokens of its shifted window that are its true neighbours, with the position bias."""
    torch.manual_seed(0)
    res, window, shift, dim, heads = 8, 4, 2, 8, 2
    attn = L.WindowAttention(dim=dim, heads=heads, resolution=res, window=window, shift=shift)
    x = torch.randn(2, res, res, dim)
    q, k, v = attn.qkv(x).reshape(2, res * res, 3, heads, dim // heads).unbind(2)
    rows, cols = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    srow, scol = (rows - shift) % res, (cols - shift) % res  # where each token sits after the shift
    same_window = (srow[:, None] // window == srow[None] // window) & (
        scol[:, None] // window == scol[None] // window
    )
    true_neighbours = (srow[:, None] - srow[None] == rows[:, None] - rows[None]) & (
        scol[:, None] - scol[None] == cols[:, None] - cols[None]
    )
    dr, dc = srow[:, None] - srow[None] + window - 1, scol[:, None] - scol[None] + window - 1
    bias = attn.relative_position_bias_table[
        (dr * (2 * window - 1) + dc).clamp(0, (2 * window - 1) ** 2 - 1)
    ]
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(dim // heads) + bias.permute(2, 0, 1)
    logits = logits.masked_fill(~same_window, float("-inf")).masked_fill(
        same_window & ~true_neighbours, -100.0
    )
    expected = attn.proj(
        torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v).reshape(2, res, res, dim)
    )
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_window_clipped_to_small_stages_and_bad_grid_refused():
    model = L.build_model("swin-t", 10, 64, patch_size=4, window_size=8)  # token grids 16, 8, 4, 2
    attn = [[b.attn for b in stage] for stage in model.stages]
    assert (attn[0][1].window, attn[0][1].shift) == (8, 4)
    assert (attn[1][1].window, attn[1][1].shift) == (8, 0)  # grid == window: nothing to shift
    assert (attn[2][1].window, attn[2][1].shift) == (4, 0)  # grid < window: window clipped
    assert attn[3][0].relative_position_bias_table.shape == (3 * 3, 24)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(L.ConfigError, match="not a multiple"):
        L.build_model("swin-t", 10, 64, patch_size=2, window_size=7)  # a 32 x 32 grid, window 7
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(2, 3, 32, 32))


# ---------------------------------------------------------------- 3.2-3.3 modules and split


def test_paper_split_and_near_equal_split():
    assert L.resolve_split("paper", 4, (2, 2, 6, 2)) == (2, 4, 10)  # one stage per module
    assert L.resolve_split("paper", 2, (2, 2, 6, 2)) == (2,)  # stage 1 | stages 2-4
    assert L.resolve_split("paper", None, (2, 2, 6, 2)) == (2, 4, 10)  # K defaults to 4
    assert L.resolve_split("paper", 1, (2, 2, 6, 2)) == ()
    assert L.resolve_split("paper", 4, (2, 2, 18, 2)) == (6, 12, 18)  # Swin-S: near-equal runs
    assert L.resolve_split("paper", 3, (2, 2, 6, 2)) == (4, 8)
    assert L.resolve_split("3,5,11", None, (2, 2, 6, 2)) == (3, 5, 11)
    net = small_net(4)
    blocks = [sum(isinstance(m, L.SwinBlock) for m in spec.layers) for spec in net.specs]
    merges = [sum(isinstance(m, L.PatchMerging) for m in spec.layers) for spec in net.specs]
    assert blocks == [2, 2, 6, 2] and merges == [
        1,
        1,
        1,
        0,
    ]  # each stage with the merging that ends it
    assert isinstance(net.specs[-1].layers[-1], L.ClassifierHead)


def test_modules_compose_to_the_whole_network():
    net = small_net(4).eval()
    images, _ = batch()
    with torch.no_grad():
        x = net.backbone.patch_embed(images)
        for spec in net.specs:
            x = spec.layers(x)
        assert torch.equal(x, net(images))
    # Every backbone parameter belongs to exactly one module's optimizer, and so does every aux one.
    owned = [id(p) for i in range(4) for p in net.local_modules[i].parameters()]
    assert sorted(owned) == sorted(id(p) for p in net.parameters())


class GradRecorder:
    """Stands in for an optimizer: keeps the gradients it is asked to step with, changes nothing."""

    def __init__(self, params):
        self.param_groups = [{"params": list(params)}]
        self.grads, self.state = None, {}

    def step(self):
        self.grads = [
            None if p.grad is None else p.grad.clone() for p in self.param_groups[0]["params"]
        ]

    def zero_grad(self, set_to_none=True):
        for p in self.param_groups[0]["params"]:
            p.grad = None


@pytest.mark.parametrize("method", ["ours", "infopro", "greedy-ce"])
def test_gradient_isolation(method):
    """Module i's parameters get their gradients from loss i alone, and no other parameter gets
    any from loss i; the input handed to module i > 1 carries no graph."""
    net = small_net(4, method=method)
    images, labels = batch()
    recorders = [GradRecorder(net.local_modules[i].parameters()) for i in range(4)]
    inputs = []
    for spec in net.specs[1:]:
        spec.layers.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    L.train_step(net.local_modules, recorders, images, labels, clip_grad=float("inf"))
    assert len(inputs) == 3 and not any(x.requires_grad or x.grad_fn is not None for x in inputs)

    everything = list(net.parameters())
    x = images
    for i, (spec, recorder) in enumerate(zip(net.specs, recorders)):
        x_in = net.backbone.patch_embed(x) if i == 0 else x
        out = spec.layers(x_in)
        loss = net.local_modules[i].loss(out, x_in, images, labels)
        grads = dict(
            zip(map(id, everything), torch.autograd.grad(loss, everything, allow_unused=True))
        )
        mine = {id(p) for p in recorder.param_groups[0]["params"]}
        assert all(
            g is None or not g.any() for pid, g in grads.items() if pid not in mine
        ), f"loss {i + 1} leaks"
        for p, recorded in zip(recorder.param_groups[0]["params"], recorder.grads):
            assert recorded is not None and torch.allclose(
                recorded, grads[id(p)], rtol=1e-4, atol=1e-6
            )
        x = out.detach()


@pytest.mark.parametrize("k", [1, 4])
def test_checkpointing_gives_the_same_gradients_in_less_memory(k):
    """--checkpoint recomputes each block in the backward pass: with drop-path on, the gradients
    of a step equal those without it (the recomputation replays the same random paths), and
    the step holds measurably less activation memory."""
    grads, activations = {}, {}
    for checkpoint in (False, True):
        torch.manual_seed(0)
        backbone = L.build_model("swin-t", 10, **{**SMALL, "drop_path": 0.5})
        net = L.LocalSwin(
            backbone, L.resolve_split("paper", k, (2, 2, 6, 2)), checkpoint=checkpoint
        )
        recorders = [GradRecorder(net.local_modules[i].parameters()) for i in range(k)]
        torch.manual_seed(1)
        L.train_step(net.local_modules, recorders, *batch(), clip_grad=float("inf"))
        grads[checkpoint] = [g for r in recorders for g in r.grads]
        torch.manual_seed(1)
        activations[checkpoint] = L.measure_memory(
            net,
            recorders,
            batch_size=16,
            num_classes=10,
            device=torch.device("cpu"),
            steps=1,
            clip_grad=float("inf"),
        )["activation_memory_mib"]
    assert len(grads[True]) == len(grads[False]) and all(g is not None for g in grads[True])
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert activations[True] < 0.75 * activations[False], activations


def test_k1_is_exactly_end_to_end():
    net = small_net(1)
    images, labels = batch()
    recorder = GradRecorder(net.local_modules[0].parameters())
    L.train_step(net.local_modules, [recorder], images, labels, clip_grad=float("inf"))
    params = recorder.param_groups[0]["params"]
    assert len(net.aux) == 0 and len(params) == len(list(net.backbone.parameters()))
    loss = F.cross_entropy(net.backbone(images), labels, label_smoothing=0.1)
    for g, recorded in zip(torch.autograd.grad(loss, params), recorder.grads):
        assert torch.allclose(g, recorded, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_balanced_split_holds_no_more_than_the_paper_split(checkpoint):
    """The split is chosen from measured bytes; measured again by a real training step, its
    largest module is no larger than the paper split's, and the estimate matches the step (with
    --checkpoint too). The search itself, one block at a time, peaks far below E2E training."""
    torch.manual_seed(0)
    options = dict(
        method="ours",
        decoder="interp",
        temperature=0.07,
        label_smoothing=0.1,
        checkpoint=checkpoint,
    )
    backbone = L.build_model("swin-t", 10, **{**SMALL, "embed_dim": 32, "heads": (2, 4, 8, 16)})
    search = L.PeakMemory(torch.device("cpu"))
    with search.region():
        ends, shares = L.balanced_split(
            backbone, 4, [3.0, 1.5, 0.0], batch_size=16, device=torch.device("cpu"), **options
        )
    assert len(ends) == 3 and list(ends) == sorted(set(ends)) and len(shares) == 4
    measured = {}
    for name, split in (("e2e", ()), ("paper", (2, 4, 10)), ("balanced", ends)):
        net = L.LocalSwin(
            backbone, split, **{**options, "checkpoint": checkpoint and name != "e2e"}
        )
        optimizers, _ = L.make_optimizers(
            net.local_modules, lr=1e-3, weight_decay=0.05, total_steps=10, warmup_steps=2
        )
        measured[name] = L.measure_memory(
            net, optimizers, batch_size=16, num_classes=10, device=torch.device("cpu"), steps=1
        )["activation_memory_mib"]
    assert measured["balanced"] <= measured["paper"] * 1.01, (ends, measured)
    assert max(shares) == pytest.approx(measured["balanced"] / measured["e2e"], abs=0.05), (
        shares,
        measured,
    )
    assert search.peak_bytes() / 2**20 < 0.5 * measured["e2e"], (
        search.peak_bytes() / 2**20,
        measured,
    )


def test_live_tensor_meter_counts_allocations_not_views():
    meter = L.LiveTensorMeter()
    with meter:
        a = torch.ones(1 << 18)  # 1 MiB
        view = a.view(512, 512)
        a.add_(1)  # in place: nothing new
        assert meter.live == 1 << 20
        b = view * 2
        assert meter.live == 2 << 20
        del a
        assert meter.live == 2 << 20  # the view still holds a's storage
        del view
        assert meter.live == 1 << 20  # now it is freed; b is alive
        del b
    assert meter.live == 0 and meter.peak == 2 << 20


def test_k4_holds_much_less_activation_memory_than_k1():
    figures = {}
    for k in (1, 4):
        net = small_net(k)
        optimizers, _ = L.make_optimizers(
            net.local_modules, lr=1e-3, weight_decay=0.05, total_steps=10, warmup_steps=2
        )
        figures[k] = L.measure_memory(
            net, optimizers, batch_size=16, num_classes=10, device=torch.device("cpu"), steps=1
        )
    ratio = figures[4]["activation_memory_mib"] / figures[1]["activation_memory_mib"]
    assert ratio < 0.7, figures
    assert figures[1]["peak_memory_mib"] > figures[1]["state_memory_mib"] > 0


# ---------------------------------------------------------------- 3.4-3.5 aux block and losses


def nt_xent_from_definition(z, labels, temperature):
    """Supervised NT-Xent, one anchor at a time, straight from the definition."""
    total, anchors = 0.0, 0
    for i in range(len(z)):
        others = [j for j in range(len(z)) if j != i]
        positives = [j for j in others if labels[j] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[j]) / temperature) for j in others)
        total += -sum(
            math.log(math.exp(float(z[i] @ z[p]) / temperature) / denominator) for p in positives
        ) / len(positives)
        anchors += 1
    return total / anchors


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_nt_xent_matches_slow_loop(temperature):
    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(12, 8, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 4, 2, 5])  # classes 4 and 5 have no positive
    fast = L.supervised_nt_xent(z, labels, temperature).item()
    assert fast == pytest.approx(nt_xent_from_definition(z, labels, temperature), rel=1e-9)
    assert (
        L.supervised_nt_xent(z, torch.arange(12), temperature).item() == 0.0
    )  # no positives at all


def feature_shapes(net, images):
    """The (B, C, H, W) shape of x_0 .. x_K, module by module."""
    with torch.no_grad():
        x = net.backbone.patch_embed(images)
        shapes = [x.permute(0, 3, 1, 2).shape]
        for spec in net.specs[:-1]:
            x = spec.layers(x)
            shapes.append(x.permute(0, 3, 1, 2).shape)
    return shapes


@pytest.mark.parametrize("decoder", ["interp", "deconv", "deconv4"])
def test_decoder_reconstructs_the_module_input_for_every_split(decoder):
    images, _ = batch(n=2)
    splits = [L.resolve_split("paper", k, (2, 2, 6, 2)) for k in range(2, 13)] + [
        (3, 5, 11),
        (1, 9),
    ]
    for ends in splits:
        torch.manual_seed(0)
        net = L.LocalSwin(
            L.build_model("swin-t", 10, **SMALL),
            ends,
            decoder=decoder,
            lambdas=[1.0] * len(ends),
            mus=[1.0] * len(ends),
        )
        shapes = feature_shapes(net, images)
        with torch.no_grad():
            x = net.backbone.patch_embed(images)
            for i, (spec, aux) in enumerate(zip(net.specs, net.aux)):
                x = spec.layers(x)
                z, recon = aux.head(x)
                assert recon.shape == shapes[i], (
                    ends,
                    i,
                )  # module 1 reconstructs the patch embedding
                assert z.shape == (2, 128) and torch.allclose(z.norm(dim=1), torch.ones(2))


def test_infopro_decoder_reconstructs_the_image():
    images, labels = batch(n=4)
    net = small_net(4, method="infopro", lambdas=[1.0, 1.0, 1.0])
    with torch.no_grad():
        x = net.backbone.patch_embed(images)
        for spec, aux in zip(net.specs, net.aux):
            x = spec.layers(x)
            assert aux.head(x)[1].shape == images.shape
    assert all(aux.head.decoder is None for aux in small_net(4, method="greedy-contrast").aux)
    assert all(
        isinstance(aux.head, L.ClassifierHead) for aux in small_net(4, method="greedy-ce").aux
    )


def test_lambda_mu_schedule():
    assert L.lambda_mu_schedule(1) == ([3.0], [1.0])  # K = 2
    lambdas, mus = L.lambda_mu_schedule(3)  # K = 4
    assert lambdas == pytest.approx([3.0, 1.5, 0.0]) and mus == pytest.approx([1.0, 2.5, 4.0])
    assert L.lambda_mu_schedule(0) == ([], [])  # K = 1
    assert L.lambda_mu_schedule(2, [0.5, 0.25], None) == ([0.5, 0.25], [1.0, 4.0])
    with pytest.raises(L.ConfigError, match="--mus has 2 values"):
        L.lambda_mu_schedule(3, None, [1.0, 2.0])


def test_eq2_weights_reach_the_loss():
    """L_i = lambda_i * L_xx + mu_i * L_xy: doubling mu doubles the contrastive part, and with
    lambda = 0 there is no decoder and the loss is mu * L_xy alone."""
    images, labels = batch(n=8)
    losses = {}
    for lam, mu in ((1.0, 1.0), (1.0, 2.0), (0.0, 1.0)):
        net = small_net(2, lambdas=[lam], mus=[mu])
        x0 = net.backbone.patch_embed(images)
        out = net.specs[0].layers(x0)
        losses[lam, mu] = net.aux[0](out, x0, images, labels).item()
        if lam == 0:
            assert net.aux[0].head.decoder is None
            z, _ = net.aux[0].head(out)
            assert losses[lam, mu] == pytest.approx(
                L.supervised_nt_xent(z, labels, 0.07).item(), rel=1e-5
            )
    # (1,2) - (1,1) = L_xy = (0,1)
    assert losses[1.0, 2.0] - losses[1.0, 1.0] == pytest.approx(losses[0.0, 1.0], rel=1e-4)


# ---------------------------------------------------------------- the command line, end to end


def run_cli(args, out, capsys):
    code = L.main(TINY_CLI + ["--out", str(out)] + args)
    return code, capsys.readouterr()


@pytest.mark.parametrize(
    "method,k", [("ours", 3), ("infopro", 3), ("greedy-ce", 3), ("greedy-contrast", 3), ("ours", 1)]
)
def test_cli_trains_on_synthetic_for_every_method(method, k, tmp_path, capsys):
    code, cap = run_cli(["--method", method, "--k", str(k), "--epochs", "2"], tmp_path, capsys)
    assert code == 0, cap.err
    results = json.loads((tmp_path / "results.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(len(r["train_loss"]) == k for r in log)
    assert results["epochs"] == 2 and results["k"] == k and results["config"]["method"] == method
    assert results["test_acc"] == log[-1]["test_acc"] > 30  # 10 classes: chance is 10%
    assert results["val_acc"] is None and "val_acc" not in log[0]  # no --val-split: no validation
    assert results["peak_memory_mib"] > 0 and results["images_per_second"] > 0
    assert (tmp_path / "last.pt").exists()
    assert "img/s" in cap.out and "ETA" in cap.out and "test acc" in cap.out


def make_png_folder(root):
    """An ImageFolder of 3 colour classes: 40 training and 8 test PNGs each, one grayscale."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("val", 8)):
        for c, colour in enumerate(("red", "green", "blue")):
            folder = root / split / colour
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(20, 24, 3, generator=gen) * 80).to(torch.uint8)
                pixels[..., c] += 150
                image = Image.fromarray(pixels.numpy())
                (image.convert("L") if i == 0 else image).save(folder / f"{i}.png")


@pytest.mark.parametrize("method", L.METHODS)
def test_cli_imagefolder_of_pngs(method, tmp_path, capsys):
    make_png_folder(tmp_path / "data")
    code, cap = run_cli(
        [
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(tmp_path / "data"),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--k",
            "2",
            "--method",
            method,
        ],
        tmp_path / "out",
        capsys,
    )
    assert code == 0, cap.err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["dataset"] == "imagefolder" and results["config"]["method"] == method
    assert results["test_acc"] is not None


def test_validation_split_is_fixed_disjoint_and_reported(tmp_path, capsys):
    data = L.ImageSet(torch.zeros(100, 1, 4, 4, dtype=torch.uint8), torch.arange(100))
    train, val = L.validation_split(data, 0.1)
    again, val_again = L.validation_split(data, 0.1)
    assert len(val) == 10 and len(train) == 90 and torch.equal(val.labels, val_again.labels)
    assert set(val.labels.tolist()).isdisjoint(train.labels.tolist())
    assert set(val.labels.tolist()) | set(train.labels.tolist()) == set(range(100))
    assert not torch.equal(val.labels, L.validation_split(data, 0.1, seed=1)[1].labels)
    assert L.validation_split(data, 0.0)[1] is None and len(L.validation_split(data, 0.0)[0]) == 100
    code, cap = run_cli(["--k", "2", "--epochs", "2", "--val-split", "0.25"], tmp_path, capsys)
    assert code == 0, cap.err
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(r["steps"] == 768 // 64 for r in log)  # 1024 synthetic images, a quarter held out
    assert (
        results["best_val_acc"] == max(r["val_acc"] for r in log)
        and results["val_acc"] == log[-1]["val_acc"]
    )
    assert (
        results["best_val_epoch"] in (1, 2)
        and "val loss" in cap.out
        and "best_test_acc" not in results
    )


def write_idx(path, array):
    """A file in MNIST's IDX format: magic (0, 0, 0x08 = uint8, ndim), sizes, bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.numpy().tobytes())


@pytest.mark.parametrize("name,folder", [("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_mnist_format_files_are_read_and_trained_on(name, folder, tmp_path, capsys):
    raw = tmp_path / "data" / folder / "raw"
    raw.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 96), ("t10k", 32)):
        labels = torch.arange(n) % 10
        images = (torch.rand(n, 28, 28, generator=gen) * 60).to(torch.uint8)
        images[:, 2:26, 2:26] += (labels * 19).to(torch.uint8)[
            :, None, None
        ]  # a class is a brightness
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    train, test = L.make_datasets(name, str(tmp_path / "data"), 32, download=False)
    assert train.images.shape == (96, 1, 28, 28) and test.images.shape == (32, 1, 28, 28)
    assert torch.equal(train.labels, torch.arange(96) % 10)
    code, cap = run_cli(
        [
            "--dataset",
            name,
            "--data-dir",
            str(tmp_path / "data"),
            "--no-download",
            "--batch-size",
            "16",
            "--epochs",
            "1",
            "--k",
            "2",
            "--val-split",
            "0.25",
        ],
        tmp_path / "out",
        capsys,
    )
    assert code == 0, cap.err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["steps"] == 72 // 16 and results["test_acc"] is not None
    code, cap = run_cli(
        ["--dataset", name, "--data-dir", str(tmp_path / "nowhere"), "--no-download"],
        tmp_path / "out2",
        capsys,
    )
    assert (
        code == 2
        and f"{tmp_path / 'nowhere' / folder / 'raw'}" in cap.err
        and "train-images-idx3-ubyte" in cap.err
    )


def test_batch_augmentation_crops_resizes_and_flips():
    size, n = 24, 256
    ramp = torch.linspace(0, 1, 48)
    images = torch.stack([ramp.expand(48, 48), ramp[:, None].expand(48, 48)])[None].expand(
        n, 2, 48, 48
    )  # x and y
    out = L.random_resized_crop(images, size, 0.35, torch.Generator().manual_seed(0))
    assert out.shape == (n, 2, size, size)
    assert torch.equal(
        out, L.random_resized_crop(images, size, 0.35, torch.Generator().manual_seed(0))
    )
    x, y = out[:, 0], out[:, 1]
    width = (
        (x[:, :, -1] - x[:, :, 0]).mean(1).abs() * 47 / 48 * size / (size - 1)
    )  # the crop's share of the image side
    height = (y[:, -1, :] - y[:, 0, :]).mean(1) * 47 / 48 * size / (size - 1)
    area = width * height
    assert (
        area.min() > 0.35 - 0.03
        and area.max() < 1 + 0.03
        and area.max() > 0.9
        and area.min() < 0.45
    )
    assert (
        (width / height > 3 / 4 - 0.03) & (width / height < 4 / 3 + 0.03)
    ).float().mean() > 0.8  # unless clamped
    flipped = (x[:, :, -1] < x[:, :, 0]).all(1)
    assert 0.35 < flipped.float().mean() < 0.65
    assert (x.amin((1, 2)) > -0.01).all() and (x.amax((1, 2)) < 1.01).all()  # inside the image
    gray = (torch.rand(4, 1, 28, 28) * 255).to(torch.uint8)
    test_input = L.prepare_batch(gray, 28)  # testing: same size, no augmentation
    std, mean = (torch.tensor(v).view(1, 3, 1, 1) for v in (L.IMAGENET_STD, L.IMAGENET_MEAN))
    assert torch.allclose(
        test_input * std + mean, gray.float().div(255).expand(-1, 3, -1, -1), atol=1e-6
    )
    assert L.prepare_batch(gray, 32).shape == (4, 3, 32, 32)
    assert L.prepare_batch(gray, 32, torch.Generator().manual_seed(0)).shape == (4, 3, 32, 32)


def test_summary_prints_curves_and_rows(tmp_path):
    for name, accs in (
        ("e2e-s0", [60.0, 80.0]),
        ("e2e-s1", [62.0, 84.0]),
        ("ours-s0", [50.0, 78.0]),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text(
            "".join(
                json.dumps({"epoch": e + 1, "val_acc": a, "test_acc": a - 1}) + "\n"
                for e, a in enumerate(accs)
            )
        )
        (tmp_path / name / "results.json").write_text(
            json.dumps(
                {
                    "test_acc": accs[-1] - 1,
                    "val_acc": accs[-1],
                    "epochs": 2,
                    "peak_memory_mib": 100.0,
                    "wall_time_s": 120.0,
                    "images_per_second": 500.0,
                }
            )
        )
    done = run_sh("summary", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "| 2 | 80.00 | 84.00 | 78.00 |" in lines
    assert "| e2e | 2 | 2 | 81.00 ± 2.83 | +0.00 | 82.00 ± 2.83 | 100 | 2.0 | 500 |" in lines
    assert "| ours | 1 | 2 | 77.00 ± 0.00 | -4.00 | 78.00 ± 0.00 | 100 | 2.0 | 500 |" in lines


def test_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    assert run_cli(["--k", "2", "--epochs", "2"], tmp_path / "whole", capsys)[0] == 0
    assert (
        run_cli(["--k", "2", "--epochs", "2", "--max-steps", "16"], tmp_path / "cut", capsys)[0]
        == 0
    )  # 16 steps = 1 epoch
    assert len((tmp_path / "cut" / "log.jsonl").read_text().splitlines()) == 1
    code, cap = run_cli(["--k", "2", "--epochs", "2", "--resume"], tmp_path / "cut", capsys)
    assert code == 0 and "resumed" in cap.out
    whole, cut = [
        [json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
        for d in ("whole", "cut")
    ]
    for a, b in zip(whole, cut, strict=True):
        assert (a["train_loss"], a["test_loss"], a["test_acc"]) == (
            b["train_loss"],
            b["test_loss"],
            b["test_acc"],
        )
    # The peak counts the optimizer state alike in a resumed run (loaded) and a run cut in epoch 1.
    assert (
        run_cli(["--k", "2", "--epochs", "2", "--max-steps", "3"], tmp_path / "trial", capsys)[0]
        == 0
    )
    peaks = [
        json.loads((tmp_path / d / "results.json").read_text())["peak_memory_mib"]
        for d in ("whole", "cut", "trial")
    ]
    assert peaks[1] == peaks[0] and peaks[2] == peaks[0], peaks  # to the byte


def test_resume_is_exact_with_decoding_workers(tmp_path, capsys):
    """Worker processes only decode an imagefolder once; the random stream of epoch e is a
    function of (seed, e), so a resumed run equals an uninterrupted one whatever --workers is."""
    make_png_folder(tmp_path / "data")
    args = [
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(tmp_path / "data"),
        "--workers",
        "2",
        "--batch-size",
        "16",
        "--k",
        "2",
        "--epochs",
        "2",
    ]
    assert run_cli(args, tmp_path / "whole", capsys)[0] == 0
    assert (
        run_cli(args + ["--max-steps", "10"], tmp_path / "cut", capsys)[0] == 0
    )  # 7 steps per epoch
    assert run_cli(args + ["--resume"], tmp_path / "cut", capsys)[0] == 0
    whole, cut = [
        [json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
        for d in ("whole", "cut")
    ]
    assert [(r["train_loss"], r["test_loss"]) for r in whole] == [
        (r["train_loss"], r["test_loss"]) for r in cut
    ]


def test_a_run_is_never_replaced_unasked(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--k", "2", "--epochs", "1"], out, capsys)[0] == 0
    before = {f: (out / f).read_bytes() for f in L.RUN_FILES}
    for args in (
        ["--k", "2", "--epochs", "1"],
        ["--k", "2", "--measure-memory"],
        ["--k", "1", "--epochs", "1"],
    ):
        code, cap = run_cli(args, out, capsys)
        assert code == 2 and "holds a run" in cap.err and "--overwrite" in cap.err, cap.err
    code, cap = run_cli(
        ["--k", "2", "--epochs", "1", "--resume"], out, capsys
    )  # finished: nothing to do
    assert code == 0 and "nothing to do" in cap.out
    assert {f: (out / f).read_bytes() for f in L.RUN_FILES} == before
    assert run_cli(["--k", "2", "--epochs", "1", "--resume", "--overwrite"], out, capsys)[0] == 2
    code, cap = run_cli(["--k", "2", "--epochs", "1", "--seed", "1", "--overwrite"], out, capsys)
    assert code == 0 and json.loads((out / "results.json").read_text())["config"]["seed"] == 1


def test_the_first_minutes_say_what_happens(tmp_path, capsys, monkeypatch):
    """Before the first step: where the outputs go; after it: a progress line with an ETA. An epoch
    cut short by --max-steps is evaluated on as many images as it trained on, and says so."""
    code, cap = run_cli(
        ["--k", "2", "--epochs", "2", "--max-steps", "5", "--log-every", "2", "--val-split", "0.5"],
        tmp_path,
        capsys,
    )
    assert code == 0, cap.err
    lines = cap.out.splitlines()
    where = next(i for i, line in enumerate(lines) if f"into {tmp_path}/" in line)
    progress = [i for i, line in enumerate(lines) if line.startswith("epoch 1/2 step ")]
    assert where < progress[0] and all("ETA" in lines[i] for i in progress)
    assert [lines[i].split()[3] for i in progress] == [
        "1/8",
        "2/8",
        "4/8",
        "5/8",
    ]  # step 1, every 2nd, the last
    record = json.loads((tmp_path / "log.jsonl").read_text())
    assert (
        record["val_images"] == 5 * 64
        and "(on 320 of its images)" in cap.out
        and record["test_images"] == 256
    )
    clock = iter(range(0, 10**6, 16))  # 16 s between readings: a line every other batch
    monkeypatch.setattr(L.time, "perf_counter", lambda: next(clock))
    net = L.LocalSwin(
        L.build_model(
            "swin-t",
            10,
            img_size=32,
            patch_size=2,
            window_size=4,
            embed_dim=16,
            depths=(2, 2, 2),
            heads=(1, 2, 4),
        ),
        (2,),
    )
    L.evaluate(net, L.synthetic_images(train=False), torch.device("cpu"), 64, name="test")
    assert capsys.readouterr().out.splitlines() == [
        f"  evaluating test: {n}/256 images" for n in (64, 192)
    ]


def test_default_output_folders_do_not_collide(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert L.main(TINY_CLI + ["--epochs", "1", "--max-steps", "1"]) == 0
    assert L.main(TINY_CLI + ["--measure-memory"]) == 0
    assert sorted(os.listdir("runs")) == ["memory-swin-t-k4-ours-b64", "synthetic-swin-t-k4-ours"]


def test_cli_checkpoint_composes_with_amp(tmp_path, capsys):
    """--checkpoint with bf16 autocast: the run equals the same run without it (the
    recomputation replays drop-path and autocast), and holds less memory."""
    args = [
        "--k",
        "3",
        "--epochs",
        "1",
        "--amp",
        "bf16",
        "--drop-path",
        "0.3",
    ]
    assert run_cli(args, tmp_path / "plain", capsys)[0] == 0
    code, cap = run_cli(args + ["--checkpoint"], tmp_path / "checkpoint", capsys)
    assert code == 0, cap.err
    plain, ckpt = [
        json.loads((tmp_path / d / "log.jsonl").read_text()) for d in ("plain", "checkpoint")
    ]
    assert plain["train_loss"] == pytest.approx(ckpt["train_loss"], rel=1e-3) and plain[
        "test_acc"
    ] == pytest.approx(ckpt["test_acc"], abs=1)
    peaks = [
        json.loads((tmp_path / d / "results.json").read_text())["peak_memory_mib"]
        for d in ("plain", "checkpoint")
    ]
    assert peaks[1] < peaks[0], peaks


@pytest.mark.parametrize("split", ["balanced", "time"])
def test_cli_balanced_split(split, tmp_path, capsys):
    code, cap = run_cli(["--k", "3", "--split", split, "--measure-memory"], tmp_path, capsys)
    assert code == 0, cap.err
    line = next(line for line in cap.out.splitlines() if line.startswith(f"{split} split"))
    ends = [int(b) for b in line.split("end after blocks ")[1].split(";")[0].split(",")]
    assert json.loads((tmp_path / "results.json").read_text())["split"] == ends and len(ends) == 2
    shares = [float(v) for v in line.split("(measured): ")[1].split()]
    assert len(shares) == 3 and all(v > 0 for v in shares)
    if split == "time":  # shares of one step's time
        assert sum(shares) == pytest.approx(1, abs=0.02)


def test_time_split_gives_a_slow_block_a_module_of_its_own(monkeypatch):
    """--split time measures each block: with block 7 of 12 made slow (0.5 s a call, far above
    the rest even on a busy machine), the pipeline is fastest with block 7 alone in module 2."""
    torch.manual_seed(0)
    backbone = L.build_model("swin-t", 10, **SMALL)  # depths 2, 2, 6, 2
    slow, forward = backbone.stages[2][2], backbone.stages[2][2].forward
    monkeypatch.setattr(slow, "forward", lambda x: (time.sleep(0.5), forward(x))[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine, threads that wait for each other swamp the timing
    try:
        ends, shares = L.balanced_split(
            backbone, 3, [3.0, 1.5], batch_size=2, device=torch.device("cpu"), by="time"
        )
    finally:
        torch.set_num_threads(threads)
    assert ends == (6, 7) and max(shares) == shares[1], (ends, shares)
    assert sum(shares) == pytest.approx(1)


DDP_WORKER = """
import sys, torch, local_swin as L
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
torch.manual_seed(rank)  # different initial weights: DDP must start every process from rank 0's
backbone = L.build_model("swin-t", 10, img_size=64, patch_size=2, window_size=4, embed_dim=16,
                         heads=(1, 2, 4, 8))
net = L.LocalSwin(backbone, (2, 4, 10))
modules = L.distribute(net.local_modules, torch.device("cpu"))
optimizers, _ = L.make_optimizers(modules, lr=1e-3, weight_decay=0.05, total_steps=10,
                                  warmup_steps=1)
data = torch.Generator().manual_seed(100 + rank)  # and different data
for _ in range(3):
    images = torch.randn(8, 3, 64, 64, generator=data)
    labels = torch.randint(4, (8,), generator=data)
    L.train_step(modules, optimizers, images, labels)
torch.save({name: p.detach() for name, p in net.named_parameters()}, f"{sys.argv[1]}/rank{rank}.pt")
torch.distributed.destroy_process_group()
"""


def run_sh(*args, timeout=300):
    """bash run.sh ARGS, its Python this one (run.sh runs $PYTHON, else the first python on PATH,
    which need not be the environment pytest runs in)."""
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", os.path.join(HERE, "run.sh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def torchrun(args, nproc=2, timeout=300, **kwargs):
    env = {**os.environ, "PYTHONPATH": HERE, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def test_data_parallel_keeps_every_process_identical(tmp_path):
    """Two gloo processes, each module its own DDP wrapper: after 3 steps on different data from
    different initial weights, both processes hold the same parameters, and they have moved."""
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    done = torchrun([str(tmp_path / "worker.py"), str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    torch.manual_seed(0)
    initial = dict(
        L.LocalSwin(
            L.build_model(
                "swin-t",
                10,
                img_size=64,
                patch_size=2,
                window_size=4,
                embed_dim=16,
                heads=(1, 2, 4, 8),
            ),
            (2, 4, 10),
        ).named_parameters()
    )
    assert not torch.equal(
        rank0["backbone.stages.0.0.attn.qkv.weight"], initial["backbone.stages.0.0.attn.qkv.weight"]
    )


def test_cli_under_torchrun(tmp_path):
    """The command line on synthetic with 2 gloo processes (and --checkpoint): at the end, every
    process holds rank 0's parameters exactly (checked by broadcasting them); rank 0 alone speaks.
    """
    cli = [os.path.join(HERE, "local_swin.py"), *TINY_CLI, "--batch-size", "32", "--epochs", "1"]
    done = torchrun(cli + ["--max-steps", "4", "--checkpoint", "--out", str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ranks_identical"] is True
    assert results["world_size"] == 2 and results["steps"] == 4 and results["global_batch"] == 64
    assert results["lr"] == pytest.approx(2e-3)
    assert (
        done.stdout.count("global batch 64") == 1 and done.stdout.count("done:") == 1
    )  # rank 0 alone prints
    # rank 0 alone removes the old run
    again = torchrun(cli + ["--max-steps", "2", "--overwrite", "--out", str(tmp_path)])
    assert (
        again.returncode == 0 and json.loads((tmp_path / "results.json").read_text())["steps"] == 2
    ), again.stderr[-3000:]


def module_parallel(args, out, nproc, **kwargs):
    cli = [os.path.join(HERE, "local_swin.py"), *TINY_CLI, "--module-parallel", "--out", str(out)]
    return torchrun(cli + args, nproc=nproc, **kwargs)


def epochs(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "method,k,split",
    [
        ("ours", 2, "paper"),
        ("ours", 4, "paper"),
        ("infopro", 2, "paper"),
        ("infopro", 4, "balanced"),
    ],
)
def test_module_parallel_equals_one_process(method, k, split, tmp_path, capsys):
    """K gloo processes, process i training module i on the x_{i-1} it receives, make the run
    one process makes at the same thread count (drop-path on: each module draws from its own
    seed; a split searched by process 0 alone); for K = 2 also when cut and resumed."""
    args = ["--method", method, "--k", str(k), "--epochs", "2", "--drop-path", "0.2"]
    args += ["--split", split]
    args += ["--val-split", "0.2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process of torchrun's
    try:
        assert run_cli(args, tmp_path / "one", capsys)[0] == 0
    finally:
        torch.set_num_threads(threads)
    done = module_parallel(args, tmp_path / "parallel", k)
    assert done.returncode == 0, done.stderr[-3000:]
    one, parallel = epochs(tmp_path / "one"), epochs(tmp_path / "parallel")
    assert len(one) == len(parallel) == 2
    for a, b in zip(one, parallel):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert (a["val_acc"], a["test_acc"]) == (b["val_acc"], b["test_acc"])
    results = json.loads((tmp_path / "parallel" / "results.json").read_text())
    assert results["world_size"] == k and len(results["peak_memory_per_process_mib"]) == k
    assert results["peak_memory_mib"] == max(results["peak_memory_per_process_mib"])
    assert done.stdout.count("done:") == 1 and f"module parallel: {k} processes" in done.stdout
    progress = [line for line in done.stdout.splitlines() if " step " in line][-1]
    assert len(progress.split("| loss ")[1].split(" |")[0].split()) == k  # every module's loss
    if k == 2:  # 12 steps an epoch: stop after the first, then resume
        cut = tmp_path / "cut"
        assert module_parallel(args + ["--max-steps", "12"], cut, k).returncode == 0
        again = module_parallel(args + ["--resume"], cut, k)
        assert again.returncode == 0, again.stderr[-3000:]
        assert [r["train_loss"] for r in epochs(cut)] == [r["train_loss"] for r in parallel]


DYING_WORKER = """
import os, signal, sys
import local_swin as L
real, calls = L.local_step, [0]
def dying(*args, **kwargs):  # the process of rank argv[1] is killed at its 5th step
    calls[0] += 1
    if os.environ["RANK"] == sys.argv[1] and calls[0] == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
L.local_step = dying
sys.exit(L.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("dies", [0, 1])
def test_module_parallel_a_dead_process_ends_the_others(dies, tmp_path):
    """A process killed mid-epoch (the sender, or the receiver): the other ends with one line
    and no traceback of ours, instead of waiting for x_i forever."""
    (tmp_path / "worker.py").write_text(DYING_WORKER)
    args = [*TINY_CLI, "--k", "2", "--epochs", "3", "--module-parallel", "--out", str(tmp_path)]
    done = torchrun([str(tmp_path / "worker.py"), str(dies), *args], timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "[rank" not in done.stderr, done.stderr[-3000:]


NAN_WORKER = """
import os, sys
import local_swin as L
real, calls = L.local_step, [0]
def poisoned(*args, **kwargs):  # process 2 (module 2): its loss becomes NaN at its 3rd step
    x, loss = real(*args, **kwargs)
    calls[0] += 1
    return x, loss * float("nan") if os.environ["RANK"] == "1" and calls[0] == 3 else loss
L.local_step = poisoned
sys.exit(L.main(sys.argv[1:]))
"""


def test_module_parallel_a_nan_loss_stops_every_process(tmp_path):
    """Module 2's loss turns NaN in process 2: every process stops at the next progress line,
    naming the step and the module, with exit code 3."""
    (tmp_path / "worker.py").write_text(NAN_WORKER)
    args = [*TINY_CLI, "--k", "2", "--epochs", "1", "--module-parallel", "--out", str(tmp_path)]
    done = torchrun([str(tmp_path / "worker.py"), *args])
    # each process's line (two processes may write them into one line of torchrun's stderr)
    assert done.stderr.count("error: ") == 2 and "[rank" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("error: loss of module 2 became nan at step 3 (epoch 1)") == 2


def test_module_parallel_needs_a_process_per_module(tmp_path):
    done = module_parallel(["--k", "3", "--epochs", "1"], tmp_path, 2)
    assert done.returncode != 0 and done.stderr.count("error: ") == 2, done.stderr[-3000:]
    assert done.stderr.count("K = 3 needs torchrun --nproc_per_node 3") == 2  # one per process
    assert not os.listdir(tmp_path)


def test_resume_refuses_other_module_ends(tmp_path, capsys):
    assert (
        run_cli(["--split", "2,4", "--epochs", "2", "--max-steps", "16"], tmp_path, capsys)[0] == 0
    )
    code, cap = run_cli(["--split", "1,4", "--epochs", "2", "--resume"], tmp_path, capsys)
    assert code != 0 and "resume with --split 2,4" in cap.err and cap.err.count("\n") == 1


def test_measure_memory_writes_results(tmp_path, capsys):
    code, cap = run_cli(["--measure-memory", "--k", "3"], tmp_path, capsys)
    assert code == 0, cap.err
    figures = json.loads((tmp_path / "results.json").read_text())
    assert figures["peak_memory_mib"] > figures["state_memory_mib"] > 0
    assert figures["activation_memory_mib"] > 0 and figures["step_time_s"] > 0 and figures["k"] == 3
    assert figures["step_gflop"] > 0
    assert "peak training memory" in cap.out


def test_nan_loss_stops_the_run_naming_step_and_module(tmp_path, capsys, monkeypatch):
    real = L.LocalModule.forward
    calls = []

    def sometimes_nan(self, *args):
        calls.append(self)
        out, loss = real(self, *args)
        return out, loss * float("nan") if len(calls) == 3 * 2 + 2 else loss  # step 3, module 2

    monkeypatch.setattr(L.LocalModule, "forward", sometimes_nan)
    code, cap = run_cli(["--k", "3", "--epochs", "1"], tmp_path, capsys)
    assert code != 0 and "module 2" in cap.err and "step 3" in cap.err
    assert not (tmp_path / "results.json").exists()


def make_corrupt_checkpoint(out):
    out.mkdir()
    (out / "last.pt").write_bytes(b"not a checkpoint")


BAD_INPUTS = [
    (["--dataset", "emnist"], "unknown --dataset"),
    (["--val-split", "1.0"], "--val-split"),
    (["--crop-scale", "0"], "--crop-scale"),
    (["--arch", "swin-x"], "unknown --arch"),
    (
        ["--dataset", "cifar10", "--data-dir", "{tmp}/nowhere", "--no-download"],
        "not found in {tmp}/nowhere",
    ),
    (["--k", "0"], "between 1 and"),
    (["--k", "7"], "between 1 and"),
    (["--split", "4,2"], "increase strictly"),
    (["--split", "0,3"], "increase strictly"),
    (["--split", "2,6"], "increase strictly"),
    (["--split", "2,x"], "not 'paper', 'balanced'"),
    (["--img-size", "36"], "not a multiple"),
    (["--img-size", "33"], "not a multiple of --patch-size"),
    (["--k", "3", "--lambdas", "1,2,3"], "--lambdas has 3 values"),
    (["--out", "{tmp}/a_file/out"], "cannot write"),
    (["--resume"], "no checkpoint"),
    (["--resume", "--out", "{tmp}/corrupt"], "not a readable checkpoint"),
    (["--method", "magic"], "unknown --method"),
    (["--decoder", "magic"], "unknown --decoder"),
    (["--decoder", "magic", "--k", "1"], "unknown --decoder"),
    (["--temperature", "0"], "--temperature"),
    (["--amp", "fp16", "--device", "cpu"], "needs CUDA"),
    (
        ["--pretrained", "--embed-dim", "16"],
        "--pretrained: torchvision's weights are for swin-t as published",
    ),
    # Every flag with a range: the list is the documentation of what is refused.
    (["--lr", "0"], "--lr 0.0: must be positive"),
    (["--lr", "nan"], "--lr nan: must be positive and finite"),
    (["--lr", "inf"], "--lr inf: must be positive and finite"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: must be non-negative"),
    (["--label-smoothing", "1"], "--label-smoothing 1.0: must be in [0, 1)"),
    (["--drop-path", "-0.5"], "--drop-path -0.5: must be in [0, 1)"),
    (["--warmup-epochs", "3"], "the peak lr would never be reached"),
    (["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    (["--workers", "-1"], "--workers -1: must be non-negative"),
    (["--depths", "2,0,2"], "--depths (2, 0, 2): must be at least 1"),
    (["--heads", "1,-2,4"], "--heads (1, -2, 4): must be at least 1"),
    (["--patch-size", "0"], "--patch-size 0: must be at least 1"),
    (["--window-size", "-4"], "--window-size -4: must be at least 1"),
    (["--embed-dim", "0"], "--embed-dim 0: must be at least 1"),
    (["--k", "3", "--lambdas", "1,-1"], "--lambdas (1.0, -1.0): must be non-negative"),
    (["--temperature", "inf"], "--temperature inf: must be positive and finite"),
    (["--depths", "2,x"], "invalid int_list value: '2,x'"),
    (["--k", "two"], "invalid int value: 'two'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--device", "meta"], "meta is not supported here"),
    (["--device", "tpu"], "Expected one of cpu, cuda"),
    (["--k", "3", "--module-parallel"], "needs torchrun --nproc_per_node 3"),
    (["--k", "2", "--module-parallel", "--measure-memory"], "drop --module-parallel"),
    (["--split", "fastest"], "is not 'paper', 'balanced', 'time' or"),
    (["--device", "cuda:7"], "is not available here"),
    (["--device", "mps"], "mps is not available here"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_gets_one_clear_line(args, message, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    make_corrupt_checkpoint(tmp_path / "corrupt")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = tmp_path / "out"
    code = L.main(TINY_CLI + ["--out", str(out), "--epochs", "1"] + args)
    err = capsys.readouterr().err
    assert code != 0
    assert (
        err.startswith("error: ")
        and err.count("\n") == 1
        and message.replace("{tmp}", str(tmp_path)) in err
    ), err
    assert not (out / "results.json").exists() and not (out / "log.jsonl").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_folders_get_one_line(workers, tmp_path, capsys):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "0.png")
    (tmp_path / "val" / "b" / "1.png").write_bytes(b"not a png")
    args = [
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(tmp_path),
        "--workers",
        str(workers),
        "--epochs",
        "1",
    ]
    code, cap = run_cli(args, tmp_path / "out", capsys)
    assert code == 2 and cap.err.count("\n") == 1 and "cannot read the image" in cap.err, cap.err
    assert str(tmp_path / "val" / "b" / "1.png") in cap.err
    (tmp_path / "val" / "b" / "1.png").unlink()
    (tmp_path / "train" / "c").mkdir()  # a class folder with no image in it
    code, cap = run_cli(args, tmp_path / "out", capsys)
    assert (
        code == 2
        and cap.err.count("\n") == 1
        and "Found no valid file for the classes c" in cap.err
    ), cap.err
    assert not (tmp_path / "out").exists()


def long_run(out, wait_for):
    """A 30-epoch run of the command line in its own process, once it has printed wait_for."""
    script = os.path.join(HERE, "local_swin.py")
    args = [sys.executable, script, *TINY_CLI, "--k", "2", "--epochs", "30", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(wait_for):
            break
    return args, proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_ends_cleanly_and_resumes(sig, tmp_path):
    """Ctrl-C or a scheduler's SIGTERM mid-run: one line, exit 130, last.pt intact, resumable."""
    args, proc = long_run(tmp_path, "epoch 2/30 step")  # the first epoch is checkpointed
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert (
        proc.returncode == 130
        and "Traceback" not in err
        and err.count("\n") == 1
        and "interrupted" in err
    ), err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] >= 1
    resumed = subprocess.run(
        args[:-4] + ["--k", "2", "--epochs", "2", "--out", str(tmp_path), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "--epochs 30 (now 2)" in resumed.stderr  # the checkpoint knows its settings ...
    resumed = subprocess.run(
        args + ["--resume", "--max-steps", "20"], capture_output=True, text=True, timeout=300
    )
    assert (
        resumed.returncode == 0 and "resumed from" in resumed.stdout
    ), resumed.stderr  # ... and continues


def test_script_runs_and_fails_cleanly_as_a_process(tmp_path):
    script = os.path.join(HERE, "local_swin.py")
    ok = subprocess.run(
        [
            sys.executable,
            script,
            *TINY_CLI,
            "--out",
            str(tmp_path),
            "--epochs",
            "1",
            "--max-steps",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 3
    bad = subprocess.run(
        [sys.executable, script, "--arch", "swin-x"], capture_output=True, text=True, timeout=300
    )
    assert (
        bad.returncode != 0
        and "Traceback" not in bad.stderr
        and bad.stderr.startswith("error: unknown --arch")
    )


# ---------------------------------------------------- faults: nothing lost, nothing stuck


def run_bytes(out):
    return {f: (out / f).read_bytes() for f in L.RUN_FILES if (out / f).exists()}


def test_a_failed_check_never_touches_the_output_folder(tmp_path, capsys):
    """--overwrite removes the old run only once every check has passed (model, split, process
    count, decoder included); without it, a failed check leaves no new folder behind."""
    out = tmp_path / "run"
    assert run_cli(["--k", "2", "--epochs", "1"], out, capsys)[0] == 0
    before = run_bytes(out)
    odd = [
        "--img-size",
        "36",
        "--patch-size",
        "3",
        "--window-size",
        "3",
        "--k",
        "3",
        "--method",
        "infopro",
        "--decoder",
        "deconv",
    ]  # upscale 6: not a power of 2
    for args in (
        ["--method", "magic"],
        ["--decoder", "magic"],
        odd,
        ["--k", "3", "--module-parallel"],
    ):
        for where in (out, tmp_path / "new"):
            code, cap = run_cli(args + ["--epochs", "1", "--overwrite"], where, capsys)
            assert code == 2 and cap.err.count("\n") == 1, cap.err
        assert run_bytes(out) == before and not (tmp_path / "new").exists()
    assert "cannot reach a factor of 6" in run_cli(odd, tmp_path / "new", capsys)[1].err


def test_every_epoch_done_but_no_results_resume_writes_them(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["--k", "2", "--epochs", "2"], out, capsys)[0] == 0
    results = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()  # a kill, or a full disk, between last.pt and results.json
    code, cap = run_cli(["--k", "2", "--epochs", "2"], out, capsys)
    assert code == 2 and "holds a run (last.pt)" in cap.err
    code, cap = run_cli(["--k", "2", "--epochs", "2", "--resume"], out, capsys)
    assert code == 0 and "writing the missing results.json" in cap.out, cap.err
    again = json.loads((out / "results.json").read_text())
    for key in (
        "test_acc",
        "epochs",
        "steps",
        "peak_memory_mib",
        "images_per_second",
        "wall_time_s",
    ):
        assert again[key] == results[key], key
    code, cap = run_cli(["--k", "2", "--epochs", "2", "--resume"], out, capsys)
    assert code == 0 and "nothing to do" in cap.out


def test_resume_refuses_another_world_data_or_max_steps(tmp_path, capsys):
    make_png_folder(tmp_path / "data")
    data = str(tmp_path / "data")
    args = ["--dataset", "imagefolder", "--data-dir", data, "--batch-size", "16", "--k", "2"]
    args += ["--epochs", "3", "--max-steps", "7"]  # 7 steps: one epoch of 120 images
    assert run_cli(args, tmp_path / "out", capsys)[0] == 0
    code, cap = run_cli(args[:-2] + ["--resume", "--max-steps", "7"], tmp_path / "out", capsys)
    assert code == 2 and "has done 7 steps already" in cap.err, cap.err
    from PIL import Image

    Image.new("RGB", (20, 24), "red").save(tmp_path / "data" / "train" / "red" / "extra.png")
    code, cap = run_cli(args[:-2] + ["--resume"], tmp_path / "out", capsys)
    assert code == 2 and "on 120 images, this run has 1 on 121" in cap.err, cap.err
    (tmp_path / "data" / "train" / "red" / "extra.png").unlink()
    ckpt = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    torch.save({**ckpt, "replicas": 2}, tmp_path / "out" / "last.pt")
    code, cap = run_cli(args[:-2] + ["--resume"], tmp_path / "out", capsys)
    assert code == 2 and "trained by 2 data-parallel processes" in cap.err, cap.err
    for broken in ({k: v for k, v in ckpt.items() if k != "optimizers"}, {**ckpt, "history": 3}):
        torch.save(broken, tmp_path / "out" / "last.pt")
        code, cap = run_cli(args[:-2] + ["--resume"], tmp_path / "out", capsys)
        assert code == 2 and cap.err.count("\n") == 1 and "last.pt" in cap.err, cap.err


def test_a_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = L.lock_folder(str(out))  # as a run in progress holds it
    code, cap = run_cli(["--k", "2", "--epochs", "1"], out, capsys)
    assert (
        code == 2 and "in use by a run in progress (pid" in cap.err and not run_bytes(out)
    ), cap.err
    held.close()  # the run ended (a crash releases it too)
    assert run_cli(["--k", "2", "--epochs", "1"], out, capsys)[0] == 0


def test_a_run_stopped_in_its_first_epoch_starts_again(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = L.train_step

    def interrupt_at_step_2(*args, **kwargs):
        if interrupt_at_step_2.calls == 1:
            raise KeyboardInterrupt
        interrupt_at_step_2.calls += 1
        return real(*args, **kwargs)

    interrupt_at_step_2.calls = 0
    monkeypatch.setattr(L, "train_step", interrupt_at_step_2)
    code, cap = run_cli(["--k", "2", "--epochs", "1"], out, capsys)
    assert code == 130 and "interrupted" in cap.err and "last.pt" not in cap.err, cap.err
    monkeypatch.setattr(L, "train_step", real)
    assert run_cli(["--k", "2", "--epochs", "1"], out, capsys)[0] == 0  # nothing there to keep


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = torch.save

    def full_after_first(obj, path, *args, **kwargs):
        if obj.get("epoch", 0) >= 2:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\n"
                "file write failed"
            )
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(L.torch, "save", full_after_first)
    code, cap = run_cli(["--k", "2", "--epochs", "3"], out, capsys)
    assert (
        code == 1
        and cap.err.count("\n") == 1
        and "could not write" in cap.err
        and str(out) in cap.err
    ), cap.err
    assert sorted(os.listdir(out)) == [".lock", "last.pt", "log.jsonl"]  # no .tmp left
    assert len((out / "log.jsonl").read_text().splitlines()) == 1  # never ahead of last.pt
    monkeypatch.setattr(L.torch, "save", real)
    assert run_cli(["--k", "2", "--epochs", "3", "--resume"], out, capsys)[0] == 0
    whole = tmp_path / "whole"
    assert run_cli(["--k", "2", "--epochs", "3"], whole, capsys)[0] == 0
    assert (out / "log.jsonl").read_text().count("train_loss") == 3
    a, b = [
        [json.loads(line)["test_acc"] for line in (d / "log.jsonl").read_text().splitlines()]
        for d in (out, whole)
    ]
    assert a == b


def test_imagefolder_loops_16_bit_and_skipped_files(tmp_path, capsys):
    from PIL import Image

    make_png_folder(tmp_path / "data")
    red = tmp_path / "data" / "train" / "red"
    os.symlink(red, red / "loop")  # a folder that contains itself
    (red / "notes.txt").write_text("not an image")
    (red / "anim.gif").write_bytes(b"GIF89a")
    Image.fromarray(torch.full((20, 24), 40000, dtype=torch.int32).numpy().astype("uint16")).save(
        red / "deep.png"
    )
    files = L.image_files(str(tmp_path / "data" / "train"), 32)
    assert len(files) == 3 * 40 + 1 and files.classes == ["blue", "green", "red"]
    assert "skipped 1 files" not in capsys.readouterr().out
    image = L.read_image(str(red / "deep.png"))
    assert image.getextrema() == ((155, 155),) * 3  # 40000 / 257, not clipped to white
    train, _ = L.make_datasets("imagefolder", str(tmp_path / "data"), 32)
    assert (
        len(train) == 121
        and "skipped 2 files that are not images of a known extension (1 .gif, 1 .txt)"
        in capsys.readouterr().out
    )


def test_a_huge_image_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    from PIL import Image

    make_png_folder(tmp_path / "data")
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 100
    )  # each image has 480 pixels: over twice that
    code, cap = run_cli(
        ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--workers", "0"],
        tmp_path / "out",
        capsys,
    )
    assert (
        code == 2
        and cap.err.count("\n") == 1
        and "cannot read the image" in cap.err
        and "decompression bomb" in cap.err
    )


def test_a_trial_evaluates_a_random_subset(tmp_path, capsys, monkeypatch):
    """An imagefolder is sorted by class: a --max-steps trial must not judge its first images."""
    make_png_folder(tmp_path / "data")
    seen = []
    real = L.evaluate
    monkeypatch.setattr(
        L,
        "evaluate",
        lambda net, data, *a, **k: seen.append(data.labels) or real(net, data, *a, **k),
    )
    code, cap = run_cli(
        [
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(tmp_path / "data"),
            "--batch-size",
            "12",
            "--max-steps",
            "1",
            "--k",
            "2",
        ],
        tmp_path / "out",
        capsys,
    )
    assert code == 0 and len(seen) == 1 and len(seen[0]) == 12 and len(set(seen[0].tolist())) == 3


def test_flops_are_counted_without_the_memory_of_a_step():
    """The FLOP count runs on a meta copy: the same count as on the real network, --checkpoint
    included, and it allocates no more than a copy of the parameters (never the activations)."""
    from torch.utils.flop_counter import FlopCounterMode

    for checkpoint in (False, True):
        net = small_net(4, checkpoint=checkpoint)
        optimizers, _ = L.make_optimizers(
            net.local_modules, lr=1e-3, weight_decay=0.05, total_steps=10, warmup_steps=2
        )
        images, labels = batch()
        with FlopCounterMode(display=False) as counter:
            L.train_step(net.local_modules, optimizers, images, labels)
        meter = L.LiveTensorMeter()
        with meter:
            flops = L.count_flops(net, images, labels)
        assert flops == counter.get_total_flops() > 0
        assert meter.peak <= 1.01 * L.tensor_bytes([*net.parameters(), *net.buffers()]), meter.peak


def test_repeated_signals_end_with_one_line(tmp_path):
    args, proc = long_run(tmp_path, "epoch 1/30 step")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.count("\n") == 1 and "Traceback" not in err, err


def test_run_sh_gpu_without_cuda_is_one_line():
    done = run_sh("gpu", timeout=120)
    assert done.returncode == 2 and done.stdout.count("\n") + done.stderr.count("\n") == 1, (
        done.stdout,
        done.stderr,
    )
    assert "no CUDA" in done.stdout + done.stderr


# ---------------------------------------------------- where reconstruction matters: K = 8, pictures


def test_k8_puts_one_block_in_each_module_with_the_default_schedule():
    ends = L.resolve_split("paper", 8, (2, 2, 2, 2))
    assert ends == (1, 2, 3, 4, 5, 6, 7)
    lambdas, mus = L.lambda_mu_schedule(7)
    assert lambdas == pytest.approx([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0]) and mus == pytest.approx(
        [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    )
    torch.manual_seed(0)
    net = L.LocalSwin(
        L.build_model(
            "swin-t",
            10,
            32,
            patch_size=4,
            window_size=4,
            embed_dim=16,
            depths=(2, 2, 2, 2),
            heads=(1, 2, 4, 8),
        ),
        ends,
    )
    assert [sum(isinstance(m, L.SwinBlock) for m in spec.layers) for spec in net.specs] == [1] * 8
    decoders = [aux.head.decoder is not None for aux in net.aux]
    assert decoders == [True] * 6 + [False]  # module 7 has lambda 0: no decoder


@pytest.mark.parametrize("method,panels", [("ours", 2), ("infopro", 2)])
def test_reconstruction_pictures_of_a_tiny_run(method, panels, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "run"
    assert (
        run_cli(["--k", "3", "--lambdas", "3,1", "--epochs", "1", "--method", method], out, capsys)[
            0
        ]
        == 0
    )
    before = sorted(os.listdir(HERE))
    done = run_sh("reconstructions", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(os.listdir(HERE)) == before and (out / "reconstructions.png").exists()
    width, height = Image.open(out / "reconstructions.png").size
    rows = 1 + 2 * panels  # the images, then target and reconstruction per module with a decoder
    scale = 96 // 32  # 32-px images are drawn three times as large
    assert (width, height) == (scale * (2 + 8 * (32 + 2)), scale * (2 + rows * (32 + 2)))


# ---------------------------------------------------- ready for a GPU: nothing lands on the CPU


class OutputDevices(TorchDispatchMode):
    """Records the device of every tensor an operator returns, except empty ones: they move no
    data (torch 2.8's checkpoint makes an empty CPU placeholder)."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                self.devices.add(t.device.type)
        return out


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("method", L.METHODS)
def test_on_another_device_no_tensor_is_made_on_the_cpu(method, checkpoint):
    """With every module on the meta device (what a GPU run would hit, without a GPU), a training
    step and the evaluation forward pass create no tensor on the CPU: no hidden host copy."""
    net = small_net(4, method=method, checkpoint=checkpoint, lambdas=[1.0, 1.0, 1.0])
    net.to("meta")
    recorders = [GradRecorder(m.parameters()) for m in net.local_modules]
    images, labels = (t.to("meta") for t in batch())
    mode = OutputDevices()
    with mode:
        losses = L.train_step(net.local_modules, recorders, images, labels, clip_grad=5.0)
        net.eval()
        with torch.no_grad():
            logits = net(images)
    assert mode.devices == {"meta"}, mode.devices
    assert len(losses) == 4 and logits.shape == (16, 10) and logits.device.type == "meta"
