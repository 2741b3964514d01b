"""Quantized weights as every subcommand loads them: the layout (:mod:`.weights`), the runtime
layers (:mod:`.runtime`, with the int4 CUDA kernel of :mod:`.kernels`) and the file format
(:mod:`.fileformat`). Writing them (RTN, AWQ, GPTQ, calibration) is the ``quantize`` task's
job (:mod:`visbatch.core.tasks.quantize`); reading them is the engine's, so any ``--model
FILE.safetensors`` works everywhere.
"""

from visbatch.core.models.registry import WeightFileFormat, register_weight_file_format
from visbatch.core.quantized.fileformat import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUT,
    check_quantized_tensors,
    describe_file,
    is_quantized_file,
    load_quantized,
    read_quantized_config,
    save_quantized,
)
from visbatch.core.quantized.runtime import QuantConv1x1, QuantizedWeightStore, QuantLinear, install
from visbatch.core.quantized.weights import QuantizedWeight, effective_weight, pack_int4, unpack_int4

register_weight_file_format(WeightFileFormat("quantized", is_quantized_file, load_quantized))

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUT",
    "QuantConv1x1",
    "QuantLinear",
    "QuantizedWeight",
    "QuantizedWeightStore",
    "check_quantized_tensors",
    "describe_file",
    "effective_weight",
    "install",
    "is_quantized_file",
    "load_quantized",
    "pack_int4",
    "read_quantized_config",
    "save_quantized",
    "unpack_int4",
]
