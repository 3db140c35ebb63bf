"""Time-conditioned residual U-Net that predicts the noise, with the anatomy mask as a second input channel.

Weights are stored as safetensors with the architecture in the metadata; the SHA-256 of the file is
the model's identity, carried into every result (IHE AI Results: which algorithm produced this).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    image_channels: int = 1
    cond_channels: int = 1  # anatomy mask, concatenated to the noisy image
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (3,)  # levels (0 = full resolution) with self-attention
    groups: int = 8
    image_size: int = 128  # the model grid (square); inputs are resampled to it

    @property
    def in_channels(self) -> int:
        return self.image_channels + self.cond_channels


PRESETS: dict[str, UNetConfig] = {
    # For unit tests: a few thousand parameters.
    "tiny": UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), groups=4, image_size=32),
    # Runs on a CPU in reasonable time; the shipped default.
    "small": UNetConfig(base_channels=16, channel_mults=(1, 2, 2, 4), attention_levels=(3,), image_size=64),
    # The small layout at twice the width (four times the parameters): the next size a CPU can train in an hour.
    "medium": UNetConfig(base_channels=32, channel_mults=(1, 2, 2, 4), attention_levels=(3,), image_size=64),
    # For GPU sites.
    "base": UNetConfig(
        base_channels=64,
        channel_mults=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(2, 3),
        image_size=256,
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    """Zero a layer's weights and bias: a residual branch then starts as the identity (DDPM initialisation)."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        _zero(self.conv2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, groups: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        _zero(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (n, heads, hw, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    """eps = UNet(x_t, cond, t): x_t, cond (N, 1, H, W), t (N,) -> (N, 1, H, W)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.base_channels
        emb_dim = ch * 4
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [ch]
        cur = ch
        levels = len(config.channel_mults)
        for level, mult in enumerate(config.channel_mults):
            out = config.base_channels * mult
            for _ in range(config.num_res_blocks):
                block = nn.ModuleList([ResBlock(cur, out, emb_dim, config.groups)])
                if level in config.attention_levels:
                    block.append(SelfAttention(out, config.groups))
                self.down.append(block)
                cur = out
                skip_channels.append(cur)
            if level < levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skip_channels.append(cur)

        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, emb_dim, config.groups),
                SelfAttention(cur, config.groups),
                ResBlock(cur, cur, emb_dim, config.groups),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            out = config.base_channels * mult
            for _ in range(config.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(cur + skip_channels.pop(), out, emb_dim, config.groups)])
                if level in config.attention_levels:
                    block.append(SelfAttention(out, config.groups))
                self.up.append(block)
                cur = out
            if level > 0:
                self.up.append(
                    nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cur, cur, 3, padding=1)])
                )

        self.head = nn.Sequential(
            nn.GroupNorm(config.groups, cur), nn.SiLU(), _zero(nn.Conv2d(cur, config.image_channels, 3, padding=1))
        )

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels))
        h = self.stem(torch.cat([x_t, cond], dim=1))
        skips = [h]
        for block in cast(Iterable[nn.ModuleList], self.down):
            if isinstance(block[0], ResBlock):
                h = block[0](h, emb)
                for extra in block[1:]:
                    h = extra(h)
            else:
                h = block[0](h)
            skips.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for block in cast(Iterable[nn.ModuleList], self.up):
            if isinstance(block[0], ResBlock):
                h = block[0](torch.cat([h, skips.pop()], dim=1), emb)
                for extra in block[1:]:
                    h = extra(h)
            else:
                h = block[1](block[0](h))
        return self.head(h)


def count_flops(config: UNetConfig, height: int | None = None, width: int | None = None) -> int:
    """Multiply-accumulate count x 2 of one forward pass for one image (convs, linears, attention)."""
    model = UNet(config)
    h = height or config.image_size
    w = width or config.image_size
    flops = 0

    def conv_hook(mod: nn.Conv2d, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal flops
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        flops += 2 * k * out.numel()

    def linear_hook(mod: nn.Linear, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal flops
        flops += 2 * mod.in_features * out.numel()

    def attn_hook(mod: SelfAttention, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        nonlocal flops
        _, c, hh, ww = inp[0].shape
        flops += 2 * 2 * (hh * ww) ** 2 * c  # QK^T and AV

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
        elif isinstance(m, SelfAttention):
            m.register_forward_hook(attn_hook)
    with torch.no_grad():
        model(torch.zeros(1, 1, h, w), torch.zeros(1, 1, h, w), torch.zeros(1))
    return flops


@dataclass
class ModelInfo:
    """A loaded model's identity and the settings it was trained with."""

    name: str
    config: UNetConfig
    sha256: str
    training: dict[str, object] = field(default_factory=dict)  # t_start, noise, data, epochs, ...
    # What it was trained on (metadata "edgenode.modalities" / "edgenode.body_part"): the node runs a model only on
    # these modalities. Empty: a file written before the metadata existed (the node treats it as CT-only).
    modalities: tuple[str, ...] = ()
    body_part: str = ""

    @property
    def model_id(self) -> str:
        return f"{self.name}-{self.sha256[:12]}"

    def describe_training(self) -> str:
        """'CT, CHEST' or 'no modality metadata' (for logs, `engine info` and error messages)."""
        if not self.modalities:
            return "no modality metadata"
        return ", ".join(self.modalities) + (f" {self.body_part}" if self.body_part else "")


MODALITIES_KEY, BODY_PART_KEY = "edgenode.modalities", "edgenode.body_part"


def modality_metadata(modalities: Iterable[str], body_part: str = "") -> dict[str, str]:
    """The safetensors metadata entries naming what a model was trained on (upper case, as DICOM spells them)."""
    names = sorted({m.strip().upper() for m in modalities if m.strip()})
    if not names:
        raise ValueError("a model must name at least one modality it was trained on (CT, CR, DX)")
    return {MODALITIES_KEY: json.dumps(names), BODY_PART_KEY: body_part.strip().upper()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(
    model: UNet,
    path: Path,
    name: str,
    training: dict[str, object] | None = None,
    modalities: Iterable[str] = ("CT",),
    body_part: str = "CHEST",
) -> ModelInfo:
    """Write weights + architecture + training settings + what it was trained on as safetensors; returns the new
    identity."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "edgenode.name": name,
        "edgenode.config": json.dumps(asdict(model.config)),
        "edgenode.training": json.dumps(training or {}, default=str),
        **modality_metadata(modalities, body_part),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return ModelInfo(
        name=name,
        config=model.config,
        sha256=file_sha256(path),
        training=training or {},
        modalities=tuple(json.loads(metadata[MODALITIES_KEY])),
        body_part=metadata[BODY_PART_KEY],
    )


def stamp_modalities(path: Path, modalities: Iterable[str], body_part: str = "") -> ModelInfo:
    """Write what a model was trained on into its metadata, for files made before edgenode recorded it. The
    tensors are written back unchanged (same bytes); the file, and so its SHA-256 identity, changes."""
    return _rewrite_metadata(path, lambda metadata: metadata.update(modality_metadata(modalities, body_part)))


def stamp_training(path: Path, update: dict[str, object]) -> ModelInfo:
    """Merge `update` into a model's training metadata (what the pipeline reads from it: `PipelineSettings.for_model`)
    with its tensors unchanged; the file, and so its identity, changes."""

    def merge(metadata: dict[str, str]) -> None:
        training = json.loads(metadata.get("edgenode.training", "{}"))
        metadata["edgenode.training"] = json.dumps({**training, **update}, default=str)

    return _rewrite_metadata(path, merge)


def _rewrite_metadata(path: Path, change: Callable[[dict[str, str]], None]) -> ModelInfo:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        metadata = dict(fh.metadata() or {})
        state = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    if "edgenode.config" not in metadata:
        raise ValueError(f"{path} is not an edgenode model (no edgenode.config metadata)")
    change(metadata)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.chmod(path.stat().st_mode)
    tmp.replace(path)
    return read_model_info(path)


def read_model_info(path: Path) -> ModelInfo:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "edgenode.config" not in meta:
        raise ValueError(f"{path} is not an edgenode model (no edgenode.config metadata)")
    raw = json.loads(meta["edgenode.config"])
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    config = UNetConfig(**fields)
    return ModelInfo(
        name=meta.get("edgenode.name", path.stem),
        config=config,
        sha256=file_sha256(path),
        training=json.loads(meta.get("edgenode.training", "{}")),
        modalities=tuple(str(m).upper() for m in json.loads(meta.get(MODALITIES_KEY, "[]"))),
        body_part=meta.get(BODY_PART_KEY, ""),
    )


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[UNet, ModelInfo]:
    """Load weights from safetensors into a fresh UNet in eval mode."""
    info = read_model_info(path)
    model = UNet(info.config)
    model.load_state_dict(load_file(str(path), device=str(device)))
    return model.to(device).eval(), info
