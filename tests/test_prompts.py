"""One prompt encoding for a target and a config (vsd_jax.data.chat.prompt_encoder): the chat template of
config.data.chat_template, the end-of-turn ids and the pad id, shared by the data pipeline, generate and
evaluate. Uses a tiny random LLaMA HF directory built here whose tokenizer, like lmsys/vicuna-*-v1.3's,
ships no chat template."""

import json
import os
import subprocess
import sys

import pytest

from vsd_jax.data.chat import VICUNA_TEMPLATE, ChatTemplateError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]
EOS_ID = 2  # "</s>", as in the LLaMA-1/Vicuna vocabulary


def _vocab():
  """Special tokens at LLaMA's ids (unk 0, <s> 1, </s> 2), then every word the test renders."""
  words = set()
  system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions.")
  for text in [system, "USER: ASSISTANT:"] + PROMPTS:
    words.update(text.replace(".", " . ").replace(",", " , ").replace("?", " ? ").replace("'", " ' ")
                 .replace(":", " : ").split())
  return ["<unk>", "<s>", "</s>"] + sorted(words)


@pytest.fixture(scope="module")
def tiny_vicuna_dir(tmp_path_factory):
  """An HF checkpoint directory: a 4-layer LLaMA whose every next token is </s> (all layers' output
  projections zero, equal embedding rows, lm_head selecting </s>), and a word-level tokenizer with
  LLaMA's special tokens and NO chat template."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, models, pre_tokenizers

  path = str(tmp_path_factory.mktemp("tiny_vicuna"))
  vocab = _vocab()
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>")
  fast.save_pretrained(path)
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=EOS_ID, tie_word_embeddings=False)
  assert len(vocab) <= cfg.vocab_size
  model = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():
    for layer in model.model.layers:
      layer.self_attn.o_proj.weight.zero_()
      layer.mlp.down_proj.weight.zero_()
    model.model.embed_tokens.weight.fill_(1.0)
    model.lm_head.weight.zero_()
    model.lm_head.weight[EOS_ID] = 1.0
  model.save_pretrained(path, safe_serialization=True)
  with open(os.path.join(path, "tokenizer_config.json")) as f:
    assert "chat_template" not in json.load(f)
  return path


def _vicuna_config(model_dir, workdir):
  from vsd_jax.cli_config import load_config_file
  c = load_config_file(os.path.join(REPO, "configs", "vicuna.py"))
  c.model.name = model_dir
  c.model.dtype = c.model.param_dtype = "float32"
  c.workdir = str(workdir)
  return c


@pytest.fixture(scope="module")
def tiny_target(tiny_vicuna_dir):
  from vsd_jax.weights import load_target
  return load_target(tiny_vicuna_dir)


def test_tokenizer_has_no_template(tiny_target):
  """The defect's precondition: without config.data.chat_template this tokenizer cannot encode a prompt."""
  from vsd_jax.data.chat import prompt_encoder
  from vsd_jax.config_base import base_config
  with pytest.raises(ChatTemplateError, match="has no chat template.*--config.data.chat_template"):
    prompt_encoder(tiny_target, base_config())


def test_encoder_applies_the_configured_template_like_the_pipeline(tiny_target, tmp_path, monkeypatch):
  from vsd_jax.data import pipeline
  from vsd_jax.data.chat import end_of_turn_ids, prompt_encoder

  tok = tiny_target.tokenizer
  cfg = _vicuna_config(tiny_target.source, tmp_path)
  enc = prompt_encoder(tiny_target, cfg)
  ids = enc.encode_user(PROMPTS[0])
  text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], chat_template=VICUNA_TEMPLATE,
                                 add_generation_prompt=True, tokenize=False)
  assert text.startswith("<s>A chat between") and text.endswith(f" USER: {PROMPTS[0]} ASSISTANT:")
  assert ids == tok(text, add_special_tokens=False)["input_ids"]
  assert ids[0] == 1 and tok.unk_token_id not in ids
  assert enc.eos_ids == end_of_turn_ids(tok, tiny_target.config.eos_token_ids) == (EOS_ID,)
  assert enc.pad_id == 0  # the tokenizer has no pad token
  assert enc.encode([{"role": "system", "content": "A"}, {"role": "user", "content": "B"}]) == \
      tok(tok.apply_chat_template([{"role": "system", "content": "A"}, {"role": "user", "content": "B"}],
                                  chat_template=VICUNA_TEMPLATE, add_generation_prompt=True, tokenize=False),
          add_special_tokens=False)["input_ids"]

  # The data pipeline encodes the same prompts to the same ids and generates with the same end/pad ids.
  qfile = tmp_path / "question.jsonl"
  qfile.write_text("".join(json.dumps({"question_id": i, "turns": [p]}) + "\n" for i, p in enumerate(PROMPTS)))
  cfg.data.root = str(tmp_path)
  cfg.data.sources = dict(q=dict(type="eagle", path="question.jsonl", limit=-1))
  cfg.data.regen.max_new_tokens = 3
  cfg.data.max_length = 128
  seen = {}
  real_call = pipeline.make_target_call

  def recording_target_call(target, settings, max_pos, eos, pad_id, pixels=None):
    seen.update(eos=tuple(eos), pad_id=pad_id)
    return real_call(target, settings, max_pos, eos, pad_id, pixels)

  monkeypatch.setattr(pipeline, "make_target_call", recording_target_call)
  data = pipeline.prepare_data(cfg, tiny_target, progress=False, draft_vocab=False)
  assert seen == dict(eos=enc.eos_ids, pad_id=enc.pad_id)
  assert len(data.dataset) == len(PROMPTS) and data.stats["unfinished"] == 0
  for p, seq, mask in zip(PROMPTS, data.dataset.input_ids, data.dataset.loss_mask):
    want = enc.encode_user(p)  # the response is the tiny model's </s>, which ends the turn
    assert list(seq[:len(want)]) == want and list(seq[len(want):]) == [EOS_ID] and mask.sum() == 1


@pytest.mark.slow  # the generate CLI end to end: ~10 s
def test_generate_cli_with_the_vicuna_config_and_a_template_less_tokenizer(tiny_vicuna_dir, tmp_path):
  """`python -m vsd_jax.generate --config configs/vicuna.py` on a tokenizer without a template: the config's
  "vicuna" template encodes the prompts and decoding stops at </s> (the tiny model's only output)."""
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  out = tmp_path / "out.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "vsd_jax.generate", "--config", "configs/vicuna.py",
                      f"--config.model.name={tiny_vicuna_dir}", "--config.model.dtype=float32",
                      "--config.model.param_dtype=float32", "--config.generate.batch_size=2",
                      "--prompts", str(prompts), "--output", str(out), "--max_new_tokens", "2"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-4000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  from vsd_jax.data.chat import prompt_encoder
  from vsd_jax.weights import load_target
  target = load_target(tiny_vicuna_dir)
  enc = prompt_encoder(target, _vicuna_config(tiny_vicuna_dir, tmp_path))
  assert [row["question_id"] for row in rows] == [0, 1]
  for row, p in zip(rows, PROMPTS):
    assert row["prompt_ids"] == enc.encode_user(p)
    assert row["output_ids"] == [EOS_ID] and row["new_tokens"] == 1  # stopped at </s>, not at max_new_tokens
