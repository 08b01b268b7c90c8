"""One process of the multi-host tests (tests/test_multihost.py): trains the toy method of
tests/test_trainer.py with train_loop over a mesh spanning every process, and prints its result.

  python -m tests.multihost_worker WORKDIR PROCESS_ID NUM_PROCESSES PORT STOP_STEP [TOTAL_STEPS]

NUM_PROCESSES=1 runs without jax.distributed. The caller sets XLA_FLAGS (host devices per process).
"""

import json
import sys

import jax


def main(workdir, pid, nproc, port, stop_step, total_steps=40):
  from vsd_jax import parallel
  from tests import test_trainer as toy
  from vsd_jax.training.trainer import train_loop

  c = toy.make_config(workdir, total_steps=total_steps, checkpoint_every=25, log_every=1)
  if nproc > 1:
    c.mesh.distributed = "on"
    c.mesh.coordinator_address = f"localhost:{port}"
    c.mesh.num_processes, c.mesh.process_id = nproc, pid
  parallel.maybe_initialize_distributed(c)
  # (data=2, fsdp=1, tensor=-1): the batch and the parameters are both split across the processes.
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, -1

  def make_batches(start):
    for b in toy.make_batches(start):
      yield parallel.process_local_slice(b)

  res = train_loop(c, toy.loss_fn, toy.init_params, toy.frozen_embedding(), make_batches, stop_step=stop_step)
  kernel = res.state.params["Dense_0"]["kernel"]
  print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                "devices": jax.device_count(), "step": res.step, "stopped": res.stopped,
                                "mesh": dict(parallel.make_mesh(c).shape),
                                "kernel_spec": str(kernel.sharding.spec)}), flush=True)


if __name__ == "__main__":
  a = sys.argv[1:]
  main(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), *(int(x) for x in a[5:]))
