"""What each difference between pyro-dvae's evaluation pipeline and the reference's does to the
test-set means (issue 10, part 5).

For each run directory, the whole test split is resynthesised and scored under these pipelines:

- ``before``: pyro-dvae's pipeline before it followed the reference: silence trimmed with the
  frame energies of a zero-padded signal (librosa >= 0.10), 1 + ceil(L / 256) frames and all L
  samples scored, latents at their guide means;
- ``trim``: ``before`` with the reference's trimming (reflection padding, librosa <= 0.9);
- ``frames``: ``before`` with the reference's framing (1 + floor(L / 256) frames, the first
  256 floor(L / 256) samples scored);
- ``now``: both (``pyro-dvae evaluate`` today);
- ``sampled``: ``now`` with every latent drawn from the guide (seed 0), as the reference's
  resynthesis does even in eval mode.

Writes ``OUT/pipeline.md`` (the means under each pipeline and their differences to ``now``) and
``OUT/pipeline.json``.  Not a unit test.  Example (the numbers in README.md)::

    nice python benchmarks/eval_pipeline.py --data ../shared/data/speech16k \\
        --out benchmarks/results/reference benchmarks/results/reference/runs/{srnn,vrnn}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: name -> (trim padding, framing, latents sampled)
PIPELINES = {
    "before": ("zeros", "all", False),
    "trim": ("reflect", "all", False),
    "frames": ("zeros", "reference", False),
    "now": ("reflect", "reference", False),
    "sampled": ("reflect", "reference", True),
}


def run_pipelines(run_dir: Path, data: str, names: list, workers: int) -> dict:
    """``{pipeline: {"summary": ..., "per_file": ...}}`` for one run."""
    import pyro

    from pyro_dvae.data.datasets import load_utterances
    from pyro_dvae.speech import evaluate, model_reconstructor
    from pyro_dvae.train import load_run

    model, guide, _ = load_run(run_dir)
    utterances = {}
    out = {}
    for name in names:
        pad, frames, sample = PIPELINES[name]
        if pad not in utterances:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # skipped files are the same in every pipeline
                utterances[pad] = load_utterances(data, "test", trim_pad=pad)
        pyro.set_rng_seed(0)
        t0 = time.perf_counter()
        result = evaluate(model_reconstructor(model, guide, sample=sample), utterances[pad],
                          workers=workers, progress=False, frames=frames)
        out[name] = {"summary": result["summary"], "per_file": result["per_file"],
                     "seconds": time.perf_counter() - t0}
        print(f"{run_dir.name} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def format_effects(results: dict, names: list) -> str:
    """One table per run: the mean of every metric under each pipeline, and minus ``now``."""
    from pyro_dvae import metrics as M
    from pyro_dvae.speech import TABLE_COLUMNS, _DIGITS

    blocks = []
    for run, by_name in results.items():
        head = ["pipeline"] + [M.METRICS[c][0] for c in TABLE_COLUMNS]
        lines = [f"{run}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base = by_name.get("now")
        for name in names:
            s = by_name[name]["summary"]
            cells = [name]
            for c in TABLE_COLUMNS:
                d = _DIGITS[c] + 1
                text = f"{s[c]['mean']:.{d}f}"
                if base is not None and name != "now":
                    text += f" ({s[c]['mean'] - base['summary'][c]['mean']:+.{d}f})"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories")
    p.add_argument("--data", required=True, help="folder with a test/ split")
    p.add_argument("--pipelines", default=",".join(PIPELINES),
                   help=f"comma-separated, from {', '.join(PIPELINES)}")
    p.add_argument("--workers", type=int, default=0, help="metric worker processes")
    p.add_argument("--out", default="benchmarks/results/reference")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    unknown = [n for n in names if n not in PIPELINES]
    if unknown:
        p.error(f"unknown pipeline(s) {', '.join(unknown)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from pyro_dvae.speech import _json_safe

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for run in args.runs:
        results[run.name] = run_pipelines(run, args.data, names, args.workers)
        text = ("Test-set means under each evaluation pipeline (in brackets: minus `now`), "
                f"data {args.data}; `python benchmarks/eval_pipeline.py`.\n\n"
                + format_effects(results, names))
        (out / "pipeline.md").write_text(text)
        (out / "pipeline.json").write_text(json.dumps(
            _json_safe({"args": vars(args), "pipelines": PIPELINES, "results": results}),
            indent=2, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
