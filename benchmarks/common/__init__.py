"""Helpers the benchmark cases share: records and tables (report), learned models and their float64
references (learned_models)."""
