"""tfq.export.flatbuffer: equal quantization vectors stored once, the model otherwise unchanged.

``to_tflite`` ends with ``share_quantization_vectors``; the reference here is the converter's own file
(every tensor's vectors written separately), caught on its way into that call.
"""
import os

import flatbuffers
import numpy as np
import pytest
import tf_keras as keras
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import tfq
from tfq.export import bench
from tfq.export import flatbuffer as fb
from tfq.export import tflite as tfl

L = keras.layers


def _conv_depthwise_dense():
    inputs = keras.Input((12, 12, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(name="conv_bn")(x)
    x = L.ReLU(name="conv_relu")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = L.ReLU(name="depthwise_relu")(x)
    x = L.Conv2D(16, 1, name="pointwise")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(5, name="logits")(x), name="conv_depthwise_dense")


@pytest.fixture(scope="module")
def exported():
    """``(to_tflite's file, the converter's file that to_tflite passed to share_quantization_vectors)``."""
    q = tfq.quantize_model(_conv_depthwise_dense(), method="lsq+", weight_bits=8, activation_bits=8)
    tfq.calibrate(q, np.random.default_rng(0).random((32, 12, 12, 3), np.float32))
    converted = []

    def share_and_keep_input(flatbuffer):
        converted.append(flatbuffer)
        return fb.share_quantization_vectors(flatbuffer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfl, "share_quantization_vectors", share_and_keep_input)
        shared = tfl.to_tflite(q)
    assert len(converted) == 1, "to_tflite must pass the converter's file to share_quantization_vectors once"
    return shared, converted[0]


def _quantization_vectors(flatbuffer, field):
    """``[(file position, contents)]`` of every tensor's quantization vector ``field``."""
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    rows = []
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for t in range(subgraph.TensorsLength()):
            quant = subgraph.Tensors(t).Quantization()
            position = fb.vector_position(quant, field) if quant is not None else None
            if position is not None:
                values = quant.ZeroPointAsNumpy() if field == fb.ZERO_POINT_FIELD else quant.ScaleAsNumpy()
                rows.append((position, values.tobytes()))
    return rows


def _tensor_details(flatbuffer):
    interp = Interpreter(model_content=flatbuffer)
    rows = []
    for d in interp.get_tensor_details():
        q = d["quantization_parameters"]
        rows.append((d["index"], d["name"], np.dtype(d["dtype"]).str, tuple(d["shape"]),
                     tuple(d["shape_signature"]), q["scales"].dtype.str, q["scales"].tobytes(),
                     q["zero_points"].dtype.str, q["zero_points"].tobytes(), q["quantized_dimension"]))
    ops = [(o["index"], o["op_name"], tuple(o["inputs"]), tuple(o["outputs"])) for o in interp._get_ops_details()]
    return rows, ops, interp.get_signature_list()


def _outputs_on_random_inputs(flatbuffer, reference, runs=4):
    """Outputs on seeded random int8 inputs, and the XNNPACK partition count (0 for reference kernels)."""
    kwargs = {"experimental_op_resolver_type": OpResolverType.BUILTIN_REF} if reference else {}
    interp = Interpreter(model_content=flatbuffer, **kwargs)
    interp.allocate_tensors()
    detail = interp.get_input_details()[0]
    rng = np.random.default_rng(1)
    outputs = []
    for _ in range(runs):
        interp.set_tensor(detail["index"], rng.integers(-128, 128, size=detail["shape"], dtype=np.int8))
        interp.invoke()
        outputs.append(interp.get_tensor(interp.get_output_details()[0]["index"]).copy())
    return np.stack(outputs), bench.xnnpack_coverage(interp._get_ops_details())["xnnpack_partitions"]


def _tree_differences(a, b, path="model"):
    """Paths where two unpacked object trees (``schema.ModelT``) differ."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
        return [] if same else [path]
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _tree_differences(x, y, f"{path}[{i}]")]
    if hasattr(a, "__dict__"):
        if type(a) is not type(b):
            return [path]
        return [d for key in vars(a) for d in _tree_differences(getattr(a, key), getattr(b, key), f"{path}.{key}")]
    return [] if type(a) is type(b) and a == b else [path]


def test_export_stores_each_distinct_zero_point_vector_once(exported):
    shared, unshared = exported
    assert len(shared) < len(unshared)
    before = _quantization_vectors(unshared, fb.ZERO_POINT_FIELD)
    after = _quantization_vectors(shared, fb.ZERO_POINT_FIELD)
    distinct = {contents for _, contents in before}
    assert len({position for position, _ in before}) == len(before) > len(distinct)  # something to share
    assert [contents for _, contents in after] == [contents for _, contents in before]
    assert len({position for position, _ in after}) == len(distinct)
    # the int64 payload saved is at least that of every repeated vector
    repeated = sum(len(c) for _, c in before) - sum(len(c) for c in distinct)
    assert len(unshared) - len(shared) >= repeated
    scales = _quantization_vectors(shared, fb.SCALE_FIELD)
    assert len({position for position, _ in scales}) == len({contents for _, contents in scales})


def test_sharing_keeps_the_model_and_its_outputs(exported):
    shared, unshared = exported
    assert shared[4:8] == unshared[4:8] == b"TFL3"
    assert not _tree_differences(schema.ModelT.InitFromPackedBuf(unshared, 0),
                                 schema.ModelT.InitFromPackedBuf(shared, 0))
    assert _tensor_details(shared) == _tensor_details(unshared)
    for reference in (False, True):
        out_shared, partitions_shared = _outputs_on_random_inputs(shared, reference)
        out_unshared, partitions_unshared = _outputs_on_random_inputs(unshared, reference)
        assert out_shared.dtype == out_unshared.dtype == np.int8
        assert np.array_equal(out_shared, out_unshared), reference
        assert partitions_shared == partitions_unshared == (0 if reference else 1)


def test_sharing_is_idempotent(exported):
    shared, unshared = exported
    assert fb.share_quantization_vectors(unshared) == shared
    assert fb.share_quantization_vectors(shared) == shared


def test_aligned_buffer_data_stays_aligned(exported):
    """A file whose buffer data starts at multiples of 16 bytes (TFLite's C++ exporter) keeps that."""
    _, unshared = exported
    tree = schema.ModelT.InitFromPackedBuf(unshared, 0)
    data = [b.data for b in tree.buffers if b.data is not None and b.data.size]
    builder = fb._SharingBuilder(len(unshared), aligned=data)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    aligned = bytes(builder.Output())
    for flatbuffer, expected in ((unshared, False), (aligned, True),
                                 (fb.share_quantization_vectors(aligned), True)):
        assert fb._buffer_data_aligned(schema.Model.GetRootAsModel(flatbuffer, 0)) is expected
    result = fb.share_quantization_vectors(aligned)
    assert _tensor_details(result) == _tensor_details(unshared)
    assert np.array_equal(_outputs_on_random_inputs(result, True)[0], _outputs_on_random_inputs(unshared, True)[0])


def test_model_with_external_buffers_is_returned_unchanged(exported):
    """The > 2 GB layout (buffer data after the flatbuffer, at ``offset``/``size``) is left alone."""
    _, unshared = exported
    tree = schema.ModelT.InitFromPackedBuf(unshared, 0)
    index = next(i for i, b in enumerate(tree.buffers) if b.data is not None and b.data.size)
    payload = tree.buffers[index].data.tobytes()
    tree.buffers[index].data = None
    tree.buffers[index].offset, tree.buffers[index].size = len(unshared), len(payload)  # past the end
    builder = flatbuffers.Builder(len(unshared))
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    external = bytes(builder.Output()) + payload
    assert fb.share_quantization_vectors(external) == external


def test_size_breakdown_counts_a_shared_vector_once(exported, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.latency import size_breakdown
    shared, unshared = exported

    def metadata(flatbuffer, name):
        path = tmp_path / name
        path.write_bytes(flatbuffer)
        row = size_breakdown(str(path))
        return sum(row[k] for k in ("quant_metadata_weights", "quant_metadata_int32", "quant_metadata_activations"))

    def payload(vectors, distinct):
        contents = [c for _, c in vectors]
        return sum(len(c) for c in (set(contents) if distinct else contents))

    for flatbuffer, name, distinct in ((unshared, "unshared.tflite", False), (shared, "shared.tflite", True)):
        expected = sum(payload(_quantization_vectors(flatbuffer, field), distinct)
                       for field in (fb.SCALE_FIELD, fb.ZERO_POINT_FIELD))
        assert metadata(flatbuffer, name) == expected, name


def test_size_ceiling_counts_weights_biases_scales_and_the_graph(exported, monkeypatch):
    """The ceiling's data: int8 kernels (one byte per weight), int32 constants and one float32 scale
    per output channel of the per-channel kernels plus one for the per-tensor Dense kernel; the
    graph is the rest of the int8 file without tensor names and quantization vectors (each distinct
    vector once). The model is untrained, so its biases are zeros: conv's (BatchNorm folded) and
    depthwise's are the same 8 zeros, one buffer the converter shares and which counts once; then
    pointwise's 16; the logits' zero bias is dropped by the converter; and the pooling's two axes."""
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.latency import size_breakdown, size_ceiling
    shared, _ = exported
    int8 = size_breakdown(shared)
    weights, int32 = 3 * 3 * 3 * 8 + 3 * 3 * 8 + 8 * 16 + 16 * 5, 4 * (8 + 16 + 2)
    scales = 8 + 8 + 16 + 1
    assert int8["constant_data"] == {"INT8": weights, "INT32": int32}
    assert int8["weight_scales"] == scales
    names = sum(len(d["name"]) for d in Interpreter(model_content=shared).get_tensor_details())
    vectors = sum(len(contents) for field in (fb.SCALE_FIELD, fb.ZERO_POINT_FIELD)
                  for _, contents in set(_quantization_vectors(shared, field)))  # one per file position
    graph = len(shared) - weights - int32 - names - vectors
    ceiling = size_ceiling(100_000, int8)
    assert ceiling["graph_bytes"] == graph > 0
    assert ceiling["data_and_weight_scales"] == pytest.approx(100_000 / (weights + int32 + 4 * scales))
    assert ceiling["plus_graph"] == pytest.approx(100_000 / (weights + int32 + 4 * scales + graph))
