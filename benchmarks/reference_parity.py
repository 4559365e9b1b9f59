"""How close pyro-dvae's imported models are to the authors' own outputs (reference/expected/).

For each of the seven released checkpoints: :func:`pyro_dvae.reference.import_reference` into a
temporary run directory, :func:`pyro_dvae.train.load_run`, then
:func:`pyro_dvae.reference.outputs_at_means` on the stored input ``x`` (every z_t at its guide mean
during the recursion).  Prints, per model and tensor, the largest absolute difference to the
reference, that difference divided by the reference tensor's largest magnitude, and the largest
elementwise relative difference where |reference| >= 1e-3 (the columns of
``reference/expected/README.md``).  The loss terms are compared after the documented offsets
(reference KL = proper KL + z_dim / 2 per frame).  Not a unit test (tests/test_reference.py checks
the tolerances).  Example::

    python benchmarks/reference_parity.py --reference /work/shared/reference
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import torch

    from pyro_dvae.reference import import_reference, outputs_at_means
    from pyro_dvae.train import load_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=Path("/work/shared/reference"),
                        help="folder with DVAE-speech/ and expected/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    meta = json.loads((args.reference / "expected" / "expected.json").read_text())
    print("| model | tensor | max abs diff | / max abs ref | max elementwise rel |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, entry in meta["models"].items():
            run = import_reference(args.reference / "DVAE-speech" / entry["checkpoint"],
                                   Path(tmp) / name)
            model, guide, _ = load_run(run)
            ref = torch.load(args.reference / "expected" / entry["file"], weights_only=True)
            out = outputs_at_means(model, guide, ref["x"])
            half_z = model.z_dim / 2
            total = out["is_"].double().mean() + out["kl"].double().mean()
            pairs = {k: (out[k], ref[k]) for k in ("enc_mean", "enc_logvar", "prior_mean",
                                                   "prior_logvar", "dec_logvar") if k in ref}
            pairs["is_per_frame"] = (out["is_"], ref["is_per_frame"])
            pairs["kl_per_frame"] = (out["kl"] + half_z, ref["kl_per_frame"])
            pairs["loss_total"] = (total + half_z, torch.tensor(entry["loss_total"]))
            pairs["loss_total_proper"] = (total, torch.tensor(entry["loss_total_proper"]))
            for key, (a, b) in pairs.items():
                a, b = a.double(), b.double()
                diff = (a - b).abs()
                big = b.abs() >= 1e-3
                rel = (diff[big] / b.abs()[big]).max().item() if bool(big.any()) else float("nan")
                print(f"| {name} | {key} | {diff.max().item():.2g} | "
                      f"{diff.max().item() / b.abs().max().item():.2g} | {rel:.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
