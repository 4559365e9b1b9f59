"""Speech analysis-resynthesis (13.2-13.3): resynthesis, test-set evaluation and generation.

Resynthesis (13.2.1, SPEC section 4): the power spectrogram x = |STFT|^2 of a waveform goes through
the guide (encoding, latents at their guide means) and the model's decoder; the decoder's Gamma mean
E[x_t] = sigma^2_t (the variance of the circular complex Gaussian STFT coefficient) is taken as the
power spectrogram, combined with the input's phase, and inverted by the STFT's weighted overlap-add
(:func:`pyro_dvae.data.stft.istft`), giving a waveform of the input's length.  The waveform is
peak-normalised to [-1, 1] before analysis (the scale the training sequences have) and the output
is scaled back, so it comes out at the input's scale.

Evaluation (13.2.2-13.2.3): every utterance of a split, whole (leading and trailing silence
removed, variable length), is resynthesised and scored with :mod:`pyro_dvae.metrics`; the per-file
values and their summaries (mean, median with a distribution-free 95 % confidence interval) are
written to JSON and CSV.

Generation: :meth:`DVAE.generate` samples z and x from the prior (a predictive model feeds back its
own samples); the decoder's power spectrogram sigma^2 has no phase, which :func:`griffin_lim`
estimates (Griffin and Lim, 1984, with the momentum of Perraudin et al., 2013).

All files are written atomically (temporary file in the target folder, then ``os.replace``), and
nothing is written before all results are computed, so a failure leaves no partial output.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import metrics as M
from .atomic import create_temp
from .data.stft import HOP, SAMPLE_RATE, istft, num_frames, power_spectrogram, spectrogram_from
from .data.stft import stft as _stft

PathLike = Union[str, os.PathLike]

#: a reconstruction: power spectrogram (batch, T, F) -> power spectrogram (batch, T, F)
Reconstructor = Callable[[torch.Tensor], torch.Tensor]

#: Table 13.1 of the paper (WSJ0).  Its PESQ is the raw P.862 narrowband score on the 16 kHz
#: signals (the authors' pypesq; our ``pesq_paper``), its RMSE the authors' least-squares-gain
#: variant (our ``rmse_paper``)
PAPER_TABLE = {
    "vae": {"label": "VAE", "rmse": 0.0510, "pesq": 2.05, "stoi": 0.86},
    "dkf": {"label": "DKF", "rmse": 0.0344, "pesq": 3.30, "stoi": 0.94},
    "storn": {"label": "STORN", "rmse": 0.0338, "pesq": 3.05, "stoi": 0.93},
    "vrnn": {"label": "VRNN", "rmse": 0.0267, "pesq": 3.60, "stoi": 0.96},
    "srnn": {"label": "SRNN", "rmse": 0.0248, "pesq": 3.64, "stoi": 0.97},
    "rvae-causal": {"label": "RVAE-Causal", "rmse": 0.0499, "pesq": 2.27, "stoi": 0.89},
    "rvae-noncausal": {"label": "RVAE-NonCausal", "rmse": 0.0479, "pesq": 2.37, "stoi": 0.89},
    "dsae": {"label": "DSAE", "rmse": 0.0469, "pesq": 2.32, "stoi": 0.90},
}


# ---- resynthesis -----------------------------------------------------------------------------
def model_reconstructor(model, guide, sample: bool = False) -> Reconstructor:
    """``x -> model.reconstruct(guide, x)``: E[x_t | z] with z at the guide's means (the Gamma
    mean sigma^2 for the Itakura-Saito likelihood), in the model's dtype and device.

    ``sample=True``: z drawn from the guide instead (the reference implementation draws z even in
    eval mode, so its published scores come from one draw per file; seed with ``pyro.set_rng_seed``
    for repeatable numbers)."""
    param = next(model.parameters())

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return model.reconstruct(guide, x.to(param.dtype).to(param.device), sample=sample).cpu()

    return reconstruct


def identity_reconstructor(x: torch.Tensor) -> torch.Tensor:
    """The "model" that passes the input power through (the resynthesis chain's exactness test)."""
    return x


@dataclass
class Resynthesis:
    """A resynthesised waveform (at the input's scale), the spectrograms behind it ((T, 257),
    float32) and the input waveform."""

    wave: np.ndarray
    power: np.ndarray
    recon_power: np.ndarray
    original: np.ndarray


#: how many STFT frames analyse a signal of L samples, and how many samples come back
FRAMINGS = ("all", "reference")


def resynthesize(reconstruct: Reconstructor, wave: np.ndarray,
                 frames: str = "all") -> Resynthesis:
    """Analysis-resynthesis of one waveform (L,) at 16 kHz through ``reconstruct``.

    The waveform is divided by its peak, analysed (power and phase), the power reconstructed, then
    ``sqrt(power_hat) exp(i phase)`` inverted (weighted overlap-add) and multiplied by the peak
    again.  ``frames``:

    - ``"all"``: 1 + ceil(L / 256) frames (:mod:`pyro_dvae.data.stft`), and all L samples back;
    - ``"reference"``: the reference implementation's framing, 1 + floor(L / 256) frames (the same
      frames without our last one, which covers the L mod 256 samples past the last full hop),
      and 256 floor(L / 256) samples back, the length of its inverse STFT.  ``original`` is then
      the input cut to that length, the signal the reference scores against.  A signal shorter
      than one hop has no such frames and is handled as with ``"all"``.

    Raises ``ValueError`` for an empty or all-zero waveform.
    """
    if frames not in FRAMINGS:
        raise ValueError(f"frames must be one of {', '.join(FRAMINGS)}, got {frames!r}")
    wave = np.asarray(wave)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"resynthesis needs a non-empty mono waveform, got shape {wave.shape}")
    peak = float(np.max(np.abs(wave)))
    if not math.isfinite(peak) or peak == 0:
        raise ValueError("resynthesis needs a waveform that is finite and not all zeros")
    power, phase = power_spectrogram(wave.astype(np.float64) / peak)
    length = wave.size
    if frames == "reference" and wave.size >= HOP:
        length = HOP * (wave.size // HOP)
        power, phase = power[:num_frames(length)], phase[:num_frames(length)]
    x = torch.from_numpy(np.ascontiguousarray(power))[None]
    with torch.no_grad():
        recon = reconstruct(x)
    recon = recon.detach().cpu()
    if recon.shape != x.shape:
        raise ValueError(f"the reconstruction has shape {tuple(recon.shape)}, "
                         f"the input {tuple(x.shape)}")
    if not torch.isfinite(recon).all():
        raise ValueError("the model's reconstruction holds NaN or infinite values")
    recon = recon[0].to(torch.float64).numpy()
    spec = spectrogram_from(recon, phase.astype(np.float64))
    out = istft(spec, length) * peak
    return Resynthesis(out.astype(np.float32), np.ascontiguousarray(power),
                       recon.astype(np.float32), wave[:length])


# ---- Griffin-Lim and generation -----------------------------------------------------------------
def griffin_lim(power: torch.Tensor, length: Optional[int] = None, n_iter: int = 100,
                momentum: float = 0.99, seed: int = 0) -> torch.Tensor:
    """A waveform whose STFT magnitude approximates ``sqrt(power)`` (..., T, 257).

    Griffin and Lim (1984): alternate between imposing the target magnitude and projecting onto
    consistent spectrograms (STFT of the inverse STFT), with the "fast" momentum of Perraudin,
    Balazs and Sondergaard (2013) as in ``librosa.griffinlim``; random initial phase from ``seed``.
    Uses this package's STFT (sine window, hop 256).  Returns (..., length) float64.
    """
    power = torch.as_tensor(power, dtype=torch.float64)
    frames = power.shape[-2]
    length = (frames - 1) * HOP if length is None else int(length)
    mag = power.clamp_min(0).sqrt()
    gen = torch.Generator().manual_seed(int(seed))
    angles = torch.polar(torch.ones_like(mag),
                         2 * math.pi * torch.rand(mag.shape, generator=gen, dtype=torch.float64))
    rebuilt = torch.zeros_like(angles)
    for _ in range(int(n_iter)):
        previous = rebuilt
        rebuilt = _stft(istft(mag * angles, length))
        angles = rebuilt - (momentum / (1 + momentum)) * previous
        angles = angles / (angles.abs() + 1e-16)
    return istft(mag * angles, length)


def generate_waves(model, seconds: float, n: int = 1, n_iter: int = 100,
                   seed: int = 0) -> List[np.ndarray]:
    """Sample n sequences of ``seconds`` from the model's prior (:meth:`DVAE.generate`; predictive
    models feed back their own samples), take the decoder's power spectrogram sigma^2 (``"mean"``)
    and estimate its phase with :func:`griffin_lim`.  Returns n float32 waveforms of
    L = round(seconds * 16000) samples (the T frames of the STFT of L samples); a waveform whose
    peak exceeds 0.99 is scaled down to 0.99 so that 16-bit files do not clip."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"seconds must be positive, got {seconds}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    length = max(1, int(round(seconds * SAMPLE_RATE)))
    T = num_frames(length)
    torch.manual_seed(int(seed))
    out = model.generate(T, int(n))
    power = out["mean"].detach().cpu().to(torch.float64)
    if not torch.isfinite(power).all():
        raise ValueError("the model generated NaN or infinite power values")
    waves = griffin_lim(power, length, n_iter=n_iter, seed=seed).numpy()
    result = []
    for w in waves:
        peak = float(np.max(np.abs(w))) if w.size else 0.0
        if peak > 0.99:
            w = w * (0.99 / peak)
        result.append(w.astype(np.float32))
    return result


# ---- atomic output -----------------------------------------------------------------------------
class AtomicFiles:
    """Write several files so that either all appear under their final names or none does.

    ``path = files.temp(final)`` gives a temporary name in the final folder; :meth:`commit` renames
    them all into place; leaving the ``with`` block without commit (an error) removes them.
    Folders created for the outputs are removed again if they stay empty.
    """

    def __init__(self):
        self._pending: List[tuple] = []
        self._made_dirs: List[Path] = []

    def __enter__(self):
        return self

    def temp(self, final: PathLike) -> Path:
        final = Path(final)
        missing = []
        parent = final.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        final.parent.mkdir(parents=True, exist_ok=True)
        self._made_dirs.extend(missing)
        tmp = create_temp(final)  # mode 0o666 less the umask, like the final file should have
        self._pending.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending.clear()
        self._made_dirs.clear()

    def __exit__(self, *exc):
        for tmp, _ in self._pending:
            if tmp.exists():
                tmp.unlink()
        self._pending.clear()
        for d in self._made_dirs:  # innermost first
            try:
                d.rmdir()
            except OSError:
                pass
        return False


def _write_wave(path: Path, wave: np.ndarray, fmt: str) -> None:
    import soundfile as sf

    sf.write(str(path), np.clip(wave, -1.0, 1.0), SAMPLE_RATE, format=fmt)


def _audio_format(path: PathLike) -> str:
    import soundfile as sf

    fmt = Path(path).suffix.lstrip(".").upper()
    if not fmt or fmt not in sf.available_formats():
        raise ValueError(f"{path}: cannot tell the audio format from the name; use .wav or .flac")
    return fmt


def save_waves(items: Mapping[PathLike, np.ndarray]) -> List[Path]:
    """Write {path: waveform} as 16 kHz audio files (format from the extension), all or none."""
    formats = {Path(p): _audio_format(p) for p in items}
    with AtomicFiles() as files:
        for p, wave in items.items():
            _write_wave(files.temp(p), wave, formats[Path(p)])
        files.commit()
    return list(formats)


# ---- one file: resynth with plot ---------------------------------------------------------------
def plot_spectrograms(target, original: np.ndarray, reconstructed: np.ndarray, title: str = "",
                      fmt: str = "png") -> None:
    """Save log-power spectrograms (T, 257) of the original and the resynthesis side by side to
    ``target`` (a path or a binary file object) in image format ``fmt``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    db = [10 * np.log10(np.maximum(p, 1e-10)) for p in (original, reconstructed)]
    vmax = max(float(d.max()) for d in db)
    seconds = original.shape[0] * HOP / SAMPLE_RATE
    for ax, d, name in zip(axes, db, ("original", "reconstruction")):
        im = ax.imshow(d.T, origin="lower", aspect="auto", cmap="magma", vmin=vmax - 80,
                       vmax=vmax, extent=(0, seconds, 0, SAMPLE_RATE / 2000))
        ax.set_title(name)
        ax.set_xlabel("time (s)")
    axes[0].set_ylabel("frequency (kHz)")
    fig.colorbar(im, ax=list(axes), label="power (dB)")
    if title:
        fig.suptitle(title)
    fig.savefig(target, format=fmt)


def _image_format(path: PathLike) -> str:
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix.lstrip(".").lower()
    if fmt not in FigureCanvasBase.get_supported_filetypes():
        raise ValueError(f"{path}: cannot tell the image format from the name; use .png")
    return fmt


def resynth_file(model, guide, in_path: PathLike, out_path: PathLike,
                 plot: Optional[PathLike] = None) -> Resynthesis:
    """Read any audio file (resampled to 16 kHz mono), resynthesise it, write ``out_path`` (and the
    spectrogram plot), all or nothing.  Raises ``AudioError`` (a ``ValueError``) for a missing,
    unreadable, empty or silent file."""
    from .data.audio import load_audio, trim_bounds

    fmt = _audio_format(out_path)
    img_fmt = _image_format(plot) if plot is not None else None
    wave = load_audio(in_path)
    trim_bounds(wave, name=str(in_path))  # raises on silence only
    result = resynthesize(model_reconstructor(model, guide), wave)
    with AtomicFiles() as files:
        _write_wave(files.temp(out_path), result.wave, fmt)
        if plot is not None:
            buf = io.BytesIO()
            plot_spectrograms(buf, result.power, result.recon_power, Path(in_path).name, img_fmt)
            files.temp(plot).write_bytes(buf.getvalue())
        files.commit()
    return result


# ---- test-set evaluation (13.2.2-13.2.3) --------------------------------------------------------
def _score(name: str, reference: np.ndarray, estimate: np.ndarray, metrics: Sequence[str]) -> dict:
    reasons: dict = {}
    values = M.compute_metrics(reference, estimate, SAMPLE_RATE, metrics, reasons)
    notes = "; ".join(f"{m}: {why}" for m, why in reasons.items())
    return {"file": name, **values, "notes": notes}


def evaluate(reconstruct: Reconstructor, utterances: Iterable, workers: int = 0,
             progress: bool = True, metrics: Sequence[str] = tuple(M.METRICS),
             frames: str = "reference") -> dict:
    """Resynthesise every utterance whole and score it against the original.

    ``utterances``: objects with ``name`` and ``wave`` (16 kHz, silence already trimmed, as
    :func:`pyro_dvae.data.datasets.load_utterances` gives them).  ``frames``: the framing of
    :func:`resynthesize`; by default the reference implementation's, so that its models are scored
    on the signals it scored (``"all"`` scores every sample).  The model runs in this process; with
    ``workers`` > 0 the metrics (PESQ and STOI dominate) run in that many worker processes.
    Returns ``{"framing": frames, "per_file": [{file, seconds (the length scored), frames,
    metric: value, ..., notes}], "summary": {metric: summary}, "seconds_resynthesis": ...,
    "seconds_total": ...}``; a metric that is undefined on a file (STOI of fewer than 30 speech
    frames, PESQ without an utterance or where the pesq library crashes) is NaN there, with the
    reason in the file's ``notes``, and skipped in the summary (``n_skipped``).
    """
    from tqdm import tqdm

    metrics = list(metrics)
    utterances = list(utterances)
    if not utterances:
        raise ValueError("no utterances to evaluate")
    start = time.perf_counter()
    info, jobs = [], []
    pool = None
    if workers and workers > 0:
        import multiprocessing

        pool = ProcessPoolExecutor(max_workers=int(workers),
                                   mp_context=multiprocessing.get_context("spawn"))
    t_model = 0.0
    try:
        bar = tqdm(utterances, desc="resynthesis", unit="file", disable=not progress,
                   dynamic_ncols=True)
        for utt in bar:
            wave = np.asarray(utt.wave, dtype=np.float32)
            t0 = time.perf_counter()
            res = resynthesize(reconstruct, wave, frames)
            t_model += time.perf_counter() - t0
            info.append({"file": utt.name, "seconds": res.original.size / SAMPLE_RATE,
                         "frames": res.power.shape[0]})
            if pool is None:
                jobs.append(_score(utt.name, res.original, res.wave, metrics))
            else:
                jobs.append(pool.submit(_score, utt.name, res.original, res.wave, metrics))
        if pool is not None:
            bar = tqdm(jobs, desc="metrics", unit="file", disable=not progress,
                       dynamic_ncols=True)
            jobs = [job.result() for job in bar]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    rows = []
    for meta, scores in zip(info, jobs):
        assert meta["file"] == scores["file"]
        rows.append({**meta, **{m: scores[m] for m in metrics}, "notes": scores["notes"]})
    return {"framing": frames, "per_file": rows, "summary": M.summarize_table(rows, metrics),
            "seconds_resynthesis": t_model, "seconds_total": time.perf_counter() - start}


def _json_safe(obj):
    """NaN -> null, +-inf -> "inf" / "-inf" (strict JSON has neither)."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    return obj


def _csv_text(rows: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def write_results(result: dict, json_path: PathLike, csv_path: Optional[PathLike] = None) -> tuple:
    """Write the evaluation ``result`` to JSON and its per-file rows to CSV (default: the JSON
    path with ``.csv``), both or neither."""
    json_path = Path(json_path)
    csv_path = json_path.with_suffix(".csv") if csv_path is None else Path(csv_path)
    if csv_path == json_path:
        csv_path = json_path.with_name(json_path.name + ".csv")
    text = json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n"
    with AtomicFiles() as files:
        files.temp(json_path).write_text(text)
        files.temp(csv_path).write_text(_csv_text(result["per_file"]))
        files.commit()
    return json_path, csv_path


def evaluate_run(run_dir: PathLike, data: Optional[PathLike] = None, split: str = "test",
                 out: Optional[PathLike] = None, workers: int = 0, progress: bool = True,
                 which: str = "best", frames: str = "reference", device="cpu") -> dict:
    """``pyro-dvae evaluate``: load a run, resynthesise and score every utterance of ``split`` of
    ``data`` (default: the data the run was trained on, recorded in its config.json; ``None``
    there means the built-in corpus), write JSON and CSV (default ``RUN_DIR/eval_<split>.json``).
    ``frames``: see :func:`evaluate`.  The model runs on ``device``.  Returns the result dict with
    ``json`` and ``csv`` paths added."""
    from .data.datasets import load_utterances
    from .train import load_run

    run_dir = Path(run_dir)
    model, guide, config = load_run(run_dir, which, device)
    if data is None:
        data = config.get("data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        utterances = load_utterances(data, split)
    skipped = [str(w.message) for w in caught]
    for message in skipped:  # unreadable or silent files: named, and recorded in the result
        warnings.warn(message, stacklevel=2)
    result = evaluate(model_reconstructor(model, guide), utterances, workers=workers,
                      progress=progress, frames=frames)
    result = {"run": str(run_dir), "model": config.get("model"), "guide": config.get("guide"),
              "checkpoint": f"{which}.pt", "data": None if data is None else str(data),
              "split": split, "n_files": len(result["per_file"]), "skipped_files": skipped,
              **result}
    out = run_dir / f"eval_{split}.json" if out is None else Path(out)
    json_path, csv_path = write_results(result, out)
    result["json"], result["csv"] = str(json_path), str(csv_path)
    return result


# ---- Table 13.1 ----------------------------------------------------------------------------------
TABLE_COLUMNS = ("rmse", "rmse_paper", "pesq_wb", "pesq_nb", "pesq_paper", "stoi", "estoi",
                 "si_sdr")
_DIGITS = {"rmse": 4, "rmse_paper": 4, "pesq_wb": 2, "pesq_nb": 2, "pesq_paper": 2, "stoi": 3,
           "estoi": 3, "si_sdr": 1}


def _cell(summary: Mapping, metric: str, stat: str) -> str:
    s = summary.get(metric)
    if not s or s.get("n", 0) == 0:
        return "–"
    d = _DIGITS[metric]
    if stat == "median":
        text = (f"{s['median']:.{d}f} [{s['median_ci_low']:.{d}f}, "
                f"{s['median_ci_high']:.{d}f}]")
    else:
        text = f"{s['mean']:.{d}f}"
    if s.get("n_skipped"):
        text += f" ({s['n_skipped']} skipped)"
    return text


def format_table(summaries: Mapping[str, Mapping], stat: str = "mean",
                 columns: Sequence[str] = TABLE_COLUMNS, extra: Optional[Mapping] = None) -> str:
    """A markdown table shaped like Table 13.1: one row per model (``{label: summary}``), columns
    RMSE, RMSE-paper, PESQ-WB, PESQ-NB, PESQ-paper, STOI, ESTOI, SI-SDR; ``stat`` "mean" or
    "median" (with its 95 % confidence interval).  ``extra``: ``{column title: {label: text}}``
    appended columns."""
    extra = dict(extra or {})
    head = ["model"] + [M.METRICS[c][0] for c in columns] + list(extra)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, summary in summaries.items():
        cells = [label] + [_cell(summary, c, stat) for c in columns]
        cells += [str(col.get(label, "")) for col in extra.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_paper_table(names: Optional[Sequence[str]] = None) -> str:
    """Table 13.1 of the paper (WSJ0), for reference beside ours (its columns are on the scales
    of our RMSE-paper, PESQ-paper and STOI)."""
    names = list(PAPER_TABLE) if names is None else [n for n in names if n in PAPER_TABLE]
    lines = ["| model (paper, WSJ0) | RMSE-paper | PESQ-paper | STOI |", "|---|---|---|---|"]
    for n in names:
        p = PAPER_TABLE[n]
        lines.append(f"| {p['label']} | {p['rmse']:.4f} | {p['pesq']:.2f} | {p['stoi']:.2f} |")
    return "\n".join(lines)
