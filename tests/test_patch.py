import io
import zipfile

import numpy as np
import pytest

from patcher.apply import PatchRunner, UnknownGroupError
from patcher.patch import Patch, PatchError
from tests.conftest import random_mlp


def _patch(**kw) -> Patch:
    from patcher.methods.eraser import build_output_graph

    table = np.log(np.array([[0.8, 0.2], [0.5, 0.5]]))
    graph = build_output_graph(5, 2, alpha=1.0, threshold=0.25, bias="group", table=table)
    return Patch.build(method="eraser", n_classes=2, groups=["a", "b"], group_at_inference=True,
                       output_transform=graph, arrays={"w": np.arange(4.0)}, params={"alpha": 1.0}, **kw)


def test_round_trip_is_byte_identical_and_verified():
    p = _patch()
    data = p.to_bytes()
    q = Patch.from_bytes(data, expected_id=p.id)
    assert q.id == p.id and q.to_bytes() == data
    np.testing.assert_array_equal(q.arrays()["w"], np.arange(4.0))
    assert _patch().to_bytes() == data  # deterministic: same content, same bytes, same id


def test_tampered_blob_is_rejected():
    data = _patch().to_bytes()
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename.startswith("blobs/") and body[:2] != b"\x00\x00":
                body = body[:-1] + bytes([body[-1] ^ 1])
            dst.writestr(info, body)
    with pytest.raises(PatchError, match="does not match its hash"):
        Patch.from_bytes(out.getvalue())


def test_wrong_expected_id_and_garbage_are_rejected():
    p = _patch()
    with pytest.raises(PatchError, match="not the expected"):
        Patch.from_bytes(p.to_bytes(), expected_id="0" * 64)
    with pytest.raises(PatchError, match="not a fairpatch patch"):
        Patch.from_bytes(b"\x80\x04pickle-ish bytes")


def test_apply_matches_the_formula():
    p = _patch()
    runner = PatchRunner(p)
    logp = np.log(np.array([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]))
    out = runner.transform_outputs(np.zeros((3, 5)), logp, np.array(["a", "b", "a"]))
    table = np.log(np.array([[0.8, 0.2], [0.5, 0.5]]))
    expected = logp - table[[0, 1, 0]] + np.array([0.0, -0.25])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(runner.predict(np.zeros((3, 5)), logp, np.array([0, 1, 0])),
                                  expected.argmax(1))


def test_unknown_group_is_an_error_not_a_default():
    runner = PatchRunner(_patch())
    logp = np.log(np.full((2, 2), 0.5))
    with pytest.raises(UnknownGroupError, match="unknown group 'c'"):
        runner.transform_outputs(np.zeros((2, 5)), logp, np.array(["a", "c"]))
    with pytest.raises(UnknownGroupError, match="unknown group id 2"):
        runner.transform_outputs(np.zeros((2, 5)), logp, np.array([0, 2]))
    with pytest.raises(PatchError, match="needs the group"):
        runner.transform_outputs(np.zeros((2, 5)), logp)


def test_patch_is_bound_to_one_model_version():
    p = _patch().for_model("adult", "1")
    p.check_model("adult", "1")
    with pytest.raises(PatchError, match="version 1, not adult version 2"):
        p.check_model("adult", "2")
    assert p.id != _patch().id


def test_replacement_model_part_round_trips():
    model = random_mlp(3)
    p = Patch.build(method="weights", n_classes=2, replacement_model=model)
    assert Patch.from_bytes(p.to_bytes()).part("replacement_model") == model
