"""Foreign weight formats -> (Gluon architecture, structural-name params, source input spec).

One module per format; filled by the converters issue. Each converter yields the same small
thing and nothing else, so everything after it (adapt, check, bundle) is format-agnostic.
"""
