"""Training: stochastic variational inference on the VLB (4.22/4.24) with Adam (13.2.2).

:func:`fit` maximises the variational lower bound with Pyro's ``Trace_ELBO`` (default) or
``TraceMeanField_ELBO`` (analytic KL per time step, as the paper computes it).  Each step is what
``pyro.infer.SVI(model.model, guide, pyro.optim.Adam(...), Trace_ELBO()).step(...)`` does -- the
ELBO's ``differentiable_loss``, backward, an Adam step over the model's and the guide's parameters
-- written out so that the optimiser is a plain ``torch.optim.Adam`` whose state is a tensors-only
``state_dict``: checkpoints load with ``torch.load(..., weights_only=True)`` and ``resume``
continues exactly.  The objective is the dataset-scaled loss divided by the constant N x T (N
sequences of T frames), the reference implementation's normalisation; Adam is invariant to a
constant factor (up to its eps), so the steps are SVI's.

The package, imports pointing one way (each module imports only those above it):

- :mod:`.config`: :class:`TrainConfig`, the ELBOs, the KL warm-up schedule :func:`kl_beta`;
- :mod:`.checkpoint`: ``last.pt`` / ``best.pt`` / ``config.json``, :func:`load_run`;
- :mod:`.rundir`: the run folder's lock and the truthful status of its run;
- :mod:`.batches`: the epoch's order of the sequences, (x, mask) batches;
- :mod:`.validation`: the validation loss :func:`evaluate_loss`;
- :mod:`.distributed`: data-parallel training under torchrun;
- :mod:`.history`: ``history.json``, ``loss.png``, progress bar and log lines;
- :mod:`.interrupt`: Ctrl-C and SIGTERM;
- :mod:`.loop`: the SVI loop, :func:`fit`.

What a run directory holds (all files written atomically, :mod:`pyro_dvae.atomic`: temporary
file, then ``os.replace``; modes from the umask):

- ``config.json``: model, guide, x_dim, z_dim, u_dim, likelihood, model options, training config
  and whatever the caller adds (``meta``; the CLI adds the data path and sequence length).
- ``history.json``: per-epoch train and validation loss (negative VLB per frame, nats), beta, time,
  best epoch, status (``"running"``, ``"finished"``, ``"early_stopped"``, ``"interrupted"``,
  ``"crashed"`` with the ``"error"``; :func:`~pyro_dvae.train.rundir.run_status` tells a
  ``"running"`` left by a killed process); ``loss.png`` plots it.
- ``.lock`` while a run writes the folder (:class:`~pyro_dvae.train.rundir.RunFolderLock`).
- ``best.pt``: copies of the weights of the epoch with the lowest validation loss.
- ``last.pt``: everything needed to continue exactly: weights, optimiser state, epoch and batch
  position, best validation loss, patience counter, history, torch RNG state.

Early stopping (13.2.2): training stops when the validation loss has not improved for ``patience``
epochs (warm-up epochs do not count).  KL warm-up: the latent terms are weighted by a beta that
rises linearly, step by step, from 0 to 1 over the first ``kl_warmup`` epochs (:func:`kl_beta`);
the validation loss always uses beta = 1.

Ctrl-C or SIGTERM during training finishes the current batch, saves ``last.pt`` and raises
:class:`TrainingInterrupted`; ``fit(..., resume=True)`` (``pyro-dvae fit --resume``) continues from
that batch and reaches the same parameters as an uninterrupted run with the same seed.  ``last.pt``
is written when the run starts and after every epoch, so a run is resumable from its first batch
on, and a checkpoint that cannot be written (a full disk) leaves the previous one in place.
"""

from .batches import epoch_permutation, iterate_batches
from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, load_run,
                         run_config, save_checkpoint, write_json)
from .config import ELBOS, TrainConfig, kl_beta
from .history import plot_history
from .interrupt import TrainingInterrupted
from .loop import TrainingRun, fit
from .rundir import RunFolderBusy, run_status
from .validation import evaluate_loss, loss_sums

__all__ = ["CHECKPOINT_FORMAT", "ELBOS", "CheckpointError", "RunFolderBusy", "TrainConfig",
           "TrainingInterrupted", "TrainingRun", "epoch_permutation", "evaluate_loss", "fit",
           "iterate_batches", "kl_beta", "load_checkpoint", "load_run", "loss_sums",
           "plot_history", "run_config", "run_status", "save_checkpoint", "write_json"]
