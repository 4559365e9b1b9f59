"""Real-time factor of speech resynthesis on CPU (the numbers in README.md, Results).

For each run directory: resynthesis of the first ``--seconds`` of an audio file (analysis, guide and
decoder, overlap-add; :func:`pyro_dvae.speech.resynthesize`), best of ``--repeats``, after a warm-up
on one second.  RTF = processing time / audio duration.  Not a unit test.  Example::

    python benchmarks/resynth_rtf.py \\
        --audio ../shared/data/speech16k/test/en_US_f_Allison__demo-abouttotry.flac \\
        benchmarks/results/speech16k/runs/*

The whole command (``time pyro-dvae resynth --checkpoint RUN IN.wav OUT.wav``) adds Python start-up
and imports, about 2 s on the benchmark machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import torch

    from pyro_dvae import speech
    from pyro_dvae.data.audio import load_audio
    from pyro_dvae.train import load_run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (pyro-dvae fit)")
    p.add_argument("--audio", required=True, help="an audio file at least --seconds long")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    wave = load_audio(args.audio)
    n = int(round(args.seconds * 16000))
    if wave.size < n:
        p.error(f"{args.audio} is {wave.size / 16000:.1f} s long, shorter than --seconds")
    wave = wave[:n]
    for run in args.runs:
        model, guide, config = load_run(run)
        reconstruct = speech.model_reconstructor(model, guide)
        speech.resynthesize(reconstruct, wave[:16000])  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            speech.resynthesize(reconstruct, wave)
            times.append(time.perf_counter() - t0)
        best = min(times)
        print(f"{config['model']:<16s} {best:.3f} s for {args.seconds:g} s of audio, "
              f"RTF {best / args.seconds:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
