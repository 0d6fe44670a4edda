"""Weights in and out of other frameworks.

``converters.readers``: one module per foreign format, each yielding a
:class:`bbadapt.core.registry.Converted` (run before adapt). ``converters.writers``: a checked
bundle written as torchvision, ONNX, ... (run after the bundle exists). Readers know only
:mod:`bbadapt.core`; writers also read bundles (:mod:`bbadapt.bundle`).
"""
