"""The CLIP network (Radford et al. 2021): a vision tower, a text tower, and a learned temperature.

Read top to bottom: building blocks first (activation, attention, transformer), then the two vision
towers (ViT and the paper's modified ResNet with attention pooling), then the CLIP class that joins
them. Parameter names follow OpenAI's published code (ln_1, c_fc, ln_final, text_projection, ...),
so an OpenAI state dict loads into this module as it is. The configurations and the named presets
are in zsclip.core.presets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zsclip.core.presets import CLIPConfig, VisionConfig

# ---------------------------------------------------------------------------------------------
# building blocks


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return x * torch.sigmoid(1.702 * x)
        return (1.702 * x).sigmoid_().mul_(x)  # inference: one buffer instead of three, same values


def _activation(quick_gelu: bool) -> nn.Module:
    return QuickGELU() if quick_gelu else nn.GELU()


class MultiheadSelfAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter names, computed by
    scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        q, k, v = self.project(x)
        return self.out_proj(self.mix(q, k, v, causal=causal))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, W] -> queries, keys, values, each [B, H, L, W/H]."""
        return self.split_heads(F.linear(x, self.in_proj_weight, self.in_proj_bias))

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected [B, L, 3W] -> queries, keys, values, each [B, H, L, W/H]."""
        batch, length, triple = qkv.shape
        q, k, v = (
            qkv.view(batch, length, 3, self.heads, triple // (3 * self.heads))
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        return q, k, v

    def mix(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries [B, H, L, W/H] over keys and values [B, H, K, W/H] -> [B, L, W], before `out_proj`.
        `mask` (bool, True = may attend) broadcasts to [B, H, L, K]; `causal` is the usual square
        mask (L == K)."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal
        )  # [B, H, L, W/H]
        batch, heads, length, head_width = out.shape
        return out.transpose(1, 2).reshape(batch, length, heads * head_width)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", _activation(quick_gelu))
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool
    ) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)
        )
        self.grad_checkpointing = False  # trade compute for memory in training (set by the trainer)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x


# ---------------------------------------------------------------------------------------------
# vision: ViT


class ConvStem(nn.Module):
    """Two stride-2 3x3 convolutions before the patch embedding, for tiny CPU models.

    On small images a single strided conv sees too little context per patch to tell e.g. hexagons
    from circles; this stem (in the spirit of "Early Convolutions Help Transformers See Better",
    Xiao et al. 2021) keeps the same token grid: the patch conv after it uses patch_size / 4.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width // 4, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width // 4, width // 2, 3, stride=2, padding=1),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, 3, H, W] -> [B, width/2, H/4, W/4]


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, quick_gelu: bool) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"image size {cfg.image_size} is not a multiple of patch size {cfg.patch_size}"
            )
        width, grid = cfg.width, cfg.image_size // cfg.patch_size
        if cfg.stem == "conv":
            if cfg.patch_size % 4:
                raise ValueError("the conv stem needs a patch size divisible by 4")
            self.stem = ConvStem(width)
            self.conv1 = nn.Conv2d(
                width // 2, width, cfg.patch_size // 4, stride=cfg.patch_size // 4, bias=False
            )
        else:
            self.stem = None
            self.conv1 = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        x = self.conv1(x)  # [B, W, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(
            x.dtype
        )  # [B, 1+grid*grid, W]
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # class token -> [B, D]


# ---------------------------------------------------------------------------------------------
# vision: ResNet


class Bottleneck(nn.Module):
    """ResNet bottleneck with the paper's anti-aliased downsampling: strided convs become avgpool then
    conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module(
                "0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)
            )
            self.downsample.add_module("1", nn.BatchNorm2d(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean of the feature map, as a query, attends over all positions (and
    itself)."""

    def __init__(self, spatial: int, width: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial**2 + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1+HW, C]
        x = x + self.positional_embedding.to(x.dtype)
        batch, length, width = x.shape
        head_dim = width // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, head_dim).transpose(1, 2)  # [B, heads, L, C/heads]

        q = split(self.q_proj(x[:, :1]))  # only the mean token asks
        out = F.scaled_dot_product_attention(q, split(self.k_proj(x)), split(self.v_proj(x)))
        return self.c_proj(out.transpose(1, 2).reshape(batch, width))  # [B, D]


class ModifiedResNet(nn.Module):
    """The paper's ResNet: a 3-conv stem, anti-aliased strided blocks, and attention pooling instead of
    avgpool."""

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, cfg.layers[0])
        self.layer2 = self._make_layer(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, cfg.layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, embed_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))  # [B, width, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 32*width, H/32, W/32]
        return self.attnpool(x)  # [B, D]


# --------------------------------------------------------------------------------------------- CLIP


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        vision, text = config.vision, config.text
        if vision.kind == "vit":
            self.visual: nn.Module = VisionTransformer(vision, config.embed_dim, config.quick_gelu)
        else:
            self.visual = ModifiedResNet(vision, config.embed_dim)
        self.transformer = Transformer(
            text.width, text.layers, text.heads, text.mlp_ratio, config.quick_gelu
        )
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.ln_final = nn.LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1 / 0.07))
        )  # temperature 0.07, learned in log space
        self.init_parameters()

    def init_parameters(self) -> None:
        """The initialisation of OpenAI's reference code, for training from scratch."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / 0.07))
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(linear.weight, std=std)
            for stage in (
                self.visual.layer1,
                self.visual.layer2,
                self.visual.layer3,
                self.visual.layer4,
            ):
                for block in stage:
                    nn.init.zeros_(block.bn3.weight)  # each residual branch starts as the identity
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] normalised pixels -> [B, D] image features (not L2-normalised)."""
        return self.visual(images.to(self.dtype))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, D] text features (not L2-normalised), read at each text's end token.

        The end token has the largest id, so its position is the argmax. Positions after the longest
        text's end token cannot affect any feature under the causal mask, so they are cut off before
        the transformer runs.
        """
        end = tokens.argmax(dim=-1)  # [B]
        tokens = tokens[:, : int(end.max()) + 1]  # [B, L'] with L' <= L
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]].to(
            self.dtype
        )
        x = self.ln_final(self.transformer(x, causal=True))  # [B, L', W]
        return x[torch.arange(x.shape[0], device=x.device), end] @ self.text_projection  # [B, D]

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarities scaled by the learned temperature: (logits per image [B, T], per text
        [T, B])."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        scale = self.logit_scale.exp().clamp(
            max=100.0
        )  # exp(logit_scale) is capped at 100, as in the paper
        logits_per_image = scale * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.transformer.grad_checkpointing = enabled
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enabled


def build_model(config: CLIPConfig) -> CLIP:
    """A randomly initialised CLIP for `config`. Build under `torch.device("meta")` to skip the cost of
    init."""
    return CLIP(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
