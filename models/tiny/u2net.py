"""The tiny kit's background-removal model: a U2Net-shaped ONNX graph for rembg (input
``input.1`` 1x3x320x320, seven sigmoid 1x1x320x320 outputs ``d0``..``d6``), built directly
with the ``onnx`` helpers from a seeded NumPy generator: two convolutions and a smoothing
pool, so the masks are noise but have the real shapes and names.
"""

from __future__ import annotations

from pathlib import Path


def build_u2net_onnx(path: Path, seed: int) -> Path:
    """A U2Net-shaped ONNX graph: 1x3x320x320 in, seven sigmoid 1x1x320x320 maps out."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((1, 8, 5, 5)) * 0.2).astype(np.float32)
    b2 = np.zeros(1, dtype=np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["input.1", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node(
            "AveragePool",
            ["r1"],
            ["p1"],
            kernel_shape=[9, 9],
            pads=[4, 4, 4, 4],
            strides=[1, 1],
            count_include_pad=0,
        ),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[2, 2, 2, 2]),
        helper.make_node("Sigmoid", ["c2"], ["d0"]),
    ]
    outputs = [helper.make_tensor_value_info("d0", TensorProto.FLOAT, [1, 1, 320, 320])]
    for k in range(1, 7):
        nodes.append(helper.make_node("Identity", ["d0"], [f"d{k}"]))
        outputs.append(helper.make_tensor_value_info(f"d{k}", TensorProto.FLOAT, [1, 1, 320, 320]))
    graph = helper.make_graph(
        nodes,
        "tiny_u2net",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 320, 320])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(
        graph, producer_name="tollgate-tiny", opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path
