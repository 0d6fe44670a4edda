"""The v1 detector fixture: the thin symbolic ResNet-18 with a Faster R-CNN whose RPN has 64 channels."""
import sys

import bbadapt

out, weights = sys.argv[1], sys.argv[2]
report, _ = bbadapt.convert(None, out, bbadapt.ConvertOptions(weights=weights, sizes=[(64, 64)]),
                            bbadapt.DetectorOptions(classes=["raccoon"], overrides={"rpn_channel": 32, "alloc_size": (32, 32), "short": 192, "max_size": 320}))
print(report["passed"])
