"""Array files (.npz) as a data source: the three layouts, driven inputs, and every bad file."""

import numpy as np
import pytest
import torch

from pyro_dvae.data import (
    DataError,
    is_array_file,
    load_array_sequences,
    load_array_splits,
    load_splits,
    read_arrays,
)


def _seqs(lengths, F=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, F)).astype(np.float32) for n in lengths]


def _concat(path, **splits):
    """Write splits given as lists of (T_i, F) arrays as concatenated arrays with lengths."""
    arrays = {}
    for name, seqs in splits.items():
        arrays[name] = np.concatenate(seqs)
        arrays[f"{name}_lengths"] = np.array([len(s) for s in seqs])
    np.savez(path, **arrays)
    return path


def test_fixed_length_layout(tmp_path):
    x = np.random.default_rng(1).random((4, 7, 5))
    path = tmp_path / "d.npz"
    np.savez(path, train=x, val=x[:2], test=x[:1])
    data = load_array_splits(path, seq_len=7)
    assert set(data) == {"train", "val"}
    ds = data["train"]
    assert ds.x.shape == (4, 7, 5) and ds.x.dtype == torch.float32 and ds.mask.all()
    assert torch.allclose(ds.x, torch.from_numpy(x).float())
    assert ds.names == ["train[0]", "train[1]", "train[2]", "train[3]"] and ds.u is None
    assert load_splits(path, seq_len=7, splits="test")["test"].x.shape == (1, 7, 5)
    assert is_array_file(path) and is_array_file("X.NPZ") and not is_array_file(tmp_path)
    assert not is_array_file(None)


def test_variable_lengths_are_cut_and_every_piece_kept(tmp_path):
    train = _seqs([5, 12, 1])
    path = _concat(tmp_path / "d.npz", train=train, val=_seqs([3], seed=1))
    ds = load_array_splits(path, seq_len=4)["train"]
    # 5 -> 4 + 1, 12 -> 4 + 4 + 4, 1 -> 1: nothing dropped, however short
    assert ds.mask.sum(1).tolist() == [4, 1, 4, 4, 4, 1] and ds.dropped == []
    assert ds.names == ["train[0]"] * 2 + ["train[1]"] * 3 + ["train[2]"]
    assert ds.offsets.tolist() == [0, 4, 0, 4, 8, 0]
    assert torch.equal(ds.x[1, :1], torch.from_numpy(train[0][4:]))
    assert (ds.x[1, 1:] == 0).all() and ds.num_frames == 18
    whole = load_array_sequences(path, "train")
    assert whole.x.shape == (3, 12, 3) and whole.mask.sum(1).tolist() == [5, 12, 1]
    assert torch.equal(whole.x[1], torch.from_numpy(train[1]))
    assert load_array_splits(path, seq_len=None)["val"].x.shape == (1, 3, 3)


def test_padded_layout_ignores_what_the_padding_holds(tmp_path):
    x = np.random.default_rng(2).random((3, 6, 2))
    x[0, 4:] = np.nan  # padding: never read
    x[2, 1:] = np.inf
    path = tmp_path / "d.npz"
    np.savez(path, train=x, train_lengths=np.array([4, 6, 1]), val=x[1:2])
    ds = load_array_sequences(path, "train")
    assert ds.mask.sum(1).tolist() == [4, 6, 1] and torch.isfinite(ds.x).all()
    assert torch.allclose(ds.x[0, :4], torch.from_numpy(x[0, :4]).float())


def test_driven_inputs_names_and_dtypes(tmp_path):
    path = tmp_path / "d.npz"
    x = (np.random.default_rng(3).random((10, 4)) < 0.5)  # bool: stored as 0.0 / 1.0
    u = np.arange(20).reshape(10, 2)                        # integers are numbers too
    np.savez(path, train=x, train_lengths=np.array([3, 7]), train_u=u,
             train_names=np.array(["a", "b"]), val=x[:2][None], val_u=u[:2][None])
    data = load_array_splits(path, seq_len=5)
    ds = data["train"]
    assert ds.u_dim == 2 and ds.u.shape == (3, 5, 2) and ds.names == ["a", "b", "b"]
    assert torch.equal(ds.u[2, :2], torch.tensor([[16.0, 17.0], [18.0, 19.0]]))
    assert set(ds.x.unique().tolist()) <= {0.0, 1.0}
    x_i, mask_i, u_i = ds[2]
    assert x_i.shape == (5, 4) and mask_i.tolist() == [True, True, False, False, False]
    assert u_i.shape == (5, 2)
    assert read_arrays(path)["val"].u_dim == 2 and "inputs u of 2" in repr(ds)


def _write(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


GOOD = np.zeros((2, 3, 4))
BAD_FILES = {
    "missing split": (dict(train=GOOD), r"has no array 'val' \(it holds train\)"),
    "unknown array": (dict(train=GOOD, val=GOOD, train_length=np.array([3, 3])),
                      r"unknown array 'train_length'"),
    "orphan": (dict(train=GOOD, val_lengths=np.array([3])), r"array 'val_lengths' has no split"),
    "no split": (dict(test_names=np.array(["a"])), r"array 'test_names' has no split"),
    "rank 1": (dict(train=np.zeros(5), val=GOOD), r"array 'train' has shape \(5,\): it must be"),
    "rank 4": (dict(train=GOOD, val=np.zeros((1, 2, 3, 4))), r"array 'val' has shape"),
    "rank 2 without lengths": (dict(train=np.zeros((6, 4)), val=GOOD),
                               r"array 'train' has shape \(6, 4\): a 2-d array holds "
                               r"concatenated sequences and needs train_lengths"),
    "features differ": (dict(train=GOOD, val=np.zeros((2, 3, 5))),
                        r"array 'val' has 5 features per step, 'train' has 4"),
    "nan": (dict(train=GOOD, val=np.array([[[0.0], [np.nan]]]), val_u=np.zeros((1, 2, 1)),
                 train_u=np.zeros((2, 3, 1))),
            r"array 'val' holds 1 NaN or infinite values \(the first in sequence 0, step 1\)"),
    "inf": (dict(train=np.concatenate([np.zeros((3, 4)), np.full((2, 4), np.inf)]),
                 train_lengths=np.array([3, 2]), val=GOOD),
            r"array 'train' holds 8 NaN or infinite values \(the first in sequence 1, step 0\)"),
    "empty split": (dict(train=np.zeros((0, 3, 4)), val=GOOD),
                    r"array 'train' is empty \(shape \(0, 3, 4\)\)"),
    "no features": (dict(train=np.zeros((2, 3, 0)), val=GOOD), r"array 'train' is empty"),
    "lengths sum": (dict(train=np.zeros((6, 4)), train_lengths=np.array([2, 3]), val=GOOD),
                    r"array 'train_lengths' sums to 5 steps but 'train' has 6 rows"),
    "lengths count": (dict(train=GOOD, train_lengths=np.array([3]), val=GOOD),
                      r"array 'train_lengths' has 1 lengths but 'train' holds 2 sequences"),
    "length too long": (dict(train=GOOD, train_lengths=np.array([3, 4]), val=GOOD),
                        r"array 'train_lengths': sequence 1 has length 4, more than the 3 steps"),
    "length zero": (dict(train=np.zeros((3, 4)), train_lengths=np.array([3, 0]), val=GOOD),
                    r"array 'train_lengths': sequence 1 has length 0"),
    "float lengths": (dict(train=np.zeros((3, 4)), train_lengths=np.array([1.0, 2.0]), val=GOOD),
                      r"array 'train_lengths' must be a 1-d array of integers"),
    "no lengths": (dict(train=np.zeros((0, 4)), train_lengths=np.zeros(0, dtype=int), val=GOOD),
                   r"array 'train_lengths' is empty"),
    "u missing": (dict(train=GOOD, train_u=GOOD, val=GOOD),
                  r"array 'train_u' is given but 'val_u' is missing"),
    "u layout": (dict(train=GOOD, train_u=np.zeros((2, 4, 1)), val=GOOD, val_u=GOOD),
                 r"array 'train_u' has shape \(2, 4, 1\); it must be laid out like 'train'"),
    "u features": (dict(train=GOOD, train_u=np.zeros((2, 3, 1)), val=GOOD,
                        val_u=np.zeros((2, 3, 2))),
                   r"array 'val_u' has 2 inputs per step, 'train_u' has 1"),
    "complex": (dict(train=GOOD.astype(complex), val=GOOD), r"array 'train' has dtype complex128"),
    "strings": (dict(train=GOOD, val=np.array([["a"]])), r"array 'val' has dtype <U1"),
    "names": (dict(train=GOOD, train_names=np.array(["a"]), val=GOOD),
              r"array 'train_names' must be 2 strings"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_get_one_line_naming_the_array(tmp_path, case):
    arrays, message = BAD_FILES[case]
    path = _write(tmp_path, **arrays)
    with pytest.raises(DataError, match=message) as err:
        load_array_splits(path, seq_len=3)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_array_splits(tmp_path / "none.npz")
    with pytest.raises(DataError, match="is not a file"):
        (tmp_path / "dir.npz").mkdir()
        load_array_splits(tmp_path / "dir.npz")
    text = tmp_path / "text.npz"
    text.write_text("hello\n")
    with pytest.raises(DataError, match=r"text.npz is not a readable .npz file"):
        load_array_splits(text)
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, GOOD)
    with pytest.raises(DataError, match="holds a single array, not an .npz archive"):
        load_array_splits(single)
    objects = tmp_path / "objects.npz"
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((2, 3)), np.zeros((4, 3))
    np.savez(objects, train=ragged, val=GOOD)
    with pytest.raises(DataError, match=r"array 'train' cannot be read without pickle") as err:
        load_array_splits(objects)
    assert "concatenated with lengths" in str(err.value)
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_array_splits(_write(tmp_path, train=GOOD, val=GOOD), splits=("dev",))
