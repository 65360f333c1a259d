"""Peak memory and time of reading a fine-tuning checkpoint for its EMA weights, as scoring and
sampling do, with the tensors read whole (torch.load) or memory-mapped (torch.load(mmap=True)).

    python benchmarks/checkpoint_load.py --preset uvit_mid_4 --num-classes 200

Writes one checkpoint of ``--preset`` with model, EMA and AdamW state (as training saves it) into
``--work``, then for each mode runs a fresh Python process that loads it, rebuilds the network from
the EMA weights and reports its peak resident memory (VmHWM, Linux) and seconds. The file was just
written, so both modes read from the page cache: the table compares memory, not disk speed.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from diffdistill import atomic
from diffdistill.diffusion import checkpoint, uvit

COLUMNS = ["preset", "file_MB", "mode", "peak_rss_MB", "seconds"]
LOAD = """
import sys, time
began = time.perf_counter()
from diffdistill.diffusion import checkpoint
ckpt = checkpoint.load_checkpoint(sys.argv[1], mmap=sys.argv[2] == "mmap")
model = checkpoint.model_from_checkpoint(ckpt, weights="ema")
seconds = time.perf_counter() - began
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent's memory.
peak_kb = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(peak_kb / 1024, seconds)
"""


def write_checkpoint(path: Path, preset: str, num_classes: int) -> None:
    model = uvit.build(preset, num_classes=num_classes, null_class=True)
    optimizer = torch.optim.AdamW(model.parameters())
    for param in model.parameters():  # AdamW state as after a step: exp_avg and exp_avg_sq per parameter
        optimizer.state[param] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(param),
                                  "exp_avg_sq": torch.zeros_like(param)}
    ema = copy.deepcopy(model)  # its own storage, as in training (torch.save writes a shared tensor once)
    checkpoint.save_checkpoint(path, model=model, step=1, config={}, ema=ema, optimizer=optimizer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="uvit_small_2", choices=list(uvit.PRESETS))
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--work", help="folder for the checkpoint (default: a temporary one)")
    p.add_argument("--out", help="also write the table here (TSV)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        path = Path(work) / "step.pt"
        write_checkpoint(path, args.preset, args.num_classes)
        rows = []
        for mode in ("read", "mmap"):
            out = subprocess.run([sys.executable, "-c", LOAD, str(path), mode], capture_output=True, text=True,
                                 check=True).stdout.split()
            rows.append([args.preset, f"{path.stat().st_size / 1e6:.0f}", mode, f"{float(out[0]):.0f}",
                         f"{float(out[1]):.2f}"])
    print("\t".join(COLUMNS))
    for row in rows:
        print("\t".join(row))
    if args.out:
        atomic.write_tsv(args.out, COLUMNS, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
