"""LLaVA-CoT's staged reasoning on a fusion Llava: stage-level beam search, image encoded once.

    python examples/llava_cot.py                              # tiny tower + tiny random Llama, offline, seconds
    python examples/llava_cot.py --n 8 --judge loglik
    python examples/llava_cot.py --save-tiny /tmp/tiny_cot    # also save the tiny model with save_pretrained
    python examples/llava_cot.py --model-dir /tmp/tiny_cot    # any fusion Llava saved with save_pretrained
    python examples/llava_cot.py --model-dir ckpt --device cuda --dtype bfloat16 --image photo.jpg \\
        --question "How many windows does the house have?"

For each stage (<SUMMARY>, <CAPTION>, <REASONING>, <CONCLUSION>) it prints every
candidate with its score and marks the chosen one, then the answer, then how many times
the vision tower ran (once). The tiny model has random weights: its stages are random
words from a 36-token vocabulary, and a candidate closes its tag only by chance.
With ``--model-dir`` the prompt comes from the processor's chat template (or
``--prompt``, which must contain the image token).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoProcessor, LlamaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

import fusion.hf as fhf  # registers "fusion_vision" (needed before from_pretrained)
from fusion.stages import LLAVA_COT_STAGES

IMAGES = Path(__file__).with_name("images")
TAGS = [tag for s in LLAVA_COT_STAGES for tag in (s.open, s.close)]
WORDS = ("<unk> <pad> <s> </s> <image> USER ASSISTANT : what is in the picture ? a the house cat roof "
         "window door red blue two there are 1 2").split() + TAGS
# Whitespace-separated words, as the tiny word-level tokenizer reads them.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}USER : {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                      "<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}ASSISTANT :")


def tiny_llava_cot(seed: int = 0):
    """A tiny random fusion Llava (the ``tiny`` tower) and its processor, built offline;
    the stage tags are single tokens of its word-level tokenizer."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=1, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    vision = fhf.FusionVisionConfig(tower="tiny", weights="random", seed=seed)
    config = fhf.llava_config(vision, text, image_token_id=WORDS.index("<image>"))
    model = LlavaForConditionalGeneration(config).eval()
    processor = fhf.llava_processor(tokenizer, model.config.vision_config, chat_template=TINY_CHAT_TEMPLATE)
    return model, processor


def build_prompt(processor, question: str) -> str:
    """The chat prompt for one image and ``question``, ending where the answer starts."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: {processor.image_token}\n{question} ASSISTANT:"


def count_tower_calls(model) -> list:
    """A list that gets one entry (the number of images) per forward of the vision tower."""
    calls: list = []
    model.model.vision_tower.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    return calls


def print_search(result, width: int = 60) -> None:
    for stage in result.stages:
        print(f"{stage.stage.open}")
        for i, c in enumerate(stage.candidates):
            mark = "*" if i == stage.chosen else " "
            text = c.text if len(c.text) <= width else c.text[:width - 3] + "..."
            print(f"  {mark} [{i}] score {c.score:8.4f}  {c.ended:6s} {c.num_sampled:3d} tok  {text!r}")
    print(f"answer: {result.text}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="a fusion Llava saved with save_pretrained (default: the tiny model)")
    parser.add_argument("--save-tiny", help="save the tiny model and processor here (then try --model-dir)")
    parser.add_argument("--image", default=str(IMAGES / "house.jpg"))
    parser.add_argument("--question", default="what is in the picture ?")
    parser.add_argument("--prompt", help="the whole prompt with the image token (default: from the chat template)")
    parser.add_argument("--n", type=int, default=4, help="candidates per stage")
    parser.add_argument("--judge", default="pairwise", choices=("pairwise", "loglik"))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.model_dir:
        model = LlavaForConditionalGeneration.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype))
        model = model.to(args.device).eval()
        processor = AutoProcessor.from_pretrained(args.model_dir)
    else:
        model, processor = tiny_llava_cot(args.seed)
        model = model.to(args.device, getattr(torch, args.dtype))
        if args.save_tiny:
            model.save_pretrained(args.save_tiny)
            processor.save_pretrained(args.save_tiny)
            print(f"saved the tiny model and processor to {args.save_tiny}")
    prompt = args.prompt or build_prompt(processor, args.question)
    calls = count_tower_calls(model)
    with Image.open(args.image) as im:
        image = im.convert("RGB")
    result = fhf.generate_stages(model, processor, image, prompt, n=args.n, judge=args.judge,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed)
    print(f"prompt: {prompt!r}; {args.n} candidates per stage, judge {args.judge}")
    print_search(result)
    print(f"vision tower forward calls: {len(calls)} ({sum(calls)} image(s) encoded)")


if __name__ == "__main__":
    main(sys.argv[1:])
