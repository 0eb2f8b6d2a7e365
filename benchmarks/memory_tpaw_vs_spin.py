"""Peak memory of a TPAW round with a full team (3 players) against a SPIN round, same model and data.

TPAW keeps up to three frozen references, but only as precomputed log-probs: during the precompute at
most the policy and one reference are loaded, and during training only the policy. So its peak should
stay within 10% of SPIN's (issue 3). Both methods first run rounds 0 and 1 in one process; round 2
(TPAW's first three-player round) then runs alone in a fresh process, whose peak RSS
(``ru_maxrss``) is the number reported. torch's CPU allocations are counted in RSS.

    python benchmarks/memory_tpaw_vs_spin.py [--workdir /tmp/sparring-memory] [--hidden 384 --layers 4 --prompts 32]

Prints peak RSS of each round, the RSS after imports (the interpreter, torch and transformers, the
same for both), the peak above it, and the TPAW / SPIN ratios; exits 1 if the peak ratio exceeds 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs the CLI in this process and prints its peak RSS; RSS after imports is the baseline.
MEASURE = """
import json, resource, sys
import torch, transformers, accelerate  # noqa: F401  (the imports every run pays for)
from sparring.cli import main

def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

base = rss_kb()
rc = main(sys.argv[1:])
print("MEASURE " + json.dumps({"rc": rc, "base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_cli(args: list[str], log: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("a") as f:
        proc = subprocess.run([sys.executable, "-c", MEASURE, *args], stdout=subprocess.PIPE, stderr=f, env=env,
                              text=True, cwd=REPO)
        f.write(proc.stdout)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("MEASURE ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"run failed (exit {proc.returncode}); see {log}")
    return json.loads(line.removeprefix("MEASURE "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/sparring-memory")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=32)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    ground = work / f"ground-h{args.hidden}-l{args.layers}"
    common = [
        f"model.name_or_path={ground / 'sft'}", "model.build_proving_ground=true", f"sft.output_dir={ground}",
        f"sft.hidden_size={args.hidden}", f"sft.layers={args.layers}", "sft.heads=4", "sft.steps=10", "sft.batch_size=16",
        f"data.source={ground / 'data' / 'train.jsonl'}", f"eval.source={ground / 'data' / 'eval.jsonl'}",
        f"data.num_prompts={args.prompts}", "generation.max_new_tokens=16", "train.batch_size=8",
        "train.logprob_batch_size=16", "eval.num_examples=32",
    ]
    results = {}
    start = time.time()
    for method in ("spin", "tpaw"):
        out = work / f"{method}-h{args.hidden}-l{args.layers}-p{args.prompts}"
        config = str(REPO / "configs" / method / "tiny.yaml")
        base = ["run", config, f"output_dir={out}", *common]
        run_cli([*base, f"{method}.iterations=2"], log)  # rounds 0 and 1 (cached on a rerun)
        state = json.loads((out / "state.json").read_text())["stages"]
        if "iter2" in state:
            raise SystemExit(f"{out} already holds round 2; delete it to measure again")
        results[method] = run_cli([*base, f"{method}.iterations=3"], log)  # round 2 alone
        print(f"{method}: round 2 peak RSS {results[method]['peak_kb'] / 1024:.1f} MiB "
              f"(after imports {results[method]['base_kb'] / 1024:.1f} MiB)", flush=True)
    spin, tpaw = results["spin"], results["tpaw"]
    ratio = tpaw["peak_kb"] / spin["peak_kb"]
    above = (tpaw["peak_kb"] - tpaw["base_kb"]) / (spin["peak_kb"] - spin["base_kb"])
    print(f"TPAW / SPIN peak RSS ratio: {ratio:.3f}   (above the post-import baseline: {above:.3f})")
    print(json.dumps({
        "spin_peak_mib": round(spin["peak_kb"] / 1024, 1), "tpaw_peak_mib": round(tpaw["peak_kb"] / 1024, 1),
        "spin_above_base_mib": round((spin["peak_kb"] - spin["base_kb"]) / 1024, 1),
        "tpaw_above_base_mib": round((tpaw["peak_kb"] - tpaw["base_kb"]) / 1024, 1),
        "ratio": round(ratio, 3), "ratio_above_base": round(above, 3), "hidden": args.hidden, "layers": args.layers,
        "prompts": args.prompts, "seconds": round(time.time() - start), "machine": platform.platform(),
        "cpus": os.cpu_count(),
    }))
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
