"""Network builders that an ``arch`` record may name (see :mod:`bbadapt.core.registry`).

These are architectures with no model-zoo name: the original MXNet symbolic ResNets, the
Keras applications ResNets, and Gluon ``resnetN_v1`` with another class count. They live in
the core, not beside the readers, because reloading a bundle must rebuild them without
knowing which file format the weights once came from.
"""

from bbadapt.core.architectures import gluon_resnet, keras_resnet, symbolic_resnet  # noqa: F401 - registers builders
