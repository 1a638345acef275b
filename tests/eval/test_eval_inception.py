"""The FID Inception: weight-file key names and shapes, output shapes, TF1 resize, input checks, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditq.errors import CheckpointError, DownloadError, InvalidArgumentError
from ditq.eval import inception as I

# The 94 conv+BN units of pytorch-fid's pt_inception-2015-12-05-6726825d.pth,
# written out from torch-fidelity's TF->PyTorch name table
# (utils/util_convert_inception_weights.py), independently of the module.
_A = [
    "branch1x1",
    "branch5x5_1",
    "branch5x5_2",
    "branch3x3dbl_1",
    "branch3x3dbl_2",
    "branch3x3dbl_3",
    "branch_pool",
]
_B = ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
_C = ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3"] + [f"branch7x7dbl_{i}" for i in range(1, 6)]
_C += ["branch_pool"]
_D = ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"]
_E = ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2"]
_E += ["branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"]
UNITS = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
for block, units in [
    ("5b", _A),
    ("5c", _A),
    ("5d", _A),
    ("6a", _B),
    ("6b", _C),
    ("6c", _C),
    ("6d", _C),
    ("6e", _C),
]:
    UNITS += [f"Mixed_{block}.{u}" for u in units]
for block, units in [("7a", _D), ("7b", _E), ("7c", _E)]:
    UNITS += [f"Mixed_{block}.{u}" for u in units]
EXPECTED_KEYS = [
    f"{u}.{t}"
    for u in UNITS
    for t in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
] + ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = I.FIDInceptionV3()
    # random but sane batch-norm statistics, so activations neither vanish nor explode
    for mod in m.modules():
        if isinstance(mod, I.BatchNorm):
            mod.running_var.uniform_(0.5, 1.5)
            mod.running_mean.normal_(0, 0.1)
    return m


def test_state_dict_has_exactly_the_weight_file_keys(model):
    keys = list(model.state_dict())
    assert len(UNITS) == 94 and len(EXPECTED_KEYS) == 472
    assert keys == EXPECTED_KEYS
    assert keys[0] == "Conv2d_1a_3x3.conv.weight"
    assert keys[-3:] == ["Mixed_7c.branch_pool.bn.running_var", "fc.weight", "fc.bias"]


def test_shapes_match_torchvision_inception_v3(model):
    sd = model.state_dict()
    assert tuple(sd["fc.weight"].shape) == (1008, 2048) and tuple(sd["fc.bias"].shape) == (1008,)
    assert tuple(sd["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["Mixed_6d.branch1x1.conv.weight"].shape) == (192, 768, 1, 1)
    assert tuple(sd["Mixed_6b.branch7x7_2.conv.weight"].shape) == (128, 128, 1, 7)
    assert tuple(sd["Mixed_7c.branch_pool.conv.weight"].shape) == (192, 2048, 1, 1)
    assert tuple(sd["Mixed_7b.branch3x3dbl_1.conv.weight"].shape) == (448, 1280, 1, 1)
    # torchvision documents 27,161,264 parameters for inception_v3 (1000 classes,
    # with the aux classifier); the FID graph has 1008 classes and no aux head.
    params = sum(p.numel() for p in model.parameters())
    aux = (128 * 768 + 2 * 128) + (768 * 128 * 5 * 5 + 2 * 768) + (1000 * 768 + 1000)
    assert params - (1008 * 2048 + 1008) + (1000 * 2048 + 1000) + aux == 27_161_264


def test_batch_norm_eps_and_pool_quirks(model):
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, I.BatchNorm))
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"


def test_forward_shapes_and_documented_features(model):
    images = np.random.default_rng(0).integers(0, 256, size=(2, 40, 48, 3), dtype=np.uint8)
    captured = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("b1", o))
    try:
        with torch.inference_mode():
            out = model(images)
    finally:
        hook.remove()
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "pool": (2, 2048),
        "spatial": (2, 2023),
        "logits": (2, 1008),
        "probs": (2, 1008),
    }
    assert all(v.dtype == torch.float32 for v in out.values())
    # spatial: first 7 channels of Mixed_6d.branch1x1 (17x17x192), flattened (h, w, c)
    b1 = captured["b1"]
    assert tuple(b1.shape) == (2, 192, 17, 17)
    expected = b1[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(out["spatial"], expected)
    assert out["spatial"][0, 1].item() == b1[0, 1, 0, 0].item()  # channel fastest
    assert out["spatial"][0, 7].item() == b1[0, 0, 0, 1].item()  # then width
    # logits without the bias; softmax over all 1008
    torch.testing.assert_close(out["logits"], out["pool"] @ model.fc.weight.T)
    torch.testing.assert_close(out["probs"].sum(1), torch.ones(2))
    assert (out["pool"] >= 0).all()  # average of ReLU outputs


def test_layouts_and_dtypes_give_the_same_network_input():
    img = np.random.default_rng(1).integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    nhwc = I.to_inception_input(img)
    nchw = I.to_inception_input(torch.from_numpy(img).permute(0, 3, 1, 2).float())
    assert tuple(nhwc.shape) == (2, 3, 5, 6)
    torch.testing.assert_close(nhwc, nchw)
    torch.testing.assert_close(I.to_inception_input(img.astype(np.float64)), nhwc)


def test_agrees_with_torch_fidelity_when_installed(model, tmp_path):
    tfid = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    ref = tfid.FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        feature_extractor_weights_path=str(tmp_path / "w.pth"),
    )
    images = torch.randint(0, 256, (1, 3, 37, 51), dtype=torch.uint8)
    with torch.inference_mode():
        ours = model(images)
        pool, logits = ref(images)
    torch.testing.assert_close(ours["pool"], pool)
    torch.testing.assert_close(ours["logits"], logits)


#################################################################################
#                                TF1 bilinear resize                            #
#################################################################################


def test_tf1_resize_hand_computed_upsample():
    x = torch.tensor([[0.0, 3.0], [6.0, 9.0]]).view(1, 1, 2, 2)
    # scale 2/3: output pixel i samples input i*2/3 (0, 0.667, 1.333 -> clamped to the edge)
    expected = torch.tensor([[0.0, 2.0, 3.0], [4.0, 6.0, 7.0], [6.0, 8.0, 9.0]]).view(1, 1, 3, 3)
    torch.testing.assert_close(I.resize_bilinear_tf1(x, (3, 3)), expected)
    assert not torch.allclose(F.interpolate(x, size=(3, 3), mode="bilinear", align_corners=False), expected)


def test_tf1_resize_downsample_has_no_half_pixel_offset():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = I.resize_bilinear_tf1(x, (2, 2))  # samples rows/cols 0 and 2 exactly
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0], [8.0, 10.0]]).view(1, 1, 2, 2))


def test_tf1_resize_matches_a_plain_loop_and_keeps_same_size():
    x = torch.rand(2, 3, 5, 7) * 255
    out_h, out_w = 11, 9

    def src(i, n_in, n_out):
        s = np.float32(np.float32(i) * (np.float32(n_in) / np.float32(n_out)))
        lo = int(np.floor(s))
        return lo, min(int(np.ceil(s)), n_in - 1), np.float32(s - lo)

    xn = x.numpy()
    expected = np.zeros((2, 3, out_h, out_w), np.float32)
    for i in range(out_h):
        y0, y1, fy = src(i, 5, out_h)
        for j in range(out_w):
            x0, x1, fx = src(j, 7, out_w)
            top = xn[:, :, y0, x0] + (xn[:, :, y0, x1] - xn[:, :, y0, x0]) * fx
            bottom = xn[:, :, y1, x0] + (xn[:, :, y1, x1] - xn[:, :, y1, x0]) * fx
            expected[:, :, i, j] = top + (bottom - top) * fy
    torch.testing.assert_close(I.resize_bilinear_tf1(x, (out_h, out_w)), torch.from_numpy(expected))
    assert I.resize_bilinear_tf1(x, (5, 7)) is x


#################################################################################
#                                   Input checks                                #
#################################################################################


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 8, 8, 1), np.uint8), "grayscale"),
        (np.zeros((2, 1, 8, 8), np.float32), "grayscale"),
        (np.zeros((2, 8, 8, 4), np.uint8), "3 channels"),
        (np.zeros((8, 8, 3), np.uint8), "4-d"),
        (np.zeros((2, 8, 8, 3), np.int64), "uint8 or float"),
        (np.full((2, 8, 8, 3), -1.0, np.float32), r"\[0, 255\]"),
        (np.full((2, 8, 8, 3), 256.0, np.float32), r"\[0, 255\]"),
        (np.full((2, 8, 8, 3), np.nan, np.float32), "NaN"),
        (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
        ([[1, 2, 3]], "numpy array or a tensor"),
    ],
)
def test_bad_images_are_one_line_errors(images, match):
    with pytest.raises(InvalidArgumentError, match=match) as e:
        I.to_inception_input(images)
    assert "\n" not in str(e.value)


def test_input_is_not_rescaled():
    x = I.to_inception_input(np.full((1, 2, 2, 3), 200, np.uint8))
    assert x.dtype == torch.float32 and tuple(x.shape) == (1, 3, 2, 2) and (x == 200).all()


#################################################################################
#                                     Weights                                   #
#################################################################################


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("weights") / I.FID_WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path


def test_load_inception_reads_a_local_file_strictly(weights_file, model):
    loaded = I.load_inception(weights_file)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_load_inception_tolerates_batchnorm_step_counters(tmp_path, model):
    sd = dict(model.state_dict())
    sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)
    torch.save(sd, tmp_path / "w.pth")
    I.load_inception(tmp_path / "w.pth")


def test_load_inception_mismatch_names_the_keys(tmp_path, model):
    sd = dict(model.state_dict())
    del sd["Mixed_6d.branch1x1.conv.weight"]
    sd["AuxLogits.fc.weight"] = torch.zeros(1)
    sd["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        I.load_inception(tmp_path / "bad.pth")
    msg = str(e.value)
    assert "\n" not in msg
    for key in ("Mixed_6d.branch1x1.conv.weight", "AuxLogits.fc.weight", "fc.weight"):
        assert key in msg


def test_load_inception_missing_or_garbage_file_is_a_one_line_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        I.load_inception(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(CheckpointError) as e:
        I.load_inception(tmp_path / "junk.pth")
    assert "\n" not in str(e.value)


def test_offline_without_cache_names_url_and_target(tmp_path, monkeypatch):
    def offline(url, dst, progress=None):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(I, "fetch_url", offline)
    monkeypatch.setenv("DITQ_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DownloadError) as e:
        I.load_inception()
    msg = str(e.value)
    assert (
        I.FID_WEIGHTS_URL in msg and str(tmp_path / "cache" / I.FID_WEIGHTS_FILE) in msg and "\n" not in msg
    )
    assert not (tmp_path / "cache" / I.FID_WEIGHTS_FILE).exists()
    with pytest.raises(DownloadError, match="download is off"):
        I.load_inception(cache_dir=tmp_path / "other", download=False)


def test_download_is_checked_before_it_enters_the_cache(tmp_path, monkeypatch, weights_file):
    monkeypatch.setattr(
        I, "fetch_url", lambda url, dst, progress=None: dst.write_bytes(b"<html>rate limited")
    )
    with pytest.raises(DownloadError) as e:
        I.load_inception(cache_dir=tmp_path)
    assert I.FID_WEIGHTS_URL in str(e.value) and not (tmp_path / I.FID_WEIGHTS_FILE).exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind

    fetched = []
    monkeypatch.setattr(
        I,
        "fetch_url",
        lambda url, dst, progress=None: fetched.append(url) or dst.write_bytes(weights_file.read_bytes()),
    )
    I.load_inception(cache_dir=tmp_path)
    I.load_inception(cache_dir=tmp_path)  # second time from the cache
    assert fetched == [I.FID_WEIGHTS_URL] and (tmp_path / I.FID_WEIGHTS_FILE).is_file()
