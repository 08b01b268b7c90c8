"""Sequence store: training sequences written once to disk as flat arrays, read by every process.

A store is a directory:
  input_ids.i32   int32 [total tokens]   every sequence's token ids, one after another
  loss_mask.u8    uint8 [total tokens]   its loss mask (0/1)
  lengths.i32     int32 [N]              each sequence's length (offsets are their cumulative sum)
  images.jsonl    one JSON list of image files per sequence (multimodal datasets only)
  manifest.json   written last: counts, byte sizes, content fingerprint, the builder's `meta`

Why flat numpy files rather than an Arrow (`datasets`) table: a batch needs only "the tokens of sequence i", which
is one offset lookup and one read; the files are the arrays themselves (np.memmap or np.fromfile open them with no
conversion), the epoch order needs only `lengths` (2 MB for 500k sequences), and appending with a committed
length makes the build resumable with nothing but truncate. Reads use pread, not a mapping, so the pages an epoch
touches live in the operating system's page cache (shared by every process on the host) and not in each
process's resident memory.

Building (build_store) is resumable: the store is written under `<directory>.partial-<builder>`; every
`commit_every` sequences the files are flushed and fsynced and progress.json (the committed sequence and token
counts) is replaced atomically. A killed build resumes from its last commit (the files are cut back to it, the
items before it are skipped); a finished one writes manifest.json and is renamed to `<directory>` in one step, so
a partial store is never opened as a finished one (open_store requires the manifest and checks every file's size).
Several processes building the same store (a shared cache directory) each write their own partial directory;
the first rename wins and the others drop theirs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from typing import Iterable, Optional

import numpy as np

from vsd_jax.data.dataset import Fingerprint, SequenceDataset, check_sequence

log = logging.getLogger(__name__)

FORMAT = 1
FILES = {"input_ids": ("input_ids.i32", 4), "loss_mask": ("loss_mask.u8", 1), "lengths": ("lengths.i32", 4)}


class StoreError(ValueError):
  """A sequence store that cannot be opened as a finished one (missing, partial, or its files do not match)."""


def _fsync_replace(path: str, obj: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


class StoreWriter:
  """Appends sequences to the partial store `<directory>.partial-<builder>`; `done` sequences are already there
  (a resumed build). commit() makes what was added durable; finish() publishes the store."""

  def __init__(self, directory: str, meta: Optional[dict] = None, builder: Optional[str] = None):
    self.directory = os.path.abspath(directory)
    self.meta = dict(meta or {})
    self.partial = f"{self.directory}.partial-{builder or socket.gethostname()}"
    progress = _read_json(os.path.join(self.partial, "progress.json"))
    if progress is None or progress.get("meta") != self.meta or progress.get("format") != FORMAT:
      if os.path.exists(self.partial):
        log.info("sequence store: discarding %s (no commit, or written for other data)", self.partial)
        shutil.rmtree(self.partial)
      os.makedirs(self.partial)
      progress = dict(format=FORMAT, meta=self.meta, sequences=0, tokens=0, images_bytes=0, multimodal=None)
    self.done, self.tokens = int(progress["sequences"]), int(progress["tokens"])
    self.multimodal = progress["multimodal"]
    # Cut every file back to the last commit (a killed build may have written past it), then append.
    sizes = {"input_ids": self.tokens * 4, "loss_mask": self.tokens, "lengths": self.done * 4}
    self._files = {}
    for name, (fname, _) in FILES.items():
      f = open(os.path.join(self.partial, fname), "ab")
      f.truncate(sizes[name])
      self._files[name] = f
    img = open(os.path.join(self.partial, "images.jsonl"), "ab")
    img.truncate(int(progress["images_bytes"]))
    self._files["images"] = img
    self._hash = Fingerprint()
    self._loss_tokens = 0
    if self.done:  # the fingerprint of what is committed: read it back (sequentially) rather than trust a state
      for name in FILES:
        self._files[name].flush()
      part = self._open_partial()
      for _, ids, mask, offs in part.blocks():
        self._loss_tokens += int(mask.sum(dtype=np.int64))
        for j in range(len(offs) - 1):
          self._hash.add(ids[offs[j]:offs[j + 1]], mask[offs[j]:offs[j + 1]])
      part.close()
      log.info("sequence store: resuming %s at %d sequences (%d tokens)", self.partial, self.done, self.tokens)

  def _open_partial(self) -> SequenceDataset:
    lengths = np.fromfile(os.path.join(self.partial, FILES["lengths"][0]), np.int32, count=self.done)
    return _dataset(self.partial, lengths, None, None)

  def add(self, ids, mask, images=None) -> None:
    """One sequence: ids int [T], mask 0/1 [T] (and its image files; either every sequence has them or none)."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    check_sequence(self.done, ids, mask)
    multimodal = images is not None
    if self.multimodal is None:
      self.multimodal = multimodal
    elif self.multimodal != multimodal:
      raise ValueError(f"sequence {self.done}: {'has' if multimodal else 'has no'} image list, unlike the ones "
                       "before it")
    self._files["input_ids"].write(ids.astype(np.int32).tobytes())
    self._files["loss_mask"].write(mask.astype(np.uint8).tobytes())
    self._files["lengths"].write(np.int32(len(ids)).tobytes())
    if multimodal:
      self._files["images"].write((json.dumps(list(images)) + "\n").encode())
    self._hash.add(ids, mask)
    self._loss_tokens += int(mask.sum())
    self.done += 1
    self.tokens += len(ids)

  def commit(self) -> None:
    """Make every added sequence durable; a build killed after this resumes here."""
    for f in self._files.values():
      f.flush()
      os.fsync(f.fileno())
    _fsync_replace(os.path.join(self.partial, "progress.json"),
                   dict(format=FORMAT, meta=self.meta, sequences=self.done, tokens=self.tokens,
                        images_bytes=self._files["images"].tell(), multimodal=self.multimodal))

  def finish(self) -> SequenceDataset:
    """Write the manifest and publish the store under `directory` (atomic rename); returns it opened."""
    self.commit()
    for f in self._files.values():
      f.close()
    images = None
    if self.multimodal:
      with open(os.path.join(self.partial, "images.jsonl")) as f:
        images = [json.loads(line) for line in f]
    fingerprint = self._hash.hexdigest(images)
    if self.meta.get("fingerprint", fingerprint) != fingerprint:  # the items differ from those it was named by
      shutil.rmtree(self.partial)
      raise StoreError(f"sequence store {self.directory}: the sequences written have fingerprint {fingerprint}, "
                       f"not the {self.meta['fingerprint']} it was built for (items that change between passes?); "
                       "nothing was published")
    manifest = dict(format=FORMAT, meta=self.meta, sequences=self.done, tokens=self.tokens,
                    loss_tokens=self._loss_tokens, multimodal=bool(self.multimodal), fingerprint=fingerprint)
    os.remove(os.path.join(self.partial, "progress.json"))
    _fsync_replace(os.path.join(self.partial, "manifest.json"), manifest)
    try:
      os.rename(self.partial, self.directory)
    except OSError:
      if not os.path.exists(os.path.join(self.directory, "manifest.json")):
        raise
      shutil.rmtree(self.partial)  # another process published the same store first
    log.info("sequence store: %d sequences, %d tokens in %s", self.done, self.tokens, self.directory)
    return open_store(self.directory)


def build_store(directory: str, items: Iterable, meta: Optional[dict] = None, builder: Optional[str] = None,
                commit_every: int = 8192) -> SequenceDataset:
  """The finished store at `directory`, built first from `items` if needed: an iterable of (ids, mask) pairs or
  (ids, mask, images) triples, the same ones in the same order on every call (`meta`, e.g. what the items were
  made from, must identify them: a partial build with other meta is started again). A killed build resumes: the
  items it committed are skipped, not added again. builder: names this builder's partial directory (default the
  host name; give each process sharing a cache directory its own)."""
  if os.path.exists(os.path.join(directory, "manifest.json")):
    ds = open_store(directory)
    if meta is not None and ds.manifest["meta"] != dict(meta):
      raise StoreError(f"sequence store {directory} was built from other data ({ds.manifest['meta']}, not {meta})")
    return ds
  w = StoreWriter(directory, meta, builder)
  skip = w.done
  for n, item in enumerate(items):
    if n < skip:
      continue
    w.add(item[0], item[1], tuple(item[2]) if len(item) > 2 else None)
    if (n + 1) % commit_every == 0:
      w.commit()
  return w.finish()


def _dataset(directory: str, lengths: np.ndarray, images, fingerprint) -> SequenceDataset:
  offsets = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  files = {name: os.open(os.path.join(directory, FILES[name][0]), os.O_RDONLY) for name in ("input_ids", "loss_mask")}
  return SequenceDataset.from_flat(None, None, offsets, images, files, fingerprint)


def open_store(directory: str) -> SequenceDataset:
  """A finished store -> a SequenceDataset reading from its files (lengths, offsets and, multimodal, the image lists
  in memory; `.manifest` holds the manifest). StoreError unless the manifest is there and every file has the size
  it records."""
  manifest = _read_json(os.path.join(directory, "manifest.json"))
  if manifest is None:
    partial = [p for p in os.listdir(os.path.dirname(os.path.abspath(directory)) or ".")
               if p.startswith(os.path.basename(os.path.normpath(directory)) + ".partial-")] \
        if os.path.isdir(os.path.dirname(os.path.abspath(directory))) else []
    raise StoreError(f"{directory} is not a finished sequence store (no manifest.json"
                     + (f"; an unfinished build is in {', '.join(partial)}: run the build again to finish it)"
                        if partial else ")"))
  if manifest.get("format") != FORMAT:
    raise StoreError(f"sequence store {directory} has format {manifest.get('format')}, this version reads {FORMAT}")
  n, t = int(manifest["sequences"]), int(manifest["tokens"])
  for name, (fname, size) in FILES.items():
    want = (n if name == "lengths" else t) * size
    path = os.path.join(directory, fname)
    got = os.path.getsize(path) if os.path.exists(path) else None
    if got != want:
      raise StoreError(f"sequence store {directory}: {fname} has {got} bytes, the manifest says {want}")
  lengths = np.fromfile(os.path.join(directory, FILES["lengths"][0]), np.int32)
  if int(lengths.sum(dtype=np.int64)) != t:
    raise StoreError(f"sequence store {directory}: lengths sum to {int(lengths.sum())}, the manifest says {t} tokens")
  images = None
  if manifest["multimodal"]:
    with open(os.path.join(directory, "images.jsonl")) as f:
      images = [json.loads(line) for line in f]
    if len(images) != n:
      raise StoreError(f"sequence store {directory}: {len(images)} image lists for {n} sequences")
  ds = _dataset(directory, lengths, images, manifest["fingerprint"])
  ds.manifest = manifest
  return ds


def store_sequences(cache_dir: str, items, builder: Optional[str] = None) -> SequenceDataset:
  """The sequence store of `items` ((ids, mask[, images]) in training order, e.g. the data pipeline's sequences
  after the length limit) under cache_dir, named by their content fingerprint: built when missing (resuming an
  unfinished build of the same content), opened as it is otherwise. `items` is read twice (fingerprint, build).
  builder: default "<host>-<JAX process index>" (each process sharing the cache directory writes its own partial
  store; the first finished one is published)."""
  h = Fingerprint()
  images = []
  for item in items:
    h.add(np.asarray(item[0]), np.asarray(item[1]))
    if len(item) > 2:
      images.append(tuple(item[2]))
  key = h.hexdigest(images if images else None)
  if builder is None:
    import jax
    builder = f"{socket.gethostname()}-{jax.process_index()}"
  return build_store(os.path.join(cache_dir, f"sequences-{key}"), items, meta=dict(fingerprint=key), builder=builder)
