"""Recipes: the top floor of the package, wiring the lower floors into runs for the entry scripts.

* :mod:`nemo_aligner.recipes.common`: the setup steps every training recipe calls in order (config check, log
  directory and checkpoints, Fabric, pretrained model, data splits, run length, summary, finish) and
  :func:`~nemo_aligner.recipes.common.run_or_exit`, which prints a :class:`~nemo_aligner.errors.UserError` as one
  line.
* :mod:`nemo_aligner.recipes.online`: the roles of an online run (PPO, rejection sampling): the reward source (a
  local reward model or the reward-model server) and, for PPO, the critic and initial policy, colocated in this
  process or served.

A recipe module may import every other floor (``servers``, ``algorithms``, ``models``, ``generation``, ``data``,
``utils``, ``errors``); nothing in the package imports it. See docs/user-guide/architecture.md.
"""
