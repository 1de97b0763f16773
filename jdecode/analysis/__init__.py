"""Efficiency analysis: hardware table, per-operator cost model, roofline, measurement."""
