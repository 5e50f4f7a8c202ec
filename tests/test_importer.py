"""Import and normalization of messy exports."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import conv_bn_model, make_model, ort_run
from edgec.errors import EdgecError
from edgec.importer import load_model, normalize, parse_input_shapes


def test_constant_and_constant_of_shape_become_initializers():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(W)),
        helper.make_node("Constant", [], ["shp"], value_ints=[4]),
        helper.make_node("ConstantOfShape", ["shp"], ["B"],
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Conv", ["x", "W", "B"], ["y"]),
    ]
    m = make_model(nodes, [("x", [1, 2, 5, 5])], [("y", [1, 4, 3, 3])])
    norm, notes = normalize(m)
    assert [n.op_type for n in norm.graph.node] == ["Conv"]
    assert {"W", "B", "shp"} <= {t.name for t in norm.graph.initializer}
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(ort_run(norm, {"x": x})[0], ort_run(m, {"x": x})[0], rtol=1e-6)


def test_initializers_listed_as_inputs_are_dropped():
    m = conv_bn_model()
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    norm, notes = normalize(m)
    assert [i.name for i in norm.graph.input] == ["x"]
    assert any("graph inputs" in n for n in notes.notes)


def test_old_opset_is_converted():
    m = conv_bn_model(opset=9)
    m.ir_version = 4
    norm, notes = normalize(m)
    assert notes.source_opset == 9 and notes.opset == 13
    x = np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(ort_run(norm, {"x": x})[0], ort_run(m, {"x": x})[0], rtol=1e-5,
                               atol=1e-5)


def test_input_shape_override_and_shape_inference():
    m = conv_bn_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(EdgecError, match="input 'x' has a dynamic shape"):
        normalize(m)
    norm, _ = normalize(m, {"x": (4, 3, 12, 12)})
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(norm.graph.value_info) + list(norm.graph.output)}
    assert shapes["logits"] == [4, 10]
    assert shapes["y"] == [4, 8, 12, 12]


def test_parse_input_shapes():
    assert parse_input_shapes(["x=1x3x224x224", "y = 2,5"]) == {"x": (1, 3, 224, 224),
                                                                "y": (2, 5)}
    for bad in ["x", "x=", "x=1xa", "x=0x3"]:
        with pytest.raises(EdgecError):
            parse_input_shapes([bad])


def test_external_data_inside_folder_loads(tmp_path):
    m = conv_bn_model()
    onnx.save_model(conv_bn_model(), tmp_path / "ext.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    loaded = load_model(tmp_path / "ext.onnx")
    x = np.random.default_rng(2).standard_normal((1, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(ort_run(loaded, {"x": x})[0], ort_run(m, {"x": x})[0])


def test_external_data_outside_folder_refused(tmp_path):
    sub = tmp_path / "models"
    sub.mkdir()
    m = conv_bn_model()
    onnx.save_model(m, sub / "ext.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    (sub / "weights.bin").rename(tmp_path / "weights.bin")
    loaded = onnx.load(sub / "ext.onnx", load_external_data=False)
    for t in loaded.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../weights.bin"
    onnx.save(loaded, sub / "evil.onnx")
    with pytest.raises(EdgecError, match="outside the model's folder"):
        load_model(sub / "evil.onnx")
    for t in loaded.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = str(tmp_path / "weights.bin")
    onnx.save(loaded, sub / "abs.onnx")
    with pytest.raises(EdgecError, match="absolute"):
        load_model(sub / "abs.onnx")


def test_normalize_does_not_mutate_input():
    m = conv_bn_model()
    before = m.SerializeToString()
    normalize(m, {"x": (2, 3, 12, 12)})
    assert m.SerializeToString() == before


def test_custom_domain_refused():
    m = make_model([helper.make_node("Foo", ["x"], ["y"], domain="com.acme", name="foo1")],
                   [("x", [1, 2])], [("y", [1, 2])])
    m.opset_import.append(helper.make_opsetid("com.acme", 1))
    with pytest.raises(EdgecError, match="com.acme"):
        normalize(m)
