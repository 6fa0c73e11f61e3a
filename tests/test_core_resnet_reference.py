"""The paper's modified ResNet against an independent implementation: open_clip's ModifiedResNet, read from the
installed open-clip-torch wheel by file path (importing the open_clip package would need torchvision), with the
same weights. transformers has no CLIP ResNet, so this is the numerical check for RN50-style towers, directly and
through the OpenAI state-dict loader, which must infer the architecture from the tensor shapes."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from zsclip.core.model import ModifiedResNet, build_model
from zsclip.core.presets import CLIPConfig, TextConfig, VisionConfig


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.find_spec("open_clip")
    locations = (
        list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    )
    source = next(
        (
            Path(p) / "modified_resnet.py"
            for p in locations
            if (Path(p) / "modified_resnet.py").is_file()
        ),
        None,
    )
    if source is None:
        pytest.skip("needs open_clip's modified_resnet.py: pip install --no-deps open-clip-torch")
    package, utils = types.ModuleType("_reference_clip"), types.ModuleType("_reference_clip.utils")
    package.__path__ = []
    utils.freeze_batch_norm_2d = utils.feature_take_indices = lambda *args, **kwargs: (
        None
    )  # unused here
    saved = {name: sys.modules.get(name) for name in ("_reference_clip", "_reference_clip.utils")}
    sys.modules.update({"_reference_clip": package, "_reference_clip.utils": utils})
    try:
        module_spec = importlib.util.spec_from_file_location(
            "_reference_clip.modified_resnet", source
        )
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module


def randomise(module: torch.nn.Module) -> None:
    """Every parameter and BatchNorm statistic away from its initial value, so no layer is an identity."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            else:
                tensor.add_(0.1 * noise)


def reference_tower(
    reference, config: VisionConfig, embed_dim: int, state: dict
) -> torch.nn.Module:
    tower = reference.ModifiedResNet(
        layers=list(config.layers),
        output_dim=embed_dim,
        heads=config.heads,
        image_size=config.image_size,
        width=config.width,
    )
    tower.load_state_dict(
        state
    )  # strict: the parameter names and shapes must be the published ones
    return tower.eval()


@pytest.mark.parametrize(
    "config, embed_dim",
    [
        (VisionConfig("resnet", image_size=64, width=16, layers=(1, 2, 1, 1), heads=8), 32),
        (VisionConfig("resnet", image_size=96, width=8, layers=(2, 1, 1, 2), heads=4), 24),
    ],
)
def test_modified_resnet_matches_the_reference(
    reference, config: VisionConfig, embed_dim: int
) -> None:
    ours = ModifiedResNet(config, embed_dim).eval()
    randomise(ours)
    theirs = reference_tower(reference, config, embed_dim, ours.state_dict())
    images = torch.randn(
        3, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        expected, got = theirs(images), ours(images)
    assert got.shape == (3, embed_dim)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_openai_resnet_state_dict_loads_as_the_reference_architecture(
    reference, tmp_path: Path, standard_vocab_path: Path
) -> None:
    """An OpenAI-layout RN checkpoint: layers, width, heads, input size and embedding size come from the shapes."""
    from zsclip.core.checkpoints import load_model

    vision = VisionConfig("resnet", image_size=64, width=16, layers=(2, 1, 3, 1), heads=8)
    config = CLIPConfig(embed_dim=40, vision=vision, text=TextConfig(width=64, heads=1, layers=1))
    model = build_model(config).eval()
    randomise(model)
    path = tmp_path / "RN-small.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, vocab=standard_vocab_path)
    assert loaded.model.config.vision == vision and loaded.model.config.embed_dim == 40
    visual = {
        key[len("visual.") :]: value
        for key, value in model.state_dict().items()
        if key.startswith("visual.")
    }
    theirs = reference_tower(reference, vision, 40, visual)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected, got = theirs(images), loaded.model.encode_image(images)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
