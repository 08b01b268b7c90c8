"""Responses from elsewhere: "conversations" sources (OpenAI messages / ShareGPT JSONL whose assistant turns the
target already wrote) train without the target generating; the request file for an OpenAI-compatible batch
endpoint, and its results back as conversations.

The fast tests use a word-level tokenizer with a ChatML template and a target without a model (nothing here may
generate); the end-to-end run trains configs/tiny.py's real target on a handmade file (slow)."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from vsd_jax.config_base import base_config
from vsd_jax.data import DataSourceError, load_prompts, read_source
from vsd_jax.data import pipeline
from vsd_jax.data.chat import encode_conversation
from vsd_jax.data.requests import conversations_from_results, request_lines, write_requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ["<unk>", "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"] + [
    f"w{i}" for i in range(40)]
ID = {w: i for i, w in enumerate(WORDS)}


@pytest.fixture(scope="module")
def chatml_target():
  """A target with a word-level ChatML tokenizer and no model: anything that tries to generate fails."""
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel(dict(ID), unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                              eos_token="<|endoftext|>",
                                              additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  fast.chat_template = CHATML
  cfg = types.SimpleNamespace(max_position_embeddings=512, eos_token_ids=(), vocab_size=len(WORDS), dtype="float32",
                              param_dtype="float32")
  return types.SimpleNamespace(tokenizer=fast, config=cfg, source="chatml-words", model=None, params=None)


def msg(role, content):
  return {"role": role, "content": content}


def write_jsonl(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
  return str(path)


TWO_TURNS = [msg("system", "w1"), msg("user", "w2 w3"), msg("assistant", "w4 w5"), msg("user", "w6"),
             msg("assistant", "w7")]
SHAREGPT = {"conversations": [{"from": "human", "value": "w8"}, {"from": "gpt", "value": "w9 w10 w11"}]}


def test_every_assistant_turn_and_nothing_else_is_in_the_loss_mask(chatml_target):
  ids, mask = encode_conversation(chatml_target.tokenizer, TWO_TURNS)
  rendered = ("<|im_start|> system w1 <|im_end|> <|im_start|> user w2 w3 <|im_end|> <|im_start|> assistant w4 w5 "
              "<|im_end|> <|im_start|> user w6 <|im_end|> <|im_start|> assistant w7 <|im_end|>").split()
  assert [WORDS[i] for i in ids] == rendered
  # by hand: the two assistant turns with the <|im_end|> that closes each; no system/user/header token
  want = [0] * 11 + [1, 1, 1] + [0] * 6 + [1, 1]
  assert mask.tolist() == want


@pytest.mark.parametrize("thinking", [False, True])
def test_loss_mask_with_qwen3s_thinking_switch(thinking):
  """Qwen3 without thinking puts an empty think block in the generation prompt, not in answered turns: each turn's
  mask still starts at its first content token (where the two renderings part) and ends on its <|im_end|>."""
  pytest.importorskip("transformers")
  from vsd_jax.weights.tiny_qwen3 import make_tokenizer
  tok = make_tokenizer()
  conv = [msg("system", "Sys"), msg("user", "Q one"), msg("assistant", "A one."), msg("user", "Q two"),
          msg("assistant", "A two.")]
  ids, mask = encode_conversation(tok, conv, template_kwargs=(("enable_thinking", thinking),))
  assert tok.decode(ids) == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)
  runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
  assert [tok.decode(ids[r]) for r in runs] == ["A one.<|im_end|>", "A two.<|im_end|>"]


def test_a_template_that_renders_the_context_otherwise_is_refused(chatml_target):
  from vsd_jax.data.chat import ChatTemplateError
  moody = "{% if messages[-1]['role'] == 'assistant' %}w39 {% endif %}" + CHATML  # another opening once answered
  with pytest.raises(ChatTemplateError, match="renders the prompt differently"):
    encode_conversation(chatml_target.tokenizer, TWO_TURNS, chat_template=moody)


def test_conversation_lines_validated_and_bad_ones_reported_by_line(tmp_path):
  lines = [
      {"messages": TWO_TURNS},                                                   # 1 good, OpenAI
      SHAREGPT,                                                                  # 2 good, ShareGPT
      '{"messages": [{"role": "user", "content": "w1"}',                          # 3 malformed JSON
      {"messages": [msg("user", "w1"), msg("tool", "w2")]},                      # 4 unknown role
      {"messages": [msg("user", "w1"), msg("assistant", "  ")]},                 # 5 empty turn
      {"messages": [msg("system", "w1"), msg("user", "w2")]},                    # 6 no assistant turn
      {"conversations": [{"from": "gpt", "value": "w1"}]},                       # 7 starts with the assistant
      {"messages": [msg("user", "w1"), msg("user", "w2"), msg("assistant", "w3")]},  # 8 two user turns in a row
      {"prompt": "w1"},                                                          # 9 neither format
  ]
  path = write_jsonl(tmp_path / "conv.jsonl", lines)
  prompts, stats = read_source("byo", {"type": "conversations", "path": path}, "/", on_bad_line="skip")
  assert [p.messages for p in prompts] == [TWO_TURNS, [msg("user", "w8"), msg("assistant", "w9 w10 w11")]]
  assert all(p.answered for p in prompts) and stats.prompts == 2
  where = [b.split(": ")[0] for b in stats.bad_lines]
  assert where == [f"{path}:{n}" for n in (3, 4, 5, 6, 7, 8, 9)]
  reasons = [b.split(": ", 1)[1] for b in stats.bad_lines]
  for reason, expected in zip(reasons, ["malformed JSON", "'role' must be one of", "must be a non-empty string",
                                        "must end with an assistant turn", "role 'assistant' where 'system' or 'user'",
                                        "role 'user' where 'assistant'", "expected a JSON object with"]):
    assert expected in reason
  with pytest.raises(DataSourceError, match=f"{path}:3: malformed JSON.*on_bad_line=skip"):
    read_source("byo", {"type": "conversations", "path": path}, "/", on_bad_line="error")


def data_config(tmp_path, max_length=64, policy="drop"):
  c = base_config()
  c.workdir = str(tmp_path / "run")
  c.data.root = str(tmp_path)
  c.data.max_length = max_length
  c.data.length_policy = policy
  c.data.draft_vocab_size = 8
  c.data.regen.max_new_tokens = 4
  c.data.regen.batch_size = 2
  return c


LONG = {"messages": [msg("user", " ".join(["w12"] * 40)), msg("assistant", "w13 w14")]}  # 49 tokens rendered


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_conversations_train_without_the_target_generating(chatml_target, tmp_path, monkeypatch, policy):
  """A conversations source beside a prompt source: the target generates for the prompts only (their rows are
  counted), each conversation is its encode_conversation sequence as it is, a bad line is reported by line
  number and an over-long conversation goes through the data.length_policy like every sequence."""
  write_jsonl(tmp_path / "conv.jsonl", [{"messages": TWO_TURNS}, "not json", SHAREGPT, LONG])
  write_jsonl(tmp_path / "q.jsonl", [{"question": "w20 w21"}, {"question": "w22"}])
  c = data_config(tmp_path, max_length=40, policy=policy)
  c.data.on_bad_line = "skip"
  c.data.sources = dict(byo=dict(type="conversations", path="conv.jsonl"), q=dict(type="gsm8k", path="q.jsonl"))
  generated = []

  def fake_target(ids, lens):  # response: w30 <|im_end|>
    generated.extend(ids[i, :n].tolist() for i, n in enumerate(lens) if n)
    out = np.tile(np.array([[ID["w30"], ID["<|im_end|>"]]], np.int32), (len(ids), 1))
    return out, np.full(len(ids), 2, np.int32), np.ones(len(ids), np.int32)

  data = pipeline.prepare_data(c, chatml_target, call=fake_target, progress=False)
  enc = pipeline.prompt_encoder(chatml_target, c)
  q_prompts = [enc.encode([msg("user", t)]) for t in ("w20 w21", "w22")]
  assert set(map(tuple, generated)) == set(map(tuple, q_prompts))  # the conversations never reached the target
  st = data.stats
  assert st["answered"] == 3 and st["prompts"] == 5
  assert st["sources"]["byo"]["bad_lines"][0].startswith(f"{tmp_path / 'conv.jsonl'}:2: malformed JSON")
  seqs = {tuple(x.tolist()): m.tolist() for x, m in zip(data.dataset.input_ids, data.dataset.loss_mask)}
  for conv in (TWO_TURNS, [msg("user", "w8"), msg("assistant", "w9 w10 w11")]):
    ids, mask = encode_conversation(chatml_target.tokenizer, conv)
    assert seqs[tuple(ids.tolist())] == mask.tolist()
  long_ids, long_mask = encode_conversation(chatml_target.tokenizer, LONG["messages"])
  assert len(long_ids) > 40 and not long_mask[:40].any()  # over max_length; no response token within it
  # "drop": dropped as too long; "truncate": cut to 40 tokens, then dropped with no response token left
  assert (st["length"]["dropped"], st["length"]["truncated"], st["length"]["no_response"]) == (
      (1, 0, 0) if policy == "drop" else (0, 1, 1))
  assert len(data.dataset) == 4 and tuple(long_ids[:40].tolist()) not in seqs


def test_only_conversations_generate_nothing(chatml_target, tmp_path, monkeypatch):
  """Every source answered: the target's generation call is never made (counted), even with data.regen leaving no
  room for new tokens."""
  calls = []
  monkeypatch.setattr(pipeline, "make_target_call", lambda *a, **k: lambda *b: calls.append(b))
  write_jsonl(tmp_path / "conv.jsonl", [{"messages": TWO_TURNS}, SHAREGPT])
  c = data_config(tmp_path)
  c.data.regen.max_new_tokens = 4096  # more than the target's positions: only prompts to regenerate need room
  c.data.sources = dict(byo=dict(type="conversations", path="conv.jsonl"))
  data = pipeline.prepare_data(c, chatml_target, progress=False)
  assert calls == [] and len(data.dataset) == 2 and data.stats["answered"] == 2
  assert data.dataset.num_loss_tokens() == 3 + 2 + 4  # w4 w5 <im_end>, w7 <im_end>, w9 w10 w11 <im_end>


def test_request_file_round_trip(data_root, tmp_path):
  """The request file holds the configured prompts (system prompt applied, answered conversations left out) in
  order; results joined back by custom_id read as a conversations source: request messages + the response."""
  c = base_config()
  c.data.root = data_root
  c.data.system_prompt = "Be brief."
  c.data.sources.alpaca.limit = 3
  c.data.sources.gsm8k.limit = 2
  c.data.sources.self_instruct.limit = 0
  c.data.sources.byo = dict(type="conversations", path=write_jsonl(tmp_path / "conv.jsonl", [SHAREGPT]))
  c.data.regen.max_new_tokens = 77
  c.data.regen.temperature = 0.5
  path = str(tmp_path / "requests.jsonl")
  assert write_requests(c, path, model="served/name") == 5
  reqs = [json.loads(line) for line in open(path, encoding="utf-8")]
  configured, _ = load_prompts(c.data, c.data.system_prompt)
  assert [r["body"]["messages"] for r in reqs] == [p.messages for p in configured if not p.answered]
  assert all(r["body"]["messages"][0] == msg("system", "Be brief.") for r in reqs)
  assert len({r["custom_id"] for r in reqs}) == 5
  assert {(r["method"], r["url"], r["body"]["model"], r["body"]["max_tokens"], r["body"]["temperature"],
           json.dumps(r["body"]["chat_template_kwargs"])) for r in reqs} == {
               ("POST", "/v1/chat/completions", "served/name", 77, 0.5, '{"enable_thinking": false}')}

  def result(r, text, finish="stop", status=200):
    return {"id": "x", "custom_id": r["custom_id"], "error": None, "response": {"status_code": status, "body": {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}}}

  flat = result(reqs[4], "answer four")
  flat["response"] = flat["response"]["body"]  # the completion without the "body" wrapper: read the same
  results = [result(reqs[0], "answer zero"), result(reqs[1], "cut", finish="length"),
             result(reqs[2], "failed", status=500), flat]  # reqs[3]: no result
  results_path = write_jsonl(tmp_path / "results.jsonl", results)
  records, left_out, missing = conversations_from_results(path, results_path)
  assert [x.split(": ")[0] for x in left_out] == [f"{results_path}:2", f"{results_path}:3"]
  assert missing == [reqs[3]["custom_id"]]
  write_jsonl(tmp_path / "byo.jsonl", records)
  back, _ = read_source("back", {"type": "conversations", "path": "byo.jsonl"}, str(tmp_path))
  assert [p.messages for p in back] == [reqs[0]["body"]["messages"] + [msg("assistant", "answer zero")],
                                        reqs[4]["body"]["messages"] + [msg("assistant", "answer four")]]


def test_request_file_refuses_images():
  from vsd_jax.data.requests import RequestFileError
  from vsd_jax.data.sources import Prompt
  c = base_config()
  with pytest.raises(RequestFileError, match="prompt a.json\\[0\\] has images"):
    request_lines([Prompt("a.json[0]", [msg("user", "<image>\nw1")], ("x.png",))], "m", c.data.regen)


@pytest.mark.slow
def test_request_cli_then_train_cli_on_conversations(tmp_path):
  """The recipe end to end with the CLIs: `vsd_jax.data.requests` writes configs/tiny.py's prompts, a stand-in
  server answers them, `--results` joins the answers back; `python -m vsd_jax.train --config configs/tiny.py` trains
  a few steps on them and on a handmade multi-turn file. The response cache then holds only the held-out report's
  one regenerated prompt: nothing was generated for training."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")  # one CPU device, as on a workstation

  def cli(*args):
    r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return r

  requests, results, merged = (str(tmp_path / f) for f in ("requests.jsonl", "results.jsonl", "merged.jsonl"))
  cli("vsd_jax.data.requests", "--config", "configs/tiny.py", "--config.data.sources.alpaca.limit=2",
      "--config.data.sources.gsm8k.limit=1", "--config.data.sources.self_instruct.limit=0", "--output", requests)
  reqs = [json.loads(line) for line in open(requests, encoding="utf-8")]
  assert len(reqs) == 3
  write_jsonl(tmp_path / "results.jsonl", [
      {"custom_id": r["custom_id"], "error": None, "response": {"status_code": 200, "body": {"choices": [
          {"message": {"role": "assistant", "content": f"Answer number {n}."}, "finish_reason": "stop"}]}}}
      for n, r in enumerate(reqs)])
  cli("vsd_jax.data.requests", "--requests", requests, "--results", results, "--output", merged)
  handmade = write_jsonl(tmp_path / "handmade.jsonl", [
      {"messages": [msg("user", "What is 2+2?"), msg("assistant", "2+2 is 4.")]},
      {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a colour."},
                         {"from": "gpt", "value": "Blue."}, {"from": "human", "value": "Another?"},
                         {"from": "gpt", "value": "Red."}]}])
  work = tmp_path / "run"
  cli("vsd_jax.train", "--config", "configs/tiny.py", f"--config.workdir={work}",
      "--config.data.sources.alpaca.type=conversations", f"--config.data.sources.alpaca.path={handmade}",
      "--config.data.sources.gsm8k.type=conversations", f"--config.data.sources.gsm8k.path={merged}",
      "--config.data.sources.self_instruct.limit=0", "--config.train.total_steps=3", "--config.train.warmup_steps=1",
      "--config.train.log_every=1", "--config.train.target_features=in_step", "--config.train.progress_bar=False",
      "--config.eval.heldout_limit=1", "--config.data.regen.max_new_tokens=4", "--config.data.draft_vocab_size=64")
  report = json.loads((work / "report.json").read_text())
  assert report["steps"] == 3 and report["stopped"] == "done"
  assert report["data"]["answered"] == 5 and report["data"]["sequences"] == 5
  assert report["data"]["sources"]["gsm8k"]["prompts"] == 3 and report["data"]["loss_tokens"] > 0
  cache = [f for f in os.listdir(work / "data_cache") if f.startswith("responses-")]
  assert len(cache) == 1 and len((work / "data_cache" / cache[0]).read_text().splitlines()) == 1
