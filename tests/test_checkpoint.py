"""The Orbax checkpointer in-process: nothing on disk before the first save, keep-N plus best,
`best` means the lowest validation loss."""

from __future__ import annotations

import jax.numpy as jnp

from flax_gpt.train.run_dir import RunDir


def test_best_is_the_lowest_validation_loss_and_survives_keep(tmp_path):
    ckpt = RunDir(tmp_path).checkpointer(keep=1, keep_best=True, async_save=False)
    assert ckpt.steps() == [] and not (tmp_path / "checkpoints").exists()  # nothing created yet
    for step, loss in ((1, 3.0), (2, 2.0), (3, 2.5), (4, None)):
        ckpt.save(step, {"w": jnp.full(3, float(step))}, val_loss=loss)
    ckpt.wait()
    assert ckpt.best_step() == 2
    assert ckpt.steps() == [2, 4]  # the newest (keep=1) and the best
    ckpt.close()
    reopened = RunDir(tmp_path).checkpointer(read_only=True)
    assert reopened.best_step() == 2


def test_no_validation_loss_means_no_best(tmp_path):
    ckpt = RunDir(tmp_path).checkpointer(async_save=False)
    ckpt.save(1, {"w": jnp.ones(2)})
    ckpt.wait()
    assert ckpt.best_step() is None
    ckpt.close()
