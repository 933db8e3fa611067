"""RadioDiff's Swin-conditioned U-Net against data made by running upstream (fixtures/radiodiff_reference).

Every reference value is read from the fixture at run time. The network has 225M parameters: each variant
is built and filled once per module, and one CPU forward of the fixture's batch (2 x 3 x 64 x 64 latents,
256 x 256 maps) takes about 6 s on 2 threads.
"""

from __future__ import annotations

import json
import sys
import typing as tp
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from radiodiff_resume.errors import UserError
from radiodiff_resume.models import swin
from radiodiff_resume.models.radiodiff_unet import RadioDiffUNet
from radiodiff_resume.models.swin import StochasticDepth, SwinEncoder, torchvision_key_to_upstream

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "radiodiff_reference"
PREFIX = "model."
# upstream configs/radio_train.yaml, model.unet (the same file at HEAD and at the paper release)
RADIO_TRAIN_UNET: dict[str, tp.Any] = {
    "dim": 128, "cond_net": "swin", "fix_bb": False, "channels": 3, "out_mul": 1, "dim_mults": [1, 2, 4, 4],
    "cond_in_dim": 3, "cond_dim": 128, "cond_dim_mults": [2, 4],
    "window_sizes1": [[8, 8], [4, 4], [2, 2], [1, 1]], "window_sizes2": [[8, 8], [4, 4], [2, 2], [1, 1]],
    "fourier_scale": 16, "cond_pe": False, "num_pos_feats": 128, "cond_feature_size": [80, 80],
    "input_size": [80, 80],
}


class Reference(tp.NamedTuple):
    keys: dict[str, tp.Any]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    meta: dict[str, tp.Any]


@pytest.fixture(scope="module", autouse=True)
def threads() -> tp.Iterator[None]:
    """The full-size networks run on 2 threads; the count is put back for the tests after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference(
        json.loads((FIXTURE / "keys.json").read_text()),
        load_file(FIXTURE / "inputs.safetensors"),
        load_file(FIXTURE / "outputs.safetensors"),
        json.loads((FIXTURE / "outputs.json").read_text())["outputs"],
    )


def expected_entries(ref: Reference, variant: str) -> list[list[tp.Any]]:
    """keys.json's ``model.*`` rows (key, shape, dtype, P/B, requires_grad, ..) with the prefix removed."""
    drop = set(ref.keys["v1_model_diff"]["only_in_head"]) if variant == "v1" else set()
    return [[e[0][len(PREFIX):], *e[1:]] for e in ref.keys["model"]["entries"]
            if e[0].startswith(PREFIX) and e[0] not in drop]


@pytest.fixture(scope="module")
def filled(ref: Reference) -> dict[str, torch.Tensor]:
    """fill.py's HEAD values of the U-Net, after checking that this torch reproduces the whole fill."""
    sys.path.insert(0, str(FIXTURE))
    try:
        from fill import fill, fill_digest
    finally:
        sys.path.remove(str(FIXTURE))
    values = fill(ref.keys["model"])
    assert fill_digest(values) == ref.keys["fill_digest"], "this torch draws another fill: not a model bug"
    return {k[len(PREFIX):]: v for k, v in values.items() if k.startswith(PREFIX)}


def build(variant: str, filled: dict[str, torch.Tensor]) -> RadioDiffUNet:
    """Built on the meta device (the random init of 225M parameters would be thrown away), then given
    the fill's tensors; HEAD and v1 share them."""
    with torch.device("meta"):
        unet = RadioDiffUNet(**RADIO_TRAIN_UNET, without_pretrain=True, variant=variant)
    own = unet.state_dict()
    unet.load_state_dict({k: v for k, v in filled.items() if k in own}, strict=True, assign=True)
    return unet.eval()


@pytest.fixture(scope="module")
def head(filled: dict[str, torch.Tensor]) -> RadioDiffUNet:
    return build("head", filled)


@pytest.fixture(scope="module")
def v1(filled: dict[str, torch.Tensor]) -> RadioDiffUNet:
    return build("v1", filled)


@pytest.fixture
def unets(head: RadioDiffUNet, v1: RadioDiffUNet) -> dict[str, RadioDiffUNet]:
    return {"head": head, "v1": v1}


@pytest.mark.parametrize("variant", ["head", "v1"])
def test_state_dict_is_upstreams(ref: Reference, unets: dict[str, RadioDiffUNet], variant: str) -> None:
    """Keys, order, shapes and dtypes of the state_dict; parameters vs buffers; what the optimizer trains."""
    unet = unets[variant]
    expected = expected_entries(ref, variant)
    got = [[k, list(v.shape), str(v.dtype)] for k, v in unet.state_dict().items()]
    assert got == [e[:3] for e in expected]
    params = dict(unet.named_parameters())
    buffers = dict(unet.named_buffers())
    assert {e[0] for e in expected if e[3] == "P"} == set(params)
    assert {e[0] for e in expected if e[3] == "B"} == set(buffers), "no buffer outside the state_dict"
    assert all(not t.is_meta for t in [*params.values(), *buffers.values()])
    assert {k: p.requires_grad for k, p in params.items()} == {e[0]: e[4] for e in expected if e[3] == "P"}


@pytest.mark.parametrize("variant, counts", [("head", "counts"), ("v1", "counts_v1")])
def test_parameter_counts_are_upstreams(ref: Reference, unets: dict[str, RadioDiffUNet], variant: str,
                                        counts: str) -> None:
    unet = unets[variant]
    total = sum(p.numel() for p in unet.parameters())
    encoder = sum(p.numel() for p in unet.init_conv_mask.parameters())
    assert total == ref.keys[counts]["unet (model.*)"]
    assert encoder == ref.keys[counts]["unet swin encoder (model.init_conv_mask.*)"]
    if variant == "head":
        assert total - encoder == ref.keys[counts]["unet without swin"]
        unused = unet.init_conv_mask.norm, unet.init_conv_mask.head
        assert sum(p.numel() for m in unused for p in m.parameters()) == \
            ref.keys[counts]["unet swin encoder unused head+norm"]


def check(ref: Reference, name: str, got: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref.outputs[name], **ref.meta[name]["recommended_tolerance"])


@pytest.mark.slow  # a forward of each full-size U-Net: a minute on 2 CPU cores
@pytest.mark.parametrize("variant", ["head", "v1"])
def test_eval_forward_is_upstreams(ref: Reference, unets: dict[str, RadioDiffUNet], variant: str) -> None:
    """Both outputs, every element, at both times of the batch."""
    with torch.no_grad():
        c_pred, noise_pred = unets[variant](ref.inputs["unet.x_t"], ref.inputs["unet.t"],
                                            ref.inputs["batch.cond"])
    check(ref, f"{variant}.unet.C_pred", c_pred)
    check(ref, f"{variant}.unet.noise_pred", noise_pred)


def test_stochastic_depth_schedule_is_torchvision_swin_b(head: RadioDiffUNet) -> None:
    probs = [m.p for m in head.init_conv_mask.modules() if isinstance(m, StochasticDepth)]
    assert probs == pytest.approx([0.5 * i / (len(probs) - 1) for i in range(len(probs))])
    assert len(probs) == 24 and probs[0] == 0.0


def test_stochastic_depth_draws_like_torchvision() -> None:
    """One Bernoulli(1-p) per sample from ``torch.empty([B, 1, 1, 1])``, divided by 1-p; p=0 draws nothing."""
    x = torch.randn(4, 3, 5, 6)
    layer = StochasticDepth(0.3).train()
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    keep = torch.empty([4, 1, 1, 1]).bernoulli_(0.7).div_(0.7)
    assert torch.equal(got, x * keep)
    state = torch.get_rng_state()
    assert StochasticDepth(0.0).train()(x) is x and StochasticDepth(0.3).eval()(x) is x
    assert torch.equal(torch.get_rng_state(), state)


def test_latent_size_the_fft_weight_does_not_fit_is_refused(head: RadioDiffUNet, v1: RadioDiffUNet) -> None:
    with pytest.raises(ValueError, match=r"runs on 64x64 latents .*got 80x80.*input_size \[96, 96\]"):
        head(torch.zeros(1, 3, 80, 80), torch.tensor([0.5]), torch.zeros(1, 3, 320, 320))
    v1.check_latent_size(80, 80)  # the paper release never runs the FFT branch
    with pytest.raises(ValueError, match="divisible by 8, got 60x60"):
        v1.check_latent_size(60, 60)


def test_dpmcark_feeds_the_condition_through_init_conv_cark(head: RadioDiffUNet,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``DPMCARK``: five condition channels, mixed to three by ``init_conv_carK`` before the Swin."""
    seen: list[torch.Tensor] = []

    class Seen(Exception):
        pass

    def encoder(cond: torch.Tensor) -> list[torch.Tensor]:
        seen.append(cond)
        raise Seen

    monkeypatch.setattr(head, "carsDPM", True)
    monkeypatch.setattr(head.init_conv_mask, "forward", encoder)
    cond = torch.randn(1, 5, 16, 16)
    with pytest.raises(Seen), torch.no_grad():
        head(torch.zeros(1, 3, 64, 64), torch.tensor([0.5]), cond)
    with torch.no_grad():
        torch.testing.assert_close(seen[0], head.init_conv_carK(cond))


def test_fix_bb_freezes_the_condition_encoder() -> None:
    with torch.device("meta"):
        unet = RadioDiffUNet(**{**RADIO_TRAIN_UNET, "fix_bb": True}, without_pretrain=True)
    frozen = {k for k, p in unet.named_parameters() if not p.requires_grad}
    encoder = {f"init_conv_mask.{k}" for k, _ in unet.init_conv_mask.named_parameters()}
    assert frozen == encoder | {"time_mlp.0.W"}


@pytest.mark.parametrize("kwargs, message", [
    ({"cond_net": "resnet"}, r"cond_net 'resnet' is not supported; supported: swin"),
    ({"variant": "v2"}, r"variant 'v2' is not supported; supported: head, v1"),
    ({"cond_pe": True}, r"cond_pe=True is not supported"),
    ({"dim_mults": [1, 2, 4]}, r"dim_mults needs 4 entries, one per Swin feature scale"),
    ({"DPMCARK": True, "variant": "v1"}, r"DPMCARK needs variant 'head'"),
    ({"without_pretrain": True, "cond_weights": "imagenet"}, r"contradicts cond_weights='imagenet'"),
])
def test_unsupported_settings_are_refused(kwargs: dict[str, tp.Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RadioDiffUNet(**{**RADIO_TRAIN_UNET, **kwargs})


def test_torchvision_keys_map_to_upstreams() -> None:
    assert torchvision_key_to_upstream("features.0.0.weight") == "first_coonv.0.weight"
    assert torchvision_key_to_upstream("features.0.2.bias") == "first_coonv.2.bias"
    assert torchvision_key_to_upstream("features.1.0.attn.qkv.weight") == "features.0.0.attn.qkv.weight"
    assert torchvision_key_to_upstream("features.7.1.mlp.3.bias") == "features.6.1.mlp.3.bias"
    assert torchvision_key_to_upstream("head.weight") == "head.weight"


def torchvision_named(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """``encoder``'s state_dict under torchvision's names (the inverse of torchvision_key_to_upstream)."""
    out = {}
    for k, v in encoder.state_dict().items():
        if k.startswith("first_coonv."):
            name = "features.0." + k[len("first_coonv."):]
        elif k.startswith("features."):
            stage, rest = k[len("features."):].split(".", 1)
            name = f"features.{int(stage) + 1}.{rest}"
        else:
            name = k
        out[name] = v.clone()
    return out


@pytest.fixture(scope="module")
def swin_t_file() -> dict[str, torch.Tensor]:
    """A swin_t state_dict as torchvision names it (seeded random values)."""
    torch.manual_seed(0)
    return torchvision_named(SwinEncoder("swin_t"))


def test_relative_position_index_is_upstreams(swin_t_file: dict[str, torch.Tensor],
                                              filled: dict[str, torch.Tensor]) -> None:
    """The parity tests take this buffer from the fill (upstream's values), so check the built one here."""
    assert torch.equal(swin_t_file["features.1.0.attn.relative_position_index"],
                       filled["init_conv_mask.features.0.0.attn.relative_position_index"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_condition_weights_load_from_a_torchvision_file(tmp_path: Path, swin_t_file: dict[str, torch.Tensor],
                                                        suffix: str) -> None:
    path = tmp_path / f"swin_t{suffix}"
    if suffix == ".pth":
        torch.save(swin_t_file, path)
    else:
        save_file(swin_t_file, str(path))
    torch.manual_seed(1)
    encoder = SwinEncoder("swin_t")
    swin.load_condition_weights(encoder, path)
    assert all(torch.equal(swin_t_file[k], v) for k, v in torchvision_named(encoder).items())


def test_a_mismatched_weight_file_is_refused(tmp_path: Path, swin_t_file: dict[str, torch.Tensor]) -> None:
    source = dict(swin_t_file)
    source["features.0.0.weight"] = source["features.0.0.weight"][:1]
    del source["head.bias"]
    path = tmp_path / "bad.safetensors"
    save_file(source, str(path))
    with pytest.raises(UserError, match=r"not a torchvision swin_t state_dict: 1 missing \['head.bias'\].*"
                                        r"1 with another shape"):
        swin.load_condition_weights(SwinEncoder("swin_t"), path)


def test_imagenet_without_torchvision_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(UserError, match=r"swin_b-68c6b09e\.pth to .*checkpoints.*pass its path"):
        swin.imagenet_state_dict("swin_b")


def test_imagenet_reads_the_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            swin_t_file: dict[str, torch.Tensor]) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setitem(sys.modules, "torchvision", None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(swin_t_file, tmp_path / "checkpoints" / swin.SWIN_SPECS["swin_t"].imagenet_file)
    encoder = SwinEncoder("swin_t")
    swin.load_condition_weights(encoder, "imagenet")
    assert all(torch.equal(swin_t_file[k], v) for k, v in torchvision_named(encoder).items())


def test_swin_variants_have_torchvisions_sizes() -> None:
    """torchvision's swin_t and swin_s ImageNet models have 28,288,354 and 49,606,258 parameters."""
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in SwinEncoder(v).parameters()) for v in ("swin_t", "swin_s")]
    assert sizes == [28_288_354, 49_606_258]
