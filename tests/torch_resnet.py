"""torchvision's ResNet forward pass written with torch's own ops (``torch.nn.functional``).

Written from torchvision's documented architecture ("ResNet v1.5": 7x7/2 stem, BN, ReLU,
3x3/2 max-pool with padding 1; blocks with the stride in the 3x3; conv1x1+BN projection
shortcut on the first block of a stage; global average pool; fc), not from bbadapt's code,
so it is an independent judge of what a torchvision state dict computes.
"""

from __future__ import annotations

import numpy as np


def forward(state: dict, x: np.ndarray) -> np.ndarray:
    """Logits of torchvision ``resnetN`` (eval mode) with ``state`` (name -> array or tensor) on NCHW ``x``."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}

    def bn(h, name):
        return F.batch_norm(h, t[f"{name}.running_mean"], t[f"{name}.running_var"], t[f"{name}.weight"],
                            t[f"{name}.bias"], training=False, eps=1e-5)

    bottleneck = "layer1.0.conv3.weight" in t
    with torch.no_grad():
        h = torch.as_tensor(np.asarray(x, np.float32))
        h = F.max_pool2d(F.relu(bn(F.conv2d(h, t["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
        for stage in range(1, 5):
            i = 0
            while f"layer{stage}.{i}.conv1.weight" in t:
                p = f"layer{stage}.{i}"
                stride = 2 if stage > 1 and i == 0 else 1
                if bottleneck:
                    y = F.relu(bn(F.conv2d(h, t[f"{p}.conv1.weight"]), f"{p}.bn1"))
                    y = F.relu(bn(F.conv2d(y, t[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                    y = bn(F.conv2d(y, t[f"{p}.conv3.weight"]), f"{p}.bn3")
                else:
                    y = F.relu(bn(F.conv2d(h, t[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
                    y = bn(F.conv2d(y, t[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
                if f"{p}.downsample.0.weight" in t:
                    h = bn(F.conv2d(h, t[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
                h = F.relu(y + h)
                i += 1
        h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        return F.linear(h, t["fc.weight"], t["fc.bias"]).numpy()
