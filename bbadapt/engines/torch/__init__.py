"""The torch detector engine: trains and evaluates a torchvision export (``bbadapt export DIR --torchvision OUT``).

Imports no mxnet and no gluoncv (an import-linter contract and a test hold it to that); runs on
Python 3.11/3.12, numpy 1.23/2.x, torch >= 2.4.
"""
