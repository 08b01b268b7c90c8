"""Data pipeline: prompt sources, chat template + loss mask, length policy, regeneration cache, batches,
draft vocabulary. Uses the real shared files and the real SmolLM2 tokenizer/target."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vsd_jax.config_base import base_config
from vsd_jax.data import (ChatTemplateError, DataSourceError, SequenceDataset, apply_length_limit, build_sequence,
                          encode_chat, encode_prompt, iterate_batches, load_prompts, prepare_data, read_file, read_hub,
                          read_source, regenerate)
from vsd_jax.data.chat import VICUNA_TEMPLATE
from vsd_jax.data.dataset import bucket_lengths
from vsd_jax.data.regenerate import read_cache
from vsd_jax.models.draft_vocab import build_draft_vocab, draft_to_target, from_counts, target_to_draft, token_counts


@pytest.fixture(scope="module")
def tokenizer(target):
  return target.tokenizer


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  return str(path)


# --- prompt sources ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,rel,count", [
    ("alpaca", "train/alpaca_5000.json", 5000),
    ("gsm8k", "train/gsm8k_train.jsonl", 7473),
    ("self_instruct", "train/self_instruct_seed_tasks.jsonl", 175),
    ("eagle", "eval/eagle/mt_bench/question.jsonl", 80),
])
def test_real_source_counts(data_root, fmt, rel, count):
  prompts = read_file(os.path.join(data_root, rel), fmt)
  assert len(prompts) == count
  assert all(p.messages[-1]["role"] == "user" and p.messages[-1]["content"].strip() for p in prompts)


def test_real_source_contents(data_root):
  raw = json.load(open(os.path.join(data_root, "train/alpaca_5000.json")))
  alpaca = read_file(os.path.join(data_root, "train/alpaca_5000.json"), "alpaca")
  with_input = next(i for i, r in enumerate(raw) if r["input"])
  without = next(i for i, r in enumerate(raw) if not r["input"])
  assert alpaca[with_input].messages == [{"role": "user", "content": raw[with_input]["instruction"] + "\n\n" +
                                          raw[with_input]["input"]}]
  assert alpaca[without].messages[0]["content"] == raw[without]["instruction"]
  seeds = [json.loads(line) for line in open(os.path.join(data_root, "train/self_instruct_seed_tasks.jsonl"))]
  si = read_file(os.path.join(data_root, "train/self_instruct_seed_tasks.jsonl"), "self_instruct")
  k = next(i for i, r in enumerate(seeds) if r["instances"][0]["input"])
  assert si[k].messages[0]["content"] == seeds[k]["instruction"] + "\n\n" + seeds[k]["instances"][0]["input"]
  mt = read_file(os.path.join(data_root, "eval/eagle/mt_bench/question.jsonl"), "eagle")
  assert mt[0].messages[0]["content"].startswith("Compose an engaging travel blog post about a recent trip to Hawaii")
  gsm = read_file(os.path.join(data_root, "train/gsm8k_train.jsonl"), "gsm8k", limit=5)
  assert len(gsm) == 5 and gsm[0].messages[0]["content"].startswith("Natalia sold clips")
  assert gsm[0].id.endswith("gsm8k_train.jsonl:1")


def test_load_prompts_from_config(data_root):
  c = base_config()
  c.data.root = data_root
  prompts, stats = load_prompts(c.data)
  assert len(prompts) == 5000 + 7473 + 175
  assert {k: s.prompts for k, s in stats.items()} == {"alpaca": 5000, "gsm8k": 7473, "self_instruct": 175}
  c.data.sources.alpaca.limit = 10
  c.data.sources.gsm8k.limit = 0  # disabled
  prompts, _ = load_prompts(c.data, system_prompt="Be brief.")
  assert len(prompts) == 10 + 175
  assert all(p.messages[0] == {"role": "system", "content": "Be brief."} for p in prompts)


def test_sharegpt_and_messages_formats(tmp_path):
  recs = [
      {"id": "a", "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                                    {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"}]},
      {"id": "b", "conversations": [{"from": "gpt", "value": "only an answer"}]},
      {"id": "c", "conversations": []},
      {"id": "d", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "Q"}]},
  ]
  for name, text in [("sg.json", json.dumps(recs)), ("sg.jsonl", "\n".join(json.dumps(r) for r in recs))]:
    prompts, stats = read_source("sg", {"type": "sharegpt", "path": write(tmp_path, name, text)}, "/")
    assert [p.messages for p in prompts] == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}], [{"role": "user", "content": "Q"}]]
    assert stats.no_prompt == 2  # counted, not silently lost
  uc = {"prompt": "x", "messages": [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A"}]}
  prompts = read_file(write(tmp_path, "uc.jsonl", json.dumps(uc) + "\n"), "messages")
  assert prompts[0].messages == [{"role": "user", "content": "U1"}]


def test_hub_source(monkeypatch):
  calls = []

  def fake_load(name, split, **kw):
    calls.append((name, split))
    return [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(5)]

  import datasets
  monkeypatch.setattr(datasets, "load_dataset", fake_load)
  spec = {"type": "hub", "name": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "format": "messages",
          "limit": 3}
  prompts, stats = read_source("ultrachat", spec, "/unused")
  assert calls == [("HuggingFaceH4/ultrachat_200k", "train_sft")]
  assert [p.messages[0]["content"] for p in prompts] == ["q0", "q1", "q2"] and stats.prompts == 3

  def offline(name, split, **kw):
    raise ConnectionError("Couldn't reach the Hub")

  with pytest.raises(DataSourceError, match=r"Aeala/ShareGPT_Vicuna_unfiltered.*ConnectionError.*local file"):
    read_hub("Aeala/ShareGPT_Vicuna_unfiltered", "train", "sharegpt", load_dataset=offline)
  with pytest.raises(DataSourceError, match="needs split, format"):
    read_source("x", {"type": "hub", "name": "a/b"}, "/")


def test_malformed_line_error_and_skip(tmp_path, caplog):
  good = json.dumps({"question": "What is 2+2?"})
  path = write(tmp_path, "q.jsonl", "\n".join([good, '{"question": "broken', good, '{"answer": "no question"}', ""]))
  with pytest.raises(DataSourceError, match=f"{path}:2: malformed JSON.*on_bad_line=skip"):
    read_file(path, "gsm8k", on_bad_line="error")
  c = base_config()
  c.data.root = str(tmp_path)
  c.data.sources = dict(q=dict(type="gsm8k", path="q.jsonl", limit=-1))
  c.data.on_bad_line = "skip"
  with caplog.at_level(logging.WARNING, logger="vsd_jax.data"):
    prompts, stats = load_prompts(c.data)
  assert len(prompts) == 2
  assert [b.split(": ")[0] for b in stats["q"].bad_lines] == [f"{path}:2", f"{path}:4"]
  assert "missing field 'question'" in stats["q"].bad_lines[1]
  assert f"{path}:2" in caplog.text and "2 bad lines skipped" in caplog.text
  c.data.on_bad_line = "error"
  with pytest.raises(DataSourceError, match=f"{path}:2"):
    load_prompts(c.data)


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(DataSourceError, match=r"prompt file not found: .*nope\.jsonl.*data\.root"):
    read_source("x", {"type": "gsm8k", "path": "nope.jsonl"}, str(tmp_path))
  for name, text in [("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("empty.json", "[]")]:
    with pytest.raises(DataSourceError, match=f"{name}' has no prompts"):
      read_file(write(tmp_path, name, text), "alpaca")
  with pytest.raises(DataSourceError, match=r"malformed JSON array"):
    read_file(write(tmp_path, "bad.json", '[{"instruction": "a"}, {"instr'), "alpaca")
  with pytest.raises(DataSourceError, match="unknown type 'csv'"):
    read_source("x", {"type": "csv", "path": "a.csv"}, "/")


# --- chat template and loss mask --------------------------------------------------------------------

@pytest.mark.slow
def test_loss_mask_covers_exactly_the_response(tokenizer):
  messages = [{"role": "user", "content": "Name a primary colour."}]
  response = "Blue is a primary colour.\nSo is red."
  ids, mask = encode_chat(tokenizer, messages, response)
  prompt = encode_prompt(tokenizer, messages)
  assert ids.dtype == np.int32 and mask.shape == ids.shape
  assert list(ids[:len(prompt)]) == prompt and not mask[:len(prompt)].any()
  assert tokenizer.decode(ids[mask == 1]) == response + "<|im_end|>"
  # The mask is one contiguous run ending on <|im_end|>; template tokens after it are unmasked.
  on = np.flatnonzero(mask)
  assert np.all(np.diff(on) == 1) and ids[on[-1]] == tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert tokenizer.decode(ids[on[-1] + 1:]) == "\n"
  assert tokenizer.decode(ids[:len(prompt)]).endswith("<|im_start|>assistant\n")

  response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  ids2, mask2 = build_sequence(prompt, response_ids)
  assert tokenizer.decode(ids2[mask2 == 1]) == response + "<|im_end|>"
  assert mask2.sum() == len(response_ids) and not mask2[:len(prompt)].any()


@pytest.mark.slow
def test_named_template_and_missing_template(tokenizer):
  text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True, chat_template=VICUNA_TEMPLATE)
  assert text.endswith("helpful, detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:")
  ids, mask = encode_chat(tokenizer, [{"role": "user", "content": "Hi"}], "Hello there.", chat_template="vicuna")
  assert tokenizer.decode(ids[mask == 1]).strip() == "Hello there." + tokenizer.eos_token

  class NoTemplate:
    chat_template = None
    name_or_path = "lmsys/vicuna-7b-v1.3"

  with pytest.raises(ChatTemplateError, match="has no chat template.*data.chat_template"):
    encode_prompt(NoTemplate(), [{"role": "user", "content": "x"}])


def test_length_policy_counts(caplog):
  seqs = [build_sequence([1] * 4, [7] * 4),   # 8 tokens: fits
          build_sequence([1] * 6, [7] * 6),   # 12: over
          build_sequence([1] * 10, [7] * 2)]  # 12: over, and no response token left within 10
  with caplog.at_level(logging.INFO, logger="vsd_jax.data"):
    kept, stats = apply_length_limit(seqs, 10, "truncate")
  assert (stats.kept, stats.truncated, stats.dropped, stats.no_response) == (2, 2, 0, 1)
  assert [len(x) for x, _ in kept] == [8, 10] and kept[1][1].sum() == 4
  assert "2 truncated" in caplog.text and "1 dropped with no response token" in caplog.text
  kept, stats = apply_length_limit(seqs, 10, "drop")
  assert (stats.kept, stats.truncated, stats.dropped, stats.no_response) == (1, 0, 2, 0)
  with pytest.raises(ValueError, match="length_policy 'cut'"):
    apply_length_limit(seqs, 10, "cut")


# --- batches ----------------------------------------------------------------------------------------

def make_dataset(n=10, seed=0):
  rng = np.random.default_rng(seed)
  pairs = [build_sequence(rng.integers(3, 100, rng.integers(2, 20)), rng.integers(3, 100, rng.integers(1, 90)))
           for _ in range(n)]
  return SequenceDataset.from_pairs(pairs)


def test_batches_padded_bucketed_deterministic(tmp_path):
  ds = make_dataset(10)
  assert bucket_lengths(300, 64) == (64, 128, 256, 300)
  batches = list(iterate_batches(ds, 4, seed=3, buckets=(64, 128)))
  assert len(batches) == 2  # drop_last: 10 // 4
  seen = []
  for b in batches:
    assert set(b) == {"input_ids", "loss_mask", "attention_mask"}
    assert all(v.dtype == np.int32 and v.shape[0] == 4 and v.shape[1] in (64, 128) for v in b.values())
    assert b["input_ids"].shape[1] == (64 if b["attention_mask"].sum(1).max() <= 64 else 128)
    for row in range(4):
      n = int(b["attention_mask"][row].sum())
      assert b["attention_mask"][row, :n].all() and not b["loss_mask"][row, n:].any()
      match = [i for i in range(len(ds)) if len(ds.input_ids[i]) == n and
               np.array_equal(ds.input_ids[i], b["input_ids"][row, :n])]
      assert match and np.array_equal(ds.loss_mask[match[0]], b["loss_mask"][row, :n])
      seen.append(match[0])
  assert len(set(seen)) == 8
  again = list(iterate_batches(ds, 4, seed=3, buckets=(64, 128)))
  assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
  other = list(iterate_batches(ds, 4, seed=3, epoch=1, buckets=(64, 128)))
  assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))
  full = list(iterate_batches(ds, 4, seed=0, drop_last=False, sort_window=8))
  assert len(full) == 3 and full[-1]["attention_mask"].sum() == sum(ds.lengths) - sum(
      b["attention_mask"].sum() for b in full[:-1])
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    list(iterate_batches(ds, 2, seed=0, buckets=(8,)))
  ds.save(str(tmp_path / "d.npz"))
  back = SequenceDataset.load(str(tmp_path / "d.npz"))
  assert back.fingerprint() == ds.fingerprint()


# --- draft vocabulary -------------------------------------------------------------------------------

def test_draft_vocab_frequency_and_round_trip(tmp_path):
  v = 50
  # Response tokens with known counts: id 40 x9, 3 x7, 17 x5, 8 x3, 25 x2, 4 x1; prompt tokens (id 1) unmasked.
  resp = [40] * 9 + [3] * 7 + [17] * 5 + [8] * 3 + [25] * 2 + [4]
  ds = SequenceDataset.from_pairs([build_sequence([1] * 30, resp[:13]), build_sequence([1] * 5, resp[13:])])
  counts = token_counts(ds, v)
  assert counts[1] == 0 and counts[40] == 9
  dv = build_draft_vocab(ds, v, 4, cache_dir=str(tmp_path))
  assert list(dv.target_ids) == [3, 8, 17, 40]  # the 4 most frequent, sorted by target id
  assert list(dv.d2t) == [3 - 0, 8 - 1, 17 - 2, 40 - 3] and dv.d2t.dtype == np.int32
  assert dv.t2d.dtype == bool and dv.t2d.shape == (v,) and set(np.flatnonzero(dv.t2d)) == {3, 8, 17, 40}
  assert list(dv.counts) == [7, 3, 5, 9]
  assert dv.coverage == pytest.approx(24 / 27)
  draft = np.arange(4)
  tgt = draft_to_target(draft, dv.d2t)
  assert list(tgt) == [3, 8, 17, 40]
  assert list(target_to_draft(tgt, dv.t2d)) == [0, 1, 2, 3]
  assert list(target_to_draft(np.array([25, 1, 40]), dv.t2d)) == [-1, -1, 3]
  # Jitted jax version agrees.
  f = jax.jit(lambda d, d2t, t2d: target_to_draft(draft_to_target(d, d2t), t2d))
  assert list(np.asarray(f(jnp.arange(4), jnp.asarray(dv.d2t), jnp.asarray(dv.t2d)))) == [0, 1, 2, 3]
  # Cached: a second build loads the file.
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].startswith("draft_vocab-")
  again = build_draft_vocab(ds, v, 4, cache_dir=str(tmp_path))
  assert np.array_equal(again.d2t, dv.d2t) and again.coverage == dv.coverage
  # Ties go to the lower id; fewer distinct tokens than N fill with unseen low ids.
  tie = from_counts(np.array([0, 2, 2, 2, 0, 0]), 2)
  assert list(tie.target_ids) == [1, 2]
  fill = from_counts(np.array([0, 0, 5, 0, 1, 0]), 4)
  assert list(fill.target_ids) == [0, 1, 2, 4] and fill.coverage == 1.0
  with pytest.raises(ValueError, match="draft vocab size 7"):
    from_counts(np.ones(6), 7)


# --- regeneration -----------------------------------------------------------------------------------

class FakeGenerate:
  """Stands in for the target: response of row b = [first prompt token + k for k in 1..3] + [EOS 2]."""

  def __init__(self):
    self.calls = 0

  def __call__(self, ids, lens):
    self.calls += 1
    out = np.stack([ids[:, 0] + 1, ids[:, 0] + 2, ids[:, 0] + 3, np.full(len(ids), 2)], 1).astype(np.int32)
    return out, np.full(len(ids), 4, np.int32), np.full(len(ids), 3, np.int32)


def test_regeneration_cache_reuses_results(tmp_path):
  path = str(tmp_path / "cache" / "responses.jsonl")
  prompts = [[10, 5, 6], [20], [30, 1], [40, 4, 4, 4]]
  fake = FakeGenerate()
  first = regenerate(prompts, fake, path, batch_size=2, pad_id=0, progress=False)
  assert first == [[11, 12, 13, 2], [21, 22, 23, 2], [31, 32, 33, 2], [41, 42, 43, 2]]
  assert fake.calls > 0 and len(read_cache(path)) == 4
  again = FakeGenerate()
  assert regenerate(prompts, again, path, batch_size=2, pad_id=0, progress=False) == first
  assert again.calls == 0
  # Only new prompts are generated; a torn last line (interrupted write) is regenerated, not fatal.
  with open(path, "a") as f:
    f.write('{"key": "abc", "respo')
  more = FakeGenerate()
  out = regenerate(prompts + [[50]], more, path, batch_size=2, pad_id=0, progress=False)
  assert out[-1] == [51, 52, 53, 2] and out[:4] == first and more.calls > 0


@pytest.mark.parametrize("tail", ['{"key": "abc", "respo', '{"key": "abc", "response": [7, 2]}'])
def test_regeneration_cache_repairs_a_torn_last_line(tmp_path, caplog, tail):
  """A run killed mid-write leaves a last line without its newline. Before appending, a torn record is cut off
  (warned once; its prompt regenerated) and a whole one only missing its newline is kept: no record is lost by
  the next append joining it, and later reads are clean."""
  path = str(tmp_path / "responses.jsonl")
  prompts = [[10, 5, 6], [20]]
  first = regenerate(prompts, FakeGenerate(), path, batch_size=2, pad_id=0, progress=False)
  with open(path, "a") as f:
    f.write(tail)
  with caplog.at_level("WARNING"):
    out = regenerate(prompts + [[50]], FakeGenerate(), path, batch_size=2, pad_id=0, progress=False)
  assert out == first + [[51, 52, 53, 2]]
  torn = not tail.endswith("}")
  assert len([r for r in caplog.records if "cut off" in r.getMessage() and path in r.getMessage()]) == int(torn)
  caplog.clear()
  with caplog.at_level("WARNING"):
    cached = read_cache(path)
  assert not caplog.records  # the repaired file reads without a warning, now and later
  assert len(cached) == 3 + (not torn) and (torn or cached["abc"] == [7, 2])
  with open(path) as f:
    assert f.read().endswith("\n")


@pytest.mark.slow
def test_prepare_data_end_to_end(target, data_root, tmp_path):
  """3 real prompts, 6 new tokens each, generated by the real target; then a rerun from the cache."""
  c = base_config()
  c.workdir = str(tmp_path)
  c.data.root = data_root
  c.data.sources = dict(mt=dict(type="eagle", path="eval/eagle/mt_bench/question.jsonl", limit=3))
  c.data.regen.max_new_tokens = 6
  c.data.regen.batch_size = 2
  c.data.draft_vocab_size = 16
  data = prepare_data(c, target, progress=False)
  ds, tok = data.dataset, target.tokenizer
  assert len(ds) == 3 and data.stats["unfinished"] == 3 and data.stats["loss_tokens"] == 18
  mt = read_file(os.path.join(data_root, "eval/eagle/mt_bench/question.jsonl"), "eagle", limit=3)
  for p, ids, mask in zip(mt, ds.input_ids, ds.loss_mask):
    prompt = encode_prompt(tok, p.messages)
    assert list(ids[:len(prompt)]) == prompt and mask.sum() == 6 and not mask[:len(prompt)].any()
  # Greedy (T=0) responses are the target's own argmax continuation (teacher-forced check).
  b = next(iterate_batches(ds, 3, seed=0))
  logits = target.model.apply({"params": target.params}, jnp.asarray(b["input_ids"])).logits
  pred = np.asarray(jnp.argmax(logits, -1))
  m = b["loss_mask"][:, 1:] == 1
  assert np.array_equal(pred[:, :-1][m], b["input_ids"][:, 1:][m])
  assert data.draft_vocab.size == 16 and data.draft_vocab.t2d.shape == (target.config.vocab_size,)
  assert os.path.dirname(data.response_cache) == os.path.join(str(tmp_path), "data_cache")

  def must_not_generate(ids, lens):
    raise AssertionError("the cached responses should have been reused")

  again = prepare_data(c, target, call=must_not_generate, progress=False, draft_vocab=False)
  assert again.dataset.fingerprint() == ds.fingerprint()
  assert again.draft_vocab is None and again.stats["draft_vocab_coverage"] is None  # held-out data: no vocab
  c.data.regen.temperature = 1.0  # other settings -> another cache file
  fake = FakeGenerate()
  prepare_data(c, target, call=fake, progress=False)
  assert fake.calls > 0


def test_response_cache_key_does_not_depend_on_where_the_model_is_installed(tmp_path):
  """A cache made on another machine (the shipped GPU base's data_cache) must be found: the key names the
  weights by file name and size, not by absolute path."""
  import types

  from vsd_jax.weights.identity import model_id
  cfg = types.SimpleNamespace(dtype="float32", param_dtype="float32")
  for d in ("a/site-packages/pkg", "b/other"):
    os.makedirs(tmp_path / d)
    (tmp_path / d / "m.gguf").write_bytes(b"x" * 100)
  ids = {model_id(types.SimpleNamespace(source=str(tmp_path / d / "m.gguf"), config=cfg))
         for d in ("a/site-packages/pkg", "b/other")}
  assert len(ids) == 1
  (tmp_path / "b/other/m.gguf").write_bytes(b"x" * 101)
  assert model_id(types.SimpleNamespace(source=str(tmp_path / "b/other/m.gguf"), config=cfg)) not in ids
