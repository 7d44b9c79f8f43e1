"""tfq's fused LSQ kernels (tfq/kernels/fake_quant.cc) against the TensorFlow-op form and eq. 2-4."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tfq
from tfq import kernels
from tfq.quantizers import lsq

RANGES = [(0.0, 15.0), (-8.0, 7.0), (-1.0, 1.0), (0.0, 255.0), (-128.0, 127.0)]


def tf_ops_fake_quant(x, s, b, qmin, qmax, g):
    return lsq.lsq_fake_quant(x, s, b, qmin, qmax, g, fused=False)


def fused_fake_quant(x, s, b, qmin, qmax, g):
    assert kernels.available(), "the fused kernels are not built: run `python -m tfq.kernels`"
    return lsq.lsq_fake_quant(x, s, b, qmin, qmax, g, fused=True)


def values(qmin, qmax, s, b, size, seed):
    """Inputs whose v = (x - b)/s lands below, inside and above [qmin, qmax], on exact rounding
    ties (k + 0.5), exactly on qmin and qmax, and in (-0.5, 0) (tf.round gives -0 there)."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(qmin - 4, qmax + 4, size)
    v[: size // 4] = rng.integers(int(qmin) - 2, int(qmax) + 2, size // 4) + 0.5
    v[size // 4: size // 4 + 64] = qmin
    v[size // 4 + 64: size // 4 + 128] = qmax
    v[size // 4 + 128: size // 4 + 192] = -rng.uniform(0, 0.5, 64)
    rng.shuffle(v)
    return (v * s + b).astype(np.float32)


def run(fake_quant, x, s, b, qmin, qmax, g, upstream):
    xt, st, bt = tf.constant(x), tf.constant(s, tf.float32), tf.constant(b, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([xt, st, bt])
        y = fake_quant(xt, st, bt, qmin, qmax, tf.constant(g, tf.float32))
        loss = tf.reduce_sum(y * upstream)
    dx, ds, db = tape.gradient(loss, [xt, st, bt])
    return y.numpy(), dx.numpy(), float(ds), float(db)


def reference_grads(x, s, b, qmin, qmax, upstream, g):
    """Eq. 3-4 in float64 NumPy (v from the float32 division, as both implementations compute it)."""
    v = ((x - np.float32(b)) / np.float32(s)).astype(np.float64)
    inside = (v >= qmin) & (v <= qmax)
    codes = np.round(np.clip(v, qmin, qmax))
    u = upstream.astype(np.float64)
    ds = np.sum(u * np.where(inside, codes - v, codes)) * g
    db = np.sum(np.where(inside, 0.0, u)) * g
    return ds, db


def test_kernels_are_built_and_load():
    # `make install` builds them; without them training silently-but-correctly slows down 1.5-2x
    assert kernels.available(), (f"{kernels.LIBRARY} is missing or does not load: run `python -m tfq.kernels`")


@pytest.mark.parametrize("qmin, qmax", RANGES)
@pytest.mark.parametrize("s, b", [(0.37, 0.0), (0.05, -0.25), (1.7, 3.4)])
def test_fused_forward_is_bit_identical_and_gradients_are_eq3_eq4(qmin, qmax, s, b):
    size = 3 * 16384 + 37  # several gradient blocks and a tail that is not a multiple of the lanes
    x = values(qmin, qmax, s, b, size, seed=int(qmax) + 7).reshape(-1, 1)
    upstream = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    g = 0.01
    y_tf, dx_tf, ds_tf, db_tf = run(tf_ops_fake_quant, x, s, b, qmin, qmax, g, upstream)
    y, dx, ds, db = run(fused_fake_quant, x, s, b, qmin, qmax, g, upstream)
    # forward: the same float32 bits, -0 included
    np.testing.assert_array_equal(y.view(np.int32), y_tf.view(np.int32))
    # dx is dy where qmin <= v <= qmax, else 0: exactly the TF-op values
    np.testing.assert_array_equal(dx, dx_tf)
    v = ((x - np.float32(b)) / np.float32(s)).astype(np.float64)
    np.testing.assert_array_equal(dx, np.where((v >= qmin) & (v <= qmax), upstream, 0))
    # scale/offset sums (float32 terms, float64 partial sums) within a float32 rounding or so of
    # eq. 3-4 summed in float64; TensorFlow's float32 reduction is looser
    ds_ref, db_ref = reference_grads(x, s, b, qmin, qmax, upstream, g)
    np.testing.assert_allclose([ds, db], [ds_ref, db_ref], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([ds_tf, db_tf], [ds_ref, db_ref], rtol=1e-4, atol=1e-4)


def test_gradient_sums_do_not_depend_on_the_thread_count(tmp_path):
    size = 20 * 16384 + 5
    x = values(-8.0, 7.0, 0.3, -0.6, size, seed=3)
    upstream = np.random.default_rng(4).normal(size=size).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "u.npy", upstream)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tfq, tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
        from tfq import kernels
        x = tf.constant(np.load({str(tmp_path / 'x.npy')!r}))
        u = tf.constant(np.load({str(tmp_path / 'u.npy')!r}))
        dx, ds, db = kernels.ops().tfq_lsq_fake_quant_grad(u, x, 0.3, -0.6, 1.0, qmin=-8.0, qmax=7.0)
        print(repr(float(ds)), repr(float(db)))
    """)
    outputs = set()
    for threads in (1, 2, 3):
        done = subprocess.run([sys.executable, "-c", script, str(threads)], capture_output=True, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.add(done.stdout.strip().splitlines()[-1])
    assert len(outputs) == 1, outputs


def test_fused_kernels_reject_per_axis_parameters_and_empty_ranges():
    ops = kernels.ops()
    with pytest.raises(tf.errors.InvalidArgumentError, match="scale must hold one value"):
        ops.tfq_lsq_fake_quant(tf.ones((2, 3)), tf.ones((3,)), 0.0, qmin=0.0, qmax=3.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="offset must hold one value"):
        ops.tfq_lsq_fake_quant_grad(tf.ones((2, 3)), tf.ones((2, 3)), 1.0, tf.ones((2,)), 1.0, qmin=0.0, qmax=3.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="qmin .* must be below qmax"):
        ops.tfq_lsq_fake_quant(tf.ones((2, 3)), 1.0, 0.0, qmin=3.0, qmax=3.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"within \+-2\^22"):
        ops.tfq_lsq_fake_quant(tf.ones((2, 3)), 1.0, 0.0, qmin=0.0, qmax=2.0 ** 23)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dy shape"):
        ops.tfq_lsq_fake_quant_grad(tf.ones((2, 2)), tf.ones((2, 3)), 1.0, 0.0, 1.0, qmin=0.0, qmax=3.0)


def test_per_axis_scales_use_the_tensorflow_ops():
    x = tf.constant(np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4))
    s = tf.constant([[0.1, 0.2, 0.3, 0.4]])
    assert not kernels.fusable(x, s, tf.zeros(()))
    fused = lsq.lsq_fake_quant(x, s, tf.zeros(()), -8, 7, 1.0, fused=True)
    np.testing.assert_array_equal(fused.numpy(), tf_ops_fake_quant(x, s, tf.zeros(()), -8, 7, 1.0).numpy())


def graph_op_types(function, *args):
    graph = tf.function(function).get_concrete_function(*args).graph
    types = {op.type for op in graph.get_operations()}
    for func in graph._functions.values():  # noqa: SLF001 (custom-gradient and cond sub-graphs)
        types |= {node.op for node in func.definition.node_def}
    return types


def test_training_steps_use_the_fused_kernels_and_inference_the_tensorflow_ops():
    model = keras.Sequential([keras.layers.Input((6,)), keras.layers.Dense(4), keras.layers.ReLU(),
                              keras.layers.Dense(3)])
    q = tfq.quantize_model(model, method="lsq+", weight_bits=4, activation_bits=4, activation_config=4)
    x = tf.constant(np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32))
    q(x, training=True)  # initialise the quantizers

    def train_step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(q(x, training=True) ** 2)
        return tape.gradient(loss, q.trainable_variables)

    assert {"TfqLsqFakeQuant", "TfqLsqFakeQuantGrad"} <= graph_op_types(train_step, x)
    # inference graphs (TFLite conversion, SavedModel serving) keep to TensorFlow's own ops
    assert not any(t.startswith("TfqLsq") for t in graph_op_types(lambda x: q(x, training=False), x))
    # one training step through either path moves the variables the same way (to float rounding)
    before = [v.numpy() for v in q.trainable_variables]
    grads_fused = [g.numpy() for g in train_step(x)]
    for v, value in zip(q.trainable_variables, before):
        v.assign(value)
    with kernels.turned_off():
        assert not kernels.available()
        grads_tf = [g.numpy() for g in train_step(x)]
    assert kernels.available()
    for a, b in zip(grads_fused, grads_tf):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_xla_compiled_steps_use_the_tensorflow_ops():
    x = tf.constant([[0.3, 2.0, -1.0]])
    s = tf.Variable(0.5)

    def step(x):
        with tf.GradientTape() as tape:
            y = lsq.lsq_fake_quant(x, tf.identity(s), 0.0, -2, 3, 1.0, fused=True)
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, s)

    assert not any(t.startswith("TfqLsq") for t in graph_op_types(tf.function(step, jit_compile=True), x))
    y, ds = tf.function(step, jit_compile=True)(x)
    y_fused, ds_fused = tf.function(step)(x)
    np.testing.assert_array_equal(y.numpy(), y_fused.numpy())
    np.testing.assert_allclose(float(ds), float(ds_fused), rtol=1e-6)


def test_missing_library_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "LIBRARY", str(tmp_path / "absent.so"))
    monkeypatch.setattr(kernels, "_state", {})
    with pytest.warns(RuntimeWarning, match="is not built.*python -m tfq.kernels"):
        assert kernels.ops() is None
    x = tf.constant([[0.3, 2.0]])
    np.testing.assert_allclose(lsq.lsq_fake_quant(x, 0.5, 0.0, 0, 3, 1.0, fused=True).numpy(), [[0.5, 1.5]])


def test_environment_switch(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.ops() is None
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv(kernels.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match="TFQ_FUSED_KERNELS must be 0 or 1"):
        kernels.ops()


@pytest.mark.parametrize("op", ["sigmoid", "tanh"])
def test_fixed_range_quantizer_trains_through_the_fused_kernels_with_its_own_numbers(op):
    from tfq.quantizers import fixed
    quantizer = fixed.FixedRangeQuantizer(op)
    scale, _, qmin, qmax = fixed.FIXED_RANGES[op]
    rng = np.random.default_rng(5)
    # outside, inside, on the ends, on exact ties k + 0.5 of the 1/256 (1/128) grid
    codes = np.concatenate([rng.uniform(qmin - 20, qmax + 20, 5000), rng.integers(qmin, qmax, 500) + 0.5,
                            [qmin, qmax]])
    x = tf.constant((codes * scale).astype(np.float32))
    upstream = tf.constant(rng.normal(size=codes.size).astype(np.float32))
    outputs, grads = {}, {}
    for training in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = quantizer(x, training=training, weights={})
            loss = tf.reduce_sum(y * upstream)
        outputs[training], grads[training] = y.numpy(), tape.gradient(loss, x).numpy()
    assert {"TfqLsqFakeQuant", "TfqLsqFakeQuantGrad"} <= graph_op_types(
        lambda x: tf.gradients(quantizer(x, training=True, weights={}), x), x)
    np.testing.assert_array_equal(outputs[True], outputs[False])
    np.testing.assert_array_equal(outputs[True], np.clip(np.round(codes), qmin, qmax) * np.float32(scale))
    np.testing.assert_array_equal(grads[True], grads[False])
    np.testing.assert_array_equal(grads[True], np.where((codes >= qmin) & (codes <= qmax), upstream, 0))


def test_saved_models_hold_no_tfq_ops_and_load_without_the_library(tmp_path):
    model = keras.Sequential([keras.layers.Input((6,)), keras.layers.Dense(4), keras.layers.ReLU(),
                              keras.layers.Dense(3)])
    q = tfq.quantize_model(model, method="lsq+", weight_bits=4, activation_bits=4, activation_config=4)
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    q.compile("adam", "mse")
    q.fit(x, np.zeros((8, 3), np.float32), verbose=0)  # traced with the fused kernels
    path = str(tmp_path / "saved_model")
    q.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", q(x).numpy())
    script = textwrap.dedent(f"""
        import numpy as np, tfq, tensorflow as tf, tf_keras as keras
        from tfq import kernels
        with tfq.quantize_scope():
            loaded = keras.models.load_model({path!r})
        assert np.array_equal(loaded(np.load({str(tmp_path / 'x.npy')!r})).numpy(), np.load({str(tmp_path / 'y.npy')!r}))
        tf.saved_model.load({path!r})  # plain TensorFlow, as a server would
        assert "ops" not in kernels._state, kernels._state  # tfq's library was never loaded
        print("loaded")
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-3000:]


def _fake_compiler(tmp_path, exit_code):
    """A stand-in for the C++ compiler: writes 'new library' to its -o argument, then exits."""
    script = tmp_path / "fake-c++"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        out = sys.argv[sys.argv.index("-o") + 1]
        open(out, "w").write("new library")
        sys.exit({exit_code})
        """))
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize("exit_code", [0, 1])
def test_build_replaces_the_library_by_rename_and_leaves_no_partial_file(tmp_path, monkeypatch, exit_code):
    library = tmp_path / "_fused_ops.so"
    library.write_text("old library")
    monkeypatch.setattr(kernels, "LIBRARY", str(library))
    monkeypatch.setattr(kernels, "STAMP", str(tmp_path / "_fused_ops.so.tfversion"))
    monkeypatch.setattr(kernels, "_state", {})
    with open(library) as loaded:   # a process that has the old library open
        if exit_code:
            with pytest.raises(subprocess.CalledProcessError):
                kernels.build(_fake_compiler(tmp_path, exit_code), verbose=False)
            assert library.read_text() == "old library"   # a failed build leaves the library as it was
        else:
            kernels.build(_fake_compiler(tmp_path, exit_code), verbose=False)
            assert library.read_text() == "new library"
            assert loaded.read() == "old library"   # renamed over, not rewritten under the open file
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == []


# --- activation functions fused into the kernels ------------------------------------------------

def _quantized_swish(x):
    """tfq's training form of swish (graph.split_swish): x * sigmoid(x) on TFLite's fixed sigmoid
    grid, the grid applied as FixedRangeQuantizer("sigmoid") does in training."""
    from tfq.quantizers import fixed
    return x * fixed.FixedRangeQuantizer("sigmoid")._forward(tf.sigmoid(x), True, {})


UNFUSED_ACTIVATIONS = {
    "linear": tf.identity,
    "relu": tf.nn.relu,
    "relu6": tf.nn.relu6,
    "hard_swish": tfq.models.hard_swish,
    "swish": keras.activations.swish,
    "quantized_swish": _quantized_swish,
}


def test_every_kernel_activation_has_a_reference():
    assert set(UNFUSED_ACTIVATIONS) == set(kernels.ACTIVATIONS)


@pytest.mark.parametrize("activation", kernels.ACTIVATIONS)
@pytest.mark.parametrize("qmin, qmax, s, b", [(0.0, 15.0, 0.173, -0.52), (-8.0, 7.0, 0.41, 0.0)])
def test_fused_activation_equals_the_tensorflow_ops_bit_for_bit(activation, qmin, qmax, s, b):
    """activation then LSQ as separate TensorFlow ops vs one fused op: the same float32 outputs and
    input gradients on about 2^20 values spanning every branch (sigmoid's cut-off at -104
    included); the scale and offset gradients agree to float rounding."""
    rng = np.random.default_rng(7)
    # a whole number of SIMD packets: TensorFlow computes a tensor's last (size mod packet) elements
    # with Eigen's scalar sigmoid, which differs from its vector one (and the kernels') by an ulp
    x = np.concatenate([[-104.5, -104.0, -3.0, 0.0, 6.0, -0.0, -3.0, 3.0], rng.normal(0, 3, (1 << 20) - 8),
                        rng.uniform(-120, 30, 1 << 14)]).astype(np.float32)
    upstream = tf.constant(rng.normal(size=x.shape).astype(np.float32))
    unfused = UNFUSED_ACTIVATIONS[activation]

    def step(fused):
        @tf.function
        def run_step(x, s, b):
            with tf.GradientTape() as tape:
                tape.watch([x, s, b])
                if fused:
                    y = kernels.fake_quant(x, s, b, qmin, qmax, 0.01, activation=activation)
                else:
                    y = lsq.lsq_fake_quant(unfused(x), s, b, qmin, qmax, 0.01, fused=False)
            return (y,) + tuple(tape.gradient(y, [x, s, b], output_gradients=upstream))
        return [t.numpy() for t in run_step(tf.constant(x), tf.constant(s), tf.constant(b))]

    fused_y, fused_dx, fused_ds, fused_db = step(True)
    y, dx, ds, db = step(False)
    assert (fused_y.view(np.uint32) == y.view(np.uint32)).all(), \
        f"{int((fused_y != y).sum())} outputs differ from {activation} then LSQ as TensorFlow ops"
    assert np.array_equal(fused_dx, dx), f"{int((fused_dx != dx).sum())} input gradients differ"
    # TensorFlow sums 2^20 float32 terms (times g = 0.01) in float32, the kernels in float64
    np.testing.assert_allclose([fused_ds, fused_db], [ds, db], rtol=1e-5, atol=1e-4)


def test_unknown_kernel_activation_is_rejected():
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.fake_quant(tf.zeros([4]), 1.0, 0.0, 0, 15, 1.0, activation="gelu")


def test_kernel_activation_names_only_what_the_kernels_compute():
    from tfq import graph
    layers = keras.layers
    assert graph.kernel_activation(layers.ReLU()) == "relu"
    assert graph.kernel_activation(layers.ReLU(6.0)) == "relu6"
    assert graph.kernel_activation(layers.Activation("swish")) == "swish"
    assert graph.kernel_activation(layers.Activation(tfq.models.hard_swish)) == "hard_swish"
    for other in (layers.ReLU(4.0), layers.ReLU(negative_slope=0.1), layers.ReLU(threshold=1.0),
                  layers.Activation("sigmoid"), layers.Activation("tanh"), layers.Dense(3)):
        assert graph.kernel_activation(other) is None, other


def _mobile_swish_step(quantized, x, y):
    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = quantized(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        return logits, tape.gradient(loss, quantized.trainable_variables)

    concrete = train_step.get_concrete_function(tf.TensorSpec(x.shape), tf.TensorSpec(y.shape, tf.int64))
    fused = sorted(op.get_attr("activation").decode() for op in concrete.graph.get_operations()
                   if op.type == "TfqLsqFakeQuant" and op.get_attr("activation") != b"linear")
    logits, grads = train_step(x, y)
    return fused, logits.numpy(), [g.numpy() for g in grads]


def test_quantized_mobile_swish_trains_its_activation_layers_through_fused_ops(tmp_path):
    """Every hard swish, ReLU and (split) swish of a quantized mobile_swish runs with its output
    quantizer as one fused op in a training step, with the same logits and gradients (to float
    rounding) as the activation applied first; a saved and loaded model fuses the same way."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 1, (8, 28, 28, 1)).astype(np.float32))
    y = tf.constant(np.arange(8) % 10, tf.int64)
    quantized = tfq.quantize_model(tfq.models.mobile_swish(dropout=0.0), "lsq+", weight_bits=4, activation_bits=4)
    tfq.calibrate(quantized, x)
    fused, logits, grads = _mobile_swish_step(quantized, x, y)
    assert fused == sorted(["hard_swish"] * 6 + ["relu"] + ["quantized_swish"] * 7), fused
    with kernels.activations_unfused():
        unfused, logits_unfused, grads_unfused = _mobile_swish_step(quantized, x, y)
    assert unfused == []
    np.testing.assert_array_equal(logits, logits_unfused)
    for a, b in zip(grads, grads_unfused):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)

    path = str(tmp_path / "model.h5")
    quantized.save(path)
    with tfq.quantize_scope():
        loaded = keras.models.load_model(path)
    assert {layer.get_config()["name"] for layer in loaded.layers} == {layer.name for layer in quantized.layers}
    assert '"class_name": "QuantizeWrapperV2"' in quantized.to_json().replace("'", '"')
    fused_loaded, logits_loaded, _ = _mobile_swish_step(loaded, x, y)
    assert fused_loaded == fused
    np.testing.assert_array_equal(logits_loaded, logits)
