"""The built-in spatial world (the laptop demo's data), data generation only.

* :mod:`valr.synth.world` - multi-view grid scenes, rendering, per-cell teacher labels (the design rationale);
* :mod:`valr.synth.questions` - question families whose every reasoning step is one lookup in one view;
* :mod:`valr.synth.solver` - an independent solver and step checker, used by the tests;
* :mod:`valr.synth.dataset` - ``make_world_dataset`` (records + PNGs + labels.npz + tokenizer + manifest),
  also ``python -m valr.synth.dataset OUT_DIR``.

Submodules are not imported here so that ``python -m valr.synth.dataset`` runs cleanly.
"""
