"""TFLite flatbuffers re-serialised so that equal quantization vectors are stored once.

Each per-channel tensor (int8 weights and their int32 biases) carries a float32 ``scale`` and an int64
``zero_point`` vector with one entry per channel (TFLite's InterpreterBuilder requires equal lengths), and
those zero points are all zeros: on MobileNetV2 they are 7% of the int8 file. A flatbuffer may point
several tables at one vector, and TFLite copies quantization parameters out of the model when it builds
its tensors, so ``share_quantization_vectors`` unpacks the model with the object API of the generated
schema (``ai_edge_litert.schema_py_generated``) and packs it again, writing each distinct zero-point and
scale vector once. Nothing else changes: the converter itself ends with this object-API round trip, so
without sharing it gives the converter's file back byte for byte; buffer data stays 16-byte aligned when
the input had it so; the file identifier is kept.
"""
from __future__ import annotations

import flatbuffers
import numpy as np

#: vtable offsets of ``QuantizationParameters.scale`` and ``.zero_point`` (schema fields 2 and 3)
SCALE_FIELD = 8
ZERO_POINT_FIELD = 10
#: alignment of ``Buffer.data`` written by TFLite's C++ exporter (``ForceVectorAlignment(..., 16)``)
BUFFER_ALIGNMENT = 16
_BUFFER_DATA_FIELD = 4


def _schema():
    from ai_edge_litert import schema_py_generated
    return schema_py_generated


def vector_position(table, field):
    """Byte position in the file of the first element of ``table``'s vector ``field`` (a vtable offset),
    or None when the field is absent; tables that share one vector give the same position."""
    offset = table._tab.Offset(field)
    return table._tab.Vector(offset) if offset else None


def _uses_external_data(model) -> bool:
    """True for a model whose buffers or custom options live outside the flatbuffer (> 2 GB layout)."""
    for i in range(model.BuffersLength()):
        buffer = model.Buffers(i)
        if buffer.Offset() or buffer.Size():
            return True
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            if subgraph.Operators(o).LargeCustomOptionsOffset():
                return True
    return False


def _buffer_data_aligned(model) -> bool:
    """True when every non-empty buffer's data starts at a multiple of ``BUFFER_ALIGNMENT``."""
    positions = [vector_position(model.Buffers(i), _BUFFER_DATA_FIELD) for i in range(model.BuffersLength())
                 if model.Buffers(i).DataLength()]
    return bool(positions) and all(p % BUFFER_ALIGNMENT == 0 for p in positions)


class _SharingBuilder(flatbuffers.Builder):
    """A Builder whose ``CreateNumpyVector`` writes equal contents of the ``shared`` arrays once (later
    ones reuse the first offset) and starts the ``aligned`` arrays at ``BUFFER_ALIGNMENT`` bytes."""

    def __init__(self, initial_size, shared=(), aligned=()):
        super().__init__(initial_size)
        self.shared_ids = {id(a) for a in shared}
        self.aligned_ids = {id(a) for a in aligned}
        self.offsets_by_content = {}

    def CreateNumpyVector(self, x):
        key = (x.dtype.str, x.tobytes()) if id(x) in self.shared_ids else None
        if key in self.offsets_by_content:
            return self.offsets_by_content[key]
        if id(x) in self.aligned_ids:
            self.Prep(BUFFER_ALIGNMENT, x.nbytes)  # the vector's own Prep calls then add no padding
        offset = super().CreateNumpyVector(x)
        if key is not None:
            self.offsets_by_content[key] = offset
        return offset


def share_quantization_vectors(flatbuffer: bytes) -> bytes:
    """The TFLite model ``flatbuffer`` re-serialised with each distinct ``QuantizationParameters``
    zero-point and scale vector stored once and shared by every tensor that holds it (same model
    otherwise; see the module docstring). A model with data outside the flatbuffer (the > 2 GB layout of
    buffer offsets) is returned unchanged."""
    schema = _schema()
    flatbuffer = bytes(flatbuffer)
    model = schema.Model.GetRootAsModel(flatbuffer, 0)
    if _uses_external_data(model):
        return flatbuffer
    identifier = flatbuffer[4:8] if schema.Model.ModelBufferHasIdentifier(flatbuffer, 0) else None
    align = _buffer_data_aligned(model)
    tree = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    shared = [vector for subgraph in tree.subgraphs or [] for tensor in subgraph.tensors or []
              if tensor.quantization is not None
              for vector in (tensor.quantization.zeroPoint, tensor.quantization.scale)
              if isinstance(vector, np.ndarray)]
    aligned = [buffer.data for buffer in tree.buffers or []
               if align and isinstance(buffer.data, np.ndarray) and buffer.data.size]
    builder = _SharingBuilder(min(len(flatbuffer), flatbuffers.Builder.MAX_BUFFER_SIZE), shared, aligned)
    builder.Finish(tree.Pack(builder), file_identifier=identifier)
    return bytes(builder.Output())
