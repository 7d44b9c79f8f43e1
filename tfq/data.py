"""Small image-classification datasets as ``tf.data`` pipelines or numpy arrays.

``fashion_mnist`` is read from the gzip IDX files shipped by the Debian package
``dataset-fashion-mnist`` (or from ``$TFQ_DATA_DIR``); ``digits`` is scikit-learn's bundled 8x8
digits set. Images are float32 in [0, 1], NHWC; labels are int32.
"""
import functools
import gzip
import os

import numpy as np
import tensorflow as tf

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion_mnist", "digits")
SPLITS = ("train", "test")
NUM_CLASSES = {"fashion_mnist": 10, "digits": 10}
INPUT_SHAPE = {"fashion_mnist": (28, 28, 1), "digits": (8, 8, 1)}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UBYTE = 0x08
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


def _check_choice(argument, value, allowed):
    if value not in allowed:
        raise ValueError(f"{argument}={value!r} is not supported; allowed values: "
                         + ", ".join(repr(a) for a in allowed))


def data_dir():
    """Directory searched for the Fashion-MNIST IDX files (``$TFQ_DATA_DIR`` or the Debian path)."""
    return os.environ.get("TFQ_DATA_DIR") or DEFAULT_DATA_DIR


# ----------------------------------------------------------------------------- IDX parsing

def read_idx(path):
    """Parse one IDX file (gzip-compressed if it ends in .gz) of unsigned bytes into a numpy array.

    Raises ValueError naming the file when the header is wrong or the payload is truncated.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # bad gzip stream, truncated archive, ...
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"corrupt IDX file {path}: only {len(raw)} bytes, no header")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"corrupt IDX file {path}: bad magic number 0x{raw[:4].hex()} "
                         "(expected 0x0000 followed by type and rank bytes)")
    if raw[2] != _IDX_UBYTE:
        raise ValueError(f"unsupported IDX file {path}: element type 0x{raw[2]:02x}, only unsigned "
                         "bytes (0x08) are supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"corrupt IDX file {path}: header declares {ndim} dimensions but the file "
                         f"has {len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(raw) - header
    if got != expected:
        raise ValueError(f"corrupt IDX file {path}: dimensions {dims} need {expected} data bytes, "
                         f"found {got} ({'truncated' if got < expected else 'trailing bytes'})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _file_key(path):
    st = os.stat(path)
    return (path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(key):
    arr = read_idx(key[0])
    arr.flags.writeable = False
    return arr


def _tfds_local_dir():
    root = os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    return root if os.path.isdir(os.path.join(root, "fashion_mnist")) else None


@functools.lru_cache(maxsize=4)
def _fashion_from_tfds(split, download):
    import tensorflow_datasets as tfds  # slow import: only when the IDX files are missing
    ds = tfds.load("fashion_mnist", split=split, batch_size=-1, as_supervised=True,
                   download=download)
    x, y = tfds.as_numpy(ds)
    x = np.asarray(x, np.uint8).reshape(-1, 28, 28)
    y = np.asarray(y, np.uint8)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _fashion_raw(split, download):
    directory = data_dir()
    names = _IDX_FILES[split]
    paths = [os.path.join(directory, n) for n in names]
    missing = [n for n, p in zip(names, paths) if not os.path.isfile(p)]
    if not missing:
        x = _read_idx_cached(_file_key(paths[0]))
        y = _read_idx_cached(_file_key(paths[1]))
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"Fashion-MNIST files in {directory} do not match: images {x.shape} "
                             f"from {names[0]}, labels {y.shape} from {names[1]}")
        return x, y
    if download or _tfds_local_dir() is not None:
        try:
            return _fashion_from_tfds(split, bool(download))
        except Exception as e:  # noqa: BLE001 - re-raised below with the install hint
            if download:
                raise
            tfds_error = f" (tensorflow_datasets fallback failed too: {e})"
    else:
        tfds_error = ""
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found in {directory} (missing: {', '.join(missing)}){tfds_error}. "
        "Install them with `apt-get install dataset-fashion-mnist` (as root), or set TFQ_DATA_DIR to a "
        "directory holding the four *-ubyte.gz files, or pass download=True to fetch the data with "
        "tensorflow_datasets.")


# ----------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=1)
def _digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    x = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    y = bunch.target.astype(np.int32)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=_DIGITS_TEST_FRACTION,
                                           random_state=_DIGITS_SPLIT_SEED, stratify=y)
    out = {}
    for split, idx in (("train", np.sort(idx_train)), ("test", np.sort(idx_test))):
        xs, ys = x[idx], y[idx]
        for arr in (xs, ys, idx):
            arr.flags.writeable = False
        out[split] = (xs, ys)
        out[split + "_index"] = idx
    return out


def digits_indices(split):
    """Row indices into ``sklearn.datasets.load_digits()`` that make up the given digits split."""
    _check_choice("split", split, SPLITS)
    return _digits_split()[split + "_index"].copy()


# ----------------------------------------------------------------------------- public API

def load_numpy(name, split="train", limit=None, download=False):
    """Return ``(x, y)``: float32 NHWC images in [0, 1] and int32 labels (fresh, writable arrays).

    ``limit`` keeps the first N examples. ``download=True`` lets Fashion-MNIST fall back to
    ``tensorflow_datasets`` with downloading enabled when the IDX files are missing.
    """
    _check_choice("name", name, DATASETS)
    _check_choice("split", split, SPLITS)
    if limit is not None and (int(limit) != limit or limit < 0):
        raise ValueError(f"limit must be None or a non-negative integer, got {limit!r}")
    if name == "fashion_mnist":
        x_raw, y_raw = _fashion_raw(split, download)
        scale = 255.0
    else:
        x_raw, y_raw = _digits_split()[split]
        scale = 16.0
    if limit is not None:
        x_raw, y_raw = x_raw[:int(limit)], y_raw[:int(limit)]
    x = (x_raw.astype(np.float32) / np.float32(scale))[..., np.newaxis]
    y = y_raw.astype(np.int32)
    return x, y


def load(name, split="train", batch_size=128, shuffle=None, seed=0, limit=None, channels=1,
         image_size=None, download=False):
    """Return a ``tf.data.Dataset`` of ``(image, label)``: float32 HxWxC in [0, 1], int32.

    ``shuffle`` defaults to True for "train" and False for "test"; ``limit`` keeps the first N
    examples (before shuffling); ``channels=3`` repeats the grey channel; ``image_size=(h, w)``
    resizes bilinearly; ``batch_size=None`` yields single examples.
    """
    _check_choice("name", name, DATASETS)
    _check_choice("split", split, SPLITS)
    _check_choice("channels", channels, (1, 3))
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be None or a positive integer, got {batch_size!r}")
    if image_size is not None:
        if len(tuple(image_size)) != 2 or any(int(s) < 1 for s in image_size):
            raise ValueError(f"image_size must be None or (height, width), got {image_size!r}")
        image_size = (int(image_size[0]), int(image_size[1]))
    x, y = load_numpy(name, split, limit=limit, download=download)
    if len(x) == 0:
        raise ValueError(f"limit={limit!r} leaves no {split!r} examples of {name!r}: a dataset needs limit >= 1 "
                         "(or None for all)")
    if shuffle is None:
        shuffle = split == "train"

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if batch_size is not None:
        ds = ds.batch(int(batch_size))

    if channels != 1 or image_size is not None:
        def _prepare(images, labels):
            if image_size is not None:
                images = tf.image.resize(images, image_size, method="bilinear")
                images = tf.clip_by_value(images, 0.0, 1.0)
            if channels == 3:
                images = tf.repeat(images, 3, axis=-1)
            return images, labels

        ds = ds.map(_prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
