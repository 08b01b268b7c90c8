"""A tiny random LLaVA made locally with transformers (no download), its processor, and offline sample images.

The checkpoint: a 3-layer CLIP tower at 42 px with 14 px patches (9 image tokens per image; feature layer -2, so
the last layer is skipped), a 4-layer LLaMA with a 64-token vocabulary, saved in the llava-hf layout by
save_pretrained together with a LlavaProcessor (a word-level tokenizer with an <image> token, built here, and
transformers' CLIP image processor, PIL backend). torch is imported only by make_hf_llava.
"""

from vsd_jax.weights.tiny_llava import IMAGE_SIZE, PATCH  # noqa: F401  (the package's tiny sizes)
WORDS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER", "ASSISTANT", ":", "what", "is", "in", "the", "this",
         "picture", "?", "describe", "and", "compare", "two", "images", "first", "second", "a", "cat", "person",
         "logo", ".", ","]
SAMPLES = ["pkg:matplotlib/mpl-data/sample_data/grace_hopper.jpg",            # RGB photo
           "pkg:matplotlib/mpl-data/sample_data/Minduka_Present_Blue_Pack.png",  # RGBA
           "pkg:matplotlib/mpl-data/sample_data/logo2.png"]                   # RGBA, wide


def make_processor():
  """LlavaProcessor over WORDS (the package's tiny-checkpoint processor, `weights.tiny_llava.make_processor`)."""
  from vsd_jax.weights.tiny_llava import make_processor as package_processor
  return package_processor(WORDS)


def make_hf_llava(seed=0, tie=False, **llava_kw):
  """A random tiny transformers LlavaForConditionalGeneration, float32, weights scaled up so that the vision
  path moves the logits by O(1) (at HF's 0.02 init everything is near zero and any bug would pass)."""
  import torch
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
  torch.manual_seed(seed)
  vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=16)
  text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie)
  cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=WORDS.index("<image>"),
                    tie_word_embeddings=tie, **llava_kw)
  model = LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model


def save_llava(model, path):
  model.save_pretrained(path)
  make_processor().save_pretrained(path)
  return str(path)
