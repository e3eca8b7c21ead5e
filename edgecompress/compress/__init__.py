"""Compression transforms driven by a CompressionPlan: pruning, quantization, sharing, export.

The entry points live in compress/api.py; see its docstring for the four-line tour.
"""
