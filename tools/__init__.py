"""The project's tools, run from the repository root as `python3 -m tools.<wing>.<module>` (docs/tools.md).

Wings: records/ (pack, verify, compare and audit record folders), gpu/ (checks and benchmarks for a GPU
machine), quant/ (quantization studies), routing/ (MoE routing analysis), dev/ (maintenance: generated
docs, same-artifact checks, record fidelity). common.py and runlog.py are shared by every wing."""
