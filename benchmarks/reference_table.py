"""The authors' trained WSJ0 models, imported and scored by pyro-dvae: Table 13.1 on our test set.

Imports each of the authors' DVAE-speech checkpoints (``pyro_dvae.reference.import_reference``, the
same as ``pyro-dvae import-reference``) into ``OUT/runs/<model>/``, evaluates it with
``pyro_dvae.speech.evaluate_run`` (the whole test utterances of ``--data``, every metric, the
reference's trimming and framing, latents at their guide means) and writes to ``--out``:

- ``table.md``: every metric's test-set mean and median [95 % confidence interval], and Table 13.1
  of the paper (WSJ0 test set) beside our scores on the same scales (RMSE-paper, PESQ-paper,
  STOI), with ``--val-loss`` each model's validation loss on ``DATA/val``;
- ``results.json``: the summaries, the checkpoint of each row and the evaluation settings; the
  per-file scores are in ``OUT/runs/<model>/eval_test.json`` / ``.csv``.

Not a unit test.  Example (the numbers in README.md)::

    nice python benchmarks/reference_table.py --data ../shared/data/speech16k \\
        --reference ../shared/reference/DVAE-speech/saved_model --val-loss \\
        --out benchmarks/results/reference

``--reuse`` keeps runs (and their evaluations) already in ``OUT/runs/``.  The imported weights
(``best.pt``) are not committed: the command recreates them from the checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def checkpoints(reference: Path) -> list:
    """``[(config.ini, checkpoint.pt)]`` of every run folder under ``reference``."""
    found = []
    for run in sorted(p for p in reference.iterdir() if p.is_dir()):
        pts = sorted(run.glob("*_final_epoch*.pt"))
        if (run / "config.ini").is_file() and len(pts) == 1:
            found.append((run / "config.ini", pts[0]))
    return found


def import_and_evaluate(config: Path, checkpoint: Path, args, out: Path) -> dict:
    """One checkpoint: import it (or reuse the import), evaluate it on the test split."""
    from pyro_dvae.reference import import_reference, options_from_config, read_config
    from pyro_dvae.speech import evaluate_run

    name = options_from_config(read_config(config))[0]
    run_dir = out / "runs" / name
    if not (args.reuse and (run_dir / "best.pt").is_file()):
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists; remove it or pass --reuse")
        import_reference(checkpoint, run_dir, config)
    cached = run_dir / "eval_test.json"
    t0 = time.perf_counter()
    if args.reuse and cached.is_file():
        result = json.loads(cached.read_text())
    else:
        result = evaluate_run(run_dir, args.data, "test", workers=args.workers, progress=False)
    return {"model": name, "checkpoint": str(checkpoint), "run_dir": str(run_dir),
            "summary": result["summary"], "n_files": result["n_files"],
            "framing": result.get("framing"), "eval_seconds": time.perf_counter() - t0,
            "val_loss": validation_loss(run_dir, args.data) if args.val_loss else None}


def validation_loss(run_dir: Path, data: str) -> float:
    """The imported model's negative VLB per frame on ``DATA/val`` (sequences of T = 150): the
    validation loss ``pyro-dvae fit`` reports, so that a run trained on ``DATA`` can be set
    beside it."""
    import warnings

    from pyro_dvae.data.datasets import load_splits
    from pyro_dvae.train import load_run
    from pyro_dvae.train.validation import evaluate_loss

    model, guide, _ = load_run(run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short pieces left out, as in training
        val = load_splits(data, 150, ("val",))["val"]
    return evaluate_loss(model, guide, val)


def side_by_side(results: list) -> str:
    """Our test-set means next to Table 13.1's, on the paper's scales."""
    from pyro_dvae.speech import PAPER_TABLE

    lines = ["| model | RMSE-paper (ours) | RMSE (paper) | PESQ-paper (ours) | PESQ (paper) "
             "| STOI (ours) | STOI (paper) |", "|" + "---|" * 7]
    if any(r.get("val_loss") is not None for r in results):
        lines[0] += " validation loss on DATA/val |"
        lines[1] += "---|"
    for r in results:
        s, p = r["summary"], PAPER_TABLE.get(r["model"], {})
        tail = f" {r['val_loss']:.1f} |" if r.get("val_loss") is not None else ""
        lines.append(f"| {p.get('label', r['model'])} | {s['rmse_paper']['mean']:.4f} | "
                     f"{p.get('rmse', float('nan')):.4f} | {s['pesq_paper']['mean']:.2f} | "
                     f"{p.get('pesq', float('nan')):.2f} | {s['stoi']['mean']:.3f} | "
                     f"{p.get('stoi', float('nan')):.2f} |" + tail)
    return "\n".join(lines)


def write_all(results: list, args, out: Path) -> str:
    import torch

    from pyro_dvae.speech import PAPER_TABLE, _json_safe, format_table

    order = list(PAPER_TABLE)  # the paper's row order
    results = sorted(results, key=lambda r: order.index(r["model"]) if r["model"] in order
                     else len(order))
    summaries = {r["model"]: r["summary"] for r in results}
    first = results[0]
    text = "\n".join([
        f"The authors' WSJ0 checkpoints ({args.reference}), imported by pyro-dvae and evaluated "
        f"on {first['n_files']} test utterances of {args.data} (whole, silence trimmed as the "
        f"reference, its framing; latents at their guide means); torch {torch.__version__}, "
        f"Python {platform.python_version()}.",
        "",
        "Test-set means, every metric:",
        "",
        format_table(summaries, "mean"),
        "",
        "Test-set medians [95 % confidence interval]:",
        "",
        format_table(summaries, "median"),
        "",
        "On the paper's scales, beside Table 13.1 (WSJ0 test set; the same checkpoints):",
        "",
        side_by_side(results),
        "",
    ])
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        _json_safe({"args": vars(args), "results": results}), indent=2, default=str) + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with a test/ split")
    p.add_argument("--reference", default="../shared/reference/DVAE-speech/saved_model",
                   help="folder of the authors' run folders (config.ini + *_final_epochN.pt)")
    p.add_argument("--models", default="",
                   help="comma-separated model names to keep (default: every checkpoint)")
    p.add_argument("--workers", type=int, default=0, help="metric worker processes")
    p.add_argument("--out", default="benchmarks/results/reference")
    p.add_argument("--reuse", action="store_true",
                   help="reuse imports and evaluations found in OUT/runs/")
    p.add_argument("--val-loss", action="store_true",
                   help="also each model's validation loss on DATA/val (negative VLB per frame)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = checkpoints(Path(args.reference))
    if not found:
        p.error(f"no run folders with config.ini and one *_final_epoch*.pt in {args.reference}")
    keep = {m.strip() for m in args.models.split(",") if m.strip()}
    results = []
    from pyro_dvae.reference import options_from_config, read_config

    for config, checkpoint in found:
        if keep and options_from_config(read_config(config))[0] not in keep:
            continue
        r = import_and_evaluate(config, checkpoint, args, out)
        s = r["summary"]
        print(f"{r['model']}: RMSE-paper {s['rmse_paper']['mean']:.4f} PESQ-paper "
              f"{s['pesq_paper']['mean']:.2f} STOI {s['stoi']['mean']:.3f} "
              f"({r['eval_seconds']:.0f} s)", flush=True)
        results.append(r)
        text = write_all(results, args, out)  # after every model: partial results survive
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
