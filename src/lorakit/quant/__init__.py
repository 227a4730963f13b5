"""Weight-only post-training quantization: round-to-nearest and CBQ with LoRA-Rounding (arXiv 2312.07950).

    model = lorakit.quantize(model, bits=4, group_size=128, data=batches)            # CBQ
    model = lorakit.quantize(model, bits=4, group_size=128, method="rtn")           # baseline
    lorakit.quant.save_quantized(model, "out/")  ;  lorakit.quant.load_quantized("out/", base_spec)
"""

from lorakit.quant import cfp
from lorakit.quant.cbq import quantize, reconstruction_loss, window_schedule
from lorakit.quant.data import calibration_batches, perplexity
from lorakit.quant.quantizer import LoRARounding, QuantizedLinear, dequantize, group_params, rtn_codes
from lorakit.quant.storage import load_quantized, save_quantized

__all__ = [
    "LoRARounding", "QuantizedLinear", "calibration_batches", "cfp", "dequantize", "group_params", "load_quantized",
    "perplexity", "quantize", "reconstruction_loss", "rtn_codes", "save_quantized", "window_schedule",
]
