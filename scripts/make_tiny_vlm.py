"""Build a tiny, randomly initialised vision-language model folder that loads offline like a real one.

    python scripts/make_tiny_vlm.py out/tiny-smolvlm                 # SmolVLM family (default)
    python scripts/make_tiny_vlm.py out/tiny-idefics3 --family idefics3
    python scripts/make_tiny_vlm.py out/tiny-paligemma --family paligemma
    python scripts/make_tiny_vlm.py out/tiny-qwen25vl --family qwen2_5_vl   # or qwen2_vl
    protege train policy=vla policy.pretrained=out/tiny-smolvlm task=pointmass_lang

The folder is what transformers' own `save_pretrained` writes for the family's model and processor
classes (config.json, model.safetensors, tokenizer + processor files), as in a downloaded checkpoint,
so the VLA policy loads it through exactly the path it uses for real SmolVLM / Idefics3 / PaliGemma /
Qwen2(.5)-VL weights (transformers' Auto classes, local files only), with the same processor
dependencies (SmolVLM's processor needs `num2words`, SmolVLM's and Qwen2-VL's need torchvision).
No pretrained weights can be fetched on an offline machine: this is the stand-in for tests and
CPU-scale experiments. The tokenizer is a byte-level BPE trained here with `tokenizers` on a small
corpus of robot instructions, so any text tokenizes (unknown words fall back to bytes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

FAMILIES = ("smolvlm", "idefics3", "paligemma", "qwen2_5_vl", "qwen2_vl")

# Words a robot instruction uses (incl. the protege language tasks), so common words get own tokens.
CORPUS = """
move to the top left corner. move to the top right corner. move to the bottom left corner.
move to the bottom right corner. go to the red goal, the green goal, the blue goal, the yellow goal.
reach the goal position. push the puck to the goal. pick up the puck and place it at the goal.
open the door. open the drawer. close the drawer. press the button from the top.
insert the peg into the hole from the side. slide the window open. slide the window closed.
grasp the cube and lift it. stack the block on the other block. turn the faucet. pour the cup.
put the object in the basket, in the bowl, on the plate, on the shelf. wipe the table.
"""


def _tokenizer(extra_special: list[str], vocab_size: int):
    """Byte-level BPE trained on CORPUS; transformers' fast tokenizer around it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", *extra_special]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", additional_special_tokens=extra_special)


def make_tiny_vlm(out: str | Path, family: str = "smolvlm", image_size: int = 32, hidden: int = 64, layers: int = 2,
                  vocab_size: int = 400, seed: int = 0) -> Path:
    """Write a tiny random-init VLM (model + processor + tokenizer) to `out`; returns the folder."""
    import torch
    from transformers import AutoModelForImageTextToText

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: expected one of {FAMILIES}")
    torch.manual_seed(seed)
    out = Path(out)
    patch = 8
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                  image_size=image_size, patch_size=patch)
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512)
    if family in ("smolvlm", "idefics3"):  # SmolVLM is Idefics3's architecture with its own classes
        import transformers

        prefix = "SmolVLM" if family == "smolvlm" else "Idefics3"
        tokenizer = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"], vocab_size)
        scale = 2  # pixel shuffle: (image/patch)^2 / scale^2 image tokens per image
        config = getattr(transformers, prefix + "Config")(
            vision_config=vision, text_config=dict(model_type="llama", vocab_size=len(tokenizer), **text),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale, pad_token_id=tokenizer.pad_token_id,
        )
        sizes = dict(do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size})
        image_processor = getattr(transformers, prefix + "ImageProcessor")(**sizes)
        extra = (transformers.SmolVLMVideoProcessor(**sizes),) if family == "smolvlm" else ()
        processor = getattr(transformers, prefix + "Processor")(image_processor, tokenizer, *extra,
                                                                image_seq_len=(image_size // patch) ** 2 // scale**2)
    elif family in ("qwen2_5_vl", "qwen2_vl"):
        import transformers
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        tokenizer = _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], vocab_size)
        ids = tokenizer.convert_tokens_to_ids
        # M-RoPE: the head_dim/2 rotary frequencies split over (time, height, width) in the real model's 2:3:3 ratio
        half = hidden // 4 // 2
        mrope = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
        text_q = {**text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                  "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                  "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        text_q.pop("head_dim")  # Qwen2-VL derives it from hidden_size / heads
        merge = 2  # 2x2 patches merge into one LLM token: (image/patch)^2 / merge^2 image tokens per image
        if family == "qwen2_5_vl":
            # window attention over (patch*merge)-pixel units; the last block attends globally as in the real model
            vision_q = dict(depth=layers, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=4, patch_size=patch,
                            spatial_merge_size=merge, window_size=2 * patch * merge, out_hidden_size=hidden,
                            fullatt_block_indexes=[layers - 1])
        else:
            vision_q = dict(depth=layers, embed_dim=hidden, hidden_size=hidden, mlp_ratio=2, num_heads=4, patch_size=patch,
                            spatial_merge_size=merge)
        prefix = "Qwen2_5_VL" if family == "qwen2_5_vl" else "Qwen2VL"
        config = getattr(transformers, prefix + "Config")(
            vision_config=vision_q, text_config=text_q, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        )
        # pixel budget: the frame keeps its size (a multiple of patch*merge), as the real processor does for small frames
        pixels = dict(size={"shortest_edge": (patch * merge) ** 2, "longest_edge": image_size**2},
                      patch_size=patch, merge_size=merge, temporal_patch_size=2)
        processor = getattr(transformers, prefix + "Processor")(
            Qwen2VLImageProcessor(**pixels), tokenizer, Qwen2VLVideoProcessor(**pixels))
    else:
        from transformers import PaliGemmaConfig, PaliGemmaProcessor, SiglipImageProcessor

        tokenizer = _tokenizer(["<image>"], vocab_size)
        n_img = (image_size // patch) ** 2
        config = PaliGemmaConfig(
            vision_config=dict(model_type="siglip_vision_model", projection_dim=hidden, **vision),
            text_config=dict(model_type="gemma", vocab_size=len(tokenizer), **text),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), projection_dim=hidden, pad_token_id=tokenizer.pad_token_id,
        )
        config.vision_config.num_image_tokens = n_img
        config.text_config.num_image_tokens = n_img
        image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
        image_processor.image_seq_length = n_img  # PaliGemmaProcessor reads the image-token count from here
        processor = PaliGemmaProcessor(image_processor, tokenizer)
    model = AutoModelForImageTextToText.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--family", choices=FAMILIES, default="smolvlm")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    a = p.parse_args()
    out = make_tiny_vlm(a.out, a.family, a.image_size, a.hidden, a.layers)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({a.family}, {size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
