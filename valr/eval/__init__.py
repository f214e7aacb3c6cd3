"""Evaluation without a model: benchmark loaders, frame sampling, answer extraction, scoring, length analysis.

Modules: ``benchmarks`` (``EvalItem``, ``load_benchmark``, ``BENCHMARKS``), ``video`` (uniform frame
sampling), ``extract`` (answers from reasoning outputs), ``predictions`` (predictions JSONL), ``scoring``
(VSI-Bench's official rule and the perception suites), ``score_cmd`` (``valr eval score``) and ``length``
(accuracy against generated length). Nothing is imported here so that ``import valr.eval`` stays cheap.
"""
