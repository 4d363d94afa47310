#!/usr/bin/env bash
# The paper's experiments, one command per table row, grouped: `bash run.sh GROUP`.
#
#   smoke     a tiny model on the synthetic data set; about a minute on a CPU
#   cpu-table the method against E2E and the baselines on Fashion-MNIST, on a CPU (ROWS, SEEDS, EPOCHS pick a part)
#   cpu-speed training images/s of that setting, this code against the previous data path; Swin-T vs torchvision
#   cpu-scaling training images/s of that setting: E2E, K=2 in one process, K=2 and K=4 with a process per module
#   summary   DIR...: per-epoch accuracy of several runs side by side, then mean and spread per row
#   probe     RUN...: linear-probe accuracy of each stage's output on the validation split
#   reconstructions RUN...: each auxiliary decoder's reconstruction of 8 images beside its target, a PNG in RUN
#   memory    peak training memory and step time, Swin-T 224 px (the paper's memory claim), as a table
#   table3    Swin-T, K=4, from scratch: InfoPro-Transformer, ours, E2E on STL-10, CIFAR-10, CIFAR-100
#   decoders  the three decoder structures (interp, deconv, deconv4), Swin-T, K=4
#   ablation  the loss ablation on CIFAR-100, K=2: ours, greedy-ce, greedy-contrast, E2E
#   svhn      SVHN, K=4 ours and E2E (needs scipy to read SVHN's .mat files)
#   large     Swin-B and Swin-L at 384 px (window 12; Swin-L with a batch of 80): memory, then CIFAR-10 training
#   gpu       one GPU, under 8 minutes: memory in fp32 and bf16, step time at batch 128, SDPA's kernel, determinism
#   scaling   needs 4 GPUs: images/s and memory per GPU of E2E and K=4 on one GPU against K=4 with a GPU per module
#   same-numbers LABEL: short runs of every method and path; prints their numbers (no times) for a diff, before
#             and after a refactor: `diff runs/same-numbers/A/numbers.txt runs/same-numbers/B/numbers.txt`
#
# Extra flags after the group go to every command, e.g. `bash run.sh table3 --epochs 100 --amp bf16`.
# MEMORY_BATCH (default 32) sets the batch of the memory group.
set -euo pipefail
cd "$(dirname "$0")"
group=${1:-}
shift || true
extra=("$@")
py=${PYTHON:-python}

row() {  # row NAME ARGS...: one run, output in runs/GROUP/NAME. A finished run is kept and skipped (delete its
  # folder to run it again); one cut short (a session's end, a preemption) resumes from its last finished epoch.
  local name=$1 out=runs/$group/$1 resume=()
  shift
  if [[ -f $out/results.json ]]; then echo "== $group/$name: done, kept ($out)"; return; fi
  [[ -f $out/last.pt ]] && resume=(--resume)
  echo "== $group/$name: local_swin.py $* ${resume[*]}"
  "$py" local_swin.py --out "$out" "$@" "${extra[@]}" "${resume[@]}"
}

memory_table() {  # print the runs of a memory group side by side, as ratios of the first row
  "$py" - "runs/$group" "$@" <<'EOF'
import json, sys
root, names = sys.argv[1], sys.argv[2:]
rows = {n: json.load(open(f"{root}/{n}/results.json")) for n in names}
base = rows[names[0]]
print(f"\ndevice: {base['device']}, batch {base['config']['batch_size']}, {base['config']['img_size']} px, torch {base['torch']}")
print(f"| run | peak MiB | above params+optimizer MiB | vs {names[0]} | GFLOP per step | vs {names[0]} | step s | vs {names[0]} |")
print("|---|---|---|---|---|---|---|---|")
for n, r in rows.items():
    print(f"| {n} | {r['peak_memory_mib']:.0f} | {r['activation_memory_mib']:.0f} | "
          f"{r['activation_memory_mib'] / base['activation_memory_mib']:.3f} | {r['step_gflop']:.0f} | "
          f"{r['step_gflop'] / base['step_gflop']:.3f} | {r['step_time_s']:.3f} | {r['step_time_s'] / base['step_time_s']:.3f} |")
EOF
}

summary() {  # summary DIR...: per-epoch curves side by side, then mean and spread per row (runs NAME-sSEED make one row)
  "$py" - "$@" <<'EOF'
import json, os, re, statistics, sys
dirs = []
for d in sys.argv[1:]:  # a run folder, or a folder of run folders
    dirs += [d] if os.path.exists(f"{d}/log.jsonl") else sorted(f"{d}/{s}" for s in os.listdir(d) if os.path.exists(f"{d}/{s}/log.jsonl"))
if not dirs:
    sys.exit("summary: no run folders (with log.jsonl) in " + " ".join(sys.argv[1:]))
logs = {os.path.basename(d): [json.loads(line) for line in open(f"{d}/log.jsonl")] for d in dirs}
split = "val" if all("val_acc" in r for log in logs.values() for r in log) else "test"
print(f"{split} accuracy (%) per epoch\n| epoch | " + " | ".join(logs) + " |\n" + "|---" * (len(logs) + 1) + "|")
for e in range(max(len(log) for log in logs.values())):
    print(f"| {e + 1} | " + " | ".join(f"{log[e][split + '_acc']:.2f}" if e < len(log) else "" for log in logs.values()) + " |")
rows = {}
for d in dirs:
    if os.path.exists(f"{d}/results.json"):  # a finished run
        rows.setdefault(re.sub(r"-s\d+$", "", os.path.basename(d)), []).append(json.load(open(f"{d}/results.json")))
def mean_sd(values):
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"
e2e = statistics.mean(r["test_acc"] for r in rows["e2e"]) if "e2e" in rows else None
print("\n| row | seeds | epochs | test acc % (mean ± sd) | gap to e2e | val acc % | peak MiB | minutes per run | img/s |\n"
      + "|---" * 9 + "|")
for name, runs in rows.items():
    test, val = [r["test_acc"] for r in runs], [r["val_acc"] for r in runs if r.get("val_acc") is not None]
    print(f"| {name} | {len(runs)} | {runs[0]['epochs']} | {mean_sd(test)} | "
          + (f"{statistics.mean(test) - e2e:+.2f}" if e2e is not None else "") + f" | {mean_sd(val) if val else ''} | "
          f"{max(r['peak_memory_mib'] or 0 for r in runs):.0f} | {statistics.mean(r['wall_time_s'] for r in runs) / 60:.1f} | "
          f"{statistics.mean(r['images_per_second'] for r in runs):.0f} |")
EOF
}

# The small setting: a Swin with 4 x 4 patches of 32 px images (8 x 8 tokens, then 4, 2, 1), 2 blocks per stage.
small=(--dataset fashion-mnist --img-size 32 --patch-size 4 --window-size 4 --embed-dim 48 --depths 2,2,2,2
       --heads 3,6,12,24 --drop-path 0.1 --batch-size 128 --lr 1e-3 --warmup-epochs 1)

case "$group" in
summary)
  summary "${extra[@]}"
  ;;
smoke)
  tiny=(--dataset synthetic --img-size 32 --patch-size 2 --window-size 4 --embed-dim 32 --depths 2,2,2,2
        --heads 1,2,4,8 --epochs 3 --warmup-epochs 1 --batch-size 64 --lr 2e-3 --workers 0 --log-every 8)
  row e2e "${tiny[@]}" --k 1
  row ours-k4 "${tiny[@]}" --k 4
  ;;
cpu-table)
  # The comparison on real data, on a CPU (README, "Does it learn?"): Fashion-MNIST, the small Swin,
  # the same recipe and epochs for every row. ROWS and SEEDS pick the part to run, e.g.
  # `ROWS="e2e ours-k4" SEEDS="1 2" bash run.sh cpu-table` (finished runs are skipped, see row()).
  declare -A rows=([e2e]="--k 1" [ours-k2]="--k 2" [ours-k4]="--k 4" [infopro-k4]="--k 4 --method infopro"
                   [greedy-ce-k4]="--k 4 --method greedy-ce" [greedy-contrast-k4]="--k 4 --method greedy-contrast"
                   [ours-k4-deconv]="--k 4 --decoder deconv" [ours-k4-deconv4]="--k 4 --decoder deconv4"
                   [ours-k4-lambdas321]="--k 4 --lambdas 3,2,1" [infopro-k4-lambdas321]="--k 4 --method infopro --lambdas 3,2,1"
                   [ours-k4-lambdas-x3]="--k 4 --lambdas 9,4.5,0" [infopro-k4-lambdas-x3]="--k 4 --method infopro --lambdas 9,4.5,0"
                   [ours-k4-tau0.2]="--k 4 --temperature 0.2" [ours-k4-bf16]="--k 4 --amp bf16"
                   [ours-k8]="--k 8" [infopro-k8]="--k 8 --method infopro" [greedy-ce-k8]="--k 8 --method greedy-ce"
                   [ours-k8-lambdas3]="--k 8 --lambdas 3,3,3,3,3,3,3"
                   [greedy-contrast-k8]="--k 8 --method greedy-contrast" [infopro-k2]="--k 2 --method infopro"
                   [greedy-ce-k2]="--k 2 --method greedy-ce" [greedy-contrast-k2]="--k 2 --method greedy-contrast")
  for name in ${ROWS:-e2e ours-k4 infopro-k4 greedy-ce-k4 greedy-contrast-k4 ours-k2 ours-k4-deconv ours-k4-deconv4 \
               ours-k4-lambdas321 infopro-k4-lambdas321 ours-k4-lambdas-x3 infopro-k4-lambdas-x3 \
               ours-k4-tau0.2 ours-k4-bf16 ours-k8 infopro-k8 greedy-contrast-k8 greedy-ce-k8 ours-k8-lambdas3 \
               infopro-k2 greedy-contrast-k2 greedy-ce-k2}; do
    [[ -n "${rows[$name]:-}" ]] || { echo "cpu-table: no row $name; rows: ${!rows[*]}"; exit 2; }
    seeds=${SEEDS:-0 1 2}
    [[ $name == *-k[48]-* ]] && seeds=${SEEDS:-0}  # a row's variants: one seed each
    for seed in $seeds; do
      row "$name-s$seed" "${small[@]}" --epochs "${EPOCHS:-10}" --crop-scale 0.8 --val-split 0.1 --seed "$seed" ${rows[$name]}
    done
  done
  summary "runs/$group"
  ;;
cpu-speed)
  # 1. Training images/s of the small setting at K=4, one run after the other on the same machine: this code
  #    (the data set in memory, augmented a batch at a time), and the code before it (commit e35a045: the same
  #    images as PNGs through an ImageFolder, decoded and augmented one by one in worker processes).
  png=runs/$group/fashion-mnist-png
  group=$group/$(date +%Y%m%d-%H%M%S)  # a benchmark measures afresh each time, beside the earlier ones
  [[ -d $png ]] || "$py" - "$png" <<'EOF'
import os, sys
from torchvision import datasets
for split, train, n in (("train", True, 10000), ("val", False, 2000)):
    data = datasets.FashionMNIST("data", train=train)
    for i in range(n):
        folder = f"{sys.argv[1]}/{split}/{int(data.targets[i])}"
        os.makedirs(folder, exist_ok=True)
        data[i][0].save(f"{folder}/{i}.png")
EOF
  mkdir -p "runs/$group"
  git show e35a045:local_swin.py > "runs/$group/previous_local_swin.py"
  speed=("${small[@]}" --k 4 --epochs 1 --max-steps 60 --log-every 20)
  echo "== $group/previous-imagefolder: previous_local_swin.py --dataset imagefolder"
  "$py" "runs/$group/previous_local_swin.py" "${speed[@]}" --dataset imagefolder --data-dir "$png" --out "runs/$group/previous-imagefolder"
  row in-memory "${speed[@]}"
  row in-memory-bf16 "${speed[@]}" --amp bf16
  # 2. An end-to-end training step of Swin-T at 224 px, batch 8: ours against torchvision's swin_t.
  "$py" - <<'EOF'
import time, torch, torchvision, local_swin as L
torch.manual_seed(0)
images, labels = torch.randn(8, 3, 224, 224), torch.randint(1000, (8,))
models = {"ours": L.build_model("swin-t", 1000), "torchvision swin_t": torchvision.models.swin_t()}
optimizers = {name: torch.optim.AdamW(m.parameters()) for name, m in models.items()}
times = {name: [] for name in models}
for r in range(13):  # alternate, and swap who goes first: both see the same state of the machine
    for name, model in list(models.items())[::1 if r % 2 else -1]:
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizers[name].step()
        optimizers[name].zero_grad()
        times[name].append(time.perf_counter() - start)
for name, t in times.items():
    print(f"Swin-T 224 px, batch 8, one training step: {name} {sorted(t[1:])[6]:.2f} s (median of 12)")
EOF
  for r in previous-imagefolder in-memory in-memory-bf16; do
    "$py" -c "import json; r = json.load(open('runs/$group/$r/results.json')); print('$r', round(r['images_per_second']), 'img/s')"
  done
  ;;
cpu-scaling)
  # README, Scaling: training images/s of the small setting, timed from outside each command: the clock between the
  # progress lines of steps 50 and 200 as they reach this script (after step 200 every process has done its part;
  # start-up and evaluation fall outside). One command at a time; each process of torchrun gets one thread.
  group=$group/$(date +%Y%m%d-%H%M%S)
  mkdir -p "runs/$group"
  common=("${small[@]}" --epochs 1 --max-steps 200 --log-every 50 --crop-scale 0.8 "${extra[@]}")
  mp=("$py" -m torch.distributed.run --standalone --nproc_per_node)
  "$py" - "runs/$group" "${common[*]}" "$py" "${mp[*]}" <<'EOF'
import json, os, subprocess, sys, time
out, common, py, mp = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4].split()
rows = [("E2E, 1 process, 2 threads", 2, [py], ["--k", "1"]),
        ("K=2, 1 process, 2 threads", 2, [py], ["--k", "2"]),
        ("K=2, 2 processes (--module-parallel), 1 thread each", 1, mp + ["2"], ["--k", "2", "--module-parallel"]),
        ("K=2 --split time, 2 processes, 1 thread each", 1, mp + ["2"], ["--k", "2", "--module-parallel", "--split", "time"]),
        ("K=4, 1 process, 2 threads", 2, [py], ["--k", "4"]),
        ("K=4, 4 processes on 2 cores, 1 thread each", 1, mp + ["4"], ["--k", "4", "--module-parallel"])]
record = {}
for name, threads, launcher, args in rows:
    folder = f"{out}/{len(record)}"
    cmd = launcher + ["local_swin.py", *common, *args, "--out", folder]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    seen, lines = {}, []
    for line in proc.stdout:
        lines.append(line)
        for step in (50, 200):
            if f" step {step}/" in line:
                seen[step] = time.perf_counter()
    if proc.wait() or len(seen) < 2:
        sys.exit(f"{name}: failed\n{''.join(lines[-20:])}")
    batch = int(common[common.index("--batch-size") + 1])
    results = json.load(open(f"{folder}/results.json"))
    record[name] = {"images_per_second": 150 * batch / (seen[200] - seen[50]),
                    "reported_by_the_run": results["images_per_second"], "split": results["split"],
                    "peak_memory_mib": results["peak_memory_mib"],
                    "peak_memory_per_process_mib": results.get("peak_memory_per_process_mib")}
    print(name, json.dumps(record[name]), flush=True)
    json.dump(record, open(f"{out}/scaling.json", "w"), indent=2)
base = record["K=2, 1 process, 2 threads"]["images_per_second"]
print("\n| setting | images/s (steps 50-200, from outside) | vs K=2 in 1 process | modules end after | peak MiB per process |")
print("|---|---|---|---|---|")
for name, r in record.items():
    peaks = r["peak_memory_per_process_mib"] or [r["peak_memory_mib"]]
    print(f"| {name} | {r['images_per_second']:.0f} | {r['images_per_second'] / base:.2f} | {r['split']} | "
          + " ".join(f"{p:.0f}" for p in peaks) + " |")
EOF
  ;;
probe)
  # Linear probes of finished runs: how well a linear classifier on each block's pooled output separates
  # the classes of the validation split (fitted on 10,000 training images), the same blocks for every
  # run whatever its K (at K = 8, every module's output; a stage's output is its last block's). `bash run.sh probe runs/cpu-table/e2e-s0 runs/cpu-table/ours-k4-s0`
  "$py" - "${extra[@]}" <<'EOF'
import json, sys, torch, local_swin as L
for run in sys.argv[1:]:
    c = json.load(open(f"{run}/results.json"))["config"]
    classes = L.count_classes(c["dataset"], c["data_dir"])
    backbone = L.build_model(c["arch"], classes, c["img_size"], patch_size=c["patch_size"], window_size=c["window_size"],
                             embed_dim=c["embed_dim"], depths=c["depths"], heads=c["heads"])
    state = torch.load(f"{run}/last.pt", weights_only=True)["net"]
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    backbone.eval()
    train, val = L.validation_split(L.make_datasets(c["dataset"], c["data_dir"], c["img_size"], download=False)[0], c["val_split"])
    @torch.no_grad()
    def pooled(data):  # (N, channels) after each block, before a patch merging
        out = [[] for stage in backbone.stages for _ in stage]
        for start in range(0, len(data), 500):
            x = backbone.patch_embed(L.prepare_batch(data.images[start:start + 500], c["img_size"]))
            j = 0
            for s, stage in enumerate(backbone.stages):
                for block in stage:
                    x = block(x)
                    out[j].append(x.mean(dim=(1, 2)))
                    j += 1
                x = backbone.merges[s](x) if s < len(backbone.merges) else x
        return [torch.cat(f) for f in out]
    n = min(10000, len(train))
    accs = []
    for f, v in zip(pooled(train.subset(torch.arange(n))), pooled(val)):
        mean, std = f.mean(0), f.std(0) + 1e-6
        f, v = (f - mean) / std, (v - mean) / std
        probe = torch.nn.Linear(f.shape[1], classes)
        opt = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(probe(f), train.labels[:n]) + 1e-4 * probe.weight.square().sum()
            loss.backward()
            return loss
        opt.step(closure)
        accs.append(100 * (probe(v).argmax(1) == val.labels).float().mean().item())
    ends = [sum(len(stage) for stage in backbone.stages[:s + 1]) for s in range(len(backbone.stages))]
    print(f"{run}: linear probe, validation accuracy % after block 1..{len(accs)}: " + " ".join(f"{a:.2f}" for a in accs)
          + " | after stage 1..{}: ".format(len(ends)) + " ".join(f"{accs[e - 1]:.2f}" for e in ends))
EOF
  ;;
reconstructions)
  # What each auxiliary decoder makes of 8 validation (or test) images, beside its target, into RUN/reconstructions.png:
  # row 1 the images; then, per module with a decoder, its target and its reconstruction. InfoPro's target is the
  # image; ours is x_{i-1}, shown through the first three principal components of sigmoid(x_{i-1}) over these images
  # as RGB (the same projection for the reconstruction, sigmoid of the decoder's logits), upscaled to the image size.
  "$py" - "${extra[@]}" <<'EOF'
import json, sys, torch, torch.nn.functional as F, torchvision, local_swin as L
for run in sys.argv[1:]:
    ckpt = torch.load(f"{run}/last.pt", weights_only=True)  # the last finished epoch, of a finished run or not
    c = ckpt["config"]
    backbone = L.build_model(c["arch"], L.count_classes(c["dataset"], c["data_dir"]), c["img_size"],
                             patch_size=c["patch_size"], window_size=c["window_size"], embed_dim=c["embed_dim"],
                             depths=c["depths"], heads=c["heads"])
    net = L.LocalSwin(backbone, ckpt["ends"], method=c["method"], decoder=c["decoder"], lambdas=c["lambdas"], mus=c["mus"])
    net.load_state_dict(ckpt["net"])
    net.eval()
    train, test = L.make_datasets(c["dataset"], c["data_dir"], c["img_size"], download=False)
    val = L.validation_split(train, c["val_split"])[1] or test
    images = L.prepare_batch(val.images[:8], c["img_size"])
    shown = [L.ImageTarget()(None, images)]  # the images, de-normalised
    with torch.no_grad():
        x = images
        for module in net.local_modules[:-1]:
            x_in = x if module.stem is None else module.stem(x)
            x = module.layers(x_in)
            if getattr(module.loss.head, "decoder", None) is None:
                continue
            target = module.loss.target(x_in, images)  # (8, C, h, w), in [0, 1]
            recon = torch.sigmoid(module.loss.head(x)[1])
            if target.shape[1] != 3:  # features: both onto the target's first three principal components
                pixels = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
                mean = pixels.mean(0)
                basis = torch.linalg.svd(pixels - mean, full_matrices=False)[2][:3]
                project = lambda t: torch.einsum("bchw,kc->bkhw", t - mean[:, None, None], basis)
                target, recon = project(target), project(recon)
                low, high = target.amin((0, 2, 3), keepdim=True), target.amax((0, 2, 3), keepdim=True)
                target, recon = [((t - low) / (high - low + 1e-8)).clamp(0, 1) for t in (target, recon)]
            shown += [F.interpolate(t, size=images.shape[-2:], mode="nearest") for t in (target, recon)]
    grid = torchvision.utils.make_grid(torch.cat(shown), nrow=8, padding=2, pad_value=1.0)
    grid = F.interpolate(grid[None], scale_factor=max(1, 96 // c["img_size"]), mode="nearest")[0]  # small images, larger
    torchvision.utils.save_image(grid, f"{run}/reconstructions.png")
    print(f"{run}/reconstructions.png (epoch {ckpt['epoch']}): the images, then the target and reconstruction of "
          f"{len(shown) // 2} modules")
EOF
  ;;
memory)
  m=(--measure-memory --arch swin-t --img-size 224 --batch-size "${MEMORY_BATCH:-32}" --max-steps 5)
  row e2e "${m[@]}" --k 1
  row ours-k2 "${m[@]}" --k 2
  row ours-k4 "${m[@]}" --k 4
  row infopro-k4 "${m[@]}" --k 4 --method infopro
  row balanced-k4 "${m[@]}" --k 4 --split balanced
  row e2e-checkpoint "${m[@]}" --k 1 --checkpoint
  row ours-k4-checkpoint "${m[@]}" --k 4 --checkpoint
  row balanced-k4-checkpoint "${m[@]}" --k 4 --split balanced --checkpoint
  memory_table e2e ours-k2 ours-k4 infopro-k4 balanced-k4 e2e-checkpoint ours-k4-checkpoint balanced-k4-checkpoint
  # Finer checkpointing: the attention and the MLP of every block recomputed apart (not a flag; measured here only).
  # On the device the other rows used (local_swin.py's --device, or its default), as ratios of their E2E row.
  "$py" - "${MEMORY_BATCH:-32}" "${extra[@]}" <<'EOF'
import json, sys, torch, local_swin as L
device = torch.device(L.parse_args(sys.argv[2:]).device or ("cuda" if torch.cuda.is_available() else "cpu"))
base = json.load(open("runs/memory/e2e/results.json"))
for name, ends in (("e2e", ()), ("ours-k4", (2, 4, 10))):
    torch.manual_seed(0)
    backbone = L.build_model("swin-t", 1000, 224)
    for block in [m for m in backbone.modules() if isinstance(m, L.SwinBlock)]:
        block.attn, block.mlp = L.Checkpointed(block.attn), L.Checkpointed(*block.mlp)
    net = L.LocalSwin(backbone, ends).to(device)
    optimizers, _ = L.make_optimizers(net.local_modules, lr=1e-4, weight_decay=0.05, total_steps=10, warmup_steps=0)
    r = L.measure_memory(net, optimizers, batch_size=int(sys.argv[1]), num_classes=1000, device=device, steps=2)
    print(f"| {name}-checkpoint-attn-mlp-apart | {r['peak_memory_mib']:.0f} | " + " | ".join(
        f"{r[k]:.{p}f} | {r[k] / base[k]:.3f}" for k, p in (("activation_memory_mib", 0), ("step_gflop", 0), ("step_time_s", 3))) + " |")
EOF
  ;;
gpu)
  # Everything one GPU can show, in about 8 minutes, into runs/gpu/DATE-TIME/gpu.json, written again after every
  # row (a row that fails, e.g. out of memory at batch 128, is recorded as failed and the next one runs): the memory
  # table (torch.cuda.max_memory_allocated) in fp32 and bf16, step time and images/s at batch 128; which SDPA kernel
  # our windows' attention takes (bias and mask as attn_mask) in fp32 and bf16, in training (mask with gradient) and
  # in evaluation; and how far one configuration run twice differs (CUDA's bilinear-upsampling backward and cuDNN
  # convolutions are not deterministic): the tolerance a CUDA run of --module-parallel can be held to.
  # Extra flags go to every local_swin.py run, e.g. `bash run.sh gpu --device cuda:1`. A rehearsal of the whole script
  # on a CPU, in about 6 minutes (before spending GPU time on a change to it): `bash run.sh gpu --device cpu --img-size 32
  # --window-size 4 --embed-dim 32 --depths 2,2,2,2 --heads 1,2,4,8`.
  group=$group/$(date +%Y%m%d-%H%M%S)  # a benchmark measures afresh each time, beside the earlier ones
  "$py" - "runs/$group" "${extra[@]}" <<'EOF'
import json, os, subprocess, sys, torch, local_swin as L
out, extra = sys.argv[1], sys.argv[2:]
device = torch.device(L.parse_args(extra).device or "cuda")
if device.type == "cuda" and not torch.cuda.is_available():
    print("run.sh gpu: no CUDA device here (torch.cuda.is_available() is False)", file=sys.stderr)
    sys.exit(2)
os.makedirs(out)
card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} (a rehearsal)"
record = {"device": card, "torch": torch.__version__, "failed": []}
def save():
    json.dump(record, open(f"{out}/gpu.json", "w"), indent=2)
def cli(name, *args):  # one local_swin.py run into out/name: its results.json, or None (recorded) if it failed
    done = subprocess.run([sys.executable, "local_swin.py", "--out", f"{out}/{name}", *args, *extra],
                          capture_output=True, text=True)
    if done.returncode:
        record["failed"].append({"row": name, "exit": done.returncode, "error": done.stderr.strip()[-400:]})
        print(f"{name}: FAILED ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
        save()
        return None
    return json.load(open(f"{out}/{name}/results.json"))
rows = {"e2e": ["--k", "1"], "ours-k2": ["--k", "2"], "ours-k4": ["--k", "4"], "infopro-k4": ["--k", "4", "--method", "infopro"],
        "balanced-k4": ["--k", "4", "--split", "balanced"], "e2e-checkpoint": ["--k", "1", "--checkpoint"],
        "ours-k4-checkpoint": ["--k", "4", "--checkpoint"], "balanced-k4-checkpoint": ["--k", "4", "--split", "balanced", "--checkpoint"]}
keys = ("peak_memory_mib", "activation_memory_mib", "step_gflop", "step_time_s", "images_per_second", "split")
for amp in ("none", "bf16"):
    for batch in (32, 128):
        for name, args in rows.items():
            if batch == 128 and name not in ("e2e", "ours-k4"):
                continue
            r = cli(f"memory-{amp}-b{batch}-{name}", "--measure-memory", "--img-size", "224", "--batch-size", str(batch),
                    "--max-steps", "5", "--amp", amp, *args)
            if r is not None:
                record[f"memory {amp} b{batch} {name}"] = {k: r[k] for k in keys}
                print(name, amp, batch, record[f"memory {amp} b{batch} {name}"], flush=True)
                save()
# Which SDPA kernel runs: a stage-1 shifted-window attention of Swin-T at batch 32, in training (forward and
# backward, the mask carrying the bias's gradient) and in evaluation (no gradient: cuDNN attention becomes eligible).
attn = L.WindowAttention(dim=96, heads=3, resolution=56, window=7, shift=3).to(device)
activity = getattr(torch.profiler.ProfilerActivity, "CUDA" if device.type == "cuda" else "CPU")
words = ("attention", "fmha", "flash", "sdpa", "softmax", "cudnn", "efficient")
for dtype in (torch.float32, torch.bfloat16):
    for mode in ("train", "eval"):
        x = torch.randn(32, 56, 56, 96, device=device, requires_grad=mode == "train")
        try:
            with torch.profiler.profile(activities=[activity]) as prof:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not torch.float32), \
                        torch.set_grad_enabled(mode == "train"):
                    y = attn(x)
                if mode == "train":
                    y.float().sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            names = sorted({e.name for e in prof.events() if any(w in e.name.lower() for w in words)})
        except RuntimeError as e:
            names = [f"failed: {str(e).splitlines()[0][:200]}"]
        record[f"sdpa kernels, stage-1 SW-MSA, {str(dtype).split('.')[-1]}, {mode}"] = names
        save()
from torch.nn.attention import SDPBackend, sdpa_kernel
x = torch.randn(32, 56, 56, 96, device=device, requires_grad=True)
for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
    try:
        with sdpa_kernel(backend):
            attn(x).sum().backward()
        record[f"sdpa {backend.name} runs (fp32, training)"] = True
    except RuntimeError as e:
        record[f"sdpa {backend.name} runs (fp32, training)"] = str(e).splitlines()[0][:200]
save()
# The same run twice on this card: the largest difference CUDA's nondeterministic kernels alone make.
small = ["--dataset", "synthetic", "--img-size", "32", "--patch-size", "2", "--window-size", "4", "--embed-dim", "32",
         "--depths", "2,2,2,2", "--heads", "1,2,4,8", "--epochs", "1", "--batch-size", "64", "--k", "4", "--log-every", "8"]
runs = {name: cli(name, *small, "--device", str(device)) for name in ("one-device", "one-device-again")}
if all(r is not None for r in runs.values()):
    loss = {n: [v for line in open(f"{out}/{n}/log.jsonl") for v in json.loads(line)["train_loss"]] for n in runs}
    record["the same run twice: largest train-loss difference"] = max(
        abs(a - b) for a, b in zip(loss["one-device"], loss["one-device-again"]))
save()
print(json.dumps(record, indent=2))
EOF
  ;;
table3)
  for ds in stl10 cifar10 cifar100; do
    row "$ds-infopro" --dataset "$ds" --k 4 --method infopro
    row "$ds-ours" --dataset "$ds" --k 4 --method ours
    row "$ds-e2e" --dataset "$ds" --k 1
  done
  ;;
decoders)
  for ds in cifar10 cifar100; do
    for dec in interp deconv deconv4; do
      row "$ds-$dec" --dataset "$ds" --k 4 --decoder "$dec"
    done
  done
  ;;
ablation)
  row ours --dataset cifar100 --k 2 --method ours
  row greedy-ce --dataset cifar100 --k 2 --method greedy-ce
  row greedy-contrast --dataset cifar100 --k 2 --method greedy-contrast
  row e2e --dataset cifar100 --k 1
  ;;
svhn)
  row ours --dataset svhn --k 4
  row e2e --dataset svhn --k 1
  ;;
large)
  row swin-b-memory-e2e --measure-memory --arch swin-b --img-size 384 --batch-size 32 --k 1
  row swin-b-memory-k4 --measure-memory --arch swin-b --img-size 384 --batch-size 32 --k 4
  row swin-l-memory-e2e --measure-memory --arch swin-l --img-size 384 --batch-size 80 --k 1
  row swin-l-memory-k4 --measure-memory --arch swin-l --img-size 384 --batch-size 80 --k 4
  row swin-b-ours --dataset cifar10 --arch swin-b --img-size 384 --k 4
  row swin-b-e2e --dataset cifar10 --arch swin-b --img-size 384 --k 1
  row swin-l-ours --dataset cifar10 --arch swin-l --img-size 384 --batch-size 80 --k 4
  row swin-l-e2e --dataset cifar10 --arch swin-l --img-size 384 --batch-size 80 --k 1
  ;;
scaling)
  # README, Scaling: Swin-T at 224 px, CIFAR-10, 300 steps of batch 128: images/s (as each run reports it) and peak
  # memory per GPU of E2E and K=4 on one GPU, against K=4 with a GPU per module (the paper's split, and --split time).
  group=$group/$(date +%Y%m%d-%H%M%S)
  s=(--dataset cifar10 --img-size 224 --batch-size 128 --epochs 1 --max-steps 300 --log-every 50)
  tr=("$py" -m torch.distributed.run --standalone --nproc_per_node 4 local_swin.py)
  row e2e-one-gpu "${s[@]}" --k 1 --device cuda:0
  row k4-one-gpu "${s[@]}" --k 4 --device cuda:0
  for split in paper time; do
    echo "== $group/k4-module-parallel-$split: 4 processes, a GPU each"
    "${tr[@]}" "${s[@]}" --k 4 --module-parallel --split $split --out "runs/$group/k4-module-parallel-$split" "${extra[@]}"
  done
  "$py" - "runs/$group" <<'EOF'
import json, os, sys
for name in sorted(os.listdir(sys.argv[1])):
    r = json.load(open(f"{sys.argv[1]}/{name}/results.json"))
    peaks = r.get("peak_memory_per_process_mib") or [r["peak_memory_mib"]]
    print(f"| {name} | {r['images_per_second']:.0f} img/s | split {r['split']} | peak MiB per GPU "
          + " ".join(f"{p:.0f}" for p in peaks) + " |")
EOF
  ;;
same-numbers)
  # A refactor changes no number: every train/val/test loss and accuracy of these short runs, the balanced split,
  # its peak memory and its FLOPs, identical before and after. One thread, so that the sums are taken in one order.
  label=${extra[0]:?"same-numbers LABEL"}; extra=("${extra[@]:1}"); group=$group/$label
  export OMP_NUM_THREADS=1
  t=(--dataset synthetic --img-size 32 --patch-size 2 --window-size 4 --embed-dim 16 --depths 2,2,2 --heads 1,2,4
     --batch-size 64 --workers 0 --warmup-epochs 1 --lr 2e-3 --log-every 8 --epochs 2 --val-split 0.2)
  for method in ours infopro greedy-ce greedy-contrast; do row "$method-k3" "${t[@]}" --k 3 --method $method; done
  row e2e "${t[@]}" --k 1
  row checkpoint-droppath "${t[@]}" --k 3 --checkpoint --drop-path 0.3
  row deconv4-bf16 "${t[@]}" --k 3 --decoder deconv4 --amp bf16
  "$py" -c '
import os, sys, numpy as np; from PIL import Image
rng = np.random.default_rng(0)
for split, n in (("train", 160), ("val", 40)):
    for c in range(2):
        os.makedirs(f"{sys.argv[1]}/{split}/c{c}", exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 120, (40, 40, 3)) + 100 * c
            Image.fromarray(pixels.astype(np.uint8)).save(f"{sys.argv[1]}/{split}/c{c}/{i}.png")
' "runs/$group/pngs"
  row imagefolder "${t[@]/synthetic/imagefolder}" --data-dir "runs/$group/pngs" --workers 2 --k 3 --batch-size 32
  row balanced-memory "${t[@]}" --k 3 --split balanced --measure-memory
  row small-30-steps "${small[@]}" --k 4 --epochs 10 --crop-scale 0.8 --val-split 0.1 --max-steps 30
  "$py" - "runs/$group" > "runs/$group/numbers.txt" <<'EOF'
import json, os, sys
timed = ("time", "second", "wall", "config", "torch")  # fields that differ run to run, or name the code
for name in sorted(os.listdir(sys.argv[1])):
    log, results = f"{sys.argv[1]}/{name}/log.jsonl", f"{sys.argv[1]}/{name}/results.json"
    records = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    for record in records + ([json.load(open(results))] if os.path.exists(results) else []):
        print(name, {k: v for k, v in record.items() if not any(t in k for t in timed)})
EOF
  cat "runs/$group/numbers.txt"
  ;;
*)
  sed -n '2,17p' "$0"
  exit 2
  ;;
esac
