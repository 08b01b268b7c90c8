"""Data: prompt sources, chat templates + loss masks, response regeneration, batching."""

from vsd_jax.data.chat import (ChatTemplateError, PromptEncoder, apply_length_limit, build_sequence, encode_chat,
                               encode_prompt, end_of_turn_ids, prompt_encoder)
from vsd_jax.data.dataset import SequenceDataset, bucket_lengths, iterate_batches, pad_batch
from vsd_jax.data.pipeline import TrainingData, prepare_data
from vsd_jax.data.regenerate import GenSettings, make_target_call, regenerate
from vsd_jax.data.sources import DataSourceError, Prompt, load_prompts, read_file, read_hub, read_source
