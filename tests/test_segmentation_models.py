"""Segmentation networks: output shapes of every head on non-cubic inputs with 1 and 4 channels,
rebuilding from model_args, frozen/unfrozen gradients, channel mixing."""

from __future__ import annotations

import json

import pytest
import torch

from threedino_pipe.models.adapter3d import AdapterSegmentationHead, split_blocks
from threedino_pipe.models.channel_mixing import ChannelMixing, fold_channels
from threedino_pipe.models.decoders import default_decoder_sizes, evenly_spaced_layers
from threedino_pipe.models.presets import build_backbone
from threedino_pipe.models.segmentation import HEAD_TRAINING_DEFAULTS, HEADS, build_segmentation_model

SHAPE = (16, 32, 48)  # non-cubic (1 x 2 x 3 patches), each side a multiple of the 16-voxel patch
SMALL = (16, 16, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread avoids OpenMP oversubscription on a shared 2-core machine
    (10x faster here under load); restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("head", HEADS)
def test_every_head_gives_logits_of_the_input_size(head: str, channels: int) -> None:
    net = build_segmentation_model(head, "tiny", channels, 3).eval()
    with torch.no_grad():
        out = net(torch.randn(2, channels, *SHAPE))
    assert out.shape == (2, 3, *SHAPE)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("head", "options"), [("linear", {"num_layers": 2}), ("unetr", {"feature_size": 8}),
                                                ("adapter", {"adapter_dim": 16, "points": 2})])
def test_model_args_rebuild_the_same_architecture(head: str, options: dict) -> None:
    net = build_segmentation_model(head, "tiny", 4, 2, **options).eval()
    args = json.loads(json.dumps(net.model_args()))  # JSON-able, as model.json stores it
    assert args["head"] == head and args["in_channels"] == 4 and args["num_outputs"] == 2
    assert all(args[k] == v for k, v in options.items())
    rebuilt = build_segmentation_model(**args).eval()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    rebuilt.load_state_dict(net.state_dict())
    x = torch.randn(1, 4, *SMALL)
    with torch.no_grad():
        assert torch.equal(net(x), rebuilt(x))


@pytest.mark.parametrize("head", HEADS)
def test_frozen_backbone_gets_no_gradients_but_the_head_does(head: str) -> None:
    net = build_segmentation_model(head, "tiny", 2, 3).train()
    assert all(not p.requires_grad for p in net.backbone.parameters())
    trainable = {id(p) for p in net.trainable_parameters()}
    assert trainable == {id(p) for p in net.head.parameters()}
    net(torch.randn(2, 2, *SMALL)).square().mean().backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    missing = [n for n, p in net.head.named_parameters() if p.grad is None]
    assert not missing


def test_adapter_gradients_flow_through_every_frozen_vit_block() -> None:
    """The injectors feed the ViT, so the gradient reaches each block's output and each injector,
    though the blocks' own parameters stay without gradients."""
    dims = {"embed_dim": 96, "depth": 8, "num_heads": 3}  # 4 interaction blocks of 2 ViT blocks
    net = build_segmentation_model("adapter", dims, 1, 2).train()
    outputs = []

    def keep(_module, _inputs, out) -> None:
        out.retain_grad()
        outputs.append(out)

    hooks = [block.register_forward_hook(keep) for block in net.backbone.blocks]
    net(torch.randn(2, 1, *SMALL)).square().mean().backward()
    for h in hooks:
        h.remove()
    assert len(outputs) == net.backbone.depth == 8
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outputs)
    assert all(p.grad is None for p in net.backbone.parameters())
    for injector in net.head.adapter.injectors:  # gamma starts at 0, its gradient is what moves it
        assert injector.gamma.grad.abs().sum() > 0
        assert torch.equal(injector.gamma.detach(), torch.zeros_like(injector.gamma))


@pytest.mark.parametrize("head", HEADS)
def test_unfrozen_backbone_is_trained(head: str) -> None:
    net = build_segmentation_model(head, "tiny", 1, 2, freeze_backbone=False).train()
    assert net.model_args()["freeze_backbone"] is False
    unused = {"backbone." + n for n in net.unused_backbone_parameters()}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {n for n, _ in net.named_parameters()} - unused
    net(torch.randn(2, 1, *SMALL)).sum().backward()
    without_grad = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad  # every trainable parameter is used (DDP without find_unused_parameters)
    assert all(p.grad is not None for n, p in net.backbone.named_parameters() if n.startswith("blocks."))
    net.set_backbone_frozen(True)
    assert not net.backbone.training and net.training
    assert {id(p) for p in net.trainable_parameters()} == {id(p) for p in net.head.parameters()}


def test_single_channel_mixing_is_the_identity_and_backbone_keys_are_the_vit_keys() -> None:
    backbone_keys = set(build_backbone("tiny").state_dict())
    for head in HEADS:
        net = build_segmentation_model(head, "tiny", 1, 3)
        keys = set(net.state_dict())
        assert {k.removeprefix("backbone.") for k in keys if k.startswith("backbone.")} == backbone_keys
        assert not any(".mixers." in k for k in keys), head
        assert any(".mixers." in k for k in build_segmentation_model(head, "tiny", 4, 3).state_dict()), head
    tokens = torch.randn(6, 5, 8)
    assert ChannelMixing(1, 8)(tokens) is tokens and not list(ChannelMixing(1, 8).parameters())


def test_channel_mixing_concatenates_channels_per_patch() -> None:
    """Folded batch index is b * C + c; the mixer sees [ch0 | ch1 | ch2] per patch."""
    x = torch.arange(2 * 3 * 16, dtype=torch.float32).reshape(2, 3, 16, 1, 1)
    folded = fold_channels(x)
    assert folded.shape == (6, 1, 16, 1, 1) and torch.equal(folded[4, 0], x[1, 1])
    mix = ChannelMixing(3, 4)
    with torch.no_grad():
        mix.proj.weight.zero_()
        mix.proj.weight[0, 4] = 1.0  # output 0 <- channel 1's feature 0
    tokens = torch.randn(6, 5, 4)
    out = mix(tokens)
    assert out.shape == (2, 5, 4)
    torch.testing.assert_close(out[..., 0], torch.nn.functional.gelu(mix.proj.bias[0] + tokens[1::3, :, 0]))


def test_bad_inputs_are_refused() -> None:
    net = build_segmentation_model("linear", "tiny", 2, 3)
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 2, 32, 40, 32))
    with pytest.raises(ValueError, match="unknown head"):
        build_segmentation_model("probe", "tiny", 1, 3)


def test_method_defaults() -> None:
    """docs/method.md, "Downstream: segmentation": UNETR on layers 6/12/18/24 of ViT-L, adapter width 256 and
    decoder (256, 128, 64, 32), 4 interaction blocks of 6 blocks, 8 heads x 4 points; lr/batch per head."""
    assert [i + 1 for i in evenly_spaced_layers(24)] == [6, 12, 18, 24]
    assert [i + 1 for i in evenly_spaced_layers(12)] == [3, 6, 9, 12]
    assert split_blocks(24) == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert default_decoder_sizes(256) == [256, 128, 64, 32]
    head = AdapterSegmentationHead(1024, 24, 1, 1, 3)
    assert head.options == {"adapter_dim": 256, "heads": 8, "points": 4, "ffn_ratio": 0.25,
                            "decoder_sizes": [256, 128, 64, 32]}
    assert head.adapter.pyramid_channels == [256, 256, 256, 64]
    assert HEAD_TRAINING_DEFAULTS["linear"] == {"lr": 1e-3, "batch_size": 16}
    assert HEAD_TRAINING_DEFAULTS["adapter"] == HEAD_TRAINING_DEFAULTS["unetr"] == {"lr": 1e-4, "batch_size": 8}


def test_adapter_pyramid_levels() -> None:
    net = build_segmentation_model("adapter", "tiny", 1, 3)
    x = torch.randn(1, 1, *SHAPE)
    with torch.no_grad():
        pyramid = net.head.adapter(net.backbone, x, x)
    sides = [tuple(s // f for s in SHAPE) for f in (16, 8, 4, 2)]
    assert [tuple(p.shape[2:]) for p in pyramid] == sides
    assert [p.shape[1] for p in pyramid] == net.head.adapter.pyramid_channels == [24, 24, 24, 8]
