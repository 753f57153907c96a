"""Quantization studies on a saved checkpoint: quant_study (bits and methods), hessian_precision."""
