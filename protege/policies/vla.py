"""Vision-language-action policy: a Hugging Face VLM from a local folder + LoRA + an action head.

Backbone: any transformers vision-language model (SmolVLM/Idefics3, PaliGemma, Qwen2-VL / Qwen2.5-VL, ... — anything
`AutoModelForImageTextToText` loads) from `pretrained=<dir>`, with its processor/tokenizer from the
same folder, local files only. Its language-model head is dropped: the policy reads hidden states.

Input sequence (one VLM forward): [camera images + instruction] (the processor's own prompt format,
left-padded) + [one proprioceptive-state token] (+ [horizon action queries] for `head=l1`), given to the
backbone as inputs_embeds; for multimodal-RoPE models (Qwen2-VL, Qwen2.5-VL) the position ids come from the
model's own `get_rope_index` and continue after the prompt (`_multimodal_position_ids`).
Heads (`head=`):
- `l1` (OpenVLA-OFT): `horizon` learned action-query embeddings appended to the sequence; their final
  hidden states are decoded to the whole chunk at once by an MLP (parallel decoding, one forward
  pass, no autoregressive tokens), trained with L1. The queries attend causally among themselves
  (the backbone's own mask); they carry no information of their own, so all of them see the full
  prefix anyway.
- `flow` (pi0 / SmolVLA): a small transformer "action expert" whose tokens are the noisy chunk
  + flow time; it cross-attends to the VLM's final hidden states (computed once per chunk at
  inference) and is trained with flow matching (x_t = t*noise + (1-t)*action, target noise - action,
  t ~ Beta(1.5, 1)); inference integrates `num_inference_steps` Euler steps from noise.
- `diffusion` (TinyVLA): our Diffusion Policy U-Net (nets/unet1d.py) conditioned on the pooled VLM
  features + state, with diffusers' DDPM/DDIM schedulers as in policies/diffusion.py.

Fine-tuning: LoRA (peft) on the backbone's linear layers (`lora_rank`, `lora_alpha`,
`lora_target_modules`; `lora_rank=0` = full fine-tuning), the vision tower optionally frozen
entirely (`freeze_vision`), gradient checkpointing (`gradient_checkpointing=auto`: on with CUDA);
bf16/fp16 autocast comes from the trainer (`train.amp`). The L1 head leaves padded chunk steps
(`action_is_pad`: past an episode's end) out of its loss. Actions use quantile (1st-99th percentile)
normalisation by default, as OpenVLA.

Language: the batch carries `task` (int index into the training buffer's `attrs["tasks"]`, saved
in the checkpoint's shape_meta); at run time `obs["instruction"]` (a list of B strings) may give
free text instead.

Precision (`dtype`): the frozen backbone is loaded in `float32`, `bfloat16` (half the memory; the GPU
setting) or `float16` (with `train.amp=fp16`, whose gradient scaler needs float32 trainable weights);
LoRA adapters and heads always train in float32. Full fine-tuning (`lora_rank=0`) needs `float32`.

Checkpoints: the policy's state_dict leaves out the frozen backbone weights (they are re-read from
`pretrained`, which the checkpoint's config records), so a checkpoint holds adapters + heads +
normaliser + `backbone_fingerprint` (`backbone_fingerprint()`: the backbone folder's identity); it
needs the backbone folder to load, and refuses a folder with other weights. The trainer's EMA covers
the trainable parameters only and is swapped into the live policy for saving and evaluation, so the
frozen backbone is never copied.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protege.errors import ConfigError, DataError
from protege.policies.act import masked_l1
from protege.policies.base import Policy, ShapeMeta
from protege.policies.bc import mlp
from protege.policies.guidance import ChunkGuide, guided_eps, guided_step, guided_velocity
from protege.policies.nets.unet1d import SinusoidalPosEmb

HEADS = ("l1", "flow", "diffusion")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def backbone_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"policy.dtype={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def backbone_fingerprint(pretrained: str | Path) -> torch.Tensor:
    """sha256 (32 uint8) of the folder's config.json and, per weight file, its size and 16 evenly spaced
    64 KiB blocks: a cheap identity (reading a multi-GB file whole at every load would take seconds)
    that tells apart two checkpoints of the same architecture, e.g. a base model and its fine-tune."""
    import hashlib

    path = Path(pretrained).expanduser()
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(p for p in path.iterdir() if p.name.endswith((".safetensors", ".bin"))):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for i in range(16):
                fh.seek(max(0, (size - 65536) * i // 15))
                h.update(fh.read(65536))
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


def load_backbone(pretrained: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, Any]:
    """(full VLM in `dtype`, processor, config) from a local folder; a ConfigError says what the folder lacks."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = Path(pretrained).expanduser()
    where = f"policy.pretrained={pretrained}"
    if not path.is_dir():
        raise ConfigError(f"{where}: no such folder; download the VLM once (e.g. `hf download <repo> --local-dir <dir>`) "
                          "and point policy.pretrained at it (or build a tiny one: scripts/make_tiny_vlm.py)")
    files = {p.name for p in path.iterdir()}
    for what, names in (("a model config", ("config.json",)), ("model weights", WEIGHT_FILES),
                        ("a processor config (the VLM's image processor)", PROCESSOR_FILES), ("a tokenizer", TOKENIZER_FILES)):
        if not files & set(names):
            raise ConfigError(f"{where}: expected {what} ({' or '.join(names)}) in the folder, found {sorted(files)}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise ConfigError(f"{where}: config.json does not load: {e}") from e
    if getattr(config, "vision_config", None) is None:
        raise ConfigError(f"{where}: config.json describes a {config.model_type!r} model without a vision tower "
                          "(no vision_config); expected a vision-language model (SmolVLM/Idefics3, PaliGemma, Qwen2-VL, ...)")
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{where}: the processor does not load: {e}") from e
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ConfigError(f"{where}: expected a multimodal processor (image processor + tokenizer), "
                          f"AutoProcessor built a {type(processor).__name__}")
    try:
        vlm = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{where}: the model does not load as a vision-language model: {e}") from e
    return vlm, processor, config


class FlowExpert(nn.Module):
    """pi0-style action expert: noisy chunk tokens (+ flow time) self-attend and cross-attend to the VLM features."""

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.time_emb = SinusoidalPosEmb(dim)
        self.action_in = nn.Linear(action_dim, dim)
        self.mix = nn.Sequential(nn.Linear(2 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))  # pi0's action-time MLP
        self.pos = nn.Parameter(torch.randn(horizon, dim) * 0.02)
        self.cond_in = nn.Linear(cond_dim, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, action_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """Velocity (B, H, A) for noisy actions `x` (B, H, A) at flow time `t` (B,) in [0, 1]."""
        a = self.action_in(x)
        temb = self.time_emb(t * 1000.0).to(a.dtype)[:, None].expand_as(a)
        h = self.mix(torch.cat([a, temb], dim=-1)) + self.pos
        h = self.decoder(h, self.cond_in(memory.to(a.dtype)), memory_key_padding_mask=~memory_mask.bool())
        return self.out(h)


def _drop_frozen(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for k in module._external_keys:
        state_dict.pop(prefix + k, None)


def _check_backbone(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Refuse weights trained on another backbone than the one `pretrained` holds now."""
    saved, here = state_dict.get(prefix + "backbone_fingerprint"), module.backbone_fingerprint
    if saved is not None and not torch.equal(saved.cpu(), here.cpu()):
        raise ConfigError(f"policy.pretrained={module.pretrained}: these backbone weights are not the ones the "
                          f"checkpoint was trained on (fingerprint {bytes(saved.tolist()).hex()[:12]}, the folder "
                          f"has {bytes(here.tolist()).hex()[:12]}); point policy.pretrained at the original backbone folder")


def _allow_frozen_missing(module: nn.Module, incompatible: Any) -> None:
    external = module._external_keys
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in external]


def _image_placeholder(processor: Any) -> str:
    """The text that stands for one image in the prompt; the processor expands it to the image's tokens.

    Qwen2-VL-style models were trained with each image's tokens between <|vision_start|> and <|vision_end|>,
    which their processors leave to the chat template, so we add them when the tokenizer has them.
    """
    token = processor.image_token
    vocab = processor.tokenizer.get_vocab()
    if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:
        return f"<|vision_start|>{token}<|vision_end|>"
    return token


def _multimodal_position_ids(backbone: nn.Module, ids: torch.Tensor, mask: torch.Tensor, inputs: Mapping[str, Any],
                             n_new: int) -> torch.Tensor | None:
    """Position ids for [prompt, n_new appended tokens] when the backbone uses multimodal RoPE, else None.

    Models with 1-D RoPE (SmolVLM, PaliGemma) number the sequence themselves, and a uniform shift from left
    padding does not change relative positions, so they need nothing. Qwen2-VL-style models (M-RoPE) give
    image tokens (time, height, width) positions that only their `get_rope_index` computes from input_ids +
    image_grid_thw; given inputs_embeds alone they would fall back to plain 1-D positions. So we ask it for the
    prompt's positions and continue them for the appended state/query tokens: max + 1, max + 2, ... on all
    three axes, exactly the positions generation would give the next tokens.
    """
    get_rope_index = getattr(backbone, "get_rope_index", None)
    if get_rope_index is None:
        return None
    params = inspect.signature(get_rope_index).parameters
    kw = {k: v for k, v in inputs.items() if k in params}
    if "mm_token_type_ids" in params and "mm_token_type_ids" not in kw:  # a text-only prompt: every token is text
        kw["mm_token_type_ids"] = torch.zeros_like(ids)
    positions, _ = get_rope_index(ids, attention_mask=mask, **kw)  # (3, B, L); padding positions are filled arbitrarily
    start = positions.masked_fill(~mask.bool()[None], -1).amax(dim=(0, 2)) + 1  # (B,) next free position per sample
    new = start[None, :, None] + torch.arange(n_new, device=ids.device)[None, None]
    return torch.cat([positions, new.expand(positions.shape[0], -1, -1)], dim=2)


class VLAPolicy(Policy):
    def __init__(
        self,
        shape_meta: ShapeMeta,
        pretrained: str,
        head: str = "l1",
        n_obs_steps: int = 1,
        horizon: int = 8,
        n_action_steps: int = 8,
        lora_rank: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: str | Sequence[str] = "all-linear",
        freeze_vision: bool = True,
        gradient_checkpointing: bool | str = "auto",
        head_hidden_dim: int = 256,
        expert_dim: int = 128,
        expert_layers: int = 2,
        expert_heads: int = 4,
        num_inference_steps: int = 10,
        diffusion_down_dims: Sequence[int] = (64, 128),
        num_train_timesteps: int = 100,
        normalization: Mapping[str, str] | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__(shape_meta, n_obs_steps, horizon, n_action_steps, {"action": "quantile", **(normalization or {})})
        if head not in HEADS:
            raise ConfigError(f"policy.head={head!r}: expected one of {HEADS}")
        self.dtype = backbone_dtype(dtype)
        if self.dtype != torch.float32 and lora_rank <= 0:
            raise ConfigError(f"policy.dtype={dtype}: only the frozen backbone is stored in half precision; full "
                              "fine-tuning (lora_rank=0) trains the backbone itself and needs float32 weights "
                              "(use policy.dtype=float32 with train.amp=bf16)")
        self.head_type, self.pretrained, self.num_inference_steps = head, str(pretrained), num_inference_steps
        kinds = {k: self.shape_meta[k]["kind"] for k in self.obs_keys}
        self.state_keys = [k for k, v in kinds.items() if v == "state"]
        self.camera_keys = [k for k, v in kinds.items() if v == "image"]
        lang = [k for k, v in kinds.items() if v == "language"]
        if not lang:
            raise ConfigError(f"policy vla is language-conditioned: expected a language key (`task`) in task.obs_keys, "
                              f"found {self.obs_keys}")
        self.language_key = lang[0]
        self.tasks = list(self.shape_meta[self.language_key].get("tasks") or [])
        if not self.tasks:
            raise ConfigError(f"policy vla: the buffer's {self.language_key!r} key names no instructions "
                              "(expected attrs['tasks']: a list of strings)")

        vlm, self.processor, _ = load_backbone(pretrained, self.dtype)
        self.processor.tokenizer.padding_side = "left"  # appended state/query tokens follow the prompt directly
        self.image_text = _image_placeholder(self.processor) if self.camera_keys else ""
        self.backbone = vlm.base_model  # vision tower + projector + language model, without the LM head
        dim = int(self.backbone.get_input_embeddings().embedding_dim)
        # the vision side = every backbone parameter outside the language model (tower + projector)
        lm_params = {id(p) for p in vlm.get_decoder().parameters()}
        self._apply_finetuning(lm_params, lora_rank, lora_alpha, lora_dropout, lora_target_modules, freeze_vision)
        if gradient_checkpointing == "auto":
            gradient_checkpointing = torch.cuda.is_available()
        if gradient_checkpointing:
            vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        del vlm  # drops the LM head (the backbone is kept by self.backbone)

        state_dim = sum(int(torch.Size(self.shape_meta[k]["shape"]).numel()) for k in self.state_keys) * n_obs_steps
        self.state_proj = mlp(state_dim, [dim], dim) if state_dim else None
        if head == "l1":
            self.action_queries = nn.Parameter(torch.randn(horizon, dim) * 0.02)
            self.action_head = mlp(dim, [head_hidden_dim, head_hidden_dim], self.action_dim)
        elif head == "flow":
            self.expert = FlowExpert(self.action_dim, horizon, dim, expert_dim, expert_layers, expert_heads)
        else:
            from diffusers import DDIMScheduler, DDPMScheduler

            from protege.policies.nets.unet1d import ConditionalUnet1D

            self.unet = ConditionalUnet1D(self.action_dim, dim + (dim if state_dim else 0), diffusion_down_dims, 5, 8, 128)
            kw = dict(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True)
            self.noise_scheduler, self.inference_scheduler = DDPMScheduler(**kw), DDIMScheduler(**kw)

        # frozen backbone weights come from `pretrained`, not from the checkpoint (nor the EMA, nor copies
        # for evaluation); the checkpoint records which backbone it was trained on and refuses another
        self._external_keys = {f"backbone.{n}" for n, p in self.backbone.named_parameters() if not p.requires_grad}
        self._external_keys |= {f"backbone.{n}" for n, _ in self.backbone.named_buffers()}
        self.register_buffer("backbone_fingerprint", backbone_fingerprint(pretrained))
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_check_backbone)
        self.register_load_state_dict_post_hook(_allow_frozen_missing)

    # ------------------------------------------------------------------ setup
    def _apply_finetuning(self, lm_params: set[int], rank: int, alpha: int, dropout: float,
                          targets: str | Sequence[str], freeze_vision: bool) -> None:
        if rank <= 0:  # full fine-tuning (e.g. a small backbone trained from scratch)
            for p in self.backbone.parameters():
                p.requires_grad_(not (freeze_vision and id(p) not in lm_params))
            return
        from peft import LoraConfig, inject_adapter_in_model

        linear = [n for n, m in self.backbone.named_modules() if isinstance(m, nn.Linear)]
        if targets == "all-linear":
            names = linear
        else:
            wanted = [targets] if isinstance(targets, str) else list(targets)
            names = [n for n in linear if any(n == t or n.endswith("." + t) for t in wanted)]
        if freeze_vision:
            modules = dict(self.backbone.named_modules())
            names = [n for n in names if id(modules[n].weight) in lm_params]
        if not names:
            raise ConfigError(f"policy.lora_target_modules={targets!r}: matches no linear layer of the backbone"
                              f"{' outside the vision tower' if freeze_vision else ''} (e.g. {linear[:4]})")
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
        inject_adapter_in_model(config, self.backbone)
        for n, p in self.backbone.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_" in n:  # trained weights stay float32 over a half-precision backbone (peft casts the inputs)
                p.data = p.data.float()

    def trainable_parameter_counts(self) -> dict[str, int]:
        """Trainable parameters: backbone (LoRA adapters, or all when fully fine-tuned) vs heads, and the frozen rest."""
        backbone = sum(p.numel() for p in self.backbone.parameters() if p.requires_grad)
        total_trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return {"backbone": backbone, "head": total_trainable - backbone, "trainable": total_trainable, "frozen": frozen}

    # ------------------------------------------------------------------ inputs
    def instructions(self, obs: Mapping[str, Any]) -> list[str]:
        """The B instruction strings of a batch: `obs["instruction"]` (free text) or `obs[task]` indices."""
        if "instruction" in obs:
            instr = obs["instruction"]
            return [instr] if isinstance(instr, str) else [str(s) for s in instr]
        if self.language_key not in obs:
            raise DataError("batch", self.language_key, f"instructions: {self.language_key!r} (int indices into the buffer's "
                            "attrs['tasks']) or 'instruction' (B strings)", f"keys {sorted(obs)}")
        idx = torch.as_tensor(obs[self.language_key])
        idx = (idx[:, self.n_obs_steps - 1] if idx.ndim > 1 else idx).long().cpu().tolist()
        bad = [i for i in idx if not 0 <= i < len(self.tasks)]
        if bad:
            raise DataError("batch", self.language_key, f"indices into the {len(self.tasks)} training instructions", f"index {bad[0]}")
        return [self.tasks[i] for i in idx]

    def _prompt_inputs(self, obs: Mapping[str, Any], batch_size: int) -> dict[str, torch.Tensor]:
        """Processor outputs (input_ids, attention_mask, pixel_values, ...) for images + instruction."""
        instr = self.instructions(obs)
        if len(instr) == 1 and batch_size > 1:
            instr = instr * batch_size
        if len(instr) != batch_size:
            raise DataError("batch", "instruction", f"{batch_size} instructions (one per sample)", f"{len(instr)}")
        if not self.camera_keys:
            inputs = self.processor.tokenizer(instr, return_tensors="pt", padding=True)
        else:
            # the current step's frame of every camera, (B, C, H, W) uint8, through the VLM's own image processor
            frames = [obs[k][:, self.n_obs_steps - 1].permute(0, 3, 1, 2).cpu() for k in self.camera_keys]
            images = [[f[b] for f in frames] for b in range(batch_size)]
            inputs = self.processor(text=[self.image_text * len(frames) + s for s in instr], images=images, return_tensors="pt", padding=True)
        inputs = dict(inputs)
        inputs.pop("labels", None)  # PaliGemma's processor adds training labels for its LM head
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _features(self, obs: Mapping[str, Any], extra: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass over [prompt, state token, extra tokens]: final hidden states (B, L, D) and mask (B, L)."""
        B = next(v.shape[0] for k, v in obs.items() if k != "instruction")
        inputs = self._prompt_inputs(obs, B)
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        tokens = [self.backbone.get_input_embeddings()(ids)]
        if self.state_proj is not None:
            state = torch.cat([self.normalizer.normalize(k, obs[k][:, : self.n_obs_steps].float()).flatten(1) for k in self.state_keys], -1)
            tokens.append(self.state_proj(state.to(self.device))[:, None])
        if extra is not None:
            tokens.append(extra.expand(B, -1, -1))
        embeds = torch.cat([t.to(tokens[0].dtype) for t in tokens], 1)
        n_new = embeds.shape[1] - ids.shape[1]
        mask = F.pad(mask, (0, n_new), value=1)
        positions = _multimodal_position_ids(self.backbone, ids, mask[:, : ids.shape[1]], inputs, n_new)
        for k, v in list(inputs.items()):  # per-token extras (PaliGemma's token_type_ids, Qwen's mm_token_type_ids): 0 = text
            if v.shape == ids.shape:
                inputs[k] = F.pad(v, (0, n_new), value=0)
        if positions is not None:
            inputs["position_ids"] = positions
        # no input_ids: the models find their image-token slots by comparing embeddings with the image token's
        out = self.backbone(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **inputs)
        return out.last_hidden_state, mask

    def _pooled(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    # ------------------------------------------------------------------ Policy
    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        actions = self.normalizer.normalize(self.action_key, batch[self.action_key].float())
        if self.head_type == "l1":
            hidden, _ = self._features(batch, self.action_queries[None])
            pred = self.action_head(hidden[:, -self.horizon :].float())
            is_pad = batch.get("action_is_pad")  # steps past an episode's end are edge-padded copies: no target
            if is_pad is None:
                return {"loss": F.l1_loss(pred, actions)}
            return {"loss": masked_l1(pred, actions, is_pad.to(pred.device).bool())}
        hidden, mask = self._features(batch, None)
        noise = torch.randn_like(actions)
        if self.head_type == "flow":
            t = torch.distributions.Beta(1.5, 1.0).sample((actions.shape[0],)).to(actions.device) * 0.999 + 0.001
            x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
            v = self.expert(x_t, t, hidden, mask)
            return {"loss": F.mse_loss(v.float(), noise - actions)}
        cond = self._diffusion_cond(hidden, mask)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (actions.shape[0],), device=actions.device)
        pred = self.unet(self.noise_scheduler.add_noise(actions, noise, t), t, cond)
        return {"loss": F.mse_loss(pred.float(), noise)}

    def _diffusion_cond(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = self._pooled(hidden, mask).float()
        # the state token is the last position: keep it separately so the pooled prompt does not drown it
        return torch.cat([pooled, hidden[:, -1].float()], -1) if self.state_proj is not None else pooled

    @property
    def supports_guide(self) -> bool:
        """Real-time chunking needs a sampler to guide: the flow and diffusion heads, not l1."""
        return self.head_type != "l1"

    @torch.no_grad()
    def predict_action(self, obs: Mapping[str, Any], guide: ChunkGuide | None = None) -> torch.Tensor:
        """`guide`: real-time chunking (flow/diffusion heads; `policies/guidance.py`)."""
        obs = {k: (v if k == "instruction" else torch.as_tensor(v, device=self.device)) for k, v in obs.items()}
        if self.head_type == "l1":
            hidden, _ = self._features(obs, self.action_queries[None])
            actions = self.action_head(hidden[:, -self.horizon :].float())
        else:
            hidden, mask = self._features(obs, None)
            B = hidden.shape[0]
            x = torch.randn(B, self.horizon, self.action_dim, device=hidden.device)
            inpaint = None if guide is None else (*self.guide_tensors(guide, B, self.horizon, self.n_obs_steps - 1), guide.max_weight)
            if self.head_type == "flow":
                dt = 1.0 / self.num_inference_steps
                for i in range(self.num_inference_steps):  # Euler from t=1 (noise) to t=0 (actions)
                    t = 1.0 - i * dt
                    v_fn = lambda xg, t=t: self.expert(xg, torch.full((B,), t, device=xg.device), hidden, mask).float()  # noqa: E731
                    x = x - dt * (v_fn(x) if inpaint is None else guided_velocity(v_fn, x, t, *inpaint))
            else:
                cond = self._diffusion_cond(hidden, mask)
                sched = self.inference_scheduler
                sched.set_timesteps(self.num_inference_steps, device=x.device)
                for t in sched.timesteps:
                    net = lambda xg, t=t: self.unet(xg, t, cond)  # noqa: E731
                    if inpaint is None:
                        x = sched.step(net(x), t, x).prev_sample
                    else:
                        x = guided_step(sched, guided_eps(net, x, float(sched.alphas_cumprod[int(t)]), *inpaint), t, x)
            actions = x
        actions = self.action_slice(self.normalizer.unnormalize(self.action_key, actions))
        return actions if guide is None else self.keep_frozen(actions, guide)
