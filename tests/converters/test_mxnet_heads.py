"""Real-world MXNet symbolic graphs end in different heads; output-only ops after the classifier are accepted.

The real zoo ResNet-18 graph (tests/data/mxnet-symbols) ends in ``fc1`` -> ``SoftmaxOutput``. Each
case edits that graph the way other exported graphs look (a plain ``softmax``, a
``SoftmaxActivation``, a logistic loss, no head at all, a classifier named otherwise); the
converted network must compute what MXNet computes with the edited graph up to the classifier,
and the provenance must say what followed it.
"""

from __future__ import annotations

import json

import mxnet as mx
import pytest

from bbadapt.platform.errors import WeightsError
from bbadapt.verify import images
from converters import readers as converters
from converters.readers import mxnet_symbol
from tests.converters.test_mxnet_symbol import FP32_ROUNDING, GRAPHS, max_rel, write_checkpoint


def _index(graph: dict, name: str) -> int:
    return next(i for i, n in enumerate(graph["nodes"]) if n["name"] == name)


def replace_head(op: str, attrs: dict | None = None, label: bool = False):
    def edit(graph):
        softmax = graph["nodes"][_index(graph, "softmax")]
        softmax["op"], softmax["attrs"] = op, attrs or {}
        if not label:
            softmax["inputs"] = softmax["inputs"][:1]
    return edit


def no_head(graph):
    fc = _index(graph, "fc1")
    graph["nodes"] = graph["nodes"][: fc + 1]  # drop softmax_label and SoftmaxOutput
    graph["heads"] = [[fc, 0, 0]]
    graph["arg_nodes"] = [i for i in graph.get("arg_nodes", []) if i <= fc]
    graph.get("attrs", {}).pop("mxnet_version", None)


def renamed_classifier(graph):
    for name in ("fc1", "fc1_weight", "fc1_bias"):
        graph["nodes"][_index(graph, name)]["name"] = name.replace("fc1", "fc1000")


def sigmoid_after_softmax(graph):
    replace_head("softmax", {"axis": "-1"})(graph)
    graph["nodes"].append({"op": "Activation", "name": "act_out", "attrs": {"act_type": "sigmoid"},
                           "inputs": [[_index(graph, "softmax"), 0, 0]]})
    graph["heads"] = [[len(graph["nodes"]) - 1, 0, 0]]


CASES = {
    "SoftmaxOutput": (None, "fc1", ["SoftmaxOutput softmax"]),
    "softmax": (replace_head("softmax", {"axis": "-1"}), "fc1", ["softmax softmax"]),
    "SoftmaxActivation": (replace_head("SoftmaxActivation"), "fc1", ["SoftmaxActivation softmax"]),
    "LogisticRegressionOutput": (replace_head("LogisticRegressionOutput", label=True), "fc1",
                                 ["LogisticRegressionOutput softmax"]),
    "no-head": (no_head, "fc1", []),
    "classifier-fc1000": (renamed_classifier, "fc1000", ["SoftmaxOutput softmax"]),
    "softmax-then-sigmoid": (sigmoid_after_softmax, "fc1", ["softmax softmax", "Activation act_out"]),
}


def mxnet_classifier_output(json_path, params_path, raw, fc: str):
    logits = mx.sym.load(str(json_path)).get_internals()[f"{fc}_output"]
    loaded = mx.nd.load(str(params_path))
    args = {k[4:]: v for k, v in loaded.items() if k.startswith("arg:")}
    aux = {k[4:]: v for k, v in loaded.items() if k.startswith("aux:")}
    args["data"] = mx.nd.array(raw)
    return logits.bind(mx.cpu(), args, aux_states=aux, grad_req="null").forward(is_train=False)[0].asnumpy()


@pytest.mark.parametrize("case", list(CASES))
def test_output_only_heads_are_accepted_recorded_and_the_logits_match_mxnet(tmp_path, case):
    edit, fc, recorded = CASES[case]
    json_path, params_path = write_checkpoint(tmp_path, "resnet-18", edit=edit)
    converted = converters.read(json_path)
    assert converted.provenance["output_activations"] == recorded
    raw, _ = images.photos((64, 64), limit=2)
    reference = mxnet_classifier_output(json_path, params_path, raw, fc)
    assert max_rel(converted.net(mx.nd.array(raw)).asnumpy(), reference) < FP32_ROUNDING


def test_something_else_after_the_classifier_is_still_refused():
    graph = json.loads((GRAPHS / "resnet-18-symbol.json").read_text())
    softmax = graph["nodes"][_index(graph, "softmax")]
    softmax.update(op="Dropout", attrs={"p": "0.5"}, inputs=softmax["inputs"][:1])
    with pytest.raises(WeightsError, match="operators this converter does not map: Dropout"):
        mxnet_symbol.read_graph(graph, "r18")
    graph["nodes"].append({"op": "FullyConnected", "name": "fc2", "attrs": {"num_hidden": "10"},
                           "inputs": [[_index(graph, "fc1"), 0, 0]]})
    with pytest.raises(WeightsError, match="has one classifier .*this one has 2"):
        mxnet_symbol.read_graph(graph, "r18")
