"""The toy data set of the training tests: positive (power-spectrogram-like) sequences, every third
with a padded tail.  Imported by test_train.py and test_faults.py, and by test_distributed.py,
which also runs as a script in its worker processes."""

import torch


class Synthetic(torch.utils.data.Dataset):
    """n sequences of T frames of F positive values; with ``pad`` every third sequence is padded
    (mask False, values 0) from frame T // 2 on."""

    def __init__(self, n=20, seed=0, T=8, F=6, pad=True, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        base = torch.rand(n, 1, F, generator=g, dtype=dtype) + 0.1
        self.x = base * (torch.rand(n, T, F, generator=g, dtype=dtype) + 0.05)
        self.mask = torch.ones(n, T, dtype=torch.bool)
        if pad:
            self.mask[::3, T // 2:] = False
            self.x[~self.mask] = 0.0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.mask[i]
