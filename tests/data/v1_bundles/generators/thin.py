"""Write a thin (channels / 8) MXNet symbolic ResNet-18 checkpoint with random weights (test helper)."""
import sys
from pathlib import Path

from tests.converters.test_mxnet_symbol import write_checkpoint


def thin(graph):
    for node in graph["nodes"]:
        attrs = node.get("attrs") or node.get("attr") or node.get("param") or {}
        if node["op"] == "Convolution":
            attrs["num_filter"] = str(int(attrs["num_filter"]) // 16)
        if node["op"] == "FullyConnected":
            attrs["num_hidden"] = "10"


json_path, params = write_checkpoint(Path(sys.argv[1]), "resnet-18", seed=0, edit=thin)
print(json_path, params)
