"""A resnet18_v1b (random weights) detector: the smallest body the torchvision detector export takes."""
import sys

import bbadapt

out = sys.argv[1]
report, _ = bbadapt.convert("resnet18_v1b", out, bbadapt.ConvertOptions(weights="random", sizes=[(64, 64)]),
                            bbadapt.DetectorOptions(classes=["raccoon"], overrides={"rpn_channel": 64, "alloc_size": (40, 40), "short": 192, "max_size": 320}))
print(report["passed"])
