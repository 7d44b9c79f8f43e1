"""Tests for tfq.data (IDX parsing, splits, pipelines) and tfq.models (builders, serialization)."""
import gzip
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from tfq import data, models

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
HAVE_DEBIAN_FMNIST = all(
    os.path.isfile(os.path.join(DEBIAN_DIR, n))
    for pair in data._IDX_FILES.values() for n in pair)


# ----------------------------------------------------------------------------- helpers

def _idx_bytes(array):
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_gz(path, payload):
    with gzip.open(path, "wb") as f:
        f.write(payload)


def _write_fake_fmnist(directory, images, labels, split="train"):
    img_name, lbl_name = data._IDX_FILES[split]
    _write_gz(os.path.join(directory, img_name), _idx_bytes(images))
    _write_gz(os.path.join(directory, lbl_name), _idx_bytes(labels))


@pytest.fixture
def fake_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TFQ_DATA_DIR", str(tmp_path))
    # keep any real tensorflow_datasets cache out of the fallback path
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds"))
    return tmp_path


# ----------------------------------------------------------------------------- IDX / fashion_mnist

def test_idx_values_round_trip_exactly(fake_dir):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1], images[4, 27, 27] = 0, 255, 51
    labels = np.array([3, 0, 9, 1, 7], np.uint8)
    _write_fake_fmnist(fake_dir, images, labels, "train")
    _write_fake_fmnist(fake_dir, images[:2], labels[:2], "test")

    x, y = data.load_numpy("fashion_mnist", "train")
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.float32
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, [3, 0, 9, 1, 7])
    np.testing.assert_array_equal(x[..., 0], images.astype(np.float32) / np.float32(255.0))
    assert x[0, 0, 0, 0] == 0.0 and x[0, 0, 1, 0] == 1.0
    assert x[4, 27, 27, 0] == pytest.approx(0.2)

    xt, yt = data.load_numpy("fashion_mnist", "test")
    np.testing.assert_array_equal(yt, [3, 0])

    x2, y2 = data.load_numpy("fashion_mnist", "train", limit=2)
    np.testing.assert_array_equal(x2, x[:2])
    np.testing.assert_array_equal(y2, y[:2])
    x2[:] = -1.0  # returned arrays are fresh: mutating them must not touch the cache
    assert data.load_numpy("fashion_mnist", "train")[0].min() >= 0.0


def test_read_idx_plain_file(tmp_path):
    path = tmp_path / "plain-idx1-ubyte"
    path.write_bytes(_idx_bytes([4, 2, 250]))
    np.testing.assert_array_equal(data.read_idx(str(path)), [4, 2, 250])


def test_corrupt_magic_names_file(fake_dir):
    _write_fake_fmnist(fake_dir, np.zeros((2, 28, 28)), [1, 2], "train")
    bad = os.path.join(fake_dir, "train-images-idx3-ubyte.gz")
    payload = bytearray(_idx_bytes(np.zeros((2, 28, 28))))
    payload[0] = 0x1F
    _write_gz(bad, bytes(payload))
    with pytest.raises(ValueError) as info:
        data.load_numpy("fashion_mnist", "train")
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    assert "magic" in str(info.value)


def test_truncated_file_names_file(fake_dir):
    _write_fake_fmnist(fake_dir, np.zeros((3, 28, 28)), [1, 2, 3], "train")
    labels_path = os.path.join(fake_dir, "train-labels-idx1-ubyte.gz")
    _write_gz(labels_path, _idx_bytes([1, 2, 3])[:-1])
    with pytest.raises(ValueError, match="truncated") as info:
        data.load_numpy("fashion_mnist", "train")
    assert "train-labels-idx1-ubyte.gz" in str(info.value)


def test_broken_gzip_names_file(fake_dir):
    _write_fake_fmnist(fake_dir, np.zeros((3, 28, 28)), [1, 2, 3], "train")
    img_path = os.path.join(fake_dir, "train-images-idx3-ubyte.gz")
    blob = open(img_path, "rb").read()
    with open(img_path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        data.load_numpy("fashion_mnist", "train")


def test_missing_dir_error(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("TFQ_DATA_DIR", str(missing))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "no_tfds"))
    with pytest.raises(FileNotFoundError) as info:
        data.load("fashion_mnist", "test")
    msg = str(info.value)
    assert str(missing) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "TFQ_DATA_DIR" in msg and "download=True" in msg


@pytest.mark.skipif(not HAVE_DEBIAN_FMNIST, reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("TFQ_DATA_DIR", raising=False)
    for split, count in (("train", 60000), ("test", 10000)):
        x, y = data.load_numpy("fashion_mnist", split)
        assert x.shape == (count, 28, 28, 1) and x.dtype == np.float32
        assert y.shape == (count,) and y.dtype == np.int32
        assert set(np.unique(y)) == set(range(10))
        assert np.bincount(y).tolist() == [count // 10] * 10  # Fashion-MNIST is balanced
        assert 0.0 <= x.min() and x.max() == 1.0


@pytest.mark.skipif(not HAVE_DEBIAN_FMNIST, reason="dataset-fashion-mnist not installed")
def test_real_pipeline_channels_and_resize(monkeypatch):
    monkeypatch.delenv("TFQ_DATA_DIR", raising=False)
    ds = data.load("fashion_mnist", "test", batch_size=4, limit=8, channels=3, image_size=(32, 40))
    batches = list(ds)
    assert [b[0].shape for b in batches] == [(4, 32, 40, 3)] * 2
    images, labels = batches[0]
    assert images.dtype == tf.float32 and labels.dtype == tf.int32
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    assert float(tf.reduce_min(images)) >= 0.0 and float(tf.reduce_max(images)) <= 1.0
    # test split is not shuffled by default: labels follow the file order
    _, y = data.load_numpy("fashion_mnist", "test", limit=8)
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in batches]), y)


# ----------------------------------------------------------------------------- pipeline behaviour

def test_load_shuffle_defaults_and_seed(fake_dir):
    n = 40
    images = np.arange(n, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    _write_fake_fmnist(fake_dir, images, labels, "train")
    _write_fake_fmnist(fake_dir, images, labels, "test")

    def order(**kw):
        return np.concatenate([(x[:, 0, 0, 0].numpy() * 255).round().astype(int)
                               for x, _ in data.load("fashion_mnist", **kw)])

    assert order(split="test", batch_size=7).tolist() == list(range(n))
    train = order(split="train", batch_size=7, seed=1)
    assert sorted(train.tolist()) == list(range(n)) and train.tolist() != list(range(n))
    np.testing.assert_array_equal(train, order(split="train", batch_size=7, seed=1))
    assert order(split="train", batch_size=7, shuffle=False).tolist() == list(range(n))
    limited = order(split="train", batch_size=7, limit=10, seed=2)
    assert sorted(limited.tolist()) == list(range(10))  # limit applies before shuffling

    single = next(iter(data.load("fashion_mnist", "test", batch_size=None)))
    assert single[0].shape == (28, 28, 1) and single[1].shape == ()


def test_digits_split_disjoint_and_deterministic():
    from sklearn.datasets import load_digits
    source = load_digits()
    total = len(source.target)
    i_tr, i_te = data.digits_indices("train"), data.digits_indices("test")
    assert set(i_tr).isdisjoint(i_te)
    assert sorted(np.concatenate([i_tr, i_te]).tolist()) == list(range(total))
    assert len(i_te) == pytest.approx(0.2 * total, abs=1)

    xtr, ytr = data.load_numpy("digits", "train")
    xte, yte = data.load_numpy("digits", "test")
    assert xtr.shape == (len(i_tr), 8, 8, 1) and xte.shape == (len(i_te), 8, 8, 1)
    assert xtr.shape[1:] == data.INPUT_SHAPE["digits"]
    np.testing.assert_array_equal(xtr[..., 0], source.images[i_tr].astype(np.float32) / np.float32(16))
    np.testing.assert_array_equal(yte, source.target[i_te])
    assert xtr.min() == 0.0 and xtr.max() == 1.0
    assert set(np.unique(ytr)) == set(range(10)) == set(np.unique(yte))

    data._digits_split.cache_clear()  # recomputed from scratch: same split
    np.testing.assert_array_equal(data.digits_indices("train"), i_tr)
    np.testing.assert_array_equal(data.load_numpy("digits", "train")[1], ytr)
    batch = next(iter(data.load("digits", "test", batch_size=16)))
    assert batch[0].shape == (16, 8, 8, 1)


@pytest.mark.parametrize("kwargs, argument", [
    ({"name": "mnist"}, "name"),
    ({"name": "digits", "split": "validation"}, "split"),
    ({"name": "digits", "channels": 2}, "channels"),
])
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError) as info:
        data.load(**kwargs)
    msg = str(info.value)
    assert msg.startswith(argument + "=")
    assert "allowed values" in msg
    if argument == "name":
        assert "'fashion_mnist'" in msg and "'digits'" in msg
    if argument == "split":
        assert "'train'" in msg and "'test'" in msg
    with pytest.raises(ValueError, match="split="):
        data.load_numpy("digits", "val")


def test_constants():
    assert data.NUM_CLASSES == {"fashion_mnist": 10, "digits": 10}
    assert data.INPUT_SHAPE["fashion_mnist"] == (28, 28, 1)


# ----------------------------------------------------------------------------- models

def test_hard_swish_values():
    x = tf.constant([-5.0, -3.0, -1.5, 0.0, 1.0, 3.0, 4.0])
    expected = [0.0, 0.0, -1.5 * 1.5 / 6, 0.0, 1.0 * 4.0 / 6, 3.0, 4.0]
    np.testing.assert_allclose(models.hard_swish(x).numpy(), expected, rtol=1e-6, atol=1e-7)
    assert keras.activations.get("tfq>hard_swish") is models.hard_swish
    # written as a plain registered name, which the .h5 loader can resolve
    assert keras.activations.serialize(models.hard_swish) == "tfq>hard_swish"


@pytest.mark.parametrize("name, low, high", [("small_cnn", 20_000, 60_000), ("mobile_swish", 30_000, 100_000)])
def test_model_shapes_and_size(name, low, high):
    model = models.get(name, seed=0)
    assert isinstance(model, keras.Model) and model.name == name
    assert low <= model.count_params() <= high
    out = model(np.zeros((3, 28, 28, 1), np.float32), training=False)
    assert out.shape == (3, 10)
    last = model.layers[-1]
    assert isinstance(last, keras.layers.Dense) and last.activation is keras.activations.linear


def test_seed_makes_weights_deterministic():
    a = models.get("small_cnn", seed=5).get_weights()
    b = models.get("small_cnn", seed=5).get_weights()
    c = models.get("small_cnn", seed=6).get_weights()
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_mobile_swish_structure():
    model = models.mobile_swish()
    kinds = {type(layer).__name__ for layer in model.layers}
    for required in ("DepthwiseConv2D", "BatchNormalization", "Multiply", "Add", "ReLU",
                     "GlobalAveragePooling2D", "Reshape", "Dropout"):
        assert required in kinds, required
    acts = [layer.activation for layer in model.layers if isinstance(layer, keras.layers.Activation)]
    assert keras.activations.swish in acts
    assert models.hard_swish in acts
    assert keras.activations.sigmoid in acts
    assert any(isinstance(layer, keras.layers.DepthwiseConv2D) and layer.strides == (2, 2)
               for layer in model.layers)


def test_get_unknown_name():
    with pytest.raises(ValueError) as info:
        models.get("resnet50")
    msg = str(info.value)
    assert "name=" in msg
    for name in ("small_cnn", "mobile_swish", "mobilenet_v2"):
        assert name in msg


def test_mobilenet_v2_defaults():
    model = models.get("mobilenet_v2", seed=0)
    assert model.input_shape == (None, 96, 96, 3)
    assert model.output_shape == (None, 10)
    assert model.layers[-1].activation is keras.activations.linear
    small = models.get("mobilenet_v2", input_shape=(32, 32, 3), num_classes=4)
    assert small.output_shape == (None, 4)


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
@pytest.mark.parametrize("fmt", ["h5", "savedmodel", "keras"])
def test_mobile_swish_save_load_round_trip(tmp_path, fmt):
    model = models.get("mobile_swish", seed=0)
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    # one training step so batch-norm statistics and weights differ from their initial values
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, np.arange(4) % 10, epochs=1, verbose=0)
    expected = model(x, training=False).numpy()
    path = str(tmp_path / {"h5": "model.h5", "savedmodel": "model_savedmodel", "keras": "model.keras"}[fmt])
    model.save(path)
    if fmt == "savedmodel":
        assert os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb"))
    restored = keras.models.load_model(path, compile=False)
    got = restored(x, training=False).numpy()
    np.testing.assert_array_equal(got, expected)
    acts = [layer.activation for layer in restored.layers if isinstance(layer, keras.layers.Activation)]
    assert models.hard_swish in acts
