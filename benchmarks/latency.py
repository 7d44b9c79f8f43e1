"""Latency / file-size benchmark (issue 8), following shared/BENCHMARKS.md.

For each network (``small_cnn``, ``mobile_swish`` on 28x28x1; keras.applications MobileNetV2 224x224x3,
alpha 1.0, weights=None) the variants

* ``fp32``        float model, plain TFLite converter;
* ``tfq-int8``    ``tfq.quantize_model(method="lsq+", W8A8)``, calibrated, ``tfq.export.to_tflite``;
* ``tfq-int4w``   W4A8 (first/last layers 8-bit), ``to_tflite(int4_weights=True)``;
* ``tfmot-int8``  tfmot's default 8-bit scheme (``benchmarks.common.tfmot_peer``, which gives the layers
  tfmot rejects its 8-bit output quantizer) + converter with ``Optimize.DEFAULT``;
* ``ptq-int8``    the converter's full-integer post-training quantization (representative data), a
                  reference for what the plain converter makes of the same network;

are measured side by side on the host by ``tfq.export.bench.compare`` (models loaded, warmed up, then
the timed runs interleaved A B C ...; medians) at 1 and 2 threads, and reported as ratios to fp32,
together with each graph's op counts, QUANTIZE/DEQUANTIZE ops and XNNPACK partitions.  With an arm64
sysroot (export/prepare_aarch64_sysroot.sh) the integer exports also run under qemu and their outputs
are compared with the host's reference kernels (correctness only).  Latency is not accuracy: weights
are the seeded initial ones (BatchNorm and biases made trained-like, ``trained_like``), calibrated on
Fashion-MNIST images (resized / repeated to 3 channels for MobileNetV2).

    python -m benchmarks.latency                      # full: runs=50 warmup=5, all networks
    python -m benchmarks.latency --networks=small_cnn --runs=5 --warmup=1 --no_emulate   # smoke
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
import traceback

import numpy as np

import tfq  # noqa: F401  (Keras 2 before TensorFlow)
import tensorflow as tf

from benchmarks.common import command_line, tfmot_peer
from tfq import models, train
from tfq.export import bench

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache", "latency")
RESULTS = os.path.join(HERE, "results")
NETWORKS = ("small_cnn", "mobile_swish", "mobilenet_v2")
VARIANTS = ("fp32", "tfq-int8", "tfq-int4w", "tfmot-int8", "ptq-int8")


def build(network, seed=0):
    """The network with seeded initial weights and, as after training, BatchNorm statistics and
    parameters and layer biases drawn at random (``trained_like``)."""
    if network == "mobilenet_v2":
        net = models.get("mobilenet_v2", seed=seed, input_shape=(224, 224, 3), alpha=1.0, num_classes=1000)
    else:
        net = models.get(network, seed=seed)
    return trained_like(net, seed)


def trained_like(net, seed):
    """Give every BatchNormalization random statistics and parameters and every bias random values
    (seeded). At initialisation they are 0 and 1, so every folded bias of a channel count would be the
    same zero vector, which the converter stores once: the int8 file would be smaller than the file
    of any trained network (MobileNetV2: 17,000 instead of 68,232 bytes of int32 biases)."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        for weight in layer.weights:
            name = weight.name.split("/")[-1].split(":")[0]
            shape = weight.shape.as_list()
            if name in ("gamma", "moving_variance"):
                weight.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
            elif name in ("beta", "moving_mean", "bias"):
                weight.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))
    return net


def calibration_images(network, count=64):
    x, _ = tfq.data.load_numpy("fashion_mnist", "train", limit=count)
    if network == "mobilenet_v2":
        x = tf.image.resize(np.repeat(x, 3, axis=-1), (224, 224)).numpy()
    return x.astype(np.float32)


def export_fp32(model, path, images):
    with open(path, "wb") as handle:
        handle.write(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def _export_tfq(model, path, images, weight_bits, int4_weights):
    from tfq.export import tflite
    quantized = tfq.quantize_model(model, method="lsq+", weight_bits=weight_bits, activation_bits=8)
    tfq.calibrate(quantized, images[:32])
    tflite.to_tflite(quantized, path, int4_weights=int4_weights)


def export_tfq_int8(model, path, images):
    _export_tfq(model, path, images, 8, False)


def export_tfq_int4w(model, path, images):
    _export_tfq(model, path, images, 4, True)


def export_tfmot_int8(model, path, images):
    quantized, _ = tfmot_peer(model, 8)
    for start in range(0, len(images), 16):    # moving-average activation ranges from a few batches
        quantized(images[start:start + 16], training=True)
    converter = tf.lite.TFLiteConverter.from_keras_model(quantized)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    with open(path, "wb") as handle:
        handle.write(converter.convert())


def export_ptq_int8(model, path, images):
    def representative():
        for image in images[:32]:
            yield [image[np.newaxis]]
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    with open(path, "wb") as handle:
        handle.write(converter.convert())


EXPORTERS = {"fp32": export_fp32, "tfq-int8": export_tfq_int8, "tfq-int4w": export_tfq_int4w,
             "tfmot-int8": export_tfmot_int8, "ptq-int8": export_ptq_int8}


def size_breakdown(path):
    """Bytes of a .tflite file (a path or the bytes) by content: constant data per tensor type,
    per-channel quantization metadata (float32 scales + int64 zero points) of constant tensors, split
    weights / int32 biases, the number of weight scales and the bytes of tensor names. A buffer, scale
    or zero-point vector shared by several tensors (the converter's, ``tfq.export.flatbuffer``)
    counts once, under the first tensor that holds it."""
    from ai_edge_litert import schema_py_generated as schema
    from tfq.export.flatbuffer import SCALE_FIELD, ZERO_POINT_FIELD, vector_position
    data = path if isinstance(path, (bytes, bytearray)) else open(path, "rb").read()
    model = schema.Model.GetRootAsModel(data, 0)
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    out = {"file": len(data), "constant_data": {}, "quant_metadata_weights": 0, "quant_metadata_int32": 0,
           "quant_metadata_activations": 0, "weight_scales": 0, "tensor_name_bytes": 0}
    counted = set()  # file positions of the quantization vectors already counted
    buffers_counted = set()

    def unshared(quant, field, length):
        position = vector_position(quant, field)
        if position is None or position in counted:
            return 0
        counted.add(position)
        return length
    for index in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(index)
        for t in range(subgraph.TensorsLength()):
            tensor = subgraph.Tensors(t)
            out["tensor_name_bytes"] += len(tensor.Name() or b"")
            buffer = model.Buffers(tensor.Buffer())
            size = buffer.DataLength() if buffer is not None else 0
            name = type_names.get(tensor.Type(), str(tensor.Type()))
            if size and tensor.Buffer() not in buffers_counted:  # the converter shares equal buffers
                buffers_counted.add(tensor.Buffer())
                out["constant_data"][name] = out["constant_data"].get(name, 0) + size
            quant = tensor.Quantization()
            if quant is None:
                continue
            scales = unshared(quant, SCALE_FIELD, quant.ScaleLength())
            meta = 4 * scales + 8 * unshared(quant, ZERO_POINT_FIELD, quant.ZeroPointLength())
            key = ("quant_metadata_activations" if not size else
                   "quant_metadata_int32" if name == "INT32" else "quant_metadata_weights")
            out[key] += meta
            if key == "quant_metadata_weights":
                out["weight_scales"] += scales
    return out


def size_ceiling(fp32_bytes, int8):
    """The largest fp32/int8 file-size ratio a per-channel int8 TFLite file of this network can reach,
    from the fp32 file's size and the int8 file's ``size_breakdown``. Such a file must hold its
    constant data (int8/int4 weights, int32 biases) and one float32 scale per weight output channel
    (BatchNorm is folded into them): ``data_and_weight_scales`` counts nothing else.
    ``plus_graph`` adds the int8 file's own graph, what is left of it without constant data, tensor
    names and quantization vectors: operator and tensor tables, shapes, signature. Also the share of
    the int8 file that is per-channel quantization metadata."""
    data = sum(int8["constant_data"].values()) + 4 * int8["weight_scales"]
    metadata = int8["quant_metadata_weights"] + int8["quant_metadata_int32"]
    graph = (int8["file"] - sum(int8["constant_data"].values()) - int8["tensor_name_bytes"] - metadata
             - int8["quant_metadata_activations"])
    return {"data_and_weight_scales": fp32_bytes / data, "plus_graph": fp32_bytes / (data + graph),
            "graph_bytes": graph, "per_channel_metadata_bytes": metadata,
            "metadata_share_of_int8_file": metadata / int8["file"]}


def export_all(network, variants, folder, seed):
    """Write every variant's .tflite; returns {variant: path or None} and {variant: error}."""
    images = calibration_images(network)
    paths, errors = {}, {}
    for variant in variants:
        path = os.path.join(folder, f"{network}_{variant}.tflite")
        try:
            start = time.perf_counter()
            EXPORTERS[variant](build(network, seed), path, images)
            paths[variant] = path
            print(f"  exported {variant}: {os.path.getsize(path) / 1024:.1f} KB in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        except Exception as error:  # recorded in the JSON; the other variants still run
            paths[variant] = None
            errors[variant] = f"{type(error).__name__}: {error}"[:2000]
            print(f"  {variant} export failed: {errors[variant][:300]}", flush=True)
            traceback.print_exc(limit=3)
    return paths, errors


def measure_network(network, variants, args, folder):
    print(f"{network}:", flush=True)
    paths, errors = export_all(network, variants, folder, args.seed)
    ready = [v for v in variants if paths.get(v)]
    entry = {"network": network, "export_errors": errors, "variants": {}}
    for variant in ready:
        entry["variants"][variant] = {"file_bytes": os.path.getsize(paths[variant]),
                                      "size_breakdown": size_breakdown(paths[variant]),
                                      "graph": bench.graph_summary(paths[variant])}
    for threads in args.threads:
        results = bench.compare([paths[v] for v in ready], "host", threads=threads, runs=args.runs,
                                warmup=args.warmup)
        for variant, result in zip(ready, results):
            entry["variants"][variant][f"threads_{threads}"] = {
                key: result[key] for key in ("median_ms", "mean_ms", "p90_ms", "min_ms", "max_ms", "std_ms",
                                             "init_ms", "first_ms", "peak_memory_mb")}
        print("\n" + bench.format_table(results) + "\n", flush=True)
    entry["memory_note"] = bench.MEMORY_NOTE
    if "fp32" in entry["variants"]:
        base = entry["variants"]["fp32"]
        for variant, row in entry["variants"].items():
            row["size_ratio_to_fp32"] = base["file_bytes"] / row["file_bytes"]
            for threads in args.threads:
                row[f"speedup_{threads}_threads"] = (base[f"threads_{threads}"]["median_ms"]
                                                     / row[f"threads_{threads}"]["median_ms"])
                # ratio of the fastest runs: closer to an idle machine when other jobs share the cores
                row[f"speedup_min_{threads}_threads"] = (base[f"threads_{threads}"]["min_ms"]
                                                         / row[f"threads_{threads}"]["min_ms"])
    if args.emulate:
        entry["aarch64_emulation"] = emulate(network, paths, [v for v in ready if v != "fp32"] + ["fp32"])
    return entry


def emulate(network, paths, variants):
    try:
        bench.find_emulator()
    except bench.BenchmarkError as error:
        return {"skipped": str(error)}
    rows = {}
    for variant in variants:
        samples = 2 if network == "mobilenet_v2" else 4
        try:
            result = bench.compare([paths[variant]], "aarch64", emulate=True, samples=samples)[0]
            rows[variant] = {key: result[key] for key in ("match", "mismatched_values", "compared_values",
                                                          "max_abs_diff", "emulation_seconds", "kernels")}
            rows[variant]["runtime"] = result["device"]["runtime"]
        except Exception as error:
            rows[variant] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        print(f"  aarch64 emulated {variant}: {rows[variant]}", flush=True)
    return rows


def summary(networks):
    lines = {}
    for entry in networks:
        for variant, row in entry["variants"].items():
            if variant == "fp32" or "size_ratio_to_fp32" not in row:
                continue
            text = f"size x{row['size_ratio_to_fp32']:.2f}"
            for threads in sorted(k.split("_")[1] for k in row if k.startswith("speedup_") and "min" not in k):
                text += (f", {threads} thread(s) x{row[f'speedup_{threads}_threads']:.2f} "
                         f"(min x{row[f'speedup_min_{threads}_threads']:.2f})")
            lines[f"{entry['network']} {variant}"] = text
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", default=",".join(NETWORKS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_emulate", dest="emulate", action="store_false",
                        help="skip the aarch64 output check under qemu")
    parser.add_argument("--out", default=os.path.join(RESULTS, "latency.json"))
    args = parser.parse_args(argv)
    networks = [n for n in args.networks.split(",") if n]
    variants = [v for v in args.variants.split(",") if v]
    for name, values, allowed in (("--networks", networks, NETWORKS), ("--variants", variants, VARIANTS)):
        if not values or any(v not in allowed for v in values):
            raise SystemExit(f"{name} must be a comma list from {allowed}, got {values}")
    args.threads = [int(t) for t in args.threads.split(",")]
    os.makedirs(CACHE, exist_ok=True)
    start = time.perf_counter()
    results = {"benchmark": "latency",
               "command": command_line("latency", argv),
               "protocol": {k: v for k, v in vars(args).items() if k != "out"},
               "machine": dict(train.machine_info(), load_average_1min_at_start=os.getloadavg()[0],
                               device=bench.host_device()["description"]),
               "note": f"2-core machine, 1-minute load average {os.getloadavg()[0]:.2f} at the start; ratios "
                       "come from interleaved runs in one process, absolute times move with any load",
               "networks": []}
    for network in networks:
        results["networks"].append(measure_network(network, variants, args, CACHE))
    results["summary"] = summary(results["networks"])
    mnv2 = next((n for n in results["networks"] if n["network"] == "mobilenet_v2"), None)
    if mnv2 and "tfq-int8" in mnv2["variants"] and "speedup_1_threads" in mnv2["variants"]["tfq-int8"]:
        row = mnv2["variants"]["tfq-int8"]
        results["targets"] = {
            "int8_speedup_mobilenet_v2_1thread": {"target": 1.8, "measured": row["speedup_1_threads"],
                                                  "measured_min_ratio": row["speedup_min_1_threads"]},
            "int8_size_ratio_mobilenet_v2": dict({"target": 3.9, "measured": row["size_ratio_to_fp32"]},
                                                 ceiling=size_ceiling(mnv2["variants"]["fp32"]["file_bytes"],
                                                                     row["size_breakdown"]))}
    results["seconds"] = time.perf_counter() - start
    results["date"] = datetime.date.today().isoformat()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(json.dumps(results["summary"], indent=1))
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
