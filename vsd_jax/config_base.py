"""Defaults shared by every config in configs/: each get_config() starts from `base_config()`."""

import os

import ml_collections

from vsd_jax.errors import ConfigError

# The checkout's root (configs/, runs/ live there); the installed package is an editable install.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Local prompt files (the team's shared/data); override with VSD_DATA_DIR or --config.data.root.
DEFAULT_DATA_ROOT = os.environ.get("VSD_DATA_DIR", os.path.join(REPO_ROOT, "..", "shared", "data"))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = os.path.join(REPO_ROOT, "runs", "default")

  # Target model: registry name, GGUF path, HF directory or hub id.
  c.model = ml_collections.ConfigDict()
  c.model.name = "smollm2-135m-instruct"
  c.model.dtype = "float32"          # compute dtype
  c.model.param_dtype = "float32"    # storage dtype of target params
  c.model.max_positions = 2048       # cache/positions bound for generation and training sequences

  # Vanilla / speculative generation defaults (CLI flags override these).
  c.generate = ml_collections.ConfigDict()
  c.generate.max_new_tokens = 128
  c.generate.temperature = 0.0
  c.generate.top_p = 1.0
  c.generate.batch_size = 1
  c.generate.system_prompt = ""      # "" keeps the tokenizer's default chat template behaviour
  c.generate.scan_layers = False     # decoding loads the target with unrolled layers: a scanned layer stack
                                     # copies each layer's weights every forward on CPUs (RESULTS section 7)
  c.generate.untie_lm_head = "auto"  # "auto": a tied vocabulary projection gets its own [H, V] copy on CPUs
                                     # (same logits; vanilla 5% faster there, RESULTS section 7); "true" /
                                     # "false" force it

  # Data: prompt sources and the regenerated-response cache.
  c.data = ml_collections.ConfigDict()
  c.data.root = DEFAULT_DATA_ROOT
  # name -> dict(type=alpaca|gsm8k|self_instruct|sharegpt|messages|eagle, path=<under root>, limit=-1 (all))
  #      or dict(type="hub", name=<hub id>, split=..., format=sharegpt|messages|..., limit=...). limit=0 disables.
  c.data.sources = ml_collections.ConfigDict(dict(
      alpaca=dict(type="alpaca", path="train/alpaca_5000.json", limit=-1),
      gsm8k=dict(type="gsm8k", path="train/gsm8k_train.jsonl", limit=-1),
      self_instruct=dict(type="self_instruct", path="train/self_instruct_seed_tasks.jsonl", limit=-1)))
  c.data.on_bad_line = "error"       # malformed source line: "error" (stop, naming file:line) or "skip" (count)
  c.data.system_prompt = ""          # prepended to prompts without one; "" keeps the template's default
  c.data.chat_template = ""          # "" = tokenizer's own; "vicuna" or a Jinja string
  c.data.enable_thinking = False     # Qwen3's template switch (its thinking block), off for draft data; read only
                                     # by templates that mention it, and part of the response cache's key
  c.data.max_length = 2048           # tokens per training sequence (prompt + response)
  c.data.length_policy = "truncate"  # sequences over max_length: "truncate" or "drop" (both counted)
  # Padded training lengths: each distinct one compiles the train step once; the last must be >= max_length.
  c.data.buckets = (512, 1024, 2048)
  c.data.cache_dir = ""              # regenerated responses + draft vocab; "" = <workdir>/data_cache
  c.data.draft_vocab_size = 32000    # top-N response tokens (EAGLE-3 d2t/t2d)
  c.data.max_images = 0              # images per row of a multimodal dataset; 0 = the most one prompt has
  # Response regeneration by the target (self-distillation).
  c.data.regen = ml_collections.ConfigDict(dict(max_new_tokens=1024, temperature=0.0, top_p=1.0, batch_size=8,
                                                seed=0))

  # Parallelism: mesh axis sizes (-1 = all remaining devices) and logical axis rules.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Named layouts, e.g. a paper config's pod slice ("v5p-32": data 1, fsdp 8, tensor 2; see pod_mesh);
  # --config.mesh.preset=<name> uses one instead of the sizes above ("" = the sizes above).
  c.mesh.presets = ml_collections.ConfigDict()
  c.mesh.preset = ""
  # Logical axis -> mesh axes ("data,fsdp"; "" = replicated); see vsd_jax/parallel.py.
  c.mesh.rules = ml_collections.ConfigDict(dict(
      batch="data,fsdp", length="", embed="fsdp", heads="tensor", kv_heads="tensor", mlp="tensor",
      vocab="tensor", norm="", layers=""))
  # Multi-host: "auto" (initialise when the environment is a multi-process job), "on", "off";
  # coordinator "host:port", num_processes / process_id (-1 = detect; TPU pods, SLURM, MPI).
  c.mesh.distributed = "auto"
  c.mesh.coordinator_address = ""
  c.mesh.num_processes = -1
  c.mesh.process_id = -1

  # What is trained: "eagle3" (VSD_METHOD.md section 6) or "vsd" (sections 1-5).
  c.method = "eagle3"
  c.draft = ml_collections.ConfigDict()
  c.draft.ttt_steps = 7              # training-time-test unroll
  c.draft.step_decay = 0.8           # step k weighs step_decay**k
  c.draft.objective = "kl"           # each step's objective: "kl" (EAGLE-3's soft cross-entropy vs the target),
                                     # "lk_alpha" (-log of the expected acceptance sum_v min(p, q)) or "lk_lambda"
                                     # (w * kl + (1 - w) * (1 - acceptance), w = lk_kl_scale * exp(-lk_kl_decay *
                                     # acceptance)): the LK losses, arXiv 2602.23881 (methods/eagle3/loss.py)
  c.draft.lk_kl_scale = 1.0
  c.draft.lk_kl_decay = 1.0
  c.draft.init_from = ""             # a trained draft directory (<workdir>/draft) to start from; "" = random
  c.draft.init_head = "random"       # lm_head + final norm: "random", or "target" (the target's output rows of
                                     # the draft-vocabulary tokens and its final norm)
  c.draft.vision_adaptor = False     # multimodal (LLaVA) targets: ViSpec-style vision adaptor (learned queries pool
                                     # the image positions; fused into every text row, zero at init: models/eagle3.py)
  c.draft.vision_queries = 4         # the adaptor's learned queries

  # VSD (method="vsd"): EM over draft paths; every switch of VSD_METHOD.md is a field here.
  c.vsd = ml_collections.ConfigDict()
  c.vsd.depth = 6                    # K: tokens per draft path
  c.vsd.num_paths = 8                # S: proposals per anchor (E-step)
  c.vsd.num_anchors = 16             # M: anchors per sequence
  c.vsd.draft_temperature = 1.0      # q's sampling temperature for the proposals
  c.vsd.accept_mode = "greedy"       # a_k: "greedy" (T=0 decoding) or "stochastic" (min(1, p^T/q))
  c.vsd.accept_temperature = 1.0     # T of p^T in stochastic mode
  c.vsd.utility = "expected_length"  # U = sum_k prod_{j<=k} a_j, or "full_accept" (prod_k a_k)
  c.vsd.estep = "mcmc"               # "mcmc" (independence MH over the proposals), "snis", or "exact" (no
                                     # sampling: J on the teacher-forced chain, methods/vsd/exact.py)
  c.vsd.exact_form = "log_u"         # estep="exact": "log_u" (mu * EAGLE-3 + lambda_exact * -J) or "reach"
  c.vsd.lambda_exact = 1.0           # estep="exact", form "log_u": weight of -J
  c.vsd.burn_in = 2                  # chain states dropped (mcmc)
  c.vsd.arw = True                   # Adaptive Rejection Weighting; False = plain EM likelihood of the sample
  c.vsd.eta = 0.5                    # unlikelihood strength: eta_k = eta * clip(c_k / (1 - c_k), 0, eta_max)
  c.vsd.eta_max = 4.0
  c.vsd.ema_decay = 0.9              # EMA of the per-depth acceptance c_k
  c.vsd.rho0 = 0.0                   # weight of never-verified tokens k > L+1: rho0 * rho**(k-L-1)
  c.vsd.rho = 1.0
  c.vsd.gamma = 1.0                  # depth discount gamma**(k-1) of the ARW terms
  c.vsd.lambda_car = 0.5             # Confidence-Aware Regularization weight (0 disables)
  c.vsd.car_beta = 1.0               # confidence c(p) = max_v p(v) ** beta
  c.vsd.mu = 1.0                     # weight of the EAGLE-3 TTT loss in the total
  c.vsd.eagle3_grad_share = 0.0      # > 0: the EAGLE-3 term keeps this share of the gradient norm, the other
                                     # terms rescaled each step (methods/grad_share.py; issue 15 variant C)
  c.vsd.arw_norm = "supported"       # ARW's divisor: the supported anchors, or "all" existing anchors

  # Held-out report after training: prompts never trained on (EAGLE question.jsonl under data.root).
  c.eval = ml_collections.ConfigDict()
  c.eval.heldout_path = "eval/eagle/mt_bench/question.jsonl"
  c.eval.heldout_limit = -1
  c.eval.heldout_source = None       # a whole source spec instead (e.g. LLaVA-Instruct prompts with images, as in
                                     # config.data.sources); None = EAGLE's file at heldout_path, heldout_limit

  # Optimisation and the training loop (vsd_jax/training/{state,trainer,checkpoints}.py).
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8             # sequences per step (global)
  # EAGLE-3's target outputs: "in_step" (the target runs inside each jitted step) or "precomputed" (one
  # pass over the data first, float16 memmaps in the data cache; pays off once sequences are seen again).
  c.train.target_features = "in_step"
  c.train.lr = 1e-4                  # peak learning rate (AdamW)
  c.train.warmup_steps = 100         # linear warmup from 0 to lr
  c.train.total_steps = 10000        # cosine decay to lr * end_lr_ratio at this step; the loop stops here
  c.train.end_lr_ratio = 0.0
  c.train.weight_decay = 0.0         # decoupled; not applied to norm scales and biases
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.grad_clip = 0.5            # global-norm clipping; 0 disables
  c.train.log_every = 10             # metrics (mean over the interval) to metrics.jsonl + TensorBoard
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True    # write checkpoints in a background thread
  c.train.resume = True              # continue from the latest checkpoint in <workdir>/checkpoints
  c.train.resume_fallback = False    # latest checkpoint corrupt: False = stop with an error, True = use
                                     # the newest good one (corrupt ones move to checkpoints_corrupt/)
  c.train.progress_bar = True
  return c


# The paper-scale configs (configs/vicuna.py, llama3.py, llava.py) share EAGLE-3's released training recipe and a
# TPU pod mesh; each is set here once.
SHAREGPT_HUB = dict(type="hub", name="Aeala/ShareGPT_Vicuna_unfiltered", split="train", format="sharegpt",
                    data_files="ShareGPT_V4.3_unfiltered_cleaned_split.json", limit=-1)


def eagle3_released_recipe(c: ml_collections.ConfigDict, warmup_steps: int = 12000,
                           total_steps: int = 800000) -> None:
  """EAGLE-3's released recipe (eagle/traineagle3/ds_config.json): AdamW b=(0.9, 0.95), no weight decay, clip
  0.5, peak lr 5e-5 after 12000 warmup steps, 800000 steps, 7-step TTT; 1 sequence per GPU x 2 accumulation x 8
  GPUs = 16 sequences per update. (Their decay is linear, ours cosine.)"""
  c.train.batch_size = 16
  c.train.lr = 5e-5
  c.train.warmup_steps = warmup_steps
  c.train.total_steps = total_steps
  c.train.b1, c.train.b2, c.train.weight_decay, c.train.grad_clip = 0.9, 0.95, 0.0, 0.5
  c.train.checkpoint_every = 2000
  c.train.log_every = 50
  c.draft.ttt_steps = 7


def pod_mesh(c: ml_collections.ConfigDict, slice_name: str, data: int, fsdp: int, tensor: int) -> None:
  """The TPU slice a paper config is written for (v5p chips: 95 GiB HBM each), kept as the named mesh preset
  `slice_name` (data x fsdp x tensor): `--config.mesh.preset=v5p-32` trains with it, and --dry_run compiles for
  it. By default the mesh is sized to the devices present (FSDP over all of them), so the config runs on one GPU,
  an 8-GPU node or any slice."""
  c.mesh.slice = slice_name
  c.mesh.device_memory_gib = 0.0   # 0 = the slice's chip; see vsd_jax/dry_run.py
  c.mesh.presets[slice_name] = dict(data=data, fsdp=fsdp, tensor=tensor)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1


MESH_AXES = ("data", "fsdp", "tensor")


def mesh_axis_sizes(config) -> tuple:
  """({axis: size} of config.mesh, -1 = the remaining devices; what chose them: "mesh.preset=<name>" or the
  mesh.data/fsdp/tensor fields). The one reading of config.mesh's sizes (parallel.py, dry_run.py); no JAX."""
  m = config.mesh
  name = str(m.get("preset", "") or "")
  if not name:
    return {a: int(m[a]) for a in MESH_AXES}, "mesh.data/fsdp/tensor"
  presets = m.get("presets", None) or {}
  if name not in presets:
    raise ConfigError(f"mesh.preset={name!r} is not a mesh preset of this config (presets: "
                      f"{', '.join(sorted(presets)) or 'none'}); pass one of them, or --config.mesh.preset= to "
                      "size the mesh by mesh.data/fsdp/tensor")
  return {a: int(presets[name][a]) for a in MESH_AXES}, f"mesh.preset={name}"


def hub_target_config(name: str, run_name: str, slice_name: str, data: int, fsdp: int, tensor: int):
  """A paper-scale config for the hub target `name` (registry name; its architecture is models/archs.ARCHS[name], so
  a dry run needs no download) on a TPU slice: bfloat16, EAGLE-3's training prompts (ShareGPT + UltraChat-200K
  from the hub; local files: see above) and released recipe, a 32000-token draft vocabulary. configs/llama3.py,
  configs/qwen3.py."""
  from vsd_jax.models.archs import ARCHS
  c = base_config()
  c.workdir = os.path.join(REPO_ROOT, "runs", run_name)
  c.model.name = name
  c.model.arch = dict(ARCHS[name])  # the hub's config.json
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.max_positions = 4096
  c.generate.batch_size = 1
  c.data.sources = dict(
      sharegpt=SHAREGPT_HUB,
      ultrachat=dict(type="hub", name="HuggingFaceH4/ultrachat_200k", split="train_sft", format="messages",
                     limit=-1))
  c.data.draft_vocab_size = 32000
  c.data.max_length = 2048
  c.data.buckets = (512, 1024, 2048)
  eagle3_released_recipe(c)
  pod_mesh(c, slice_name, data, fsdp, tensor)
  return c


def tiny_training(c: ml_collections.ConfigDict, batch_size: int) -> None:
  """The tiny random targets' training (configs/llava.py:tiny, configs/qwen3.py:tiny): 40 steps at lr 3e-3 on a CPU,
  3 TTT steps, and VSD's depth 3 x 4 paths x 4 anchors with --config.method=vsd."""
  c.train.batch_size = batch_size
  c.train.total_steps = 40
  c.train.warmup_steps = 5
  c.train.lr = 3e-3
  c.train.log_every = 10
  c.train.checkpoint_every = 20
  c.draft.ttt_steps = 3
  c.vsd.depth, c.vsd.num_paths, c.vsd.num_anchors = 3, 4, 4
