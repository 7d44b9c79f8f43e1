"""Worker for tests/test_distributed.py: trains one tiny quantized model and saves its variables.

Run as a script in a fresh process (TensorFlow's devices must be configured before it starts):

    python tests/dist_worker.py --method lsq+ --mode single   --out single.npz
    python tests/dist_worker.py --method lsq+ --mode mirrored --out mirrored.npz
    TF_CONFIG=... python tests/dist_worker.py --method lsq+ --mode multiworker --out worker0.npz

``single``: the default strategy on one CPU device. ``mirrored``: MirroredStrategy over the CPU
split into ``--replicas`` logical devices. ``multiworker``: MultiWorkerMirroredStrategy, one CPU
replica per process, cluster from TF_CONFIG. Every mode trains the same model from the same
weights on the same data with the same global batch, plain SGD, no shuffling.

The npz holds, for every model variable, ``var/<name>/<replica>`` (each local replica's copy; one
entry outside a strategy), ``init/<name>`` (its value before ``fit``) and ``epoch1/<name>`` (after
the first epoch, first replica), the per-step history of the method's callback (``adaqat/<key>``,
``ddq/<key>``), the per-epoch losses and the inference output on the first batch (``predictions``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

METHODS = ("lsq+", "n2uq", "ddq", "adaqat")
MODES = ("single", "mirrored", "multiworker")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tfq needs Keras 2, set before TensorFlow loads
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GLOBAL_BATCH = 8
STEPS_PER_EPOCH = 4
EPOCHS = 2


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--out", required=True, help="npz file to write")
    parser.add_argument("--replicas", type=int, default=2, help="logical CPU devices for --mode mirrored")
    parser.add_argument("--calibrate", action="store_true",
                        help="tfq.calibrate on the first global batch before fit (the step then traces no init branch)")
    parser.add_argument("--probe-frozen", action="store_true",
                        help="adaqat: freeze both bit-widths from the start (the probes are skipped)")
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error(f"--replicas must be >= 1, got {args.replicas}")
    return args


def configure_devices(mode, replicas):
    import tensorflow as tf
    tf.config.threading.set_inter_op_parallelism_threads(2)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    if mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    tf.random.set_seed(0)


def make_strategy(mode, replicas):
    import tensorflow as tf
    if mode == "single":
        return tf.distribute.get_strategy()
    if mode == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]
        return tf.distribute.MirroredStrategy(devices)
    if "TF_CONFIG" not in os.environ:
        raise SystemExit("--mode multiworker needs TF_CONFIG")
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def float_model():
    """Conv - ReLU - depthwise - ReLU - 1x1 conv - ReLU - Dense, weights from a fixed NumPy seed."""
    import numpy as np
    import tf_keras as keras
    x = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(4, 3, padding="same", name="first")(x)
    y = keras.layers.ReLU()(y)
    y = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.Conv2D(6, 1, name="pw")(y)
    y = keras.layers.ReLU()(y)
    y = keras.layers.Flatten()(y)
    y = keras.layers.Dense(5, name="last")(y)
    model = keras.Model(x, y)
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(0, 0.4, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def data():
    import numpy as np
    rng = np.random.default_rng(2)
    x = rng.random((GLOBAL_BATCH * STEPS_PER_EPOCH, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 5, GLOBAL_BATCH * STEPS_PER_EPOCH).astype(np.int64)
    return x, y


def build(method, probe_frozen=False):
    """(quantized model, loss, callback, learning rate)."""
    import tf_keras as keras
    import tfq
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = float_model()
    if method == "lsq+":
        return tfq.quantize_model(model, method="lsq+", weight_bits=4, activation_bits=4), loss, None, 0.05
    if method == "n2uq":
        return tfq.quantize_model(model, method="n2uq", weight_bits=2, activation_bits=2), loss, None, 0.05
    if method == "ddq":
        q = tfq.quantize_model(model, method="ddq", target_bits=4)
        schedule = tfq.callbacks.DDQGateSchedule(target_bits=4, ramp=0.75, stages=3)
        return q, schedule.constrained_loss(q, loss), schedule, 0.05
    q = tfq.quantize_model(model, method="adaqat", weight_bits=4, activation_bits=4)
    if probe_frozen:
        from tfq.quantizers import adaqat as aq
        for group in aq.adaqat_states(q).values():
            for state in group:
                state["frozen"].assign(True)
    callback = tfq.callbacks.AdaQAT(lambda_=0.05, lr_weight=2.0, lr_activation=2.0, oscillation_limit=2)
    return q, loss, callback, 0.05


def replica_values(strategy, variable):
    values = strategy.experimental_local_results(variable)
    return [v.numpy() for v in values]


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    configure_devices(args.mode, args.replicas)
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    strategy = make_strategy(args.mode, args.replicas)
    x, y = data()
    with strategy.scope():
        model, loss, callback, learning_rate = build(args.method, args.probe_frozen)
        model.compile(keras.optimizers.SGD(learning_rate), loss=loss)
    if args.calibrate:
        import tfq
        tfq.calibrate(model, x[:GLOBAL_BATCH])
    def snapshot(prefix):
        """Every variable's value on the first replica, under ``<prefix>/<name>``."""
        return {f"{prefix}/{v.name}": replica_values(strategy, v)[0] for v in model.variables}

    # the starting point, so that the test can measure how far training moved each variable
    initial = snapshot("init")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    first_epoch = {}

    class RecordFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                first_epoch.update(snapshot("epoch1"))

    history = model.fit(dataset, epochs=EPOCHS, verbose=0, shuffle=False,
                        callbacks=([callback] if callback is not None else []) + [RecordFirstEpoch()])

    out = {"losses": np.asarray(history.history["loss"], np.float64),
           "replicas": np.asarray(strategy.num_replicas_in_sync),
           "predictions": model(x[:GLOBAL_BATCH], training=False).numpy(), **initial, **first_epoch}
    for variable in model.variables:
        for i, value in enumerate(replica_values(strategy, variable)):
            out[f"var/{variable.name}/{i}"] = value
    if args.method == "adaqat":  # the callback's per-step record and the epoch logs Keras reports
        for key in ("weight_bits", "activation_bits", "bitops"):
            out[f"logs/{key}"] = np.asarray(history.history[key], np.float64)
        for key, values in callback.history.items():
            out[f"adaqat/{key}"] = np.asarray([np.nan if v is None else v for v in values], np.float64)
    if args.method == "ddq":
        for key in ("memory_bits", "budget_bits", "bits_per_weight"):
            out[f"ddq/{key}"] = np.asarray([entry[key] for entry in callback.history], np.float64)
        out["ddq/layer_bits"] = np.asarray(json.dumps([entry["bits"] for entry in callback.history]))
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
