"""Run a bbadapt ONNX detector on JPEG files: onnxruntime, numpy and Pillow only (docs/deploy.md).

    python deploy_onnxruntime.py detector.onnx photo1.jpg photo2.jpg ...   # same-size photos share one batch

Prints one JSON line per detection: file, class, score, box (x1, y1, x2, y2 in the photo's pixels).
"""

import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
files = sys.argv[2:]
images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])  # uint8 [N, H, W, 3]
boxes, scores, labels, batch_index = session.run(None, {"images": images})
for box, score, label, i in zip(boxes, scores, labels, batch_index):
    print(json.dumps({"file": files[i], "class": classes[label - 1], "score": float(score),
                      "box": [round(float(v), 3) for v in box]}))
