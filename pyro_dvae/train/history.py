"""The run's history (``history.json``), its plot (``loss.png``), the progress bar and log lines."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

from ..atomic import atomic_write


def new_history(model, guide) -> dict:
    """The history of a fresh run: per-epoch lists, best epoch, status ``"running"``."""
    return {"epoch": [], "train_loss": [], "val_loss": [], "beta": [], "seconds": [],
            "best_epoch": None, "best_val_loss": None, "status": "running",
            "loss": "negative VLB per frame (nats)",
            "title": f"{model.name} / {guide.name}"}


def record_epoch(history: dict, epoch: int, train_loss: float, val_loss: Optional[float],
                 beta: float, seconds: float) -> None:
    """Append one epoch's numbers (``epoch`` 1-based) to ``history``."""
    record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "beta": beta,
              "seconds": seconds}
    for key, value in record.items():
        history[key].append(value)


def plot_history(history: dict, path: Union[str, Path]) -> None:
    """Train and validation loss per epoch to a PNG (an Agg canvas: pyplot's backend is left
    alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ep = history["epoch"]
    warmup = any(b < 1 for b in history.get("beta", []))
    ax.plot(ep, history["train_loss"], "o-", ms=3,
            label="train (beta-weighted in warm-up)" if warmup else "train")
    if any(v is not None for v in history["val_loss"]):
        ax.plot(ep, [math.nan if v is None else v for v in history["val_loss"]], "o-", ms=3,
                label="validation")
    if history.get("best_epoch"):
        ax.axvline(history["best_epoch"], color="gray", ls=":", label="best")
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative VLB per frame (nats)")
    ax.set_title(history.get("title", ""))
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))


def progress_bar(enabled: bool, total: int, initial: int, epoch: int, epochs: int):
    """A tqdm bar over the batches of ``epoch`` (0-based), or ``None``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                leave=False, dynamic_ncols=True)


def log(message: str) -> None:
    """Print a line without breaking a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(message)


def epoch_line(history: dict, improved: bool, bad_epochs: int, epochs: int, patience: int,
               kl_warmup: int) -> str:
    """The log line of the last epoch of ``history``."""
    val_loss, beta = history["val_loss"][-1], history["beta"][-1]
    return (f"epoch {history['epoch'][-1]}/{epochs}  train {history['train_loss'][-1]:.4f}  "
            + ("" if val_loss is None else f"val {val_loss:.4f}  ")
            + ("(best)  " if improved else f"(no improvement {bad_epochs}/{patience})  ")
            + (f"beta {beta:.2f}  " if kl_warmup else "")
            + f"{history['seconds'][-1]:.1f} s")
