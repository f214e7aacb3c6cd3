"""Diagnostics of latent reasoning: dilution (image attention and teacher similarity along the generation),
faithfulness (interventions on latents), collapse and norms. Command line: ``valr diagnose``; write-up and
semantics: ``docs/diagnostics.md``. Modules: ``common`` (traces, probes, generation), ``dilution``,
``faithfulness``, ``collapse``, ``cli``.
"""
