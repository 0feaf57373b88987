"""Model checks that must see everything: tensors and operators hidden in functions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mtcore.errors import ModelInvalid
from mtcore.modelcheck import check_model


def _branch(nodes: list, out: str) -> onnx.GraphProto:
    return helper.make_graph(
        nodes, "b", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 4])]
    )


def _model_with_function(nodes: list, out: str, domain: str, name: str) -> bytes:
    """y = F(x), where local function F hides `nodes` inside an If branch."""
    body = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node(
            "If",
            ["c"],
            ["fy"],
            then_branch=_branch(nodes, out),
            else_branch=_branch([helper.make_node("Identity", ["fx"], ["e"])], "e"),
        ),
    ]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    function = helper.make_function(domain, name, ["fx"], ["fy"], body, opsets)
    graph = helper.make_graph(
        [helper.make_node(name, ["x"], ["y"], domain=domain)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    model = helper.make_model(
        graph, functions=[function], opset_imports=[*opsets, helper.make_opsetid(domain, 1)]
    )
    model.ir_version = 8
    return model.SerializeToString()


def _external_tensor() -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.zeros((2, 4), np.float32), "ext")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "registry.sqlite"), ("offset", "0"), ("length", "32")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def test_external_data_inside_a_function_subgraph_is_refused() -> None:
    data = _model_with_function(
        [helper.make_node("Constant", [], ["k"], value=_external_tensor())], "k", "local", "F"
    )
    with pytest.raises(ModelInvalid, match="external data"):
        check_model(data)


def test_contrib_operator_inside_a_function_subgraph_is_refused() -> None:
    gelu = helper.make_node("Gelu", ["fx"], ["t"], domain="com.microsoft")
    with pytest.raises(ModelInvalid):
        check_model(_model_with_function([gelu], "t", "local", "F"))


def test_function_named_like_a_builtin_operator_is_refused() -> None:
    """ONNX Runtime would run its own com.microsoft:Gelu kernel, not the function body."""
    identity = helper.make_node("Identity", ["fx"], ["t"])
    with pytest.raises(ModelInvalid, match="local functions"):
        check_model(_model_with_function([identity], "t", "com.microsoft", "Gelu"))


def test_overlong_tensor_names_are_refused() -> None:
    name = "y" * 300
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], [name])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(ModelInvalid, match="characters"):
        check_model(model.SerializeToString())
