"""Bring your own responses: the configured training prompts as a request file for an OpenAI-compatible batch
endpoint (vLLM, SGLang), and the endpoint's results back as a conversations file for a "conversations" source.

  python -m vsd_jax.data.requests --config configs/tiny.py --output requests.jsonl [--model NAME]
  # run requests.jsonl on your server (docs/SCALE_OUT.md, "Bring your own responses"), e.g. vLLM:
  #   vllm run-batch -i requests.jsonl -o results.jsonl --model NAME
  python -m vsd_jax.data.requests --requests requests.jsonl --results results.jsonl --output conversations.jsonl
  # then train on them: a source dict(type="conversations", path="conversations.jsonl") in config.data.sources

Each request line is {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"model", "messages",
"max_tokens", "temperature", "top_p", "chat_template_kwargs"}}: the prompts as OpenAI chat messages (system turn
included, with data.system_prompt applied as training applies it), not as template-rendered text, because the chat
endpoint applies the served model's own chat template, the one data.chat_template "" (the tokenizer's own) trains
with; rendered text would need the completions endpoint and would template twice on the chat one. A config with its
own data.chat_template must serve the model with that template too (vLLM and SGLang: --chat-template). max_tokens,
temperature and top_p are data.regen's, as the target's own regeneration uses them; chat_template_kwargs is
{"enable_thinking": data.enable_thinking} (vLLM and SGLang pass it to the template; only Qwen3's reads it). Prompts
of "conversations" sources (already answered) are not written; prompts with images are refused (text only).

Results -> conversations: each result (OpenAI batch output, as vLLM and SGLang write it: {"custom_id",
"response": {"status_code", "body": {"choices": [{"message": {"content"}, "finish_reason"}]}}, "error"}) is joined
by custom_id with its request: {"custom_id", "messages": request messages + the assistant turn}. Failed requests
and responses cut at max_tokens (finish_reason "length": the chat template would close them with an end-of-turn
token the target did not write) are left out, counted and named on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import flags

from vsd_jax.cli_config import define_config_flag, run_app
from vsd_jax.data.sources import load_prompts, read_utf8
from vsd_jax.errors import InputNotFoundError, UserError
from vsd_jax.resolved import resolve

log = logging.getLogger(__name__)

CHAT_URL = "/v1/chat/completions"


class RequestFileError(UserError):
  """A request or result file that cannot be used; the message names the file, the line and the fix."""


def request_lines(prompts, model: str, regen, enable_thinking: bool = False) -> list:
  """Prompts (sources.Prompt, unanswered and text-only) -> request records for an OpenAI-compatible batch endpoint,
  in order; custom_id "<position>:<prompt id>" (unique, and names where the prompt came from). regen: config.data.regen
  (max_new_tokens, temperature, top_p). enable_thinking: config.data.enable_thinking, passed to the server's chat
  template as chat_template_kwargs (read by Qwen3's template only)."""
  out = []
  for n, p in enumerate(prompts):
    if p.images:
      raise RequestFileError(f"prompt {p.id} has images; a request file carries text prompts only. Remove the "
                             "image source from config.data.sources, or let vsd_jax.train regenerate its responses.")
    out.append({"custom_id": f"{n}:{p.id}", "method": "POST", "url": CHAT_URL,
                "body": {"model": model, "messages": p.messages, "max_tokens": int(regen.max_new_tokens),
                         "temperature": float(regen.temperature), "top_p": float(regen.top_p),
                         "chat_template_kwargs": {"enable_thinking": bool(enable_thinking)}}})
  return out


def write_requests(config, output: str, model: str = "") -> int:
  """config.data's prompts (load_prompts: every source, data.system_prompt applied) -> the request file `output`;
  returns the number of requests. model: the served model name (default config.model.name)."""
  run = resolve(config)
  data = run.data
  prompts, _ = load_prompts(data, data.system_prompt)
  answered = sum(p.answered for p in prompts)
  if answered:
    log.info("%d conversations of 'conversations' sources already have their responses; not written", answered)
  lines = request_lines([p for p in prompts if not p.answered], model or run.model.name, data.regen,
                        data.enable_thinking)
  if not lines:
    raise RequestFileError("config.data.sources hold no prompt to request a response for (only already answered "
                           "conversations); add a prompt source.")
  _write_jsonl(output, lines)
  return len(lines)


def _write_jsonl(path: str, records) -> None:
  """Records as JSONL, written whole to a temporary file and renamed: no half-written file is left."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def _read_jsonl(path: str, what: str) -> list:
  """[(line number, record)] of a JSONL file; RequestFileError naming file:line for a malformed line."""
  if not os.path.isfile(path):
    raise InputNotFoundError(f"{what} {path!r} does not exist; pass the file's path.")
  out = []
  for n, line in enumerate(read_utf8(path, f"{what} {path!r}", RequestFileError).splitlines(), 1):
    if line.strip():
      try:
        out.append((n, json.loads(line)))
      except json.JSONDecodeError as e:
        raise RequestFileError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno}) in the {what}; fix or "
                               "delete the line.") from e
  return out


def _answer(result) -> tuple:
  """A batch result -> (assistant text, None) or (None, why it is left out)."""
  if result.get("error"):
    return None, f"error {result['error']}"
  response = result.get("response") or {}
  if response.get("status_code", 200) != 200:
    return None, f"status {response.get('status_code')}"
  try:
    choice = response.get("body", response)["choices"][0]  # vLLM/SGLang: the completion under "body"
    text = choice["message"]["content"]
  except (KeyError, IndexError, TypeError):
    return None, "no response.body.choices[0].message.content"
  if choice.get("finish_reason") == "length":
    return None, "cut at max_tokens (finish_reason 'length')"
  if not isinstance(text, str) or not text.strip():
    return None, "empty response"
  return text, None


def conversations_from_results(requests_path: str, results_path: str) -> tuple:
  """Request file + the endpoint's result file -> (conversation records {"custom_id", "messages"} in request order,
  ["results:line: custom_id: why left out"] for results not used, [custom_ids without a result])."""
  requests = {}
  for n, r in _read_jsonl(requests_path, "request file"):
    if not isinstance(r, dict) or "custom_id" not in r or "messages" not in (r.get("body") or {}):
      raise RequestFileError(f"{requests_path}:{n}: not a request line of vsd_jax.data.requests (custom_id, "
                             "body.messages); pass the request file the results were made from.")
    requests[r["custom_id"]] = r["body"]["messages"]
  answers, left_out, seen = {}, [], set()
  for n, res in _read_jsonl(results_path, "result file"):
    cid = res.get("custom_id") if isinstance(res, dict) else None
    if cid not in requests:
      raise RequestFileError(f"{results_path}:{n}: custom_id {cid!r} is not in the request file {requests_path!r}; "
                             "pass the request file these results were made from.")
    seen.add(cid)
    text, why = _answer(res)
    if why:
      left_out.append(f"{results_path}:{n}: {cid}: {why}")
    else:
      answers[cid] = text
  records = [{"custom_id": cid, "messages": list(msgs) + [{"role": "assistant", "content": answers[cid]}]}
             for cid, msgs in requests.items() if cid in answers]
  missing = [cid for cid in requests if cid not in seen]
  return records, left_out, missing


def main(_):
  f = flags.FLAGS
  if not f.output:
    raise UserError("--output is required: the JSONL file to write")
  if f.results or f.requests:
    if not (f.results and f.requests):
      raise UserError("--results and --requests go together: the endpoint's result file and the request file it "
                      "ran")
    records, left_out, missing = conversations_from_results(f.requests, f.results)
    for x in left_out:
      print(f"left out {x}", file=sys.stderr)
    if missing:
      print(f"{len(missing)} requests have no result (e.g. {', '.join(missing[:3])})", file=sys.stderr)
    if not records:
      raise RequestFileError(f"no usable result in {f.results!r} ({len(left_out)} left out, {len(missing)} missing)")
    _write_jsonl(f.output, records)
    print(f"wrote {len(records)} conversations to {f.output} ({len(left_out)} results left out, {len(missing)} "
          "requests without a result); train on them with a source {'type': 'conversations', 'path': ...}")
    return
  if f.config is None:
    raise UserError("--config is required to write requests (e.g. --config configs/tiny.py), or pass --requests "
                    "and --results to turn results into conversations")
  n = write_requests(f.config, f.output, f.model or "")
  print(f"wrote {n} requests ({CHAT_URL}, OpenAI messages) to {f.output}")


def _define_flags():
  define_config_flag()
  flags.DEFINE_string("output", None, "JSONL file to write: the request file, or with --results the conversations.")
  flags.DEFINE_string("model", None, "The model name the server serves (vLLM: its model argument or "
                      "--served-model-name; SGLang: --served-model-name); default config.model.name.")
  flags.DEFINE_string("requests", None, "With --results: the request file the endpoint ran.")
  flags.DEFINE_string("results", None, "The endpoint's batch output (JSONL); turns it into a conversations file.")


if __name__ == "__main__":
  _define_flags()
  run_app(main)
