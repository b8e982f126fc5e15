"""Image pipeline shared by image policies: uint8 frames -> augmented, ImageNet-normalised tensors ->
a conv trunk's feature map -> features; and `CameraEncoders`, which turns the cameras of an observation
window into one feature vector per step.

- Frames arrive from the sampler / env as uint8 `(..., H, W, 3)`; conversion to float, the crop and
  the colour jitter run batched on the policy's device (no per-frame Python loop anywhere).
- Training: a random crop (`crop_ratio` of each side) and colour jitter, drawn per sample.
  Evaluation: the centre crop of the same size, no jitter.
- Backbone (`build_trunk`): `conv`, a small group-norm conv net (the CPU-sized default), or
  `resnet18`, torchvision's ResNet-18 without its pooling/classifier (the papers'). The ResNet's batch
  norm is either frozen (`frozen_bn`, only meaningful with ImageNet weights, as in ACT), replaced by
  group norm (`group_norm`, as in Diffusion Policy: batch statistics of tiny, highly correlated robot
  batches are poor), or kept.
- Why image policies did not learn here before: a ResNet-18 divides the image by 32, so a 32x32 frame
  became a 1x1 feature map, and a spatial softmax over one cell returns the same coordinates for every
  image (the features were constant); a 96x128 frame gives 3x4 cells, so keypoints are quantised to a
  quarter of the image. The conv trunk divides by 4 (32x32 -> 8x8, 96x128 -> 24x32), and
  `SpatialSoftmax` refuses a 1x1 map. A random-init ResNet with frozen batch-norm statistics cannot
  adapt its normalisation at all (`resolve_backbone_norm`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from protege.errors import ConfigError

log = logging.getLogger("protege.policies")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMS = ("group_norm", "frozen_bn", "batch_norm")
BACKBONES = ("conv", "resnet18")


def resolve_backbone_norm(norm: str, weights: str | None, owner: str = "policy") -> str:
    """`auto` -> `frozen_bn` with pretrained weights (ACT's setting), else `group_norm`, and says so.

    Frozen batch norm keeps the statistics of the weights it was loaded with: on a random-init network
    those are mean 0 / variance 1 placeholders that no gradient can correct, so the features cannot
    adapt their scale. That pairing is refused rather than silently trained."""
    if norm == "auto":
        if weights:
            return "frozen_bn"
        log.warning("%s: no backbone_weights, so the backbone trains from scratch with group norm at the main lr "
                    "(set %s.backbone_weights=IMAGENET1K_V1 or a local .pth/.safetensors file for ACT's "
                    "frozen-batch-norm ImageNet backbone)", owner, owner)
        return "group_norm"
    if norm == "frozen_bn" and not weights:
        raise ConfigError(f"{owner}.backbone_norm=frozen_bn with {owner}.backbone_weights=null: a random-init backbone "
                          f"with frozen batch-norm statistics cannot learn features; set {owner}.backbone_weights="
                          f"IMAGENET1K_V1 or a local .pth/.safetensors file, or {owner}.backbone_norm=group_norm|auto")
    return norm


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "group_norm":
        return nn.GroupNorm(max(1, min(8, channels // 4)), channels)
    if norm == "batch_norm":
        return nn.BatchNorm2d(channels)
    raise ConfigError(f"conv backbone norm {norm!r}: expected group_norm or batch_norm (frozen_bn needs pretrained weights)")


class ConvTrunk(nn.Sequential):
    """Small conv net trained from scratch: 3x3 convs with norm + ReLU, (N, 3, H, W) -> (N, C, H/s, W/s)
    with s the product of `strides`. Sized for a CPU: at 96x128 it costs ~1/10 of a ResNet-18 and keeps
    a 4x finer feature map, which is what a spatial softmax needs to locate small objects."""

    def __init__(self, channels: Sequence[int] = (32, 32, 64, 64), strides: Sequence[int] = (2, 1, 2, 1),
                 norm: str = "group_norm") -> None:
        if len(channels) != len(strides) or not channels:
            raise ConfigError(f"conv backbone: channels {list(channels)} and strides {list(strides)} must be non-empty "
                              f"and of the same length")
        layers: list[nn.Module] = []
        in_ch = 3
        for c, s in zip(channels, strides):
            layers += [nn.Conv2d(in_ch, c, 3, stride=s, padding=1), _norm_layer(norm, c), nn.ReLU(inplace=True)]
            in_ch = c
        super().__init__(*layers)
        self.out_channels = in_ch


def build_trunk(backbone: str = "resnet18", norm: str = "group_norm", weights: str | None = None,
                channels: Sequence[int] = (32, 32, 64, 64), strides: Sequence[int] = (2, 1, 2, 1)) -> nn.Module:
    """The image backbone: (N, 3, H, W) -> feature map (N, trunk.out_channels, h, w).
    `channels`/`strides` shape the `conv` trunk; `weights` the `resnet18` one."""
    if backbone == "resnet18":
        trunk = resnet18_trunk(norm, weights)
        trunk.out_channels = 512
        return trunk
    if backbone == "conv":
        if weights:
            raise ConfigError(f"backbone weights {weights}: only backbone=resnet18 loads pretrained weights")
        return ConvTrunk(channels, strides, norm)
    raise ConfigError(f"backbone {backbone!r}: expected one of {BACKBONES}")


def resnet18_trunk(norm: str = "group_norm", weights: str | None = None) -> nn.Module:
    """ResNet-18 up to layer4: (N, 3, H, W) -> (N, 512, H/32, W/32).

    `weights`: None (random init), a torchvision weights name (`IMAGENET1K_V1`, fetched into the
    torch hub cache on first use) or a local `.pth`/`.safetensors` state dict of a torchvision resnet18.
    """
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    if norm not in NORMS:
        raise ConfigError(f"backbone norm {norm!r}: expected one of {NORMS}")
    norm_layer = {
        "group_norm": lambda c: nn.GroupNorm(c // 16, c),
        "frozen_bn": FrozenBatchNorm2d,
        "batch_norm": nn.BatchNorm2d,
    }[norm]
    net = torchvision.models.resnet18(weights=None, norm_layer=norm_layer)
    if weights:
        state = _load_resnet_weights(weights)
        def is_norm(key: str) -> bool:  # batch-norm entries of a torchvision resnet state dict
            return "bn" in key or "downsample.1" in key

        if norm == "group_norm":  # BN statistics have no group-norm counterpart: keep the conv weights
            state = {k: v for k, v in state.items() if not is_norm(k)}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if norm != "group_norm" or not is_norm(k)]:
            raise ConfigError(f"backbone weights {weights}: not a torchvision resnet18 state dict "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return nn.Sequential(*list(net.children())[:-2])


def _load_resnet_weights(weights: str) -> dict[str, torch.Tensor]:
    path = Path(weights).expanduser()
    if path.suffix in (".pth", ".pt", ".safetensors"):
        if not path.is_file():
            raise ConfigError(f"backbone weights {path}: file not found")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    import torchvision

    try:
        return torchvision.models.ResNet18_Weights[weights].get_state_dict(progress=True)
    except KeyError as e:
        raise ConfigError(f"backbone weights {weights!r}: expected null, a local .pth/.safetensors file or one of "
                          f"{[w.name for w in torchvision.models.ResNet18_Weights]}") from e
    except Exception as e:  # offline machine, blocked hub
        raise ConfigError(f"backbone weights {weights}: could not fetch them ({e}); download once where there is "
                          f"internet and pass the local file, or use null (random init)") from e


class ImageAugment(nn.Module):
    """uint8 `(N, H, W, 3)` -> float `(N, 3, h, w)`, cropped, jittered (training only) and ImageNet-normalised.

    Hand-written rather than torchvision.transforms.v2 because those draw ONE random crop/jitter per
    call, i.e. the same for the whole batch; here every sample gets its own, still fully vectorised.
    """

    def __init__(self, crop_ratio: float = 1.0, jitter: float = 0.0, imagenet_norm: bool = True) -> None:
        super().__init__()
        if not 0 < crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
        self.crop_ratio, self.jitter = crop_ratio, jitter
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet_norm else ((0.0,) * 3, (1.0,) * 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return max(1, round(h * self.crop_ratio)), max(1, round(w * self.crop_ratio))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0
        N, _, H, W = x.shape
        H, W = int(H), int(W)  # plain ints also while traced for export (image sizes are fixed)
        h, w = self.out_size(H, W)
        if (h, w) != (H, W):
            if self.training:
                top = torch.randint(0, H - h + 1, (N,), device=x.device)
                left = torch.randint(0, W - w + 1, (N,), device=x.device)
            else:
                top = torch.full((N,), (H - h) // 2, device=x.device)
                left = torch.full((N,), (W - w) // 2, device=x.device)
            rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            x = x[torch.arange(N, device=x.device)[:, None, None, None], torch.arange(3, device=x.device)[None, :, None, None], rows, cols]
        if self.training and self.jitter > 0:
            def factor() -> torch.Tensor:
                return 1 + (torch.rand(N, 1, 1, 1, device=x.device) * 2 - 1) * self.jitter

            gray = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = x * factor()  # brightness
            x = (x - gray.mean((2, 3), keepdim=True)) * factor() + gray.mean((2, 3), keepdim=True)  # contrast
            x = (x - gray) * factor() + gray  # saturation
            x = x.clamp(0, 1)
        return (x - self.mean) / self.std


class SpatialSoftmax(nn.Module):
    """Feature map -> expected (x, y) image coordinates of `num_kp` learned keypoints (Levine et al. 2016),
    the pooling Diffusion Policy uses after its ResNet-18."""

    def __init__(self, in_channels: int, num_kp: int = 32) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, num_kp, 1)
        self.num_kp = num_kp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, _, H, W = x.shape
        if H * W == 1:  # the expected coordinate over one cell is that cell: the same for every image
            raise ConfigError("spatial softmax over a 1x1 feature map returns the same keypoints for every image: "
                              "use larger images or a backbone that downsamples less (policy.image.backbone=conv)")
        attn = self.proj(x).flatten(2).softmax(-1)  # (N, K, H*W)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, H, device=x.device), torch.linspace(-1, 1, W, device=x.device), indexing="ij")
        grid = torch.stack([xs.flatten(), ys.flatten()], -1).to(attn.dtype)  # (H*W, 2)
        return (attn @ grid).flatten(1)  # (N, 2K)


class ImageEncoder(nn.Module):
    """One camera: augment -> trunk -> spatial softmax -> linear, (N, H, W, 3) uint8 -> (N, out_dim).
    `backbone` defaults to resnet18 so checkpoints written before the conv trunk existed still load;
    the configs choose (`diffusion_image`: conv, `diffusion_image_paper`: resnet18)."""

    def __init__(self, out_dim: int = 64, num_kp: int = 32, norm: str = "group_norm", weights: str | None = None,
                 crop_ratio: float = 0.9, jitter: float = 0.0, backbone: str = "resnet18",
                 channels: Sequence[int] = (32, 32, 64, 64), strides: Sequence[int] = (2, 1, 2, 1)) -> None:
        super().__init__()
        self.augment = ImageAugment(crop_ratio, jitter)
        self.trunk = build_trunk(backbone, resolve_backbone_norm(norm, weights, "policy.image"), weights, channels, strides)
        self.pool = SpatialSoftmax(self.trunk.out_channels, num_kp)
        self.out = nn.Linear(2 * num_kp, out_dim)
        self.out_dim = out_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.out(self.pool(self.trunk(self.augment(images))))


class CameraEncoders(nn.Module):
    """The cameras of an observation window -> per-step features `(B, To, D)`: one `ImageEncoder` per
    camera (separate weights per camera, as in the Diffusion Policy paper). State keys are the
    policy's (`Policy.state_features`); `dim` counts the image features only."""

    def __init__(self, shape_meta: Mapping[str, Mapping], obs_keys: Sequence[str], image: Mapping | None = None) -> None:
        super().__init__()
        # nn.ModuleDict keys may not contain '.', but may contain '/': use the buffer key as is
        self.cameras = nn.ModuleDict({k: ImageEncoder(**(image or {})) for k in obs_keys if shape_meta[k]["kind"] == "image"})
        self.dim = sum(enc.out_dim for enc in self.cameras.values())

    def forward(self, obs: Mapping[str, torch.Tensor], n_steps: int) -> torch.Tensor:
        parts = []
        for k, enc in self.cameras.items():
            frames = obs[k][:, :n_steps]  # (B, To, H, W, 3) uint8
            parts.append(enc(frames.flatten(0, 1)).view(frames.shape[0], n_steps, -1))
        return torch.cat(parts, dim=-1)
