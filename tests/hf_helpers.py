"""Shared pieces of the transformers tests (test_hf*.py): a word-level tokenizer built offline,
a tiny Llama text config, the example images, and a hook that reads what a Llava-family
model hands its language model."""
import contextlib
from pathlib import Path

from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
WORDS = "<unk> <pad> <s> </s> <image> USER ASSISTANT : what is in the picture ? a house".split()
IMAGE_TOKEN_ID = WORDS.index("<image>")
PROMPT = "USER : <image> what is in the picture ? ASSISTANT :"
NO_PROJECTOR = {"projector.type": "none", "projector.out_dim": None}


def tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})


def text_config():
    return LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=1, bos_token_id=2, eos_token_id=3)


def image(name):
    with Image.open(EXAMPLES / name) as im:
        return im.convert("RGB")


@contextlib.contextmanager
def language_model_inputs(model):
    """Collect the ``inputs_embeds`` a Llava-family model hands its language model, one per call."""
    seen = []

    def grab(module, args, kwargs):
        seen.append(kwargs["inputs_embeds"].detach().clone())

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def assert_save_and_reload_round_trip(model, processor, model_class, picture, tmp_path):
    """Save ``model`` and ``processor`` to ``tmp_path``, load both back (``model_class`` and
    ``AutoProcessor``): the reloaded processor gives the same ``input_ids`` and ``pixel_values``
    for ``picture`` and the reloaded model the same logits, bit for bit. Returns the loaded model."""
    import torch
    from transformers import AutoProcessor

    inputs = processor(images=picture, text=PROMPT, return_tensors="pt")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    again = AutoProcessor.from_pretrained(tmp_path)(images=picture, text=PROMPT, return_tensors="pt")
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert torch.equal(again["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    return loaded
